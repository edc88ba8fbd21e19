//! The machine of the memory simulation of autograd over one micro-batch: tensors and
//! their layouts, reads and autocast's casts, allocation, the tape and the gradient
//! slots. `walk` drives it and `ops` holds the rules; this module calls neither.
//!
//! The simulation as a whole: the forward pass runs each
//! primitive's memory rule — what it allocates, in which layout, what its autograd node
//! saves — and records a tape of autograd nodes; the backward pass runs the tape in
//! reverse, as PyTorch's engine does on one device: each node allocates its inputs'
//! gradients, then releases what it saved and the gradients it consumed; gradients of a
//! value read twice are summed (in place when the first is a dense tensor nobody else
//! holds, else into a new tensor); `AccumulateGrad` steals a parameter's gradient or
//! copies it when its layout differs from the parameter's.
//!
//! Gradient checkpointing marks regions whose forward saves nothing and keeps its inputs.
//! Their saved tensors are recomputed when backward first reaches the region, either as
//! PyTorch's non-reentrant checkpoint does (up to the last tensor anything saves, then on
//! in the same backward pass) or as Headroom's trainer does (the whole region, then a
//! backward call of its own that holds the region's output gradients until it returns).
//!

use std::collections::BTreeMap;

use super::layout;
use super::sim::{Sim, Tensor};
use super::{Category, Kernels};
use crate::graph::{DType, Graph, Op, ParamId, Region, ValueId, numel};

/// Bytes of a half-precision element.
pub(crate) const HALF: u64 = 2;
pub(crate) const F32: u64 = 4;

/// A tensor as the walk sees it: a reference to its storage and its layout.
#[derive(Clone, Debug)]
pub(crate) struct Ten {
    pub st: Tensor,
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
    pub esize: u64,
    /// Shares another tensor's storage (a view); autograd never sums into it in place.
    pub view: bool,
}

impl Ten {
    pub fn numel(&self) -> u64 {
        numel(&self.shape)
    }
    pub fn bytes(&self) -> u64 {
        self.numel().saturating_mul(self.esize)
    }
    pub fn contiguous(&self) -> bool {
        layout::is_contiguous(&self.shape, &self.strides)
    }
    pub fn dense(&self) -> bool {
        layout::is_dense(&self.shape, &self.strides)
    }
    pub fn meta(&self) -> Meta {
        Meta { shape: self.shape.clone(), strides: self.strides.clone(), esize: self.esize }
    }
}

/// Shape, layout and element size of a tensor, as a backward rule needs to know them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub(crate) struct Meta {
    pub shape: Vec<u64>,
    pub strides: Vec<u64>,
    pub esize: u64,
}

impl Meta {
    pub fn bytes(&self) -> u64 {
        numel(&self.shape).saturating_mul(self.esize)
    }
    pub fn numel(&self) -> u64 {
        numel(&self.shape)
    }
    pub fn contiguous(&self) -> bool {
        layout::is_contiguous(&self.shape, &self.strides)
    }
}

/// How gradient checkpointing recomputes a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recompute {
    /// `torch.utils.checkpoint(..., use_reentrant=False)`.
    NonReentrant,
    /// Headroom's trainer: a no-grad forward, then a recompute and a backward call of
    /// its own from the region's outputs.
    Reentrant,
}

/// What a tape node's backward does.
#[derive(Clone, Debug)]
pub(crate) enum Bwd {
    /// The graph node's own rule (`ops::backward`).
    Node,
    /// A part of a composite kernel, with its own rule.
    Part(Part),
    /// An autocast cast: the half-precision gradient becomes one of this element size.
    Cast { esize: u64 },
    /// A parameter's `AccumulateGrad`.
    Accumulate { param: ParamId },
    /// A reentrant checkpoint of this region (`torch.utils.checkpoint(use_reentrant=True)`,
    /// as Headroom's trainer runs it): its backward recomputes the region and runs a
    /// backward of its own.
    Checkpoint { region: usize },
}

/// Autograd nodes inside composite kernels (the CPU's math attention path), whose
/// gradients flow through temporary slots.
#[derive(Clone, Debug)]
pub(crate) enum Part {
    /// `bmm(a, b)` on 3-D operands laid out as in `in_meta`.
    Bmm,
    /// Multiplication by a scalar.
    Scale,
    /// `x * noise` (dropout), the noise saved.
    MulSaved,
    /// `_safe_softmax` (its output saved).
    Softmax,
    /// A view whose backward reshapes the gradient to the input's shape.
    View,
    /// A dtype cast whose backward casts the gradient back.
    Cast,
}

