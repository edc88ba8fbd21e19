//! The estimator's rules, one module per op family, each op's forward rule beside its
//! backward rule: what the ATen kernels allocate and in which layout, what autograd
//! saves, what each backward allocates. They follow PyTorch 2.11's kernels on the CPU
//! (native and oneDNN) and the documented CUDA behaviour; `docs/estimator.md` lists them
//! with their sources. `forward` and `backward` dispatch on `Op::family`, an exhaustive
//! match beside the op's definition, so a new op names its family and then needs a rule
//! there, and nowhere else in the estimator.

mod attention;
mod conv;
mod index;
mod linear;
mod loss;
mod norm;
mod pointwise;
mod reduce;
mod special;
mod views;

pub(crate) use attention::native_multi_head_attention;

use crate::estimate::Category::Activations as ACT;
use crate::estimate::engine::{Bwd, Engine, Meta, Part, Read, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, OpFamily, numel};

/// Node `i`'s forward rule: its outputs, with its autograd node recorded.
pub(crate) fn forward(e: &mut Engine, sim: &mut Sim, i: usize) -> Vec<Ten> {
    let op = e.g.nodes[i].op.clone();
    let inputs = e.g.nodes[i].inputs.clone();
    if let Op::Release = op {
        return Vec::new();
    }
    let shape = out_shape(e, i);
    match op.family() {
        OpFamily::Linear => linear::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Conv => conv::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Norm => norm::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Pointwise => pointwise::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Reduce => reduce::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Views => views::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Index => index::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Attention => attention::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Loss => loss::fwd(e, sim, i, op, inputs, shape),
        OpFamily::Special => special::fwd(e, sim, i, op, inputs, shape),
    }
}

/// Tape node `k`'s backward: a gradient per input (`None` where none flows).
pub(crate) fn backward(e: &mut Engine, sim: &mut Sim, k: usize, gouts: &[Option<Ten>]) -> Vec<Option<Ten>> {
    let n_in = e.tape[k].ins.len();
    let mut none = vec![None; n_in];
    match e.tape[k].bwd.clone() {
        Bwd::Accumulate { .. } | Bwd::Checkpoint { .. } => return none,
        Bwd::Cast { esize } => {
            if let (Some(g), Some(slot)) = (gouts.first().and_then(Option::as_ref), e.tape[k].ins[0]) {
                none[0] = Some(e.alloc_like(sim, &g.meta(), esize, e.grad_category(Some(slot))));
            }
            return none;
        }
        Bwd::Part(part) => return attention::backward_part(e, sim, k, &part, gouts),
        Bwd::Node => {}
    }
    let node = e.tape[k].node;
    let op = e.g.nodes[node].op.clone();
    let Some(g) = gouts.iter().flatten().next().cloned() else {
        return none;
    };
    let g = &g;
    match op.family() {
        OpFamily::Linear => linear::bwd(e, sim, k, op, g, none),
        OpFamily::Conv => conv::bwd(e, sim, k, op, g, none),
        OpFamily::Norm => norm::bwd(e, sim, k, op, g, none),
        OpFamily::Pointwise => pointwise::bwd(e, sim, k, op, g, none),
        OpFamily::Reduce => reduce::bwd(e, sim, k, op, g, none),
        OpFamily::Views => views::bwd(e, sim, k, op, g, none),
        OpFamily::Index => index::bwd(e, sim, k, op, g, none),
        OpFamily::Attention => attention::bwd(e, sim, k, op, g, none),
        OpFamily::Loss => loss::bwd(e, sim, k, op, g, none),
        OpFamily::Special => special::bwd(e, sim, k, op, g, none),
    }
}

// --- helpers the families share ---------------------------------------------------------

pub(super) fn out_shape(e: &Engine, i: usize) -> Vec<u64> {
    e.g.values[e.g.nodes[i].output()].shape.clone()
}

/// A node's outputs' gradient slots: a value's slot is its own index.
pub(super) fn out_slots(e: &Engine, i: usize) -> Vec<usize> {
    e.g.nodes[i].outputs.iter().map(|v| v.index()).collect()
}

/// Records node `i`'s autograd node with these saved tensors and reads. The saved
/// tensors are released when no node is recorded (no gradient needed) or when the node
/// sits in a non-reentrant checkpointed region (its recompute will save them).
pub(crate) fn record(e: &mut Engine, sim: &mut Sim, i: usize, saved: Vec<Ten>, reads: &[&Read], outs: &[&Ten]) {
    let ins = reads.iter().map(|r| r.slot).collect();
    let in_meta = reads.iter().map(|r| r.t.meta()).collect();
    let out_meta = outs.iter().map(|t| t.meta()).collect();
    let slots = out_slots(e, i);
    e.push_saving(sim, Bwd::Node, saved, slots, ins, in_meta, out_meta);
}

