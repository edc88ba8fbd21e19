//! The model description: one graph of primitive tensor operations that drives both the
//! estimator (shape inference, parameter counts, memory accounting) and the agent's tch
//! module, so that the two can never drift apart.
//!
//! The zoo (`crate::zoo`) builds graphs with the [`Builder`], composing primitives into
//! blocks (a residual unit, an attention layer). Both consumers see only primitives: the
//! estimator has one memory rule per primitive, the trainer one tch call per primitive.
//! Shapes are full shapes, batch dimension first, because attention reshapes mix the batch
//! with other dimensions.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A tensor shape, batch dimension first.
pub type Shape = Vec<u64>;

/// Element types a graph's values and parameters can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    I64,
    Bool,
}

impl DType {
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }
}

/// How a parameter or buffer is filled when the trainer creates it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// U(-bound, bound): PyTorch's default for linear and convolution layers.
    Uniform(f64),
    Normal(f64),
    Const(f64),
    /// 0, 1, …, n-1 (int64 position ids).
    Arange,
    /// Swin's relative position index for a window, sliced to its first `n` tokens.
    RelativePositionIndex {
        window: [u64; 3],
        n: u64,
    },
}

/// A trainable parameter or a buffer (`trainable: false`: running statistics, masks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Param {
    pub name: String,
    pub shape: Shape,
    pub dtype: DType,
    pub init: Init,
    pub trainable: bool,
}

/// One tensor flowing through the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub shape: Shape,
    pub dtype: DType,
    /// Whether the value is laid out contiguously (views made by permutes and strided
    /// slices are not; the estimator needs to know when a later reshape copies).
    pub contiguous: bool,
    /// A view shares its input's storage.
    pub view_of: Option<usize>,
    pub requires_grad: bool,
}

/// A primitive operation. Each has one memory rule in the estimator and one tch call in
/// the trainer.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `x @ W^T + b` over the last dimension; `weight_in_out` stores `W` as `[in, out]`
    /// (Hugging Face's `Conv1D`, CLIP's projections).
    Linear {
        bias: bool,
        weight_in_out: bool,
    },
    /// 1-, 2- or 3-D convolution with equal kernel, stride and padding in every dimension.
    Conv {
        nd: u8,
        kernel: u64,
        stride: u64,
        padding: u64,
        groups: u64,
        bias: bool,
    },
    ConvTranspose {
        nd: u8,
        kernel: u64,
        stride: u64,
        padding: u64,
        output_padding: u64,
        bias: bool,
    },
    /// Training-mode batch norm with affine parameters and running statistics.
    BatchNorm {
        eps: f64,
    },
    /// Instance norm without affine parameters or running statistics (MONAI's default).
    InstanceNorm {
        eps: f64,
    },
    /// Layer norm over the last dimension.
    LayerNorm {
        eps: f64,
        affine: bool,
    },
    Relu {
        inplace: bool,
    },
    /// Leaky ReLU with slope 0.01 (libtorch's default, MONAI's choice).
    LeakyRelu {
        inplace: bool,
    },
    /// PReLU with one shared slope.
    Prelu,
    Gelu {
        tanh: bool,
    },
    Sigmoid,
    /// Element-wise sum of two values (broadcasting the second).
    Add,
    /// `a += b` in place: the result is `a`'s storage.
    AddInplace,
    /// Element-wise product (broadcasting the second).
    Mul,
    /// `x + p` with a parameter or buffer `p` broadcast over `x`.
    AddParam,
    /// `cat([p.expand(B, 1, D), x], dim=1)`: a class token in front of a sequence.
    PrependToken,
    Cat {
        dim: usize,
    },
    MaxPool {
        nd: u8,
        kernel: u64,
        stride: u64,
        padding: u64,
    },
    Mean {
        dims: Vec<usize>,
        keepdim: bool,
    },
    /// A reshape of a contiguous value: a view.
    View {
        shape: Shape,
    },
    /// A view with permuted dimensions.
    Permute {
        dims: Vec<usize>,
    },
    /// A view with two dimensions swapped.
    Transpose {
        d0: usize,
        d1: usize,
    },
    /// A copy when the input is not contiguous, else the input itself.
    Contiguous,
    /// `x.select(dim, index)`: a view.
    Select {
        dim: usize,
        index: u64,
    },
    /// `x.narrow(dim, start, len)` or a strided slice: a view.
    Slice {
        dim: usize,
        start: u64,
        len: u64,
        step: u64,
    },
    /// Zero padding after the end of each of the given dimensions.
    PadEnd {
        dims: Vec<usize>,
        amounts: Vec<u64>,
    },
    Roll {
        shifts: Vec<i64>,
        dims: Vec<usize>,
    },
    /// Rows of a table parameter picked by int64 indices.
    Embedding,
    /// Rows of a table parameter picked by an index buffer: `table[index]`.
    Gather,
    Dropout {
        p: f64,
    },
    Softmax {
        dim: usize,
    },
    /// Batched matrix product of two 3-D values.
    Bmm,
    MulScalar {
        s: f64,
    },
    /// Fused scaled-dot-product attention over `[B, H, N, hd]` queries, keys and values.
    Attention {
        causal: bool,
        dropout: f64,
    },
    /// `x / max(||x||, eps)` over the last dimension.
    Normalize,
    /// Swin's shifted-window attention mask `[1, nW, 1, N, N]` over a padded volume:
    /// -100 between tokens of different shifted regions. Made at every forward pass, as
    /// MONAI's `compute_mask` does, and not trained.
    ShiftedWindowMask {
        padded: [u64; 3],
        window: [u64; 3],
        shift: [u64; 3],
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::Conv { .. } => "conv",
            Op::ConvTranspose { .. } => "conv_transpose",
            Op::BatchNorm { .. } => "batch_norm",
            Op::InstanceNorm { .. } => "instance_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Relu { .. } => "relu",
            Op::LeakyRelu { .. } => "leaky_relu",
            Op::Prelu => "prelu",
            Op::Gelu { .. } => "gelu",
            Op::Sigmoid => "sigmoid",
            Op::Add => "add",
            Op::AddInplace => "add_",
            Op::Mul => "mul",
            Op::AddParam => "add_param",
            Op::PrependToken => "prepend_token",
            Op::Cat { .. } => "cat",
            Op::MaxPool { .. } => "max_pool",
            Op::Mean { .. } => "mean",
            Op::View { .. } => "view",
            Op::Permute { .. } => "permute",
            Op::Transpose { .. } => "transpose",
            Op::Contiguous => "contiguous",
            Op::Select { .. } => "select",
            Op::Slice { .. } => "slice",
            Op::PadEnd { .. } => "pad",
            Op::Roll { .. } => "roll",
            Op::Embedding => "embedding",
            Op::Gather => "gather",
            Op::Dropout { .. } => "dropout",
            Op::Softmax { .. } => "softmax",
            Op::Bmm => "bmm",
            Op::MulScalar { .. } => "mul_scalar",
            Op::Attention { .. } => "attention",
            Op::Normalize => "normalize",
            Op::ShiftedWindowMask { .. } => "shifted_window_mask",
        }
    }
}

