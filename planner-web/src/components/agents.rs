//! The agents panel: every agent the page talks to, its devices with their total and
//! free memory, what runs and waits there; choosing the one that runs the plan; adding
//! one by address and token, removing one.

use leptos::prelude::*;
use shared::Bytes;

use crate::agents::{Agent, Fleet};
use crate::state::Connection;

fn agent_row(fleet: Fleet, index: usize, agent: Agent) -> impl IntoView {
    let state = agent.state;
    let key = agent.key;
    let selected = move || fleet.selected.get() == Some(key);
    let connection = move || match state.connection.get() {
        Connection::Connecting => "connecting…".to_owned(),
        Connection::Open => match state.hello.get() {
            Some(h) => format!("connected · agent {}", h.agent_version),
            None => "connected".to_owned(),
        },
        Connection::Closed(reason) => reason,
    };
    let devices = move || {
        let hello = state.hello.get()?;
        let status = state.status.get();
        let rows = hello
            .devices
            .iter()
            .map(|d| {
                let now = status.as_ref().and_then(|s| s.devices.iter().find(|s| s.id == d.id));
                let free =
                    now.and_then(|s| s.free_memory_bytes).map_or(String::new(), |f| format!("{} free of ", Bytes(f)));
                let running = now
                    .filter(|s| !s.running.is_empty())
                    .map(|s| {
                        let jobs: Vec<String> = s.running.iter().map(|j| format!("#{j}")).collect();
                        format!(" · running {}", jobs.join(", "))
                    })
                    .unwrap_or_default();
                view! { <li>{format!("{} {}: {free}{}{running}", d.id, d.name, Bytes(d.total_memory_bytes))}</li> }
            })
            .collect_view();
        let queue = status.map(|s| format!("queue: {} waiting (at most {})", s.queued.len(), s.max_queued));
        Some(view! {
            <ul class="devices">{rows}</ul>
            {queue.map(|q| view! { <p class="help" data-testid=format!("agent-{index}-queue")>{q}</p> })}
        })
    };
    let remove = (!agent.home).then(|| {
        view! { <button class="small" data-testid=format!("agent-{index}-remove") on:click=move |_| fleet.remove(key)>"Remove"</button> }
    });
    view! {
        <li class="agent" class:chosen=selected data-testid=format!("agent-{index}")>
            <label>
                <input type="radio" name="agent" data-testid=format!("agent-{index}-select") prop:checked=selected
                    on:change=move |_| fleet.selected.set(Some(key)) />
                <strong>{agent.address.label.clone()}</strong>
                {agent.home.then_some(" (served this page)")}
            </label>
            " "
            {remove}
            <p class="help" data-testid=format!("agent-{index}-connection")>{connection}</p>
            {devices}
        </li>
    }
}

#[component]
pub fn AgentsPanel(fleet: Fleet) -> impl IntoView {
    let address = RwSignal::new(String::new());
    let token = RwSignal::new(String::new());
    let error = RwSignal::new(None::<String>);
    let add = move |_| match fleet.add(&address.get_untracked(), &token.get_untracked()) {
        Ok(()) => {
            error.set(None);
            address.set(String::new());
            token.set(String::new());
        }
        Err(e) => error.set(Some(e)),
    };
    let origin = web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default();
    view! {
        <section class="panel agents">
            <h2>"Agents"</h2>
            <ul class="agent-list">
                {move || fleet.agents.get().into_iter().enumerate().map(|(i, a)| agent_row(fleet, i, a)).collect_view()}
            </ul>
            {move || fleet.agents.with(Vec::is_empty).then(|| view! {
                <p class="empty">"No agent yet. Planning works without one; add one to run the plan."</p>
            })}
            <div class="row">
                <input type="text" data-testid="agent-address" placeholder="https://gpu1.lab:7878 (the URL an agent printed)"
                    prop:value=move || address.get() on:input=move |ev| address.set(event_target_value(&ev)) />
                <input type="password" data-testid="agent-token" placeholder="token" autocomplete="off"
                    prop:value=move || token.get() on:input=move |ev| token.set(event_target_value(&ev)) />
                <button data-testid="agent-add" on:click=add>"Add agent"</button>
            </div>
            {move || error.get().map(|e| view! { <p class="error" data-testid="agent-error">{e}</p> })}
            <p class="help">
                "Tokens stay in this browser's storage, never in share links. Another agent must allow this page: "
                <code>{format!("headroom serve --allow-origin {origin}")}</code>
                ". Reach it over TLS (https://) or through an SSH tunnel to a loopback port."
            </p>
        </section>
    }
}
