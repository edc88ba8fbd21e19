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

mod builder;
mod op;

pub use builder::Builder;
pub use op::{Cmp, Op, OpFamily};

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
    /// step unless it keeps only the loss (`Plan::keeps_outputs`): logits, Hugging
    /// Face's key/value cache, CLIP's features.
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
    /// The module calls of an exported model (its `nn_module_stack`), with the values
    /// each read from outside: a Python frame may keep its arguments bound until it
    /// returns, which an exported graph does not say (`Frame`). The zoo spells its
    /// frames out with `Op::Release` instead and leaves this empty.
    pub frames: Vec<Frame>,
}

/// One module call of an exported model: its nodes and the values it read from outside
/// (its arguments). The estimate frees a value after its last use; the interval's high
/// end keeps the arguments until the call returns, as a `forward` that binds them to
/// names it does not rebind does (`src` in `nn.TransformerEncoderLayer.forward`).
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub nodes: Range<usize>,
    pub inputs: Vec<ValueId>,
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
