//! Leak detection: allocated memory read at the same point of every optimizer step (after
//! `optimizer.step()`) stays flat in a healthy job once the optimizer state exists. A
//! sustained rise is a leak (W2's "out of memory after epoch 38"): reported with its rate
//! and, given a capacity, when it will hit it.

use serde::{Deserialize, Serialize};

/// Steps read before judging (the first ones create optimizer state and caches).
pub const WARMUP_STEPS: u64 = 2;
/// Step-end readings a judgement looks at.
pub const WINDOW: usize = 8;
/// The smallest rise over the window that counts, whatever the job's size.
pub const MIN_RISE_BYTES: u64 = 256 << 10;
/// The smallest rise over the window that counts, as a share of the job's memory.
pub const MIN_RISE_SHARE: f64 = 0.005;

/// What a detector reports once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeakWarning {
    /// Least-squares growth of step-end allocated memory.
    pub bytes_per_step: u64,
    pub bytes_per_epoch: u64,
    /// Steps from now until allocated memory reaches the capacity, when one is known.
    pub steps_to_capacity: Option<u64>,
    /// Step-end allocated memory now.
    pub allocated_bytes: u64,
}

/// Watches step-end readings and warns once on a sustained rise.
#[derive(Clone, Debug, Default)]
pub struct LeakDetector {
    readings: Vec<u64>,
    warned: bool,
}

impl LeakDetector {
    /// Adds the reading after step `step` (1-based); returns a warning the first time the
    /// last [`WINDOW`] readings rise at every step but at most one, by at least
    /// [`MIN_RISE_BYTES`] and [`MIN_RISE_SHARE`] of their mean.
    pub fn push(
        &mut self,
        step: u64,
        allocated: u64,
        steps_per_epoch: u64,
        capacity: Option<u64>,
    ) -> Option<LeakWarning> {
        if step <= WARMUP_STEPS || self.warned {
            return None;
        }
        self.readings.push(allocated);
        if self.readings.len() > WINDOW {
            self.readings.remove(0);
        }
        if self.readings.len() < WINDOW {
            return None;
        }
        let r = &self.readings;
        let rises = r.windows(2).filter(|w| w[1] > w[0]).count();
        let n = r.len() as f64;
        let mean_x = (n - 1.0) / 2.0;
        let mean_y = r.iter().map(|&v| v as f64).sum::<f64>() / n;
        let (mut sxy, mut sxx) = (0.0, 0.0);
        for (i, &v) in r.iter().enumerate() {
            let dx = i as f64 - mean_x;
            sxy += dx * (v as f64 - mean_y);
            sxx += dx * dx;
        }
        let slope = sxy / sxx;
        let rise = slope * (n - 1.0);
        if rises + 1 < r.len() - 1 || rise < MIN_RISE_BYTES as f64 || rise < MIN_RISE_SHARE * mean_y {
            return None;
        }
        self.warned = true;
        let per_step = slope.round() as u64;
        Some(LeakWarning {
            bytes_per_step: per_step,
            bytes_per_epoch: per_step.saturating_mul(steps_per_epoch),
            steps_to_capacity: capacity.map(|c| c.saturating_sub(allocated).div_ceil(per_step.max(1))),
            allocated_bytes: allocated,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(series: impl Iterator<Item = u64>, capacity: Option<u64>) -> Option<(u64, LeakWarning)> {
        let mut d = LeakDetector::default();
        for (i, v) in series.enumerate() {
            let step = i as u64 + 1;
            if let Some(w) = d.push(step, v, 100, capacity) {
                return Some((step, w));
            }
        }
        None
    }

    #[test]
    fn a_steady_rise_is_flagged_with_its_rate_and_time_to_capacity() {
        let mib = 1u64 << 20;
        let (step, w) = run((0..40).map(|s| 500 * mib + s * mib), Some(1024 * mib)).expect("a leak");
        assert_eq!(step, WARMUP_STEPS + WINDOW as u64, "flagged as soon as the window is full");
        assert_eq!(w.bytes_per_step, mib);
        assert_eq!(w.bytes_per_epoch, 100 * mib);
        assert_eq!(w.steps_to_capacity, Some(1024 - 500 - 9));
    }

    #[test]
    fn flat_noisy_and_one_off_growth_are_not_flagged() {
        let mib = 1u64 << 20;
        assert!(run(std::iter::repeat_n(300 * mib, 100), None).is_none(), "flat");
        // Noise around a level: rises and falls.
        assert!(run((0..100).map(|s| 300 * mib + (s % 3) * mib), None).is_none(), "noise");
        // A one-off step up (a cache filled once) and flat after.
        assert!(run((0..100).map(|s| if s < 20 { 300 * mib } else { 340 * mib }), None).is_none(), "one step");
        // A rise too small to matter (64 KiB a step on 1 GiB).
        assert!(run((0..100).map(|s| 1024 * mib + s * (16 << 10)), None).is_none(), "tiny");
        // The warm-up steps' growth is not judged.
        assert!(run((0..100).map(|s| if s < 2 { s * 100 * mib } else { 300 * mib }), None).is_none(), "warm-up");
    }
}