#[derive(Debug)]
pub(crate) struct TapeNode {
    pub node: usize,
    pub bwd: Bwd,
    pub saved: Vec<Ten>,
    /// Gradient slots this node reads (its forward outputs).
    pub outs: Vec<usize>,
    /// Gradient slots it writes (its forward inputs), `None` where no gradient is needed.
    pub ins: Vec<Option<usize>>,
    pub in_meta: Vec<Meta>,
    pub out_meta: Vec<Meta>,
    /// The checkpointed region whose recompute fills `saved`.
    pub pending: Option<usize>,
    /// Executed (or skipped for good) already.
    pub done: bool,
}

/// What an op reads: the tensor, and the gradient slot its gradient goes to.
#[derive(Clone, Debug)]
pub(crate) struct Read {
    pub t: Ten,
    pub slot: Option<usize>,
}

pub(crate) struct Engine<'g> {
    pub g: &'g Graph,
    pub kernels: Kernels,
    /// Autocast: matrix products and convolutions in half precision.
    pub amp: bool,
    /// The tensor each value's variable holds.
    pub vals: Vec<Option<Ten>>,
    pub last_use: Vec<Option<usize>>,
    pub tape: Vec<TapeNode>,
    pub grads: BTreeMap<usize, Ten>,
    pub(super) next_slot: usize,
    /// Under autocast: each parameter's half-precision copy and its cast's slot, cached
    /// until autocast ends.
    pub(super) casts: BTreeMap<ParamId, Read>,
    /// Each parameter's storage (weights and buffers).
    pub param_store: Vec<Tensor>,
    /// `.grad` of each trainable parameter.
    pub param_grads: Vec<Option<Ten>>,
    /// The producing node of each value.
    pub(super) producer: Vec<Option<usize>>,
    /// The first `Op::Param` node of each parameter: its `AccumulateGrad` sits there.
    pub(super) first_param_node: Vec<Option<usize>>,
    pub first_micro_batch: bool,
    /// Checkpointing.
    pub regions: Vec<Region>,
    pub region_of: Vec<usize>,
    pub recompute: Option<Recompute>,
    /// Inputs a checkpointed region keeps for its recompute.
    pub kept: Vec<Vec<(ValueId, Ten)>>,
    /// What each region hands on (`Graph::region_outputs`), computed once.
    pub(super) region_outs: Vec<Vec<ValueId>>,
    /// Whether the forward records autograd nodes (off in a reentrant region's forward).
    pub grad_mode: bool,
    /// `model.train()` (true) or `model.eval()`: dropout passes its input through and
    /// batch norm uses its running statistics.
    pub training: bool,
    /// PyTorch's eval-mode fast path for `nn.MultiheadAttention` (`Graph::fused_attention`):
    /// set for a PyTorch validation pass without autocast.
    pub fused_attention: bool,
    /// Whether recorded nodes keep their saved tensors (off in a non-reentrant
    /// checkpointed region, whose nodes wait for the recompute).
    pub pending: Option<usize>,
    /// Slots where gradients stop: outputs of reentrant checkpointed regions.
    pub leaf: Vec<bool>,
    /// The node being run, for labels.
    pub current: usize,
    /// A non-reentrant recompute is running: parameters' `AccumulateGrad` nodes exist
    /// already.
    pub(super) recomputing: bool,
    /// Per checkpointed region, its tape nodes still to run after its recompute: the
    /// kept inputs go when none is left (PyTorch saves them on the region's first node).
    pub(super) left: Vec<usize>,
    /// While a reentrant checkpoint recomputes: the slots its detached inputs give.
    pub(super) redirect: BTreeMap<ValueId, usize>,
    /// The first value an op read that the walk no longer held: an inconsistency in the
    /// graph or the rules, reported as an error instead of a smaller figure.
    pub lost: std::cell::Cell<Option<ValueId>>,
    /// Module calls' arguments the estimate freed while the call still runs
    /// (`Graph::frames`); `None` for a graph without frames.
    pub(super) frames: Option<FrameState>,
}

/// What the module calls running at a node may still hold of their arguments that the
/// estimate has freed, kept as a running sum: a value counts while any open call took
/// it as an argument.
#[derive(Clone, Debug)]
pub(crate) struct FrameState {
    /// Per node, the calls that begin and end there.
    opens: Vec<Vec<usize>>,
    closes: Vec<Vec<usize>>,
    /// Per value, how many open calls took it.
    open_in: Vec<u32>,
    /// Per value, the bytes its drop freed (0: not freed, or nothing freed).
    freed: Vec<u64>,
    /// The sum of `freed` over values some open call took.
    pub held: u64,
    /// The first node `enter` has not seen.
    next: usize,
}