/// One operation with its operands.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<usize>,
    pub params: Vec<usize>,
    pub output: usize,
}

/// What the model's outputs are trained against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Logits `[B, classes]` against one label per sample.
    Classify { classes: u64 },
    /// Logits `[B, classes, ...spatial]` against one label per voxel.
    Segment { classes: u64 },
    /// Logits `[B, T, vocab]` against one token per position.
    LanguageModel { vocab: u64 },
    /// Image and text embeddings `[B, E]` matched by a symmetric contrastive loss with a
    /// learned temperature (the graph's last parameter).
    Contrastive,
}

/// A model input the data generator fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Standard-normal floats (images, volumes, features).
    Real,
    /// Token ids below `vocab`.
    Tokens { vocab: u64 },
}

/// A shape-checked graph for one micro-batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub values: Vec<Value>,
    pub params: Vec<Param>,
    pub nodes: Vec<Node>,
    /// The values the data generator provides, with what they hold.
    pub inputs: Vec<(usize, InputKind)>,
    /// The values the loss consumes.
    pub outputs: Vec<usize>,
    pub task: Task,
    /// Node ranges of the repeated trunk blocks, in order: the units gradient
    /// checkpointing may group into segments.
    pub blocks: Vec<std::ops::Range<usize>>,
}

/// Why a graph cannot be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{op} ({name}): {reason}")]
pub struct GraphError {
    pub op: &'static str,
    pub name: String,
    pub reason: String,
}

impl Graph {
    /// Parameters counted the way `sum(p.numel() for p in model.parameters())` does.
    pub fn n_params(&self) -> u64 {
        self.params.iter().filter(|p| p.trainable).fold(0u64, |acc, p| acc.saturating_add(numel(&p.shape)))
    }

    pub fn param_bytes(&self, p: &Param) -> u64 {
        numel(&p.shape).saturating_mul(p.dtype.size())
    }

    /// The batch size the graph was built for.
    pub fn micro_batch(&self) -> u64 {
        self.inputs.first().and_then(|&(v, _)| self.values[v].shape.first().copied()).unwrap_or(1)
    }

    pub fn bytes(&self, value: usize) -> u64 {
        let v = &self.values[value];
        numel(&v.shape).saturating_mul(v.dtype.size())
    }

    /// The largest single tensor (value or parameter) in bytes: what the plan's limits check.
    pub fn largest_tensor_bytes(&self) -> u64 {
        let values = (0..self.values.len()).map(|v| self.bytes(v));
        let params = self.params.iter().map(|p| self.param_bytes(p));
        values.chain(params).max().unwrap_or(0)
    }

