//! Views and copies: view, reshape, permute, transpose, (un)squeeze, expand, select, slice, split, contiguous and clone, cat, pad and roll; forward and backward.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::engine::{Engine, F32, Read, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, shape: Vec<u64>) -> Vec<Ten> {
    match op {
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
        Op::Contiguous | Op::Clone => vec![pass(e, sim, k, 0, g)],
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
        Op::Select { .. } | Op::Slice { .. } | Op::Pad { .. } | Op::Roll { .. } => {
            let mut out = vec![grad_contig(e, sim, k, 0)];
            out.resize(none.len(), None);
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
        _ => none,
    }
}

fn views(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId], op: &Op) -> Vec<Ten> {
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
