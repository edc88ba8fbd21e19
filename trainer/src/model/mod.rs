//! Runs `shared::graph` — the same description the estimator walks — with tch: one tch
//! call per primitive, the call its reference implementation makes (`F.linear`, HF's
//! `addmm`, `F.scaled_dot_product_attention`, `nll_loss_nd`...), the fallible `f_*` ops
//! throughout so that errors (out of memory above all) come back as values.
//!
//! The loss is part of the graph, so a forward pass ends in the scalar the loop calls
//! `backward()` on. Gradient checkpointing follows the graph's regions: a checkpointed
//! region runs as a reentrant checkpoint (`torch.utils.checkpoint(use_reentrant=True)`):
//! an autograd Function (in `csrc/autograd.cpp`) whose forward runs the region without
//! autograd, keeping its inputs, and whose backward runs it again and then a backward of
//! its own. The region itself runs here, through [`region_callback`].

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shared::graph::{Graph, Init, Op, Param, Region, ValueId};
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;
use crate::ffi;

mod ops;

pub(super) fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn dims(shape: &[u64]) -> Vec<i64> {
    shape.iter().map(|&d| i(d)).collect()
}

pub(super) fn dims_usize(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&v| v as i64).collect()
}

/// Mixed precision for the forward pass.
#[derive(Clone, Copy)]
pub struct Autocast {
    pub cuda: bool,
    pub bf16: bool,
}

impl Autocast {
    fn set(self, on: bool) {
        ffi::autocast(self.cuda, on, self.bf16);
    }
}

/// MONAI's relative position index for a window: `[N, N]` with N = the window's volume.
fn relative_position_index(window: [u64; 3]) -> Vec<i64> {
    let w = window.map(|v| v as i64);
    let mut coords = Vec::new();
    for a in 0..w[0] {
        for b in 0..w[1] {
            for c in 0..w[2] {
                coords.push([a, b, c]);
            }
        }
    }
    let mut out = Vec::with_capacity(coords.len() * coords.len());
    for p in &coords {
        for q in &coords {
            let r0 = (p[0] - q[0] + w[0] - 1) * (2 * w[1] - 1) * (2 * w[2] - 1);
            let r1 = (p[1] - q[1] + w[1] - 1) * (2 * w[2] - 1);
            let r2 = p[2] - q[2] + w[2] - 1;
            out.push(r0 + r1 + r2);
        }
    }
    out
}

/// Python's `slice(start, stop)` over a dimension of `len`: the `[lo, hi)` it selects.
fn py_slice(len: i64, start: Option<i64>, stop: Option<i64>) -> (i64, i64) {
    let clamp = |v: i64| if v < 0 { (len + v).max(0) } else { v.min(len) };
    let lo = start.map_or(0, clamp);
    let hi = stop.map_or(len, clamp);
    (lo, hi.max(lo))
}

