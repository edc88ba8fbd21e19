//! Run a plan on the agent and watch it: status, live loss and memory charts, summary.

use leptos::prelude::*;
use shared::Bytes;
use shared::plan::Plan;
use shared::protocol::Message;

use super::chart::{LineChart, series};
use crate::socket::AgentSocket;
use crate::state::{AgentState, Connection, JobState};

fn fmt_bytes(v: f64) -> String {
    Bytes(v.max(0.0) as u64).to_string()
}

fn fmt_loss(v: f64) -> String {
    format!("{v:.3}")
}

#[component]
pub fn RunPanel(#[prop(into)] plan: Signal<Result<Plan, String>>, socket: AgentSocket) -> impl IntoView {
    let agent = expect_context::<AgentState>();
    let send_error = RwSignal::new(None::<String>);
    let running = move || matches!(agent.job.get(), JobState::Submitted | JobState::Running { .. });
    let can_run = move || plan.with(|p| p.is_ok()) && agent.connection.get() == Connection::Open && !running();

    let run = move |_| {
        let Ok(plan) = plan.get_untracked() else {
            return;
        };
        match socket.send(&Message::Submit { plan, force: false }) {
            Ok(()) => {
                send_error.set(None);
                agent.job.set(JobState::Submitted);
            }
            Err(e) => send_error.set(Some(e)),
        }
    };
    let cancel = move |_| {
        if let JobState::Running { job, .. } = agent.job.get_untracked()
            && let Err(e) = socket.send(&Message::Cancel { job })
        {
            send_error.set(Some(e));
        }
    };

    let count = Signal::derive(move || agent.records.with(Vec::len));
    let loss = Signal::derive(move || agent.records.with(|r| vec![series("loss", "s-loss", r.len(), |i| r[i].loss)]));
    let memory = Signal::derive(move || {
        agent.records.with(|r| {
            let mut out = vec![
                series("peak (allocator)", "s-peak", r.len(), |i| r[i].peak_bytes as f64),
                series("allocated", "s-allocated", r.len(), |i| r[i].allocated_bytes as f64),
            ];
            if r.last().is_some_and(|b| b.reserved_bytes.is_some()) {
                out.push(series("reserved", "s-reserved", r.len(), |i| r[i].reserved_bytes.unwrap_or(0) as f64));
            }
            out
        })
    });
    let reference = Signal::derive(move || agent.estimated_peak_bytes.get().map(|b| b as f64));

    let status = move || match agent.job.get() {
        JobState::Idle => "No job yet: press Run.".to_owned(),
        JobState::Submitted => "Submitted…".to_owned(),
        JobState::Running { job, device, .. } => {
            let n = agent.records.with(Vec::len);
            let last = agent.records.with(|r| r.last().map(|b| (b.step, b.loss)));
            match last {
                Some((step, loss)) => {
                    format!("Job {job} running on {device}: step {step}, loss {loss:.4} ({n} micro-batches)")
                }
                None => format!("Job {job} starting on {device}…"),
            }
        }
        JobState::Finished { job, summary } => {
            let err = summary.estimate_error_pct();
            format!(
                "Job {job} finished: {} steps in {:.1} s, loss {:.4} → {:.4}; measured peak {} vs estimate {} ({err:+.2} %)",
                summary.steps,
                summary.wall_time_ms / 1e3,
                summary.first_loss,
                summary.final_loss,
                Bytes(summary.peak_bytes),
                Bytes(summary.estimated_peak_bytes),
            )
        }
        JobState::Failed { job, error } => match job {
            Some(job) => format!("Job {job} failed ({:?}): {}", error.code, error.message),
            None => format!("The agent refused ({:?}): {}", error.code, error.message),
        },
    };
    let status_class = move || match agent.job.get() {
        JobState::Finished { .. } => "status finished",
        JobState::Failed { .. } => "status failed",
        _ => "status",
    };

    view! {
        <section class="panel run">
            <h2>"Run"</h2>
            <div class="buttons">
                <button data-testid="run" disabled=move || !can_run() on:click=run>"Run on agent"</button>
                <button data-testid="cancel" disabled=move || !running() on:click=cancel>"Cancel"</button>
            </div>
            <p class=status_class data-testid="job-status">{status}</p>
            {move || send_error.get().map(|e| view! { <p class="error">{e}</p> })}
            {move || agent.notice.get().map(|n| view! { <p class="error" data-testid="notice">{n}</p> })}
            <LineChart title="Loss per micro-batch" testid="loss-chart" series=loss count=count reference=Signal::derive(|| None) format=fmt_loss />
            <LineChart title="Tensor memory per micro-batch" testid="memory-chart" series=memory count=count reference=reference format=fmt_bytes />
        </section>
    }
}
