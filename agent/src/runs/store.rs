//! A run's folder: `run.json` written whole (a temporary file, a sync, a rename), the
//! index rebuilt from the folders at start, and old runs' folders deleted.

use std::path::Path;
use std::sync::Arc;

use shared::protocol::{ErrorCode, JobError, JobId, Record, RunState};
use tokio::sync::broadcast;

use super::*;

/// What `run.json` holds.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Stored {
    pub(super) info: RunInfo,
    pub(super) plan: Plan,
    /// The estimate the run was accepted with (runs stored before it was kept have none).
    #[serde(default)]
    pub(super) estimate: Option<Estimate>,
    /// The client's key for its submission (`Submit::key`), if it gave one.
    #[serde(default)]
    pub(super) submission: Option<Submission>,
}

pub(super) fn write_stored(dir: &Path, stored: &Stored) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(stored).map_err(std::io::Error::other)?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("run.json.{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join("run.json"))
}

/// A run's entry rebuilt from its folder at start: its stored state, corrected by its
/// log (a run that was running is interrupted; one whose last record is its end ended).
pub(super) fn recover(id: JobId, path: &Path) -> anyhow::Result<Entry> {
    use anyhow::Context;
    let mut stored: Stored =
        serde_json::from_slice(&std::fs::read(path.join("run.json")).context("run.json")?).context("run.json")?;
    let (mut writer, found) = runlog::Writer::open(&path.join("records.log"))?;
    stored.info.records = found.count;
    // The agent died between writing a run's last record and storing its state: the
    // record says how it ended.
    if let Some((_, last)) = &found.last
        && matches!(stored.info.state, RunState::Running | RunState::Queued)
        && last.is_terminal()
    {
        let (state, error) = match last {
            Record::Failed { error } => (failed_state(error.code), Some(error.clone())),
            _ => (RunState::Finished, None),
        };
        stored.info.state = state;
        stored.info.error = error;
        stored.info.ended_unix_ms.get_or_insert_with(now_ms);
        write_stored(path, &stored)?;
    }
    if stored.info.state == RunState::Running {
        let error =
            JobError { code: ErrorCode::Interrupted, message: "the agent stopped while this run was running".into() };
        writer.append(&[Record::Failed { error: error.clone() }])?;
        stored.info.records += 1;
        stored.info.state = RunState::Interrupted;
        stored.info.error = Some(error);
        stored.info.ended_unix_ms = Some(now_ms());
        write_stored(path, &stored)?;
        tracing::info!(run = id, "marked interrupted");
    }
    let live = (stored.info.state == RunState::Queued).then(|| broadcast::channel(LIVE_BUFFER).0);
    Ok(Entry {
        info: stored.info,
        plan: stored.plan,
        estimate: stored.estimate,
        submission: stored.submission,
        live,
        cancel: None,
    })
}

impl Runs {
    /// Writes run `job`'s `run.json` as it stands, on the blocking pool (it syncs).
    pub(super) async fn store(self: &Arc<Self>, job: JobId) {
        let this = Arc::clone(self);
        if let Err(e) = tokio::task::spawn_blocking(move || this.store_now(job)).await {
            tracing::error!(run = job, "storing the run's state failed: {e}");
        }
    }

    pub(super) fn store_now(&self, job: JobId) {
        let _gate = self.store_gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored = {
            let inner = self.lock();
            inner.runs.get(&job).map(Entry::stored)
        };
        if let Some(stored) = stored
            && let Err(e) = write_stored(&self.run_dir(job), &stored)
        {
            tracing::error!(run = job, "could not store the run's state: {e}");
        }
    }

    /// Deletes the oldest ended runs beyond [`Limits::max_runs_kept`].
    pub(super) fn prune(&self) {
        let doomed: Vec<JobId> = {
            let mut inner = self.lock();
            let excess = inner.runs.len().saturating_sub(self.limits.max_runs_kept);
            let ended: Vec<JobId> = inner
                .runs
                .iter()
                .filter(|(_, e)| !matches!(e.info.state, RunState::Queued | RunState::Running))
                .map(|(&j, _)| j)
                .take(excess)
                .collect();
            for j in &ended {
                inner.runs.remove(j);
            }
            ended
        };
        let dirs: Vec<(JobId, PathBuf)> = doomed.into_iter().map(|j| (j, self.run_dir(j))).collect();
        let gate = Arc::clone(&self.store_gate);
        let delete = move || {
            // A store that read the run before it left the index finishes first; one
            // after finds it gone and writes nothing.
            let _gate = gate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (j, dir) in dirs {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(run = j, "could not delete an old run: {e}");
                }
            }
        };
        // A run's folder may hold large checkpoints: deleted off the runtime's threads
        // when there is one (they are out of the index already).
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(delete)),
            Err(_) => delete(),
        }
    }
}
