//! Every run the agent accepts: queued, run in a worker, its records kept on disk and
//! streamed to whoever is attached, surviving disconnects and agent restarts.
//!
//! Layout under the data directory: `runs/<id>/run.json` (the run's [`RunInfo`] and plan,
//! rewritten through a temporary file and a rename at each change of state) and
//! `runs/<id>/records.log` (`crate::runlog`: numbered, checksummed, synced records).
//!
//! A run waits in the queue until one of `--max-jobs` slots is free, then runs; its job
//! belongs to the agent, not to the connection that submitted it, so closing a tab
//! leaves it running. A record reaches clients only after it is on disk, through a
//! broadcast channel; a client that falls behind catches up from the file, so no client
//! misses a record and none slows training. On start the agent rebuilds its index from
//! the directory: a run that was running is marked interrupted (a `Failed { Interrupted }`
//! record is appended, so attached clients see it), a queued one waits again.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::estimate::Estimate;
use shared::plan::Plan;
use shared::protocol::{ErrorCode, JobError, JobId, MAX_RUN_ERROR_CHARS, MAX_RUNS_PER_PAGE, Record, RunInfo, RunState};
use tokio::sync::{Notify, broadcast};

use crate::jobs::JobRunner;
use crate::runlog;

mod pump;
mod store;

use store::{Stored, recover, write_stored};

/// Limits on what clients may run (`serve --max-job-steps`, `--max-job-seconds`,
/// `--max-queued`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_job_steps: u64,
    /// A running job is stopped after this long.
    pub max_job_seconds: u64,
    /// Runs waiting for a slot; one more is refused as busy.
    pub max_queued: usize,
    /// Runs kept on disk; past it the oldest ended runs are deleted.
    pub max_runs_kept: usize,
}
/// The default of [`Limits::max_runs_kept`].
pub const MAX_RUNS_KEPT: usize = 1000;
/// Records a live subscriber may fall behind before it catches up from the file.
pub const LIVE_BUFFER: usize = 1024;
/// Records written with one `fdatasync` at most.
pub const MAX_BATCH_RECORDS: usize = 256;
/// How long a cancelled job may take to stop before its worker is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(10);

/// How a run ended: its state, error, measured peak, the last record's number and the
/// last record.
type Ending = (RunState, Option<JobError>, Option<u64>, u64, Record);

/// A record of a run with its number, as stored.
pub type Logged = (u64, Record);

/// A live record as every attached client receives it: encoded once, as its
/// `ToClient::Logged` frame, for all of them (a hundred watchers cost one encoding).
#[derive(Clone, Debug)]
pub struct LiveRecord {
    pub seq: u64,
    pub terminal: bool,
    pub frame: bytes::Bytes,
}

impl LiveRecord {
    /// `None` for a record too large to send (a client then finds the gap and reads on
    /// from the file, where the error is its own).
    fn new(job: JobId, seq: u64, record: Record) -> Option<LiveRecord> {
        let terminal = record.is_terminal();
        let frame = shared::codec::encode(&shared::protocol::ToClient::Logged { job, seq, record }).ok()?;
        Some(LiveRecord { seq, terminal, frame: frame.into() })
    }
}

/// The state a run's `Failed` record with this code leaves it in.
fn failed_state(code: ErrorCode) -> RunState {
    match code {
        ErrorCode::Cancelled => RunState::Cancelled,
        ErrorCode::Interrupted => RunState::Interrupted,
        _ => RunState::Failed,
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{limit} runs are queued already; wait for some to finish or cancel them")]
    QueueFull { limit: usize },
    #[error("no run {0} on this agent")]
    Unknown(JobId),
    #[error("run {job} has ended ({state:?}); nothing to cancel")]
    Ended { job: JobId, state: RunState },
    #[error("run {job} has {records} records so far; there is nothing after record {after}")]
    Ahead { job: JobId, after: u64, records: u64 },
    #[error("key {key:#018x} was used for run {job} with another plan; a new submission needs a new key")]
    KeyReused { key: u64, job: JobId },
    #[error("a submission with key {key:#018x} is being stored right now; send it again in a moment")]
    KeyPending { key: u64 },
    #[error("{0}")]
    Io(String),
}

impl RunError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RunError::QueueFull { .. } => ErrorCode::Busy,
            RunError::Unknown(_) => ErrorCode::UnknownJob,
            // A cancel that raced the end: the run is known, and stays as it ended.
            RunError::Ended { .. } | RunError::Ahead { .. } => ErrorCode::Unexpected,
            RunError::KeyReused { .. } => ErrorCode::InvalidPlan,
            RunError::KeyPending { .. } => ErrorCode::Busy,
            RunError::Io(_) => ErrorCode::Internal,
        }
    }
}

