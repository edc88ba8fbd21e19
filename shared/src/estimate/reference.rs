//! The reference fixture (`shared/fixtures/reference_peaks.json`, written by
//! `scripts/reference_peaks.py`): peaks of the reference implementations measured on the
//! CPU with oneDNN on and off, and the estimate for each.

use crate::plan::Plan;

/// The fixture, embedded so that tests and the accuracy report read the same file.
pub const FIXTURE: &str = include_str!("../../fixtures/reference_peaks.json");

/// One measured configuration and mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub id: String,
    pub model: String,
    /// `--set` pairs, with `onednn` and `threads` as measured.
    pub settings: Vec<(String, String)>,
    pub onednn: bool,
    pub measured_bytes: u64,
    pub measured_phase: String,
    /// The RSS cross-check: the step's rise in resident memory against the profiler's.
    pub rss_vs_profiler_pct: Option<f64>,
}

/// Every case of the fixture, both modes.
pub fn cases() -> Result<Vec<Case>, String> {
    let doc: serde_json::Value = serde_json::from_str(FIXTURE).map_err(|e| format!("fixture: {e}"))?;
    let threads = doc["threads"].as_u64().unwrap_or(2);
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
        for (mode, onednn) in [("onednn", true), ("native", false)] {
            let m = &e["measured"][mode];
            let Some(peak) = m["peak_bytes"].as_u64() else { continue };
            let mut s = settings.clone();
            s.push(("onednn".to_owned(), onednn.to_string()));
            out.push(Case {
                id: id.clone(),
                model: model.clone(),
                settings: s,
                onednn,
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
    let mut plan = Plan::zoo(&case.model);
    plan.apply_settings(&case.settings).map_err(|e| format!("{}: {e}", case.id))?;
    plan.validate().map_err(|e| format!("{}: {e}", case.id))?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::estimate;

    #[test]
    fn every_fixture_entry_against_its_estimate() {
        let cases = cases().expect("fixture");
        assert!(cases.len() >= 50, "at least 25 configurations in both modes");
        let mut rows = Vec::new();
        let mut errs = (Vec::new(), Vec::new());
        let mut outside = Vec::new();
        for c in &cases {
            let plan = plan(c).expect("plan");
            let e = estimate(&plan).expect("estimate");
            let err = 100.0 * (e.peak_bytes.get() as f64 - c.measured_bytes as f64) / c.measured_bytes as f64;
            if c.onednn { errs.0.push(err.abs()) } else { errs.1.push(err.abs()) }
            let inside = e.peak_bytes_low.get() <= c.measured_bytes && c.measured_bytes <= e.peak_bytes_high.get();
            if !inside {
                outside.push(c.id.clone());
            }
            rows.push(format!(
                "{:<42} {:<7} est {:>9.2} meas {:>9.2} MiB {:>+7.2} %  [{:.2}, {:.2}] {}",
                c.id,
                if c.onednn { "onednn" } else { "native" },
                e.peak_bytes.get() as f64 / 1048576.0,
                c.measured_bytes as f64 / 1048576.0,
                err,
                e.peak_bytes_low.get() as f64 / 1048576.0,
                e.peak_bytes_high.get() as f64 / 1048576.0,
                if inside { "" } else { "OUTSIDE" }
            ));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (mut on, mut off) = errs;
        let summary = format!(
            "native: median {:.2} % worst {:.2} %; onednn: median {:.2} % worst {:.2} %",
            median(&mut off),
            off.last().copied().unwrap_or(0.0),
            median(&mut on),
            on.last().copied().unwrap_or(0.0)
        );
        eprintln!("{}\n{summary}", rows.join("\n"));
        assert!(outside.is_empty(), "measured peaks outside the interval: {outside:?}\n{summary}");
    }
}
