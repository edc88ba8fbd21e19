//! An [`Imported`] model as a [`Graph`] for one micro-batch: each ATen node becomes the
//! graph's primitive (one entry of [`OPS`] per ATen op, which is also the coverage
//! table), every output's shape is checked against the file's, and the plan's loss is
//! appended to the model's output.

use std::collections::BTreeMap;

use super::expr::Expr;
use super::{Arg, ImportError, Imported, ImportedNode, ParamKind};
use crate::graph::{Builder, DType, Graph, Init, InputKind, Op, ParamId, Task, ValueId};
use crate::zoo::{BuildOptions, LossKind, Settings, ZooError, losses};

type Lower = fn(&mut L<'_>, &ImportedNode) -> Result<Vec<ValueId>, String>;

/// Every ATen op the importer takes: its name in the export, the graph primitive it
/// becomes (as `docs/own-models.md` lists it) and its lowering.
const OPS: &[(&str, &str, Lower)] = &[
    ("aten.conv1d.default", "conv", conv),
    ("aten.conv2d.default", "conv", conv),
    ("aten.conv3d.default", "conv", conv),
    ("aten.conv1d.padding", "conv", conv),
    ("aten.conv2d.padding", "conv", conv),
    ("aten.conv3d.padding", "conv", conv),
    ("aten.conv_transpose1d.default", "conv_transpose", conv_transpose),
    ("aten.conv_transpose2d.input", "conv_transpose", conv_transpose),
    ("aten.conv_transpose3d.input", "conv_transpose", conv_transpose),
    ("aten.linear.default", "linear", linear),
    ("aten.matmul.default", "matmul", matmul),
    ("aten.batch_norm.default", "batch_norm", batch_norm),
    ("aten.layer_norm.default", "layer_norm", layer_norm),
    ("aten.embedding.default", "embedding", embedding),
    ("aten.relu.default", "relu", act),
    ("aten.relu_.default", "relu_", act),
    ("aten.leaky_relu.default", "leaky_relu", act),
    ("aten.leaky_relu_.default", "leaky_relu_", act),
    ("aten.gelu.default", "gelu", act),
    ("aten.silu.default", "silu", act),
    ("aten.silu_.default", "silu_", act),
    ("aten.hardswish.default", "hardswish", act),
    ("aten.hardswish_.default", "hardswish_", act),
    ("aten.hardsigmoid.default", "hardsigmoid", act),
    ("aten.hardsigmoid_.default", "hardsigmoid_", act),
    ("aten.sigmoid.default", "sigmoid", act),
    ("aten.tanh.default", "tanh", act),
    ("aten.add.Tensor", "add / add_scalar", arith),
    ("aten.add_.Tensor", "add_", arith),
    ("aten.sub.Tensor", "sub / add_scalar", arith),
    ("aten.mul.Tensor", "mul / mul_scalar", arith),
    ("aten.div.Tensor", "div / mul_scalar", arith),
    ("aten.rsub.Scalar", "rsub_scalar", arith),
    ("aten.mean.dim", "mean", reduce),
    ("aten.mean.default", "mean", reduce),
    ("aten.sum.dim_IntList", "sum", reduce),
    ("aten.sum.default", "sum", reduce),
    ("aten.softmax.int", "softmax", softmax),
    ("aten.log_softmax.int", "log_softmax", softmax),
    ("aten.dropout.default", "dropout", dropout),
    ("aten.dropout_.default", "dropout_", dropout),
    ("aten.view.default", "view", reshape),
    ("aten._unsafe_view.default", "view", reshape),
    ("aten.reshape.default", "reshape", reshape),
    ("aten.flatten.using_ints", "reshape", reshape),
    ("aten.unflatten.int", "view", reshape),
    ("aten.permute.default", "permute", views),
    ("aten.transpose.int", "transpose", views),
    ("aten.t.default", "transpose", views),
    ("aten.unsqueeze.default", "unsqueeze", views),
    ("aten.squeeze.dim", "squeeze", views),
    ("aten.expand.default", "expand", views),
    ("aten.select.int", "select", views),
    ("aten.slice.Tensor", "slice", views),
    ("aten.contiguous.default", "contiguous", views),
    ("aten.clone.default", "clone", views),
    ("aten.split.Tensor", "split", split),
    ("aten.chunk.default", "split", split),
    ("aten.unbind.int", "split + squeeze", split),
    ("aten.cat.default", "cat", cat),
    ("aten.max_pool1d.default", "max_pool", pool),
    ("aten.max_pool2d.default", "max_pool", pool),
    ("aten.max_pool3d.default", "max_pool", pool),
    ("aten.avg_pool1d.default", "avg_pool", pool),
    ("aten.avg_pool2d.default", "avg_pool", pool),
    ("aten.avg_pool3d.default", "avg_pool", pool),
    ("aten.adaptive_avg_pool1d.default", "mean (output size 1)", pool),
    ("aten.adaptive_avg_pool2d.default", "mean (output size 1)", pool),
    ("aten.adaptive_avg_pool3d.default", "mean (output size 1)", pool),
    ("aten.scaled_dot_product_attention.default", "attention", attention),
    ("aten.arange.default", "arange", arange),
    ("aten.hardtanh.default", "hardtanh", act),
    ("aten.hardtanh_.default", "hardtanh_", act),
    ("aten.upsample_nearest1d.vec", "upsample_nearest", upsample),
    ("aten.upsample_nearest2d.vec", "upsample_nearest", upsample),
    ("aten.upsample_nearest3d.vec", "upsample_nearest", upsample),
    ("aten.upsample_linear1d.vec", "upsample_linear", upsample),
    ("aten.upsample_bilinear2d.vec", "upsample_linear", upsample),
    ("aten.upsample_trilinear3d.vec", "upsample_linear", upsample),
    ("aten.alias.default", "(the input itself)", alias),
    ("aten.gather.default", "gather", gather),
    ("aten.eq.Scalar", "eq", compare),
    ("aten.ne.Scalar", "ne", compare),
    ("aten.lt.Scalar", "lt", compare),
    ("aten.le.Scalar", "le", compare),
    ("aten.gt.Scalar", "gt", compare),
    ("aten.ge.Scalar", "ge", compare),
];

/// The op coverage table: each ATen op the importer takes and the graph primitive it
/// becomes.
pub fn coverage() -> impl Iterator<Item = (&'static str, &'static str)> {
    OPS.iter().map(|(op, primitive, _)| (*op, *primitive))
}

/// Whether the importer takes this ATen op.
pub fn known(op: &str) -> bool {
    OPS.iter().any(|(name, ..)| *name == op)
}

/// An exported model's graph for a micro-batch of `batch` samples; `settings` hold its
/// dynamic sizes other than the batch.
pub fn build_checked(
    model: &Imported,
    settings: &BTreeMap<String, String>,
    batch: u64,
    opts: &BuildOptions,
) -> Result<Graph, ZooError> {
    model.check().map_err(|e| ZooError::Value { key: "model".into(), reason: e.to_string() })?;
    let s = Settings::new(settings);
    let graph = build(model, &s, batch, opts)?;
    if let Some(err) = s.unknown(&model.name) {
        return Err(err);
    }
    if graph.nodes.len() > crate::zoo::limits::MAX_NODES {
        return Err(ZooError::Value {
            key: "model".into(),
            reason: format!("{} operations exceed the limit of {}", graph.nodes.len(), crate::zoo::limits::MAX_NODES),
        });
    }
    Ok(graph)
}

/// An exported model's keys (its dynamic sizes other than the batch), described as a zoo
/// model's are.
pub fn schema(model: &Imported) -> Vec<crate::zoo::Param> {
    keys(model)
        .into_iter()
        .map(|(key, default, min, max)| crate::zoo::Param {
            key: key.to_owned(),
            kind: crate::zoo::Kind::Int { min: min as u64, max: max as u64 },
            default: default.to_string(),
            unit: "",
            help: "A dynamic dimension of the exported model's input (`<input>_<dim>`).",
        })
        .collect()
}

/// Limits on an imported model's dynamic sizes.
pub const MAX_DYNAMIC: i64 = 1 << 20;
/// The largest dimension and element count of any tensor of an imported graph.
pub const MAX_DIM: u64 = 1 << 31;
pub const MAX_ELEMENTS: u64 = 1 << 40;

/// Names the dynamic dimensions: the first input's first dimension is the batch; any
/// other input dimension that is a bare symbol becomes the key `<input>_<dim>`.
pub fn name_symbols(m: &mut Imported) -> Result<(), ImportError> {
    let first = &m.tensors[m.inputs[0] as usize];
    match first.shape.first() {
        Some(Expr::Sym(s)) => m.symbols[*s as usize].key = "batch".into(),
        Some(Expr::Int(_)) => {}
        _ => {
            return Err(ImportError::Unsupported(
                "the first input's batch dimension is an expression, not a dimension of its own".into(),
            ));
        }
    }
    for &t in &m.inputs {
        let meta = &m.tensors[t as usize];
        for (d, e) in meta.shape.iter().enumerate() {
            if let Expr::Sym(s) = e
                && m.symbols[*s as usize].key.is_empty()
            {
                let key: String =
                    format!("{}_{d}", meta.name).chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                m.symbols[*s as usize].key = key;
            }
        }
    }
    if let Some(s) = m.symbols.iter().find(|s| s.key.is_empty()) {
        return Err(ImportError::Unsupported(format!(
            "the dynamic size {} belongs to no input dimension, so it cannot be set",
            s.name
        )));
    }
    Ok(())
}

/// The model's keys: each dynamic dimension but the batch, with its export size as the
/// default.
pub fn keys(m: &Imported) -> Vec<(&str, i64, i64, i64)> {
    m.symbols
        .iter()
        .filter(|s| s.key != "batch")
        .map(|s| {
            let min = s.min.clamp(1, MAX_DYNAMIC);
            let max = s.max.clamp(min, MAX_DYNAMIC);
            (s.key.as_str(), s.hint.clamp(min, max), min, max)
        })
        .collect()
}

struct L<'a> {
    m: &'a Imported,
    b: Builder,
    syms: Vec<i64>,
    vals: Vec<Option<ValueId>>,
    params: Vec<Option<ParamId>>,
}

