//! The training loop as a type: [`Trainer::new`] sets a job up (its checkpoint, data,
//! device, models and optimizer), [`Trainer::run`] runs its steps, and each part of a step
//! — a micro-batch, the optimizer step, the out-of-memory fallback, validation,
//! checkpoints, the summary — is a method over the run's state in fields.
//!
//! The loop is PyTorch's canonical one: per step `zero_grad(set_to_none=True)`, then per
//! micro-batch `batch = next(loader)`, `out = model(x)`, `loss = loss_fn(out, y) /
//! accumulation`, `loss.backward()`, and `optimizer.step()` after the last. It runs off
//! the async runtime (in the worker process) and checks a stop flag once per micro-batch.

mod parts;
mod resume;
mod surface;
mod validation;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shared::estimate::Phase;
use shared::graph::{Graph, InputKind};
use shared::machine::{Machine, RunsOn};
use shared::plan::{DeviceChoice, Optimizer, Plan, Precision};
use shared::protocol::{BatchRecord, JobEvent, JobId, Summary};
use system::job::JobFiles;
use tch::{Device, Kind, Tensor};

use crate::error::TrainError;
use crate::memory::Meter;
use crate::model::{self, Net};
use crate::{checkpoint, data, ffi};

use parts::{Counters, HostGuard, LossScaler, PhaseMeter};
use resume::Resume;

/// Where a running job's records and events go.
pub trait Report {
    /// After every micro-batch.
    fn record(&mut self, record: BatchRecord);
    /// Whatever else happened, at step `step`.
    fn event(&mut self, step: u64, event: JobEvent);
}

/// This machine as libtorch sees it from this process: what `worker --probe` reports to
/// the agent, so that the agent and the worker resolve a plan alike. It asks the CUDA
/// driver: a job bound for the CPU never calls it (see [`runs_on`]).
pub fn machine() -> Machine {
    let cuda_devices = if tch::Cuda::is_available() { tch::Cuda::device_count() } else { 0 };
    Machine {
        cuda_devices: u32::try_from(cuda_devices).unwrap_or(0),
        cpu_threads: cpu_threads(),
        cpu_isa: system::host::cpu_isa(),
    }
}

/// libtorch's CPU thread count in this process (`torch.get_num_threads()`).
fn cpu_threads() -> u64 {
    u64::try_from(tch::get_num_threads()).unwrap_or(1).max(1)
}

/// Where `choice` runs, by the one rule; `cpu` without touching CUDA, so that a CPU job
/// never loads the driver (its host memory is measured).
pub fn runs_on(choice: DeviceChoice) -> Result<RunsOn, shared::machine::NoSuchDevice> {
    match choice {
        DeviceChoice::Cpu => Ok(RunsOn::Cpu),
        other => machine().runs_on(other),
    }
}

/// Resolves the plan's device choice to what this process can use.
fn resolve_device(choice: DeviceChoice) -> Result<(Device, Meter), TrainError> {
    match runs_on(choice).map_err(|e| TrainError::Device(e.to_string()))? {
        RunsOn::Cpu => Ok((Device::Cpu, Meter::Cpu)),
        RunsOn::Cuda(i) => Ok((Device::Cuda(i as usize), Meter::Cuda(i32::try_from(i).unwrap_or(i32::MAX)))),
    }
}

