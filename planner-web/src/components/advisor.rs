//! The advisor: ranked changes that fit the GPU with a margin and keep the effective
//! batch. The search runs one exact estimate per chunk, yielding to the browser between
//! chunks, so the page stays responsive; "Apply" loads a result into the plan.

use leptos::prelude::*;
use leptos::task::spawn_local;
use shared::Bytes;
use shared::advise::{Advice, Request, Search};

use crate::state::{Machine, PlanForm, Valid};
use crate::util::{next_tick, now_ms};

/// Work per chunk before the page gets the main thread back. One exact estimate of the
/// largest zoo model takes about 4 ms natively and a few times that in wasm, so chunks
/// stay well under the 50 ms that counts as a long task.
const CHUNK_MS: f64 = 15.0;

#[derive(Clone, Debug, PartialEq)]
enum AdvisorState {
    Idle,
    Running { done: usize, planned: usize },
    Done { advice: Advice, ms: f64 },
    Failed(String),
}

#[component]
pub fn AdvisorPanel(
    #[prop(into)] valid: Signal<Result<Valid, String>>,
    form: RwSignal<PlanForm>,
    machine: RwSignal<Machine>,
) -> impl IntoView {
    let state = RwSignal::new(AdvisorState::Idle);
    let margin = RwSignal::new("0.1".to_owned());
    let resize = RwSignal::new(false);
    let optimizer = RwSignal::new(false);
    // A new search cancels the one before.
    let generation = StoredValue::new(0u64);
    let run = move |_| {
        let Ok(v) = valid.get_untracked() else { return };
        let gpu = match machine.with_untracked(Machine::resolve) {
            Ok(g) => g,
            Err(e) => return state.set(AdvisorState::Failed(e)),
        };
        let margin = match margin.get_untracked().trim().parse::<f64>() {
            Ok(m) => m,
            Err(_) => {
                return state
                    .set(AdvisorState::Failed(format!("margin: expected a number, got '{}'", margin.get_untracked())));
            }
        };
        let req = Request {
            plan: v.plan().clone(),
            gpu,
            margin,
            allow_resize: resize.get_untracked(),
            allow_optimizer: optimizer.get_untracked(),
            top: 10,
        };
        let mut search = match Search::new(req) {
            Ok(s) => s,
            Err(e) => return state.set(AdvisorState::Failed(e.to_string())),
        };
        generation.update_value(|g| *g += 1);
        let mine = generation.get_value();
        let planned = search.planned_steps();
        state.set(AdvisorState::Running { done: 0, planned });
        spawn_local(async move {
            let start = now_ms();
            let mut done = 0;
            // Exact estimates in chunks of at most CHUNK_MS, yielding between chunks so
            // that no task holds the main thread past 50 ms.
            'search: loop {
                let chunk = now_ms();
                loop {
                    let more = search.step();
                    done += 1;
                    if !more {
                        break 'search;
                    }
                    if now_ms() - chunk > CHUNK_MS {
                        break;
                    }
                }
                state.set(AdvisorState::Running { done, planned });
                next_tick().await;
                if generation.get_value() != mine {
                    return;
                }
            }
            let ms = now_ms() - start;
            state.set(AdvisorState::Done { advice: search.result(), ms });
        });
    };
    let apply = move |changes: Vec<(String, String)>| {
        form.update(|f| {
            for (k, v) in changes {
                if k == "checkpoint" && v == "off" {
                    f.values.remove("checkpoint");
                } else {
                    f.values.insert(k, v);
                }
            }
        });
    };
    let body = move || {
        match state.get() {
        AdvisorState::Idle => view! { <p class="empty">"Search micro-batch × accumulation with the effective batch held, precision, checkpointing and expandable segments for what fits."</p> }.into_any(),
        AdvisorState::Running { done, planned } => view! { <p data-testid="advisor-progress" aria-busy="true">{format!("searching… {done} of at most {planned} exact estimates")}</p> }.into_any(),
        AdvisorState::Failed(e) => view! { <p class="error" data-testid="advisor-error">{e}</p> }.into_any(),
        AdvisorState::Done { advice, ms } => {
            let summary = format!(
                "{} combinations, {} exact estimates, {ms:.0} ms · effective batch {} · budget {} · the plan as it is {}",
                advice.combinations, advice.exact_estimates, advice.effective_batch, Bytes(advice.budget_bytes),
                if advice.current_fits { "fits" } else { "does not fit" }
            );
            let rows = advice.candidates.iter().enumerate().map(|(i, c)| {
                let changes = c.changes.clone();
                let text = if c.changes.is_empty() { "no change".to_owned() } else { c.changes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ") };
                view! {
                    <tr data-testid=format!("advice-{i}") data-peak=c.device_peak_bytes.to_string() data-effective=c.effective_batch.to_string()>
                        <td class="num">{i + 1}</td>
                        <td><code>{text}</code><br/><small>{c.reason.clone()}</small></td>
                        <td class="num">{Bytes(c.device_peak_bytes).to_string()}</td>
                        <td class="num">{format!("{:.2}×", c.relative_time)}</td>
                        <td><button data-testid=format!("apply-{i}") on:click=move |_| apply(changes.clone())>"Apply"</button></td>
                    </tr>
                }
            }).collect_view();
            view! {
                <p data-testid="advisor-summary" role="status">{summary}</p>
                {advice.note.clone().map(|n| view! { <p class="note">{n}</p> })}
                {advice.candidates.is_empty().then(|| view! { <p class="error" data-testid="advisor-none">"Nothing fits: allow resizing or another optimizer, lower the margin, or pick a larger GPU."</p> })}
                <table class="advice"><thead><tr><th>"#"</th><th>"change"</th><th class="num">"device peak (high)"</th><th class="num">"step time"</th><th></th></tr></thead>
                <tbody>{rows}</tbody></table>
            }.into_any()
        }
    }
    };
    view! {
        <section class="panel advisor" aria-labelledby="advisor-title">
            <h2 id="advisor-title">"What fits"</h2>
            <div class="row">
                <label for="margin">"margin"</label>
                <input id="margin" data-testid="margin" type="text" size="5" prop:value=move || margin.get() on:input=move |ev| margin.set(event_target_value(&ev)) />
                <label><input type="checkbox" data-testid="allow-resize" prop:checked=move || resize.get() on:change=move |ev| resize.set(event_target_checked(&ev)) />" allow smaller inputs"</label>
                <label><input type="checkbox" data-testid="allow-optimizer" prop:checked=move || optimizer.get() on:change=move |ev| optimizer.set(event_target_checked(&ev)) />" allow another optimizer"</label>
                <button data-testid="advise" disabled=move || valid.with(|v| v.is_err()) on:click=run>"Find what fits"</button>
            </div>
            <div aria-live="polite">{body}</div>
        </section>
    }
}
