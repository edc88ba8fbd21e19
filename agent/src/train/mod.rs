//! The trainer: the only module that names `tch`. It runs a plan's training loop on
//! synthetic data and reports every micro-batch's loss and memory.
//!
//! Runs off the async runtime (in the worker process); a stop flag is checked once per
//! micro-batch.

mod checkpoint;
mod ffi;
pub mod memory;
mod model;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use shared::estimate::Phase;
use shared::graph::{Graph, InputKind, Task};
use shared::plan::{DeviceChoice, Optimizer, OptimizerImpl, Plan, Precision, Runtime};
use shared::protocol::{BatchRecord, ErrorCode, JobError, JobId, Summary};
use tch::{Device, Kind, Tensor};
use thiserror::Error;

use memory::Meter;

use crate::data;

#[derive(Debug, Error)]
pub enum TrainError {
    #[error("cancelled")]
    Cancelled,
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("device: {0}")]
    Device(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Data(String),
    #[error("host memory: {0}")]
    HostMemory(String),
}

impl From<crate::data::DataError> for TrainError {
    fn from(e: crate::data::DataError) -> TrainError {
        TrainError::Data(e.0)
    }
}

/// Files a job may use on the agent's machine, chosen by the agent (never by the plan):
/// where checkpoints go and the checkpoint to resume from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFiles {
    pub checkpoint_dir: Option<PathBuf>,
    /// A `step-N` checkpoint, or a checkpoint directory (its newest is taken).
    pub resume: Option<PathBuf>,
    /// The folder a plan's `data` and `data_labels` paths are relative to; nothing
    /// outside it is read.
    pub data_root: Option<PathBuf>,
}

/// Opens the data set at the plan's `path` (and manifest) for `graph`'s inputs.
fn open_data(
    files: &JobFiles,
    key: &str,
    path: &str,
    labels: &str,
    graph: &Graph,
) -> Result<Option<Arc<data::Dataset>>, TrainError> {
    if path.is_empty() {
        return Ok(None);
    }
    let root = files.data_root.as_deref().ok_or_else(|| {
        TrainError::Data(format!("{key}={path} needs a data root on the agent (headroom run --data-root DIR)"))
    })?;
    let dir = data::confine(root, path)?;
    let manifest = if labels.is_empty() { None } else { Some(data::confine(root, labels)?) };
    let want = data::Want::of(graph)?;
    Ok(Some(Arc::new(data::Dataset::open(root, &dir, manifest.as_deref(), want)?)))
}

/// A host batch as tensors on `device`: one copy into a fresh tensor each (the batch the
/// estimate counts), nothing else kept.
fn to_tensors(batch: data::HostBatch, device: Device) -> Result<Vec<Tensor>, tch::TchError> {
    batch
        .tensors
        .into_iter()
        .map(|t| {
            let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            let cpu = match &t.data {
                data::HostData::F32(v) => Tensor::f_from_slice(v)?,
                data::HostData::I64(v) => Tensor::f_from_slice(v)?,
            };
            drop(t);
            let cpu = cpu.f_view(shape.as_slice())?;
            if device == Device::Cpu { Ok(cpu) } else { cpu.f_to_device(device) }
        })
        .collect()
}

impl TrainError {
    pub fn to_wire(&self) -> JobError {
        let code = match self {
            TrainError::Cancelled => ErrorCode::Cancelled,
            TrainError::OutOfMemory(_) => ErrorCode::OutOfMemory,
            TrainError::Torch(_) | TrainError::Device(_) => ErrorCode::Torch,
            // A checkpoint that does not fit the plan is bad input, as a bad plan is.
            TrainError::InvalidPlan(_) | TrainError::Checkpoint(_) | TrainError::Data(_) => ErrorCode::InvalidPlan,
            TrainError::HostMemory(_) => ErrorCode::HostMemory,
        };
        JobError { code, message: self.to_string() }
    }
}

impl From<tch::TchError> for TrainError {
    fn from(e: tch::TchError) -> TrainError {
        let text = e.to_string();
        // libtorch's own first line is the useful part; the rest is a C++ backtrace.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or(&text).trim().to_owned();
        if text.contains("out of memory") || text.contains("OutOfMemoryError") {
            TrainError::OutOfMemory(first)
        } else {
            TrainError::Torch(first)
        }
    }
}

/// Resolves the plan's device choice to what this process can use.
pub fn resolve_device(choice: DeviceChoice) -> Result<(Device, Meter), TrainError> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, Meter::Cpu)),
        DeviceChoice::Auto if tch::Cuda::is_available() => Ok((Device::Cuda(0), Meter::Cuda(0))),
        DeviceChoice::Auto => Ok((Device::Cpu, Meter::Cpu)),
        DeviceChoice::Cuda(i) => {
            let count = tch::Cuda::device_count();
            let index = usize::try_from(i).unwrap_or(usize::MAX);
            if i64::from(i) >= count {
                return Err(TrainError::Device(format!("cuda:{i} requested but {count} CUDA devices are visible")));
            }
            Ok((Device::Cuda(index), Meter::Cuda(i as i32)))
        }
    }
}

/// Whether a plan with this device choice runs on the CPU in this process.
pub fn runs_on_cpu(choice: DeviceChoice) -> bool {
    matches!(resolve_device(choice), Ok((Device::Cpu, _)))
}

/// CUDA devices libtorch can use from this process (0 without a driver or a GPU).
pub fn cuda_device_count() -> i64 {
    if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 }
}

