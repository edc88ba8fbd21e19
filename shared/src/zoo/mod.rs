//! The model zoo: parameterised architectures in the style of their reference
//! implementations (torchvision, timm, MONAI, open_clip, Hugging Face), built as
//! [`crate::graph::Graph`]s. Parameter counts equal the references exactly; the fixture
//! `shared/fixtures/reference_params.json` (from `scripts/reference_params.py`) checks it.
//!
//! Keys are named as in the reference constructors (`feature_size`, `num_res_units`,
//! `n_layer`…); `image` (one size or H,W), `volume` (D,H,W) and `seq` set input sizes.

mod cnn;
mod help;
pub mod losses;
mod transformer;
mod unet;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use thiserror::Error;

use crate::graph::{Checkpoint, Graph, GraphError};

pub use cnn::{mlp_graph, small_cnn_graph};
pub use losses::{LossKind, LossSpec};

/// What a graph is built for besides its model settings: the loss it trains with and the
/// checkpointing mode (Hugging Face turns its key/value cache off under checkpointing).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BuildOptions {
    pub loss: LossSpec,
    pub checkpoint: Checkpoint,
    /// Segmentation: the surface (boundary) term's weight, when the loss has one
    /// (`distance_loss_every`): see `losses::surface_term`.
    pub surface: Option<f64>,
}

impl Default for BuildOptions {
    fn default() -> BuildOptions {
        BuildOptions { loss: LossSpec::default(), checkpoint: Checkpoint::Off, surface: None }
    }
}

/// A TorchScript module the user brings (`file=…`): trained by the agent, measured
/// rather than estimated, so not among the described [`MODELS`].
pub const SCRIPT: &str = "torchscript";

/// The model name of a plan whose model is a file the user exported (`torch.export`).
pub const IMPORTED: &str = "file";

/// Every model the zoo can build.
pub const MODELS: [&str; 12] = [
    "mlp",
    "small_cnn",
    "resnet18",
    "resnet34",
    "resnet50",
    "seresnext50_32x4d",
    "vit",
    "unet2d",
    "unet3d",
    "swin_unetr",
    "clip",
    "gpt2",
];

/// Limits on zoo settings, each named in the error that enforces it.
pub mod limits {
    /// Widths, channels, embedding sizes.
    pub const MAX_WIDTH: u64 = 1 << 16;
    /// Layers, blocks, residual units.
    pub const MAX_DEPTH: u64 = 256;
    pub const MAX_IMAGE: u64 = 16_384;
    pub const MAX_VOLUME: u64 = 1_024;
    pub const MAX_SEQ: u64 = 131_072;
    pub const MAX_VOCAB: u64 = 1 << 22;
    pub const MAX_CLASSES: u64 = 1_000_000;
    /// Nodes in one graph: bounds the estimator's and the trainer's work.
    pub const MAX_NODES: usize = 200_000;
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ZooError {
    #[error("unknown model '{0}'; known models: {list}", list = MODELS.join(", "))]
    UnknownModel(String),
    #[error("{model}: unknown key '{key}'; known keys: {known}")]
    UnknownKey { model: String, key: String, known: String },
    #[error("{key}: {reason}")]
    Value { key: String, reason: String },
    #[error("model: {0}")]
    Graph(#[from] GraphError),
}

/// `key=value` settings for one model, with a record of which keys the builder read so
/// that an unknown key is an error rather than silently ignored.
pub struct Settings<'a> {
    map: &'a BTreeMap<String, String>,
    read: RefCell<BTreeSet<String>>,
    /// Every key the builder read, with its kind and default, in reading order: the
    /// model's parameter schema (see [`schema`]).
    record: RefCell<Vec<(String, Kind, String)>>,
}

/// What a model key takes, as its builder reads it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A whole number in `min..=max`.
    Int {
        min: u64,
        max: u64,
    },
    /// A number in `min..=max`.
    Number {
        min: f64,
        max: f64,
    },
    Bool,
    /// One of these words.
    Choice {
        allowed: Vec<&'static str>,
    },
    /// Comma-separated whole numbers, each in `min..=max`.
    List {
        min: u64,
        max: u64,
    },
    /// `n` sizes (or one, repeated), each in `1..=max`.
    Sizes {
        n: usize,
        max: u64,
    },
    /// Free text (a name, a device, a size with its unit).
    Text,
}

