//! A plan in the configuration formats people train with. Each export lists what its
//! target cannot express in `notes` (and, where the format has comments, in the text),
//! rather than dropping it silently. Field names are those the libraries accept today:
//! Hugging Face `transformers.TrainingArguments` (5.x), PyTorch Lightning's `Trainer`
//! as a `LightningCLI` config (2.5), DeepSpeed's JSON config, PyTorch's
//! `PYTORCH_CUDA_ALLOC_CONF`, and Headroom's own plan and command line.

use serde_json::{Value, json};

use crate::plan::{DeviceChoice, LrSchedule, Optimizer, OptimizerImpl, Outputs, Plan, Precision, Schedule};
use crate::zoo::LossKind;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
    Hf,
    Lightning,
    Deepspeed,
    Env,
    Command,
}

impl Format {
    pub const ALL: [Format; 7] =
        [Format::Yaml, Format::Json, Format::Hf, Format::Lightning, Format::Deepspeed, Format::Env, Format::Command];

    pub fn from_word(word: &str) -> Option<Format> {
        Format::ALL.into_iter().find(|f| f.word() == word)
    }

    pub fn word(self) -> &'static str {
        match self {
            Format::Yaml => "yaml",
            Format::Json => "json",
            Format::Hf => "hf",
            Format::Lightning => "lightning",
            Format::Deepspeed => "deepspeed",
            Format::Env => "env",
            Format::Command => "command",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Format::Yaml => "Headroom plan (YAML)",
            Format::Json => "Headroom plan (JSON)",
            Format::Hf => "Hugging Face TrainingArguments (JSON)",
            Format::Lightning => "PyTorch Lightning Trainer (LightningCLI YAML)",
            Format::Deepspeed => "DeepSpeed config (JSON)",
            Format::Env => "Environment variables",
            Format::Command => "headroom run command",
        }
    }
}

/// An exported plan: the text to paste, and what the target could not take.
#[derive(Clone, Debug, PartialEq)]
pub struct Export {
    pub text: String,
    pub notes: Vec<String>,
}

fn steps_or_epochs(plan: &Plan) -> (Option<u64>, Option<u64>) {
    match plan.schedule {
        Schedule::Steps(n) => (Some(n), None),
        Schedule::Epochs { epochs, .. } => (None, Some(epochs)),
    }
}

/// Knobs no training framework's config holds: they belong to the environment, the
/// model code or the data pipeline.
fn common_notes(plan: &Plan, notes: &mut Vec<String>, alloc_env: bool) {
    if plan.expandable_segments && alloc_env {
        notes.push(
            "expandable segments: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment (export env)"
                .into(),
        );
    }
    if let Some(f) = plan.memory_fraction {
        notes.push(format!("memory fraction: call torch.cuda.set_per_process_memory_fraction({f}) before training"));
    }
    if let Some(b) = plan.memory_limit_bytes {
        notes.push(format!("memory limit of {b} bytes: no framework setting; use set_per_process_memory_fraction"));
    }
    if plan.checkpoint_segments > 0 {
        notes.push(format!(
            "checkpoint_segments={}: wrap the model's stages in torch.utils.checkpoint.checkpoint_sequential(..., {}) in the model code",
            plan.checkpoint_segments, plan.checkpoint_segments
        ));
    }
    if plan.host.distance_loss_every > 0 {
        notes.push(format!(
            "the surface-distance loss every {} steps is part of the training code",
            plan.host.distance_loss_every
        ));
    }
    if plan.oom_fallback {
        notes.push("oom_fallback (halve the micro-batch and redo the step on out-of-memory) is Headroom's trainer's; these tools have no equivalent".into());
    }
    if plan.retain_bytes_per_step > 0 {
        notes.push(
            "retain_bytes_per_step is a leak demonstration of Headroom's trainer, not a setting to carry over".into(),
        );
    }
    if plan.loss.kind != LossKind::Ce {
        notes.push(format!("loss {}: set in the model or training code", plan.loss.kind.word()));
    }
}

