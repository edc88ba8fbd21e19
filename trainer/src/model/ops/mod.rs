//! The trainer's call for each primitive, one module per op family as in the estimator
//! (`shared::estimate::ops`), dispatched on `graph::Op::family`: a new op is one arm in
//! its family's module here and one rule pair there.

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

use shared::graph::{Node, OpFamily};
use tch::Tensor;

use super::Net;
pub(super) use super::{compute_mask, dims, dims_usize, i};

/// One node being run: the model, the node, the values so far and its output's shape.
pub(super) struct Call<'a> {
    pub net: &'a Net,
    pub node: &'a Node,
    pub vals: &'a [Option<Tensor>],
    pub index: usize,
    pub out_shape: Vec<i64>,
}

impl Call<'_> {
    /// The node's input `k`.
    pub fn arg(&self, k: usize) -> Result<&Tensor, tch::TchError> {
        self.node.inputs.get(k).and_then(|&v| self.vals[v].as_ref()).ok_or_else(|| {
            tch::TchError::Shape(format!("node {} ({}) has no input {k}", self.index, self.node.op.name()))
        })
    }

    /// The node's input `k`, if it has that many.
    pub fn opt(&self, k: usize) -> Result<Option<&Tensor>, tch::TchError> {
        if k < self.node.inputs.len() { self.arg(k).map(Some) } else { Ok(None) }
    }
}

/// An op sent to a family that has no call for it: `Op::family` and the family's match
/// disagree, a mistake reported rather than run as nothing.
pub(super) fn not_in_family(op: &shared::graph::Op) -> tch::TchError {
    tch::TchError::Torch(format!("internal: {} is not in its family's module (Op::family)", op.name()))
}

/// A node's one output.
pub(super) fn one(t: Tensor) -> Result<Vec<Tensor>, tch::TchError> {
    Ok(vec![t])
}

/// The node's outputs.
pub(super) fn run(c: &Call<'_>) -> Result<Vec<Tensor>, tch::TchError> {
    let op = &c.node.op;
    match op.family() {
        OpFamily::Linear => linear::run(c, op),
        OpFamily::Conv => conv::run(c, op),
        OpFamily::Norm => norm::run(c, op),
        OpFamily::Pointwise => pointwise::run(c, op),
        OpFamily::Reduce => reduce::run(c, op),
        OpFamily::Views => views::run(c, op),
        OpFamily::Index => index::run(c, op),
        OpFamily::Attention => attention::run(c, op),
        OpFamily::Loss => loss::run(c, op),
        OpFamily::Special => special::run(c, op),
    }
}
