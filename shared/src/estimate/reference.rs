//! The reference fixtures: peaks of the reference implementations measured on the CPU
//! with oneDNN on and off (and with oneDNN limited to older instruction sets), and the
//! estimate for each:
//! - the curated set (`shared/fixtures/reference_peaks.json`, written by
//!   `scripts/reference_peaks.py`): the configurations the estimator was built against;
//! - the random set (`shared/fixtures/random_peaks.json`, written by
//!   `scripts/random_configs.py`): configurations drawn by chance for every zoo model,
//!   which no rule was tuned to.

use crate::isa::CpuIsa;
use crate::plan::Plan;

/// The curated fixture, embedded so that tests and the accuracy report read the same file.
pub const FIXTURE: &str = include_str!("../../fixtures/reference_peaks.json");

/// The random fixture.
pub const RANDOM_FIXTURE: &str = include_str!("../../fixtures/random_peaks.json");

/// Models outside the zoo, exported with torch.export and measured as the references
/// are (`scripts/own_models.py`, then `scripts/reference_peaks.py --configs`).
pub const OWN_FIXTURE: &str = include_str!("../../fixtures/own_peaks.json");

macro_rules! own_files {
    ($($id:literal),* $(,)?) => {
        /// The graph-only `.pt2` files of the own-model fixture (`shared/fixtures/own`).
        pub const OWN_FILES: &[(&str, &[u8])] = &[$(($id, include_bytes!(concat!("../../fixtures/own/", $id, ".pt2")))),*];
    };
}

own_files!(
    "small_convnet",
    "signal1d",
    "seg3d",
    "tagger",
    "regressor",
    "mobilenet_v3_small",
    "regnet_y_400mf",
    "densenet121",
    "shufflenet_v2",
    "convnext_atto",
    "efficientnet_b0",
    "vit_tiny",
    "bert_mlm",
    "bert_cls",
    "mobilenet_v2",
    "mnasnet",
    "mixer",
    "regnetx",
    "ghostnet",
    "smp_unet",
);

/// An own-model fixture file, imported.
pub fn own_model(id: &str) -> Result<crate::import::Imported, String> {
    let (_, bytes) = OWN_FILES.iter().find(|(n, _)| *n == id).ok_or_else(|| format!("no fixture file {id}.pt2"))?;
    crate::import::open(bytes, id).map_err(|e| format!("{id}: {e}"))
}

/// Every case of the own-model fixture, every mode.
pub fn own_cases() -> Result<Vec<Case>, String> {
    cases_in(OWN_FIXTURE)
}

/// Validation passes measured by PyTorch (`scripts/reference_validation.py`).
pub const VALIDATION_FIXTURE: &str = include_str!("../../fixtures/reference_validation.json");

/// A validation pass PyTorch ran: how far live memory rose over it.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidationCase {
    pub id: String,
    pub model: String,
    pub settings: Vec<(String, String)>,
    pub rise_bytes: u64,
}

/// Every case of the validation fixture.
pub fn validation_cases() -> Result<Vec<ValidationCase>, String> {
    let doc: serde_json::Value = serde_json::from_str(VALIDATION_FIXTURE).map_err(|e| format!("fixture: {e}"))?;
    let mut out = Vec::new();
    for e in doc["entries"].as_array().ok_or("validation fixture: no entries")? {
        out.push(ValidationCase {
            id: e["id"].as_str().unwrap_or_default().to_owned(),
            model: e["model"].as_str().unwrap_or_default().to_owned(),
            settings: e["settings"]
                .as_array()
                .ok_or("validation fixture: settings")?
                .iter()
                .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
                .collect(),
            rise_bytes: e["rise_bytes"].as_u64().ok_or("validation fixture: rise_bytes")?,
        });
    }
    Ok(out)
}

/// The estimate's rise over its validation phase, from its trace: the highest live
/// bytes in the phase less the live bytes where it began.
pub fn validation_rise(case: &ValidationCase) -> Result<u64, String> {
    let mut plan = Plan::zoo(&case.model);
    plan.apply_settings(&case.settings).map_err(|e| format!("{}: {e}", case.id))?;
    let (_, events) = super::trace(&plan, super::Target::Cpu).map_err(|e| format!("{}: {e}", case.id))?;
    let mut phase = events.iter().filter(|e| e.phase == Some(super::Phase::Validation)).peekable();
    let first = phase.peek().ok_or_else(|| format!("{}: the estimate has no validation phase", case.id))?;
    let start = first.live as i64 - first.delta;
    let peak = phase.map(|e| e.live).max().unwrap_or(0);
    Ok((peak as i64 - start).max(0) as u64)
}

/// One measured configuration and mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub id: String,
    pub model: String,
    /// `--set` pairs, with `onednn`, `threads` and `cpu_isa` as measured.
    pub settings: Vec<(String, String)>,
    /// `onednn`, `native`, or `onednn:ISA` for oneDNN limited to an older ISA.
    pub mode: String,
    pub onednn: bool,
    /// The instruction set oneDNN dispatched on (`None` where the fixture does not say).
    pub isa: Option<CpuIsa>,
    pub measured_bytes: u64,
    pub measured_phase: String,
    /// The RSS cross-check: the step's rise in resident memory against the profiler's.
    pub rss_vs_profiler_pct: Option<f64>,
}

