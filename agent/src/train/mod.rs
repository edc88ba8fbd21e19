//! The trainer: the only module that names `tch`. It runs a plan's training loop on
//! synthetic data and reports every micro-batch's loss and memory.
//!
//! Runs off the async runtime (in the worker process); a stop flag is checked once per
//! micro-batch.

pub mod memory;
mod model;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use shared::estimate::Phase;
use shared::plan::{DeviceChoice, Optimizer, Plan};
use shared::protocol::{BatchRecord, ErrorCode, JobError, JobId, Summary};
use tch::{COptimizer, Device, Kind, Tensor, nn};
use thiserror::Error;

use memory::Meter;

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
}

impl TrainError {
    pub fn to_wire(&self) -> JobError {
        let code = match self {
            TrainError::Cancelled => ErrorCode::Cancelled,
            TrainError::OutOfMemory(_) => ErrorCode::OutOfMemory,
            TrainError::Torch(_) | TrainError::Device(_) => ErrorCode::Torch,
            TrainError::InvalidPlan(_) => ErrorCode::InvalidPlan,
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

/// Runs `plan` to completion, calling `on_record` after every micro-batch.
///
/// The CPU counting allocator must already be installed (the worker does it first thing)
/// for CPU figures to be exact.
pub fn train(
    plan: &Plan,
    job: JobId,
    stop: &AtomicBool,
    mut on_record: impl FnMut(BatchRecord),
) -> Result<Summary, TrainError> {
    let graph = plan.validate().map_err(|e| TrainError::InvalidPlan(e.to_string()))?;
    let (device, meter) = resolve_device(plan.device)?;
    if let (Meter::Cuda(index), Some(limit)) = (meter, plan.memory_limit_bytes) {
        // The caching allocator exists only once CUDA is initialised: make one tensor.
        let _ = Tensor::f_zeros([1], (Kind::Float, device))?;
        let total = memory::nvml_devices().get(index as usize).map(|d| d.1).ok_or_else(|| {
            TrainError::Device(format!("memory_limit_bytes needs the size of cuda:{index}, and NVML cannot tell it"))
        })?;
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

    let vs = nn::VarStore::new(device);
    let net = model::Net::new(&vs.root(), &graph)?;
    let mut opt = match plan.optimizer {
        Optimizer::Sgd { momentum, weight_decay } => {
            COptimizer::sgd(plan.learning_rate, momentum, 0.0, weight_decay, false)?
        }
        Optimizer::AdamW { beta1, beta2, eps, weight_decay } => {
            COptimizer::adamw(plan.learning_rate, beta1, beta2, weight_decay, eps, false)?
        }
    };
    for var in vs.trainable_variables() {
        opt.add_parameters(&var, 0)?;
    }

    // The synthetic data: one random prototype per class; a sample is its class's
    // prototype plus standard-normal noise, so every architecture can learn it.
    let in_features = i64::try_from(shared::graph::numel(&graph.input)).unwrap_or(i64::MAX);
    let classes = i64::try_from(plan.classes).unwrap_or(i64::MAX);
    let prototypes = Tensor::f_randn([classes, in_features], (Kind::Float, device))?;
    let micro = i64::try_from(plan.micro_batch).unwrap_or(i64::MAX);
    let mut input_dims = vec![micro];
    input_dims.extend(graph.input.iter().map(|&d| i64::try_from(d).unwrap_or(i64::MAX)));

    let steps_per_epoch = plan.steps_per_epoch().max(1);
    let mut phases = PhaseMeter { meter, peaks: [0; Phase::ALL.len()], reserved_peak: None };
    let mut first_loss = None;
    let mut final_loss = f64::NAN;
    let mut run_peak = 0u64;
    let mut peak_rss = 0u64;
    let mut micro_batches = 0u64;

    for step in 1..=plan.total_steps() {
        phases.peaks = [0; Phase::ALL.len()];
        for micro_batch in 1..=plan.accumulation {
            if stop.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            let t0 = Instant::now();
            phases.begin(Phase::Forward);
            let (x, y) = tch::no_grad(|| -> Result<(Tensor, Tensor), tch::TchError> {
                let y = Tensor::f_randint(classes, [micro], (Kind::Int64, device))?;
                let x = Tensor::f_randn(&input_dims, (Kind::Float, device))?;
                let _ = x.f_view([micro, in_features])?.f_add_(&prototypes.f_index_select(0, &y)?)?;
                Ok((x, y))
            })?;
            let logits = net.forward(&x)?;
            let mut batch_peak = phases.end(Phase::Forward);
            phases.begin(Phase::Loss);
            let loss = model::cross_entropy(&logits, &y)?;
            drop(logits);
            let scaled =
                if plan.accumulation > 1 { loss.f_div_scalar(plan.accumulation as f64)? } else { loss.shallow_clone() };
            batch_peak = batch_peak.max(phases.end(Phase::Loss));
            phases.begin(Phase::Backward);
            scaled.f_backward()?;
            batch_peak = batch_peak.max(phases.end(Phase::Backward));
            let loss_value = loss.f_double_value(&[])?;
            drop((scaled, loss, x, y));
            if micro_batch == plan.accumulation {
                phases.begin(Phase::OptimizerStep);
                opt.step()?;
                opt.zero_grad()?;
                batch_peak = batch_peak.max(phases.end(Phase::OptimizerStep));
            }
            if let Meter::Cuda(index) = meter {
                tch::Cuda::synchronize(i64::from(index));
            }
            let elapsed = t0.elapsed().as_secs_f64();
            let reading = meter.read();
            let rss = memory::host_rss_bytes();
            run_peak = run_peak.max(batch_peak);
            peak_rss = peak_rss.max(rss);
            micro_batches += 1;
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
                samples_per_sec: plan.micro_batch as f64 / elapsed.max(1e-9),
            });
        }
    }
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
        phase_peaks: Phase::ALL.iter().map(|&p| (p, phases.peaks[p.index()])).collect(),
    })
}
