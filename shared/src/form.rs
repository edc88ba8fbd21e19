//! The planner's form as typed, and the machine it is checked against: pure, so the rules
//! are tested natively (the planner draws them with Leptos). A form becomes a plan
//! through `Plan::from_settings`, the path the CLI's `--set` and share links take.

use std::collections::BTreeMap;

use crate::gpus::Gpu;
use crate::plan::Plan;

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
pub struct MachineForm {
    /// A catalog key, or "custom".
    pub gpu: String,
    /// For a custom GPU: its memory (e.g. 24GiB) and the catalog card of its generation.
    pub custom_memory: String,
    pub custom_like: String,
    /// The host's RAM (e.g. 64GiB).
    pub host_ram: String,
}

impl Default for MachineForm {
    fn default() -> MachineForm {
        MachineForm {
            gpu: "v100-16gb".into(),
            custom_memory: "24GiB".into(),
            custom_like: "a10".into(),
            host_ram: "64GiB".into(),
        }
    }
}

impl MachineForm {
    /// The text `gpus::resolve` reads (and share links carry).
    pub fn gpu_text(&self) -> String {
        if self.gpu == "custom" {
            format!("{}@{}", self.custom_memory.trim(), self.custom_like)
        } else {
            self.gpu.clone()
        }
    }

    pub fn resolve(&self) -> Result<Gpu, String> {
        crate::gpus::resolve(&self.gpu_text()).map_err(|e| format!("gpu: {e}"))
    }

    pub fn host_ram_bytes(&self) -> Result<u64, String> {
        crate::units::parse_bytes(&self.host_ram).map_err(|e| format!("host RAM: {e}"))
    }
}

/// A validated plan and its graph, built once per change; compared by plan.
pub use crate::plan::Validated as Valid;

impl Default for PlanForm {
    fn default() -> Self {
        let preset = crate::presets::Preset::find("w1-before").and_then(|p| p.plan().ok());
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
            crate::zoo::schema(&self.model).map(|s| s.into_iter().map(|p| p.key).collect()).unwrap_or_default();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_form_is_the_w1_preset_and_every_preset_round_trips() {
        let plan = PlanForm::default().to_plan().expect("valid");
        assert_eq!(plan.name, "w1-before");
        for p in &crate::presets::PRESETS {
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
        assert_eq!(plan.loss.kind, crate::zoo::LossKind::Ce, "a classifier trains with cross-entropy");
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
        let m = MachineForm {
            gpu: "custom".into(),
            custom_memory: "24GiB".into(),
            custom_like: "v100-16gb".into(),
            ..MachineForm::default()
        };
        assert_eq!(m.resolve().expect("custom").memory_bytes, 24 << 30);
        let bad = MachineForm { custom_memory: "lots".into(), ..m };
        assert!(bad.resolve().expect_err("bad").starts_with("gpu:"));
    }
}
