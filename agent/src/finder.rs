//! `headroom find-batch`: the largest micro-batch that fits a device with a margin, with
//! the accumulation that keeps the effective batch, found with as few real probe runs
//! as the memory model allows.
//!
//! The estimator proposes a micro-batch; two probe runs of the real trainer (each two
//! optimizer steps, the second in steady state) measure the peak at it and the divisor
//! of the effective batch below it; `peak(b) = fixed + per_sample x b` is fitted through
//! the two largest measured points and the largest divisor under the budget is read off
//! the line and probed, as a secant search does, until the line allows nothing between
//! the best fitting and the smallest failing micro-batch. The answer has always run
//! within the budget; the residual of the final line at every probed point says where
//! memory is not linear in the batch. `--compare` also runs the usual search — doubling
//! the micro-batch until a run fails, then bisecting — and reports its probe count.

use std::path::PathBuf;

use serde_json::json;
use shared::estimate::{Target, estimate_for};
use shared::plan::{Plan, limits};
use shared::protocol::ErrorCode;

use crate::devices::target_for;
use crate::input::bad_input;
use crate::probe::try_measure;

/// Optimizer steps per probe: the first creates the optimizer state, the second is the
/// steady state whose peak a run repeats.
const PROBE_STEPS: u64 = 2;
/// The most probe runs one search may make.
pub const MAX_PROBES: usize = 24;

/// What the finder was asked.
pub struct Request {
    pub plan: Plan,
    pub device: String,
    /// The device's memory (on the CPU, the budget the counting allocator enforces).
    pub capacity: Option<u64>,
    pub margin: f64,
    pub effective_batch: Option<u64>,
    pub compare: bool,
    /// Where the fitted line is stored (`calibration::default_path`); `None`: not stored.
    pub calibration: Option<PathBuf>,
    /// Files the probe jobs may read (a TorchScript module, data on disk).
    pub files: system::job::JobFiles,
}

#[derive(Clone, Debug)]
struct Probe {
    micro_batch: u64,
    /// Measured peak; `None` when the run ran out of memory.
    peak: Option<u64>,
}

struct Prober {
    plan: Plan,
    device: String,
    capacity: u64,
    effective: u64,
    files: system::job::JobFiles,
    exe: PathBuf,
    probes: Vec<Probe>,
}

impl Prober {
    /// Runs the plan at micro-batch `b` (accumulating, when the effective batch needs it,
    /// over two micro-batches: a step's peak is the same for any accumulation above 1).
    async fn run(&mut self, b: u64) -> anyhow::Result<Option<u64>> {
        if let Some(p) = self.probes.iter().find(|p| p.micro_batch == b) {
            return Ok(p.peak);
        }
        anyhow::ensure!(self.probes.len() < MAX_PROBES, "the search used {MAX_PROBES} probe runs without converging");
        let mut plan = self.plan.clone();
        plan.micro_batch = b;
        plan.accumulation = if self.effective / b > 1 { 2 } else { 1 };
        plan.memory_limit_bytes = Some(self.capacity);
        plan.memory_fraction = None;
        let peak = match try_measure(plan, &self.device, PROBE_STEPS, &self.files, self.exe.clone()).await? {
            Ok(outcome) => Some(outcome.summary.peak_bytes),
            Err(e) if e.code == ErrorCode::OutOfMemory => None,
            Err(e) => anyhow::bail!("probe at micro-batch {b} failed ({:?}): {}", e.code, e.message),
        };
        self.probes.push(Probe { micro_batch: b, peak });
        Ok(peak)
    }
}

fn divisors(e: u64) -> Vec<u64> {
    (1..=e.min(limits::MAX_MICRO_BATCH)).filter(|b| e.is_multiple_of(*b) && e / b <= limits::MAX_ACCUMULATION).collect()
}

/// The usual search, for comparison: double until a run does not fit, then bisect.
async fn doubling_search(p: &mut Prober, budget: u64, divs: &[u64]) -> anyhow::Result<Option<u64>> {
    let fits = |peak: Option<u64>| peak.is_some_and(|m| m <= budget);
    let (mut good, mut bad) = (None::<usize>, None::<usize>);
    let mut i = 0usize;
    loop {
        if fits(p.run(divs[i]).await?) {
            good = Some(i);
            if i + 1 == divs.len() {
                break;
            }
            i = (2 * i + 1).min(divs.len() - 1);
        } else {
            bad = Some(i);
            break;
        }
    }
    let (Some(mut lo), Some(mut hi)) = (good, bad) else { return Ok(good.map(|g| divs[g])) };
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(p.run(divs[mid]).await?) { lo = mid } else { hi = mid }
    }
    Ok(Some(divs[lo]))
}