    /// The largest working buffer a kernel makes that is not a graph value: attention
    /// scores `[B, H, N, N]` (materialised on the CPU's math path) and the CPU's im2col
    /// columns of a convolution, fp32.
    pub fn largest_working_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| match n.op {
                Op::Attention { .. } => {
                    let s = &self.values[n.output].shape;
                    s[0].saturating_mul(s[1]).saturating_mul(s[2]).saturating_mul(s[2]).saturating_mul(4)
                }
                Op::Conv { nd, kernel, .. } => {
                    let (x, y) = (&self.values[n.inputs[0]].shape, &self.values[n.output].shape);
                    let k = kernel.saturating_pow(u32::from(nd));
                    x[0].saturating_mul(x[1]).saturating_mul(k).saturating_mul(numel(&y[2..])).saturating_mul(4)
                }
                Op::ConvTranspose { nd, kernel, .. } => {
                    let (x, y) = (&self.values[n.inputs[0]].shape, &self.values[n.output].shape);
                    let k = kernel.saturating_pow(u32::from(nd));
                    x[0].saturating_mul(y[1]).saturating_mul(k).saturating_mul(numel(&x[2..])).saturating_mul(4)
                }
                _ => 0,
            })
            .max()
            .unwrap_or(0)
    }

    /// For each value, the index of the last node that reads it (None if no node does).
    pub fn last_use(&self) -> Vec<Option<usize>> {
        let mut last = vec![None; self.values.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for &v in &node.inputs {
                last[v] = Some(i);
            }
        }
        last
    }

    /// The node that produced each value (None for inputs).
    pub fn producer(&self) -> Vec<Option<usize>> {
        let mut producer = vec![None; self.values.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            producer[node.output] = Some(i);
        }
        producer
    }

    /// For each region, the values its nodes read from outside it (earlier regions or the
    /// graph's inputs), in first-read order: what a region's leaves stand for.
    pub fn region_inputs(&self, regions: &[(std::ops::Range<usize>, bool)]) -> Vec<Vec<usize>> {
        let producer = self.producer();
        regions
            .iter()
            .map(|(range, _)| {
                let mut seen = std::collections::BTreeSet::new();
                let mut ins = Vec::new();
                for n in &self.nodes[range.clone()] {
                    for &v in &n.inputs {
                        if producer[v].is_none_or(|p| !range.contains(&p)) && seen.insert(v) {
                            ins.push(v);
                        }
                    }
                }
                ins
            })
            .collect()
    }

    /// Splits the nodes into regions for `segments` checkpoint segments: the nodes before
    /// the first block and after the last run normally; the blocks (all but one that
    /// ends the graph) are grouped into consecutive checkpointed regions of
    /// `ceil(blocks / segments)` blocks each, so there are at most `segments` of them.
    /// Unlike `checkpoint_sequential`, the last group is checkpointed too; the head after
    /// it is not. `(range, checkpointed)` pairs cover every node.
    pub fn regions(&self, segments: u64) -> Vec<(std::ops::Range<usize>, bool)> {
        let n = self.nodes.len();
        // The loss needs the last region's outputs with autograd: a block that ends the
        // graph is never checkpointed.
        let blocks: Vec<std::ops::Range<usize>> = self.blocks.iter().filter(|b| b.end < n).cloned().collect();
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return vec![(0..n, false)];
        };
        if segments == 0 {
            return vec![(0..n, false)];
        }
        let k = (segments as usize).min(blocks.len());
        let mut regions = Vec::new();
        if first.start > 0 {
            regions.push((0..first.start, false));
        }
        let per = blocks.len().div_ceil(k);
        // Each segment runs from its first block to the next segment's first block, so
        // that nodes between blocks (a downsampling layer) belong to a segment too.
        let starts: Vec<usize> = blocks.chunks(per).map(|c| c[0].start).collect();
        for (j, &start) in starts.iter().enumerate() {
            let end = starts.get(j + 1).copied().unwrap_or(last.end);
            regions.push((start..end, true));
        }
        if last.end < n {
            regions.push((last.end..n, false));
        }
        regions
    }
}

