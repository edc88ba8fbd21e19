//! The advisor: which changes make a plan fit a GPU while keeping its effective batch
//! (micro-batch x accumulation), ranked by a relative step-time model.
//!
//! The search space is micro-batch x accumulation with the effective batch held, x
//! precision, x checkpointing (off, per block, `checkpoint_sequential` in 2 and in the
//! most segments), x expandable segments, and, only when allowed, x optimizer and x
//! input size. Work is shared across combinations: one exact estimate per precision and
//! checkpointing mode (a "structure", walked once with both allocator settings) gives
//! each phase's fixed and per-sample bytes, from which every micro-batch, input size and
//! optimizer is predicted; the best predictions are then estimated exactly and only
//! those that fit exactly are shown. [`Search`] does one exact estimate per
//! [`Search::step`], so a page can spread the work over frames.
//!
//! Step-time model (relative to the current plan; it ranks, it does not predict
//! seconds): a step costs `accumulation x (OVERHEAD_SAMPLES + micro_batch x size)`
//! sample-units, times `1 + RECOMPUTE x share` for checkpointing (the forward is about
//! a third of forward + backward; per-block checkpointing re-runs all of it,
//! `checkpoint_sequential` with `n` segments `(n-1)/n` of it), divided by the mixed
//! precision speed-up of the GPU's generation ([`amp_speedup`]).

use serde::Serialize;
use thiserror::Error;

use crate::estimate::{self, DeviceEstimate, Estimate, Options, Phase, Target};
use crate::gpus::Gpu;
use crate::graph::Checkpoint;
use crate::plan::{Plan, PlanError, Precision, limits};
use crate::zoo::Kind;

/// Sample-equivalents of fixed cost per micro-batch (kernel launches, under-filled
/// kernels, the loop's Python work).
pub const OVERHEAD_SAMPLES: f64 = 2.0;
/// The share of a step spent in the forward, which checkpointing re-runs.
pub const RECOMPUTE: f64 = 1.0 / 3.0;
/// Input sizes tried when resizing is allowed, as a fraction of each spatial side.
pub const SIZE_STEPS: [f64; 5] = [1.0, 0.875, 0.75, 0.625, 0.5];
/// The most results a search returns.
pub const MAX_TOP: usize = 50;
/// The most exact estimates spent verifying predictions, beyond the top count.
const VERIFY_EXTRA: usize = 10;

/// Mixed precision's speed-up over fp32 by GPU generation: none without tensor cores
/// (before Volta), 2x with them (fp16 and bf16 tensor cores against fp32 CUDA cores;
/// PyTorch keeps fp32 matrix products in full fp32 by default).
pub fn amp_speedup(gpu: &Gpu, precision: Precision) -> f64 {
    match precision {
        Precision::Fp32 => 1.0,
        _ if gpu.compute_capability.0 < 7 => 1.0,
        _ => 2.0,
    }
}

/// What to search.
#[derive(Clone, Debug)]
pub struct Request {
    pub plan: Plan,
    pub gpu: Gpu,
    /// Keep this share of the GPU free (0.1: use at most 90 %).
    pub margin: f64,
    /// May the input size shrink?
    pub allow_resize: bool,
    /// May the optimizer change (it changes training, not just memory)?
    pub allow_optimizer: bool,
    pub top: usize,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum AdviseError {
    #[error("margin: must be in [0, 0.9], got {0}")]
    Margin(f64),
    #[error("top: must be 1 to {MAX_TOP}, got {0}")]
    Top(usize),
    #[error("{0}")]
    Plan(#[from] PlanError),
}

/// One way to run the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Candidate {
    /// `key=value` changes to the plan (what "Apply" sets).
    pub changes: Vec<(String, String)>,
    pub micro_batch: u64,
    pub accumulation: u64,
    pub effective_batch: u64,
    pub precision: Precision,
    pub checkpoint: String,
    pub expandable_segments: bool,
    pub optimizer: String,
    /// Input size as a fraction of each spatial side of the plan's.
    pub input_scale: f64,
    /// The device peak's high end (what fitting is judged by), exact once verified.
    pub device_peak_bytes: u64,
    pub capacity_bytes: u64,
    /// `capacity - device_peak` (negative: short by that much).
    pub headroom_bytes: i64,
    /// Step time relative to the current plan's (1.0: the same).
    pub relative_time: f64,
    /// Estimated exactly (true) or predicted from a structure.
    pub verified: bool,
    pub reason: String,
}

/// The search's answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Advice {
    pub effective_batch: u64,
    /// The plan as it is, on this GPU.
    pub current_fits: bool,
    pub current_device_peak_bytes: u64,
    /// Usable memory: capacity x (1 - margin).
    pub budget_bytes: u64,
    /// Combinations considered.
    pub combinations: usize,
    /// Exact estimates made (structures and verifications).
    pub exact_estimates: usize,
    /// Best first; every one verified to fit.
    pub candidates: Vec<Candidate>,
    /// Set when no combination keeps the effective batch exactly.
    pub note: Option<String>,
}

