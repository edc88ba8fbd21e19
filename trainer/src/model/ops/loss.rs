//! `nll_loss_nd` (cross-entropy's second half) `binary_cross_entropy_with_logits` and `mse_loss`. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::NllLoss { ignore_index } => {
            one(c.arg(0)?.f_nll_loss_nd(c.arg(1)?, None::<Tensor>, tch::Reduction::Mean, *ignore_index)?)
        }
        Op::BceWithLogits => one(c.arg(0)?.f_binary_cross_entropy_with_logits(
            c.arg(1)?,
            None::<Tensor>,
            None::<Tensor>,
            tch::Reduction::Mean,
        )?),
        Op::MseLoss => one(c.arg(0)?.f_mse_loss(c.arg(1)?, tch::Reduction::Mean)?),
        other => Err(not_in_family(other)),
    }
}
