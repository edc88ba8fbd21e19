//! Losses: `nll_loss` (cross-entropy's second half) and `binary_cross_entropy_with_logits`; forward and backward.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::engine::{Engine, F32, HALF, Ten};
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, _shape: Vec<u64>) -> Vec<Ten> {
    match op {
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
        Op::MseLoss => {
            // An fp32 op under autocast. ATen squares the differences into a buffer of
            // the input's size, then takes its mean.
            let x = e.read(sim, inputs[0]);
            let x = if e.amp && x.t.esize == HALF { e.cast(sim, x, F32, ACT) } else { x };
            let t = e.read(sim, inputs[1]);
            sim.transient(x.t.numel() * x.t.esize, TMP);
            let o = e.alloc_contig(sim, &[], F32, ACT);
            let any = needs(&x);
            let mut saved = keep(sim, &x.t, any);
            saved.extend(keep(sim, &t.t, any));
            record(e, sim, i, saved, &[&x, &t], &[&o]);
            release(sim, x);
            release(sim, t);
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
    _g: &Ten,
    none: Vec<Option<Ten>>,
) -> Vec<Option<Ten>> {
    match op {
        Op::NllLoss { .. } => {
            let gx = e.tape[k].ins[0]
                .map(|s| e.alloc_contig(sim, &e.tape[k].in_meta[0].shape, F32, e.grad_category(Some(s))));
            vec![gx, None]
        }
        Op::BceWithLogits | Op::MseLoss => {
            let gx = e.tape[k].ins[0]
                .map(|s| e.alloc_contig(sim, &e.tape[k].in_meta[0].shape, F32, e.grad_category(Some(s))));
            vec![gx, None]
        }
        _ => none,
    }
}
