//! `models/model.json` of a `.pt2` file (torch.export's serialized `ExportedProgram`,
//! schema major version 8) read into an [`Imported`] model: the graph's nodes with their
//! arguments, every tensor's dtype and symbolic sizes, the parameters and buffers, the
//! user's inputs and the output the loss reads, the module of every node.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::Value as Json;

use super::expr::{self, Expr};
use super::{Arg, ImportError, Imported, ImportedNode, Module, ParamKind, ParamSpec, Symbol, TensorMeta, Unknown};

/// The schema major version this importer reads (torch 2.6 to 2.11 write 8).
pub const SCHEMA_MAJOR: u32 = 8;

#[derive(Deserialize)]
struct File {
    schema_version: Version,
    graph_module: GraphModule,
    #[serde(default)]
    range_constraints: BTreeMap<String, RangeJ>,
}

#[derive(Deserialize)]
struct Version {
    major: u32,
    minor: u32,
}

#[derive(Deserialize)]
struct RangeJ {
    min_val: Option<i64>,
    max_val: Option<i64>,
}

#[derive(Deserialize)]
struct GraphModule {
    graph: GraphJ,
    signature: SignatureJ,
    #[serde(default)]
    module_call_graph: Vec<ModuleCallJ>,
}

#[derive(Deserialize)]
struct ModuleCallJ {
    fqn: String,
    signature: Option<CallSignatureJ>,
}

#[derive(Deserialize)]
struct CallSignatureJ {
    #[serde(default)]
    out_spec: String,
}

#[derive(Deserialize)]
struct GraphJ {
    nodes: Vec<NodeJ>,
    tensor_values: BTreeMap<String, TensorJ>,
    #[serde(default)]
    sym_int_values: BTreeMap<String, SymIntJ>,
}

#[derive(Deserialize)]
struct NodeJ {
    target: String,
    inputs: Vec<NamedArgJ>,
    outputs: Vec<Json>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct NamedArgJ {
    name: String,
    arg: Json,
}

#[derive(Deserialize)]
struct TensorJ {
    dtype: u32,
    sizes: Vec<SymIntJ>,
}

// The variants are the format's own keys (`as_int`, `as_expr`, `as_name`).
#[allow(clippy::enum_variant_names)]
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum SymIntJ {
    AsInt(i64),
    AsExpr(ExprJ),
    AsName(String),
}

#[derive(Deserialize)]
struct ExprJ {
    expr_str: String,
    hint: Option<Json>,
}

#[derive(Deserialize)]
struct SignatureJ {
    input_specs: Vec<Json>,
    output_specs: Vec<Json>,
}

/// Dynamic sizes one export may have.
pub const MAX_SYMBOLS: usize = 64;

/// torch.export's `ScalarType` codes this importer takes.
pub fn dtype_name(code: u32) -> &'static str {
    match code {
        1 => "uint8",
        2 => "int8",
        3 => "int16",
        4 => "int32",
        5 => "int64",
        6 => "float16",
        7 => "float32",
        8 => "float64",
        12 => "bool",
        13 => "bfloat16",
        _ => "an unusual dtype",
    }
}

struct Reader {
    symbols: Vec<Symbol>,
    names: HashMap<String, u32>,
    sym_ints: HashMap<String, Expr>,
}

impl Reader {
    fn expr(&mut self, text: &str, hint: Option<i64>) -> Result<Expr, ImportError> {
        let symbols = &mut self.symbols;
        let names = &mut self.names;
        let mut fresh = |n: &str| -> Result<u32, String> {
            if names.len() >= MAX_SYMBOLS && !names.contains_key(n) {
                return Err(format!("more than {MAX_SYMBOLS} dynamic sizes"));
            }
            Ok(*names.entry(n.to_owned()).or_insert_with(|| {
                symbols.push(Symbol { name: n.to_owned(), key: String::new(), hint: 0, min: 1, max: i64::MAX });
                (symbols.len() - 1) as u32
            }))
        };
        let e = expr::parse(text, &mut fresh).map_err(ImportError::Format)?;
        if let (Expr::Sym(s), Some(h)) = (&e, hint) {
            let sym = &mut self.symbols[*s as usize];
            if sym.hint == 0 {
                sym.hint = h;
            }
        }
        Ok(e)
    }

    fn sym_int(&mut self, s: &SymIntJ) -> Result<Expr, ImportError> {
        match s {
            SymIntJ::AsInt(v) => Ok(Expr::Int(*v)),
            SymIntJ::AsExpr(e) => {
                let hint = e.hint.as_ref().and_then(|h| h.get("as_int")).and_then(Json::as_i64);
                self.expr(&e.expr_str, hint)
            }
            SymIntJ::AsName(n) => self
                .sym_ints
                .get(n)
                .cloned()
                .ok_or_else(|| ImportError::Format(format!("the size {n:?} is used but never defined"))),
        }
    }
}