/// Every case of the curated fixture, every mode.
pub fn cases() -> Result<Vec<Case>, String> {
    cases_in(FIXTURE)
}

/// Every case of the random fixture, every mode.
pub fn random_cases() -> Result<Vec<Case>, String> {
    cases_in(RANDOM_FIXTURE)
}

/// The measured modes of an entry in a fixture's order: oneDNN at the CPU's own ISA,
/// native kernels, then oneDNN limited to each older ISA.
fn modes(measured: &serde_json::Value) -> Vec<(String, bool, Option<CpuIsa>)> {
    let mut out = vec![("onednn".to_owned(), true, None), ("native".to_owned(), false, None)];
    if let Some(m) = measured.as_object() {
        for key in m.keys() {
            if let Some(isa) = key.strip_prefix("onednn:").and_then(CpuIsa::from_word) {
                out.push((key.clone(), true, Some(isa)));
            }
        }
    }
    out.retain(|(k, _, _)| measured[k]["peak_bytes"].is_u64());
    out
}

/// Every case of a fixture's text.
pub fn cases_in(fixture: &str) -> Result<Vec<Case>, String> {
    let doc: serde_json::Value = serde_json::from_str(fixture).map_err(|e| format!("fixture: {e}"))?;
    let threads = doc["threads"].as_u64().unwrap_or(2);
    let cpu_isa = doc["cpu_isa"].as_str().and_then(CpuIsa::from_word);
    let mut out = Vec::new();
    for e in doc["entries"].as_array().ok_or("fixture: no entries")? {
        let id = e["id"].as_str().unwrap_or_default().to_owned();
        let model = e["model"].as_str().unwrap_or_default().to_owned();
        let mut settings: Vec<(String, String)> = e["settings"]
            .as_array()
            .ok_or("fixture: settings")?
            .iter()
            .filter_map(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())))
            .collect();
        settings.push(("threads".to_owned(), threads.to_string()));
        for (mode, onednn, limit) in modes(&e["measured"]) {
            let m = &e["measured"][&mode];
            let Some(peak) = m["peak_bytes"].as_u64() else { continue };
            // The ISA of the measurement: its limit, what it recorded, or the fixture's CPU.
            let isa = limit.or_else(|| m["isa"].as_str().and_then(CpuIsa::from_word)).or(cpu_isa);
            let mut s = settings.clone();
            s.push(("onednn".to_owned(), onednn.to_string()));
            if let Some(isa) = isa {
                s.push(("cpu_isa".to_owned(), isa.word().to_owned()));
            }
            out.push(Case {
                id: id.clone(),
                model: model.clone(),
                settings: s,
                mode,
                onednn,
                isa,
                measured_bytes: peak,
                measured_phase: m["peak_phase"].as_str().unwrap_or_default().to_owned(),
                rss_vs_profiler_pct: m["rss_vs_profiler_pct"].as_f64(),
            });
        }
    }
    Ok(out)
}

/// The plan a case describes.
pub fn plan(case: &Case) -> Result<Plan, String> {
    if let Some(id) = case.model.strip_prefix("file:") {
        let graph = own_model(id)?;
        let validated =
            Plan::from_file(&format!("{id}.pt2"), graph, &case.settings).map_err(|e| format!("{}: {e}", case.id))?;
        return Ok(validated.into_parts().0);
    }
    let mut plan = Plan::zoo(&case.model);
    plan.apply_settings(&case.settings).map_err(|e| format!("{}: {e}", case.id))?;
    plan.validate().map_err(|e| format!("{}: {e}", case.id))?;
    Ok(plan)
}

/// One case next to its estimate.
#[derive(Clone, Debug)]
pub struct Row {
    pub case: Case,
    pub estimate: crate::Estimate,
    /// (estimated - measured) / measured, in percent.
    pub error_pct: f64,
    /// Whether the measured peak lies in the estimate's interval.
    pub inside: bool,
}

/// Every case of the curated fixture with its estimate.
pub fn compare() -> Result<Vec<Row>, String> {
    compare_cases(cases()?)
}

/// Cases with their estimates.
pub fn compare_cases(cases: Vec<Case>) -> Result<Vec<Row>, String> {
    cases
        .into_iter()
        .map(|case| {
            let plan = plan(&case)?;
            let estimate = crate::estimate::estimate(&plan).map_err(|e| format!("{}: {e}", case.id))?;
            let (est, meas) = (estimate.peak_bytes.get(), case.measured_bytes);
            let error_pct = 100.0 * (est as f64 - meas as f64) / meas.max(1) as f64;
            let inside = estimate.peak_bytes_low.get() <= meas && meas <= estimate.peak_bytes_high.get();
            Ok(Row { case, estimate, error_pct, inside })
        })
        .collect()
}