/// Number of elements of a shape (1 for a scalar). Saturates at `u64::MAX` instead of
/// wrapping, so that limits catch absurd shapes.
pub fn numel(shape: &[u64]) -> u64 {
    shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

/// Builds a graph op by op, checking shapes as it goes. Names are module paths
/// (`layer1.0.conv1`), used in errors and as the trainer's variable names.
pub struct Builder {
    g: Graph,
    prefix: Vec<String>,
}

type R<T> = Result<T, GraphError>;

impl Builder {
    pub fn new(task: Task) -> Builder {
        Builder {
            g: Graph {
                values: Vec::new(),
                params: Vec::new(),
                nodes: Vec::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                task,
                blocks: Vec::new(),
            },
            prefix: Vec::new(),
        }
    }

    pub fn finish(mut self, outputs: Vec<usize>) -> Graph {
        self.g.outputs = outputs;
        self.g
    }

    /// Runs `f` with `name` appended to the module path.
    pub fn scope<T>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Builder) -> T) -> T {
        self.prefix.push(name.into());
        let out = f(self);
        self.prefix.pop();
        out
    }

    /// Runs `f` and records its nodes as one trunk block for checkpointing.
    pub fn block<T>(&mut self, f: impl FnOnce(&mut Builder) -> T) -> T {
        let start = self.g.nodes.len();
        let out = f(self);
        let end = self.g.nodes.len();
        if end > start {
            self.g.blocks.push(start..end);
        }
        out
    }

    fn path(&self, leaf: &str) -> String {
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        if !leaf.is_empty() {
            parts.push(leaf);
        }
        parts.join(".")
    }

    fn err(&self, op: &'static str, reason: impl Into<String>) -> GraphError {
        GraphError { op, name: self.path(""), reason: reason.into() }
    }

    pub fn shape(&self, v: usize) -> &[u64] {
        &self.g.values[v].shape
    }

    pub fn input(&mut self, shape: Shape, kind: InputKind) -> usize {
        let dtype = match kind {
            InputKind::Real => DType::F32,
            InputKind::Tokens { .. } => DType::I64,
        };
        let v = self.value(shape, dtype, true, None, false);
        self.g.inputs.push((v, kind));
        v
    }

    pub fn param(&mut self, name: &str, shape: Shape, init: Init) -> usize {
        self.g.params.push(Param { name: self.path(name), shape, dtype: DType::F32, init, trainable: true });
        self.g.params.len() - 1
    }

    pub fn buffer(&mut self, name: &str, shape: Shape, dtype: DType, init: Init) -> usize {
        self.g.params.push(Param { name: self.path(name), shape, dtype, init, trainable: false });
        self.g.params.len() - 1
    }

    fn value(&mut self, shape: Shape, dtype: DType, contiguous: bool, view_of: Option<usize>, grad: bool) -> usize {
        self.g.values.push(Value { shape, dtype, contiguous, view_of, requires_grad: grad });
        self.g.values.len() - 1
    }

    fn push(&mut self, op: Op, inputs: Vec<usize>, params: Vec<usize>, shape: Shape) -> usize {
        let first = inputs[0];
        let in_grad = inputs.iter().any(|&v| self.g.values[v].requires_grad);
        let param_grad = params.iter().any(|&p| self.g.params[p].trainable);
        let (dtype, contiguous, view_of) = match &op {
            Op::View { .. } => (self.g.values[first].dtype, true, Some(first)),
            Op::Select { dim, .. } => {
                // Selecting along the outermost non-unit dimension keeps a contiguous block.
                let outer = self.g.values[first].shape[..*dim].iter().all(|&d| d == 1);
                (self.g.values[first].dtype, self.g.values[first].contiguous && outer, Some(first))
            }
            // libtorch ignores the strides of size-1 dimensions: a permute that keeps the
            // other dimensions in order, or a slice below only size-1 dimensions, is still
            // contiguous (and a later `.contiguous()` copies nothing).
            Op::Permute { dims } => {
                let input = &self.g.values[first];
                let order: Vec<usize> = dims.iter().copied().filter(|&d| input.shape[d] != 1).collect();
                let kept = order.windows(2).all(|w| w[0] < w[1]);
                (input.dtype, input.contiguous && kept, Some(first))
            }
            Op::Transpose { d0, d1 } => {
                let input = &self.g.values[first];
                let (lo, hi) = ((*d0).min(*d1), (*d0).max(*d1));
                let kept = lo == hi || input.shape[lo..=hi].iter().filter(|&&d| d != 1).count() <= 1;
                (input.dtype, input.contiguous && kept, Some(first))
            }
            Op::Slice { dim, len, step, .. } => {
                let input = &self.g.values[first];
                let outer = input.shape[..*dim].iter().all(|&d| d == 1);
                (input.dtype, input.contiguous && outer && (*step == 1 || *len <= 1), Some(first))
            }
            Op::Contiguous if self.g.values[first].contiguous => (self.g.values[first].dtype, true, Some(first)),
            // In-place ops write into their first input's storage.
            Op::Relu { inplace: true } | Op::LeakyRelu { inplace: true } | Op::AddInplace => {
                (self.g.values[first].dtype, self.g.values[first].contiguous, Some(first))
            }
            _ => (DType::F32, true, None),
        };
        let out = self.value(shape, dtype, contiguous, view_of, in_grad || param_grad);
        self.g.nodes.push(Node { op, inputs, params, output: out });
        out
    }

    fn init_bound(fan_in: u64) -> Init {
        Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
    }

    /// A weight and (optionally) a bias of `out` entries, both with PyTorch's default
    /// init for this fan-in, in the current scope.
    fn weight_and_bias(&mut self, weight: Shape, out: u64, fan_in: u64, bias: bool) -> Vec<usize> {
        let mut params = vec![self.param("weight", weight, Builder::init_bound(fan_in))];
        if bias {
            params.push(self.param("bias", vec![out], Builder::init_bound(fan_in)));
        }
        params
    }

    /// The number of spatial dimensions of a `[B, C, ...]` input (1 to 3).
    fn spatial_dims(&self, op: &'static str, shape: &[u64]) -> R<usize> {
        let nd = shape.len().saturating_sub(2);
        if !(1..=3).contains(&nd) {
            return Err(self.err(op, format!("expects [B, C, ...] with 1 to 3 spatial dims, got {shape:?}")));
        }
        Ok(nd)
    }

    /// A linear layer over the last dimension.
    pub fn linear(&mut self, name: &str, x: usize, out: u64, bias: bool) -> R<usize> {
        self.linear_with(name, x, out, bias, false)
    }

    pub fn linear_with(&mut self, name: &str, x: usize, out: u64, bias: bool, weight_in_out: bool) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let Some(&inf) = shape.last() else {
            return Err(self.err("linear", "needs at least one dimension"));
        };
        // A strided 2-D input (a selected token) is fine for addmm; anything else must
        // be contiguous so that the flattening reshape is a view.
        if !self.g.values[x].contiguous && shape.len() != 2 {
            return Err(self.err("linear", "input must be contiguous"));
        }
        self.scope(name, |b| {
            let w_shape = if weight_in_out { vec![inf, out] } else { vec![out, inf] };
            let params = b.weight_and_bias(w_shape, out, inf, bias);
            let mut o = shape.clone();
            if let Some(last) = o.last_mut() {
                *last = out;
            }
            Ok(b.push(Op::Linear { bias, weight_in_out }, vec![x], params, o))
        })
    }

    fn conv_out(&self, op: &'static str, size: u64, kernel: u64, stride: u64, padding: u64) -> R<u64> {
        let padded = size.saturating_add(padding.saturating_mul(2));
        if stride == 0 || padded < kernel {
            return Err(self.err(op, format!("kernel {kernel} does not fit a size of {size} with padding {padding}")));
        }
        Ok((padded - kernel) / stride + 1)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv(
        &mut self,
        name: &str,
        x: usize,
        out: u64,
        kernel: u64,
        stride: u64,
        padding: u64,
        groups: u64,
        bias: bool,
    ) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv", &shape)?;
        let cin = shape[1];
        self.scope(name, |b| {
            if groups == 0 || cin % groups != 0 || out % groups != 0 {
                return Err(b.err("conv", format!("{groups} groups must divide {cin} input and {out} output channels")));
            }
            let mut o = vec![shape[0], out];
            for &s in &shape[2..] {
                o.push(b.conv_out("conv", s, kernel, stride, padding)?);
            }
            let fan_in = cin / groups * kernel.pow(nd as u32);
            let mut w = vec![out, cin / groups];
            w.extend(std::iter::repeat_n(kernel, nd));
            let params = b.weight_and_bias(w, out, fan_in, bias);
            Ok(b.push(Op::Conv { nd: nd as u8, kernel, stride, padding, groups, bias }, vec![x], params, o))
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose(
        &mut self,
        name: &str,
        x: usize,
        out: u64,
        kernel: u64,
        stride: u64,
        padding: u64,
        output_padding: u64,
        bias: bool,
    ) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv_transpose", &shape)?;
        let cin = shape[1];
        let mut o = vec![shape[0], out];
        for &s in &shape[2..] {
            let full =
                (s.saturating_sub(1)).saturating_mul(stride).saturating_add(kernel).saturating_add(output_padding);
            if full < 2 * padding + 1 {
                return Err(self.err("conv_transpose", format!("padding {padding} leaves nothing of size {s}")));
            }
            o.push(full - 2 * padding);
        }
        self.scope(name, |b| {
            // ConvTranspose's weight is [in, out, k...] and its fan-in is out * k^nd.
            let fan_in = out * kernel.pow(nd as u32);
            let mut w = vec![cin, out];
            w.extend(std::iter::repeat_n(kernel, nd));
            let params = b.weight_and_bias(w, out, fan_in, bias);
            let op = Op::ConvTranspose { nd: nd as u8, kernel, stride, padding, output_padding, bias };
            Ok(b.push(op, vec![x], params, o))
        })
    }

    pub fn batch_norm(&mut self, name: &str, x: usize) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let c = shape.get(1).copied().ok_or_else(|| self.err("batch_norm", "needs [B, C, ...]"))?;
        self.scope(name, |b| {
            let params = vec![
                b.param("weight", vec![c], Init::Const(1.0)),
                b.param("bias", vec![c], Init::Const(0.0)),
                b.buffer("running_mean", vec![c], DType::F32, Init::Const(0.0)),
                b.buffer("running_var", vec![c], DType::F32, Init::Const(1.0)),
                b.buffer("num_batches_tracked", vec![], DType::I64, Init::Const(0.0)),
            ];
            Ok(b.push(Op::BatchNorm { eps: 1e-5 }, vec![x], params, shape))
        })
    }

    pub fn instance_norm(&mut self, x: usize) -> R<usize> {
        let shape = self.shape(x).to_vec();
        if shape.len() < 3 {
            return Err(self.err("instance_norm", format!("needs [B, C, ...spatial], got {shape:?}")));
        }
        Ok(self.push(Op::InstanceNorm { eps: 1e-5 }, vec![x], vec![], shape))
    }

    pub fn layer_norm(&mut self, name: &str, x: usize, eps: f64) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let d = *shape.last().ok_or_else(|| self.err("layer_norm", "needs a dimension"))?;
        if !self.g.values[x].contiguous {
            return Err(self.err("layer_norm", "input must be contiguous"));
        }
        self.scope(name, |b| {
            let params = vec![b.param("weight", vec![d], Init::Const(1.0)), b.param("bias", vec![d], Init::Const(0.0))];
            Ok(b.push(Op::LayerNorm { eps, affine: true }, vec![x], params, shape))
        })
    }

    /// Layer norm without parameters (`F.layer_norm(x, [C])`).
    pub fn layer_norm_plain(&mut self, x: usize) -> R<usize> {
        let shape = self.shape(x).to_vec();
        if !self.g.values[x].contiguous {
            return Err(self.err("layer_norm", "input must be contiguous"));
        }
        Ok(self.push(Op::LayerNorm { eps: 1e-5, affine: false }, vec![x], vec![], shape))
    }

    pub fn unary(&mut self, op: Op, x: usize) -> usize {
        let shape = self.shape(x).to_vec();
        self.push(op, vec![x], vec![], shape)
    }

    pub fn prelu(&mut self, name: &str, x: usize) -> usize {
        let shape = self.shape(x).to_vec();
        let p = self.scope(name, |b| b.param("weight", vec![1], Init::Const(0.25)));
        self.push(Op::Prelu, vec![x], vec![p], shape)
    }

    fn broadcastable(&self, op: &'static str, a: &[u64], b: &[u64]) -> R<()> {
        if b.len() > a.len() || a.iter().rev().zip(b.iter().rev()).any(|(&x, &y)| y != 1 && y != x) {
            return Err(self.err(op, format!("cannot broadcast {b:?} onto {a:?}")));
        }
        Ok(())
    }

    pub fn add(&mut self, a: usize, b: usize) -> R<usize> {
        let shape = self.shape(a).to_vec();
        self.broadcastable("add", &shape, self.shape(b))?;
        Ok(self.push(Op::Add, vec![a, b], vec![], shape))
    }

    pub fn add_inplace(&mut self, a: usize, b: usize) -> R<usize> {
        let shape = self.shape(a).to_vec();
        self.broadcastable("add_", &shape, self.shape(b))?;
        Ok(self.push(Op::AddInplace, vec![a, b], vec![], shape))
    }

    pub fn mul(&mut self, a: usize, b: usize) -> R<usize> {
        let shape = self.shape(a).to_vec();
        self.broadcastable("mul", &shape, self.shape(b))?;
        Ok(self.push(Op::Mul, vec![a, b], vec![], shape))
    }

    pub fn add_param(&mut self, x: usize, p: usize) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let ps = self.g.params[p].shape.clone();
        self.broadcastable("add_param", &shape, &ps)?;
        Ok(self.push(Op::AddParam, vec![x], vec![p], shape))
    }

    pub fn prepend_token(&mut self, x: usize, p: usize) -> R<usize> {
        let mut shape = self.shape(x).to_vec();
        if shape.len() != 3 {
            return Err(self.err("prepend_token", format!("needs [B, N, D], got {shape:?}")));
        }
        shape[1] += 1;
        Ok(self.push(Op::PrependToken, vec![x], vec![p], shape))
    }

    pub fn cat(&mut self, xs: Vec<usize>, dim: usize) -> R<usize> {
        let mut shape = self.shape(xs[0]).to_vec();
        if dim >= shape.len() {
            return Err(self.err("cat", format!("no dimension {dim} in {shape:?}")));
        }
        for &x in &xs[1..] {
            let s = self.shape(x);
            let same_rest =
                s.len() == shape.len() && s.iter().zip(&shape).enumerate().all(|(i, (a, b))| i == dim || a == b);
            if !same_rest {
                return Err(self.err("cat", format!("cannot concatenate {s:?} with {shape:?} along {dim}")));
            }
            shape[dim] += s[dim];
        }
        Ok(self.push(Op::Cat { dim }, xs, vec![], shape))
    }

    pub fn max_pool(&mut self, x: usize, kernel: u64, stride: u64, padding: u64) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let nd = shape.len().saturating_sub(2);
        let mut o = shape[..2.min(shape.len())].to_vec();
        for &s in &shape[2..] {
            o.push(self.conv_out("max_pool", s, kernel, stride, padding)?);
        }
        Ok(self.push(Op::MaxPool { nd: nd as u8, kernel, stride, padding }, vec![x], vec![], o))
    }

    pub fn mean(&mut self, x: usize, dims: Vec<usize>, keepdim: bool) -> usize {
        let shape = self.shape(x).to_vec();
        let o: Shape = shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| if dims.contains(&i) { keepdim.then_some(1) } else { Some(d) })
            .collect();
        self.push(Op::Mean { dims, keepdim }, vec![x], vec![], o)
    }

    pub fn view(&mut self, x: usize, shape: Shape) -> R<usize> {
        if numel(&shape) != numel(self.shape(x)) {
            return Err(self.err("view", format!("cannot view {:?} as {shape:?}", self.shape(x))));
        }
        if !self.g.values[x].contiguous {
            return Err(self.err("view", "input must be contiguous"));
        }
        Ok(self.push(Op::View { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn permute(&mut self, x: usize, dims: Vec<usize>) -> R<usize> {
        let shape = self.shape(x).to_vec();
        let mut sorted = dims.clone();
        sorted.sort_unstable();
        if sorted != (0..shape.len()).collect::<Vec<_>>() {
            return Err(self.err("permute", format!("{dims:?} is not a permutation of {} dims", shape.len())));
        }
        let o = dims.iter().map(|&d| shape[d]).collect();
        Ok(self.push(Op::Permute { dims }, vec![x], vec![], o))
    }

    pub fn transpose(&mut self, x: usize, d0: usize, d1: usize) -> usize {
        let mut shape = self.shape(x).to_vec();
        shape.swap(d0, d1);
        self.push(Op::Transpose { d0, d1 }, vec![x], vec![], shape)
    }

    pub fn contiguous(&mut self, x: usize) -> usize {
        if self.g.values[x].contiguous {
            return x;
        }
        let shape = self.shape(x).to_vec();
        self.push(Op::Contiguous, vec![x], vec![], shape)
    }

    /// A permute followed by a copy into the permuted layout.
    pub fn permute_copy(&mut self, x: usize, dims: Vec<usize>) -> R<usize> {
        let p = self.permute(x, dims)?;
        Ok(self.contiguous(p))
    }

    pub fn select(&mut self, x: usize, dim: usize, index: u64) -> usize {
        let mut shape = self.shape(x).to_vec();
        shape.remove(dim);
        self.push(Op::Select { dim, index }, vec![x], vec![], shape)
    }

    pub fn slice(&mut self, x: usize, dim: usize, start: u64, len: u64, step: u64) -> usize {
        let mut shape = self.shape(x).to_vec();
        shape[dim] = len;
        self.push(Op::Slice { dim, start, len, step }, vec![x], vec![], shape)
    }

    pub fn pad_end(&mut self, x: usize, dims: Vec<usize>, amounts: Vec<u64>) -> usize {
        let mut shape = self.shape(x).to_vec();
        for (&d, &a) in dims.iter().zip(&amounts) {
            shape[d] += a;
        }
        self.push(Op::PadEnd { dims, amounts }, vec![x], vec![], shape)
    }

    pub fn roll(&mut self, x: usize, shifts: Vec<i64>, dims: Vec<usize>) -> usize {
        let shape = self.shape(x).to_vec();
        self.push(Op::Roll { shifts, dims }, vec![x], vec![], shape)
    }

    pub fn embedding(&mut self, name: &str, ids: usize, rows: u64, dim: u64) -> usize {
        let p = self.scope(name, |b| b.param("weight", vec![rows, dim], Init::Normal(0.02)));
        self.embedding_with(ids, p)
    }

    /// A linear layer without bias whose `[out, in]` weight is an existing parameter
    /// (an output head tied to the token embedding).
    pub fn linear_tied(&mut self, x: usize, weight: usize) -> R<usize> {
        let mut shape = self.shape(x).to_vec();
        let w = self.g.params[weight].shape.clone();
        if shape.last() != w.get(1) {
            return Err(self.err("linear", format!("{shape:?} does not match the tied weight {w:?}")));
        }
        if let Some(last) = shape.last_mut() {
            *last = w[0];
        }
        Ok(self.push(Op::Linear { bias: false, weight_in_out: false }, vec![x], vec![weight], shape))
    }

    /// `x @ P` with an existing `[in, out]` parameter and no bias (CLIP's projections).
    pub fn linear_proj(&mut self, x: usize, proj: usize) -> R<usize> {
        let mut shape = self.shape(x).to_vec();
        let p = self.g.params[proj].shape.clone();
        if shape.last() != p.first() {
            return Err(self.err("linear", format!("{shape:?} does not match the projection {p:?}")));
        }
        if let Some(last) = shape.last_mut() {
            *last = p[1];
        }
        Ok(self.push(Op::Linear { bias: false, weight_in_out: true }, vec![x], vec![proj], shape))
    }

    /// An embedding lookup into an existing table (tied weights).
    pub fn embedding_with(&mut self, ids: usize, table: usize) -> usize {
        let mut shape = self.shape(ids).to_vec();
        shape.push(self.g.params[table].shape[1]);
        self.push(Op::Embedding, vec![ids], vec![table], shape)
    }

    /// `table[index]` where `index` is an int64 buffer.
    pub fn gather(&mut self, table: usize, index: usize) -> usize {
        let shape = vec![self.g.params[index].shape[0], self.g.params[table].shape[1]];
        let v = self.value(shape, DType::F32, true, None, self.g.params[table].trainable);
        self.g.nodes.push(Node { op: Op::Gather, inputs: vec![], params: vec![table, index], output: v });
        v
    }

    pub fn dropout(&mut self, x: usize, p: f64) -> usize {
        if p <= 0.0 {
            return x;
        }
        self.unary(Op::Dropout { p }, x)
    }

    pub fn softmax(&mut self, x: usize, dim: usize) -> usize {
        self.unary(Op::Softmax { dim }, x)
    }

    pub fn bmm(&mut self, a: usize, b: usize) -> R<usize> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() != 3 || sb.len() != 3 || sa[0] != sb[0] || sa[2] != sb[1] {
            return Err(self.err("bmm", format!("cannot multiply {sa:?} by {sb:?}")));
        }
        Ok(self.push(Op::Bmm, vec![a, b], vec![], vec![sa[0], sa[1], sb[2]]))
    }

    pub fn mul_scalar(&mut self, x: usize, s: f64) -> usize {
        self.unary(Op::MulScalar { s }, x)
    }

    pub fn attention(&mut self, q: usize, k: usize, v: usize, causal: bool, dropout: f64) -> R<usize> {
        let s = self.shape(q).to_vec();
        if s.len() != 4 || self.shape(k) != s.as_slice() || self.shape(v) != s.as_slice() {
            return Err(self.err("attention", format!("q, k, v must all be [B, H, N, hd], got {s:?}")));
        }
        Ok(self.push(Op::Attention { causal, dropout }, vec![q, k, v], vec![], s))
    }

    /// Swin's attention mask for shifted windows, made by this forward pass.
    pub fn shifted_window_mask(&mut self, padded: [u64; 3], window: [u64; 3], shift: [u64; 3]) -> usize {
        let windows = (0..3).map(|i| padded[i] / window[i].max(1)).product::<u64>();
        let n = window.iter().product::<u64>();
        let v = self.value(vec![1, windows, 1, n, n], DType::F32, true, None, false);
        self.g.nodes.push(Node {
            op: Op::ShiftedWindowMask { padded, window, shift },
            inputs: vec![],
            params: vec![],
            output: v,
        });
        v
    }

    pub fn normalize(&mut self, x: usize) -> usize {
        self.unary(Op::Normalize, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_counts_weights_and_biases_and_infers_shapes() {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![2, 1024], InputKind::Real);
        let h = b.linear("fc1", x, 4096, true).expect("fc1");
        let o = b.linear("fc2", h, 10, false).expect("fc2");
        let g = b.finish(vec![o]);
        assert_eq!(g.n_params(), 1024 * 4096 + 4096 + 4096 * 10);
        assert_eq!(g.values[o].shape, vec![2, 10]);
        assert_eq!(g.params[2].name, "fc2.weight");
    }

    #[test]
    fn conv_and_pool_infer_shapes() {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![1, 3, 32, 32], InputKind::Real);
        let c = b.conv("conv", x, 16, 3, 2, 1, 1, true).expect("conv");
        let p = b.max_pool(c, 2, 2, 0).expect("pool");
        assert_eq!(b.shape(p), &[1, 16, 8, 8]);
        let t = b.conv_transpose("up", p, 4, 3, 2, 1, 1, false).expect("up");
        assert_eq!(b.shape(t), &[1, 4, 16, 16]);
    }

    #[test]
    fn shape_errors_name_the_module() {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![1, 3, 4, 4], InputKind::Real);
        let err = b.scope("stem", |b| b.conv("conv1", x, 8, 7, 1, 0, 1, false)).expect_err("too small");
        assert_eq!(err.to_string(), "conv (stem.conv1): kernel 7 does not fit a size of 4 with padding 0");
        let err = b.conv("grouped", x, 8, 3, 1, 1, 2, false).expect_err("groups");
        assert!(err.to_string().contains("2 groups must divide 3"), "{err}");
    }

    #[test]
    fn regions_group_blocks_into_segments() {
        let mut b = Builder::new(Task::Classify { classes: 2 });
        let mut x = b.input(vec![1, 4], InputKind::Real);
        x = b.linear("stem", x, 4, true).expect("stem");
        for i in 0..4 {
            x = b.block(|b| b.linear(&format!("block{i}"), x, 4, true)).expect("block");
        }
        x = b.linear("head", x, 2, true).expect("head");
        let g = b.finish(vec![x]);
        assert_eq!(g.regions(0), vec![(0..6, false)]);
        assert_eq!(g.regions(2), vec![(0..1, false), (1..3, true), (3..5, true), (5..6, false)]);
        assert_eq!(g.regions(9).len(), 6, "at most one segment per block");
    }
}