/// The innermost module of a node and the chain above it, from `nn_module_stack`
/// (`key,path,class;key,path,class;…`, outermost first).
fn module_chain(stack: &str) -> Vec<(String, String)> {
    stack
        .split(';')
        .filter_map(|entry| {
            // The path and the class are the last two comma-separated fields (a key may
            // itself hold commas).
            let mut parts = entry.rsplitn(3, ',');
            let class = parts.next()?.to_owned();
            let path = parts.next()?.to_owned();
            (!class.starts_with("_empty_nn_module_stack")).then_some((path, class))
        })
        .collect()
}

/// The user's line for a node: the last frame of its stack trace outside PyTorch itself
/// (`model.py:42`), else the last frame.
fn source_line(trace: &str) -> String {
    let frames: Vec<(&str, &str)> = trace
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_prefix("File \"")?;
            let (file, rest) = rest.split_once('"')?;
            let line = rest.trim_start_matches(", line ").split(',').next()?;
            Some((file, line))
        })
        .collect();
    let pick = frames.iter().rev().find(|(f, _)| !f.contains("/torch/")).or(frames.last());
    pick.map(|(f, l)| format!("{}:{l}", f.rsplit('/').next().unwrap_or(f))).unwrap_or_default()
}

/// The output to train: the model's one tensor output, or the `logits` field of a
/// Hugging Face output.
/// `outs` holds every user output in order, `None` where it is not a tensor.
fn pick_output(outs: &[Option<String>], out_spec: &str) -> Result<String, ImportError> {
    let tensors: Vec<&String> = outs.iter().flatten().collect();
    if let [one] = tensors.as_slice() {
        return Ok((*one).clone());
    }
    let spec: Json = serde_json::from_str(out_spec).unwrap_or(Json::Null);
    let keys: Vec<String> = spec
        .get(1)
        .and_then(|t| t.get("context"))
        .and_then(Json::as_str)
        .and_then(|c| serde_json::from_str::<Vec<String>>(c).ok())
        .unwrap_or_default();
    if let Some(Some(name)) = keys.iter().position(|k| k == "logits").and_then(|i| outs.get(i)) {
        return Ok(name.clone());
    }
    Err(ImportError::Unsupported(format!(
        "the model returns {} tensors{}; the loss needs one: export a module whose forward returns the tensor the loss reads (or a Hugging Face output with `logits`)",
        tensors.len(),
        if keys.is_empty() { String::new() } else { format!(" ({})", keys.join(", ")) }
    )))
}

