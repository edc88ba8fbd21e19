//! `scaled_dot_product_attention` by backend.
//!
//! - CPU without dropout: the flash kernel (`_scaled_dot_product_flash_attention_cpu`):
//!   the output laid out like q, a log-sum-exp per query row, a per-thread scratch of
//!   `qSplit x kvSplit + 2 qSplit + qSplit x hd` floats; its backward makes q, k and v
//!   gradients laid out `[B, N, H, hd]` and a per-thread score scratch.
//! - CPU with dropout: the math path (`_scaled_dot_product_attention_math`), a chain of
//!   ordinary autograd nodes: q and k^T scaled by sqrt(scale) (copies), the causal mask
//!   materialised, `bmm` on 3-D reshapes (copies where the layout needs them), the mask
//!   added in place, `_safe_softmax`, dropout with an fp32 noise tensor, `bmm` with v.
//!   Half inputs are computed in fp32.
//! - CUDA: the fused kernels (dropout included, as a philox seed and offset): output and
//!   fp32 log-sum-exp saved; half precision runs flash attention, whose backward makes
//!   fp32 `softmax_d` and `dq_accum` buffers (`mha_bwd`), fp32 the memory-efficient
//!   kernel, whose backward workspace is an uncertain term.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::engine::{Bwd, Engine, F32, Meta, Part, Read, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId, numel};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, shape: Vec<u64>) -> Vec<Ten> {
    match op {
        Op::Attention { causal, dropout, .. } => forward(e, sim, i, &inputs, causal, dropout),
        Op::ShiftedWindowMask { padded, .. } => {
            // MONAI's compute_mask: a zero image of the padded volume filled region by
            // region, its window partition (a copy), the pairwise difference, `!= 0`, a
            // masked fill, `== 0`, a second masked fill; only the last survives.
            let voxels = padded.iter().product::<u64>();
            let m = numel(&shape);
            let img = sim.alloc(voxels * F32, TMP);
            let part = sim.alloc(voxels * F32, TMP);
            let diff = sim.alloc(m * F32, TMP);
            let ne = sim.alloc(m, TMP);
            let first = sim.alloc(m * F32, TMP);
            let eq = sim.alloc(m, TMP);
            let o = e.alloc_contig(sim, &shape, F32, ACT);
            for t in [eq, first, ne, diff, part, img] {
                sim.release(t);
            }
            vec![o]
        }
        _ => Vec::new(),
    }
}

/// The backward rule of this family's ops, given the output gradient `g`; `none` holds a
/// `None` per input.
pub(super) fn bwd(
    e: &mut Engine,
    sim: &mut Sim,
    k: usize,
    op: Op,
    g: &Ten,
    none: Vec<Option<Ten>>,
) -> Vec<Option<Ten>> {
    match op {
        Op::ShiftedWindowMask { .. } => none,
        Op::Attention { .. } => backward(e, sim, k, g),
        _ => none,
    }
}

/// The CPU flash kernel's block sizes for these sequence lengths.
fn splits(q_len: u64, kv_len: u64) -> (u64, u64) {
    let q = if q_len >= 768 {
        256
    } else if q_len >= 192 {
        64
    } else {
        32
    };
    let kv = if kv_len >= 512 { 512 } else { kv_len };
    (q.min(q_len), kv.min(kv_len))
}

/// `[B, H, N, hd]` strides of a tensor stored `[B, N, H, hd]`.
fn bnhd(shape: &[u64]) -> Vec<u64> {
    let (n, h, hd) = (shape[2], shape[1], shape[3]);
    vec![n * h * hd, hd, h * hd, 1]
}