/// Tracks the highest tensor memory per phase of the current step.
struct PhaseMeter {
    meter: Meter,
    peaks: [u64; Phase::ALL.len()],
    /// Highest reserved bytes over the whole run (CUDA): read at the end of every phase,
    /// because each phase starts a new peak window.
    reserved_peak: Option<u64>,
}

impl PhaseMeter {
    fn begin(&mut self, _phase: Phase) {
        // Every phase starts a new peak window.
        self.meter.reset_peak();
    }
    fn end(&mut self, phase: Phase) -> u64 {
        let reading = self.meter.read();
        if let Some(r) = reading.reserved_peak {
            self.reserved_peak = Some(self.reserved_peak.unwrap_or(0).max(r));
        }
        let peak = reading.peak;
        let slot = &mut self.peaks[phase.index()];
        *slot = (*slot).max(peak);
        peak
    }
}

/// The synthetic data: what each graph input holds, made fresh for every micro-batch
/// and nothing kept between them (a user's loader keeps nothing on the device either).
/// The labels follow from the inputs, so the task is learnable: a class adds a bump to
/// its own stretch of the flattened input, a segmentation label is a bucket of the first
/// channel, and token sequences count up from a random start.
fn make_batch(graph: &Graph, device: Device) -> Result<Vec<Tensor>, tch::TchError> {
    tch::no_grad(|| {
        let b = i64::try_from(graph.micro_batch()).unwrap_or(1);
        let shape_of =
            |v: usize| -> Vec<i64> { graph.values[v].shape.iter().map(|&d| i64::try_from(d).unwrap_or(1)).collect() };
        let mut out: Vec<Option<Tensor>> = graph.inputs.iter().map(|_| None).collect();
        // Real inputs first: the labels of the other inputs are made from them.
        for (k, &(v, kind)) in graph.inputs.iter().enumerate() {
            if kind == InputKind::Real {
                out[k] = Some(Tensor::f_randn(shape_of(v), (Kind::Float, device))?);
            }
        }
        let first_real = graph.inputs.iter().position(|&(_, kind)| kind == InputKind::Real);
        let source = first_real.and_then(|k| out[k].as_ref().map(Tensor::shallow_clone));
        // The first channel of the first real input (`[B, C, ...]`), shaped like a label
        // map; noise where the shapes do not line up.
        let channel0 = |shape: &[i64]| -> Result<Tensor, tch::TchError> {
            if let Some(x) = source.as_ref().filter(|x| x.dim() >= 2) {
                let c = x.f_narrow(1, 0, 1)?;
                if c.numel() as i64 == shape.iter().product::<i64>() {
                    // A copy: the labels are changed in place and must not touch the input.
                    let out = Tensor::f_empty(shape, (Kind::Float, device))?;
                    out.f_view(c.size().as_slice())?.f_copy_(&c)?;
                    return Ok(out);
                }
            }
            Tensor::f_randn(shape, (Kind::Float, device))
        };
        // Which of `classes` equal-probability buckets each value falls in, in place.
        let bucket = |mut x: Tensor, classes: u64| -> Result<Tensor, tch::TchError> {
            let c = classes.max(1) as f64;
            let _ = x.f_sigmoid_()?.f_mul_scalar_(c)?.f_floor_()?.f_clamp_(0.0, c - 1.0)?;
            Ok(x)
        };
        for (k, &(v, kind)) in graph.inputs.iter().enumerate() {
            let shape = shape_of(v);
            out[k] = Some(match kind {
                InputKind::Real => continue,
                InputKind::Tokens { vocab } => {
                    let vocab = i64::try_from(vocab).unwrap_or(2).max(1);
                    let t = *shape.last().unwrap_or(&1);
                    let start = Tensor::f_randint(vocab, [b, 1], (Kind::Int64, device))?;
                    let steps = Tensor::f_arange(t, (Kind::Int64, device))?;
                    let mut tokens = start.f_add(&steps)?;
                    drop((start, steps));
                    let _ = tokens.f_remainder_(vocab)?;
                    tokens.f_reshape(shape.as_slice())?
                }
                // CLIP's labels: each image matches the caption at its own position.
                InputKind::ClassIndex { .. } if matches!(graph.task, Task::Contrastive) => {
                    Tensor::f_arange(b, (Kind::Int64, device))?
                }
                InputKind::ClassIndex { classes } if shape.len() == 1 => {
                    let n = i64::try_from(classes).unwrap_or(2).max(1);
                    let y = Tensor::f_randint(n, [b], (Kind::Int64, device))?;
                    if let Some(x) = &source {
                        add_class_signal(x, &y, classes)?;
                    }
                    y
                }
                InputKind::ClassIndex { classes } => {
                    let mut with_channel = shape.clone();
                    with_channel.insert(1, 1);
                    bucket(channel0(&with_channel)?, classes)?.f_to_kind(Kind::Int64)?.f_reshape(shape.as_slice())?
                }
                InputKind::ClassMap { classes } => bucket(channel0(&shape)?, classes)?,
                // A 2-D binary mask (W2's retinal vessels): thin curving lines across the
                // image, drawn on the host, and the image brighter along them (+2), so that
                // the mask is learnable and as sparse as vessels are.
                InputKind::Mask if shape.len() == 4 => {
                    let dims = |k: usize| usize::try_from(shape[k]).unwrap_or(1);
                    let seed = Tensor::f_randint(i64::MAX, [1], (Kind::Int64, Device::Cpu))?.f_int64_value(&[0])?;
                    let host = data::vessels(dims(0), dims(2), dims(3), seed as u64);
                    let m = Tensor::f_from_slice(&host)?.f_view(shape.as_slice())?;
                    drop(host);
                    let m = if device == Device::Cpu { m } else { m.f_to_device(device)? };
                    if let Some(x) = source.as_ref().filter(|x| x.size().len() == 4 && x.size()[2..] == shape[2..]) {
                        let x0 = x.f_narrow(1, 0, 1)?;
                        let _ = x0.shallow_clone().f_add_(&m)?;
                        let _ = x0.shallow_clone().f_add_(&m)?;
                    }
                    m
                }
                InputKind::Mask => {
                    let mut m = channel0(&shape)?;
                    let _ = m.f_gt_(0.0)?;
                    m
                }
            });
        }
        out.into_iter().map(|t| t.ok_or_else(|| tch::TchError::Shape("an input was not made".to_owned()))).collect()
    })
}

