//! Views and copies, `cat`, `F.pad` and `roll`. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, dims, dims_usize, i, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::View { shape } => one(c.arg(0)?.f_view(dims(shape).as_slice())?),
        Op::Reshape { shape } => one(c.arg(0)?.f_reshape(dims(shape).as_slice())?),
        Op::Permute { dims: d } => one(c.arg(0)?.f_permute(dims_usize(d))?),
        Op::Transpose { d0, d1 } => one(c.arg(0)?.f_transpose(*d0 as i64, *d1 as i64)?),
        Op::Unsqueeze { dim } => one(c.arg(0)?.f_unsqueeze(*dim as i64)?),
        Op::Squeeze { dim } => one(c.arg(0)?.f_squeeze_dim(*dim as i64)?),
        Op::Expand { shape } => one(c.arg(0)?.f_expand(dims(shape).as_slice(), false)?),
        Op::Contiguous => one(c.arg(0)?.f_contiguous()?),
        // `x.clone()`: a copy laid out like `x`.
        Op::Clone => {
            let x = c.arg(0)?;
            one(x.f_to_dtype(x.kind(), false, true)?)
        }
        Op::Select { dim, index } => one(c.arg(0)?.f_select(*dim as i64, i(*index))?),
        Op::Slice { dim, start, len, step } => {
            let end = start + len.saturating_sub(1) * step + 1;
            one(c.arg(0)?.f_slice(*dim as i64, i(*start), i(end), i(*step))?)
        }
        Op::Split { dim, size } => Ok(c.arg(0)?.f_split(i(*size), *dim as i64)?),
        Op::Cat { dim } => {
            let xs = (0..c.node.inputs.len()).map(|k| c.arg(k)).collect::<Result<Vec<_>, _>>()?;
            one(Tensor::f_cat(&xs, *dim as i64)?)
        }
        Op::Pad { pads } => {
            // F.pad's list: (before, after) from the last dimension back, up to the
            // first padded one.
            let first = pads.iter().position(|&(a, b)| a > 0 || b > 0).unwrap_or(pads.len());
            let list: Vec<i64> = pads[first..].iter().rev().flat_map(|&(a, b)| [i(a), i(b)]).collect();
            one(c.arg(0)?.f_constant_pad_nd(list)?)
        }
        Op::Roll { shifts, dims: d } => one(c.arg(0)?.f_roll(shifts.clone(), dims_usize(d))?),
        other => Err(not_in_family(other)),
    }
}
