//! What each knob does: the single changes a user would try, each estimated exactly
//! against the plan as it is, with where the difference comes from and the common
//! beliefs (docs/workloads.md) that the numbers contradict.

use crate::estimate::{self, Category, Estimate, Options, Target};
use crate::graph::Graph;
use crate::plan::{Optimizer, Plan, Precision};
use crate::units::{Bytes, signed_difference as delta};

/// One change to try.
#[derive(Clone, Debug, PartialEq)]
pub struct KnobChange {
    pub label: String,
    /// `key=value` settings on top of the plan (empty: a change outside the plan).
    pub changes: Vec<(String, String)>,
}

/// What a change does to the estimate.
#[derive(Clone, Debug, PartialEq)]
pub struct Effect {
    pub label: String,
    pub changes: Vec<(String, String)>,
    /// Change of the figure fitting is judged by: the device peak's high end on a GPU,
    /// the peak's high end on the CPU.
    pub delta_bytes: i64,
    pub host_delta_bytes: i64,
    /// Where the change comes from ("-1.90 GiB, all activations").
    pub detail: String,
    /// A belief the number contradicts, with the number.
    pub belief: Option<String>,
}

/// The single changes worth showing for `plan`.
pub fn knob_changes(plan: &Plan, graph: &Graph, target: Target) -> Vec<KnobChange> {
    let mut out = Vec::new();
    let mut add = |label: String, changes: &[(&str, String)]| {
        out.push(KnobChange { label, changes: changes.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect() });
    };
    if plan.micro_batch >= 2 && plan.micro_batch.is_multiple_of(2) {
        add(
            format!(
                "micro-batch {} x {} accumulation (half the batch, twice the steps)",
                plan.micro_batch / 2,
                plan.accumulation * 2
            ),
            &[("batch", (plan.micro_batch / 2).to_string()), ("accum", (plan.accumulation * 2).to_string())],
        );
    }
    match plan.checkpoint() {
        crate::graph::Checkpoint::Off if !graph.blocks.is_empty() => {
            add("checkpointing per block".into(), &[("checkpoint", "blocks".into())]);
        }
        crate::graph::Checkpoint::Off if graph.max_segments() >= 2 => {
            add("checkpoint_sequential in 2 segments".into(), &[("checkpoint_segments", "2".into())]);
        }
        crate::graph::Checkpoint::Segments(n) if n < graph.max_segments() => {
            add(format!("{} checkpoint segments", n + 1), &[("checkpoint_segments", (n + 1).to_string())]);
        }
        _ => {}
    }
    if plan.precision == Precision::Fp32 {
        add("fp16 autocast".into(), &[("precision", "fp16".into())]);
        if !matches!(target, Target::Cuda(g) if !g.supports_bf16()) {
            add("bf16 autocast".into(), &[("precision", "bf16".into())]);
        }
    }
    add(
        format!("expandable segments {}", if plan.expandable_segments { "off" } else { "on" }),
        &[("expandable_segments", (!plan.expandable_segments).to_string())],
    );
    if plan.host.workers > 0 {
        add(
            format!("{} loader workers instead of {}", plan.host.workers / 2, plan.host.workers),
            &[("workers", (plan.host.workers / 2).to_string())],
        );
    }
    if let Some((key, values)) = crate::advise::input_sizes(plan).into_iter().next() {
        // About three quarters per side, at the first multiple the model accepts.
        let fits = |v: &[u64]| {
            let text: Vec<String> = v.iter().map(u64::to_string).collect();
            let mut p = plan.clone();
            p.apply_settings(&[(key.clone(), text.join(","))]).is_ok() && p.validate().is_ok()
        };
        let smaller = [16u64, 32, 64]
            .iter()
            .map(|&m| {
                values.iter().map(|&d| ((d as f64 * 0.75 / m as f64).round() as u64 * m).max(m)).collect::<Vec<u64>>()
            })
            .find(|v| v != &values && fits(v));
        if let Some(smaller) = smaller {
            let join = |v: &[u64], sep: &str| v.iter().map(u64::to_string).collect::<Vec<_>>().join(sep);
            add(
                format!("input {} instead of {}", join(&smaller, "x"), join(&values, "x")),
                &[(key.as_str(), join(&smaller, ","))],
            );
        }
    }
    if matches!(plan.optimizer, Optimizer::Adam { .. } | Optimizer::AdamW { .. }) {
        add("SGD with momentum instead of Adam".into(), &[("optimizer", "momentum".into())]);
    }
    add("empty_cache() every 10 batches".into(), &[]);
    out
}

fn fit_figure(e: &Estimate) -> u64 {
    e.device.as_ref().map_or(e.peak_bytes_high.get(), |d| d.device_peak_bytes_high.get())
}

fn signed(v: i64) -> String {
    let b = Bytes(v.unsigned_abs());
    if v < 0 { format!("-{b}") } else { format!("+{b}") }
}

