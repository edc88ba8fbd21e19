//! Convolution kernels and the memory each keeps while it runs.
//!
//! PyTorch picks the kernel per call (`select_conv_backend` in ATen's Convolution.cpp):
//! on the CPU oneDNN when enabled and its heuristic says so (always for bf16), else
//! libtorch's native kernels; on CUDA cuDNN.
//! - native (`slow_conv2d`, `slow_conv3d`, `slow_conv_transpose*`): an im2col columns
//!   buffer per call (measured exactly against the counting allocator);
//! - oneDNN: reorders between PyTorch's plain layout and oneDNN's blocked one (channels
//!   padded to 16 on AVX-512) around each call — input, weight and output forward;
//!   output gradient, weight and input gradient for backward data; output gradient,
//!   input and weight gradient for backward weights — plus a scratchpad whose size
//!   depends on the algorithm oneDNN picks and the thread count: an uncertain term;
//! - cuDNN: a workspace chosen at run time: an uncertain term.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::Kernels;
use crate::estimate::engine::{Engine, HALF, Meta, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId, numel};

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, _shape: Vec<u64>) -> Vec<Ten> {
    match op {
        Op::Conv { .. } | Op::ConvTranspose { .. } => conv(e, sim, i, &inputs),
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
        Op::Conv { .. } | Op::ConvTranspose { .. } => backward(e, sim, k, g),
        _ => none,
    }
}

fn conv(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId]) -> Vec<Ten> {
    let x = e.read_low(sim, inputs[0]);
    let w = e.read_low(sim, inputs[1]);
    let b = (inputs.len() > 2).then(|| e.read_low(sim, inputs[2]));
    let shape = out_shape(e, i);
    let plan = super::conv::plan(e, i, &x.t, &w.t);
    let o = super::conv::forward(e, sim, &plan, &x.t, &w.t, &shape);
    let any = needs(&x) || needs(&w);
    let mut saved = keep(sim, &x.t, any);
    saved.extend(keep(sim, &w.t, any));
    let mut reads = vec![&x, &w];
    if let Some(b) = b.as_ref() {
        reads.push(b);
    }
    record(e, sim, i, saved, &reads, &[&o]);
    release(sim, x);
    release(sim, w);
    if let Some(b) = b {
        release(sim, b);
    }
    vec![o]
}
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Native,
    OneDnn,
    Cudnn,
}

#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub kernel: Kernel,
    pub nd: usize,
    pub kernel_size: u64,
    pub transposed: bool,
    /// Channels-last input (oneDNN then works in that layout without reorders).
    pub channels_last: bool,
    /// Element size the convolution computes in.
    pub esize: u64,
    pub stride: u64,
}

/// PyTorch's `ConvParams::use_mkldnn` for CPU float inputs.
fn use_onednn(op: &Op, x: &Ten, w: &Ten, threads: u64) -> bool {
    let (stride, groups, transposed, output_padding) = match *op {
        Op::Conv { stride, groups, .. } => (stride, groups, false, 0),
        Op::ConvTranspose { stride, output_padding, .. } => (stride, 1, true, output_padding),
        _ => return false,
    };
    if transposed && output_padding >= stride {
        return false;
    }
    if x.esize == HALF {
        // bf16 convolutions on a CPU with AVX-512 BF16 always go to oneDNN.
        return true;
    }
    let ws = &w.shape;
    let (kw, kh) = (ws[ws.len() - 1], ws[ws.len() - 2]);
    let xs = &x.shape;
    let n = xs[0];
    let first4 = xs[0].saturating_mul(xs[1]).saturating_mul(xs[2]).saturating_mul(*xs.get(3).unwrap_or(&1));
    let strided = stride != 1;
    (strided || n >= 16 || kw != 1 || kh != 1 || threads > 1)
        && (groups > 1 || (kw > 3 && kh > 3) || n > 1 || first4 > 20480)
}

