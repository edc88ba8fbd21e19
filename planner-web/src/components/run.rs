//! The run view: run the plan on the chosen agent and device, watch it (status,
//! progress and ETA, live loss and memory charts with the estimate and the device's
//! capacity as reference lines, events), cancel it, compare it with another run and
//! its measured phases with the estimate's.

use leptos::prelude::*;
use shared::Bytes;
use shared::plan::Plan;
use shared::protocol::{BatchRecord, Summary};

use super::chart::{LineChart, Reference, series};
use crate::agents::{Agent, Fleet};
use crate::state::{AgentState, Compared, Connection, JobState};

/// Events the list shows (the newest).
const EVENTS_SHOWN: usize = 20;

fn fmt_bytes(v: f64) -> String {
    Bytes(v.max(0.0) as u64).to_string()
}

fn fmt_loss(v: f64) -> String {
    format!("{v:.3}")
}

fn fmt_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

#[component]
pub fn RunPanel(#[prop(into)] plan: Signal<Result<Plan, String>>, fleet: Fleet) -> impl IntoView {
    view! {
        <section class="panel run">
            {move || match fleet.current() {
                Some(agent) => view! { <RunView plan=plan agent=agent /> }.into_any(),
                None => view! {
                    <h2>"Run"</h2>
                    <p class="empty" data-testid="job-status">"No agent: add one in the Agents panel to run this plan."</p>
                }
                .into_any(),
            }}
        </section>
    }
}

/// One row of the comparison: a run's figures from its summary, or from its records
/// while it has none.
fn figures(name: String, records: &[BatchRecord], summary: Option<&Summary>, estimated: Option<u64>) -> impl IntoView {
    let peak = summary.map(|s| s.peak_bytes).or_else(|| records.iter().map(|r| r.peak_bytes).max());
    let estimated = summary.map(|s| s.estimated_peak_bytes).or(estimated);
    let error = match (peak, estimated) {
        (Some(p), Some(e)) if p > 0 => format!("{:+.2} %", 100.0 * (e as f64 - p as f64) / p as f64),
        _ => "–".into(),
    };
    let rate = if records.is_empty() {
        "–".to_owned()
    } else {
        format!("{:.1}", records.iter().map(|r| r.samples_per_sec).sum::<f64>() / records.len() as f64)
    };
    let steps = summary.map(|s| s.steps).or_else(|| records.last().map(|r| r.step)).unwrap_or(0);
    let loss = summary.map(|s| s.final_loss).or_else(|| records.last().map(|r| r.loss));
    view! {
        <tr>
            <td>{name}</td>
            <td class="num">{steps}</td>
            <td class="num">{loss.map_or("–".into(), |l| format!("{l:.4}"))}</td>
            <td class="num">{peak.map_or("–".into(), |p| Bytes(p).to_string())}</td>
            <td class="num">{estimated.map_or("–".into(), |e| Bytes(e).to_string())}</td>
            <td class="num">{error}</td>
            <td class="num">{summary.map_or("–".into(), |s| fmt_duration(s.wall_time_ms / 1e3))}</td>
            <td class="num">{rate}</td>
        </tr>
    }
}

#[component]
fn RunView(plan: Signal<Result<Plan, String>>, agent: Agent) -> impl IntoView {
    let state = agent.state;
    let socket = agent.socket;
    let label = agent.address.label.clone();
    let send_error = RwSignal::new(None::<String>);
    // The device to run on: "" for what the plan says.
    let device = RwSignal::new(String::new());
    // Where the watched run stands changes far less often than its records arrive.
    let job = Memo::new(move |_| state.watched.with(|w| w.job.clone()));
    let running = move || matches!(job.get(), JobState::Submitted { .. } | JobState::Running { .. });
    let can_run = move || plan.with(|p| p.is_ok()) && state.connection.get() == Connection::Open && !running();

    let submit_label = label.clone();
    let run = move |_| {
        let Ok(mut plan) = plan.get_untracked() else {
            return;
        };
        let choice = device.get_untracked();
        if !choice.is_empty()
            && let Err(e) = plan.apply_settings(&[("device".to_owned(), choice)])
        {
            send_error.set(Some(e.to_string()));
            return;
        }
        send_error.set(socket.submit(&submit_label, state, plan).err());
    };
    let cancel = move |_| {
        if let Err(e) = socket.cancel(state) {
            send_error.set(Some(e));
        }
    };
    let devices = move || state.hello.with(|h| h.as_ref().map(|h| h.devices.clone()).unwrap_or_default());

    view! {
        <h2>"Run on " {label}</h2>
        <div class="buttons row">
            <label>"device "
                <select data-testid="run-device" on:change=move |ev| device.set(event_target_value(&ev))>
                    <option value="" selected=move || device.get().is_empty()>"as the plan says"</option>
                    {move || devices().into_iter().map(|d| {
                        let id = d.id.clone();
                        let text = format!("{} · {} ({})", d.id, d.name, Bytes(d.total_memory_bytes));
                        view! { <option value=id.clone() selected=move || device.get() == id>{text}</option> }
                    }).collect_view()}
                </select>
            </label>
            <button data-testid="run" disabled=move || !can_run() on:click=run>"Run on agent"</button>
            <button data-testid="cancel" disabled=move || !running() on:click=cancel>"Cancel"</button>
        </div>
        <RunStatus state=state job=job />
        {move || send_error.get().map(|e| view! { <p class="error">{e}</p> })}
        {move || state.notice.get().map(|n| view! { <p class="error" data-testid="run-notice">{n}</p> })}
        <RunCharts state=state job=job chosen_device=device />
        <RunEvents state=state />
        <PhaseTable state=state job=job />
        <Comparison agent=agent job=job />
    }
}

