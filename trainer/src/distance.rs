//! W4's expensive CPU-side work: exact Euclidean distance transforms of label regions
//! with their feature transform (what `scipy.ndimage.distance_transform_edt` computes
//! inside), and from them the signed distance maps of Kervadec et al.'s boundary loss,
//! the surface term `distance_loss_every` adds to the loss (`zoo::losses::surface_term`).
//! Its host memory is what `shared::estimate::host::surface_bytes` counts.
//!
//! The transform is exact: Felzenszwalb and Huttenlocher's lower envelope of parabolas,
//! one axis at a time.

/// Distances beyond any grid: "no foreground on this line yet".
const FAR: f64 = 1e30;

/// Squared distances to the nearest `true` voxel of `mask` (shape `dims`, row-major),
/// with, per axis, the coordinate of that voxel.
pub fn edt(mask: &[bool], dims: &[usize]) -> (Vec<f64>, Vec<Vec<i32>>) {
    let n: usize = dims.iter().product();
    let mut d: Vec<f64> = mask.iter().map(|&m| if m { 0.0 } else { FAR }).collect();
    // The feature transform: each voxel's nearest foreground coordinates, axis by axis.
    let mut feature: Vec<Vec<i32>> = (0..dims.len()).map(|_| vec![0i32; n]).collect();
    let strides: Vec<usize> = (0..dims.len()).map(|a| dims[a + 1..].iter().product()).collect();
    for i in 0..n {
        for (a, f) in feature.iter_mut().enumerate() {
            f[i] = ((i / strides[a]) % dims[a]) as i32;
        }
    }
    let longest = dims.iter().copied().max().unwrap_or(0);
    let (mut f, mut out, mut from) = (vec![0.0; longest], vec![0.0; longest], vec![0usize; longest]);
    let (mut v, mut z) = (vec![0usize; longest], vec![0.0; longest + 1]);
    for (axis, &len) in dims.iter().enumerate() {
        let stride = strides[axis];
        // Every line along `axis`: its start voxels are those with coordinate 0 there.
        for start in (0..n).filter(|&i| (i / stride).is_multiple_of(len)) {
            for k in 0..len {
                f[k] = d[start + k * stride];
            }
            lower_envelope(&f[..len], &mut out[..len], &mut from[..len], &mut v, &mut z);
            let saved: Vec<Vec<i32>> =
                feature.iter().map(|ft| (0..len).map(|k| ft[start + k * stride]).collect()).collect();
            for k in 0..len {
                d[start + k * stride] = out[k];
                for (a, ft) in feature.iter_mut().enumerate() {
                    ft[start + k * stride] = saved[a][from[k]];
                }
            }
        }
    }
    (d, feature)
}

/// The 1-D squared distance transform of `f`: `out[q] = min_p (q - p)² + f[p]`, and the
/// minimising `p` in `from[q]`.
fn lower_envelope(f: &[f64], out: &mut [f64], from: &mut [usize], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    if n == 0 {
        return;
    }
    let mut k = 0usize;
    v[0] = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        if f[q] >= FAR {
            continue;
        }
        loop {
            let p = v[k];
            if f[p] >= FAR {
                // A line that so far holds no foreground: the new parabola replaces it.
                v[k] = q;
                z[k + 1] = f64::INFINITY;
                break;
            }
            let s = ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64)) / (2.0 * (q - p) as f64);
            if s <= z[k] {
                if k == 0 {
                    v[0] = q;
                    z[1] = f64::INFINITY;
                    break;
                }
                k -= 1;
                continue;
            }
            k += 1;
            v[k] = q;
            z[k] = s;
            z[k + 1] = f64::INFINITY;
            break;
        }
    }
    k = 0;
    for q in 0..n {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let d = (q as f64 - p as f64).powi(2) + f[p];
        out[q] = if f[p] >= FAR { FAR } else { d };
        from[q] = p;
    }
}

