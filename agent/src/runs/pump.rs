//! Running runs: the dispatcher that starts queued runs as slots come free, and per
//! running job the pump that writes its records to the log and syncs them before handing
//! them to subscribers, stops it on cancel or past its time limit, and ends it.

use std::sync::Arc;
use std::time::Duration;

use shared::protocol::{ErrorCode, JobError, JobId, Record, RunState};
use tokio::sync::Notify;

use super::*;
use crate::jobs::{RunningJob, StartError};

impl Runs {
    /// Starts queued runs while slots are free; runs until the agent shuts down.
    pub async fn dispatch(self: Arc<Self>) {
        loop {
            // Taken off the queue and marked running in one step, so that a cancel from
            // now on reaches the job (its notification waits for the pump).
            let next = {
                let mut inner = self.lock();
                if inner.shutting_down {
                    return;
                }
                let job = if self.runner.free_slots() > 0 { inner.queue.pop_front() } else { None };
                job.and_then(|job| {
                    let e = inner.runs.get_mut(&job)?;
                    // A run put back after a lost race keeps its notification: a cancel
                    // sent meanwhile stops it as soon as it starts.
                    let cancel = Arc::clone(e.cancel.get_or_insert_with(|| Arc::new(Notify::new())));
                    e.info.state = RunState::Running;
                    Some((job, e.plan.clone(), e.info.estimated_peak_bytes, cancel))
                })
            };
            let Some((job, plan, estimate, cancel)) = next else {
                self.wake.notified().await;
                continue;
            };
            // A run's checkpoints go beside its records; its data comes from the agent's
            // data root. Neither path comes from the plan.
            let files = system::job::JobFiles {
                checkpoint_dir: Some(self.run_dir(job).join("checkpoints")),
                resume: None,
                data_root: self.data_root.clone(),
                weights: None,
            };
            match self.runner.start(job, plan, estimate, &files) {
                Ok(running) => {
                    self.store(job).await;
                    tracing::info!(run = job, "run started");
                    self.active.send_modify(|n| *n += 1);
                    tokio::spawn(Arc::clone(&self).pump(job, running, cancel));
                }
                Err(StartError::Busy { .. }) => {
                    // Raced a slot: back to the front of the queue.
                    {
                        let mut inner = self.lock();
                        if let Some(e) = inner.runs.get_mut(&job) {
                            e.info.state = RunState::Queued;
                        }
                        inner.queue.push_front(job);
                    }
                    self.wake.notified().await;
                }
                Err(e) => {
                    let error = JobError { code: ErrorCode::Internal, message: e.to_string() };
                    self.end_unstarted(job, RunState::Failed, error).await;
                }
            }
        }
    }

