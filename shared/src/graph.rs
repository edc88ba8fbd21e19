//! The model description: one graph of primitive tensor operations that drives both the
//! estimator (shape inference, parameter counts, memory accounting) and the agent's tch
//! module, so that the two can never drift apart.
//!
//! A graph is a whole training forward pass as its reference implementation writes it:
//! the model's operations in the order PyTorch runs them (including the views, copies and
//! composite activations a reference spells out in Python), then the loss, ending in one
//! scalar. Parameters enter through [`Op::Param`] nodes, so a weight used twice (tied
//! embeddings) is one value with two readers, as in autograd. The data — images, tokens
//! and labels — are the graph's inputs.
//!
//! Shapes are static and checked by the [`Builder`]; memory layouts (strides) are not part
//! of the graph, because they depend on the kernels a device runs: the estimator derives
//! them as it walks, the trainer gets them from libtorch.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A tensor shape, batch dimension first.
pub type Shape = Vec<u64>;

/// Element types of a graph's values and parameters, as the fp32 program has them
/// (autocast's half-precision copies are decided where the graph runs).
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
    /// 0, 1, …, n-1 (int64).
    Arange,
    /// Swin's relative position index for a window: `[N, N]` int64 with N = product.
    RelativePositionIndex {
        window: [u64; 3],
    },
    /// An additive causal mask `[n, n]`: 0 on and below the diagonal, -inf above
    /// (open_clip's text `attn_mask` buffer).
    CausalMask,
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

/// A value of a graph (one tensor a node makes or the data provides), named by its place
/// in `Graph::values`. Values, parameters and nodes are told apart by type: a node is a
/// position in execution order (`usize`, so that stages, blocks and checkpointed
/// regions are ranges of them), a value a [`ValueId`], a parameter a [`ParamId`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValueId(pub usize);

/// A parameter or buffer of a graph, named by its place in `Graph::params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParamId(pub usize);

/// Tables kept per value or per parameter (the graph's own, and the estimator's and the
/// trainer's working ones) are indexed by the id itself.
macro_rules! id_indexes {
    ($id:ident) => {
        impl $id {
            pub fn index(self) -> usize {
                self.0
            }
        }

        impl std::fmt::Display for $id {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl<T> std::ops::Index<$id> for Vec<T> {
            type Output = T;
            fn index(&self, id: $id) -> &T {
                &self[id.0]
            }
        }

        impl<T> std::ops::IndexMut<$id> for Vec<T> {
            fn index_mut(&mut self, id: $id) -> &mut T {
                &mut self[id.0]
            }
        }

        impl<T> std::ops::Index<$id> for [T] {
            type Output = T;
            fn index(&self, id: $id) -> &T {
                &self[id.0]
            }
        }

        impl<T> std::ops::IndexMut<$id> for [T] {
            fn index_mut(&mut self, id: $id) -> &mut T {
                &mut self[id.0]
            }
        }
    };
}

id_indexes!(ValueId);
id_indexes!(ParamId);

/// One tensor flowing through the graph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub shape: Shape,
    pub dtype: DType,
    pub requires_grad: bool,
}

