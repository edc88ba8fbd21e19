//! What a page knows of the run it watches and of a run it compares with, and the rules
//! by which an agent's answers change it: records taken once and in order, the end, the
//! events described. The planner holds a [`Watched`] in one signal per agent and applies
//! what its socket receives; the rules are here, pure, so that they are tested natively.

use crate::estimate::Estimate;
use crate::plan::Plan;
use crate::protocol::{BatchRecord, JobError, JobEvent, JobId, Record, RunInfo, Summary};

/// Batch records kept for the charts; later ones still update the status line. At one
/// record per micro-batch this is hours of a fast job, and about 10 MB of memory.
pub const MAX_RECORDS: usize = 100_000;

/// Events of the watched run kept for its list (the newest are shown).
pub const MAX_EVENTS: usize = 500;

/// Where the watched run stands.
#[derive(Clone, Debug, PartialEq)]
pub enum JobState {
    Idle,
    /// Sent and not yet answered. A connection lost before the answer sends the same
    /// submission again, with its key, once it is back: the agent answers with the run
    /// the first one became, or queues it if it never arrived.
    Submitted {
        plan: Box<Plan>,
        key: u64,
    },
    Running {
        job: JobId,
        device: String,
        estimated_peak_bytes: u64,
    },
    Finished {
        job: JobId,
        summary: Summary,
    },
    Failed {
        job: Option<JobId>,
        error: JobError,
    },
}

impl JobState {
    /// The run this state is about, once the agent has numbered it.
    pub fn job(&self) -> Option<JobId> {
        match self {
            JobState::Running { job, .. } | JobState::Finished { job, .. } => Some(*job),
            JobState::Failed { job, .. } => *job,
            JobState::Idle | JobState::Submitted { .. } => None,
        }
    }
}

/// The run a page watches: where it stands, what it measured so far and what it was
/// estimated to need.
#[derive(Clone, Debug, PartialEq)]
pub struct Watched {
    pub job: JobState,
    /// Its batch records, at most [`MAX_RECORDS`].
    pub records: Vec<BatchRecord>,
    /// The number of its last record taken: where a reconnect resumes.
    pub last_seq: u64,
    /// Its whole estimate (from `Accepted` or `Run`), and the estimated peak, which a
    /// run kept without its estimate still has.
    pub estimate: Option<Estimate>,
    pub estimated_peak_bytes: Option<u64>,
    /// The optimizer steps it runs (all epochs), for its progress; 0 when unknown.
    pub planned_steps: u64,
    /// Its events worth a line, oldest first, at most [`MAX_EVENTS`]: (step, text).
    pub events: Vec<(u64, String)>,
}

impl Default for Watched {
    fn default() -> Watched {
        Watched {
            job: JobState::Idle,
            records: Vec::new(),
            last_seq: 0,
            estimate: None,
            estimated_peak_bytes: None,
            planned_steps: 0,
            events: Vec::new(),
        }
    }
}

impl Watched {
    /// A submission sent and not yet answered; what was shown stays until the answer.
    pub fn submitted(&mut self, plan: Plan, key: u64) {
        self.planned_steps = plan.total_steps();
        self.job = JobState::Submitted { plan: Box::new(plan), key };
    }

    /// The submission became run `job` on `device`: watched from its first record, with
    /// the submitted plan's steps.
    pub fn accepted(&mut self, job: JobId, device: String, estimate: Estimate) {
        let peak = estimate.peak_bytes.get();
        self.start(job, device, peak, Some(estimate), self.planned_steps);
    }

    /// Watches a run the agent keeps (`info`, as `Run` describes it) from its first
    /// record.
    pub fn watch(&mut self, info: &RunInfo, estimate: Option<Estimate>) {
        self.start(info.job, info.device.clone(), info.estimated_peak_bytes, estimate, info.steps);
    }

    /// What was shown of another run goes.
    fn start(&mut self, job: JobId, device: String, peak: u64, estimate: Option<Estimate>, planned_steps: u64) {
        *self = Watched {
            job: JobState::Running { job, device, estimated_peak_bytes: peak },
            estimate,
            estimated_peak_bytes: Some(peak),
            planned_steps,
            ..Watched::default()
        };
    }

    /// The run the page follows, if it may still send records.
    pub fn live_job(&self) -> Option<JobId> {
        match self.job {
            JobState::Running { job, .. } => Some(job),
            _ => None,
        }
    }

    /// Whether record `seq` of run `job` is one the watched run has not taken yet.
    pub fn takes(&self, job: JobId, seq: u64) -> bool {
        let follows =
            matches!(self.job, JobState::Running { job: j, .. } | JobState::Finished { job: j, .. } if j == job);
        follows && seq > self.last_seq
    }

