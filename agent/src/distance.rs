//! W4's expensive CPU-side term: a Euclidean distance transform of the label mask with
//! its feature transform (what `scipy.ndimage.distance_transform_edt(...,
//! return_indices=True)` returns), and the mean distance of the predicted foreground to
//! the labelled foreground. It holds, per voxel, the float64 distances, an int32 index
//! per axis, the boolean mask and float32 copies of the prediction and the label — the
//! host memory `shared::estimate::host` counts for `distance_loss_every`.
//!
//! The transform is exact: Felzenszwalb and Huttenlocher's lower envelope of parabolas,
//! one axis at a time.

/// Distances beyond any grid: "no foreground on this line yet".
const FAR: f64 = 1e30;

/// What one evaluation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct SurfaceDistance {
    /// Mean Euclidean distance (in voxels) from each predicted foreground voxel to the
    /// nearest labelled one; `None` when either is empty.
    pub mean: Option<f64>,
    /// Host bytes the evaluation held at its peak.
    pub bytes: u64,
}

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

/// The mean distance from the predicted foreground (`prediction > 0.5`) to the labelled
/// foreground (`label > 0.5`), over one sample of shape `dims`.
pub fn surface_distance(prediction: &[f32], label: &[f32], dims: &[usize]) -> SurfaceDistance {
    let n = label.len();
    let mask: Vec<bool> = label.iter().map(|&v| v > 0.5).collect();
    let (d, feature) = edt(&mask, dims);
    let bytes = (n * (8 + 4 * feature.len() + 1 + 4 + 4)) as u64;
    let (mut sum, mut count) = (0.0, 0u64);
    if mask.iter().any(|&m| m) {
        for (i, &p) in prediction.iter().enumerate() {
            if p > 0.5 {
                sum += d[i].sqrt();
                count += 1;
            }
        }
    }
    SurfaceDistance { mean: (count > 0).then(|| sum / count as f64), bytes }
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
    fn a_prediction_shifted_by_two_voxels_is_about_two_voxels_away() {
        let dims = [1, 8, 8];
        let label: Vec<f32> = (0..64).map(|i| if (i % 8) < 4 { 1.0 } else { 0.0 }).collect();
        let shifted: Vec<f32> = (0..64).map(|i| if (i % 8) >= 2 && (i % 8) < 6 { 1.0 } else { 0.0 }).collect();
        let s = surface_distance(&shifted, &label, &dims);
        // Columns 2, 3 are inside (0), 4 and 5 are 1 and 2 away.
        assert_eq!(s.mean, Some(0.75));
        assert_eq!(s.bytes, 64 * (8 + 12 + 1 + 8));
        assert_eq!(surface_distance(&label, &label, &dims).mean, Some(0.0));
        assert_eq!(surface_distance(&[0.0; 64], &label, &dims).mean, None);
    }
}
