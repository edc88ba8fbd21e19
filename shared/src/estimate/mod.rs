//! The memory estimator: walks one steady-state training step as a timeline of tensor
//! allocations and frees, and reports the peak, the phase where it happens and what is
//! live at that moment.
//!
//! "Steady state" means after a first step has created the optimizer state, which is
//! what `max_memory_allocated()` reports for any later step. The walk follows what
//! libtorch's kernels and autograd do on the CPU (one allocation per kernel output,
//! saved tensors held by their graph nodes, gradients set to `None` by `zero_grad`), so
//! that the exact counting allocator in the agent can validate it.

mod batch;
pub mod cuda;
pub mod host;
mod loss;
mod optimizer;
pub mod sim;
mod walk;

use serde::{Deserialize, Serialize};

use crate::gpus::Gpu;
use crate::graph::numel;
use crate::plan::{Plan, PlanError, Precision};
use crate::units::Bytes;
pub use batch::prototype_features as batch_prototype_features;
pub use host::HostBreakdown;
use sim::Sim;

/// Bytes of one fp32 element.
pub(crate) const F32: u64 = 4;
/// Bytes of one int64 element (labels, token ids, pooling indices).
pub(crate) const I64: u64 = 8;

/// The moments of a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Making the input batch and running the layers.
    Forward,
    Loss,
    Backward,
    OptimizerStep,
}

impl Phase {
    pub const ALL: [Phase; 4] = [Phase::Forward, Phase::Loss, Phase::Backward, Phase::OptimizerStep];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The phase as a JSON key: `forward`, `loss`, `backward`, `optimizer_step`.
    pub fn key(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::OptimizerStep => "optimizer_step",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Loss => "loss",
            Phase::Backward => "backward",
            Phase::OptimizerStep => "optimizer step",
        }
    }
}

/// What a byte of live memory is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    Weights,
    Gradients,
    OptimizerState,
    Activations,
    /// The input batch, its labels and the synthetic data generator's tensors.
    Batch,
    /// Kernel outputs that die within the phase: gradients flowing backward, the loss's
    /// intermediates, optimizer scratch.
    Temporaries,
}

/// Live bytes by category.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Breakdown {
    pub weights: Bytes,
    pub gradients: Bytes,
    pub optimizer_state: Bytes,
    pub activations: Bytes,
    pub batch: Bytes,
    pub temporaries: Bytes,
}

impl Breakdown {
    pub fn total(&self) -> Bytes {
        self.weights + self.gradients + self.optimizer_state + self.activations + self.batch + self.temporaries
    }

    pub fn get_mut(&mut self, category: Category) -> &mut Bytes {
        match category {
            Category::Weights => &mut self.weights,
            Category::Gradients => &mut self.gradients,
            Category::OptimizerState => &mut self.optimizer_state,
            Category::Activations => &mut self.activations,
            Category::Batch => &mut self.batch,
            Category::Temporaries => &mut self.temporaries,
        }
    }

    /// Raises each category to at least `other`'s.
    pub fn max_assign(&mut self, other: &Breakdown) {
        self.weights = self.weights.max(other.weights);
        self.gradients = self.gradients.max(other.gradients);
        self.optimizer_state = self.optimizer_state.max(other.optimizer_state);
        self.activations = self.activations.max(other.activations);
        self.batch = self.batch.max(other.batch);
        self.temporaries = self.temporaries.max(other.temporaries);
    }

    /// Named entries in display order, for tables and JSON.
    pub fn entries(&self) -> [(&'static str, Bytes); 6] {
        [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer_state", self.optimizer_state),
            ("activations", self.activations),
            ("batch", self.batch),
            ("temporaries", self.temporaries),
        ]
    }
}

/// Where the step runs, for the estimator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// The CPU: exact byte counts, no allocator rounding or context.
    Cpu,
    /// A CUDA GPU from the catalog: 512-byte rounding, the caching allocator's segments,
    /// the context and cuBLAS workspace.
    Cuda(&'static Gpu),
}

/// The CUDA-side answer: reserved next to allocated, the whole device's use, the fit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceEstimate {
    pub gpu: String,
    /// The caching allocator's reserved peak (`max_memory_reserved()`).
    pub reserved_peak_bytes: Bytes,
    /// What NVML would show for the process: reserved plus the CUDA context.
    pub device_peak_bytes: Bytes,
    pub context_bytes: Bytes,
    pub cublas_workspace_bytes: Bytes,
    /// The GPU's memory, or the memory-fraction cap when the plan sets one.
    pub capacity_bytes: Bytes,
    pub fits: bool,
    /// `capacity - device_peak` (negative: short by that much).
    pub headroom_bytes: i64,
}

