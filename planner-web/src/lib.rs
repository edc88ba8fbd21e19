//! The Headroom planner: edit a plan, see its memory estimate, run it on an agent and
//! watch loss and memory stream in. `main.rs` only mounts `App`.

pub mod components;
pub mod socket;
pub mod state;

use leptos::prelude::*;

use components::estimate::EstimatePanel;
use components::plan_form::PlanEditor;
use components::run::RunPanel;
use state::{AgentState, Connection, PlanForm};

#[component]
pub fn App() -> impl IntoView {
    let agent = AgentState::new();
    provide_context(agent);
    let socket = socket::use_agent_socket(agent);
    let form = RwSignal::new(PlanForm::default());
    let plan = Memo::new(move |_| form.with(PlanForm::to_plan));
    let estimate = Signal::derive(move || plan.get().and_then(|p| shared::estimate(&p).map_err(|e| e.to_string())));

    let connection = move || match agent.connection.get() {
        Connection::Connecting => "connecting to the agent…".to_owned(),
        Connection::Open => match agent.hello.get() {
            Some(h) => format!(
                "connected to agent {} · {}",
                h.agent_version,
                h.devices.iter().map(|d| format!("{} {}", d.id, d.name)).collect::<Vec<_>>().join(", ")
            ),
            None => "connected".to_owned(),
        },
        Connection::Closed(reason) => format!("not connected: {reason}"),
    };

    view! {
        <header>
            <h1>"Headroom"</h1>
            <p class="tagline">"Will it fit? Estimate a training step's peak memory, then run it and watch."</p>
            <p class="connection" data-testid="connection">{connection}</p>
        </header>
        <main>
            <PlanEditor form=form />
            <EstimatePanel estimate=estimate />
            <RunPanel plan=plan socket=socket />
        </main>
    }
}
