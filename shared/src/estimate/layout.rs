//! Memory layouts (strides, in elements) as PyTorch computes them: which views are
//! possible without a copy, which tensors are contiguous or dense, and how element-wise
//! kernels lay out their outputs. Layout decides where a reference copies, so the
//! estimator follows it exactly.

/// Row-major strides of a shape.
pub fn contiguous(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1u64;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc = acc.saturating_mul(shape[i].max(1));
    }
    strides
}

/// `is_contiguous()`: row-major, ignoring dimensions of size 1.
pub fn is_contiguous(shape: &[u64], strides: &[u64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1u64;
    for i in (0..shape.len()).rev() {
        if shape[i] == 1 {
            continue;
        }
        if strides[i] != expected {
            return false;
        }
        expected = expected.saturating_mul(shape[i]);
    }
    true
}

/// The dimensions from outermost to innermost by stride (size-1 dimensions keep their
/// place relative to a stable sort), as `empty_like` with a preserved format orders them.
pub fn order(shape: &[u64], strides: &[u64]) -> Vec<usize> {
    let mut dims: Vec<usize> = (0..shape.len()).collect();
    // Stable: equal strides keep their logical order; size-1 dimensions (whose stride
    // means nothing) go outermost.
    dims.sort_by_key(|&d| std::cmp::Reverse(if shape[d] == 1 { u64::MAX } else { strides[d] }));
    dims
}

/// `is_non_overlapping_and_dense()`: some permutation of the dimensions is row-major.
pub fn is_dense(shape: &[u64], strides: &[u64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut dims: Vec<usize> = (0..shape.len()).filter(|&d| shape[d] != 1).collect();
    dims.sort_by_key(|&d| strides[d]);
    let mut expected = 1u64;
    for d in dims {
        if strides[d] != expected {
            return false;
        }
        expected = expected.saturating_mul(shape[d]);
    }
    true
}

/// Dense strides whose dimension order follows `strides` (outermost first).
pub fn dense_in_order(shape: &[u64], strides: &[u64]) -> Vec<u64> {
    let ord = order(shape, strides);
    let mut out = vec![0; shape.len()];
    let mut acc = 1u64;
    for &d in ord.iter().rev() {
        out[d] = acc;
        acc = acc.saturating_mul(shape[d].max(1));
    }
    out
}

/// The layout `empty_like(x)` (and most kernels that follow their input) gives: `x`'s
/// own strides when it is dense, else dense strides in `x`'s dimension order.
pub fn like(shape: &[u64], strides: &[u64]) -> Vec<u64> {
    if is_dense(shape, strides) { strides.to_vec() } else { dense_in_order(shape, strides) }
}

/// The output layout of an element-wise kernel over broadcast operands (TensorIterator):
/// dimensions are ordered by the first operand whose strides tell two dimensions apart
/// (broadcast dimensions, stride 0, say nothing), and the output is dense in that order.
pub fn elementwise(shape: &[u64], operands: &[(&[u64], &[u64])]) -> Vec<u64> {
    let n = shape.len();
    // Each operand's strides aligned to the output's rank, 0 where it broadcasts.
    let aligned: Vec<Vec<u64>> = operands
        .iter()
        .map(|(s, st)| {
            let off = n - s.len();
            (0..n).map(|i| if i < off || s[i - off] == 1 && shape[i] != 1 { 0 } else { st[i - off] }).collect()
        })
        .collect();
    // Insertion sort of dimensions from innermost to outermost, as reorder_dimensions does.
    let mut perm: Vec<usize> = (0..n).rev().collect();
    // Whether dimension d0 belongs outside d1 (swap), inside it (stop), or cannot tell.
    let should_swap = |d0: usize, d1: usize| -> Option<bool> {
        for st in &aligned {
            let (s0, s1) = (st[d0], st[d1]);
            if s0 == 0 || s1 == 0 {
                continue;
            }
            if s0 < s1 {
                return Some(false);
            }
            if s0 > s1 {
                return Some(true);
            }
            // Equal strides: the smaller dimension goes inside.
            if shape[d0] > shape[d1] {
                return Some(true);
            }
        }
        None
    };
    for i in 1..n {
        let mut dim1 = i;
        let mut dim0 = i;
        while dim0 > 0 {
            dim0 -= 1;
            match should_swap(perm[dim0], perm[dim1]) {
                Some(true) => {
                    perm.swap(dim0, dim1);
                    dim1 = dim0;
                }
                Some(false) => break,
                None => {}
            }
        }
    }
    // perm lists dimensions innermost first.
    let mut out = vec![0; n];
    let mut acc = 1u64;
    for &d in &perm {
        out[d] = acc;
        acc = acc.saturating_mul(shape[d].max(1));
    }
    out
}

/// The strides of `x.view(new_shape)`, or None when the layout does not allow a view
/// (PyTorch's `computeStride`: dimensions merge only where they are contiguous chunks).
pub fn view(shape: &[u64], strides: &[u64], new_shape: &[u64]) -> Option<Vec<u64>> {
    if shape.is_empty() {
        return Some(vec![1; new_shape.len()]);
    }
    let numel: u64 = shape.iter().product();
    if numel == 0 {
        return Some(contiguous(new_shape));
    }
    let mut out = vec![0u64; new_shape.len()];
    let mut view_d = new_shape.len() as i64 - 1;
    let mut chunk_base_stride = *strides.last().unwrap_or(&1);
    let mut tensor_numel = 1u64;
    let mut view_numel = 1u64;
    for tensor_d in (0..shape.len()).rev() {
        tensor_numel *= shape[tensor_d];
        // A chunk ends where the next-outer dimension is not contiguous with this one.
        let chunk_end =
            tensor_d == 0 || (shape[tensor_d - 1] != 1 && strides[tensor_d - 1] != tensor_numel * chunk_base_stride);
        if chunk_end {
            while view_d >= 0 && (view_numel < tensor_numel || new_shape[view_d as usize] == 1) {
                out[view_d as usize] = view_numel * chunk_base_stride;
                view_numel *= new_shape[view_d as usize];
                view_d -= 1;
            }
            if view_numel != tensor_numel {
                return None;
            }
            if tensor_d > 0 {
                chunk_base_stride = strides[tensor_d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    if view_d != -1 {
        return None;
    }
    Some(out)
}

pub fn permute(strides: &[u64], dims: &[usize]) -> Vec<u64> {
    dims.iter().map(|&d| strides[d]).collect()
}

/// Whether the strides describe the channels-last layout of a 4-D or 5-D tensor
/// (channels innermost, then the spatial dimensions, batch outermost).
pub fn is_channels_last(shape: &[u64], strides: &[u64]) -> bool {
    if shape.len() < 4 || shape[1] == 1 {
        return false;
    }
    let mut dims: Vec<usize> = vec![1];
    dims.extend((2..shape.len()).rev());
    dims.push(0);
    let mut expected = 1u64;
    for d in dims {
        if shape[d] == 1 {
            continue;
        }
        if strides[d] != expected {
            return false;
        }
        expected *= shape[d];
    }
    !is_contiguous(shape, strides)
}

/// Channels-last strides of a `[B, C, ...]` shape.
pub fn channels_last(shape: &[u64]) -> Vec<u64> {
    let mut out = vec![0; shape.len()];
    let mut acc = 1u64;
    let mut dims: Vec<usize> = vec![1];
    dims.extend((2..shape.len()).rev());
    dims.push(0);
    for d in dims {
        out[d] = acc;
        acc *= shape[d].max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_merge_only_contiguous_chunks() {
        // A transposed [2, 3] cannot be flattened; a contiguous one can.
        assert_eq!(view(&[3, 2], &[1, 3], &[6]), None);
        assert_eq!(view(&[2, 3], &[3, 1], &[6]), Some(vec![1]));
        // Splitting a dimension of a transposed tensor is fine: [B*H, N, hd] from MHA.
        assert_eq!(view(&[4, 5, 32], &[32, 128, 1], &[2, 2, 5, 32]), Some(vec![64, 32, 128, 1]));
        // Size-1 dimensions go anywhere.
        assert_eq!(view(&[1, 6], &[6, 1], &[6, 1]), Some(vec![1, 1]));
    }

    #[test]
    fn dense_and_contiguous_are_told_apart() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[3, 2], &[1, 3]));
        assert!(is_dense(&[3, 2], &[1, 3]), "a transpose is dense");
        // A slice of a packed projection leaves gaps.
        assert!(!is_dense(&[2, 16, 64], &[3072, 192, 1]));
        assert_eq!(like(&[2, 16, 64], &[3072, 192, 1]), vec![1024, 64, 1]);
    }

    #[test]
    fn elementwise_outputs_follow_the_first_operand() {
        // torchvision ViT: (attention output, a transposed view) + input -> transposed.
        let a: (&[u64], &[u64]) = (&[2, 5, 64], &[64, 128, 1]);
        let b: (&[u64], &[u64]) = (&[2, 5, 64], &[320, 64, 1]);
        assert_eq!(elementwise(&[2, 5, 64], &[a, b]), vec![64, 128, 1]);
        assert_eq!(elementwise(&[2, 5, 64], &[b, a]), vec![320, 64, 1]);
        // A broadcast operand says nothing about its broadcast dimensions.
        let bias: (&[u64], &[u64]) = (&[64], &[1]);
        assert_eq!(elementwise(&[2, 5, 64], &[a, bias]), vec![64, 128, 1]);
    }

    #[test]
    fn channels_last_is_recognised() {
        let s = [1, 12, 4, 4, 4];
        assert!(is_channels_last(&s, &channels_last(&s)));
        assert!(!is_channels_last(&s, &contiguous(&s)));
    }
}
