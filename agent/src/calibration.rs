//! Calibrations: the `peak = fixed + per_sample x micro_batch` lines `find-batch` fits
//! from real probe runs, kept in a JSON file so that later estimates of the same model
//! and knobs on the same device show a calibrated figure next to the estimated one.
//!
//! The file is `--calibration FILE`, else `$HEADROOM_CALIBRATION`, else
//! `~/.cache/headroom/calibration.json`. An entry is keyed by the plan's settings without
//! the ones a line covers or that do not change memory (micro-batch, accumulation, steps,
//! name, seed, learning rate, device and CPU threads), whether it accumulates, and the
//! device it was measured on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared::plan::Plan;

/// Entries kept; the oldest go first.
pub const MAX_ENTRIES: usize = 1_000;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub device: String,
    pub accumulating: bool,
    pub fixed_bytes: f64,
    pub per_sample_bytes: f64,
    /// Micro-batches the line was fitted through.
    pub micro_batches: Vec<u64>,
}

pub fn default_path(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_owned());
    }
    if let Some(p) = std::env::var_os("HEADROOM_CALIBRATION") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/headroom/calibration.json"))
}

/// The key of a plan: its model and the settings that change a step's memory per sample
/// (threads and instruction set, which the CLI fills from the machine, are left out, as
/// for a machine's own settings).
pub fn key(plan: &Plan) -> String {
    let skip = [
        "batch",
        "accum",
        "steps",
        "epochs",
        "samples_per_epoch",
        "name",
        "seed",
        "lr",
        "device",
        "threads",
        "cpu_isa",
    ];
    let mut parts = vec![plan.model_name().to_owned()];
    parts.extend(
        plan.to_settings().into_iter().filter(|(k, _)| !skip.contains(&k.as_str())).map(|(k, v)| format!("{k}={v}")),
    );
    parts.join(";")
}

fn read(path: &Path) -> anyhow::Result<Vec<Entry>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{}: not a calibration file ({e}); remove it to start afresh", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}

/// Adds or replaces an entry (written to a temporary file, then renamed).
pub fn store(path: &Path, entry: Entry) -> anyhow::Result<()> {
    let mut entries = read(path)?;
    entries.retain(|e| !(e.key == entry.key && e.device == entry.device && e.accumulating == entry.accumulating));
    entries.push(entry);
    if entries.len() > MAX_ENTRIES {
        let extra = entries.len() - MAX_ENTRIES;
        entries.drain(..extra);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&entries)?)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// The calibrated peak for `plan` on `device`, when a line was fitted for it.
pub fn lookup(path: &Path, plan: &Plan, device: &str) -> anyhow::Result<Option<(f64, Entry)>> {
    let k = key(plan);
    let accumulating = plan.accumulation > 1;
    Ok(read(path)?
        .into_iter()
        .rev()
        .find(|e| e.key == k && e.device == device && e.accumulating == accumulating)
        .map(|e| (e.fixed_bytes + e.per_sample_bytes * plan.micro_batch as f64, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_by_model_knobs_device_and_accumulation() {
        let dir = std::env::temp_dir().join(format!("headroom-calibration-{}", std::process::id()));
        let path = dir.join("c.json");
        let plan = Plan { micro_batch: 4, accumulation: 2, ..Plan::zoo("resnet18") };
        let entry = Entry {
            key: key(&plan),
            device: "cpu".into(),
            accumulating: true,
            fixed_bytes: 1000.0,
            per_sample_bytes: 10.0,
            micro_batches: vec![2, 4],
        };
        store(&path, entry.clone()).expect("store");
        store(&path, entry.clone()).expect("replaces, does not duplicate");
        assert_eq!(read(&path).expect("read").len(), 1);
        let bigger = Plan { micro_batch: 16, learning_rate: 0.1, ..plan.clone() };
        assert_eq!(lookup(&path, &bigger, "cpu").expect("lookup").map(|(p, _)| p), Some(1160.0));
        assert!(lookup(&path, &bigger, "NVIDIA A100").expect("lookup").is_none(), "another device");
        let fp16 = Plan { precision: shared::plan::Precision::Fp16, ..bigger.clone() };
        assert!(lookup(&path, &fp16, "cpu").expect("lookup").is_none(), "other knobs");
        let single = Plan { accumulation: 1, ..bigger };
        assert!(lookup(&path, &single, "cpu").expect("lookup").is_none(), "not accumulating");
        std::fs::write(&path, "garbage").expect("write");
        assert!(lookup(&path, &plan, "cpu").is_err_and(|e| e.to_string().contains("not a calibration file")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
