//! Models the user brings: a `torch.export` program (`.pt2`), read without its weights
//! and without running anything, turned into the same [`crate::graph::Graph`] the zoo
//! builds, so that the estimator, the advisor and the trainer take it as they take a zoo
//! model.
//!
//! Reading is pure and in two steps ([`zip`]): the end of the file names the entries,
//! then only `models/model.json` is read ([`program`]). The file is untrusted: sizes,
//! counts, nesting and names are checked against explicit limits, nothing is unpickled
//! (`data/sample_inputs/*.pt` is never opened). [`lower`] turns each ATen node into the
//! graph's primitives for any micro-batch (the batch stays symbolic; other dynamic
//! dimensions become model keys), checking every shape against the file's own.

pub mod expr;
pub mod lower;
pub mod program;
pub mod weights;
pub mod zip;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use expr::Expr;

/// The largest `models/model.json` read.
pub const MAX_GRAPH_JSON: u64 = 256 << 20;
/// Nodes in one exported graph.
pub const MAX_NODES: usize = 100_000;

/// A model read from a `.pt2` file: its graph's structure and sizes, no weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Imported {
    /// The file's name, for messages and the plan's title.
    pub name: String,
    /// The export schema's (major, minor) version.
    pub schema: (u32, u32),
    /// The dynamic dimensions: the batch, and any other the export made dynamic.
    pub symbols: Vec<Symbol>,
    /// Every tensor of the graph with its dtype and sizes.
    pub tensors: Vec<TensorMeta>,
    pub params: Vec<ParamSpec>,
    /// The user's tensor inputs (indexes into `tensors`), in order.
    pub inputs: Vec<u32>,
    /// The tensor the loss reads.
    pub output: u32,
    pub nodes: Vec<ImportedNode>,
    /// Module paths; entry 0 is the root.
    pub modules: Vec<Module>,
}

/// A dynamic dimension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Symbol {
    /// The export's own name (`s77`).
    pub name: String,
    /// `batch`, or the model key that sets it (`input_ids_1`: input `input_ids`'s
    /// dimension 1); empty for a symbol no input dimension names.
    pub key: String,
    /// The size the model was exported with.
    pub hint: i64,
    pub min: i64,
    pub max: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    pub name: String,
    /// torch.export's `ScalarType` code (7: float32, 5: int64, 12: bool).
    pub dtype: u32,
    pub shape: Vec<Expr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind {
    Parameter,
    Buffer,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// The module path (`layer1.0.conv1.weight`).
    pub fqn: String,
    pub tensor: u32,
    pub kind: ParamKind,
    /// Another name of an earlier parameter's tensor (tied weights: a language model's
    /// output projection and its token embedding), as the file's weights share storage.
    pub alias_of: Option<u32>,
}

/// One ATen call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportedNode {
    /// `aten.conv2d.default`.
    pub op: String,
    /// Arguments by their schema names.
    pub args: Vec<(String, Arg)>,
    /// The tensors it makes (`None` for an output that is not a tensor).
    pub outputs: Vec<Option<u32>>,
    /// Its innermost module (index into `modules`).
    pub module: u32,
    /// The user's source line (`model.py:42`).
    pub source: String,
    /// The node's name in the export.
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Arg {
    None,
    Tensor(u32),
    Tensors(Vec<u32>),
    OptTensors(Vec<Option<u32>>),
    Int(Expr),
    Ints(Vec<Expr>),
    Float(f64),
    Floats(Vec<f64>),
    Bool(bool),
    Bools(Vec<bool>),
    Str(String),
    Dtype(u32),
    /// An argument kind the importer does not read (named in errors).
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Module {
    pub path: String,
    /// The module's Python class (`torch.nn.modules.conv.Conv2d`).
    pub class: String,
    pub parent: Option<u32>,
}

/// An op the importer does not take: where it first occurs and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unknown {
    pub op: String,
    pub node: String,
    pub module: String,
    pub source: String,
    pub count: usize,
}

impl std::fmt::Display for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let module = if self.module.is_empty() { "the top-level module" } else { &self.module };
        write!(f, "{} ({}x; first at node {}, module {module}", self.op, self.count, self.node)?;
        if !self.source.is_empty() {
            write!(f, ", {}", self.source)?;
        }
        write!(f, ")")
    }
}

/// Why a file cannot be imported. Each names what is wrong.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ImportError {
    #[error("model file: {0}")]
    Zip(String),
    #[error("model file: {what} of {size} bytes is over the limit of {limit}")]
    TooLarge { what: String, size: u64, limit: u64 },
    #[error("model file: {0}")]
    Format(String),
    #[error(
        "model file: torch.export schema version {major}.{minor}; Headroom reads version {}.x (PyTorch 2.6 to 2.11): export it again with a supported PyTorch",
        program::SCHEMA_MAJOR
    )]
    Version { major: u32, minor: u32 },
    #[error("model file: {0}")]
    Unsupported(String),
    #[error("model file: {} operator(s) Headroom does not model yet, so no estimate would be whole: {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    UnknownOps(Vec<Unknown>),
}