/// The line `peak = fixed + per_sample × micro_batch` through the two largest measured
/// points, and those points (`NaN` and `None` until two exist).
struct Line {
    fixed: f64,
    per_sample: f64,
    fitted: Option<(u64, u64)>,
}

/// After the first two probes, like a secant search: fit the line through the two largest
/// measured points, probe the largest divisor it says fits between the best fitting and
/// the smallest failing micro-batch so far, and repeat until the line allows nothing new.
async fn secant(p: &mut Prober, divs: &[u64], budget: u64) -> anyhow::Result<Line> {
    let fits = |q: &Probe| q.peak.is_some_and(|m| m <= budget);
    let (mut fixed, mut per_sample) = (f64::NAN, f64::NAN);
    let mut fitted: Option<(u64, u64)> = None;
    loop {
        let best = p.probes.iter().filter(|q| fits(q)).map(|q| q.micro_batch).max();
        let failing = p.probes.iter().filter(|q| !fits(q)).map(|q| q.micro_batch).min();
        let mut measured: Vec<(u64, u64)> = p.probes.iter().filter_map(|q| Some((q.micro_batch, q.peak?))).collect();
        measured.sort_unstable();
        let line = match measured.as_slice() {
            [.., (b1, m1), (b2, m2)] => {
                let slope = ((*m2 as f64 - *m1 as f64) / (b2 - b1) as f64).max(0.0);
                fitted = Some((*b1, *b2));
                Some((*m1 as f64 - slope * *b1 as f64, slope))
            }
            _ => None,
        };
        let next = match (best, line) {
            (None, _) => {
                // Nothing fits yet: the next smaller divisor below the smallest failure.
                let below = failing.unwrap_or(divs[0]);
                divs.iter().rev().find(|&&d| d < below).copied()
            }
            (Some(best), Some((f, s))) => {
                (fixed, per_sample) = (f, s);
                divs.iter()
                    .rev()
                    .find(|&&d| d > best && failing.is_none_or(|x| d < x) && f + s * d as f64 <= budget as f64)
                    .copied()
            }
            (Some(_), None) => None,
        };
        match next {
            Some(b) => {
                p.run(b).await?;
            }
            None => break,
        }
    }
    Ok(Line { fixed, per_sample, fitted })
}

/// Stores the fitted line as a calibration for this plan on this device, when both points
/// accumulate alike (the line holds for one side of that boundary only).
fn store_line(
    path: &std::path::Path,
    plan: &Plan,
    device_name: &str,
    effective: u64,
    (b1, b2): (u64, u64),
    fixed: f64,
    per_sample: f64,
) -> anyhow::Result<Option<String>> {
    if !(fixed.is_finite() && per_sample.is_finite() && (effective / b1 > 1) == (effective / b2 > 1)) {
        return Ok(None);
    }
    let entry = crate::calibration::Entry {
        key: crate::calibration::key(plan),
        device: device_name.to_owned(),
        accumulating: effective / b2 > 1,
        fixed_bytes: fixed.round(),
        per_sample_bytes: per_sample.round(),
        micro_batches: vec![b1, b2],
    };
    crate::calibration::store(path, entry)?;
    Ok(Some(path.display().to_string()))
}