/// A structure's exact figures, for predicting its other micro-batches.
#[derive(Clone, Debug)]
struct Fit {
    batch: u64,
    /// Per phase: bytes that do not grow with the batch, and those that do.
    fixed: f64,
    per_batch: f64,
    /// The optimizer step's peak (does not grow with the batch).
    step_peak: f64,
    /// reserved / allocated at the reference, for each allocator setting.
    reserved_ratio: [f64; 2],
    /// Device high end minus reserved at the reference (context, workspaces).
    overhead: f64,
    params: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct Structure {
    precision: Precision,
    checkpoint: Checkpoint,
}

#[derive(Clone, Debug)]
struct Combo {
    structure: usize,
    micro_batch: u64,
    accumulation: u64,
    expandable: bool,
    optimizer: &'static str,
    scale: f64,
    predicted: f64,
    time: f64,
    /// How many keys it changes (fewer ranks first among equals).
    changed: u8,
}

/// An advisor search in progress.
pub struct Search {
    req: Request,
    base_time: f64,
    current: DeviceEstimate,
    structures: Vec<Structure>,
    /// Each structure's figures (`None`: it cannot be estimated), the first `fitted`.
    fits: Vec<Option<Fit>>,
    fitted: usize,
    /// Size keys and their values, for resizing.
    size_keys: Vec<(String, Vec<u64>)>,
    combos: Vec<Combo>,
    ranked: bool,
    verify_next: usize,
    verified: Vec<Candidate>,
    exact: usize,
    note: Option<String>,
    effective: u64,
}

fn checkpoint_word(c: Checkpoint) -> String {
    match c {
        Checkpoint::Off => "off".to_owned(),
        Checkpoint::Blocks => "blocks".to_owned(),
        Checkpoint::Segments(n) => format!("{n} segments"),
    }
}

fn state_slots(word: &str) -> f64 {
    match word {
        "sgd" => 0.0,
        "momentum" => 1.0,
        _ => 2.0,
    }
}

fn recompute_share(c: Checkpoint) -> f64 {
    match c {
        Checkpoint::Off => 0.0,
        Checkpoint::Blocks => 1.0,
        Checkpoint::Segments(n) => (n - 1) as f64 / n as f64,
    }
}

fn step_time(gpu: &Gpu, s: &Structure, micro_batch: u64, accumulation: u64, scale_numel: f64) -> f64 {
    accumulation as f64
        * (OVERHEAD_SAMPLES + micro_batch as f64 * scale_numel)
        * (1.0 + RECOMPUTE * recompute_share(s.checkpoint))
        / amp_speedup(gpu, s.precision)
}

fn device_estimate(plan: &Plan, gpu: Gpu, toggled: bool) -> Result<(Estimate, DeviceEstimate), PlanError> {
    let e =
        estimate::estimate_with(plan, Target::Cuda(gpu), Options { timeline_points: 0, toggled_allocator: toggled })?;
    let d = e.device.clone().ok_or_else(|| PlanError::Invalid { field: "gpu", reason: "no device estimate".into() })?;
    Ok((e, d))
}

impl Search {
    pub fn new(req: Request) -> Result<Search, AdviseError> {
        if !(req.margin.is_finite() && (0.0..=0.9).contains(&req.margin)) {
            return Err(AdviseError::Margin(req.margin));
        }
        if req.top == 0 || req.top > MAX_TOP {
            return Err(AdviseError::Top(req.top));
        }
        let graph = req.plan.validate()?;
        let (_, current) = device_estimate(&req.plan, req.gpu, false)?;
        let mut precisions = vec![Precision::Fp32, Precision::Fp16];
        if req.gpu.supports_bf16() {
            precisions.push(Precision::Bf16);
        }
        let mut checkpoints = vec![Checkpoint::Off];
        if !graph.blocks.is_empty() {
            checkpoints.push(Checkpoint::Blocks);
        }
        let m = graph.max_segments();
        for n in [2, m] {
            if n >= 2 && !checkpoints.contains(&Checkpoint::Segments(n)) {
                checkpoints.push(Checkpoint::Segments(n));
            }
        }
        let structures: Vec<Structure> = precisions
            .iter()
            .flat_map(|&precision| checkpoints.iter().map(move |&checkpoint| Structure { precision, checkpoint }))
            .collect();
        let size_keys = if req.allow_resize { input_sizes(&req.plan) } else { Vec::new() };
        let effective = req.plan.micro_batch * req.plan.accumulation;
        let s0 = Structure { precision: req.plan.precision, checkpoint: req.plan.checkpoint() };
        let base_time = step_time(&req.gpu, &s0, req.plan.micro_batch, req.plan.accumulation, 1.0);
        Ok(Search {
            fits: vec![None; structures.len()],
            fitted: 0,
            structures,
            size_keys,
            combos: Vec::new(),
            ranked: false,
            verify_next: 0,
            verified: Vec::new(),
            exact: 1,
            note: None,
            effective,
            base_time,
            current,
            req,
        })
    }

