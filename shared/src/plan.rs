//! A training plan: everything needed to estimate a job's memory and to run it.
//!
//! A plan crosses the wire inside `protocol::Message::Submit`, so its types avoid serde
//! features that bincode cannot decode (internally tagged or untagged enums, flatten).
//! In JSON and YAML, enums are externally tagged: `"optimizer": {"adamw": {...}}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::graph::{Checkpoint, Graph, Shape};
use crate::zoo::{self, BuildOptions, LossKind, LossSpec, join};

/// A data path as a plan may give it: relative to the agent's data root, with no `..`,
/// no empty or `.` components, no backslashes or control characters. The agent confines
/// the resolved path (symlinks included) to the root as well.
pub(crate) fn check_data_path(key: &'static str, path: &str) -> Result<(), PlanError> {
    if path.is_empty() {
        return Ok(());
    }
    let bad = |reason: String| Err(PlanError::Invalid { field: key, reason });
    if path.len() > limits::MAX_DATA_PATH_LEN {
        return bad(format!("must be at most {} bytes, got {}", limits::MAX_DATA_PATH_LEN, path.len()));
    }
    if path.starts_with('/') {
        return bad(format!("'{path}' is absolute; give a path relative to the agent's data root"));
    }
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return bad(format!("'{}' holds a control character or a backslash", path.escape_debug()));
    }
    for part in path.split('/') {
        if part == ".." {
            return bad(format!("'{path}' climbs out of the data root ('..')"));
        }
        if part.is_empty() || part == "." {
            return bad(format!("'{path}' has an empty or '.' component"));
        }
    }
    Ok(())
}

/// Every key [`Plan::apply_settings`] takes as a plan knob (any other key is the
/// model's); `schema::plan_fields` describes each.
pub const PLAN_KEYS: &[&str] = &[
    "name",
    "batch",
    "accum",
    "precision",
    "checkpoint",
    "checkpoint_segments",
    "expandable_segments",
    "memory_fraction",
    "memory_limit",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "beta1",
    "beta2",
    "eps",
    "optimizer_impl",
    "loss",
    "label_smoothing",
    "lr_schedule",
    "warmup_steps",
    "clip_grad_norm",
    "loss_scale",
    "loss_scale_growth_interval",
    "empty_cache_every",
    "oom_fallback",
    "workers",
    "prefetch",
    "pin_memory",
    "distance_loss_every",
    "distance_loss_weight",
    "steps",
    "epochs",
    "samples_per_epoch",
    "val_batches",
    "val_every",
    "val_batch",
    "checkpoint_every",
    "data",
    "data_labels",
    "val_data",
    "host_memory_limit",
    "runtime",
    "device",
    "threads",
    "onednn",
    "seed",
    "retain_bytes_per_step",
];

/// Limits a plan must respect. Each one is named in the error that enforces it.
pub mod limits {
    pub const MAX_MICRO_BATCH: u64 = 65_536;
    pub const MAX_ACCUMULATION: u64 = 4_096;
    pub const MAX_STEPS: u64 = 10_000_000;
    /// The surface (boundary) term's weight in the loss.
    pub const MAX_SURFACE_WEIGHT: f64 = 1_000.0;
    pub const MAX_EPOCHS: u64 = 100_000;
    pub const MAX_SAMPLES_PER_EPOCH: u64 = 1_000_000_000;
    pub const MAX_INPUT_DIMS: usize = 3;
    pub const MAX_INPUT_DIM: u64 = 16_384;
    pub const MAX_CLASSES: u64 = 1_000_000;
    pub const MAX_WIDTH: u64 = 1 << 20;
    /// Parameters above this are refused: 2^34 fp32 weights alone would be 64 GiB.
    pub const MAX_PARAMS: u64 = 1 << 34;
    pub const MAX_LEARNING_RATE: f64 = 100.0;
    pub const MAX_NAME_LEN: usize = 128;
    /// A data path's length in bytes.
    pub const MAX_DATA_PATH_LEN: usize = 1_024;
    /// The smallest host memory limit: below it no libtorch worker starts.
    pub const MIN_HOST_MEMORY_LIMIT: u64 = 64 << 20;
    /// The largest single activation (micro-batch included) a plan may ask for: 1 TiB,
    /// beyond any device, and far from where byte counts could overflow.
    pub const MAX_TENSOR_BYTES: u64 = 1 << 40;
    pub const MAX_CHECKPOINT_SEGMENTS: u64 = 1_024;
    pub const MAX_LOADER_WORKERS: u64 = 256;
    pub const MAX_PREFETCH: u64 = 64;
    pub const MAX_CPU_THREADS: u64 = 1_024;
    /// The most a leak demonstration keeps per step: 1 GiB.
    pub const MAX_RETAIN_BYTES_PER_STEP: u64 = 1 << 30;
}

/// CPU threads an estimate assumes when a plan does not say (a few kernels keep a buffer
/// per thread).
pub const DEFAULT_CPU_THREADS: u64 = 4;

/// The architecture: a zoo model with its settings. `mlp` and `small_cnn` with
/// `input_shape` and `classes` are the format of earlier plan files; they load as the zoo
/// models of the same name (see [`Plan::normalize`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSpec {
    /// Earlier format of the zoo's `mlp`: `Linear -> ReLU` per hidden width.
    Mlp { hidden: Vec<u64> },
    /// Earlier format of the zoo's `small_cnn`: `Conv3x3 -> ReLU -> MaxPool2x2` per entry.
    SmallCnn { channels: Vec<u64> },
    /// A zoo model (`crate::zoo::MODELS`) with its `key=value` settings; its input shape
    /// and outputs come from the settings, not from `input_shape` and `classes`.
    Zoo { name: String, settings: BTreeMap<String, String> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// SGD; `momentum: 0` keeps no state.
    Sgd {
        momentum: f64,
        weight_decay: f64,
        #[serde(default)]
        nesterov: bool,
    },
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// Adam with L2 weight decay added to the gradient (a temporary per parameter).
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl Optimizer {
    /// The optimizer a CLI word names: `sgd`, `momentum`, `adam`, `adamw`.
    pub fn from_word(word: &str) -> Option<Optimizer> {
        Some(match word {
            "sgd" => Optimizer::Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false },
            "momentum" => Optimizer::Sgd { momentum: 0.9, weight_decay: 0.0, nesterov: false },
            "adam" => Optimizer::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 },
            "adamw" => Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
            _ => return None,
        })
    }

    /// The optimizer's weight decay.
    pub fn weight_decay(&self) -> f64 {
        match *self {
            Optimizer::Sgd { weight_decay, .. }
            | Optimizer::Adam { weight_decay, .. }
            | Optimizer::AdamW { weight_decay, .. } => weight_decay,
        }
    }

    fn set_weight_decay(&mut self, value: f64) {
        match self {
            Optimizer::Sgd { weight_decay, .. }
            | Optimizer::Adam { weight_decay, .. }
            | Optimizer::AdamW { weight_decay, .. } => *weight_decay = value,
        }
    }

    pub fn word(&self) -> &'static str {
        match *self {
            Optimizer::Sgd { momentum, .. } if momentum > 0.0 => "momentum",
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::Adam { .. } => "adam",
            Optimizer::AdamW { .. } => "adamw",
        }
    }
}

/// Training precision. `Fp16` and `Bf16` are automatic mixed precision: fp32 master
/// weights, matrix products and convolutions in half precision. fp16 trains with a
/// dynamic loss scale as `torch.amp.GradScaler` does (`loss_scale`,
/// `loss_scale_growth_interval`); its memory is a few scalars.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Fp16,
    Bf16,
}