pub async fn find(req: Request, json_out: bool, exe: PathBuf) -> anyhow::Result<()> {
    if !(req.margin.is_finite() && (0.0..=0.9).contains(&req.margin)) {
        return Err(bad_input(format!("--margin: must be in [0, 0.9], got {}", req.margin)));
    }
    let mut plan = req.plan.clone();
    plan.device = crate::input::parse_device_arg(&req.device)?;
    let machine = crate::devices::probe_machine(&exe).await;
    let (_, target) = target_for(&mut plan, &machine, &crate::devices::discover())?;
    let capacity = match (req.capacity, target) {
        (Some(c), _) => c,
        (None, Target::Cuda(g)) => plan.memory_cap(g.memory_bytes).unwrap_or(g.memory_bytes),
        (None, Target::Cpu) => {
            return Err(bad_input("--capacity: give the memory to fit on the CPU, e.g. --capacity 2GiB".into()));
        }
    };
    let effective = req.effective_batch.unwrap_or(plan.micro_batch * plan.accumulation);
    if effective == 0 || effective > limits::MAX_MICRO_BATCH * limits::MAX_ACCUMULATION {
        return Err(bad_input(format!(
            "--effective-batch: must be 1 to {}",
            limits::MAX_MICRO_BATCH * limits::MAX_ACCUMULATION
        )));
    }
    let budget = (capacity as f64 * (1.0 - req.margin)) as u64;
    let divs = divisors(effective);
    if divs.is_empty() {
        return Err(bad_input(format!(
            "--effective-batch: {effective} has no micro-batch up to {} with an accumulation up to {}",
            limits::MAX_MICRO_BATCH,
            limits::MAX_ACCUMULATION
        )));
    }
    // The estimator's proposal: the largest divisor whose point estimate fits (the probes
    // are the check).
    let here = machine.as_run_here(&plan);
    let estimate_of = |b: u64| {
        let mut p = here.clone();
        p.micro_batch = b;
        p.accumulation = if effective / b > 1 { 2 } else { 1 };
        estimate_for(&p, target).map(|e| e.device.map_or(e.peak_bytes.get(), |d| d.device_peak_bytes.get()))
    };
    let mut proposal = divs[0];
    for &b in &divs {
        match estimate_of(b) {
            Ok(m) if m <= budget => proposal = b,
            _ => break,
        }
    }
    let mut p = Prober {
        plan: plan.clone(),
        device: req.device.clone(),
        capacity,
        effective,
        files: req.files.clone(),
        exe: exe.clone(),
        probes: Vec::new(),
    };
    // Two points for the first line: the proposal and the divisor below it (or above, at 1).
    let at = divs.iter().position(|&d| d == proposal).unwrap_or(0);
    let other = if at > 0 { divs[at - 1] } else { divs.get(1).copied().unwrap_or(divs[0]) };
    p.run(proposal.min(other)).await?;
    p.run(proposal.max(other)).await?;
    let Line { fixed, per_sample, fitted } = secant(&mut p, &divs, budget).await?;
    let fits = |q: &Probe| q.peak.is_some_and(|m| m <= budget);
    let chosen = p.probes.iter().filter(|q| fits(q)).map(|q| q.micro_batch).max();
    let predict = |b: u64| fixed + per_sample * b as f64;
    let probes_used = p.probes.len();
    let residuals: Vec<serde_json::Value> = p
        .probes
        .iter()
        .filter_map(|q| {
            let m = q.peak? as f64;
            let r = 100.0 * (m - predict(q.micro_batch)) / m;
            Some(json!({"micro_batch": q.micro_batch, "residual_pct": r.is_finite().then_some(r)}))
        })
        .collect();
    let probes_json: Vec<serde_json::Value> = p
        .probes
        .iter()
        .map(|q| json!({"micro_batch": q.micro_batch, "peak_bytes": q.peak, "fits": q.peak.is_some_and(|m| m <= budget)}))
        .collect();
    // The line, for later estimates of this model and knobs on this device.
    let device_name = match target {
        Target::Cuda(g) => g.name.to_owned(),
        Target::Cpu => "cpu".to_owned(),
    };
    let stored = match (&req.calibration, fitted) {
        (Some(path), Some(points)) => store_line(path, &plan, &device_name, effective, points, fixed, per_sample)?,
        _ => None,
    };
    let comparison = if req.compare {
        let mut base = Prober {
            plan: plan.clone(),
            device: req.device.clone(),
            capacity,
            effective,
            files: req.files.clone(),
            exe,
            probes: Vec::new(),
        };
        let answer = doubling_search(&mut base, budget, &divs).await?;
        Some(json!({"strategy": "double then bisect", "micro_batch": answer, "probe_count": base.probes.len()}))
    } else {
        None
    };
    let out = json!({
        "effective_batch": effective,
        "micro_batch": chosen,
        "accumulation": chosen.map(|b| effective / b),
        "capacity_bytes": capacity,
        "budget_bytes": budget,
        "margin": req.margin,
        "estimated_micro_batch": proposal,
        "fixed_bytes": fixed.is_finite().then_some(fixed.round()),
        "per_sample_bytes": per_sample.is_finite().then_some(per_sample.round()),
        "residuals": residuals,
        "probes": probes_json,
        "probe_count": probes_used,
        "search": comparison,
        "calibration": stored,
    });
    if json_out {
        println!("{out}");
    } else {
        match chosen {
            Some(b) => println!(
                "micro-batch {b} x {} accumulation (effective batch {effective}) fits {} of {} ({} probe runs; the estimator proposed {proposal})",
                effective / b,
                shared::Bytes(budget),
                shared::Bytes(capacity),
                probes_used
            ),
            None => println!("even micro-batch 1 does not fit {} ({} probe runs)", shared::Bytes(budget), probes_used),
        }
    }
    if chosen.is_none() {
        return Err(bad_input(format!(
            "nothing fits {} with the margin: micro-batch 1 ran out of memory or over budget",
            shared::Bytes(budget)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_respect_the_plan_limits() {
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        // A micro-batch of 1 would need more accumulation steps than a plan allows.
        let big = limits::MAX_ACCUMULATION * 3;
        assert_eq!(divisors(big).first(), Some(&3));
        // 2^40 has no divisor within both limits (2^16 x 2^12 = 2^28).
        assert!(divisors(1 << 40).is_empty());
    }
}