/// A primitive operation: one ATen-level call (or a composite that ATen itself treats as
/// one autograd node). Each has one memory rule in the estimator and one tch call in the
/// trainer. Broadcasting follows PyTorch.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A parameter or buffer as a value (`params[0]`); no memory of its own.
    Param,
    /// `F.linear(x, W, b)` with `W` `[out, in]` (`params`: weight, then bias).
    Linear {
        bias: bool,
    },
    /// Hugging Face's `Conv1D`: `addmm(b, x.view(-1, in), W).view(...)`, `W` `[in, out]`.
    Conv1dHf,
    /// 1-, 2- or 3-D convolution, equal kernel, stride and padding in every dimension.
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
    /// `F.instance_norm` without affine parameters or running statistics (MONAI's
    /// default): batch norm over a `[1, B*C, ...]` view.
    InstanceNorm {
        eps: f64,
    },
    /// Layer norm over the last dimension.
    LayerNorm {
        eps: f64,
        affine: bool,
    },
    /// PReLU with one shared slope.
    Prelu,
    /// Rows of `params[0]` picked by the int64 ids in `inputs[0]`.
    Embedding,
    MaxPool {
        nd: u8,
        kernel: u64,
        stride: u64,
        padding: u64,
    },
    Relu {
        inplace: bool,
    },
    /// Leaky ReLU with slope 0.01 (PyTorch's default, MONAI's choice).
    LeakyRelu {
        inplace: bool,
    },
    Gelu {
        tanh: bool,
    },
    Sigmoid,
    Tanh,
    Exp,
    Add,
    Sub,
    Mul,
    Div,
    /// `a += b` in place: the result is `a`'s storage.
    AddInplace,
    MulScalar {
        s: f64,
    },
    AddScalar {
        s: f64,
    },
    /// `s - x`.
    RsubScalar {
        s: f64,
    },
    PowScalar {
        e: f64,
    },
    Mean {
        dims: Vec<usize>,
        keepdim: bool,
    },
    Sum {
        dims: Vec<usize>,
        keepdim: bool,
    },
    /// The 2-norm over the last dimension, keeping it (`F.normalize`'s denominator).
    VectorNorm,
    ClampMin {
        min: f64,
    },
    Softmax {
        dim: usize,
    },
    LogSoftmax {
        dim: usize,
    },
    /// The index of the largest entry along the last dimension (int64, no gradient).
    Argmax,
    /// A view with a new shape; the input's layout must allow it.
    View {
        shape: Shape,
    },
    /// A view when the layout allows it, else a copy.
    Reshape {
        shape: Shape,
    },
    Permute {
        dims: Vec<usize>,
    },
    Transpose {
        d0: usize,
        d1: usize,
    },
    Unsqueeze {
        dim: usize,
    },
    Squeeze {
        dim: usize,
    },
    /// A broadcasting view (stride 0) to this shape.
    Expand {
        shape: Shape,
    },
    /// A copy when the input is not contiguous, else the input itself.
    Contiguous,
    /// Always a copy, laid out like the input.
    Clone,
    Select {
        dim: usize,
        index: u64,
    },
    /// `x.narrow` or a strided slice: a view.
    Slice {
        dim: usize,
        start: u64,
        len: u64,
        step: u64,
    },
    /// `x.split(size, dim)`: several views, one output each.
    Split {
        dim: usize,
        size: u64,
    },
    Cat {
        dim: usize,
    },
    /// `F.pad` with zeros: `(before, after)` per dimension, first dimension first; always
    /// a new tensor.
    Pad {
        pads: Vec<(u64, u64)>,
    },
    Roll {
        shifts: Vec<i64>,
        dims: Vec<usize>,
    },
    /// `x[arange(B), idx]` for `x` `[B, T, D]` and int64 `idx` `[B]`: one row per sample.
    IndexRows,
    /// `x[idx]` for `x` `[R, ...]` and an int64 `idx` `[n]`: rows, copied.
    Index,
    /// `torch.matmul`: matrix products with broadcast batch dimensions.
    MatMul,
    /// `F.scaled_dot_product_attention(q, k, v[, mask])` over `[B, H, N, hd]`.
    Attention {
        causal: bool,
        dropout: f64,
        scale: Option<f64>,
    },
    Dropout {
        p: f64,
    },
    /// A Python frame returns (or rebinds its variables): the values it still held,
    /// its inputs, may go. No output, no memory of its own. Without it a value goes after
    /// the last op that reads it, which is what autograd's saved tensors do but not what
    /// a forward's local variables do outside training.
    Release,
    /// A TorchScript module's forward (`torch.jit.load(file)(x)`): opaque, with no
    /// description to walk. The trainer runs it; the estimator refuses it (its memory
    /// comes from measurement: `headroom find-batch` calibrates it).
    Script,
    /// Swin's shifted-window attention mask `[nW, N, N]`, computed at every forward pass
    /// as MONAI's `compute_mask` does: -100 between tokens of different shifted regions.
    ShiftedWindowMask {
        padded: [u64; 3],
        window: [u64; 3],
        shift: [u64; 3],
    },
    /// `x.float()`: a copy when the input ran in half precision, else nothing.
    ToF32,
    /// `x.to(like.dtype)`: a copy when autocast made `like` half precision and `x` is not
    /// (open_clip's class and position embeddings), else `x` itself. `inputs`: x, like.
    CastLike,
    /// `nll_loss` with mean reduction over `[N, C, ...]` log-probabilities and int64
    /// targets `[N, ...]`; targets equal to `ignore_index` do not count.
    NllLoss {
        ignore_index: i64,
    },
    /// `binary_cross_entropy_with_logits` with mean reduction (logits, float targets).
    BceWithLogits,
    /// MONAI's `one_hot(labels, C, dim=1)` of float class maps `[B, 1, ...]`.
    OneHot {
        classes: u64,
    },
    /// `x.long()` of a float tensor.
    ToI64,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Param => "param",
            Op::Linear { .. } => "linear",
            Op::Conv1dHf => "conv1d_hf",
            Op::Conv { .. } => "conv",
            Op::ConvTranspose { .. } => "conv_transpose",
            Op::BatchNorm { .. } => "batch_norm",
            Op::InstanceNorm { .. } => "instance_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Prelu => "prelu",
            Op::Embedding => "embedding",
            Op::MaxPool { .. } => "max_pool",
            Op::Relu { inplace: false } => "relu",
            Op::Relu { inplace: true } => "relu_",
            Op::LeakyRelu { inplace: false } => "leaky_relu",
            Op::LeakyRelu { inplace: true } => "leaky_relu_",
            Op::Gelu { .. } => "gelu",
            Op::Sigmoid => "sigmoid",
            Op::Script => "torchscript",
            Op::Release => "release",
            Op::Tanh => "tanh",
            Op::Exp => "exp",
            Op::Add => "add",
            Op::Sub => "sub",
            Op::Mul => "mul",
            Op::Div => "div",
            Op::AddInplace => "add_",
            Op::MulScalar { .. } => "mul_scalar",
            Op::AddScalar { .. } => "add_scalar",
            Op::RsubScalar { .. } => "rsub_scalar",
            Op::PowScalar { .. } => "pow",
            Op::Mean { .. } => "mean",
            Op::Sum { .. } => "sum",
            Op::VectorNorm => "vector_norm",
            Op::ClampMin { .. } => "clamp_min",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::Argmax => "argmax",
            Op::View { .. } => "view",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Transpose { .. } => "transpose",
            Op::Unsqueeze { .. } => "unsqueeze",
            Op::Squeeze { .. } => "squeeze",
            Op::Expand { .. } => "expand",
            Op::Contiguous => "contiguous",
            Op::Clone => "clone",
            Op::Select { .. } => "select",
            Op::Slice { .. } => "slice",
            Op::Split { .. } => "split",
            Op::Cat { .. } => "cat",
            Op::Pad { .. } => "pad",
            Op::Roll { .. } => "roll",
            Op::IndexRows => "index_rows",
            Op::Index => "index",
            Op::MatMul => "matmul",
            Op::Attention { .. } => "attention",
            Op::Dropout { .. } => "dropout",
            Op::ShiftedWindowMask { .. } => "shifted_window_mask",
            Op::ToF32 => "float",
            Op::CastLike => "to_dtype_of",
            Op::NllLoss { .. } => "nll_loss",
            Op::BceWithLogits => "bce_with_logits",
            Op::OneHot { .. } => "one_hot",
            Op::ToI64 => "long",
        }
    }

    /// The family whose estimator module (`estimate::ops`) holds this op's forward and
    /// backward rules. Exhaustive, so a new op names its family here.
    pub fn family(&self) -> OpFamily {
        use OpFamily::*;
        match self {
            Op::Linear { .. } | Op::Conv1dHf | Op::MatMul => Linear,
            Op::Conv { .. } | Op::ConvTranspose { .. } => Conv,
            Op::BatchNorm { .. } | Op::InstanceNorm { .. } | Op::LayerNorm { .. } => Norm,
            Op::Prelu
            | Op::Relu { .. }
            | Op::LeakyRelu { .. }
            | Op::Gelu { .. }
            | Op::ClampMin { .. }
            | Op::PowScalar { .. }
            | Op::Sigmoid
            | Op::Tanh
            | Op::Exp
            | Op::MulScalar { .. }
            | Op::AddScalar { .. }
            | Op::RsubScalar { .. }
            | Op::ToF32
            | Op::CastLike
            | Op::ToI64
            | Op::Dropout { .. }
            | Op::Add
            | Op::Sub
            | Op::Mul
            | Op::Div
            | Op::AddInplace => Pointwise,
            Op::Mean { .. }
            | Op::Sum { .. }
            | Op::VectorNorm
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::Argmax => Reduce,
            Op::View { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Transpose { .. }
            | Op::Unsqueeze { .. }
            | Op::Squeeze { .. }
            | Op::Expand { .. }
            | Op::Select { .. }
            | Op::Slice { .. }
            | Op::Split { .. }
            | Op::Contiguous
            | Op::Clone
            | Op::Cat { .. }
            | Op::Pad { .. }
            | Op::Roll { .. } => Views,
            Op::Embedding | Op::IndexRows | Op::Index | Op::OneHot { .. } | Op::MaxPool { .. } => Index,
            Op::Attention { .. } | Op::ShiftedWindowMask { .. } => Attention,
            Op::NllLoss { .. } | Op::BceWithLogits => Loss,
            Op::Param | Op::Release | Op::Script => Special,
        }
    }

    /// Ops whose output shares its first input's storage.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::View { .. }
                | Op::Permute { .. }
                | Op::Transpose { .. }
                | Op::Unsqueeze { .. }
                | Op::Squeeze { .. }
                | Op::Expand { .. }
                | Op::Select { .. }
                | Op::Slice { .. }
                | Op::Split { .. }
        )
    }
}

