//! Starts jobs in worker processes and turns their pipes into a stream of messages.
//!
//! Training never waits for its reader (`crate::runs`, which writes every record to disk
//! before clients see it): batch records go into a bounded channel with `try_send`, and a
//! record that does not fit is dropped and counted (the count travels in the summary).
//! The final `Finished` or `Failed` always arrives. Workers die with the agent: each is
//! started with `PR_SET_PDEATHSIG`, so even a `kill -9` of the agent leaves no worker
//! holding GPU memory.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use shared::plan::Plan;
use shared::protocol::{ErrorCode, JobError, JobId, Record, ToWorker};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{Semaphore, mpsc};

use system::pipe;

/// Batch records buffered per job before new ones are dropped for a slow client.
pub const EVENT_BUFFER: usize = 4096;
/// How long a worker may take to stop after its client went away before it is killed.
pub const ABANDON_GRACE: Duration = Duration::from_secs(10);
/// Lines of a worker's stderr kept to explain a crash, each cut to this many bytes.
const STDERR_TAIL_LINES: usize = 12;
const STDERR_LINE_CHARS: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the agent already runs {limit} job(s) at once; wait for one to finish or cancel it")]
    Busy { limit: usize },
    #[error("could not start the worker process: {0}")]
    Spawn(std::io::Error),
}

/// Starts workers; shared by every connection.
#[derive(Debug)]
pub struct JobRunner {
    exe: PathBuf,
    limit: usize,
    slots: Arc<Semaphore>,
}

/// A job in flight, as its owner sees it.
#[derive(Debug)]
pub struct RunningJob {
    /// `Batch` records, then exactly one `Finished` or `Failed`.
    pub events: mpsc::Receiver<Record>,
    control: mpsc::Sender<ToWorker>,
    kill: Arc<tokio::sync::Notify>,
}

impl RunningJob {
    /// Asks the worker to stop at its next micro-batch; it answers with `Failed{Cancelled}`.
    /// Never waits: repeated requests beyond the pipe's small buffer are redundant.
    pub fn cancel(&self) {
        let _ = self.control.try_send(ToWorker::Cancel);
    }

    /// Kills the worker; the job ends as a crash.
    pub fn kill(&self) {
        self.kill.notify_one();
    }
}

impl JobRunner {
    pub fn new(exe: PathBuf, limit: usize) -> JobRunner {
        JobRunner { exe, limit, slots: Arc::new(Semaphore::new(limit)) }
    }

    /// Slots free now.
    pub fn free_slots(&self) -> usize {
        self.slots.available_permits()
    }

