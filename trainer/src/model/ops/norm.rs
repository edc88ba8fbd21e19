//! Batch norm (counting its batches, momentum 0.1), instance norm and layer norm. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::BatchNorm { eps } => {
            // nn.BatchNorm counts its batches, then calls F.batch_norm (momentum 0.1).
            if c.net.training {
                tch::no_grad(|| c.arg(5)?.shallow_clone().f_add_scalar_(1).map(drop))?;
            }
            one(Tensor::f_batch_norm(
                c.arg(0)?,
                Some(c.arg(1)?),
                Some(c.arg(2)?),
                Some(c.arg(3)?),
                Some(c.arg(4)?),
                c.net.training,
                0.1,
                *eps,
                true,
            )?)
        }
        Op::InstanceNorm { eps } => one(Tensor::f_instance_norm(
            c.arg(0)?,
            None::<&Tensor>,
            None::<&Tensor>,
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            *eps,
            true,
        )?),
        Op::LayerNorm { eps, affine } => {
            let x = c.arg(0)?;
            let d = x.size().last().copied().unwrap_or(1);
            one(if *affine {
                x.f_layer_norm([d], Some(c.arg(1)?), Some(c.arg(2)?), *eps, true)?
            } else {
                x.f_layer_norm([d], None::<&Tensor>, None::<&Tensor>, *eps, true)?
            })
        }
        other => Err(not_in_family(other)),
    }
}