fn hf(plan: &Plan) -> Export {
    let mut notes = Vec::new();
    let (steps, epochs) = steps_or_epochs(plan);
    let mut args = serde_json::Map::new();
    let mut set = |k: &str, v: Value| {
        args.insert(k.to_owned(), v);
    };
    set("output_dir", json!(format!("runs/{}", plan.name)));
    set("per_device_train_batch_size", json!(plan.micro_batch));
    set("gradient_accumulation_steps", json!(plan.accumulation));
    match (steps, epochs) {
        (Some(n), _) => set("max_steps", json!(n)),
        (_, Some(e)) => set("num_train_epochs", json!(e)),
        _ => {}
    }
    set("learning_rate", json!(plan.learning_rate));
    set("weight_decay", json!(plan.optimizer.weight_decay()));
    let scheduler = match (plan.lr_schedule, plan.warmup_steps) {
        (LrSchedule::Constant, 0) => "constant",
        (LrSchedule::Constant, _) => "constant_with_warmup",
        (LrSchedule::Linear, _) => "linear",
        (LrSchedule::Cosine, _) => "cosine",
    };
    set("lr_scheduler_type", json!(scheduler));
    // TrainingArguments clips at 1.0 unless told otherwise; 0 turns it off.
    set("max_grad_norm", json!(plan.clip_grad_norm.unwrap_or(0.0)));
    set("warmup_steps", json!(plan.warmup_steps));
    match plan.optimizer {
        Optimizer::AdamW { beta1, beta2, eps, .. } | Optimizer::Adam { beta1, beta2, eps, .. } => {
            let fused = plan.optimizer_impl == OptimizerImpl::Fused;
            set("optim", json!(if fused { "adamw_torch_fused" } else { "adamw_torch" }));
            set("adam_beta1", json!(beta1));
            set("adam_beta2", json!(beta2));
            set("adam_epsilon", json!(eps));
            if matches!(plan.optimizer, Optimizer::Adam { .. }) && plan.optimizer.weight_decay() > 0.0 {
                notes.push("Adam with L2 decay: TrainingArguments has no such optimizer; adamw_torch decouples the decay (the same memory)".into());
            }
        }
        Optimizer::Sgd { momentum, nesterov, .. } => {
            set("optim", json!("sgd"));
            set("optim_args", json!(format!("momentum={momentum},nesterov={nesterov}")));
        }
    }
    match plan.precision {
        Precision::Fp16 => set("fp16", json!(true)),
        Precision::Bf16 => set("bf16", json!(true)),
        Precision::Fp32 => {}
    }
    if plan.checkpoint_blocks {
        set("gradient_checkpointing", json!(true));
    }
    set("dataloader_num_workers", json!(plan.host.workers));
    if plan.host.workers > 0 {
        set("dataloader_prefetch_factor", json!(plan.host.prefetch_factor));
    }
    set("dataloader_pin_memory", json!(plan.host.pin_memory));
    if plan.loss.label_smoothing > 0.0 {
        set("label_smoothing_factor", json!(plan.loss.label_smoothing));
    }
    set("seed", json!(plan.seed));
    if plan.device == DeviceChoice::Cpu {
        set("use_cpu", json!(true));
    }
    if plan.outputs == Outputs::Kept {
        notes.push(
            "outputs=kept: the Trainer keeps only the loss (compute_loss returns outputs.loss), so the model's outputs go before backward; estimate with outputs=dropped to match it".into(),
        );
    }
    common_notes(plan, &mut notes, true);
    Export { text: serde_json::to_string_pretty(&Value::Object(args)).unwrap_or_default(), notes }
}

