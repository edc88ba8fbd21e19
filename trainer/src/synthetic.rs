//! The device back-end of the synthetic data (`shared::synthetic` defines the rules): one
//! batch made with tch on the job's device, fresh for every micro-batch and nothing kept
//! between them (a user's loader keeps nothing on the device either). The host back-end,
//! for loader workers, is `data::synthetic`.

use shared::graph::Graph;
use shared::synthetic::{Recipe, SIGNAL};
use tch::{Device, Kind, Tensor};

use crate::data;

/// A batch for `graph`'s inputs on `device`, by each input's recipe.
pub fn make_batch(graph: &Graph, device: Device) -> Result<Vec<Tensor>, tch::TchError> {
    let shapes: Vec<Vec<i64>> = graph
        .inputs
        .iter()
        .map(|&(v, _)| graph.values[v].shape.iter().map(|&d| i64::try_from(d).unwrap_or(1)).collect())
        .collect();
    make_inputs(&shapes, &shared::synthetic::of_graph(graph), device)
}

/// Inputs of these shapes (batch first) by these recipes.
fn make_inputs(shapes: &[Vec<i64>], recipes: &[Recipe], device: Device) -> Result<Vec<Tensor>, tch::TchError> {
    tch::no_grad(|| {
        let b = shapes.first().and_then(|s| s.first()).copied().unwrap_or(1);
        let mut out: Vec<Option<Tensor>> = shapes.iter().map(|_| None).collect();
        // Noise first: the labels are made from it.
        for (k, shape) in shapes.iter().enumerate() {
            if recipes[k] == Recipe::Noise {
                out[k] = Some(Tensor::f_randn(shape.as_slice(), (Kind::Float, device))?);
            }
        }
        // The noise made above, shared (no copy), for the labels made from it.
        let noise: Vec<Option<Tensor>> = out.iter().map(|t| t.as_ref().map(Tensor::shallow_clone)).collect();
        let input = |from: Option<usize>| from.and_then(|k| noise[k].as_ref().map(Tensor::shallow_clone));
        // Input `from`'s first channel (`[B, C, ...]`) shaped like a label map (a copy:
        // labels are changed in place and must not touch the input); noise without one.
        let channel0 = |from: Option<usize>, shape: &[i64]| -> Result<Tensor, tch::TchError> {
            match input(from) {
                Some(x) => {
                    let c = x.f_narrow(1, 0, 1)?;
                    let out = Tensor::f_empty(shape, (Kind::Float, device))?;
                    out.f_view(c.size().as_slice())?.f_copy_(&c)?;
                    Ok(out)
                }
                None => Tensor::f_randn(shape, (Kind::Float, device)),
            }
        };
        for (k, shape) in shapes.iter().enumerate() {
            let shape = shape.clone();
            out[k] = Some(match recipes[k] {
                Recipe::Noise => continue,
                Recipe::Tokens { vocab } => {
                    let vocab = i64::try_from(vocab).unwrap_or(2).max(1);
                    let t = *shape.last().unwrap_or(&1);
                    let start = Tensor::f_randint(vocab, [b, 1], (Kind::Int64, device))?;
                    let steps = Tensor::f_arange(t, (Kind::Int64, device))?;
                    let mut tokens = start.f_add(&steps)?;
                    drop((start, steps));
                    let _ = tokens.f_remainder_(vocab)?;
                    tokens.f_reshape(shape.as_slice())?
                }
                Recipe::Positions => Tensor::f_arange(b, (Kind::Int64, device))?,
                Recipe::Class { classes, signal } => {
                    let n = i64::try_from(classes).unwrap_or(2).max(1);
                    let y = Tensor::f_randint(n, [b], (Kind::Int64, device))?;
                    if let Some(x) = input(signal) {
                        add_class_signal(&x, &y, classes)?;
                    }
                    y
                }
                Recipe::Buckets { classes, from, index } => {
                    // A per-value label map `[B, ...]` takes the channel as `[B, 1, ...]`.
                    let mut with_channel = shape.clone();
                    if index {
                        with_channel.insert(1, 1);
                    }
                    let mut x = channel0(from, &with_channel)?;
                    // Which of `classes` equal-probability buckets each value falls in
                    // (`shared::synthetic::bucket`), in place.
                    let c = classes.max(1) as f64;
                    let _ = x.f_sigmoid_()?.f_mul_scalar_(c)?.f_floor_()?.f_clamp_(0.0, c - 1.0)?;
                    if index { x.f_to_kind(Kind::Int64)?.f_reshape(shape.as_slice())? } else { x }
                }
                Recipe::Vessels { brighten } => {
                    // Drawn on the host, then the image brighter along them.
                    let dims = |k: usize| usize::try_from(shape[k]).unwrap_or(1);
                    let seed = Tensor::f_randint(i64::MAX, [1], (Kind::Int64, Device::Cpu))?.f_int64_value(&[0])?;
                    let host = data::vessels(dims(0), dims(2), dims(3), seed as u64);
                    let m = Tensor::f_from_slice(&host)?.f_view(shape.as_slice())?;
                    drop(host);
                    let m = if device == Device::Cpu { m } else { m.f_to_device(device)? };
                    if let Some(x) = input(brighten) {
                        // In place, twice rather than a scaled temporary: the loop's peak
                        // stays the model's.
                        let x0 = x.f_narrow(1, 0, 1)?;
                        for _ in 0..SIGNAL as usize {
                            let _ = x0.shallow_clone().f_add_(&m)?;
                        }
                    }
                    m
                }
                Recipe::Threshold { from } => {
                    let mut m = channel0(from, &shape)?;
                    let _ = m.f_gt_(0.0)?;
                    m
                }
            });
        }
        out.into_iter().map(|t| t.ok_or_else(|| tch::TchError::Shape("an input was not made".to_owned()))).collect()
    })
}

