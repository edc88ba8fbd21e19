//! The input batch and the synthetic data generator behind it.
//!
//! The agent's synthetic data is a fixed random linear "teacher": inputs are standard
//! normal, the label of a sample is `argmax(x_flat · teacher)`. It is learnable by every
//! model in the zoo, costs one `[input_features, classes]` matrix, and each batch costs
//! its inputs, its int64 labels and one `[batch, classes]` temporary.

use super::sim::{Sim, Tensor};
use super::{Category, F32, I64};
use crate::graph::{Graph, numel};

pub fn generator_state(sim: &mut Sim, graph: &Graph, classes: u64) {
    sim.alloc(numel(&graph.input) * classes * F32, Category::Batch);
}

/// Returns the inputs and the labels, in that order of creation.
pub fn make_batch(sim: &mut Sim, graph: &Graph, micro_batch: u64, classes: u64) -> (Tensor, Tensor) {
    let x = sim.alloc(micro_batch * numel(&graph.input) * F32, Category::Batch);
    let teacher_logits = sim.alloc(micro_batch * classes * F32, Category::Temporaries);
    let y = sim.alloc(micro_batch * I64, Category::Batch);
    sim.release(teacher_logits);
    (x, y)
}