fn deepspeed(plan: &Plan) -> Export {
    let mut notes = Vec::new();
    let mut cfg = serde_json::Map::new();
    cfg.insert("train_micro_batch_size_per_gpu".into(), json!(plan.micro_batch));
    cfg.insert("gradient_accumulation_steps".into(), json!(plan.accumulation));
    cfg.insert("train_batch_size".into(), json!(plan.micro_batch * plan.accumulation));
    let optimizer = match plan.optimizer {
        Optimizer::AdamW { beta1, beta2, eps, weight_decay } => json!({
            "type": "AdamW",
            "params": {"lr": plan.learning_rate, "betas": [beta1, beta2], "eps": eps, "weight_decay": weight_decay}
        }),
        Optimizer::Adam { beta1, beta2, eps, weight_decay } => json!({
            "type": "Adam",
            "params": {"lr": plan.learning_rate, "betas": [beta1, beta2], "eps": eps, "weight_decay": weight_decay, "adam_w_mode": false}
        }),
        Optimizer::Sgd { momentum, weight_decay, nesterov } => json!({
            "type": "SGD",
            "params": {"lr": plan.learning_rate, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}
        }),
    };
    cfg.insert("optimizer".into(), optimizer);
    let warmup = json!({"warmup_min_lr": 0.0, "warmup_max_lr": plan.learning_rate, "warmup_num_steps": plan.warmup_steps, "warmup_type": "linear"});
    match plan.lr_schedule {
        LrSchedule::Constant if plan.warmup_steps > 0 => {
            cfg.insert("scheduler".into(), json!({"type": "WarmupLR", "params": warmup}));
        }
        LrSchedule::Constant => {}
        LrSchedule::Linear => {
            let mut params = warmup;
            params["total_num_steps"] = json!(plan.total_steps());
            cfg.insert("scheduler".into(), json!({"type": "WarmupDecayLR", "params": params}));
        }
        LrSchedule::Cosine => notes.push(format!(
            "cosine schedule with {} warm-up steps: DeepSpeed's WarmupCosineLR warms up from a ratio and decays to cos_min_ratio; set it to match or use a torch scheduler",
            plan.warmup_steps
        )),
    }
    match plan.precision {
        Precision::Fp16 => {
            // Dynamic loss scaling (loss_scale 0) from the plan's initial scale, which
            // DeepSpeed takes as a power of two.
            let power = plan.loss_scale.log2();
            let mut fp16 =
                json!({"enabled": true, "loss_scale": 0, "loss_scale_window": plan.loss_scale_growth_interval});
            if power.fract() == 0.0 {
                fp16["initial_scale_power"] = json!(power as u64);
            } else {
                notes.push(format!(
                    "loss scale {}: DeepSpeed starts from a power of two (initial_scale_power)",
                    plan.loss_scale
                ));
            }
            cfg.insert("fp16".into(), fp16);
        }
        Precision::Bf16 => {
            cfg.insert("bf16".into(), json!({"enabled": true}));
        }
        Precision::Fp32 => {}
    }
    cfg.insert("zero_optimization".into(), json!({"stage": 0}));
    if let Some(c) = plan.clip_grad_norm {
        cfg.insert("gradient_clipping".into(), json!(c));
    }
    if plan.precision == Precision::Fp16 {
        notes.push("DeepSpeed's fp16 keeps fp16 weights with fp32 master copies and a loss scaler: not torch.autocast, so its memory differs from this plan's".into());
    }
    if plan.checkpoint_blocks {
        notes.push("per-block checkpointing: enable it in the model (e.g. model.gradient_checkpointing_enable()); DeepSpeed's activation_checkpointing section only configures deepspeed.checkpointing calls".into());
    }
    notes.push(format!(
        "steps, data loading (workers={}, prefetch={}, pin_memory={}) and the seed are set in the training script",
        plan.host.workers, plan.host.prefetch_factor, plan.host.pin_memory
    ));
    common_notes(plan, &mut notes, true);
    Export { text: serde_json::to_string_pretty(&Value::Object(cfg)).unwrap_or_default(), notes }
}

fn comment_block(notes: &[String]) -> String {
    notes.iter().map(|n| format!("# not expressible here: {n}\n")).collect()
}

fn lightning(plan: &Plan) -> Export {
    let mut notes = Vec::new();
    let precision = match plan.precision {
        Precision::Fp32 => "32-true",
        Precision::Fp16 => "16-mixed",
        Precision::Bf16 => "bf16-mixed",
    };
    let (steps, epochs) = steps_or_epochs(plan);
    let mut text = String::from("trainer:\n");
    text.push_str(&format!("  precision: {precision}\n  accumulate_grad_batches: {}\n", plan.accumulation));
    if let Some(n) = steps {
        text.push_str(&format!("  max_steps: {n}\n"));
    }
    if let Some(e) = epochs {
        text.push_str(&format!("  max_epochs: {e}\n"));
    }
    let (accelerator, devices) = match plan.device {
        DeviceChoice::Auto => ("auto", "auto".to_owned()),
        DeviceChoice::Cpu => ("cpu", "1".to_owned()),
        DeviceChoice::Cuda(i) => ("gpu", format!("[{i}]")),
    };
    text.push_str(&format!("  accelerator: {accelerator}\n  devices: {devices}\n"));
    if let Some(c) = plan.clip_grad_norm {
        text.push_str(&format!("  gradient_clip_val: {c}\n  gradient_clip_algorithm: norm\n"));
    }
    text.push_str(&format!("seed_everything: {}\n", plan.seed));
    notes.push(format!(
        "micro-batch {}, workers {}, prefetch {} and pin_memory {}: DataLoader arguments in the LightningDataModule",
        plan.micro_batch, plan.host.workers, plan.host.prefetch_factor, plan.host.pin_memory
    ));
    notes.push(format!(
        "optimizer {} (lr {}, weight decay {}) and the {} schedule with {} warm-up steps: LightningModule.configure_optimizers",
        plan.optimizer.word(),
        plan.learning_rate,
        plan.optimizer.weight_decay(),
        plan.lr_schedule.word(),
        plan.warmup_steps
    ));
    if plan.checkpoint_blocks {
        notes.push("per-block checkpointing: enable it in the model (timm/open_clip set_grad_checkpointing, MONAI use_checkpoint, HF gradient_checkpointing_enable)".into());
    }
    if plan.outputs != Outputs::Dropped {
        notes.push(
            "outputs: training_step returns the loss, so the model's outputs (its locals) go before backward; estimate with outputs=dropped to match it".into(),
        );
    }
    common_notes(plan, &mut notes, true);
    let text = format!("{}{text}", comment_block(&notes));
    Export { text, notes }
}

