//! The autograd walk over the engine: the forward pass node by node (each node's rule
//! from `ops`), parameters and their `AccumulateGrad` nodes, the backward pass in
//! autograd's order with its accumulation rules, and non-reentrant and reentrant
//! checkpointing with their recomputes. The engine itself only allocates, reads and
//! records; this module drives it.

use std::collections::BTreeMap;

use super::Category;
use super::engine::{Bwd, Engine, F32, Read, Recompute, TapeNode, Ten};
use super::layout;
use super::sim::Sim;
use crate::graph::{Graph, Op, ParamId, ValueId};

impl Engine<'_> {
    /// Runs nodes `range` forward, dropping each value after its last use.
    pub fn forward(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        self.forward_nodes(sim, range);
        sim.held_high = 0;
    }

    fn forward_nodes(&mut self, sim: &mut Sim, range: std::ops::Range<usize>) {
        if let Some(f) = self.frames.as_mut() {
            f.reset(self.g, range.start);
        }
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
                let out = super::ops::native_multi_head_attention(self, sim, f);
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
            if let Some(f) = self.frames.as_mut() {
                f.enter(self.g, i);
                sim.held_high = f.held;
            }
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
                let outs = super::ops::forward(self, sim, i);
                for (&v, t) in self.g.nodes[i].outputs.clone().iter().zip(outs) {
                    if let Some(old) = self.vals[v].replace(t) {
                        Engine::release(sim, old);
                    }
                }
            }
            for k in 0..self.g.nodes[i].inputs.len() {
                let v = self.g.nodes[i].inputs[k];
                if self.last_use[v] == Some(i) && !self.g.returned.contains(&v) {
                    if let Some(f) = self.frames.as_mut() {
                        // What dropping it frees (nothing while autograd or a view holds it).
                        let bytes = self.vals[v].as_ref().filter(|t| sim.owners(t.st) == 1).map_or(0, Ten::bytes);
                        f.dropped(v, bytes);
                    }
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
    fn accumulate(&mut self, sim: &mut Sim, p: ParamId, g: Ten) {
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
            _ => super::ops::backward(self, sim, k, &gouts),
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
    pub fn seed(&mut self, sim: &mut Sim, loss: ValueId) {
        if self.g.values[loss].requires_grad {
            let g = self.alloc_contig(sim, &[], F32, Category::Temporaries);
            let slot = self.slot(loss);
            self.grads.insert(slot, g);
        }
    }

    /// Gradients that reached a parameter's slot after its `AccumulateGrad` ran (the
    /// trainer's separate backward calls each accumulate on their own).
    pub fn flush_param_grads(&mut self, sim: &mut Sim) {
        for p in (0..self.g.params.len()).map(ParamId) {
            let slot = self.param_slot(p);
            if let Some(g) = self.grads.remove(&slot) {
                self.accumulate(sim, p, g);
            }
        }
    }

    /// The values region `r` produces that later nodes (or the loop) read.
    pub fn region_outputs(&self, r: usize) -> Vec<ValueId> {
        self.region_outs[r].clone()
    }

    /// A reentrant checkpoint's forward: the region runs without autograd, keeping its
    /// inputs; one node stands for it on the tape.
    pub fn checkpoint_forward(&mut self, sim: &mut Sim, r: usize, inputs: &[ValueId], range: std::ops::Range<usize>) {
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
        let kept: Vec<(ValueId, Ten)> = self.kept[r].iter().map(|(v, t)| (*v, Engine::share(sim, t))).collect();
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
    fn forward_keeping(&mut self, sim: &mut Sim, range: std::ops::Range<usize>, keep: &[ValueId]) {
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
    pub fn keep_region_inputs(&mut self, sim: &mut Sim, r: usize, inputs: &[ValueId]) {
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