impl Precision {
    pub fn from_word(word: &str) -> Option<Precision> {
        Some(match word {
            "fp32" => Precision::Fp32,
            "fp16" => Precision::Fp16,
            "bf16" => Precision::Bf16,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Which training program an estimate answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// The reference implementation in a user's own PyTorch script, with PyTorch's
    /// defaults (its optimizers, oneDNN on the CPU, non-reentrant checkpointing).
    Pytorch,
    /// Headroom's own trainer (the agent): the same graph and loop with libtorch's C++
    /// optimizers and its reentrant checkpointing.
    Headroom,
}

impl Runtime {
    pub fn from_word(word: &str) -> Option<Runtime> {
        match word {
            "pytorch" => Some(Runtime::Pytorch),
            "headroom" => Some(Runtime::Headroom),
            _ => None,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Runtime::Pytorch => "pytorch",
            Runtime::Headroom => "headroom",
        }
    }
}

/// How PyTorch's optimizers apply the update (`foreach=` / `fused=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerImpl {
    /// PyTorch's default: `foreach` when every parameter is on CUDA, else a loop.
    Auto,
    /// One parameter at a time (`foreach=False`).
    ForLoop,
    /// Whole parameter lists per kernel (`foreach=True`): temporaries for every parameter.
    Foreach,
    /// One fused kernel (`fused=True`): no temporaries.
    Fused,
}

impl OptimizerImpl {
    pub fn from_word(word: &str) -> Option<OptimizerImpl> {
        Some(match word {
            "auto" => OptimizerImpl::Auto,
            "for_loop" => OptimizerImpl::ForLoop,
            "foreach" => OptimizerImpl::Foreach,
            "fused" => OptimizerImpl::Fused,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            OptimizerImpl::Auto => "auto",
            OptimizerImpl::ForLoop => "for_loop",
            OptimizerImpl::Foreach => "foreach",
            OptimizerImpl::Fused => "fused",
        }
    }
}

/// How the learning rate changes over the run (Hugging Face's schedules): a linear
/// warm-up from 0 over `warmup_steps`, then constant, linear decay to 0 at the last
/// step, or cosine decay to 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

impl LrSchedule {
    pub fn from_word(word: &str) -> Option<LrSchedule> {
        Some(match word {
            "constant" => LrSchedule::Constant,
            "linear" => LrSchedule::Linear,
            "cosine" => LrSchedule::Cosine,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
        }
    }
}

/// The host side of a job: data loading and CPU-side work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// DataLoader worker processes (0: batches are made in the training process).
    #[serde(default)]
    pub workers: u64,
    /// Batches each worker keeps ready.
    #[serde(default = "two")]
    pub prefetch_factor: u64,
    /// Batches are copied into page-locked host buffers before the transfer.
    #[serde(default)]
    pub pin_memory: bool,
    /// A surface (boundary) loss on every `distance_loss_every`-th step (0: never): a
    /// signed Euclidean distance map of each label volume computed on the CPU, then
    /// `distance_loss_weight × mean(softmax(logits)[:, 1:] × map)` added to the loss
    /// (Kervadec et al.'s boundary loss, as its `SurfaceLoss` computes it).
    #[serde(default)]
    pub distance_loss_every: u64,
    /// The surface term's weight in the loss.
    #[serde(default = "surface_weight")]
    pub distance_loss_weight: f64,
}

fn surface_weight() -> f64 {
    0.01
}

impl Default for HostSpec {
    fn default() -> HostSpec {
        HostSpec {
            workers: 0,
            prefetch_factor: 2,
            pin_memory: false,
            distance_loss_every: 0,
            distance_loss_weight: surface_weight(),
        }
    }
}

fn two() -> u64 {
    2
}

/// Where the job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// The first CUDA device if there is one, else the CPU.
    Auto,
    Cpu,
    Cuda(u32),
}

/// How long the job runs, in optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Steps(u64),
    /// Epochs over a synthetic data set of `samples_per_epoch` samples; an epoch is
    /// `ceil(samples_per_epoch / (micro_batch * accumulation))` optimizer steps.
    Epochs {
        epochs: u64,
        samples_per_epoch: u64,
    },
}

/// A complete, self-describing training job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default = "default_name")]
    pub name: String,
    pub model: ModelSpec,
    /// Per-sample input shape of `mlp` and `small_cnn`, e.g. `[784]` or `[3, 32, 32]`.
    #[serde(default)]
    pub input_shape: Shape,
    /// Classes of `mlp` and `small_cnn`.
    #[serde(default)]
    pub classes: u64,
    /// Seeds the weights and the synthetic data, so a run can be repeated exactly.
    #[serde(default)]
    pub seed: u64,
    pub micro_batch: u64,
    /// Micro-batches per optimizer step; the loss is divided by this.
    #[serde(default = "one")]
    pub accumulation: u64,
    pub schedule: Schedule,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    #[serde(default = "fp32")]
    pub precision: Precision,
    #[serde(default = "auto")]
    pub device: DeviceChoice,
    /// Sets `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` for the job's process.
    #[serde(default)]
    pub expandable_segments: bool,
    /// Caps the job's tensor memory: allocations past it fail as out-of-memory. On CUDA
    /// it becomes the allocator's memory fraction; on the CPU the counting allocator
    /// enforces it. `None` means the device's whole memory.
    #[serde(default)]
    pub memory_limit_bytes: Option<u64>,
    /// Gradient checkpointing as `torch.utils.checkpoint.checkpoint_sequential` over the
    /// model's top-level stages in this many segments (0: off).
    #[serde(default)]
    pub checkpoint_segments: u64,
    /// Gradient checkpointing block by block, as the reference's own API does it.
    #[serde(default)]
    pub checkpoint_blocks: bool,
    /// What the model is trained against (segmentation and classification models).
    #[serde(default)]
    pub loss: LossSpec,
    /// Which training program the estimate answers for.
    #[serde(default = "pytorch")]
    pub runtime: Runtime,
    /// How the optimizer's update runs.
    #[serde(default = "auto_impl")]
    pub optimizer_impl: OptimizerImpl,
    /// oneDNN for CPU convolutions (PyTorch's default); off means libtorch's native kernels.
    #[serde(default = "yes")]
    pub onednn: bool,
    /// CPU threads (`torch.get_num_threads()`); unset, the estimate assumes
    /// `DEFAULT_CPU_THREADS` and the CLI uses this machine's cores.
    #[serde(default)]
    pub cpu_threads: Option<u64>,
    /// Caps the job at this fraction of the GPU's memory (`torch.cuda.set_per_process_memory_fraction`).
    #[serde(default)]
    pub memory_fraction: Option<f64>,
    #[serde(default)]
    pub host: HostSpec,
    /// A demonstration of a leak, for the leak detector: the trainer keeps a tensor of
    /// this many bytes from every step (0: none). Not part of any real job's memory, so
    /// the estimate leaves it out.
    #[serde(default)]
    pub retain_bytes_per_step: u64,
    #[serde(default = "constant")]
    pub lr_schedule: LrSchedule,
    /// Optimizer steps of linear warm-up from 0 to `learning_rate` (0: none).
    #[serde(default)]
    pub warmup_steps: u64,
    /// On an out-of-memory error, halve the micro-batch and double the accumulation (the
    /// effective batch unchanged) and redo the step, instead of failing the job.
    #[serde(default)]
    pub oom_fallback: bool,
    /// Clips gradients to this global L2 norm before each optimizer step
    /// (`torch.nn.utils.clip_grad_norm_`); `None`: no clipping.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// `torch.cuda.empty_cache()` after every this many micro-batches and at each epoch's
    /// end (0: never). A step's peak does not change; the time it costs is reported.
    #[serde(default)]
    pub empty_cache_every: u64,
    /// fp16's dynamic loss scale (`torch.amp.GradScaler`): its initial value, and the
    /// clean steps after which it doubles; a step whose gradients hold inf or NaN is
    /// skipped and halves it.
    #[serde(default = "loss_scale_init")]
    pub loss_scale: f64,
    #[serde(default = "loss_scale_growth_interval")]
    pub loss_scale_growth_interval: u64,
    /// A validation pass (`model.eval()`, `torch.no_grad()`) of this many batches (0: no
    /// validation), every `val_every` optimizer steps (0: at each epoch's end), with
    /// micro-batch `val_batch` (0: the training micro-batch). Its peak is estimated and
    /// reported apart from the step's.
    #[serde(default)]
    pub val_batches: u64,
    #[serde(default)]
    pub val_every: u64,
    #[serde(default)]
    pub val_batch: u64,
    /// Saves a checkpoint (weights, optimizer state, step, loss scale) every this many
    /// optimizer steps and at the end (0: never). Where it goes is the agent's choice
    /// (`headroom run --checkpoint-dir`), not the plan's.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Training data on disk, relative to the agent's data root (empty: synthetic data
    /// shaped like the model's inputs): a folder of `.npy` arrays, NIfTI volumes or
    /// PNG/JPEG images. Labels come from `data_labels` (a CSV or JSON manifest, relative
    /// to the data root), from mask files beside the inputs (`x_mask.npy` for `x.npy`), or
    /// from one sub-folder per class.
    #[serde(default)]
    pub data: String,
    #[serde(default)]
    pub data_labels: String,
    /// Validation data, as `data` (empty: the validation pass samples `data`).
    #[serde(default)]
    pub val_data: String,
    /// The host memory the job may use (its worker process's resident set); the guard
    /// also watches the machine's available memory and the cgroup's limit. `None`: those
    /// alone.
    #[serde(default)]
    pub host_memory_limit_bytes: Option<u64>,
}

