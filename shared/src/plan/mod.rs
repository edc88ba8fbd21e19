//! A training plan: everything needed to estimate a job's memory and to run it.
//!
//! A plan crosses the wire inside `protocol::ToAgent::Submit`, so its types avoid serde
//! features that bincode cannot decode (internally tagged or untagged enums, flatten).
//! In JSON and YAML, enums are externally tagged: `"optimizer": {"adamw": {...}}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::graph::{Checkpoint, Graph, Shape};
use crate::zoo::{self, BuildOptions, LossSpec};

mod knobs;
mod legacy;
pub mod limits;
mod validate;

use validate::invalid;

pub use knobs::{Group, KNOBS, Knob, knob, plan_keys};
pub use legacy::Earlier;

/// A plan that passed validation with the graph it describes, built once and shared by
/// whoever needs them together (the CLI's commands, the planner's memos, a link). Cheap
/// to clone; equal when the plans are.
#[derive(Clone, Debug)]
pub struct Validated(std::sync::Arc<(Plan, Graph)>);

impl PartialEq for Validated {
    fn eq(&self, other: &Validated) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.0 == other.0.0
    }
}

impl Validated {
    pub fn plan(&self) -> &Plan {
        &self.0.0
    }

    pub fn graph(&self) -> &Graph {
        &self.0.1
    }

    /// The plan and graph, taken (or copied when shared).
    pub fn into_parts(self) -> (Plan, Graph) {
        std::sync::Arc::try_unwrap(self.0).unwrap_or_else(|shared| (*shared).clone())
    }
}

/// CPU threads an estimate assumes when a plan does not say (a few kernels keep a buffer
/// per thread).
pub const DEFAULT_CPU_THREADS: u64 = 4;

/// The architecture: a zoo model (`crate::zoo::MODELS`) and its `key=value` settings;
/// its input shape and outputs come from the settings. Plan files write it
/// `{"zoo": {"name": ..., "settings": {...}}}`; the earlier format's `mlp` and
/// `small_cnn` (with the plan's `input_shape` and `classes`) read as the zoo model of the
/// same name (see [`Plan::normalize`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "legacy::ModelFile", into = "legacy::ModelFile")]
pub struct ModelSpec {
    pub name: String,
    pub settings: BTreeMap<String, String>,
    /// The model as an earlier plan file gave it, until [`Plan::normalize`] turns it
    /// into `settings`; `None` for every plan of today's format.
    pub earlier: Option<Earlier>,
    /// An exported model (`name` is [`zoo::IMPORTED`]).
    pub file: Option<FileModel>,
}

/// A model the user exported with `torch.export`: where the plan says it is and, once
/// read (the CLI reads it; the planner parses it in the page), its graph.
#[derive(Clone, Debug, PartialEq)]
pub struct FileModel {
    pub path: String,
    pub graph: Option<std::sync::Arc<crate::import::Imported>>,
}

impl ModelSpec {
    pub fn new(name: impl Into<String>, settings: BTreeMap<String, String>) -> ModelSpec {
        ModelSpec { name: name.into(), settings, earlier: None, file: None }
    }

    /// An exported model read from `path`.
    pub fn imported(path: impl Into<String>, graph: crate::import::Imported) -> ModelSpec {
        ModelSpec {
            file: Some(FileModel { path: path.into(), graph: Some(std::sync::Arc::new(graph)) }),
            ..ModelSpec::new(zoo::IMPORTED, BTreeMap::new())
        }
    }
}

/// Where an exported model's weights come from when the trainer starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsInit {
    /// The file's own weights (`data/weights/…` in the `.pt2`).
    File,
    /// Fresh weights, PyTorch's default rules per layer kind.
    Random,
}

impl WeightsInit {
    pub fn from_word(word: &str) -> Option<WeightsInit> {
        match word {
            "file" => Some(WeightsInit::File),
            "random" => Some(WeightsInit::Random),
            _ => None,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            WeightsInit::File => "file",
            WeightsInit::Random => "random",
        }
    }
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

/// What the training loop holds of the model's outputs while the loss goes backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outputs {
    /// As the model is usually trained: `dropped` for a model that computes its own loss
    /// (Hugging Face's, trained by its `Trainer`), `kept` for the others.
    Auto,
    /// `out = model(x)` (or `outputs = model(**batch)`): the outputs stay bound through
    /// the backward pass and the optimizer step, until the next forward returns.
    Kept,
    /// `loss = model(**batch).loss` (Hugging Face `Trainer`'s `compute_loss`), or
    /// `loss = loss_fn(model(x), y)`: only the loss is kept, and the outputs go (unless
    /// autograd saved them) before the backward pass.
    Dropped,
}

