//! Embedding, indexing, MONAI's one-hot and max pooling. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::{Kind, Tensor};

use super::{Call, i, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::Embedding => one(Tensor::f_embedding(c.arg(0)?, c.arg(1)?, -1, false, false)?),
        Op::MaxPool { nd, kernel, stride, padding } => {
            let (k, s, pd) = (i(*kernel), i(*stride), i(*padding));
            let x = c.arg(0)?;
            one(match nd {
                3 => x.f_max_pool3d([k; 3], [s; 3], [pd; 3], [1; 3], false)?,
                1 => x.f_max_pool1d([k], [s], [pd], [1], false)?,
                _ => x.f_max_pool2d([k; 2], [s; 2], [pd; 2], [1; 2], false)?,
            })
        }
        Op::AvgPool { nd, kernel, stride, padding } => {
            let (k, s, pd) = (i(*kernel), i(*stride), i(*padding));
            let x = c.arg(0)?;
            one(match nd {
                3 => x.f_avg_pool3d([k; 3], [s; 3], [pd; 3], false, true, None)?,
                1 => x.f_avg_pool1d([k], [s], [pd], false, true)?,
                _ => x.f_avg_pool2d([k; 2], [s; 2], [pd; 2], false, true, None)?,
            })
        }
        Op::Upsample { linear, align_corners, size, scales } => {
            let x = c.arg(0)?;
            let out: Vec<i64> = size.iter().map(|&s| i(s)).collect();
            let sc = |k: usize| scales.get(k).copied();
            one(match (size.len(), linear) {
                (1, false) => x.f_upsample_nearest1d(&out, sc(0))?,
                (2, false) => x.f_upsample_nearest2d(&out, sc(0), sc(1))?,
                (3, false) => x.f_upsample_nearest3d(&out, sc(0), sc(1), sc(2))?,
                (1, true) => x.f_upsample_linear1d(&out, *align_corners, sc(0))?,
                (2, true) => x.f_upsample_bilinear2d(&out, *align_corners, sc(0), sc(1))?,
                _ => x.f_upsample_trilinear3d(&out, *align_corners, sc(0), sc(1), sc(2))?,
            })
        }
        Op::Arange { end } => one(Tensor::f_arange(i(*end), (Kind::Int64, c.net.device))?),
        Op::Gather { dim } => one(c.arg(0)?.f_gather(i(*dim as u64), c.arg(1)?, false)?),
        Op::IndexRows => {
            let x = c.arg(0)?;
            let b = x.size()[0];
            let rows = Tensor::f_arange(b, (Kind::Int64, x.device()))?;
            one(x.f_index(&[Some(&rows), Some(c.arg(1)?)])?)
        }
        Op::Index => one(c.arg(0)?.f_index(&[Some(c.arg(1)?)])?),
        // MONAI's one_hot: zeros, then scatter_ of ones at labels.long().
        Op::OneHot { .. } => {
            let labels = c.arg(0)?;
            let mut o = Tensor::f_zeros(c.out_shape.as_slice(), (Kind::Float, labels.device()))?;
            let idx = labels.f_to_kind(Kind::Int64)?;
            let _ = o.f_scatter_value_(1, &idx, 1.0)?;
            one(o)
        }
        other => Err(not_in_family(other)),
    }
}