    /// Exact estimates this search will make at most.
    pub fn planned_steps(&self) -> usize {
        self.structures.len() + self.req.top + VERIFY_EXTRA
    }

    /// Does one exact estimate; `false` once the search is complete.
    pub fn step(&mut self) -> bool {
        if self.fitted < self.structures.len() {
            self.fits[self.fitted] = self.fit(self.fitted);
            self.fitted += 1;
            return true;
        }
        if !self.ranked {
            self.enumerate();
            self.ranked = true;
            return true;
        }
        while self.verified.len() < self.req.top && self.verify_next < self.combos.len() {
            if self.exact >= self.structures.len() + 1 + self.req.top + VERIFY_EXTRA {
                return false;
            }
            let combo = self.combos[self.verify_next].clone();
            self.verify_next += 1;
            if combo.predicted > self.budget() * 1.25 {
                // Predictions this far over are not worth an exact estimate.
                continue;
            }
            self.exact += 1;
            if let Some(c) = self.verify(&combo) {
                self.verified.push(c);
            }
            return true;
        }
        false
    }

    pub fn result(&self) -> Advice {
        let mut candidates = self.verified.clone();
        candidates.sort_by(|a, b| {
            a.relative_time
                .total_cmp(&b.relative_time)
                .then(a.changes.len().cmp(&b.changes.len()))
                .then(b.headroom_bytes.cmp(&a.headroom_bytes))
        });
        Advice {
            effective_batch: self.effective,
            current_fits: self.current.device_peak_bytes_high.get() as f64 <= self.budget(),
            current_device_peak_bytes: self.current.device_peak_bytes_high.get(),
            budget_bytes: self.budget() as u64,
            combinations: self.combos.len(),
            exact_estimates: self.exact,
            candidates,
            note: self.note.clone(),
        }
    }

    fn budget(&self) -> f64 {
        self.current.capacity_bytes.get() as f64 * (1.0 - self.req.margin)
    }

    fn structure_plan(&self, s: &Structure) -> Plan {
        let mut plan = self.req.plan.clone();
        plan.precision = s.precision;
        plan.checkpoint_blocks = s.checkpoint == Checkpoint::Blocks;
        plan.checkpoint_segments = match s.checkpoint {
            Checkpoint::Segments(n) => n,
            _ => 0,
        };
        // Accumulating keeps gradients alive through later micro-batches: the reference
        // accumulates whenever any candidate does.
        if self.effective > 1 {
            plan.accumulation = plan.accumulation.max(2);
        }
        plan
    }

