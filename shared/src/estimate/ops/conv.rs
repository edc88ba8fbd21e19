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
use crate::estimate::engine::{Engine, F32, HALF, Meta, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId, numel};
use crate::isa::CpuIsa;

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
    pub padding: u64,
    /// Groups of a grouped convolution (1 otherwise).
    pub groups: u64,
    /// Channels per block of oneDNN's blocked layouts here (the ISA's vector width in
    /// elements of fp32: 16 with AVX-512, 8 below; bf16 runs only with AVX-512).
    pub block: u64,
}

/// PyTorch's `ConvParams::use_mkldnn` for CPU float inputs.
fn use_onednn(op: &Op, x: &Ten, w: &Ten, threads: u64, isa: CpuIsa) -> bool {
    let (stride, groups, transposed, output_padding) = match *op {
        Op::Conv { stride, groups, .. } => (stride, groups, false, 0),
        Op::ConvTranspose { stride, output_padding, .. } => (stride, 1, true, output_padding),
        _ => return false,
    };
    if transposed && output_padding >= stride {
        return false;
    }
    if x.esize == HALF {
        // bf16 convolutions go to oneDNN wherever it runs bf16
        // (`mkldnn_bf16_device_check`), else to the native kernels.
        return isa.onednn_bf16();
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
    let (nd, kernel_size, transposed, stride, padding, groups) = match *op {
        Op::Conv { nd, kernel, stride, padding, groups, .. } => {
            (nd as usize, kernel, false, stride, padding, groups.max(1))
        }
        Op::ConvTranspose { nd, kernel, stride, padding, .. } => (nd as usize, kernel, true, stride, padding, 1),
        _ => (2, 1, false, 1, 0, 1),
    };
    let kernel = match e.kernels {
        Kernels::Cpu { onednn, threads, isa } if onednn && use_onednn(op, x, w, threads, isa) => Kernel::OneDnn,
        Kernels::Cpu { .. } => Kernel::Native,
        Kernels::Cuda => Kernel::Cudnn,
    };
    let channels_last = layout::is_channels_last(&x.shape, &x.strides);
    let block = match e.kernels {
        Kernels::Cpu { isa, .. } if x.esize != HALF => isa.block(),
        _ => 16,
    };
    Plan { kernel, nd, kernel_size, transposed, channels_last, esize: x.esize, stride, padding, groups, block }
}

/// Channels as oneDNN's blocked layouts hold them: multiples of the block.
fn pad(c: u64, block: u64) -> u64 {
    c.div_ceil(block) * block
}

/// Channels padded to 16, as bf16's blocked layouts (AVX-512 only) hold them.
fn pad16(c: u64) -> u64 {
    pad(c, 16)
}

/// Bytes of a `[B, C, ...]` tensor in oneDNN's blocked layout.
fn blocked(shape: &[u64], esize: u64, block: u64) -> u64 {
    let mut s = shape.to_vec();
    if s.len() > 1 {
        s[1] = pad(s[1], block);
    }
    numel(&s) * esize
}

/// Bytes of a weight `[O, I, k...]` (transposed: `[I, O, k...]`) reordered to a blocked
/// layout.
fn blocked_weight(shape: &[u64], esize: u64, block: u64) -> u64 {
    let mut s = shape.to_vec();
    s[0] = pad(s[0], block);
    if s[1] >= 4 {
        s[1] = pad(s[1], block);
    }
    numel(&s) * esize
}

/// Whether oneDNN runs a grouped convolution's weight gradient with its generic JIT
/// kernel (`jit_avx512_common_convolution_bwd_weights_t`, bf16's
/// `jit_avx512_core_bf16_convolution_bwd_weights_t`) on channels-last data: its depthwise
/// kernel declines kernels wider than 3 (oneDNN 3.10's `jit_uni_dw_conv_kernel_utils`).
fn grouped_jit_bwd_w(plan: &Plan) -> bool {
    plan.groups > 1 && plan.kernel_size > 3 && !plan.transposed
}

/// The bf16 generic JIT weight-gradient kernel's scratchpad for a grouped 2-D
/// convolution (`jit_avx512_core_bf16_conv_bwd_weights_kernel_f32_t::init_scratchpad`,
/// one thread share of the batch): an fp32 copy of the padded weight gradient, the input
/// transposed per group (rows widened by the padding, `tr_iw`), the output gradient
/// transposed (widths even), 128 bytes per booking and a barrier context (4096 bytes,
/// 4096-aligned). Measured to the byte for 5x5 and 7x7 depthwise kernels, 8² and 16².
fn grouped_bf16_bwd_w_scratch(plan: &Plan, x: &[u64], y: &[u64], padded_weight: u64) -> u64 {
    let g = plan.groups;
    let (h, w) = (x[x.len() - 2], x[x.len() - 1]);
    let (oh, ow) = (y[y.len() - 2], y[y.len() - 1]);
    let tr_pad = pad(plan.padding.max(plan.padding + 1), 2);
    let tr_iw = pad(w + tr_pad, 2);
    let block = plan.block;
    4 * padded_weight + 2 * (g * block * h * tr_iw + tr_pad) + 2 * g * block * oh * pad(ow, 2) + 3 * 128 + 8192
}

/// Whether libtorch's native 2-D convolution runs channels-last: a plain (not
/// transposed, not grouped) 2-D convolution on a channels-last input.
fn native_channels_last(plan: &Plan) -> bool {
    plan.channels_last && plan.nd == 2 && !plan.transposed && plan.groups == 1
}

/// The native kernels' im2col columns (see `docs/estimator.md`): a convolution's whole
/// batch `[B, C_in k^d, out_spatial]`; a transposed convolution one sample's
/// `[C_out k^d, in_spatial]`, in 2-D its forward for the whole batch, in 3-D plus a row of
/// ones over the output for the bias.
fn columns(plan: &Plan, x: &[u64], y: &[u64], forward: bool) -> u64 {
    let k = plan.kernel_size.pow(plan.nd as u32);
    let e = plan.esize;
    if !plan.transposed {
        // A 1x1 kernel with stride 1 and no padding reads its input as the columns
        // (`compute_columns2d`'s view), with no buffer.
        if plan.kernel_size == 1 && plan.stride == 1 && plan.padding == 0 {
            return 0;
        }
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
        Kernel::Native if plan.groups > 1 => {
            // The native kernels take no groups: ATen's `_convolution` runs one call per
            // group on `input.narrow(1, …).contiguous()` (a copy unless the batch is 1),
            // keeps each group's output, then concatenates them (profiler: a depthwise
            // 7x7 convolution, 64 groups).
            let g = plan.groups;
            let outs = sim.alloc(numel(shape) * esize, TMP);
            let xg = (x.shape[0] > 1 || !x.contiguous()).then(|| sim.alloc(x.bytes() / g, TMP));
            sim.transient(columns(plan, &x.shape, shape, true) / g, TMP);
            if let Some(t) = xg {
                sim.release(t);
            }
            let o = e.alloc_contig(sim, shape, esize, ACT);
            sim.release(outs);
            o
        }
        Kernel::Native if native_channels_last(plan) => {
            // `slow_conv2d` keeps a channels-last input's layout (ConvNeXt's 1x1
            // convolutions after a permuted layer norm): no copy, a channels-last output.
            let o = e.alloc(sim, shape, layout::channels_last(shape), esize, ACT);
            sim.transient(columns(plan, &x.shape, shape, true), TMP);
            o
        }
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
                let wr = sim.alloc(blocked_weight(&w.shape, esize, plan.block), TMP);
                let o = e.alloc(sim, shape, layout::channels_last(shape), esize, ACT);
                sim.uncertain(scratch_bound(&x.shape, shape, &w.shape, esize, e));
                sim.release(wr);
                return o;
            }
            // AVX-512 without BF16 instructions runs a bf16 transposed convolution with an
            // fp32 accumulator of its whole blocked output and 128 bytes, booked first, and
            // its weights with both channel counts padded to the block (measured with
            // `ONEDNN_MAX_CPU_ISA=AVX512_CORE`: MONAI's 3-D up-sampling, exactly).
            let emulated =
                plan.transposed && esize == HALF && matches!(e.kernels, Kernels::Cpu { isa: CpuIsa::Avx512Core, .. });
            let acc = emulated.then(|| sim.alloc(blocked(shape, F32, plan.block) + 128, TMP));
            // Small input-channel counts (a stem on RGB) are read in the plain layout.
            let xr = (x.shape[1] >= 16).then(|| sim.alloc(blocked(&x.shape, esize, plan.block), TMP));
            let wbytes = if emulated {
                let mut p = w.shape.clone();
                p[0] = pad(p[0], plan.block);
                p[1] = pad(p[1], plan.block);
                numel(&p) * esize
            } else {
                blocked_weight(&w.shape, esize, plan.block)
            };
            let wr = sim.alloc(wbytes, TMP);
            let yb = sim.alloc(blocked(shape, esize, plan.block), TMP);
            sim.uncertain(scratch_bound(&x.shape, shape, &w.shape, esize, e));
            sim.release(wr);
            if let Some(t) = xr {
                sim.release(t);
            }
            if let Some(t) = acc {
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
    let threads = e.kernels.threads();
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
///   16 input channels but 16 or more output channels (the JIT kernel's small-channel
///   form): the weight gradient first and a per-thread
///   scratchpad of the same rows with an unpadded fp32 weight buffer, measured for
///   MONAI's first convolution; other shapes keep more (up to twice an output plane's
///   columns and a padded weight buffer: uncertain); fewer than 16 output channels as
///   well, oneDNN's GEMM kernel: one sample's bf16 columns (a plane in 3-D) and 16 bytes
///   per weight plus 384.
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
    bias: bool,
) -> (Option<Ten>, Option<Ten>) {
    const FIXED: u64 = 8580;
    let esize = plan.esize;
    let threads = e.kernels.threads();
    let (b, ic, oc) = (xm.shape[0].max(1), xm.shape[1], y[1]);
    let (icp, ocp) = (pad16(ic), pad16(oc));
    let k = plan.kernel_size.pow(plan.nd as u32);
    let x_bytes = numel(&xm.shape) * esize;
    let y_bytes = numel(y) * esize;
    let mut gx = None;
    let mut gw = None;
    if gx_slot.is_some() {
        if plan.stride == 1 {
            let gr = sim.alloc(blocked(y, esize, plan.block), TMP);
            let wr = sim.alloc(blocked_weight(&wm.shape, esize, plan.block), TMP);
            let gxb = sim.alloc(blocked(&xm.shape, esize, plan.block), TMP);
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
        amx_bwd_w(e, sim, plan, &xm.shape, y, threads);
        let xs = &xm.shape;
        // A row (2-D) or a plane (3-D) of the input: every spatial size but the first.
        let inner = numel(&xs[3..]).max(1);
        let wf32 = ocp * icp * k * 4;
        let g = plan.groups;
        let (icg, ocg) = (ic / g, oc / g);
        if g > 1 && icg >= 16 && ocg >= 16 {
            // Grouped (ResNeXt's 32 groups): the JIT kernel works group by group, with
            // one sample's blocked input and output gradient, an fp32 buffer of the
            // grouped weights, a row of fp32 input per channel (two when strided) and
            // 8580 bytes, once whatever the threads (measured for 8 and 32 groups of 32
            // channels, strides 1 and 2).
            let gr = sim.alloc(blocked(y, esize, plan.block), TMP);
            let xr = sim.alloc(blocked(xs, esize, plan.block), TMP);
            let gwb = sim.alloc(numel(&wm.shape) * esize, TMP);
            let per_sample = (blocked(xs, esize, plan.block) + blocked(y, esize, plan.block)) / b;
            let rows = if plan.stride == 1 { 1 } else { 2 };
            let scratch = per_sample + g * pad16(ocg) * pad16(icg) * k * 4 + rows * icp * inner * 4 + FIXED;
            sim.transient(scratch, TMP);
            sim.release(xr);
            sim.release(gr);
            gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(gw_slot)));
            sim.release(gwb);
        } else if (icg < 16 && ocg < 16) || plan.kernel_size > MAX_JIT_BWD_W_KERNEL {
            let first = sim.alloc(numel(&wm.shape) * esize, TMP);
            sim.transient(gemm_bwd_w_scratch(plan, &xm.shape, &wm.shape, y, threads, bias), TMP);
            gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(gw_slot)));
            sim.release(first);
        } else if g > 1 {
            // Grouped convolutions whose groups mix 16 or more channels on one side with
            // fewer on the other: not measured; the plain JIT rule below with the
            // grouped weights is the high end.
            let first = sim.alloc(numel(&wm.shape) * esize, TMP);
            let per_sample = (blocked(xs, esize, plan.block) + blocked(y, esize, plan.block)) / b;
            sim.uncertain(threads * (per_sample + pad16(oc) * pad16(icg) * k * 4 + 2 * icp * inner * 4) + FIXED);
            gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(gw_slot)));
            sim.release(first);
        } else if ic >= 16 {
            let gr = sim.alloc(blocked(y, esize, plan.block), TMP);
            let xr = sim.alloc(blocked(xs, esize, plan.block), TMP);
            let gwb = sim.alloc(blocked_weight(&wm.shape, esize, plan.block), TMP);
            let per_sample = (blocked(xs, esize, plan.block) + blocked(y, esize, plan.block)) / b;
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
            let gr = sim.alloc(blocked(y, esize, plan.block), TMP);
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

/// AMX (`avx512_core_amx`) runs bf16 weight gradients with its brgemm kernel, which
/// copies the input and the output gradient transposed for its tiles: per thread group
/// (up to the threads, at most batch x output depth) one sample's input with channels
/// padded to 16 and rows of `ceil((W + 2 pad) / stride)` padded to 32, times the stride,
/// the same of the output gradient (rows padded to 32), and an fp32 weight buffer
/// (oneDNN 3.10 `jit_brgemm_conv_utils.cpp`, `init_conf_bwd_w` and
/// `init_scratchpad_bwd_w`; sizes from its descriptors with an AMX CPU simulated, none
/// measured on one): the interval's high end, where the plan says AMX or names no ISA.
fn amx_bwd_w(e: &Engine, sim: &mut Sim, plan: &Plan, x: &[u64], y: &[u64], threads: u64) {
    if !matches!(e.kernels, Kernels::Cpu { isa: CpuIsa::Avx512CoreAmx, .. }) || plan.esize != HALF {
        return;
    }
    let (n, ic, oc) = (x[0].max(1), x[1], y[1]);
    let last = x.len() - 1;
    let (iw, ow) = (x[last], y[last]);
    let s = plan.stride.max(1);
    let tr_iw = (iw + 2 * plan.padding).div_ceil(s).div_ceil(32) * 32 * s;
    let tr_ow = ow.div_ceil(32) * 32;
    // Every spatial size but the width: rows (2-D), planes of rows (3-D).
    let (x_rest, y_rest) = (numel(&x[2..last]), numel(&y[2..last]));
    let depth = if plan.nd == 3 { y[2] } else { 1 };
    let groups = threads.min(n * depth).max(1);
    let k = plan.kernel_size.pow(plan.nd as u32);
    let per_group =
        pad16(ic) * tr_iw * x_rest * HALF + pad16(oc) * tr_ow * y_rest * HALF + pad16(oc) * pad16(ic) * k * 4;
    sim.uncertain(groups * per_group);
}

/// Whether oneDNN's fp32 JIT weight-gradient kernels both decline a convolution, which
/// then runs on its GEMM kernel (oneDNN 3.10 `cpu_convolution_list.cpp`: the AVX-512
/// kernel, then the AVX2 one, then GEMM; their `init_conf` in
/// `jit_avx512_common_conv_kernel.cpp` and `jit_avx2_conv_kernel_f32.cpp`):
/// - AVX-512 declines 4 to 15 input channels without groups (under 16 only its "first
///   convolution" form for 1 to 3), grouped channels off its 16-wide blocks, kernels wider
///   than 14, padding not under the kernel (at most half of it in height), and a padded
///   3-D depth no larger than the kernel (a UNet's 2³ bottom);
/// - AVX2 declines any 3-D padding, grouped channels off its 8-wide blocks (3 channels are
///   its flat form), kernels of 14 or wider, kernels taller or deeper than the input,
///   and padding not under the kernel;
/// - SSE 4.1 has no JIT weight-gradient kernel in this list's use.
fn f32_gemm_bwd_w(plan: &Plan, x: &[u64], y: &[u64], isa: CpuIsa) -> bool {
    if plan.esize != F32 {
        return false;
    }
    let g = plan.groups.max(1);
    let (ic, oc) = (x[1] / g, y[1] / g);
    let (k, p, s) = (plan.kernel_size, plan.padding, plan.stride.max(1));
    let xs = &x[2..];
    let ys = &y[2..];
    // The far side's padding along each axis, from the output size oneDNN is given.
    let far = |i: usize| ((ys[i].saturating_sub(1)) * s + k).saturating_sub(xs[i] + p);
    let axes = xs.len();
    let width = axes - 1;
    let pads_under = (0..axes).all(|i| p < k && far(i) < k);
    let avx512 = isa >= CpuIsa::Avx512Core && {
        let channels = if g == 1 { ic >= 16 || ic <= 3 } else { ic % 16 == 0 && oc % 16 == 0 };
        let height = axes.saturating_sub(2);
        let pads = pads_under
            && p <= k / 2
            && far(height) <= k / 2
            && p <= 28
            && far(width) <= 28
            && (plan.nd != 3 || p == 0 || k < xs[0] + p);
        channels && pads && k <= 14
    };
    let avx2 = isa >= CpuIsa::Avx2 && {
        let channels = g == 1 || ic == 3 || (ic % 8 == 0 && oc % 8 == 0);
        let depth = plan.nd != 3 || p == 0;
        channels && depth && pads_under && k < 14 && xs[..width].iter().all(|&i| k <= i)
    };
    !avx512 && !avx2
}

/// The widest kernel oneDNN's JIT bf16 weight-gradient kernel takes; wider ones (CLIP's
/// 32-pixel patches) go to its GEMM kernel (measured: 24 JIT, 26 and more GEMM).
const MAX_JIT_BWD_W_KERNEL: u64 = 24;

/// oneDNN's GEMM weight-gradient kernel (`gemm_bf16_convolution_bwd_weights_t` and
/// `gemm_convolution_bwd_weights_t`, oneDNN 3.10 `gemm_convolution_utils.cpp`,
/// `init_conf` and `init_scratchpad`): the input's columns of one output plane per
/// working thread (`IC/g x k x OH x OW`), a reduction buffer per working thread of as
/// many floats as the weights have bytes (8 bytes per bf16 weight, 16 per fp32 one); for
/// bf16 also the fp32 accumulator of the weight gradient (the same sizing) and a bias
/// buffer (4 bytes per output channel) where the convolution has one; each booking
/// padded by 128 bytes. It works on every thread
/// ("outer threading") when a plane is under 256 points per thread, the batch or the
/// groups leave work to share (batch over 1 or more than 2 groups) and its memory
/// estimate stays under 15 times the operands' bytes per thread (and 1 GiB); else on one.
/// Measured to the byte for 4 to 12 channels, 2-D and 3-D, strides 1 and 2, 1 to 4
/// threads, 1 to 32 groups, and 32-pixel patches.
fn gemm_bwd_w_scratch(plan: &Plan, x: &[u64], w: &[u64], y: &[u64], threads: u64, bias: bool) -> u64 {
    const SIMD_W: u64 = 16;
    let g = plan.groups.max(1);
    let (n, ic) = (x[0], x[1] / g);
    let k = plan.kernel_size.pow(plan.nd as u32);
    let plane = if plan.nd == 3 { numel(&y[3..]) } else { numel(&y[2..]) };
    let weights = numel(w);
    let wei_bytes = weights * plan.esize;
    let operands = (numel(x) + numel(y)) * plan.esize + wei_bytes;
    let mem_estimate = threads * 4 * wei_bytes + 4 * wei_bytes + 2 * threads * ic * k * SIMD_W;
    let mem_ok = mem_estimate < (15 * threads * operands).min(1 << 30);
    let outer = mem_ok && plane / threads < 256 && (n != 1 || g > 2);
    let t = if outer { threads } else { 1 };
    // A 1x1, stride-1, unpadded convolution reads its input as the columns themselves.
    let pointwise = k == 1 && plan.stride <= 1 && plan.padding == 0;
    let cols = if pointwise { 0 } else { ic * k * plane * plan.esize };
    let reduction = t * wei_bytes * 4;
    if plan.esize == HALF {
        let bias_buf = if bias { 4 * y[1] + 128 } else { 0 };
        t * cols + reduction + wei_bytes * 4 + 3 * 128 + bias_buf
    } else {
        t * cols + reduction + 2 * 128
    }
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
        Kernel::Native if plan.groups > 1 => {
            // Group by group (`convolution_backward` for kernels without groups): the
            // group's output gradient and input copied contiguous, its input and weight
            // gradients kept until each set is concatenated.
            let gr = plan.groups;
            let per = |b: u64| b / gr;
            let gis = ins[0].map(|_| sim.alloc(xm.numel() * esize, TMP));
            let gws = ins[1].map(|_| sim.alloc(wm.numel() * esize, TMP));
            let copies = xm.shape[0] > 1 || !x.contiguous() || !g.contiguous();
            let gg = copies.then(|| sim.alloc(per(g.bytes()), TMP));
            let xg = copies.then(|| sim.alloc(per(x.bytes()), TMP));
            sim.transient(columns(&plan, &xm.shape, &y, false) / gr, TMP);
            for t in [xg, gg].into_iter().flatten() {
                sim.release(t);
            }
            if ins[0].is_some() {
                gx = Some(e.alloc_contig(sim, &xm.shape, esize, e.grad_category(ins[0])));
            }
            if ins[1].is_some() {
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
            }
            for t in [gis, gws].into_iter().flatten() {
                sim.release(t);
            }
        }
        Kernel::Native if native_channels_last(&plan) => {
            // The output gradient made channels-last for the input's gradient, then again
            // for the weight's (profiler: two copies when it arrives plain).
            let plain = !layout::is_channels_last(&g.shape, &g.strides);
            if ins[0].is_some() {
                let gc = plain.then(|| sim.alloc(g.bytes(), TMP));
                let strides = layout::channels_last(&xm.shape);
                gx = Some(e.alloc(sim, &xm.shape, strides, esize, e.grad_category(ins[0])));
                sim.transient(columns(&plan, &xm.shape, &y, false), TMP);
                if let Some(t) = gc {
                    sim.release(t);
                }
            }
            if ins[1].is_some() {
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
                if plain {
                    sim.transient(g.bytes(), TMP);
                }
            }
        }
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
            let (a, b) = onednn_bf16_backward(e, sim, &plan, &xm, &wm, &y, ins[0], ins[1], has_bias);
            gx = a;
            gw = b;
        }
        Kernel::OneDnn => {
            let cl = plan.channels_last;
            // A transposed convolution's gradients are convolutions that read its output
            // gradient as their input, and oneDNN's AVX-512 kernels read fewer than 16
            // input channels in the plain layout (as a forward stem does; measured for a
            // MONAI UNet's last up-sampling, fp32 and bf16; AVX2's reorder them).
            let isa = e.kernels.isa();
            let g_plain = cl || (plan.transposed && y[1] < 16 && (esize == HALF || isa >= CpuIsa::Avx512Core));
            // A channels-last convolution takes its output gradient channels-last
            // (`grad_output.contiguous(ChannelsLast)`): a copy when it arrives plain (a
            // ConvNeXt block's 1x1 convolutions after its layer scale).
            let g_copy = (cl && !layout::is_channels_last(&g.shape, &g.strides)).then(|| sim.alloc(g.bytes(), TMP));
            if ins[0].is_some() {
                let gr = (!g_plain).then(|| sim.alloc(blocked(&y, esize, plan.block), TMP));
                let wr = sim.alloc(blocked_weight(&wm.shape, esize, plan.block), TMP);
                let gxb = (!cl).then(|| sim.alloc(blocked(&xm.shape, esize, plan.block), TMP));
                sim.uncertain(scratch_bound(&xm.shape, &y, &wm.shape, esize, e));
                sim.release(wr);
                if let Some(t) = gr {
                    sim.release(t);
                }
                let strides = if cl { layout::channels_last(&xm.shape) } else { layout::contiguous(&xm.shape) };
                // A strided convolution's plain input gradient is copied once more
                // (`contiguous()`) before the blocked one goes (profiler: 1-D and 2-D,
                // 3x3 and 7x7, stride 2, fp32).
                let first =
                    (!cl && !plan.transposed && plan.stride > 1).then(|| sim.alloc(numel(&xm.shape) * esize, TMP));
                gx = Some(e.alloc(sim, &xm.shape, strides, esize, e.grad_category(ins[0])));
                for t in [gxb, first].into_iter().flatten() {
                    sim.release(t);
                }
            }
            let threads = e.kernels.threads();
            // A transposed convolution's weight gradient is a convolution's from its output
            // gradient to its input: the GEMM rules apply with the two swapped, and the
            // deconvolution books one more (empty) buffer for its bias.
            let (src, dst) = if plan.transposed { (&y, &xm.shape) } else { (&xm.shape, &y) };
            if ins[1].is_some() && !cl && f32_gemm_bwd_w(&plan, src, dst, isa) {
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
                let extra = if plan.transposed { 128 } else { 0 };
                sim.transient(gemm_bwd_w_scratch(&plan, src, &wm.shape, dst, threads, has_bias) + extra, TMP);
            } else if ins[1].is_some() && cl && grouped_jit_bwd_w(&plan) {
                // Grouped, channels-last, kernels wider than oneDNN's depthwise kernel
                // takes (3): the generic JIT weight-gradient kernel, whose weight
                // gradient (allocated by ideep) pads each group's input and output
                // channels to the block; bf16 adds its scratchpad.
                let g = plan.groups;
                let padded = g
                    * pad(wm.shape[0] / g, plan.block)
                    * pad(wm.shape[1], plan.block)
                    * plan.kernel_size.pow(plan.nd as u32);
                let gwb = sim.alloc(padded * esize, TMP);
                if esize == HALF && plan.nd == 2 {
                    sim.transient(grouped_bf16_bwd_w_scratch(&plan, &xm.shape, &y, padded), TMP);
                } else if esize == HALF {
                    // Measured in 2-D only: the fp32 copy is certain, the transposed
                    // buffers are bounded by the input and output gradient, fp32.
                    sim.transient(4 * padded, TMP);
                    sim.uncertain((numel(&xm.shape) + numel(&y)) * 4);
                } else if has_bias {
                    // The bias gradient padded to the block per group, 128 bytes booked.
                    sim.transient(g * plan.block * 4 + 128, TMP);
                }
                // With as many threads as groups the batch is split too, each share with
                // its own copy to reduce: not measured here (2 threads).
                let mb_threads = (threads / g).min(xm.shape[0]).max(1);
                sim.uncertain((mb_threads - 1) * padded * 4);
                gw = Some(e.alloc_contig(sim, &wm.shape, esize, e.grad_category(ins[1])));
                sim.release(gwb);
            } else if ins[1].is_some() {
                let gr = (!g_plain).then(|| sim.alloc(blocked(&y, esize, plan.block), TMP));
                let xr = (!cl && xm.shape[1] >= 16).then(|| sim.alloc(blocked(&xm.shape, esize, plan.block), TMP));
                let gwb = sim.alloc(blocked_weight(&wm.shape, esize, plan.block), TMP);
                amx_bwd_w(e, sim, &plan, &xm.shape, &y, threads);
                if plan.transposed && esize == HALF {
                    // bf16's JIT weight-gradient kernel on a transposed convolution (its
                    // output gradient as the source): per thread a blocked sample of both
                    // operands, fp32 rows and an fp32 weight buffer, not measured apart
                    // (one MONAI up-sampling with 4 output channels kept 291,332 bytes on 2
                    // threads): the high end.
                    let b = xm.shape[0].max(1);
                    let samples = (blocked(&y, esize, plan.block) + blocked(&xm.shape, esize, plan.block)) / b;
                    let rows = 2 * pad16(y[1]) * *y.last().unwrap_or(&1) * 4;
                    let wf32 = pad16(xm.shape[1]) * pad16(y[1]) * plan.kernel_size.pow(plan.nd as u32) * 4;
                    sim.uncertain(threads * (samples + rows + wf32) + 8580);
                }
                if !cl && xm.shape[1] < 16 && plan.stride == plan.kernel_size && plan.kernel_size > 1 {
                    // A patch embedding (kernel = stride, few input channels): oneDNN's
                    // kernel keeps, per thread, four weight-sized fp32 buffers and one
                    // sample of the input (measured for ViT's and CLIP's patch layers).
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
            if let Some(t) = g_copy {
                sim.release(t);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_conv(nd: usize, kernel: u64, stride: u64, groups: u64) -> Plan {
        Plan {
            kernel: Kernel::OneDnn,
            nd,
            kernel_size: kernel,
            transposed: false,
            channels_last: false,
            esize: HALF,
            stride,
            padding: kernel / 2,
            groups,
            block: 16,
        }
    }

    /// oneDNN's GEMM weight-gradient scratchpad against the bytes PyTorch 2.11's profiler
    /// saw for single bf16 convolutions on 2 threads (`torch.autograd.grad` of the weight).
    #[test]
    fn the_gemm_weight_gradient_scratchpad_is_the_measured_one() {
        type Case = (Plan, [u64; 4], [u64; 4], [u64; 4], bool, u64);
        let cases: [Case; 5] = [
            // 4 -> 4 channels at 192², one sample: one thread's columns.
            (bf16_conv(2, 3, 1, 1), [1, 4, 192, 192], [4, 4, 3, 3], [1, 4, 192, 192], false, 2_656_896),
            // The same with a bias (MONAI's last residual unit, traced in a whole UNet).
            (bf16_conv(2, 3, 1, 1), [1, 4, 192, 192], [4, 4, 3, 3], [1, 4, 192, 192], true, 2_657_040),
            // 32 groups of 4 channels at 16², batch 2: every thread works, each with columns.
            (bf16_conv(2, 3, 1, 32), [2, 128, 16, 16], [128, 4, 3, 3], [2, 128, 16, 16], false, 147_840),
            // CLIP's 32-pixel patches, batch 8 and batch 1.
            (bf16_conv(2, 32, 32, 1), [8, 3, 224, 224], [128, 3, 32, 32], [8, 128, 7, 7], false, 10_039_680),
            (bf16_conv(2, 32, 32, 1), [1, 3, 224, 224], [128, 3, 32, 32], [1, 128, 7, 7], false, 6_592_896),
        ];
        for (plan, x, w, y, bias, measured) in cases {
            assert_eq!(gemm_bwd_w_scratch(&plan, &x, &w, &y, 2, bias), measured, "{x:?} {w:?}");
        }
        // 3-D: one output plane's columns (8 -> 8 channels at 32³, batch 2).
        let plan = bf16_conv(3, 3, 1, 1);
        let (x, w, y) = ([2, 8, 32, 32, 32], [8, 8, 3, 3, 3], [2, 8, 32, 32, 32]);
        assert_eq!(gemm_bwd_w_scratch(&plan, &x, &w, &y, 2, false), 470_400);
    }
}
