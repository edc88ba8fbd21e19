//! `headroom run`: one job on this machine, in a worker process, as the agent runs
//! jobs: a JSON line per micro-batch on stdout, a progress bar on a terminal, then the
//! summary next to the estimate (or a calibration from `find-batch`).

use std::io::IsTerminal;
use std::path::PathBuf;

use shared::plan::Plan;
use shared::protocol::Record;

use crate::input::BadInput;
use crate::jobs::JobRunner;

pub async fn run(mut plan: Plan, files: system::job::JobFiles, exe: PathBuf) -> anyhow::Result<()> {
    let machine = crate::devices::probe_machine(&exe).await;
    let (_, target) = crate::devices::target_for(&mut plan, &machine, &crate::devices::discover())?;
    // Calibrations are stored under the plan as given (find-batch's key).
    let given = plan.clone();
    let plan = machine.as_run_here(&plan);
    // A TorchScript module has no estimate; a calibration from find-batch stands in.
    let estimated = match shared::estimate::estimate_for(&plan, target) {
        Ok(e) => Some(e.peak_bytes.get()),
        Err(_) if crate::probe::is_script(&plan) => None,
        Err(e) => return Err(BadInput(e.to_string()).into()),
    };
    let device_name = match target {
        shared::estimate::Target::Cuda(g) => g.name.to_owned(),
        shared::estimate::Target::Cpu => "cpu".to_owned(),
    };
    let calibrated = match crate::calibration::default_path(None) {
        Some(path) => crate::calibration::lookup(&path, &given, &device_name)?.map(|(peak, _)| peak.round() as u64),
        None => None,
    };
    let total = plan.total_steps() * plan.accumulation;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} micro-batches  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let runner = JobRunner::new(exe, 1);
    let mut job = runner.start(1, plan, estimated.or(calibrated).unwrap_or(0), &files)?;
    let mut stdout = std::io::stdout().lock();
    use std::io::Write;
    while let Some(event) = job.events.recv().await {
        match event {
            Record::Batch(r) => {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({
                        "step": r.step, "epoch": r.epoch, "micro_batch": r.micro_batch, "loss": r.loss,
                        "allocated_bytes": r.allocated_bytes, "peak_bytes": r.peak_bytes,
                        "reserved_bytes": r.reserved_bytes, "device_used_bytes": r.device_used_bytes,
                        "host_rss_bytes": r.host_rss_bytes, "step_time_ms": r.step_time_ms,
                        "samples_per_sec": r.samples_per_sec, "learning_rate": r.learning_rate,
                    })
                )?;
                if let Some(bar) = &bar {
                    bar.inc(1);
                    bar.set_message(format!("loss {:.4}  peak {}", r.loss, shared::Bytes(r.peak_bytes)));
                }
            }
            Record::Event { step, event } => {
                let event = event_json(event);
                if let Some(bar) = &bar {
                    bar.println(format!("step {step}: {event}"));
                }
                writeln!(stdout, "{}", serde_json::json!({ "event": event, "step": step }))?;
            }
            Record::Finished { summary } => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({
                        "summary": {
                            "steps": summary.steps, "micro_batches": summary.micro_batches,
                            "first_loss": summary.first_loss, "final_loss": summary.final_loss,
                            "peak_bytes": summary.peak_bytes, "estimated_peak_bytes": estimated,
                            "estimate_error_pct": estimated.map(|_| summary.estimate_error_pct()),
                            "calibrated_peak_bytes": calibrated,
                            "peak_reserved_bytes": summary.peak_reserved_bytes,
                            "peak_host_rss_bytes": summary.peak_host_rss_bytes, "wall_time_ms": summary.wall_time_ms,
                            "phase_peaks": summary.phase_peaks.iter().map(|(p, b)| (p.key(), *b)).collect::<std::collections::BTreeMap<_, _>>(),
                        }
                    })
                )?;
                return Ok(());
            }
            Record::Failed { error } => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                anyhow::bail!("job failed ({:?}): {}", error.code, error.message);
            }
        }
    }
    anyhow::bail!("the worker ended without a result")
}

/// A job event as `headroom run` prints it: a `kind` and the event's fields.
fn event_json(event: shared::protocol::JobEvent) -> serde_json::Value {
    match event {
        shared::protocol::JobEvent::LeakSuspected(w) => serde_json::json!({
            "kind": "leak_suspected", "bytes_per_step": w.bytes_per_step,
            "bytes_per_epoch": w.bytes_per_epoch, "steps_to_capacity": w.steps_to_capacity,
            "allocated_bytes": w.allocated_bytes,
        }),
        shared::protocol::JobEvent::LossScaleSkip { scale } => {
            serde_json::json!({ "kind": "loss_scale_skip", "scale": scale })
        }
        shared::protocol::JobEvent::CacheEmptied { released_bytes, micro_seconds } => serde_json::json!({
            "kind": "cache_emptied", "released_bytes": released_bytes, "micro_seconds": micro_seconds,
        }),
        shared::protocol::JobEvent::OomRecovered { micro_batch, accumulation, allocated_bytes, message } => {
            serde_json::json!({
                "kind": "oom_recovered", "micro_batch": micro_batch, "accumulation": accumulation,
                "allocated_bytes": allocated_bytes, "message": message,
            })
        }
        shared::protocol::JobEvent::Validation { batches, micro_batch, loss, peak_bytes, micro_seconds } => {
            serde_json::json!({
                "kind": "validation", "batches": batches, "micro_batch": micro_batch, "loss": loss,
                "peak_bytes": peak_bytes, "micro_seconds": micro_seconds,
            })
        }
        shared::protocol::JobEvent::CheckpointSaved { path, bytes, micro_seconds } => serde_json::json!({
            "kind": "checkpoint_saved", "path": path, "bytes": bytes, "micro_seconds": micro_seconds,
        }),
        shared::protocol::JobEvent::Resumed { path } => {
            serde_json::json!({ "kind": "resumed", "path": path })
        }
        shared::protocol::JobEvent::SurfaceTerm { value, host_bytes, micro_seconds } => {
            serde_json::json!({
                "kind": "surface_term", "value": value, "host_bytes": host_bytes,
                "micro_seconds": micro_seconds,
            })
        }
        shared::protocol::JobEvent::HostMemoryLow { workers, prefetch, rss_bytes, headroom_bytes, bound } => {
            serde_json::json!({
                "kind": "host_memory_low", "workers": workers, "prefetch": prefetch,
                "rss_bytes": rss_bytes, "headroom_bytes": headroom_bytes, "bound": bound,
            })
        }
    }
}