fn default_name() -> String {
    "untitled".to_owned()
}
fn one() -> u64 {
    1
}
fn fp32() -> Precision {
    Precision::Fp32
}
fn auto() -> DeviceChoice {
    DeviceChoice::Auto
}
fn pytorch() -> Runtime {
    Runtime::Pytorch
}
fn loss_scale_init() -> f64 {
    65_536.0
}
fn loss_scale_growth_interval() -> u64 {
    2_000
}
fn constant() -> LrSchedule {
    LrSchedule::Constant
}
fn auto_impl() -> OptimizerImpl {
    OptimizerImpl::Auto
}
fn yes() -> bool {
    true
}

/// Why a plan was refused. Every variant names the field at fault.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PlanError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("could not parse the plan: {0}")]
    Parse(String),
    /// A zoo setting (`--set key=value`) is out of range or malformed.
    #[error("{key}: {reason}")]
    Setting { key: String, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid { field, reason: reason.into() }
}

fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), PlanError> {
    if value < min || value > max {
        return Err(invalid(field, format!("must be between {min} and {max}, got {value}")));
    }
    Ok(())
}

fn check_unit_interval(field: &'static str, value: f64, include_zero: bool) -> Result<(), PlanError> {
    let ok = value.is_finite() && value < 1.0 && (value > 0.0 || include_zero && value == 0.0);
    if !ok {
        let low = if include_zero { "[0" } else { "(0" };
        return Err(invalid(field, format!("must be in {low}, 1), got {value}")));
    }
    Ok(())
}

impl Plan {
    /// Reads a plan from JSON or YAML text (YAML is a superset of JSON, but JSON errors
    /// read better, so JSON is tried first when the text looks like it). Earlier plan
    /// files (`mlp`/`small_cnn` with `input_shape` and `classes`) load as zoo models.
    pub fn from_text(text: &str) -> Result<Plan, PlanError> {
        let plan = Plan::parse(text)?;
        plan.validate()?;
        Ok(plan)
    }

