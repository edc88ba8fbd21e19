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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shared::graph::{Graph, InputKind, Task};
use thiserror::Error;

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

/// A file format, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Npy,
    Nifti,
    Image,
}

fn format_of(path: &Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".npy") {
        Some(Format::Npy)
    } else if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        Some(Format::Nifti)
    } else if name.ends_with(".png") || name.ends_with(".jpg") || name.ends_with(".jpeg") {
        Some(Format::Image)
    } else {
        None
    }
}

/// The file name without its format's extension (`x` for `x.nii.gz`).
fn stem(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let lower = name.to_ascii_lowercase();
    for ext in [".nii.gz", ".nii", ".npy", ".png", ".jpeg", ".jpg"] {
        if lower.ends_with(ext) {
            return name[..name.len() - ext.len()].to_owned();
        }
    }
    name.to_owned()
}

fn is_mask_name(path: &Path) -> bool {
    let s = stem(path);
    s.ends_with("_mask") || s.ends_with("_seg")
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
    /// without the batch dimension), learnable as the trainer's own synthetic data is.
    Synthetic { inputs: Vec<(Vec<usize>, InputKind)>, contrastive: bool },
}

impl Want {
    /// Reads what `graph` (one micro-batch's) takes; refuses inputs data on disk cannot
    /// feed.
    pub fn of(graph: &Graph) -> Result<Want, DataError> {
        if matches!(graph.task, Task::Contrastive) {
            return Err(DataError("data: image-text (contrastive) models train on synthetic data only".to_owned()));
        }
        let shape = |v: usize| -> Vec<usize> { graph.values[v].shape.iter().map(|&d| d as usize).collect() };
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

#[derive(Clone, Debug, PartialEq)]
enum Label {
    None,
    Class(u64),
    Mask(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
struct Sample {
    input: PathBuf,
    label: Label,
}

/// A checked data set.
#[derive(Debug)]
pub struct Dataset {
    /// The data root, canonical: every file is checked to be inside it again when read.
    root: PathBuf,
    samples: Vec<Sample>,
    want: Want,
    /// Token files (token models): their length, item type and where their data starts.
    tokens: Vec<TokenFile>,
}

#[derive(Debug)]
struct TokenFile {
    len: usize,
    dtype: String,
    data_start: u64,
}

/// A worker's cache of the current epoch's sample order.
pub type Order = Option<(u64, Vec<u32>)>;

/// Files of a supported format directly in `dir`, sorted, resolved inside `root`.
fn files_in(root: &Path, dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let entry = entry.map_err(|e| err(dir, e))?;
        let path = entry.path();
        if format_of(&path).is_some() && path.is_file() {
            out.push(inside(root, &path)?);
            if out.len() > MAX_SAMPLES {
                return Err(err(dir, format!("holds more than {MAX_SAMPLES} files")));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The masks among `files` (`x_mask.*`, `x_seg.*`), by (folder, the input's stem).
fn masks_by_input(files: &[PathBuf]) -> BTreeMap<(PathBuf, String), PathBuf> {
    files
        .iter()
        .filter_map(|f| {
            let s = stem(f);
            let input = s.strip_suffix("_mask").or_else(|| s.strip_suffix("_seg"))?.to_owned();
            Some(((f.parent()?.to_owned(), input), f.clone()))
        })
        .collect()
}

/// Reads a manifest: (input, label) pairs, each label a class number or a file.
fn read_manifest(path: &Path) -> Result<Vec<(String, serde_json::Value)>, DataError> {
    let size = std::fs::metadata(path).map_err(|e| err(path, e))?.len();
    if size > MAX_MANIFEST_BYTES {
        return Err(err(path, format!("is {size} bytes; a manifest may have at most {MAX_MANIFEST_BYTES}")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
    let lower = path.to_string_lossy().to_ascii_lowercase();
    if lower.ends_with(".json") {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(path, e))?;
        match v {
            serde_json::Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let input = item.get("input").and_then(|v| v.as_str()).map(str::to_owned);
                    let label = item.get("label").cloned();
                    match (input, label) {
                        (Some(i), Some(l)) => Ok((i, l)),
                        _ => Err(err(path, format!("entry {i} needs \"input\" (a file) and \"label\""))),
                    }
                })
                .collect(),
            serde_json::Value::Object(map) => Ok(map.into_iter().collect()),
            _ => Err(err(path, "must be a JSON list of {\"input\", \"label\"} or an object from input to label")),
        }
    } else if lower.ends_with(".csv") {
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let headers = reader.headers().map_err(|e| err(path, e))?.clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let (Some(ci), Some(cl)) = (col("input"), col("label")) else {
            return Err(err(
                path,
                format!("needs the columns input and label; it has {:?}", headers.iter().collect::<Vec<_>>()),
            ));
        };
        let mut out = Vec::new();
        for (row, rec) in reader.records().enumerate() {
            let rec = rec.map_err(|e| err(path, format!("row {}: {e}", row + 2)))?;
            let input = rec.get(ci).unwrap_or_default().trim().to_owned();
            let label = rec.get(cl).unwrap_or_default().trim();
            let label = match label.parse::<u64>() {
                Ok(n) => serde_json::Value::from(n),
                Err(_) => serde_json::Value::from(label),
            };
            out.push((input, label));
        }
        Ok(out)
    } else {
        Err(err(path, "a manifest is a .csv or .json file"))
    }
}

/// A relative path from a manifest, resolved under `dir` and kept inside `root`.
fn manifest_path(root: &Path, dir: &Path, manifest: &Path, rel: &str) -> Result<PathBuf, DataError> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|p| p == "..") {
        return Err(err(manifest, format!("'{rel}' must be a path relative to the data folder, without '..'")));
    }
    inside(root, &dir.join(rel))
}

/// The shape of a file as stored, read from its header only.
fn header_shape(path: &Path) -> Result<Vec<usize>, DataError> {
    let size = std::fs::metadata(path).map_err(|e| err(path, e))?.len();
    if size > MAX_FILE_BYTES {
        return Err(err(path, format!("is {size} bytes; the limit per file is {MAX_FILE_BYTES}")));
    }
    let shape: Vec<usize> = match format_of(path) {
        Some(Format::Npy) => {
            let f = std::fs::File::open(path).map_err(|e| err(path, e))?;
            let npy = npyz::NpyFile::new(std::io::BufReader::new(f))
                .map_err(|e| err(path, format!("not a .npy file: {e}")))?;
            npy.shape().iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect()
        }
        Some(Format::Nifti) => {
            let h = nifti::NiftiHeader::from_file(path).map_err(|e| err(path, format!("not a NIfTI file: {e}")))?;
            let n = usize::from(h.dim[0]).min(7);
            h.dim[1..=n].iter().map(|&d| usize::from(d)).collect()
        }
        Some(Format::Image) => {
            let (w, h) = image::image_dimensions(path).map_err(|e| err(path, format!("not a readable image: {e}")))?;
            vec![h as usize, w as usize]
        }
        None => return Err(err(path, "is not .npy, .nii, .nii.gz, .png, .jpg or .jpeg")),
    };
    // Decoded, the sample must fit the per-sample limit: checked here, before any decode.
    let elements = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if elements.is_none_or(|n| n > MAX_SAMPLE_ELEMENTS) {
        return Err(err(path, format!("has shape {shape:?}: more than {MAX_SAMPLE_ELEMENTS} values per sample")));
    }
    Ok(shape)
}

/// Splits a stored shape into (channels, spatial) for `n` spatial dimensions: `[S...]`
/// has one channel; `.npy` stores `[C, S...]`, NIfTI `[S..., C]`; images report only
/// their spatial size (their channels are converted to what the model takes).
fn split_shape(path: &Path, shape: &[usize], n: usize, want_channels: usize) -> Result<(usize, Vec<usize>), DataError> {
    let format = format_of(path);
    let (c, s) = match (format, shape.len()) {
        (Some(Format::Image), _) => (want_channels, shape.to_vec()),
        (_, len) if len == n => (1, shape.to_vec()),
        (Some(Format::Npy), len) if len == n + 1 => (shape[0], shape[1..].to_vec()),
        (Some(Format::Nifti), len) if len == n + 1 => (shape[n], shape[..n].to_vec()),
        _ => {
            return Err(err(
                path,
                format!(
                    "has shape {shape:?}; the model takes {n} spatial dimensions with an optional channel dimension"
                ),
            ));
        }
    };
    if s.contains(&0) || c == 0 {
        return Err(err(path, format!("has an empty dimension in {shape:?}")));
    }
    Ok((c, s))
}

impl Dataset {
    /// Lists and checks the data set in `dir` (inside `root`), with an optional manifest.
    pub fn open(root: &Path, dir: &Path, manifest: Option<&Path>, want: Want) -> Result<Dataset, DataError> {
        let root = root.canonicalize().map_err(|e| err(root, format!("the data root: {e}")))?;
        let dir = inside(&root, dir)?;
        if !dir.is_dir() {
            return Err(err(&dir, "is not a folder"));
        }
        let mut samples = Vec::new();
        if let Some(m) = manifest {
            let m = inside(&root, m)?;
            for (input, label) in read_manifest(&m)? {
                let input = manifest_path(&root, &dir, &m, &input)?;
                let label =
                    match &label {
                        serde_json::Value::Number(n) => Label::Class(n.as_u64().ok_or_else(|| {
                            err(&m, format!("label {n} of {} is not a class number", input.display()))
                        })?),
                        serde_json::Value::String(s) => Label::Mask(manifest_path(&root, &dir, &m, s)?),
                        other => {
                            return Err(err(
                                &m,
                                format!("label {other} of {} is neither a class nor a file", input.display()),
                            ));
                        }
                    };
                samples.push(Sample { input, label });
                if samples.len() > MAX_SAMPLES {
                    return Err(err(&m, format!("lists more than {MAX_SAMPLES} samples")));
                }
            }
        } else {
            let files = files_in(&root, &dir)?;
            let inputs: Vec<&PathBuf> = files.iter().filter(|f| !is_mask_name(f)).collect();
            let masks = masks_by_input(&files);
            if !inputs.is_empty() {
                for f in inputs {
                    let key = (f.parent().map(Path::to_path_buf).unwrap_or_default(), stem(f));
                    let label = match masks.get(&key).cloned() {
                        Some(mask) => Label::Mask(mask),
                        None => Label::None,
                    };
                    samples.push(Sample { input: f.clone(), label });
                }
            } else {
                // One sub-folder per class.
                let mut classes: Vec<PathBuf> = std::fs::read_dir(&dir)
                    .map_err(|e| err(&dir, e))?
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect();
                classes.sort();
                for (c, class_dir) in classes.iter().enumerate() {
                    let class_dir = inside(&root, class_dir)?;
                    for f in files_in(&root, &class_dir)? {
                        samples.push(Sample { input: f, label: Label::Class(c as u64) });
                    }
                    if samples.len() > MAX_SAMPLES {
                        return Err(err(&dir, format!("holds more than {MAX_SAMPLES} samples")));
                    }
                }
            }
        }
        if samples.is_empty() {
            return Err(err(
                &dir,
                "holds no .npy, .nii, .nii.gz, .png, .jpg or .jpeg files (nor class folders of them)",
            ));
        }
        let mut tokens = Vec::new();
        // Every file's header against what the model takes, before any training.
        for s in &samples {
            let shape = header_shape(&s.input)?;
            match &want {
                Want::Synthetic { .. } => {
                    return Err(DataError("data: synthetic data has no files to open".to_owned()));
                }
                Want::Tokens { seq, .. } => {
                    if format_of(&s.input) != Some(Format::Npy) || shape.len() != 1 {
                        return Err(err(
                            &s.input,
                            format!("a token model reads 1-D .npy arrays of token ids; this is {shape:?}"),
                        ));
                    }
                    if shape[0] < *seq {
                        return Err(err(&s.input, format!("holds {} tokens; the model's sequence is {seq}", shape[0])));
                    }
                    tokens.push(token_file(&s.input, shape[0])?);
                }
                Want::Dense { channels, spatial, label, .. } => {
                    let (c, sp) = split_shape(&s.input, &shape, spatial.len(), *channels)?;
                    if format_of(&s.input) == Some(Format::Image) && sp.len() == 2 && spatial.len() == 2 {
                        // Resized so its shorter side fits the input: bounded like any sample.
                        let scale = (spatial[0] as f64 / sp[0] as f64).max(spatial[1] as f64 / sp[1] as f64);
                        let resized = (sp[0] as f64 * scale).ceil() * (sp[1] as f64 * scale).ceil() * *channels as f64;
                        if resized > MAX_SAMPLE_ELEMENTS as f64 {
                            return Err(err(
                                &s.input,
                                format!(
                                    "is {}x{}: resized to fit {spatial:?} it would exceed {MAX_SAMPLE_ELEMENTS} values",
                                    sp[1], sp[0]
                                ),
                            ));
                        }
                    }
                    if c != *channels {
                        return Err(err(&s.input, format!("has {c} channels; the model takes {channels}")));
                    }
                    match (&s.label, label.needs_mask()) {
                        (Label::Mask(m), true) => {
                            let ms = header_shape(m)?;
                            let (mc, msp) = split_shape(m, &ms, spatial.len(), 1)?;
                            if mc != 1 {
                                return Err(err(m, format!("a mask has one channel; this one has {mc}")));
                            }
                            if msp != sp {
                                return Err(err(m, format!("is {msp:?}; its input {} is {sp:?}", s.input.display())));
                            }
                        }
                        (Label::Class(c), false) => {
                            if let Some(n) = label.classes()
                                && *c >= n
                            {
                                return Err(err(&s.input, format!("has class {c}; the model has {n} classes")));
                            }
                        }
                        (Label::None, true) | (Label::Class(_), true) => {
                            return Err(err(
                                &s.input,
                                format!(
                                    "the model segments ({label:?}) and needs a mask for it: name it {}_mask.<ext> beside it, or give data_labels",
                                    stem(&s.input)
                                ),
                            ));
                        }
                        (Label::None, false) | (Label::Mask(_), false) => {
                            return Err(err(
                                &s.input,
                                "the model classifies and needs a class for it: give data_labels, or sort the files into one folder per class",
                            ));
                        }
                    }
                }
            }
        }
        Ok(Dataset { root, samples, want, tokens })
    }

    /// Synthetic samples for `graph`'s inputs, made by the loader's threads.
    pub fn synthetic(graph: &Graph) -> Dataset {
        let inputs = graph
            .inputs
            .iter()
            .map(|&(v, kind)| (graph.values[v].shape.iter().skip(1).map(|&d| d as usize).collect(), kind))
            .collect();
        let want = Want::Synthetic { inputs, contrastive: matches!(graph.task, Task::Contrastive) };
        Dataset { root: PathBuf::new(), samples: Vec::new(), want, tokens: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The sample at run position `pos` (over epochs): each epoch visits every sample
    /// once, in an order drawn from the seed and the epoch.
    fn sample_at(&self, pos: u64, seed: u64, order: &mut Option<(u64, Vec<u32>)>) -> usize {
        let n = self.samples.len() as u64;
        let epoch = pos / n;
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut idx: Vec<u32> = (0..n as u32).collect();
            idx.shuffle(&mut StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407)));
            *order = Some((epoch, idx));
        }
        order.as_ref().map_or(0, |(_, idx)| idx[(pos % n) as usize] as usize)
    }

    /// The batch of `batch` samples starting at run position `start`.
    pub fn batch(&self, start: u64, batch: usize, seed: u64, order: &mut Order) -> Result<HostBatch, DataError> {
        match &self.want {
            Want::Synthetic { inputs, contrastive } => Ok(synthetic_batch(inputs, *contrastive, batch, seed ^ start)),
            Want::Tokens { seq, vocab } => {
                let mut ids = Vec::with_capacity(batch * seq);
                for j in 0..batch as u64 {
                    let pos = start + j;
                    let i = self.sample_at(pos, seed, order);
                    let mut rng = StdRng::seed_from_u64(seed ^ pos.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let file = &self.tokens[i];
                    let path = inside(&self.root, &self.samples[i].input)?;
                    let offset = rng.random_range(0..=file.len.saturating_sub(*seq));
                    for t in read_token_window(&path, file, offset, *seq)? {
                        if t < 0 || t as u64 >= *vocab {
                            return Err(err(
                                &self.samples[i].input,
                                format!("holds token {t}; the vocabulary is {vocab}"),
                            ));
                        }
                        ids.push(t);
                    }
                }
                Ok(HostBatch { tensors: vec![HostTensor { shape: vec![batch, *seq], data: HostData::I64(ids) }] })
            }
            Want::Dense { channels, spatial, label, .. } => {
                let per = spatial.iter().product::<usize>();
                let mut x = Vec::with_capacity(batch * channels * per);
                let mut y_f = Vec::new();
                let mut y_i = Vec::new();
                for j in 0..batch as u64 {
                    let pos = start + j;
                    let i = self.sample_at(pos, seed, order);
                    let s = &self.samples[i];
                    let mut rng = StdRng::seed_from_u64(seed ^ pos.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    let input = read_array(&inside(&self.root, &s.input)?, spatial, *channels, false)?;
                    let offsets = crop_offsets(&input.spatial, spatial, &mut rng);
                    x.extend(fit(&input, spatial, &offsets));
                    match (&s.label, *label) {
                        (Label::Class(c), _) => y_i.push(*c as i64),
                        (Label::Mask(m), kind) => {
                            let mask = read_array(&inside(&self.root, m)?, &input.spatial_before_resize, 1, true)?;
                            let mask = if mask.spatial != input.spatial {
                                resize_nearest(&mask, &input.spatial)
                            } else {
                                mask
                            };
                            let fitted = fit(&mask, spatial, &offsets);
                            match kind {
                                LabelKind::Binary => {
                                    y_f.extend(fitted.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.0 }))
                                }
                                LabelKind::FloatMap { classes } | LabelKind::IndexMap { classes } => {
                                    for &v in &fitted {
                                        let c = v.round();
                                        if !(0.0..classes as f32).contains(&c) {
                                            return Err(err(
                                                m,
                                                format!("holds label {v}; the model has {classes} classes"),
                                            ));
                                        }
                                        if matches!(kind, LabelKind::IndexMap { .. }) {
                                            y_i.push(c as i64);
                                        } else {
                                            y_f.push(c);
                                        }
                                    }
                                }
                                LabelKind::Class { .. } => {}
                            }
                        }
                        (Label::None, _) => {}
                    }
                }
                let mut xs = vec![batch, *channels];
                xs.extend(spatial);
                let label_shape = match label {
                    LabelKind::Class { .. } => vec![batch],
                    LabelKind::IndexMap { .. } => [vec![batch], spatial.clone()].concat(),
                    LabelKind::FloatMap { .. } | LabelKind::Binary => [vec![batch, 1], spatial.clone()].concat(),
                };
                let y = if y_i.is_empty() { HostData::F32(y_f) } else { HostData::I64(y_i) };
                Ok(HostBatch {
                    tensors: vec![
                        HostTensor { shape: xs, data: HostData::F32(x) },
                        HostTensor { shape: label_shape, data: y },
                    ],
                })
            }
        }
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// `b` masks of `h x w` (row-major, 0/1) with two to four vessels each: curves that cross
/// the image from its left edge with a slowly turning heading, one to a few pixels wide.
pub fn vessels(b: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![0.0f32; b * h * w];
    let radius = (h.min(w) / 256).max(1) as i64;
    for s in 0..b {
        let mask = &mut out[s * h * w..(s + 1) * h * w];
        for _ in 0..rng.random_range(2..=4) {
            let (mut y, mut x) = (rng.random_range(0.0..h as f64), 0.0f64);
            let mut heading: f64 = rng.random_range(-0.6..0.6);
            while x < w as f64 && y >= 0.0 && y < h as f64 {
                for dy in -radius..=radius {
                    for dx in -radius..=radius {
                        let (py, px) = (y as i64 + dy, x as i64 + dx);
                        if dy * dy + dx * dx <= radius * radius
                            && (0..h as i64).contains(&py)
                            && (0..w as i64).contains(&px)
                        {
                            mask[py as usize * w + px as usize] = 1.0;
                        }
                    }
                }
                heading = (heading + rng.random_range(-0.08..0.08)).clamp(-1.2, 1.2);
                x += heading.cos();
                y += heading.sin();
            }
        }
    }
    out
}

/// A synthetic batch made on the host with the same rules as the trainer's on-device
/// synthetic data: labels follow from the inputs (a class adds +2 to its own stretch of
/// the flattened input; label maps bucket the sigmoid of the first channel; 2-D masks are
/// vessels the image is brighter along; other masks threshold the first channel; tokens
/// count up from a random start; CLIP's labels are positions).
fn synthetic_batch(inputs: &[(Vec<usize>, InputKind)], contrastive: bool, b: usize, seed: u64) -> HostBatch {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<Option<HostTensor>> = inputs.iter().map(|_| None).collect();
    let first_real = inputs.iter().position(|(_, k)| *k == InputKind::Real);
    for (k, (shape, kind)) in inputs.iter().enumerate() {
        if *kind == InputKind::Real {
            let n = b * shape.iter().product::<usize>();
            let data = (0..n).map(|_| normal(&mut rng)).collect();
            tensors[k] = Some(HostTensor { shape: [vec![b], shape.clone()].concat(), data: HostData::F32(data) });
        }
    }
    // The first channel of the first real input, per sample, when it has `per` values.
    let channel0 = |tensors: &[Option<HostTensor>], s: usize, per: usize| -> Option<Vec<f32>> {
        let t = tensors[first_real?].as_ref()?;
        let HostData::F32(x) = &t.data else { return None };
        let sample = x.len() / b;
        let c = t.shape.get(1).copied().unwrap_or(1);
        (t.shape.len() >= 2 && sample / c == per).then(|| x[s * sample..s * sample + per].to_vec())
    };
    let bucket = |v: f32, classes: u64| -> f32 {
        let c = classes.max(1) as f32;
        ((1.0 / (1.0 + (-v).exp())) * c).floor().clamp(0.0, c - 1.0)
    };
    for (k, (shape, kind)) in inputs.iter().enumerate() {
        let full = [vec![b], shape.clone()].concat();
        let per: usize = shape.iter().product();
        let data = match *kind {
            InputKind::Real => continue,
            InputKind::Tokens { vocab } => {
                let t = shape.last().copied().unwrap_or(1);
                let mut ids = Vec::with_capacity(b * t);
                for _ in 0..b {
                    let start = rng.random_range(0..vocab.max(1));
                    ids.extend((0..t as u64).map(|i| ((start + i) % vocab.max(1)) as i64));
                }
                HostData::I64(ids)
            }
            InputKind::ClassIndex { .. } if contrastive => HostData::I64((0..b as i64).collect()),
            InputKind::ClassIndex { classes } if shape.is_empty() => {
                let y: Vec<i64> = (0..b).map(|_| rng.random_range(0..classes.max(1)) as i64).collect();
                if let Some(HostTensor { data: HostData::F32(x), .. }) = first_real.and_then(|r| tensors[r].as_mut()) {
                    let features = (x.len() / b).max(1);
                    let span = (features / classes.max(1) as usize).max(1);
                    for (s, &c) in y.iter().enumerate() {
                        let start = (c as usize * span) % features;
                        for v in &mut x[s * features + start..s * features + (start + span).min(features)] {
                            *v += 2.0;
                        }
                    }
                }
                HostData::I64(y)
            }
            InputKind::ClassIndex { classes } => HostData::I64(
                (0..b)
                    .flat_map(|s| {
                        let c0 =
                            channel0(&tensors, s, per).unwrap_or_else(|| (0..per).map(|_| normal(&mut rng)).collect());
                        c0.into_iter().map(move |v| bucket(v, classes) as i64).collect::<Vec<_>>()
                    })
                    .collect(),
            ),
            InputKind::ClassMap { classes } => HostData::F32(
                (0..b)
                    .flat_map(|s| {
                        let c0 =
                            channel0(&tensors, s, per).unwrap_or_else(|| (0..per).map(|_| normal(&mut rng)).collect());
                        c0.into_iter().map(move |v| bucket(v, classes)).collect::<Vec<_>>()
                    })
                    .collect(),
            ),
            InputKind::Mask if shape.len() == 3 => {
                let (h, w) = (shape[1], shape[2]);
                let m = vessels(b, h, w, rng.random());
                if let Some(HostTensor { shape: xs, data: HostData::F32(x) }) =
                    first_real.and_then(|r| tensors[r].as_mut())
                    && xs.len() == 4
                    && xs[2..] == [h, w]
                {
                    let sample = x.len() / b;
                    for s in 0..b {
                        for (v, &mv) in x[s * sample..s * sample + h * w].iter_mut().zip(&m[s * h * w..(s + 1) * h * w])
                        {
                            *v += 2.0 * mv;
                        }
                    }
                }
                HostData::F32(m)
            }
            InputKind::Mask => HostData::F32(
                (0..b)
                    .flat_map(|s| {
                        let c0 =
                            channel0(&tensors, s, per).unwrap_or_else(|| (0..per).map(|_| normal(&mut rng)).collect());
                        c0.into_iter().map(|v| if v > 0.0 { 1.0 } else { 0.0 }).collect::<Vec<_>>()
                    })
                    .collect(),
            ),
        };
        tensors[k] = Some(HostTensor { shape: full, data });
    }
    HostBatch { tensors: tensors.into_iter().flatten().collect() }
}

/// A decoded sample: `[channels, spatial...]` row-major f32.
#[derive(Clone, Debug)]
struct Array {
    channels: usize,
    spatial: Vec<usize>,
    /// The stored spatial size before an image was resized (masks are read at it).
    spatial_before_resize: Vec<usize>,
    data: Vec<f32>,
}

/// A `.npy` dtype as `f4`, `i8`, …; big-endian and structured types are `None`.
fn npy_type(dtype: &npyz::DType) -> Option<String> {
    let d = dtype.descr();
    let d = d.trim_matches('\'');
    if d.starts_with('>') || d.starts_with('[') {
        return None;
    }
    Some(d.trim_start_matches(['<', '|', '=']).to_owned())
}

/// A token file's item type and where its data starts, from its header.
fn token_file(path: &Path, len: usize) -> Result<TokenFile, DataError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).map_err(|e| err(path, e))?;
    let dtype = npy_type(&npy.dtype()).unwrap_or_default();
    if !["i2", "u2", "i4", "u4", "i8"].contains(&dtype.as_str()) {
        return Err(err(
            path,
            format!("token ids must be little-endian int16/uint16/int32/uint32/int64, not {}", npy.dtype().descr()),
        ));
    }
    // The header: magic (6), version (2), its length (2 bytes in v1, 4 later), itself.
    let mut head = [0u8; 12];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).map_err(|e| err(path, e))?;
    let data_start = if head[6] == 1 {
        10 + u64::from(u16::from_le_bytes([head[8], head[9]]))
    } else {
        12 + u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]]))
    };
    Ok(TokenFile { len, dtype, data_start })
}

