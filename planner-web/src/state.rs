//! The planner's state: the plan being edited (as the text the user typed) and what the
//! agent has told us.

use leptos::prelude::*;
use shared::plan::{DeviceChoice, ModelSpec, Optimizer, Plan, Precision, Schedule};
use shared::protocol::{BatchRecord, Hello, JobError, JobId, Summary};

/// Batch records kept for the charts; later ones still update the status line. At one
/// record per micro-batch this is hours of a fast job, and about 10 MB of memory.
pub const MAX_RECORDS: usize = 100_000;

/// The form as typed: strings, so that half-typed input is kept and explained, not lost.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanForm {
    pub model: String,
    pub widths: String,
    pub input_shape: String,
    pub classes: String,
    pub micro_batch: String,
    pub accumulation: String,
    pub steps: String,
    pub optimizer: String,
    pub learning_rate: String,
    pub device: String,
}

impl Default for PlanForm {
    fn default() -> Self {
        PlanForm::from_plan(&Plan::example_mlp())
    }
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn parse_u64(field: &str, text: &str) -> Result<u64, String> {
    text.trim().parse::<u64>().map_err(|_| format!("{field}: expected a whole number, got {text:?}"))
}

fn parse_list(field: &str, text: &str) -> Result<Vec<u64>, String> {
    text.split(',').filter(|s| !s.trim().is_empty()).map(|s| parse_u64(field, s)).collect()
}

impl PlanForm {
    pub fn from_plan(plan: &Plan) -> PlanForm {
        let get = |settings: &std::collections::BTreeMap<String, String>, key: &str| {
            settings.get(key).cloned().unwrap_or_default()
        };
        // The form edits the two small models, in the zoo's settings or the earlier
        // format; another zoo plan shows its name only.
        let (model, widths, input_shape, classes) = match &plan.model {
            ModelSpec::Mlp { hidden } => ("mlp", join(hidden), join(&plan.input_shape), plan.classes.to_string()),
            ModelSpec::SmallCnn { channels } => {
                ("small_cnn", join(channels), join(&plan.input_shape), plan.classes.to_string())
            }
            ModelSpec::Zoo { name, settings } if name == "mlp" => {
                ("mlp", get(settings, "hidden"), get(settings, "in_features"), get(settings, "num_classes"))
            }
            ModelSpec::Zoo { name, settings } if name == "small_cnn" => {
                let image = get(settings, "image");
                let hw = if image.contains(',') { image } else { format!("{image},{image}") };
                let shape = format!("{},{hw}", get(settings, "in_channels"));
                ("small_cnn", get(settings, "channels"), shape, get(settings, "num_classes"))
            }
            ModelSpec::Zoo { name, .. } => (name.as_str(), String::new(), String::new(), String::new()),
        };
        let optimizer = plan.optimizer.word();
        PlanForm {
            model: model.into(),
            widths,
            input_shape,
            classes,
            micro_batch: plan.micro_batch.to_string(),
            accumulation: plan.accumulation.to_string(),
            steps: plan.total_steps().to_string(),
            optimizer: optimizer.into(),
            learning_rate: plan.learning_rate.to_string(),
            device: "auto".into(),
        }
    }

    /// The plan this form describes, or the first problem, naming the field.
    pub fn to_plan(&self) -> Result<Plan, String> {
        let widths = parse_list("widths", &self.widths)?;
        let model = match self.model.as_str() {
            "mlp" => ModelSpec::Mlp { hidden: widths },
            "small_cnn" => ModelSpec::SmallCnn { channels: widths },
            other => return Err(format!("model: unknown model {other:?}")),
        };
        let optimizer = Optimizer::from_word(&self.optimizer)
            .ok_or_else(|| format!("optimizer: unknown optimizer {:?}", self.optimizer))?;
        let learning_rate = self
            .learning_rate
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("learning_rate: expected a number, got {:?}", self.learning_rate))?;
        let device = match self.device.as_str() {
            "auto" => DeviceChoice::Auto,
            "cpu" => DeviceChoice::Cpu,
            d => d
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("device: expected auto, cpu or cuda:N, got {d:?}"))?,
        };
        let plan = Plan {
            name: format!("{}-planner", self.model),
            model,
            input_shape: parse_list("input_shape", &self.input_shape)?,
            classes: parse_u64("classes", &self.classes)?,
            seed: 7,
            micro_batch: parse_u64("micro_batch", &self.micro_batch)?,
            accumulation: parse_u64("accumulation", &self.accumulation)?,
            schedule: Schedule::Steps(parse_u64("steps", &self.steps)?),
            optimizer,
            learning_rate,
            precision: Precision::Fp32,
            device,
            ..Plan::example_mlp()
        };
        // One input path: the form's fields become the zoo model, as a plan file's would.
        let mut plan = plan;
        plan.normalize().map_err(|e| e.to_string())?;
        plan.validate().map_err(|e| e.to_string())?;
        Ok(plan)
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
    fn the_default_form_is_the_example_plan() {
        let plan = PlanForm::default().to_plan().expect("valid");
        assert_eq!(plan.model, Plan::example_mlp().model);
        assert_eq!(plan.micro_batch, 32);
        let cnn = PlanForm::from_plan(&Plan::example_cnn()).to_plan().expect("valid cnn");
        let (want, got) = (Plan::example_cnn().validate().expect("cnn"), cnn.validate().expect("cnn"));
        assert_eq!(want.values, got.values, "the same graph as the example");
        assert_eq!(want.n_params(), got.n_params());
    }

    #[test]
    fn half_typed_input_names_the_field() {
        let mut form = PlanForm::default();
        form.steps = "zero".into();
        assert_eq!(form.to_plan().expect_err("steps"), "steps: expected a whole number, got \"zero\"");
        let mut form = PlanForm::default();
        form.micro_batch = "0".into();
        assert!(form.to_plan().expect_err("limit").starts_with("micro_batch:"));
        let mut form = PlanForm::default();
        form.device = "tpu".into();
        assert!(form.to_plan().expect_err("device").starts_with("device:"));
    }
}
