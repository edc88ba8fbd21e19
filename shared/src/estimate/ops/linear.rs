//! Matrix products: `F.linear` (ATen's `addmm`/`matmul` paths), Hugging Face's `Conv1D` and `torch.matmul` with broadcasting; forward and backward.

use super::*;
use crate::estimate::Category::{Activations as ACT, Temporaries as TMP};
use crate::estimate::Kernels;
use crate::estimate::engine::{Engine, F32, HALF, Ten};
use crate::estimate::layout;
use crate::estimate::sim::Sim;
use crate::graph::{Op, ValueId, numel};
use crate::isa::CpuIsa;

/// The forward rule of this family's ops (`ops::forward` sends no other op here).
pub(super) fn fwd(e: &mut Engine, sim: &mut Sim, i: usize, op: Op, inputs: Vec<ValueId>, _shape: Vec<u64>) -> Vec<Ten> {
    match op {
        Op::Linear { bias } => linear(e, sim, i, &inputs, bias),
        Op::Conv1dHf => conv1d_hf(e, sim, i, &inputs),
        Op::MatMul => matmul(e, sim, i, &inputs),
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
        Op::Linear { bias } => {
            let t = &e.tape[k];
            let (x, w) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let rows = numel(&x.shape[..x.shape.len() - 1]);
            // The output gradient as the 2-D operand of the products (a view when it can).
            let g2 = if layout::view(&g.shape, &g.strides, &[rows, *g.shape.last().unwrap_or(&1)]).is_none() {
                Some(e.alloc_contig(sim, &[rows, *g.shape.last().unwrap_or(&1)], g.esize, TMP))
            } else {
                None
            };
            let gx = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &x.shape, g.esize, e.grad_category(Some(s))));
            if gx.is_some() {
                emulated_half_product(e, sim, numel(&x.shape), g.esize);
            }
            let gw = e.tape[k].ins[1].map(|s| {
                let mut t = e.alloc_contig(sim, &w.shape, g.esize, e.grad_category(Some(s)));
                // mm_mat2_backward's transposed product comes back as a view.
                t.view = true;
                t
            });
            if gw.is_some() {
                emulated_half_product(e, sim, numel(&w.shape), g.esize);
            }
            onednn_half_product(e, sim, numel(&x.shape).max(numel(&w.shape)), g.esize);
            let gb = if bias {
                e.tape[k].ins[2].map(|s| e.alloc_contig(sim, &[w.shape[0]], g.esize, e.grad_category(Some(s))))
            } else {
                None
            };
            if let Some(t) = g2 {
                Engine::release(sim, t);
            }
            let mut out = vec![gx, gw];
            if bias {
                out.push(gb);
            }
            out
        }
        Op::Conv1dHf => {
            let t = &e.tape[k];
            let (x, w) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let gx = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &x.shape, g.esize, e.grad_category(Some(s))));
            if gx.is_some() {
                emulated_half_product(e, sim, numel(&x.shape), g.esize);
            }
            let gw = e.tape[k].ins[1].map(|s| e.alloc_contig(sim, &w.shape, g.esize, e.grad_category(Some(s))));
            if gw.is_some() {
                emulated_half_product(e, sim, numel(&w.shape), g.esize);
            }
            onednn_half_product(e, sim, numel(&x.shape).max(numel(&w.shape)), g.esize);
            let gb = e.tape[k].ins[2].map(|s| e.alloc_contig(sim, &[w.shape[1]], g.esize, e.grad_category(Some(s))));
            vec![gx, gw, gb]
        }
        Op::MatMul => {
            let t = &e.tape[k];
            let (a, b) = (t.in_meta[0].clone(), t.in_meta[1].clone());
            let ga = e.tape[k].ins[0].map(|s| e.alloc_contig(sim, &a.shape, g.esize, e.grad_category(Some(s))));
            if ga.is_some() {
                emulated_half_product(e, sim, numel(&a.shape), g.esize);
            }
            let gb = e.tape[k].ins[1].map(|s| {
                let mut t = e.alloc_contig(sim, &b.shape, g.esize, e.grad_category(Some(s)));
                // A transposed-contiguous 2-D operand gets its gradient as a transposed view.
                if b.shape.len() == 2 && b.strides.first() == Some(&1) {
                    t.view = true;
                    t.strides = vec![1, b.shape[0]];
                }
                t
            });
            if gb.is_some() {
                emulated_half_product(e, sim, numel(&b.shape), g.esize);
            }
            onednn_half_product(e, sim, numel(&a.shape).max(numel(&b.shape)), g.esize);
            vec![ga, gb]
        }
        _ => none,
    }
}

