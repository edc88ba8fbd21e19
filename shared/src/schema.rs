//! Every key a plan takes, with its kind, default, unit and help: the one description
//! from which the CLI's `--set`, plan files, share links and the planner's form are
//! served. Plan knobs are listed here; a model's own keys come from its builder
//! ([`crate::zoo::schema`]), so a new zoo model needs no entry here.

use serde::Serialize;

use crate::plan::{Plan, limits};
use crate::zoo::{self, Kind, Param, ZooError};

/// Where a key belongs on a form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// The model's own keys (sizes, widths, depths).
    Model,
    /// Micro-batch and accumulation.
    Batch,
    /// Precision, checkpointing, the allocator and memory caps.
    Memory,
    Optimizer,
    /// Data loading on the host.
    Host,
    /// How long, where and with which program the job runs.
    Run,
}

impl Group {
    pub const ALL: [Group; 6] = [Group::Model, Group::Batch, Group::Memory, Group::Optimizer, Group::Host, Group::Run];

    pub fn label(self) -> &'static str {
        match self {
            Group::Model => "Model",
            Group::Batch => "Batch",
            Group::Memory => "Memory",
            Group::Optimizer => "Optimizer",
            Group::Host => "Data loading",
            Group::Run => "Run",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Field {
    #[serde(flatten)]
    pub param: Param,
    pub group: Group,
}

const fn int(min: u64, max: u64) -> Kind {
    Kind::Int { min, max }
}

fn choice(allowed: &[&'static str]) -> Kind {
    Kind::Choice { allowed: allowed.to_vec() }
}

fn unit_interval() -> Kind {
    Kind::Number { min: 0.0, max: 0.999_999 }
}

/// The plan's own knobs, in form order, with defaults from [`Plan::zoo`] (what a key
/// left out means).
pub fn plan_fields() -> Vec<Field> {
    let base = Plan::zoo("mlp");
    let mut out = Vec::new();
    let mut add = |key: &str, kind: Kind, default: String, unit: &'static str, help: &'static str, group: Group| {
        out.push(Field { param: Param { key: key.to_owned(), kind, default, unit, help }, group });
    };
    use Group::*;
    let b = |v: bool| v.to_string();
    add(
        "batch",
        int(1, limits::MAX_MICRO_BATCH),
        base.micro_batch.to_string(),
        "samples",
        "Micro-batch: samples in one forward and backward pass.",
        Batch,
    );
    add(
        "accum",
        int(1, limits::MAX_ACCUMULATION),
        base.accumulation.to_string(),
        "micro-batches",
        "Gradient accumulation: micro-batches per optimizer step (effective batch = batch x accum).",
        Batch,
    );
    add(
        "precision",
        choice(&["fp32", "fp16", "bf16"]),
        base.precision.word().to_owned(),
        "",
        "fp32, or automatic mixed precision in fp16 or bf16 (fp32 master weights).",
        Memory,
    );
    add(
        "checkpoint",
        choice(&["off", "blocks"]),
        "off".to_owned(),
        "",
        "Gradient checkpointing block by block, as the reference's own API does it.",
        Memory,
    );
    add(
        "checkpoint_segments",
        int(0, limits::MAX_CHECKPOINT_SEGMENTS),
        "0".to_owned(),
        "segments",
        "checkpoint_sequential over the model's top-level stages in this many segments (0: off).",
        Memory,
    );
    add(
        "expandable_segments",
        Kind::Bool,
        b(base.expandable_segments),
        "",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: segments grow instead of fragmenting.",
        Memory,
    );
    add(
        "memory_fraction",
        Kind::Number { min: 0.000_001, max: 1.0 },
        String::new(),
        "of the GPU",
        "torch.cuda.set_per_process_memory_fraction: caps the job at this share of the GPU (empty: none).",
        Memory,
    );
    add(
        "memory_limit",
        Kind::Text,
        String::new(),
        "bytes",
        "Caps the job's tensor memory, e.g. 12GiB (empty: the device's whole memory).",
        Memory,
    );
    add(
        "optimizer",
        choice(&["adamw", "adam", "momentum", "sgd"]),
        base.optimizer.word().to_owned(),
        "",
        "AdamW and Adam keep two fp32 states per weight, SGD with momentum one, plain SGD none.",
        Optimizer,
    );
    add(
        "lr",
        Kind::Number { min: 1e-12, max: limits::MAX_LEARNING_RATE },
        base.learning_rate.to_string(),
        "",
        "Learning rate.",
        Optimizer,
    );
    add(
        "weight_decay",
        unit_interval(),
        base.optimizer.weight_decay().to_string(),
        "",
        "Weight decay (decoupled for AdamW, L2 for Adam and SGD).",
        Optimizer,
    );
    add("momentum", unit_interval(), "0.9".to_owned(), "", "SGD momentum (optimizer=momentum).", Optimizer);
    add("nesterov", Kind::Bool, "false".to_owned(), "", "Nesterov momentum (SGD with momentum).", Optimizer);
    add("beta1", unit_interval(), "0.9".to_owned(), "", "Adam's first-moment decay.", Optimizer);
    add("beta2", unit_interval(), "0.999".to_owned(), "", "Adam's second-moment decay.", Optimizer);
    add("eps", Kind::Number { min: 1e-300, max: 0.999_999 }, "0.00000001".to_owned(), "", "Adam's epsilon.", Optimizer);
    add(
        "optimizer_impl",
        choice(&["auto", "for_loop", "foreach", "fused"]),
        "auto".to_owned(),
        "",
        "PyTorch's foreach=/fused= choice: foreach makes temporaries for every weight at once, fused none.",
        Optimizer,
    );
    add(
        "loss",
        choice(&["ce", "bce", "dice", "dice_ce"]),
        base.loss.kind.word().to_owned(),
        "",
        "The loss: cross-entropy, binary cross-entropy, Dice or Dice + cross-entropy.",
        Optimizer,
    );
    add("label_smoothing", unit_interval(), "0".to_owned(), "", "Cross-entropy label smoothing.", Optimizer);
    add(
        "workers",
        int(0, limits::MAX_LOADER_WORKERS),
        base.host.workers.to_string(),
        "processes",
        "DataLoader worker processes (0: batches are made in the training process).",
        Host,
    );
    add(
        "prefetch",
        int(1, limits::MAX_PREFETCH),
        base.host.prefetch_factor.to_string(),
        "batches",
        "Batches each worker keeps ready (prefetch_factor).",
        Host,
    );
    add(
        "pin_memory",
        Kind::Bool,
        b(base.host.pin_memory),
        "",
        "Copy batches into page-locked host buffers before the transfer.",
        Host,
    );
    add(
        "distance_loss_every",
        int(0, limits::MAX_STEPS),
        "0".to_owned(),
        "steps",
        "A surface (boundary) loss every N steps: a signed distance map of the labels made on the CPU, its weighted mean against the softmax added to the loss (0: never).",
        Host,
    );
    add(
        "distance_loss_weight",
        Kind::Number { min: 0.0, max: limits::MAX_SURFACE_WEIGHT },
        base.host.distance_loss_weight.to_string(),
        "",
        "The surface term's weight in the loss.",
        Host,
    );
    add(
        "lr_schedule",
        choice(&["constant", "linear", "cosine"]),
        base.lr_schedule.word().to_owned(),
        "",
        "The learning rate over the run: constant, linear decay to 0 or cosine decay, after any warm-up.",
        Optimizer,
    );
    add(
        "warmup_steps",
        int(0, limits::MAX_STEPS),
        "0".to_owned(),
        "steps",
        "Linear warm-up from 0 to lr over this many optimizer steps.",
        Optimizer,
    );
    add(
        "clip_grad_norm",
        Kind::Number { min: 1e-12, max: 1e6 },
        String::new(),
        "",
        "Clip gradients to this global L2 norm before each step (empty: no clipping).",
        Optimizer,
    );
    add(
        "loss_scale",
        Kind::Number { min: 1.0, max: 1e38 },
        base.loss_scale.to_string(),
        "",
        "fp16's initial dynamic loss scale (GradScaler's init_scale).",
        Memory,
    );
    add(
        "loss_scale_growth_interval",
        int(1, limits::MAX_STEPS),
        base.loss_scale_growth_interval.to_string(),
        "steps",
        "Clean fp16 steps after which the loss scale doubles (an inf or NaN halves it and skips the step).",
        Memory,
    );
    add(
        "empty_cache_every",
        int(0, limits::MAX_STEPS),
        "0".to_owned(),
        "micro-batches",
        "torch.cuda.empty_cache() every N micro-batches and at each epoch's end (0: never); costs time, not peak.",
        Memory,
    );
    add(
        "oom_fallback",
        Kind::Bool,
        b(base.oom_fallback),
        "",
        "On out-of-memory, halve the micro-batch and double accumulation (same effective batch) and redo the step.",
        Memory,
    );
    add("steps", int(1, limits::MAX_STEPS), base.total_steps().to_string(), "steps", "Optimizer steps to run.", Run);
    add(
        "epochs",
        int(1, limits::MAX_EPOCHS),
        String::new(),
        "epochs",
        "Epochs to run, with samples_per_epoch (instead of steps).",
        Run,
    );
    add(
        "samples_per_epoch",
        int(1, limits::MAX_SAMPLES_PER_EPOCH),
        String::new(),
        "samples",
        "Training samples per epoch, with epochs.",
        Run,
    );
    add(
        "val_batches",
        int(0, limits::MAX_STEPS),
        "0".to_owned(),
        "batches",
        "Batches of a validation pass (model.eval(), no grad; 0: no validation). Its peak is estimated apart.",
        Run,
    );
    add(
        "val_every",
        int(0, limits::MAX_STEPS),
        "0".to_owned(),
        "steps",
        "Validate every N optimizer steps (0: at each epoch's end) and after the last.",
        Run,
    );
    add(
        "val_batch",
        int(0, limits::MAX_MICRO_BATCH),
        "0".to_owned(),
        "samples",
        "The validation micro-batch (0: the training micro-batch).",
        Run,
    );
    add(
        "data",
        Kind::Text,
        String::new(),
        "",
        "Training data under the agent's data root: .npy, NIfTI (.nii, .nii.gz) or PNG/JPEG files (empty: synthetic).",
        Host,
    );
    add(
        "data_labels",
        Kind::Text,
        String::new(),
        "",
        "A CSV or JSON manifest of input,label under the data root (empty: masks beside the inputs, or a folder per class).",
        Host,
    );
    add("val_data", Kind::Text, String::new(), "", "Validation data, as data (empty: sampled from data).", Host);
    add(
        "host_memory_limit",
        Kind::Text,
        String::new(),
        "bytes",
        "The job's host memory, e.g. 16GiB: the loader's workers and prefetch are lowered before it is reached.",
        Host,
    );
    add(
        "checkpoint_every",
        int(0, limits::MAX_STEPS),
        "0".to_owned(),
        "steps",
        "Save weights, optimizer state, step and loss scale every N steps and at the end (0: never).",
        Run,
    );
    add(
        "runtime",
        choice(&["pytorch", "headroom"]),
        base.runtime.word().to_owned(),
        "",
        "Whose training program the estimate answers for: a plain PyTorch script, or Headroom's trainer.",
        Run,
    );
    add("device", Kind::Text, "auto".to_owned(), "", "Where `headroom run` trains: auto, cpu or cuda:N.", Run);
    add(
        "threads",
        int(1, limits::MAX_CPU_THREADS),
        String::new(),
        "threads",
        "CPU threads (empty: 4 for estimates, this machine's cores for runs).",
        Run,
    );
    add("onednn", Kind::Bool, b(base.onednn), "", "oneDNN for CPU convolutions (PyTorch's default).", Run);
    add(
        "seed",
        Kind::Int { min: 0, max: u64::MAX },
        base.seed.to_string(),
        "",
        "Seeds the weights and the synthetic data.",
        Run,
    );
    add("name", Kind::Text, base.name.clone(), "", "The plan's name.", Run);
    add(
        "retain_bytes_per_step",
        int(0, limits::MAX_RETAIN_BYTES_PER_STEP),
        "0".to_owned(),
        "bytes",
        "A deliberate leak for the leak detector's demonstration: the trainer keeps this much from every step.",
        Run,
    );
    out
}

/// Model `name`'s keys followed by the plan's knobs.
pub fn fields(name: &str) -> Result<Vec<Field>, ZooError> {
    let mut out: Vec<Field> =
        zoo::schema(name)?.into_iter().map(|param| Field { param, group: Group::Model }).collect();
    out.extend(plan_fields());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plan_key_is_one_apply_settings_takes_and_its_default_is_the_base() {
        let base = Plan::zoo("resnet18");
        for f in plan_fields() {
            assert!(!f.param.help.is_empty(), "{}", f.param.key);
            // Momentum applies to SGD only; the base is AdamW.
            if f.param.default.is_empty() || ["name", "momentum"].contains(&f.param.key.as_str()) {
                continue;
            }
            let mut plan = Plan::zoo("resnet18");
            plan.apply_settings(&[(f.param.key.clone(), f.param.default.clone())])
                .unwrap_or_else(|e| panic!("{}: {e}", f.param.key));
            plan.validate().unwrap_or_else(|e| panic!("{}: {e}", f.param.key));
            assert_eq!(plan, base, "{}={} changes the base plan", f.param.key, f.param.default);
        }
        // Every knob apply_settings takes is on the form.
        let keys: std::collections::BTreeSet<String> = plan_fields().into_iter().map(|f| f.param.key).collect();
        for key in crate::plan::PLAN_KEYS {
            assert!(keys.contains(*key), "{key} is a plan key but not in plan_fields()");
        }
        assert_eq!(keys.len(), crate::plan::PLAN_KEYS.len(), "plan_fields() has keys PLAN_KEYS lacks");
        // A key that is not a plan knob is a model key, and the model names it.
        let mut plan = Plan::zoo("resnet18");
        plan.apply_settings(&[("bogus".to_owned(), "1".to_owned())]).expect("stored");
        assert!(plan.validate().expect_err("unknown").to_string().contains("bogus"));
    }
}
