//! Runs `shared::graph` — the same description the estimator walks — with tch: one tch
//! call per primitive, the fallible `f_*` ops throughout so that errors (out of memory
//! above all) come back as values instead of panics.
//!
//! Gradient checkpointing follows the graph's regions: a checkpointed region runs its
//! forward under `no_grad`, keeping only its inputs, and is recomputed with autograd just
//! before its backward, which starts from the gradients its outputs received.

use std::collections::BTreeMap;

use shared::graph::{Graph, Init, Op, Param};
use tch::{Device, Kind, Tensor};

use super::TrainError;

unsafe extern "C" {
    fn hr_backward(
        outputs: *mut *mut std::ffi::c_void,
        grads: *mut *mut std::ffi::c_void,
        n: i32,
        err: *mut u8,
        err_len: usize,
    ) -> i32;
    fn hr_autocast(cuda: i32, enabled: i32, dtype: i32);
    fn hr_set_mkldnn(enabled: i32);
}

/// Turns oneDNN and NNPACK off for CPU convolutions: libtorch's native kernels then use one im2col
/// buffer per call, which the estimator models exactly, where oneDNN's scratch depends on
/// the thread count and its own shape heuristics.
pub fn use_native_cpu_convolutions() {
    // SAFETY: sets a flag in libtorch's global context before any convolution runs.
    unsafe { hr_set_mkldnn(0) }
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn dims(shape: &[u64]) -> Vec<i64> {
    shape.iter().map(|&d| i(d)).collect()
}

/// Backward from several outputs at once, each with its incoming gradient.
fn backward_from(outputs: &[Tensor], grads: &[Tensor]) -> Result<(), TrainError> {
    if outputs.is_empty() {
        return Ok(());
    }
    let mut outs: Vec<*mut std::ffi::c_void> = outputs.iter().map(|t| t.as_ptr() as *mut std::ffi::c_void).collect();
    let mut gs: Vec<*mut std::ffi::c_void> = grads.iter().map(|t| t.as_ptr() as *mut std::ffi::c_void).collect();
    let mut err = vec![0u8; 4096];
    // SAFETY: the pointers are live tch tensors (at::Tensor*) for the duration of the
    // call, and err is a writable buffer of the given length.
    let rc = unsafe { hr_backward(outs.as_mut_ptr(), gs.as_mut_ptr(), outs.len() as i32, err.as_mut_ptr(), err.len()) };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        let text = String::from_utf8_lossy(&err[..end]).into_owned();
        return Err(TrainError::from(tch::TchError::Torch(text)));
    }
    Ok(())
}

/// Mixed precision for the forward pass; `None` is fp32.
#[derive(Clone, Copy)]
pub struct Autocast {
    pub cuda: bool,
    pub bf16: bool,
}

impl Autocast {
    fn set(self, on: bool) {
        // SAFETY: plain calls into libtorch's thread-local autocast state.
        unsafe { hr_autocast(i32::from(self.cuda), i32::from(on), i32::from(self.bf16)) }
    }
}

/// MONAI's relative position index for a `window`, its first `n` tokens.
fn relative_position_index(window: [u64; 3], n: u64) -> Vec<i64> {
    let w = window.map(|v| v as i64);
    let mut coords = Vec::new();
    for a in 0..w[0] {
        for b in 0..w[1] {
            for c in 0..w[2] {
                coords.push([a, b, c]);
            }
        }
    }
    let n = n as usize;
    let mut out = Vec::with_capacity(n * n);
    for p in &coords[..n] {
        for q in &coords[..n] {
            let r0 = (p[0] - q[0] + w[0] - 1) * (2 * w[1] - 1) * (2 * w[2] - 1);
            let r1 = (p[1] - q[1] + w[1] - 1) * (2 * w[2] - 1);
            let r2 = p[2] - q[2] + w[2] - 1;
            out.push(r0 + r1 + r2);
        }
    }
    out
}