impl FrameState {
    fn new(g: &Graph) -> FrameState {
        let n = g.nodes.len() + 1;
        let (mut opens, mut closes) = (vec![Vec::new(); n], vec![Vec::new(); n]);
        for (k, f) in g.frames.iter().enumerate() {
            opens[f.nodes.start.min(n - 1)].push(k);
            closes[f.nodes.end.min(n - 1)].push(k);
        }
        FrameState { opens, closes, open_in: vec![0; g.values.len()], freed: vec![0; g.values.len()], held: 0, next: 0 }
    }

    /// Starts a forward pass over nodes from `start`: calls already running are open.
    pub fn reset(&mut self, g: &Graph, start: usize) {
        self.open_in.iter_mut().for_each(|c| *c = 0);
        self.freed.iter_mut().for_each(|b| *b = 0);
        self.held = 0;
        self.next = start;
        // Calls running at `start`, and those ending there, which `enter(start)` closes.
        for f in g.frames.iter().filter(|f| f.nodes.start < start && start <= f.nodes.end) {
            for &v in &f.inputs {
                self.open_in[v] += 1;
            }
        }
    }

    /// Node `i` is next: the calls ending up to it close, those starting up to it open
    /// (nodes a fused block skipped included).
    pub fn enter(&mut self, g: &Graph, i: usize) {
        for j in self.next..=i.min(self.closes.len() - 1) {
            for &k in &self.closes[j] {
                for &v in &g.frames[k].inputs {
                    self.open_in[v] = self.open_in[v].saturating_sub(1);
                    if self.open_in[v] == 0 {
                        self.held -= std::mem::take(&mut self.freed[v]);
                    }
                }
            }
            for &k in &self.opens[j] {
                for &v in &g.frames[k].inputs {
                    self.open_in[v] += 1;
                }
            }
        }
        self.next = self.next.max(i + 1);
    }

    /// Value `v` was dropped after its last use, freeing `bytes`.
    pub fn dropped(&mut self, v: crate::graph::ValueId, bytes: u64) {
        if self.open_in[v] > 0 && self.freed[v] == 0 {
            self.freed[v] = bytes;
            self.held += bytes;
        }
    }
}

