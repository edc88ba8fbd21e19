//! Lookups and gathers: embedding, row and general indexing, one-hot and max pooling with its indices; forward and backward.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::engine::{Engine, F32, Ten};
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, shape: Vec<u64>) -> Vec<Ten> {
    match op {
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
        Op::MaxPool { nd, .. } => {
            let x = if nd == 3 { e.read_f32_on_cpu(sim, inputs[0]) } else { e.read(sim, inputs[0]) };
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let idx = e.alloc_contig(sim, &shape, 8, ACT);
            let mut saved = keep(sim, &x.t, needs(&x));
            saved.extend(keep(sim, &idx, needs(&x)));
            record(e, sim, i, saved, &[&x], &[&o]);
            Engine::release(sim, idx);
            release(sim, x);
            vec![o]
        }
        Op::AvgPool { nd, .. } => {
            // avg_pool's backward reads only the input's sizes, but autograd saves it.
            let x = if nd == 3 { e.read_f32_on_cpu(sim, inputs[0]) } else { e.read(sim, inputs[0]) };
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let saved = keep(sim, &x.t, needs(&x));
            record(e, sim, i, saved, &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        Op::Arange { .. } => vec![e.alloc_contig(sim, &shape, 8, ACT)],
        Op::Upsample { .. } => {
            // Only the sizes are kept for the backward.
            let x = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            record(e, sim, i, Vec::new(), &[&x], &[&o]);
            release(sim, x);
            vec![o]
        }
        // Each backward scatters into zeros shaped like `x`: the index is kept.
        Op::Gather { .. } | Op::IndexRows | Op::Index => {
            let x = e.read(sim, inputs[0]);
            let idx = e.read(sim, inputs[1]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            let saved = keep(sim, &idx.t, needs(&x));
            record(e, sim, i, saved, &[&x, &idx], &[&o]);
            release(sim, x);
            release(sim, idx);
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
        Op::MaxPool { .. } | Op::AvgPool { .. } | Op::Upsample { .. } => vec![grad_contig(e, sim, k, 0)],
        Op::Arange { .. } => none,
        Op::OneHot { .. } => none,
        Op::Gather { .. } | Op::IndexRows | Op::Index => {
            let mut out = vec![grad_contig(e, sim, k, 0)];
            out.resize(none.len(), None);
            out
        }
        _ => none,
    }
}
