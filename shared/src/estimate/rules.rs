//! One memory rule per primitive, forward and backward side by side: what the ATen
//! kernels allocate and in which layout, what autograd saves, what each backward
//! allocates. The rules follow PyTorch 2.11's kernels on the CPU (native and oneDNN) and
//! the documented CUDA behaviour; `docs/estimator.md` lists them with their sources.

use super::Category::{Activations as ACT, Temporaries as TMP};
use super::Kernels;
use super::engine::{Bwd, Engine, F32, HALF, Meta, Part, Read, Ten};
use super::layout;
use super::sim::Sim;
use crate::graph::{Op, numel};

// --- small helpers ---------------------------------------------------------------------

fn out_shape(e: &Engine, i: usize) -> Vec<u64> {
    e.g.values[e.g.nodes[i].output()].shape.clone()
}

fn out_slots(e: &Engine, i: usize) -> Vec<usize> {
    e.g.nodes[i].outputs.clone()
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

fn release(sim: &mut Sim, r: Read) {
    Engine::release(sim, r.t);
}

fn share(sim: &mut Sim, t: &Ten) -> Ten {
    Engine::share(sim, t)
}

fn needs(r: &Read) -> bool {
    r.slot.is_some()
}

/// Saves `t` when the node will have a backward (some read needs a gradient).
fn keep(sim: &mut Sim, t: &Ten, any_grad: bool) -> Vec<Ten> {
    if any_grad { vec![share(sim, t)] } else { Vec::new() }
}

// --- the forward rules -----------------------------------------------------------------

pub(crate) fn forward(e: &mut Engine, sim: &mut Sim, i: usize) -> Vec<Ten> {
    let op = e.g.nodes[i].op.clone();
    let inputs = e.g.nodes[i].inputs.clone();
    if let Op::Release = op {
        return Vec::new();
    }
    let shape = out_shape(e, i);
    match op {
        Op::Param => unreachable_param(e, sim, i),
        Op::Release => Vec::new(),
        Op::Linear { bias } => linear(e, sim, i, &inputs, bias),
        Op::Conv1dHf => conv1d_hf(e, sim, i, &inputs),
        Op::MatMul => matmul(e, sim, i, &inputs),
        Op::Conv { .. } | Op::ConvTranspose { .. } => conv(e, sim, i, &inputs),
        Op::BatchNorm { .. } => batch_norm(e, sim, i, &inputs),
        Op::InstanceNorm { .. } => instance_norm(e, sim, i, &inputs),
        Op::LayerNorm { affine, .. } => layer_norm(e, sim, i, &inputs, affine),
        Op::Prelu => {
            let x = e.read_low(sim, inputs[0]);
            let w = e.read_low(sim, inputs[1]);
            let o = e.alloc_like(sim, &x.t.meta(), x.t.esize, ACT);
            let any = needs(&x) || needs(&w);
            let mut saved = keep(sim, &x.t, any);
            saved.extend(keep(sim, &w.t, any));
            record(e, sim, i, saved, &[&x, &w], &[&o]);
            release(sim, x);
            release(sim, w);
            vec![o]
        }
        Op::Embedding => {
            let table = e.read(sim, inputs[0]);
            let ids = e.read(sim, inputs[1]);
            let o = e.alloc_contig(sim, &shape, F32, ACT);
            let saved = keep(sim, &ids.t, needs(&table));
            record(e, sim, i, saved, &[&table, &ids], &[&o]);
            release(sim, table);
            release(sim, ids);
            vec![o]
        }
        Op::MaxPool { .. } => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let idx = e.alloc_contig(sim, &shape, 8, ACT);
            let mut saved = keep(sim, &x.t, needs(&x));
            saved.extend(keep(sim, &idx, needs(&x)));
            record(e, sim, i, saved, &[&x], &[&o]);
            Engine::release(sim, idx);
            release(sim, x);
            vec![o]
        }
        Op::Relu { inplace } | Op::LeakyRelu { inplace } => {
            let x = e.read(sim, inputs[0]);
            let o = if inplace { share(sim, &x.t) } else { elementwise_out(e, sim, &shape, &[&x.t], x.t.esize) };
            // relu saves its result; leaky_relu its input unless it ran in place.
            let saves_input = matches!(op, Op::LeakyRelu { inplace: false });
            let saved = keep(sim, if saves_input { &x.t } else { &o }, needs(&x));
            record(e, sim, i, saved, &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::Gelu { .. } | Op::ClampMin { .. } | Op::PowScalar { .. } => {
            let x =
                if matches!(op, Op::PowScalar { .. }) { e.read_f32(sim, inputs[0]) } else { e.read(sim, inputs[0]) };
            let o = elementwise_out(e, sim, &shape, &[&x.t], x.t.esize);
            let saved = keep(sim, &x.t, needs(&x));
            record(e, sim, i, saved, &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::Sigmoid | Op::Tanh | Op::Exp => {
            let x = if matches!(op, Op::Exp) { e.read_f32(sim, inputs[0]) } else { e.read(sim, inputs[0]) };
            let o = elementwise_out(e, sim, &shape, &[&x.t], x.t.esize);
            let saved = keep(sim, &o, needs(&x));
            record(e, sim, i, saved, &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::MulScalar { .. } | Op::AddScalar { .. } | Op::RsubScalar { .. } => {
            let x = e.read(sim, inputs[0]);
            let o = elementwise_out(e, sim, &shape, &[&x.t], x.t.esize);
            record(e, sim, i, Vec::new(), &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::ToF32 => {
            let x = e.read(sim, inputs[0]);
            if x.t.esize == F32 {
                // `x.float()` of a float tensor is `x` itself, gradient and all.
                alias_slot(e, i, x.slot);
                return vec![x.t];
            }
            let c = e.cast(sim, x, F32, ACT);
            // The cast's own node carries the gradient: alias the output's slot to it.
            alias_slot(e, i, c.slot);
            vec![c.t]
        }
        Op::CastLike => {
            let x = e.read(sim, inputs[0]);
            let like = e.vals[inputs[1]].as_ref().map_or(x.t.esize, |t| t.esize);
            if x.t.esize == like || x.t.esize == 8 {
                alias_slot(e, i, x.slot);
                return vec![x.t];
            }
            let c = e.cast(sim, x, like, ACT);
            alias_slot(e, i, c.slot);
            vec![c.t]
        }
        Op::ToI64 => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc(sim, &shape, layout::like(&x.t.shape, &x.t.strides), 8, ACT);
            release(sim, x);
            vec![o]
        }
        Op::Dropout { .. } => dropout(e, sim, i, &inputs),
        // `estimate_graph` refuses graphs with a TorchScript module before any rule runs;
        // its output alone keeps this total.
        Op::Script => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            release(sim, x);
            vec![o]
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div => binary(e, sim, i, &inputs, &op),
        Op::AddInplace => {
            let a = e.read(sim, inputs[0]);
            let b = e.read(sim, inputs[1]);
            let o = share(sim, &a.t);
            record(e, sim, i, Vec::new(), &[&a, &b], &[&o]);
            release(sim, a);
            release(sim, b);
            vec![o]
        }
        Op::Mean { .. } | Op::Sum { .. } => {
            let x = if matches!(op, Op::Sum { .. }) { e.read_f32(sim, inputs[0]) } else { e.read(sim, inputs[0]) };
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            record(e, sim, i, Vec::new(), &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::VectorNorm => {
            let x = e.read_f32(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let mut saved = keep(sim, &x.t, needs(&x));
            saved.extend(keep(sim, &o, needs(&x)));
            record(e, sim, i, saved, &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::Softmax { .. } | Op::LogSoftmax { .. } => {
            let x = e.read_f32(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let saved = keep(sim, &o, needs(&x));
            record(e, sim, i, saved, &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::Argmax => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, 8, ACT);
            release(sim, x);
            vec![o]
        }
        // Listed, not `op.is_view()`: the match stays exhaustive, so a new op needs a rule.
        Op::View { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Transpose { .. }
        | Op::Unsqueeze { .. }
        | Op::Squeeze { .. }
        | Op::Expand { .. }
        | Op::Select { .. }
        | Op::Slice { .. }
        | Op::Split { .. } => views(e, sim, i, &inputs, &op),
        Op::Contiguous | Op::Clone => {
            let x = e.read(sim, inputs[0]);
            let copy = matches!(op, Op::Clone) || !x.t.contiguous();
            if !copy {
                let o = share(sim, &x.t);
                record(e, sim, i, Vec::new(), &[&x], &[&o]);
                release(sim, x);
                return vec![o];
            }
            let strides = if matches!(op, Op::Clone) {
                layout::like(&x.t.shape, &x.t.strides)
            } else {
                layout::contiguous(&x.t.shape)
            };
            let o = e.alloc(sim, &shape, strides, x.t.esize, ACT);
            record(e, sim, i, Vec::new(), &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::Cat { .. } => {
            let mut reads: Vec<Read> = inputs.iter().map(|&v| e.read(sim, v)).collect();
            // Autocast's "promote" policy: narrower inputs are copied to the widest type.
            let widest = reads.iter().map(|r| r.t.esize).max().unwrap_or(F32);
            if e.amp {
                for r in reads.iter_mut() {
                    if r.t.esize < widest && r.t.esize != 8 {
                        let rr = std::mem::replace(r, Read { t: r.t.clone(), slot: None });
                        *r = e.cast(sim, rr, widest, TMP);
                    }
                }
            }
            let o = e.alloc_contig(sim, &shape, widest, ACT);
            let refs: Vec<&Read> = reads.iter().collect();
            record(e, sim, i, Vec::new(), &refs, &[&o]);
            for r in reads {
                release(sim, r);
            }
            vec![o]
        }
        Op::Pad { .. } | Op::Roll { .. } => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            record(e, sim, i, Vec::new(), &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::IndexRows | Op::Index => {
            let x = e.read(sim, inputs[0]);
            let idx = e.read(sim, inputs[1]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let saved = keep(sim, &idx.t, needs(&x));
            record(e, sim, i, saved, &[&x, &idx], &[&o]);
            release(sim, x);
            release(sim, idx);
            vec![o]
        }
        Op::Attention { causal, dropout, .. } => super::attention::forward(e, sim, i, &inputs, causal, dropout),
        Op::ShiftedWindowMask { padded, .. } => {
            // MONAI's compute_mask: a zero image of the padded volume filled region by
            // region, its window partition (a copy), the pairwise difference, `!= 0`, a
            // masked fill, `== 0`, a second masked fill; only the last survives.
            let voxels = padded.iter().product::<u64>();
            let m = numel(&shape);
            let img = sim.alloc(voxels * F32, TMP);
            let part = sim.alloc(voxels * F32, TMP);
            let diff = sim.alloc(m * F32, TMP);
            let ne = sim.alloc(m, TMP);
            let first = sim.alloc(m * F32, TMP);
            let eq = sim.alloc(m, TMP);
            let o = e.alloc_contig(sim, &shape, F32, ACT);
            for t in [eq, first, ne, diff, part, img] {
                sim.release(t);
            }
            vec![o]
        }
        Op::NllLoss { .. } => {
            // An fp32 op under autocast on both devices.
            let lp = e.read(sim, inputs[0]);
            let lp = if e.amp && lp.t.esize == HALF { e.cast(sim, lp, F32, ACT) } else { lp };
            let target = e.read(sim, inputs[1]);
            let o = e.alloc_contig(sim, &[], F32, ACT);
            let total = e.alloc_contig(sim, &[], F32, ACT);
            let any = needs(&lp);
            let mut saved = keep(sim, &lp.t, any);
            saved.extend(keep(sim, &target.t, any));
            saved.extend(keep(sim, &total, any));
            record(e, sim, i, saved, &[&lp, &target], &[&o]);
            Engine::release(sim, total);
            release(sim, lp);
            release(sim, target);
            vec![o]
        }
        Op::BceWithLogits => {
            let x = e.read(sim, inputs[0]);
            let x = if e.amp && x.t.esize == HALF { e.cast(sim, x, F32, ACT) } else { x };
            let t = e.read(sim, inputs[1]);
            let n = x.t.numel();
            // log_sigmoid's output and buffer, then (1 - t) * x - log_sigmoid(x).
            let ls = sim.alloc(n * F32, TMP);
            sim.transient(n * F32, TMP);
            let l = sim.alloc(n * F32, TMP);
            let o = e.alloc_contig(sim, &[], F32, ACT);
            sim.release(l);
            sim.release(ls);
            let any = needs(&x);
            let mut saved = keep(sim, &x.t, any);
            saved.extend(keep(sim, &t.t, any));
            record(e, sim, i, saved, &[&x, &t], &[&o]);
            release(sim, x);
            release(sim, t);
            vec![o]
        }
        Op::OneHot { .. } => {
            let labels = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, F32, ACT);
            // labels.long() for scatter_, freed after it.
            sim.transient(labels.t.numel() * 8, TMP);
            release(sim, labels);
            vec![o]
        }
    }
}

fn unreachable_param(_e: &mut Engine, _sim: &mut Sim, _i: usize) -> Vec<Ten> {
    // The engine handles parameters itself.
    Vec::new()
}

/// Makes node `i`'s output gradient flow into `slot` (a cast's), by recording a pass-
/// through node.
fn alias_slot(e: &mut Engine, i: usize, slot: Option<usize>) {
    if let Some(s) = slot {
        let v = e.g.nodes[i].output();
        let m = Meta::default();
        e.push(Bwd::Part(Part::View), Vec::new(), vec![v], vec![Some(s)], vec![m.clone()], vec![m]);
    }
}

/// An element-wise kernel's output over these operands (TensorIterator's layout).
fn elementwise_out(e: &Engine, sim: &mut Sim, shape: &[u64], ops: &[&Ten], esize: u64) -> Ten {
    let operands: Vec<(&[u64], &[u64])> = ops.iter().map(|t| (t.shape.as_slice(), t.strides.as_slice())).collect();
    let strides = layout::elementwise(shape, &operands);
    e.alloc(sim, shape, strides, esize, ACT)
}

fn binary(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize], op: &Op) -> Vec<Ten> {
    let a = e.read(sim, inputs[0]);
    let b = e.read(sim, inputs[1]);
    let shape = out_shape(e, i);
    let esize = a.t.esize.max(b.t.esize);
    let o = elementwise_out(e, sim, &shape, &[&a.t, &b.t], esize);
    let mut saved = Vec::new();
    match op {
        Op::Mul => {
            saved.extend(keep(sim, &b.t, needs(&a)));
            saved.extend(keep(sim, &a.t, needs(&b)));
        }
        Op::Div => {
            saved.extend(keep(sim, &b.t, needs(&a) || needs(&b)));
            saved.extend(keep(sim, &a.t, needs(&b)));
        }
        _ => {}
    }
    record(e, sim, i, saved, &[&a, &b], &[&o]);
    release(sim, a);
    release(sim, b);
    vec![o]
}

fn dropout(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize]) -> Vec<Ten> {
    let x = e.read(sim, inputs[0]);
    if !e.training {
        // `F.dropout(x, training=False)` returns `x` itself.
        let o = share(sim, &x.t);
        release(sim, x);
        return vec![o];
    }
    let shape = out_shape(e, i);
    let (mask, o) = if e.cpu() {
        // `_dropout_impl`: noise = empty_like(x).bernoulli_(1 - p).div_(1 - p); x * noise.
        let noise = e.alloc_like(sim, &x.t.meta(), x.t.esize, ACT);
        let o = elementwise_out(e, sim, &shape, &[&x.t, &noise], x.t.esize);
        (noise, o)
    } else {
        // CUDA's fused `native_dropout`: a boolean mask and the output.
        let o = e.alloc_like(sim, &x.t.meta(), x.t.esize, ACT);
        let mask = e.alloc_like(sim, &x.t.meta(), 1, ACT);
        (mask, o)
    };
    let saved = keep(sim, &mask, needs(&x));
    record(e, sim, i, saved, &[&x], &[&o]);
    Engine::release(sim, mask);
    release(sim, x);
    vec![o]
}

fn views(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize], op: &Op) -> Vec<Ten> {
    let x = e.read(sim, inputs[0]);
    let shape = out_shape(e, i);
    let mut outs = Vec::new();
    match op {
        Op::View { .. } | Op::Reshape { .. } => {
            let (o, _copied) = e.reshape(sim, &x.t, &shape, ACT);
            outs.push(o);
        }
        Op::Permute { dims } => {
            let st = layout::permute(&x.t.strides, dims);
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Transpose { d0, d1 } => {
            let mut st = x.t.strides.clone();
            st.swap(*d0, *d1);
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Unsqueeze { dim } => {
            let mut st = x.t.strides.clone();
            let inner = if *dim < st.len() { st[*dim] * x.t.shape[*dim] } else { 1 };
            st.insert(*dim, inner);
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Squeeze { dim } => {
            let mut st = x.t.strides.clone();
            if x.t.shape.get(*dim) == Some(&1) {
                st.remove(*dim);
            }
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Expand { .. } => {
            let off = shape.len() - x.t.shape.len();
            let st: Vec<u64> = (0..shape.len())
                .map(|d| if d < off || (x.t.shape[d - off] == 1 && shape[d] != 1) { 0 } else { x.t.strides[d - off] })
                .collect();
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Select { dim, .. } => {
            let mut st = x.t.strides.clone();
            st.remove(*dim);
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Slice { dim, step, .. } => {
            let mut st = x.t.strides.clone();
            st[*dim] *= *step;
            outs.push(Engine::view_of(sim, &x.t, shape.clone(), st));
        }
        Op::Split { .. } => {
            for &o in &e.g.nodes[i].outputs {
                let s = e.g.values[o].shape.clone();
                outs.push(Engine::view_of(sim, &x.t, s, x.t.strides.clone()));
            }
        }
        _ => {}
    }
    let refs: Vec<&Ten> = outs.iter().collect();
    record(e, sim, i, Vec::new(), &[&x], &refs);
    release(sim, x);
    outs
}

/// oneDNN runs half-precision matrix products on the CPU (PyTorch's bf16 `mm`, `addmm`,
/// `bmm` when oneDNN is on) with a packing scratchpad per call, measured between a
/// tenth and three quarters of the fp32 size of the product's output plus a constant;
/// its size is not modelled, so the interval's high end takes the fp32 output size and
/// 256 KiB.
fn onednn_half_product(e: &Engine, sim: &mut Sim, out_elems: u64, esize: u64) {
    if esize == HALF && matches!(e.kernels, super::Kernels::Cpu { onednn: true, .. }) {
        sim.uncertain(out_elems * F32 + (256 << 10));
    }
}

/// `F.linear(x, W, b)` as ATen runs it (see the module docs of `Op::Linear`).
fn linear(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize], bias: bool) -> Vec<Ten> {
    let x = e.read_low(sim, inputs[0]);
    let w = e.read_low(sim, inputs[1]);
    let b = bias.then(|| e.read_low(sim, inputs[2]));
    let shape = out_shape(e, i);
    let esize = if e.amp { HALF } else { x.t.esize };
    let rows = numel(&x.t.shape[..x.t.shape.len() - 1]);
    let inf = *x.t.shape.last().unwrap_or(&1);
    // The 2-D operand mm/addmm sees: the input itself (2-D), else its reshape to
    // `[rows, in]` (a view when the layout allows, else a copy), with or without a bias.
    let (x2, copied) =
        if x.t.shape.len() == 2 { (share(sim, &x.t), false) } else { e.reshape(sim, &x.t, &[rows, inf], ACT) };
    let o = e.alloc_contig(sim, &shape, esize, ACT);
    onednn_half_product(e, sim, numel(&shape), esize);
    let mut saved = keep(sim, &x2, needs(&w));
    saved.extend(keep(sim, &w.t, needs(&x)));
    let mut reads = vec![&x, &w];
    if let Some(b) = b.as_ref() {
        reads.push(b);
    }
    record(e, sim, i, saved, &reads, &[&o]);
    if let Some(t) = e.tape.last_mut()
        && t.node == i
    {
        // Whether the input went through a copy decides its gradient's path.
        t.in_meta[0].strides = if copied { layout::contiguous(&x.t.shape) } else { x.t.strides.clone() };
    }
    Engine::release(sim, x2);
    release(sim, x);
    release(sim, w);
    if let Some(b) = b {
        release(sim, b);
    }
    vec![o]
}

fn conv1d_hf(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize]) -> Vec<Ten> {
    let x = e.read_low(sim, inputs[0]);
    let w = e.read_low(sim, inputs[1]);
    let b = e.read_low(sim, inputs[2]);
    let shape = out_shape(e, i);
    let esize = if e.amp { HALF } else { x.t.esize };
    let rows = numel(&x.t.shape[..x.t.shape.len() - 1]);
    let inf = *x.t.shape.last().unwrap_or(&1);
    let (x2, _) = e.reshape(sim, &x.t, &[rows, inf], ACT);
    let o = e.alloc_contig(sim, &shape, esize, ACT);
    onednn_half_product(e, sim, numel(&shape), esize);
    let mut saved = keep(sim, &x2, needs(&w));
    saved.extend(keep(sim, &w.t, needs(&x)));
    record(e, sim, i, saved, &[&x, &w, &b], &[&o]);
    Engine::release(sim, x2);
    release(sim, x);
    release(sim, w);
    release(sim, b);
    vec![o]
}

/// `torch.matmul`: 2-D operands go to mm; batched ones are expanded and reshaped to 3-D
/// (copies where the layout does not allow a view), multiplied with bmm, viewed back.
fn matmul(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize]) -> Vec<Ten> {
    let a = e.read_low(sim, inputs[0]);
    let b = e.read_low(sim, inputs[1]);
    let shape = out_shape(e, i);
    let esize = if e.amp { HALF } else { a.t.esize.max(b.t.esize) };
    let (ra, rb) = (a.t.shape.len(), b.t.shape.len());
    let (a3, b3) = if ra == 2 && rb == 2 {
        (share(sim, &a.t), share(sim, &b.t))
    } else if rb == 2 {
        let k = a.t.shape[ra - 1];
        let rows = numel(&a.t.shape[..ra - 1]);
        (e.reshape(sim, &a.t, &[rows, k], ACT).0, share(sim, &b.t))
    } else {
        let batch: u64 = numel(&shape[..shape.len() - 2]);
        let (n, m) = (a.t.shape[ra - 2], a.t.shape[ra - 1]);
        let p = b.t.shape[rb - 1];
        let ea = expand_to(sim, &a.t, &shape[..shape.len() - 2]);
        let eb = expand_to(sim, &b.t, &shape[..shape.len() - 2]);
        let a3 = e.reshape(sim, &ea, &[batch, n, m], ACT).0;
        let b3 = e.reshape(sim, &eb, &[batch, m, p], ACT).0;
        Engine::release(sim, ea);
        Engine::release(sim, eb);
        (a3, b3)
    };
    let o = e.alloc_contig(sim, &shape, esize, ACT);
    onednn_half_product(e, sim, numel(&shape), esize);
    let mut saved = keep(sim, &b3, needs(&a));
    saved.extend(keep(sim, &a3, needs(&b)));
    record(e, sim, i, saved, &[&a, &b], &[&o]);
    if let Some(t) = e.tape.last_mut()
        && t.node == i
    {
        t.in_meta[0].strides = a3.strides.clone();
        t.in_meta[1].strides = b3.strides.clone();
    }
    Engine::release(sim, a3);
    Engine::release(sim, b3);
    release(sim, a);
    release(sim, b);
    vec![o]
}

/// A view of `t` broadcast to these batch dimensions (its last two dims kept).
fn expand_to(sim: &mut Sim, t: &Ten, batch: &[u64]) -> Ten {
    let r = t.shape.len();
    let mut shape = batch.to_vec();
    shape.extend(&t.shape[r - 2..]);
    let off = shape.len() - r;
    let strides: Vec<u64> = (0..shape.len())
        .map(|d| if d < off || (t.shape[d - off] == 1 && shape[d] != 1) { 0 } else { t.strides[d - off] })
        .collect();
    Engine::view_of(sim, t, shape, strides)
}

fn batch_norm(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize]) -> Vec<Ten> {
    let x = e.read(sim, inputs[0]);
    let w = e.read(sim, inputs[1]);
    let b = e.read(sim, inputs[2]);
    let c = x.t.shape[1];
    let o = e.alloc_like(sim, &x.t.meta(), x.t.esize, ACT);
    if !e.training {
        // Eval mode normalises with the running statistics: the output alone.
        record(e, sim, i, Vec::new(), &[&x, &w, &b], &[&o]);
        release(sim, x);
        release(sim, w);
        release(sim, b);
        return vec![o];
    }
    let mean = e.alloc_contig(sim, &[c], F32, ACT);
    let invstd = e.alloc_contig(sim, &[c], F32, ACT);
    // The running statistics' updates go through two temporaries per channel.
    e.transient(sim, c * F32);
    e.transient(sim, c * F32);
    let any = needs(&x) || needs(&w);
    let mut saved = keep(sim, &x.t, any);
    saved.extend(keep(sim, &mean, any));
    saved.extend(keep(sim, &invstd, any));
    record(e, sim, i, saved, &[&x, &w, &b], &[&o]);
    Engine::release(sim, mean);
    Engine::release(sim, invstd);
    release(sim, x);
    release(sim, w);
    release(sim, b);
    vec![o]
}

fn instance_norm(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize]) -> Vec<Ten> {
    let x = e.read(sim, inputs[0]);
    let bc = x.t.shape[0] * x.t.shape[1];
    // input.contiguous().view(1, B*C, ...), batch norm, the result viewed back.
    let xc = e.contiguous(sim, &x.t, ACT);
    let o = e.alloc_contig(sim, &x.t.shape, x.t.esize, ACT);
    let mean = e.alloc_contig(sim, &[bc], F32, ACT);
    let invstd = e.alloc_contig(sim, &[bc], F32, ACT);
    e.transient(sim, bc * F32);
    e.transient(sim, bc * F32);
    let any = needs(&x);
    let mut saved = keep(sim, &xc, any);
    saved.extend(keep(sim, &mean, any));
    saved.extend(keep(sim, &invstd, any));
    record(e, sim, i, saved, &[&x], &[&o]);
    Engine::release(sim, mean);
    Engine::release(sim, invstd);
    Engine::release(sim, xc);
    release(sim, x);
    vec![o]
}

fn layer_norm(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize], affine: bool) -> Vec<Ten> {
    let x = e.read_f32(sim, inputs[0]);
    let w = affine.then(|| e.read(sim, inputs[1]));
    let b = affine.then(|| e.read(sim, inputs[2]));
    let d = *x.t.shape.last().unwrap_or(&1);
    let rows = x.t.numel() / d.max(1);
    // A strided input is made contiguous inside the kernel.
    if !x.t.contiguous() {
        e.transient(sim, x.t.bytes());
    }
    let o = e.alloc_contig(sim, &x.t.shape, x.t.esize, ACT);
    let mean = e.alloc_contig(sim, &[rows], F32, ACT);
    let rstd = e.alloc_contig(sim, &[rows], F32, ACT);
    let any = needs(&x) || w.as_ref().is_some_and(needs);
    let mut saved = keep(sim, &x.t, any);
    saved.extend(keep(sim, &mean, any));
    saved.extend(keep(sim, &rstd, any));
    let mut reads = vec![&x];
    if let (Some(w), Some(b)) = (w.as_ref(), b.as_ref()) {
        reads.push(w);
        reads.push(b);
    }
    record(e, sim, i, saved, &reads, &[&o]);
    Engine::release(sim, mean);
    Engine::release(sim, rstd);
    release(sim, x);
    if let Some(w) = w {
        release(sim, w);
    }
    if let Some(b) = b {
        release(sim, b);
    }
    vec![o]
}

fn conv(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[usize]) -> Vec<Ten> {
    let x = e.read_low(sim, inputs[0]);
    let w = e.read_low(sim, inputs[1]);
    let b = (inputs.len() > 2).then(|| e.read_low(sim, inputs[2]));
    let shape = out_shape(e, i);
    let plan = super::conv::plan(e, i, &x.t, &w.t);
    let o = super::conv::forward(e, sim, &plan, &x.t, &w.t, &shape);
    let any = needs(&x) || needs(&w);
    let mut saved = keep(sim, &x.t, any);
    saved.extend(keep(sim, &w.t, any));
    let mut reads = vec![&x, &w];
    if let Some(b) = b.as_ref() {
        reads.push(b);
    }
    record(e, sim, i, saved, &reads, &[&o]);
    release(sim, x);
    release(sim, w);
    if let Some(b) = b {
        release(sim, b);
    }
    vec![o]
}

// --- the backward rules ----------------------------------------------------------------

/// A gradient for an input of node `k`: fresh, laid out contiguously.
fn grad_contig(e: &Engine, sim: &mut Sim, k: usize, input: usize) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[input]?;
    let m = &t.in_meta[input];
    Some(e.alloc_contig(sim, &m.shape, m.esize, e.grad_category(Some(slot))))
}

/// A gradient laid out like the forward input (`empty_like`).
fn grad_like(e: &Engine, sim: &mut Sim, k: usize, input: usize) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[input]?;
    let m = &t.in_meta[input];
    Some(e.alloc_like(sim, m, m.esize, e.grad_category(Some(slot))))
}

/// A gradient of an element-wise backward kernel over the incoming gradient and a saved
/// operand: TensorIterator's layout of the two.
fn grad_elementwise(e: &Engine, sim: &mut Sim, k: usize, input: usize, g: &Ten) -> Option<Ten> {
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
fn pass(e: &Engine, sim: &mut Sim, k: usize, input: usize, g: &Ten) -> Option<Ten> {
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
        Bwd::Part(part) => return super::attention::backward_part(e, sim, k, &part, gouts),
        Bwd::Node => {}
    }
    let node = e.tape[k].node;
    let op = e.g.nodes[node].op.clone();
    let Some(g) = gouts.iter().flatten().next().cloned() else {
        return none;
    };
    let g = &g;
    match op {
        Op::Param => none,
        Op::Linear { bias } => {
            let t = &e.tape[k];
            let (x, w) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let rows = numel(&x.shape[..x.shape.len() - 1]);
            // The output gradient as the 2-D operand of the products (a view when it can).
            let g2 = if layout::view(&g.shape, &g.strides, &[rows, *g.shape.last().unwrap_or(&1)]).is_none() {
                Some(e.alloc_contig(sim, &[rows, *g.shape.last().unwrap_or(&1)], g.esize, TMP))
            } else {
                None
            };
            let gx = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &x.shape, g.esize, e.grad_category(Some(s))));
            let gw = e.tape[k].ins[1].map(|s| {
                let mut t = e.alloc_contig(sim, &w.shape, g.esize, e.grad_category(Some(s)));
                // mm_mat2_backward's transposed product comes back as a view.
                t.view = true;
                t
            });
            onednn_half_product(e, sim, numel(&x.shape).max(numel(&w.shape)), g.esize);
            let gb = if bias {
                e.tape[k].ins[2].map(|s| e.alloc_contig(sim, &[w.shape[0]], g.esize, e.grad_category(Some(s))))
            } else {
                None
            };
            if let Some(t) = g2 {
                Engine::release(sim, t);
            }
            let mut out = vec![gx, gw];
            if bias {
                out.push(gb);
            }
            out
        }
        Op::Conv1dHf => {
            let t = &e.tape[k];
            let (x, w) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let gx = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &x.shape, g.esize, e.grad_category(Some(s))));
            let gw = e.tape[k].ins[1].map(|s| e.alloc_contig(sim, &w.shape, g.esize, e.grad_category(Some(s))));
            onednn_half_product(e, sim, numel(&x.shape).max(numel(&w.shape)), g.esize);
            let gb = e.tape[k].ins[2].map(|s| e.alloc_contig(sim, &[w.shape[1]], g.esize, e.grad_category(Some(s))));
            vec![gx, gw, gb]
        }
        Op::MatMul => {
            let t = &e.tape[k];
            let (a, b) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let ga = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &a.shape, g.esize, e.grad_category(Some(s))));
            let gb = e.tape[k].ins[1].map(|s| {
                let mut t = e.alloc_contig(sim, &b.shape, g.esize, e.grad_category(Some(s)));
                // A transposed-contiguous 2-D operand gets its gradient as a transposed view.
                if b.shape.len() == 2 && b.strides.first() == Some(&1) {
                    t.view = true;
                    t.strides = vec![1, b.shape[0]];
                }
                t
            });
            onednn_half_product(e, sim, numel(&a.shape).max(numel(&b.shape)), g.esize);
            vec![ga, gb]
        }
        Op::Conv { .. } | Op::ConvTranspose { .. } => super::conv::backward(e, sim, k, g),
        Op::BatchNorm { .. } => {
            let c = e.tape[k].in_meta[0].shape[1];
            let gx = grad_like(e, sim, k, 0);
            let gw = e.tape[k].ins[1].map(|s| e.alloc_contig(sim, &[c], F32, e.grad_category(Some(s))));
            let gb = e.tape[k].ins[2].map(|s| e.alloc_contig(sim, &[c], F32, e.grad_category(Some(s))));
            e.transient(sim, c * F32);
            vec![gx, gw, gb]
        }
        Op::InstanceNorm { .. } => {
            let m = e.tape[k].in_meta[0].clone();
            if !g.contiguous() {
                e.transient(sim, g.bytes());
            }
            let gx = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &m.shape, g.esize, e.grad_category(Some(s))));
            e.transient(sim, m.shape[0] * m.shape[1] * F32);
            vec![gx]
        }
        Op::LayerNorm { affine, .. } => {
            let m = e.tape[k].in_meta[0].clone();
            let d = *m.shape.last().unwrap_or(&1);
            let threads = match e.kernels {
                Kernels::Cpu { threads, .. } => threads,
                Kernels::Cuda => 0,
            };
            let xc = (!m.contiguous()).then(|| sim.alloc(m.bytes(), TMP));
            let gc = (!g.contiguous()).then(|| sim.alloc(g.bytes(), TMP));
            let gx = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &m.shape, g.esize, e.grad_category(Some(s))));
            let (gw, gb) = if affine {
                (
                    e.tape[k].ins[1].map(|s| e.alloc_contig(sim, &[d], F32, e.grad_category(Some(s)))),
                    e.tape[k].ins[2].map(|s| e.alloc_contig(sim, &[d], F32, e.grad_category(Some(s)))),
                )
            } else {
                (None, None)
            };
            // The CPU kernel reduces dgamma and dbeta through a buffer per thread.
            if threads > 0 && affine {
                e.transient(sim, 2 * threads * d * F32);
            }
            if let Some(t) = gc {
                sim.release(t);
            }
            if let Some(t) = xc {
                sim.release(t);
            }
            if affine { vec![gx, gw, gb] } else { vec![gx] }
        }
        Op::Prelu => {
            let m = e.tape[k].in_meta[0].clone();
            let gx = grad_like(e, sim, k, 0);
            // _prelu_kernel_backward: the weight's gradient at full size, then summed.
            let full = e.alloc_like(sim, &m, m.esize, TMP);
            let gw = e.tape[k].ins[1]
                .map(|s| e.alloc_contig(sim, &[1], e.tape[k].in_meta[1].esize, e.grad_category(Some(s))));
            Engine::release(sim, full);
            vec![gx, gw]
        }
        Op::Embedding => {
            let t = &e.tape[k];
            let table = t.in_meta[0].clone();
            let ids = t.in_meta[1].clone();
            let slot = t.ins[0];
            // embedding_dense_backward: sorted indices and counts, then a zeroed table.
            e.transient(sim, ids.numel() * 8);
            let gt = slot.map(|s| e.alloc_contig(sim, &table.shape, F32, e.grad_category(Some(s))));
            vec![gt, None]
        }
        Op::MaxPool { .. } => vec![grad_contig(e, sim, k, 0)],
        Op::Relu { .. } | Op::LeakyRelu { .. } | Op::Gelu { .. } | Op::Sigmoid | Op::Tanh | Op::Exp => {
            vec![grad_elementwise(e, sim, k, 0, g)]
        }
        Op::ClampMin { .. } => {
            let n = e.tape[k].in_meta[0].numel();
            let mask = sim.alloc(n, TMP);
            let gx = grad_elementwise(e, sim, k, 0, g);
            sim.release(mask);
            vec![gx]
        }
        Op::PowScalar { .. } => {
            // grad * (e * x^(e-1)): the power, its scaling, then the product.
            let m = e.tape[k].in_meta[0].clone();
            let p = e.alloc_like(sim, &m, m.esize, TMP);
            let s = e.alloc_like(sim, &m, m.esize, TMP);
            let gx = grad_elementwise(e, sim, k, 0, g);
            Engine::release(sim, p);
            Engine::release(sim, s);
            vec![gx]
        }
        Op::MulScalar { .. } | Op::RsubScalar { .. } => vec![grad_elementwise(e, sim, k, 0, g)],
        Op::AddScalar { .. } | Op::Contiguous | Op::Clone | Op::ToF32 | Op::CastLike => vec![pass(e, sim, k, 0, g)],
        Op::ToI64 | Op::Argmax | Op::OneHot { .. } | Op::ShiftedWindowMask { .. } => none,
        Op::Dropout { .. } => vec![grad_elementwise(e, sim, k, 0, g)],
        Op::Script | Op::Release => none,
        Op::Add | Op::AddInplace => {
            let ga = pass(e, sim, k, 0, g);
            let gb = pass(e, sim, k, 1, g);
            vec![ga, gb]
        }
        Op::Sub => {
            let ga = pass(e, sim, k, 0, g);
            let gb = e.tape[k].ins[1].map(|s| {
                let m = e.tape[k].in_meta[1].clone();
                e.alloc_contig(sim, &m.shape, g.esize, e.grad_category(Some(s)))
            });
            vec![ga, gb]
        }
        Op::Mul | Op::Div => {
            let t = &e.tape[k];
            let (ma, mb) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let out = g.meta();
            let ga = e.tape[k].ins[0].map(|s| {
                let full = e.alloc(
                    sim,
                    &out.shape,
                    layout::elementwise(&out.shape, &[(&g.shape, &g.strides), (&mb.shape, &mb.strides)]),
                    out.esize,
                    e.grad_category(Some(s)),
                );
                reduce(e, sim, full, &ma, Some(s))
            });
            let gb = e.tape[k].ins[1].map(|s| {
                let div = matches!(op, Op::Div);
                let tmps: Vec<Ten> = if div {
                    (0..2).map(|_| e.alloc_contig(sim, &out.shape, out.esize, TMP)).collect()
                } else {
                    Vec::new()
                };
                let full = e.alloc(
                    sim,
                    &out.shape,
                    layout::elementwise(&out.shape, &[(&g.shape, &g.strides), (&ma.shape, &ma.strides)]),
                    out.esize,
                    e.grad_category(Some(s)),
                );
                for t in tmps {
                    Engine::release(sim, t);
                }
                reduce(e, sim, full, &mb, Some(s))
            });
            vec![ga, gb]
        }
        Op::Mean { .. } => vec![grad_contig(e, sim, k, 0)],
        Op::Sum { dims, keepdim } => {
            // sum's backward expands the gradient: a view with zero strides.
            let m = e.tape[k].in_meta[0].clone();
            if e.tape[k].ins[0].is_none() {
                return none;
            }
            // The gradient broadcast back over the reduced dimensions (stride 0).
            let mut strides = vec![0u64; m.shape.len()];
            let mut gi = 0;
            for (d, stride) in strides.iter_mut().enumerate() {
                if dims.contains(&d) {
                    if keepdim {
                        gi += 1;
                    }
                    continue;
                }
                *stride = g.strides.get(gi).copied().unwrap_or(0);
                gi += 1;
            }
            let v = Engine::view_of(sim, g, m.shape.clone(), strides);
            vec![Some(v)]
        }
        Op::VectorNorm => {
            let gx = grad_like(e, sim, k, 0);
            vec![gx]
        }
        Op::Softmax { .. } | Op::LogSoftmax { .. } => {
            let gc = (!g.contiguous()).then(|| sim.alloc(g.bytes(), TMP));
            let gx = e.tape[k].ins[0]
                .map(|s| e.alloc_contig(sim, &e.tape[k].in_meta[0].shape, g.esize, e.grad_category(Some(s))));
            if let Some(t) = gc {
                sim.release(t);
            }
            vec![gx]
        }
        Op::View { .. }
        | Op::Reshape { .. }
        | Op::Permute { .. }
        | Op::Transpose { .. }
        | Op::Unsqueeze { .. }
        | Op::Squeeze { .. } => {
            vec![view_back(e, sim, k, g, &op)]
        }
        Op::Expand { .. } => {
            let gx = e.tape[k].ins[0]
                .map(|s| e.alloc_contig(sim, &e.tape[k].in_meta[0].shape, g.esize, e.grad_category(Some(s))));
            vec![gx]
        }
        Op::Select { .. } | Op::Slice { .. } | Op::Pad { .. } | Op::Roll { .. } | Op::IndexRows | Op::Index => {
            let mut out = vec![grad_contig(e, sim, k, 0)];
            out.resize(n_in, None);
            out
        }
        Op::Split { .. } => {
            // SplitBackward: the pieces' gradients concatenated (zeros for missing ones).
            vec![grad_contig(e, sim, k, 0)]
        }
        Op::Cat { dim } => {
            // Each input's gradient is a slice of the output's.
            let metas = e.tape[k].in_meta.clone();
            let mut out = Vec::new();
            for (j, m) in metas.iter().enumerate() {
                if e.tape[k].ins[j].is_none() {
                    out.push(None);
                    continue;
                }
                let _ = dim;
                let v = Engine::view_of(sim, g, m.shape.clone(), g.strides.clone());
                let v = if m.esize != g.esize {
                    let c = e.alloc_contig(sim, &m.shape, m.esize, TMP);
                    Engine::release(sim, v);
                    c
                } else {
                    v
                };
                out.push(Some(v));
            }
            out
        }
        Op::Attention { .. } => super::attention::backward(e, sim, k, g),
        Op::NllLoss { .. } => {
            let gx = e.tape[k].ins[0]
                .map(|s| e.alloc_contig(sim, &e.tape[k].in_meta[0].shape, F32, e.grad_category(Some(s))));
            vec![gx, None]
        }
        Op::BceWithLogits => {
            let gx = e.tape[k].ins[0]
                .map(|s| e.alloc_contig(sim, &e.tape[k].in_meta[0].shape, F32, e.grad_category(Some(s))));
            vec![gx, None]
        }
    }
}

/// Reduces a full-size gradient to a broadcast input's shape (releasing the full one).
fn reduce(e: &Engine, sim: &mut Sim, full: Ten, m: &Meta, slot: Option<usize>) -> Ten {
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

/// The backward of a view op: the gradient viewed back to the input's shape, copied when
/// its layout does not allow it.
fn view_back(e: &Engine, sim: &mut Sim, k: usize, g: &Ten, op: &Op) -> Option<Ten> {
    let t = &e.tape[k];
    let slot = t.ins[0]?;
    let m = &t.in_meta[0];
    let strides = match op {
        Op::Permute { dims } => {
            let mut inv = vec![0; dims.len()];
            for (i, &d) in dims.iter().enumerate() {
                inv[d] = i;
            }
            Some(layout::permute(&g.strides, &inv))
        }
        Op::Transpose { d0, d1 } => {
            let mut st = g.strides.clone();
            st.swap(*d0, *d1);
            Some(st)
        }
        _ => layout::view(&g.shape, &g.strides, &m.shape),
    };
    match strides {
        Some(st) => Some(Engine::view_of(sim, g, m.shape.clone(), st)),
        None => Some(e.alloc_contig(sim, &m.shape, g.esize, e.grad_category(Some(slot)))),
    }
}