    fn fit(&mut self, i: usize) -> Option<Fit> {
        let plan = self.structure_plan(&self.structures[i]);
        self.exact += 1;
        let (e, d) = device_estimate(&plan, self.req.gpu, true).ok()?;
        let b = e.breakdown.clone();
        let per_batch = (b.activations + b.batch + b.temporaries).get() as f64;
        let peak = e.peak_bytes.get().max(1) as f64;
        let step_peak =
            e.phase_peaks.iter().find(|(p, _)| *p == Phase::OptimizerStep).map_or(0.0, |(_, v)| v.get() as f64);
        let reserved = d.reserved_peak_bytes.get() as f64;
        let toggled = d.reserved_peak_toggled_bytes.map_or(reserved, |t| t.get() as f64);
        let ratio = |r: f64| (r / peak).max(1.0);
        let reserved_ratio = if plan.expandable_segments {
            [ratio(toggled), ratio(reserved)]
        } else {
            [ratio(reserved), ratio(toggled)]
        };
        Some(Fit {
            batch: plan.micro_batch,
            fixed: peak - per_batch,
            per_batch,
            step_peak: step_peak.min(peak),
            reserved_ratio,
            overhead: d.device_peak_bytes_high.get() as f64 - reserved,
            params: e.params,
        })
    }

    fn enumerate(&mut self) {
        let e = self.effective;
        let mut batches: Vec<(u64, u64)> = (1..=e.min(limits::MAX_MICRO_BATCH))
            .filter(|b| e.is_multiple_of(*b) && e / b <= limits::MAX_ACCUMULATION)
            .map(|b| (b, e / b))
            .collect();
        let optimizers: Vec<&'static str> = if self.req.allow_optimizer {
            vec!["adamw", "adam", "momentum", "sgd"]
        } else {
            vec![self.req.plan.optimizer.word()]
        };
        let scales: Vec<f64> = if self.size_keys.is_empty() { vec![1.0] } else { SIZE_STEPS.to_vec() };
        let dims = self.size_keys.iter().map(|(_, v)| v.len()).sum::<usize>().max(1) as i32;
        let budget = self.budget();
        let fill = |batches: &[(u64, u64)], out: &mut Vec<Combo>| {
            for (si, fit) in self.fits.iter().enumerate() {
                let Some(fit) = fit else { continue };
                let s = &self.structures[si];
                for &(micro_batch, accumulation) in batches {
                    for &expandable in &[false, true] {
                        for &optimizer in &optimizers {
                            let state = (state_slots(optimizer) - state_slots(self.req.plan.optimizer.word()))
                                * fit.params as f64
                                * 4.0;
                            for &scale in &scales {
                                let numel = scale.powi(dims);
                                let k = micro_batch as f64 / fit.batch as f64 * numel;
                                let allocated = (fit.fixed + state + fit.per_batch * k).max(fit.step_peak + state);
                                let predicted = allocated * fit.reserved_ratio[usize::from(expandable)] + fit.overhead;
                                let time =
                                    step_time(&self.req.gpu, s, micro_batch, accumulation, numel) / self.base_time;
                                let p = &self.req.plan;
                                let changed = [
                                    micro_batch != p.micro_batch,
                                    s.precision != p.precision,
                                    s.checkpoint != p.checkpoint(),
                                    expandable != p.expandable_segments,
                                    optimizer != p.optimizer.word(),
                                    scale != 1.0,
                                ]
                                .iter()
                                .filter(|&&c| c)
                                .count() as u8;
                                out.push(Combo {
                                    structure: si,
                                    micro_batch,
                                    accumulation,
                                    expandable,
                                    optimizer,
                                    scale,
                                    predicted,
                                    time,
                                    changed,
                                });
                            }
                        }
                    }
                }
            }
        };
        let mut combos = Vec::new();
        fill(&batches, &mut combos);
        if !combos.iter().any(|c| c.predicted <= budget) && e > 1 {
            // Nothing keeps the effective batch exactly: the nearest larger ones.
            batches = (1..e.min(limits::MAX_MICRO_BATCH))
                .filter(|b| !e.is_multiple_of(*b))
                .map(|b| (b, e.div_ceil(b)))
                .filter(|(_, a)| *a <= limits::MAX_ACCUMULATION)
                .collect();
            fill(&batches, &mut combos);
            self.note = Some(format!(
                "no combination is predicted to fit with an effective batch of exactly {e}; the nearest larger ones are shown"
            ));
        }
        // Fitting first, then fastest; among equals, the one changing least.
        combos.sort_unstable_by(|a, b| {
            (a.predicted > budget)
                .cmp(&(b.predicted > budget))
                .then(a.time.total_cmp(&b.time))
                .then(a.changed.cmp(&b.changed))
                .then(a.predicted.total_cmp(&b.predicted))
        });
        self.combos = combos;
    }