fn value_err(key: &str, reason: impl Into<String>) -> ZooError {
    ZooError::Value { key: key.to_owned(), reason: reason.into() }
}

fn parse_u64(key: &str, text: &str) -> Result<u64, ZooError> {
    text.trim().parse::<u64>().map_err(|_| value_err(key, format!("expected a whole number, got '{text}'")))
}

impl<'a> Settings<'a> {
    pub fn new(map: &'a BTreeMap<String, String>) -> Settings<'a> {
        Settings { map, read: RefCell::new(BTreeSet::new()), record: RefCell::new(Vec::new()) }
    }

    fn raw(&self, key: &str) -> Option<&'a str> {
        self.read.borrow_mut().insert(key.to_owned());
        self.map.get(key).map(String::as_str)
    }

    fn note(&self, key: &str, kind: Kind, default: String) {
        let mut record = self.record.borrow_mut();
        if !record.iter().any(|(k, _, _)| k == key) {
            record.push((key.to_owned(), kind, default));
        }
    }

    /// A whole number in `min..=max`.
    pub fn u64(&self, key: &str, default: u64, min: u64, max: u64) -> Result<u64, ZooError> {
        self.note(key, Kind::Int { min, max }, default.to_string());
        let v = match self.raw(key) {
            Some(t) => parse_u64(key, t)?,
            None => default,
        };
        if v < min || v > max {
            return Err(value_err(key, format!("must be between {min} and {max}, got {v}")));
        }
        Ok(v)
    }

    pub fn f64(&self, key: &str, default: f64, min: f64, max: f64) -> Result<f64, ZooError> {
        self.note(key, Kind::Number { min, max }, default.to_string());
        let v = match self.raw(key) {
            Some(t) => t.trim().parse::<f64>().map_err(|_| value_err(key, format!("expected a number, got '{t}'")))?,
            None => default,
        };
        if !(v.is_finite() && v >= min && v <= max) {
            return Err(value_err(key, format!("must be between {min} and {max}, got {v}")));
        }
        Ok(v)
    }

    /// A comma-separated list of whole numbers, each in `min..=max`.
    pub fn list(&self, key: &str, default: &[u64], min: u64, max: u64) -> Result<Vec<u64>, ZooError> {
        self.note(key, Kind::List { min, max }, join(default));
        let v = match self.raw(key) {
            Some(t) => t.split(',').map(|p| parse_u64(key, p)).collect::<Result<Vec<_>, _>>()?,
            None => default.to_vec(),
        };
        if let Some(bad) = v.iter().find(|&&x| x < min || x > max) {
            return Err(value_err(key, format!("each entry must be between {min} and {max}, got {bad}")));
        }
        Ok(v)
    }

    /// A text setting (a file name, say), trimmed.
    pub fn text(&self, key: &str, default: &str) -> Result<String, ZooError> {
        self.note(key, Kind::Text, default.to_owned());
        Ok(self.raw(key).map_or_else(|| default.to_owned(), |v| v.trim().to_owned()))
    }

    /// `true`/`false` (also 1/0, yes/no, on/off).
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ZooError> {
        self.note(key, Kind::Bool, default.to_string());
        match self.raw(key).map(str::trim) {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(t) => Err(value_err(key, format!("expected true or false, got '{t}'"))),
        }
    }

