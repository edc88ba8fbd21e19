//! The planner's state: the plan being edited (as the text the user typed) and what the
//! agent has told us.

use leptos::prelude::*;

use shared::estimate::Estimate;
use shared::protocol::{AgentStatus, BatchRecord, Hello, JobError, JobId, RunInfo, Summary};

/// Batch records kept for the charts; later ones still update the status line. At one
/// record per micro-batch this is hours of a fast job, and about 10 MB of memory.
pub const MAX_RECORDS: usize = 100_000;

/// Events of the watched run kept for its list (the newest are shown).
pub const MAX_EVENTS: usize = 500;

/// Runs the history asks for at a time.
pub const HISTORY_PAGE: u32 = 20;

pub use shared::form::{MachineForm as Machine, PlanForm, Valid};

#[derive(Clone, Debug, PartialEq)]
pub enum Connection {
    Connecting,
    Open,
    Closed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Idle,
    /// Sent and not yet answered. A connection lost before the answer sends the same
    /// submission again, with its key, once it is back: the agent answers with the run
    /// the first one became, or queues it if it never arrived.
    Submitted {
        plan: Box<shared::plan::Plan>,
        key: u64,
    },
    Running {
        job: JobId,
        device: String,
        estimated_peak_bytes: u64,
    },
    Finished {
        job: JobId,
        summary: Summary,
    },
    Failed {
        job: Option<JobId>,
        error: JobError,
    },
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

/// A second run shown beside the watched one: its records, fetched once it has ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    pub job: JobId,
    pub name: String,
    pub records: Vec<BatchRecord>,
    pub last_seq: u64,
    /// Its records when it was chosen (it has ended): the last one's number, so that a
    /// run whose end could not be written still completes.
    pub records_total: u64,
    pub summary: Option<Summary>,
    pub error: Option<JobError>,
    /// Its last record has arrived.
    pub done: bool,
}

impl JobState {
    /// The run this state is about, once the agent has numbered it.
    pub fn job(&self) -> Option<JobId> {
        match self {
            JobState::Running { job, .. } | JobState::Finished { job, .. } => Some(*job),
            JobState::Failed { job, .. } => *job,
            JobState::Idle | JobState::Submitted { .. } => None,
        }
    }
}

/// Everything one agent's socket updates.
#[derive(Clone, Copy)]
pub struct AgentState {
    pub connection: RwSignal<Connection>,
    pub hello: RwSignal<Option<Hello>>,
    pub job: RwSignal<JobState>,
    pub records: RwSignal<Vec<BatchRecord>>,
    /// The estimate sent with the running job (a reference line on the memory chart).
    pub estimated_peak_bytes: RwSignal<Option<u64>>,
    /// An error from the agent that does not end the running job (an unknown job id).
    pub notice: RwSignal<Option<String>>,
    /// The number of the last record of the watched run: where a reconnect resumes.
    pub last_seq: RwSignal<u64>,
    /// A run this page watched before it was reloaded (from the browser's storage),
    /// to resume once the agent says hello.
    pub resume: RwSignal<Option<JobId>>,
    /// The `Run` asked for and why.
    pub pending: RwSignal<Option<RunWant>>,
    /// The watched run's whole estimate (from `Accepted` or `Run`) and planned steps.
    pub estimate: RwSignal<Option<Estimate>>,
    pub planned_steps: RwSignal<u64>,
    /// The watched run's events, oldest first, at most [`MAX_EVENTS`]: (step, text).
    pub events: RwSignal<Vec<(u64, String)>>,
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
            pending: RwSignal::new(None),
            estimate: RwSignal::new(None),
            planned_steps: RwSignal::new(0),
            events: RwSignal::new(Vec::new()),
            status: RwSignal::new(None),
            runs: RwSignal::new(Vec::new()),
            runs_more: RwSignal::new(false),
            runs_asked: RwSignal::new(None),
            compare: RwSignal::new(None),
            open_plan,
            connection: RwSignal::new(Connection::Connecting),
            hello: RwSignal::new(None),
            job: RwSignal::new(JobState::Idle),
            records: RwSignal::new(Vec::new()),
            estimated_peak_bytes: RwSignal::new(None),
            notice: RwSignal::new(None),
            last_seq: RwSignal::new(0),
            resume: RwSignal::new(None),
        }
    }
}

impl AgentState {
    /// Adds an event of the watched run to its list.
    pub fn event(&self, step: u64, text: String) {
        self.events.update(|e| {
            if e.len() == MAX_EVENTS {
                e.remove(0);
            }
            e.push((step, text));
        });
    }

    /// Forgets the watched run's records and events: a new run is about to be shown.
    pub fn clear_run(&self) {
        self.records.set(Vec::new());
        self.events.set(Vec::new());
        self.last_seq.set(0);
        self.notice.set(None);
    }

    /// The run the page follows, if it may still send records.
    pub fn live_job(&self) -> Option<JobId> {
        match self.job.get_untracked() {
            JobState::Running { job, .. } => Some(job),
            _ => None,
        }
    }
}