/// MONAI's `compute_mask` for a padded volume, window and shift: region ids written into
/// a zero image slice by slice, the image's window partition, the pairwise difference,
/// then -100 where it is non-zero and 0 where it is zero. `[nW, N, N]`.
pub(super) fn compute_mask(
    padded: [u64; 3],
    window: [u64; 3],
    shift: [u64; 3],
    device: Device,
) -> Result<Tensor, tch::TchError> {
    let p = padded.map(i);
    let w = window.map(i);
    let s = shift.map(i);
    let img = Tensor::f_zeros([1, p[0], p[1], p[2], 1], (Kind::Float, device))?;
    let slices = |k: usize| [(None, Some(-w[k])), (Some(-w[k]), Some(-s[k])), (Some(-s[k]), None)];
    let mut cnt = 0.0;
    for (d0, d1) in slices(0) {
        for (h0, h1) in slices(1) {
            for (w0, w1) in slices(2) {
                let (a, b) = py_slice(p[0], d0, d1);
                let (c, d) = py_slice(p[1], h0, h1);
                let (e, f) = py_slice(p[2], w0, w1);
                let _ = img.f_slice(1, a, b, 1)?.f_slice(2, c, d, 1)?.f_slice(3, e, f, 1)?.f_fill_(cnt)?;
                cnt += 1.0;
            }
        }
    }
    let n = w[0] * w[1] * w[2];
    // window_partition: view, permute, contiguous, view(-1, N, C); then squeeze(-1).
    let windows = img
        .f_view([1, p[0] / w[0], w[0], p[1] / w[1], w[1], p[2] / w[2], w[2], 1].as_slice())?
        .f_permute([0, 1, 3, 5, 2, 4, 6, 7])?
        .f_contiguous()?
        .f_view([-1, n, 1])?
        .f_squeeze_dim(-1)?;
    drop(img);
    let diff = windows.f_unsqueeze(1)?.f_sub(&windows.f_unsqueeze(2)?)?;
    drop(windows);
    let first = diff.f_masked_fill(&diff.f_ne(0.0)?, -100.0)?;
    let out = first.f_masked_fill(&diff.f_eq(0.0)?, 0.0)?;
    Ok(out)
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
            Init::RelativePositionIndex { window } => {
                Tensor::from_slice(&relative_position_index(*window)).f_view(shape.as_slice())?.f_to_device(device)?
            }
            Init::CausalMask => {
                let mut t = Tensor::f_full(&shape, f64::NEG_INFINITY, (kind, device))?;
                let _ = t.f_triu_(1)?;
                t
            }
        })
    })?;
    Ok(if p.trainable { t.set_requires_grad(true) } else { t })
}

/// Moments of the forward pass the training loop acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// The loss computation begins.
    Loss,
    /// The model call returns to the loop (the previous outputs can go).
    Returned,
}

/// Makes the surface term's distance map (`graph::SurfaceTerm`) from the values the
/// forward pass holds when the term begins.
pub type SurfaceMap<'a> = &'a mut dyn FnMut(&[Option<Tensor>]) -> Result<Tensor, tch::TchError>;

/// What one forward pass leaves the loop.
pub struct Forward {
    /// The values the model returned (`graph.returned`).
    pub returned: Vec<Tensor>,
    pub loss: Tensor,
    /// The surface term's value, when it ran.
    pub surface: Option<f64>,
}

pub struct Net {
    pub graph: Graph,
    device: Device,
    /// Parameters and buffers, in the graph's order.
    pub params: Vec<Tensor>,
    autocast: Option<Autocast>,
    regions: Vec<Region>,
    region_inputs: Vec<Vec<ValueId>>,
    region_outputs: Vec<Vec<ValueId>>,
    last_use: Vec<Option<usize>>,
    /// Values the loop keeps past their last use: the returned outputs and the loss.
    kept: Vec<bool>,
    /// Seeds the checkpointed regions' dropout: the base seed, and a counter of passes
    /// (atomic: a checkpoint's backward may call back from autograd's device thread).
    seed: u64,
    calls: AtomicU64,
    /// `model.train()` (true) or `model.eval()`: dropout off and batch norm on its
    /// running statistics.
    pub training: bool,
    /// The TorchScript module an `Op::Script` node runs, with its parameters (then
    /// `params`) and their names; shared by every `Net` of the job.
    pub script: Option<Script>,
    /// The surface term's value in the pass running now.
    surface_value: Mutex<Option<f64>>,
}

/// A loaded TorchScript module.
#[derive(Clone)]
pub struct Script {
    pub module: Arc<Mutex<tch::CModule>>,
    pub names: Vec<String>,
}

impl Script {
    /// Loads `path` onto `device`; returns it with its parameters (all trained).
    pub fn load(path: &std::path::Path, device: Device) -> Result<(Script, Vec<Tensor>), TrainError> {
        let module = tch::CModule::load_on_device(path, device)
            .map_err(|e| TrainError::Data(format!("{}: not a TorchScript module: {e}", path.display())))?;
        let named = module.named_parameters().map_err(TrainError::from)?;
        if named.is_empty() {
            return Err(TrainError::Data(format!("{}: the module has no parameters to train", path.display())));
        }
        let (names, params): (Vec<String>, Vec<Tensor>) = named.into_iter().unzip();
        for p in &params {
            // The saved module may hold frozen weights; the plan trains them all.
            let _ = p.shallow_clone().f_requires_grad_(true)?;
        }
        Ok((Script { module: Arc::new(Mutex::new(module)), names }, params))
    }
}