/// `len` token ids from position `offset` of a token file, read directly from disk.
fn read_token_window(path: &Path, file: &TokenFile, offset: usize, len: usize) -> Result<Vec<i64>, DataError> {
    use std::io::{Read, Seek, SeekFrom};
    let size = match file.dtype.as_str() {
        "i2" | "u2" => 2,
        "i4" | "u4" => 4,
        _ => 8,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(path, e))?;
    f.seek(SeekFrom::Start(file.data_start + (offset * size) as u64)).map_err(|e| err(path, e))?;
    let mut raw = vec![0u8; len * size];
    f.read_exact(&mut raw).map_err(|e| err(path, format!("reading tokens {offset}..{}: {e}", offset + len)))?;
    Ok(raw
        .chunks_exact(size)
        .map(|b| match file.dtype.as_str() {
            "i2" => i64::from(i16::from_le_bytes([b[0], b[1]])),
            "u2" => i64::from(u16::from_le_bytes([b[0], b[1]])),
            "i4" => i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "u4" => i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            _ => i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

fn read_npy(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    let f = std::fs::File::open(path).map_err(|e| err(path, e))?;
    let npy = npyz::NpyFile::new(std::io::BufReader::new(f)).map_err(|e| err(path, e))?;
    if npy.order() == npyz::Order::Fortran {
        return Err(err(path, "is stored in Fortran order; save it with np.ascontiguousarray first"));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    if n > MAX_SAMPLE_ELEMENTS {
        return Err(err(path, format!("holds {n} values; the limit per sample is {MAX_SAMPLE_ELEMENTS}")));
    }
    let bad = |e: std::io::Error| err(path, e);
    let dtype = npy_type(&npy.dtype()).unwrap_or_else(|| npy.dtype().descr());
    let data: Vec<f32> = match dtype.as_str() {
        "f4" => npy.into_vec::<f32>().map_err(bad)?,
        "f8" => npy.into_vec::<f64>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        "f2" => return Err(err(path, "float16 arrays are not read; save as float32")),
        "u1" => npy.into_vec::<u8>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "b1" => npy.into_vec::<bool>().map_err(bad)?.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect(),
        "i1" => npy.into_vec::<i8>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "i2" => npy.into_vec::<i16>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "u2" => npy.into_vec::<u16>().map_err(bad)?.into_iter().map(f32::from).collect(),
        "i4" => npy.into_vec::<i32>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        "u4" => npy.into_vec::<u32>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        "i8" => npy.into_vec::<i64>().map_err(bad)?.into_iter().map(|v| v as f32).collect(),
        other => return Err(err(path, format!("has dtype {other}; expected a little-endian number or bool array"))),
    };
    Ok((shape, data))
}

fn read_nifti(path: &Path) -> Result<(Vec<usize>, Vec<f32>), DataError> {
    use nifti::{IntoNdArray, NiftiObject};
    let obj = nifti::ReaderOptions::new().read_file(path).map_err(|e| err(path, format!("not a NIfTI file: {e}")))?;
    let arr = obj.into_volume().into_ndarray::<f32>().map_err(|e| err(path, e))?;
    let shape = arr.shape().to_vec();
    if arr.len() > MAX_SAMPLE_ELEMENTS {
        return Err(err(path, format!("holds {} values; the limit per sample is {MAX_SAMPLE_ELEMENTS}", arr.len())));
    }
    // Logical (x, y, z[, c]) order, whatever the memory layout.
    Ok((shape, arr.iter().copied().collect()))
}

/// Reads `path` as `[C, spatial...]`: images resized so their shorter side matches
/// `target`'s (nearest for masks) and converted to `channels`; arrays as stored.
fn read_array(path: &Path, target: &[usize], channels: usize, mask: bool) -> Result<Array, DataError> {
    let n = target.len();
    match format_of(path) {
        Some(Format::Image) => {
            if n != 2 {
                return Err(err(path, format!("is a 2-D image; the model takes {n}-D inputs")));
            }
            let img = image::open(path).map_err(|e| err(path, format!("not a readable image: {e}")))?;
            let before = vec![img.height() as usize, img.width() as usize];
            // Masks come at their input's stored size and are resized with it (by the caller).
            let img = if mask {
                img
            } else {
                let (h, w) = (img.height() as f64, img.width() as f64);
                let scale = (target[0] as f64 / h).max(target[1] as f64 / w);
                let (nh, nw) = ((h * scale).round().max(1.0) as u32, (w * scale).round().max(1.0) as u32);
                img.resize_exact(nw, nh, image::imageops::FilterType::Triangle)
            };
            let (h, w) = (img.height() as usize, img.width() as usize);
            let data: Vec<f32> = match channels {
                // A mask's values are labels: read them as stored, never rescaled.
                1 if mask => match &img {
                    image::DynamicImage::ImageLuma8(m) => m.as_raw().iter().map(|&v| f32::from(v)).collect(),
                    image::DynamicImage::ImageLuma16(m) => m.as_raw().iter().map(|&v| f32::from(v)).collect(),
                    other => {
                        return Err(err(
                            path,
                            format!("a mask image must be 8- or 16-bit gray; this one is {:?}", other.color()),
                        ));
                    }
                },
                1 => img.to_luma32f().into_raw(),
                3 => {
                    let rgb = img.to_rgb32f().into_raw();
                    let mut planar = vec![0.0; 3 * h * w];
                    for (p, px) in rgb.chunks_exact(3).enumerate() {
                        for c in 0..3 {
                            planar[c * h * w + p] = px[c];
                        }
                    }
                    planar
                }
                c => return Err(err(path, format!("images give 1 or 3 channels; the model takes {c}"))),
            };
            Ok(Array { channels, spatial: vec![h, w], spatial_before_resize: before, data })
        }
        Some(f @ (Format::Npy | Format::Nifti)) => {
            let (shape, data) = if f == Format::Npy { read_npy(path)? } else { read_nifti(path)? };
            let (c, spatial) = split_shape(path, &shape, n, channels)?;
            let data = if f == Format::Nifti && shape.len() == n + 1 {
                // NIfTI keeps channels last: move them first.
                let per: usize = spatial.iter().product();
                let mut out = vec![0.0; data.len()];
                for (i, &v) in data.iter().enumerate() {
                    out[(i % c) * per + i / c] = v;
                }
                out
            } else {
                data
            };
            Ok(Array { channels: c, spatial: spatial.clone(), spatial_before_resize: spatial, data })
        }
        None => Err(err(path, "is not .npy, .nii, .nii.gz, .png, .jpg or .jpeg")),
    }
}

/// A mask resized (nearest) to `spatial`.
fn resize_nearest(a: &Array, spatial: &[usize]) -> Array {
    let (h, w) = (a.spatial[0], a.spatial[1]);
    let (nh, nw) = (spatial[0], spatial[1]);
    let mut data = vec![0.0; a.channels * nh * nw];
    for c in 0..a.channels {
        for y in 0..nh {
            let sy = (y * h / nh).min(h - 1);
            for x in 0..nw {
                let sx = (x * w / nw).min(w - 1);
                data[c * nh * nw + y * nw + x] = a.data[c * h * w + sy * w + sx];
            }
        }
    }
    Array { channels: a.channels, spatial: spatial.to_vec(), spatial_before_resize: a.spatial.clone(), data }
}

/// Per dimension, where the crop starts (positive: into the source) or the source lands
/// (negative: padding before it).
fn crop_offsets(have: &[usize], want: &[usize], rng: &mut StdRng) -> Vec<i64> {
    have.iter()
        .zip(want)
        .map(
            |(&h, &w)| {
                if h >= w { rng.random_range(0..=(h - w)) as i64 } else { -(rng.random_range(0..=(w - h)) as i64) }
            },
        )
        .collect()
}

/// `a` cropped and zero-padded to `want` at `offsets`, `[C, want...]`.
fn fit(a: &Array, want: &[usize], offsets: &[i64]) -> Vec<f32> {
    let per_out: usize = want.iter().product();
    let per_in: usize = a.spatial.iter().product();
    let mut out = vec![0.0; a.channels * per_out];
    let n = want.len();
    let mut idx = vec![0usize; n];
    for o in 0..per_out {
        // Source index of output position `idx`, if inside the source.
        let mut src = 0usize;
        let mut ok = true;
        for d in 0..n {
            let s = idx[d] as i64 + offsets[d];
            if s < 0 || s >= a.spatial[d] as i64 {
                ok = false;
                break;
            }
            src = src * a.spatial[d] + s as usize;
        }
        if ok {
            for c in 0..a.channels {
                out[c * per_out + o] = a.data[c * per_in + src];
            }
        }
        for d in (0..n).rev() {
            idx[d] += 1;
            if idx[d] < want[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// A batch in host memory, one entry per graph input, in the graph's order.
#[derive(Debug)]
pub struct HostBatch {
    pub tensors: Vec<HostTensor>,
}

impl HostBatch {
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.bytes()).sum()
    }
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

impl HostData {
    pub fn bytes(&self) -> u64 {
        match self {
            HostData::F32(v) => v.len() as u64 * 4,
            HostData::I64(v) => v.len() as u64 * 8,
        }
    }
}

struct Queue {
    /// The next batch a worker will start.
    next_to_make: u64,
    /// Batches made and not yet taken, by index.
    ready: BTreeMap<u64, Result<HostBatch, DataError>>,
    /// The next batch the trainer takes.
    taken: u64,
    /// Batches workers have started and not finished: memory the resident set does
    /// not show yet.
    making: u64,
    stop: bool,
}

struct Shared {
    dataset: Arc<Dataset>,
    batch: usize,
    seed: u64,
    /// Run position (in samples) of batch 0.
    start: u64,
    queue: Mutex<Queue>,
    changed: Condvar,
    workers: AtomicUsize,
    prefetch: AtomicUsize,
    /// Whether there is host memory for one more batch; a worker waits while there is
    /// not (the batch the trainer needs next is then made on its own thread).
    room: Room,
}

/// Says whether host memory has room for one more batch, given how many batches other
/// workers are making (started, so promised, but not yet resident): without them,
/// workers that look at the same moment would each see the same room and together
/// overshoot it.
pub type Room = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// How long a waiting worker or trainer sleeps before it looks again.
const POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Shared {
    fn make(&self, k: u64, order: &mut Order) -> Result<HostBatch, DataError> {
        self.dataset.batch(self.start + k * self.batch as u64, self.batch, self.seed, order)
    }

    fn budget(&self) -> u64 {
        (self.workers.load(Ordering::Relaxed) * self.prefetch.load(Ordering::Relaxed)) as u64
    }
}

/// Batches of a data set, made ahead on worker threads.
pub struct Loader {
    /// The epoch order when the trainer's thread makes a batch itself.
    order: Order,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts `workers` threads (0: batches are made when taken) that keep up to
    /// `workers × prefetch` batches of `batch` samples ready, from run position `start`.
    pub fn new(
        dataset: Arc<Dataset>,
        batch: usize,
        seed: u64,
        start: u64,
        workers: usize,
        prefetch: usize,
        room: Room,
    ) -> Loader {
        let shared = Arc::new(Shared {
            dataset,
            batch,
            seed,
            start,
            queue: Mutex::new(Queue { next_to_make: 0, ready: BTreeMap::new(), taken: 0, making: 0, stop: false }),
            changed: Condvar::new(),
            workers: AtomicUsize::new(workers),
            prefetch: AtomicUsize::new(prefetch.max(1)),
            room,
        });
        let threads = (0..workers)
            .map(|id| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("loader-{id}"))
                    .spawn(move || worker(&s, id))
                    .expect("spawning a loader thread")
            })
            .collect();
        Loader { order: None, shared, threads }
    }

    /// The next batch, in order.
    pub fn take(&mut self) -> Result<HostBatch, DataError> {
        let s = &self.shared;
        let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let k = q.taken;
        let mut waited = false;
        loop {
            if let Some(b) = q.ready.remove(&k) {
                q.taken += 1;
                s.changed.notify_all();
                return b;
            }
            if k >= q.next_to_make && (s.workers.load(Ordering::Relaxed) == 0 || waited) {
                // Nobody has started it (no workers, or they wait for memory): make it here.
                q.next_to_make = k + 1;
                q.taken += 1;
                drop(q);
                return s.make(k, &mut self.order);
            }
            s.changed.notify_all();
            let (guard, timeout) = s.changed.wait_timeout(q, POLL).unwrap_or_else(std::sync::PoisonError::into_inner);
            q = guard;
            waited = timeout.timed_out();
        }
    }

    /// (workers, prefetch) in force.
    pub fn setting(&self) -> (usize, usize) {
        (self.shared.workers.load(Ordering::Relaxed), self.shared.prefetch.load(Ordering::Relaxed))
    }

    /// Batches that may be in flight at once.
    pub fn in_flight(&self) -> u64 {
        self.shared.budget()
    }

    /// Lowers the loader's memory: halves `prefetch` down to 1, then `workers` down to
    /// 0. Returns the new setting, or `None` when there is nothing left to lower.
    pub fn reduce(&self) -> Option<(usize, usize)> {
        let s = &self.shared;
        let (w, p) = self.setting();
        if p > 1 {
            s.prefetch.store(p / 2, Ordering::Relaxed);
        } else if w > 0 {
            s.workers.store(w / 2, Ordering::Relaxed);
        } else {
            return None;
        }
        s.changed.notify_all();
        Some(self.setting())
    }
}

fn worker(s: &Shared, id: usize) {
    let mut order: Order = None;
    let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if q.stop {
            return;
        }
        let active = id < s.workers.load(Ordering::Relaxed);
        if active && q.next_to_make < q.taken + s.budget() && (s.room)(q.making) {
            let k = q.next_to_make;
            q.next_to_make += 1;
            q.making += 1;
            drop(q);
            let b = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.make(k, &mut order)))
                .unwrap_or_else(|_| Err(DataError(format!("the loader failed while making batch {k}"))));
            q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            q.making -= 1;
            q.ready.insert(k, b);
            s.changed.notify_all();
        } else {
            // Woken by a change, or after a while to look at memory again.
            q = s.changed.wait_timeout(q, POLL).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            q.stop = true;
            q.ready.clear();
        }
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write_npy(path: &Path, shape: &[u64], data: &[f32]) {
        use npyz::WriterBuilder;
        let mut out = Vec::new();
        {
            let mut w =
                npyz::WriteOptions::<f32>::new().default_dtype().shape(shape).writer(&mut out).begin_nd().expect("npy");
            w.extend(data.iter().copied()).expect("write");
            w.finish().expect("finish");
        }
        std::fs::write(path, out).expect("write npy");
    }

    #[test]
    fn paths_stay_inside_the_root_symlinks_included() {
        let root = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("tmp");
        std::fs::create_dir(root.path().join("ok")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.path().join("escape")).expect("symlink");
        assert!(confine(root.path(), "ok").is_ok());
        let e = confine(root.path(), "escape").expect_err("escapes");
        assert!(e.0.contains("outside the data root"), "{e}");
        assert!(confine(root.path(), "missing").expect_err("missing").0.contains("missing"));
    }

    #[test]
    fn crops_and_pads_land_where_the_offsets_say() {
        let a = Array {
            channels: 1,
            spatial: vec![2, 3],
            spatial_before_resize: vec![2, 3],
            data: (0..6).map(|v| v as f32).collect(),
        };
        // Crop 2x2 starting at column 1.
        assert_eq!(fit(&a, &[2, 2], &[0, 1]), vec![1.0, 2.0, 4.0, 5.0]);
        // Pad to 3x3 with the source one row down.
        assert_eq!(fit(&a, &[3, 3], &[-1, 0]), vec![0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn the_loader_hands_over_batches_in_order_with_any_number_of_workers() {
        let dir = tempfile::tempdir().expect("tmp");
        for c in 0..2 {
            let class = dir.path().join(format!("class{c}"));
            std::fs::create_dir(&class).expect("mkdir");
            for i in 0..5 {
                write_npy(&class.join(format!("{i}.npy")), &[1, 4, 4], &[(c * 10 + i) as f32; 16]);
            }
        }
        let want = Want::Dense { channels: 1, spatial: vec![4, 4], label: LabelKind::Class { classes: 2 } };
        let ds = Arc::new(Dataset::open(dir.path(), dir.path(), None, want).expect("open"));
        assert_eq!(ds.len(), 10);
        let firsts = |workers: usize, prefetch: usize| -> Vec<(f32, i64)> {
            let mut l = Loader::new(Arc::clone(&ds), 3, 7, 0, workers, prefetch, Box::new(|_| true));
            (0..7)
                .flat_map(|_| {
                    let b = l.take().expect("batch");
                    let HostData::F32(x) = &b.tensors[0].data else { panic!("f32") };
                    let HostData::I64(y) = &b.tensors[1].data else { panic!("i64") };
                    (0..3).map(|j| (x[j * 16], y[j])).collect::<Vec<_>>()
                })
                .collect()
        };
        let inline = firsts(0, 1);
        assert_eq!(firsts(3, 2), inline);
        assert_eq!(firsts(1, 4), inline);
        // Every epoch visits each sample once, with its label.
        let mut epoch: Vec<f32> = inline[..10].iter().map(|p| p.0).collect();
        epoch.sort_by(f32::total_cmp);
        assert_eq!(epoch, vec![0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 11.0, 12.0, 13.0, 14.0]);
        assert!(inline.iter().all(|&(v, y)| (v >= 10.0) == (y == 1)));
        // Lowering while running keeps the order.
        let mut l = Loader::new(Arc::clone(&ds), 3, 7, 0, 4, 4, Box::new(|_| true));
        let mut got = Vec::new();
        for i in 0..7 {
            if i == 2 || i == 4 {
                while l.reduce().is_some_and(|(w, _)| w > 0) {}
            }
            let b = l.take().expect("batch");
            let HostData::F32(x) = &b.tensors[0].data else { panic!("f32") };
            got.extend((0..3).map(|j| x[j * 16]));
        }
        assert_eq!(got, inline.iter().map(|p| p.0).collect::<Vec<_>>());
        assert_eq!(l.setting().0, 0);

        // Room for one batch being made at a time, counted across the four workers: each
        // looks with the number the others are making, which never passes one, and is
        // back to 0 once all are made; the batches still come in order.
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s2 = Arc::clone(&seen);
        let mut l = Loader::new(
            Arc::clone(&ds),
            3,
            7,
            0,
            4,
            4,
            Box::new(move |making| {
                s2.fetch_max(making, Ordering::Relaxed);
                making == 0
            }),
        );
        let got: Vec<f32> = (0..7)
            .flat_map(|_| {
                let b = l.take().expect("batch");
                let HostData::F32(x) = &b.tensors[0].data else { panic!("f32") };
                (0..3).map(|j| x[j * 16]).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(got, inline.iter().map(|p| p.0).collect::<Vec<_>>());
        assert!(seen.load(Ordering::Relaxed) <= 1, "{seen:?}");
        let making = |l: &Loader| l.shared.queue.lock().map(|q| q.making).unwrap_or(u64::MAX);
        let t0 = std::time::Instant::now();
        while making(&l) != 0 && t0.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(making(&l), 0, "every batch started was counted finished");
    }

    fn open(root: &Path, dir: &str, manifest: Option<&str>, want: Want) -> Result<Dataset, DataError> {
        Dataset::open(root, &root.join(dir), manifest.map(|m| root.join(m)).as_deref(), want)
    }

    fn f32s(t: &HostTensor) -> &[f32] {
        match &t.data {
            HostData::F32(v) => v,
            HostData::I64(_) => panic!("expected f32"),
        }
    }

    #[test]
    fn nifti_volumes_with_masks_beside_them_are_cropped_together() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("scans");
        std::fs::create_dir(&dir).expect("mkdir");
        // A 6x5x4 volume whose voxel (x, y, z) holds 100x + 10y + z, and a label map of 3
        // classes by x.
        let vol = ndarray::Array3::from_shape_fn((6, 5, 4), |(x, y, z)| (100 * x + 10 * y + z) as f32);
        let lab = ndarray::Array3::from_shape_fn((6, 5, 4), |(x, _, _)| (x % 3) as f32);
        nifti::writer::WriterOptions::new(dir.join("case1.nii.gz")).write_nifti(&vol).expect("write");
        nifti::writer::WriterOptions::new(dir.join("case1_seg.nii.gz")).write_nifti(&lab).expect("write");
        let want =
            |spatial: Vec<usize>| Want::Dense { channels: 1, spatial, label: LabelKind::FloatMap { classes: 3 } };
        let ds = open(root.path(), "scans", None, want(vec![6, 5, 4])).expect("open");
        assert_eq!(ds.len(), 1, "the mask is not a sample");
        let b = ds.batch(0, 1, 1, &mut None).expect("batch");
        assert_eq!(b.tensors[0].shape, vec![1, 1, 6, 5, 4]);
        let x = f32s(&b.tensors[0]);
        // Logical (x, y, z) order, z fastest.
        assert_eq!(&x[..3], &[0.0, 1.0, 2.0]);
        assert_eq!(x[4], 10.0);
        assert_eq!(x[20], 100.0);
        // A 4x4x4 crop: the label moves with the image.
        let ds = open(root.path(), "scans", None, want(vec![4, 4, 4])).expect("open");
        for pos in 0..8 {
            let b = ds.batch(pos, 1, 3, &mut None).expect("batch");
            let (x, y) = (f32s(&b.tensors[0]), f32s(&b.tensors[1]));
            assert_eq!(b.tensors[1].shape, vec![1, 1, 4, 4, 4]);
            for (v, l) in x.iter().zip(y) {
                assert_eq!(((*v as usize) / 100 % 3) as f32, *l);
            }
        }
        // Bigger than the volume: zero padding around it.
        let ds = open(root.path(), "scans", None, want(vec![8, 5, 4])).expect("open");
        let x = ds.batch(0, 1, 3, &mut None).expect("batch");
        assert_eq!(f32s(&x.tensors[0]).iter().filter(|&&v| v == 0.0).count(), 2 * 20 + 1);
        // A mask of the wrong size is named with its input.
        let small = ndarray::Array3::<f32>::zeros((6, 5, 3));
        nifti::writer::WriterOptions::new(dir.join("case1_seg.nii.gz")).write_nifti(&small).expect("write");
        let e = open(root.path(), "scans", None, want(vec![4, 4, 4])).expect_err("mismatch");
        assert!(e.0.contains("case1_seg.nii.gz") && e.0.contains("case1.nii.gz"), "{e}");
        // Without masks a segmentation model says what it needs.
        std::fs::remove_file(dir.join("case1_seg.nii.gz")).expect("rm");
        let e = open(root.path(), "scans", None, want(vec![4, 4, 4])).expect_err("no mask");
        assert!(e.0.contains("case1_mask"), "{e}");
    }

    #[test]
    fn images_in_class_folders_are_resized_cropped_and_converted() {
        let root = tempfile::tempdir().expect("tmp");
        for (c, name) in ["cats", "dogs"].iter().enumerate() {
            let d = root.path().join("pets").join(name);
            std::fs::create_dir_all(&d).expect("mkdir");
            // Gray 40x20 images, bright for dogs.
            let img = image::GrayImage::from_pixel(40, 20, image::Luma([if c == 0 { 10 } else { 250 }]));
            img.save(d.join("a.png")).expect("png");
            let rgb = image::RgbImage::from_pixel(30, 30, image::Rgb([0, 0, 255]));
            image::DynamicImage::ImageRgb8(rgb).save(d.join("b.jpg")).expect("jpg");
        }
        let want = Want::Dense { channels: 3, spatial: vec![16, 16], label: LabelKind::Class { classes: 2 } };
        let ds = open(root.path(), "pets", None, want).expect("open");
        assert_eq!(ds.len(), 4);
        let b = ds.batch(0, 4, 5, &mut None).expect("batch");
        assert_eq!(b.tensors[0].shape, vec![4, 3, 16, 16]);
        let HostData::I64(y) = &b.tensors[1].data else { panic!("labels") };
        let x = f32s(&b.tensors[0]);
        for (j, &label) in y.iter().enumerate() {
            let sample = &x[j * 768..(j + 1) * 768];
            let (r, blue) = (sample[0], sample[2 * 256]);
            // Every value in [0, 1]; gray is replicated, blue stays blue.
            assert!(sample.iter().all(|v| (0.0..=1.0).contains(v)));
            if r > 0.5 || blue < 0.5 {
                assert!((r - blue).abs() < 1e-6, "a gray image has equal channels");
                assert_eq!(label == 1, r > 0.5);
            } else {
                assert!(r < 0.1 && blue > 0.9, "the blue JPEG");
            }
        }
        // A model with 2 channels cannot take images.
        let two = Want::Dense { channels: 2, spatial: vec![16, 16], label: LabelKind::Class { classes: 2 } };
        let ds = open(root.path(), "pets", None, two).expect("headers pass");
        assert!(ds.batch(0, 1, 0, &mut None).expect_err("2 channels").0.contains("1 or 3 channels"));
        // Three class folders for a two-class model.
        std::fs::create_dir_all(root.path().join("pets/owls")).expect("mkdir");
        image::GrayImage::new(8, 8).save(root.path().join("pets/owls/o.png")).expect("png");
        let want = Want::Dense { channels: 3, spatial: vec![16, 16], label: LabelKind::Class { classes: 2 } };
        let e = open(root.path(), "pets", None, want).expect_err("3 classes");
        assert!(e.0.contains("o.png") && e.0.contains("class 2"), "{e}");
    }

    #[test]
    fn manifests_label_arrays_and_bad_entries_are_named() {
        let root = tempfile::tempdir().expect("tmp");
        let d = root.path().join("arrays");
        std::fs::create_dir(&d).expect("mkdir");
        for i in 0..3 {
            write_npy(&d.join(format!("s{i}.npy")), &[2, 3, 3], &[i as f32; 18]);
        }
        let want = || Want::Dense { channels: 2, spatial: vec![3, 3], label: LabelKind::Class { classes: 3 } };
        std::fs::write(root.path().join("labels.csv"), "input,label\ns0.npy,2\ns1.npy,0\ns2.npy,1\n").expect("csv");
        let ds = open(root.path(), "arrays", Some("labels.csv"), want()).expect("csv");
        let b = ds.batch(0, 3, 0, &mut None).expect("batch");
        let HostData::I64(y) = &b.tensors[1].data else { panic!("labels") };
        let x = f32s(&b.tensors[0]);
        for j in 0..3 {
            let expected = [2, 0, 1][x[j * 18] as usize];
            assert_eq!(y[j], expected);
        }
        std::fs::write(root.path().join("labels.json"), r#"{"s0.npy": 1, "s1.npy": 1}"#).expect("json");
        assert_eq!(open(root.path(), "arrays", Some("labels.json"), want()).expect("json").len(), 2);
        let cases: [(&str, &str, &str); 6] = [
            ("bad.csv", "file,class\ns0.npy,1\n", "needs the columns input and label"),
            ("bad.json", r#"[{"input": "../escape.npy", "label": 1}]"#, "without '..'"),
            ("big.json", r#"{"s0.npy": 7}"#, "has class 7"),
            ("gone.json", r#"{"missing.npy": 0}"#, "missing.npy"),
            ("neg.json", r#"{"s0.npy": -1}"#, "not a class number"),
            ("labels.txt", "s0.npy 1", "a .csv or .json"),
        ];
        for (name, text, needle) in cases {
            std::fs::write(root.path().join(name), text).expect("write");
            let e = open(root.path(), "arrays", Some(name), want()).expect_err(name);
            assert!(e.0.contains(needle), "{name}: {e}");
        }
        // Wrong channels and wrong rank name the file.
        let one = Want::Dense { channels: 1, spatial: vec![3, 3], label: LabelKind::Class { classes: 3 } };
        let e = open(root.path(), "arrays", Some("labels.csv"), one).expect_err("channels");
        assert!(e.0.contains("s0.npy") && e.0.contains("has 2 channels; the model takes 1"), "{e}");
        let vol = Want::Dense { channels: 1, spatial: vec![3, 3, 3, 3], label: LabelKind::Class { classes: 3 } };
        assert!(
            open(root.path(), "arrays", Some("labels.csv"), vol).expect_err("rank").0.contains("spatial dimensions")
        );
        std::fs::write(d.join("s0.npy"), b"not numpy").expect("write");
        let e = open(root.path(), "arrays", Some("labels.csv"), want()).expect_err("damaged");
        assert!(e.0.contains("s0.npy") && e.0.contains("not a .npy file"), "{e}");
        // An empty folder says what it looked for.
        std::fs::create_dir(root.path().join("empty")).expect("mkdir");
        assert!(open(root.path(), "empty", None, want()).expect_err("empty").0.contains("holds no"));
    }

    #[test]
    fn token_files_give_windows_of_the_sequence_length() {
        use npyz::WriterBuilder;
        let root = tempfile::tempdir().expect("tmp");
        let d = root.path().join("text");
        std::fs::create_dir(&d).expect("mkdir");
        let mut out = Vec::new();
        {
            let mut w = npyz::WriteOptions::<i32>::new()
                .default_dtype()
                .shape(&[100])
                .writer(&mut out)
                .begin_nd()
                .expect("npy");
            w.extend(0..100).expect("write");
            w.finish().expect("finish");
        }
        std::fs::write(d.join("stream.npy"), out).expect("write");
        let ds = open(root.path(), "text", None, Want::Tokens { seq: 16, vocab: 1000 }).expect("open");
        let b = ds.batch(0, 4, 9, &mut None).expect("batch");
        let HostData::I64(ids) = &b.tensors[0].data else { panic!("ids") };
        for w in ids.chunks(16) {
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "a contiguous window: {w:?}");
        }
        assert!(
            open(root.path(), "text", None, Want::Tokens { seq: 200, vocab: 1000 })
                .expect_err("short")
                .0
                .contains("holds 100 tokens")
        );
        let ds = open(root.path(), "text", None, Want::Tokens { seq: 16, vocab: 50 }).expect("open");
        assert!((0..20).any(|p| ds.batch(p, 1, 0, &mut None).is_err_and(|e| e.0.contains("vocabulary is 50"))));
    }

    #[test]
    fn mask_images_keep_their_label_values_at_8_and_16_bits_and_colour_masks_are_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let d = root.path().join("seg");
        std::fs::create_dir(&d).expect("mkdir");
        image::GrayImage::from_pixel(8, 8, image::Luma([40])).save(d.join("a.png")).expect("png");
        // Class 3 everywhere, stored as 16-bit: a rescaling reader would make it 0.
        image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_pixel(8, 8, image::Luma([3]))
            .save(d.join("a_mask.png"))
            .expect("png");
        let want = Want::Dense { channels: 1, spatial: vec![8, 8], label: LabelKind::IndexMap { classes: 4 } };
        let ds = open(root.path(), "seg", None, want.clone()).expect("open");
        let b = ds.batch(0, 1, 0, &mut None).expect("batch");
        let HostData::I64(y) = &b.tensors[1].data else { panic!("labels") };
        assert!(y.iter().all(|&c| c == 3), "{y:?}");
        image::RgbImage::new(8, 8).save(d.join("a_mask.png")).expect("png");
        let ds = open(root.path(), "seg", None, want).expect("headers pass");
        let e = ds.batch(0, 1, 0, &mut None).expect_err("colour");
        assert!(e.0.contains("a_mask.png") && e.0.contains("gray"), "{e}");
    }
    #[test]
    fn synthetic_vessels_are_thin_curves_that_cross_from_the_left_edge() {
        let (b, h, w) = (3, 256, 256);
        let m = vessels(b, h, w, 11);
        for s in 0..b {
            let mask = &m[s * h * w..(s + 1) * h * w];
            let fraction = mask.iter().sum::<f32>() / (h * w) as f32;
            assert!((0.005..0.2).contains(&fraction), "sample {s}: {fraction} of the image is vessel");
            assert!((0..h).any(|y| mask[y * w] == 1.0), "sample {s} starts at the left edge");
            assert!(mask.iter().all(|&v| v == 0.0 || v == 1.0));
        }
        assert_eq!(vessels(1, 64, 64, 5), vessels(1, 64, 64, 5), "seeded");
    }
}