impl Imported {
    /// Checks that every index the model holds points inside it: an import made here
    /// always does, but one that arrives in a plan or a share link is untrusted.
    pub fn check(&self) -> Result<(), ImportError> {
        let bad = |why: &str| Err(ImportError::Format(format!("the model's description is damaged: {why}")));
        let t = self.tensors.len() as u32;
        if self.nodes.len() > MAX_NODES
            || self.symbols.len() > program::MAX_SYMBOLS
            || self.tensors.len() > 4 * MAX_NODES
        {
            return bad("too many nodes, sizes or tensors");
        }
        if self.inputs.is_empty() || self.inputs.iter().any(|&i| i >= t) || self.output >= t {
            return bad("an input or the output is not one of its tensors");
        }
        if self.tensors.iter().any(|m| m.shape.len() > 8) {
            return bad("a tensor of more than 8 dimensions");
        }
        for (i, p) in self.params.iter().enumerate() {
            if p.tensor >= t || p.alias_of.is_some_and(|a| a as usize >= i) {
                return bad("a parameter that is not one of its tensors");
            }
        }
        let modules = self.modules.len() as u32;
        // A module's parent comes before it (so the table has no cycles), as a file
        // import builds it.
        if modules == 0
            || self.modules.len() > 4 * MAX_NODES
            || self.modules.iter().enumerate().any(|(i, m)| m.parent.is_some_and(|p| p as usize >= i))
        {
            return bad("a module outside the module table");
        }
        if self.params.len() > 4 * MAX_NODES {
            return bad("too many parameters");
        }
        let syms = self.symbols.len() as u32;
        if self.tensors.iter().any(|m| !m.shape.iter().all(|e| expr_symbols_below(e, syms))) {
            return bad("a size names a dynamic dimension it does not have");
        }
        if self.symbols.iter().any(|s| s.min > s.max) {
            return bad("a dynamic size whose range is empty");
        }
        for n in &self.nodes {
            let args_ok = n.args.iter().all(|(_, a)| match a {
                Arg::Tensor(x) => *x < t,
                Arg::Tensors(xs) => xs.iter().all(|&x| x < t),
                Arg::OptTensors(xs) => xs.iter().flatten().all(|&x| x < t),
                _ => true,
            });
            if !args_ok || n.module >= modules || n.outputs.iter().flatten().any(|&o| o >= t) {
                return bad("a node refers to a tensor or module it does not have");
            }
        }
        Ok(())
    }
}

/// Whether every symbol `e` reads is below `n`.
fn expr_symbols_below(e: &Expr, n: u32) -> bool {
    match e {
        Expr::Int(_) => true,
        Expr::Sym(s) => *s < n,
        Expr::Add(xs) | Expr::Mul(xs) | Expr::Min(xs) | Expr::Max(xs) => xs.iter().all(|x| expr_symbols_below(x, n)),
        Expr::FloorDiv(a, b) | Expr::CeilDiv(a, b) | Expr::Mod(a, b) => {
            expr_symbols_below(a, n) && expr_symbols_below(b, n)
        }
        Expr::Pow(a, _) => expr_symbols_below(a, n),
    }
}

/// The entry of a `.pt2` archive that holds the graph.
pub const GRAPH_ENTRY: &str = "models/model.json";

/// Imports a whole `.pt2` file held in memory; `name` is the file's name.
pub fn open(bytes: &[u8], name: &str) -> Result<Imported, ImportError> {
    let dir = zip::Directory::of(bytes)?;
    let read = |e: &zip::Entry, limit: u64| -> Result<Vec<u8>, ImportError> {
        let (at, len) = e.span(bytes.len() as u64);
        e.read(&bytes[at as usize..(at + len) as usize], limit)
    };
    let json = read(graph_entry(&dir)?, MAX_GRAPH_JSON)?;
    let weights = match dir.find(weights::WEIGHTS_CONFIG)? {
        Some(e) => Some(read(e, weights::MAX_CONFIG_BYTES)?),
        None => None,
    };
    from_parts(&json, weights.as_deref(), name)
}

/// The graph's entry in an archive's directory (read the file's bytes `entry.span()`
/// and hand them to `entry.read`, then [`from_graph`]).
pub fn graph_entry(dir: &zip::Directory) -> Result<&zip::Entry, ImportError> {
    dir.find(GRAPH_ENTRY)?.ok_or_else(|| {
        ImportError::Format(format!(
            "no {GRAPH_ENTRY} in the archive: not a torch.export file (torch.export.save writes one; TorchScript and state_dict files are not exported programs)"
        ))
    })
}

/// An import from the graph entry's text.
pub fn from_graph(json: &[u8], name: &str) -> Result<Imported, ImportError> {
    from_parts(json, None, name)
}

/// An import from the graph entry's text and, when the file has one, its weights
/// configuration (`weights::WEIGHTS_CONFIG`, a small entry): parameters whose weights
/// share one storage are one tensor (tied weights), as PyTorch holds them.
pub fn from_parts(json: &[u8], weights_config: Option<&[u8]>, name: &str) -> Result<Imported, ImportError> {
    let mut imported = program::read(json, name, lower::known)?;
    // Estimating needs no weight, so a configuration this importer would not load (a
    // pickled weight, say) only leaves tied weights undetected.
    if let Some(stored) = weights_config.and_then(|text| weights::read(text, "data/weights").ok()) {
        // One tensor: the same storage viewed the same way.
        let view_of: std::collections::HashMap<&str, &weights::Stored> =
            stored.iter().map(|s| (s.fqn.as_str(), s)).collect();
        let mut first: Vec<(&weights::Stored, u32)> = Vec::new();
        for (i, p) in imported.params.iter_mut().enumerate() {
            let Some(&view) = view_of.get(p.fqn.as_str()) else { continue };
            let same = |k: &weights::Stored| {
                k.entry == view.entry
                    && k.sizes == view.sizes
                    && k.strides == view.strides
                    && k.offset == view.offset
                    && k.dtype == view.dtype
            };
            match first.iter().find(|(k, _)| same(k)) {
                Some(&(_, j)) => p.alias_of = Some(j),
                None => first.push((view, i as u32)),
            }
        }
    }
    lower::name_symbols(&mut imported)?;
    Ok(imported)
}

#[cfg(test)]
mod tests;
