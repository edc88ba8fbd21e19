//! `F.scaled_dot_product_attention` and MONAI's shifted-window mask. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, compute_mask, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::Attention { causal, dropout, scale } => one(Tensor::f_scaled_dot_product_attention(
            c.arg(0)?,
            c.arg(1)?,
            c.arg(2)?,
            c.opt(3)?,
            *dropout,
            *causal,
            *scale,
            false,
        )?),
        Op::ShiftedWindowMask { padded, window, shift } => {
            one(compute_mask(*padded, *window, *shift, c.net.device)?.f_view(c.out_shape.as_slice())?)
        }
        other => Err(not_in_family(other)),
    }
}