fn env(plan: &Plan) -> Export {
    let mut notes = Vec::new();
    let mut text = String::new();
    text.push_str(&format!(
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:{}\n",
        if plan.expandable_segments { "True" } else { "False" }
    ));
    if let DeviceChoice::Cuda(i) = plan.device {
        text.push_str(&format!("CUDA_VISIBLE_DEVICES={i}\n"));
    }
    if let Some(t) = plan.cpu_threads {
        text.push_str(&format!("OMP_NUM_THREADS={t}\n"));
    }
    if let Some(f) = plan.memory_fraction {
        notes.push(format!(
            "memory fraction {f}: torch.cuda.set_per_process_memory_fraction, not an environment variable"
        ));
    }
    notes.push("every other knob is a training-script setting (export hf, lightning or deepspeed)".into());
    Export { text: format!("{}{text}", comment_block(&notes)), notes }
}

fn shell_word(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "._,:=@/-+".contains(c)) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn command(plan: &Plan) -> Export {
    let model = match &plan.model.file {
        Some(file) => ["--model-file".to_owned(), shell_word(&file.path)],
        None => ["--model".to_owned(), shell_word(plan.model_name())],
    };
    let mut words = vec!["headroom".to_owned(), "run".to_owned()];
    words.extend(model);
    for (k, v) in plan.to_settings() {
        words.push("--set".to_owned());
        words.push(shell_word(&format!("{k}={v}")));
    }
    Export { text: words.join(" "), notes: Vec::new() }
}

fn yaml(plan: &Plan) -> Export {
    let mut out = Vec::new();
    let mut ser = serde_yaml_ng::Serializer::new(&mut out);
    let text = match serde_yaml_ng::with::singleton_map_recursive::serialize(plan, &mut ser) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(e) => format!("# could not write YAML: {e}\n"),
    };
    Export { text, notes: Vec::new() }
}

/// A plan as a file holds it: an exported model by its path alone (the file is read
/// again where the plan is used), not its graph.
fn as_file(plan: &Plan) -> std::borrow::Cow<'_, Plan> {
    match &plan.model.file {
        Some(file) if file.graph.is_some() => {
            let mut p = plan.clone();
            if let Some(f) = p.model.file.as_mut() {
                f.graph = None;
            }
            std::borrow::Cow::Owned(p)
        }
        _ => std::borrow::Cow::Borrowed(plan),
    }
}