/// Adds +2 to the stretch of each sample's flattened input that belongs to its class, in
/// place (no temporaries: the loop's peak stays the model's).
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
        let _ = flat.f_select(0, row as i64)?.f_narrow(0, start, len)?.f_add_scalar_(2.0)?;
    }
    Ok(())
}

/// What the training loop keeps bound between statements, as Python keeps its
/// variables: the batch, the model's outputs and the loss, each until rebound.
#[derive(Default)]
struct Held {
    batch: Vec<Tensor>,
    returned: Vec<Tensor>,
    loss: Option<Tensor>,
}

/// `torch.nn.utils.clip_grad_norm_`: the global L2 norm of every gradient, and each
/// scaled in place by `max_norm / (norm + 1e-6)` when that is below 1. The factor is
/// read on the host (one synchronisation) rather than kept as a device tensor.
fn clip_grad_norm(net: &model::Net, max_norm: f64) -> Result<(), TrainError> {
    let grads: Vec<Tensor> = net.trainable().map(Tensor::grad).filter(Tensor::defined).collect();
    let norms = grads.iter().map(|g| g.f_norm()).collect::<Result<Vec<_>, _>>()?;
    if norms.is_empty() {
        return Ok(());
    }
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?;
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for g in &grads {
            let _ = g.shallow_clone().f_mul_scalar_(coef)?;
        }
    }
    Ok(())
}

/// The plan's optimizer as libtorch implements it, over the model's trainable weights.
fn make_optimizer(plan: &Plan, net: &model::Net) -> Result<ffi::Optim, TrainError> {
    let params: Vec<&Tensor> = net.trainable().collect();
    let (kind, weight_decay) = match plan.optimizer {
        Optimizer::Sgd { momentum, weight_decay, nesterov } => {
            (ffi::OptimKind::Sgd { momentum, nesterov }, weight_decay)
        }
        Optimizer::AdamW { beta1, beta2, eps, weight_decay } => {
            (ffi::OptimKind::AdamW { beta1, beta2, eps }, weight_decay)
        }
        Optimizer::Adam { beta1, beta2, eps, weight_decay } => {
            (ffi::OptimKind::Adam { beta1, beta2, eps }, weight_decay)
        }
    };
    ffi::Optim::new(kind, plan.learning_rate, weight_decay, &params).map_err(torch)
}

/// Turns the shim's error text into a `TrainError` (out-of-memory recognised).
fn torch(e: String) -> TrainError {
    TrainError::from(tch::TchError::Torch(e))
}

/// The seed of step `step`'s data and dropout: every step's randomness depends on the
/// plan's seed and the step alone, so a run resumed from a checkpoint continues exactly
/// as the uninterrupted one would have.
fn step_seed(seed: u64, step: u64) -> i64 {
    let mix = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mix >> 2) as i64
}

/// The surface term's distance map (`graph::SurfaceTerm`): the labels copied to host
/// memory, one signed distance map per sample and foreground class made there
/// (`crate::distance`), then copied to the device, laid out `[B, classes - 1, ...]` (one
/// channel for a one-channel model). Returns the map and the host bytes it took at its
/// peak.
fn surface_map(graph: &Graph, label: &Tensor, device: Device) -> Result<(Tensor, u64), tch::TchError> {
    let Some(t) = &graph.surface else {
        return Err(tch::TchError::Shape("the graph has no surface term".to_owned()));
    };
    let logits = &graph.values[t.logits].shape;
    let map_shape = graph.values[t.map].shape.clone();
    let (batch, classes) = (logits[0] as usize, logits[1] as usize);
    let spatial: Vec<usize> = logits[2..].iter().map(|&d| d as usize).collect();
    let voxels: usize = spatial.iter().product();
    let channels = map_shape[1] as usize;
    let labels = Vec::<f32>::try_from(&label.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?)?;
    if labels.len() != batch * voxels {
        return Err(tch::TchError::Shape(format!(
            "surface term: {} labels for {batch} samples of {voxels} voxels",
            labels.len()
        )));
    }
    let mut map = vec![0f32; batch * channels * voxels];
    let mut working = 0u64;
    for s in 0..batch {
        let sample = &labels[s * voxels..(s + 1) * voxels];
        for c in 0..channels {
            // A one-channel model's region is its mask; otherwise class c + 1's voxels.
            let region: Vec<bool> = if classes == 1 {
                sample.iter().map(|&v| v > 0.5).collect()
            } else {
                sample.iter().map(|&v| v.round() as usize == c + 1).collect()
            };
            let (d, bytes) = crate::distance::signed_distance(&region, &spatial);
            working = working.max(bytes);
            let at = (s * channels + c) * voxels;
            map[at..at + voxels].copy_from_slice(&d);
        }
    }
    let host = (labels.len() + map.len()) as u64 * 4 + working;
    let dims: Vec<i64> = map_shape.iter().map(|&d| d as i64).collect();
    let tensor = Tensor::f_from_slice(&map)?.f_view(dims.as_slice())?.f_to_device(device)?;
    Ok((tensor, host))
}

