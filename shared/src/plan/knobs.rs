//! The plan's knobs, one definition each: its key, its short name in share links, what
//! it takes, where it sits on a form, its unit and help, how it reads from a plan and how
//! it sets one. Every list of knobs is derived from [`KNOBS`]: the keys `--set` takes
//! ([`PLAN_KEYS`]), [`Plan::apply_settings`], [`Plan::to_settings`], the form's fields
//! (`schema::plan_fields`) and the links' short names (`link`). A new knob is one entry
//! here and its field in `Plan`.
//!
//! The order is the one `to_settings` writes pairs in (and the form shows knobs in): a
//! stored calibration's key and a link's text are these pairs, so keep it.

use serde::Serialize;

use super::limits;
use super::{
    DeviceChoice, LrSchedule, Optimizer, OptimizerImpl, Outputs, Plan, PlanError, Precision, Runtime, Schedule,
    WeightsInit,
};
use crate::units::{QUOTED_BYTES, clip};
use crate::zoo::{Kind, LossKind};

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

/// A plan being set from pairs: the plan, and the knobs that apply only once every pair
/// is read (the optimizer's own knobs wait for the optimizer, whatever the order; epochs
/// and samples per epoch go together).
pub struct Staged<'a> {
    pub plan: &'a mut Plan,
    weight_decay: Option<f64>,
    nesterov: Option<bool>,
    momentum: Option<f64>,
    beta1: Option<f64>,
    beta2: Option<f64>,
    eps: Option<f64>,
    epochs: Option<u64>,
    samples_per_epoch: Option<u64>,
}

/// One plan knob.
pub struct Knob {
    pub key: &'static str,
    /// Its short name in share links.
    pub alias: Option<&'static str>,
    pub group: Group,
    pub unit: &'static str,
    pub help: &'static str,
    /// What it takes.
    pub kind: fn() -> Kind,
    /// What leaving it out means, as a form shows it, for the base plan given.
    pub default: fn(&Plan) -> String,
    /// Its value in `plan` as `key=value` writes it, `None` where the plan has the base
    /// plan's (the pair is left out).
    pub get: fn(&Plan, &Plan) -> Option<String>,
    /// Sets it from text; the error is the reason (the caller names the key).
    pub set: fn(&mut Staged<'_>, &str) -> Result<(), String>,
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("expected a number, got '{}'", clip(v, QUOTED_BYTES)))
}

fn flag(v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got '{}'", clip(v, QUOTED_BYTES))),
    }
}

/// A size in bytes (`512MiB`, `2e9`), or `none`.
fn bytes_or_none(v: &str) -> Result<Option<u64>, String> {
    if v == "none" {
        return Ok(None);
    }
    crate::units::parse_bytes(v).map(Some)
}

fn word<T>(v: &str, parse: fn(&str) -> Option<T>, choices: &str) -> Result<T, String> {
    parse(v).ok_or_else(|| format!("expected {choices}, got '{}'", clip(v, QUOTED_BYTES)))
}

