//! The training loop's small parts, each with its own state: the per-phase peak meter,
//! the run's counters, fp16's dynamic loss scale and the host memory guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use shared::estimate::Phase;
use shared::protocol::JobEvent;
use system::host::HostHeadroom;
use tch::{Kind, Tensor};

use crate::data;
use crate::error::TrainError;
use crate::memory::Meter;
use crate::model::Net;

/// Tracks the highest tensor memory per phase of the current step.
pub(super) struct PhaseMeter {
    pub meter: Meter,
    pub peaks: [u64; Phase::ALL.len()],
    /// Highest reserved bytes over the whole run (CUDA): read at the end of every phase,
    /// because each phase starts a new peak window.
    pub reserved_peak: Option<u64>,
}

impl PhaseMeter {
    pub fn new(meter: Meter) -> PhaseMeter {
        PhaseMeter { meter, peaks: [0; Phase::ALL.len()], reserved_peak: None }
    }

    /// Every phase starts a new peak window.
    pub fn begin(&mut self, _phase: Phase) {
        self.meter.reset_peak();
    }

    /// The phase's peak, kept as the step's peak of that phase.
    pub fn end(&mut self, phase: Phase) -> u64 {
        let reading = self.meter.read();
        self.see_reserved(reading.reserved_peak);
        let peak = reading.peak;
        let slot = &mut self.peaks[phase.index()];
        *slot = (*slot).max(peak);
        peak
    }

    pub fn see_reserved(&mut self, reserved_peak: Option<u64>) {
        if let Some(r) = reserved_peak {
            self.reserved_peak = Some(self.reserved_peak.unwrap_or(0).max(r));
        }
    }
}

/// What the run has counted so far: the summary's figures, and what a checkpoint keeps
/// so that a resumed run goes on counting.
#[derive(Clone, Debug, Default)]
pub(super) struct Counters {
    pub micro_batches: u64,
    pub first_loss: Option<f64>,
    pub final_loss: Option<f64>,
    /// The highest tensor peak of any micro-batch or validation pass.
    pub run_peak: u64,
    pub peak_rss: u64,
    pub validation_peak: Option<u64>,
}

impl Counters {
    pub fn loss(&mut self, value: f64) {
        self.first_loss.get_or_insert(value);
        self.final_loss = Some(value);
    }
}

/// fp16's dynamic loss scale, as `torch.amp.GradScaler` keeps it: the scale and the
/// clean steps since it last changed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct LossScaler {
    pub scale: f64,
    pub clean: u64,
    growth_interval: u64,
}

impl LossScaler {
    pub fn new(scale: f64, growth_interval: u64) -> LossScaler {
        LossScaler { scale, clean: 0, growth_interval }
    }

    /// `scaler.unscale_(optimizer)` and the scale's update: gradients divided by the
    /// scale and checked for inf and NaN (through each one's sum, one at a time). Returns
    /// the new scale when the step must be skipped (it backs off), else `None`.
    pub fn unscale(&mut self, net: &Net) -> Result<Option<f64>, TrainError> {
        let inv = 1.0 / self.scale;
        let mut found_inf = false;
        for g in net.trainable().map(Tensor::grad).filter(Tensor::defined) {
            let _ = g.shallow_clone().f_mul_scalar_(inv)?;
            found_inf = found_inf || !g.f_sum(Kind::Float)?.f_double_value(&[])?.is_finite();
        }
        if found_inf {
            self.scale *= 0.5;
            self.clean = 0;
            return Ok(Some(self.scale));
        }
        self.clean += 1;
        if self.clean >= self.growth_interval {
            self.scale *= 2.0;
            self.clean = 0;
        }
        Ok(None)
    }
}

/// The host memory guard: room for two more batches and 8 MiB, else the loader is
/// lowered; lowered to nothing and still short, the job stops. Loader workers also wait
/// before making a batch there is no room for, counting the batches other workers are
/// still making.
pub(super) struct HostGuard {
    /// Bytes of one batch in host memory.
    batch_bytes: u64,
    /// What must stay free for the next batches.
    reserve: u64,
    plan_limit: Option<u64>,
    /// How far a step's tensors rise above the resident set between steps (measured
    /// over the last step with `VmHWM`; at first the estimate's), shared with the
    /// loader's workers.
    swing: Arc<AtomicU64>,
    /// Micro-batches before the guard may act again.
    cooldown: u64,
}

impl HostGuard {
    pub fn new(batch_bytes: u64, plan_limit: Option<u64>, first_swing: u64) -> HostGuard {
        HostGuard {
            batch_bytes,
            reserve: 2 * batch_bytes + (8 << 20),
            plan_limit,
            swing: Arc::new(AtomicU64::new(first_swing)),
            cooldown: 0,
        }
    }

    /// The loader's test before each batch it makes: room for it and for the batches
    /// other workers are making, beyond the reserve.
    pub fn room(&self) -> data::Room {
        let (swing, limit, reserve, batch) = (Arc::clone(&self.swing), self.plan_limit, self.reserve, self.batch_bytes);
        Box::new(move |making| {
            let room = system::host::headroom(system::host::rss_bytes(), swing.load(Ordering::Relaxed), limit);
            room.bytes >= reserve + batch.saturating_mul(making + 1)
        })
    }

    /// After a micro-batch: learns the step's swing (at a step's end, when the `VmHWM`
    /// window covered it), then lowers the loader or stops the job when the room is short.
    /// Returns the resident set it saw, and the event to report if it lowered the loader.
    pub fn check(
        &mut self,
        step: u64,
        step_end: bool,
        rss_window: bool,
        loader: Option<&data::Loader>,
    ) -> Result<(u64, Option<JobEvent>), TrainError> {
        let mut rss = system::host::rss_bytes();
        if step_end && let Some(hwm) = system::host::peak_rss_bytes().filter(|_| rss_window) {
            self.swing.store(hwm.saturating_sub(rss), Ordering::Relaxed);
        }
        let ahead = self.swing.load(Ordering::Relaxed);
        let mut room = system::host::headroom(rss, ahead, self.plan_limit);
        self.cooldown = self.cooldown.saturating_sub(1);
        if room.bytes >= self.reserve || self.cooldown > 0 {
            return Ok((rss, None));
        }
        // What the allocator merely caches does not count: give it back first.
        rss = system::host::trim();
        room = system::host::headroom(rss, ahead, self.plan_limit);
        if room.bytes >= self.reserve {
            return Ok((rss, None));
        }
        match loader.and_then(data::Loader::reduce) {
            Some((workers, prefetch)) => {
                // Workers already wait for room before each batch; give the lower
                // setting a batch to show its effect.
                self.cooldown = 2;
                Ok((
                    rss,
                    Some(JobEvent::HostMemoryLow {
                        workers: workers as u64,
                        prefetch: prefetch as u64,
                        rss_bytes: rss,
                        headroom_bytes: room.bytes,
                        bound: room.bound.to_owned(),
                    }),
                ))
            }
            None => Err(self.stopped(step, rss, ahead, &room, loader.is_some())),
        }
    }

    fn stopped(&self, step: u64, rss: u64, ahead: u64, room: &HostHeadroom, has_loader: bool) -> TrainError {
        TrainError::HostMemory(format!(
            "stopped at step {step}: the worker holds {} (with {} more at the step's peak) and {} leaves {} ({} needed for the next batches); {}",
            shared::Bytes(rss),
            shared::Bytes(ahead),
            room.bound,
            shared::Bytes(room.bytes),
            shared::Bytes(self.reserve),
            if has_loader { "the loader is already at 0 workers" } else { "there is no loader to lower" }
        ))
    }
}
