//! `headroom probe`: runs a plan for a few steps with the real trainer in a worker
//! process and sets the measured peak next to the estimate. On the CPU the measurement
//! is the exact counting allocator; on CUDA the caching allocator's peak allocated and
//! reserved, and NVML's device usage.

use std::path::PathBuf;

use shared::estimate::estimate_for;
use shared::plan::{Plan, Schedule};
use shared::protocol::Record;

use crate::jobs::JobRunner;

/// What one probe run measured, next to its estimate.
pub struct Outcome {
    pub plan: Plan,
    /// `None` for a TorchScript model, which has no description to estimate.
    pub estimate: Option<shared::Estimate>,
    pub summary: shared::protocol::Summary,
    pub device_used_peak: Option<u64>,
    pub rss_peak: u64,
    /// Wall time of each optimizer step (its micro-batches together), in milliseconds.
    pub step_ms: Vec<f64>,
}

/// Runs `plan` for `steps` steps on `device` in a worker process and measures it.
pub async fn measure(
    plan: Plan,
    device: &str,
    steps: u64,
    files: &system::job::JobFiles,
    exe: PathBuf,
) -> anyhow::Result<Outcome> {
    match try_measure(plan, device, steps, files, exe).await? {
        Ok(outcome) => Ok(outcome),
        Err(error) => anyhow::bail!("probe failed ({:?}): {}", error.code, error.message),
    }
}

/// As [`measure`], with the job's own failure (out of memory, say) as a value.
pub async fn try_measure(
    mut plan: Plan,
    device: &str,
    steps: u64,
    files: &system::job::JobFiles,
    exe: PathBuf,
) -> anyhow::Result<Result<Outcome, shared::protocol::JobError>> {
    plan.device = crate::input::parse_device_arg(device)?;
    plan.schedule = Schedule::Steps(steps);
    let machine = crate::devices::probe_machine(&exe).await;
    let (_, target) = crate::devices::target_for(&mut plan, &machine, &crate::devices::discover())?;
    let plan = machine.as_run_here(&plan);
    let estimate = match estimate_for(&plan, target) {
        Ok(e) => Some(e),
        Err(_) if is_script(&plan) => None,
        Err(e) => return Err(crate::input::bad_input(e.to_string())),
    };
    let runner = JobRunner::new(exe, 1);
    let mut job = runner.start(1, plan.clone(), estimate.as_ref().map_or(0, |e| e.peak_bytes.get()), files)?;
    let mut device_used_peak: Option<u64> = None;
    let mut rss_peak = 0u64;
    let mut step_ms: Vec<f64> = Vec::new();
    let summary = loop {
        match job.events.recv().await {
            Some(Record::Batch(r)) => {
                if let Some(u) = r.device_used_bytes {
                    device_used_peak = Some(device_used_peak.unwrap_or(0).max(u));
                }
                rss_peak = rss_peak.max(r.host_rss_bytes);
                let step = usize::try_from(r.step).unwrap_or(usize::MAX).saturating_sub(1);
                if step_ms.len() <= step {
                    step_ms.resize(step + 1, 0.0);
                }
                step_ms[step] += r.step_time_ms;
            }
            Some(Record::Finished { summary }) => break summary,
            Some(Record::Failed { error }) => return Ok(Err(error)),
            Some(Record::Event { .. }) => {}
            None => anyhow::bail!("the worker ended without a result"),
        }
    };
    Ok(Ok(Outcome { plan, estimate, summary, device_used_peak, rss_peak, step_ms }))
}

/// Whether the plan trains a TorchScript module (measured, never estimated).
pub fn is_script(plan: &Plan) -> bool {
    plan.model_name() == shared::zoo::SCRIPT
}

pub async fn probe(
    plan: Plan,
    device: &str,
    steps: u64,
    json: bool,
    files: &system::job::JobFiles,
    exe: PathBuf,
) -> anyhow::Result<()> {
    let Outcome { plan, estimate, summary, device_used_peak, rss_peak, step_ms } =
        measure(plan, device, steps, files, exe).await?;
    let measured_phases: serde_json::Map<String, serde_json::Value> =
        summary.phase_peaks.iter().map(|(p, b)| (p.key().to_owned(), (*b).into())).collect();
    let Some(estimate) = estimate else {
        // A TorchScript module: what was measured, with no estimate beside it.
        let out = serde_json::json!({
            "model": plan.name, "device": device, "steps": steps, "estimated": false,
            "estimated_peak_bytes": null, "measured_peak_bytes": summary.peak_bytes,
            "measured_phase_peaks": measured_phases, "measured_reserved_peak_bytes": summary.peak_reserved_bytes,
            "measured_device_used_bytes": device_used_peak, "measured_host_rss_peak_bytes": rss_peak,
            "first_loss": summary.first_loss, "final_loss": summary.final_loss,
            "wall_time_ms": summary.wall_time_ms, "step_times_ms": step_ms,
        });
        if json {
            println!("{out}");
        } else {
            println!(
                "{}: measured {} (a TorchScript module: no estimate; find-batch calibrates it), loss {:.4} -> {:.4}",
                plan.name,
                shared::Bytes(summary.peak_bytes),
                summary.first_loss,
                summary.final_loss
            );
        }
        return Ok(());
    };
    let mut est = crate::report::estimate_json(&estimate);
    let out = serde_json::json!({
        "model": plan.name,
        "device": device,
        "steps": steps,
        "params": estimate.params,
        "runtime": estimate.runtime.word(),
        "estimated_peak_bytes": estimate.peak_bytes.get(),
        "estimated_peak_bytes_low": estimate.peak_bytes_low.get(),
        "estimated_peak_bytes_high": estimate.peak_bytes_high.get(),
        "measured_peak_bytes": summary.peak_bytes,
        "error_pct": summary.estimate_error_pct(),
        "peak_phase": estimate.peak_phase.key(),
        "breakdown": est.get_mut("breakdown").map(serde_json::Value::take),
        "estimated_phase_peaks": est.get_mut("phase_peaks").map(serde_json::Value::take),
        "measured_phase_peaks": measured_phases,
        "estimated_reserved_peak_bytes": estimate.device.as_ref().map(|d| d.reserved_peak_bytes.get()),
        "measured_reserved_peak_bytes": summary.peak_reserved_bytes,
        "estimated_device_peak_bytes": estimate.device.as_ref().map(|d| d.device_peak_bytes.get()),
        "measured_device_used_bytes": device_used_peak,
        "estimated_host_peak_bytes": estimate.host_peak_bytes.get(),
        "measured_host_rss_peak_bytes": rss_peak,
        "first_loss": summary.first_loss,
        "final_loss": summary.final_loss,
        "wall_time_ms": summary.wall_time_ms,
        "step_times_ms": step_ms,
    });
    if json {
        println!("{out}");
    } else {
        println!(
            "{}: estimated {} measured {} ({:+.2} %), loss {:.4} -> {:.4}",
            plan.name,
            shared::Bytes(estimate.peak_bytes.get()),
            shared::Bytes(summary.peak_bytes),
            summary.estimate_error_pct(),
            summary.first_loss,
            summary.final_loss
        );
    }
    Ok(())
}
