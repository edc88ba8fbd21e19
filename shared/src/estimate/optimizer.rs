//! Optimizer state (persistent between steps) and the step's own temporaries, as
//! libtorch's C++ optimizers (which tch drives) allocate them, parameter by parameter.

use super::Category;
use super::sim::Sim;
use crate::plan::Optimizer;

/// Momentum buffers for SGD with momentum; `exp_avg` and `exp_avg_sq` for Adam(W).
pub fn persistent_state(sim: &mut Sim, optimizer: &Optimizer, param_bytes: &[u64]) {
    let copies = match *optimizer {
        Optimizer::Sgd { momentum, .. } if momentum > 0.0 => 1,
        Optimizer::Sgd { .. } => 0,
        Optimizer::AdamW { .. } | Optimizer::Adam { .. } => 2,
    };
    for &bytes in param_bytes {
        for _ in 0..copies {
            sim.alloc(bytes, Category::OptimizerState);
        }
    }
}

/// The update; its peak is set by the largest parameter.
pub fn step(sim: &mut Sim, optimizer: &Optimizer, param_bytes: &[u64]) {
    for &bytes in param_bytes {
        match *optimizer {
            // `d_p = grad.add(p, weight_decay)` is a new tensor; momentum updates in place.
            Optimizer::Sgd { weight_decay, .. } => {
                if weight_decay != 0.0 {
                    sim.transient(bytes, Category::Temporaries);
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