/// The estimator's answer for one plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub params: u64,
    /// Peak of live tensor memory during a steady-state step.
    pub peak_bytes: Bytes,
    pub peak_phase: Phase,
    /// What is live at the peak.
    pub breakdown: Breakdown,
    /// Each category's own maximum during the step (not at one moment): the activation
    /// figure here is meaningful even when the peak falls in the optimizer step.
    pub category_peaks: Breakdown,
    /// Live between steps: weights, optimizer state and the data generator.
    pub steady_bytes: Bytes,
    /// Highest live total within each phase, in `Phase::ALL` order.
    pub phase_peaks: Vec<(Phase, Bytes)>,
    /// Host memory of the training process and its loader workers.
    pub host: HostBreakdown,
    pub host_peak_bytes: Bytes,
    /// Present when estimating for a CUDA GPU.
    pub device: Option<DeviceEstimate>,
}

/// Estimates the peak memory of one steady-state training step of `plan` where it says
/// it runs: the CPU for `cpu`, else (without a GPU named) the CPU rules as well, which are
/// what every device shares.
pub fn estimate(plan: &Plan) -> Result<Estimate, PlanError> {
    estimate_for(plan, Target::Cpu)
}

/// Estimates for a given target.
pub fn estimate_for(plan: &Plan, target: Target) -> Result<Estimate, PlanError> {
    let graph = plan.validate()?;
    let amp = plan.precision != Precision::Fp32;
    if let (Target::Cuda(gpu), Precision::Bf16) = (target, plan.precision)
        && !gpu.supports_bf16()
    {
        return Err(PlanError::Invalid {
            field: "precision",
            reason: format!(
                "{} has no native bf16 (compute capability {}.{}); use fp16",
                gpu.name, gpu.compute_capability.0, gpu.compute_capability.1
            ),
        });
    }
    let mut sim = match target {
        Target::Cpu => Sim::new(),
        Target::Cuda(_) => Sim::cuda(plan.expandable_segments),
    };
    let overheads = match target {
        Target::Cuda(gpu) => Some(cuda::DeviceOverheads::for_compute_capability(gpu.compute_capability.0)),
        Target::Cpu => None,
    };

    // Between steps: weights and buffers, the optimizer's state, the data generator and
    // (CUDA) cuBLAS's workspace, created by the first step and kept.
    let trainable: Vec<u64> = graph.params.iter().filter(|p| p.trainable).map(|p| numel(&p.shape) * F32).collect();
    for p in &graph.params {
        sim.alloc(graph.param_bytes(p), Category::Weights);
    }
    optimizer::persistent_state(&mut sim, &plan.optimizer, &trainable);
    batch::generator_state(&mut sim, &graph);
    if let Some(o) = overheads {
        sim.alloc(o.cublas_workspace_bytes, Category::Temporaries);
    }
    let steady_bytes = sim.live().total();

    // Gradients are `None` at the start of a step (`zero_grad` sets them to None), are
    // created by the first micro-batch's backward and accumulated into by later ones.
    let mut walk = walk::Walk::new(&graph, amp, plan.checkpoint_segments, matches!(target, Target::Cpu));
    let regions = walk.regions().to_vec();
    let micro_batches_to_walk = plan.accumulation.min(2);
    for micro in 0..micro_batches_to_walk {
        walk.start_micro_batch(micro == 0);
        sim.set_phase(Phase::Forward);
        let batch = batch::make_batch(&mut sim, &graph);
        for (&(v, _), &t) in graph.inputs.iter().zip(&batch.inputs) {
            walk.set_input(&mut sim, v, t);
        }
        // The trainer hands the inputs to the model, which lets go of each after its last
        // use; token ids double as a language model's labels and stay.
        let batch = batch.hand_over_inputs(&mut sim, !matches!(graph.task, crate::graph::Task::LanguageModel { .. }));
        let mut held: Vec<Vec<sim::Tensor>> = vec![Vec::new(); regions.len()];
        for (r, (range, ckpt)) in regions.iter().enumerate() {
            if !ckpt && regions.len() > 1 {
                held[r] = walk.hold_inputs(&mut sim, range.clone());
            }
            walk.forward(&mut sim, range.clone(), !ckpt);
            if !ckpt && r + 1 < regions.len() {
                let outputs = walk.hold_outputs(&mut sim, range.clone());
                held[r].extend(outputs);
            }
        }
        sim.set_phase(Phase::Loss);
        let l = loss::forward(&mut sim, &mut walk, &graph, plan.accumulation > 1);
        walk.clear_cast_cache(&mut sim);
        sim.set_phase(Phase::Backward);
        let loss_value = loss::backward(&mut sim, &mut walk, l);
        for (r, (range, ckpt)) in regions.iter().enumerate().rev() {
            // A region's backward starts from the gradients its outputs received, which
            // the trainer passes to one backward call that holds them until it returns
            // (the last region starts from the loss instead).
            let grads =
                if r + 1 < regions.len() { walk.hold_output_grads(&mut sim, range.clone()) } else { Vec::new() };
            if *ckpt {
                // Recompute with saving, then backward through it.
                walk.forward(&mut sim, range.clone(), true);
                walk.clear_cast_cache(&mut sim);
                walk.drop_unwanted_outputs(&mut sim, range.clone());
                walk.backward(&mut sim, range.clone());
                walk.leaf_gradients(&mut sim, range.clone());
                // The trainer's fresh leaves hold the region's inputs until here.
                walk.drop_region_inputs(&mut sim, range.clone());
                walk.drop_produced(&mut sim, range.clone());
            } else {
                walk.backward(&mut sim, range.clone());
                if regions.len() > 1 {
                    walk.leaf_gradients(&mut sim, range.clone());
                }
            }
            for t in grads {
                sim.release(t);
            }
            for t in std::mem::take(&mut held[r]) {
                sim.release(t);
            }
        }
        walk.finish_backward(&mut sim);
        sim.release(loss_value);
        walk.drop_all(&mut sim);
        batch.release(&mut sim);
    }

    sim.set_phase(Phase::OptimizerStep);
    optimizer::step(&mut sim, &plan.optimizer, &trainable);
    for g in walk.param_grads.iter_mut() {
        if let Some(t) = g.take() {
            sim.release(t);
        }
    }

    let peak_bytes = sim.peak;
    let device = match (target, overheads) {
        (Target::Cuda(gpu), Some(o)) => {
            let reserved = Bytes(sim.pool.as_ref().map_or(peak_bytes.get(), |p| p.peak_reserved).max(peak_bytes.get()));
            let device_peak = reserved + Bytes(o.context_bytes);
            let capacity = Bytes(plan.memory_limit_bytes.map_or(gpu.memory_bytes, |l| l.min(gpu.memory_bytes)));
            Some(DeviceEstimate {
                gpu: gpu.name.to_owned(),
                reserved_peak_bytes: reserved,
                device_peak_bytes: device_peak,
                context_bytes: Bytes(o.context_bytes),
                cublas_workspace_bytes: Bytes(o.cublas_workspace_bytes),
                capacity_bytes: capacity,
                fits: device_peak <= capacity,
                headroom_bytes: i64::try_from(i128::from(capacity.get()) - i128::from(device_peak.get()))
                    .unwrap_or(i64::MIN),
            })
        }
        _ => None,
    };
    let cpu_tensors = matches!(target, Target::Cpu).then_some(peak_bytes.get());
    let host = host::estimate(&graph, &plan.host, cpu_tensors);
    Ok(Estimate {
        params: graph.n_params(),
        peak_bytes,
        peak_phase: sim.peak_phase.unwrap_or(Phase::Forward),
        breakdown: sim.peak_breakdown.clone(),
        category_peaks: sim.category_peaks.clone(),
        steady_bytes,
        phase_peaks: Phase::ALL.iter().map(|&p| (p, sim.phase_peaks[p.index()])).collect(),
        host_peak_bytes: host.total(),
        host,
        device,
    })
}

#[cfg(test)]
mod tests;