/// The modes the rows hold, in their first row's order.
pub fn modes_of(rows: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in rows {
        if !out.contains(&r.case.mode) {
            out.push(r.case.mode.clone());
        }
    }
    out
}

/// The (median, worst) targets of a mode: oneDNN's for any ISA, else the native ones.
pub fn targets(mode: &str) -> (f64, f64) {
    let onednn = mode != "native";
    TARGETS.iter().find(|t| t.0 == onednn).map_or((0.0, 0.0), |t| (t.1, t.2))
}

/// Median and worst |error| of the rows of one mode (`onednn`, `native`, `onednn:ISA`),
/// in percent.
pub fn summary(rows: &[Row], mode: &str) -> (f64, f64) {
    let mut v: Vec<f64> = rows.iter().filter(|r| r.case.mode == mode).map(|r| r.error_pct.abs()).collect();
    v.sort_by(f64::total_cmp);
    let median = match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    (median, v.last().copied().unwrap_or(f64::NAN))
}

/// The targets of the fixture: with libtorch's native kernels median <= 1 % and worst
/// <= 3 %; with PyTorch's CPU defaults (oneDNN) median <= 2 % and worst <= 5 %.
pub const TARGETS: [(bool, f64, f64); 2] = [(false, 1.0, 3.0), (true, 2.0, 5.0)];

#[cfg(test)]
mod tests {
    use super::*;

    /// Eval mode under `no_grad` as PyTorch runs it: `nn.MultiheadAttention`'s fused
    /// fast path with an even head count and the spelled-out one with an odd count,
    /// dropout off, batch norm on running statistics, locals held by their frames.
    #[test]
    fn every_validation_pass_against_pytorch() {
        let cases = validation_cases().expect("validation fixture");
        assert!(cases.len() >= 3);
        let mut worst: f64 = 0.0;
        for c in &cases {
            let est = validation_rise(c).expect("estimate");
            let err = (est as f64 - c.rise_bytes as f64) / c.rise_bytes as f64 * 100.0;
            println!("{:<28} estimated {est:>11} measured {:>11} B {err:>+7.2} %", c.id, c.rise_bytes);
            worst = worst.max(err.abs());
        }
        assert!(worst <= 0.1, "a validation pass is off by {worst:.2} % (at most 0.1 %)");
    }

    #[test]
    fn every_fixture_entry_against_its_estimate() {
        let rows = compare().expect("fixture");
        assert!(rows.len() >= 50, "at least 25 configurations in both modes");
        check(&rows);
    }

    #[test]
    fn every_random_entry_against_its_estimate() {
        let cases = random_cases().expect("random fixture");
        assert!(cases.iter().filter(|c| c.mode == "onednn").count() >= 60, "at least 60 drawn configurations");
        check(&compare_cases(cases).expect("estimates"));
    }

    /// Each mode's median (and, natively, worst) error within its target, and every
    /// measured peak inside its interval.
    #[test]
    fn every_own_model_entry_against_its_estimate() {
        let rows = compare_cases(own_cases().expect("own fixture")).expect("every own model estimates");
        assert!(rows.len() >= 2 * 16, "{} own-model cases", rows.len());
        check(&rows);
    }

    fn check(rows: &[Row]) {
        let mut lines = Vec::new();
        let mut outside = Vec::new();
        for r in rows {
            let e = &r.estimate;
            if !r.inside {
                outside.push(format!("{} ({})", r.case.id, r.case.mode));
            }
            lines.push(format!(
                "{:<42} {:<18} est {:>9.2} meas {:>9.2} MiB {:>+7.2} %  [{:.2}, {:.2}] {}",
                r.case.id,
                r.case.mode,
                e.peak_bytes.get() as f64 / 1048576.0,
                r.case.measured_bytes as f64 / 1048576.0,
                r.error_pct,
                e.peak_bytes_low.get() as f64 / 1048576.0,
                e.peak_bytes_high.get() as f64 / 1048576.0,
                if r.inside { "" } else { "OUTSIDE" }
            ));
        }
        eprintln!("{}", lines.join("\n"));
        let mut verdicts = Vec::new();
        for mode in modes_of(rows) {
            let (med_target, worst_target) = targets(&mode);
            let (med, worst) = summary(rows, &mode);
            verdicts.push(format!("{mode}: median {med:.2} % worst {worst:.2} %"));
            assert!(med <= med_target, "{mode}: median {med:.2} % over {med_target} %\n{}", lines.join("\n"));
            // With oneDNN a worst case past the target is allowed only inside the interval,
            // which the assertion below checks for every entry.
            assert!(mode != "native" || worst <= worst_target, "{mode}: worst {worst:.2} % over {worst_target} %");
        }
        eprintln!("{}", verdicts.join("; "));
        assert!(outside.is_empty(), "measured peaks outside the interval: {outside:?}\n{}", verdicts.join("; "));
    }
}