/// `plan` in `format`.
pub fn export(plan: &Plan, format: Format) -> Export {
    match format {
        Format::Yaml => yaml(&as_file(plan)),
        Format::Json => Export { text: as_file(plan).to_json(), notes: Vec::new() },
        Format::Hf => hf(plan),
        Format::Lightning => lightning(plan),
        Format::Deepspeed => deepspeed(plan),
        Format::Env => env(plan),
        Format::Command => command(plan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::PRESETS;

    #[test]
    fn an_exported_model_is_exported_by_its_path() {
        let graph = crate::estimate::reference::own_model("small_convnet").expect("fixture");
        let v = Plan::from_file("models/mine.pt2", graph, &[("batch".into(), "4".into())]).expect("plan");
        let cmd = export(v.plan(), Format::Command).text;
        assert!(cmd.starts_with("headroom run --model-file models/mine.pt2 --set"), "{cmd}");
        for format in [Format::Yaml, Format::Json] {
            let text = export(v.plan(), format).text;
            assert!(text.contains("models/mine.pt2") && !text.contains("symbols"), "{text}");
            let back = Plan::parse(&text).expect("parses");
            assert_eq!(back.model.file.as_ref().map(|f| f.path.as_str()), Some("models/mine.pt2"));
            assert_eq!(back.micro_batch, 4);
        }
    }

    #[test]
    fn every_export_of_every_preset_parses_back() {
        for p in &PRESETS {
            let plan = p.plan().expect("preset");
            for format in Format::ALL {
                let e = export(&plan, format);
                let text = &e.text;
                match format {
                    Format::Yaml | Format::Json => {
                        assert_eq!(Plan::from_text(text).expect("plan parses"), plan, "{} {}", p.id, format.word());
                    }
                    Format::Hf | Format::Deepspeed => {
                        let v: Value = serde_json::from_str(text).expect("json");
                        let batch = if format == Format::Hf {
                            "per_device_train_batch_size"
                        } else {
                            "train_micro_batch_size_per_gpu"
                        };
                        assert_eq!(v[batch], json!(plan.micro_batch), "{}", p.id);
                        assert_eq!(v["gradient_accumulation_steps"], json!(plan.accumulation), "{}", p.id);
                        if format == Format::Hf {
                            assert_eq!(v["fp16"].as_bool().unwrap_or(false), plan.precision == Precision::Fp16);
                            assert_eq!(v["gradient_checkpointing"].as_bool().unwrap_or(false), plan.checkpoint_blocks);
                        }
                    }
                    Format::Lightning => {
                        let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).expect("yaml");
                        assert_eq!(
                            v["trainer"]["accumulate_grad_batches"].as_u64(),
                            Some(plan.accumulation),
                            "{}",
                            p.id
                        );
                        assert!(v["trainer"]["precision"].as_str().is_some());
                    }
                    Format::Env => {
                        let vars: Vec<(&str, &str)> = text
                            .lines()
                            .filter(|l| !l.starts_with('#') && !l.is_empty())
                            .map(|l| l.split_once('=').expect("KEY=VALUE"))
                            .collect();
                        let want = if plan.expandable_segments {
                            "expandable_segments:True"
                        } else {
                            "expandable_segments:False"
                        };
                        assert!(vars.contains(&("PYTORCH_CUDA_ALLOC_CONF", want)), "{}: {vars:?}", p.id);
                    }
                    Format::Command => {
                        // The command's words, back through the one settings path.
                        let words: Vec<String> = text.split(' ').map(|w| w.trim_matches('\'').to_owned()).collect();
                        assert_eq!(&words[..3], ["headroom", "run", "--model"]);
                        let pairs: Vec<(String, String)> = words[4..]
                            .chunks(2)
                            .map(|c| {
                                let (k, v) = c[1].split_once('=').expect("k=v");
                                (k.to_owned(), v.to_owned())
                            })
                            .collect();
                        let back = Plan::from_settings(&words[3], &pairs).expect("command plan").into_parts().0;
                        assert_eq!(back, plan, "{}", p.id);
                    }
                }
                // Knobs a target cannot hold are listed, not dropped.
                if plan.expandable_segments && matches!(format, Format::Hf | Format::Deepspeed | Format::Lightning) {
                    assert!(e.notes.iter().any(|n| n.contains("expandable")), "{} {}", p.id, format.word());
                }
                if plan.memory_fraction.is_some()
                    && format != Format::Yaml
                    && format != Format::Json
                    && format != Format::Command
                {
                    assert!(e.notes.iter().any(|n| n.contains("memory fraction")), "{} {}", p.id, format.word());
                }
            }
        }
    }

    #[test]
    fn a_target_whose_loop_keeps_only_the_loss_says_so_when_the_plan_keeps_the_outputs() {
        let note = |plan: &Plan, format| export(plan, format).notes.iter().any(|n| n.starts_with("outputs"));
        let mut plan = Plan::zoo("gpt2");
        assert!(!note(&plan, Format::Hf), "auto: the Trainer's own loop");
        plan.outputs = Outputs::Kept;
        assert!(note(&plan, Format::Hf));
        let mut cnn = Plan::zoo("resnet18");
        assert!(note(&cnn, Format::Lightning), "auto keeps a classifier's outputs; training_step does not");
        cnn.outputs = Outputs::Dropped;
        assert!(!note(&cnn, Format::Lightning));
    }
}