/// Swin's shifted-window mask: -100 between tokens of different shifted regions.
/// Each window token's shifted region, `[nW, N]`: the mask is -100 between tokens of
/// different regions.
fn window_region_ids(padded: [u64; 3], window: [u64; 3], shift: [u64; 3]) -> Vec<f32> {
    let region = |size: u64, w: u64, s: u64, x: u64| -> u64 {
        if x < size - w {
            0
        } else if x < size - s {
            1
        } else {
            2
        }
    };
    let counts: Vec<u64> = (0..3).map(|k| padded[k] / window[k]).collect();
    let n = (window[0] * window[1] * window[2]) as usize;
    let mut all = Vec::with_capacity(counts.iter().product::<u64>() as usize * n);
    for wd in 0..counts[0] {
        for wh in 0..counts[1] {
            for ww in 0..counts[2] {
                let mut ids = Vec::with_capacity(n);
                for a in 0..window[0] {
                    for b in 0..window[1] {
                        for c in 0..window[2] {
                            let (d, h, w) = (wd * window[0] + a, wh * window[1] + b, ww * window[2] + c);
                            ids.push(
                                region(padded[0], window[0], shift[0], d) * 9
                                    + region(padded[1], window[1], shift[1], h) * 3
                                    + region(padded[2], window[2], shift[2], w),
                            );
                        }
                    }
                }
                all.extend(ids.iter().map(|&id| id as f32));
            }
        }
    }
    all
}

/// The mask from region ids, as the tensors the trainer makes (for the unit test).
#[cfg(test)]
fn shifted_window_mask(padded: [u64; 3], window: [u64; 3], shift: [u64; 3]) -> Vec<f32> {
    let ids = window_region_ids(padded, window, shift);
    let n = (window[0] * window[1] * window[2]) as usize;
    ids.chunks(n)
        .flat_map(|w| w.iter().flat_map(move |p| w.iter().map(move |q| if p == q { 0.0 } else { -100.0 })))
        .collect()
}

fn make_param(p: &Param, device: Device) -> Result<Tensor, TrainError> {
    let shape = dims(&p.shape);
    let kind = match p.dtype {
        shared::graph::DType::F32 => Kind::Float,
        shared::graph::DType::I64 => Kind::Int64,
        shared::graph::DType::Bool => Kind::Bool,
    };
    let t = tch::no_grad(|| -> Result<Tensor, tch::TchError> {
        Ok(match &p.init {
            Init::Uniform(bound) => Tensor::f_empty(&shape, (kind, device))?.f_uniform_(-bound, *bound)?,
            Init::Normal(std) => {
                let mut t = Tensor::f_randn(&shape, (kind, device))?;
                let _ = t.f_mul_scalar_(*std)?;
                t
            }
            Init::Const(v) => Tensor::f_full(&shape, *v, (kind, device))?,
            Init::Arange => Tensor::f_arange(shape.first().copied().unwrap_or(1), (kind, device))?,
            Init::RelativePositionIndex { window, n } => {
                Tensor::from_slice(&relative_position_index(*window, *n)).f_to_device(device)?
            }
        })
    })?;
    Ok(if p.trainable { t.set_requires_grad(true) } else { t })
}

pub struct Net {
    pub graph: Graph,
    /// Per mask node, each window token's shifted region (`[nW, N]`, small): the mask
    /// itself is made on the device at every forward pass, as MONAI's `compute_mask`.
    masks: BTreeMap<usize, Vec<f32>>,
    device: Device,
    /// Parameters and buffers, in the graph's order.
    pub params: Vec<Tensor>,
    autocast: Option<Autocast>,
    segments: u64,
    /// Seeds the checkpointed regions' dropout: the base seed, and a counter of steps.
    seed: u64,
    calls: std::cell::Cell<u64>,
}

