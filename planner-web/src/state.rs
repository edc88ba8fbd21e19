//! The planner's state: the plan being edited (as the text the user typed) and what the
//! agent has told us.

use leptos::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

use shared::Graph;
use shared::gpus::Gpu;
use shared::plan::Plan;
use shared::protocol::{BatchRecord, Hello, JobError, JobId, Summary};

/// Batch records kept for the charts; later ones still update the status line. At one
/// record per micro-batch this is hours of a fast job, and about 10 MB of memory.
pub const MAX_RECORDS: usize = 100_000;

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
#[derive(Clone, Debug)]
pub struct Valid(pub Arc<(Plan, Graph)>);

impl PartialEq for Valid {
    fn eq(&self, other: &Valid) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.0 == other.0.0
    }
}

impl Valid {
    pub fn plan(&self) -> &Plan {
        &self.0.0
    }
    pub fn graph(&self) -> &Graph {
        &self.0.1
    }
}

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
        Plan::from_settings(&self.model, &self.pairs()).map(|pg| Valid(Arc::new(pg))).map_err(|e| e.to_string())
    }

    pub fn to_plan(&self) -> Result<Plan, String> {
        self.to_valid().map(|v| v.plan().clone())
    }

    /// Switching model keeps the plan's knobs and drops the old model's keys.
    pub fn switch_model(&mut self, model: &str) {
        let old: Vec<String> =
            shared::zoo::schema(&self.model).map(|s| s.into_iter().map(|p| p.key).collect()).unwrap_or_default();
        self.values.retain(|k, _| !old.contains(k));
        self.model = model.to_owned();
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
    Submitted,
    Running { job: JobId, device: String, estimated_peak_bytes: u64 },
    Finished { job: JobId, summary: Summary },
    Failed { job: Option<JobId>, error: JobError },
}

/// Everything the agent socket updates; provided as context.
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
    /// waiting for the agent's list of runs to resume it.
    pub resume: RwSignal<Option<shared::protocol::JobId>>,
}

impl AgentState {
    pub fn new() -> AgentState {
        AgentState {
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

impl Default for AgentState {
    fn default() -> Self {
        AgentState::new()
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
    fn switching_model_drops_the_old_models_keys() {
        let mut form = PlanForm::default();
        form.switch_model("resnet18");
        let plan = form.to_plan().expect("resnet18 with W1's knobs");
        assert_eq!(plan.model_name(), "resnet18");
        assert_eq!(plan.micro_batch, 2);
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
