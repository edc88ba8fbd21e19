//! A memory simulation of autograd over one micro-batch. The forward pass runs each
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
//! The op rules live in `rules.rs`; this module is the machinery.

use std::collections::BTreeMap;

use super::layout;
use super::sim::{Sim, Tensor};
use super::{Category, Kernels};
use crate::graph::{DType, Graph, Op, Region, numel};

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
    /// The graph node's own rule (`rules::backward`).
    Node,
    /// A part of a composite kernel, with its own rule.
    Part(Part),
    /// An autocast cast: the half-precision gradient becomes one of this element size.
    Cast { esize: u64 },
    /// A parameter's `AccumulateGrad`.
    Accumulate { param: usize },
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
    next_slot: usize,
    /// Under autocast: each parameter's half-precision copy and its cast's slot, cached
    /// until autocast ends.
    casts: BTreeMap<usize, Read>,
    /// Each parameter's storage (weights and buffers).
    pub param_store: Vec<Tensor>,
    /// `.grad` of each trainable parameter.
    pub param_grads: Vec<Option<Ten>>,
    /// The producing node of each value.
    producer: Vec<Option<usize>>,
    /// The first `Op::Param` node of each parameter: its `AccumulateGrad` sits there.
    first_param_node: Vec<Option<usize>>,
    pub first_micro_batch: bool,
    /// Checkpointing.
    pub regions: Vec<Region>,
    pub region_of: Vec<usize>,
    pub recompute: Option<Recompute>,
    /// Inputs a checkpointed region keeps for its recompute.
    pub kept: Vec<Vec<(usize, Ten)>>,
    /// What each region hands on (`Graph::region_outputs`), computed once.
    region_outs: Vec<Vec<usize>>,
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
    recomputing: bool,
    /// Per checkpointed region, its tape nodes still to run after its recompute: the
    /// kept inputs go when none is left (PyTorch saves them on the region's first node).
    left: Vec<usize>,
    /// While a reentrant checkpoint recomputes: the slots its detached inputs give.
    redirect: BTreeMap<usize, usize>,
    /// The first value an op read that the walk no longer held: an inconsistency in the
    /// graph or the rules, reported as an error instead of a smaller figure.
    pub lost: std::cell::Cell<Option<usize>>,
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
    pub fn param_of(&self, v: usize) -> Option<usize> {
        let n = &self.g.nodes[self.producer[v]?];
        matches!(n.op, Op::Param).then(|| n.params[0])
    }

    /// The gradient slot of a value: one slot per parameter, however often it is read.
    pub fn slot(&self, v: usize) -> usize {
        match self.param_of(v) {
            Some(p) => self.g.values.len() + p,
            None => v,
        }
    }

    pub fn temp_slot(&mut self) -> usize {
        let s = self.next_slot;
        self.next_slot += 1;
        self.leaf.push(false);
        s
    }

    /// The slot of a trainable parameter.
    fn param_slot(&self, p: usize) -> usize {
        self.g.values.len() + p
    }

    fn slot_param(&self, slot: usize) -> Option<usize> {
        let n = self.g.values.len();
        (slot >= n && slot < n + self.g.params.len()).then(|| slot - n)
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
    pub fn set_value(&mut self, sim: &mut Sim, v: usize, t: &Ten) {
        if let Some(old) = self.vals[v].replace(Engine::share(sim, t)) {
            Engine::release(sim, old);
        }
    }

    pub fn drop_value(&mut self, sim: &mut Sim, v: usize) {
        if let Some(t) = self.vals[v].take() {
            Engine::release(sim, t);
        }
    }

    /// What an op reads for value `v` as it is.
    pub fn read(&self, sim: &mut Sim, v: usize) -> Read {
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
    pub fn read_low(&mut self, sim: &mut Sim, v: usize) -> Read {
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
    pub fn read_f32(&mut self, sim: &mut Sim, v: usize) -> Read {
        let r = self.read(sim, v);
        if !self.amp || self.cpu() || r.t.esize != HALF {
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

    /// Runs nodes `range` forward, dropping each value after its last use.
    pub fn forward(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        let mut next = range.start;
        while next < range.end {
            let i = next;
            next += 1;
            if self.fused_attention
                && !self.grad_mode
                && let Some(f) = self.g.fused_attention.iter().find(|f| f.nodes.start == i && f.nodes.end <= range.end)
            {
                self.current = i;
                sim.set_label("_native_multi_head_attention", Some(i));
                let out = super::attention::native_multi_head_attention(self, sim, f);
                if let Some(old) = self.vals[f.output].replace(out) {
                    Engine::release(sim, old);
                }
                // What the block read from outside and nobody reads after it goes.
                for n in f.nodes.clone() {
                    for k in 0..self.g.nodes[n].inputs.len() {
                        let v = self.g.nodes[n].inputs[k];
                        let outside = self.producer[v].is_none_or(|p| !f.nodes.contains(&p));
                        if outside
                            && self.last_use[v].is_some_and(|u| f.nodes.contains(&u))
                            && !self.g.returned.contains(&v)
                        {
                            self.drop_value(sim, v);
                        }
                    }
                }
                next = f.nodes.end;
                continue;
            }
            self.current = i;
            // The surface term begins: `torch.from_numpy(dist).to(device)`, the host's map.
            if let Some(t) = &self.g.surface
                && i == t.start
                && self.vals[t.map].is_none()
            {
                sim.set_label("surface distance map", Some(i));
                let shape = self.g.values[t.map].shape.clone();
                let map = self.alloc_contig(sim, &shape, F32, super::Category::Batch);
                self.vals[t.map] = Some(map);
            }
            sim.set_label(self.g.nodes[i].op.name(), Some(i));
            if let Op::Param = self.g.nodes[i].op {
                self.param_node(sim, i);
            } else {
                let outs = super::rules::forward(self, sim, i);
                for (&v, t) in self.g.nodes[i].outputs.clone().iter().zip(outs) {
                    if let Some(old) = self.vals[v].replace(t) {
                        Engine::release(sim, old);
                    }
                }
            }
            for k in 0..self.g.nodes[i].inputs.len() {
                let v = self.g.nodes[i].inputs[k];
                if self.last_use[v] == Some(i) && !self.g.returned.contains(&v) {
                    self.drop_value(sim, v);
                }
            }
            // Outputs nobody reads die at once (unless the loop holds them).
            for &o in &self.g.nodes[i].outputs.clone() {
                if self.last_use[o].is_none() && !self.g.returned.contains(&o) && o != self.g.loss {
                    self.drop_value(sim, o);
                }
            }
        }
    }

    /// A parameter read as a value: its storage, and at its first read its
    /// `AccumulateGrad` node.
    fn param_node(&mut self, sim: &mut Sim, i: usize) {
        let p = self.g.nodes[i].params[0];
        let v = self.g.nodes[i].output();
        let shape = self.g.params[p].shape.clone();
        let t = Ten {
            st: sim.retain(self.param_store[p]),
            strides: layout::contiguous(&shape),
            shape,
            esize: self.g.params[p].dtype.size(),
            view: false,
        };
        if self.first_param_node[p] == Some(i) && self.g.params[p].trainable && self.grad_mode && !self.recomputing {
            let slot = self.param_slot(p);
            let m = t.meta();
            self.tape.push(TapeNode {
                node: i,
                bwd: Bwd::Accumulate { param: p },
                saved: Vec::new(),
                outs: vec![slot],
                ins: vec![None],
                in_meta: vec![m.clone()],
                out_meta: vec![m],
                pending: None,
                done: false,
            });
        }
        if let Some(old) = self.vals[v].replace(t) {
            Engine::release(sim, old);
        }
    }

    // --- the backward pass ------------------------------------------------------------

    /// Adds a gradient into a slot, as autograd's input buffers do.
    pub fn add_grad(&mut self, sim: &mut Sim, slot: usize, g: Ten) {
        match self.grads.remove(&slot) {
            None => {
                self.grads.insert(slot, g);
            }
            Some(old) => {
                if !old.view && old.dense() && sim.owners(old.st) == 1 {
                    Engine::release(sim, g);
                    self.grads.insert(slot, old);
                } else {
                    let strides =
                        layout::elementwise(&old.shape, &[(&old.shape, &old.strides), (&g.shape, &g.strides)]);
                    let esize = old.esize.max(g.esize);
                    let sum = self.alloc(sim, &old.shape, strides, esize, Category::Temporaries);
                    Engine::release(sim, old);
                    Engine::release(sim, g);
                    self.grads.insert(slot, sum);
                }
            }
        }
    }

    /// A parameter's `AccumulateGrad`: on the first micro-batch the gradient becomes
    /// `.grad` (copied when its layout is not the parameter's, or another tensor holds
    /// it); later ones are added into `.grad` in place.
    fn accumulate(&mut self, sim: &mut Sim, p: usize, g: Ten) {
        match self.param_grads[p].take() {
            None => {
                let stealable = g.contiguous() && sim.owners(g.st) == 1 && g.esize == F32;
                let g = if stealable {
                    sim.recategorize(g.st, Category::Gradients);
                    g
                } else {
                    let copy = self.alloc_contig(sim, &g.shape, F32, Category::Gradients);
                    Engine::release(sim, g);
                    copy
                };
                self.param_grads[p] = Some(g);
            }
            Some(existing) => {
                Engine::release(sim, g);
                self.param_grads[p] = Some(existing);
            }
        }
    }

    /// Runs the tape backward from its end down to `stop`, node by node. Nodes that
    /// receive no gradient are left for a later backward call.
    pub fn backward(&mut self, sim: &mut Sim, stop: usize) {
        let mut k = self.tape.len();
        while k > stop {
            k -= 1;
            if self.tape[k].done {
                continue;
            }
            let has_grad = self.tape[k].outs.iter().any(|s| self.grads.contains_key(s));
            if !has_grad {
                continue;
            }
            if let Some(r) = self.tape[k].pending
                && self.recompute == Some(Recompute::NonReentrant)
            {
                self.recompute_region(sim, r);
            }
            self.run_node(sim, k);
            let r = self.region_of[self.tape[k].node];
            if self.recompute == Some(Recompute::NonReentrant) && self.regions[r].checkpointed && self.left[r] > 0 {
                self.left[r] -= 1;
                if self.left[r] == 0 {
                    for (_, t) in std::mem::take(&mut self.kept[r]) {
                        Engine::release(sim, t);
                    }
                }
            }
        }
    }

    /// Runs tape node `k`: its rule, then it lets go of what it saved and consumed, then
    /// its gradients go to their slots.
    pub fn run_node(&mut self, sim: &mut Sim, k: usize) {
        let node = self.tape[k].node;
        self.current = node;
        sim.set_label(self.g.nodes[node].op.name(), Some(node));
        let outs = self.tape[k].outs.clone();
        let gouts: Vec<Option<Ten>> = outs.iter().map(|s| self.grads.remove(s)).collect();
        if let Bwd::Accumulate { param } = self.tape[k].bwd {
            self.tape[k].done = true;
            if let Some(Some(g)) = gouts.into_iter().next() {
                self.accumulate(sim, param, g);
            }
            return;
        }
        let grads = match self.tape[k].bwd {
            Bwd::Checkpoint { region } => {
                self.tape[k].done = true;
                self.checkpoint_backward(sim, region, &gouts)
            }
            _ => super::rules::backward(self, sim, k, &gouts),
        };
        let t = &mut self.tape[k];
        t.done = true;
        let saved = std::mem::take(&mut t.saved);
        let ins = t.ins.clone();
        for s in saved {
            Engine::release(sim, s);
        }
        for g in gouts.into_iter().flatten() {
            Engine::release(sim, g);
        }
        for (slot, g) in ins.into_iter().zip(grads) {
            match (slot, g) {
                (Some(s), Some(g)) => self.add_grad(sim, s, g),
                (None, Some(g)) => Engine::release(sim, g),
                _ => {}
            }
        }
    }

    /// Lets go of every gradient still waiting and every node's saved tensors (the end
    /// of a step's backward: what no gradient reached is freed with the graph).
    pub fn finish_backward(&mut self, sim: &mut Sim) {
        for (_, g) in std::mem::take(&mut self.grads) {
            Engine::release(sim, g);
        }
        for kept in self.kept.iter_mut() {
            for (_, t) in std::mem::take(kept) {
                sim.release(t.st);
            }
        }
        for t in self.tape.iter_mut() {
            for s in std::mem::take(&mut t.saved) {
                sim.release(s.st);
            }
        }
        self.tape.clear();
        self.next_slot = self.g.values.len() + self.g.params.len();
        self.leaf.truncate(self.next_slot);
        for l in self.leaf.iter_mut() {
            *l = false;
        }
    }

    /// `loss.backward()`: the seed gradient of the scalar loss.
    pub fn seed(&mut self, sim: &mut Sim, loss: usize) {
        if self.g.values[loss].requires_grad {
            let g = self.alloc_contig(sim, &[], F32, Category::Temporaries);
            let slot = self.slot(loss);
            self.grads.insert(slot, g);
        }
    }

    /// Gradients that reached a parameter's slot after its `AccumulateGrad` ran (the
    /// trainer's separate backward calls each accumulate on their own).
    pub fn flush_param_grads(&mut self, sim: &mut Sim) {
        for p in 0..self.g.params.len() {
            let slot = self.param_slot(p);
            if let Some(g) = self.grads.remove(&slot) {
                self.accumulate(sim, p, g);
            }
        }
    }

    /// The values region `r` produces that later nodes (or the loop) read.
    pub fn region_outputs(&self, r: usize) -> Vec<usize> {
        self.region_outs[r].clone()
    }

    /// A reentrant checkpoint's forward: the region runs without autograd, keeping its
    /// inputs; one node stands for it on the tape.
    pub fn checkpoint_forward(&mut self, sim: &mut Sim, r: usize, inputs: &[usize], range: std::ops::Range<usize>) {
        self.keep_region_inputs(sim, r, inputs);
        self.grad_mode = false;
        self.forward(sim, range);
        self.grad_mode = true;
        let outs = self.region_outputs(r);
        let reads: Vec<Read> = self.kept[r]
            .iter()
            .map(|(v, t)| Read { t: t.clone(), slot: self.g.values[*v].requires_grad.then(|| self.slot(*v)) })
            .collect();
        let out_meta = outs.iter().map(|&v| self.vals[v].as_ref().map(Ten::meta).unwrap_or_default()).collect();
        let any = reads.iter().any(|r| r.slot.is_some())
            || self.g.nodes[self.regions[r].nodes.clone()].iter().any(|n| matches!(n.op, Op::Param));
        if any {
            self.tape.push(TapeNode {
                node: self.regions[r].nodes.end - 1,
                bwd: Bwd::Checkpoint { region: r },
                saved: Vec::new(),
                outs: outs.iter().map(|&v| self.slot(v)).collect(),
                ins: reads.iter().map(|r| r.slot).collect(),
                in_meta: reads.iter().map(|r| r.t.meta()).collect(),
                out_meta,
                pending: None,
                done: false,
            });
        }
    }

    /// A reentrant checkpoint's backward: the region recomputed from detached copies of
    /// its inputs, then a backward of its own from its outputs with the gradients they
    /// received (held, with the recomputed outputs, until it returns); the inputs'
    /// gradients come back through their leaves.
    fn checkpoint_backward(&mut self, sim: &mut Sim, r: usize, gouts: &[Option<Ten>]) -> Vec<Option<Ten>> {
        let range = self.regions[r].nodes.clone();
        let kept: Vec<(usize, Ten)> = self.kept[r].iter().map(|(v, t)| (*v, Engine::share(sim, t))).collect();
        let mut leaves = Vec::new();
        for (v, t) in &kept {
            if let Some(old) = self.vals[*v].replace(Engine::share(sim, t)) {
                Engine::release(sim, old);
            }
            if self.g.values[*v].requires_grad {
                let s = self.temp_slot();
                self.redirect.insert(*v, s);
                leaves.push(Some(s));
            } else {
                leaves.push(None);
            }
        }
        let outs = self.region_outputs(r);
        let sub = self.tape.len();
        self.forward_keeping(sim, range.clone(), &outs);
        self.clear_casts(sim);
        self.redirect.clear();
        for (j, &v) in outs.iter().enumerate() {
            if let Some(Some(g)) = gouts.get(j) {
                let g2 = Engine::share(sim, g);
                self.add_grad(sim, self.slot(v), g2);
            }
        }
        self.backward(sim, sub);
        // Gradients left on parameters whose AccumulateGrad is outside wait in their slots.
        let mut out = Vec::new();
        for leaf in leaves {
            out.push(leaf.and_then(|s| self.grads.remove(&s)).map(|g| {
                // A leaf's .grad obeys its layout: a strided gradient is copied.
                if g.contiguous() && sim.owners(g.st) == 1 {
                    g
                } else {
                    let c = self.alloc_contig(sim, &g.shape, g.esize, Category::Temporaries);
                    Engine::release(sim, g);
                    c
                }
            }));
        }
        for t in self.tape.drain(sub..) {
            for s in t.saved {
                sim.release(s.st);
            }
        }
        for i in range {
            for &o in &self.g.nodes[i].outputs {
                self.drop_value(sim, o);
            }
        }
        for (v, t) in kept {
            self.drop_value(sim, v);
            Engine::release(sim, t);
        }
        for (_, t) in std::mem::take(&mut self.kept[r]) {
            Engine::release(sim, t);
        }
        out
    }

    /// `forward`, keeping the values in `keep` alive after their last use.
    fn forward_keeping(&mut self, sim: &mut Sim, range: std::ops::Range<usize>, keep: &[usize]) {
        let saved: Vec<Option<usize>> = keep.iter().map(|&v| self.last_use[v]).collect();
        for &v in keep {
            self.last_use[v] = Some(usize::MAX);
        }
        self.forward(sim, range);
        for (&v, l) in keep.iter().zip(saved) {
            self.last_use[v] = l;
        }
    }

    // --- checkpointing ----------------------------------------------------------------

    /// Keeps the values region `r` reads from outside for its recompute.
    pub fn keep_region_inputs(&mut self, sim: &mut Sim, r: usize, inputs: &[usize]) {
        for &v in inputs {
            if let Some(t) = self.vals[v].as_ref() {
                let t = Engine::share(sim, t);
                self.kept[r].push((v, t));
            }
        }
    }

    /// Non-reentrant checkpointing: recomputes region `r` with saving and fills its
    /// pending nodes' saved tensors, stopping after the last node that saves anything.
    fn recompute_region(&mut self, sim: &mut Sim, r: usize) {
        let range = self.regions[r].nodes.clone();
        let pending: Vec<usize> = (0..self.tape.len()).filter(|&k| self.tape[k].pending == Some(r)).collect();
        // The last graph node whose tape node saves something decides the early stop;
        // computed by running and watching.
        let saved_before = self.vals.clone();
        for (v, t) in &self.kept[r] {
            let t2 = Engine::share(sim, t);
            if let Some(old) = self.vals[*v].replace(t2) {
                Engine::release(sim, old);
            }
        }
        let tape_len = self.tape.len();
        let outer_pending = self.pending.take();
        self.recomputing = true;
        let produced_before: Vec<bool> = saved_before.iter().map(Option::is_some).collect();
        let last_saving = pending.iter().rev().map(|&k| self.tape[k].node).find(|&n| rules_save(self.g, n));
        let end = last_saving.map_or(range.start, |n| n + 1).min(range.end);
        self.forward(sim, range.start..end);
        self.clear_casts(sim);
        // Pair the recomputed nodes with the pending ones, node by node, in order.
        let fresh: Vec<TapeNode> = self.tape.drain(tape_len..).collect();
        let mut by_node: BTreeMap<usize, Vec<TapeNode>> = BTreeMap::new();
        for t in fresh {
            if matches!(t.bwd, Bwd::Cast { .. }) && !self.pending_has_cast(&pending, t.node) {
                for s in t.saved {
                    sim.release(s.st);
                }
                continue;
            }
            by_node.entry(t.node).or_default().push(t);
        }
        for &k in &pending {
            let node = self.tape[k].node;
            if let Some(list) = by_node.get_mut(&node)
                && !list.is_empty()
            {
                let t = list.remove(0);
                self.tape[k].saved = t.saved;
            }
            self.tape[k].pending = None;
        }
        for (_, list) in by_node {
            for t in list {
                for s in t.saved {
                    sim.release(s.st);
                }
            }
        }
        // The recompute's own values die; only what nodes saved stays.
        for i in range.clone() {
            for &o in &self.g.nodes[i].outputs {
                if !produced_before[o] {
                    self.drop_value(sim, o);
                }
            }
        }
        for (v, _) in self.kept[r].clone() {
            if !produced_before[v] {
                self.drop_value(sim, v);
            }
        }
        self.left[r] =
            (0..self.tape.len()).filter(|&k| !self.tape[k].done && self.region_of[self.tape[k].node] == r).count();
        self.pending = outer_pending;
        self.recomputing = false;
    }

    fn pending_has_cast(&self, pending: &[usize], node: usize) -> bool {
        pending.iter().any(|&k| self.tape[k].node == node && matches!(self.tape[k].bwd, Bwd::Cast { .. }))
    }
}

/// Whether graph node `n`'s rule saves tensors for backward (its recompute matters).
fn rules_save(g: &Graph, n: usize) -> bool {
    let op = &g.nodes[n].op;
    !op.is_view()
        && !matches!(
            op,
            Op::Add
                | Op::AddInplace
                | Op::AddScalar { .. }
                | Op::Sub
                | Op::Reshape { .. }
                | Op::Contiguous
                | Op::Clone
                | Op::Cat { .. }
                | Op::Pad { .. }
                | Op::Roll { .. }
                | Op::MulScalar { .. }
                | Op::RsubScalar { .. }
                | Op::Param
                | Op::ShiftedWindowMask { .. }
        )
}