/// What one validation pass measured.
struct Validated {
    loss: f64,
    peak: u64,
    reserved_peak: Option<u64>,
}

/// The validation pass: `model.eval()` and `torch.no_grad()`, then per batch `vb =
/// next(val_loader)`, `out = model(vb.x)`, `loss = loss_fn(out, vb.y)`, as the loop
/// writes it. The training loop's own variables stay bound meanwhile; the pass's go when
/// it returns.
fn validate(
    net: &model::Net,
    batches: u64,
    data: Option<&data::Dataset>,
    seed: u64,
    device: Device,
    meter: Meter,
    stop: &AtomicBool,
) -> Result<Validated, TrainError> {
    meter.reset_peak();
    let mut total = 0.0;
    tch::no_grad(|| -> Result<(), TrainError> {
        let mut held = Held::default();
        let mut order: data::Order = None;
        for k in 0..batches {
            if stop.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            // The same validation samples every pass, in order from the first.
            held.batch = match data {
                Some(d) => {
                    let b = net.graph.micro_batch();
                    to_tensors(d.batch(k * b, b as usize, seed, &mut order)?, device)?
                }
                None => make_batch(&net.graph, device)?,
            };
            let mut previous = std::mem::take(&mut held.returned);
            let mut moment = |m: model::Moment| {
                if let model::Moment::Returned = m {
                    previous.clear();
                }
            };
            // SAFETY: the validation model has no checkpointed regions, so nothing calls
            // back into it after `forward` returns; `net` outlives `held`.
            let model::Forward { returned, loss, .. } = unsafe { net.forward(&held.batch, &mut moment, None)? };
            drop(previous);
            total += loss.f_double_value(&[])?;
            held.loss = Some(loss);
            held.returned = returned;
        }
        Ok(())
    })?;
    if let Meter::Cuda(index) = meter {
        tch::Cuda::synchronize(i64::from(index));
    }
    let reading = meter.read();
    Ok(Validated { loss: total / batches.max(1) as f64, peak: reading.peak, reserved_peak: reading.reserved_peak })
}

/// libtorch's default CPU thread count on this machine (`torch.get_num_threads()`).
pub fn machine_threads() -> u64 {
    u64::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
}

/// The plan as this agent's trainer runs it, which is what its measurements are compared
/// with: the trainer's runtime (libtorch's optimizers, reentrant checkpoints) and this
/// machine's CPU threads where the plan names none.
pub fn as_run_here(plan: &Plan) -> Plan {
    let mut p = plan.clone();
    p.runtime = Runtime::Headroom;
    // libtorch updates one parameter at a time; there is no foreach or fused path.
    p.optimizer_impl = OptimizerImpl::Auto;
    p.cpu_threads.get_or_insert_with(machine_threads);
    p
}