pub(crate) fn plan(e: &Engine, i: usize, x: &Ten, w: &Ten) -> Plan {
    let op = &e.g.nodes[i].op;
    let (nd, kernel_size, transposed, stride) = match *op {
        Op::Conv { nd, kernel, stride, .. } => (nd as usize, kernel, false, stride),
        Op::ConvTranspose { nd, kernel, stride, .. } => (nd as usize, kernel, true, stride),
        _ => (2, 1, false, 1),
    };
    let kernel = match e.kernels {
        Kernels::Cpu { onednn, threads } if onednn && use_onednn(op, x, w, threads) => Kernel::OneDnn,
        Kernels::Cpu { .. } => Kernel::Native,
        Kernels::Cuda => Kernel::Cudnn,
    };
    let channels_last = layout::is_channels_last(&x.shape, &x.strides);
    Plan { kernel, nd, kernel_size, transposed, channels_last, esize: x.esize, stride }
}

/// Channels as oneDNN's blocked layouts hold them (multiples of 16 on AVX-512).
fn pad16(c: u64) -> u64 {
    c.div_ceil(16) * 16
}

/// Bytes of a `[B, C, ...]` tensor in oneDNN's blocked layout.
fn blocked(shape: &[u64], esize: u64) -> u64 {
    let mut s = shape.to_vec();
    if s.len() > 1 {
        s[1] = pad16(s[1]);
    }
    numel(&s) * esize
}

/// Bytes of a weight `[O, I, k...]` (transposed: `[I, O, k...]`) reordered to a blocked
/// layout.
fn blocked_weight(shape: &[u64], esize: u64) -> u64 {
    let mut s = shape.to_vec();
    s[0] = pad16(s[0]);
    if s[1] >= 4 {
        s[1] = pad16(s[1]);
    }
    numel(&s) * esize
}

/// The native kernels' im2col columns (see `docs/estimator.md`): a convolution's whole
/// batch `[B, C_in k^d, out_spatial]`; a transposed convolution one sample's
/// `[C_out k^d, in_spatial]`, in 2-D its forward for the whole batch, in 3-D plus a row of
/// ones over the output for the bias.
fn columns(plan: &Plan, x: &[u64], y: &[u64], forward: bool) -> u64 {
    let k = plan.kernel_size.pow(plan.nd as u32);
    let e = plan.esize;
    if !plan.transposed {
        return x[0] * x[1] * k * numel(&y[2..]) * e;
    }
    let per_sample = y[1] * k * numel(&x[2..]) * e;
    match (forward, plan.nd) {
        (false, _) => per_sample,
        (true, 3) => per_sample + numel(&y[2..]) * e,
        (true, _) => per_sample * x[0],
    }
}

pub(crate) fn forward(e: &mut Engine, sim: &mut Sim, plan: &Plan, x: &Ten, w: &Ten, shape: &[u64]) -> Ten {
    let esize = plan.esize;
    match plan.kernel {
        Kernel::Native => {
            // The native kernels need a contiguous input.
            let xc = (!x.contiguous()).then(|| sim.alloc(x.bytes(), TMP));
            let o = if plan.transposed && plan.nd == 3 {
                // slow_conv_transpose3d makes its output like the input and resizes it:
                // a larger output replaces the storage, a smaller one keeps it.
                let out_bytes = numel(shape) * esize;
                if out_bytes > x.bytes() {
                    let first = sim.alloc(x.bytes(), TMP);
                    let o = e.alloc_contig(sim, shape, esize, ACT);
                    sim.release(first);
                    o
                } else {
                    let st = sim.alloc(x.bytes(), ACT);
                    Ten { st, shape: shape.to_vec(), strides: layout::contiguous(shape), esize, view: false }
                }
            } else {
                e.alloc_contig(sim, shape, esize, ACT)
            };
            sim.transient(columns(plan, &x.shape, shape, true), TMP);
            if let Some(t) = xc {
                sim.release(t);
            }
            o
        }
        Kernel::OneDnn => {
            if plan.channels_last {
                let wr = sim.alloc(blocked_weight(&w.shape, esize), TMP);
                let o = e.alloc(sim, shape, layout::channels_last(shape), esize, ACT);
                sim.uncertain(scratch_bound(&x.shape, shape, &w.shape, esize, e));
                sim.release(wr);
                return o;
            }
            // Small input-channel counts (a stem on RGB) are read in the plain layout.
            let xr = (x.shape[1] >= 16).then(|| sim.alloc(blocked(&x.shape, esize), TMP));
            let wr = sim.alloc(blocked_weight(&w.shape, esize), TMP);
            let yb = sim.alloc(blocked(shape, esize), TMP);
            sim.uncertain(scratch_bound(&x.shape, shape, &w.shape, esize, e));
            sim.release(wr);
            if let Some(t) = xr {
                sim.release(t);
            }
            let o = e.alloc_contig(sim, shape, esize, ACT);
            sim.release(yb);
            o
        }
        Kernel::Cudnn => {
            let strides = if plan.channels_last { layout::channels_last(shape) } else { layout::contiguous(shape) };
            let o = e.alloc(sim, shape, strides, esize, ACT);
            sim.uncertain(workspace_bound(&x.shape, shape, &w.shape, esize));
            o
        }
    }
}

