//! The input batch and the synthetic data generator behind it.
//!
//! The agent's synthetic data: classification samples are standard-normal noise plus
//! their class's random prototype over the first `PROTOTYPE_FEATURES` values (learnable
//! by every architecture, and cheap for large inputs); segmentation labels are the sign
//! of the first input channel; language-model labels are the input tokens; CLIP pairs
//! are random images and captions matched by position.

use super::sim::{Sim, Tensor};
use super::{Category, F32, I64};
use crate::graph::{Graph, InputKind, Task, numel};

/// Features of a sample that carry its class prototype.
pub const PROTOTYPE_FEATURES: u64 = 4096;

fn sample_features(graph: &Graph) -> u64 {
    graph.inputs.first().map_or(1, |&(v, _)| numel(&graph.values[v].shape[1..]))
}

pub fn prototype_features(graph: &Graph) -> u64 {
    sample_features(graph).min(PROTOTYPE_FEATURES)
}

/// Persistent generator state: the class prototypes.
pub fn generator_state(sim: &mut Sim, graph: &Graph) {
    if let Task::Classify { classes } = graph.task {
        sim.alloc(classes * prototype_features(graph) * F32, Category::Batch);
    }
}

/// The batch: one tensor per graph input, then the labels (if separate).
pub struct Batch {
    pub inputs: Vec<Tensor>,
    pub labels: Option<Tensor>,
}

pub fn make_batch(sim: &mut Sim, graph: &Graph) -> Batch {
    let b = graph.micro_batch();
    let mut labels = None;
    if let Task::Classify { .. } = graph.task {
        labels = Some(sim.alloc(b * I64, Category::Batch));
    }
    let mut inputs = Vec::new();
    for &(v, kind) in &graph.inputs {
        let bytes = numel(&graph.values[v].shape) * if matches!(kind, InputKind::Tokens { .. }) { I64 } else { F32 };
        inputs.push(sim.alloc(bytes, Category::Batch));
    }
    match graph.task {
        // The gathered prototypes, added into the first features in place.
        Task::Classify { .. } => sim.transient(b * prototype_features(graph) * F32, Category::Temporaries),
        Task::Segment { .. } => {
            // (x[:, 0] > 0) as a bool mask, then int64 labels.
            let spatial = numel(&graph.values[graph.inputs[0].0].shape[2..]);
            let mask = sim.alloc(b * spatial, Category::Temporaries);
            labels = Some(sim.alloc(b * spatial * I64, Category::Batch));
            sim.release(mask);
        }
        Task::LanguageModel { .. } => {}
        Task::Contrastive => labels = Some(sim.alloc(b * I64, Category::Batch)),
    }
    Batch { inputs, labels }
}

impl Batch {
    /// Releases the batch's own reference to its inputs when the model owns them.
    pub fn hand_over_inputs(mut self, sim: &mut Sim, hand_over: bool) -> Batch {
        if hand_over {
            for t in self.inputs.drain(..) {
                sim.release(t);
            }
        }
        self
    }

    pub fn release(self, sim: &mut Sim) {
        for t in self.inputs {
            sim.release(t);
        }
        if let Some(t) = self.labels {
            sim.release(t);
        }
    }
}
