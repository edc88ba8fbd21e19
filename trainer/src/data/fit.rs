//! Fitting a decoded sample to the model's input size: resize (images, nearest for
//! masks), random crop where larger, zero padding at a random offset where smaller.

use rand::Rng;
use rand::rngs::StdRng;

use super::formats::Array;

/// A mask resized (nearest) to `spatial`.
pub(super) fn resize_nearest(a: &Array, spatial: &[usize]) -> Array {
    let (h, w) = (a.spatial[0], a.spatial[1]);
    let (nh, nw) = (spatial[0], spatial[1]);
    let mut data = vec![0.0; a.channels * nh * nw];
    for c in 0..a.channels {
        for y in 0..nh {
            let sy = (y * h / nh).min(h - 1);
            for x in 0..nw {
                let sx = (x * w / nw).min(w - 1);
                data[c * nh * nw + y * nw + x] = a.data[c * h * w + sy * w + sx];
            }
        }
    }
    Array { channels: a.channels, spatial: spatial.to_vec(), spatial_before_resize: a.spatial.clone(), data }
}

/// Per dimension, where the crop starts (positive: into the source) or the source lands
/// (negative: padding before it).
pub(super) fn crop_offsets(have: &[usize], want: &[usize], rng: &mut StdRng) -> Vec<i64> {
    have.iter()
        .zip(want)
        .map(
            |(&h, &w)| {
                if h >= w { rng.random_range(0..=(h - w)) as i64 } else { -(rng.random_range(0..=(w - h)) as i64) }
            },
        )
        .collect()
}

/// `a` cropped and zero-padded to `want` at `offsets`, `[C, want...]`.
pub(super) fn fit(a: &Array, want: &[usize], offsets: &[i64]) -> Vec<f32> {
    let per_out: usize = want.iter().product();
    let per_in: usize = a.spatial.iter().product();
    let mut out = vec![0.0; a.channels * per_out];
    let n = want.len();
    let mut idx = vec![0usize; n];
    for o in 0..per_out {
        // Source index of output position `idx`, if inside the source.
        let mut src = 0usize;
        let mut ok = true;
        for d in 0..n {
            let s = idx[d] as i64 + offsets[d];
            if s < 0 || s >= a.spatial[d] as i64 {
                ok = false;
                break;
            }
            src = src * a.spatial[d] + s as usize;
        }
        if ok {
            for c in 0..a.channels {
                out[c * per_out + o] = a.data[c * per_in + src];
            }
        }
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < want[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}