fn differs<T: PartialEq + ToString>(value: T, base: T) -> Option<String> {
    (value != base).then(|| value.to_string())
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

fn empty(_: &Plan) -> String {
    String::new()
}

fn zero(_: &Plan) -> String {
    "0".to_owned()
}

/// The optimizer's own defaults, for the optimizer `plan` names.
fn defaults_of(plan: &Plan, base: &Plan) -> Optimizer {
    Optimizer::from_word(plan.optimizer.word()).unwrap_or_else(|| base.optimizer.clone())
}

/// Every plan knob, in the order `to_settings` writes them.
pub static KNOBS: &[Knob] = &[
    Knob {
        key: "name",
        alias: Some("n"),
        group: Group::Run,
        unit: "",
        help: "The plan's name.",
        kind: || Kind::Text,
        default: |base| base.name.clone(),
        get: |p, base| (p.name != base.name).then(|| p.name.clone()),
        set: |s, v| {
            s.plan.name = v.to_owned();
            Ok(())
        },
    },
    Knob {
        key: "batch",
        alias: Some("b"),
        group: Group::Batch,
        unit: "samples",
        help: "Micro-batch: samples in one forward and backward pass.",
        kind: || int(1, limits::MAX_MICRO_BATCH),
        default: |base| base.micro_batch.to_string(),
        get: |p, base| differs(p.micro_batch, base.micro_batch),
        set: |s, v| {
            s.plan.micro_batch = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "accum",
        alias: Some("a"),
        group: Group::Batch,
        unit: "micro-batches",
        help: "Gradient accumulation: micro-batches per optimizer step (effective batch = batch x accum).",
        kind: || int(1, limits::MAX_ACCUMULATION),
        default: |base| base.accumulation.to_string(),
        get: |p, base| differs(p.accumulation, base.accumulation),
        set: |s, v| {
            s.plan.accumulation = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "precision",
        alias: Some("p"),
        group: Group::Memory,
        unit: "",
        help: "fp32, or automatic mixed precision in fp16 or bf16 (fp32 master weights).",
        kind: || choice(&["fp32", "fp16", "bf16"]),
        default: |base| base.precision.word().to_owned(),
        get: |p, base| (p.precision != base.precision).then(|| p.precision.word().to_owned()),
        set: |s, v| {
            s.plan.precision = word(v, Precision::from_word, "fp32, fp16 or bf16")?;
            Ok(())
        },
    },
    Knob {
        key: "checkpoint",
        alias: Some("ck"),
        group: Group::Memory,
        unit: "",
        help: "Gradient checkpointing block by block, as the reference's own API does it.",
        kind: || choice(&["off", "blocks"]),
        default: |_| "off".to_owned(),
        get: |p, _| p.checkpoint_blocks.then(|| "blocks".to_owned()),
        set: |s, v| {
            s.plan.checkpoint_blocks = match v {
                "blocks" => true,
                "off" => false,
                _ => {
                    return Err(format!(
                        "expected blocks or off (or checkpoint_segments=N), got '{}'",
                        clip(v, QUOTED_BYTES)
                    ));
                }
            };
            s.plan.checkpoint_segments = 0;
            Ok(())
        },
    },
    Knob {
        key: "checkpoint_segments",
        alias: Some("cs"),
        group: Group::Memory,
        unit: "segments",
        help: "checkpoint_sequential over the model's top-level stages in this many segments (0: off).",
        kind: || int(0, limits::MAX_CHECKPOINT_SEGMENTS),
        default: zero,
        get: |p, base| differs(p.checkpoint_segments, base.checkpoint_segments),
        set: |s, v| {
            s.plan.checkpoint_segments = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "expandable_segments",
        alias: Some("xs"),
        group: Group::Memory,
        unit: "",
        help: "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: segments grow instead of fragmenting.",
        kind: || Kind::Bool,
        default: |base| base.expandable_segments.to_string(),
        get: |p, base| differs(p.expandable_segments, base.expandable_segments),
        set: |s, v| {
            s.plan.expandable_segments = flag(v)?;
            Ok(())
        },
    },
    Knob {
        key: "memory_fraction",
        alias: Some("mf"),
        group: Group::Memory,
        unit: "of the GPU",
        help: "torch.cuda.set_per_process_memory_fraction: caps the job at this share of the GPU (empty: none).",
        kind: || Kind::Number { min: 0.000_001, max: 1.0 },
        default: empty,
        get: |p, _| p.memory_fraction.map(|f| f.to_string()),
        set: |s, v| {
            s.plan.memory_fraction = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "memory_limit",
        alias: Some("ml"),
        group: Group::Memory,
        unit: "bytes",
        help: "Caps the job's tensor memory, e.g. 12GiB (empty: the device's whole memory).",
        kind: || Kind::Text,
        default: empty,
        get: |p, _| p.memory_limit_bytes.map(|b| b.to_string()),
        set: |s, v| {
            s.plan.memory_limit_bytes = bytes_or_none(v)?;
            Ok(())
        },
    },
    Knob {
        key: "host_memory_limit",
        alias: None,
        group: Group::Host,
        unit: "bytes",
        help: "The job's host memory, e.g. 16GiB: the loader's workers and prefetch are lowered before it is reached.",
        kind: || Kind::Text,
        default: empty,
        get: |p, _| p.host_memory_limit_bytes.map(|b| b.to_string()),
        set: |s, v| {
            s.plan.host_memory_limit_bytes = bytes_or_none(v)?;
            Ok(())
        },
    },
    Knob {
        key: "data",
        alias: None,
        group: Group::Host,
        unit: "",
        help: "Training data under the agent's data root: .npy, NIfTI (.nii, .nii.gz) or PNG/JPEG files (empty: synthetic).",
        kind: || Kind::Text,
        default: empty,
        get: |p, _| (!p.data.is_empty()).then(|| p.data.clone()),
        set: |s, v| {
            s.plan.data = v.to_owned();
            Ok(())
        },
    },
    Knob {
        key: "data_labels",
        alias: None,
        group: Group::Host,
        unit: "",
        help: "A CSV or JSON manifest of input,label under the data root (empty: masks beside the inputs, or a folder per class).",
        kind: || Kind::Text,
        default: empty,
        get: |p, _| (!p.data_labels.is_empty()).then(|| p.data_labels.clone()),
        set: |s, v| {
            s.plan.data_labels = v.to_owned();
            Ok(())
        },
    },
    Knob {
        key: "val_data",
        alias: None,
        group: Group::Host,
        unit: "",
        help: "Validation data, as data (empty: sampled from data).",
        kind: || Kind::Text,
        default: empty,
        get: |p, _| (!p.val_data.is_empty()).then(|| p.val_data.clone()),
        set: |s, v| {
            s.plan.val_data = v.to_owned();
            Ok(())
        },
    },
    Knob {
        key: "optimizer",
        alias: Some("o"),
        group: Group::Optimizer,
        unit: "",
        help: "AdamW and Adam keep two fp32 states per weight, SGD with momentum one, plain SGD none.",
        kind: || choice(&["adamw", "adam", "momentum", "sgd"]),
        default: |base| base.optimizer.word().to_owned(),
        get: |p, base| (p.optimizer.word() != base.optimizer.word()).then(|| p.optimizer.word().to_owned()),
        set: |s, v| {
            s.plan.optimizer = word(v, Optimizer::from_word, "sgd, momentum, adam or adamw")?;
            Ok(())
        },
    },
    Knob {
        key: "weight_decay",
        alias: Some("wd"),
        group: Group::Optimizer,
        unit: "",
        help: "Weight decay (decoupled for AdamW, L2 for Adam and SGD).",
        kind: unit_interval,
        default: |base| base.optimizer.weight_decay().to_string(),
        get: |p, base| differs(p.optimizer.weight_decay(), defaults_of(p, base).weight_decay()),
        set: |s, v| {
            s.weight_decay = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "momentum",
        alias: Some("mo"),
        group: Group::Optimizer,
        unit: "",
        help: "SGD momentum (optimizer=momentum).",
        kind: unit_interval,
        default: |_| "0.9".to_owned(),
        get: |p, base| match (&p.optimizer, defaults_of(p, base)) {
            (Optimizer::Sgd { momentum, .. }, Optimizer::Sgd { momentum: m0, .. }) => differs(*momentum, m0),
            _ => None,
        },
        set: |s, v| {
            s.momentum = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "nesterov",
        alias: Some("nv"),
        group: Group::Optimizer,
        unit: "",
        help: "Nesterov momentum (SGD with momentum).",
        kind: || Kind::Bool,
        default: |_| "false".to_owned(),
        get: |p, _| matches!(p.optimizer, Optimizer::Sgd { nesterov: true, .. }).then(|| "true".to_owned()),
        set: |s, v| {
            s.nesterov = Some(flag(v)?);
            Ok(())
        },
    },
    Knob {
        key: "beta1",
        alias: None,
        group: Group::Optimizer,
        unit: "",
        help: "Adam's first-moment decay.",
        kind: unit_interval,
        default: |_| "0.9".to_owned(),
        get: |p, base| adam(p, base, |b1, _, _| b1),
        set: |s, v| {
            s.beta1 = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "beta2",
        alias: None,
        group: Group::Optimizer,
        unit: "",
        help: "Adam's second-moment decay.",
        kind: unit_interval,
        default: |_| "0.999".to_owned(),
        get: |p, base| adam(p, base, |_, b2, _| b2),
        set: |s, v| {
            s.beta2 = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "eps",
        alias: None,
        group: Group::Optimizer,
        unit: "",
        help: "Adam's epsilon.",
        kind: || Kind::Number { min: 1e-300, max: 0.999_999 },
        default: |_| "0.00000001".to_owned(),
        get: |p, base| adam(p, base, |_, _, e| e),
        set: |s, v| {
            s.eps = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "lr",
        alias: None,
        group: Group::Optimizer,
        unit: "",
        help: "Learning rate.",
        kind: || Kind::Number { min: 1e-12, max: limits::MAX_LEARNING_RATE },
        default: |base| base.learning_rate.to_string(),
        get: |p, base| differs(p.learning_rate, base.learning_rate),
        set: |s, v| {
            s.plan.learning_rate = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "optimizer_impl",
        alias: Some("oi"),
        group: Group::Optimizer,
        unit: "",
        help: "PyTorch's foreach=/fused= choice: foreach makes temporaries for every weight at once, fused none.",
        kind: || choice(&["auto", "for_loop", "foreach", "fused"]),
        default: |_| "auto".to_owned(),
        get: |p, base| (p.optimizer_impl != base.optimizer_impl).then(|| p.optimizer_impl.word().to_owned()),
        set: |s, v| {
            s.plan.optimizer_impl = word(v, OptimizerImpl::from_word, "auto, for_loop, foreach or fused")?;
            Ok(())
        },
    },
    Knob {
        key: "loss",
        alias: Some("ls"),
        group: Group::Optimizer,
        unit: "",
        help: "The loss: cross-entropy, binary cross-entropy, Dice or Dice + cross-entropy; for an exported model also token_ce (a class per position), causal_lm (the next token) or mse.",
        kind: || choice(&["ce", "bce", "dice", "dice_ce", "token_ce", "causal_lm", "mse"]),
        default: |base| base.loss.kind.word().to_owned(),
        get: |p, base| (p.loss.kind != base.loss.kind).then(|| p.loss.kind.word().to_owned()),
        set: |s, v| {
            s.plan.loss.kind = word(v, LossKind::from_word, "ce, bce, dice, dice_ce, token_ce, causal_lm or mse")?;
            Ok(())
        },
    },
    Knob {
        key: "label_smoothing",
        alias: Some("lsm"),
        group: Group::Optimizer,
        unit: "",
        help: "Cross-entropy label smoothing.",
        kind: unit_interval,
        default: zero,
        get: |p, base| differs(p.loss.label_smoothing, base.loss.label_smoothing),
        set: |s, v| {
            s.plan.loss.label_smoothing = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "workers",
        alias: Some("w"),
        group: Group::Host,
        unit: "processes",
        help: "DataLoader worker processes (0: batches are made in the training process).",
        kind: || int(0, limits::MAX_LOADER_WORKERS),
        default: |base| base.host.workers.to_string(),
        get: |p, base| differs(p.host.workers, base.host.workers),
        set: |s, v| {
            s.plan.host.workers = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "prefetch",
        alias: Some("pf"),
        group: Group::Host,
        unit: "batches",
        help: "Batches each worker keeps ready (prefetch_factor).",
        kind: || int(1, limits::MAX_PREFETCH),
        default: |base| base.host.prefetch_factor.to_string(),
        get: |p, base| differs(p.host.prefetch_factor, base.host.prefetch_factor),
        set: |s, v| {
            s.plan.host.prefetch_factor = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "pin_memory",
        alias: Some("pm"),
        group: Group::Host,
        unit: "",
        help: "Copy batches into page-locked host buffers before the transfer.",
        kind: || Kind::Bool,
        default: |base| base.host.pin_memory.to_string(),
        get: |p, base| differs(p.host.pin_memory, base.host.pin_memory),
        set: |s, v| {
            s.plan.host.pin_memory = flag(v)?;
            Ok(())
        },
    },
    Knob {
        key: "distance_loss_every",
        alias: Some("dl"),
        group: Group::Host,
        unit: "steps",
        help: "A surface (boundary) loss every N steps: a signed distance map of the labels made on the CPU, its weighted mean against the softmax added to the loss (0: never).",
        kind: || int(0, limits::MAX_STEPS),
        default: zero,
        get: |p, base| differs(p.host.distance_loss_every, base.host.distance_loss_every),
        set: |s, v| {
            s.plan.host.distance_loss_every = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "distance_loss_weight",
        alias: Some("dw"),
        group: Group::Host,
        unit: "",
        help: "The surface term's weight in the loss.",
        kind: || Kind::Number { min: 0.0, max: limits::MAX_SURFACE_WEIGHT },
        default: |base| base.host.distance_loss_weight.to_string(),
        get: |p, base| differs(p.host.distance_loss_weight, base.host.distance_loss_weight),
        set: |s, v| {
            s.plan.host.distance_loss_weight = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "steps",
        alias: Some("st"),
        group: Group::Run,
        unit: "steps",
        help: "Optimizer steps to run.",
        kind: || int(1, limits::MAX_STEPS),
        default: |base| base.total_steps().to_string(),
        get: |p, base| match p.schedule {
            Schedule::Steps(n) if p.schedule != base.schedule => Some(n.to_string()),
            _ => None,
        },
        set: |s, v| {
            s.plan.schedule = Schedule::Steps(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "epochs",
        alias: None,
        group: Group::Run,
        unit: "epochs",
        help: "Epochs to run, with samples_per_epoch (instead of steps).",
        kind: || int(1, limits::MAX_EPOCHS),
        default: empty,
        get: |p, _| match p.schedule {
            Schedule::Epochs { epochs, .. } => Some(epochs.to_string()),
            Schedule::Steps(_) => None,
        },
        set: |s, v| {
            s.epochs = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "samples_per_epoch",
        alias: None,
        group: Group::Run,
        unit: "samples",
        help: "Training samples per epoch, with epochs.",
        kind: || int(1, limits::MAX_SAMPLES_PER_EPOCH),
        default: empty,
        get: |p, _| match p.schedule {
            Schedule::Epochs { samples_per_epoch, .. } => Some(samples_per_epoch.to_string()),
            Schedule::Steps(_) => None,
        },
        set: |s, v| {
            s.samples_per_epoch = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "runtime",
        alias: None,
        group: Group::Run,
        unit: "",
        help: "Whose training program the estimate answers for: a plain PyTorch script, or Headroom's trainer.",
        kind: || choice(&["pytorch", "headroom"]),
        default: |base| base.runtime.word().to_owned(),
        get: |p, base| (p.runtime != base.runtime).then(|| p.runtime.word().to_owned()),
        set: |s, v| {
            s.plan.runtime = word(v, Runtime::from_word, "pytorch or headroom")?;
            Ok(())
        },
    },
    Knob {
        key: "outputs",
        alias: None,
        group: Group::Run,
        unit: "",
        help: "What your training loop holds of the model's outputs through backward: kept (out = model(x)), dropped (loss = model(**batch).loss, as Hugging Face's Trainer), or auto (dropped for a model that computes its own loss). Headroom's trainer does the same.",
        kind: || choice(&["auto", "kept", "dropped"]),
        default: |base| base.outputs.word().to_owned(),
        get: |p, base| (p.outputs != base.outputs).then(|| p.outputs.word().to_owned()),
        set: |s, v| {
            s.plan.outputs = word(v, Outputs::from_word, "auto, kept or dropped")?;
            Ok(())
        },
    },
    Knob {
        key: "init",
        alias: None,
        group: Group::Run,
        unit: "",
        help: "An exported model's starting weights: the file's (file) or fresh ones by PyTorch's default rules for each layer (random). Memory is the same either way.",
        kind: || choice(&["file", "random"]),
        default: |base| base.init.word().to_owned(),
        get: |p, base| (p.init != base.init).then(|| p.init.word().to_owned()),
        set: |s, v| {
            s.plan.init = word(v, WeightsInit::from_word, "file or random")?;
            Ok(())
        },
    },
    Knob {
        key: "device",
        alias: None,
        group: Group::Run,
        unit: "",
        help: "Where `headroom run` trains: auto, cpu or cuda:N.",
        kind: || Kind::Text,
        default: |_| "auto".to_owned(),
        get: |p, _| match p.device {
            DeviceChoice::Auto => None,
            DeviceChoice::Cpu => Some("cpu".to_owned()),
            DeviceChoice::Cuda(i) => Some(format!("cuda:{i}")),
        },
        set: |s, v| {
            s.plan.device = match v {
                "auto" => DeviceChoice::Auto,
                "cpu" => DeviceChoice::Cpu,
                _ => v
                    .strip_prefix("cuda:")
                    .and_then(|i| i.parse().ok())
                    .map(DeviceChoice::Cuda)
                    .ok_or_else(|| format!("expected auto, cpu or cuda:N, got '{}'", clip(v, QUOTED_BYTES)))?,
            };
            Ok(())
        },
    },
    Knob {
        key: "threads",
        alias: None,
        group: Group::Run,
        unit: "threads",
        help: "CPU threads (empty: 4 for estimates, this machine's cores for runs).",
        kind: || int(1, limits::MAX_CPU_THREADS),
        default: empty,
        get: |p, _| p.cpu_threads.map(|t| t.to_string()),
        set: |s, v| {
            s.plan.cpu_threads = Some(num(v)?);
            Ok(())
        },
    },
    Knob {
        key: "cpu_isa",
        alias: None,
        group: Group::Run,
        unit: "",
        help: "The CPU's instruction set as oneDNN dispatches on it (its kernels, blocking and bf16 support): auto (the machine's own for the CLI and the agent; where none is known the interval covers every ISA), sse41, avx2, avx512_core, avx512_core_bf16 or avx512_core_amx.",
        kind: || choice(&["auto", "sse41", "avx2", "avx512_core", "avx512_core_bf16", "avx512_core_amx"]),
        default: |_| "auto".to_owned(),
        get: |p, _| p.cpu_isa.map(|i| i.word().to_owned()),
        set: |s, v| {
            s.plan.cpu_isa = match v {
                "auto" => None,
                _ => Some(word(
                    v,
                    crate::isa::CpuIsa::from_word,
                    "auto, sse41, avx2, avx512_core, avx512_core_bf16 or avx512_core_amx",
                )?),
            };
            Ok(())
        },
    },
    Knob {
        key: "onednn",
        alias: None,
        group: Group::Run,
        unit: "",
        help: "oneDNN for CPU convolutions (PyTorch's default).",
        kind: || Kind::Bool,
        default: |base| base.onednn.to_string(),
        get: |p, base| differs(p.onednn, base.onednn),
        set: |s, v| {
            s.plan.onednn = flag(v)?;
            Ok(())
        },
    },
    Knob {
        key: "seed",
        alias: Some("sd"),
        group: Group::Run,
        unit: "",
        help: "Seeds the weights and the synthetic data.",
        kind: || Kind::Int { min: 0, max: u64::MAX },
        default: |base| base.seed.to_string(),
        get: |p, base| differs(p.seed, base.seed),
        set: |s, v| {
            s.plan.seed = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "retain_bytes_per_step",
        alias: None,
        group: Group::Run,
        unit: "bytes",
        help: "A deliberate leak for the leak detector's demonstration: the trainer keeps this much from every step.",
        kind: || int(0, limits::MAX_RETAIN_BYTES_PER_STEP),
        default: zero,
        get: |p, base| differs(p.retain_bytes_per_step, base.retain_bytes_per_step),
        set: |s, v| {
            s.plan.retain_bytes_per_step = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "lr_schedule",
        alias: None,
        group: Group::Optimizer,
        unit: "",
        help: "The learning rate over the run: constant, linear decay to 0 or cosine decay, after any warm-up.",
        kind: || choice(&["constant", "linear", "cosine"]),
        default: |base| base.lr_schedule.word().to_owned(),
        get: |p, base| (p.lr_schedule != base.lr_schedule).then(|| p.lr_schedule.word().to_owned()),
        set: |s, v| {
            s.plan.lr_schedule = word(v, LrSchedule::from_word, "constant, linear or cosine")?;
            Ok(())
        },
    },
    Knob {
        key: "warmup_steps",
        alias: None,
        group: Group::Optimizer,
        unit: "steps",
        help: "Linear warm-up from 0 to lr over this many optimizer steps.",
        kind: || int(0, limits::MAX_STEPS),
        default: zero,
        get: |p, base| differs(p.warmup_steps, base.warmup_steps),
        set: |s, v| {
            s.plan.warmup_steps = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "oom_fallback",
        alias: None,
        group: Group::Memory,
        unit: "",
        help: "On out-of-memory, halve the micro-batch and double accumulation (same effective batch) and redo the step.",
        kind: || Kind::Bool,
        default: |base| base.oom_fallback.to_string(),
        get: |p, base| differs(p.oom_fallback, base.oom_fallback),
        set: |s, v| {
            s.plan.oom_fallback = flag(v)?;
            Ok(())
        },
    },
    Knob {
        key: "clip_grad_norm",
        alias: None,
        group: Group::Optimizer,
        unit: "",
        help: "Clip gradients to this global L2 norm before each step (empty: no clipping).",
        kind: || Kind::Number { min: 1e-12, max: 1e6 },
        default: empty,
        get: |p, _| p.clip_grad_norm.map(|c| c.to_string()),
        set: |s, v| {
            s.plan.clip_grad_norm = if v == "none" { None } else { Some(num(v)?) };
            Ok(())
        },
    },
    Knob {
        key: "empty_cache_every",
        alias: None,
        group: Group::Memory,
        unit: "micro-batches",
        help: "torch.cuda.empty_cache() every N micro-batches and at each epoch's end (0: never); costs time, not peak.",
        kind: || int(0, limits::MAX_STEPS),
        default: zero,
        get: |p, base| differs(p.empty_cache_every, base.empty_cache_every),
        set: |s, v| {
            s.plan.empty_cache_every = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "loss_scale",
        alias: None,
        group: Group::Memory,
        unit: "",
        help: "fp16's initial dynamic loss scale (GradScaler's init_scale).",
        kind: || Kind::Number { min: 1.0, max: 1e38 },
        default: |base| base.loss_scale.to_string(),
        get: |p, base| differs(p.loss_scale, base.loss_scale),
        set: |s, v| {
            s.plan.loss_scale = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "loss_scale_growth_interval",
        alias: None,
        group: Group::Memory,
        unit: "steps",
        help: "Clean fp16 steps after which the loss scale doubles (an inf or NaN halves it and skips the step).",
        kind: || int(1, limits::MAX_STEPS),
        default: |base| base.loss_scale_growth_interval.to_string(),
        get: |p, base| differs(p.loss_scale_growth_interval, base.loss_scale_growth_interval),
        set: |s, v| {
            s.plan.loss_scale_growth_interval = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "val_batches",
        alias: None,
        group: Group::Run,
        unit: "batches",
        help: "Batches of a validation pass (model.eval(), no grad; 0: no validation). Its peak is estimated apart.",
        kind: || int(0, limits::MAX_STEPS),
        default: zero,
        get: |p, base| differs(p.val_batches, base.val_batches),
        set: |s, v| {
            s.plan.val_batches = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "val_every",
        alias: None,
        group: Group::Run,
        unit: "steps",
        help: "Validate every N optimizer steps (0: at each epoch's end) and after the last.",
        kind: || int(0, limits::MAX_STEPS),
        default: zero,
        get: |p, base| differs(p.val_every, base.val_every),
        set: |s, v| {
            s.plan.val_every = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "val_batch",
        alias: None,
        group: Group::Run,
        unit: "samples",
        help: "The validation micro-batch (0: the training micro-batch).",
        kind: || int(0, limits::MAX_MICRO_BATCH),
        default: zero,
        get: |p, base| differs(p.val_batch, base.val_batch),
        set: |s, v| {
            s.plan.val_batch = num(v)?;
            Ok(())
        },
    },
    Knob {
        key: "checkpoint_every",
        alias: None,
        group: Group::Run,
        unit: "steps",
        help: "Save weights, optimizer state, step and loss scale every N steps and at the end (0: never).",
        kind: || int(0, limits::MAX_STEPS),
        default: zero,
        get: |p, base| differs(p.checkpoint_every, base.checkpoint_every),
        set: |s, v| {
            s.plan.checkpoint_every = num(v)?;
            Ok(())
        },
    },
];

/// One of Adam's or AdamW's own knobs, where it differs from the optimizer's default.
fn adam(p: &Plan, base: &Plan, pick: fn(f64, f64, f64) -> f64) -> Option<String> {
    match (&p.optimizer, defaults_of(p, base)) {
        (
            Optimizer::Adam { beta1, beta2, eps, .. } | Optimizer::AdamW { beta1, beta2, eps, .. },
            Optimizer::Adam { beta1: b1, beta2: b2, eps: e0, .. }
            | Optimizer::AdamW { beta1: b1, beta2: b2, eps: e0, .. },
        ) => differs(pick(*beta1, *beta2, *eps), pick(b1, b2, e0)),
        _ => None,
    }
}

/// Every key `--set` takes as a plan knob (any other key is the model's).
pub fn plan_keys() -> impl Iterator<Item = &'static str> {
    KNOBS.iter().map(|k| k.key)
}

/// The knob of `key`.
pub fn knob(key: &str) -> Option<&'static Knob> {
    KNOBS.iter().find(|k| k.key == key)
}

impl Staged<'_> {
    /// Applies what waited for every pair: the optimizer's own knobs, then epochs and
    /// samples per epoch.
    fn finish(self) -> Result<(), PlanError> {
        let setting = |key: &str, reason: &str| PlanError::Setting { key: key.to_owned(), reason: reason.to_owned() };
        let plan = self.plan;
        if let Some(d) = self.weight_decay {
            plan.optimizer.set_weight_decay(d);
        }
        match &mut plan.optimizer {
            Optimizer::Sgd { momentum: m, .. } => {
                for (key, given) in [("beta1", self.beta1), ("beta2", self.beta2), ("eps", self.eps)] {
                    if given.is_some() {
                        return Err(setting(key, "applies to Adam and AdamW only"));
                    }
                }
                if let Some(v) = self.momentum {
                    *m = v;
                }
            }
            Optimizer::Adam { beta1: b1, beta2: b2, eps: e, .. }
            | Optimizer::AdamW { beta1: b1, beta2: b2, eps: e, .. } => {
                if self.momentum.is_some() {
                    return Err(setting("momentum", "applies to SGD only"));
                }
                *b1 = self.beta1.unwrap_or(*b1);
                *b2 = self.beta2.unwrap_or(*b2);
                *e = self.eps.unwrap_or(*e);
            }
        }
        match (self.epochs, self.samples_per_epoch) {
            (None, None) => {}
            (Some(epochs), Some(samples_per_epoch)) => plan.schedule = Schedule::Epochs { epochs, samples_per_epoch },
            (Some(epochs), None) => match &mut plan.schedule {
                Schedule::Epochs { epochs: e, .. } => *e = epochs,
                Schedule::Steps(_) => return Err(setting("epochs", "needs samples_per_epoch too")),
            },
            (None, Some(samples_per_epoch)) => match &mut plan.schedule {
                Schedule::Epochs { samples_per_epoch: s, .. } => *s = samples_per_epoch,
                Schedule::Steps(_) => return Err(setting("samples_per_epoch", "needs epochs too")),
            },
        }
        if let Some(n) = self.nesterov {
            match &mut plan.optimizer {
                Optimizer::Sgd { nesterov, .. } => *nesterov = n,
                _ if !n => {}
                _ => return Err(setting("nesterov", "applies to SGD with momentum only")),
            }
        }
        Ok(())
    }
}

impl Plan {
    /// Applies `key=value` settings: a plan knob's key sets its field, any other key is a
    /// model setting. Errors name the key.
    pub fn apply_settings(&mut self, pairs: &[(String, String)]) -> Result<(), PlanError> {
        self.normalize()?;
        let mut staged = Staged {
            plan: self,
            weight_decay: None,
            nesterov: None,
            momentum: None,
            beta1: None,
            beta2: None,
            eps: None,
            epochs: None,
            samples_per_epoch: None,
        };
        for (key, value) in pairs {
            match knob(key) {
                Some(k) => (k.set)(&mut staged, value.trim())
                    .map_err(|reason| PlanError::Setting { key: key.clone(), reason })?,
                None => {
                    staged.plan.model.settings.insert(key.clone(), value.clone());
                }
            }
        }
        staged.finish()
    }

    /// The `key=value` pairs that turn [`Plan::zoo`] of this plan's model into this plan
    /// through [`Plan::apply_settings`]: only what differs from the base, in [`KNOBS`]'s
    /// order, the model's own keys right after the name. Share links and the planner's
    /// form are these pairs.
    pub fn to_settings(&self) -> Vec<(String, String)> {
        let mut plan = self.clone();
        // A plan that does not normalize has no pairs beyond its name; validation says why.
        let _ = plan.normalize();
        let base = Plan::zoo(plan.model_name());
        let mut out: Vec<(String, String)> = Vec::new();
        for k in KNOBS {
            if let Some(v) = (k.get)(&plan, &base) {
                out.push((k.key.to_owned(), v));
            }
            if k.key == "name" {
                out.extend(plan.model.settings.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        out
    }
}
