//! Parameters, `Release` markers and a TorchScript module's call. One tch call per op, the call its reference makes.

use shared::graph::Op;
use tch::Tensor;

use super::{Call, not_in_family, one};

/// This family's ops (`ops::run` sends no other op here).
pub(super) fn run(c: &Call<'_>, op: &Op) -> Result<Vec<Tensor>, tch::TchError> {
    match op {
        Op::Param => one(c.net.params[c.node.params[0]].shallow_clone()),
        Op::Release => Ok(Vec::new()),
        Op::Script => {
            let script = c
                .net
                .script
                .as_ref()
                .ok_or_else(|| tch::TchError::Torch("a TorchScript node without its module".to_owned()))?;
            let mut m = script.module.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if c.net.training {
                m.set_train();
            } else {
                m.set_eval();
            }
            let out = m.forward_ts(&[c.arg(0)?])?;
            if out.size() != c.out_shape {
                return Err(tch::TchError::Shape(format!(
                    "the TorchScript module returned {:?}; the plan says [batch, num_classes] = {:?}",
                    out.size(),
                    c.out_shape
                )));
            }
            one(out)
        }
        other => Err(not_in_family(other)),
    }
}
