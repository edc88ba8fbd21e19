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

/// A zoo plan with `--set`-style pairs.
fn zoo(model: &str, pairs: &[(&str, &str)]) -> Plan {
    let mut plan = Plan::zoo(model);
    let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    plan.apply_settings(&pairs).expect("valid settings");
    plan
}

/// Golden figures measured by `headroom probe --device cpu --steps 3` (the exact counting
/// CPU allocator, libtorch 2.11.0) for the same plans.
#[test]
fn zoo_estimates_match_measured_cpu_peaks() {
    let cases: [(&str, &[(&str, &str)], u64, f64); 5] = [
        ("resnet18", &[("image", "64"), ("batch", "8"), ("optimizer", "sgd")], 125_056_296, 0.01),
        (
            "swin_unetr",
            &[("volume", "32"), ("feature_size", "12"), ("batch", "1"), ("optimizer", "adamw")],
            297_107_752,
            0.01,
        ),
        (
            "gpt2",
            &[
                ("n_layer", "4"),
                ("n_embd", "128"),
                ("n_head", "4"),
                ("seq", "64"),
                ("vocab_size", "2000"),
                ("batch", "4"),
                ("optimizer", "adamw"),
            ],
            33_469_960,
            0.01,
        ),
        (
            "unet3d",
            &[("volume", "32"), ("batch", "1"), ("optimizer", "momentum"), ("precision", "bf16")],
            62_394_546,
            0.5,
        ),
        (
            "clip",
            &[
                ("embed_dim", "128"),
                ("vision_layers", "2"),
                ("vision_width", "128"),
                ("patch_size", "16"),
                ("image", "64"),
                ("seq", "32"),
                ("vocab_size", "2000"),
                ("text_width", "128"),
                ("text_heads", "2"),
                ("text_layers", "2"),
                ("batch", "8"),
                ("optimizer", "adamw"),
            ],
            22_620_248,
            0.1,
        ),
    ];
    for (model, pairs, measured, tolerance_pct) in cases {
        let e = estimate(&zoo(model, pairs)).expect("estimate");
        let err = 100.0 * (e.peak_bytes.get() as f64 - measured as f64) / measured as f64;
        assert!(err.abs() <= tolerance_pct, "{model}: estimated {} vs measured {measured} ({err:+.3} %)", e.peak_bytes);
    }
}

#[test]
fn halving_the_micro_batch_moves_only_activations_and_batch() {
    let big = estimate(&zoo("resnet50", &[("image", "128"), ("batch", "8"), ("optimizer", "sgd")])).expect("big");
    let small = estimate(&zoo("resnet50", &[("image", "128"), ("batch", "4"), ("optimizer", "sgd")])).expect("small");
    assert_eq!(big.category_peaks.weights, small.category_peaks.weights);
    assert_eq!(big.category_peaks.gradients, small.category_peaks.gradients);
    assert!(small.category_peaks.activations.get() * 2 <= big.category_peaks.activations.get() + (1 << 20));
    assert!(small.peak_bytes < big.peak_bytes);
}

#[test]
fn checkpointing_trades_activations_for_a_recompute() {
    let base = [("volume", "64"), ("feature_size", "24"), ("batch", "1"), ("optimizer", "sgd")];
    let plain = estimate(&zoo("swin_unetr", &base)).expect("plain");
    let mut with = base.to_vec();
    with.push(("checkpoint_segments", "4"));
    let ckpt = estimate(&zoo("swin_unetr", &with)).expect("checkpointed");
    assert!(ckpt.peak_bytes < plain.peak_bytes, "{} !< {}", ckpt.peak_bytes, plain.peak_bytes);
    assert_eq!(ckpt.params, plain.params);
}

#[test]
fn mixed_precision_shrinks_activations_but_keeps_fp32_state() {
    let fp32 = estimate(&zoo("unet2d", &[("image", "256"), ("batch", "4"), ("optimizer", "adamw")])).expect("fp32");
    let bf16 =
        estimate(&zoo("unet2d", &[("image", "256"), ("batch", "4"), ("optimizer", "adamw"), ("precision", "bf16")]))
            .expect("bf16");
    assert_eq!(fp32.category_peaks.optimizer_state, bf16.category_peaks.optimizer_state);
    assert_eq!(fp32.category_peaks.weights, bf16.category_peaks.weights);
    assert!(bf16.category_peaks.activations.get() * 10 < fp32.category_peaks.activations.get() * 7);
}

#[test]
fn cuda_target_rounds_reserves_and_answers_the_fit() {
    use crate::estimate::{Target, estimate_for};
    let gpu = crate::gpus::find("v100-16gb").expect("catalog");
    let plan = zoo("seresnext50_32x4d", &[("image", "224"), ("batch", "32"), ("optimizer", "momentum")]);
    let e = estimate_for(&plan, Target::Cuda(gpu)).expect("cuda");
    let d = e.device.as_ref().expect("device figures");
    assert_eq!(e.peak_bytes.get() % 512, 0, "allocated sizes are 512-byte multiples");
    assert!(e.steady_bytes.get() >= d.cublas_workspace_bytes.get(), "the cuBLAS workspace is allocated memory");
    assert!(d.reserved_peak_bytes >= e.peak_bytes);
    assert_eq!(d.device_peak_bytes, d.reserved_peak_bytes + d.context_bytes);
    assert_eq!(d.fits, d.device_peak_bytes <= d.capacity_bytes);
    // bf16 needs Ampere or newer.
    let mut bf16 = plan.clone();
    bf16.precision = crate::plan::Precision::Bf16;
    let err = estimate_for(&bf16, Target::Cuda(gpu)).expect_err("V100 has no bf16");
    assert!(err.to_string().starts_with("precision: "), "{err}");
    // Expandable segments never reserve more than fixed segments for the same step.
    let mut exp = plan.clone();
    exp.expandable_segments = true;
    let x = estimate_for(&exp, Target::Cuda(gpu)).expect("expandable");
    assert!(x.device.expect("device").reserved_peak_bytes <= d.reserved_peak_bytes);
}

#[test]
fn host_memory_counts_workers_prefetch_pinning_and_the_distance_loss() {
    let mut plan =
        zoo("unet3d", &[("volume", "72,136,136"), ("channels", "16,32,64,128"), ("strides", "2,2,2"), ("batch", "2")]);
    let base = estimate(&plan).expect("base").host;
    plan.host = crate::plan::HostSpec { workers: 4, prefetch_factor: 2, pin_memory: true, distance_loss_every: 4 };
    let h = estimate(&plan).expect("host").host;
    // Inputs (fp32) and int64 labels of two 72x136x136 samples, 8 batches in flight.
    let batch = 2 * 72 * 136 * 136 * (4 + 8);
    assert_eq!(
        h.loader_workers.get() - base.loader_workers.get(),
        4 * crate::estimate::host::WORKER_BASELINE_BYTES + 8 * batch
    );
    assert_eq!(h.pinned.get(), 8 * batch);
    assert_eq!(h.distance_loss.get(), 2 * 72 * 136 * 136 * crate::estimate::host::DISTANCE_LOSS_BYTES_PER_VOXEL);
}
