//! Training data on disk, and the loader that turns it into batches on worker threads.
//!
//! A data set is a folder under the agent's data root holding `.npy` arrays, NIfTI
//! volumes (`.nii`, `.nii.gz`) or PNG/JPEG images, one sample per file. Labels come, in
//! this order, from a manifest (`data_labels`: CSV with `input,label` columns, or JSON:
//! a list of `{"input": …, "label": …}` or an object from input to label; a label is a
//! class number or a mask file), from mask files beside the inputs (`x_mask.npy` or
//! `x_seg.nii.gz` for `x.npy`), or from one sub-folder per class (sorted names are
//! classes 0, 1, …). Token models take `.npy` files of token ids (1-D integer arrays),
//! sampled as windows of the sequence length.
//!
//! Every file is resolved inside the data root (no `..`, no symlink that leads out) and
//! its header is checked against what the model takes before training starts; a file
//! that does not fit is an error naming the file and what was expected.
//!
//! Each sample is fitted to the model's input size: images are resized so that their
//! shorter side is the input's (aspect kept), then every input is randomly cropped where
//! it is larger and zero-padded (at a random offset) where it is smaller; a mask gets the
//! same resize (nearest) and the same crop. Array values are taken as they are; image
//! values are scaled to [0, 1]. The randomness depends only on the seed and the sample's
//! position in the run, so a run and its resumption see the same batches.
//!
//! The loader runs `workers` threads that make whole batches ahead of the trainer, at
//! most `workers × prefetch` at a time (PyTorch's DataLoader bound), and hands them over
//! in order. Batches are plain host memory (not tensors): the trainer copies each into a
//! tensor when it takes it, so prefetched batches never count as device memory. The host
//! memory guard can lower `prefetch` and `workers` while the loader runs.

mod fit;
mod formats;
mod loader;
mod sources;
mod synthetic;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use shared::graph::{Graph, InputKind, Task, ValueId};
use thiserror::Error;

pub use loader::{Loader, Room};
pub use sources::{Dataset, Order};
#[cfg(test)]
pub(crate) use synthetic::synthetic_batch;
pub use synthetic::vessels;

/// Samples in one data set.
pub const MAX_SAMPLES: usize = 10_000_000;
/// One input file's size on disk.
pub const MAX_FILE_BYTES: u64 = 16 << 30;
/// A manifest's size.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Elements of one decoded sample (4 GiB of f32).
pub const MAX_SAMPLE_ELEMENTS: usize = 1 << 30;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct DataError(pub String);

fn err(path: &Path, what: impl std::fmt::Display) -> DataError {
    DataError(format!("{}: {what}", path.display()))
}

/// `rel` (a plan's data path, already free of `..` and absolute forms) under `root`,
/// resolved through symlinks; refused unless it stays inside the root.
pub fn confine(root: &Path, rel: &str) -> Result<PathBuf, DataError> {
    let root = root.canonicalize().map_err(|e| err(root, format!("the data root: {e}")))?;
    let joined = root.join(rel);
    inside(&root, &joined)
}

/// `path` resolved (symlinks followed), refused unless inside `root` (canonical).
fn inside(root: &Path, path: &Path) -> Result<PathBuf, DataError> {
    let real = path.canonicalize().map_err(|e| err(path, e))?;
    if !real.starts_with(root) {
        return Err(err(path, format!("leads outside the data root {} (to {})", root.display(), real.display())));
    }
    Ok(real)
}

/// What the model's label input wants per sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelKind {
    /// One class number per sample (int64 `[B]`).
    Class { classes: u64 },
    /// A class number per pixel or voxel (int64 `[B, ...]`).
    IndexMap { classes: u64 },
    /// A class number per voxel as float (`[B, 1, ...]`, MONAI's label maps).
    FloatMap { classes: u64 },
    /// A 0/1 float mask (`[B, 1, ...]`); mask values above 0 are 1.
    Binary,
}

impl LabelKind {
    fn needs_mask(self) -> bool {
        !matches!(self, LabelKind::Class { .. })
    }
    fn classes(self) -> Option<u64> {
        match self {
            LabelKind::Class { classes } | LabelKind::IndexMap { classes } | LabelKind::FloatMap { classes } => {
                Some(classes)
            }
            LabelKind::Binary => None,
        }
    }
}

/// What a graph's inputs want from data on disk.
#[derive(Clone, Debug, PartialEq)]
pub enum Want {
    /// An image or volume `[C, spatial...]` and its label.
    Dense { channels: usize, spatial: Vec<usize>, label: LabelKind },
    /// Token ids in windows of `seq`.
    Tokens { seq: usize, vocab: u64 },
    /// No files: synthetic samples shaped like the graph's inputs (each input's shape
    /// without the batch dimension), made by `shared::synthetic`'s rules as the trainer's
    /// own synthetic data is.
    Synthetic { shapes: Vec<Vec<usize>>, recipes: Vec<shared::synthetic::Recipe> },
}

impl Want {
    /// Reads what `graph` (one micro-batch's) takes; refuses inputs data on disk cannot
    /// feed.
    pub fn of(graph: &Graph) -> Result<Want, DataError> {
        if matches!(graph.task, Task::Contrastive) {
            return Err(DataError("data: image-text (contrastive) models train on synthetic data only".to_owned()));
        }
        let shape = |v: ValueId| -> Vec<usize> { graph.values[v].shape.iter().map(|&d| d as usize).collect() };
        match graph.inputs.as_slice() {
            [(v, InputKind::Tokens { vocab })] => {
                let s = shape(*v);
                Ok(Want::Tokens { seq: s.last().copied().unwrap_or(1), vocab: *vocab })
            }
            [(x, InputKind::Real), (y, kind)] => {
                let xs = shape(*x);
                if xs.len() < 3 {
                    return Err(DataError(format!(
                        "data: the model takes {:?} features, not images or volumes; data on disk feeds [C, H, W] or [C, D, H, W] inputs",
                        &xs[1..]
                    )));
                }
                let label = match *kind {
                    InputKind::ClassIndex { classes } if shape(*y).len() == 1 => LabelKind::Class { classes },
                    InputKind::ClassIndex { classes } => LabelKind::IndexMap { classes },
                    InputKind::ClassMap { classes } => LabelKind::FloatMap { classes },
                    InputKind::Mask => LabelKind::Binary,
                    _ => return Err(DataError("data: this model's label input cannot come from files".to_owned())),
                };
                Ok(Want::Dense { channels: xs[1], spatial: xs[2..].to_vec(), label })
            }
            _ => Err(DataError("data: this model's inputs cannot come from files".to_owned())),
        }
    }
}

/// A batch in host memory, one entry per graph input, in the graph's order.
#[derive(Debug)]
pub struct HostBatch {
    pub tensors: Vec<HostTensor>,
}

#[derive(Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

#[derive(Debug)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}