fn int_of(e: &Expr, syms: &[i64]) -> Result<i64, String> {
    e.eval(syms).ok_or_else(|| format!("a size that overflows or divides by zero ({e:?})"))
}

impl L<'_> {
    fn arg<'n>(&self, n: &'n ImportedNode, name: &str) -> Option<&'n Arg> {
        n.args.iter().find(|(k, _)| k == name).map(|(_, a)| a)
    }

    fn tensor_of(&mut self, t: u32) -> Result<ValueId, String> {
        if let Some(v) = self.vals[t as usize] {
            return Ok(v);
        }
        if let Some(p) = self.params[t as usize] {
            return Ok(self.b.param_value(p));
        }
        Err(format!("reads {} before anything makes it", self.m.tensors[t as usize].name))
    }

    /// A tensor argument as a value (a parameter is read where it is used).
    fn t(&mut self, n: &ImportedNode, name: &str) -> Result<ValueId, String> {
        match self.arg(n, name) {
            Some(Arg::Tensor(t)) => self.tensor_of(*t),
            _ => Err(format!("argument {name} is not a tensor")),
        }
    }

    /// A parameter argument (absent or `None`: `Ok(None)`).
    fn p(&self, n: &ImportedNode, name: &str) -> Result<Option<ParamId>, String> {
        match self.arg(n, name) {
            None | Some(Arg::None) => Ok(None),
            Some(Arg::Tensor(t)) => self.params[*t as usize].map(Some).ok_or_else(|| {
                format!(
                    "argument {name} is computed in the forward pass, not a parameter of the model (not modelled yet)"
                )
            }),
            Some(_) => Err(format!("argument {name} is not a tensor")),
        }
    }

    fn int(&self, n: &ImportedNode, name: &str, default: i64) -> Result<i64, String> {
        match self.arg(n, name) {
            None | Some(Arg::None) => Ok(default),
            Some(Arg::Int(e)) => int_of(e, &self.syms),
            Some(Arg::Ints(v)) if v.len() == 1 => int_of(&v[0], &self.syms),
            Some(_) => Err(format!("argument {name} is not a whole number")),
        }
    }

    fn ints(&self, n: &ImportedNode, name: &str) -> Result<Vec<i64>, String> {
        match self.arg(n, name) {
            None | Some(Arg::None) => Ok(Vec::new()),
            Some(Arg::Int(e)) => Ok(vec![int_of(e, &self.syms)?]),
            Some(Arg::Ints(v)) => v.iter().map(|e| int_of(e, &self.syms)).collect(),
            Some(_) => Err(format!("argument {name} is not a list of whole numbers")),
        }
    }

    fn float(&self, n: &ImportedNode, name: &str, default: f64) -> Result<f64, String> {
        match self.arg(n, name) {
            None | Some(Arg::None) => Ok(default),
            Some(Arg::Float(f)) => Ok(*f),
            Some(Arg::Int(e)) => Ok(int_of(e, &self.syms)? as f64),
            Some(_) => Err(format!("argument {name} is not a number")),
        }
    }

    fn flag(&self, n: &ImportedNode, name: &str, default: bool) -> Result<bool, String> {
        match self.arg(n, name) {
            None | Some(Arg::None) => Ok(default),
            Some(Arg::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("argument {name} is not true or false")),
        }
    }

    fn sizes_of(&self, v: &[i64]) -> Result<Vec<u64>, String> {
        v.iter().map(|&d| u64::try_from(d).map_err(|_| format!("a negative size {d}"))).collect()
    }

    fn rank(&self, v: ValueId) -> usize {
        self.b.shape(v).len()
    }

    /// A dimension index, negative ones counted from the end.
    fn dim(&self, v: ValueId, d: i64, extra: usize) -> Result<usize, String> {
        let r = (self.rank(v) + extra) as i64;
        let d = if d < 0 { d + r } else { d };
        if d < 0 || d >= r {
            return Err(format!("dimension {d} is out of range for {:?}", self.b.shape(v)));
        }
        Ok(d as usize)
    }
}