/// An upper bound for oneDNN's scratchpad: per thread, a weight-sized reduction buffer
/// and a copy of the larger activation.
fn scratch_bound(x: &[u64], y: &[u64], w: &[u64], esize: u64, e: &Engine) -> u64 {
    let threads = match e.kernels {
        Kernels::Cpu { threads, .. } => threads.max(1),
        Kernels::Cuda => 1,
    };
    threads * numel(w) * esize * 4 + numel(x).max(numel(y)) * esize
}

/// An upper bound for cuDNN's workspace for one call with PyTorch's defaults
/// (`cudnn.benchmark` off: the heuristics' first algorithm whose workspace can be
/// allocated; on: `cudnnFind` tries every algorithm): the algorithm's own buffer, taken at
/// the larger of the input and output, and the layout transforms tensor-core kernels make
/// of channels-first operands (a copy of the input, the output and the weight). Not
/// measured by this project on a GPU yet; it only widens the interval.
fn workspace_bound(x: &[u64], y: &[u64], w: &[u64], esize: u64) -> u64 {
    (numel(x).max(numel(y)) + numel(x) + numel(y) + numel(w)) * esize
}

/// oneDNN's bf16 convolution backward (AVX-512 BF16), as measured with the profiler
/// (`docs/estimator.md`, "oneDNN bf16"):
/// - data, stride 1: the output gradient, weight and input gradient reordered to blocked
///   layouts, the plain input gradient made before the blocked one goes; strided: the
///   output gradient and input gradient in a plain-sized (channels-last) layout with a
///   scratchpad, then the plain gradient and a reorder temporary;
/// - weights, 16 or more input channels (the JIT kernel): output gradient and input
///   reordered, a blocked weight gradient, and a scratchpad of, per thread, one sample's
///   blocked input and output gradient, an fp32 weight reduction buffer and a row (2-D)
///   or plane (3-D) of fp32 input per input channel (twice when strided, where only one
///   thread's copy is per-thread for a row), plus 8580 bytes — per thread only where
///   oneDNN splits the batch across threads, which it does when the activations
///   outweigh the weights (all threads' copies are the interval's high end); fewer than
///   16 input channels (a GEMM kernel): the weight gradient first and a per-thread
///   scratchpad of the same rows with an unpadded fp32 weight buffer, measured for
///   MONAI's first convolution; other shapes keep more (up to twice an output plane's
///   columns and a padded weight buffer: uncertain).
#[allow(clippy::too_many_arguments)]
fn onednn_bf16_backward(
    e: &mut Engine,
    sim: &mut Sim,
    plan: &Plan,
    xm: &Meta,
    wm: &Meta,
    y: &[u64],
    gx_slot: Option<usize>,
    gw_slot: Option<usize>,
) -> (Option<Ten>, Option<Ten>) {
    const FIXED: u64 = 8580;
    let esize = plan.esize;
    let threads = match e.kernels {
        Kernels::Cpu { threads, .. } => threads.max(1),
        Kernels::Cuda => 1,
    };
    let (b, ic, oc) = (xm.shape[0].max(1), xm.shape[1], y[1]);
    let (icp, ocp) = (pad16(ic), pad16(oc));
    let k = plan.kernel_size.pow(plan.nd as u32);
    let x_bytes = numel(&xm.shape) * esize;
    let y_bytes = numel(y) * esize;
    let mut gx = None;
    let mut gw = None;
    if gx_slot.is_some() {
        if plan.stride == 1 {
            let gr = sim.alloc(blocked(y, esize), TMP);
            let wr = sim.alloc(blocked_weight(&wm.shape, esize), TMP);
            let gxb = sim.alloc(blocked(&xm.shape, esize), TMP);
            sim.release(wr);
            sim.release(gr);
            gx = Some(e.alloc_contig(sim, &xm.shape, esize, e.grad_category(gx_slot)));
            sim.release(gxb);
        } else {
            let gr = sim.alloc(y_bytes, TMP);
            let wr = sim.alloc(ocp * numel(&wm.shape[1..]) * esize, TMP);
            let gxn = sim.alloc(x_bytes, TMP);
            let sample = (x_bytes / b).max(y_bytes / b);
            sim.uncertain(threads * (51_224 + sample) + 16_384);
            sim.release(wr);
            sim.release(gr);
            gx = Some(e.alloc_contig(sim, &xm.shape, esize, e.grad_category(gx_slot)));
            if ic > 1 {
                sim.transient(x_bytes, TMP);
            }
            sim.release(gxn);
        }
    }
    if gw_slot.is_some() {
        let xs = &xm.shape;
        // A row (2-D) or a plane (3-D) of the input: every spatial size but the first.
        let inner = numel(&xs[3..]).max(1);
        let wf32 = ocp * icp * k * 4;
        if ic >= 16 {
            let gr = sim.alloc(blocked(y, esize), TMP);
            let xr = sim.alloc(blocked(xs, esize), TMP);
            let gwb = sim.alloc(blocked_weight(&wm.shape, esize), TMP);
            let per_sample = (blocked(xs, esize) + blocked(y, esize)) / b;
            // oneDNN splits the batch across threads only when activations outweigh the
            // weights; each such thread then keeps its own buffers.
            let (src, dst, wei) = (numel(xs), numel(y), oc * ic * k);
            let split = if src + dst > 2 * wei { threads } else { 1 };
            let (scratch, most) = if plan.stride == 1 {
                let per_thread = per_sample + wf32 + icp * inner * 4 + ocp * 4;
                (split * per_thread + FIXED, threads * per_thread + FIXED)
            } else {
                let row = *xs.last().unwrap_or(&1);
                let one = per_sample + wf32 + 2 * icp * inner * 4 + ocp * 4 + FIXED;
                (one + (threads - 1) * 2 * icp * row * 4, threads * one)
            };
            sim.uncertain(most);
            sim.transient(scratch, TMP);
            sim.release(xr);
            sim.release(gr);
            gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(gw_slot)));
            sim.release(gwb);
        } else if plan.stride == plan.kernel_size && plan.kernel_size > 1 {
            // A patch embedding: the output gradient reordered, the input copied, and one
            // thread's buffers (a row per further thread).
            let gr = sim.alloc(blocked(y, esize), TMP);
            let xc = sim.alloc(x_bytes, TMP);
            let row = *xs.last().unwrap_or(&1);
            let scratch = oc * ic * k * 4 + 2 * icp * row * 4 + ocp * 4 + FIXED + (threads - 1) * 2 * icp * row * 4;
            sim.uncertain(scratch + scratch / 16);
            sim.transient(scratch, TMP);
            sim.release(xc);
            sim.release(gr);
            gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(gw_slot)));
        } else {
            let first = sim.alloc(numel(&wm.shape) * esize, TMP);
            let out_plane = numel(&y[3..]).max(1);
            let scratch = threads * (2 * icp * inner * 4 + ocp * 4 + oc * ic * k * 4) + FIXED;
            sim.uncertain(scratch + 2 * ic * k * out_plane * esize + ocp * 16 * k * 4);
            sim.transient(scratch, TMP);
            gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(gw_slot)));
            sim.release(first);
        }
    }
    (gx, gw)
}

