//! The input batch and the synthetic data generator behind it.
//!
//! The agent's synthetic data: one random prototype per class, and a sample is its
//! class's prototype plus standard-normal noise. Every architecture can learn it. It
//! costs one `[classes, input_features]` matrix; each batch costs its int64 labels, its
//! inputs, and one gathered `[batch, input_features]` temporary added into the inputs.

use super::activations::act;
use super::sim::{Sim, Tensor};
use super::{Category, F32, I64};
use crate::graph::{Graph, numel};

pub fn generator_state(sim: &mut Sim, graph: &Graph, classes: u64) {
    sim.alloc(numel(&graph.input) * classes * F32, Category::Batch);
}

/// Returns the inputs and the labels.
pub fn make_batch(sim: &mut Sim, graph: &Graph, micro_batch: u64) -> (Tensor, Tensor) {
    let y = sim.alloc(micro_batch * I64, Category::Batch);
    let x = sim.alloc(act(micro_batch, &graph.input), Category::Batch);
    // The gathered prototypes, added into `x` in place.
    sim.transient(act(micro_batch, &graph.input), Category::Temporaries);
    (x, y)
}
