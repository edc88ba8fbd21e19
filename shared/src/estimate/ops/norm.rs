//! Normalisations: batch norm, instance norm and layer norm, their saved statistics and their backward's buffers.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::Kernels;
use crate::estimate::engine::{Engine, F32, Ten};
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, _shape: Vec<u64>) -> Vec<Ten> {
    match op {
        Op::BatchNorm { .. } => batch_norm(e, sim, i, &inputs),
        Op::InstanceNorm { .. } => instance_norm(e, sim, i, &inputs),
        Op::LayerNorm { affine, .. } => layer_norm(e, sim, i, &inputs, affine),
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
        _ => none,
    }
}

fn batch_norm(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId]) -> Vec<Ten> {
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

fn instance_norm(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId]) -> Vec<Ten> {
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

fn layer_norm(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId], affine: bool) -> Vec<Ten> {
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