/// Runs `plan` to completion, calling `on_record` after every micro-batch.
///
/// The loop is PyTorch's canonical one: per step `zero_grad(set_to_none=True)`, then per
/// micro-batch `batch = next(loader)`, `out = model(x)`, `loss = loss_fn(out, y) /
/// accumulation`, `loss.backward()`, and `optimizer.step()` after the last.
///
/// The CPU counting allocator must already be installed (the worker does it first thing)
/// for CPU figures to be exact.
pub fn train(
    plan: &Plan,
    job: JobId,
    files: &JobFiles,
    stop: &AtomicBool,
    mut on_record: impl FnMut(BatchRecord),
    mut on_event: impl FnMut(u64, shared::protocol::JobEvent),
) -> Result<Summary, TrainError> {
    let graph = plan.validate().map_err(|e| TrainError::InvalidPlan(e.to_string()))?;
    // The checkpoint to continue from, read before anything is built: it says which
    // micro-batch the run had reached (an OOM fallback may have halved it).
    let resume = match &files.resume {
        Some(path) => {
            let dir = checkpoint::locate(path)?;
            let state = checkpoint::read_state(&dir, plan.model_name())?;
            if state.step >= plan.total_steps() {
                return Err(TrainError::Checkpoint(format!(
                    "{}: was saved after step {}; the plan runs {} steps, so there is nothing left to run",
                    dir.display(),
                    state.step,
                    plan.total_steps()
                )));
            }
            if state.micro_batch.checked_mul(state.accumulation) != Some(plan.micro_batch * plan.accumulation) {
                return Err(TrainError::Checkpoint(format!(
                    "{}: was saved with an effective batch of {} x {}; this plan's is {} x {}",
                    dir.display(),
                    state.micro_batch,
                    state.accumulation,
                    plan.micro_batch,
                    plan.accumulation
                )));
            }
            // libtorch's optimizer state carries its options: a resumed plan must name
            // the same optimizer, or its own options would be silently replaced.
            let optimizer = format!("{:?}", plan.optimizer);
            if state.optimizer != optimizer {
                return Err(TrainError::Checkpoint(format!(
                    "{}: was saved with optimizer {}; this plan's is {optimizer}",
                    dir.display(),
                    state.optimizer
                )));
            }
            Some((dir, state))
        }
        None => None,
    };
    if plan.checkpoint_every > 0 && files.checkpoint_dir.is_none() {
        return Err(TrainError::InvalidPlan(
            "checkpoint_every needs a checkpoint directory on the agent (headroom run --checkpoint-dir DIR)".to_owned(),
        ));
    }
    // Data on disk is listed and every file's header checked before anything trains.
    let train_data = open_data(files, "data", &plan.data, &plan.data_labels, &graph)?;
    // The validation pass's graph: the same model at its own micro-batch.
    let val_graph =
        plan.validation_plan().map(|p| p.validate().map_err(|e| TrainError::InvalidPlan(e.to_string()))).transpose()?;
    let val_data = match (&train_data, &val_graph) {
        (Some(d), Some(_)) if plan.val_data.is_empty() => Some(Arc::clone(d)),
        (Some(_), Some(vg)) => open_data(files, "val_data", &plan.val_data, "", vg)?,
        _ => None,
    };
    let (device, meter) = resolve_device(plan.device)?;
    if device == Device::Cpu {
        ffi::set_onednn(plan.onednn);
        if let Some(n) = plan.cpu_threads {
            tch::set_num_threads(i32::try_from(n).unwrap_or(i32::MAX));
        }
    }
    if let Meter::Cuda(index) = meter
        && (plan.memory_limit_bytes.is_some() || plan.memory_fraction.is_some())
    {
        // The caching allocator exists only once CUDA is initialised: make one tensor.
        let _ = Tensor::f_zeros([1], (Kind::Float, device))?;
        let total = memory::nvml_devices().get(index as usize).map(|d| d.1).ok_or_else(|| {
            TrainError::Device(format!("a memory cap needs the size of cuda:{index}, and NVML cannot tell it"))
        })?;
        // The tighter of the two caps, as one allocator fraction.
        let mut capped = plan.clone();
        capped.resolve_memory_fraction(total);
        let limit = capped.memory_limit_bytes.unwrap_or(total);
        if !meter.set_memory_fraction((limit as f64 / total as f64).min(1.0)) {
            return Err(TrainError::Device(format!("could not cap cuda:{index} at {limit} bytes")));
        }
    }
    let nvml_index = match meter {
        Meter::Cuda(i) => u32::try_from(i).ok(),
        Meter::Cpu => None,
    };
    tch::manual_seed(i64::try_from(plan.seed % (1 << 62)).unwrap_or(0));
    let started = Instant::now();

    let autocast = match plan.precision {
        Precision::Fp32 => None,
        Precision::Fp16 => Some(model::Autocast { cuda: device != Device::Cpu, bf16: false }),
        Precision::Bf16 => Some(model::Autocast { cuda: device != Device::Cpu, bf16: true }),
    };
    // The micro-batch and accumulation in force: `oom_fallback` may halve and double them.
    let mut cur = plan.clone();
    if let Some((_, state)) = &resume {
        cur.micro_batch = state.micro_batch;
        cur.accumulation = state.accumulation;
    }
    let mut cur_graph = cur.validate().map_err(|e| TrainError::InvalidPlan(e.to_string()))?;
    let mut net = model::Net::new(cur_graph.clone(), device, autocast, plan.checkpoint(), plan.seed)?;
    // A TorchScript model: its module, from under the data root, runs the graph's
    // `Op::Script` node; its parameters are the ones trained.
    let script = match &plan.model {
        shared::plan::ModelSpec::Zoo { name, settings } if name == shared::zoo::SCRIPT => {
            let file = settings.get("file").map(|f| f.trim()).unwrap_or_default();
            let root = files.data_root.as_deref().ok_or_else(|| {
                TrainError::Data(format!("file={file} needs a data root on the agent (headroom run --data-root DIR)"))
            })?;
            let path = data::confine(root, file)?;
            let (s, params) = model::Script::load(&path, device)?;
            net.params = params;
            net.script = Some(s.clone());
            Some(s)
        }
        _ => None,
    };
    let mut opt = make_optimizer(plan, &net)?;
    // The validation model: the same weights, in eval mode, at its own micro-batch.
    let val_net = match val_graph {
        Some(g) => {
            let mut v = model::Net::new(g, device, autocast, shared::graph::Checkpoint::Off, plan.seed)?;
            v.training = false;
            v.params = net.params.iter().map(Tensor::shallow_clone).collect();
            v.script = script.clone();
            Some(v)
        }
        None => None,
    };

    let steps_per_epoch = plan.steps_per_epoch().max(1);
    let mut phases = PhaseMeter { meter, peaks: [0; Phase::ALL.len()], reserved_peak: None };
    let mut first_loss = None;
    let mut final_loss = f64::NAN;
    let mut run_peak = 0u64;
    let mut peak_rss = 0u64;
    let mut micro_batches = 0u64;
    let mut validation_peak: Option<u64> = None;
    let mut held = Held::default();
    // Step-end allocated memory, watched for a sustained rise; the capacity it would hit
    // is the plan's cap, else the GPU's memory.
    let mut leaks = shared::leak::LeakDetector::default();
    // fp16's dynamic loss scale, as `torch.amp.GradScaler` keeps it: the scale and the
    // clean steps since it last changed.
    let mut scaler = (plan.precision == Precision::Fp16).then_some((plan.loss_scale, 0u64));
    let capacity = plan
        .memory_limit_bytes
        .or_else(|| nvml_index.and_then(|i| memory::nvml_devices().get(i as usize).map(|d| d.1)));
    // The leak demonstration's keepsakes (`retain_bytes_per_step`).
    let mut retained: Vec<Tensor> = Vec::new();

    let mut first_step = 1;
    if let Some((dir, state)) = &resume {
        checkpoint::load_weights(dir, net.param_names(), &net.params)?;
        checkpoint::load_optimizer(dir, &mut opt)?;
        if let (Some(s), Some(saved)) = (scaler.as_mut(), state.loss_scale) {
            *s = saved;
        }
        net.set_passes(state.passes);
        micro_batches = state.micro_batches;
        first_loss = state.first_loss;
        first_step = state.step + 1;
        on_event(state.step, shared::protocol::JobEvent::Resumed { path: dir.display().to_string() });
    }
    drop(graph);
    // The loader's position is in samples: step `s` starts at `(s - 1) x` the effective
    // batch, whatever micro-batch is in force.
    let effective = plan.micro_batch * plan.accumulation;
    // The host memory guard: room for two more batches and 8 MiB, else the loader is
    // lowered; lowered to nothing and still short, the job stops. Loader workers also
    // wait before making a batch there is no room for, counting the batches other
    // workers are still making.
    let batch_bytes = shared::estimate::host::batch_bytes(&cur_graph);
    let reserve = 2 * batch_bytes + (8 << 20);
    let host_limit = plan.host_memory_limit_bytes;
    // Between steps the resident set is short of the step's own peak (on the CPU the
    // step's tensors are host memory too) by this much, measured over the last step
    // (`VmHWM`), which must stay free for the next one.
    // Before the first step has been measured, the estimate says how far a CPU step's
    // tensors rise above what is resident between steps.
    let first_swing = if device == Device::Cpu && (train_data.is_some() || plan.host.workers > 0) {
        shared::estimate::estimate_graph(
            &as_run_here(plan),
            &cur_graph,
            shared::estimate::Target::Cpu,
            shared::estimate::Options::default(),
            None,
        )
        .map_or(0, |e| e.peak_bytes.get().saturating_sub(e.steady_bytes.get()))
    } else {
        0
    };
    let swing = Arc::new(std::sync::atomic::AtomicU64::new(first_swing));
    // With loader workers and no files, the workers make synthetic batches on the host.
    let source = |graph: &Graph| -> Option<Arc<data::Dataset>> {
        match &train_data {
            Some(d) => Some(Arc::clone(d)),
            None if plan.host.workers > 0 => Some(Arc::new(data::Dataset::synthetic(graph))),
            None => None,
        }
    };
    let start_loader = |micro_batch: u64, step: u64, graph: &Graph| {
        source(graph).map(|d| {
            let swing = Arc::clone(&swing);
            let room: data::Room = Box::new(move |making| {
                let room = memory::host_headroom(memory::host_rss_bytes(), swing.load(Ordering::Relaxed), host_limit);
                room.bytes >= reserve + batch_bytes.saturating_mul(making + 1)
            });
            data::Loader::new(
                d,
                micro_batch as usize,
                plan.seed,
                (step - 1) * effective,
                plan.host.workers as usize,
                plan.host.prefetch_factor as usize,
                room,
            )
        })
    };
    let mut loader = start_loader(cur.micro_batch, first_step, &cur_graph);
    let mut guard_cooldown = 0u64;
    for step in first_step..=plan.total_steps() {
        tch::manual_seed(step_seed(plan.seed, step));
        loop {
            let attempt = (|| -> Result<(), TrainError> {
                phases.peaks = [0; Phase::ALL.len()];
                // The step's own host peak is measured from here.
                let rss_window = loader.is_some() && memory::reset_peak_rss();
                opt.zero_grad().map_err(torch)?;
                for micro_batch in 1..=cur.accumulation {
                    if stop.load(Ordering::Relaxed) {
                        return Err(TrainError::Cancelled);
                    }
                    let t0 = Instant::now();
                    phases.begin(Phase::Forward);
                    // batch = next(loader): the new batch exists before the old one goes.
                    let batch = match loader.as_mut() {
                        Some(l) => to_tensors(l.take()?, device)?,
                        None => make_batch(&cur_graph, device)?,
                    };
                    held.batch = batch;
                    // The meter's phase windows: the forward ends where the loss begins, the loss
                    // where backward begins.
                    let mut batch_peak = 0u64;
                    let mut returned_prev = std::mem::take(&mut held.returned);
                    let mut moment = |m: model::Moment| match m {
                        model::Moment::Loss => {
                            batch_peak = batch_peak.max(phases.end(Phase::Forward));
                            phases.begin(Phase::Loss);
                        }
                        // `out = model(x)` rebinds `out`: the previous outputs go.
                        model::Moment::Returned => returned_prev.clear(),
                    };
                    // W4's surface term on every k-th step: its map made on the CPU from the
                    // labels as the term begins (`loss = loss + w * surface(probs, dist)`).
                    let with_surface = cur_graph.surface.is_some()
                        && plan.host.distance_loss_every > 0
                        && step.is_multiple_of(plan.host.distance_loss_every);
                    let label = cur_graph.inputs.iter().position(|&(_, k)| k != InputKind::Real);
                    let mut surface_cost = (0u64, std::time::Duration::ZERO);
                    let mut make_map = |_: &[Option<Tensor>]| -> Result<Tensor, tch::TchError> {
                        let t = Instant::now();
                        let label = label.and_then(|k| held.batch.get(k)).ok_or_else(|| {
                            tch::TchError::Shape("the surface term needs the batch's labels".to_owned())
                        })?;
                        let (map, bytes) = surface_map(&cur_graph, label, device)?;
                        surface_cost = (bytes, t.elapsed());
                        Ok(map)
                    };
                    let surface: Option<model::SurfaceMap<'_>> = if with_surface { Some(&mut make_map) } else { None };
                    // SAFETY: `held` (declared after `net`, so dropped first) is the only keeper of
                    // the graph's tensors, and `net` does not move while training runs.
                    let model::Forward { returned, loss, surface: term } =
                        unsafe { net.forward(&held.batch, &mut moment, surface)? };
                    if let Some(value) = term {
                        let (host_bytes, took) = surface_cost;
                        on_event(
                            step,
                            shared::protocol::JobEvent::SurfaceTerm {
                                value,
                                host_bytes,
                                micro_seconds: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                            },
                        );
                    }
                    drop(returned_prev);
                    // `loss = loss_fn(out, y) / accumulation`: the quotient is what the loop keeps.
                    let loss = if cur.accumulation > 1 { loss.f_div_scalar(cur.accumulation as f64)? } else { loss };
                    // loss = ...: the previous loss goes, the new one is bound.
                    held.loss = Some(loss);
                    held.returned = returned;
                    batch_peak = batch_peak.max(phases.end(Phase::Loss));
                    phases.begin(Phase::Backward);
                    if let Some(loss) = &held.loss {
                        match scaler {
                            // scaler.scale(loss).backward(): the product lives through it.
                            Some((scale, _)) => loss.f_mul_scalar(scale)?.f_backward()?,
                            None => loss.f_backward()?,
                        }
                    }
                    batch_peak = batch_peak.max(phases.end(Phase::Backward));
                    let loss_value =
                        held.loss.as_ref().map_or(Ok(f64::NAN), |l| l.f_double_value(&[]))? * cur.accumulation as f64;
                    let learning_rate = plan.learning_rate_at(step);
                    if micro_batch == cur.accumulation {
                        phases.begin(Phase::OptimizerStep);
                        // scaler.unscale_(optimizer): gradients divided by the scale and
                        // checked for inf and NaN (through each one's sum, one at a time).
                        let mut skip = false;
                        if let Some((scale, clean)) = scaler.as_mut() {
                            let inv = 1.0 / *scale;
                            let mut found_inf = false;
                            for g in net.trainable().map(Tensor::grad).filter(Tensor::defined) {
                                let _ = g.shallow_clone().f_mul_scalar_(inv)?;
                                found_inf = found_inf || !g.f_sum(Kind::Float)?.f_double_value(&[])?.is_finite();
                            }
                            if found_inf {
                                // The step is skipped and the scale backs off.
                                *scale *= 0.5;
                                *clean = 0;
                                skip = true;
                                on_event(step, shared::protocol::JobEvent::LossScaleSkip { scale: *scale });
                            } else {
                                *clean += 1;
                                if *clean >= plan.loss_scale_growth_interval {
                                    *scale *= 2.0;
                                    *clean = 0;
                                }
                            }
                        }
                        if !skip {
                            if let Some(max_norm) = plan.clip_grad_norm {
                                clip_grad_norm(&net, max_norm)?;
                            }
                            opt.set_learning_rate(learning_rate).map_err(torch)?;
                            opt.step().map_err(torch)?;
                        }
                        batch_peak = batch_peak.max(phases.end(Phase::OptimizerStep));
                        if plan.retain_bytes_per_step > 0 {
                            let n = i64::try_from(plan.retain_bytes_per_step.div_ceil(4)).unwrap_or(i64::MAX);
                            retained.push(Tensor::f_zeros([n], (Kind::Float, device))?);
                        }
                    }
                    if let Meter::Cuda(index) = meter {
                        tch::Cuda::synchronize(i64::from(index));
                    }
                    let elapsed = t0.elapsed().as_secs_f64();
                    let reading = meter.read();
                    if micro_batch == cur.accumulation
                        && let Some(w) = leaks.push(step, reading.allocated, steps_per_epoch, capacity)
                    {
                        on_event(step, shared::protocol::JobEvent::LeakSuspected(w));
                    }
                    run_peak = run_peak.max(batch_peak);
                    let mut rss = memory::host_rss_bytes();
                    if micro_batch == cur.accumulation
                        && let Some(hwm) = memory::peak_rss_bytes().filter(|_| rss_window)
                    {
                        swing.store(hwm.saturating_sub(rss), Ordering::Relaxed);
                    }
                    let ahead = swing.load(Ordering::Relaxed);
                    let mut room = memory::host_headroom(rss, ahead, plan.host_memory_limit_bytes);
                    guard_cooldown = guard_cooldown.saturating_sub(1);
                    if room.bytes < reserve && guard_cooldown == 0 {
                        // What the allocator merely caches does not count: give it back first.
                        rss = memory::trim_host_memory();
                        room = memory::host_headroom(rss, ahead, plan.host_memory_limit_bytes);
                    }
                    if room.bytes < reserve && guard_cooldown == 0 {
                        match loader.as_ref().and_then(data::Loader::reduce) {
                            Some((workers, prefetch)) => {
                                // Workers already wait for room before each batch; give the
                                // lower setting a batch to show its effect.
                                guard_cooldown = 2;
                                on_event(
                                    step,
                                    shared::protocol::JobEvent::HostMemoryLow {
                                        workers: workers as u64,
                                        prefetch: prefetch as u64,
                                        rss_bytes: rss,
                                        headroom_bytes: room.bytes,
                                        bound: room.bound.to_owned(),
                                    },
                                );
                            }
                            None => {
                                return Err(TrainError::HostMemory(format!(
                                    "stopped at step {step}: the worker holds {} (with {} more at the step's peak) and {} leaves {} ({} needed for the next batches); {}",
                                    shared::Bytes(rss),
                                    shared::Bytes(ahead),
                                    room.bound,
                                    shared::Bytes(room.bytes),
                                    shared::Bytes(reserve),
                                    if loader.is_some() {
                                        "the loader is already at 0 workers"
                                    } else {
                                        "there is no loader to lower"
                                    }
                                )));
                            }
                        }
                    }
                    // The kernel's high-water mark also sees the peaks between samples.
                    peak_rss = peak_rss.max(rss).max(memory::peak_rss_bytes().unwrap_or(0));
                    micro_batches += 1;
                    // empty_cache() every N micro-batches and at each epoch's end, timed.
                    let epoch_end = micro_batch == cur.accumulation && step % steps_per_epoch == 0;
                    if plan.empty_cache_every > 0 && (micro_batches.is_multiple_of(plan.empty_cache_every) || epoch_end)
                    {
                        let before = meter.read().reserved.unwrap_or(0);
                        let t = Instant::now();
                        meter.empty_cache();
                        let micro_seconds = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                        let released_bytes = before.saturating_sub(meter.read().reserved.unwrap_or(0));
                        on_event(step, shared::protocol::JobEvent::CacheEmptied { released_bytes, micro_seconds });
                    }
                    first_loss.get_or_insert(loss_value);
                    final_loss = loss_value;
                    on_record(BatchRecord {
                        job,
                        step,
                        epoch: (step - 1) / steps_per_epoch + 1,
                        micro_batch,
                        loss: loss_value,
                        allocated_bytes: reading.allocated,
                        peak_bytes: batch_peak,
                        reserved_bytes: reading.reserved,
                        device_used_bytes: nvml_index.and_then(memory::nvml_used_bytes),
                        host_rss_bytes: rss,
                        step_time_ms: elapsed * 1e3,
                        samples_per_sec: cur.micro_batch as f64 / elapsed.max(1e-9),
                        learning_rate,
                    });
                }

                Ok(())
            })();
            match attempt {
                Ok(()) => break,
                Err(TrainError::OutOfMemory(message))
                    if cur.oom_fallback && cur.micro_batch >= 2 && cur.micro_batch.is_multiple_of(2) =>
                {
                    // Free the step: the loop's references, the gradients, the cache.
                    held = Held::default();
                    opt.zero_grad().map_err(torch)?;
                    meter.empty_cache();
                    let allocated_bytes = meter.read().allocated;
                    cur.micro_batch /= 2;
                    cur.accumulation *= 2;
                    cur_graph = cur.validate().map_err(|e| TrainError::InvalidPlan(e.to_string()))?;
                    // The same weights (shared, so the optimizer keeps its state) in a
                    // model built for the smaller micro-batch.
                    let mut smaller =
                        model::Net::new(cur_graph.clone(), device, autocast, plan.checkpoint(), plan.seed)?;
                    smaller.params = net.params.iter().map(Tensor::shallow_clone).collect();
                    smaller.set_passes(net.passes());
                    smaller.script = script.clone();
                    // The step is redone from its first sample at the new micro-batch.
                    drop(loader.take());
                    loader = start_loader(cur.micro_batch, step, &cur_graph);
                    net = smaller;
                    on_event(
                        step,
                        shared::protocol::JobEvent::OomRecovered {
                            micro_batch: cur.micro_batch,
                            accumulation: cur.accumulation,
                            allocated_bytes,
                            message,
                        },
                    );
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(v) = &val_net
            && plan.validates_after(step)
        {
            let t = Instant::now();
            let r = validate(v, plan.val_batches, val_data.as_deref(), plan.seed, device, meter, stop)?;
            if let Some(rp) = r.reserved_peak {
                phases.reserved_peak = Some(phases.reserved_peak.unwrap_or(0).max(rp));
            }
            validation_peak = Some(validation_peak.unwrap_or(0).max(r.peak));
            run_peak = run_peak.max(r.peak);
            on_event(
                step,
                shared::protocol::JobEvent::Validation {
                    batches: plan.val_batches,
                    micro_batch: v.graph.micro_batch(),
                    loss: r.loss,
                    peak_bytes: r.peak,
                    micro_seconds: u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
                },
            );
        }
        if let Some(root) = &files.checkpoint_dir
            && plan.checkpoints_after(step)
        {
            let t = Instant::now();
            let state = checkpoint::State {
                format: checkpoint::FORMAT,
                model: plan.model_name().to_owned(),
                optimizer: format!("{:?}", plan.optimizer),
                step,
                micro_batch: cur.micro_batch,
                accumulation: cur.accumulation,
                loss_scale: scaler,
                passes: net.passes(),
                micro_batches,
                first_loss,
            };
            let (dir, bytes) = checkpoint::save(root, net.param_names(), &net.params, &opt, &state)?;
            on_event(
                step,
                shared::protocol::JobEvent::CheckpointSaved {
                    path: dir.display().to_string(),
                    bytes,
                    micro_seconds: u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
                },
            );
        }
    }
    // The loop's last references go before the `Net` whose checkpoints they may hold.
    drop(loader);
    drop(retained);
    drop(held);
    drop(val_net);
    drop(net);
    Ok(Summary {
        steps: plan.total_steps(),
        micro_batches,
        first_loss: first_loss.unwrap_or(f64::NAN),
        final_loss,
        peak_bytes: run_peak,
        // Filled in by the agent's job runner, which holds the estimate.
        estimated_peak_bytes: 0,
        peak_reserved_bytes: phases.reserved_peak,
        peak_host_rss_bytes: peak_rss,
        wall_time_ms: started.elapsed().as_secs_f64() * 1e3,
        dropped_records: 0,
        phase_peaks: Phase::ALL
            .iter()
            .filter_map(|&p| match p {
                Phase::Validation => validation_peak.map(|v| (p, v)),
                _ => Some((p, phases.peaks[p.index()])),
            })
            .collect(),
    })
}