/// Adds [`SIGNAL`] to the stretch of each sample's flattened input that belongs to its
/// class, in place (no temporaries: the loop's peak stays the model's).
fn add_class_signal(x: &Tensor, y: &Tensor, classes: u64) -> Result<(), tch::TchError> {
    let b = x.size().first().copied().unwrap_or(1);
    let flat = x.f_view([b, -1])?;
    let features = flat.size()[1].max(1);
    let classes = i64::try_from(classes).unwrap_or(1).max(1);
    let span = (features / classes).max(1);
    let labels = Vec::<i64>::try_from(&y.f_to_device(Device::Cpu)?)?;
    for (row, &c) in labels.iter().enumerate() {
        let start = (c * span) % features;
        let len = span.min(features - start);
        let _ = flat.f_select(0, row as i64)?.f_narrow(0, start, len)?.f_add_scalar_(f64::from(SIGNAL))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use shared::graph::InputKind;
    use shared::synthetic::{bucket, recipes};

    use super::*;
    use crate::data::{HostData, HostTensor};

    /// A tensor's values on the host, as f32.
    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).expect("to host")
    }

    fn host_values(t: &HostTensor) -> Vec<f32> {
        match &t.data {
            HostData::F32(v) => v.clone(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// Sample `s`'s first channel of an input `[B, C, ...]`.
    fn channel0(x: &[f32], b: usize, c: usize, s: usize) -> &[f32] {
        let sample = x.len() / b;
        &x[s * sample..s * sample + sample / c]
    }

    /// What every back-end's batch must satisfy, recipe by recipe: labels that follow from
    /// the inputs as `shared::synthetic` says.
    fn check(recipes: &[Recipe], shapes: &[Vec<usize>], batch: &[Vec<f32>], b: usize, backend: &str) {
        for (k, recipe) in recipes.iter().enumerate() {
            let y = &batch[k];
            assert_eq!(y.len(), b * shapes[k].iter().product::<usize>(), "{backend}: input {k}'s size");
            match *recipe {
                Recipe::Noise => assert!(y.iter().all(|v| v.is_finite())),
                Recipe::Tokens { vocab } => {
                    let t = shapes[k].last().copied().unwrap_or(1);
                    for w in y.chunks(t) {
                        for pair in w.windows(2) {
                            assert_eq!(pair[1] as u64, (pair[0] as u64 + 1) % vocab, "{backend}: tokens count up");
                        }
                    }
                }
                Recipe::Positions => assert_eq!(*y, (0..b).map(|i| i as f32).collect::<Vec<_>>(), "{backend}"),
                Recipe::Class { classes, signal } => {
                    assert!(y.iter().all(|&c| c >= 0.0 && (c as u64) < classes), "{backend}: classes");
                    let Some(src) = signal else { continue };
                    // The class's own stretch of each sample is SIGNAL brighter on average.
                    let x = &batch[src];
                    let features = x.len() / b;
                    let span = features / classes as usize;
                    for (s, &c) in y.iter().enumerate() {
                        let row = &x[s * features..(s + 1) * features];
                        let start = c as usize * span;
                        let inside: f32 = row[start..start + span].iter().sum::<f32>() / span as f32;
                        let outside: f32 = (row.iter().sum::<f32>() - inside * span as f32) / (features - span) as f32;
                        assert!(inside - outside > 1.0, "{backend}: sample {s}: {inside} against {outside}");
                    }
                }
                Recipe::Buckets { classes, from, .. } => {
                    let Some(src) = from else { continue };
                    let c = shapes[src][0];
                    for s in 0..b {
                        let per = y.len() / b;
                        for (v, &label) in channel0(&batch[src], b, c, s).iter().zip(&y[s * per..(s + 1) * per]) {
                            // Values on a bucket's edge may round either way.
                            let f = ((1.0 / (1.0 + (-v).exp())) * classes as f32).fract();
                            let edge = !(1e-4..=1.0 - 1e-4).contains(&f);
                            assert!(
                                edge || bucket(*v, classes) == label,
                                "{backend}: {v} is in bucket {}, not {label}",
                                bucket(*v, classes)
                            );
                        }
                    }
                }
                Recipe::Vessels { brighten } => {
                    assert!(y.iter().all(|&m| m == 0.0 || m == 1.0), "{backend}: a 0/1 mask");
                    let on = y.iter().filter(|&&m| m == 1.0).count();
                    assert!(on > 0 && on < y.len() / 2, "{backend}: thin vessels, {on} of {}", y.len());
                    let Some(src) = brighten else { continue };
                    let c = shapes[src][0];
                    let (mut sum, mut n) = ([0.0f32; 2], [0usize; 2]);
                    for s in 0..b {
                        let per = y.len() / b;
                        for (v, &m) in channel0(&batch[src], b, c, s).iter().zip(&y[s * per..(s + 1) * per]) {
                            sum[m as usize] += v;
                            n[m as usize] += 1;
                        }
                    }
                    let (off, on) = (sum[0] / n[0] as f32, sum[1] / n[1] as f32);
                    assert!(on - off > 1.0, "{backend}: the image is brighter along vessels: {on} against {off}");
                }
                Recipe::Threshold { from } => {
                    let Some(src) = from else { continue };
                    let c = shapes[src][0];
                    let per = y.len() / b;
                    for s in 0..b {
                        for (v, &m) in channel0(&batch[src], b, c, s).iter().zip(&y[s * per..(s + 1) * per]) {
                            assert_eq!(m, if *v > 0.0 { 1.0 } else { 0.0 }, "{backend}");
                        }
                    }
                }
            }
        }
    }

    /// The device back-end and the host back-end, held to the same rules for every kind
    /// of input the zoo has.
    #[test]
    fn both_back_ends_make_what_the_shared_rules_say() {
        let b = 4;
        // Each case: the inputs' shapes without the batch and kinds, and contrastive.
        type Case = (Vec<(Vec<u64>, InputKind)>, bool);
        let cases: Vec<Case> = vec![
            (vec![(vec![3, 8, 8], InputKind::Real), (vec![], InputKind::ClassIndex { classes: 4 })], false),
            (vec![(vec![3, 8, 8], InputKind::Real), (vec![8, 8], InputKind::ClassIndex { classes: 5 })], false),
            (vec![(vec![1, 4, 6, 6], InputKind::Real), (vec![1, 4, 6, 6], InputKind::ClassMap { classes: 3 })], false),
            (vec![(vec![2, 4, 6, 6], InputKind::Real), (vec![1, 4, 6, 6], InputKind::Mask)], false),
            (vec![(vec![3, 64, 64], InputKind::Real), (vec![1, 64, 64], InputKind::Mask)], false),
            (vec![(vec![3, 8, 8], InputKind::Real), (vec![4, 4], InputKind::ClassIndex { classes: 2 })], false),
            (vec![(vec![16], InputKind::Tokens { vocab: 50 })], false),
            (
                vec![
                    (vec![3, 8, 8], InputKind::Real),
                    (vec![6], InputKind::Tokens { vocab: 30 }),
                    (vec![], InputKind::ClassIndex { classes: 4 }),
                ],
                true,
            ),
        ];
        tch::manual_seed(3);
        for (inputs, contrastive) in cases {
            let rules = recipes(&inputs, contrastive);
            let shapes: Vec<Vec<usize>> = inputs.iter().map(|(s, _)| s.iter().map(|&d| d as usize).collect()).collect();
            let with_batch: Vec<Vec<i64>> =
                inputs.iter().map(|(s, _)| [vec![b as i64], s.iter().map(|&d| d as i64).collect()].concat()).collect();
            let device = make_inputs(&with_batch, &rules, Device::Cpu).expect("device batch");
            check(&rules, &shapes, &device.iter().map(values).collect::<Vec<_>>(), b, "device");
            let host = crate::data::synthetic_batch(&shapes, &rules, b, 11);
            check(&rules, &shapes, &host.tensors.iter().map(host_values).collect::<Vec<_>>(), b, "host");
        }
    }
}