pub(crate) fn forward(
    e: &mut Engine,
    sim: &mut Sim,
    i: usize,
    inputs: &[ValueId],
    causal: bool,
    dropout: f64,
) -> Vec<Ten> {
    let q = e.read_low(sim, inputs[0]);
    let k = e.read_low(sim, inputs[1]);
    let v = e.read_low(sim, inputs[2]);
    let mask = inputs.get(3).map(|&m| e.read_low(sim, m)).map(|m| {
        if m.t.esize != 1 {
            return m;
        }
        // A boolean mask becomes an additive one in q's dtype first
        // (`convert_boolean_attn_mask`: `where(mask, 0, -inf)`), shaped like the mask.
        let add = e.alloc_contig(sim, &m.t.shape, q.t.esize, ACT);
        Engine::release(sim, m.t);
        Read { t: add, slot: None }
    });
    let math = e.cpu() && dropout > 0.0;
    if math {
        return math_forward(e, sim, i, q, k, v, mask, causal);
    }
    let shape = q.t.shape.clone();
    let (b, h, n) = (shape[0], shape[1], shape[2]);
    let hd = shape[3];
    let s_len = k.t.shape[2];
    let out = if e.cpu() {
        e.alloc(sim, &shape, layout::like(&q.t.shape, &q.t.strides), q.t.esize, ACT)
    } else {
        e.alloc(sim, &shape, bnhd(&shape), q.t.esize, ACT)
    };
    let lse = e.alloc_contig(sim, &[b, h, n], F32, ACT);
    if e.cpu() {
        let (qs, kvs) = splits(n, s_len);
        e.transient(sim, e.kernels.threads() * (qs * kvs + 2 * qs + qs * hd) * F32);
    } else if dropout > 0.0 {
        // The philox seed and offset.
        e.transient(sim, 16);
    }
    let any = q.slot.is_some() || k.slot.is_some() || v.slot.is_some();
    let mut saved = Vec::new();
    if any {
        for t in [&q.t, &k.t, &v.t, &out, &lse] {
            saved.push(Engine::share(sim, t));
        }
        if let Some(m) = mask.as_ref() {
            saved.push(Engine::share(sim, &m.t));
        }
    }
    let mut reads = vec![&q, &k, &v];
    if let Some(m) = mask.as_ref() {
        reads.push(m);
    }
    record(e, sim, i, saved, &reads, &[&out]);
    Engine::release(sim, lse);
    for r in [q, k, v] {
        Engine::release(sim, r.t);
    }
    if let Some(m) = mask {
        Engine::release(sim, m.t);
    }
    vec![out]
}

/// A part of the math path as its own autograd node, reading from slots `ins` into `out`.
#[allow(clippy::too_many_arguments)]
fn part(
    e: &mut Engine,
    sim: &mut Sim,
    p: Part,
    saved: Vec<Ten>,
    out: usize,
    ins: Vec<Option<usize>>,
    in_meta: Vec<Meta>,
    out_meta: Meta,
) {
    e.push_saving(sim, Bwd::Part(p), saved, vec![out], ins, in_meta, vec![out_meta]);
}