/// `info` with its error message cut to [`MAX_RUN_ERROR_CHARS`] characters.
fn short_error(mut info: RunInfo) -> RunInfo {
    if let Some(e) = info.error.as_mut()
        && let Some((at, _)) = e.message.char_indices().nth(MAX_RUN_ERROR_CHARS)
    {
        e.message.truncate(at);
        e.message.push('…');
    }
    info
}

/// A client's key for a submission, with a hash of the plan as the client sent it (the
/// run's own plan has `auto` and the CPU threads resolved here, so it cannot be compared
/// with a plan sent again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Submission {
    pub key: u64,
    pub plan_hash: u64,
}

impl Submission {
    /// `key` for `plan` as the client sent it: CRC-64 of its JSON encoding.
    pub fn of(key: u64, plan: &Plan) -> Result<Submission, RunError> {
        const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);
        let bytes = serde_json::to_vec(plan).map_err(|e| RunError::Io(format!("encoding the plan: {e}")))?;
        Ok(Submission { key, plan_hash: CRC64.checksum(&bytes) })
    }
}

struct Entry {
    info: RunInfo,
    plan: Plan,
    estimate: Option<Estimate>,
    submission: Option<Submission>,
    /// Live records, while the run is queued or running.
    live: Option<broadcast::Sender<LiveRecord>>,
    /// Asks the running job to stop (and kill it after the grace period).
    cancel: Option<Arc<Notify>>,
}

impl Entry {
    /// What its `run.json` holds.
    fn stored(&self) -> Stored {
        Stored {
            info: self.info.clone(),
            plan: self.plan.clone(),
            estimate: self.estimate.clone(),
            submission: self.submission,
        }
    }
}

struct Inner {
    runs: BTreeMap<JobId, Entry>,
    queue: VecDeque<JobId>,
    next_id: JobId,
    /// Keys of submissions whose run is being stored (not yet in `runs`).
    pending_keys: std::collections::HashSet<u64>,
    /// New runs being stored, not yet in `runs`: counted against the queue's limit.
    creating: usize,
    shutting_down: bool,
}

/// A new run being stored: when it is indexed, fails or is dropped unrun, it is no longer
/// counted as being created and its key no longer pending.
struct Creating {
    runs: Arc<Runs>,
    key: Option<u64>,
}

impl Drop for Creating {
    fn drop(&mut self) {
        let mut inner = self.runs.lock();
        inner.creating = inner.creating.saturating_sub(1);
        if let Some(key) = self.key {
            inner.pending_keys.remove(&key);
        }
    }
}

/// What a submission came to.
#[derive(Debug)]
pub struct Submitted {
    pub job: JobId,
    pub device: String,
    pub estimate: Estimate,
    /// The key named a run submitted before: nothing new was queued.
    pub again: bool,
}

/// Every run of this agent; shared by all connections.
pub struct Runs {
    dir: PathBuf,
    runner: JobRunner,
    limits: Limits,
    /// The folder runs' `data` paths are relative to (`serve --data-root`).
    data_root: Option<PathBuf>,
    inner: Mutex<Inner>,
    /// Wakes the dispatcher: a run was queued or a slot came free.
    wake: Notify,
    /// Running jobs' pumps, counted for shutdown.
    active: tokio::sync::watch::Sender<usize>,
    /// Held while a `run.json` is read from `inner` and written, so that of two stores
    /// of one run the later always writes the later state, and while old runs' folders
    /// are deleted, so that a store never writes into a folder being deleted. One for
    /// all runs: stores are few (at a run's state changes).
    store_gate: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Runs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runs").field("dir", &self.dir).finish()
    }
}

