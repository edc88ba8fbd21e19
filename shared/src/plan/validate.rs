//! Validation: every field against its limit, then the graph, checked against the
//! limits only a built graph can tell (parameters, checkpointing, the largest tensor).

use super::limits;
use super::{DeviceChoice, Optimizer, OptimizerImpl, Plan, PlanError, Runtime, Schedule};
use crate::graph::{Checkpoint, Graph, Task};
use crate::zoo::{self, LossKind};

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid { field, reason: reason.into() }
}

pub(super) fn check_range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), PlanError> {
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
    /// Checks every field against its limit and builds the graph, so that a plan that
    /// validates can always be estimated and run.
    pub fn validate(&self) -> Result<Graph, PlanError> {
        self.check_run()?;
        self.check_optimizer()?;
        self.check_memory()?;
        self.check_host_and_schedule()?;
        let graph = self.graph()?;
        self.check_graph(&graph)?;
        Ok(graph)
    }

    /// The name, the batch, the schedule and the learning rate.
    fn check_run(&self) -> Result<(), PlanError> {
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
        Ok(())
    }

    /// The optimizer's own settings, and the runtime that runs it.
    fn check_optimizer(&self) -> Result<(), PlanError> {
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
        Ok(())
    }

    /// Checkpointing, the loss and the memory caps.
    fn check_memory(&self) -> Result<(), PlanError> {
        use limits::*;
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
        if ls > 0.0
            && !matches!(self.loss.kind, LossKind::Ce | LossKind::DiceCe | LossKind::TokenCe | LossKind::CausalLm)
        {
            return Err(invalid(
                "loss.label_smoothing",
                "applies to cross-entropy only (loss=ce, dice_ce, token_ce or causal_lm)",
            ));
        }
        if let Some(f) = self.memory_fraction
            && !(f.is_finite() && f > 0.0 && f <= 1.0)
        {
            return Err(invalid("memory_fraction", format!("must be in (0, 1], got {f}")));
        }
        Ok(())
    }

    /// Threads, the loader, data paths, the loss scale, clipping, warm-up, the device.
    fn check_host_and_schedule(&self) -> Result<(), PlanError> {
        use limits::*;
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
            crate::paths::check_data_path(path).map_err(|reason| invalid(key, reason))?;
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
        Ok(())
    }

    /// What only the built graph tells: its parameters, whether it can be checkpointed as
    /// asked, and its largest tensor and working buffer.
    fn check_graph(&self, graph: &Graph) -> Result<(), PlanError> {
        use limits::*;
        // Only a segmentation output takes the plan's loss; the others train with their
        // own (a classifier's and a language model's cross-entropy, CLIP's contrastive).
        let own = match graph.task {
            Task::Segment { .. } => None,
            Task::Classify { .. } => Some("a classifier: it trains with cross-entropy over its classes"),
            Task::LanguageModel { .. } => Some("a language model: it trains with next-token cross-entropy"),
            Task::Contrastive => Some("contrastive: it trains with CLIP's image-text cross-entropy"),
        };
        if let Some(what) = own
            && self.model.file.is_none()
            && self.loss.kind != LossKind::Ce
        {
            return Err(invalid(
                "loss",
                format!(
                    "{} is {what} (loss=ce); loss={} applies to segmentation models",
                    self.model_name(),
                    self.loss.kind.word()
                ),
            ));
        }
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
        Ok(())
    }

    /// The graph this plan describes, for one micro-batch; shape errors name the field.
    /// Only `validate` builds it, so that every graph has passed the plan's limits.
    fn graph(&self) -> Result<Graph, PlanError> {
        let mut plan = self.clone();
        plan.normalize()?;
        let built = match &plan.model.file {
            Some(file) => {
                let Some(graph) = &file.graph else {
                    return Err(invalid(
                        "model.file",
                        format!(
                            "{} has not been read: a plan naming a model file is estimated where the file is (the CLI reads it)",
                            crate::units::clip(&file.path, 200)
                        ),
                    ));
                };
                crate::import::lower::build_checked(
                    graph,
                    &plan.model.settings,
                    self.micro_batch,
                    &self.build_options(),
                )
            }
            None => zoo::build(&plan.model.name, &plan.model.settings, self.micro_batch, &self.build_options()),
        };
        built.map_err(|e| match e {
            zoo::ZooError::Value { key, reason } => PlanError::Setting { key, reason },
            // The graph error already names the op and module; the field is the model.
            zoo::ZooError::Graph(g) => invalid("model", g.to_string()),
            other => invalid("model", other.to_string()),
        })
    }
}