/// What the training loop keeps bound between statements, as Python keeps its
/// variables: the batch, the model's outputs and the loss, each until rebound.
#[derive(Default)]
struct Held {
    batch: Vec<Tensor>,
    returned: Vec<Tensor>,
    loss: Option<Tensor>,
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

/// `torch.nn.utils.clip_grad_norm_`: the global L2 norm of every gradient, and each
/// scaled in place by `max_norm / (norm + 1e-6)` when that is below 1. The factor is
/// read on the host (one synchronisation) rather than kept as a device tensor.
fn clip_grad_norm(net: &Net, max_norm: f64) -> Result<(), TrainError> {
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
fn make_optimizer(plan: &Plan, net: &Net) -> Result<ffi::Optim, TrainError> {
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
    ffi::Optim::new(kind, plan.learning_rate, weight_decay, &params).map_err(TrainError::from_shim)
}

/// The seed of step `step`'s data and dropout: every step's randomness depends on the
/// plan's seed and the step alone, so a run resumed from a checkpoint continues exactly
/// as the uninterrupted one would have.
fn step_seed(seed: u64, step: u64) -> i64 {
    let mix = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mix >> 2) as i64
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One job's training run. Fields drop in declaration order: the loop's references (the
/// loader's batches, the keepsakes, the bound batch, outputs and loss) go before the
/// models whose checkpointed regions their autograd graphs may call back into.
pub struct Trainer<'a> {
    held: Held,
    /// The leak demonstration's keepsakes (`retain_bytes_per_step`).
    retained: Vec<Tensor>,
    loader: Option<data::Loader>,
    opt: ffi::Optim,
    /// The validation model: the same weights, in eval mode, at its own micro-batch.
    val_net: Option<Box<Net>>,
    /// Boxed: a checkpointed region's autograd Function holds its address.
    net: Box<Net>,

    plan: &'a Plan,
    job: JobId,
    files: &'a JobFiles,
    stop: &'a AtomicBool,
    report: &'a mut dyn Report,

    /// The micro-batch and accumulation in force (`oom_fallback` may halve and double
    /// them), and the graph at that micro-batch.
    cur: Plan,
    cur_graph: Graph,
    train_data: Option<Arc<data::Dataset>>,
    val_data: Option<Arc<data::Dataset>>,
    device: Device,
    nvml_index: Option<u32>,
    phases: PhaseMeter,
    counters: Counters,
    scaler: Option<LossScaler>,
    /// Step-end allocated memory, watched for a sustained rise; the capacity it would
    /// hit is the plan's cap, else the GPU's memory.
    leaks: shared::leak::LeakDetector,
    capacity: Option<u64>,
    guard: HostGuard,
    first_step: u64,
    started: Instant,
}

impl<'a> Trainer<'a> {
    /// Sets `plan` up as job `job`: checks the checkpoint to resume from and the data on
    /// disk before anything is built, picks the device and its caps, builds the models and
    /// the optimizer (loading the checkpoint's state) and starts the loader.
    ///
    /// The CPU counting allocator must already be installed (the worker does it first
    /// thing) for CPU figures to be exact.
    pub fn new(
        plan: &'a Plan,
        job: JobId,
        files: &'a JobFiles,
        stop: &'a AtomicBool,
        report: &'a mut dyn Report,
    ) -> Result<Trainer<'a>, TrainError> {
        let graph = plan.validate().map_err(TrainError::plan)?;
        let resume = files.resume.as_deref().map(|path| Resume::read(path, plan)).transpose()?;
        if plan.checkpoint_every > 0 && files.checkpoint_dir.is_none() {
            return Err(TrainError::InvalidPlan(
                "checkpoint_every needs a checkpoint directory on the agent (headroom run --checkpoint-dir DIR)"
                    .to_owned(),
            ));
        }
        // Data on disk is listed and every file's header checked before anything trains.
        let train_data = open_data(files, "data", &plan.data, &plan.data_labels, &graph)?;
        // The validation pass's graph: the same model at its own micro-batch.
        let val_graph = plan.validation_plan().map(|p| p.validate().map_err(TrainError::plan)).transpose()?;
        let val_data = match (&train_data, &val_graph) {
            (Some(d), Some(_)) if plan.val_data.is_empty() => Some(Arc::clone(d)),
            (Some(_), Some(vg)) => open_data(files, "val_data", &plan.val_data, "", vg)?,
            _ => None,
        };
        let (device, meter) = Self::open_device(plan)?;
        tch::manual_seed(i64::try_from(plan.seed % (1 << 62)).unwrap_or(0));
        let started = Instant::now();

        let autocast = match plan.precision {
            Precision::Fp32 => None,
            Precision::Fp16 => Some(model::Autocast { cuda: device != Device::Cpu, bf16: false }),
            Precision::Bf16 => Some(model::Autocast { cuda: device != Device::Cpu, bf16: true }),
        };
        let mut cur = plan.clone();
        if let Some(r) = &resume {
            cur.micro_batch = r.state.micro_batch;
            cur.accumulation = r.state.accumulation;
        }
        let cur_graph = cur.validate().map_err(TrainError::plan)?;
        let mut net = Box::new(Net::new(cur_graph.clone(), device, autocast, plan.checkpoint(), plan.seed)?);
        Self::load_script(plan, files, device, &mut net)?;
        Self::load_file_weights(plan, files, &net)?;
        let mut opt = make_optimizer(plan, &net)?;
        let val_net = val_graph.map(|g| {
            let mut v = Box::new(net.sharing(g, shared::graph::Checkpoint::Off));
            v.training = false;
            v
        });
        let nvml_index = match meter {
            Meter::Cuda(i) => u32::try_from(i).ok(),
            Meter::Cpu => None,
        };
        // The caps against the GPU's own memory, or the plan's limit (on the CPU).
        let gpu_bytes = nvml_index.and_then(|i| system::nvml::devices().get(i as usize).map(|d| d.1));
        let capacity = gpu_bytes.map(|t| plan.memory_cap(t).unwrap_or(t)).or(plan.memory_limit_bytes);
        let mut scaler = (plan.precision == Precision::Fp16)
            .then(|| LossScaler::new(plan.loss_scale, plan.loss_scale_growth_interval));
        let mut counters = Counters::default();
        let mut first_step = 1;
        if let Some(Resume { dir, state }) = &resume {
            checkpoint::load_weights(dir, net.param_names(), &net.params)?;
            checkpoint::load_optimizer(dir, &mut opt)?;
            if let (Some(s), Some((scale, clean))) = (scaler.as_mut(), state.loss_scale) {
                (s.scale, s.clean) = (scale, clean);
            }
            net.set_passes(state.passes);
            counters.micro_batches = state.micro_batches;
            counters.first_loss = state.first_loss;
            first_step = state.step + 1;
            report.event(state.step, JobEvent::Resumed { path: dir.display().to_string() });
        }
        drop(graph);
        let guard = HostGuard::new(
            shared::estimate::host::batch_bytes(&cur_graph),
            plan.host_memory_limit_bytes,
            Self::first_swing(plan, &cur_graph, device, train_data.is_some()),
        );
        let mut trainer = Trainer {
            held: Held::default(),
            retained: Vec::new(),
            loader: None,
            val_net,
            net,
            opt,
            plan,
            job,
            files,
            stop,
            report,
            cur,
            cur_graph,
            train_data,
            val_data,
            device,
            nvml_index,
            phases: PhaseMeter::new(meter),
            counters,
            scaler,
            leaks: shared::leak::LeakDetector::default(),
            capacity,
            guard,
            first_step,
            started,
        };
        trainer.loader = trainer.start_loader(first_step);
        Ok(trainer)
    }

    /// The device and its settings: oneDNN and threads on the CPU; on CUDA, the tighter
    /// of the plan's memory caps as one allocator fraction.
    fn open_device(plan: &Plan) -> Result<(Device, Meter), TrainError> {
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
            let total = system::nvml::devices().get(index as usize).map(|d| d.1).ok_or_else(|| {
                TrainError::Device(format!("a memory cap needs the size of cuda:{index}, and NVML cannot tell it"))
            })?;
            let limit = plan.memory_cap(total).unwrap_or(total);
            if !meter.set_memory_fraction((limit as f64 / total as f64).min(1.0)) {
                return Err(TrainError::Device(format!("could not cap cuda:{index} at {limit} bytes")));
            }
        }
        Ok((device, meter))
    }