/// oneDNN runs half-precision matrix products on the CPU (PyTorch's bf16 `mm`, `addmm`,
/// `bmm` when oneDNN is on) with a packing scratchpad per call, measured between a
/// tenth and three quarters of the fp32 size of the product's output plus a constant;
/// its size is not modelled, so the interval's high end takes the fp32 output size and
/// 256 KiB.
fn onednn_half_product(e: &Engine, sim: &mut Sim, out_elems: u64, esize: u64) {
    if esize == HALF && matches!(e.kernels, Kernels::Cpu { onednn: true, isa, .. } if isa >= CpuIsa::Avx512CoreBf16) {
        sim.uncertain(out_elems * F32 + (256 << 10));
    }
}

/// On AVX-512 without BF16 instructions oneDNN runs half-precision products by
/// converting to fp32: each call keeps an fp32 accumulator of its whole output and 128
/// bytes (measured with `ONEDNN_MAX_CPU_ISA=AVX512_CORE`: `[M, N]` products of 512 x 10
/// to 1024 x 1024, each exactly `4 M N + 128`), made and freed within the call.
fn emulated_half_product(e: &Engine, sim: &mut Sim, out_elems: u64, esize: u64) {
    if esize == HALF && matches!(e.kernels, Kernels::Cpu { onednn: true, isa: CpuIsa::Avx512Core, .. }) {
        sim.transient(out_elems * F32 + 128, TMP);
    }
}

/// `F.linear(x, W, b)` as ATen runs it (see the module docs of `Op::Linear`).
fn linear(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId], bias: bool) -> Vec<Ten> {
    let x = e.read_low(sim, inputs[0]);
    let w = e.read_low(sim, inputs[1]);
    let b = bias.then(|| e.read_low(sim, inputs[2]));
    let shape = out_shape(e, i);
    let esize = if e.amp { HALF } else { x.t.esize };
    let rows = numel(&x.t.shape[..x.t.shape.len() - 1]);
    let inf = *x.t.shape.last().unwrap_or(&1);
    // The 2-D operand mm/addmm sees: the input itself (2-D), else its reshape to
    // `[rows, in]` (a view when the layout allows, else a copy), with or without a bias.
    let (x2, copied) =
        if x.t.shape.len() == 2 { (share(sim, &x.t), false) } else { e.reshape(sim, &x.t, &[rows, inf], ACT) };
    let o = e.alloc_contig(sim, &shape, esize, ACT);
    emulated_half_product(e, sim, numel(&shape), esize);
    onednn_half_product(e, sim, numel(&shape), esize);
    let mut saved = keep(sim, &x2, needs(&w));
    saved.extend(keep(sim, &w.t, needs(&x)));
    let mut reads = vec![&x, &w];
    if let Some(b) = b.as_ref() {
        reads.push(b);
    }
    record(e, sim, i, saved, &reads, &[&o]);
    if let Some(t) = e.tape.last_mut()
        && t.node == i
    {
        // Whether the input went through a copy decides its gradient's path.
        t.in_meta[0].strides = if copied { layout::contiguous(&x.t.shape) } else { x.t.strides.clone() };
    }
    Engine::release(sim, x2);
    release(sim, x);
    release(sim, w);
    if let Some(b) = b {
        release(sim, b);
    }
    vec![o]
}