fn gerr(e: crate::graph::GraphError) -> String {
    e.reason
}

/// One value for every spatial dimension: `[k]` or `[k, k, …]`.
fn uniform(what: &str, v: &[i64], nd: usize, default: i64) -> Result<u64, String> {
    let v = if v.is_empty() { vec![default] } else { v.to_vec() };
    if v.iter().any(|&x| x != v[0]) || (v.len() != 1 && v.len() != nd) {
        return Err(format!("{what} {v:?} differs between dimensions (only equal {what}s are modelled yet)"));
    }
    u64::try_from(v[0]).map_err(|_| format!("a negative {what}"))
}

fn conv(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "input")?;
    let w = l.p(n, "weight")?.ok_or("a convolution without a weight")?;
    let nd = l.rank(x).saturating_sub(2);
    let kernel = l.b.param_spec(w).shape.get(2).copied().unwrap_or(1);
    let stride = uniform("stride", &l.ints(n, "stride")?, nd, 1)?;
    if uniform("dilation", &l.ints(n, "dilation")?, nd, 1)? != 1 {
        return Err("dilated convolutions are not modelled yet".into());
    }
    let padding = match l.arg(n, "padding") {
        Some(Arg::Str(s)) if s == "valid" => 0,
        Some(Arg::Str(s)) if s == "same" => {
            if stride != 1 || kernel % 2 == 0 {
                return Err("padding='same' with an even kernel or a stride is not modelled yet".into());
            }
            (kernel - 1) / 2
        }
        _ => uniform("padding", &l.ints(n, "padding")?, nd, 0)?,
    };
    let groups = l.int(n, "groups", 1)?.max(1) as u64;
    let mut params = vec![w];
    params.extend(l.p(n, "bias")?);
    l.b.conv_with(x, params, stride, padding, groups).map(|v| vec![v]).map_err(gerr)
}

fn conv_transpose(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "input")?;
    let w = l.p(n, "weight")?.ok_or("a transposed convolution without a weight")?;
    let nd = l.rank(x).saturating_sub(2);
    if l.int(n, "groups", 1)? != 1 || uniform("dilation", &l.ints(n, "dilation")?, nd, 1)? != 1 {
        return Err("grouped or dilated transposed convolutions are not modelled yet".into());
    }
    let stride = uniform("stride", &l.ints(n, "stride")?, nd, 1)?;
    let padding = uniform("padding", &l.ints(n, "padding")?, nd, 0)?;
    let output_padding = uniform("output_padding", &l.ints(n, "output_padding")?, nd, 0)?;
    let mut params = vec![w];
    params.extend(l.p(n, "bias")?);
    l.b.conv_transpose_with(x, params, stride, padding, output_padding).map(|v| vec![v]).map_err(gerr)
}

fn linear(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "input")?;
    let w = l.p(n, "weight")?.ok_or("a linear layer without a weight")?;
    let mut params = vec![w];
    params.extend(l.p(n, "bias")?);
    let bias = params.len() > 1;
    l.b.linear_with(x, params, bias).map(|v| vec![v]).map_err(gerr)
}

fn matmul(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let a = l.t(n, "self")?;
    let b = l.t(n, "other")?;
    l.b.matmul(a, b).map(|v| vec![v]).map_err(gerr)
}

fn batch_norm(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "input")?;
    if !l.flag(n, "training", true)? {
        return Err("batch norm in eval mode inside training (frozen statistics) is not modelled yet".into());
    }
    let names = ["weight", "bias", "running_mean", "running_var"];
    let mut params = Vec::new();
    for name in names {
        params.push(l.p(n, name)?.ok_or_else(|| {
            format!("batch norm without {name} (affine=False or track_running_stats=False) is not modelled yet")
        })?);
    }
    // `num_batches_tracked` sits beside the running mean.
    let mean = &l.b.param_spec(params[2]).name;
    let tracked = format!("{}num_batches_tracked", mean.strip_suffix("running_mean").unwrap_or(""));
    if let Some(p) = (0..l.m.params.len()).find(|&i| l.m.params[i].fqn == tracked) {
        params.extend(l.params[l.m.params[p].tensor as usize]);
    }
    let eps = l.float(n, "eps", 1e-5)?;
    l.b.batch_norm_with(x, params, eps).map(|v| vec![v]).map_err(gerr)
}

fn layer_norm(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "input")?;
    let shape = l.ints(n, "normalized_shape")?;
    if shape.len() != 1 {
        return Err(format!("layer norm over {} dimensions (only the last is modelled yet)", shape.len()));
    }
    let mut params = Vec::new();
    params.extend(l.p(n, "weight")?);
    params.extend(l.p(n, "bias")?);
    if params.len() == 1 {
        return Err("layer norm with a weight and no bias is not modelled yet".into());
    }
    let eps = l.float(n, "eps", 1e-5)?;
    l.b.layer_norm_with(x, params, eps).map(|v| vec![v]).map_err(gerr)
}

