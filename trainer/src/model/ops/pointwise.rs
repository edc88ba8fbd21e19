//! Element-wise ops, in place where the reference is: activations, scalar arithmetic, casts, dropout, binary ops. One tch call per op, the call its reference makes.

use shared::graph::{Cmp, Op};
use tch::{Kind, Tensor};

use super::{Call, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::Prelu => one(c.arg(0)?.f_prelu(c.arg(1)?)?),
        Op::Relu { inplace: false } => one(c.arg(0)?.f_relu()?),
        Op::Relu { inplace: true } => one(c.arg(0)?.shallow_clone().f_relu_()?),
        // Slope 0.01: PyTorch's default and MONAI's choice.
        Op::LeakyRelu { inplace: false } => one(c.arg(0)?.f_leaky_relu()?),
        Op::LeakyRelu { inplace: true } => one(c.arg(0)?.shallow_clone().f_leaky_relu_()?),
        Op::Gelu { tanh } => one(c.arg(0)?.f_gelu(if *tanh { "tanh" } else { "none" })?),
        Op::Sigmoid => one(c.arg(0)?.f_sigmoid()?),
        // The graph holds ReLU6's (0, 6) or the default (-1, 1), the two libtorch's C API
        // offers: `relu6` is ATen's `hardtanh(x, 0, 6)`, the same autograd node.
        Op::Hardtanh { min, inplace: false, .. } if *min == 0.0 => one(c.arg(0)?.f_relu6()?),
        Op::Hardtanh { min, inplace: true, .. } if *min == 0.0 => one(c.arg(0)?.shallow_clone().f_relu6_()?),
        Op::Hardtanh { inplace: false, .. } => one(c.arg(0)?.f_hardtanh()?),
        Op::Hardtanh { inplace: true, .. } => one(c.arg(0)?.shallow_clone().f_hardtanh_()?),
        Op::Silu { inplace: false } => one(c.arg(0)?.f_silu()?),
        Op::Silu { inplace: true } => one(c.arg(0)?.shallow_clone().f_silu_()?),
        Op::Hardswish { inplace: false } => one(c.arg(0)?.f_hardswish()?),
        Op::Hardswish { inplace: true } => one(c.arg(0)?.shallow_clone().f_hardswish_()?),
        Op::Hardsigmoid { inplace: false } => one(c.arg(0)?.f_hardsigmoid()?),
        Op::Hardsigmoid { inplace: true } => one(c.arg(0)?.shallow_clone().f_hardsigmoid_()?),
        Op::Tanh => one(c.arg(0)?.f_tanh()?),
        Op::Exp => one(c.arg(0)?.f_exp()?),
        Op::Add => one(c.arg(0)?.f_add(c.arg(1)?)?),
        Op::Sub => one(c.arg(0)?.f_sub(c.arg(1)?)?),
        Op::Mul => one(c.arg(0)?.f_mul(c.arg(1)?)?),
        Op::Div => one(c.arg(0)?.f_div(c.arg(1)?)?),
        Op::AddInplace => one(c.arg(0)?.shallow_clone().f_add_(c.arg(1)?)?),
        Op::MulScalar { s } => one(c.arg(0)?.f_mul_scalar(*s)?),
        Op::AddScalar { s } => one(c.arg(0)?.f_add_scalar(*s)?),
        Op::RsubScalar { s } => one(c.arg(0)?.f_rsub_scalar(*s)?),
        Op::PowScalar { e } => one(c.arg(0)?.f_pow_tensor_scalar(*e)?),
        Op::ClampMin { min } => one(c.arg(0)?.f_clamp_min(*min)?),
        // F.dropout in training: at::dropout, whose CPU path keeps a float noise tensor.
        Op::Dropout { p, inplace: false } => one(c.arg(0)?.f_dropout(*p, c.net.training)?),
        Op::Dropout { p, inplace: true } => one(c.arg(0)?.shallow_clone().f_dropout_(*p, c.net.training)?),
        Op::ToF32 => one(c.arg(0)?.f_to_kind(Kind::Float)?),
        Op::CastLike => one(c.arg(0)?.f_to_kind(c.arg(1)?.kind())?),
        Op::ToI64 => one(c.arg(0)?.f_to_kind(Kind::Int64)?),
        Op::CompareScalar { cmp, s } => {
            let x = c.arg(0)?;
            one(match cmp {
                Cmp::Eq => x.f_eq(*s)?,
                Cmp::Ne => x.f_ne(*s)?,
                Cmp::Lt => x.f_lt(*s)?,
                Cmp::Le => x.f_le(*s)?,
                Cmp::Gt => x.f_gt(*s)?,
                Cmp::Ge => x.f_ge(*s)?,
            })
        }
        other => Err(not_in_family(other)),
    }
}
