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
use shared::graph::{Graph, InputKind, Task};
use shared::plan::{DeviceChoice, Optimizer, Plan, Precision};
use shared::protocol::{BatchRecord, ErrorCode, JobError, JobId, Summary};
use tch::{COptimizer, Device, Kind, Tensor};
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

/// The synthetic data of a graph's task (see `shared::estimate::batch` for the memory).
struct Data {
    device: Device,
    prototypes: Option<Tensor>,
}

/// One micro-batch: the graph's inputs and the labels its loss needs.
struct Batch {
    inputs: Vec<Tensor>,
    labels: Option<Tensor>,
}

impl Data {
    fn new(graph: &Graph, device: Device) -> Result<Data, tch::TchError> {
        let prototypes = match graph.task {
            Task::Classify { classes } => {
                let p = i64::try_from(shared::estimate::batch_prototype_features(graph)).unwrap_or(1);
                Some(Tensor::f_randn([i64::try_from(classes).unwrap_or(1), p], (Kind::Float, device))?)
            }
            _ => None,
        };
        Ok(Data { device, prototypes })
    }

    fn batch(&self, graph: &Graph) -> Result<Batch, tch::TchError> {
        tch::no_grad(|| {
            let b = i64::try_from(graph.micro_batch()).unwrap_or(1);
            let mut labels = None;
            if let Task::Classify { classes } = graph.task {
                labels = Some(Tensor::f_randint(i64::try_from(classes).unwrap_or(2), [b], (Kind::Int64, self.device))?);
            }
            let mut inputs = Vec::new();
            for &(v, kind) in &graph.inputs {
                let shape: Vec<i64> = graph.values[v].shape.iter().map(|&d| i64::try_from(d).unwrap_or(1)).collect();
                inputs.push(match kind {
                    InputKind::Real => Tensor::f_randn(&shape, (Kind::Float, self.device))?,
                    InputKind::Tokens { vocab } => {
                        Tensor::f_randint(i64::try_from(vocab).unwrap_or(2), &shape, (Kind::Int64, self.device))?
                    }
                });
            }
            match graph.task {
                Task::Classify { .. } => {
                    if let (Some(p), Some(y)) = (&self.prototypes, &labels) {
                        let width = p.size()[1];
                        let _ = inputs[0].f_view([b, -1])?.f_narrow(1, 0, width)?.f_add_(&p.f_index_select(0, y)?)?;
                    }
                }
                Task::Segment { .. } => {
                    labels = Some(inputs[0].f_select(1, 0)?.f_gt(0.0)?.f_to_kind(Kind::Int64)?);
                }
                Task::LanguageModel { .. } => {}
                Task::Contrastive => labels = Some(Tensor::f_arange(b, (Kind::Int64, self.device))?),
            }
            Ok(Batch { inputs, labels })
        })
    }
}

/// The task's loss on the graph's outputs.
fn task_loss(
    graph: &Graph,
    net: &model::Net,
    batch_tokens: Option<&Tensor>,
    labels: Option<&Tensor>,
    outputs: &[Tensor],
) -> Result<Tensor, tch::TchError> {
    let missing = || tch::TchError::Shape("the loss is missing its labels".to_owned());
    match graph.task {
        Task::Classify { .. } => outputs[0].f_log_softmax(-1, None::<Kind>)?.f_nll_loss(
            labels.ok_or_else(missing)?,
            None::<Tensor>,
            tch::Reduction::Mean,
            -100,
        ),
        Task::Segment { .. } => outputs[0].f_log_softmax(1, None::<Kind>)?.f_nll_loss_nd(
            labels.ok_or_else(missing)?,
            None::<Tensor>,
            tch::Reduction::Mean,
            -100,
        ),
        Task::LanguageModel { vocab } => {
            let tokens = batch_tokens.ok_or_else(missing)?;
            let v = i64::try_from(vocab).unwrap_or(1);
            outputs[0].f_view([-1, v])?.f_log_softmax(-1, None::<Kind>)?.f_nll_loss(
                &tokens.f_view([-1])?,
                None::<Tensor>,
                tch::Reduction::Mean,
                -100,
            )
        }
        Task::Contrastive => {
            let labels = labels.ok_or_else(missing)?;
            let scale = net.params.last().ok_or_else(missing)?.f_exp()?;
            let logits = outputs[0].f_mm(&outputs[1].f_tr()?)?.f_mul(&scale)?;
            let a = logits.f_log_softmax(-1, None::<Kind>)?.f_nll_loss(
                labels,
                None::<Tensor>,
                tch::Reduction::Mean,
                -100,
            )?;
            let b = logits.f_tr()?.f_log_softmax(-1, None::<Kind>)?.f_nll_loss(
                labels,
                None::<Tensor>,
                tch::Reduction::Mean,
                -100,
            )?;
            a.f_add(&b)?.f_div_scalar(2.0)
        }
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
    if device == Device::Cpu {
        model::use_native_cpu_convolutions();
    }
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
    if let (Meter::Cuda(index), Some(fraction)) = (meter, plan.memory_fraction) {
        let _ = Tensor::f_zeros([1], (Kind::Float, device))?;
        if !meter.set_memory_fraction(fraction) {
            return Err(TrainError::Device(format!("could not cap cuda:{index} at a fraction of {fraction}")));
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
    let net = model::Net::new(graph.clone(), device, autocast, plan.checkpoint_segments, plan.seed)?;
    let mut opt = match plan.optimizer {
        Optimizer::Sgd { momentum, weight_decay } => {
            COptimizer::sgd(plan.learning_rate, momentum, 0.0, weight_decay, false)?
        }
        Optimizer::AdamW { beta1, beta2, eps, weight_decay } => {
            COptimizer::adamw(plan.learning_rate, beta1, beta2, weight_decay, eps, false)?
        }
        Optimizer::Adam { beta1, beta2, eps, weight_decay } => {
            COptimizer::adam(plan.learning_rate, beta1, beta2, weight_decay, eps, false)?
        }
    };
    for var in net.trainable() {
        opt.add_parameters(var, 0)?;
    }
    let data = Data::new(&graph, device)?;

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
            let batch = data.batch(&graph)?;
            let tokens = match graph.task {
                Task::LanguageModel { .. } => batch.inputs.first().map(Tensor::shallow_clone),
                _ => None,
            };
            let labels = batch.labels;
            // The meter's phase windows: the forward ends where the loss begins, the loss
            // where backward begins.
            let mut batch_peak = 0u64;
            let mut mark = |next: Phase| {
                let previous = match next {
                    Phase::Loss => Phase::Forward,
                    _ => Phase::Loss,
                };
                batch_peak = batch_peak.max(phases.end(previous));
                phases.begin(next);
            };
            let loss_value = net.step(
                batch.inputs,
                &|outputs: &[Tensor]| task_loss(&graph, &net, tokens.as_ref(), labels.as_ref(), outputs),
                plan.accumulation,
                &mut mark,
            )?;
            batch_peak = batch_peak.max(phases.end(Phase::Backward));
            drop((tokens, labels));
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