impl<'g> Engine<'g> {
    pub fn new(g: &'g Graph, kernels: Kernels, amp: bool, param_store: Vec<Tensor>) -> Engine<'g> {
        let mut first_param_node = vec![None; g.params.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            if let Op::Param = n.op {
                first_param_node[n.params[0]].get_or_insert(i);
            }
        }
        let slots = g.values.len() + g.params.len();
        Engine {
            g,
            kernels,
            amp,
            vals: vec![None; g.values.len()],
            last_use: g.last_use(),
            tape: Vec::new(),
            grads: BTreeMap::new(),
            next_slot: slots,
            casts: BTreeMap::new(),
            param_store,
            param_grads: vec![None; g.params.len()],
            producer: g.producer(),
            first_param_node,
            first_micro_batch: true,
            regions: vec![Region { nodes: 0..g.nodes.len(), checkpointed: false }],
            region_of: vec![0; g.nodes.len()],
            recompute: None,
            kept: vec![Vec::new()],
            region_outs: vec![Vec::new()],
            grad_mode: true,
            training: true,
            fused_attention: false,
            pending: None,
            leaf: vec![false; slots],
            current: 0,
            recomputing: false,
            left: vec![0],
            redirect: BTreeMap::new(),
            lost: std::cell::Cell::new(None),
            frames: (!g.frames.is_empty()).then(|| FrameState::new(g)),
        }
    }

    /// Sets up gradient checkpointing over these regions.
    pub fn checkpoint(&mut self, regions: Vec<Region>, style: Recompute) {
        self.region_of = vec![0; self.g.nodes.len()];
        for (r, reg) in regions.iter().enumerate() {
            for i in reg.nodes.clone() {
                self.region_of[i] = r;
            }
        }
        self.kept = vec![Vec::new(); regions.len()];
        self.left = vec![0; regions.len()];
        self.region_outs = regions.iter().map(|r| self.g.region_outputs(r)).collect();
        self.regions = regions;
        self.recompute = Some(style);
    }

    pub fn cpu(&self) -> bool {
        matches!(self.kernels, Kernels::Cpu { .. })
    }

    /// The parameter a value reads, when an `Op::Param` node made it.
    pub fn param_of(&self, v: ValueId) -> Option<ParamId> {
        let n = &self.g.nodes[self.producer[v]?];
        matches!(n.op, Op::Param).then(|| n.params[0])
    }

    /// The gradient slot of a value: one slot per parameter, however often it is read.
    pub fn slot(&self, v: ValueId) -> usize {
        match self.param_of(v) {
            Some(p) => self.param_slot(p),
            None => v.index(),
        }
    }

    pub fn temp_slot(&mut self) -> usize {
        let s = self.next_slot;
        self.next_slot += 1;
        self.leaf.push(false);
        s
    }

    /// The slot of a trainable parameter.
    pub(super) fn param_slot(&self, p: ParamId) -> usize {
        self.g.values.len() + p.index()
    }

    pub(super) fn slot_param(&self, slot: usize) -> Option<ParamId> {
        let n = self.g.values.len();
        (slot >= n && slot < n + self.g.params.len()).then(|| ParamId(slot - n))
    }

    /// Gradients of parameters count as gradients from the moment they are made on the
    /// first micro-batch (they become `.grad`); everything else flowing is temporary.
    pub fn grad_category(&self, slot: Option<usize>) -> Category {
        match slot.and_then(|s| self.slot_param(s)) {
            Some(p) if self.first_micro_batch && self.param_grads[p].is_none() => Category::Gradients,
            _ => Category::Temporaries,
        }
    }

    // --- tensors --------------------------------------------------------------------

    pub fn alloc(&self, sim: &mut Sim, shape: &[u64], strides: Vec<u64>, esize: u64, cat: Category) -> Ten {
        let st = sim.alloc(numel(shape).saturating_mul(esize), cat);
        Ten { st, shape: shape.to_vec(), strides, esize, view: false }
    }

    pub fn alloc_contig(&self, sim: &mut Sim, shape: &[u64], esize: u64, cat: Category) -> Ten {
        self.alloc(sim, shape, layout::contiguous(shape), esize, cat)
    }

    /// A new tensor laid out like `m` (`empty_like`).
    pub fn alloc_like(&self, sim: &mut Sim, m: &Meta, esize: u64, cat: Category) -> Ten {
        self.alloc(sim, &m.shape, layout::like(&m.shape, &m.strides), esize, cat)
    }

    /// Allocates and frees at once: a buffer inside one kernel call.
    pub fn transient(&self, sim: &mut Sim, bytes: u64) {
        sim.transient(bytes, Category::Temporaries);
    }

    pub fn view_of(sim: &mut Sim, t: &Ten, shape: Vec<u64>, strides: Vec<u64>) -> Ten {
        Ten { st: sim.retain(t.st), shape, strides, esize: t.esize, view: true }
    }

    pub fn share(sim: &mut Sim, t: &Ten) -> Ten {
        Ten { st: sim.retain(t.st), ..t.clone() }
    }

    pub fn release(sim: &mut Sim, t: Ten) {
        sim.release(t.st);
    }

    /// `.contiguous()`: the tensor itself or a copy.
    pub fn contiguous(&self, sim: &mut Sim, t: &Ten, cat: Category) -> Ten {
        if t.contiguous() { Engine::share(sim, t) } else { self.alloc_contig(sim, &t.shape, t.esize, cat) }
    }

    /// `.reshape(shape)`: a view when the layout allows it, else a contiguous copy.
    /// Returns whether it copied.
    pub fn reshape(&self, sim: &mut Sim, t: &Ten, shape: &[u64], cat: Category) -> (Ten, bool) {
        match layout::view(&t.shape, &t.strides, shape) {
            Some(strides) => (Engine::view_of(sim, t, shape.to_vec(), strides), false),
            None => (self.alloc_contig(sim, shape, t.esize, cat), true),
        }
    }

    /// Hands the walk a tensor for value `v` (the walk takes its own reference).
    pub fn set_value(&mut self, sim: &mut Sim, v: ValueId, t: &Ten) {
        if let Some(old) = self.vals[v].replace(Engine::share(sim, t)) {
            Engine::release(sim, old);
        }
    }

    pub fn drop_value(&mut self, sim: &mut Sim, v: ValueId) {
        if let Some(t) = self.vals[v].take() {
            Engine::release(sim, t);
        }
    }

    /// What an op reads for value `v` as it is.
    pub fn read(&self, sim: &mut Sim, v: ValueId) -> Read {
        let t = match self.vals[v].as_ref() {
            Some(t) => Engine::share(sim, t),
            // A value the walk lost: recorded (the estimate then fails), and a zero-byte
            // stand-in lets the walk finish.
            None => {
                if self.lost.get().is_none() {
                    self.lost.set(Some(v));
                }
                Ten {
                    st: Tensor::NONE,
                    shape: self.g.values[v].shape.clone(),
                    strides: layout::contiguous(&self.g.values[v].shape),
                    esize: self.g.values[v].dtype.size(),
                    view: true,
                }
            }
        };
        let slot = (self.grad_mode && self.g.values[v].requires_grad)
            .then(|| self.redirect.get(&v).copied().unwrap_or_else(|| self.slot(v)));
        Read { t, slot }
    }

    /// What an op autocast runs in lower precision reads: a half-precision copy of a
    /// fp32 input (parameters' copies cached until autocast ends).
    pub fn read_low(&mut self, sim: &mut Sim, v: ValueId) -> Read {
        let r = self.read(sim, v);
        if !self.amp || r.t.esize != F32 || self.g.values[v].dtype != DType::F32 {
            return r;
        }
        if let Some(p) = self.param_of(v) {
            if let Some(c) = self.casts.get(&p) {
                let c = Read { t: Engine::share(sim, &c.t), slot: c.slot };
                Engine::release(sim, r.t);
                return c;
            }
            let c = self.cast(sim, r, HALF, Category::Temporaries);
            self.casts.insert(p, Read { t: Engine::share(sim, &c.t), slot: c.slot });
            return c;
        }
        self.cast(sim, r, HALF, Category::Activations)
    }

    /// What an op autocast runs in fp32 (CUDA's list) reads: fp32 copies of half inputs.
    pub fn read_f32(&mut self, sim: &mut Sim, v: ValueId) -> Read {
        let r = self.read(sim, v);
        if !self.amp || self.cpu() || r.t.esize != HALF {
            return r;
        }
        self.cast(sim, r, F32, Category::Activations)
    }

    /// Reads `v` for an op on autocast's CPU fp32 list only (3-D pooling: `max_pool3d`,
    /// `avg_pool3d`): a half-precision input is copied to fp32 on the CPU, read as it is
    /// on CUDA.
    pub fn read_f32_on_cpu(&mut self, sim: &mut Sim, v: ValueId) -> Read {
        let r = self.read(sim, v);
        if !self.amp || !self.cpu() || r.t.esize != HALF {
            return r;
        }
        self.cast(sim, r, F32, Category::Activations)
    }

    /// A dtype copy of `r` as its own autograd node.
    pub fn cast(&mut self, sim: &mut Sim, r: Read, esize: u64, cat: Category) -> Read {
        let c = self.alloc(sim, &r.t.shape, layout::like(&r.t.shape, &r.t.strides), esize, cat);
        let slot = r.slot.map(|from| {
            let s = self.temp_slot();
            self.push(
                Bwd::Cast { esize: r.t.esize },
                Vec::new(),
                vec![s],
                vec![Some(from)],
                vec![r.t.meta()],
                vec![c.meta()],
            );
            s
        });
        Engine::release(sim, r.t);
        Read { t: c, slot }
    }

    /// Leaving autocast clears its cache of parameter copies.
    pub fn clear_casts(&mut self, sim: &mut Sim) {
        for (_, c) in std::mem::take(&mut self.casts) {
            Engine::release(sim, c.t);
        }
    }

    /// Records an autograd node (in grad mode and when some input needs a gradient).
    /// Returns whether it did.
    pub fn push(
        &mut self,
        bwd: Bwd,
        saved: Vec<Ten>,
        outs: Vec<usize>,
        ins: Vec<Option<usize>>,
        in_meta: Vec<Meta>,
        out_meta: Vec<Meta>,
    ) -> bool {
        if !self.grad_mode || ins.iter().all(Option::is_none) {
            return false;
        }
        self.tape.push(TapeNode {
            node: self.current,
            bwd,
            saved,
            outs,
            ins,
            in_meta,
            out_meta,
            pending: self.pending,
            done: false,
        });
        true
    }

    /// `push`, then the node keeps `saved` — unless no node was recorded (no input needs a
    /// gradient) or it waits in a non-reentrant checkpointed region (its recompute will
    /// save them): then they are released.
    #[allow(clippy::too_many_arguments)]
    pub fn push_saving(
        &mut self,
        sim: &mut Sim,
        bwd: Bwd,
        saved: Vec<Ten>,
        outs: Vec<usize>,
        ins: Vec<Option<usize>>,
        in_meta: Vec<Meta>,
        out_meta: Vec<Meta>,
    ) {
        let recorded = self.push(bwd, Vec::new(), outs, ins, in_meta, out_meta);
        match self.tape.last_mut() {
            Some(t) if recorded && self.pending.is_none() => t.saved = saved,
            _ => {
                for t in saved {
                    Engine::release(sim, t);
                }
            }
        }
    }

    // --- the forward pass -------------------------------------------------------------
}