fn embedding(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let table = l.t(n, "weight")?;
    let ids = l.t(n, "indices")?;
    if l.b.dtype(ids) != DType::I64 {
        return Err("embedding indices that are not int64".into());
    }
    if l.b.shape(table).len() != 2 {
        return Err(format!("an embedding table of shape {:?} (expects [rows, dim])", l.b.shape(table)));
    }
    Ok(vec![l.b.embedding_with(ids, table)])
}

fn act(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let inplace = n.op.contains("_.");
    let op = match n.op.split('.').nth(1).unwrap_or("").trim_end_matches('_') {
        "relu" => Op::Relu { inplace },
        "leaky_relu" => {
            let slope = l.float(n, "negative_slope", 0.01)?;
            if (slope - 0.01).abs() > 1e-12 {
                return Err(format!("leaky_relu with slope {slope} (only 0.01 is modelled yet)"));
            }
            Op::LeakyRelu { inplace }
        }
        "gelu" => Op::Gelu { tanh: matches!(l.arg(n, "approximate"), Some(Arg::Str(s)) if s == "tanh") },
        "silu" => Op::Silu { inplace },
        "hardswish" => Op::Hardswish { inplace },
        "hardsigmoid" => Op::Hardsigmoid { inplace },
        "hardtanh" => {
            let (min, max) = (l.float(n, "min_val", -1.0)?, l.float(n, "max_val", 1.0)?);
            if !matches!((min, max), (0.0, 6.0) | (-1.0, 1.0)) {
                return Err(format!("hardtanh between {min} and {max} (ReLU6's 0 and 6, or -1 and 1, are modelled)"));
            }
            Op::Hardtanh { min, max, inplace }
        }
        "sigmoid" => Op::Sigmoid,
        "tanh" => Op::Tanh,
        other => return Err(format!("activation {other}")),
    };
    Ok(vec![l.b.unary(op, x)])
}

/// `add`, `sub`, `mul`, `div` of two tensors or a tensor and a number, `add_`, `rsub`.
fn arith(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let name = n.op.split('.').nth(1).unwrap_or("");
    // `num_batches_tracked += 1`: a counter in place, no memory.
    if name == "add_"
        && let Some(Arg::Tensor(t)) = l.arg(n, "self")
        && let Some(p) = l.params[*t as usize]
    {
        if l.b.param_spec(p).shape.is_empty() && l.b.param_spec(p).dtype == DType::I64 {
            return Ok(Vec::new());
        }
        return Err("updates a parameter or buffer in place (not modelled yet)".into());
    }
    let x = l.t(n, "self")?;
    let alpha = l.float(n, "alpha", 1.0)?;
    let other = l.arg(n, "other").cloned();
    match other {
        Some(Arg::Tensor(t)) => {
            let y = l.tensor_of(t)?;
            let y = if alpha != 1.0 { l.b.mul_scalar(y, alpha) } else { y };
            let out = match name {
                "add" => l.b.add(x, y),
                "add_" => l.b.add_inplace(x, y),
                "sub" => l.b.sub(x, y),
                "mul" => l.b.mul(x, y),
                "div" => l.b.div(x, y),
                other => return Err(format!("{other} of two tensors")),
            };
            out.map(|v| vec![v]).map_err(gerr)
        }
        Some(Arg::Float(_) | Arg::Int(_)) => {
            let s = l.float(n, "other", 0.0)?;
            Ok(vec![match name {
                "add" => l.b.add_scalar(x, s * alpha),
                "sub" => l.b.add_scalar(x, -s * alpha),
                "mul" => l.b.mul_scalar(x, s),
                "div" => l.b.mul_scalar(x, 1.0 / s),
                "rsub" => {
                    if alpha != 1.0 {
                        return Err("rsub with alpha".into());
                    }
                    l.b.rsub_scalar(x, s)
                }
                other => return Err(format!("{other} with a number (not modelled yet)")),
            }])
        }
        _ => Err("the second operand is neither a tensor nor a number".into()),
    }
}

fn reduce(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    if !matches!(l.arg(n, "dtype"), None | Some(Arg::None)) {
        return Err("a reduction with a dtype (not modelled yet)".into());
    }
    let dims: Vec<usize> = match l.arg(n, "dim") {
        None | Some(Arg::None) => (0..l.rank(x)).collect(),
        _ => l.ints(n, "dim")?.iter().map(|&d| l.dim(x, d, 0)).collect::<Result<_, _>>()?,
    };
    let dims = if dims.is_empty() { (0..l.rank(x)).collect() } else { dims };
    let keepdim = l.flag(n, "keepdim", false)?;
    Ok(vec![if n.op.starts_with("aten.mean") { l.b.mean(x, dims, keepdim) } else { l.b.sum(x, dims, keepdim) }])
}

fn softmax(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    if !matches!(l.arg(n, "dtype"), None | Some(Arg::None)) {
        return Err("softmax with a dtype (not modelled yet)".into());
    }
    let d = l.dim(x, l.int(n, "dim", -1)?, 0)?;
    Ok(vec![if n.op.starts_with("aten.log_") { l.b.log_softmax(x, d) } else { l.b.softmax(x, d) }])
}

fn dropout(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    // `dropout(input, …)`, `dropout_(self, …)`.
    let x = l.t(n, if n.op.contains("dropout_") { "self" } else { "input" })?;
    let p = l.float(n, "p", 0.5)?;
    if !l.flag(n, "train", true)? || p <= 0.0 {
        return Ok(vec![x]);
    }
    if n.op.contains("dropout_") {
        return Ok(vec![l.b.unary(Op::Dropout { p, inplace: true }, x)]);
    }
    Ok(vec![l.b.dropout(x, p)])
}

/// A target shape with at most one `-1`, resolved against `numel`.
fn infer(shape: &[i64], numel: u64) -> Result<Vec<u64>, String> {
    let known = shape
        .iter()
        .filter(|&&d| d != -1)
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("the shape {shape:?} overflows"))?;
    shape
        .iter()
        .map(|&d| match d {
            -1 if known > 0 => Ok(numel / known as u64),
            d if d >= 0 => Ok(d as u64),
            _ => Err(format!("cannot infer the shape {shape:?}")),
        })
        .collect()
}