impl Outputs {
    pub fn from_word(word: &str) -> Option<Outputs> {
        match word {
            "auto" => Some(Outputs::Auto),
            "kept" => Some(Outputs::Kept),
            "dropped" => Some(Outputs::Dropped),
            _ => None,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Outputs::Auto => "auto",
            Outputs::Kept => "kept",
            Outputs::Dropped => "dropped",
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
    /// What the loop holds of the model's outputs through the backward pass.
    #[serde(default = "auto_outputs")]
    pub outputs: Outputs,
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
    /// The CPU's instruction set as oneDNN dispatches on it; unset (`auto`), the
    /// machine's own where one is known (the CLI, the agent), else every ISA within the
    /// estimate's interval (the point at [`crate::isa::CpuIsa::DEFAULT`]).
    #[serde(default)]
    pub cpu_isa: Option<crate::isa::CpuIsa>,
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
    /// An exported model's starting weights (a zoo model's are always fresh).
    #[serde(default = "file_init")]
    pub init: WeightsInit,
    /// The host memory the job may use (its worker process's resident set); the guard
    /// also watches the machine's available memory and the cgroup's limit. `None`: those
    /// alone.
    #[serde(default)]
    pub host_memory_limit_bytes: Option<u64>,
}

fn file_init() -> WeightsInit {
    WeightsInit::File
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
fn auto_outputs() -> Outputs {
    Outputs::Auto
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

    /// Whether the loop keeps the model's outputs through the backward pass, for a model
    /// whose graph is `graph` (`auto` asks whether it computes its own loss). Headroom's
    /// trainer runs its loop the same way.
    pub fn keeps_outputs(&self, graph: &Graph) -> bool {
        match self.outputs {
            Outputs::Kept => true,
            Outputs::Dropped => false,
            Outputs::Auto => graph.returns_after < graph.nodes.len(),
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
            model: ModelSpec::new(name, BTreeMap::new()),
            input_shape: Vec::new(),
            classes: 0,
            micro_batch: 1,
            schedule: Schedule::Steps(100),
            learning_rate: 1e-4,
            ..Plan::example_mlp()
        }
    }

    /// The plan that `model` with these pairs describes, validated, with its graph: the
    /// one path from typed keys (CLI `--set`, a form, a share link) to a plan.
    pub fn from_settings(model: &str, pairs: &[(String, String)]) -> Result<Validated, PlanError> {
        if !zoo::MODELS.contains(&model) && model != zoo::SCRIPT {
            return Err(invalid(
                "model",
                format!("unknown model '{model}'; known models: {}, {}", zoo::MODELS.join(", "), zoo::SCRIPT),
            ));
        }
        let mut plan = Plan::zoo(model);
        plan.apply_settings(pairs)?;
        plan.validated()
    }

    /// An exported model's plan (the CLI's `--model-file`), with these pairs, validated.
    pub fn from_file(
        path: &str,
        graph: crate::import::Imported,
        pairs: &[(String, String)],
    ) -> Result<Validated, PlanError> {
        let mut plan = Plan::zoo(zoo::IMPORTED);
        plan.name = crate::units::clip(&graph.name, limits::MAX_NAME_LEN).into_owned();
        plan.model = ModelSpec::imported(path, graph);
        plan.apply_settings(pairs)?;
        plan.validated()
    }

    /// This plan validated, with its graph.
    pub fn validated(self) -> Result<Validated, PlanError> {
        let graph = self.validate()?;
        Ok(Validated(std::sync::Arc::new((self, graph))))
    }

    /// The tighter of the plan's memory caps on a device of `device_bytes`: its byte
    /// limit and its fraction of the device (`None` without either). The estimator, the
    /// agent and the trainer each resolve the fraction here, against the device they
    /// know.
    pub fn memory_cap(&self, device_bytes: u64) -> Option<u64> {
        let share = self.memory_fraction.map(|f| (device_bytes as f64 * f) as u64);
        match (self.memory_limit_bytes, share) {
            (Some(limit), Some(share)) => Some(limit.min(share)),
            (limit, share) => limit.or(share),
        }
    }

    /// A small, learnable job: the planner's default and the tests' workhorse.
    pub fn example_mlp() -> Plan {
        let settings = [("in_features", "64"), ("hidden", "256,256"), ("num_classes", "10")];
        Plan {
            name: "mlp-example".to_owned(),
            model: ModelSpec::new("mlp", settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
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
            outputs: Outputs::Auto,
            optimizer_impl: OptimizerImpl::Auto,
            onednn: true,
            cpu_threads: None,
            cpu_isa: None,
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
            init: WeightsInit::File,
            host_memory_limit_bytes: None,
        }
    }

    pub fn example_cnn() -> Plan {
        let settings = [("in_channels", "3"), ("image", "32"), ("channels", "16,32"), ("num_classes", "10")];
        Plan {
            name: "cnn-example".to_owned(),
            model: ModelSpec::new(
                "small_cnn",
                settings.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ),
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
            model: Earlier::Mlp { hidden: vec![256, 256] }.into(),
            input_shape: vec![64],
            classes: 10,
            ..Plan::example_mlp()
        }
    }

    #[test]
    fn every_plan_key_is_taken_by_the_plan_not_passed_to_the_model() {
        for key in plan_keys() {
            let mut plan = Plan::zoo("mlp");
            match plan.apply_settings(&[(key.to_owned(), "%%".to_owned())]) {
                Err(e) => assert!(e.to_string().contains(key), "{key}: {e}"),
                Ok(()) => {
                    assert!(!plan.model.settings.contains_key(key), "{key} went to the model");
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
                    p.model = Earlier::SmallCnn { channels: vec![1 << 16, 1] }.into();
                    p.input_shape = vec![1, 1 << 14, 1 << 14];
                    p.classes = 2;
                    p.micro_batch = 1;
                }),
            ),
            (
                "micro_batch",
                Box::new(|p| {
                    // 2^34 values a sample are allowed; 2^14 samples of them are not.
                    p.model = Earlier::SmallCnn { channels: vec![1 << 10] }.into();
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
            ("hidden", Box::new(|p| p.model = Earlier::Mlp { hidden: vec![0] }.into())),
            (
                "hidden",
                Box::new(|p| {
                    p.model = Earlier::Mlp { hidden: vec![8; crate::zoo::limits::MAX_DEPTH as usize + 1] }.into()
                }),
            ),
            (
                "model",
                Box::new(|p| {
                    // 2^16 x 2^16 x 2^16 weights: past the parameter limit.
                    p.input_shape = vec![1 << 14];
                    p.model = Earlier::Mlp { hidden: vec![1 << 16; 5] }.into();
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
        let plan = Plan { memory_limit_bytes: Some(10 * gib), memory_fraction: Some(0.5), ..Plan::example_mlp() };
        assert_eq!(plan.memory_cap(16 * gib), Some(8 * gib), "half of 16 GiB is tighter than 10 GiB");
        let plan = Plan { memory_limit_bytes: Some(10 * gib), memory_fraction: Some(0.9), ..Plan::example_mlp() };
        assert_eq!(plan.memory_cap(16 * gib), Some(10 * gib), "10 GiB is tighter than 90 % of 16 GiB");
        let plan = Plan { memory_fraction: Some(0.25), ..Plan::example_mlp() };
        assert_eq!(plan.memory_cap(16 * gib), Some(4 * gib));
        assert_eq!(Plan::example_mlp().memory_cap(16 * gib), None);
    }

    #[test]
    fn cnn_needs_an_image_and_enough_pixels() {
        let mut plan =
            Plan { model: Earlier::SmallCnn { channels: vec![16, 32] }.into(), classes: 10, ..Plan::example_cnn() };
        plan.input_shape = vec![64];
        let err = plan.validate().expect_err("flat input");
        assert_eq!(field_of(err.clone()), "input_shape");
        assert!(err.to_string().contains("[channels, height, width]"), "{err}");
        plan.input_shape = vec![3, 4, 4];
        plan.model = Earlier::SmallCnn { channels: vec![8, 8, 8] }.into();
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
