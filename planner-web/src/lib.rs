//! The Headroom planner: pick a model and knobs, see whether the step fits the GPU and
//! why, get ranked fixes that keep the effective batch, share the plan as a link, export
//! it, and run it on an agent. Everything but the run works without an agent: it is
//! `shared` compiled to wasm. `main.rs` only mounts `App`.

pub mod agents;
pub mod components;
pub mod socket;
pub mod state;
pub mod util;

use leptos::prelude::*;
use shared::estimate::{Options, Target};

use components::advisor::AdvisorPanel;
use components::agents::AgentsPanel;
use components::effects::EffectsPanel;
use components::estimate::EstimatePanel;
use components::history::HistoryPanel;
use components::plan_form::PlanEditor;
use components::run::RunPanel;
use components::share::SharePanel;
use state::{Connection, Machine, PlanForm};

/// Points of the step timeline the page draws.
pub const TIMELINE_POINTS: usize = 240;

/// The form and machine a page opens with: the link in the address bar when there is
/// one (a damaged link keeps the default plan and says why), else W1 as first run.
fn initial_state() -> (PlanForm, Machine, Option<String>) {
    let fragment = util::fragment();
    let mut machine = Machine::default();
    if fragment.is_empty() {
        return (PlanForm::default(), machine, None);
    }
    match shared::link::decode(&fragment) {
        Ok((plan, _, extras)) => {
            if let Some(g) = extras.gpu {
                if shared::gpus::find(&g).is_some() {
                    machine.gpu = g;
                } else if let Some((mem, like)) = g.split_once('@') {
                    machine.gpu = "custom".into();
                    machine.custom_memory = mem.into();
                    machine.custom_like = like.into();
                }
            }
            if let Some(r) = extras.host_ram_bytes {
                machine.host_ram = shared::Bytes(r).to_string().replace(' ', "");
            }
            (PlanForm::from_plan(&plan), machine, Some(format!("Opened the shared plan '{}'.", plan.name)))
        }
        Err(e) => (
            PlanForm::default(),
            machine,
            Some(format!("Could not open the shared link: {e}. Showing the default plan.")),
        ),
    }
}

#[component]
pub fn App() -> impl IntoView {
    let fleet = agents::Fleet::start();
    fleet.poll_forever();
    let (form0, machine0, notice0) = initial_state();
    let form = RwSignal::new(form0);
    let machine = RwSignal::new(machine0);
    let notice = RwSignal::new(notice0);
    // A history row's "open plan": the run's plan replaces the form's.
    Effect::new(move |_| {
        if let Some(plan) = fleet.open_plan.get() {
            form.set(PlanForm::from_plan(&plan));
            notice.set(Some(format!("Opened the plan of the run '{}'.", plan.name)));
            fleet.open_plan.set(None);
        }
    });
    // Each derived value depends only on what it reads: a keystroke in a field rebuilds
    // the plan once; a GPU change re-estimates without rebuilding the plan.
    let valid = Memo::new(move |_| form.with(PlanForm::to_valid));
    let plan = Signal::derive(move || valid.get().map(|v| v.plan().clone()));
    let target = Memo::new(move |_| machine.with(Machine::resolve).map(Target::Cuda));
    let host_ram = Memo::new(move |_| machine.with(Machine::host_ram_bytes));
    let estimate = Memo::new(move |_| {
        let v = valid.get()?;
        let target = target.get()?;
        shared::estimate::estimate_graph(
            v.plan(),
            v.graph(),
            target,
            Options { timeline_points: TIMELINE_POINTS, toggled_allocator: false },
            None,
        )
        .map_err(|e| e.to_string())
    });

    let connection = move || {
        let Some(agent) = fleet.current() else {
            return "no agent (planning works without one)".to_owned();
        };
        let agent = agent.state;
        match agent.connection.get() {
            Connection::Connecting => "connecting to the agent…".to_owned(),
            Connection::Open => match agent.hello.get() {
                Some(h) => format!(
                    "connected to agent {} · {}",
                    h.agent_version,
                    h.devices.iter().map(|d| format!("{} {}", d.id, d.name)).collect::<Vec<_>>().join(", ")
                ),
                None => "connected".to_owned(),
            },
            Connection::Closed(reason) => format!("no agent: {reason} (planning works without one)"),
        }
    };

    view! {
        <header>
            <h1>"Headroom"</h1>
            <p class="tagline">"Will it fit? Estimate a training step's peak GPU and host memory, find the change that fits, share it, run it."</p>
            <p class="connection" data-testid="connection">{connection}</p>
            <p class="docs"><a href="workloads.md" target="_blank" rel="noopener">"The five out-of-memory stories (docs/workloads.md)"</a></p>
        </header>
        {move || notice.get().map(|n| view! {
            <p class="notice" role="status" data-testid="notice">{n}<button aria-label="dismiss" on:click=move |_| notice.set(None)>"×"</button></p>
        })}
        <main>
            <PlanEditor form=form machine=machine notice=notice />
            <div class="results">
                <EstimatePanel estimate=estimate host_ram=host_ram />
                <AdvisorPanel valid=valid form=form machine=machine />
                <EffectsPanel valid=valid target=target estimate=estimate />
                <SharePanel valid=valid machine=machine />
                <AgentsPanel fleet=fleet />
                <RunPanel plan=plan fleet=fleet />
                <HistoryPanel fleet=fleet />
            </div>
        </main>
    }
}