    /// Starts `plan` (already validated) as job `id` in a new worker, or refuses when all
    /// slots are taken. The caller's estimate is attached to the summary, next to the
    /// measurement.
    pub fn start(
        &self,
        id: JobId,
        plan: Plan,
        estimated_peak_bytes: u64,
        files: &system::job::JobFiles,
    ) -> Result<RunningJob, StartError> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| StartError::Busy { limit: self.limit })?;
        let mut child = self.command(id, &plan, files).spawn().map_err(StartError::Spawn)?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(StartError::Spawn(std::io::Error::other("worker pipes missing")));
        };
        let (control_tx, control_rx) = mpsc::channel::<ToWorker>(8);
        let kill = Arc::new(tokio::sync::Notify::new());
        let (events_tx, events_rx) = mpsc::channel::<Record>(EVENT_BUFFER);
        tokio::spawn(feed(stdin, plan, control_rx));
        let stderr_tail = tokio::spawn(stderr_tail(id, stderr));
        let watch = Watch { id, estimated_peak_bytes, child, kill: Arc::clone(&kill), events: events_tx };
        tokio::spawn(watch.run(stdout, stderr_tail, permit));
        Ok(RunningJob { events: events_rx, control: control_tx, kill })
    }
}
impl JobRunner {
    /// `headroom worker --job N` with the job's files, its pipes, the allocator settings
    /// and any oneDNN ISA limit in its environment (before CUDA and oneDNN initialise) and
    /// `PR_SET_PDEATHSIG`, so that it dies with the agent.
    fn command(&self, id: JobId, plan: &Plan, files: &system::job::JobFiles) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker")
            .arg("--job")
            .arg(id.to_string())
            .args(files.checkpoint_dir.iter().flat_map(|d| [std::ffi::OsStr::new("--checkpoint-dir"), d.as_os_str()]))
            .args(files.resume.iter().flat_map(|d| [std::ffi::OsStr::new("--resume"), d.as_os_str()]))
            .args(files.data_root.iter().flat_map(|d| [std::ffi::OsStr::new("--data-root"), d.as_os_str()]))
            .args(files.weights.iter().flat_map(|d| [std::ffi::OsStr::new("--weights-file"), d.as_os_str()]))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if plan.expandable_segments {
            cmd.env("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True");
        }
        // A plan that names an older instruction set than this CPU's runs oneDNN limited
        // to it, as its estimate assumes.
        if let (Some(named), Some(here)) = (plan.cpu_isa, system::host::cpu_isa())
            && named < here
        {
            cmd.env("ONEDNN_MAX_CPU_ISA", named.word().to_ascii_uppercase());
        }
        // SAFETY: between fork and exec only `prctl`, which is async-signal-safe, runs.
        // The signal follows the thread that forked: a tokio worker thread, which lives
        // as long as the runtime.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

/// The worker's stdin: the plan, then control messages; closing it tells the worker to
/// stop.
async fn feed(mut stdin: tokio::process::ChildStdin, plan: Plan, mut control: mpsc::Receiver<ToWorker>) {
    if pipe::write(&mut stdin, &ToWorker::Start { plan }).await.is_err() {
        return;
    }
    while let Some(message) = control.recv().await {
        if pipe::write(&mut stdin, &message).await.is_err() {
            break;
        }
    }
}

/// The worker's stderr, logged line by line; its last lines (each cut to a record's
/// room) explain a crash.
async fn stderr_tail(id: JobId, stderr: tokio::process::ChildStderr) -> String {
    let mut tail = VecDeque::with_capacity(STDERR_TAIL_LINES);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(mut line)) = lines.next_line().await {
        tracing::debug!(job = id, "worker: {line}");
        if line.len() > STDERR_LINE_CHARS {
            let mut end = STDERR_LINE_CHARS;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    tail.into_iter().collect::<Vec<_>>().join("\n")
}

/// A running worker, watched from its stdout: records and events passed on, the end held
/// back until it has exited and its slot is free.
struct Watch {
    id: JobId,
    estimated_peak_bytes: u64,
    child: tokio::process::Child,
    kill: Arc<tokio::sync::Notify>,
    events: mpsc::Sender<Record>,
}

impl Watch {
    async fn run(
        mut self,
        mut stdout: tokio::process::ChildStdout,
        stderr_tail: tokio::task::JoinHandle<String>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let id = self.id;
        let mut dropped = 0u64;
        // Held back until the worker has exited and its slot is free, so that a client
        // may submit again as soon as it sees the end of its job.
        let mut terminal: Option<Record> = None;
        // Set once: a worker that keeps talking after its end cannot stretch it.
        let mut abandon_at: Option<tokio::time::Instant> = None;
        loop {
            let read = if self.events.is_closed() || terminal.is_some() {
                // Nobody listens any more, or the worker has said its last word: give it
                // one grace period, from now, to stop or exit.
                let deadline = *abandon_at.get_or_insert_with(|| tokio::time::Instant::now() + ABANDON_GRACE);
                match tokio::time::timeout_at(deadline, pipe::read::<Record>(&mut stdout)).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(job = id, "worker did not stop or exit in time; killing it");
                        let _ = self.child.start_kill();
                        break;
                    }
                }
            } else {
                tokio::select! {
                    r = pipe::read::<Record>(&mut stdout) => r,
                    () = self.kill.notified() => {
                        tracing::warn!(job = id, "killing the worker");
                        let _ = self.child.start_kill();
                        break;
                    }
                }
            };
            match read {
                Ok(Some(batch @ Record::Batch(_))) => {
                    if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(batch) {
                        dropped += 1;
                    }
                }
                Ok(Some(Record::Finished { mut summary })) => {
                    summary.dropped_records = dropped;
                    summary.estimated_peak_bytes = self.estimated_peak_bytes;
                    terminal = Some(Record::Finished { summary });
                }
                Ok(Some(failed @ Record::Failed { .. })) => terminal = Some(failed),
                // Events are rare and matter: they wait for room rather than drop.
                Ok(Some(event @ Record::Event { .. })) => {
                    let _ = self.events.send(event).await;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(job = id, "worker pipe: {e}");
                    let _ = self.child.start_kill();
                    break;
                }
            }
        }
        let status = self.exit_status().await;
        drop(permit);
        let tail = stderr_tail.await.unwrap_or_default();
        tracing::info!(job = id, %status, "worker ended");
        let last = terminal.unwrap_or_else(|| crashed(&status, &tail));
        let _ = self.events.send(last).await;
    }

    /// How the worker ended, waiting one grace period before killing it.
    async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(ABANDON_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("could not be waited for ({e})"),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                "did not exit and was killed".to_owned()
            }
        }
    }
}

/// The failure reported for a worker that died without saying why.
fn crashed(status: &str, stderr_tail: &str) -> Record {
    let detail = if stderr_tail.trim().is_empty() { String::new() } else { format!(": {}", stderr_tail.trim()) };
    Record::Failed {
        error: JobError { code: ErrorCode::WorkerCrashed, message: format!("worker process {status}{detail}") },
    }
}
