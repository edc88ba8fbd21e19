//! Optimizer state (persistent between steps) and the step's own temporaries, for each
//! implementation:
//! - PyTorch's per-parameter loop (`foreach=False`, its default on the CPU): Python
//!   variables live until reassigned, so a parameter's `denom` (Adam) is still alive
//!   while the next parameter's is computed; Adam's L2 decay and SGD's decay and
//!   Nesterov term are copies of the gradient; each parameter's `step` is a 4-byte tensor;
//! - `foreach=True` (its default on CUDA): one kernel per list, so `sqrt(exp_avg_sq)` and
//!   decayed gradients exist for every parameter at once;
//! - `fused=True`: one kernel, no temporaries;
//! - libtorch's C++ optimizers (Headroom's trainer): per parameter, temporaries freed at
//!   the end of each parameter's update.

use super::Category;
use super::engine::F32;
use super::sim::{Sim, Tensor};
use crate::plan::{Optimizer, OptimizerImpl, Runtime};

/// How the update is applied, resolved from the plan and the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    PythonLoop,
    Foreach,
    Fused,
    Libtorch,
}

impl Update {
    pub fn resolve(runtime: Runtime, imp: OptimizerImpl, cuda: bool) -> Update {
        match (runtime, imp) {
            (Runtime::Headroom, _) => Update::Libtorch,
            (_, OptimizerImpl::Auto) if cuda => Update::Foreach,
            (_, OptimizerImpl::Auto | OptimizerImpl::ForLoop) => Update::PythonLoop,
            (_, OptimizerImpl::Foreach) => Update::Foreach,
            (_, OptimizerImpl::Fused) => Update::Fused,
        }
    }
}

fn copies(optimizer: &Optimizer) -> usize {
    match *optimizer {
        Optimizer::Sgd { momentum, .. } if momentum > 0.0 => 1,
        Optimizer::Sgd { .. } => 0,
        Optimizer::AdamW { .. } | Optimizer::Adam { .. } => 2,
    }
}

/// Momentum buffers for SGD with momentum; `exp_avg` and `exp_avg_sq` for Adam(W); and
/// PyTorch's per-parameter `step` tensors (on the CPU unless fused or capturable, so they
/// count on the CPU only, or on CUDA when fused).
pub fn persistent_state(sim: &mut Sim, optimizer: &Optimizer, update: Update, cuda: bool, param_bytes: &[u64]) {
    for &bytes in param_bytes {
        for _ in 0..copies(optimizer) {
            sim.alloc(bytes, Category::OptimizerState);
        }
    }
    let adam = matches!(optimizer, Optimizer::Adam { .. } | Optimizer::AdamW { .. });
    let steps_here = match update {
        Update::Libtorch => false,
        Update::Fused => true,
        Update::PythonLoop | Update::Foreach => !cuda,
    };
    if adam && steps_here {
        for _ in param_bytes {
            sim.alloc(4, Category::OptimizerState);
        }
    }
}

/// The update; returns nothing, leaves only the state and `.grad` behind.
/// `torch.nn.utils.clip_grad_norm_` over `n` gradients: one fp32 norm per gradient, all
/// held until they are stacked, the total norm, then (PyTorch, which keeps the factor on
/// the device) the clip coefficient and its clamp; gradients are scaled in place. The
/// trainer reads the total on the host and scales by a number, so it skips the last two.
pub fn clip_grad_norm(sim: &mut Sim, n: usize, on_device_factor: bool) {
    let norms: Vec<Tensor> = (0..n).map(|_| sim.alloc(F32, Category::Temporaries)).collect();
    let stacked = sim.alloc(F32 * n as u64, Category::Temporaries);
    let total = sim.alloc(F32, Category::Temporaries);
    sim.release(stacked);
    if on_device_factor {
        let coef = sim.alloc(F32, Category::Temporaries);
        let clamped = sim.alloc(F32, Category::Temporaries);
        sim.release(coef);
        sim.release(clamped);
    }
    sim.release(total);
    // The list of norms lives until the function returns.
    norms.into_iter().for_each(|t| sim.release(t));
}