#[allow(clippy::too_many_arguments)]
fn math_forward(
    e: &mut Engine,
    sim: &mut Sim,
    i: usize,
    q: Read,
    k: Read,
    v: Read,
    mask: Option<Read>,
    causal: bool,
) -> Vec<Ten> {
    let out_slot = e.g.nodes[i].output().index();
    let origin = q.t.esize;
    // Half inputs are computed in fp32.
    let up = |e: &mut Engine, sim: &mut Sim, r: Read| if r.t.esize < F32 { e.cast(sim, r, F32, ACT) } else { r };
    let q = up(e, sim, q);
    let k = up(e, sim, k);
    let v = up(e, sim, v);
    let (b, h, l, hd) = (q.t.shape[0], q.t.shape[1], q.t.shape[2], q.t.shape[3]);
    let s = k.t.shape[2];
    let bh = b * h;
    // q * sqrt(scale).
    let qs = e.alloc(sim, &q.t.shape, layout::elementwise(&q.t.shape, &[(&q.t.shape, &q.t.strides)]), F32, ACT);
    let tq = q.slot.map(|_| e.temp_slot());
    if let Some(t) = tq {
        part(e, sim, Part::Scale, Vec::new(), t, vec![q.slot], vec![q.t.meta()], qs.meta());
    }
    // The causal mask: ones -> tril -> where(mask, 0, -inf).
    let causal_mask = causal.then(|| {
        let ones = sim.alloc(l * s, TMP);
        let tril = sim.alloc(l * s, TMP);
        sim.release(ones);
        let m = e.alloc_contig(sim, &[l, s], F32, TMP);
        sim.release(tril);
        m
    });
    // k.transpose(-2, -1) * sqrt(scale).
    let mut kt_shape = k.t.shape.clone();
    kt_shape.swap(2, 3);
    let mut kt_strides = k.t.strides.clone();
    kt_strides.swap(2, 3);
    let ks = e.alloc(sim, &kt_shape, layout::elementwise(&kt_shape, &[(&kt_shape, &kt_strides)]), F32, ACT);
    let tk = k.slot.map(|_| e.temp_slot());
    if let Some(t) = tk {
        // Its gradient goes back to k through the transpose: k's own shape.
        part(e, sim, Part::Scale, Vec::new(), t, vec![k.slot], vec![k.t.meta()], ks.meta());
    }
    // attn = q_s @ k_s through bmm on 3-D reshapes.
    let (a3, _) = e.reshape(sim, &qs, &[bh, l, hd], ACT);
    let (b3, _) = e.reshape(sim, &ks, &[bh, hd, s], ACT);
    let scores = e.alloc_contig(sim, &[b, h, l, s], F32, ACT);
    let ta = (tq.is_some() || tk.is_some()).then(|| e.temp_slot());
    if let Some(t) = ta {
        let saved = vec![Engine::share(sim, &a3), Engine::share(sim, &b3)];
        part(e, sim, Part::Bmm, saved, t, vec![tq, tk], vec![qs.meta(), ks.meta()], scores.meta());
    }
    for t in [a3, b3, qs, ks] {
        Engine::release(sim, t);
    }
    // The mask is added in place; _safe_softmax then keeps its output.
    let probs = e.alloc_contig(sim, &[b, h, l, s], F32, ACT);
    // `_safe_softmax`: `isneginf` of the scores (bool) and its `all` over each row.
    sim.transient(bh * l * s + bh * l, TMP);
    let tp = ta.map(|_| e.temp_slot());
    if let (Some(t), Some(from)) = (tp, ta) {
        let saved = vec![Engine::share(sim, &probs)];
        part(e, sim, Part::Softmax, saved, t, vec![Some(from)], vec![scores.meta()], probs.meta());
    }
    Engine::release(sim, scores);
    // Dropout: an fp32 noise tensor, saved, and the dropped probabilities.
    let noise = e.alloc_contig(sim, &[b, h, l, s], F32, ACT);
    let dropped = e.alloc_contig(sim, &[b, h, l, s], F32, ACT);
    let td = tp.map(|_| e.temp_slot());
    if let (Some(t), Some(from)) = (td, tp) {
        let saved = vec![Engine::share(sim, &noise)];
        part(e, sim, Part::MulSaved, saved, t, vec![Some(from)], vec![probs.meta()], dropped.meta());
    }
    Engine::release(sim, noise);
    Engine::release(sim, probs);
    // The math function also returns the attention weights cast back to the inputs'
    // dtype (`attn.to(origin_dtype)`, made first), which SDPA drops as it returns.
    let weights_low = (origin < F32).then(|| sim.alloc(bh * l * s * origin, TMP));
    // out = dropped @ v.
    let (d3, _) = e.reshape(sim, &dropped, &[bh, l, s], ACT);
    let (v3, _) = e.reshape(sim, &v.t, &[bh, s, hd], ACT);
    let out32 = e.alloc_contig(sim, &[b, h, l, hd], F32, ACT);
    let saved = vec![Engine::share(sim, &d3), Engine::share(sim, &v3)];
    let mut vm = v.t.meta();
    vm.esize = F32;
    let out_meta = out32.meta();
    if origin < F32 {
        let t = e.temp_slot();
        part(e, sim, Part::Bmm, saved, t, vec![td, v.slot], vec![dropped.meta(), vm], out_meta);
        let low = e.alloc_contig(sim, &[b, h, l, hd], origin, ACT);
        part(e, sim, Part::Cast, Vec::new(), out_slot, vec![Some(t)], vec![out32.meta()], low.meta());
        Engine::release(sim, out32);
        for t in [d3, v3, dropped] {
            Engine::release(sim, t);
        }
        if let Some(t) = weights_low {
            sim.release(t);
        }
        finish(sim, q, k, v, mask, causal_mask);
        return vec![low];
    }
    part(e, sim, Part::Bmm, saved, out_slot, vec![td, v.slot], vec![dropped.meta(), vm], out_meta);
    for t in [d3, v3, dropped] {
        Engine::release(sim, t);
    }
    finish(sim, q, k, v, mask, causal_mask);
    vec![out32]
}