    fn changes(&self, c: &Combo) -> Vec<(String, String)> {
        let p = &self.req.plan;
        let s = &self.structures[c.structure];
        let mut out = Vec::new();
        let mut put = |k: &str, v: String| out.push((k.to_owned(), v));
        if c.micro_batch != p.micro_batch {
            put("batch", c.micro_batch.to_string());
        }
        if c.accumulation != p.accumulation {
            put("accum", c.accumulation.to_string());
        }
        if s.precision != p.precision {
            put("precision", s.precision.word().to_owned());
        }
        if s.checkpoint != p.checkpoint() {
            match s.checkpoint {
                Checkpoint::Off => put("checkpoint", "off".to_owned()),
                Checkpoint::Blocks => put("checkpoint", "blocks".to_owned()),
                Checkpoint::Segments(n) => {
                    put("checkpoint", "off".to_owned());
                    put("checkpoint_segments", n.to_string());
                }
            }
        }
        if c.expandable != p.expandable_segments {
            put("expandable_segments", c.expandable.to_string());
        }
        if c.optimizer != p.optimizer.word() {
            put("optimizer", c.optimizer.to_owned());
        }
        if c.scale != 1.0 {
            for (key, values) in &self.size_keys {
                let v: Vec<String> = values.iter().map(|&d| scaled(d, c.scale).to_string()).collect();
                put(key, v.join(","));
            }
        }
        out
    }

    fn verify(&self, c: &Combo) -> Option<Candidate> {
        let changes = self.changes(c);
        let mut plan = self.req.plan.clone();
        plan.apply_settings(&changes).ok()?;
        let (_, d) = device_estimate(&plan, self.req.gpu, false).ok()?;
        let high = d.device_peak_bytes_high.get();
        if high as f64 > self.budget() {
            return None;
        }
        let s = &self.structures[c.structure];
        let mut why: Vec<String> = Vec::new();
        if c.micro_batch != self.req.plan.micro_batch {
            why.push(format!("micro-batch {} x {} accumulation", c.micro_batch, c.accumulation));
        }
        if s.precision != self.req.plan.precision {
            let speed = amp_speedup(&self.req.gpu, s.precision);
            why.push(if speed > 1.0 {
                format!("{} autocast (about {speed:.0}x faster matrix maths on this GPU)", s.precision.word())
            } else {
                format!("{} autocast (no tensor cores: memory only)", s.precision.word())
            });
        }
        if s.checkpoint != self.req.plan.checkpoint() {
            let share = recompute_share(s.checkpoint);
            why.push(if share > 0.0 {
                format!(
                    "checkpointing {} (re-runs {:.0} % of the forward)",
                    checkpoint_word(s.checkpoint),
                    share * 100.0
                )
            } else {
                "checkpointing off".to_owned()
            });
        }
        if c.expandable != self.req.plan.expandable_segments {
            why.push(format!("expandable segments {}", if c.expandable { "on (less fragmentation)" } else { "off" }));
        }
        if c.optimizer != self.req.plan.optimizer.word() {
            why.push(format!(
                "{} instead of {} (changes training, not just memory)",
                c.optimizer,
                self.req.plan.optimizer.word()
            ));
        }
        if c.scale != 1.0 {
            why.push(format!("input {:.0} % per side (changes what the model sees)", c.scale * 100.0));
        }
        if why.is_empty() {
            why.push("the plan as it is".to_owned());
        }
        let headroom = crate::units::signed_difference(d.capacity_bytes.get(), high);
        let eff = c.micro_batch * c.accumulation;
        let mut reason = why.join("; ");
        if eff != self.effective {
            reason.push_str(&format!("; effective batch {eff} instead of {}", self.effective));
        }
        reason.push_str(&format!(
            "; {} of {} at the high end, {:.2}x the step time",
            crate::units::Bytes(high),
            crate::units::Bytes(d.capacity_bytes.get()),
            c.time
        ));
        Some(Candidate {
            changes,
            micro_batch: c.micro_batch,
            accumulation: c.accumulation,
            effective_batch: eff,
            precision: s.precision,
            checkpoint: checkpoint_word(s.checkpoint),
            expandable_segments: c.expandable,
            optimizer: c.optimizer.to_owned(),
            input_scale: c.scale,
            device_peak_bytes: high,
            capacity_bytes: d.capacity_bytes.get(),
            headroom_bytes: headroom,
            relative_time: c.time,
            verified: true,
            reason,
        })
    }
}

