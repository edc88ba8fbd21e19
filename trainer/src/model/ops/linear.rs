//! `F.linear`, Hugging Face's `Conv1D` (`addmm` on the flattened input) and `matmul`. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::Linear { bias } => {
            let b = if *bias { Some(c.arg(2)?) } else { None };
            one(c.arg(0)?.f_linear(c.arg(1)?, b)?)
        }
        // Hugging Face's Conv1D: addmm(bias, x.view(-1, in), W) viewed back.
        Op::Conv1dHf => {
            let x = c.arg(0)?;
            let d = x.size().last().copied().unwrap_or(1);
            one(c.arg(2)?.f_addmm(&x.f_view([-1, d])?, c.arg(1)?)?.f_view(c.out_shape.as_slice())?)
        }
        Op::MatMul => one(c.arg(0)?.f_matmul(c.arg(1)?)?),
        other => Err(not_in_family(other)),
    }
}
