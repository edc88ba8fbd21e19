//! The per-dimension convolutions and transposed convolutions (`conv2d`, `conv_transpose3d`…), not the generic `convolution`: autocast has rules for these, as for PyTorch's modules. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, i, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        // The per-dimension ops (conv2d, conv_transpose3d...), not the generic
        // `convolution`: autocast has rules for these, as for PyTorch's modules.
        Op::Conv { nd, stride, padding, groups, bias, .. } => {
            let b = if *bias { Some(c.arg(2)?) } else { None };
            let (s, pd, gr) = (i(*stride), i(*padding), i(*groups));
            let (x, w) = (c.arg(0)?, c.arg(1)?);
            one(match nd {
                1 => x.f_conv1d(w, b, [s], [pd], [1], gr)?,
                2 => x.f_conv2d(w, b, [s; 2], [pd; 2], [1; 2], gr)?,
                _ => x.f_conv3d(w, b, [s; 3], [pd; 3], [1; 3], gr)?,
            })
        }
        Op::ConvTranspose { nd, stride, padding, output_padding, bias, .. } => {
            let b = if *bias { Some(c.arg(2)?) } else { None };
            let (s, pd, op) = (i(*stride), i(*padding), i(*output_padding));
            let (x, w) = (c.arg(0)?, c.arg(1)?);
            one(match nd {
                1 => x.f_conv_transpose1d(w, b, [s], [pd], [op], 1, [1])?,
                2 => x.f_conv_transpose2d(w, b, [s; 2], [pd; 2], [op; 2], 1, [1; 2])?,
                _ => x.f_conv_transpose3d(w, b, [s; 3], [pd; 3], [op; 3], 1, [1; 3])?,
            })
        }
        other => Err(not_in_family(other)),
    }
}