/// A spatial side scaled down, kept a multiple of 16 (what strided models need).
pub fn scaled(d: u64, scale: f64) -> u64 {
    if scale == 1.0 {
        return d;
    }
    (((d as f64 * scale) / 16.0).round() as u64 * 16).max(16)
}

/// The plan's input-size keys (image, volume) with their current values.
pub fn input_sizes(plan: &Plan) -> Vec<(String, Vec<u64>)> {
    let Ok(schema) = crate::zoo::schema(plan.model_name()) else { return Vec::new() };
    let settings = plan.model.settings.clone();
    schema
        .into_iter()
        .filter_map(|p| {
            let Kind::Sizes { n, .. } = p.kind else { return None };
            let text = settings.get(&p.key).cloned().unwrap_or(p.default);
            let mut v: Vec<u64> = text.split(',').filter_map(|t| t.trim().parse().ok()).collect();
            if v.len() == 1 {
                v = vec![v[0]; n];
            }
            Some((p.key, v))
        })
        .collect()
}

/// Runs a whole search.
pub fn advise(req: Request) -> Result<Advice, AdviseError> {
    let mut search = Search::new(req)?;
    while search.step() {}
    Ok(search.result())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Preset;

    fn w1_before() -> Plan {
        Preset::find("w1-before").expect("preset").plan().expect("plan")
    }

    #[test]
    fn w1_before_gets_fits_that_keep_its_effective_batch() {
        let gpu = *crate::gpus::find("v100-16gb").expect("gpu");
        let req = Request { plan: w1_before(), gpu, margin: 0.1, allow_resize: false, allow_optimizer: false, top: 10 };
        let advice = advise(req).expect("advice");
        assert!(!advice.current_fits, "W1 as first run does not fit a 16 GB card with a 10 % margin");
        assert!(!advice.candidates.is_empty(), "{advice:?}");
        for c in &advice.candidates {
            assert_eq!(c.effective_batch, 4, "{c:?}");
            assert!(c.verified && c.device_peak_bytes as f64 <= advice.budget_bytes as f64, "{c:?}");
            // Applying the changes gives a plan whose exact estimate fits.
            let mut plan = w1_before();
            plan.apply_settings(&c.changes).expect("changes apply");
            let e = estimate::estimate_for(&plan, Target::Cuda(gpu)).expect("estimate");
            assert_eq!(e.device.expect("device").device_peak_bytes_high.get(), c.device_peak_bytes);
        }
        let times: Vec<f64> = advice.candidates.iter().map(|c| c.relative_time).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "ranked by time: {times:?}");
    }

    #[test]
    fn resizing_and_optimizers_widen_the_space_only_when_allowed() {
        let gpu = *crate::gpus::find("a100-40gb").expect("gpu");
        let plan = Plan { micro_batch: 24, accumulation: 15, ..Plan::zoo("resnet50") };
        let narrow =
            Request { plan: plan.clone(), gpu, margin: 0.1, allow_resize: false, allow_optimizer: false, top: 10 };
        let wide = Request { allow_resize: true, allow_optimizer: true, ..narrow.clone() };
        let (n, w) = (advise(narrow).expect("narrow"), advise(wide).expect("wide"));
        assert!(w.combinations >= 10_000, "{} combinations", w.combinations);
        assert_eq!(w.combinations, n.combinations * 4 * SIZE_STEPS.len());
        assert!(n.candidates.iter().all(|c| c.input_scale == 1.0 && c.optimizer == "adamw"));
    }

    #[test]
    fn bad_requests_name_the_field() {
        let gpu = *crate::gpus::find("v100-16gb").expect("gpu");
        let req =
            Request { plan: w1_before(), gpu, margin: 0.95, allow_resize: false, allow_optimizer: false, top: 10 };
        assert_eq!(advise(req.clone()).expect_err("margin").to_string(), "margin: must be in [0, 0.9], got 0.95");
        assert!(advise(Request { margin: 0.1, top: 0, ..req }).expect_err("top").to_string().starts_with("top:"));
    }
}