    /// Takes record `seq` of run `job` if it is the watched run's next: `None` when it
    /// is not (another run's, or one already taken), else whether it was the run's last.
    pub fn apply(&mut self, job: JobId, seq: u64, record: Record) -> Option<bool> {
        if !self.takes(job, seq) {
            return None;
        }
        self.last_seq = seq;
        let terminal = record.is_terminal();
        match record {
            Record::Batch(b) => {
                if self.records.len() < MAX_RECORDS {
                    self.records.push(b);
                }
            }
            Record::Event { step, event } => {
                if let Some(text) = describe(event) {
                    if self.events.len() == MAX_EVENTS {
                        self.events.remove(0);
                    }
                    self.events.push((step, text));
                }
            }
            Record::Finished { summary } => self.job = JobState::Finished { job, summary },
            Record::Failed { error } => self.job = JobState::Failed { job: Some(job), error },
        }
        Some(terminal)
    }
}

/// A second run shown beside the watched one: its records, fetched once it has ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Compared {
    pub job: JobId,
    pub name: String,
    pub records: Vec<BatchRecord>,
    pub last_seq: u64,
    /// Its records when it was chosen (it has ended): the last one's number, so that a
    /// run whose end could not be written still completes.
    pub records_total: u64,
    pub summary: Option<Summary>,
    pub error: Option<JobError>,
    /// Its last record has arrived.
    pub done: bool,
}

impl Compared {
    /// Run `job` (`name`), which has `records_total` records, before any has arrived.
    pub fn new(job: JobId, name: String, records_total: u64) -> Compared {
        Compared { job, name, records: Vec::new(), last_seq: 0, records_total, summary: None, error: None, done: false }
    }

    /// Takes its record `seq` (each once, in order); `true` when it was its last.
    pub fn apply(&mut self, seq: u64, record: Record) -> bool {
        if seq <= self.last_seq || self.done {
            return false;
        }
        self.last_seq = seq;
        match record {
            Record::Batch(b) if self.records.len() < MAX_RECORDS => self.records.push(b),
            Record::Batch(_) | Record::Event { .. } => {}
            Record::Finished { summary } => self.summary = Some(summary),
            Record::Failed { error } => self.error = Some(error),
        }
        self.done |=
            self.summary.is_some() || self.error.is_some() || (self.records_total > 0 && seq >= self.records_total);
        self.done
    }

    /// The agent no longer has it: the comparison ends with `error`.
    pub fn gone(&mut self, error: JobError) {
        self.error = Some(error);
        self.done = true;
    }
}