    /// Reads and normalizes a plan without validating it, for callers that apply
    /// settings first and then validate (and build the graph) once.
    pub fn parse(text: &str) -> Result<Plan, PlanError> {
        let mut plan: Plan = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| PlanError::Parse(e.to_string()))?
        } else {
            // Enums as single-key maps (`optimizer: {sgd: {...}}`), the same shape as JSON,
            // rather than YAML tags.
            serde_yaml_ng::with::singleton_map_recursive::deserialize(serde_yaml_ng::Deserializer::from_str(text))
                .map_err(|e| PlanError::Parse(e.to_string()))?
        };
        plan.normalize()?;
        Ok(plan)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Turns the earlier `mlp`/`small_cnn` format into the zoo model of the same name, so
    /// that every surface has one input path. Errors say how the old fields map.
    pub fn normalize(&mut self) -> Result<(), PlanError> {
        use limits::*;
        let (name, mut settings) = match &self.model {
            ModelSpec::Zoo { .. } => {
                if !self.input_shape.is_empty() || self.classes != 0 {
                    return Err(invalid(
                        "input_shape",
                        "zoo models take their input size and classes from model settings (image, volume, seq, num_classes), not input_shape/classes",
                    ));
                }
                return Ok(());
            }
            ModelSpec::Mlp { hidden } => ("mlp", vec![("hidden", join(hidden))]),
            ModelSpec::SmallCnn { channels } => ("small_cnn", vec![("channels", join(channels))]),
        };
        check_range("classes", self.classes, 2, MAX_CLASSES)?;
        if self.input_shape.is_empty() || self.input_shape.len() > MAX_INPUT_DIMS {
            return Err(invalid("input_shape", format!("must have 1 to {MAX_INPUT_DIMS} dimensions")));
        }
        if let Some(d) = self.input_shape.iter().find(|&&d| d == 0 || d > MAX_INPUT_DIM) {
            return Err(invalid("input_shape", format!("each dimension must be 1 to {MAX_INPUT_DIM}, got {d}")));
        }
        match name {
            "mlp" => {
                if self.input_shape.len() != 1 {
                    return Err(invalid(
                        "input_shape",
                        format!(
                            "mlp takes flat features [n] (in_features=n), got {:?}; flatten the input",
                            self.input_shape
                        ),
                    ));
                }
                settings.push(("in_features", self.input_shape[0].to_string()));
            }
            _ => {
                let [c, h, w] = self.input_shape[..] else {
                    return Err(invalid(
                        "input_shape",
                        format!(
                            "small_cnn needs [channels, height, width] (in_channels and image), got {:?}",
                            self.input_shape
                        ),
                    ));
                };
                settings.push(("in_channels", c.to_string()));
                settings.push(("image", format!("{h},{w}")));
            }
        }
        settings.push(("num_classes", self.classes.to_string()));
        self.model = ModelSpec::Zoo {
            name: name.to_owned(),
            settings: settings.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        };
        self.input_shape.clear();
        self.classes = 0;
        Ok(())
    }

    /// The zoo model and settings this plan names.
    pub fn model_name(&self) -> &str {
        match &self.model {
            ModelSpec::Zoo { name, .. } => name,
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::SmallCnn { .. } => "small_cnn",
        }
    }

    /// The gradient checkpointing mode.
    pub fn checkpoint(&self) -> Checkpoint {
        match (self.checkpoint_blocks, self.checkpoint_segments) {
            (true, _) => Checkpoint::Blocks,
            (false, 0) => Checkpoint::Off,
            (false, n) => Checkpoint::Segments(n),
        }
    }

    /// What the graph is built for besides the model's own settings.
    pub fn build_options(&self) -> BuildOptions {
        BuildOptions {
            loss: self.loss,
            checkpoint: self.checkpoint(),
            surface: (self.host.distance_loss_every > 0).then_some(self.host.distance_loss_weight),
        }
    }

    /// Checks every field against its limit and builds the graph, so that a plan that
    /// validates can always be estimated and run.
    pub fn validate(&self) -> Result<Graph, PlanError> {
        use limits::*;
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN {
            return Err(invalid("name", format!("must be 1 to {MAX_NAME_LEN} bytes long")));
        }
        check_range("micro_batch", self.micro_batch, 1, MAX_MICRO_BATCH)?;
        check_range("accumulation", self.accumulation, 1, MAX_ACCUMULATION)?;
        match self.schedule {
            Schedule::Steps(steps) => check_range("schedule.steps", steps, 1, MAX_STEPS)?,
            Schedule::Epochs { epochs, samples_per_epoch } => {
                check_range("schedule.epochs", epochs, 1, MAX_EPOCHS)?;
                check_range("schedule.samples_per_epoch", samples_per_epoch, 1, MAX_SAMPLES_PER_EPOCH)?;
                check_range("schedule", self.total_steps(), 1, MAX_STEPS)?;
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate <= MAX_LEARNING_RATE) {
            return Err(invalid(
                "learning_rate",
                format!("must be in (0, {MAX_LEARNING_RATE}], got {}", self.learning_rate),
            ));
        }
        match self.optimizer {
            Optimizer::Sgd { momentum, weight_decay, nesterov } => {
                check_unit_interval("optimizer.sgd.momentum", momentum, true)?;
                check_unit_interval("optimizer.sgd.weight_decay", weight_decay, true)?;
                if nesterov && momentum == 0.0 {
                    return Err(invalid("optimizer.sgd.nesterov", "needs momentum > 0 (as torch.optim.SGD requires)"));
                }
            }
            Optimizer::AdamW { beta1, beta2, eps, weight_decay }
            | Optimizer::Adam { beta1, beta2, eps, weight_decay } => {
                let name = if matches!(self.optimizer, Optimizer::Adam { .. }) { "adam" } else { "adam_w" };
                let field = |f: &str| -> &'static str {
                    match (name, f) {
                        ("adam", "beta1") => "optimizer.adam.beta1",
                        ("adam", "beta2") => "optimizer.adam.beta2",
                        ("adam", "eps") => "optimizer.adam.eps",
                        ("adam", _) => "optimizer.adam.weight_decay",
                        (_, "beta1") => "optimizer.adam_w.beta1",
                        (_, "beta2") => "optimizer.adam_w.beta2",
                        (_, "eps") => "optimizer.adam_w.eps",
                        _ => "optimizer.adam_w.weight_decay",
                    }
                };
                check_unit_interval(field("beta1"), beta1, true)?;
                check_unit_interval(field("beta2"), beta2, true)?;
                if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
                    return Err(invalid(field("eps"), format!("must be in (0, 1), got {eps}")));
                }
                check_unit_interval(field("weight_decay"), weight_decay, true)?;
            }
        }
        if self.runtime == Runtime::Headroom
            && !matches!(self.optimizer_impl, OptimizerImpl::Auto | OptimizerImpl::ForLoop)
        {
            return Err(invalid(
                "optimizer_impl",
                format!(
                    "the headroom runtime updates one parameter at a time (libtorch's C++ optimizers); {} is a PyTorch option",
                    self.optimizer_impl.word()
                ),
            ));
        }
        check_range("checkpoint_segments", self.checkpoint_segments, 0, MAX_CHECKPOINT_SEGMENTS)?;
        if self.checkpoint_segments == 1 {
            return Err(invalid(
                "checkpoint_segments",
                "must be 0 (off) or at least 2 (one segment checkpoints nothing)",
            ));
        }
        if self.checkpoint_blocks && self.checkpoint_segments > 0 {
            return Err(invalid("checkpoint_segments", "choose checkpoint=blocks or checkpoint_segments, not both"));
        }
        let ls = self.loss.label_smoothing;
        if !(ls.is_finite() && (0.0..1.0).contains(&ls)) {
            return Err(invalid("loss.label_smoothing", format!("must be in [0, 1), got {ls}")));
        }
        if ls > 0.0 && !matches!(self.loss.kind, LossKind::Ce | LossKind::DiceCe) {
            return Err(invalid("loss.label_smoothing", "applies to cross-entropy only (loss=ce or dice_ce)"));
        }
        if let Some(f) = self.memory_fraction
            && !(f.is_finite() && f > 0.0 && f <= 1.0)
        {
            return Err(invalid("memory_fraction", format!("must be in (0, 1], got {f}")));
        }
        if let Some(t) = self.cpu_threads {
            check_range("cpu_threads", t, 1, MAX_CPU_THREADS)?;
        }
        check_range("host.workers", self.host.workers, 0, MAX_LOADER_WORKERS)?;
        check_range("retain_bytes_per_step", self.retain_bytes_per_step, 0, MAX_RETAIN_BYTES_PER_STEP)?;
        check_range("empty_cache_every", self.empty_cache_every, 0, MAX_STEPS)?;
        check_range("val_batches", self.val_batches, 0, MAX_STEPS)?;
        check_range("val_every", self.val_every, 0, MAX_STEPS)?;
        check_range("val_batch", self.val_batch, 0, MAX_MICRO_BATCH)?;
        check_range("checkpoint_every", self.checkpoint_every, 0, MAX_STEPS)?;
        for (key, path) in [("data", &self.data), ("data_labels", &self.data_labels), ("val_data", &self.val_data)] {
            check_data_path(key, path)?;
        }
        if !self.data_labels.is_empty() && self.data.is_empty() {
            return Err(invalid("data_labels", "labels a data folder: set data too"));
        }
        if !self.val_data.is_empty() && self.data.is_empty() {
            return Err(invalid("val_data", "real validation data needs real training data: set data too"));
        }
        if let Some(b) = self.host_memory_limit_bytes
            && b < MIN_HOST_MEMORY_LIMIT
        {
            return Err(invalid(
                "host_memory_limit",
                format!(
                    "must be at least {} (a worker with libtorch needs more), got {b}",
                    crate::Bytes(MIN_HOST_MEMORY_LIMIT)
                ),
            ));
        }
        check_range("loss_scale_growth_interval", self.loss_scale_growth_interval, 1, MAX_STEPS)?;
        if !(self.loss_scale.is_finite() && self.loss_scale >= 1.0 && self.loss_scale <= 1e38) {
            return Err(invalid("loss_scale", format!("must be in [1, 1e38], got {}", self.loss_scale)));
        }
        if let Some(c) = self.clip_grad_norm
            && !(c.is_finite() && c > 0.0 && c <= 1e6)
        {
            return Err(invalid("clip_grad_norm", format!("must be in (0, 1000000], got {c}")));
        }
        if self.warmup_steps >= self.total_steps() && self.warmup_steps > 0 {
            return Err(invalid(
                "warmup_steps",
                format!("must be fewer than the run's {} steps, got {}", self.total_steps(), self.warmup_steps),
            ));
        }
        check_range("host.prefetch_factor", self.host.prefetch_factor, 1, MAX_PREFETCH)?;
        check_range("host.distance_loss_every", self.host.distance_loss_every, 0, MAX_STEPS)?;
        let w = self.host.distance_loss_weight;
        if !(w.is_finite() && (0.0..=MAX_SURFACE_WEIGHT).contains(&w)) {
            return Err(invalid("host.distance_loss_weight", format!("must be 0 to {MAX_SURFACE_WEIGHT}, got {w}")));
        }
        if let DeviceChoice::Cuda(i) = self.device
            && i > 63
        {
            return Err(invalid("device", format!("cuda index must be 0 to 63, got {i}")));
        }
        if let Some(limit) = self.memory_limit_bytes
            && limit == 0
        {
            return Err(invalid("memory_limit_bytes", "must be positive when set"));
        }
        let graph = self.graph()?;
        if graph.n_params() > MAX_PARAMS {
            return Err(invalid("model", format!("{} parameters exceed the limit of {MAX_PARAMS}", graph.n_params())));
        }
        match self.checkpoint() {
            Checkpoint::Segments(n) if n > graph.max_segments() => {
                let m = graph.max_segments();
                return Err(invalid(
                    "checkpoint_segments",
                    if m < 2 {
                        format!("{} has no sequential stages to checkpoint; use checkpoint=blocks", self.model_name())
                    } else {
                        format!("{} has {m} top-level stages, so at most {m} segments; got {n}", self.model_name())
                    },
                ));
            }
            Checkpoint::Blocks if graph.blocks.is_empty() => {
                return Err(invalid(
                    "checkpoint",
                    format!("{} has no per-block checkpointing; use checkpoint_segments=N", self.model_name()),
                ));
            }
            _ => {}
        }
        // The batch is to blame when a smaller one would do; otherwise the model's sizes.
        let field = if self.micro_batch > 1 { "micro_batch" } else { "model" };
        let widest = graph.largest_tensor_bytes();
        if widest > MAX_TENSOR_BYTES {
            return Err(invalid(
                field,
                format!("the largest tensor would take {widest} bytes, over the limit of {MAX_TENSOR_BYTES}"),
            ));
        }
        let working = graph.largest_working_bytes();
        if working > MAX_TENSOR_BYTES {
            return Err(invalid(
                field,
                format!(
                    "a kernel's working buffer (attention scores or convolution columns) would take {working} bytes, over the limit of {MAX_TENSOR_BYTES}"
                ),
            ));
        }
        Ok(graph)
    }

    /// The graph this plan describes, for one micro-batch; shape errors name the field.
    /// Only `validate` builds it, so that every graph has passed the plan's limits.
    fn graph(&self) -> Result<Graph, PlanError> {
        let mut plan = self.clone();
        plan.normalize()?;
        let ModelSpec::Zoo { name, settings } = &plan.model else {
            return Err(invalid("model", "internal: the plan did not normalize to a zoo model"));
        };
        zoo::build(name, settings, self.micro_batch, &self.build_options()).map_err(|e| match e {
            zoo::ZooError::Value { key, reason } => PlanError::Setting { key, reason },
            // The graph error already names the op and module; the field is the model.
            zoo::ZooError::Graph(g) => invalid("model", g.to_string()),
            other => invalid("model", other.to_string()),
        })
    }

    /// The learning rate of optimizer step `step` (from 1), as Hugging Face's
    /// `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
    /// `get_cosine_schedule_with_warmup` compute it for their step `step - 1`.
    pub fn learning_rate_at(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        let (warmup, total) = (self.warmup_steps as f64, self.total_steps() as f64);
        if s < warmup {
            return self.learning_rate * s / warmup.max(1.0);
        }
        let progress = ((s - warmup) / (total - warmup).max(1.0)).clamp(0.0, 1.0);
        self.learning_rate
            * match self.lr_schedule {
                LrSchedule::Constant => 1.0,
                LrSchedule::Linear => ((total - s) / (total - warmup).max(1.0)).max(0.0),
                LrSchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            }
    }

    /// The validation pass's micro-batch, when the plan validates.
    pub fn validation_batch(&self) -> Option<u64> {
        (self.val_batches > 0).then_some(if self.val_batch == 0 { self.micro_batch } else { self.val_batch })
    }

    /// Whether a validation pass follows optimizer step `step` (1-based).
    pub fn validates_after(&self, step: u64) -> bool {
        self.val_batches > 0 && {
            let every = if self.val_every == 0 { self.steps_per_epoch().max(1) } else { self.val_every };
            step.is_multiple_of(every) || step == self.total_steps()
        }
    }

    /// The plan the validation pass's graph is built from: the same model at the
    /// validation micro-batch, without checkpointing (nothing is saved for a backward).
    pub fn validation_plan(&self) -> Option<Plan> {
        let b = self.validation_batch()?;
        let mut p = self.clone();
        p.micro_batch = b;
        p.accumulation = 1;
        p.checkpoint_segments = 0;
        p.checkpoint_blocks = false;
        p.val_batches = 0;
        // The surface term belongs to training steps only.
        p.host.distance_loss_every = 0;
        Some(p)
    }

    /// Whether a checkpoint is saved after optimizer step `step` (1-based).
    pub fn checkpoints_after(&self, step: u64) -> bool {
        self.checkpoint_every > 0 && (step.is_multiple_of(self.checkpoint_every) || step == self.total_steps())
    }

    /// Optimizer steps per epoch (the whole run when the schedule is in steps).
    pub fn steps_per_epoch(&self) -> u64 {
        match self.schedule {
            Schedule::Steps(steps) => steps,
            Schedule::Epochs { samples_per_epoch, .. } => {
                samples_per_epoch.div_ceil(self.micro_batch.max(1) * self.accumulation.max(1))
            }
        }
    }

    pub fn total_steps(&self) -> u64 {
        match self.schedule {
            Schedule::Steps(steps) => steps,
            Schedule::Epochs { epochs, .. } => epochs.saturating_mul(self.steps_per_epoch()),
        }
    }

    /// A zoo model with its default settings: micro-batch 1, AdamW, fp32, 100 steps.
    pub fn zoo(name: &str) -> Plan {
        Plan {
            name: name.to_owned(),
            model: ModelSpec::Zoo { name: name.to_owned(), settings: BTreeMap::new() },
            input_shape: Vec::new(),
            classes: 0,
            micro_batch: 1,
            schedule: Schedule::Steps(100),
            learning_rate: 1e-4,
            ..Plan::example_mlp()
        }
    }

    /// Applies `key=value` settings: the common keys set plan fields, any other key is a
    /// model setting. Errors name the key.
    pub fn apply_settings(&mut self, pairs: &[(String, String)]) -> Result<(), PlanError> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, PlanError> {
            v.parse().map_err(|_| PlanError::Setting {
                key: key.to_owned(),
                reason: format!("expected a number, got '{v}'"),
            })
        }
        fn flag(key: &str, v: &str) -> Result<bool, PlanError> {
            match v {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(PlanError::Setting {
                    key: key.to_owned(),
                    reason: format!("expected true or false, got '{v}'"),
                }),
            }
        }
        /// A size in bytes (`512MiB`, `2e9`), or `none`.
        fn bytes_or_none(key: &str, v: &str) -> Result<Option<u64>, PlanError> {
            if v == "none" {
                return Ok(None);
            }
            crate::units::parse_bytes(v).map(Some).map_err(|reason| PlanError::Setting { key: key.to_owned(), reason })
        }
        fn word<T>(key: &str, v: &str, parse: fn(&str) -> Option<T>, choices: &str) -> Result<T, PlanError> {
            parse(v).ok_or_else(|| PlanError::Setting {
                key: key.to_owned(),
                reason: format!("expected {choices}, got '{v}'"),
            })
        }
        self.normalize()?;
        // The optimizer's own knobs apply after the optimizer is chosen, whatever the order.
        let mut decay = None;
        let mut nesterov = None;
        let (mut beta1, mut beta2, mut eps, mut momentum) = (None, None, None, None);
        let (mut epochs, mut samples) = (None, None);
        for (key, value) in pairs {
            let v = value.trim();
            match key.as_str() {
                "name" => self.name = v.to_owned(),
                "beta1" => beta1 = Some(num::<f64>(key, v)?),
                "beta2" => beta2 = Some(num::<f64>(key, v)?),
                "eps" => eps = Some(num::<f64>(key, v)?),
                "momentum" => momentum = Some(num::<f64>(key, v)?),
                "epochs" => epochs = Some(num::<u64>(key, v)?),
                "samples_per_epoch" => samples = Some(num::<u64>(key, v)?),
                "device" => {
                    self.device = match v {
                        "auto" => DeviceChoice::Auto,
                        "cpu" => DeviceChoice::Cpu,
                        _ => v.strip_prefix("cuda:").and_then(|i| i.parse().ok()).map(DeviceChoice::Cuda).ok_or_else(
                            || PlanError::Setting {
                                key: key.clone(),
                                reason: format!("expected auto, cpu or cuda:N, got '{v}'"),
                            },
                        )?,
                    }
                }
                "memory_limit" => self.memory_limit_bytes = bytes_or_none(key, v)?,
                "host_memory_limit" => self.host_memory_limit_bytes = bytes_or_none(key, v)?,
                "data" => self.data = v.to_owned(),
                "data_labels" => self.data_labels = v.to_owned(),
                "val_data" => self.val_data = v.to_owned(),
                "batch" => self.micro_batch = num(key, v)?,
                "accum" => self.accumulation = num(key, v)?,
                "checkpoint_segments" => self.checkpoint_segments = num(key, v)?,
                "checkpoint" => match v {
                    "blocks" => {
                        self.checkpoint_blocks = true;
                        self.checkpoint_segments = 0;
                    }
                    "off" => {
                        self.checkpoint_blocks = false;
                        self.checkpoint_segments = 0;
                    }
                    _ => {
                        return Err(PlanError::Setting {
                            key: key.clone(),
                            reason: format!("expected blocks or off (or checkpoint_segments=N), got '{v}'"),
                        });
                    }
                },
                "lr" => self.learning_rate = num(key, v)?,
                "steps" => self.schedule = Schedule::Steps(num(key, v)?),
                "seed" => self.seed = num(key, v)?,
                "expandable_segments" => self.expandable_segments = flag(key, v)?,
                "memory_fraction" => self.memory_fraction = Some(num(key, v)?),
                "workers" => self.host.workers = num(key, v)?,
                "prefetch" => self.host.prefetch_factor = num(key, v)?,
                "pin_memory" => self.host.pin_memory = flag(key, v)?,
                "distance_loss_every" => self.host.distance_loss_every = num(key, v)?,
                "distance_loss_weight" => self.host.distance_loss_weight = num(key, v)?,
                "retain_bytes_per_step" => self.retain_bytes_per_step = num(key, v)?,
                "lr_schedule" => self.lr_schedule = word(key, v, LrSchedule::from_word, "constant, linear or cosine")?,
                "warmup_steps" => self.warmup_steps = num(key, v)?,
                "oom_fallback" => self.oom_fallback = flag(key, v)?,
                "empty_cache_every" => self.empty_cache_every = num(key, v)?,
                "val_batches" => self.val_batches = num(key, v)?,
                "val_every" => self.val_every = num(key, v)?,
                "val_batch" => self.val_batch = num(key, v)?,
                "checkpoint_every" => self.checkpoint_every = num(key, v)?,
                "loss_scale" => self.loss_scale = num(key, v)?,
                "loss_scale_growth_interval" => self.loss_scale_growth_interval = num(key, v)?,
                "clip_grad_norm" => self.clip_grad_norm = if v == "none" { None } else { Some(num(key, v)?) },
                "onednn" => self.onednn = flag(key, v)?,
                "threads" => self.cpu_threads = Some(num(key, v)?),
                "runtime" => self.runtime = word(key, v, Runtime::from_word, "pytorch or headroom")?,
                "loss" => self.loss.kind = word(key, v, LossKind::from_word, "ce, bce, dice or dice_ce")?,
                "label_smoothing" => self.loss.label_smoothing = num(key, v)?,
                "optimizer_impl" => {
                    self.optimizer_impl = word(key, v, OptimizerImpl::from_word, "auto, for_loop, foreach or fused")?
                }
                "weight_decay" => decay = Some(num::<f64>(key, v)?),
                "nesterov" => nesterov = Some(flag(key, v)?),
                "precision" => self.precision = word(key, v, Precision::from_word, "fp32, fp16 or bf16")?,
                "optimizer" => self.optimizer = word(key, v, Optimizer::from_word, "sgd, momentum, adam or adamw")?,
                _ => {
                    if let ModelSpec::Zoo { settings, .. } = &mut self.model {
                        settings.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        if let Some(d) = decay {
            self.optimizer.set_weight_decay(d);
        }
        let only = |key: &str, what: &str| PlanError::Setting {
            key: key.to_owned(),
            reason: format!("applies to {what} only"),
        };
        match &mut self.optimizer {
            Optimizer::Sgd { momentum: m, .. } => {
                if beta1.is_some() || beta2.is_some() || eps.is_some() {
                    let key = if beta1.is_some() {
                        "beta1"
                    } else if beta2.is_some() {
                        "beta2"
                    } else {
                        "eps"
                    };
                    return Err(only(key, "Adam and AdamW"));
                }
                if let Some(v) = momentum {
                    *m = v;
                }
            }
            Optimizer::Adam { beta1: b1, beta2: b2, eps: e, .. }
            | Optimizer::AdamW { beta1: b1, beta2: b2, eps: e, .. } => {
                if momentum.is_some() {
                    return Err(only("momentum", "SGD"));
                }
                *b1 = beta1.unwrap_or(*b1);
                *b2 = beta2.unwrap_or(*b2);
                *e = eps.unwrap_or(*e);
            }
        }
        match (epochs, samples) {
            (None, None) => {}
            (Some(epochs), Some(samples_per_epoch)) => self.schedule = Schedule::Epochs { epochs, samples_per_epoch },
            (Some(epochs), None) => match &mut self.schedule {
                Schedule::Epochs { epochs: e, .. } => *e = epochs,
                Schedule::Steps(_) => {
                    return Err(PlanError::Setting {
                        key: "epochs".to_owned(),
                        reason: "needs samples_per_epoch too".to_owned(),
                    });
                }
            },
            (None, Some(samples_per_epoch)) => match &mut self.schedule {
                Schedule::Epochs { samples_per_epoch: s, .. } => *s = samples_per_epoch,
                Schedule::Steps(_) => {
                    return Err(PlanError::Setting {
                        key: "samples_per_epoch".to_owned(),
                        reason: "needs epochs too".to_owned(),
                    });
                }
            },
        }
        if let Some(n) = nesterov {
            match &mut self.optimizer {
                Optimizer::Sgd { nesterov, .. } => *nesterov = n,
                _ if !n => {}
                _ => {
                    return Err(PlanError::Setting {
                        key: "nesterov".to_owned(),
                        reason: "applies to SGD with momentum only".to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The `key=value` pairs that turn [`Plan::zoo`] of this plan's model into this plan
    /// through [`Plan::apply_settings`]: only what differs from the base, in a fixed
    /// order. Share links and the planner's form are these pairs.
    pub fn to_settings(&self) -> Vec<(String, String)> {
        let mut plan = self.clone();
        // A plan that does not normalize has no pairs beyond its name; validation says why.
        let _ = plan.normalize();
        let base = Plan::zoo(plan.model_name());
        let mut out: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| out.push((k.to_owned(), v));
        if plan.name != base.name {
            put("name", plan.name.clone());
        }
        if let ModelSpec::Zoo { settings, .. } = &plan.model {
            for (k, v) in settings {
                put(k, v.clone());
            }
        }
        if plan.micro_batch != base.micro_batch {
            put("batch", plan.micro_batch.to_string());
        }
        if plan.accumulation != base.accumulation {
            put("accum", plan.accumulation.to_string());
        }
        if plan.precision != base.precision {
            put("precision", plan.precision.word().to_owned());
        }
        if plan.checkpoint_blocks {
            put("checkpoint", "blocks".to_owned());
        }
        if plan.checkpoint_segments != 0 {
            put("checkpoint_segments", plan.checkpoint_segments.to_string());
        }
        if plan.expandable_segments {
            put("expandable_segments", "true".to_owned());
        }
        if let Some(f) = plan.memory_fraction {
            put("memory_fraction", f.to_string());
        }
        if let Some(b) = plan.memory_limit_bytes {
            put("memory_limit", b.to_string());
        }
        if let Some(b) = plan.host_memory_limit_bytes {
            put("host_memory_limit", b.to_string());
        }
        for (key, path) in [("data", &plan.data), ("data_labels", &plan.data_labels), ("val_data", &plan.val_data)] {
            if !path.is_empty() {
                put(key, path.clone());
            }
        }
        let word = plan.optimizer.word();
        let defaults = Optimizer::from_word(word).unwrap_or_else(|| base.optimizer.clone());
        if word != base.optimizer.word() {
            put("optimizer", word.to_owned());
        }
        if plan.optimizer.weight_decay() != defaults.weight_decay() {
            put("weight_decay", plan.optimizer.weight_decay().to_string());
        }
        match (&plan.optimizer, &defaults) {
            (Optimizer::Sgd { momentum, nesterov, .. }, Optimizer::Sgd { momentum: m0, .. }) => {
                if momentum != m0 {
                    put("momentum", momentum.to_string());
                }
                if *nesterov {
                    put("nesterov", "true".to_owned());
                }
            }
            (
                Optimizer::Adam { beta1, beta2, eps, .. } | Optimizer::AdamW { beta1, beta2, eps, .. },
                Optimizer::Adam { beta1: b1, beta2: b2, eps: e0, .. }
                | Optimizer::AdamW { beta1: b1, beta2: b2, eps: e0, .. },
            ) => {
                if beta1 != b1 {
                    put("beta1", beta1.to_string());
                }
                if beta2 != b2 {
                    put("beta2", beta2.to_string());
                }
                if eps != e0 {
                    put("eps", eps.to_string());
                }
            }
            _ => {}
        }
        if plan.learning_rate != base.learning_rate {
            put("lr", plan.learning_rate.to_string());
        }
        if plan.optimizer_impl != base.optimizer_impl {
            put("optimizer_impl", plan.optimizer_impl.word().to_owned());
        }
        if plan.loss.kind != base.loss.kind {
            put("loss", plan.loss.kind.word().to_owned());
        }
        if plan.loss.label_smoothing != base.loss.label_smoothing {
            put("label_smoothing", plan.loss.label_smoothing.to_string());
        }
        let (h, h0) = (&plan.host, &base.host);
        if h.workers != h0.workers {
            put("workers", h.workers.to_string());
        }
        if h.prefetch_factor != h0.prefetch_factor {
            put("prefetch", h.prefetch_factor.to_string());
        }
        if h.pin_memory != h0.pin_memory {
            put("pin_memory", h.pin_memory.to_string());
        }
        if h.distance_loss_every != h0.distance_loss_every {
            put("distance_loss_every", h.distance_loss_every.to_string());
        }
        if h.distance_loss_weight != h0.distance_loss_weight {
            put("distance_loss_weight", h.distance_loss_weight.to_string());
        }
        match plan.schedule {
            Schedule::Steps(n) if plan.schedule != base.schedule => put("steps", n.to_string()),
            Schedule::Steps(_) => {}
            Schedule::Epochs { epochs, samples_per_epoch } => {
                put("epochs", epochs.to_string());
                put("samples_per_epoch", samples_per_epoch.to_string());
            }
        }
        if plan.runtime != base.runtime {
            put("runtime", plan.runtime.word().to_owned());
        }
        match plan.device {
            DeviceChoice::Auto => {}
            DeviceChoice::Cpu => put("device", "cpu".to_owned()),
            DeviceChoice::Cuda(i) => put("device", format!("cuda:{i}")),
        }
        if let Some(t) = plan.cpu_threads {
            put("threads", t.to_string());
        }
        if plan.onednn != base.onednn {
            put("onednn", plan.onednn.to_string());
        }
        if plan.seed != base.seed {
            put("seed", plan.seed.to_string());
        }
        if plan.retain_bytes_per_step != 0 {
            put("retain_bytes_per_step", plan.retain_bytes_per_step.to_string());
        }
        if plan.lr_schedule != base.lr_schedule {
            put("lr_schedule", plan.lr_schedule.word().to_owned());
        }
        if plan.warmup_steps != 0 {
            put("warmup_steps", plan.warmup_steps.to_string());
        }
        if plan.oom_fallback {
            put("oom_fallback", "true".to_owned());
        }
        if let Some(c) = plan.clip_grad_norm {
            put("clip_grad_norm", c.to_string());
        }
        if plan.empty_cache_every != 0 {
            put("empty_cache_every", plan.empty_cache_every.to_string());
        }
        if plan.loss_scale != base.loss_scale {
            put("loss_scale", plan.loss_scale.to_string());
        }
        if plan.loss_scale_growth_interval != base.loss_scale_growth_interval {
            put("loss_scale_growth_interval", plan.loss_scale_growth_interval.to_string());
        }
        for (key, value) in [
            ("val_batches", plan.val_batches),
            ("val_every", plan.val_every),
            ("val_batch", plan.val_batch),
            ("checkpoint_every", plan.checkpoint_every),
        ] {
            if value != 0 {
                put(key, value.to_string());
            }
        }
        out
    }

    /// The plan that `model` with these pairs describes, validated, with its graph: the
    /// one path from typed keys (CLI `--set`, a form, a share link) to a plan.
    pub fn from_settings(model: &str, pairs: &[(String, String)]) -> Result<(Plan, Graph), PlanError> {
        if !zoo::MODELS.contains(&model) && model != zoo::SCRIPT {
            return Err(invalid(
                "model",
                format!("unknown model '{model}'; known models: {}, {}", zoo::MODELS.join(", "), zoo::SCRIPT),
            ));
        }
        let mut plan = Plan::zoo(model);
        plan.apply_settings(pairs)?;
        let graph = plan.validate()?;
        Ok((plan, graph))
    }

    /// Turns a memory fraction into a byte limit for a device of `total_bytes`.
    pub fn resolve_memory_fraction(&mut self, total_bytes: u64) {
        if let Some(f) = self.memory_fraction {
            let cap = (total_bytes as f64 * f) as u64;
            self.memory_limit_bytes = Some(self.memory_limit_bytes.map_or(cap, |l| l.min(cap)));
        }
    }

    /// A small, learnable job: the planner's default and the tests' workhorse.
    pub fn example_mlp() -> Plan {
        let settings = [("in_features", "64"), ("hidden", "256,256"), ("num_classes", "10")];
        Plan {
            name: "mlp-example".to_owned(),
            model: ModelSpec::Zoo {
                name: "mlp".to_owned(),
                settings: settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            },
            input_shape: Vec::new(),
            classes: 0,
            seed: 7,
            micro_batch: 32,
            accumulation: 1,
            schedule: Schedule::Steps(60),
            optimizer: Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
            learning_rate: 1e-3,
            precision: Precision::Fp32,
            device: DeviceChoice::Auto,
            expandable_segments: false,
            memory_limit_bytes: None,
            checkpoint_segments: 0,
            checkpoint_blocks: false,
            loss: LossSpec::default(),
            runtime: Runtime::Pytorch,
            optimizer_impl: OptimizerImpl::Auto,
            onednn: true,
            cpu_threads: None,
            memory_fraction: None,
            host: HostSpec::default(),
            retain_bytes_per_step: 0,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            oom_fallback: false,
            clip_grad_norm: None,
            empty_cache_every: 0,
            loss_scale: loss_scale_init(),
            loss_scale_growth_interval: loss_scale_growth_interval(),
            val_batches: 0,
            val_every: 0,
            val_batch: 0,
            checkpoint_every: 0,
            data: String::new(),
            data_labels: String::new(),
            val_data: String::new(),
            host_memory_limit_bytes: None,
        }
    }

    pub fn example_cnn() -> Plan {
        let settings = [("in_channels", "3"), ("image", "32"), ("channels", "16,32"), ("num_classes", "10")];
        Plan {
            name: "cnn-example".to_owned(),
            model: ModelSpec::Zoo {
                name: "small_cnn".to_owned(),
                settings: settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            },
            micro_batch: 16,
            accumulation: 2,
            schedule: Schedule::Steps(30),
            optimizer: Optimizer::Sgd { momentum: 0.9, weight_decay: 0.0, nesterov: false },
            learning_rate: 0.02,
            ..Plan::example_mlp()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change to a plan that one limit should refuse.
    type Mutation = Box<dyn Fn(&mut Plan)>;

    fn field_of(err: PlanError) -> String {
        match err {
            PlanError::Invalid { field, .. } => field.to_owned(),
            PlanError::Parse(msg) => panic!("expected a field error, got a parse error: {msg}"),
            PlanError::Setting { key, .. } => key,
        }
    }

    /// The earlier plan format: `mlp`/`small_cnn` with `input_shape` and `classes`.
    fn legacy_mlp() -> Plan {
        Plan {
            model: ModelSpec::Mlp { hidden: vec![256, 256] },
            input_shape: vec![64],
            classes: 10,
            ..Plan::example_mlp()
        }
    }

    #[test]
    fn every_plan_key_is_taken_by_the_plan_not_passed_to_the_model() {
        for key in PLAN_KEYS {
            let mut plan = Plan::zoo("mlp");
            match plan.apply_settings(&[((*key).to_owned(), "%%".to_owned())]) {
                Err(e) => assert!(e.to_string().contains(key), "{key}: {e}"),
                Ok(()) => {
                    let ModelSpec::Zoo { settings, .. } = &plan.model else { panic!("zoo") };
                    assert!(!settings.contains_key(*key), "{key} went to the model");
                }
            }
        }
    }

    #[test]
    fn examples_validate() {
        assert_eq!(Plan::example_mlp().validate().expect("mlp").n_params(), 64 * 256 + 256 + 256 * 256 + 256 + 2570);
        Plan::example_cnn().validate().expect("cnn");
    }

    #[test]
    fn each_limit_names_its_field() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("micro_batch", Box::new(|p| p.micro_batch = 0)),
            ("micro_batch", Box::new(|p| p.micro_batch = limits::MAX_MICRO_BATCH + 1)),
            ("accumulation", Box::new(|p| p.accumulation = 0)),
            ("accumulation", Box::new(|p| p.accumulation = limits::MAX_ACCUMULATION + 1)),
            ("schedule.steps", Box::new(|p| p.schedule = Schedule::Steps(0))),
            ("schedule.steps", Box::new(|p| p.schedule = Schedule::Steps(limits::MAX_STEPS + 1))),
            ("schedule.epochs", Box::new(|p| p.schedule = Schedule::Epochs { epochs: 0, samples_per_epoch: 10 })),
            ("learning_rate", Box::new(|p| p.learning_rate = f64::NAN)),
            ("learning_rate", Box::new(|p| p.learning_rate = -1.0)),
            (
                "optimizer.adam_w.beta2",
                Box::new(|p| p.optimizer = Optimizer::AdamW { beta1: 0.9, beta2: 1.0, eps: 1e-8, weight_decay: 0.0 }),
            ),
            (
                "optimizer.sgd.momentum",
                Box::new(|p| p.optimizer = Optimizer::Sgd { momentum: -0.1, weight_decay: 0.0, nesterov: false }),
            ),
            ("device", Box::new(|p| p.device = DeviceChoice::Cuda(64))),
            ("memory_limit_bytes", Box::new(|p| p.memory_limit_bytes = Some(0))),
            ("checkpoint_segments", Box::new(|p| p.checkpoint_segments = limits::MAX_CHECKPOINT_SEGMENTS + 1)),
            ("memory_fraction", Box::new(|p| p.memory_fraction = Some(0.0))),
            ("memory_fraction", Box::new(|p| p.memory_fraction = Some(1.5))),
            ("host.workers", Box::new(|p| p.host.workers = limits::MAX_LOADER_WORKERS + 1)),
            ("host.prefetch_factor", Box::new(|p| p.host.prefetch_factor = 0)),
            ("host.prefetch_factor", Box::new(|p| p.host.prefetch_factor = limits::MAX_PREFETCH + 1)),
            ("name", Box::new(|p| p.name = String::new())),
            ("retain_bytes_per_step", Box::new(|p| p.retain_bytes_per_step = limits::MAX_RETAIN_BYTES_PER_STEP + 1)),
            ("clip_grad_norm", Box::new(|p| p.clip_grad_norm = Some(0.0))),
            ("loss_scale", Box::new(|p| p.loss_scale = 0.5)),
            ("loss_scale_growth_interval", Box::new(|p| p.loss_scale_growth_interval = 0)),
            ("clip_grad_norm", Box::new(|p| p.clip_grad_norm = Some(f64::NAN))),
            // Shapes whose byte counts would overflow 64 bits are refused, not wrapped.
            (
                "model",
                Box::new(|p| {
                    // One sample's first conv output alone: 2^20 x 2^28 values.
                    p.model = ModelSpec::SmallCnn { channels: vec![1 << 16, 1] };
                    p.input_shape = vec![1, 1 << 14, 1 << 14];
                    p.classes = 2;
                    p.micro_batch = 1;
                }),
            ),
            (
                "micro_batch",
                Box::new(|p| {
                    // 2^34 values a sample are allowed; 2^14 samples of them are not.
                    p.model = ModelSpec::SmallCnn { channels: vec![1 << 10] };
                    p.input_shape = vec![1, 1 << 12, 1 << 12];
                    p.classes = 2;
                    p.micro_batch = 1 << 14;
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut plan = Plan::example_mlp();
            mutate(&mut plan);
            let err = plan.validate().expect_err(field);
            assert_eq!(field_of(err.clone()), field, "{err}");
        }
        // The earlier format's fields, checked as it is turned into the zoo model.
        let legacy: Vec<(&str, Mutation)> = vec![
            ("classes", Box::new(|p| p.classes = 1)),
            ("input_shape", Box::new(|p| p.input_shape = vec![])),
            ("input_shape", Box::new(|p| p.input_shape = vec![1, 2, 3, 4])),
            ("input_shape", Box::new(|p| p.input_shape = vec![limits::MAX_INPUT_DIM + 1])),
            ("input_shape", Box::new(|p| p.input_shape = vec![3, 8, 8])),
            ("hidden", Box::new(|p| p.model = ModelSpec::Mlp { hidden: vec![0] })),
            (
                "hidden",
                Box::new(|p| p.model = ModelSpec::Mlp { hidden: vec![8; crate::zoo::limits::MAX_DEPTH as usize + 1] }),
            ),
            (
                "model",
                Box::new(|p| {
                    // 2^16 x 2^16 x 2^16 weights: past the parameter limit.
                    p.input_shape = vec![1 << 14];
                    p.model = ModelSpec::Mlp { hidden: vec![1 << 16; 5] };
                }),
            ),
        ];
        for (field, mutate) in legacy {
            let mut plan = legacy_mlp();
            mutate(&mut plan);
            let err = plan.validate().expect_err(field);
            assert_eq!(field_of(err.clone()), field, "{err}");
        }
    }

    #[test]
    fn learning_rate_schedules_follow_hugging_faces_formulas() {
        let plan = |schedule, warmup| Plan {
            learning_rate: 1.0,
            schedule: Schedule::Steps(10),
            lr_schedule: schedule,
            warmup_steps: warmup,
            ..Plan::example_mlp()
        };
        let lrs = |p: &Plan| (1..=10).map(|s| p.learning_rate_at(s)).collect::<Vec<f64>>();
        assert_eq!(lrs(&plan(LrSchedule::Constant, 0)), vec![1.0; 10]);
        let warm = lrs(&plan(LrSchedule::Constant, 4));
        assert_eq!(&warm[..5], &[0.0, 0.25, 0.5, 0.75, 1.0]);
        // linear: (10 - s) / (10 - 2) after 2 warm-up steps (s from 0).
        let linear = lrs(&plan(LrSchedule::Linear, 2));
        assert_eq!(&linear[..3], &[0.0, 0.5, 1.0]);
        assert!((linear[9] - 1.0 / 8.0).abs() < 1e-12, "{linear:?}");
        // cosine: 0.5 (1 + cos(pi (s - 2) / 8)).
        let cosine = lrs(&plan(LrSchedule::Cosine, 2));
        assert!((cosine[6] - 0.5).abs() < 1e-12, "halfway: {cosine:?}");
        assert!(cosine.windows(2).skip(2).all(|w| w[1] <= w[0]), "decreasing after warm-up");
        let mut p = plan(LrSchedule::Cosine, 10);
        assert_eq!(field_of(p.validate().expect_err("warm-up too long")), "warmup_steps");
        p.warmup_steps = 9;
        p.validate().expect("nine of ten");
    }

    #[test]
    fn with_a_byte_limit_and_a_memory_fraction_the_tighter_cap_applies() {
        let gib = 1u64 << 30;
        let mut plan = Plan { memory_limit_bytes: Some(10 * gib), memory_fraction: Some(0.5), ..Plan::example_mlp() };
        plan.resolve_memory_fraction(16 * gib);
        assert_eq!(plan.memory_limit_bytes, Some(8 * gib), "half of 16 GiB is tighter than 10 GiB");
        let mut plan = Plan { memory_limit_bytes: Some(10 * gib), memory_fraction: Some(0.9), ..Plan::example_mlp() };
        plan.resolve_memory_fraction(16 * gib);
        assert_eq!(plan.memory_limit_bytes, Some(10 * gib), "10 GiB is tighter than 90 % of 16 GiB");
        let mut plan = Plan { memory_fraction: Some(0.25), ..Plan::example_mlp() };
        plan.resolve_memory_fraction(16 * gib);
        assert_eq!(plan.memory_limit_bytes, Some(4 * gib));
    }

    #[test]
    fn cnn_needs_an_image_and_enough_pixels() {
        let mut plan =
            Plan { model: ModelSpec::SmallCnn { channels: vec![16, 32] }, classes: 10, ..Plan::example_cnn() };
        plan.input_shape = vec![64];
        let err = plan.validate().expect_err("flat input");
        assert_eq!(field_of(err.clone()), "input_shape");
        assert!(err.to_string().contains("[channels, height, width]"), "{err}");
        plan.input_shape = vec![3, 4, 4];
        plan.model = ModelSpec::SmallCnn { channels: vec![8, 8, 8] };
        let err = plan.validate().expect_err("too small");
        assert!(err.to_string().contains("pooling stages shrink"), "{err}");
        // Zoo plans take their sizes from settings, and say so.
        let mut zoo = Plan::example_cnn();
        zoo.input_shape = vec![3, 32, 32];
        assert!(zoo.validate().expect_err("zoo with input_shape").to_string().contains("image"));
    }

    #[test]
    fn zoo_settings_are_checked_and_name_their_key() {
        let mut plan = Plan::zoo("gpt2");
        let set = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        assert!(matches!(plan.apply_settings(&set("optimizer", "lion")), Err(PlanError::Setting { .. })));
        assert!(matches!(plan.apply_settings(&set("batch", "many")), Err(PlanError::Setting { .. })));
        plan.apply_settings(&set("n_layer", "0")).expect("stored; checked when built");
        let Err(err) = plan.validate() else { panic!("zero layers must be refused") };
        assert_eq!(err.to_string(), "n_layer: must be between 1 and 256, got 0");
        // Attention scores of 32 heads x 2^17 tokens squared would be 2 TiB on the CPU.
        let mut plan = Plan::zoo("gpt2");
        plan.apply_settings(&[
            ("n_positions".to_owned(), "131072".to_owned()),
            ("seq".to_owned(), "131072".to_owned()),
            ("n_embd".to_owned(), "1024".to_owned()),
            ("n_head".to_owned(), "32".to_owned()),
        ])
        .expect("settings");
        let Err(err) = plan.validate() else { panic!("a 2 TiB working buffer must be refused") };
        assert!(err.to_string().starts_with("model: a kernel's working buffer"), "{err}");
        let mut mlp = Plan::example_mlp();
        let err = mlp.apply_settings(&set("n_layer", "2")).and_then(|()| mlp.validate().map(drop));
        assert!(err.is_err_and(|e| e.to_string().contains("n_layer")), "a key mlp does not take is named");
    }

    #[test]
    fn reads_json_and_yaml_with_defaults() {
        let json = r#"{"model": {"mlp": {"hidden": [32]}}, "input_shape": [8], "classes": 4,
            "micro_batch": 16, "schedule": {"steps": 5},
            "optimizer": {"sgd": {"momentum": 0.9, "weight_decay": 0.0}}, "learning_rate": 0.1}"#;
        let plan = Plan::from_text(json).expect("json plan");
        assert_eq!(plan.accumulation, 1);
        assert_eq!(plan.device, DeviceChoice::Auto);
        let yaml = "model: {small_cnn: {channels: [4]}}\ninput_shape: [1, 8, 8]\nclasses: 3\nmicro_batch: 2\n\
                    schedule: {epochs: {epochs: 2, samples_per_epoch: 10}}\n\
                    optimizer: {adam_w: {beta1: 0.9, beta2: 0.999, eps: 1.0e-8, weight_decay: 0.0}}\n\
                    learning_rate: 0.001\ndevice: cpu\n";
        let plan = Plan::from_text(yaml).expect("yaml plan");
        assert_eq!(plan.total_steps(), 2 * 5);
        assert_eq!(Plan::from_text(&plan.to_json()).expect("round trip"), plan);
    }

    #[test]
    fn parse_errors_are_reported_not_panicked() {
        let err = Plan::from_text("{\"model\": 3}").expect_err("bad json");
        assert!(matches!(err, PlanError::Parse(_)), "{err}");
        let err = Plan::from_text("{\"unknown_knob\": 1}").expect_err("unknown field");
        assert!(err.to_string().contains("unknown_knob"), "{err}");
        // A valid document whose values break a limit names the field.
        let mut plan = Plan::example_mlp();
        plan.micro_batch = 0;
        let err = Plan::from_text(&serde_json::to_string(&plan).expect("json")).expect_err("limit");
        assert_eq!(err.to_string(), "micro_batch: must be between 1 and 65536, got 0");
    }
}