fn reshape(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let s = l.b.shape(x).to_vec();
    let numel = crate::graph::numel(&s);
    let target = match n.op.as_str() {
        "aten.flatten.using_ints" => {
            let a = l.dim(x, l.int(n, "start_dim", 0)?, 0)?;
            let b = l.dim(x, l.int(n, "end_dim", -1)?, 0)?;
            if a >= b {
                return Ok(vec![x]);
            }
            let mut t = s[..a].to_vec();
            t.push(crate::graph::numel(&s[a..=b]));
            t.extend(&s[b + 1..]);
            t
        }
        "aten.unflatten.int" => {
            let d = l.dim(x, l.int(n, "dim", 0)?, 0)?;
            let sizes = infer(&l.ints(n, "sizes")?, s[d])?;
            let mut t = s[..d].to_vec();
            t.extend(sizes);
            t.extend(&s[d + 1..]);
            t
        }
        "aten.reshape.default" => infer(&l.ints(n, "shape")?, numel)?,
        _ => infer(&l.ints(n, "size")?, numel)?,
    };
    let out = if matches!(n.op.as_str(), "aten.reshape.default" | "aten.flatten.using_ints") {
        l.b.reshape(x, target)
    } else {
        l.b.view(x, target)
    };
    out.map(|v| vec![v]).map_err(gerr)
}

fn views(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let s = l.b.shape(x).to_vec();
    let v = match n.op.as_str() {
        "aten.permute.default" => {
            let dims = l.ints(n, "dims")?.iter().map(|&d| l.dim(x, d, 0)).collect::<Result<_, _>>()?;
            l.b.permute(x, dims).map_err(gerr)?
        }
        "aten.transpose.int" => {
            let (a, b) = (l.dim(x, l.int(n, "dim0", 0)?, 0)?, l.dim(x, l.int(n, "dim1", 1)?, 0)?);
            l.b.transpose(x, a, b)
        }
        "aten.t.default" => {
            if s.len() < 2 {
                return Ok(vec![x]);
            }
            l.b.transpose(x, 0, 1)
        }
        "aten.unsqueeze.default" => {
            let d = l.dim(x, l.int(n, "dim", 0)?, 1)?;
            l.b.unsqueeze(x, d)
        }
        "aten.squeeze.dim" => {
            let d = l.dim(x, l.int(n, "dim", 0)?, 0)?;
            l.b.squeeze(x, d)
        }
        "aten.expand.default" => {
            let size = l.ints(n, "size")?;
            let off = size.len().saturating_sub(s.len());
            let target = size
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d == -1 && i >= off {
                        Ok(s[i - off])
                    } else {
                        u64::try_from(d).map_err(|_| "a negative size".to_owned())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            l.b.expand(x, target).map_err(gerr)?
        }
        "aten.select.int" => {
            let d = l.dim(x, l.int(n, "dim", 0)?, 0)?;
            let i = l.int(n, "index", 0)?;
            let i = if i < 0 { i + s[d] as i64 } else { i };
            if i < 0 || i as u64 >= s[d] {
                return Err(format!("index {i} is out of range for size {}", s[d]));
            }
            l.b.select(x, d, i as u64)
        }
        "aten.slice.Tensor" => {
            let d = l.dim(x, l.int(n, "dim", 0)?, 0)?;
            let size = s[d] as i64;
            let clamp = |v: i64| if v < 0 { (v + size).max(0) } else { v.min(size) };
            let start = clamp(l.int(n, "start", 0)?);
            let end = clamp(l.int(n, "end", size)?);
            let step = l.int(n, "step", 1)?;
            if step < 1 {
                return Err("a slice step below 1".into());
            }
            let len = if end > start { (end - start - 1) / step + 1 } else { 0 };
            if start == 0 && len == size && step == 1 {
                return Ok(vec![x]);
            }
            l.b.slice(x, d, start as u64, len as u64, step as u64)
        }
        "aten.contiguous.default" => l.b.contiguous(x),
        _ => l.b.clone_value(x),
    };
    Ok(vec![v])
}

fn split(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let d = l.dim(x, l.int(n, "dim", 0)?, 0)?;
    let size = l.b.shape(x)[d];
    let made = n.outputs.len() as u64;
    if n.op == "aten.unbind.int" {
        if size != made {
            return Err(format!("unbinds {size} pieces, the file lists {made}"));
        }
        // One autograd node whose backward stacks the gradients, as split's concatenates
        // them: pieces of one, each with the dimension squeezed away (a view).
        let pieces = l.b.split(x, d, 1).map_err(gerr)?;
        return Ok(pieces.into_iter().map(|p| l.b.squeeze(p, d)).collect());
    }
    let piece = if n.op == "aten.chunk.default" {
        let chunks = l.int(n, "chunks", 1)?.max(1) as u64;
        size.div_ceil(chunks)
    } else {
        l.int(n, "split_size", 1)?.max(1) as u64
    };
    if size.div_ceil(piece) != made {
        return Err(format!("splits into {} pieces, the file lists {made}", size.div_ceil(piece)));
    }
    l.b.split(x, d, piece).map_err(gerr)
}

fn cat(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let Some(Arg::Tensors(ts)) = l.arg(n, "tensors").cloned() else {
        return Err("cat of something that is not a list of tensors".into());
    };
    let xs = ts.iter().map(|&t| l.tensor_of(t)).collect::<Result<Vec<_>, _>>()?;
    let first = *xs.first().ok_or("cat of no tensors")?;
    let d = l.dim(first, l.int(n, "dim", 0)?, 0)?;
    l.b.cat(xs, d).map(|v| vec![v]).map_err(gerr)
}

fn pool(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let nd = l.rank(x).saturating_sub(2);
    if n.op.starts_with("aten.adaptive_avg_pool") {
        let out = l.ints(n, "output_size")?;
        if out.iter().any(|&o| o != 1) {
            return Err(format!("adaptive average pooling to {out:?} (only to size 1, a mean, is modelled yet)"));
        }
        // ATen computes an output of size 1 as a mean over the spatial dimensions.
        let dims = (l.rank(x) - nd..l.rank(x)).collect();
        return Ok(vec![l.b.mean(x, dims, true)]);
    }
    let kernel = uniform("kernel_size", &l.ints(n, "kernel_size")?, nd, 1)?;
    let stride_v = l.ints(n, "stride")?;
    let stride = if stride_v.is_empty() { kernel } else { uniform("stride", &stride_v, nd, 1)? };
    let padding = uniform("padding", &l.ints(n, "padding")?, nd, 0)?;
    if l.flag(n, "ceil_mode", false)? {
        return Err("pooling with ceil_mode=True is not modelled yet".into());
    }
    if n.op.starts_with("aten.max_pool") {
        if uniform("dilation", &l.ints(n, "dilation")?, nd, 1)? != 1 {
            return Err("dilated max pooling is not modelled yet".into());
        }
        return l.b.max_pool(x, kernel, stride, padding).map(|v| vec![v]).map_err(gerr);
    }
    if !l.flag(n, "count_include_pad", true)? || !matches!(l.arg(n, "divisor_override"), None | Some(Arg::None)) {
        return Err("average pooling without count_include_pad or with a divisor is not modelled yet".into());
    }
    l.b.avg_pool(x, kernel, stride, padding).map(|v| vec![v]).map_err(gerr)
}

fn attention(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let q = l.t(n, "query")?;
    let k = l.t(n, "key")?;
    let v = l.t(n, "value")?;
    let mask = match l.arg(n, "attn_mask") {
        None | Some(Arg::None) => None,
        Some(_) => Some(l.t(n, "attn_mask")?),
    };
    if mask.is_some_and(|m| l.b.dtype(m) == DType::I64) {
        return Err("an integer attention mask (SDPA takes boolean or float masks)".into());
    }
    if l.flag(n, "enable_gqa", false)? {
        return Err("grouped-query attention inside SDPA (enable_gqa) is not modelled yet".into());
    }
    let causal = l.flag(n, "is_causal", false)?;
    let dropout = l.float(n, "dropout_p", 0.0)?;
    let scale = match l.arg(n, "scale") {
        None | Some(Arg::None) => None,
        _ => Some(l.float(n, "scale", 1.0)?),
    };
    l.b.attention(q, k, v, mask, causal, dropout, scale).map(|v| vec![v]).map_err(gerr)
}

fn upsample(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "input")?;
    let s = l.b.shape(x).to_vec();
    if !(3..=5).contains(&s.len()) {
        return Err(format!("interpolating {s:?} (expects [B, C, ...] with 1 to 3 spatial dims)"));
    }
    let nd = s.len() - 2;
    let linear = !n.op.contains("nearest");
    let align = l.flag(n, "align_corners", false)?;
    let scales: Vec<f64> = match l.arg(n, "scale_factors") {
        Some(Arg::Floats(v)) => v.clone(),
        _ => Vec::new(),
    };
    let given = l.ints(n, "output_size")?;
    let size: Vec<u64> = if !given.is_empty() {
        l.sizes_of(&given)?
    } else if scales.len() == nd {
        // ATen's `compute_output_size`: floor(size * scale).
        s[2..].iter().zip(&scales).map(|(&d, &f)| (d as f64 * f).floor() as u64).collect()
    } else {
        return Err("an interpolation with neither sizes nor a scale per dimension".into());
    };
    l.b.upsample(x, linear, align, size, scales).map(|v| vec![v]).map_err(gerr)
}

