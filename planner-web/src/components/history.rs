//! The selected agent's runs, newest first: how each ended, its estimate against its
//! measured peak; watch one, compare one with the watched run, open one's plan.

use leptos::prelude::*;
use shared::Bytes;
use shared::protocol::{RunInfo, RunState, ToAgent};

use crate::agents::{Agent, Fleet};
use crate::state::HISTORY_PAGE;

fn when(unix_ms: u64) -> String {
    let date = js_sys::Date::new(&wasm_bindgen::JsValue::from_f64(unix_ms as f64));
    String::from(date.to_locale_string("en-GB", &wasm_bindgen::JsValue::UNDEFINED))
}

fn ended(state: RunState) -> bool {
    !matches!(state, RunState::Queued | RunState::Running)
}

fn row(agent: Agent, run: RunInfo) -> impl IntoView {
    let state = agent.state;
    let socket = agent.socket;
    let job = run.job;
    let name = run.name.clone();
    let error = match (run.measured_peak_bytes, run.estimated_peak_bytes) {
        (Some(m), e) if m > 0 => format!("{:+.2} %", 100.0 * (e as f64 - m as f64) / m as f64),
        _ => "–".into(),
    };
    let how = match &run.error {
        Some(e) => format!("{:?}: {}", run.state, e.message),
        None => format!("{:?}", run.state),
    };
    let can_compare = ended(run.state);
    let records_total = run.records;
    let watch = move |_| socket.watch(state, job);
    let compare = move |_| socket.compare(state, job, name.clone(), records_total);
    let open = move |_| socket.open_plan(state, job);
    // A memo: the watched run changes with every record, this row only when it starts
    // or stops being the one watched.
    let is_watched = Memo::new(move |_| state.watched.with(|w| w.job.job()) == Some(job));
    view! {
        <tr data-testid=format!("run-{job}") class:watched=move || is_watched.get()>
            <td class="num">{job}</td>
            <td>{run.name.clone()}</td>
            <td data-testid=format!("run-{job}-state")>{how}</td>
            <td>{run.device.clone()}</td>
            <td>{when(run.created_unix_ms)}</td>
            <td class="num">{run.steps}</td>
            <td class="num">{Bytes(run.estimated_peak_bytes).to_string()}</td>
            <td class="num">{run.measured_peak_bytes.map_or("–".into(), |m| Bytes(m).to_string())}</td>
            <td class="num">{error}</td>
            <td>
                <button class="small" data-testid=format!("watch-{job}") on:click=watch>"Watch"</button>
                <button class="small" data-testid=format!("compare-{job}")
                    disabled=move || !can_compare || is_watched.get() on:click=compare>"Compare"</button>
                <button class="small" data-testid=format!("open-{job}") on:click=open>"Open plan"</button>
            </td>
        </tr>
    }
}

#[component]
pub fn HistoryPanel(fleet: Fleet) -> impl IntoView {
    view! {
        <section class="panel history">
            {move || fleet.current().map(|agent| {
                let state = agent.state;
                let socket = agent.socket;
                let rows = {
                    let agent = agent.clone();
                    move || state.runs.get().into_iter().map(|r| row(agent.clone(), r)).collect_view()
                };
                let older = move |_| {
                    if let Some(last) = state.runs.with_untracked(|r| r.last().map(|r| r.job)) {
                        state.runs_asked.set(Some(Some(last)));
                        let _ = socket.send(&ToAgent::ListRuns { before: Some(last), limit: HISTORY_PAGE });
                    }
                };
                view! {
                    <h2>"Runs on " {agent.address.label.clone()}</h2>
                    {move || state.runs.with(Vec::is_empty).then(|| view! { <p class="empty">"No runs yet."</p> })}
                    <table class="advice" data-testid="history">
                        <tr><th>"#"</th><th>"plan"</th><th>"state"</th><th>"device"</th><th>"started"</th>
                            <th class="num">"steps"</th><th class="num">"estimate"</th><th class="num">"measured"</th>
                            <th class="num">"error"</th><th></th></tr>
                        {rows}
                    </table>
                    {move || state.runs_more.get().then(|| view! {
                        <button data-testid="history-older" disabled=move || state.runs_asked.get().is_some()
                            on:click=older>"Older runs"</button>
                    })}
                }
            })}
        </section>
    }
}
