//! Estimator arithmetic, checked against timelines worked out by hand.

use super::*;
use crate::plan::{ModelSpec, Optimizer, Plan, Schedule};

/// An MLP 8 -> 16 -> 4 at micro-batch 2: 212 parameters (848 bytes), 128 bytes of class prototypes.
fn tiny(optimizer: Optimizer) -> Plan {
    Plan {
        model: ModelSpec::Mlp { hidden: vec![16] },
        input_shape: vec![8],
        classes: 4,
        micro_batch: 2,
        accumulation: 1,
        schedule: Schedule::Steps(1),
        optimizer,
        ..Plan::example_mlp()
    }
}

fn check(plan: &Plan, peak: u64, phase: Phase, breakdown: [u64; 6]) {
    let e = estimate(plan).expect("valid plan");
    let got: Vec<u64> = e.breakdown.entries().iter().map(|(_, b)| b.get()).collect();
    assert_eq!((e.peak_bytes.get(), e.peak_phase, got), (peak, phase, breakdown.to_vec()));
    assert_eq!(e.breakdown.total(), e.peak_bytes, "the breakdown adds up to the peak");
    let live = e.breakdown.entries();
    for (i, (name, max)) in e.category_peaks.entries().into_iter().enumerate() {
        assert!(max >= live[i].1, "{name}: the category's maximum is at least its value at the peak");
    }
}

const SGD: Optimizer = Optimizer::Sgd { momentum: 0.0, weight_decay: 0.0 };
const ADAMW: Optimizer = Optimizer::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };

#[test]
fn plain_sgd_peaks_in_backward_when_the_first_layer_gradient_appears() {
    // Worked by hand: at the first layer's backward, weights 848 + gradients 848 + batch
    // (prototypes 128, x 64, y 16) + the flowing gradient 128 and the loss scalar 4.
    check(&tiny(SGD), 2036, Phase::Backward, [848, 848, 0, 0, 208, 132]);
}

#[test]
fn adamw_peaks_in_its_step_with_two_copies_of_the_largest_parameter() {
    // After backward: weights, grads, exp_avg and exp_avg_sq (4 x 848) and the prototypes;
    // then sqrt and quotient of the 512-byte first weight are alive together.
    check(&tiny(ADAMW), 4 * 848 + 128 + 1024, Phase::OptimizerStep, [848, 848, 1696, 0, 128, 1024]);
    // Activations are gone by then, but their own peak is still reported: while ReLU
    // runs, the first layer's output (128) and the ReLU's result (128) are both alive.
    assert_eq!(estimate(&tiny(ADAMW)).expect("plan").category_peaks.activations.get(), 128 + 128);
}

#[test]
fn sgd_momentum_keeps_one_buffer_and_weight_decay_one_temporary() {
    let e = estimate(&tiny(Optimizer::Sgd { momentum: 0.9, weight_decay: 0.0 })).expect("plan");
    assert_eq!(e.steady_bytes.get(), 848 * 2 + 128);
    assert_eq!(e.peak_bytes.get(), 2036 + 848);
    let e = estimate(&tiny(Optimizer::Sgd { momentum: 0.9, weight_decay: 1e-4 })).expect("plan");
    let step = e.phase_peaks[Phase::OptimizerStep.index()].1.get();
    assert_eq!(step, 3 * 848 + 128 + 512, "weights, grads, momentum, prototypes, one temporary");
}

#[test]
fn activations_scale_with_the_micro_batch_and_weights_do_not() {
    let mut small = Plan::example_cnn();
    small.micro_batch = 8;
    let mut big = small.clone();
    big.micro_batch = 64;
    let (s, b) = (estimate(&small).expect("small"), estimate(&big).expect("big"));
    assert_eq!(s.steady_bytes, b.steady_bytes);
    assert_eq!(s.params, b.params);
    assert!(b.peak_bytes.get() > 4 * s.peak_bytes.get() / 2, "{} vs {}", b.peak_bytes, s.peak_bytes);
}

#[test]
fn accumulation_keeps_gradients_alive_through_the_next_forward() {
    let mut plan = tiny(SGD);
    plan.accumulation = 2;
    let e = estimate(&plan).expect("plan");
    // Gradients exist during the second micro-batch's forward.
    let forward = e.phase_peaks[Phase::Forward.index()].1.get();
    assert!(forward >= 848 * 2 + 208, "forward peak {forward}");
    assert!(e.peak_bytes.get() >= 2036, "never below the single micro-batch peak");
}

#[test]
fn cnn_pooling_keeps_int64_indices() {
    // One conv stage on a 1x4x4 input: the pool saves 2 samples x 2 ch x 2x2 int64 indices.
    let plan = Plan {
        model: ModelSpec::SmallCnn { channels: vec![2] },
        input_shape: vec![1, 4, 4],
        classes: 2,
        micro_batch: 2,
        optimizer: SGD,
        ..Plan::example_cnn()
    };
    let e = estimate(&plan).expect("plan");
    let fwd = e.phase_peaks[Phase::Forward.index()].1.get();
    // weights (2*9+2 + 8*2+2 = 38 floats), prototypes 16x2, batch 2x16 + labels, then
    // conv out 2x2x4x4, relu out, pool out 2x2x2x2 + indices.
    let weights = 38 * 4;
    let prototypes = 16 * 2 * 4;
    let batch = 2 * 16 * 4 + 2 * 8;
    assert!(fwd >= weights + prototypes + batch + 2 * 128 + 32 + 64, "forward peak {fwd}");
    assert_eq!(e.params, 38);
}