/// `aten.alias`: the same tensor under another name (no copy, no node).
fn alias(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    Ok(vec![l.t(n, "self")?])
}

fn arange(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    if !matches!(l.arg(n, "dtype"), None | Some(Arg::None) | Some(Arg::Dtype(5))) {
        return Err("arange of a dtype other than int64 (not modelled yet)".into());
    }
    let end = l.int(n, "end", 0)?;
    let end = u64::try_from(end).map_err(|_| format!("arange to {end}"))?;
    Ok(vec![l.b.arange(end)])
}

fn gather(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let idx = l.t(n, "index")?;
    if l.flag(n, "sparse_grad", false)? {
        return Err("gather with sparse_grad (not modelled yet)".into());
    }
    let d = l.dim(x, l.int(n, "dim", 0)?, 0)?;
    l.b.gather(x, d, idx).map(|v| vec![v]).map_err(gerr)
}

fn compare(l: &mut L<'_>, n: &ImportedNode) -> Result<Vec<ValueId>, String> {
    let x = l.t(n, "self")?;
    let s = l.float(n, "other", 0.0)?;
    let word = n.op.split('.').nth(1).unwrap_or("");
    let cmp = crate::graph::Cmp::from_word(word).ok_or_else(|| format!("comparison {word}"))?;
    Ok(vec![l.b.compare_scalar(x, cmp, s)])
}

fn graph_dtype(code: u32) -> Option<DType> {
    match code {
        7 => Some(DType::F32),
        5 => Some(DType::I64),
        12 => Some(DType::Bool),
        _ => None,
    }
}

/// A parameter's initial values when the file's weights are not used (`init=random`):
/// PyTorch's defaults for the layer kinds these shapes come from.
fn default_init(fqn: &str, shape: &[u64]) -> Init {
    let leaf = fqn.rsplit('.').next().unwrap_or("");
    match (shape.len(), leaf) {
        (0 | 1, "running_var") => Init::Const(1.0),
        (0 | 1, "weight") => Init::Const(1.0),
        (0 | 1, _) => Init::Const(0.0),
        _ => Init::Uniform(1.0 / (crate::graph::numel(&shape[1..]).max(1) as f64).sqrt()),
    }
}

fn value_err(reason: String) -> ZooError {
    ZooError::Value { key: "model".into(), reason }
}

