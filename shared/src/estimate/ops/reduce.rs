//! Reductions and softmaxes: mean, sum, the vector norm, (log-)softmax and argmax; forward and backward.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::engine::{Engine, Ten};
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, shape: Vec<u64>) -> Vec<Ten> {
    match op {
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
        Op::Argmax => none,
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
        _ => none,
    }
}
