//! A data set on disk: its samples listed and checked (files, masks beside them,
//! manifests, class folders, token files) and batches read from them in epoch order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shared::graph::Graph;

use super::fit::*;
use super::formats::*;
use super::synthetic::*;
use super::*;

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Label {
    None,
    Class(u64),
    Mask(PathBuf),
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct Sample {
    pub(super) input: PathBuf,
    pub(super) label: Label,
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

/// A worker's cache of the current epoch's sample order.
pub type Order = Option<(u64, Vec<u32>)>;

/// Files of a supported format directly in `dir`, sorted, resolved inside `root`.
pub(super) fn files_in(root: &Path, dir: &Path) -> Result<Vec<PathBuf>, DataError> {
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
pub(super) fn masks_by_input(files: &[PathBuf]) -> BTreeMap<(PathBuf, String), PathBuf> {
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
pub(super) fn read_manifest(path: &Path) -> Result<Vec<(String, serde_json::Value)>, DataError> {
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
pub(super) fn manifest_path(root: &Path, dir: &Path, manifest: &Path, rel: &str) -> Result<PathBuf, DataError> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|p| p == "..") {
        return Err(err(manifest, format!("'{rel}' must be a path relative to the data folder, without '..'")));
    }
    inside(root, &dir.join(rel))
}

/// The shape of a file as stored, read from its header only.
pub(super) fn header_shape(path: &Path) -> Result<Vec<usize>, DataError> {
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
pub(super) fn split_shape(
    path: &Path,
    shape: &[usize],
    n: usize,
    want_channels: usize,
) -> Result<(usize, Vec<usize>), DataError> {
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
        let shapes = graph
            .inputs
            .iter()
            .map(|&(v, _)| graph.values[v].shape.iter().skip(1).map(|&d| d as usize).collect())
            .collect();
        let want = Want::Synthetic { shapes, recipes: shared::synthetic::of_graph(graph) };
        Dataset { root: PathBuf::new(), samples: Vec::new(), want, tokens: Vec::new() }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.samples.len()
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
            Want::Synthetic { shapes, recipes } => Ok(synthetic_batch(shapes, recipes, batch, seed ^ start)),
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
