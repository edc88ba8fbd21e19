//! The training loop's own references: the batch the loader handed over, the model's
//! outputs and the loss, each alive until the loop rebinds its variable — through the
//! backward pass and the optimizer step, and the previous step's until the next batch
//! arrives, the model returns and the next loss is computed. A loop that keeps only the
//! loss (`Plan::keeps_outputs` false) lets the outputs go once the loss is computed.

use super::Category;
use super::engine::{Engine, F32, Ten};
use super::layout;
use super::sim::{Sim, Tensor};
use crate::graph::Graph;

/// What the loop holds between statements.
#[derive(Debug, Default)]
pub struct Held {
    batch: Vec<Tensor>,
    returned: Vec<Tensor>,
    loss: Option<Tensor>,
}

/// The previous step's batch, outputs (when the loop keeps them) and loss, alive when a
/// step begins; `returned` gives the outputs' sizes as the step makes them (half
/// precision under autocast), else their fp32 sizes are taken.
pub fn previous_step(sim: &mut Sim, g: &Graph, returned: Option<&[u64]>, keep_outputs: bool) -> Held {
    let batch = g.inputs.iter().map(|&(v, _)| sim.alloc(g.bytes(v), Category::Batch)).collect();
    let returned: Vec<Tensor> = g
        .returned
        .iter()
        .filter(|_| keep_outputs)
        .enumerate()
        .map(|(k, &v)| sim.alloc(returned.and_then(|r| r.get(k).copied()).unwrap_or(g.bytes(v)), Category::Activations))
        .collect();
    for &t in &returned {
        sim.set_optional(t);
    }
    let loss = Some(sim.alloc(F32, Category::Activations));
    Held { batch, returned, loss }
}

/// `batch = next(loader)`: the new batch exists before the old one is let go. The walk
/// reads the graph inputs from it.
pub fn next_batch(sim: &mut Sim, e: &mut Engine, g: &Graph, held: Held) -> Held {
    let mut batch = Vec::new();
    for &(v, _) in &g.inputs {
        let shape = g.values[v].shape.clone();
        let t = e.alloc_contig(sim, &shape, g.values[v].dtype.size(), Category::Batch);
        e.set_value(sim, v, &t);
        batch.push(t.st);
    }
    for t in held.batch {
        sim.release(t);
    }
    Held { batch, ..held }
}

/// `out = model(x)` has returned: the previous outputs go.
pub fn release_previous_outputs(sim: &mut Sim, held: &mut Held) {
    for t in std::mem::take(&mut held.returned) {
        sim.release(t);
    }
}

/// `loss = loss_fn(...)` (and `loss = loss / accumulation`): the previous loss goes; the
/// new loss is now the loop's, and the new outputs too when it keeps them; otherwise
/// they go here, before the backward pass (what autograd saved of them stays).
pub fn bind_loss(
    sim: &mut Sim,
    e: &mut Engine,
    g: &Graph,
    mut held: Held,
    accumulation: u64,
    keep_outputs: bool,
) -> Held {
    if let Some(t) = held.loss.take() {
        sim.release(t);
    }
    if accumulation > 1 && e.vals[g.loss].is_some() {
        // The divided loss is the one backward starts from; the quotient of a scalar.
        let scaled = Ten {
            st: sim.alloc(F32, Category::Activations),
            shape: vec![],
            strides: layout::contiguous(&[]),
            esize: F32,
            view: false,
        };
        e.set_value(sim, g.loss, &scaled);
        Engine::release(sim, scaled);
    }
    held.loss = e.vals[g.loss].as_ref().map(|t| sim.retain(t.st));
    let mut returned = Vec::new();
    for &v in &g.returned {
        if !keep_outputs {
            if v != g.loss {
                e.drop_value(sim, v);
            }
            continue;
        }
        if let Some(t) = e.vals[v].as_ref() {
            let r = sim.retain(t.st);
            sim.set_optional(r);
            returned.push(r);
        }
    }
    for t in std::mem::take(&mut held.returned) {
        sim.release(t);
    }
    held.returned = returned;
    held
}

/// The loop's variables go out of scope (the validation pass returns).
pub fn release(sim: &mut Sim, held: Held) {
    for t in held.batch.into_iter().chain(held.returned).chain(held.loss) {
        sim.release(t);
    }
}