fn finish(sim: &mut Sim, q: Read, k: Read, v: Read, mask: Option<Read>, causal: Option<Ten>) {
    for r in [q, k, v] {
        Engine::release(sim, r.t);
    }
    if let Some(m) = mask {
        Engine::release(sim, m.t);
    }
    if let Some(m) = causal {
        Engine::release(sim, m);
    }
}

/// The fused kernels' backward (CPU flash, CUDA).
pub(crate) fn backward(e: &mut Engine, sim: &mut Sim, k: usize, g: &Ten) -> Vec<Option<Ten>> {
    let t = &e.tape[k];
    let metas = t.in_meta.clone();
    let ins = t.ins.clone();
    let (q, kk) = (&metas[0], &metas[1]);
    let (n, s_len) = (q.shape[2], kk.shape[2]);
    let cpu = e.cpu();
    // The kernels read the output gradient in the output's layout.
    let gc = (!g.dense()).then(|| sim.alloc(g.bytes(), TMP));
    let mut out = Vec::new();
    for (j, m) in metas.iter().enumerate().take(3) {
        out.push(ins[j].map(|slot| e.alloc(sim, &m.shape, bnhd(&m.shape), m.esize, e.grad_category(Some(slot)))));
    }
    if cpu {
        let (qs, kvs) = splits(n, s_len);
        e.transient(sim, e.kernels.threads() * 2 * qs * kvs * F32 + qs * F32);
    } else if q.esize < F32 {
        // Flash attention's backward (`mha_bwd`): after dq, dk and dv, an fp32
        // `softmax_d` of `[B, H, round128(N)]` and an fp32 `dq_accum` of
        // `[B, round128(N), H, round32(hd)]`, freed when the kernel returns.
        let (b, h, hd) = (q.shape[0], q.shape[1], q.shape[3]);
        let rows = n.div_ceil(128) * 128;
        let softmax_d = sim.alloc(b * h * rows * F32, TMP);
        let dq_accum = sim.alloc(b * rows * h * hd.div_ceil(32) * 32 * F32, TMP);
        sim.release(dq_accum);
        sim.release(softmax_d);
    } else {
        // fp32 runs the memory-efficient kernel, whose backward workspace (fp32
        // accumulators for the gradients it cannot write directly) is not modelled.
        sim.uncertain(numel(&q.shape) * F32 + numel(&kk.shape) * 2 * F32 + g.bytes());
    }
    if let Some(t) = gc {
        sim.release(t);
    }
    if metas.len() > 3 {
        out.push(None);
    }
    out
}