pub(super) fn release(sim: &mut Sim, r: Read) {
    Engine::release(sim, r.t);
}

pub(super) fn share(sim: &mut Sim, t: &Ten) -> Ten {
    Engine::share(sim, t)
}

pub(super) fn needs(r: &Read) -> bool {
    r.slot.is_some()
}

/// Saves `t` when the node will have a backward (some read needs a gradient).
pub(super) fn keep(sim: &mut Sim, t: &Ten, any_grad: bool) -> Vec<Ten> {
    if any_grad { vec![share(sim, t)] } else { Vec::new() }
}

/// Makes node `i`'s output gradient flow into `slot` (a cast's), by recording a pass-
/// through node.
pub(super) fn alias_slot(e: &mut Engine, i: usize, slot: Option<usize>) {
    if let Some(s) = slot {
        let v = e.g.nodes[i].output();
        let m = Meta::default();
        e.push(Bwd::Part(Part::View), Vec::new(), vec![v.index()], vec![Some(s)], vec![m.clone()], vec![m]);
    }
}

/// An element-wise kernel's output over these operands (TensorIterator's layout).
pub(super) fn elementwise_out(e: &Engine, sim: &mut Sim, shape: &[u64], ops: &[&Ten], esize: u64) -> Ten {
    let operands: Vec<(&[u64], &[u64])> = ops.iter().map(|t| (t.shape.as_slice(), t.strides.as_slice())).collect();
    let strides = layout::elementwise(shape, &operands);
    e.alloc(sim, shape, strides, esize, ACT)
}

/// A gradient for an input of node `k`: fresh, laid out contiguously.
pub(super) fn grad_contig(e: &Engine, sim: &mut Sim, k: usize, input: usize) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[input]?;
    let m = &t.in_meta[input];
    Some(e.alloc_contig(sim, &m.shape, m.esize, e.grad_category(Some(slot))))
}

/// A gradient laid out like the forward input (`empty_like`).
pub(super) fn grad_like(e: &Engine, sim: &mut Sim, k: usize, input: usize) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[input]?;
    let m = &t.in_meta[input];
    Some(e.alloc_like(sim, m, m.esize, e.grad_category(Some(slot))))
}

/// A gradient of an element-wise backward kernel over the incoming gradient and a saved
/// operand: TensorIterator's layout of the two.
pub(super) fn grad_elementwise(e: &Engine, sim: &mut Sim, k: usize, input: usize, g: &Ten) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[input]?;
    let m = &t.in_meta[input];
    if g.shape != m.shape {
        return grad_like(e, sim, k, input);
    }
    let strides = layout::elementwise(&m.shape, &[(&g.shape, &g.strides), (&m.shape, &m.strides)]);
    Some(e.alloc(sim, &m.shape, strides, m.esize, e.grad_category(Some(slot))))
}

/// The incoming gradient passed on to input `input` unchanged, reduced when the input
/// was broadcast, cast when its element size differs.
pub(super) fn pass(e: &Engine, sim: &mut Sim, k: usize, input: usize, g: &Ten) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[input]?;
    let m = &t.in_meta[input];
    if m.shape != g.shape && numel(&m.shape) != numel(&g.shape) {
        // sum_to_size: a reduction to the broadcast input's shape.
        return Some(e.alloc_contig(sim, &m.shape, g.esize.min(m.esize.max(g.esize)), e.grad_category(Some(slot))));
    }
    if m.esize != g.esize && m.esize != 0 {
        return Some(e.alloc_like(sim, &g.meta(), m.esize, e.grad_category(Some(slot))));
    }
    let mut t = share(sim, g);
    t.shape = m.shape.clone();
    Some(t)
}

/// Reduces a full-size gradient to a broadcast input's shape (releasing the full one).
pub(super) fn reduce(e: &Engine, sim: &mut Sim, full: Ten, m: &Meta, slot: Option<usize>) -> Ten {
    if numel(&m.shape) == full.numel() {
        let mut t = full;
        t.shape = m.shape.clone();
        if t.strides.len() != m.shape.len() {
            t.strides = layout::contiguous(&m.shape);
        }
        return t;
    }
    let r = e.alloc_contig(sim, &m.shape, full.esize, e.grad_category(slot));
    Engine::release(sim, full);
    r
}