/// The op families the estimator's rules are grouped by (one module of `estimate::ops`
/// each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpFamily {
    Linear,
    Conv,
    Norm,
    Pointwise,
    Reduce,
    Views,
    Index,
    Attention,
    Loss,
    Special,
}

/// One operation with its operands.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub params: Vec<ParamId>,
    /// Usually one value; `Split` has one per piece.
    pub outputs: Vec<ValueId>,
}

impl Node {
    pub fn output(&self) -> ValueId {
        self.outputs[0]
    }
}

/// What the model is trained for; decides what the synthetic data looks like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// One label per sample.
    Classify { classes: u64 },
    /// A label per voxel.
    Segment { classes: u64 },
    /// Next-token prediction.
    LanguageModel { vocab: u64 },
    /// Images and captions matched by position.
    Contrastive,
}

/// A graph input the data provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    /// Real numbers (images, volumes, features).
    Real,
    /// Token ids below `vocab` (int64).
    Tokens { vocab: u64 },
    /// A class index per sample or voxel below `classes` (int64).
    ClassIndex { classes: u64 },
    /// A class index per voxel stored as float, `[B, 1, ...]` (MONAI's label maps).
    ClassMap { classes: u64 },
    /// A 0/1 float mask `[B, 1, ...]` (binary segmentation).
    Mask,
}

/// How gradient checkpointing partitions a graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checkpoint {
    Off,
    /// `torch.utils.checkpoint.checkpoint_sequential` over the model's top-level stages:
    /// `n - 1` checkpointed segments of `stages / n` stages each, then the rest normally.
    Segments(u64),
    /// The reference's own per-block checkpointing (MONAI `use_checkpoint`, timm and
    /// open_clip `set_grad_checkpointing`, Hugging Face `gradient_checkpointing_enable`,
    /// or each block wrapped in `torch.utils.checkpoint` where a reference has no API).
    Blocks,
}

/// A run of nodes, checkpointed or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub nodes: Range<usize>,
    pub checkpointed: bool,
}

/// A shape-checked graph for one micro-batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub values: Vec<Value>,
    pub params: Vec<Param>,
    pub nodes: Vec<Node>,
    /// The values the data provides, with what they hold.
    pub inputs: Vec<(ValueId, InputKind)>,
    /// What the model returns to the training loop, which keeps it bound through the
    /// step (logits; Hugging Face's key/value cache; CLIP's features).
    pub returned: Vec<ValueId>,
    /// The scalar loss.
    pub loss: ValueId,
    /// The first node of the loss computation (when the reference computes the loss
    /// inside the model, the first node after the logits).
    pub loss_start: usize,
    /// The node index at which the model call returns to the loop: `loss_start`, or the
    /// end when the model computes its own loss (Hugging Face).
    pub returns_after: usize,
    pub task: Task,
    /// Node ranges of the model's top-level sequential stages (what
    /// `checkpoint_sequential` would run), in order, all before `loss_start`.
    pub stages: Vec<Range<usize>>,
    /// Node ranges the reference checkpoints one at a time with per-block checkpointing.
    pub blocks: Vec<Range<usize>>,
    /// Self-attention blocks written as `nn.MultiheadAttention`, which PyTorch runs as one
    /// fused kernel in eval mode (see `FusedAttention`).
    pub fused_attention: Vec<FusedAttention>,
    /// The loss's surface term (`distance_loss_every`), when it has one.
    pub surface: Option<SurfaceTerm>,
}

/// The surface term at the end of a segmentation loss (`zoo::losses::surface_term`),
/// which runs only on every k-th step: up to `start` the graph computes the plain loss
/// (`base_loss`); at `start` the host's distance map `map` (a value no node makes and
/// no batch holds) is bound, then the term's nodes add it to the loss. A step without
/// the term stops at `start` and trains on `base_loss`.
#[derive(Clone, Debug, PartialEq)]
pub struct SurfaceTerm {
    pub map: ValueId,
    pub start: usize,
    pub base_loss: ValueId,
    /// The weighted term, as added to the loss.
    pub term: ValueId,
    /// The logits the map is laid out like.
    pub logits: ValueId,
}

/// An `nn.MultiheadAttention` self-attention block (batch first, no mask, an even
/// number of heads) spelled out as the ops `F.multi_head_attention_forward` runs in
/// training. Outside training, without autocast and with no gradient wanted, PyTorch
/// takes its fast path (`torch._native_multi_head_attention`) instead, which allocates
/// differently; the estimate of a PyTorch validation pass walks it that way.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedAttention {
    /// The nodes of the spelled-out block, parameter reads included.
    pub nodes: Range<usize>,
    /// The `[B, N, D]` value attended over (query, key and value at once).
    pub input: ValueId,
    /// The block's `[B, N, D]` result.
    pub output: ValueId,
    pub heads: u64,
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

    pub fn bytes(&self, value: ValueId) -> u64 {
        let v = &self.values[value];
        numel(&v.shape).saturating_mul(v.dtype.size())
    }

    /// The largest single tensor (value or parameter) in bytes: what the plan's limits check.
    pub fn largest_tensor_bytes(&self) -> u64 {
        let values = (0..self.values.len()).map(|v| self.bytes(ValueId(v)));
        let params = self.params.iter().map(|p| self.param_bytes(p));
        values.chain(params).max().unwrap_or(0)
    }

    /// The largest working buffer a kernel makes that is not a graph value: attention
    /// scores `[B, H, N, S]` (materialised on the CPU's math path) and the native CPU
    /// kernels' im2col columns of a convolution, fp32.
    pub fn largest_working_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| match n.op {
                Op::Attention { .. } => {
                    let (q, k) = (&self.values[n.inputs[0]].shape, &self.values[n.inputs[1]].shape);
                    numel(&q[..q.len() - 1]).saturating_mul(k[k.len() - 2]).saturating_mul(4)
                }
                Op::Conv { nd, kernel, .. } => {
                    let (x, y) = (&self.values[n.inputs[0]].shape, &self.values[n.output()].shape);
                    let k = kernel.saturating_pow(u32::from(nd));
                    x[0].saturating_mul(x[1]).saturating_mul(k).saturating_mul(numel(&y[2..])).saturating_mul(4)
                }
                Op::ConvTranspose { nd, kernel, .. } => {
                    let (x, y) = (&self.values[n.inputs[0]].shape, &self.values[n.output()].shape);
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
            for &o in &node.outputs {
                producer[o] = Some(i);
            }
        }
        producer
    }

    /// For each region, the values its nodes read from outside it (earlier regions or the
    /// graph's inputs), in first-read order.
    pub fn region_inputs(&self, regions: &[Region]) -> Vec<Vec<ValueId>> {
        let producer = self.producer();
        regions
            .iter()
            .map(|r| {
                let mut seen = std::collections::BTreeSet::new();
                let mut ins = Vec::new();
                for n in &self.nodes[r.nodes.clone()] {
                    for &v in &n.inputs {
                        if producer[v].is_none_or(|p| !r.nodes.contains(&p)) && seen.insert(v) {
                            ins.push(v);
                        }
                    }
                }
                ins
            })
            .collect()
    }

    /// The values a region's nodes produce that are read after it or kept by the loop
    /// (returned, the loss), in production order: what a checkpointed region hands on.
    pub fn region_outputs(&self, region: &Region) -> Vec<ValueId> {
        let last = self.last_use();
        let range = region.nodes.clone();
        range
            .clone()
            .flat_map(|i| self.nodes[i].outputs.iter().copied())
            .filter(|&v| last[v].is_some_and(|l| l >= range.end) || self.returned.contains(&v) || v == self.loss)
            .collect()
    }

    /// The most segments `Checkpoint::Segments` can take for this graph.
    pub fn max_segments(&self) -> u64 {
        self.stages.len() as u64
    }

    /// Splits the nodes into regions for a checkpoint mode; the regions cover every node
    /// in order. `Segments(n)` follows `checkpoint_sequential`: `n - 1` checkpointed
    /// segments of `stages / n` stages, then the remaining stages and the loss normally.
    /// `Blocks` checkpoints each of `blocks`. A mode the graph cannot take (more segments
    /// than stages, no blocks) gives one plain region; `Plan::validate` refuses those.
    pub fn regions(&self, mode: Checkpoint) -> Vec<Region> {
        let n = self.nodes.len();
        let plain = vec![Region { nodes: 0..n, checkpointed: false }];
        let ckpt: Vec<Range<usize>> = match mode {
            Checkpoint::Off => return plain,
            Checkpoint::Segments(k) => {
                let k = k as usize;
                let m = self.stages.len();
                if k < 2 || k > m {
                    return plain;
                }
                let per = m / k;
                (0..k - 1).map(|s| self.stages[s * per].start..self.stages[(s + 1) * per - 1].end).collect()
            }
            Checkpoint::Blocks => self.blocks.clone(),
        };
        if ckpt.is_empty() {
            return plain;
        }
        let mut regions = Vec::new();
        let mut at = 0;
        for r in ckpt {
            // Blocks never nest or overlap (each is one module's call); one that would is
            // left to the region before it rather than run twice.
            if r.start < at || r.is_empty() {
                continue;
            }
            if r.start > at {
                regions.push(Region { nodes: at..r.start, checkpointed: false });
            }
            at = r.end;
            regions.push(Region { nodes: r, checkpointed: true });
        }
        if at < n {
            regions.push(Region { nodes: at..n, checkpointed: false });
        }
        regions
    }
}