/// Gradients for `[x, w, bias?]` of tape node `k`.
pub(crate) fn backward(e: &mut Engine, sim: &mut Sim, k: usize, g: &Ten) -> Vec<Option<Ten>> {
    let t = &e.tape[k];
    let node = t.node;
    let (xm, wm) = (t.in_meta[0].clone(), t.in_meta[1].clone());
    let ins = t.ins.clone();
    let has_bias = ins.len() > 2;
    let x = Ten {
        st: crate::estimate::sim::Tensor::NONE,
        shape: xm.shape.clone(),
        strides: xm.strides.clone(),
        esize: xm.esize,
        view: true,
    };
    let w = Ten {
        st: crate::estimate::sim::Tensor::NONE,
        shape: wm.shape.clone(),
        strides: wm.strides.clone(),
        esize: wm.esize,
        view: true,
    };
    let plan = plan(e, node, &x, &w);
    let esize = plan.esize;
    let y = g.shape.clone();
    let mut gx = None;
    let mut gw = None;
    match plan.kernel {
        Kernel::Native => {
            let xc = (!x.contiguous()).then(|| sim.alloc(x.bytes(), TMP));
            let gc = (!g.contiguous()).then(|| sim.alloc(g.bytes(), TMP));
            if ins[0].is_some() {
                gx = Some(e.alloc_like(sim, &xm, esize, e.grad_category(ins[0])));
            }
            if ins[1].is_some() {
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
            }
            sim.transient(columns(&plan, &xm.shape, &y, false), TMP);
            if let Some(t) = gc {
                sim.release(t);
            }
            if let Some(t) = xc {
                sim.release(t);
            }
        }
        Kernel::OneDnn if esize == HALF && !plan.channels_last && !plan.transposed => {
            let (a, b) = onednn_bf16_backward(e, sim, &plan, &xm, &wm, &y, ins[0], ins[1]);
            gx = a;
            gw = b;
        }
        Kernel::OneDnn => {
            let cl = plan.channels_last;
            if ins[0].is_some() {
                let gr = (!cl).then(|| sim.alloc(blocked(&y, esize), TMP));
                let wr = sim.alloc(blocked_weight(&wm.shape, esize), TMP);
                let gxb = (!cl).then(|| sim.alloc(blocked(&xm.shape, esize), TMP));
                sim.uncertain(scratch_bound(&xm.shape, &y, &wm.shape, esize, e));
                sim.release(wr);
                if let Some(t) = gr {
                    sim.release(t);
                }
                let strides = if cl { layout::channels_last(&xm.shape) } else { layout::contiguous(&xm.shape) };
                gx = Some(e.alloc(sim, &xm.shape, strides, esize, e.grad_category(ins[0])));
                if let Some(t) = gxb {
                    sim.release(t);
                }
            }
            if ins[1].is_some() {
                let gr = (!cl).then(|| sim.alloc(blocked(&y, esize), TMP));
                let xr = (!cl && xm.shape[1] >= 16).then(|| sim.alloc(blocked(&xm.shape, esize), TMP));
                let gwb = sim.alloc(blocked_weight(&wm.shape, esize), TMP);
                if !cl && xm.shape[1] < 16 && plan.stride == plan.kernel_size && plan.kernel_size > 1 {
                    // A patch embedding (kernel = stride, few input channels): oneDNN's
                    // kernel keeps, per thread, four weight-sized fp32 buffers and one
                    // sample of the input (measured for ViT's and CLIP's patch layers).
                    let threads = match e.kernels {
                        Kernels::Cpu { threads, .. } => threads.max(1),
                        Kernels::Cuda => 1,
                    };
                    let sample = numel(&xm.shape) / xm.shape[0].max(1) * esize;
                    sim.transient(threads * (4 * numel(&wm.shape) * esize + sample), TMP);
                }
                sim.uncertain(scratch_bound(&xm.shape, &y, &wm.shape, esize, e));
                if let Some(t) = xr {
                    sim.release(t);
                }
                if let Some(t) = gr {
                    sim.release(t);
                }
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
                sim.release(gwb);
            }
        }
        Kernel::Cudnn => {
            if ins[0].is_some() {
                gx = Some(e.alloc_like(sim, &xm, esize, e.grad_category(ins[0])));
                sim.uncertain(workspace_bound(&xm.shape, &y, &wm.shape, esize));
            }
            if ins[1].is_some() {
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
                sim.uncertain(workspace_bound(&xm.shape, &y, &wm.shape, esize));
            }
        }
    }
    let mut out = vec![gx, gw];
    if has_bias {
        let c = y[1];
        out.push(ins[2].map(|s| e.alloc_contig(sim, &[c], esize, e.grad_category(Some(s)))));
    }
    out
}