pub fn step(sim: &mut Sim, optimizer: &Optimizer, update: Update, param_bytes: &[u64]) {
    match update {
        Update::Fused => {}
        Update::Foreach => foreach(sim, optimizer, param_bytes),
        Update::PythonLoop => python_loop(sim, optimizer, param_bytes),
        Update::Libtorch => libtorch(sim, optimizer, param_bytes),
    }
}

fn foreach(sim: &mut Sim, optimizer: &Optimizer, param_bytes: &[u64]) {
    let all =
        |sim: &mut Sim| -> Vec<Tensor> { param_bytes.iter().map(|&b| sim.alloc(b, Category::Temporaries)).collect() };
    let free = |sim: &mut Sim, v: Vec<Tensor>| v.into_iter().for_each(|t| sim.release(t));
    match *optimizer {
        Optimizer::Sgd { weight_decay, .. } => {
            if weight_decay != 0.0 {
                let d = all(sim);
                free(sim, d);
            }
        }
        Optimizer::Adam { weight_decay, .. } | Optimizer::AdamW { weight_decay, .. } => {
            let decayed = (weight_decay != 0.0 && matches!(optimizer, Optimizer::Adam { .. })).then(|| all(sim));
            if let Some(d) = decayed {
                free(sim, d);
            }
            let sqrt = all(sim);
            free(sim, sqrt);
        }
    }
}

fn python_loop(sim: &mut Sim, optimizer: &Optimizer, param_bytes: &[u64]) {
    match *optimizer {
        Optimizer::Sgd { weight_decay, nesterov, momentum } => {
            for &bytes in param_bytes {
                let decayed = (weight_decay != 0.0).then(|| sim.alloc(bytes, Category::Temporaries));
                if nesterov && momentum > 0.0 {
                    let n = sim.alloc(bytes, Category::Temporaries);
                    if let Some(d) = decayed {
                        sim.release(d);
                    }
                    sim.release(n);
                } else if let Some(d) = decayed {
                    sim.release(d);
                }
            }
        }
        Optimizer::Adam { weight_decay, .. } | Optimizer::AdamW { weight_decay, .. } => {
            let l2 = weight_decay != 0.0 && matches!(optimizer, Optimizer::Adam { .. });
            let mut denom: Option<Tensor> = None;
            for &bytes in param_bytes {
                // `grad = grads[i]` drops the previous decayed copy; `denom` lives on.
                let decayed = l2.then(|| sim.alloc(bytes, Category::Temporaries));
                let sqrt = sim.alloc(bytes, Category::Temporaries);
                let quotient = sim.alloc(bytes, Category::Temporaries);
                sim.release(sqrt);
                if let Some(old) = denom.replace(quotient) {
                    sim.release(old);
                }
                if let Some(d) = decayed {
                    sim.release(d);
                }
            }
            if let Some(d) = denom {
                sim.release(d);
            }
        }
    }
}

fn libtorch(sim: &mut Sim, optimizer: &Optimizer, param_bytes: &[u64]) {
    for &bytes in param_bytes {
        match *optimizer {
            // `d_p = grad.add(p, weight_decay)` is a new tensor; momentum updates in place;
            // Nesterov adds another.
            Optimizer::Sgd { weight_decay, nesterov, momentum } => {
                let d = (weight_decay != 0.0).then(|| sim.alloc(bytes, Category::Temporaries));
                if nesterov && momentum > 0.0 {
                    sim.transient(bytes, Category::Temporaries);
                }
                if let Some(t) = d {
                    sim.release(t);
                }
            }
            // Adam adds L2 decay to a copy of the gradient, alive through the update;
            // `denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)`: the sqrt
            // and the quotient are both alive until the end of that expression.
            Optimizer::AdamW { .. } | Optimizer::Adam { .. } => {
                let decayed = match *optimizer {
                    Optimizer::Adam { weight_decay, .. } if weight_decay != 0.0 => {
                        Some(sim.alloc(bytes, Category::Temporaries))
                    }
                    _ => None,
                };
                let sqrt = sim.alloc(bytes, Category::Temporaries);
                let denom = sim.alloc(bytes, Category::Temporaries);
                sim.release(sqrt);
                sim.release(denom);
                if let Some(t) = decayed {
                    sim.release(t);
                }
            }
        }
    }
}
