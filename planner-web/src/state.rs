//! The planner's state: the plan being edited (as the text the user typed) and what the
//! agent has told us.

use leptos::prelude::*;

use shared::protocol::{AgentStatus, Hello, JobId, RunInfo};
pub use shared::watch::{Compared, JobState, Watched};

/// Runs the history asks for at a time.
pub const HISTORY_PAGE: u32 = 20;

pub use shared::form::{MachineForm as Machine, PlanForm, Valid};

#[derive(Clone, Debug, PartialEq)]
pub enum Connection {
    Connecting,
    Open,
    Closed(String),
}

/// What the page wants from the `Run` it asked an agent for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunWant {
    /// Watch it in the run view, from its first record (a history row's "watch", or the
    /// run a reloaded page watched).
    Watch(JobId),
    /// Open its plan in the editor.
    OpenPlan(JobId),
}

/// Everything one agent's socket updates.
#[derive(Clone, Copy)]
pub struct AgentState {
    pub connection: RwSignal<Connection>,
    pub hello: RwSignal<Option<Hello>>,
    /// The run this page watches: where it stands, its records, events and estimate
    /// (`shared::watch` has the rules by which the agent's answers change it).
    pub watched: RwSignal<Watched>,
    /// An error from the agent that does not end the watched run (an unknown job id).
    pub notice: RwSignal<Option<String>>,
    /// A run this page watched before it was reloaded (from the browser's storage),
    /// to resume once the agent says hello.
    pub resume: RwSignal<Option<JobId>>,
    /// The `Run` asked for and why.
    pub pending: RwSignal<Option<RunWant>>,
    /// The agent's devices and queue, as last polled.
    pub status: RwSignal<Option<AgentStatus>>,
    /// The agent's runs, newest first, as far as the history has paged; whether older
    /// ones are left; and the `before` of a page asked for and not yet answered.
    pub runs: RwSignal<Vec<RunInfo>>,
    pub runs_more: RwSignal<bool>,
    pub runs_asked: RwSignal<Option<Option<JobId>>>,
    /// A run shown beside the watched one.
    pub compare: RwSignal<Option<Compared>>,
    /// A plan a history row asked to open in the editor (shared by every agent).
    pub open_plan: RwSignal<Option<shared::plan::Plan>>,
}

impl AgentState {
    pub fn new(open_plan: RwSignal<Option<shared::plan::Plan>>) -> AgentState {
        AgentState {
            connection: RwSignal::new(Connection::Connecting),
            hello: RwSignal::new(None),
            watched: RwSignal::new(Watched::default()),
            notice: RwSignal::new(None),
            resume: RwSignal::new(None),
            pending: RwSignal::new(None),
            status: RwSignal::new(None),
            runs: RwSignal::new(Vec::new()),
            runs_more: RwSignal::new(false),
            runs_asked: RwSignal::new(None),
            compare: RwSignal::new(None),
            open_plan,
        }
    }

    /// The run the page follows, if it may still send records.
    pub fn live_job(&self) -> Option<JobId> {
        self.watched.with_untracked(Watched::live_job)
    }

    /// The watched run's state, now, without subscribing.
    pub fn job_untracked(&self) -> JobState {
        self.watched.with_untracked(|w| w.job.clone())
    }
}