/// The graph of `m` for a micro-batch of `batch`, its other dynamic sizes from
/// `settings` (each key's default is the export's size), with the plan's loss.
pub fn build(m: &Imported, s: &Settings<'_>, batch: u64, opts: &BuildOptions) -> Result<Graph, ZooError> {
    let mut syms = vec![0i64; m.symbols.len()];
    for (i, sym) in m.symbols.iter().enumerate() {
        syms[i] = if sym.key == "batch" {
            if (batch as i64) < sym.min || batch as i64 > sym.max {
                return Err(value_err(format!("the export allows a batch of {} to {}, not {batch}", sym.min, sym.max)));
            }
            batch as i64
        } else {
            let (_, default, min, max) = keys(m).into_iter().find(|k| k.0 == sym.key).unwrap_or(("", 1, 1, 1));
            s.u64(&sym.key, default as u64, min as u64, max as u64)? as i64
        };
    }
    let task = match opts.loss.kind {
        LossKind::TokenCe | LossKind::CausalLm => {
            let out = &m.tensors[m.output as usize];
            let vocab = out.shape.last().and_then(|e| e.eval(&syms)).unwrap_or(0) as u64;
            Task::LanguageModel { vocab }
        }
        _ => {
            let out = &m.tensors[m.output as usize];
            let classes = out.shape.get(1).and_then(|e| e.eval(&syms)).unwrap_or(1) as u64;
            if out.shape.len() > 2 { Task::Segment { classes } } else { Task::Classify { classes } }
        }
    };
    let mut l =
        L { m, b: Builder::new(task), syms, vals: vec![None; m.tensors.len()], params: vec![None; m.tensors.len()] };
    let shape_at = |l: &L<'_>, t: u32| -> Result<Vec<u64>, String> {
        let meta = &m.tensors[t as usize];
        let shape: Vec<u64> = meta
            .shape
            .iter()
            .map(|e| int_of(e, &l.syms).and_then(|d| u64::try_from(d).map_err(|_| format!("a negative size {d}"))))
            .collect::<Result<_, _>>()?;
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        if shape.iter().any(|&d| d > MAX_DIM) || elements.is_none_or(|e| e > MAX_ELEMENTS) {
            return Err(format!(
                "tensor {} of shape {shape:?} is over the limits ({MAX_DIM} per dimension, {MAX_ELEMENTS} elements)",
                crate::units::clip(&meta.name, 80)
            ));
        }
        Ok(shape)
    };
    let ctx = |n: &ImportedNode, m: &Imported, why: String| {
        let module = &m.modules[n.module as usize].path;
        let module = if module.is_empty() { "the top-level module" } else { module };
        let at = if n.source.is_empty() { String::new() } else { format!(", {}", n.source) };
        value_err(format!("{} at node {} (module {module}{at}): {why}", n.op, n.name))
    };
    for p in &m.params {
        if let Some(first) = p.alias_of {
            // Tied weights: one tensor under two names.
            let target = m.params.get(first as usize).map(|f| f.tensor as usize);
            l.params[p.tensor as usize] = target.and_then(|t| l.params[t]);
            if l.params[p.tensor as usize].is_some() {
                continue;
            }
        }
        let meta = &m.tensors[p.tensor as usize];
        let shape = shape_at(&l, p.tensor).map_err(value_err)?;
        let dtype = graph_dtype(meta.dtype).ok_or_else(|| {
            value_err(format!(
                "{} is {}: Headroom models float32 weights (with autocast for bf16/fp16) and int64 or bool buffers; export the model in float32",
                p.fqn,
                super::program::dtype_name(meta.dtype)
            ))
        })?;
        let init = default_init(&p.fqn, &shape);
        let id = match p.kind {
            ParamKind::Parameter if dtype == DType::F32 => l.b.param(&p.fqn, shape, init),
            _ => l.b.buffer(&p.fqn, shape, dtype, init),
        };
        l.params[p.tensor as usize] = Some(id);
    }
    // The inputs: floats are data, int64 token ids, in the graph's order.
    let vocab_of = |t: u32| -> Option<u64> {
        m.nodes.iter().find_map(|n| {
            (n.op == "aten.embedding.default" && n.args.iter().any(|(k, a)| k == "indices" && *a == Arg::Tensor(t)))
                .then(|| n.args.iter().find(|(k, _)| k == "weight"))
                .flatten()
                .and_then(|(_, a)| if let Arg::Tensor(w) = a { m.tensors[*w as usize].shape.first() } else { None })
                .and_then(|e| e.eval(&[]))
                .map(|v| v as u64)
        })
    };
    for &t in &m.inputs {
        let meta = &m.tensors[t as usize];
        let shape = shape_at(&l, t).map_err(value_err)?;
        let kind = match meta.dtype {
            7 => InputKind::Real,
            5 => InputKind::Tokens {
                vocab: vocab_of(t).ok_or_else(|| {
                    value_err(format!(
                        "input {} is int64 but no embedding reads it, so its range is unknown",
                        meta.name
                    ))
                })?,
            },
            other => {
                return Err(value_err(format!(
                    "input {} is {}: inputs may be float32 data or int64 token ids",
                    meta.name,
                    super::program::dtype_name(other)
                )));
            }
        };
        let v = l.b.input(shape, kind);
        l.vals[t as usize] = Some(v);
    }
    let repeated = repeated_modules(m);
    let mut spans = Vec::with_capacity(m.nodes.len());
    for n in &m.nodes {
        let before = l.b.next_node();
        let lower =
            OPS.iter().find(|(name, ..)| *name == n.op).map(|r| r.2).ok_or_else(|| ctx(n, m, "not modelled".into()))?;
        let outs = lower(&mut l, n).map_err(|why| ctx(n, m, why))?;
        let made: Vec<u32> = n.outputs.iter().flatten().copied().collect();
        if outs.len() != made.len() && !outs.is_empty() {
            return Err(ctx(n, m, format!("makes {} tensors, the file says {}", outs.len(), made.len())));
        }
        for (&t, &v) in made.iter().zip(&outs) {
            let want = shape_at(&l, t).map_err(|why| ctx(n, m, why))?;
            if l.b.shape(v) != want.as_slice() {
                return Err(ctx(
                    n,
                    m,
                    format!(
                        "Headroom computes the shape {:?}, the file says {want:?} (please report this)",
                        l.b.shape(v)
                    ),
                ));
            }
            l.vals[t as usize] = Some(v);
        }
        // An op in place: the tensor it mutated is its output from here on.
        if n.op.contains("_.")
            && let (Some(Arg::Tensor(t)), Some(&v)) = (n.args.first().map(|(_, a)| a), outs.first())
        {
            l.vals[*t as usize] = Some(v);
        }
        spans.push((outer_block(m, &repeated, n.module), before..l.b.next_node(), n.module));
    }
    let out = l.vals[m.output as usize].ok_or_else(|| value_err("the output is never computed".into()))?;
    let (loss, start) = loss(&mut l, out, opts).map_err(value_err)?;
    let returned = vec![out];
    let mut graph = l.b.finish(returned, loss, start);
    graph.blocks = blocks(&spans);
    let calls = module_calls(m, &spans);
    let regions: Vec<crate::graph::Region> =
        calls.iter().map(|r| crate::graph::Region { nodes: r.clone(), checkpointed: false }).collect();
    let inputs = graph.region_inputs(&regions);
    graph.frames = calls
        .into_iter()
        .zip(inputs)
        .map(|(nodes, inputs)| crate::graph::Frame { nodes, inputs })
        .filter(|f| !f.inputs.is_empty())
        .collect();
    Ok(graph)
}