fn arg(r: &mut Reader, tensors: &HashMap<String, u32>, j: &Json) -> Result<Arg, ImportError> {
    let tensor = |name: &Json| -> Result<u32, ImportError> {
        let n = name.get("name").and_then(Json::as_str).unwrap_or("");
        tensors
            .get(n)
            .copied()
            .ok_or_else(|| ImportError::Format(format!("the tensor {n:?} is used but never described")))
    };
    let Some((kind, v)) = j.as_object().and_then(|o| o.iter().next()) else {
        return Ok(Arg::Other("empty".into()));
    };
    Ok(match kind.as_str() {
        "as_none" => Arg::None,
        "as_tensor" => Arg::Tensor(tensor(v)?),
        "as_tensors" => Arg::Tensors(v.as_array().into_iter().flatten().map(tensor).collect::<Result<_, _>>()?),
        "as_optional_tensors" => Arg::OptTensors(
            v.as_array()
                .into_iter()
                .flatten()
                .map(|o| o.get("as_tensor").map(tensor).transpose())
                .collect::<Result<_, _>>()?,
        ),
        "as_optional_tensor" => match v.get("as_tensor") {
            Some(t) => Arg::Tensor(tensor(t)?),
            None => Arg::None,
        },
        "as_int" => Arg::Int(Expr::Int(v.as_i64().ok_or_else(|| ImportError::Format("an int argument".into()))?)),
        "as_ints" => Arg::Ints(
            v.as_array()
                .into_iter()
                .flatten()
                .map(|x| x.as_i64().map(Expr::Int).ok_or_else(|| ImportError::Format("an int list argument".into())))
                .collect::<Result<_, _>>()?,
        ),
        "as_sym_int" => {
            let s: SymIntJ = serde_json::from_value(v.clone()).map_err(|e| ImportError::Format(e.to_string()))?;
            Arg::Int(r.sym_int(&s)?)
        }
        "as_sym_ints" => {
            let list: Vec<SymIntJ> =
                serde_json::from_value(v.clone()).map_err(|e| ImportError::Format(e.to_string()))?;
            Arg::Ints(list.iter().map(|s| r.sym_int(s)).collect::<Result<_, _>>()?)
        }
        "as_float" => Arg::Float(v.as_f64().unwrap_or(f64::NAN)),
        "as_floats" => {
            Arg::Floats(v.as_array().into_iter().flatten().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
        }
        "as_bool" => Arg::Bool(v.as_bool().unwrap_or(false)),
        "as_bools" => Arg::Bools(v.as_array().into_iter().flatten().map(|x| x.as_bool().unwrap_or(false)).collect()),
        "as_string" => Arg::Str(crate::units::clip(v.as_str().unwrap_or(""), 64).into_owned()),
        "as_scalar_type" => Arg::Dtype(v.as_u64().unwrap_or(0) as u32),
        other => Arg::Other(crate::units::clip(other, 40).into_owned()),
    })
}

/// Reads `models/model.json`'s text into an import; `known` says which ATen ops the
/// lowering takes, so that every op it does not is reported at once.
pub fn read(text: &[u8], name: &str, known: fn(&str) -> bool) -> Result<Imported, ImportError> {
    let file: File = serde_json::from_slice(text).map_err(|e| {
        if e.to_string().contains("recursion limit") {
            ImportError::Format("models/model.json nests deeper than 128 levels: refused".into())
        } else {
            ImportError::Format(format!("models/model.json is not torch.export's format: {e}"))
        }
    })?;
    let v = &file.schema_version;
    if v.major != SCHEMA_MAJOR {
        return Err(ImportError::Version { major: v.major, minor: v.minor });
    }
    let gm = file.graph_module;
    let g = gm.graph;
    if g.nodes.len() > super::MAX_NODES {
        return Err(ImportError::TooLarge {
            what: "graph nodes".into(),
            size: g.nodes.len() as u64,
            limit: super::MAX_NODES as u64,
        });
    }
    let mut r = Reader { symbols: Vec::new(), names: HashMap::new(), sym_ints: HashMap::new() };
    for (n, s) in &g.sym_int_values {
        let e = r.sym_int(s)?;
        r.sym_ints.insert(n.clone(), e);
    }
    // Every tensor, in a stable order.
    let mut tensors = HashMap::new();
    let mut metas = Vec::with_capacity(g.tensor_values.len());
    for (n, t) in &g.tensor_values {
        let mut shape = Vec::with_capacity(t.sizes.len());
        for s in &t.sizes {
            shape.push(r.sym_int(s)?);
        }
        if shape.len() > 8 {
            return Err(ImportError::Unsupported(format!("tensor {n:?} has {} dimensions (at most 8)", shape.len())));
        }
        tensors.insert(n.clone(), metas.len() as u32);
        metas.push(TensorMeta { name: n.clone(), dtype: t.dtype, shape });
    }
    for (n, range) in &file.range_constraints {
        if let Some(&s) = r.names.get(n) {
            let sym = &mut r.symbols[s as usize];
            sym.min = range.min_val.unwrap_or(1).max(1);
            sym.max = range.max_val.unwrap_or(i64::MAX);
            if sym.max < sym.min {
                return Err(ImportError::Format(format!(
                    "the dynamic size {n} ranges from {} to {}",
                    sym.min, sym.max
                )));
            }
        }
    }
    let tensor_of = |j: &Json| -> Option<u32> {
        j.get("as_tensor").and_then(|t| t.get("name")).and_then(Json::as_str).and_then(|n| tensors.get(n).copied())
    };
    // Parameters, buffers and the user's inputs, in the order the graph takes them.
    let mut params = Vec::new();
    let mut inputs = Vec::new();
    for spec in &gm.signature.input_specs {
        let Some((kind, body)) = spec.as_object().and_then(|o| o.iter().next()) else { continue };
        let arg_name =
            |b: &Json| b.get("arg").and_then(|a| a.get("name")).and_then(Json::as_str).unwrap_or("").to_owned();
        match kind.as_str() {
            "parameter" | "buffer" | "tensor_constant" => {
                let field = match kind.as_str() {
                    "parameter" => "parameter_name",
                    "buffer" => "buffer_name",
                    _ => "tensor_constant_name",
                };
                let fqn = body.get(field).and_then(Json::as_str).unwrap_or("").to_owned();
                let tensor = *tensors
                    .get(&arg_name(body))
                    .ok_or_else(|| ImportError::Format(format!("{kind} {fqn:?} has no tensor description")))?;
                let kind = match kind.as_str() {
                    "parameter" => ParamKind::Parameter,
                    "buffer" => ParamKind::Buffer,
                    _ => ParamKind::Constant,
                };
                params.push(ParamSpec { fqn, tensor, kind, alias_of: None });
            }
            "user_input" => match body.get("arg").and_then(tensor_of) {
                Some(t) => inputs.push(t),
                None => {
                    return Err(ImportError::Unsupported(
                        "an input that is not a tensor (a number or a flag baked into the call): pass only tensors to torch.export".into(),
                    ));
                }
            },
            other => {
                return Err(ImportError::Unsupported(format!(
                    "an input of kind {other:?} (only tensors, parameters and buffers)"
                )));
            }
        }
    }
    if inputs.is_empty() {
        return Err(ImportError::Unsupported("the model takes no tensor input".into()));
    }
    let mut outs = Vec::new();
    for spec in &gm.signature.output_specs {
        let Some((kind, body)) = spec.as_object().and_then(|o| o.iter().next()) else { continue };
        match kind.as_str() {
            "user_output" => outs.push(body.get("arg").and_then(tensor_of).map(|t| metas[t as usize].name.clone())),
            // Batch norm's running statistics: updated in place, as in eager mode.
            "buffer_mutation" => {}
            other => return Err(ImportError::Unsupported(format!("an output of kind {other:?}"))),
        }
    }
    let out_spec = gm
        .module_call_graph
        .iter()
        .find(|m| m.fqn.is_empty())
        .and_then(|m| m.signature.as_ref())
        .map(|s| s.out_spec.as_str())
        .unwrap_or("");
    let output = tensors[&pick_output(&outs, out_spec)?];
    // Modules and nodes.
    let mut modules: Vec<Module> = vec![Module { path: String::new(), class: String::new(), parent: None }];
    let mut module_ids: HashMap<String, u32> = HashMap::from([(String::new(), 0)]);
    let mut nodes = Vec::new();
    let mut unknown: BTreeMap<String, Unknown> = BTreeMap::new();
    for n in &g.nodes {
        let target = n.target.strip_prefix("torch.ops.").unwrap_or(&n.target).to_owned();
        // Arithmetic on sizes: its results are in `sym_int_values` already.
        let sizes_only = n.outputs.iter().all(|o| o.get("as_sym_int").is_some() || o.get("as_none").is_some());
        if sizes_only && (target.starts_with("_operator.") || target.starts_with("aten.sym_")) {
            continue;
        }
        let mut module = 0u32;
        for (path, class) in module_chain(n.metadata.get("nn_module_stack").map_or("", String::as_str)) {
            let parent = module;
            module = *module_ids.entry(path.clone()).or_insert_with(|| {
                modules.push(Module { path: path.clone(), class: class.clone(), parent: Some(parent) });
                (modules.len() - 1) as u32
            });
        }
        let source = source_line(n.metadata.get("stack_trace").map_or("", String::as_str));
        if !known(&target) {
            let u = unknown.entry(target.clone()).or_insert_with(|| Unknown {
                op: target.clone(),
                node: n.name.clone().unwrap_or_default(),
                module: modules[module as usize].path.clone(),
                source: source.clone(),
                count: 0,
            });
            u.count += 1;
            continue;
        }
        let mut args = Vec::with_capacity(n.inputs.len());
        for a in &n.inputs {
            args.push((a.name.clone(), arg(&mut r, &tensors, &a.arg)?));
        }
        let mut outputs = Vec::new();
        for o in &n.outputs {
            if let Some(t) = tensor_of(o) {
                outputs.push(Some(t));
            } else if let Some(list) = o.get("as_tensors").and_then(Json::as_array) {
                for t in list {
                    let n = t.get("name").and_then(Json::as_str).unwrap_or("");
                    outputs.push(tensors.get(n).copied());
                }
            } else {
                outputs.push(None);
            }
        }
        nodes.push(ImportedNode {
            op: target,
            args,
            outputs,
            module,
            source,
            name: n.name.clone().unwrap_or_default(),
        });
    }
    if !unknown.is_empty() {
        return Err(ImportError::UnknownOps(unknown.into_values().collect()));
    }
    Ok(Imported {
        name: crate::units::clip(name, 64).into_owned(),
        schema: (v.major, v.minor),
        symbols: r.symbols,
        tensors: metas,
        params,
        inputs,
        output,
        nodes,
        modules,
    })
}