    /// Writes a running job's records to its log, then hands them to subscribers.
    async fn pump(self: Arc<Self>, job: JobId, mut running: RunningJob, cancel: Arc<Notify>) {
        let log = self.run_dir(job).join("records.log");
        let opened = tokio::task::spawn_blocking(move || runlog::Writer::open(&log)).await;
        let mut writer = match opened {
            Ok(Ok((w, _))) => Some(w),
            other => {
                tracing::error!(run = job, "cannot open the run's log: {other:?}");
                None
            }
        };
        let mut cancel_deadline: Option<tokio::time::Instant> = None;
        let mut killed = false;
        // Past `--max-job-seconds` the job is stopped as a cancel would stop it.
        let time_limit = tokio::time::sleep(Duration::from_secs(self.limits.max_job_seconds));
        tokio::pin!(time_limit);
        let mut over_time = false;
        let mut ended: Option<Ending> = None;
        while ended.is_none() {
            let first = tokio::select! {
                m = running.events.recv() => m,
                () = cancel.notified(), if cancel_deadline.is_none() => {
                    running.cancel();
                    cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                    continue;
                }
                () = &mut time_limit, if cancel_deadline.is_none() => {
                    tracing::warn!(run = job, "ran past --max-job-seconds; stopping it");
                    over_time = true;
                    running.cancel();
                    cancel_deadline = Some(tokio::time::Instant::now() + CANCEL_GRACE);
                    continue;
                }
                () = async {
                    match cancel_deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                }, if !killed => {
                    tracing::warn!(run = job, "did not stop within {CANCEL_GRACE:?} of cancel; killing its worker");
                    running.kill();
                    killed = true;
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_RECORDS {
                match running.events.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.relabel(&mut batch, over_time, killed);
            let Some(w) = writer.take() else { break };
            match write_batch(job, w, batch).await {
                Ok((w, range, batch)) => {
                    writer = Some(w);
                    ended = self.publish(job, range, batch);
                }
                Err(kept) => {
                    writer = kept;
                    break;
                }
            }
        }
        let (state, error, peak, seq, last) = match ended {
            Some((state, error, peak, seq, last)) => (state, error, peak, Some(seq), last),
            None => self.records_lost(job, &mut running, writer).await,
        };
        self.finish(job, state, error, peak, seq, last).await;
        drop(running);
        self.active.send_modify(|n| *n = n.saturating_sub(1));
        self.wake.notify_one();
        self.prune();
    }

    /// Why the agent stopped the job decides how it ended: a shutdown interrupts it, its
    /// time limit fails it, and a worker killed after a cancel was cancelled.
    fn relabel(&self, batch: &mut [Record], over_time: bool, killed: bool) {
        let stopped = [ErrorCode::Cancelled, ErrorCode::WorkerCrashed];
        if self.lock().shutting_down {
            relabel_end(batch, &stopped, ErrorCode::Interrupted, "the agent shut down while this run was running");
        }
        if over_time {
            let why = format!("stopped after {} s (--max-job-seconds)", self.limits.max_job_seconds);
            relabel_end(batch, &stopped, ErrorCode::Limit, &why);
        }
        if killed && !over_time {
            let why = format!("did not stop within {CANCEL_GRACE:?} of cancel and was killed");
            relabel_end(batch, &[ErrorCode::WorkerCrashed], ErrorCode::Cancelled, &why);
        }
    }

    /// Hands records now on disk to the run's subscribers, up to its end, which is
    /// returned.
    fn publish(&self, job: JobId, range: std::ops::RangeInclusive<u64>, batch: Vec<Record>) -> Option<Ending> {
        let live = {
            let mut inner = self.lock();
            inner.runs.get_mut(&job).map(|e| {
                e.info.records = *range.end();
                e.live.clone()
            })
        };
        for (seq, m) in range.zip(batch) {
            let end = match &m {
                Record::Finished { summary } => Some((RunState::Finished, None, Some(summary.peak_bytes))),
                Record::Failed { error } => Some((failed_state(error.code), Some(error.clone()), None)),
                Record::Batch(_) | Record::Event { .. } => None,
            };
            if let Some((state, error, peak)) = end {
                return Some((state, error, peak, seq, m));
            }
            if let Some(Some(tx)) = &live
                && tx.receiver_count() > 0
                && let Some(r) = LiveRecord::new(job, seq, m)
            {
                let _ = tx.send(r);
            }
        }
        None
    }

    /// The log failed (or the worker's channel closed early): stops the worker, waits
    /// until it has exited and freed its slot, and ends the run for its clients with a
    /// last record, written if the log takes it.
    async fn records_lost(
        &self,
        job: JobId,
        running: &mut RunningJob,
        writer: Option<runlog::Writer>,
    ) -> (RunState, Option<JobError>, Option<u64>, Option<u64>, Record) {
        running.kill();
        while running.events.recv().await.is_some() {}
        let error = JobError { code: ErrorCode::Internal, message: "the run's records could not be kept".into() };
        let last = Record::Failed { error: error.clone() };
        let next = self.lock().runs.get(&job).map_or(1, |e| e.info.records + 1);
        let seq = match writer {
            Some(mut w) => {
                let m = last.clone();
                match tokio::task::spawn_blocking(move || w.append(&[m])).await {
                    Ok(Ok(r)) => *r.end(),
                    _ => next,
                }
            }
            None => next,
        };
        (RunState::Failed, Some(error), None, Some(seq), last)
    }

    /// Ends a run that never started with one `Failed` record.
    pub(super) async fn end_unstarted(self: &Arc<Self>, job: JobId, state: RunState, error: JobError) {
        let log = self.run_dir(job).join("records.log");
        let message = Record::Failed { error: error.clone() };
        let m = message.clone();
        let written = tokio::task::spawn_blocking(move || -> Result<u64, runlog::LogError> {
            let (mut w, _) = runlog::Writer::open(&log)?;
            Ok(*w.append(&[m])?.end())
        })
        .await;
        let seq = match written {
            Ok(Ok(seq)) => Some(seq),
            other => {
                tracing::error!(run = job, "could not record the end of a run: {other:?}");
                None
            }
        };
        self.finish(job, state, Some(error), None, seq, message).await;
    }

    /// Marks a run ended, tells its subscribers and stores its state.
    pub(super) async fn finish(
        self: &Arc<Self>,
        job: JobId,
        state: RunState,
        error: Option<JobError>,
        peak: Option<u64>,
        seq: Option<u64>,
        last: Record,
    ) {
        {
            let mut inner = self.lock();
            let Some(e) = inner.runs.get_mut(&job) else { return };
            e.info.state = state;
            e.info.error = error;
            e.info.measured_peak_bytes = peak;
            e.info.ended_unix_ms = Some(now_ms());
            if let Some(seq) = seq {
                e.info.records = seq;
            }
            e.cancel = None;
            if let (Some(tx), Some(seq)) = (e.live.take(), seq)
                && let Some(r) = LiveRecord::new(job, seq, last)
            {
                let _ = tx.send(r);
            }
        }
        self.store(job).await;
    }
}

/// Gives a `Failed` record among `batch` whose code is one of `from` the code `to` and
/// the message `why`.
fn relabel_end(batch: &mut [Record], from: &[ErrorCode], to: ErrorCode, why: &str) {
    for m in batch {
        if let Record::Failed { error } = m
            && from.contains(&error.code)
        {
            error.code = to;
            error.message = why.to_owned();
        }
    }
}

/// What appending a batch gave: the writer, the records' numbers and the batch; or, when
/// the log failed, the writer if it survived (the run's last record may still go in).
type Written = Result<(runlog::Writer, std::ops::RangeInclusive<u64>, Vec<Record>), Option<runlog::Writer>>;

/// Appends `batch` to the run's log (synced) on the blocking pool.
async fn write_batch(job: JobId, mut w: runlog::Writer, batch: Vec<Record>) -> Written {
    match tokio::task::spawn_blocking(move || {
        let r = w.append(&batch);
        (w, r, batch)
    })
    .await
    {
        Ok((w, Ok(range), batch)) => Ok((w, range, batch)),
        Ok((w, Err(e), _)) => {
            tracing::error!(run = job, "could not write the run's records: {e}");
            Err(Some(w))
        }
        Err(e) => {
            tracing::error!(run = job, "log writer: {e}");
            Err(None)
        }
    }
}
