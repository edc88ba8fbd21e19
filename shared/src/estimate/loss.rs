//! The losses: cross-entropy as `log_softmax` then `nll_loss` (classification, per-voxel
//! segmentation, next-token prediction) and CLIP's symmetric contrastive loss; the loss is
//! divided by the accumulation steps when there are several.

use super::sim::{Sim, Tensor};
use super::walk::Walk;
use super::{Category, F32};
use crate::graph::{Graph, Task, numel};

pub struct Loss {
    saved: Vec<Tensor>,
    output: Tensor,
    /// Bytes of the logits (fp32) the backward pass makes a gradient for, per output.
    outputs: Vec<(usize, u64)>,
    contrastive_batch: Option<u64>,
}

pub fn forward(sim: &mut Sim, walk: &mut Walk, graph: &Graph, divided: bool) -> Loss {
    let mut saved = Vec::new();
    let mut outputs = Vec::new();
    let mut contrastive_batch = None;
    match graph.task {
        Task::Classify { .. } | Task::Segment { .. } | Task::LanguageModel { .. } => {
            let logits = graph.outputs[0];
            let n = numel(&graph.values[logits].shape);
            let e = walk.output_esize(logits);
            if e != F32 && walk.is_cpu() {
                // CPU autocast: log_softmax in the half type, then nll_loss (an fp32 op)
                // on an fp32 copy, which it saves.
                let log_probs = sim.alloc(n * e, Category::Activations);
                let cast = sim.alloc(n * F32, Category::Activations);
                walk.drop_value(sim, logits);
                saved.push(log_probs);
                saved.push(cast);
            } else {
                // log_softmax runs in fp32 (CUDA autocast casts a half input up first).
                let cast = (e != F32).then(|| sim.alloc(n * F32, Category::Activations));
                let log_probs = sim.alloc(n * F32, Category::Activations);
                if let Some(c) = cast {
                    sim.release(c);
                }
                walk.drop_value(sim, logits);
                saved.push(log_probs);
            }
            saved.push(sim.alloc(F32, Category::Activations)); // total_weight
            outputs.push((logits, n * F32));
        }
        Task::Contrastive => {
            let b = graph.micro_batch();
            let square = b * b * F32;
            // scale * I @ T^T, then log_softmax of it and of its transpose.
            let mm = sim.alloc(square, Category::Activations);
            let logits = sim.alloc(square, Category::Activations);
            sim.release(mm);
            saved.push(sim.alloc(square, Category::Activations));
            saved.push(sim.alloc(square, Category::Activations));
            saved.push(logits);
            for &o in &graph.outputs {
                outputs.push((o, numel(&graph.values[o].shape) * F32));
            }
            contrastive_batch = Some(b);
        }
    }
    let mut output = sim.alloc(F32, Category::Temporaries);
    if divided {
        let scaled = sim.alloc(F32, Category::Temporaries);
        sim.release(output);
        output = scaled;
    }
    Loss { saved, output, outputs, contrastive_batch }
}

/// The loss's backward: gradients for the graph outputs, handed to the walk. Returns the
/// loss value, which the training loop holds until the whole backward pass is done.
pub fn backward(sim: &mut Sim, walk: &mut Walk, loss: Loss) -> Tensor {
    let seed = sim.alloc(F32, Category::Temporaries);
    match loss.contrastive_batch {
        None => {
            let (logits, bytes) = loss.outputs[0];
            let half = walk.output_esize(logits) != F32;
            let nll_grad = sim.alloc(bytes, Category::Temporaries);
            sim.release(seed);
            let g = if half && walk.is_cpu() {
                // nll_loss's node frees its fp32 copy and total_weight once it has run;
                // then the cast down and log_softmax's backward in the half type.
                let mut saved = loss.saved.iter().copied();
                let log_probs = saved.next();
                for t in saved {
                    sim.release(t);
                }
                let h = sim.alloc(bytes / 2, Category::Temporaries);
                sim.release(nll_grad);
                let g = sim.alloc(bytes / 2, Category::Temporaries);
                sim.release(h);
                if let Some(t) = log_probs {
                    sim.release(t);
                }
                walk.seed_grad(logits, g);
                return loss.output;
            } else {
                let g = sim.alloc(bytes, Category::Temporaries);
                sim.release(nll_grad);
                if half {
                    let h = sim.alloc(bytes / 2, Category::Temporaries);
                    sim.release(g);
                    h
                } else {
                    g
                }
            };
            walk.seed_grad(logits, g);
        }
        Some(b) => {
            let square = b * b * F32;
            let g1 = sim.alloc(square, Category::Temporaries);
            let g2 = sim.alloc(square, Category::Temporaries);
            sim.release(seed);
            for &(o, bytes) in &loss.outputs {
                let g = sim.alloc(bytes, Category::Temporaries);
                walk.seed_grad(o, g);
            }
            sim.release(g1);
            sim.release(g2);
        }
    }
    for t in loss.saved {
        sim.release(t);
    }
    loss.output
}
