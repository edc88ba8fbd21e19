//! The forward and backward walk over a graph: what each primitive allocates, what its
//! autograd node saves for backward, and what its backward allocates and frees, following
//! libtorch's kernels and derivative formulas. One rule per primitive, so that the walk
//! covers every zoo model.
//!
//! Regions (`Graph::regions`) implement gradient checkpointing: a checkpointed region
//! runs its forward without saving anything (only its inputs are kept), and is run again
//! with saving just before its backward.

use super::Category;
use super::sim::{Sim, Tensor};
use crate::graph::{DType, Graph, Op, numel};

/// Bytes per element of a half-precision value.
const HALF: u64 = 2;
const F32: u64 = 4;

/// Work of an autocast cast's backward node, which runs right after the node that read
/// the cast.
enum Deferred {
    Param { node: usize, p: usize, half: Tensor },
    Input { v: usize, half: Tensor },
}

#[derive(Clone, Copy)]
struct Grad {
    t: Tensor,
    contiguous: bool,
}

pub struct Walk<'g> {
    g: &'g Graph,
    /// Automatic mixed precision: matrix products and convolutions run in half precision.
    amp: bool,
    /// Bytes per element of each value as this step makes it (fp32, or half under AMP).
    esize: Vec<u64>,
    /// The storage each value's variable holds during the forward pass.
    store: Vec<Option<Tensor>>,
    saved: Vec<Vec<Tensor>>,
    /// Under AMP: each weight's half-precision copy, cached for one forward pass.
    casts: Vec<Option<Tensor>>,
    grads: Vec<Option<Grad>>,
    /// Gradients of parameters still waiting for their other uses (tied weights).
    pending: Vec<Option<Tensor>>,
    last_use: Vec<Option<usize>>,
    /// The nodes that use each parameter, in order.
    param_uses: Vec<Vec<usize>>,
    /// Per region, the values it reads from outside it (in the trainer, through leaves).
    live_in: Vec<Vec<usize>>,
    producer: Vec<Option<usize>>,
    regions: Vec<(std::ops::Range<usize>, bool)>,
    /// The trainer's extra reference to a checkpointed region's inputs, from its no-grad
    /// forward until no earlier region reads them.
    kept: Vec<Option<Tensor>>,
    deferred: Vec<Deferred>,
    /// `.grad` of each trainable parameter once the first micro-batch made it.
    pub param_grads: Vec<Option<Tensor>>,
    first_micro_batch: bool,
    /// The CPU device model: convolutions (libtorch's native im2col kernels; the trainer
    /// turns oneDNN off on the CPU because its scratch buffers depend on thread counts and
    /// shape heuristics) unfold their input into a columns buffer in forward and again in
    /// backward; attention with dropout takes the math path; CPU autocast keeps layer
    /// norm and softmax in the half type, where CUDA autocast runs them in fp32.
    cpu: bool,
}