/// The watched run's status line, and its progress with an ETA while it runs.
#[component]
fn RunStatus(state: AgentState, job: Memo<JobState>) -> impl IntoView {
    let status = move || match job.get() {
        JobState::Idle => "No job yet: press Run.".to_owned(),
        JobState::Submitted { .. } => "Submitted…".to_owned(),
        JobState::Running { job, device, .. } => {
            match state.watched.with(|w| w.records.last().map(|b| (b.step, b.loss, w.records.len()))) {
                Some((step, loss, n)) => {
                    format!("Job {job} running on {device}: step {step}, loss {loss:.4} ({n} micro-batches)")
                }
                None => format!("Job {job} queued or starting on {device}…"),
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
    let status_class = move || match job.get() {
        JobState::Finished { .. } => "status finished",
        JobState::Failed { .. } => "status failed",
        _ => "status",
    };
    let progress = move || {
        let JobState::Running { .. } = job.get() else { return None };
        let (planned, pace) = state.watched.with(|w| {
            let from = w.records.len().saturating_sub(2_000);
            let pace: Vec<(u64, f64)> = w.records[from..].iter().map(|b| (b.step, b.step_time_ms)).collect();
            (w.planned_steps, pace)
        });
        let step = pace.last()?.0;
        if planned == 0 {
            return Some(format!("step {step}"));
        }
        let pct = 100.0 * step as f64 / planned as f64;
        let eta = shared::fleet::eta_seconds(&pace, planned)
            .map(|s| format!(" · about {} left", fmt_duration(s)))
            .unwrap_or_default();
        Some(format!("step {step} of {planned} ({pct:.0} %){eta}"))
    };
    view! {
        <p class=status_class data-testid="job-status">{status}</p>
        {move || progress().map(|p| view! { <p class="progress" data-testid="job-progress">{p}</p> })}
    }
}

/// The loss and memory charts of the watched run (and of a compared one), with the
/// estimate and the device's capacity as reference lines.
#[component]
fn RunCharts(state: AgentState, job: Memo<JobState>, chosen_device: RwSignal<String>) -> impl IntoView {
    let compare = state.compare;
    // Memos: each chart reads its series several times per draw (scale, lines,
    // legend), and a record arriving rebuilds them once.
    let count = Memo::new(move |_| {
        let own = state.watched.with(|w| w.records.len());
        compare.with(|c| c.as_ref().map_or(own, |c| own.max(c.records.len())))
    });
    let loss = Memo::new(move |_| {
        let mut out = state.watched.with(|w| {
            let r = &w.records;
            vec![series("loss", "s-loss", r.len(), |i| r[i].loss)]
        });
        compare.with(|c| {
            if let Some(c) = c {
                let r = &c.records;
                out.push(series("loss (compared run)", "s-compare", r.len(), |i| r[i].loss));
            }
        });
        out
    });
    let memory = Memo::new(move |_| {
        let mut out = state.watched.with(|w| {
            let r = &w.records;
            let mut out = vec![
                series("peak (allocator)", "s-peak", r.len(), |i| r[i].peak_bytes as f64),
                series("allocated", "s-allocated", r.len(), |i| r[i].allocated_bytes as f64),
            ];
            if r.last().is_some_and(|b| b.reserved_bytes.is_some()) {
                out.push(series("reserved", "s-reserved", r.len(), |i| r[i].reserved_bytes.unwrap_or(0) as f64));
            }
            if r.last().is_some_and(|b| b.device_used_bytes.is_some()) {
                out.push(series("device used (NVML)", "s-device", r.len(), |i| {
                    r[i].device_used_bytes.unwrap_or(0) as f64
                }));
            }
            out
        });
        compare.with(|c| {
            if let Some(c) = c {
                let r = &c.records;
                out.push(series("peak (compared run)", "s-compare", r.len(), |i| r[i].peak_bytes as f64));
            }
        });
        out
    });
    // The device the watched run is on (or the one chosen), for the capacity line.
    let run_device = move || match job.get() {
        JobState::Running { device, .. } => Some(device),
        _ => {
            let d = chosen_device.get();
            (!d.is_empty()).then_some(d)
        }
    };
    let estimated = Memo::new(move |_| state.watched.with(|w| w.estimated_peak_bytes));
    let references = Memo::new(move |_| {
        let mut out = Vec::new();
        if let Some(e) = estimated.get() {
            out.push(Reference { name: "estimate", class: "estimate", value: e as f64, sets_scale: true });
        }
        let capacity = run_device().and_then(|id| {
            state.hello.with(|h| h.as_ref()?.devices.iter().find(|d| d.id == id).map(|d| d.total_memory_bytes))
        });
        if let Some(c) = capacity {
            out.push(Reference { name: "capacity", class: "capacity", value: c as f64, sets_scale: false });
        }
        out
    });
    view! {
        <LineChart title="Loss per micro-batch" testid="loss-chart" series=loss count=count references=Signal::derive(Vec::new) format=fmt_loss />
        <LineChart title="Memory per micro-batch" testid="memory-chart" series=memory count=count references=references format=fmt_bytes />
    }
}

/// The watched run's events, newest first.
#[component]
fn RunEvents(state: AgentState) -> impl IntoView {
    let events = Memo::new(move |_| {
        state.watched.with(|w| w.events.iter().rev().take(EVENTS_SHOWN).cloned().collect::<Vec<_>>())
    });
    move || {
        let shown = events.get();
        (!shown.is_empty()).then(|| {
            let items = shown
                .into_iter()
                .map(|(step, text)| view! { <li>{format!("step {step}: {text}")}</li> })
                .collect_view();
            view! {
                <h3>"Events"</h3>
                <ol class="events" data-testid="events" reversed>{items}</ol>
            }
        })
    }
}

/// A finished run's measured peak per phase of its last step against the estimate's.
#[component]
fn PhaseTable(state: AgentState, job: Memo<JobState>) -> impl IntoView {
    move || {
        let JobState::Finished { summary, .. } = job.get() else { return None };
        let estimate = state.watched.with(|w| w.estimate.clone())?;
        let rows = summary
            .phase_peaks
            .iter()
            .map(|&(phase, measured)| {
                let est = estimate.phase_peaks.iter().find(|(p, _)| *p == phase).map(|(_, b)| b.get());
                let err = est.filter(|_| measured > 0).map_or("–".into(), |e| {
                    format!("{:+.2} %", 100.0 * (e as f64 - measured as f64) / measured as f64)
                });
                view! {
                    <tr>
                        <td>{phase.label()}</td>
                        <td class="num">{Bytes(measured).to_string()}</td>
                        <td class="num">{est.map_or("–".into(), |e| Bytes(e).to_string())}</td>
                        <td class="num">{err}</td>
                    </tr>
                }
            })
            .collect_view();
        Some(view! {
            <h3>"Measured against the estimate, by phase of the last step"</h3>
            <table class="breakdown" data-testid="phase-table">
                <tr><th>"phase"</th><th class="num">"measured peak"</th><th class="num">"estimate"</th><th class="num">"error"</th></tr>
                {rows}
            </table>
        })
    }
}

/// The watched run beside a compared one, figure by figure.
#[component]
fn Comparison(agent: Agent, job: Memo<JobState>) -> impl IntoView {
    let state = agent.state;
    let socket = agent.socket;
    let stop_compare = move |_| socket.stop_comparing(state);
    move || {
        let c: Compared = state.compare.get()?;
        let own = job.get();
        let own_name = own.job().map_or("watched run".to_owned(), |job| format!("run {job} (watched)"));
        let own_summary = match own {
            JobState::Finished { summary, .. } => Some(summary),
            _ => None,
        };
        let own = state
            .watched
            .with(|w| figures(own_name, &w.records, own_summary.as_ref(), w.estimated_peak_bytes).into_any());
        let status = if !c.done {
            "fetching its records…".to_owned()
        } else if let Some(e) = &c.error {
            format!("it failed ({:?}): {}", e.code, e.message)
        } else {
            String::new()
        };
        let other = figures(format!("run {} ({})", c.job, c.name), &c.records, c.summary.as_ref(), None).into_any();
        Some(view! {
            <h3>"Compared with run " {c.job} " " <small>{status}</small></h3>
            <table class="breakdown" data-testid="compare-table">
                <tr><th>"run"</th><th class="num">"steps"</th><th class="num">"final loss"</th><th class="num">"measured peak"</th>
                    <th class="num">"estimate"</th><th class="num">"error"</th><th class="num">"time"</th><th class="num">"samples/s"</th></tr>
                {own}
                {other}
            </table>
            <button data-testid="stop-compare" on:click=stop_compare>"Stop comparing"</button>
        })
    }
}
