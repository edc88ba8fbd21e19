//! The validation pass, in eval mode under no_grad, on a second `Net` that shares the
//! training weights.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::Device;

use crate::data;
use crate::error::TrainError;
use crate::memory::Meter;
use crate::model;

use super::{Held, to_tensors};

/// What one validation pass measured.
pub(super) struct Validated {
    pub loss: f64,
    pub peak: u64,
    pub reserved_peak: Option<u64>,
}

/// The validation pass: `model.eval()` and `torch.no_grad()`, then per batch `vb =
/// next(val_loader)`, `out = model(vb.x)`, `loss = loss_fn(out, vb.y)`, as the loop
/// writes it. The training loop's own variables stay bound meanwhile; the pass's go when
/// it returns.
pub(super) fn validate(
    net: &model::Net,
    batches: u64,
    data: Option<&data::Dataset>,
    seed: u64,
    device: Device,
    meter: Meter,
    stop: &AtomicBool,
) -> Result<Validated, TrainError> {
    meter.reset_peak();
    let mut total = 0.0;
    tch::no_grad(|| -> Result<(), TrainError> {
        let mut held = Held::default();
        let mut order: data::Order = None;
        for k in 0..batches {
            if stop.load(Ordering::Relaxed) {
                return Err(TrainError::Cancelled);
            }
            // The same validation samples every pass, in order from the first.
            held.batch = match data {
                Some(d) => {
                    let b = net.graph.micro_batch();
                    to_tensors(d.batch(k * b, b as usize, seed, &mut order)?, device)?
                }
                None => crate::synthetic::make_batch(&net.graph, device)?,
            };
            let mut previous = std::mem::take(&mut held.returned);
            let mut moment = |m: model::Moment| {
                if let model::Moment::Returned = m {
                    previous.clear();
                }
            };
            // SAFETY: the validation model has no checkpointed regions, so nothing calls
            // back into it after `forward` returns; `net` outlives `held`.
            let model::Forward { returned, loss, .. } = unsafe { net.forward(&held.batch, &mut moment, None)? };
            drop(previous);
            total += loss.f_double_value(&[])?;
            held.loss = Some(loss);
            held.returned = returned;
        }
        Ok(())
    })?;
    if let Meter::Cuda(index) = meter {
        tch::Cuda::synchronize(i64::from(index));
    }
    let reading = meter.read();
    Ok(Validated { loss: total / batches.max(1) as f64, peak: reading.peak, reserved_peak: reading.reserved_peak })
}
