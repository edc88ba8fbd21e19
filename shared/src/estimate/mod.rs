//! The memory estimator: walks one steady-state training step as a timeline of tensor
//! allocations and frees, and reports the peak, the phase where it happens and what is
//! live at that moment.
//!
//! "Steady state" means after a first step has created the optimizer state, which is
//! what `max_memory_allocated()` reports for any later step. The walk follows what
//! libtorch's kernels and autograd do on the CPU (one allocation per kernel output,
//! saved tensors held by their graph nodes, gradients set to `None` by `zero_grad`), so
//! that the exact counting allocator in the agent can validate it.

mod activations;
mod batch;
mod optimizer;
pub mod sim;

use serde::{Deserialize, Serialize};

use crate::plan::{Plan, PlanError};
use crate::units::Bytes;
use sim::Sim;

/// Bytes of one fp32 element; the only precision so far.
pub(crate) const F32: u64 = 4;
/// Bytes of one int64 element (class labels, pooling indices).
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
}

/// Estimates the peak memory of one steady-state training step of `plan`.
pub fn estimate(plan: &Plan) -> Result<Estimate, PlanError> {
    let graph = plan.validate()?;
    let mut sim = Sim::new();

    // Between steps: weights, the optimizer's persistent state, the data generator.
    let weights: Vec<u64> = graph.param_shapes().iter().map(|s| crate::graph::numel(s) * F32).collect();
    for &bytes in &weights {
        sim.alloc(bytes, Category::Weights);
    }
    optimizer::persistent_state(&mut sim, &plan.optimizer, &weights);
    batch::generator_state(&mut sim, &graph, plan.classes);
    let steady_bytes = sim.live().total();

    // Gradients are `None` at the start of a step (`zero_grad` sets them to None), are
    // created by the first micro-batch's backward and accumulated into by later ones.
    let mut grads = Vec::new();
    let micro_batches_to_walk = plan.accumulation.min(2);
    for micro in 0..micro_batches_to_walk {
        sim.set_phase(Phase::Forward);
        let (x, y) = batch::make_batch(&mut sim, &graph, plan.micro_batch);
        let fwd = activations::forward(&mut sim, &graph, plan.micro_batch, x);
        sim.set_phase(Phase::Loss);
        let loss = activations::loss(&mut sim, fwd.logits, plan.micro_batch, plan.classes, plan.accumulation > 1);
        sim.set_phase(Phase::Backward);
        activations::backward(&mut sim, &graph, plan.micro_batch, fwd, loss, &mut grads, micro == 0);
        sim.release(x);
        sim.release(y);
    }

    sim.set_phase(Phase::OptimizerStep);
    optimizer::step(&mut sim, &plan.optimizer, &weights);
    for g in grads {
        sim.release(g);
    }

    Ok(Estimate {
        params: graph.n_params(),
        peak_bytes: sim.peak,
        peak_phase: sim.peak_phase.unwrap_or(Phase::Forward),
        breakdown: sim.peak_breakdown.clone(),
        category_peaks: sim.category_peaks.clone(),
        steady_bytes,
        phase_peaks: Phase::ALL.iter().map(|&p| (p, sim.phase_peaks[p.index()])).collect(),
    })
}

#[cfg(test)]
mod tests;
