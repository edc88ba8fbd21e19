//! Nodes that are not kernels: parameters (the engine places them itself), `Release`
//! markers (a reference's `forward` letting go of a local) and a TorchScript module's
//! output (`estimate_graph` refuses such graphs before any rule runs; the output alone
//! keeps this total).

use super::*;
use crate::estimate::Category::Activations as ACT;
use crate::estimate::engine::{Engine, Ten};
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, _i: usize, op: Op, inputs: Vec<ValueId>, shape: Vec<u64>) -> Vec<Ten> {
    match op {
        Op::Script => {
            let x = e.read(sim, inputs[0]);
            let o = e.alloc_contig(sim, &shape, x.t.esize, ACT);
            release(sim, x);
            vec![o]
        }
        // Parameters are the engine's; a release has no output.
        _ => Vec::new(),
    }
}

/// No gradient flows through these nodes.
pub(super) fn bwd(
    _e: &mut Engine,
    _sim: &mut Sim,
    _k: usize,
    _op: Op,
    _g: &Ten,
    none: Vec<Option<Ten>>,
) -> Vec<Option<Ten>> {
    none
}