    /// One of `allowed` words (the first is the default).
    pub fn choice(&self, key: &str, allowed: &[&'static str]) -> Result<&'static str, ZooError> {
        self.note(key, Kind::Choice { allowed: allowed.to_vec() }, allowed[0].to_owned());
        match self.raw(key).map(str::trim) {
            None => Ok(allowed[0]),
            Some(t) => allowed
                .iter()
                .copied()
                .find(|a| *a == t)
                .ok_or_else(|| value_err(key, format!("expected {}, got '{t}'", allowed.join(" or ")))),
        }
    }

    /// A list of exactly `n` entries, or one entry repeated `n` times (`image=224`).
    pub fn sizes(&self, key: &str, default: u64, n: usize, max: u64) -> Result<Vec<u64>, ZooError> {
        self.note(key, Kind::Sizes { n, max }, default.to_string());
        let v = self.list(key, &[default], 1, max)?;
        match v.len() {
            1 => Ok(vec![v[0]; n]),
            len if len == n => Ok(v),
            len => Err(value_err(key, format!("expected 1 or {n} sizes, got {len}"))),
        }
    }

    pub(crate) fn unknown(&self, model: &str) -> Option<ZooError> {
        let read = self.read.borrow();
        let key = self.map.keys().find(|k| !read.contains(*k))?;
        let known: Vec<&str> = read.iter().map(String::as_str).collect();
        Some(ZooError::UnknownKey {
            model: model.to_owned(),
            key: crate::units::clip(key, crate::units::QUOTED_BYTES).into_owned(),
            known: known.join(", "),
        })
    }
}

/// Builds zoo model `name` for a micro-batch of `batch` samples.
pub fn build(
    name: &str,
    settings: &BTreeMap<String, String>,
    batch: u64,
    opts: &BuildOptions,
) -> Result<Graph, ZooError> {
    build_with(name, &Settings::new(settings), batch, opts)
}

/// A model key as the page, the CLI and the link codec describe it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Param {
    pub key: String,
    pub kind: Kind,
    /// The default as text, as a `--set` value would be written.
    pub default: String,
    pub unit: &'static str,
    pub help: &'static str,
}

/// Model `name`'s keys with their kinds, defaults, units and help, read off its builder
/// (so a new model has a schema without a second list to keep in step). Keys a builder
/// reads only under another key's value are not listed; every key it reads by default is.
pub fn schema(name: &str) -> Result<Vec<Param>, ZooError> {
    let empty = BTreeMap::new();
    let s = Settings::new(&empty);
    build_with(name, &s, 1, &BuildOptions::default())?;
    let record = s.record.into_inner();
    Ok(record
        .into_iter()
        .map(|(key, kind, default)| {
            let (unit, help) = help::of(&key);
            Param { key, kind, default, unit, help }
        })
        .collect())
}

/// Whole numbers as a comma-separated setting (`16,32`).
pub(crate) fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn build_with(name: &str, s: &Settings<'_>, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let o = opts;
    let graph = match name {
        "mlp" => cnn::mlp(s, batch, o)?,
        "small_cnn" => cnn::small_cnn(s, batch, o)?,
        "resnet18" => cnn::resnet(s, batch, cnn::ResNet::Basic([2, 2, 2, 2]), o)?,
        "resnet34" => cnn::resnet(s, batch, cnn::ResNet::Basic([3, 4, 6, 3]), o)?,
        "resnet50" => {
            cnn::resnet(s, batch, cnn::ResNet::Bottleneck { layers: [3, 4, 6, 3], groups: 1, width: 64, se: false }, o)?
        }
        "seresnext50_32x4d" => {
            cnn::resnet(s, batch, cnn::ResNet::Bottleneck { layers: [3, 4, 6, 3], groups: 32, width: 4, se: true }, o)?
        }
        "vit" => transformer::vit(s, batch, o)?,
        "clip" => transformer::clip(s, batch, o)?,
        "gpt2" => transformer::gpt2(s, batch, o)?,
        "unet2d" => unet::unet(s, batch, 2, o)?,
        "unet3d" => unet::unet(s, batch, 3, o)?,
        "swin_unetr" => unet::swin_unetr(s, batch, o)?,
        // Not in MODELS: it trains in the agent but has no description to estimate.
        SCRIPT => cnn::torchscript(s, batch, o)?,
        other => return Err(ZooError::UnknownModel(other.to_owned())),
    };
    if let Some(err) = s.unknown(name) {
        return Err(err);
    }
    if graph.nodes.len() > limits::MAX_NODES {
        return Err(value_err(
            "model",
            format!("{} operations exceed the limit of {}", graph.nodes.len(), limits::MAX_NODES),
        ));
    }
    Ok(graph)
}

#[cfg(test)]
mod tests;