impl<'g> Walk<'g> {
    pub fn new(g: &'g Graph, amp: bool, segments: u64, cpu: bool) -> Walk<'g> {
        let mut param_uses = vec![Vec::new(); g.params.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for &p in &n.params {
                param_uses[p].push(i);
            }
        }
        let regions = g.regions(segments);
        let live_in = g.region_inputs(&regions);
        Walk {
            g,
            amp,
            esize: vec![F32; g.values.len()],
            store: vec![None; g.values.len()],
            saved: vec![Vec::new(); g.nodes.len()],
            casts: vec![None; g.params.len()],
            grads: vec![None; g.values.len()],
            pending: vec![None; g.params.len()],
            last_use: g.last_use(),
            param_uses,
            live_in,
            regions,
            producer: g.producer(),
            kept: vec![None; g.values.len()],
            param_grads: vec![None; g.params.len()],
            deferred: Vec::new(),
            first_micro_batch: true,
            cpu,
        }
    }

    pub fn start_micro_batch(&mut self, first: bool) {
        self.first_micro_batch = first;
    }

    fn bytes(&self, v: usize) -> u64 {
        let val = &self.g.values[v];
        let size = match val.dtype {
            DType::F32 => self.esize[v],
            other => other.size(),
        };
        numel(&val.shape).saturating_mul(size)
    }

    fn numel(&self, v: usize) -> u64 {
        numel(&self.g.values[v].shape)
    }

    /// Hands the walk an input the data generator made (the walk takes a reference).
    pub fn set_input(&mut self, sim: &mut Sim, v: usize, t: Tensor) {
        self.store[v] = Some(sim.retain(t));
    }

    pub fn output_esize(&self, v: usize) -> u64 {
        self.esize[v]
    }

    pub fn is_cpu(&self) -> bool {
        self.cpu
    }

    fn held(&self, v: usize) -> Tensor {
        // Every value a node reads was made earlier in the walk (or kept for a recompute);
        // a missing one would be a graph bug, and a zero-byte stand-in keeps it going.
        self.store[v].or(self.kept[v]).unwrap_or(Tensor::NONE)
    }

    /// Under AMP, the half-precision copy a low-precision op reads instead of `v`.
    fn cast_in(&mut self, sim: &mut Sim, v: usize) -> Tensor {
        if self.amp && self.g.values[v].dtype == DType::F32 && self.esize[v] == F32 {
            return sim.alloc(self.numel(v) * HALF, Category::Activations);
        }
        sim.retain(self.held(v))
    }

    fn cast_weight(&mut self, sim: &mut Sim, p: usize) {
        if self.amp && self.casts[p].is_none() && self.g.params[p].trainable {
            let bytes = numel(&self.g.params[p].shape) * HALF;
            self.casts[p] = Some(sim.alloc(bytes, Category::Temporaries));
        }
    }

    /// The forward pass of `range`, saving for backward when `grad` is on.
    pub fn forward(&mut self, sim: &mut Sim, range: std::ops::Range<usize>, grad: bool) {
        let region = self.regions.iter().position(|(r, _)| *r == range);
        if let (Some(r), false) = (region, grad) {
            // A checkpointed region's no-grad forward: its inputs are kept for the recompute.
            for k in 0..self.live_in[r].len() {
                let v = self.live_in[r][k];
                if self.kept[v].is_none()
                    && let Some(t) = self.store[v]
                {
                    self.kept[v] = Some(sim.retain(t));
                }
            }
        }
        for i in range.clone() {
            self.forward_node(sim, i, grad);
            for &v in &self.g.nodes[i].inputs {
                if self.last_use[v] == Some(i) {
                    self.drop_value(sim, v);
                }
            }
        }
    }

    /// Leaving autocast clears its cache of weight casts (after the loss, and after a
    /// checkpointed region's recompute); casts that nodes saved stay with them.
    pub fn clear_cast_cache(&mut self, sim: &mut Sim) {
        for c in self.casts.iter_mut() {
            if let Some(t) = c.take() {
                sim.release(t);
            }
        }
    }

    /// Holds the outputs of a region that ran with autograd and feeds later regions: the
    /// trainer keeps them to start that region's backward from.
    pub fn hold_outputs(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) -> Vec<Tensor> {
        let mut held = Vec::new();
        for i in range.clone() {
            let v = self.g.nodes[i].output;
            let crosses = self.last_use[v].is_some_and(|l| l >= range.end);
            if crosses
                && self.g.values[v].requires_grad
                && let Some(t) = self.store[v]
            {
                held.push(sim.retain(t));
            }
        }
        held
    }

    /// Holds the values a region that runs with autograd reads from earlier regions: the
    /// trainer reads them through leaves whose gradients it collects after the region's
    /// backward, which keeps them alive until then.
    pub fn hold_inputs(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) -> Vec<Tensor> {
        let Some(r) = self.regions.iter().position(|(x, _)| *x == range) else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for k in 0..self.live_in[r].len() {
            let v = self.live_in[r][k];
            if self.producer[v].is_some()
                && let Some(t) = self.store[v]
            {
                held.push(sim.retain(t));
            }
        }
        held
    }

    /// The regions this walk runs, in order.
    pub fn regions(&self) -> &[(std::ops::Range<usize>, bool)] {
        &self.regions
    }

    /// Holds the incoming gradients of a recomputed region's outputs: the trainer passes
    /// them to one backward call, which keeps them until the region is done.
    pub fn hold_output_grads(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) -> Vec<Tensor> {
        let mut held = Vec::new();
        for i in range {
            let v = self.g.nodes[i].output;
            if let Some(g) = self.grads[v] {
                held.push(sim.retain(g.t));
            }
        }
        held
    }

    /// The trainer reads a region's inputs through leaves; a leaf's `AccumulateGrad` keeps
    /// a contiguous gradient as it is and copies a strided one (a slice of a
    /// concatenation's gradient), which lets the rest of that gradient go.
    pub fn leaf_gradients(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        let Some(r) = self.regions.iter().position(|(x, _)| *x == range) else {
            return;
        };
        for k in 0..self.live_in[r].len() {
            let v = self.live_in[r][k];
            if let Some(g) = self.grads[v]
                && !g.contiguous
            {
                let copy = self.alloc_grad(sim, v);
                sim.release(g.t);
                self.grads[v] = Some(Grad { t: copy, contiguous: true });
            }
        }
    }

    /// After a recompute the trainer keeps only the outputs that received gradients.
    pub fn drop_unwanted_outputs(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        for i in range {
            let v = self.g.nodes[i].output;
            if self.grads[v].is_none() {
                self.drop_value(sim, v);
            }
        }
    }

    /// Lets go of every value a region produced (its recomputed outputs, once its
    /// backward is done).
    pub fn drop_produced(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        for i in range {
            let v = self.g.nodes[i].output;
            self.drop_value(sim, v);
        }
    }

    /// Lets go of the values a checkpointed region kept for its recompute, unless an
    /// earlier region reads them too (it is recomputed later).
    pub fn drop_region_inputs(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        let Some(r) = self.regions.iter().position(|(x, _)| *x == range) else {
            return;
        };
        for k in 0..self.live_in[r].len() {
            let v = self.live_in[r][k];
            if !self.live_in[..r].iter().any(|ins| ins.contains(&v))
                && let Some(t) = self.kept[v].take()
            {
                sim.release(t);
            }
        }
    }

    pub fn drop_value(&mut self, sim: &mut Sim, v: usize) {
        if let Some(t) = self.store[v].take() {
            sim.release(t);
        }
    }

    /// Rows of a value over its last dimension.
    fn rows(&self, v: usize) -> u64 {
        self.numel(v) / self.g.values[v].shape.last().copied().unwrap_or(1).max(1)
    }

    /// A normalisation's two fp32 statistics of `stats` entries (mean and inverse std),
    /// saved with the input when `grad` is on, else freed at once.
    fn save_with_stats(&mut self, sim: &mut Sim, i: usize, grad: bool, input: Tensor, stats: u64) {
        let mean = sim.alloc(stats * F32, Category::Activations);
        let inv_std = sim.alloc(stats * F32, Category::Activations);
        if grad {
            self.save(sim, i, input);
            self.save(sim, i, mean);
            self.save(sim, i, inv_std);
        }
        sim.release(mean);
        sim.release(inv_std);
    }

    fn save(&mut self, sim: &mut Sim, i: usize, t: Tensor) {
        let t = sim.retain(t);
        self.saved[i].push(t);
    }

    fn forward_node(&mut self, sim: &mut Sim, i: usize, grad: bool) {
        let g = self.g;
        let node = &g.nodes[i];
        let out = node.output;
        // A recompute replaces the value the checkpointed forward made.
        self.drop_value(sim, out);
        let x = node.inputs.first().copied();
        let in_esize = x.map_or(F32, |x| self.esize[x]);
        let out_numel = numel(&g.values[out].shape);
        let trainable = node.params.iter().any(|&p| g.params[p].trainable);
        let needs = |v: usize| g.values[v].requires_grad;
        // Saving only matters if this node will have a backward.
        let grad = grad && self.g.values[out].requires_grad;

        // Views and in-place ops share their input's storage.
        if self.g.values[out].view_of.is_some() {
            self.esize[out] = in_esize;
            let t = sim.retain(self.held(node.inputs[0]));
            self.store[out] = Some(t);
            if grad {
                match node.op {
                    // The in-place activations save their result.
                    Op::Relu { inplace: true } | Op::LeakyRelu { inplace: true } => self.save(sim, i, t),
                    _ => {}
                }
            }
            return;
        }

        match &node.op {
            Op::Linear { .. } | Op::Conv { .. } | Op::ConvTranspose { .. } => {
                let xi = node.inputs[0];
                for &p in &node.params {
                    self.cast_weight(sim, p);
                }
                let input = self.cast_in(sim, xi);
                self.esize[out] = if self.amp { HALF } else { F32 };
                let o = sim.alloc(out_numel * self.esize[out], Category::Activations);
                if self.cpu {
                    sim.transient(self.columns_bytes(i, true), Category::Temporaries);
                }
                if grad && trainable {
                    self.save(sim, i, input);
                }
                if grad && self.amp {
                    for &p in &node.params {
                        if let Some(c) = self.casts[p] {
                            self.save(sim, i, c);
                        }
                    }
                }
                sim.release(input);
                self.store[out] = Some(o);
            }
            Op::Attention { causal, dropout } if self.cpu && *dropout > 0.0 => {
                // libtorch's math attention, which the CPU uses when dropout is on: scaled
                // copies of q and k, the scores, a safe softmax, an fp32 dropout noise
                // tensor and the dropped-out probabilities, then probabilities @ v. Half
                // inputs are computed in fp32 (q, k, v cast up; the output cast back).
                let (q, v) = (node.inputs[0], node.inputs[2]);
                let s = g.values[q].shape.clone();
                let half = in_esize == HALF;
                let e = F32.max(in_esize);
                let qk = numel(&s) * e;
                let scores = s[0] * s[1] * s[2] * s[2] * e;
                let q_up = half.then(|| sim.alloc(qk, Category::Temporaries));
                let q_s = sim.alloc(qk, Category::Activations);
                if let Some(t) = q_up {
                    sim.release(t);
                }
                let k_up = half.then(|| sim.alloc(qk, Category::Temporaries));
                let k_s = sim.alloc(qk, Category::Activations);
                if let Some(t) = k_up {
                    sim.release(t);
                }
                let v_up = half.then(|| sim.alloc(qk, Category::Activations));
                let mask = causal.then(|| sim.alloc(s[2] * s[2] * F32, Category::Temporaries));
                let attn = sim.alloc(scores, Category::Activations);
                if let Some(m) = mask {
                    sim.release(m);
                }
                // _safe_softmax: the softmax, a bool mask of -inf entries, then `where`.
                let soft = sim.alloc(scores, Category::Activations);
                sim.transient(scores / e, Category::Temporaries);
                let probs = sim.alloc(scores, Category::Activations);
                sim.release(soft);
                sim.release(attn);
                let noise = sim.alloc(scores, Category::Activations);
                let dropped = sim.alloc(scores, Category::Activations);
                self.esize[out] = in_esize;
                let o = if half {
                    let wide = sim.alloc(out_numel * e, Category::Activations);
                    let o = sim.alloc(out_numel * in_esize, Category::Activations);
                    sim.release(wide);
                    o
                } else {
                    sim.alloc(out_numel * in_esize, Category::Activations)
                };
                if grad {
                    for t in [q_s, k_s, probs, noise, dropped] {
                        self.save(sim, i, t);
                    }
                    let vt = v_up.unwrap_or_else(|| self.held(v));
                    self.save(sim, i, vt);
                }
                for t in [q_s, k_s, probs, noise, dropped] {
                    sim.release(t);
                }
                if let Some(t) = v_up {
                    sim.release(t);
                }
                self.store[out] = Some(o);
            }
            Op::Bmm | Op::Attention { .. } => {
                let inputs: Vec<Tensor> = node.inputs.iter().map(|&v| self.cast_in(sim, v)).collect();
                self.esize[out] = if self.amp { HALF } else { in_esize };
                let o = sim.alloc(out_numel * self.esize[out], Category::Activations);
                if grad {
                    for &t in &inputs {
                        self.save(sim, i, t);
                    }
                }
                if let Op::Attention { .. } = node.op {
                    // The fused kernel keeps its output and the log-sum-exp per query row.
                    let s = &self.g.values[out].shape;
                    let lse = sim.alloc(s[0] * s[1] * s[2] * F32, Category::Activations);
                    if grad {
                        self.save(sim, i, o);
                        self.save(sim, i, lse);
                    }
                    sim.release(lse);
                }
                for t in inputs {
                    sim.release(t);
                }
                self.store[out] = Some(o);
            }
            Op::BatchNorm { .. } | Op::InstanceNorm { .. } => {
                let xi = node.inputs[0];
                self.esize[out] = in_esize;
                let o = sim.alloc(out_numel * in_esize, Category::Activations);
                // Per-channel (per sample-channel for instance norm) mean and inverse std.
                let s = &self.g.values[xi].shape;
                let stats = if matches!(node.op, Op::BatchNorm { .. }) { s[1] } else { s[0] * s[1] };
                let input = self.held(xi);
                self.save_with_stats(sim, i, grad, input, stats);
                self.store[out] = Some(o);
            }
            Op::LayerNorm { .. } | Op::Softmax { .. } | Op::Normalize => {
                // fp32 ops under autocast: a half input is cast up first.
                let xi = node.inputs[0];
                let up = self.amp && in_esize == HALF && !self.cpu;
                let input =
                    if up { sim.alloc(self.numel(xi) * F32, Category::Activations) } else { sim.retain(self.held(xi)) };
                self.esize[out] = if self.cpu { in_esize } else { F32 };
                let o = sim.alloc(out_numel * self.esize[out], Category::Activations);
                if grad {
                    match node.op {
                        Op::Softmax { .. } => self.save(sim, i, o),
                        // Mean and reciprocal std per row.
                        Op::LayerNorm { .. } => self.save_with_stats(sim, i, true, input, self.rows(xi)),
                        _ => {
                            // x / ||x||: the input, the norm and the output are saved.
                            let norm = sim.alloc(self.rows(xi) * F32, Category::Activations);
                            self.save(sim, i, input);
                            self.save(sim, i, norm);
                            self.save(sim, i, o);
                            sim.release(norm);
                        }
                    }
                }
                sim.release(input);
                self.store[out] = Some(o);
            }
            Op::Relu { .. } | Op::Sigmoid | Op::LeakyRelu { .. } | Op::Gelu { .. } | Op::Prelu => {
                let xi = node.inputs[0];
                self.esize[out] = in_esize;
                let o = sim.alloc(out_numel * in_esize, Category::Activations);
                if grad {
                    match node.op {
                        Op::Relu { .. } | Op::Sigmoid => self.save(sim, i, o),
                        _ => {
                            let t = self.held(xi);
                            self.save(sim, i, t);
                        }
                    }
                }
                self.store[out] = Some(o);
            }
            Op::Dropout { .. } => {
                self.esize[out] = in_esize;
                let mask = sim.alloc(out_numel, Category::Activations);
                let o = sim.alloc(out_numel * in_esize, Category::Activations);
                if grad {
                    self.save(sim, i, mask);
                }
                sim.release(mask);
                self.store[out] = Some(o);
            }
            Op::Mul => {
                let (a, b) = (node.inputs[0], node.inputs[1]);
                self.esize[out] = in_esize.max(self.esize[b]);
                let o = sim.alloc(out_numel * self.esize[out], Category::Activations);
                if grad {
                    if needs(a) {
                        let t = self.held(b);
                        self.save(sim, i, t);
                    }
                    if needs(b) {
                        let t = self.held(a);
                        self.save(sim, i, t);
                    }
                }
                self.store[out] = Some(o);
            }
            Op::MaxPool { .. } => {
                self.esize[out] = in_esize;
                let o = sim.alloc(out_numel * in_esize, Category::Activations);
                let indices = sim.alloc(out_numel * DType::I64.size(), Category::Activations);
                if grad {
                    let t = self.held(node.inputs[0]);
                    self.save(sim, i, t);
                    self.save(sim, i, indices);
                }
                sim.release(indices);
                self.store[out] = Some(o);
            }
            Op::ShiftedWindowMask { .. } => {
                // [nW, N] region ids, a bool "different region" [nW, N, N], then the mask.
                let s = &g.values[out].shape;
                let ids = sim.alloc(s[1] * s[3] * F32, Category::Temporaries);
                let differ = sim.alloc(out_numel, Category::Temporaries);
                self.esize[out] = F32;
                let o = sim.alloc(out_numel * F32, Category::Activations);
                sim.release(differ);
                sim.release(ids);
                self.store[out] = Some(o);
            }
            Op::Embedding | Op::Gather => {
                self.esize[out] = F32;
                let o = sim.alloc(out_numel * F32, Category::Activations);
                // The embedding's backward needs the token ids.
                if grad && let (Op::Embedding, Some(x)) = (&node.op, x) {
                    let t = self.held(x);
                    self.save(sim, i, t);
                }
                self.store[out] = Some(o);
            }
            Op::Add | Op::AddParam | Op::PrependToken | Op::Cat { .. } => {
                // Type promotion: a half value meeting an fp32 one gives fp32.
                let mut e = node.inputs.iter().map(|&v| self.esize[v]).max().unwrap_or(F32);
                if !node.params.is_empty() {
                    e = F32;
                }
                self.esize[out] = e;
                // Autocast's "promote" policy for cat: narrower inputs are first copied
                // to the widest type; the copies die with the cat.
                let casts: Vec<Tensor> = if matches!(node.op, Op::Cat { .. } | Op::PrependToken) {
                    node.inputs
                        .iter()
                        .filter(|&&v| self.esize[v] < e && g.values[v].dtype == DType::F32)
                        .map(|&v| sim.alloc(self.numel(v) * e, Category::Temporaries))
                        .collect()
                } else {
                    Vec::new()
                };
                let o = sim.alloc(out_numel * e, Category::Activations);
                for t in casts {
                    sim.release(t);
                }
                self.store[out] = Some(o);
            }
            Op::Contiguous | Op::PadEnd { .. } | Op::Roll { .. } | Op::MulScalar { .. } | Op::Mean { .. } => {
                self.esize[out] = in_esize;
                let o = sim.alloc(out_numel * in_esize, Category::Activations);
                self.store[out] = Some(o);
            }
            Op::AddInplace
            | Op::View { .. }
            | Op::Permute { .. }
            | Op::Transpose { .. }
            | Op::Select { .. }
            | Op::Slice { .. } => {
                // Handled above as views; a graph that says otherwise still gets a tensor.
                let o = sim.alloc(out_numel * in_esize, Category::Activations);
                self.store[out] = Some(o);
            }
        }
    }

    /// The im2col buffer of CPU convolution node `i`: for a convolution the whole batch's
    /// `[B, C_in k^d, out_spatial]`; a transposed convolution works one sample at a time
    /// (`[C_out k^d, in_spatial]`), in 2-D its forward for the whole batch, in 3-D with a
    /// row of ones over the output for the bias.
    fn columns_bytes(&self, i: usize, forward: bool) -> u64 {
        let node = &self.g.nodes[i];
        let x = &self.g.values[node.inputs[0]].shape;
        let y = &self.g.values[node.output].shape;
        // The columns have the convolution's compute type (half under autocast).
        let e = if self.amp { HALF } else { F32 };
        match node.op {
            Op::Conv { nd, kernel, .. } => x[0] * x[1] * kernel.pow(nd as u32) * numel(&y[2..]) * e,
            Op::ConvTranspose { nd, kernel, .. } => {
                let per_sample = y[1] * kernel.pow(nd as u32) * numel(&x[2..]) * e;
                match (forward, nd) {
                    (false, _) => per_sample,
                    (true, 3) => per_sample + numel(&y[2..]) * e,
                    (true, _) => per_sample * x[0],
                }
            }
            _ => 0,
        }
    }

    /// Seeds the backward pass with the loss's gradient for output `v`.
    pub fn seed_grad(&mut self, v: usize, t: Tensor) {
        self.grads[v] = Some(Grad { t, contiguous: true });
    }

    fn add_grad(&mut self, sim: &mut Sim, v: usize, t: Tensor, contiguous: bool) {
        if !self.g.values[v].requires_grad {
            sim.release(t);
            return;
        }
        match self.grads[v].take() {
            None => self.grads[v] = Some(Grad { t, contiguous }),
            Some(old) => {
                // Autograd sums in place into a buffer nobody else holds, else out of place.
                if sim.owners(old.t) == 1 && old.contiguous {
                    sim.release(t);
                    self.grads[v] = Some(old);
                } else {
                    let sum = sim.alloc(self.bytes(v), Category::Temporaries);
                    sim.release(t);
                    sim.release(old.t);
                    self.grads[v] = Some(Grad { t: sum, contiguous: true });
                }
            }
        }
    }

    fn alloc_grad(&mut self, sim: &mut Sim, v: usize) -> Tensor {
        sim.alloc(self.bytes(v), Category::Temporaries)
    }

    /// A kernel that needs a contiguous incoming gradient copies a strided one.
    fn contiguous_grad(&mut self, sim: &mut Sim, g: Grad, out: usize) -> Tensor {
        if g.contiguous { sim.retain(g.t) } else { self.alloc_grad(sim, out) }
    }

    /// A parameter's gradient from one use; the last use (in backward order) makes it
    /// `.grad` on the first micro-batch, or adds it into `.grad` in place on later ones.
    fn param_grad(&mut self, sim: &mut Sim, node: usize, p: usize, half: bool) {
        if !self.g.params[p].trainable {
            return;
        }
        let bytes = numel(&self.g.params[p].shape) * F32;
        let category = if self.first_micro_batch { Category::Gradients } else { Category::Temporaries };
        if half {
            // Computed in half precision; the cast node's backward turns it into the fp32
            // master weight's type after this node has let go of what it saved.
            let h = sim.alloc(numel(&self.g.params[p].shape) * HALF, Category::Temporaries);
            self.deferred.push(Deferred::Param { node, p, half: h });
            return;
        }
        let t = sim.alloc(bytes, category);
        self.accumulate_param(sim, node, p, t);
    }

    fn accumulate_param(&mut self, sim: &mut Sim, node: usize, p: usize, t: Tensor) {
        let t = match self.pending[p].take() {
            None => t,
            Some(old) => {
                sim.release(t);
                old
            }
        };
        // Another use earlier in the same backward call sends its gradient later; uses in
        // other regions are separate backward calls, each accumulating on its own.
        let region_start = self.regions.iter().find(|(r, _)| r.contains(&node)).map_or(0, |(r, _)| r.start);
        if self.param_uses[p].iter().any(|&u| u >= region_start && u < node) {
            self.pending[p] = Some(t);
            return;
        }
        if self.first_micro_batch && self.param_grads[p].is_none() {
            self.param_grads[p] = Some(t);
        } else {
            sim.release(t);
        }
    }

    /// The backward pass of `range`, in reverse node order.
    pub fn backward(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        for i in range.rev() {
            let node = self.g.nodes[i].clone();
            let out = node.output;
            let gout = self.grads[out].take();
            if let Some(g) = gout {
                self.backward_node(sim, i, &node.op, &node.inputs, &node.params, out, g);
                sim.release(g.t);
            }
            for t in std::mem::take(&mut self.saved[i]) {
                sim.release(t);
            }
            // The autocast casts' own backward nodes run next: half gradients become fp32.
            for d in std::mem::take(&mut self.deferred) {
                match d {
                    Deferred::Param { node, p, half } => {
                        let category = if self.first_micro_batch { Category::Gradients } else { Category::Temporaries };
                        let t = sim.alloc(numel(&self.g.params[p].shape) * F32, category);
                        sim.release(half);
                        self.accumulate_param(sim, node, p, t);
                    }
                    Deferred::Input { v, half } => {
                        let t = self.alloc_grad(sim, v);
                        sim.release(half);
                        self.add_grad(sim, v, t, true);
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_node(
        &mut self,
        sim: &mut Sim,
        i: usize,
        op: &Op,
        inputs: &[usize],
        params: &[usize],
        out: usize,
        g: Grad,
    ) {
        let needs = |w: &Walk, v: usize| w.g.values[v].requires_grad;
        let half = self.amp;
        match op {
            Op::View { .. } => {
                let x = inputs[0];
                if g.contiguous {
                    let t = sim.retain(g.t);
                    self.add_grad(sim, x, t, true);
                } else {
                    let t = self.alloc_grad(sim, x);
                    self.add_grad(sim, x, t, true);
                }
            }
            Op::Permute { .. } | Op::Transpose { .. } | Op::PadEnd { .. } | Op::PrependToken | Op::Cat { .. } => {
                let outer_cat = match op {
                    Op::Cat { dim } => self.g.values[out].shape[..*dim].iter().all(|&d| d == 1),
                    _ => false,
                };
                // A permute that kept the layout passes a contiguous gradient on.
                let layout_kept =
                    matches!(op, Op::Permute { .. } | Op::Transpose { .. }) && self.g.values[out].contiguous;
                for &x in inputs {
                    let t = sim.retain(g.t);
                    self.add_grad(sim, x, t, outer_cat || (layout_kept && g.contiguous));
                }
                if let Op::PrependToken = op {
                    self.param_grad(sim, i, params[0], false);
                }
            }
            Op::Contiguous | Op::Add | Op::AddInplace | Op::AddParam => {
                for &x in inputs {
                    if self.numel(x) == self.numel(out) {
                        let t = sim.retain(g.t);
                        self.add_grad(sim, x, t, g.contiguous);
                    } else if needs(self, x) {
                        let t = self.alloc_grad(sim, x);
                        self.add_grad(sim, x, t, true);
                    }
                }
                if let Some(&p) = params.first() {
                    self.param_grad(sim, i, p, false);
                }
            }
            Op::Select { .. } | Op::Slice { .. } => {
                // select/slice backward: zeros of the input's shape with the gradient copied in.
                let x = inputs[0];
                let t = self.alloc_grad(sim, x);
                self.add_grad(sim, x, t, true);
            }
            Op::Linear { .. } | Op::Conv { .. } | Op::ConvTranspose { .. } => {
                let gc = self.contiguous_grad(sim, g, out);
                let x = inputs[0];
                let cast_input = half && self.g.values[x].dtype == DType::F32 && self.esize[x] == F32;
                let gx = needs(self, x).then(|| {
                    if cast_input {
                        // A half gradient, cast back for the fp32 input after this node.
                        let h = sim.alloc(self.numel(x) * HALF, Category::Temporaries);
                        self.deferred.push(Deferred::Input { v: x, half: h });
                        None
                    } else {
                        Some(self.alloc_grad(sim, x))
                    }
                });
                for &p in params {
                    self.param_grad(sim, i, p, half);
                }
                if self.cpu {
                    sim.transient(self.columns_bytes(i, false), Category::Temporaries);
                }
                sim.release(gc);
                if let Some(Some(t)) = gx {
                    self.add_grad(sim, x, t, true);
                }
            }
            Op::Attention { dropout, .. } if self.cpu && *dropout > 0.0 => {
                let gc = self.contiguous_grad(sim, g, out);
                let q = inputs[0];
                let s = self.g.values[q].shape.clone();
                let half = self.esize[q] == HALF;
                let e = F32.max(self.esize[q]);
                let qk = numel(&s) * e;
                let scores = s[0] * s[1] * s[2] * s[2] * e;
                // The math path is several autograd nodes, each freeing what it saved as soon
                // as it has run: [q_s, k_s, probs, noise, dropped, v].
                let saved = std::mem::take(&mut self.saved[i]);
                let free = |sim: &mut Sim, k: usize| {
                    if let Some(&t) = saved.get(k) {
                        sim.release(t);
                    }
                };
                // A half output's gradient is cast up first.
                let gw = half.then(|| sim.alloc(qk, Category::Temporaries));
                // probs @ v: gradients of the dropped probabilities and of v.
                let g_drop = sim.alloc(scores, Category::Temporaries);
                let gv = sim.alloc(qk, Category::Temporaries);
                sim.release(gc);
                if let Some(t) = gw {
                    sim.release(t);
                }
                free(sim, 4);
                free(sim, 5);
                let g_probs = sim.alloc(scores, Category::Temporaries);
                sim.release(g_drop);
                free(sim, 3);
                let g_scores = sim.alloc(scores, Category::Temporaries);
                sim.release(g_probs);
                free(sim, 2);
                let g_qs = sim.alloc(qk, Category::Temporaries);
                let g_ks = sim.alloc(qk, Category::Temporaries);
                sim.release(g_scores);
                free(sim, 0);
                free(sim, 1);
                let gq = sim.alloc(qk, Category::Temporaries);
                sim.release(g_qs);
                let gk = sim.alloc(qk, Category::Temporaries);
                sim.release(g_ks);
                for (v, t) in [(inputs[0], gq), (inputs[1], gk), (inputs[2], gv)] {
                    // Half inputs: each fp32 gradient is cast back down.
                    let t = if half {
                        let h = sim.alloc(qk / 2, Category::Temporaries);
                        sim.release(t);
                        h
                    } else {
                        t
                    };
                    self.add_grad(sim, v, t, true);
                }
            }
            Op::Bmm | Op::Attention { .. } => {
                let gc = self.contiguous_grad(sim, g, out);
                let grads: Vec<(usize, Tensor)> = inputs
                    .iter()
                    .filter(|&&v| needs(self, v))
                    .map(|&v| (v, sim.alloc(self.numel(v) * self.esize[v], Category::Temporaries)))
                    .collect();
                sim.release(gc);
                for (v, t) in grads {
                    self.add_grad(sim, v, t, true);
                }
            }
            Op::BatchNorm { .. } | Op::InstanceNorm { .. } | Op::LayerNorm { .. } => {
                let gc = self.contiguous_grad(sim, g, out);
                let x = inputs[0];
                let gx = needs(self, x).then(|| self.alloc_grad(sim, x));
                for &p in params {
                    self.param_grad(sim, i, p, false);
                }
                sim.release(gc);
                if let Some(t) = gx {
                    self.add_grad(sim, x, t, true);
                }
            }
            Op::Prelu => {
                let x = inputs[0];
                // _prelu_kernel_backward makes the input's gradient and a full-size weight
                // gradient that is then summed to the one slope.
                let gx = self.alloc_grad(sim, x);
                let full = sim.alloc(self.numel(x) * self.esize[x], Category::Temporaries);
                self.param_grad(sim, i, params[0], false);
                sim.release(full);
                self.add_grad(sim, x, gx, true);
            }
            Op::Mul => {
                let (a, b) = (inputs[0], inputs[1]);
                if needs(self, a) {
                    let t = self.alloc_grad(sim, a);
                    self.add_grad(sim, a, t, true);
                }
                if needs(self, b) {
                    // grad * a at full size, summed down to b's broadcast shape.
                    let full = sim.alloc(self.numel(a) * self.esize[out], Category::Temporaries);
                    if self.numel(b) == self.numel(a) {
                        self.add_grad(sim, b, full, true);
                    } else {
                        let t = self.alloc_grad(sim, b);
                        sim.release(full);
                        self.add_grad(sim, b, t, true);
                    }
                }
            }
            Op::ShiftedWindowMask { .. } => {}
            Op::Embedding | Op::Gather => {
                for &p in params {
                    self.param_grad(sim, i, p, false);
                }
            }
            Op::Softmax { .. } | Op::Normalize => {
                let gc = self.contiguous_grad(sim, g, out);
                let x = inputs[0];
                let t = sim.alloc(self.numel(x) * self.esize[out], Category::Temporaries);
                let t = if self.esize[x] != self.esize[out] {
                    let h = sim.alloc(self.numel(x) * HALF, Category::Temporaries);
                    sim.release(t);
                    h
                } else {
                    t
                };
                sim.release(gc);
                self.add_grad(sim, x, t, true);
            }
            Op::Relu { .. }
            | Op::LeakyRelu { .. }
            | Op::Gelu { .. }
            | Op::Sigmoid
            | Op::Dropout { .. }
            | Op::MulScalar { .. }
            | Op::Roll { .. }
            | Op::Mean { .. }
            | Op::MaxPool { .. } => {
                let x = inputs[0];
                if needs(self, x) {
                    let t = self.alloc_grad(sim, x);
                    self.add_grad(sim, x, t, true);
                }
            }
        }
    }

    /// Gradients of values that no node consumed (inputs): released at the end.
    pub fn finish_backward(&mut self, sim: &mut Sim) {
        for g in self.grads.iter_mut() {
            if let Some(g) = g.take() {
                sim.release(g.t);
            }
        }
        for p in self.pending.iter_mut() {
            if let Some(t) = p.take() {
                sim.release(t);
            }
        }
    }

    /// Releases every value the forward pass still holds.
    pub fn drop_all(&mut self, sim: &mut Sim) {
        for v in 0..self.store.len() {
            self.drop_value(sim, v);
            if let Some(t) = self.kept[v].take() {
                sim.release(t);
            }
        }
    }
}