impl Net {
    pub fn new(
        graph: Graph,
        device: Device,
        autocast: Option<Autocast>,
        checkpoint: shared::graph::Checkpoint,
        seed: u64,
    ) -> Result<Net, TrainError> {
        let params = graph.params.iter().map(|p| make_param(p, device)).collect::<Result<Vec<_>, _>>()?;
        Ok(Net::with_params(graph, device, autocast, checkpoint, seed, params))
    }

    /// The same model for another graph of it (another micro-batch, or the validation
    /// pass's) around this one's weights: the parameters are shared, not copied, so the
    /// optimizer's state stays theirs and nothing is allocated for them, which matters
    /// most right after running out of memory. `checkpoint` is the new graph's mode.
    pub fn sharing(&self, graph: Graph, checkpoint: shared::graph::Checkpoint) -> Net {
        let params = self.params.iter().map(Tensor::shallow_clone).collect();
        let mut net = Net::with_params(graph, self.device, self.autocast, checkpoint, self.seed, params);
        net.script = self.script.clone();
        net
    }

    fn with_params(
        graph: Graph,
        device: Device,
        autocast: Option<Autocast>,
        checkpoint: shared::graph::Checkpoint,
        seed: u64,
        params: Vec<Tensor>,
    ) -> Net {
        let regions = graph.regions(checkpoint);
        let region_inputs = graph.region_inputs(&regions);
        let region_outputs = regions.iter().map(|r| graph.region_outputs(r)).collect();
        let last_use = graph.last_use();
        let mut kept = vec![false; graph.values.len()];
        for &v in graph.returned.iter().chain([&graph.loss]) {
            kept[v] = true;
        }
        Net {
            graph,
            device,
            params,
            autocast,
            regions,
            region_inputs,
            region_outputs,
            last_use,
            kept,
            seed,
            calls: AtomicU64::new(0),
            training: true,
            script: None,
            surface_value: Mutex::new(None),
        }
    }

    /// Forward passes so far, and setting it when a run resumes: checkpointed regions'
    /// dropout is seeded from it.
    pub fn passes(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
    pub fn set_passes(&self, n: u64) {
        self.calls.store(n, Ordering::Relaxed);
    }

    pub fn trainable(&self) -> Box<dyn Iterator<Item = &Tensor> + '_> {
        if self.script.is_some() {
            return Box::new(self.params.iter());
        }
        Box::new(self.graph.params.iter().zip(&self.params).filter(|(p, _)| p.trainable).map(|(_, t)| t))
    }

    /// Every parameter and buffer's name, in `params` order (checkpoints key by it).
    pub fn param_names(&self) -> Vec<String> {
        match &self.script {
            Some(s) => s.names.clone(),
            None => self.graph.params.iter().map(|p| p.name.clone()).collect(),
        }
    }

