//! Element-wise ops: activations, scalar arithmetic, casts, dropout and broadcasting binary ops, with TensorIterator's output layout; forward and backward.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::engine::{Engine, F32, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, shape: Vec<u64>) -> Vec<Ten> {
    match op {
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
        Op::Silu { inplace }
        | Op::Hardswish { inplace }
        | Op::Hardsigmoid { inplace }
        | Op::Hardtanh { inplace, .. } => {
            let x = e.read(sim, inputs[0]);
            // The backward formula reads the input, so in place autograd saves a copy of
            // it first (`self.clone()`), then overwrites the input.
            let (saved, o) = if inplace {
                let copy = e.alloc_like(sim, &x.t.meta(), x.t.esize, ACT);
                let saved = keep(sim, &copy, needs(&x));
                Engine::release(sim, copy);
                (saved, share(sim, &x.t))
            } else {
                let o = elementwise_out(e, sim, &shape, &[&x.t], x.t.esize);
                (keep(sim, &x.t, needs(&x)), o)
            };
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
        Op::CompareScalar { .. } => {
            let x = e.read(sim, inputs[0]);
            let o = elementwise_out(e, sim, &shape, &[&x.t], 1);
            release(sim, x);
            vec![o]
        }
        Op::ToI64 => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc(sim, &shape, layout::like(&x.t.shape, &x.t.strides), 8, ACT);
            release(sim, x);
            vec![o]
        }
        Op::Dropout { inplace, .. } => dropout(e, sim, i, &inputs, inplace),
        // `estimate_graph` refuses graphs with a TorchScript module before any rule runs;
        // its output alone keeps this total.
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
        _ => Vec::new(),
    }
}

/// The backward rule of this family's ops, given the output gradient `g`; `none` holds a
/// `None` per input.
pub(super) fn bwd(
    e: &mut Engine,
    sim: &mut Sim,
    k: usize,
    op: Op,
    g: &Ten,
    none: Vec<Option<Ten>>,
) -> Vec<Option<Ten>> {
    match op {
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
        Op::Relu { .. }
        | Op::LeakyRelu { .. }
        | Op::Gelu { .. }
        | Op::Silu { .. }
        | Op::Hardswish { .. }
        | Op::Hardsigmoid { .. }
        | Op::Hardtanh { .. }
        | Op::Sigmoid
        | Op::Tanh
        | Op::Exp => {
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
        Op::AddScalar { .. } | Op::ToF32 | Op::CastLike => vec![pass(e, sim, k, 0, g)],
        Op::ToI64 | Op::CompareScalar { .. } => none,
        Op::Dropout { .. } => vec![grad_elementwise(e, sim, k, 0, g)],
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
        _ => none,
    }
}

fn binary(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId], op: &Op) -> Vec<Ten> {
    let a = e.read(sim, inputs[0]);
    let b = e.read(sim, inputs[1]);
    let shape = out_shape(e, i);
    let esize = a.t.esize.max(b.t.esize);
    // On the CPU TensorIterator promotes mixed dtypes by copying the narrower operand to
    // the common dtype first (a bf16 softmax times an fp32 one-hot target), freed after
    // the op; CUDA's kernels cast as they load.
    let copy = (e.cpu() && a.t.esize != b.t.esize).then(|| {
        let narrow = if a.t.esize < b.t.esize { &a.t } else { &b.t };
        sim.alloc(narrow.numel() * esize, TMP)
    });
    let o = elementwise_out(e, sim, &shape, &[&a.t, &b.t], esize);
    if let Some(c) = copy {
        sim.release(c);
    }
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

fn dropout(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId], inplace: bool) -> Vec<Ten> {
    let x = e.read(sim, inputs[0]);
    if !e.training {
        // `F.dropout(x, training=False)` returns `x` itself.
        let o = share(sim, &x.t);
        release(sim, x);
        return vec![o];
    }
    let shape = out_shape(e, i);
    let (mask, o) = if inplace {
        // `dropout_` on both devices: a noise tensor like the input, then `input.mul_(noise)`.
        let noise = e.alloc_like(sim, &x.t.meta(), x.t.esize, ACT);
        (noise, share(sim, &x.t))
    } else if e.cpu() {
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