impl Runs {
    /// Opens the data directory (creating it), rebuilds the index, marks runs that were
    /// running as interrupted and queues the queued ones again.
    pub fn open(
        dir: &Path,
        runner: JobRunner,
        limits: Limits,
        data_root: Option<PathBuf>,
    ) -> anyhow::Result<Arc<Runs>> {
        use anyhow::Context;
        let runs_dir = dir.join("runs");
        std::fs::create_dir_all(&runs_dir).with_context(|| format!("--data-dir {}", dir.display()))?;
        let mut runs = BTreeMap::new();
        let mut queue = VecDeque::new();
        let mut next_id = 1;
        for entry in std::fs::read_dir(&runs_dir).with_context(|| format!("reading {}", runs_dir.display()))? {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(|n| n.parse::<JobId>().ok()) else { continue };
            // Numbers are never reused, whatever state the folder is in.
            next_id = next_id.max(id + 1);
            // One damaged run is skipped, not a reason to refuse to serve.
            match recover(id, &entry.path()) {
                Ok(e) => {
                    if e.info.state == RunState::Queued {
                        queue.push_back(id);
                    }
                    runs.insert(id, e);
                }
                Err(e) => tracing::warn!(run = id, "skipping a run that cannot be recovered: {e:#}"),
            }
        }
        let mut sorted: Vec<JobId> = queue.into_iter().collect();
        sorted.sort_unstable();
        let runs = Arc::new(Runs {
            dir: runs_dir,
            runner,
            limits,
            data_root,
            inner: Mutex::new(Inner {
                runs,
                queue: sorted.into(),
                next_id,
                pending_keys: std::collections::HashSet::new(),
                creating: 0,
                shutting_down: false,
            }),
            wake: Notify::new(),
            active: tokio::sync::watch::channel(0).0,
            store_gate: Arc::new(Mutex::new(())),
        });
        runs.prune();
        Ok(runs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run_dir(&self, id: JobId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// The run a kept submission with `s.key` became: its number, device and the
    /// estimate it was accepted with, if it was a submission of the same plan.
    fn submitted_before(inner: &Inner, s: Submission) -> Option<Result<Submitted, RunError>> {
        let key = s.key;
        let Some((&job, e)) = inner.runs.iter().find(|(_, e)| e.submission.is_some_and(|k| k.key == key)) else {
            return inner.pending_keys.contains(&key).then_some(Err(RunError::KeyPending { key }));
        };
        Some(match &e.estimate {
            Some(estimate) if e.submission == Some(s) => {
                Ok(Submitted { job, device: e.info.device.clone(), estimate: estimate.clone(), again: true })
            }
            _ => Err(RunError::KeyReused { key, job }),
        })
    }

    /// Queues `plan` (validated, with its estimate) as a new run; or, when `submission`
    /// names a kept submission of the same plan, answers with that run instead.
    pub async fn submit(
        self: &Arc<Self>,
        plan: Plan,
        device: String,
        estimate: &Estimate,
        submission: Option<Submission>,
    ) -> Result<Submitted, RunError> {
        let (id, creating) = {
            let mut inner = self.lock();
            if let Some(s) = submission
                && let Some(before) = Self::submitted_before(&inner, s)
            {
                return before;
            }
            let queued = inner.runs.values().filter(|e| e.info.state == RunState::Queued).count();
            if queued + inner.creating >= self.limits.max_queued {
                return Err(RunError::QueueFull { limit: self.limits.max_queued });
            }
            let id = inner.next_id;
            inner.next_id += 1;
            inner.creating += 1;
            let key = submission.map(|s| s.key);
            if let Some(key) = key {
                inner.pending_keys.insert(key);
            }
            (id, Creating { runs: Arc::clone(self), key })
        };
        let info = RunInfo {
            job: id,
            name: plan.name.clone(),
            state: RunState::Queued,
            device,
            created_unix_ms: now_ms(),
            ended_unix_ms: None,
            records: 0,
            steps: plan.total_steps(),
            estimated_peak_bytes: estimate.peak_bytes.get(),
            measured_peak_bytes: None,
            error: None,
        };
        let device = info.device.clone();
        let entry = Entry { info, plan, estimate: Some(estimate.clone()), submission, live: None, cancel: None };
        // The folder is written and the run queued on the blocking pool, all of it even
        // if the caller stops waiting; `creating` is let go however that ends.
        tokio::task::spawn_blocking(move || {
            let runs = Arc::clone(&creating.runs);
            runs.create(id, entry, creating)
        })
        .await
        .map_err(|e| RunError::Io(format!("run {id}: {e}")))??;
        Ok(Submitted { job: id, device, estimate: estimate.clone(), again: false })
    }

    /// Stores a new run's folder, then indexes and queues it; a folder that could not
    /// be written whole is removed.
    fn create(&self, id: JobId, mut entry: Entry, creating: Creating) -> Result<(), RunError> {
        let dir = self.run_dir(id);
        let stored = entry.stored();
        // `create_dir`, not `create_dir_all`: a run's folder is always new.
        std::fs::create_dir(&dir).map_err(|e| RunError::Io(format!("run {id}: {e}")))?;
        if let Err(e) = write_stored(&dir, &stored) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(RunError::Io(format!("run {id}: {e}")));
        }
        {
            let mut inner = self.lock();
            entry.live = Some(broadcast::channel(LIVE_BUFFER).0);
            inner.runs.insert(id, entry);
            inner.queue.push_back(id);
        }
        // Indexed: from here a lookup finds the run itself.
        drop(creating);
        self.wake.notify_one();
        self.prune();
        Ok(())
    }

    /// A page of runs, newest first: those numbered below `before` (all: `None`), at most
    /// `limit` and [`MAX_RUNS_PER_PAGE`]; and whether older ones are left. Error
    /// messages are cut to [`MAX_RUN_ERROR_CHARS`] so a page stays small.
    pub fn page(&self, before: Option<JobId>, limit: u32) -> (Vec<RunInfo>, bool) {
        let limit = limit.min(MAX_RUNS_PER_PAGE) as usize;
        let inner = self.lock();
        let mut older = inner.runs.range(..before.unwrap_or(JobId::MAX)).rev().map(|(_, e)| e.info.clone());
        let runs: Vec<RunInfo> = older.by_ref().take(limit).map(short_error).collect();
        (runs, older.next().is_some())
    }

    /// Run `job`'s state, plan and the estimate it was accepted with.
    pub fn get(&self, job: JobId) -> Result<(RunInfo, Plan, Option<Estimate>), RunError> {
        let inner = self.lock();
        let e = inner.runs.get(&job).ok_or(RunError::Unknown(job))?;
        Ok((e.info.clone(), e.plan.clone(), e.estimate.clone()))
    }

    /// The queued runs, first to start first, and the running ones with their device.
    pub fn queue(&self) -> (Vec<JobId>, Vec<(JobId, String)>) {
        let inner = self.lock();
        let running = inner
            .runs
            .values()
            .filter(|e| e.info.state == RunState::Running)
            .map(|e| (e.info.job, e.info.device.clone()))
            .collect();
        (inner.queue.iter().copied().collect(), running)
    }

    /// Run `job`'s live records (`None` once it has ended), for a client that has its
    /// records up to `after`. A client subscribes before it reads the file, so that
    /// nothing falls between the two (it skips what the live stream repeats).
    pub fn subscribe(&self, job: JobId, after: u64) -> Result<Option<broadcast::Receiver<LiveRecord>>, RunError> {
        let inner = self.lock();
        let e = inner.runs.get(&job).ok_or(RunError::Unknown(job))?;
        if after > e.info.records {
            return Err(RunError::Ahead { job, after, records: e.info.records });
        }
        Ok(e.live.as_ref().map(broadcast::Sender::subscribe))
    }

    /// A page of run `job`'s records on disk after `after`, read from `cursor` on (see
    /// `runlog::read_page`): memory and time per page are bounded however long the run.
    /// Only records already synced (counted in the run's `records`) are read.
    pub async fn read_page(&self, job: JobId, cursor: runlog::Cursor, after: u64) -> Result<runlog::Page, RunError> {
        let log = self.run_dir(job).join("records.log");
        let through = self.lock().runs.get(&job).ok_or(RunError::Unknown(job))?.info.records;
        tokio::task::spawn_blocking(move || runlog::read_page(&log, cursor, after, through))
            .await
            .map_err(|e| RunError::Io(e.to_string()))?
            .map_err(|e| RunError::Io(e.to_string()))
    }

    /// Cancels a queued run at once, or asks a running one to stop (killed after
    /// [`CANCEL_GRACE`]).
    pub async fn cancel(self: &Arc<Self>, job: JobId) -> Result<(), RunError> {
        let queued = {
            let mut inner = self.lock();
            let e = inner.runs.get(&job).ok_or(RunError::Unknown(job))?;
            match e.info.state {
                RunState::Queued => {
                    inner.queue.retain(|&j| j != job);
                    // Marked at once, so that a second cancel finds it ended.
                    if let Some(e) = inner.runs.get_mut(&job) {
                        e.info.state = RunState::Cancelled;
                    }
                    true
                }
                RunState::Running => {
                    if let Some(c) = &e.cancel {
                        c.notify_one();
                    }
                    false
                }
                state => return Err(RunError::Ended { job, state }),
            }
        };
        if queued {
            let error = JobError { code: ErrorCode::Cancelled, message: "cancelled while queued".into() };
            self.end_unstarted(job, RunState::Cancelled, error).await;
        }
        Ok(())
    }

    /// Stops dispatching, cancels running jobs and waits up to `grace` for their last
    /// records to be written; queued runs stay queued for the next start.
    pub async fn shutdown(&self, grace: Duration) {
        let cancels: Vec<Arc<Notify>> = {
            let mut inner = self.lock();
            inner.shutting_down = true;
            inner.runs.values().filter_map(|e| e.cancel.clone()).collect()
        };
        self.wake.notify_one();
        for c in &cancels {
            c.notify_one();
        }
        let mut active = self.active.subscribe();
        let _ = tokio::time::timeout(grace, active.wait_for(|&n| n == 0)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_job_steps: 10, max_job_seconds: 10, max_queued: 4, max_runs_kept: MAX_RUNS_KEPT }
    }

    fn stored(dir: &Path, job: JobId, state: RunState, records: &[Record]) {
        let run = dir.join("runs").join(job.to_string());
        std::fs::create_dir_all(&run).expect("dir");
        let info = RunInfo {
            job,
            name: format!("run {job}"),
            state,
            device: "cpu".into(),
            created_unix_ms: 1,
            ended_unix_ms: None,
            records: 0,
            steps: 1,
            estimated_peak_bytes: 1,
            measured_peak_bytes: None,
            error: None,
        };
        write_stored(&run, &Stored { info, plan: Plan::example_mlp(), estimate: None, submission: None })
            .expect("run.json");
        let (mut w, _) = runlog::Writer::open(&run.join("records.log")).expect("log");
        if !records.is_empty() {
            w.append(records).expect("append");
        }
    }

    #[test]
    fn a_restart_interrupts_running_runs_requeues_queued_ones_and_trusts_a_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch =
            |_job: JobId| Record::Event { step: 1, event: shared::protocol::JobEvent::Resumed { path: "x".into() } };
        let failed = |_job: JobId, code| Record::Failed { error: JobError { code, message: "m".into() } };
        stored(dir.path(), 1, RunState::Running, &[batch(1)]);
        stored(dir.path(), 2, RunState::Queued, &[]);
        // Died after writing its end, before storing it.
        stored(dir.path(), 3, RunState::Running, &[batch(3), failed(3, ErrorCode::Cancelled)]);
        stored(dir.path(), 4, RunState::Finished, &[]);
        // A torn last frame on a running run.
        stored(dir.path(), 5, RunState::Running, &[batch(5), batch(5)]);
        let log5 = dir.path().join("runs/5/records.log");
        let len = std::fs::metadata(&log5).expect("meta").len();
        std::fs::OpenOptions::new().write(true).open(&log5).expect("open").set_len(len - 2).expect("tear");
        let runs =
            Runs::open(dir.path(), JobRunner::new(PathBuf::from("/nonexistent"), 1), limits(), None).expect("open");
        let list = |runs: &Runs| runs.lock().runs.values().map(|e| e.info.clone()).collect::<Vec<_>>();
        let state = |j| list(&runs).into_iter().find(|r| r.job == j).map(|r| (r.state, r.records));
        assert_eq!(state(1), Some((RunState::Interrupted, 2)));
        assert_eq!(state(2), Some((RunState::Queued, 0)));
        assert_eq!(state(3), Some((RunState::Cancelled, 2)), "no second end appended");
        assert_eq!(state(4), Some((RunState::Finished, 0)));
        assert_eq!(state(5), Some((RunState::Interrupted, 2)), "the torn frame cut, the end appended");
        assert_eq!(runs.lock().queue.iter().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(runs.lock().next_id, 6);
        let log1 = runlog::read_all(&dir.path().join("runs/1/records.log")).expect("read");
        assert!(matches!(&log1[1].1, Record::Failed { error } if error.code == ErrorCode::Interrupted));
        // Reopening changes nothing more.
        drop(runs);
        let again =
            Runs::open(dir.path(), JobRunner::new(PathBuf::from("/nonexistent"), 1), limits(), None).expect("reopen");
        assert_eq!(list(&again).iter().map(|r| r.records).collect::<Vec<_>>(), vec![2, 0, 2, 0, 2]);
    }

    #[test]
    fn runs_are_listed_newest_first_in_bounded_pages_with_short_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let long = "x".repeat(3 * MAX_RUN_ERROR_CHARS);
        for job in 1..=105 {
            stored(dir.path(), job, if job == 7 { RunState::Queued } else { RunState::Finished }, &[]);
        }
        let run3 = dir.path().join("runs/3/run.json");
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&run3).expect("read")).expect("json");
        v["info"]["state"] = "Failed".into();
        v["info"]["error"] = serde_json::json!({ "code": "Torch", "message": long });
        std::fs::write(&run3, serde_json::to_vec(&v).expect("json")).expect("write");
        let runs =
            Runs::open(dir.path(), JobRunner::new(PathBuf::from("/nonexistent"), 1), limits(), None).expect("open");
        let jobs = |page: &[RunInfo]| page.iter().map(|r| r.job).collect::<Vec<_>>();
        let (first, more) = runs.page(None, 2);
        assert_eq!((jobs(&first), more), (vec![105, 104], true));
        // However many are asked for, a page holds at most MAX_RUNS_PER_PAGE.
        let (all, more) = runs.page(None, u32::MAX);
        assert_eq!((all.len(), more), (MAX_RUNS_PER_PAGE as usize, true));
        let (rest, more) = runs.page(Some(4), 100);
        assert_eq!((jobs(&rest), more), (vec![3, 2, 1], false));
        let message = &rest[0].error.as_ref().expect("error").message;
        assert_eq!(message.chars().count(), MAX_RUN_ERROR_CHARS + 1, "cut, with an ellipsis");
        assert!(runs.page(Some(1), 10).0.is_empty());
        // One run's plan; the queue.
        assert_eq!(runs.get(3).expect("run 3").1, Plan::example_mlp());
        assert_eq!(runs.get(3).expect("run 3").2, None, "stored without an estimate");
        assert!(matches!(runs.get(999), Err(RunError::Unknown(999))));
        assert_eq!(runs.queue(), (vec![7], Vec::new()));
    }

    #[tokio::test]
    async fn past_the_runs_kept_the_oldest_ended_runs_are_deleted_never_a_queued_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Oldest first: a queued run, then four ended ones.
        stored(dir.path(), 1, RunState::Queued, &[]);
        for job in 2..=5 {
            stored(dir.path(), job, RunState::Finished, &[]);
        }
        let kept = Limits { max_runs_kept: 3, ..limits() };
        let runs = Runs::open(dir.path(), JobRunner::new(PathBuf::from("/nonexistent"), 1), kept, None).expect("open");
        let index = |runs: &Runs| runs.lock().runs.keys().copied().collect::<Vec<_>>();
        // Folders are deleted on the blocking pool: wait (at most 10 s) for them to go.
        let folders = async |want: &[JobId]| {
            let t0 = std::time::Instant::now();
            loop {
                let mut v: Vec<JobId> = std::fs::read_dir(dir.path().join("runs"))
                    .expect("runs")
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect();
                v.sort_unstable();
                if v == want || t0.elapsed() > Duration::from_secs(10) {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        assert_eq!(index(&runs), vec![1, 4, 5], "the queued run stays, the two oldest ended go");
        assert_eq!(folders(&[1, 4, 5]).await, vec![1, 4, 5]);
        // A new run pushes out the oldest ended one.
        let plan = Plan::example_mlp();
        let estimate = shared::estimate::estimate(&plan).expect("estimate");
        let new = runs.submit(plan, "cpu".into(), &estimate, None).await.expect("submit");
        assert_eq!(new.job, 6);
        assert_eq!(index(&runs), vec![1, 5, 6]);
        assert_eq!(folders(&[1, 5, 6]).await, vec![1, 5, 6]);
    }

    #[tokio::test]
    async fn a_submission_sent_again_with_its_key_is_answered_with_its_run_even_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open =
            || Runs::open(dir.path(), JobRunner::new(PathBuf::from("/nonexistent"), 1), limits(), None).expect("open");
        let plan = Plan::example_mlp();
        let key = |k: u64, p: &Plan| Some(Submission::of(k, p).expect("hash"));
        let estimate = shared::estimate::estimate(&plan).expect("estimate");
        let runs = open();
        let first = runs.submit(plan.clone(), "cpu".into(), &estimate, key(42, &plan)).await.expect("first");
        assert!(!first.again);
        let again = runs.submit(plan.clone(), "cpu".into(), &estimate, key(42, &plan)).await.expect("again");
        assert_eq!((again.job, again.again, again.device.as_str()), (first.job, true, "cpu"));
        assert_eq!(again.estimate, estimate);
        // Without a key, or with another, it is a new run.
        let other = runs.submit(plan.clone(), "cpu".into(), &estimate, key(43, &plan)).await.expect("other");
        let keyless = runs.submit(plan.clone(), "cpu".into(), &estimate, None).await.expect("keyless");
        assert_eq!((other.job, keyless.job), (first.job + 1, first.job + 2));
        // The same key with another plan is refused, naming the run.
        let mut changed = plan.clone();
        changed.name = "changed".into();
        let e = runs.submit(changed.clone(), "cpu".into(), &estimate, key(42, &changed)).await.expect_err("reused");
        assert!(matches!(e, RunError::KeyReused { key: 42, job } if job == first.job), "{e}");
        assert_eq!(e.code(), ErrorCode::InvalidPlan);
        // While a keyed submission is being stored, the same key waits.
        runs.lock().pending_keys.insert(44);
        let e = runs.submit(plan.clone(), "cpu".into(), &estimate, key(44, &plan)).await.expect_err("pending");
        assert_eq!(e.code(), ErrorCode::Busy, "{e}");
        runs.lock().pending_keys.remove(&44);
        assert_eq!(runs.queue().0.len(), 3, "nothing queued twice");
        // Runs being stored count against the queue's limit (4 here).
        runs.lock().creating += 1;
        let e = runs.submit(plan.clone(), "cpu".into(), &estimate, None).await.expect_err("full");
        assert!(matches!(e, RunError::QueueFull { limit: 4 }), "{e}");
        runs.lock().creating -= 1;
        let held = {
            let inner = runs.lock();
            (inner.creating, inner.pending_keys.len())
        };
        assert_eq!(held, (0, 0), "every creation let go");
        // The key is kept in run.json: after a restart it still names the run, whatever
        // this agent now resolves the plan to (the hash is of the plan as sent).
        drop(runs);
        let runs = open();
        let mut resolved = plan.clone();
        resolved.cpu_threads = Some(resolved.cpu_threads.map_or(3, |t| t + 1));
        let after = runs.submit(resolved, "cpu".into(), &estimate, key(42, &plan)).await.expect("after");
        assert_eq!((after.job, after.again), (first.job, true));
        assert_eq!(runs.queue().0.len(), 3);
    }
}
