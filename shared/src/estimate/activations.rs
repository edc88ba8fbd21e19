//! Activations: what each layer's forward allocates and saves for backward, and what its
//! backward allocates and frees, following libtorch's CPU kernels and autograd formulas.

use super::sim::{Sim, Tensor};
use super::{Category, F32, I64};
use crate::graph::{Graph, Layer, numel};

/// What the forward pass leaves behind for the loss and the backward pass.
pub struct Forward {
    pub logits: Tensor,
    /// Per node, the tensors its autograd node saved.
    saved: Vec<Vec<Tensor>>,
}

/// The loss's saved tensors and its output.
pub struct Loss {
    log_probs: Tensor,
    total_weight: Tensor,
    output: Tensor,
}

/// Bytes of one fp32 tensor of `shape` per sample, for the whole micro-batch.
pub(super) fn act(micro_batch: u64, shape: &[u64]) -> u64 {
    micro_batch.saturating_mul(numel(shape)).saturating_mul(F32)
}

/// Runs the layers; `input` is the batch, held by its creator throughout.
pub fn forward(sim: &mut Sim, graph: &Graph, micro_batch: u64, input: Tensor) -> Forward {
    let mut h = sim.retain(input);
    let mut saved = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let out_bytes = act(micro_batch, &node.output);
        let (out, keep) = match node.layer {
            // A view of a contiguous tensor shares its storage.
            Layer::Flatten => (sim.retain(h), vec![]),
            // addmm / convolution save their input (and the weight, already counted).
            Layer::Linear { .. } | Layer::Conv2d { .. } => {
                let out = sim.alloc(out_bytes, Category::Activations);
                (out, vec![sim.retain(h)])
            }
            // ReLU saves its result, not its input.
            Layer::Relu => {
                let out = sim.alloc(out_bytes, Category::Activations);
                (out, vec![sim.retain(out)])
            }
            // max_pool2d_with_indices saves its input and the int64 indices.
            Layer::MaxPool2d { .. } => {
                let out = sim.alloc(out_bytes, Category::Activations);
                let indices = sim.alloc(micro_batch * numel(&node.output) * I64, Category::Activations);
                (out, vec![sim.retain(h), indices])
            }
        };
        saved.push(keep);
        sim.release(h);
        h = out;
    }
    Forward { logits: h, saved }
}

/// Cross-entropy as `log_softmax` then `nll_loss`, divided by the accumulation steps
/// when there are several.
pub fn loss(sim: &mut Sim, logits: Tensor, micro_batch: u64, classes: u64, divided: bool) -> Loss {
    let log_probs = sim.alloc(micro_batch * classes * F32, Category::Activations);
    sim.release(logits);
    let mut output = sim.alloc(F32, Category::Temporaries);
    let total_weight = sim.alloc(F32, Category::Activations);
    if divided {
        let scaled = sim.alloc(F32, Category::Temporaries);
        sim.release(output);
        output = scaled;
    }
    Loss { log_probs, total_weight, output }
}

/// Walks the graph backwards. On the first micro-batch the weight gradients become the
/// parameters' `.grad` (pushed onto `grads`); on later ones they are added in place and
/// their kernel outputs die at once.
pub fn backward(
    sim: &mut Sim,
    graph: &Graph,
    micro_batch: u64,
    fwd: Forward,
    loss: Loss,
    grads: &mut Vec<Tensor>,
    first_micro_batch: bool,
) {
    let mut g = sim.alloc(F32, Category::Temporaries); // the seed: ones_like(loss)
    let nll_grad = sim.alloc(micro_batch * numel(graph.output()) * F32, Category::Temporaries);
    sim.release(g);
    sim.release(loss.total_weight);
    g = sim.alloc(micro_batch * numel(graph.output()) * F32, Category::Temporaries);
    sim.release(nll_grad);
    sim.release(loss.log_probs);

    // A layer needs its input's gradient only if some layer before it has parameters.
    let mut input_needs_grad = Vec::with_capacity(graph.nodes.len());
    let mut seen_params = false;
    for node in &graph.nodes {
        input_needs_grad.push(seen_params);
        seen_params |= node.layer.n_params() > 0;
    }

    // On the first micro-batch the kernel's output is stolen as `.grad`.
    let param_grad_category = if first_micro_batch { Category::Gradients } else { Category::Temporaries };
    for ((node, saved), needs_grad) in graph.nodes.iter().zip(fwd.saved).zip(input_needs_grad).rev() {
        let in_bytes = act(micro_batch, &node.input);
        let next = match node.layer {
            Layer::Flatten => sim.retain(g),
            Layer::Linear { .. } | Layer::Conv2d { .. } => {
                let grad_input = needs_grad.then(|| sim.alloc(in_bytes, Category::Temporaries));
                let shapes = node.layer.param_shapes();
                let param_grads: Vec<Tensor> =
                    shapes.iter().map(|s| sim.alloc(numel(s) * F32, param_grad_category)).collect();
                for t in param_grads {
                    if first_micro_batch {
                        grads.push(t);
                    } else {
                        sim.release(t);
                    }
                }
                match grad_input {
                    Some(t) => t,
                    None => sim.alloc(0, Category::Temporaries),
                }
            }
            Layer::Relu | Layer::MaxPool2d { .. } => sim.alloc(in_bytes, Category::Temporaries),
        };
        sim.release(g);
        for t in saved {
            sim.release(t);
        }
        g = next;
    }
    sim.release(g);
    sim.release(loss.output);
}
