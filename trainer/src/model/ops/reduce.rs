//! Reductions and softmaxes. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::{Kind, Tensor};

use super::{Call, dims_usize, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::Mean { dims: d, keepdim } => {
            let d = dims_usize(d);
            one(c.arg(0)?.f_mean_dim(Some(d.as_slice()), *keepdim, None::<Kind>)?)
        }
        Op::Sum { dims: d, keepdim } => {
            let d = dims_usize(d);
            one(c.arg(0)?.f_sum_dim_intlist(Some(d.as_slice()), *keepdim, None::<Kind>)?)
        }
        Op::VectorNorm => one(c.arg(0)?.f_norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)?),
        Op::Softmax { dim } => one(c.arg(0)?.f_softmax(*dim as i64, None::<Kind>)?),
        Op::LogSoftmax { dim } => one(c.arg(0)?.f_log_softmax(*dim as i64, None::<Kind>)?),
        Op::Argmax => one(c.arg(0)?.f_argmax(-1, false)?),
        other => Err(not_in_family(other)),
    }
}