/// Number of elements of a shape (1 for a scalar). Saturates at `u64::MAX` instead of
/// wrapping, so that limits catch absurd shapes.
pub fn numel(shape: &[u64]) -> u64 {
    shape.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
}

/// The shape two operands broadcast to, or None.
pub fn broadcast(a: &[u64], b: &[u64]) -> Option<Shape> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let x = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let y = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return None,
        };
    }
    Some(out)
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
                returned: Vec::new(),
                loss: ValueId(0),
                loss_start: 0,
                returns_after: 0,
                task,
                stages: Vec::new(),
                blocks: Vec::new(),
                fused_attention: Vec::new(),
                surface: None,
            },
            prefix: Vec::new(),
        }
    }

    /// Ends the graph: `returned` is what the model hands the training loop, `loss` the
    /// scalar, `loss_start` the first node that computes it.
    pub fn finish(mut self, returned: Vec<ValueId>, loss: ValueId, loss_start: usize) -> Graph {
        self.g.returned = returned;
        self.g.loss = loss;
        self.g.loss_start = loss_start;
        self.g.returns_after = loss_start;
        self.g
    }

    /// Like `finish`, for a model that computes its loss itself and returns it with its
    /// outputs (the loop's previous outputs stay alive until then).
    pub fn finish_with_loss_inside(self, returned: Vec<ValueId>, loss: ValueId, loss_start: usize) -> Graph {
        let mut g = self.finish(returned, loss, loss_start);
        g.returns_after = g.nodes.len();
        g
    }

    /// The index the next node will get.
    pub fn next_node(&self) -> usize {
        self.g.nodes.len()
    }

    /// A float32 value no node makes and no batch holds: the surface term's map.
    pub fn side_input(&mut self, shape: Shape) -> ValueId {
        self.value(shape, DType::F32, false)
    }

    pub fn surface_term(&mut self, term: SurfaceTerm) {
        self.g.surface = Some(term);
    }

    /// Records nodes `nodes` as a self-attention block PyTorch may fuse (`FusedAttention`).
    pub fn fused_attention(&mut self, nodes: Range<usize>, input: ValueId, output: ValueId, heads: u64) {
        self.g.fused_attention.push(FusedAttention { nodes, input, output, heads });
    }

    /// Runs `f` with `name` appended to the module path.
    pub fn scope<T>(&mut self, name: impl Into<String>, f: impl FnOnce(&mut Builder) -> T) -> T {
        self.prefix.push(name.into());
        let out = f(self);
        self.prefix.pop();
        out
    }

    /// Runs `f` and records its nodes as one top-level stage (for `checkpoint_sequential`).
    pub fn stage<T>(&mut self, f: impl FnOnce(&mut Builder) -> T) -> T {
        let start = self.g.nodes.len();
        let out = f(self);
        let end = self.g.nodes.len();
        if end > start {
            self.g.stages.push(start..end);
        }
        out
    }

    /// Runs `f` and records its nodes as one unit of the reference's per-block
    /// checkpointing.
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

    pub fn err(&self, op: &'static str, reason: impl Into<String>) -> GraphError {
        GraphError { op, name: self.path(""), reason: reason.into() }
    }

    pub fn shape(&self, v: ValueId) -> &[u64] {
        &self.g.values[v].shape
    }

    pub fn dtype(&self, v: ValueId) -> DType {
        self.g.values[v].dtype
    }

    pub fn input(&mut self, shape: Shape, kind: InputKind) -> ValueId {
        let dtype = match kind {
            InputKind::Real | InputKind::ClassMap { .. } | InputKind::Mask => DType::F32,
            InputKind::Tokens { .. } | InputKind::ClassIndex { .. } => DType::I64,
        };
        let v = self.value(shape, dtype, false);
        self.g.inputs.push((v, kind));
        v
    }

    fn new_param(&mut self, name: &str, shape: Shape, dtype: DType, init: Init, trainable: bool) -> ParamId {
        self.g.params.push(Param { name: self.path(name), shape, dtype, init, trainable });
        ParamId(self.g.params.len() - 1)
    }

    /// A trainable fp32 parameter (declared; use [`Builder::param_value`] to read it).
    pub fn param(&mut self, name: &str, shape: Shape, init: Init) -> ParamId {
        self.new_param(name, shape, DType::F32, init, true)
    }

    pub fn buffer(&mut self, name: &str, shape: Shape, dtype: DType, init: Init) -> ParamId {
        self.new_param(name, shape, dtype, init, false)
    }

    /// Reads parameter `p` as a value.
    pub fn param_value(&mut self, p: ParamId) -> ValueId {
        let (shape, dtype, grad) = {
            let p = &self.g.params[p];
            (p.shape.clone(), p.dtype, p.trainable)
        };
        let v = self.value(shape, dtype, grad);
        self.g.nodes.push(Node { op: Op::Param, inputs: vec![], params: vec![p], outputs: vec![v] });
        v
    }

    /// A new parameter, read as a value at once.
    pub fn param_in(&mut self, name: &str, shape: Shape, init: Init) -> ValueId {
        let p = self.param(name, shape, init);
        self.param_value(p)
    }

    fn value(&mut self, shape: Shape, dtype: DType, grad: bool) -> ValueId {
        self.g.values.push(Value { shape, dtype, requires_grad: grad });
        ValueId(self.g.values.len() - 1)
    }

    fn grad_of(&self, inputs: &[ValueId], params: &[ParamId]) -> bool {
        inputs.iter().any(|&v| self.g.values[v].requires_grad) || params.iter().any(|&p| self.g.params[p].trainable)
    }

    /// Appends a node with one output of `shape` and `dtype`.
    fn push_typed(
        &mut self,
        op: Op,
        inputs: Vec<ValueId>,
        params: Vec<ParamId>,
        shape: Shape,
        dtype: DType,
    ) -> ValueId {
        let grad = dtype == DType::F32 && self.grad_of(&inputs, &params) && !matches!(op, Op::Argmax);
        let out = self.value(shape, dtype, grad);
        self.g.nodes.push(Node { op, inputs, params, outputs: vec![out] });
        out
    }

    /// Appends a node whose output has its first input's dtype.
    fn push(&mut self, op: Op, inputs: Vec<ValueId>, params: Vec<ParamId>, shape: Shape) -> ValueId {
        let dtype = inputs.first().map_or(DType::F32, |&v| self.g.values[v].dtype);
        self.push_typed(op, inputs, params, shape, dtype)
    }

    fn init_bound(fan_in: u64) -> Init {
        Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
    }

    /// A weight and (optionally) a bias of `out` entries, both with PyTorch's default
    /// init for this fan-in, in the current scope.
    fn weight_and_bias(&mut self, weight: Shape, out: u64, fan_in: u64, bias: bool) -> Vec<ParamId> {
        let mut params = vec![self.param("weight", weight, Builder::init_bound(fan_in))];
        if bias {
            params.push(self.param("bias", vec![out], Builder::init_bound(fan_in)));
        }
        params
    }

    /// Params as values, in order.
    fn values_of(&mut self, params: &[ParamId]) -> Vec<ValueId> {
        params.iter().map(|&p| self.param_value(p)).collect()
    }

    /// The number of spatial dimensions of a `[B, C, ...]` input (1 to 3).
    fn spatial_dims(&self, op: &'static str, shape: &[u64]) -> R<usize> {
        let nd = shape.len().saturating_sub(2);
        if !(1..=3).contains(&nd) {
            return Err(self.err(op, format!("expects [B, C, ...] with 1 to 3 spatial dims, got {shape:?}")));
        }
        Ok(nd)
    }

    /// `nn.Linear(in, out)` over the last dimension (weight `[out, in]`).
    pub fn linear(&mut self, name: &str, x: ValueId, out: u64, bias: bool) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let Some(&inf) = shape.last() else {
            return Err(self.err("linear", "needs at least one dimension"));
        };
        let params = self.scope(name, |b| b.weight_and_bias(vec![out, inf], out, inf, bias));
        self.linear_with(x, params, bias)
    }

    /// `F.linear` with existing parameters `[weight, bias?]` (tied weights, MHA's packed
    /// projections).
    pub fn linear_with(&mut self, x: ValueId, params: Vec<ParamId>, bias: bool) -> R<ValueId> {
        let mut shape = self.shape(x).to_vec();
        let w = self.g.params[params[0]].shape.clone();
        if w.len() != 2 || shape.last() != Some(&w[1]) {
            return Err(self.err("linear", format!("input {shape:?} does not match the weight {w:?}")));
        }
        if let Some(last) = shape.last_mut() {
            *last = w[0];
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Linear { bias }, inputs, vec![], shape))
    }

    /// Hugging Face's `Conv1D(out, in)`: weight `[in, out]`, bias.
    pub fn conv1d_hf(&mut self, name: &str, x: ValueId, out: u64) -> R<ValueId> {
        let mut shape = self.shape(x).to_vec();
        let Some(&inf) = shape.last() else {
            return Err(self.err("conv1d", "needs at least one dimension"));
        };
        let params = self.scope(name, |b| {
            vec![b.param("weight", vec![inf, out], Init::Normal(0.02)), b.param("bias", vec![out], Init::Const(0.0))]
        });
        if let Some(last) = shape.last_mut() {
            *last = out;
        }
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Conv1dHf, inputs, vec![], shape))
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
        x: ValueId,
        out: u64,
        kernel: u64,
        stride: u64,
        padding: u64,
        groups: u64,
        bias: bool,
    ) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("conv", &shape)?;
        let cin = shape[1];
        let (o, params) = self.scope(name, |b| -> R<(Shape, Vec<ParamId>)> {
            if groups == 0 || !cin.is_multiple_of(groups) || !out.is_multiple_of(groups) {
                return Err(b.err("conv", format!("{groups} groups must divide {cin} input and {out} output channels")));
            }
            let mut o = vec![shape[0], out];
            for &s in &shape[2..] {
                o.push(b.conv_out("conv", s, kernel, stride, padding)?);
            }
            let fan_in = cin / groups * kernel.pow(nd as u32);
            let mut w = vec![out, cin / groups];
            w.extend(std::iter::repeat_n(kernel, nd));
            Ok((o, b.weight_and_bias(w, out, fan_in, bias)))
        })?;
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::Conv { nd: nd as u8, kernel, stride, padding, groups, bias }, inputs, vec![], o))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose(
        &mut self,
        name: &str,
        x: ValueId,
        out: u64,
        kernel: u64,
        stride: u64,
        padding: u64,
        output_padding: u64,
        bias: bool,
    ) -> R<ValueId> {
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
        let params = self.scope(name, |b| {
            // ConvTranspose's weight is [in, out, k...] and its fan-in is out * k^nd.
            let fan_in = out * kernel.pow(nd as u32);
            let mut w = vec![cin, out];
            w.extend(std::iter::repeat_n(kernel, nd));
            b.weight_and_bias(w, out, fan_in, bias)
        });
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        let op = Op::ConvTranspose { nd: nd as u8, kernel, stride, padding, output_padding, bias };
        Ok(self.push(op, inputs, vec![], o))
    }

    pub fn batch_norm(&mut self, name: &str, x: ValueId) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let c = shape.get(1).copied().ok_or_else(|| self.err("batch_norm", "needs [B, C, ...]"))?;
        if numel(&shape) / c.max(1) < 2 {
            return Err(
                self.err("batch_norm", format!("expected more than 1 value per channel when training, got {shape:?}"))
            );
        }
        let params = self.scope(name, |b| {
            vec![
                b.param("weight", vec![c], Init::Const(1.0)),
                b.param("bias", vec![c], Init::Const(0.0)),
                b.buffer("running_mean", vec![c], DType::F32, Init::Const(0.0)),
                b.buffer("running_var", vec![c], DType::F32, Init::Const(1.0)),
                b.buffer("num_batches_tracked", vec![], DType::I64, Init::Const(0.0)),
            ]
        });
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::BatchNorm { eps: 1e-5 }, inputs, vec![], shape))
    }

    pub fn instance_norm(&mut self, x: ValueId) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        if shape.len() < 3 {
            return Err(self.err("instance_norm", format!("needs [B, C, ...spatial], got {shape:?}")));
        }
        if numel(&shape[2..]) < 2 {
            // PyTorch refuses this in training mode.
            return Err(self.err(
                "instance_norm",
                format!("expected more than 1 spatial element when training, got {shape:?}; use a larger input"),
            ));
        }
        Ok(self.push(Op::InstanceNorm { eps: 1e-5 }, vec![x], vec![], shape))
    }

    pub fn layer_norm(&mut self, name: &str, x: ValueId, eps: f64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let d = *shape.last().ok_or_else(|| self.err("layer_norm", "needs a dimension"))?;
        let params = self.scope(name, |b| {
            vec![b.param("weight", vec![d], Init::Const(1.0)), b.param("bias", vec![d], Init::Const(0.0))]
        });
        let mut inputs = vec![x];
        inputs.extend(self.values_of(&params));
        Ok(self.push(Op::LayerNorm { eps, affine: true }, inputs, vec![], shape))
    }

    /// Layer norm without parameters (`F.layer_norm(x, [C])`).
    pub fn layer_norm_plain(&mut self, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push(Op::LayerNorm { eps: 1e-5, affine: false }, vec![x], vec![], shape)
    }

    /// A TorchScript module applied to `x`, returning a tensor of `shape`.
    pub fn script(&mut self, x: ValueId, shape: Shape) -> ValueId {
        self.push(Op::Script, vec![x], vec![], shape)
    }

    /// `Op::Release` of `held`: values a Python frame kept bound while later ops ran,
    /// going when it returns.
    pub fn release(&mut self, held: Vec<ValueId>) {
        self.g.nodes.push(Node { op: Op::Release, inputs: held, params: vec![], outputs: vec![] });
    }

    pub fn unary(&mut self, op: Op, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push(op, vec![x], vec![], shape)
    }

    pub fn prelu(&mut self, name: &str, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        let p = self.scope(name, |b| b.param("weight", vec![1], Init::Const(0.25)));
        let w = self.param_value(p);
        self.push(Op::Prelu, vec![x, w], vec![], shape)
    }

    fn binary(&mut self, op: Op, a: ValueId, b: ValueId) -> R<ValueId> {
        let name = op.name();
        let shape = broadcast(self.shape(a), self.shape(b))
            .ok_or_else(|| self.err(name, format!("cannot broadcast {:?} with {:?}", self.shape(a), self.shape(b))))?;
        Ok(self.push(op, vec![a, b], vec![], shape))
    }

    pub fn add(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Add, a, b)
    }

    pub fn sub(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Sub, a, b)
    }

    pub fn mul(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Mul, a, b)
    }

    pub fn div(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.binary(Op::Div, a, b)
    }

    /// `a += b`: `b` broadcasts onto `a`'s shape.
    pub fn add_inplace(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        let shape = self.shape(a).to_vec();
        if broadcast(&shape, self.shape(b)).as_deref() != Some(shape.as_slice()) {
            return Err(self.err("add_", format!("cannot add {:?} into {shape:?}", self.shape(b))));
        }
        Ok(self.push(Op::AddInplace, vec![a, b], vec![], shape))
    }

    pub fn mul_scalar(&mut self, x: ValueId, s: f64) -> ValueId {
        self.unary(Op::MulScalar { s }, x)
    }

    pub fn add_scalar(&mut self, x: ValueId, s: f64) -> ValueId {
        self.unary(Op::AddScalar { s }, x)
    }

    pub fn rsub_scalar(&mut self, x: ValueId, s: f64) -> ValueId {
        self.unary(Op::RsubScalar { s }, x)
    }

    pub fn pow_scalar(&mut self, x: ValueId, e: f64) -> ValueId {
        self.unary(Op::PowScalar { e }, x)
    }

    pub fn cat(&mut self, xs: Vec<ValueId>, dim: usize) -> R<ValueId> {
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

    pub fn max_pool(&mut self, x: ValueId, kernel: u64, stride: u64, padding: u64) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let nd = self.spatial_dims("max_pool", &shape)?;
        let mut o = shape[..2].to_vec();
        for &s in &shape[2..] {
            o.push(self.conv_out("max_pool", s, kernel, stride, padding)?);
        }
        Ok(self.push(Op::MaxPool { nd: nd as u8, kernel, stride, padding }, vec![x], vec![], o))
    }

    fn reduced(shape: &[u64], dims: &[usize], keepdim: bool) -> Shape {
        shape
            .iter()
            .enumerate()
            .filter_map(|(i, &d)| if dims.contains(&i) { keepdim.then_some(1) } else { Some(d) })
            .collect()
    }

    pub fn mean(&mut self, x: ValueId, dims: Vec<usize>, keepdim: bool) -> ValueId {
        let o = Builder::reduced(self.shape(x), &dims, keepdim);
        self.push(Op::Mean { dims, keepdim }, vec![x], vec![], o)
    }

    pub fn sum(&mut self, x: ValueId, dims: Vec<usize>, keepdim: bool) -> ValueId {
        let o = Builder::reduced(self.shape(x), &dims, keepdim);
        self.push(Op::Sum { dims, keepdim }, vec![x], vec![], o)
    }

    /// All dimensions of a value, for full reductions.
    pub fn all_dims(&self, x: ValueId) -> Vec<usize> {
        (0..self.shape(x).len()).collect()
    }

    /// `F.normalize(x, dim=-1)`: `x / max(||x||, 1e-12)`.
    pub fn normalize(&mut self, x: ValueId) -> R<ValueId> {
        let mut s = self.shape(x).to_vec();
        if let Some(last) = s.last_mut() {
            *last = 1;
        }
        let n = self.push(Op::VectorNorm, vec![x], vec![], s.clone());
        let n = self.unary(Op::ClampMin { min: 1e-12 }, n);
        let full = self.shape(x).to_vec();
        let n = self.expand(n, full)?;
        self.div(x, n)
    }

    pub fn softmax(&mut self, x: ValueId, dim: usize) -> ValueId {
        self.unary(Op::Softmax { dim }, x)
    }

    pub fn log_softmax(&mut self, x: ValueId, dim: usize) -> ValueId {
        self.unary(Op::LogSoftmax { dim }, x)
    }

    pub fn argmax(&mut self, x: ValueId) -> ValueId {
        let mut s = self.shape(x).to_vec();
        s.pop();
        self.push_typed(Op::Argmax, vec![x], vec![], s, DType::I64)
    }

    pub fn view(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if numel(&shape) != numel(self.shape(x)) {
            return Err(self.err("view", format!("cannot view {:?} as {shape:?}", self.shape(x))));
        }
        Ok(self.push(Op::View { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn reshape(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if numel(&shape) != numel(self.shape(x)) {
            return Err(self.err("reshape", format!("cannot reshape {:?} to {shape:?}", self.shape(x))));
        }
        Ok(self.push(Op::Reshape { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn permute(&mut self, x: ValueId, dims: Vec<usize>) -> R<ValueId> {
        let shape = self.shape(x).to_vec();
        let mut sorted = dims.clone();
        sorted.sort_unstable();
        if sorted != (0..shape.len()).collect::<Vec<_>>() {
            return Err(self.err("permute", format!("{dims:?} is not a permutation of {} dims", shape.len())));
        }
        let o = dims.iter().map(|&d| shape[d]).collect();
        Ok(self.push(Op::Permute { dims }, vec![x], vec![], o))
    }

    pub fn transpose(&mut self, x: ValueId, d0: usize, d1: usize) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape.swap(d0, d1);
        self.push(Op::Transpose { d0, d1 }, vec![x], vec![], shape)
    }

    pub fn unsqueeze(&mut self, x: ValueId, dim: usize) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape.insert(dim, 1);
        self.push(Op::Unsqueeze { dim }, vec![x], vec![], shape)
    }

    pub fn squeeze(&mut self, x: ValueId, dim: usize) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        if shape.get(dim) == Some(&1) {
            shape.remove(dim);
        }
        self.push(Op::Squeeze { dim }, vec![x], vec![], shape)
    }

    pub fn expand(&mut self, x: ValueId, shape: Shape) -> R<ValueId> {
        if broadcast(self.shape(x), &shape).as_deref() != Some(shape.as_slice()) {
            return Err(self.err("expand", format!("cannot expand {:?} to {shape:?}", self.shape(x))));
        }
        Ok(self.push(Op::Expand { shape: shape.clone() }, vec![x], vec![], shape))
    }

    pub fn contiguous(&mut self, x: ValueId) -> ValueId {
        self.unary(Op::Contiguous, x)
    }

    pub fn clone_value(&mut self, x: ValueId) -> ValueId {
        self.unary(Op::Clone, x)
    }

    /// A permute followed by `.contiguous()`.
    pub fn permute_copy(&mut self, x: ValueId, dims: Vec<usize>) -> R<ValueId> {
        let p = self.permute(x, dims)?;
        Ok(self.contiguous(p))
    }

    pub fn select(&mut self, x: ValueId, dim: usize, index: u64) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape.remove(dim);
        self.push(Op::Select { dim, index }, vec![x], vec![], shape)
    }

    pub fn slice(&mut self, x: ValueId, dim: usize, start: u64, len: u64, step: u64) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        shape[dim] = len;
        self.push(Op::Slice { dim, start, len, step }, vec![x], vec![], shape)
    }

    /// `x.split(size, dim)`: equal pieces (the last may be shorter).
    pub fn split(&mut self, x: ValueId, dim: usize, size: u64) -> R<Vec<ValueId>> {
        let shape = self.shape(x).to_vec();
        if size == 0 || dim >= shape.len() {
            return Err(self.err("split", format!("cannot split {shape:?} into pieces of {size} along {dim}")));
        }
        let grad = self.g.values[x].requires_grad;
        let dtype = self.g.values[x].dtype;
        let mut outs = Vec::new();
        let mut at = 0;
        while at < shape[dim] {
            let mut s = shape.clone();
            s[dim] = size.min(shape[dim] - at);
            outs.push(self.value(s, dtype, grad));
            at += size;
        }
        self.g.nodes.push(Node { op: Op::Split { dim, size }, inputs: vec![x], params: vec![], outputs: outs.clone() });
        Ok(outs)
    }

    /// `F.pad(x, ...)` with zeros, `(before, after)` for each of the last dimensions.
    pub fn pad(&mut self, x: ValueId, pads: Vec<(u64, u64)>) -> ValueId {
        let mut shape = self.shape(x).to_vec();
        let mut full = vec![(0, 0); shape.len()];
        let off = shape.len().saturating_sub(pads.len());
        for (i, p) in pads.into_iter().enumerate() {
            full[off + i] = p;
            shape[off + i] += p.0 + p.1;
        }
        self.push(Op::Pad { pads: full }, vec![x], vec![], shape)
    }

    pub fn roll(&mut self, x: ValueId, shifts: Vec<i64>, dims: Vec<usize>) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push(Op::Roll { shifts, dims }, vec![x], vec![], shape)
    }

    /// `table[ids]` with an embedding table parameter.
    pub fn embedding(&mut self, name: &str, ids: ValueId, rows: u64, dim: u64) -> ValueId {
        let p = self.scope(name, |b| b.param("weight", vec![rows, dim], Init::Normal(1.0)));
        let t = self.param_value(p);
        self.embedding_with(ids, t)
    }

    /// An embedding lookup into a table value (`[rows, dim]`).
    pub fn embedding_with(&mut self, ids: ValueId, table: ValueId) -> ValueId {
        let mut shape = self.shape(ids).to_vec();
        shape.push(self.shape(table)[1]);
        self.push_typed(Op::Embedding, vec![table, ids], vec![], shape, DType::F32)
    }

    /// `x[arange(B), idx]`.
    pub fn index_rows(&mut self, x: ValueId, idx: ValueId) -> R<ValueId> {
        let s = self.shape(x).to_vec();
        if s.len() != 3 || self.shape(idx) != [s[0]] {
            return Err(self.err("index", format!("needs [B, T, D] and [B] indices, got {s:?}")));
        }
        Ok(self.push_typed(Op::IndexRows, vec![x, idx], vec![], vec![s[0], s[2]], DType::F32))
    }

    /// `x[idx]` for a 1-D int64 index.
    pub fn index(&mut self, x: ValueId, idx: ValueId) -> ValueId {
        let mut s = self.shape(x).to_vec();
        s[0] = self.shape(idx)[0];
        let dtype = self.dtype(x);
        self.push_typed(Op::Index, vec![x, idx], vec![], s, dtype)
    }

    /// `torch.matmul(a, b)` for 2-D or batched operands.
    pub fn matmul(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        let (sa, sb) = (self.shape(a).to_vec(), self.shape(b).to_vec());
        if sa.len() < 2 || sb.len() < 2 || sa[sa.len() - 1] != sb[sb.len() - 2] {
            return Err(self.err("matmul", format!("cannot multiply {sa:?} by {sb:?}")));
        }
        let batch = broadcast(&sa[..sa.len() - 2], &sb[..sb.len() - 2])
            .ok_or_else(|| self.err("matmul", format!("batch dimensions of {sa:?} and {sb:?} do not broadcast")))?;
        let mut o = batch;
        o.extend([sa[sa.len() - 2], sb[sb.len() - 1]]);
        Ok(self.push(Op::MatMul, vec![a, b], vec![], o))
    }

    /// Scaled dot-product attention over `[B, H, N, hd]` queries and `[B, H, S, hd]` keys
    /// and values, with an optional additive mask that broadcasts to `[B, H, N, S]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        mask: Option<ValueId>,
        causal: bool,
        dropout: f64,
        scale: Option<f64>,
    ) -> R<ValueId> {
        let (sq, sk, sv) = (self.shape(q).to_vec(), self.shape(k).to_vec(), self.shape(v).to_vec());
        if sq.len() != 4 || sk.len() != 4 || sk != sv || sq[..2] != sk[..2] || sq[3] != sk[3] {
            return Err(self.err("attention", format!("q {sq:?}, k {sk:?}, v {sv:?} are not [B, H, N, hd]")));
        }
        let mut inputs = vec![q, k, v];
        if let Some(m) = mask {
            if broadcast(self.shape(m), &[sq[0], sq[1], sq[2], sk[2]]).as_deref() != Some(&[sq[0], sq[1], sq[2], sk[2]])
            {
                return Err(self.err("attention", format!("mask {:?} does not broadcast to the scores", self.shape(m))));
            }
            inputs.push(m);
        }
        Ok(self.push(Op::Attention { causal, dropout, scale }, inputs, vec![], sq))
    }

    /// `nn.Dropout(p)`; a no-op for `p = 0`, as in PyTorch.
    pub fn dropout(&mut self, x: ValueId, p: f64) -> ValueId {
        if p <= 0.0 {
            return x;
        }
        self.unary(Op::Dropout { p }, x)
    }

    /// Swin's attention mask for shifted windows, made by this forward pass.
    pub fn shifted_window_mask(&mut self, padded: [u64; 3], window: [u64; 3], shift: [u64; 3]) -> ValueId {
        let windows = (0..3).map(|i| padded[i] / window[i].max(1)).product::<u64>();
        let n = window.iter().product::<u64>();
        let v = self.value(vec![windows, n, n], DType::F32, false);
        self.g.nodes.push(Node {
            op: Op::ShiftedWindowMask { padded, window, shift },
            inputs: vec![],
            params: vec![],
            outputs: vec![v],
        });
        v
    }

    /// `x.to(like.dtype)`.
    pub fn cast_like(&mut self, x: ValueId, like: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        let dtype = self.dtype(x);
        self.push_typed(Op::CastLike, vec![x, like], vec![], shape, dtype)
    }

    pub fn to_f32(&mut self, x: ValueId) -> ValueId {
        self.unary(Op::ToF32, x)
    }

    pub fn to_i64(&mut self, x: ValueId) -> ValueId {
        let shape = self.shape(x).to_vec();
        self.push_typed(Op::ToI64, vec![x], vec![], shape, DType::I64)
    }

    /// `nll_loss` (mean) of log-probabilities `[N, C, ...]` against int64 targets `[N, ...]`.
    pub fn nll_loss(&mut self, log_probs: ValueId, target: ValueId, ignore_index: i64) -> R<ValueId> {
        let (s, t) = (self.shape(log_probs).to_vec(), self.shape(target).to_vec());
        let mut want = s.clone();
        if want.len() > 1 {
            want.remove(1);
        }
        if t != want || self.dtype(target) != DType::I64 {
            return Err(self.err("nll_loss", format!("targets {t:?} do not match log-probabilities {s:?}")));
        }
        Ok(self.push_typed(Op::NllLoss { ignore_index }, vec![log_probs, target], vec![], vec![], DType::F32))
    }

    pub fn bce_with_logits(&mut self, logits: ValueId, target: ValueId) -> R<ValueId> {
        if self.shape(logits) != self.shape(target) {
            return Err(self.err(
                "bce_with_logits",
                format!("targets {:?} do not match logits {:?}", self.shape(target), self.shape(logits)),
            ));
        }
        Ok(self.push_typed(Op::BceWithLogits, vec![logits, target], vec![], vec![], DType::F32))
    }

    pub fn one_hot(&mut self, labels: ValueId, classes: u64) -> ValueId {
        let mut s = self.shape(labels).to_vec();
        if s.len() > 1 {
            s[1] = classes;
        }
        self.push_typed(Op::OneHot { classes }, vec![labels], vec![], s, DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Builder, ValueId) {
        let mut b = Builder::new(Task::Classify { classes: 10 });
        let x = b.input(vec![2, 1024], InputKind::Real);
        (b, x)
    }

    #[test]
    fn linear_counts_weights_and_biases_and_infers_shapes() {
        let (mut b, x) = tiny();
        let h = b.linear("fc1", x, 4096, true).expect("fc1");
        let o = b.linear("fc2", h, 10, false).expect("fc2");
        let y = b.input(vec![2], InputKind::ClassIndex { classes: 10 });
        let start = b.next_node();
        let lp = b.log_softmax(o, 1);
        let loss = b.nll_loss(lp, y, -100).expect("loss");
        let g = b.finish(vec![o], loss, start);
        assert_eq!(g.n_params(), 1024 * 4096 + 4096 + 4096 * 10);
        assert_eq!(g.values[o].shape, vec![2, 10]);
        assert_eq!(g.params[2].name, "fc2.weight");
        assert!(g.values[g.loss].shape.is_empty() && g.values[g.loss].requires_grad);
        assert!(!g.values[y].requires_grad, "labels need no gradient");
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
        let y = b.input(vec![1, 5], InputKind::Real);
        let err = b.add(x, y).expect_err("broadcast");
        assert!(err.to_string().contains("cannot broadcast"), "{err}");
    }

    #[test]
    fn broadcasting_follows_pytorch() {
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[5], &[]), Some(vec![5]));
        assert_eq!(broadcast(&[2, 3], &[4]), None);
    }

    #[test]
    fn checkpoint_regions_follow_checkpoint_sequential_and_blocks() {
        let mut b = Builder::new(Task::Classify { classes: 2 });
        let mut x = b.input(vec![1, 4], InputKind::Real);
        for i in 0..4 {
            x = b.stage(|b| b.block(|b| b.linear(&format!("l{i}"), x, 4, true))).expect("layer");
        }
        let y = b.input(vec![1], InputKind::ClassIndex { classes: 2 });
        let start = b.next_node();
        let lp = b.log_softmax(x, 1);
        let loss = b.nll_loss(lp, y, -100).expect("loss");
        let g = b.finish(vec![x], loss, start);
        let n = g.nodes.len();
        // Each linear is three nodes (weight, bias, linear).
        assert_eq!(g.regions(Checkpoint::Off), vec![Region { nodes: 0..n, checkpointed: false }]);
        let seg = g.regions(Checkpoint::Segments(2));
        assert_eq!(
            seg,
            vec![Region { nodes: 0..6, checkpointed: true }, Region { nodes: 6..n, checkpointed: false }],
            "two segments: the first two stages checkpointed, the rest run normally"
        );
        assert_eq!(g.regions(Checkpoint::Segments(5)).len(), 1, "more segments than stages is refused by validation");
        let blocks = g.regions(Checkpoint::Blocks);
        assert_eq!(blocks.iter().filter(|r| r.checkpointed).count(), 4);
        assert_eq!(blocks.last().map(|r| r.checkpointed), Some(false), "the loss is never checkpointed");
    }
}
