//! The primitive operations a graph is made of, and the families the estimator's and
//! the trainer's rules are grouped by.

use super::*;

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
    /// Average pooling with `count_include_pad`, equal kernel, stride and padding.
    AvgPool {
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
    /// `x * sigmoid(x)`; in place, autograd saves a copy of the input first.
    Silu {
        inplace: bool,
    },
    /// MobileNetV3's `x * relu6(x + 3) / 6`; in place, a copy of the input is saved.
    Hardswish {
        inplace: bool,
    },
    /// `relu6(x + 3) / 6`; in place, a copy of the input is saved.
    Hardsigmoid {
        inplace: bool,
    },
    /// `F.hardtanh(x, min, max)` (ReLU6 is `0, 6`); in place, a copy of the input is
    /// saved.
    Hardtanh {
        min: f64,
        max: f64,
        inplace: bool,
    },
    /// `F.interpolate` to `size` (the spatial sizes): nearest, or (bi/tri)linear with
    /// `align_corners`; `scales` as the call gave them (empty: from the sizes).
    Upsample {
        linear: bool,
        align_corners: bool,
        size: Vec<u64>,
        scales: Vec<f64>,
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
    /// `F.dropout(x, p, training, inplace)`.
    Dropout {
        p: f64,
        inplace: bool,
    },
    /// `F.mse_loss(x, target)` with mean reduction.
    MseLoss,
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
    /// `torch.arange(end)`: int64 `[end]`, made by the forward pass.
    Arange {
        end: u64,
    },
    /// `x.gather(dim, index)`: the entries of `x` at int64 `index` along `dim`, shaped
    /// like `index`.
    Gather {
        dim: usize,
    },
    /// `x <op> s` element-wise: a boolean tensor, no gradient.
    CompareScalar {
        cmp: Cmp,
        s: f64,
    },
}

/// The comparison of `Op::CompareScalar`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    pub fn from_word(word: &str) -> Option<Cmp> {
        Some(match word {
            "eq" => Cmp::Eq,
            "ne" => Cmp::Ne,
            "lt" => Cmp::Lt,
            "le" => Cmp::Le,
            "gt" => Cmp::Gt,
            "ge" => Cmp::Ge,
            _ => return None,
        })
    }

    pub fn word(self) -> &'static str {
        match self {
            Cmp::Eq => "eq",
            Cmp::Ne => "ne",
            Cmp::Lt => "lt",
            Cmp::Le => "le",
            Cmp::Gt => "gt",
            Cmp::Ge => "ge",
        }
    }
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
            Op::Silu { inplace: false } => "silu",
            Op::Silu { inplace: true } => "silu_",
            Op::Hardswish { inplace: false } => "hardswish",
            Op::Hardswish { inplace: true } => "hardswish_",
            Op::Hardsigmoid { inplace: false } => "hardsigmoid",
            Op::Hardsigmoid { inplace: true } => "hardsigmoid_",
            Op::AvgPool { .. } => "avg_pool",
            Op::Hardtanh { inplace: false, .. } => "hardtanh",
            Op::Hardtanh { inplace: true, .. } => "hardtanh_",
            Op::Upsample { linear: false, .. } => "upsample_nearest",
            Op::Upsample { linear: true, .. } => "upsample_linear",
            Op::MseLoss => "mse_loss",
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
            Op::Dropout { inplace: false, .. } => "dropout",
            Op::Dropout { inplace: true, .. } => "dropout_",
            Op::ShiftedWindowMask { .. } => "shifted_window_mask",
            Op::ToF32 => "float",
            Op::CastLike => "to_dtype_of",
            Op::NllLoss { .. } => "nll_loss",
            Op::BceWithLogits => "bce_with_logits",
            Op::OneHot { .. } => "one_hot",
            Op::ToI64 => "long",
            Op::Arange { .. } => "arange",
            Op::Gather { .. } => "gather",
            Op::CompareScalar { cmp, .. } => cmp.word(),
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
            | Op::Silu { .. }
            | Op::Hardswish { .. }
            | Op::Hardsigmoid { .. }
            | Op::Hardtanh { .. }
            | Op::Tanh
            | Op::Exp
            | Op::MulScalar { .. }
            | Op::AddScalar { .. }
            | Op::RsubScalar { .. }
            | Op::ToF32
            | Op::CastLike
            | Op::ToI64
            | Op::CompareScalar { .. }
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
            Op::Embedding
            | Op::IndexRows
            | Op::Index
            | Op::OneHot { .. }
            | Op::MaxPool { .. }
            | Op::AvgPool { .. }
            | Op::Arange { .. }
            | Op::Gather { .. }
            | Op::Upsample { .. } => Index,
            Op::Attention { .. } | Op::ShiftedWindowMask { .. } => Attention,
            Op::NllLoss { .. } | Op::BceWithLogits | Op::MseLoss => Loss,
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