fn conv1d_hf(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId]) -> Vec<Ten> {
    let x = e.read_low(sim, inputs[0]);
    let w = e.read_low(sim, inputs[1]);
    let b = e.read_low(sim, inputs[2]);
    let shape = out_shape(e, i);
    let esize = if e.amp { HALF } else { x.t.esize };
    let rows = numel(&x.t.shape[..x.t.shape.len() - 1]);
    let inf = *x.t.shape.last().unwrap_or(&1);
    let (x2, _) = e.reshape(sim, &x.t, &[rows, inf], ACT);
    let o = e.alloc_contig(sim, &shape, esize, ACT);
    emulated_half_product(e, sim, numel(&shape), esize);
    onednn_half_product(e, sim, numel(&shape), esize);
    let mut saved = keep(sim, &x2, needs(&w));
    saved.extend(keep(sim, &w.t, needs(&x)));
    record(e, sim, i, saved, &[&x, &w, &b], &[&o]);
    Engine::release(sim, x2);
    release(sim, x);
    release(sim, w);
    release(sim, b);
    vec![o]
}

/// `torch.matmul`: 2-D operands go to mm; batched ones are expanded and reshaped to 3-D
/// (copies where the layout does not allow a view), multiplied with bmm, viewed back.
fn matmul(e: &mut Engine, sim: &mut Sim, i: usize, inputs: &[ValueId]) -> Vec<Ten> {
    let a = e.read_low(sim, inputs[0]);
    let b = e.read_low(sim, inputs[1]);
    let shape = out_shape(e, i);
    let esize = if e.amp { HALF } else { a.t.esize.max(b.t.esize) };
    let (ra, rb) = (a.t.shape.len(), b.t.shape.len());
    let (a3, b3) = if ra == 2 && rb == 2 {
        (share(sim, &a.t), share(sim, &b.t))
    } else if rb == 2 {
        let k = a.t.shape[ra - 1];
        let rows = numel(&a.t.shape[..ra - 1]);
        (e.reshape(sim, &a.t, &[rows, k], ACT).0, share(sim, &b.t))
    } else {
        let batch: u64 = numel(&shape[..shape.len() - 2]);
        let (n, m) = (a.t.shape[ra - 2], a.t.shape[ra - 1]);
        let p = b.t.shape[rb - 1];
        let ea = expand_to(sim, &a.t, &shape[..shape.len() - 2]);
        let eb = expand_to(sim, &b.t, &shape[..shape.len() - 2]);
        let a3 = e.reshape(sim, &ea, &[batch, n, m], ACT).0;
        let b3 = e.reshape(sim, &eb, &[batch, m, p], ACT).0;
        Engine::release(sim, ea);
        Engine::release(sim, eb);
        (a3, b3)
    };
    let o = e.alloc_contig(sim, &shape, esize, ACT);
    emulated_half_product(e, sim, numel(&shape), esize);
    onednn_half_product(e, sim, numel(&shape), esize);
    let mut saved = keep(sim, &b3, needs(&a));
    saved.extend(keep(sim, &a3, needs(&b)));
    record(e, sim, i, saved, &[&a, &b], &[&o]);
    if let Some(t) = e.tape.last_mut()
        && t.node == i
    {
        t.in_meta[0].strides = a3.strides.clone();
        t.in_meta[1].strides = b3.strides.clone();
    }
    Engine::release(sim, a3);
    Engine::release(sim, b3);
    release(sim, a);
    release(sim, b);
    vec![o]
}

/// A view of `t` broadcast to these batch dimensions (its last two dims kept).
fn expand_to(sim: &mut Sim, t: &Ten, batch: &[u64]) -> Ten {
    let r = t.shape.len();
    let mut shape = batch.to_vec();
    shape.extend(&t.shape[r - 2..]);
    let off = shape.len() - r;
    let strides: Vec<u64> = (0..shape.len())
        .map(|d| if d < off || (t.shape[d - off] == 1 && shape[d] != 1) { 0 } else { t.strides[d - off] })
        .collect();
    Engine::view_of(sim, t, shape, strides)
}