/// The math path's parts.
pub(crate) fn backward_part(
    e: &mut Engine,
    sim: &mut Sim,
    k: usize,
    p: &Part,
    gouts: &[Option<Ten>],
) -> Vec<Option<Ten>> {
    let t = &e.tape[k];
    let ins = t.ins.clone();
    let metas = t.in_meta.clone();
    let Some(g) = gouts.iter().flatten().next() else {
        return vec![None; ins.len()];
    };
    let grad = |e: &Engine, sim: &mut Sim, j: usize| -> Option<Ten> {
        let slot = ins[j]?;
        let m = &metas[j];
        Some(e.alloc_contig(sim, &m.shape, m.esize.max(1), e.grad_category(Some(slot))))
    };
    match p {
        Part::Bmm => {
            let a = grad(e, sim, 0);
            let b = grad(e, sim, 1);
            vec![a, b]
        }
        Part::Scale => {
            let m = &metas[0];
            let Some(slot) = ins[0] else { return vec![None] };
            let out = &t.out_meta[0];
            if out.shape != m.shape {
                // k^T * s: the product's gradient, transposed back to k's shape.
                let mut g = e.alloc_contig(sim, &out.shape, m.esize, e.grad_category(Some(slot)));
                let r = g.shape.len();
                g.shape.swap(r - 2, r - 1);
                g.strides.swap(r - 2, r - 1);
                g.view = true;
                return vec![Some(g)];
            }
            vec![grad(e, sim, 0)]
        }
        Part::MulSaved | Part::Softmax => vec![grad(e, sim, 0)],
        Part::Cast => vec![ins[0].map(|slot| e.alloc_contig(sim, &g.shape, F32, e.grad_category(Some(slot))))],
        Part::View => vec![ins[0].map(|_| Engine::share(sim, g))],
    }
}

/// `torch._native_multi_head_attention(x, x, x, ...)`, `nn.MultiheadAttention`'s
/// eval-mode fast path, for `[B, N, D]` input `f.input`; returns the `[B, N, D]` output.
///
/// - CPU (`native_multi_head_attention_cpu`): the packed projection `[B, N, 3D]`;
///   `_transform_bias_rescale_qkv` copies it to q, k, v `[3, B, H, N, hd]` and the
///   projection goes; the scores `q k^T` `[B, H, N, N]`, softmaxed in place; the
///   attention product written into q's storage, the scores then gone; the heads merged
///   by a contiguous `[B, N, D]` copy; the output projection; the copy and q, k, v go.
///   Checked event by event against PyTorch 2.11's profiler.
/// - CUDA (`native_multi_head_attention_cuda`, fused backend): the projection
///   `[B, N, 3D]` whose chunks are q, k and v as views; the fused kernel's output laid
///   out `[B, N, H, hd]` and its fp32 log-sum-exp; the output projection.
pub(crate) fn native_multi_head_attention(e: &mut Engine, sim: &mut Sim, f: &crate::graph::FusedAttention) -> Ten {
    let x = e.read(sim, f.input);
    let (shape, es) = (x.t.shape.clone(), x.t.esize);
    let (b, n, d) = (shape[0], shape[1], shape[2]);
    let h = f.heads.max(1);
    let hd = d / h;
    let qkv = e.alloc_contig(sim, &[b, n, 3 * d], es, TMP);
    let out = if e.cpu() {
        let q_k_v = e.alloc_contig(sim, &[3, b, h, n, hd], es, TMP);
        Engine::release(sim, qkv);
        let scores = e.alloc_contig(sim, &[b, h, n, n], es, TMP);
        Engine::release(sim, scores);
        let merged = e.alloc_contig(sim, &[b, n, d], es, TMP);
        let out = e.alloc_contig(sim, &[b, n, d], es, ACT);
        Engine::release(sim, merged);
        Engine::release(sim, q_k_v);
        out
    } else {
        let y = e.alloc(sim, &[b, h, n, hd], bnhd(&[b, h, n, hd]), es, TMP);
        let lse = e.alloc_contig(sim, &[b, h, n], F32, TMP);
        Engine::release(sim, lse);
        Engine::release(sim, qkv);
        let out = e.alloc_contig(sim, &[b, n, d], es, ACT);
        Engine::release(sim, y);
        out
    };
    Engine::release(sim, x.t);
    out
}