/// Kervadec et al.'s signed distance map of one class region (`one_hot2dist`): outside
/// the region, the Euclidean distance to its nearest voxel; inside, minus the distance to
/// the nearest voxel outside, less one. Zero everywhere when the region is empty (or
/// fills the volume: it has no surface). Returns the map and the host bytes the two
/// transforms held at their peak (both masks, both float64 distances, one feature
/// transform), which `shared::estimate::host::surface_bytes` counts.
pub fn signed_distance(region: &[bool], dims: &[usize]) -> (Vec<f32>, u64) {
    let n = region.len();
    let peak = (n * (2 + 8 + 8 + 4 * dims.len())) as u64;
    if !region.iter().any(|&r| r) || region.iter().all(|&r| r) {
        return (vec![0.0; n], peak);
    }
    let (to_region, _) = edt(region, dims);
    let outside: Vec<bool> = region.iter().map(|&r| !r).collect();
    let (to_outside, _) = edt(&outside, dims);
    let map = (0..n)
        .map(|i| if region[i] { -(to_outside[i].sqrt() - 1.0) as f32 } else { to_region[i].sqrt() as f32 })
        .collect();
    (map, peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: the nearest foreground voxel by checking them all.
    fn brute(mask: &[bool], dims: &[usize]) -> Vec<f64> {
        let coords = |i: usize| -> Vec<i64> {
            let mut c = vec![0i64; dims.len()];
            let mut r = i;
            for a in (0..dims.len()).rev() {
                c[a] = (r % dims[a]) as i64;
                r /= dims[a];
            }
            c
        };
        let fg: Vec<Vec<i64>> = (0..mask.len()).filter(|&i| mask[i]).map(coords).collect();
        (0..mask.len())
            .map(|i| {
                let c = coords(i);
                fg.iter()
                    .map(|f| f.iter().zip(&c).map(|(a, b)| ((a - b) * (a - b)) as f64).sum::<f64>())
                    .fold(FAR, f64::min)
            })
            .collect()
    }

    #[test]
    fn the_transform_is_exact_in_one_two_and_three_dimensions() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % 100
        };
        for dims in [vec![17], vec![9, 13], vec![5, 6, 7]] {
            let n: usize = dims.iter().product();
            for density in [3, 20, 60] {
                let mask: Vec<bool> = (0..n).map(|_| next() < density).collect();
                if !mask.iter().any(|&m| m) {
                    continue;
                }
                let (d, feature) = edt(&mask, &dims);
                assert_eq!(d, brute(&mask, &dims), "{dims:?} at {density} %");
                // Each voxel's feature is a foreground voxel at exactly that distance.
                for i in 0..n {
                    let mut j = 0usize;
                    let mut dist = 0.0;
                    let mut r = i;
                    let mut c = vec![0usize; dims.len()];
                    for a in (0..dims.len()).rev() {
                        c[a] = r % dims[a];
                        r /= dims[a];
                    }
                    for a in 0..dims.len() {
                        let f = feature[a][i] as usize;
                        j = j * dims[a] + f;
                        dist += (f as f64 - c[a] as f64).powi(2);
                    }
                    assert!(mask[j], "the feature of {i} is foreground");
                    assert_eq!(dist, d[i]);
                }
            }
        }
    }

    #[test]
    fn the_signed_map_is_positive_outside_and_negative_inside_as_one_hot2dist() {
        // Columns 0..4 of an 8x8 slice are the region.
        let dims = [1, 8, 8];
        let region: Vec<bool> = (0..64).map(|i| (i % 8) < 4).collect();
        let (map, bytes) = signed_distance(&region, &dims);
        // Inside: 0 at the surface column, -1, -2, -3 deeper; outside: 1, 2, 3, 4 away.
        let row: Vec<f32> = map[..8].to_vec();
        assert_eq!(row, vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
        assert!(map.chunks(8).all(|r| r == row.as_slice()));
        assert_eq!(bytes, 64 * (2 + 16 + 12));
        assert!(signed_distance(&[false; 64], &dims).0.iter().all(|&v| v == 0.0), "no region");
        assert!(signed_distance(&[true; 64], &dims).0.iter().all(|&v| v == 0.0), "no surface");
    }
}
