//! Checkpoints: a directory per save, `step-00000042/` under the agent's checkpoint
//! directory, holding
//! - `weights.safetensors`: every parameter and buffer by its module path (a TorchScript module: its parameters; readable with
//!   `safetensors.torch.load_file` in Python),
//! - `optimizer.pt`: libtorch's optimizer state (`torch::save(optimizer)`: moments and
//!   step counts),
//! - `state.json`: the step, the micro-batch and accumulation in force (after any OOM
//!   fallback), fp16's loss scale and the counters the run needs to continue exactly.
//!
//! A save is written under a temporary name and renamed into place, so a crash mid-save
//! never leaves a directory that looks complete.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::error::TrainError;
use crate::ffi::Optim;

/// Bumped when the layout or `state.json` changes incompatibly.
pub const FORMAT: u32 = 2;

const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.pt";
const STATE: &str = "state.json";

/// What a checkpoint records besides tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// The plan's model name, checked on resume.
    pub model: String,
    /// The optimizer with its options, as the plan gave them (checked on resume: the
    /// saved state brings its own options).
    pub optimizer: String,
    /// Optimizer steps done.
    pub step: u64,
    pub micro_batch: u64,
    pub accumulation: u64,
    /// fp16's loss scale and clean steps since it last changed.
    pub loss_scale: Option<(f64, u64)>,
    /// Forward passes so far (seeds checkpointed regions' dropout).
    pub passes: u64,
    pub micro_batches: u64,
    pub first_loss: Option<f64>,
}

/// Unique names for the parameters: their module paths, with `#k` added to a repeated
/// one.
fn unique(names: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    names
        .into_iter()
        .map(|name| {
            let n = seen.entry(name.clone()).or_insert(0);
            *n += 1;
            if *n == 1 { name } else { format!("{name}#{}", *n - 1) }
        })
        .collect()
}

fn io(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint(format!("{}: {e}", path.display()))
}

/// Size of every file directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Writes a checkpoint of `params` (in the graph's order), `opt` and `state` under
/// `root`; returns its directory and size.
pub fn save(
    root: &Path,
    names: Vec<String>,
    params: &[Tensor],
    opt: &Optim,
    state: &State,
) -> Result<(PathBuf, u64), TrainError> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let name = format!("step-{:08}", state.step);
    let tmp = root.join(format!(".{name}.partial"));
    let dir = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| io(&tmp, e))?;
    // Weights as they are on the host: safetensors files hold CPU tensors.
    let named: Vec<(String, Tensor)> = unique(names)
        .into_iter()
        .zip(params)
        .map(|(n, t)| Ok((n, t.f_detach()?.f_to_device(Device::Cpu)?)))
        .collect::<Result<_, tch::TchError>>()?;
    let weights = tmp.join(WEIGHTS);
    Tensor::write_safetensors(&named, &weights).map_err(|e| io(&weights, e))?;
    drop(named);
    let optimizer = tmp.join(OPTIMIZER);
    opt.save(&optimizer).map_err(|e| io(&optimizer, e))?;
    let state_path = tmp.join(STATE);
    let text = serde_json::to_string_pretty(state).map_err(|e| io(&state_path, e))?;
    std::fs::write(&state_path, text).map_err(|e| io(&state_path, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
    let bytes = dir_bytes(&dir);
    Ok((dir, bytes))
}

/// The checkpoint `path` names: a `step-N` directory itself, or the newest one inside a
/// checkpoint directory.
pub fn locate(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join(STATE).is_file() {
        return Ok(path.to_owned());
    }
    let rd = std::fs::read_dir(path).map_err(|e| io(path, e))?;
    let newest = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(STATE).is_file().then_some((step, e.path()))
        })
        .max_by_key(|(step, _)| *step);
    newest
        .map(|(_, p)| p)
        .ok_or_else(|| io(path, "is neither a checkpoint (no state.json) nor a directory holding step-N checkpoints"))
}

/// Reads checkpoint `dir`'s state, checked against the plan's model and this format.
pub fn read_state(dir: &Path, model: &str) -> Result<State, TrainError> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| io(&path, e))?;
    if state.format != FORMAT {
        return Err(io(&path, format!("format {} (this agent reads format {FORMAT})", state.format)));
    }
    if state.model != model {
        return Err(io(&path, format!("is a checkpoint of model '{}', not of this plan's '{model}'", state.model)));
    }
    Ok(state)
}

/// Copies checkpoint `dir`'s weights into `params` (the graph's order, on their device),
/// after checking that every name and shape matches.
pub fn load_weights(dir: &Path, names: Vec<String>, params: &[Tensor]) -> Result<(), TrainError> {
    let path = dir.join(WEIGHTS);
    let saved: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(&path).map_err(|e| io(&path, e))?.into_iter().collect();
    let names = unique(names);
    if saved.len() != names.len() {
        return Err(io(&path, format!("holds {} tensors; this plan's model has {}", saved.len(), names.len())));
    }
    for (name, param) in names.iter().zip(params) {
        let t = saved.get(name).ok_or_else(|| io(&path, format!("has no tensor '{name}'")))?;
        if t.size() != param.size() {
            return Err(io(&path, format!("'{name}' is {:?}; the model's is {:?}", t.size(), param.size())));
        }
        tch::no_grad(|| param.shallow_clone().f_copy_(t))?;
    }
    Ok(())
}

/// Loads checkpoint `dir`'s optimizer state into `opt`.
pub fn load_optimizer(dir: &Path, opt: &mut Optim) -> Result<(), TrainError> {
    let path = dir.join(OPTIMIZER);
    opt.load(&path).map_err(|e| io(&path, e))
}
