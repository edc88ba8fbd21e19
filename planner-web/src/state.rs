//! The planner's state: the plan being edited (as the text the user typed) and what the
//! agent has told us.

use leptos::prelude::*;
use std::collections::BTreeMap;

use shared::estimate::Estimate;
use shared::gpus::Gpu;
use shared::plan::Plan;
use shared::protocol::{AgentStatus, BatchRecord, Hello, JobError, JobId, RunInfo, Summary};

/// Batch records kept for the charts; later ones still update the status line. At one
/// record per micro-batch this is hours of a fast job, and about 10 MB of memory.
pub const MAX_RECORDS: usize = 100_000;

/// Events of the watched run kept for its list (the newest are shown).
pub const MAX_EVENTS: usize = 500;

/// Runs the history asks for at a time.
pub const HISTORY_PAGE: u32 = 20;

/// The form as typed: the model and its `key=value` settings as strings, so that
/// half-typed input is kept and explained, not lost. An empty value means the key's
/// default. It becomes a plan through `Plan::from_settings`, the path the CLI's `--set`
/// and share links take.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanForm {
    pub model: String,
    pub values: BTreeMap<String, String>,
}

/// The machine the plan is checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    /// A catalog key, or "custom".
    pub gpu: String,
    /// For a custom GPU: its memory (e.g. 24GiB) and the catalog card of its generation.
    pub custom_memory: String,
    pub custom_like: String,
    /// The host's RAM (e.g. 64GiB).
    pub host_ram: String,
}

impl Default for Machine {
    fn default() -> Machine {
        Machine {
            gpu: "v100-16gb".into(),
            custom_memory: "24GiB".into(),
            custom_like: "a10".into(),
            host_ram: "64GiB".into(),
        }
    }
}

impl Machine {
    /// The text `gpus::resolve` reads (and share links carry).
    pub fn gpu_text(&self) -> String {
        if self.gpu == "custom" {
            format!("{}@{}", self.custom_memory.trim(), self.custom_like)
        } else {
            self.gpu.clone()
        }
    }

    pub fn resolve(&self) -> Result<Gpu, String> {
        shared::gpus::resolve(&self.gpu_text()).map_err(|e| format!("gpu: {e}"))
    }

    pub fn host_ram_bytes(&self) -> Result<u64, String> {
        shared::units::parse_bytes(&self.host_ram).map_err(|e| format!("host RAM: {e}"))
    }
}

/// A validated plan and its graph, built once per change; compared by plan.
pub use shared::plan::Validated as Valid;

impl Default for PlanForm {
    fn default() -> Self {
        let preset = shared::presets::Preset::find("w1-before").and_then(|p| p.plan().ok());
        PlanForm::from_plan(&preset.unwrap_or_else(Plan::example_mlp))
    }
}

impl PlanForm {
    pub fn from_plan(plan: &Plan) -> PlanForm {
        PlanForm { model: plan.model_name().to_owned(), values: plan.to_settings().into_iter().collect() }
    }

    /// The typed pairs, leaving out empty fields (their defaults apply).
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.values
            .iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| (k.clone(), v.trim().to_owned()))
            .collect()
    }

    /// The plan this form describes, validated with its graph, or the first problem,
    /// naming the field.
    pub fn to_valid(&self) -> Result<Valid, String> {
        Plan::from_settings(&self.model, &self.pairs()).map_err(|e| e.to_string())
    }

    pub fn to_plan(&self) -> Result<Plan, String> {
        self.to_valid().map(|v| v.plan().clone())
    }

    /// Switching model starts from the new model's own keys and name and keeps the job's
    /// knobs (batch, precision, optimizer…), but not a loss the new model does not train
    /// with. Returns the knobs it kept, for the form to say so.
    pub fn switch_model(&mut self, model: &str) -> Vec<String> {
        let old: Vec<String> =
            shared::zoo::schema(&self.model).map(|s| s.into_iter().map(|p| p.key).collect()).unwrap_or_default();
        self.values.retain(|k, v| !old.contains(k) && k != "name" && !v.trim().is_empty());
        self.model = model.to_owned();
        if self.to_plan().is_err_and(|e| e.starts_with("loss:") || e.starts_with("loss.label_smoothing:")) {
            self.values.remove("loss");
            self.values.remove("label_smoothing");
        }
        self.values.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    pub fn get(&self, key: &str) -> String {
        self.values.get(key).cloned().unwrap_or_default()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_form_is_the_w1_preset_and_every_preset_round_trips() {
        let plan = PlanForm::default().to_plan().expect("valid");
        assert_eq!(plan.name, "w1-before");
        for p in &shared::presets::PRESETS {
            let want = p.plan().expect("preset");
            assert_eq!(PlanForm::from_plan(&want).to_plan().expect("valid"), want, "{}", p.id);
        }
        let cnn = PlanForm::from_plan(&Plan::example_cnn()).to_plan().expect("valid cnn");
        assert_eq!(cnn, Plan::example_cnn());
    }

    #[test]
    fn half_typed_input_names_the_field() {
        let mut form = PlanForm::default();
        form.values.insert("steps".into(), "zero".into());
        assert_eq!(form.to_plan().expect_err("steps"), "steps: expected a number, got 'zero'");
        let mut form = PlanForm::default();
        form.values.insert("batch".into(), "0".into());
        assert!(form.to_plan().expect_err("limit").starts_with("micro_batch:"));
        let mut form = PlanForm::default();
        form.values.insert("device".into(), "tpu".into());
        assert!(form.to_plan().expect_err("device").starts_with("device:"));
        // An emptied field falls back to its default.
        let mut form = PlanForm::default();
        form.values.insert("batch".into(), " ".into());
        assert_eq!(form.to_plan().expect("default batch").micro_batch, 1);
    }

    #[test]
    fn switching_model_keeps_the_jobs_knobs_but_not_the_old_name_keys_or_loss() {
        // W1: SwinUNETR with MONAI's Dice-CE, micro-batch 2.
        let mut form = PlanForm::default();
        assert_eq!(form.get("loss"), "dice_ce");
        let kept = form.switch_model("resnet18");
        let plan = form.to_plan().expect("resnet18 with W1's knobs");
        assert_eq!((plan.model_name(), plan.name.as_str()), ("resnet18", "resnet18"));
        assert_eq!(plan.micro_batch, 2);
        assert_eq!(plan.loss.kind, shared::zoo::LossKind::Ce, "a classifier trains with cross-entropy");
        assert!(
            kept.contains(&"batch=2".to_owned())
                && !kept.iter().any(|k| k.starts_with("loss") || k.starts_with("name")),
            "{kept:?}"
        );
        // Back to a segmentation model: the knobs kept stay, the loss is its default.
        form.switch_model("unet3d");
        assert_eq!(form.to_plan().expect("unet3d").micro_batch, 2);
    }

    #[test]
    fn custom_gpus_resolve() {
        let m = Machine {
            gpu: "custom".into(),
            custom_memory: "24GiB".into(),
            custom_like: "v100-16gb".into(),
            ..Machine::default()
        };
        assert_eq!(m.resolve().expect("custom").memory_bytes, 24 << 30);
        let bad = Machine { custom_memory: "lots".into(), ..m };
        assert!(bad.resolve().expect_err("bad").starts_with("gpu:"));
    }
}