fn loss(l: &mut L<'_>, out: ValueId, opts: &BuildOptions) -> Result<(ValueId, usize), String> {
    let b = &mut l.b;
    let s = b.shape(out).to_vec();
    let spec = opts.loss;
    match spec.kind {
        LossKind::Ce | LossKind::Bce | LossKind::Dice | LossKind::DiceCe if s.len() >= 2 => {
            if spec.kind == LossKind::Bce && s.get(1) != Some(&1) {
                // Multi-label: a float target of the output's shape.
                let y = b.input(s.clone(), InputKind::Mask);
                let start = b.next_node();
                return Ok((b.bce_with_logits(out, y).map_err(gerr)?, start));
            }
            if s.len() == 2 && spec.kind == LossKind::Ce {
                return losses::classify(b, out, spec.label_smoothing).map_err(gerr);
            }
            losses::segment(b, out, spec, opts.surface).map_err(gerr)
        }
        LossKind::TokenCe if s.len() >= 2 => {
            let vocab = *s.last().unwrap_or(&1);
            let y = b.input(s[..s.len() - 1].to_vec(), InputKind::ClassIndex { classes: vocab });
            let start = b.next_node();
            let rows = crate::graph::numel(&s[..s.len() - 1]);
            let flat = b.reshape(out, vec![rows, vocab]).map_err(gerr)?;
            let y = b.reshape(y, vec![rows]).map_err(gerr)?;
            Ok((losses::cross_entropy(b, flat, y, spec.label_smoothing).map_err(gerr)?, start))
        }
        LossKind::CausalLm if s.len() == 3 => {
            let ids = l.vals[l.m.inputs[0] as usize].ok_or("no token input")?;
            let b = &mut l.b;
            if b.dtype(ids) != DType::I64 || b.shape(ids) != &s[..2] {
                return Err(
                    "causal_lm needs the first input to be the [batch, seq] token ids the output predicts".into()
                );
            }
            let (batch, seq, vocab) = (s[0], s[1], s[2]);
            if seq < 2 {
                return Err("causal_lm needs a sequence of 2 or more tokens".into());
            }
            let start = b.next_node();
            let shifted = b.slice(out, 1, 0, seq - 1, 1);
            let flat = b.reshape(shifted, vec![batch * (seq - 1), vocab]).map_err(gerr)?;
            let labels = b.slice(ids, 1, 1, seq - 1, 1);
            let labels = b.reshape(labels, vec![batch * (seq - 1)]).map_err(gerr)?;
            Ok((losses::cross_entropy(b, flat, labels, spec.label_smoothing).map_err(gerr)?, start))
        }
        LossKind::Mse => {
            let y = b.input(s.clone(), InputKind::Real);
            let start = b.next_node();
            Ok((b.mse_loss(out, y).map_err(gerr)?, start))
        }
        kind => Err(format!("loss={} does not fit the model's output of shape {s:?}", kind.word())),
    }
}

/// For each module, whether it is one of two or more same-class children of a
/// `ModuleList` or `Sequential` (children named 0, 1, …): what per-block checkpointing
/// wraps.
fn repeated_modules(m: &Imported) -> Vec<bool> {
    let indexed = |path: &str| path.rsplit('.').next().is_some_and(|l| l.parse::<u64>().is_ok());
    let mut siblings: BTreeMap<(Option<u32>, &str), usize> = BTreeMap::new();
    for md in &m.modules {
        if indexed(&md.path) {
            *siblings.entry((md.parent, md.class.as_str())).or_default() += 1;
        }
    }
    m.modules
        .iter()
        .map(|md| indexed(&md.path) && siblings.get(&(md.parent, md.class.as_str())).is_some_and(|&c| c >= 2))
        .collect()
}

/// The outermost repeated module a node runs in.
fn outer_block(m: &Imported, repeated: &[bool], mut i: u32) -> Option<u32> {
    let mut best = None;
    for _ in 0..=m.modules.len() {
        if repeated[i as usize] {
            best = Some(i);
        }
        match m.modules[i as usize].parent {
            Some(p) if p != i => i = p,
            _ => return best,
        }
    }
    best
}

/// The graph node ranges of every module call below the root: each maximal run of
/// consecutive imported nodes that run inside the module.
fn module_calls(m: &Imported, spans: &[(Option<u32>, std::ops::Range<usize>, u32)]) -> Vec<std::ops::Range<usize>> {
    let mut open: BTreeMap<u32, usize> = BTreeMap::new();
    let mut out = Vec::new();
    let mut last_end = 0;
    for (_, r, module) in spans {
        let mut chain = Vec::new();
        let mut at = Some(*module);
        while let Some(i) = at {
            if i == 0 || chain.len() > m.modules.len() {
                break;
            }
            chain.push(i);
            at = m.modules[i as usize].parent;
        }
        let closing: Vec<u32> = open.keys().copied().filter(|k| !chain.contains(k)).collect();
        for k in closing {
            if let Some(start) = open.remove(&k) {
                out.push(start..last_end);
            }
        }
        for &k in &chain {
            open.entry(k).or_insert(r.start);
        }
        last_end = r.end;
    }
    out.extend(open.into_values().map(|start| start..last_end));
    out.retain(|r| !r.is_empty());
    out.sort_by_key(|r| (r.start, std::cmp::Reverse(r.end)));
    out
}

/// Graph node ranges of consecutive imported nodes in the same block.
fn blocks(spans: &[(Option<u32>, std::ops::Range<usize>, u32)]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<(u32, std::ops::Range<usize>)> = Vec::new();
    for (block, r, _) in spans {
        let Some(b) = block else { continue };
        match out.last_mut() {
            Some((last, range)) if last == b && range.end == r.start => range.end = r.end,
            _ if r.is_empty() => {}
            _ => out.push((*b, r.clone())),
        }
    }
    out.into_iter().map(|(_, r)| r).filter(|r| !r.is_empty()).collect()
}
