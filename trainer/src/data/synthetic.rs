//! The host back-end of the synthetic data (`shared::synthetic` defines the rules): the
//! batches loader workers make when a job has no files.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shared::synthetic::{self, Recipe, SIGNAL};

use super::*;

/// A standard normal draw (Box–Muller).
pub(super) fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// `b` masks of `h x w` (row-major, 0/1) with two to four vessels each: curves that cross
/// the image from its left edge with a slowly turning heading, one to a few pixels wide.
pub fn vessels(b: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![0.0f32; b * h * w];
    let radius = (h.min(w) / 256).max(1) as i64;
    for s in 0..b {
        let mask = &mut out[s * h * w..(s + 1) * h * w];
        for _ in 0..rng.random_range(2..=4) {
            let (mut y, mut x) = (rng.random_range(0.0..h as f64), 0.0f64);
            let mut heading: f64 = rng.random_range(-0.6..0.6);
            while x < w as f64 && y >= 0.0 && y < h as f64 {
                for dy in -radius..=radius {
                    for dx in -radius..=radius {
                        let (py, px) = (y as i64 + dy, x as i64 + dx);
                        if dy * dy + dx * dx <= radius * radius
                            && (0..h as i64).contains(&py)
                            && (0..w as i64).contains(&px)
                        {
                            mask[py as usize * w + px as usize] = 1.0;
                        }
                    }
                }
                heading = (heading + rng.random_range(-0.08..0.08)).clamp(-1.2, 1.2);
                x += heading.cos();
                y += heading.sin();
            }
        }
    }
    out
}

/// A synthetic batch made on the host by the rules of `shared::synthetic`, as the
/// trainer's device back-end makes it with tch: `shapes` are the inputs' shapes without
/// the batch dimension.
pub(crate) fn synthetic_batch(shapes: &[Vec<usize>], recipes: &[Recipe], b: usize, seed: u64) -> HostBatch {
    let mut rng = StdRng::seed_from_u64(seed);
    let full = |k: usize| [vec![b], shapes[k].clone()].concat();
    let mut tensors: Vec<Option<HostTensor>> = recipes.iter().map(|_| None).collect();
    // Noise first: the labels are made from it.
    for (k, recipe) in recipes.iter().enumerate() {
        if *recipe == Recipe::Noise {
            let n = b * shapes[k].iter().product::<usize>();
            let data = (0..n).map(|_| normal(&mut rng)).collect();
            tensors[k] = Some(HostTensor { shape: full(k), data: HostData::F32(data) });
        }
    }
    // Sample `s`'s first channel of input `from` (`per` values); noise without one.
    let channel0 =
        |tensors: &[Option<HostTensor>], from: Option<usize>, s: usize, per: usize, rng: &mut StdRng| match from
            .and_then(|r| tensors[r].as_ref())
        {
            Some(HostTensor { data: HostData::F32(x), .. }) => {
                let sample = x.len() / b;
                x[s * sample..s * sample + per].to_vec()
            }
            _ => (0..per).map(|_| normal(rng)).collect(),
        };
    for (k, recipe) in recipes.iter().enumerate() {
        let shape = &shapes[k];
        let per: usize = shape.iter().product();
        let data = match *recipe {
            Recipe::Noise => continue,
            Recipe::Tokens { vocab } => {
                let t = shape.last().copied().unwrap_or(1);
                let mut ids = Vec::with_capacity(b * t);
                for _ in 0..b {
                    let start = rng.random_range(0..vocab.max(1));
                    ids.extend((0..t as u64).map(|i| ((start + i) % vocab.max(1)) as i64));
                }
                HostData::I64(ids)
            }
            Recipe::Positions => HostData::I64((0..b as i64).collect()),
            Recipe::Class { classes, signal } => {
                let y: Vec<i64> = (0..b).map(|_| rng.random_range(0..classes.max(1)) as i64).collect();
                if let Some(HostTensor { data: HostData::F32(x), .. }) = signal.and_then(|r| tensors[r].as_mut()) {
                    let features = (x.len() / b).max(1);
                    let span = (features / classes.max(1) as usize).max(1);
                    for (s, &c) in y.iter().enumerate() {
                        let start = (c as usize * span) % features;
                        for v in &mut x[s * features + start..s * features + (start + span).min(features)] {
                            *v += SIGNAL;
                        }
                    }
                }
                HostData::I64(y)
            }
            Recipe::Buckets { classes, from, index } => {
                let values: Vec<f32> = (0..b)
                    .flat_map(|s| channel0(&tensors, from, s, per, &mut rng))
                    .map(|v| synthetic::bucket(v, classes))
                    .collect();
                if index {
                    HostData::I64(values.into_iter().map(|v| v as i64).collect())
                } else {
                    HostData::F32(values)
                }
            }
            Recipe::Vessels { brighten } => {
                let (h, w) = (shape[1], shape[2]);
                let m = vessels(b, h, w, rng.random());
                if let Some(HostTensor { data: HostData::F32(x), .. }) = brighten.and_then(|r| tensors[r].as_mut()) {
                    let sample = x.len() / b;
                    for s in 0..b {
                        for (v, &mv) in x[s * sample..s * sample + h * w].iter_mut().zip(&m[s * h * w..(s + 1) * h * w])
                        {
                            *v += SIGNAL * mv;
                        }
                    }
                }
                HostData::F32(m)
            }
            Recipe::Threshold { from } => HostData::F32(
                (0..b)
                    .flat_map(|s| channel0(&tensors, from, s, per, &mut rng))
                    .map(|v| if v > 0.0 { 1.0 } else { 0.0 })
                    .collect(),
            ),
        };
        tensors[k] = Some(HostTensor { shape: full(k), data });
    }
    HostBatch { tensors: tensors.into_iter().flatten().collect() }
}