/// What an event of the watched run says, for its list; `None` for routine ones (their
/// effect is in the records).
pub fn describe(event: JobEvent) -> Option<String> {
    Some(match event {
        JobEvent::LeakSuspected(w) => format!(
            "allocated memory keeps rising, {} a step ({} an epoch){}",
            crate::Bytes(w.bytes_per_step),
            crate::Bytes(w.bytes_per_epoch),
            w.steps_to_capacity.map(|s| format!("; at this rate it reaches capacity in {s} steps")).unwrap_or_default()
        ),
        JobEvent::CacheEmptied { .. } | JobEvent::SurfaceTerm { .. } => return None,
        JobEvent::Validation { loss, peak_bytes, micro_batch, .. } => {
            format!("validation loss {loss:.4} (micro-batch {micro_batch}, peak {})", crate::Bytes(peak_bytes))
        }
        JobEvent::CheckpointSaved { path, bytes, .. } => {
            format!("checkpoint saved to {path} ({})", crate::Bytes(bytes))
        }
        JobEvent::HostMemoryLow { workers, prefetch, bound, .. } => format!(
            "host memory is short ({bound}); the loader now runs {workers} workers with {prefetch} batches each"
        ),
        JobEvent::Resumed { path } => format!("resumed from {path}"),
        JobEvent::LossScaleSkip { scale } => {
            format!("fp16 gradients overflowed; the step was skipped and the loss scale lowered to {scale}")
        }
        JobEvent::OomRecovered { micro_batch, accumulation, .. } => format!(
            "ran out of memory: redone as micro-batch {micro_batch} x {accumulation} accumulation (the same effective batch)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn batch(step: u64) -> Record {
        Record::Batch(BatchRecord {
            job: 7,
            step,
            epoch: 1,
            micro_batch: 1,
            loss: 1.0,
            allocated_bytes: 1,
            peak_bytes: 2,
            reserved_bytes: None,
            device_used_bytes: None,
            host_rss_bytes: 3,
            step_time_ms: 1.0,
            samples_per_sec: 1.0,
            learning_rate: 0.1,
        })
    }

    fn info(job: JobId) -> RunInfo {
        RunInfo {
            job,
            name: "w".into(),
            state: crate::protocol::RunState::Running,
            device: "cuda:0".into(),
            created_unix_ms: 1,
            ended_unix_ms: None,
            records: 0,
            steps: 40,
            estimated_peak_bytes: 5,
            measured_peak_bytes: None,
            error: None,
        }
    }

    fn failed() -> Record {
        Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: "stopped".into() } }
    }

    #[test]
    fn records_are_taken_once_in_order_for_the_watched_run_only() {
        let mut w = Watched::default();
        assert_eq!(w.apply(7, 1, batch(1)), None, "nothing is watched yet");
        w.submitted(Plan::example_mlp(), 9);
        assert_eq!(w.planned_steps, Plan::example_mlp().total_steps());
        assert_eq!(w.apply(7, 1, batch(1)), None, "not numbered yet");
        let estimate = crate::estimate(&Plan::example_mlp()).expect("estimate");
        let peak = estimate.peak_bytes.get();
        w.accepted(7, "cpu".into(), estimate);
        let steps = Plan::example_mlp().total_steps();
        assert_eq!((w.live_job(), w.estimated_peak_bytes, w.planned_steps), (Some(7), Some(peak), steps));
        assert_eq!(w.apply(7, 1, batch(1)), Some(false));
        assert_eq!(w.apply(7, 1, batch(1)), None, "a record sent again after a reconnect");
        assert_eq!(w.apply(8, 2, batch(2)), None, "another run's");
        assert_eq!(w.apply(7, 2, batch(2)), Some(false));
        let event = Record::Event { step: 2, event: JobEvent::Resumed { path: "ckpt".into() } };
        assert_eq!(w.apply(7, 3, event), Some(false));
        let routine = Record::Event { step: 2, event: JobEvent::CacheEmptied { released_bytes: 0, micro_seconds: 1 } };
        assert_eq!(w.apply(7, 4, routine), Some(false));
        assert_eq!(w.records.iter().map(|b| b.step).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(w.events, vec![(2, "resumed from ckpt".to_owned())]);
        assert_eq!(w.apply(7, 5, failed()), Some(true));
        assert!(matches!(&w.job, JobState::Failed { job: Some(7), error } if error.code == ErrorCode::Cancelled));
        assert_eq!((w.live_job(), w.last_seq), (None, 5));
        // Another run starts from nothing.
        w.watch(&info(8), None);
        assert!(w.records.is_empty() && w.events.is_empty() && w.last_seq == 0);
        assert_eq!((w.live_job(), w.estimated_peak_bytes, w.planned_steps), (Some(8), Some(5), 40));
    }

    #[test]
    fn records_and_events_stop_at_their_limits() {
        let mut w = Watched::default();
        w.watch(&info(7), None);
        for seq in 1..=MAX_RECORDS as u64 + 5 {
            w.apply(7, seq, batch(seq));
        }
        assert_eq!(w.records.len(), MAX_RECORDS);
        assert_eq!(w.last_seq, MAX_RECORDS as u64 + 5, "later records still count");
        for step in 0..MAX_EVENTS as u64 + 3 {
            let e = Record::Event { step, event: JobEvent::LossScaleSkip { scale: 2.0 } };
            w.apply(7, w.last_seq + 1, e);
        }
        assert_eq!(w.events.len(), MAX_EVENTS);
        assert_eq!(w.events[0].0, 3, "the oldest go first");
    }

    #[test]
    fn a_comparison_ends_with_its_last_record_or_when_its_run_is_gone() {
        let mut c = Compared::new(3, "w1".into(), 3);
        assert!(!c.apply(1, batch(1)));
        assert!(!c.apply(1, batch(1)), "each record once");
        assert!(!c.apply(2, batch(2)));
        // A run whose end was never written completes at its last record.
        assert!(c.apply(3, batch(3)));
        assert_eq!(c.records.len(), 3);
        assert!(!c.apply(4, batch(4)), "nothing after the end");
        let mut c = Compared::new(4, "w2".into(), 10);
        assert!(c.apply(1, failed()));
        assert!(c.error.is_some());
        let mut c = Compared::new(5, "w3".into(), 10);
        c.gone(JobError { code: ErrorCode::UnknownJob, message: "pruned".into() });
        assert!(c.done);
    }
}