    /// A TorchScript model: its module, from under the data root, runs the graph's
    /// `Op::Script` node; its parameters are the ones trained. Every `Net` made from
    /// this one with `Net::sharing` shares it.
    fn load_script(plan: &Plan, files: &JobFiles, device: Device, net: &mut Net) -> Result<(), TrainError> {
        let settings = &plan.model.settings;
        if plan.model.name != shared::zoo::SCRIPT {
            return Ok(());
        }
        let file = settings.get("file").map(|f| f.trim()).unwrap_or_default();
        let root = files.data_root.as_deref().ok_or_else(|| {
            TrainError::Data(format!("file={file} needs a data root on the agent (headroom run --data-root DIR)"))
        })?;
        let path = data::confine(root, file)?;
        let (s, params) = model::Script::load(&path, device)?;
        net.params = params;
        net.script = Some(s);
        Ok(())
    }

    /// An exported model's own weights (`init=file`): each parameter, buffer and constant
    /// read from its entry of the `.pt2` (raw little-endian storage, viewed as the file's
    /// configuration says) and copied into the net's tensor of the same name. The file is
    /// the one the local user named, or the plan's path under the agent's data root.
    fn load_file_weights(plan: &Plan, files: &JobFiles, net: &Net) -> Result<(), TrainError> {
        use shared::import::weights;
        let Some(file) = &plan.model.file else { return Ok(()) };
        if plan.init == shared::plan::WeightsInit::Random {
            return Ok(());
        }
        let path = match (&files.weights, &files.data_root) {
            (Some(p), _) => p.clone(),
            (None, Some(root)) => data::confine(root, &file.path)?,
            (None, None) => {
                return Err(TrainError::Data(format!(
                    "init=file needs {}: an agent reads model files under its --data-root (or set init=random)",
                    file.path
                )));
            }
        };
        let bad = |e: system::pt2::Pt2Error| TrainError::Data(format!("init=file: {e}"));
        let mut archive = system::pt2::Archive::open(&path).map_err(bad)?;
        if let Some(order) = archive.find("byteorder").map_err(bad)? {
            let text = archive.read(&order, 16).map_err(bad)?;
            if text.trim_ascii() != b"little" {
                return Err(TrainError::Data(format!("init=file: {} stores big-endian weights", path.display())));
            }
        }
        let mut stored = Vec::new();
        for (config, folder) in
            [(weights::WEIGHTS_CONFIG, "data/weights"), (weights::CONSTANTS_CONFIG, "data/constants")]
        {
            if let Some(entry) = archive.find(config).map_err(bad)? {
                let text = archive.read(&entry, weights::MAX_CONFIG_BYTES).map_err(bad)?;
                stored.extend(
                    weights::read(&text, folder)
                        .map_err(|e| TrainError::Data(format!("init=file: {}: {e}", path.display())))?,
                );
            }
        }
        let names = net.param_names();
        let mut loaded = vec![false; names.len()];
        for s in &stored {
            let Some(i) = names.iter().position(|n| *n == s.fqn) else { continue };
            let (kind, esize) = match s.dtype {
                7 => (Kind::Float, 4),
                5 => (Kind::Int64, 8),
                12 => (Kind::Bool, 1),
                other => {
                    return Err(TrainError::Data(format!(
                        "init=file: {} is {}",
                        s.fqn,
                        shared::import::program::dtype_name(other)
                    )));
                }
            };
            let entry = archive
                .find(&s.entry)
                .map_err(bad)?
                .ok_or_else(|| TrainError::Data(format!("init=file: {} has no entry {}", s.fqn, s.entry)))?;
            let need =
                s.reach(esize).ok_or_else(|| TrainError::Data(format!("init=file: {}: sizes overflow", s.fqn)))?;
            // The storage holds at least what the view reaches, and (a view of a larger
            // buffer aside) not more: at most `STORAGE_SLACK` times it, checked before a
            // byte is read, so a weight cannot make the trainer inflate more than that.
            const STORAGE_SLACK: u64 = 4;
            if entry.size < need || entry.size > need.max(esize).saturating_mul(STORAGE_SLACK) {
                return Err(TrainError::Data(format!(
                    "init=file: {} reaches {need} bytes of storage, its entry holds {} (at most {STORAGE_SLACK} times that is read)",
                    s.fqn, entry.size
                )));
            }
            let dims = |v: &[u64]| v.iter().map(|&d| i64::try_from(d).unwrap_or(i64::MAX)).collect::<Vec<_>>();
            let target = &net.params[i];
            if target.size() != dims(&s.sizes) || target.kind() != kind {
                return Err(TrainError::Data(format!(
                    "init=file: {} is {:?} {:?} in the file, {:?} {:?} in the graph",
                    s.fqn,
                    s.sizes,
                    kind,
                    target.size(),
                    target.kind()
                )));
            }
            let bytes = archive.read(&entry, entry.size).map_err(bad)?;
            let storage = Tensor::f_from_data_size(&bytes, &[(bytes.len() / esize as usize) as i64], kind)?;
            let view = storage.f_as_strided(dims(&s.sizes), dims(&s.strides), i64::try_from(s.offset).ok())?;
            tch::no_grad(|| target.shallow_clone().f_copy_(&view))?;
            loaded[i] = true;
        }
        // Every trainable parameter must come from the file; a buffer it lacks (a
        // non-persistent one) keeps its fresh value.
        let missing: Vec<&str> = net
            .graph
            .params
            .iter()
            .zip(&loaded)
            .filter(|(p, l)| p.trainable && !**l)
            .map(|(p, _)| p.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(TrainError::Data(format!(
                "init=file: {} has no weights for {} parameter(s): {} (set init=random to train from fresh weights)",
                path.display(),
                missing.len(),
                missing.iter().take(5).copied().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(())
    }

    /// Before the first step has been measured, the estimate says how far a CPU step's
    /// tensors rise above what is resident between steps (the host guard keeps that free).
    fn first_swing(plan: &Plan, graph: &Graph, device: Device, has_files: bool) -> u64 {
        if device != Device::Cpu || !(has_files || plan.host.workers > 0) {
            return 0;
        }
        // Only the threads matter here; the machine's CUDA devices are not asked.
        let here = Machine { cuda_devices: 0, cpu_threads: cpu_threads(), cpu_isa: system::host::cpu_isa() };
        shared::estimate::estimate_graph(
            &here.as_run_here(plan),
            graph,
            shared::estimate::Target::Cpu,
            shared::estimate::Options::default(),
            None,
        )
        .map_or(0, |e| e.peak_bytes.get().saturating_sub(e.steady_bytes.get()))
    }

    /// The loader for the micro-batch in force, from step `step`'s first sample: the
    /// data set, or synthetic batches when there are workers and no files; `None` makes
    /// each batch on the device as it is needed.
    fn start_loader(&self, step: u64) -> Option<data::Loader> {
        let dataset = match &self.train_data {
            Some(d) => Arc::clone(d),
            None if self.plan.host.workers > 0 => Arc::new(data::Dataset::synthetic(&self.cur_graph)),
            None => return None,
        };
        // The loader's position is in samples: step `s` starts at `(s - 1) x` the
        // effective batch, whatever micro-batch is in force.
        let effective = self.plan.micro_batch * self.plan.accumulation;
        Some(data::Loader::new(
            dataset,
            self.cur.micro_batch as usize,
            self.plan.seed,
            (step - 1) * effective,
            self.plan.host.workers as usize,
            self.plan.host.prefetch_factor as usize,
            self.guard.room(),
        ))
    }

    /// Runs every step left, then the summary.
    pub fn run(mut self) -> Result<Summary, TrainError> {
        for step in self.first_step..=self.plan.total_steps() {
            self.step(step)?;
            if self.plan.validates_after(step) {
                self.validate(step)?;
            }
            if self.plan.checkpoints_after(step) {
                self.save_checkpoint(step)?;
            }
        }
        Ok(self.finish())
    }

    /// One optimizer step; out of memory with `oom_fallback`, redone from its first
    /// sample at half the micro-batch.
    fn step(&mut self, step: u64) -> Result<(), TrainError> {
        tch::manual_seed(step_seed(self.plan.seed, step));
        loop {
            match self.try_step(step) {
                Ok(()) => return Ok(()),
                Err(TrainError::OutOfMemory(message))
                    if self.cur.oom_fallback && self.cur.micro_batch >= 2 && self.cur.micro_batch.is_multiple_of(2) =>
                {
                    self.halve_micro_batch(step, message)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_step(&mut self, step: u64) -> Result<(), TrainError> {
        self.phases.peaks = [0; Phase::ALL.len()];
        // The step's own host peak is measured from here.
        let rss_window = self.loader.is_some() && system::host::reset_peak_rss();
        self.opt.zero_grad().map_err(TrainError::from_shim)?;
        for micro_batch in 1..=self.cur.accumulation {
            if self.stop.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            self.micro_batch(step, micro_batch, rss_window)?;
        }
        Ok(())
    }

    /// One micro-batch: forward, loss, backward, the optimizer step after the last, then
    /// the host memory guard, `empty_cache` when due and the record.
    fn micro_batch(&mut self, step: u64, micro_batch: u64, rss_window: bool) -> Result<(), TrainError> {
        let t0 = Instant::now();
        let last = micro_batch == self.cur.accumulation;
        let (loss_value, mut batch_peak) = self.forward_backward(step)?;
        let learning_rate = self.plan.learning_rate_at(step);
        if last {
            self.phases.begin(Phase::OptimizerStep);
            self.optimizer_step(step, learning_rate)?;
            batch_peak = batch_peak.max(self.phases.end(Phase::OptimizerStep));
            // The leak demonstration's keepsake, after the step's peak window.
            if self.plan.retain_bytes_per_step > 0 {
                let n = i64::try_from(self.plan.retain_bytes_per_step.div_ceil(4)).unwrap_or(i64::MAX);
                self.retained.push(Tensor::f_zeros([n], (Kind::Float, self.device))?);
            }
        }
        let meter = self.phases.meter;
        if let Meter::Cuda(index) = meter {
            tch::Cuda::synchronize(i64::from(index));
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let reading = meter.read();
        if last && let Some(w) = self.leaks.push(step, reading.allocated, self.steps_per_epoch(), self.capacity) {
            self.report.event(step, JobEvent::LeakSuspected(w));
        }
        self.counters.run_peak = self.counters.run_peak.max(batch_peak);
        let (rss, lowered) = self.guard.check(step, last, rss_window, self.loader.as_ref())?;
        if let Some(event) = lowered {
            self.report.event(step, event);
        }
        // The kernel's high-water mark also sees the peaks between samples.
        self.counters.peak_rss = self.counters.peak_rss.max(rss).max(system::host::peak_rss_bytes().unwrap_or(0));
        self.counters.micro_batches += 1;
        self.empty_cache_if_due(step, last);
        self.counters.loss(loss_value);
        self.report.record(BatchRecord {
            job: self.job,
            step,
            epoch: (step - 1) / self.steps_per_epoch() + 1,
            micro_batch,
            loss: loss_value,
            allocated_bytes: reading.allocated,
            peak_bytes: batch_peak,
            reserved_bytes: reading.reserved,
            device_used_bytes: self.nvml_index.and_then(system::nvml::used_bytes),
            host_rss_bytes: rss,
            step_time_ms: elapsed * 1e3,
            samples_per_sec: self.cur.micro_batch as f64 / elapsed.max(1e-9),
            learning_rate,
        });
        Ok(())
    }

    /// `batch = next(loader)`, `out = model(x)`, `loss = loss_fn(out, y) / accumulation`
    /// (or only the loss kept, as the plan's `outputs` says), `loss.backward()` (scaled
    /// with fp16), each phase in its own peak window. Returns
    /// the micro-batch's loss (undivided) and its peak so far.
    fn forward_backward(&mut self, step: u64) -> Result<(f64, u64), TrainError> {
        let Trainer { held, loader, net, phases, cur, cur_graph, plan, device, report, scaler, .. } = self;
        let device = *device;
        phases.begin(Phase::Forward);
        // batch = next(loader): the new batch exists before the old one goes.
        let batch = match loader.as_mut() {
            Some(l) => to_tensors(l.take()?, device)?,
            None => crate::synthetic::make_batch(cur_graph, device)?,
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
        // W4's surface term on every k-th step: its map made on the CPU from the labels
        // as the term begins (`loss = loss + w * surface(probs, dist)`).
        let with_surface = cur_graph.surface.is_some()
            && plan.host.distance_loss_every > 0
            && step.is_multiple_of(plan.host.distance_loss_every);
        let label = cur_graph.inputs.iter().position(|&(_, k)| k != InputKind::Real);
        let mut surface_cost = (0u64, Duration::ZERO);
        let batch = &held.batch;
        let graph = &*cur_graph;
        let mut make_map = |_: &[Option<Tensor>]| -> Result<Tensor, tch::TchError> {
            let t = Instant::now();
            let label = label
                .and_then(|k| batch.get(k))
                .ok_or_else(|| tch::TchError::Shape("the surface term needs the batch's labels".to_owned()))?;
            let (map, bytes) = surface::surface_map(graph, label, device)?;
            surface_cost = (bytes, t.elapsed());
            Ok(map)
        };
        let surface: Option<model::SurfaceMap<'_>> = if with_surface { Some(&mut make_map) } else { None };
        // SAFETY: `held` (a field before `net`, so dropped first) is the only keeper of
        // the graph's tensors, and the boxed `net` does not move while training runs.
        let model::Forward { returned, loss, surface: term } = unsafe { net.forward(batch, &mut moment, surface)? };
        if let Some(value) = term {
            let (host_bytes, took) = surface_cost;
            report.event(step, JobEvent::SurfaceTerm { value, host_bytes, micro_seconds: micros(took) });
        }
        drop(returned_prev);
        // `loss = loss_fn(out, y) / accumulation`: the quotient is what the loop keeps.
        let loss = if cur.accumulation > 1 { loss.f_div_scalar(cur.accumulation as f64)? } else { loss };
        // loss = ...: the previous loss goes, the new one is bound; the outputs too, or,
        // as `loss = model(**batch).loss` does, they go here, before backward.
        held.loss = Some(loss);
        if plan.keeps_outputs(graph) {
            held.returned = returned;
        } else {
            drop(returned);
        }
        batch_peak = batch_peak.max(phases.end(Phase::Loss));
        phases.begin(Phase::Backward);
        if let Some(loss) = &held.loss {
            match scaler {
                // scaler.scale(loss).backward(): the product lives through it.
                Some(s) => loss.f_mul_scalar(s.scale)?.f_backward()?,
                None => loss.f_backward()?,
            }
        }
        batch_peak = batch_peak.max(phases.end(Phase::Backward));
        let loss_value = held.loss.as_ref().map_or(Ok(f64::NAN), |l| l.f_double_value(&[]))? * cur.accumulation as f64;
        Ok((loss_value, batch_peak))
    }

    /// `scaler.unscale_` and the scale's update with fp16 (a step with inf or NaN
    /// gradients is skipped), gradient clipping, the learning rate, `optimizer.step()`.
    fn optimizer_step(&mut self, step: u64, learning_rate: f64) -> Result<(), TrainError> {
        let skipped = match self.scaler.as_mut() {
            Some(s) => s.unscale(&self.net)?,
            None => None,
        };
        match skipped {
            Some(scale) => self.report.event(step, JobEvent::LossScaleSkip { scale }),
            None => {
                if let Some(max_norm) = self.plan.clip_grad_norm {
                    clip_grad_norm(&self.net, max_norm)?;
                }
                self.opt.set_learning_rate(learning_rate).map_err(TrainError::from_shim)?;
                self.opt.step().map_err(TrainError::from_shim)?;
            }
        }
        Ok(())
    }

    /// `empty_cache()` every N micro-batches and at each epoch's end, timed.
    fn empty_cache_if_due(&mut self, step: u64, last: bool) {
        let every = self.plan.empty_cache_every;
        let epoch_end = last && step.is_multiple_of(self.steps_per_epoch());
        if every == 0 || !(self.counters.micro_batches.is_multiple_of(every) || epoch_end) {
            return;
        }
        let meter = self.phases.meter;
        let before = meter.read().reserved.unwrap_or(0);
        let t = Instant::now();
        meter.empty_cache();
        let micro_seconds = micros(t.elapsed());
        let released_bytes = before.saturating_sub(meter.read().reserved.unwrap_or(0));
        self.report.event(step, JobEvent::CacheEmptied { released_bytes, micro_seconds });
    }

    /// `oom_fallback`: frees the step (the loop's references, the gradients, the cache),
    /// halves the micro-batch and doubles the accumulation, and builds the model for the
    /// smaller micro-batch around the same weights (shared, so the optimizer keeps its
    /// state) with a loader that starts again at the step's first sample.
    fn halve_micro_batch(&mut self, step: u64, message: String) -> Result<(), TrainError> {
        self.held = Held::default();
        self.opt.zero_grad().map_err(TrainError::from_shim)?;
        let meter = self.phases.meter;
        meter.empty_cache();
        let allocated_bytes = meter.read().allocated;
        self.cur.micro_batch /= 2;
        self.cur.accumulation *= 2;
        self.cur_graph = self.cur.validate().map_err(TrainError::plan)?;
        let smaller = Box::new(self.net.sharing(self.cur_graph.clone(), self.plan.checkpoint()));
        smaller.set_passes(self.net.passes());
        drop(self.loader.take());
        self.loader = self.start_loader(step);
        self.net = smaller;
        self.report.event(
            step,
            JobEvent::OomRecovered {
                micro_batch: self.cur.micro_batch,
                accumulation: self.cur.accumulation,
                allocated_bytes,
                message,
            },
        );
        Ok(())
    }

    /// The validation pass after `step`, when the plan has one.
    fn validate(&mut self, step: u64) -> Result<(), TrainError> {
        let Some(v) = &self.val_net else {
            return Ok(());
        };
        let t = Instant::now();
        let (meter, micro_batch) = (self.phases.meter, v.graph.micro_batch());
        let r = validation::validate(
            v,
            self.plan.val_batches,
            self.val_data.as_deref(),
            self.plan.seed,
            self.device,
            meter,
            self.stop,
        )?;
        self.phases.see_reserved(r.reserved_peak);
        self.counters.validation_peak = Some(self.counters.validation_peak.unwrap_or(0).max(r.peak));
        self.counters.run_peak = self.counters.run_peak.max(r.peak);
        self.report.event(
            step,
            JobEvent::Validation {
                batches: self.plan.val_batches,
                micro_batch,
                loss: r.loss,
                peak_bytes: r.peak,
                micro_seconds: micros(t.elapsed()),
            },
        );
        Ok(())
    }

    /// A `step-N` checkpoint under the agent's checkpoint folder.
    fn save_checkpoint(&mut self, step: u64) -> Result<(), TrainError> {
        let Some(root) = &self.files.checkpoint_dir else {
            return Ok(());
        };
        let t = Instant::now();
        let state = checkpoint::State {
            format: checkpoint::FORMAT,
            model: self.plan.model_name().to_owned(),
            optimizer: format!("{:?}", self.plan.optimizer),
            step,
            micro_batch: self.cur.micro_batch,
            accumulation: self.cur.accumulation,
            loss_scale: self.scaler.map(|s| (s.scale, s.clean)),
            passes: self.net.passes(),
            micro_batches: self.counters.micro_batches,
            first_loss: self.counters.first_loss,
        };
        let (dir, bytes) = checkpoint::save(root, self.net.param_names(), &self.net.params, &self.opt, &state)?;
        self.report.event(
            step,
            JobEvent::CheckpointSaved { path: dir.display().to_string(), bytes, micro_seconds: micros(t.elapsed()) },
        );
        Ok(())
    }

    fn steps_per_epoch(&self) -> u64 {
        self.plan.steps_per_epoch().max(1)
    }

    /// The run's summary; the loop's last references go first (the fields' order).
    fn finish(self) -> Summary {
        let Trainer { held, retained, loader, val_net, net, plan, counters, phases, started, .. } = self;
        // A tuple's elements drop in order.
        drop((loader, retained, held, val_net, net));
        let (steps, reserved, peaks) = (plan.total_steps(), phases.reserved_peak, phases.peaks);
        Summary {
            steps,
            micro_batches: counters.micro_batches,
            first_loss: counters.first_loss.unwrap_or(f64::NAN),
            final_loss: counters.final_loss.unwrap_or(f64::NAN),
            peak_bytes: counters.run_peak,
            // Filled in by the agent's job runner, which holds the estimate.
            estimated_peak_bytes: 0,
            peak_reserved_bytes: reserved,
            peak_host_rss_bytes: counters.peak_rss,
            wall_time_ms: started.elapsed().as_secs_f64() * 1e3,
            dropped_records: 0,
            phase_peaks: Phase::ALL
                .iter()
                .filter_map(|&p| match p {
                    Phase::Validation => counters.validation_peak.map(|v| (p, v)),
                    _ => Some((p, peaks[p.index()])),
                })
                .collect(),
        }
    }
}