    /// The seed of checkpointed region `r` in the current pass: the same for its forward
    /// and its recompute (as `preserve_rng_state`), different across regions and passes.
    fn region_seed(&self, r: usize) -> i64 {
        let mix = self.seed
            ^ self.calls.load(Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (r as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        (mix >> 1) as i64
    }

    fn run(&self, index: usize, vals: &[Option<Tensor>]) -> Result<Vec<Tensor>, tch::TchError> {
        let node = &self.graph.nodes[index];
        if let Op::Release = node.op {
            // The values it holds go through the caller's last-use rule.
            return Ok(Vec::new());
        }
        let c = ops::Call { net: self, node, vals, index, out_shape: dims(&self.graph.values[node.output()].shape) };
        ops::run(&c)
    }

    /// Runs nodes `range` into `vals`, dropping each value after its last use (unless
    /// the loop keeps it), calling `moment` where the loss begins and the model returns.
    fn forward_range(
        &self,
        range: std::ops::Range<usize>,
        vals: &mut [Option<Tensor>],
        moment: &mut dyn FnMut(Moment),
        surface: &mut Option<SurfaceMap<'_>>,
    ) -> Result<(), tch::TchError> {
        let g = &self.graph;
        for index in range {
            if index == g.loss_start {
                moment(Moment::Loss);
            }
            if let (Some(t), Some(make)) = (&g.surface, surface.as_mut())
                && index == t.start
            {
                vals[t.map] = Some(make(vals)?);
            }
            if index == g.returns_after {
                moment(Moment::Returned);
            }
            let outs = self.run(index, vals)?;
            for (&v, t) in g.nodes[index].outputs.iter().zip(outs) {
                vals[v] = Some(t);
            }
            if let Some(t) = &g.surface
                && surface.is_some()
                && g.nodes[index].outputs.contains(&t.term)
                && let Some(v) = &vals[t.term]
            {
                // A scalar read back to the host: no device memory.
                *self.surface_value.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(v.f_double_value(&[])?);
            }
            for &v in &g.nodes[index].inputs {
                if self.last_use[v] == Some(index) && !self.kept[v] {
                    vals[v] = None;
                }
            }
            for &v in &g.nodes[index].outputs {
                if self.last_use[v].is_none() && !self.kept[v] {
                    vals[v] = None;
                }
            }
        }
        Ok(())
    }

    /// Region `r` from its inputs (in `region_inputs` order) to its outputs (in
    /// `region_outputs` order); what a checkpoint runs, forward and again in backward.
    fn run_region(&self, r: usize, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, tch::TchError> {
        let mut vals: Vec<Option<Tensor>> = (0..self.graph.values.len()).map(|_| None).collect();
        for (&v, t) in self.region_inputs[r].iter().zip(inputs) {
            vals[v] = Some(t);
        }
        tch::manual_seed(self.region_seed(r));
        self.forward_range(self.regions[r].nodes.clone(), &mut vals, &mut |_| {}, &mut None)?;
        self.region_outputs[r]
            .iter()
            .map(|&v| {
                vals[v].take().ok_or_else(|| tch::TchError::Shape(format!("checkpointed region {r} lost output {v}")))
            })
            .collect()
    }

    /// One forward pass through the model and the loss. `inputs` are the graph's input
    /// values, in order; the result holds the returned values and the loss.
    ///
    /// # Safety
    /// A checkpointed region's autograd node calls back into this `Net`: it must outlive
    /// the returned tensors' graph (run the backward, or drop every tensor of the result,
    /// before the `Net` goes) and must not move meanwhile.
    ///
    /// A graph with a surface term (`graph::SurfaceTerm`) runs it when `surface` makes
    /// its map; without, the pass stops where the term begins and the loss is the plain
    /// one.
    pub unsafe fn forward(
        &self,
        inputs: &[Tensor],
        moment: &mut dyn FnMut(Moment),
        mut surface: Option<SurfaceMap<'_>>,
    ) -> Result<Forward, TrainError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let g = &self.graph;
        let mut vals: Vec<Option<Tensor>> = (0..g.values.len()).map(|_| None).collect();
        for (&(v, _), t) in g.inputs.iter().zip(inputs) {
            vals[v] = Some(t.shallow_clone());
        }
        if let Some(a) = self.autocast {
            a.set(true);
        }
        let stop = match (&g.surface, &surface) {
            (Some(t), None) => Some(t.start),
            _ => None,
        };
        let result = self.forward_regions(&mut vals, moment, stop, &mut surface);
        if let Some(a) = self.autocast {
            a.set(false);
        }
        result?;
        if g.returns_after == g.nodes.len() {
            moment(Moment::Returned);
        }
        let returned = g.returned.iter().filter_map(|&v| vals[v].take()).collect();
        let loss_value = match (&g.surface, stop) {
            (Some(t), Some(_)) => t.base_loss,
            _ => g.loss,
        };
        let loss =
            vals[loss_value].take().ok_or_else(|| TrainError::Torch("the forward pass lost its loss".to_owned()))?;
        let surface = self.surface_value.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        Ok(Forward { returned, loss, surface })
    }

    /// Runs every region, up to node `stop` when there is one (where the surface term
    /// begins: in the last region, never checkpointed).
    fn forward_regions(
        &self,
        vals: &mut [Option<Tensor>],
        moment: &mut dyn FnMut(Moment),
        stop: Option<usize>,
        surface: &mut Option<SurfaceMap<'_>>,
    ) -> Result<(), TrainError> {
        for (r, region) in self.regions.iter().enumerate() {
            if !region.checkpointed {
                let mut nodes = region.nodes.clone();
                nodes.end = nodes.end.min(stop.unwrap_or(usize::MAX));
                self.forward_range(nodes.start..nodes.end.max(nodes.start), vals, moment, surface)?;
                continue;
            }
            let range = region.nodes.clone();
            let mut inputs = Vec::with_capacity(self.region_inputs[r].len());
            for &v in &self.region_inputs[r] {
                let t = vals[v]
                    .as_ref()
                    .ok_or_else(|| TrainError::Torch(format!("checkpointed region {r} is missing its input {v}")))?;
                inputs.push(t.shallow_clone());
                // The checkpoint keeps what the region reads for its recompute; the loop's
                // own reference goes where the plain forward would drop it.
                if self.last_use[v].is_some_and(|l| l < range.end) && !self.kept[v] {
                    vals[v] = None;
                }
            }
            let cuda = match self.device {
                Device::Cuda(i) => Some(i),
                _ => None,
            };
            let differentiable: Vec<bool> =
                self.region_outputs[r].iter().map(|&v| self.graph.values[v].requires_grad).collect();
            // SAFETY: `forward`'s contract: `self` outlives the graph the outputs carry and
            // does not move; `region_callback` only reads it.
            let outs = unsafe {
                ffi::checkpoint(region_callback, self as *const Net as *mut c_void, r, cuda, &inputs, &differentiable)
                    .map_err(|e| TrainError::from(tch::TchError::Torch(e)))?
            };
            drop(inputs);
            for (&v, t) in self.region_outputs[r].iter().zip(outs) {
                vals[v] = Some(t);
            }
        }
        Ok(())
    }
}

/// The checkpoint's way back into Rust: runs region `region` of the `Net` at `user`.
unsafe extern "C" fn region_callback(
    user: *mut c_void,
    region: i32,
    inputs: *mut *mut c_void,
    n_in: i32,
    _grad: i32,
    outputs: *mut *mut c_void,
    max_out: i32,
    n_out: *mut i32,
    err: *mut u8,
    err_len: usize,
) -> i32 {
    // SAFETY: the shim hands over `n_in` new tensors that we now own.
    let ins = unsafe { ffi::take_tensors(inputs, usize::try_from(n_in).unwrap_or(0)) };
    // SAFETY: `user` is the `Net` that `forward_regions` passed, alive for the graph.
    let net = unsafe { &*(user as *const Net) };
    let r = usize::try_from(region).unwrap_or(usize::MAX);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if r >= net.regions.len() {
            return Err(format!("no checkpointed region {region}"));
        }
        net.run_region(r, ins).map_err(|e| e.to_string())
    }))
    .unwrap_or_else(|_| Err(format!("checkpointed region {region} panicked")));
    match result {
        Ok(outs) => {
            let max = usize::try_from(max_out).unwrap_or(0);
            if outs.len() > max {
                // SAFETY: `err` has `err_len` writable bytes.
                unsafe { ffi::write_error(err, err_len, "a checkpointed region has too many outputs") };
                return 1;
            }
            // SAFETY: `outputs` has `max_out` writable slots; `n_out` is writable.
            unsafe {
                let n = ffi::give_tensors(outs, outputs, max);
                *n_out = n as i32;
            }
            0
        }
        Err(text) => {
            // SAFETY: `err` has `err_len` writable bytes.
            unsafe { ffi::write_error(err, err_len, &text) };
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_position_index_matches_the_swin_formula() {
        // For a 2x2x2 window: 8 tokens, and the index of (p, q) with p == q is the centre
        // of the (2*2-1)^3 = 27-entry table, 13.
        let idx = relative_position_index([2, 2, 2]);
        assert_eq!(idx.len(), 64);
        assert!(idx.iter().step_by(9).all(|&v| v == 13));
        assert_eq!(*idx.iter().max().expect("non-empty"), 26);
    }

    #[test]
    fn python_slices_clamp_like_python() {
        assert_eq!(py_slice(8, None, Some(-2)), (0, 6));
        assert_eq!(py_slice(8, Some(-2), Some(-1)), (6, 7));
        assert_eq!(py_slice(8, Some(-1), None), (7, 8));
        // A window as large as the volume and a larger shift: empty, empty, everything.
        assert_eq!(py_slice(2, None, Some(-2)), (0, 0));
        assert_eq!(py_slice(2, Some(-2), Some(-3)), (0, 0));
        assert_eq!(py_slice(2, Some(-3), None), (0, 2));
        // A zero shift: `slice(-0, None)` is the whole dimension.
        assert_eq!(py_slice(4, Some(0), None), (0, 4));
    }

    #[test]
    fn compute_mask_separates_shifted_regions() -> Result<(), tch::TchError> {
        // A 4^3 volume, windows of 2 shifted by 1: the first window holds one region, the
        // last straddles the shift.
        let m = compute_mask([4, 4, 4], [2, 2, 2], [1, 1, 1], Device::Cpu)?;
        assert_eq!(m.size(), vec![8, 8, 8]);
        let first = m.f_select(0, 0)?.f_abs()?.f_sum(Kind::Float)?.f_double_value(&[])?;
        assert_eq!(first, 0.0);
        let last = m.f_select(0, 7)?.f_min()?.f_double_value(&[])?;
        assert_eq!(last, -100.0);
        Ok(())
    }
}

#[cfg(test)]
mod checkpoint_tests {
    use super::*;
    use shared::graph::{Builder, Checkpoint, InputKind, Task};

    fn chain() -> Graph {
        let mut b = Builder::new(Task::Classify { classes: 4 });
        let mut x = b.input(vec![2, 8], InputKind::Real);
        for i in 0..4 {
            x = b.stage(|b| b.block(|b| b.linear(&format!("l{i}"), x, 8, true))).expect("layer");
        }
        let y = b.input(vec![2], InputKind::ClassIndex { classes: 8 });
        let start = b.next_node();
        let lp = b.log_softmax(x, 1);
        let loss = b.nll_loss(lp, y, -100).expect("loss");
        b.finish(vec![x], loss, start)
    }

    fn grads(mode: Checkpoint) -> Result<Vec<Tensor>, TrainError> {
        let g = chain();
        tch::manual_seed(1);
        let net = Net::new(g, Device::Cpu, None, mode, 1)?;
        tch::manual_seed(2);
        let x = Tensor::f_randn([2, 8], (Kind::Float, Device::Cpu))?;
        let y = Tensor::from_slice(&[1i64, 3]);
        // SAFETY: the backward runs and the result goes before `net`.
        let out = unsafe { net.forward(&[x, y], &mut |_| {}, None)? };
        out.loss.f_backward()?;
        drop(out);
        Ok(net.trainable().map(|p| p.grad()).collect())
    }

    #[test]
    fn every_checkpoint_mode_gives_every_parameter_the_same_gradient() -> Result<(), TrainError> {
        let plain = grads(Checkpoint::Off)?;
        assert!(plain.iter().all(Tensor::defined));
        for mode in [Checkpoint::Segments(2), Checkpoint::Segments(4), Checkpoint::Blocks] {
            let g = grads(mode)?;
            assert_eq!(g.len(), plain.len());
            for (k, (a, b)) in plain.iter().zip(&g).enumerate() {
                assert!(b.defined(), "{mode:?}: parameter {k} got no gradient");
                let diff = a.f_sub(b)?.f_abs()?.f_max()?.f_double_value(&[])?;
                assert!(diff < 1e-6, "{mode:?}: parameter {k} differs by {diff}");
            }
        }
        Ok(())
    }
}