impl Net {
    pub fn new(
        graph: Graph,
        device: Device,
        autocast: Option<Autocast>,
        segments: u64,
        seed: u64,
    ) -> Result<Net, TrainError> {
        let params = graph.params.iter().map(|p| make_param(p, device)).collect::<Result<Vec<_>, _>>()?;
        let masks = graph
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n.op {
                Op::ShiftedWindowMask { padded, window, shift } => Some((i, window_region_ids(padded, window, shift))),
                _ => None,
            })
            .collect();
        Ok(Net { graph, masks, device, params, autocast, segments, seed, calls: std::cell::Cell::new(0) })
    }

    pub fn trainable(&self) -> impl Iterator<Item = &Tensor> {
        self.graph.params.iter().zip(&self.params).filter(|(p, _)| p.trainable).map(|(_, t)| t)
    }

    /// The seed of checkpointed region `r` in the current micro-batch: the same for its
    /// forward and its recompute, different across regions and micro-batches.
    fn region_seed(&self, r: usize) -> i64 {
        let mix = self.seed
            ^ self.calls.get().wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (r as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (mix >> 1) as i64
    }

    fn run(&self, index: usize, vals: &[Option<Tensor>]) -> Result<Tensor, tch::TchError> {
        let node = &self.graph.nodes[index];
        let arg = |k: usize| -> Result<&Tensor, tch::TchError> {
            node.inputs
                .get(k)
                .and_then(|&v| vals[v].as_ref())
                .ok_or_else(|| tch::TchError::Shape(format!("node {index} ({}) has no input {k}", node.op.name())))
        };
        let p = |k: usize| &self.params[node.params[k]];
        let out_shape = dims(&self.graph.values[node.output].shape);
        Ok(match &node.op {
            Op::Linear { bias, weight_in_out } => {
                let x = arg(0)?;
                match (weight_in_out, bias) {
                    (false, true) => x.f_linear(p(0), Some(p(1)))?,
                    (false, false) => x.f_linear(p(0), None::<&Tensor>)?,
                    // Hugging Face's Conv1D: addmm(bias, x.view(-1, in), W) viewed back.
                    (true, true) => {
                        let d = x.size().last().copied().unwrap_or(1);
                        p(1).f_addmm(&x.f_view([-1, d])?, p(0))?.f_view(out_shape.as_slice())?
                    }
                    (true, false) => {
                        let d = x.size().last().copied().unwrap_or(1);
                        x.f_view([-1, d])?.f_mm(p(0))?.f_view(out_shape.as_slice())?
                    }
                }
            }
            // The per-dimension ops (conv2d, conv_transpose3d...), not the generic
            // `convolution`: autocast has rules for these, as for PyTorch's modules.
            Op::Conv { nd, stride, padding, groups, bias, .. } => {
                let b = if *bias { Some(p(1)) } else { None };
                let (s, pd, gr) = (i(*stride), i(*padding), i(*groups));
                let x = arg(0)?;
                match nd {
                    1 => x.f_conv1d(p(0), b, [s], [pd], [1], gr)?,
                    2 => x.f_conv2d(p(0), b, [s; 2], [pd; 2], [1; 2], gr)?,
                    _ => x.f_conv3d(p(0), b, [s; 3], [pd; 3], [1; 3], gr)?,
                }
            }
            Op::ConvTranspose { nd, stride, padding, output_padding, bias, .. } => {
                let b = if *bias { Some(p(1)) } else { None };
                let (s, pd, op) = (i(*stride), i(*padding), i(*output_padding));
                let x = arg(0)?;
                match nd {
                    1 => x.f_conv_transpose1d(p(0), b, [s], [pd], [op], 1, [1])?,
                    2 => x.f_conv_transpose2d(p(0), b, [s; 2], [pd; 2], [op; 2], 1, [1; 2])?,
                    _ => x.f_conv_transpose3d(p(0), b, [s; 3], [pd; 3], [op; 3], 1, [1; 3])?,
                }
            }
            Op::BatchNorm { eps } => {
                Tensor::f_batch_norm(arg(0)?, Some(p(0)), Some(p(1)), Some(p(2)), Some(p(3)), true, 0.1, *eps, true)?
            }
            Op::InstanceNorm { eps } => Tensor::f_instance_norm(
                arg(0)?,
                None::<&Tensor>,
                None::<&Tensor>,
                None::<&Tensor>,
                None::<&Tensor>,
                true,
                0.1,
                *eps,
                true,
            )?,
            Op::LayerNorm { eps, affine } => {
                let x = arg(0)?;
                let d = x.size().last().copied().unwrap_or(1);
                if *affine {
                    x.f_layer_norm([d], Some(p(0)), Some(p(1)), *eps, true)?
                } else {
                    x.f_layer_norm([d], None::<&Tensor>, None::<&Tensor>, *eps, true)?
                }
            }
            Op::Relu { inplace: false } => arg(0)?.f_relu()?,
            Op::Relu { inplace: true } => arg(0)?.shallow_clone().f_relu_()?,
            // Slope 0.01: libtorch's default and MONAI's choice.
            Op::LeakyRelu { inplace: false } => arg(0)?.f_leaky_relu()?,
            Op::LeakyRelu { inplace: true } => arg(0)?.shallow_clone().f_leaky_relu_()?,
            Op::Prelu => arg(0)?.f_prelu(p(0))?,
            Op::Gelu { tanh } => arg(0)?.f_gelu(if *tanh { "tanh" } else { "none" })?,
            Op::Sigmoid => arg(0)?.f_sigmoid()?,
            Op::Add => arg(0)?.f_add(arg(1)?)?,
            Op::AddInplace => arg(0)?.shallow_clone().f_add_(arg(1)?)?,
            Op::Mul => arg(0)?.f_mul(arg(1)?)?,
            Op::AddParam => arg(0)?.f_add(p(0))?,
            Op::PrependToken => {
                let x = arg(0)?;
                let s = x.size();
                let token = p(0).f_view([1, 1, s[2]])?.f_expand([s[0], 1, s[2]], false)?;
                Tensor::f_cat(&[&token, x], 1)?
            }
            Op::Cat { dim } => {
                let xs = (0..node.inputs.len()).map(arg).collect::<Result<Vec<_>, _>>()?;
                Tensor::f_cat(&xs, i(*dim as u64))?
            }
            Op::MaxPool { nd, kernel, stride, padding } => {
                let (k, s, pd) = (i(*kernel), i(*stride), i(*padding));
                match nd {
                    3 => arg(0)?.f_max_pool3d([k; 3], [s; 3], [pd; 3], [1; 3], false)?,
                    1 => arg(0)?.f_max_pool1d([k], [s], [pd], [1], false)?,
                    _ => arg(0)?.f_max_pool2d([k; 2], [s; 2], [pd; 2], [1; 2], false)?,
                }
            }
            Op::Mean { dims: d, keepdim } => {
                let d: Vec<i64> = d.iter().map(|&v| v as i64).collect();
                arg(0)?.f_mean_dim(Some(d.as_slice()), *keepdim, None::<Kind>)?
            }
            Op::View { shape } => arg(0)?.f_view(dims(shape).as_slice())?,
            Op::Permute { dims: d } => arg(0)?.f_permute(d.iter().map(|&v| v as i64).collect::<Vec<_>>())?,
            Op::Transpose { d0, d1 } => arg(0)?.f_transpose(*d0 as i64, *d1 as i64)?,
            Op::Contiguous => arg(0)?.f_contiguous()?,
            Op::Select { dim, index } => arg(0)?.f_select(*dim as i64, i(*index))?,
            Op::Slice { dim, start, len, step } => {
                let end = start + (len.saturating_sub(1)) * step + 1;
                arg(0)?.f_slice(*dim as i64, i(*start), i(end), i(*step))?
            }
            Op::PadEnd { dims: d, amounts } => {
                // constant_pad_nd takes (before, after) pairs from the last dimension back.
                let rank = self.graph.values[node.inputs[0]].shape.len();
                let mut pads = Vec::new();
                for axis in (0..rank).rev() {
                    let after = d.iter().position(|&x| x == axis).map_or(0, |k| amounts[k]);
                    pads.extend([0, i(after)]);
                }
                while pads.len() > 2 && pads[pads.len() - 1] == 0 && pads[pads.len() - 2] == 0 {
                    pads.truncate(pads.len() - 2);
                }
                arg(0)?.f_constant_pad_nd(pads)?
            }
            Op::Roll { shifts, dims: d } => {
                arg(0)?.f_roll(shifts.clone(), d.iter().map(|&v| v as i64).collect::<Vec<_>>())?
            }
            Op::Embedding => Tensor::f_embedding(p(0), arg(0)?, -1, false, false)?,
            Op::Gather => p(0).f_index_select(0, p(1))?,
            Op::Dropout { p: prob } => arg(0)?.f_native_dropout(*prob, true)?.0,
            Op::Softmax { dim } => arg(0)?.f_softmax(*dim as i64, None::<Kind>)?,
            Op::Bmm => arg(0)?.f_bmm(arg(1)?)?,
            Op::MulScalar { s } => arg(0)?.f_mul_scalar(*s)?,
            Op::Attention { causal, dropout } => Tensor::f_scaled_dot_product_attention(
                arg(0)?,
                arg(1)?,
                arg(2)?,
                None::<&Tensor>,
                *dropout,
                *causal,
                None,
                false,
            )?,
            Op::ShiftedWindowMask { .. } => {
                // [nW, N] region ids -> [nW, N, N] "different region" -> -100 where true.
                let data = self.masks.get(&index).map(Vec::as_slice).unwrap_or(&[]);
                let (windows, n) = (out_shape[1], out_shape[3]);
                let ids = Tensor::from_slice(data).f_to_device(self.device)?.f_view([windows, n])?;
                let differ = ids.f_unsqueeze(2)?.f_ne_tensor(&ids.f_unsqueeze(1)?)?;
                let mut mask = differ.f_to_kind(Kind::Float)?;
                drop((differ, ids));
                let _ = mask.f_mul_scalar_(-100.0)?;
                mask.f_view(out_shape.as_slice())?
            }
            Op::Normalize => {
                let x = arg(0)?;
                let norm = x.f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?.f_clamp_min(1e-12)?;
                x.f_div(&norm)?
            }
        })
    }

    /// Runs nodes `range` into `vals`, dropping each value after its last use.
    fn forward_range(
        &self,
        range: std::ops::Range<usize>,
        vals: &mut [Option<Tensor>],
        last_use: &[Option<usize>],
    ) -> Result<(), TrainError> {
        for index in range {
            let out = self.run(index, vals)?;
            vals[self.graph.nodes[index].output] = Some(out);
            for &v in &self.graph.nodes[index].inputs {
                if last_use[v] == Some(index) {
                    vals[v] = None;
                }
            }
        }
        Ok(())
    }

    /// One micro-batch: forward, `loss_fn` on the graph's outputs, backward. Returns the
    /// unscaled loss value. `inputs` are the graph's input values, in order.
    pub fn step(
        &self,
        inputs: Vec<Tensor>,
        loss_fn: &dyn Fn(&[Tensor]) -> Result<Tensor, tch::TchError>,
        divide_by: u64,
        mark: &mut dyn FnMut(shared::estimate::Phase),
    ) -> Result<f64, TrainError> {
        self.calls.set(self.calls.get().wrapping_add(1));
        let g = &self.graph;
        let last_use = g.last_use();
        let producer = g.producer();
        let regions = g.regions(self.segments);
        let region_of = |node: usize| regions.iter().position(|(r, _)| r.contains(&node));
        let mut vals: Vec<Option<Tensor>> = (0..g.values.len()).map(|_| None).collect();
        for (&(v, _), t) in g.inputs.iter().zip(inputs) {
            vals[v] = Some(t);
        }
        // Values a region reads from outside it: kept for checkpointed regions' recompute.
        let live_in = g.region_inputs(&regions);
        let kept_for_recompute =
            |v: usize| regions.iter().zip(&live_in).any(|((_, ckpt), ins)| *ckpt && ins.contains(&v));
        let plain = regions.len() == 1;

        if let Some(a) = self.autocast {
            a.set(true);
        }
        // Forward, region by region. Each region reads other regions' values through
        // detached leaves, so that their gradients can be collected per region.
        let mut leaves: Vec<BTreeMap<usize, Tensor>> = (0..regions.len()).map(|_| BTreeMap::new()).collect();
        let mut kept: BTreeMap<usize, Tensor> = BTreeMap::new();
        // Outputs of regions that ran with autograd, for their backward later.
        let mut attached: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (r, (range, ckpt)) in regions.iter().enumerate() {
            if !plain {
                for &v in &live_in[r] {
                    let Some(t) = vals[v].as_ref() else { continue };
                    if kept_for_recompute(v) {
                        kept.insert(v, t.shallow_clone());
                    }
                    let from_normal = producer[v].and_then(region_of).is_some_and(|p| !regions[p].1);
                    if from_normal && t.requires_grad() && !attached.contains_key(&v) {
                        attached.insert(v, t.shallow_clone());
                    }
                    let leaf = t.f_detach()?.set_requires_grad(g.values[v].requires_grad && !*ckpt);
                    // Checkpointed regions make fresh leaves when they recompute.
                    if !*ckpt {
                        leaves[r].insert(v, leaf.shallow_clone());
                    }
                    vals[v] = Some(leaf);
                }
            }
            if *ckpt {
                // The recompute must draw the same dropout masks: seed both passes alike.
                tch::manual_seed(self.region_seed(r));
                tch::no_grad(|| self.forward_range(range.clone(), &mut vals, &last_use))?;
            } else {
                self.forward_range(range.clone(), &mut vals, &last_use)?;
            }
        }
        mark(shared::estimate::Phase::Loss);
        let outputs: Vec<Tensor> = g.outputs.iter().filter_map(|&v| vals[v].take()).collect();
        let loss = loss_fn(&outputs)?;
        drop(outputs);
        if let Some(a) = self.autocast {
            a.set(false);
        }
        let scaled = if divide_by > 1 { loss.f_div_scalar(divide_by as f64)? } else { loss.shallow_clone() };
        mark(shared::estimate::Phase::Backward);
        scaled.f_backward()?;
        drop(scaled);
        drop(vals);
        // The loss tensor keeps the last region's graph, and through it that region's
        // leaves and their gradients: keep only its value.
        let loss_value = loss.f_double_value(&[])?;
        drop(loss);

        if !plain {
            // Gradients each value received from the regions that read it.
            let mut value_grads: BTreeMap<usize, Tensor> = BTreeMap::new();
            let collect = |leaves: &BTreeMap<usize, Tensor>,
                           value_grads: &mut BTreeMap<usize, Tensor>|
             -> Result<(), TrainError> {
                for (&v, leaf) in leaves {
                    let grad = leaf.grad();
                    if !grad.defined() {
                        continue;
                    }
                    match value_grads.remove(&v) {
                        None => {
                            value_grads.insert(v, grad);
                        }
                        Some(old) => {
                            value_grads.insert(v, old.f_add(&grad)?);
                        }
                    }
                }
                Ok(())
            };
            let last = regions.len() - 1;
            collect(&std::mem::take(&mut leaves[last]), &mut value_grads)?;
            for r in (0..last).rev() {
                let (range, ckpt) = &regions[r];
                let outs_wanted: Vec<usize> =
                    value_grads.keys().copied().filter(|v| producer[*v].is_some_and(|p| range.contains(&p))).collect();
                if *ckpt {
                    if let Some(a) = self.autocast {
                        a.set(true);
                    }
                    let mut vals: Vec<Option<Tensor>> = (0..g.values.len()).map(|_| None).collect();
                    let mut fresh = BTreeMap::new();
                    for &v in &live_in[r] {
                        if let Some(t) = kept.get(&v) {
                            let leaf = t.f_detach()?.set_requires_grad(g.values[v].requires_grad);
                            fresh.insert(v, leaf.shallow_clone());
                            vals[v] = Some(leaf);
                        }
                    }
                    for &v in &live_in[r] {
                        if !live_in[..r].iter().any(|ins| ins.contains(&v)) {
                            kept.remove(&v);
                        }
                    }
                    tch::manual_seed(self.region_seed(r));
                    self.forward_range(range.clone(), &mut vals, &last_use)?;
                    if let Some(a) = self.autocast {
                        a.set(false);
                    }
                    // Each recomputed output with the gradient it received, as pairs.
                    let mut outs = Vec::new();
                    let mut grads = Vec::new();
                    for v in &outs_wanted {
                        if let (Some(o), Some(gr)) = (vals[*v].take(), value_grads.remove(v)) {
                            outs.push(o);
                            grads.push(gr);
                        }
                    }
                    drop(vals);
                    backward_from(&outs, &grads)?;
                    drop((outs, grads));
                    collect(&fresh, &mut value_grads)?;
                } else {
                    // A region that kept its autograd graph: backward from its outputs.
                    let mut outs = Vec::new();
                    let mut grads = Vec::new();
                    for v in &outs_wanted {
                        if let (Some(o), Some(gr)) = (attached.remove(v), value_grads.remove(v)) {
                            outs.push(o);
                            grads.push(gr);
                        }
                    }
                    backward_from(&outs, &grads)?;
                    drop((outs, grads));
                    collect(&std::mem::take(&mut leaves[r]), &mut value_grads)?;
                }
            }
        }
        Ok(loss_value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_position_index_matches_the_swin_formula() {
        // For a 2x2x2 window: 8 tokens, and the index of (p, q) with p == q is the centre
        // of the (2*2-1)^3 = 27-entry table, 13.
        let idx = relative_position_index([2, 2, 2], 8);
        assert_eq!(idx.len(), 64);
        assert!(idx.iter().step_by(9).all(|&v| v == 13));
        assert_eq!(*idx.iter().max().expect("non-empty"), 26);
    }

    #[test]
    fn shifted_window_mask_separates_regions() {
        // A 4^3 volume, windows of 2 shifted by 1: the first window holds one region.
        let mask = shifted_window_mask([4, 4, 4], [2, 2, 2], [1, 1, 1]);
        assert_eq!(mask.len(), 8 * 8 * 8);
        assert!(mask[..64].iter().all(|&m| m == 0.0));
        assert!(mask[7 * 64..].iter().any(|&m| m == -100.0), "the last window straddles the shift");
    }
}