/// `change` estimated against `base` (the plan's own estimate on `target`).
pub fn effect(plan: &Plan, change: &KnobChange, target: Target, base: &Estimate) -> Result<Effect, String> {
    if change.changes.is_empty() {
        // empty_cache() between steps: the step's peak is reached inside the step.
        return Ok(Effect {
            label: change.label.clone(),
            changes: Vec::new(),
            delta_bytes: 0,
            host_delta_bytes: 0,
            detail: "peak unchanged: the peak is reached inside a step, and the blocks empty_cache() returns are reserved again by the next one".into(),
            belief: Some("empty_cache() every 10 batches: peak unchanged, costs time (a synchronisation and fresh cudaMalloc calls)".into()),
        });
    }
    let mut p = plan.clone();
    p.apply_settings(&change.changes).map_err(|e| e.to_string())?;
    let e = estimate::estimate_with(&p, target, Options::default()).map_err(|e| e.to_string())?;
    let d = delta(fit_figure(&e), fit_figure(base));
    let host = delta(e.host_peak_bytes.get(), base.host_peak_bytes.get());
    // Where it comes from: the categories live at the peak, before and after.
    let cats = [
        (Category::Weights, "weights"),
        (Category::Gradients, "gradients"),
        (Category::OptimizerState, "optimizer state"),
        (Category::Activations, "activations"),
        (Category::Batch, "batch"),
        (Category::Temporaries, "temporaries"),
    ];
    let mut parts: Vec<(i64, &str)> = cats
        .iter()
        .map(|&(c, name)| {
            let (mut a, mut b) = (e.breakdown.clone(), base.breakdown.clone());
            (delta(a.get_mut(c).get(), b.get_mut(c).get()), name)
        })
        .filter(|(v, _)| *v != 0)
        .collect();
    parts.sort_by_key(|(v, _)| std::cmp::Reverse(v.unsigned_abs()));
    let total: u64 = parts.iter().map(|(v, _)| v.unsigned_abs()).sum();
    let allocated = delta(e.peak_bytes.get(), base.peak_bytes.get());
    let mut detail = if d == 0 && allocated == 0 {
        "no change".to_owned()
    } else if let Some(&(v, name)) = parts.first().filter(|(v, _)| v.unsigned_abs() as f64 >= 0.9 * total as f64) {
        format!("{}, {} {name}", signed(d), if v.signum() == d.signum() { "all" } else { "mostly" })
    } else {
        let list: Vec<String> = parts.iter().take(3).map(|(v, n)| format!("{n} {}", signed(*v))).collect();
        format!("{}: {}", signed(d), list.join(", "))
    };
    if let (Some(a), Some(b)) = (&e.device, &base.device)
        && allocated.unsigned_abs() * 10 < d.unsigned_abs()
    {
        detail = format!(
            "{}, reserved and context (allocated {}; reserved {})",
            signed(d),
            signed(allocated),
            signed(delta(a.reserved_peak_bytes.get(), b.reserved_peak_bytes.get()))
        );
    }
    if host != 0 {
        detail.push_str(&format!("; host {}", signed(host)));
    }
    let base_fig = fit_figure(base).max(1) as f64;
    let pct = 100.0 * d as f64 / base_fig;
    let key = change.changes.first().map_or("", |(k, _)| k.as_str());
    let belief = match key {
        "batch" if pct > -40.0 => Some(format!(
            "halving the micro-batch does not halve memory: {pct:+.0} % (weights, gradients, optimizer state and the context stay)"
        )),
        "precision" if pct > -40.0 => Some(format!(
            "mixed precision does not halve memory: {pct:+.0} % (fp32 weights, gradients and optimizer state stay; autocast adds half-precision weight copies)"
        )),
        "expandable_segments" if allocated == 0 => {
            Some(format!("expandable segments change reserved memory only ({pct:+.1} %): the tensors are the same"))
        }
        "workers" if d == 0 => Some(format!("fewer workers free host memory ({}), not GPU memory", signed(host))),
        _ => None,
    };
    Ok(Effect {
        label: change.label.clone(),
        changes: change.changes.clone(),
        delta_bytes: d,
        host_delta_bytes: host,
        detail,
        belief,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Preset;

    #[test]
    fn w1_knobs_say_where_the_change_comes_from() {
        let plan = Preset::find("w1-before").expect("w1").plan().expect("plan");
        let graph = plan.validate().expect("graph");
        let gpu = *crate::gpus::find("v100-16gb").expect("gpu");
        let base = estimate::estimate_for(&plan, Target::Cuda(gpu)).expect("base");
        let changes = knob_changes(&plan, &graph, Target::Cuda(gpu));
        let labels: Vec<&str> = changes.iter().map(|c| c.label.as_str()).collect();
        assert!(labels.iter().any(|l| l.starts_with("micro-batch 1 x 4")), "{labels:?}");
        assert!(labels.contains(&"checkpointing per block"), "{labels:?}");
        for c in &changes {
            let e = effect(&plan, c, Target::Cuda(gpu), &base).unwrap_or_else(|e| panic!("{}: {e}", c.label));
            match c.label.as_str() {
                "checkpointing per block" => {
                    assert!(e.delta_bytes < 0 && e.detail.contains("activations"), "{e:?}");
                }
                "empty_cache() every 10 batches" => assert_eq!(e.delta_bytes, 0),
                l if l.starts_with("micro-batch") => assert!(e.delta_bytes < 0, "{e:?}"),
                _ => {}
            }
        }
    }
}
