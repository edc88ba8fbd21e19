//! The wire protocol: the only types that cross between planner, agent and worker.
//!
//! Changing any type here changes the bytes on the wire: bump `PROTOCOL_VERSION` and
//! update the fixed byte vectors in the codec tests.

use serde::{Deserialize, Serialize};

use crate::estimate::{Estimate, Phase};
use crate::plan::Plan;

pub const PROTOCOL_VERSION: u16 = 19;

pub type JobId = u64;

/// The most runs one `Runs` page holds, whatever the client asks for.
pub const MAX_RUNS_PER_PAGE: u32 = 100;

/// The longest error message a `RunInfo` carries (the run's own records keep the whole
/// message); with [`MAX_RUNS_PER_PAGE`] this keeps a page far below the codec's limit.
pub const MAX_RUN_ERROR_CHARS: usize = 1000;

/// What a client asks of an agent (client → agent, over the WebSocket).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// One message is built, sent and dropped at a time: boxing the large variants would add
// an indirection at every call site for no memory saved.
#[allow(clippy::large_enum_variant)]
pub enum ToAgent {
    /// Queue a run of `plan`. The agent answers `Accepted` (or an `Error`), then sends
    /// the run's records as `Logged`: the session is attached to the new run (a session
    /// follows one run at a time: the last it submitted or attached to).
    Submit {
        plan: Plan,
        /// Run it even when its estimate exceeds the device's memory (or the plan's own
        /// `memory_limit_bytes`), which the agent otherwise refuses.
        force: bool,
        /// Makes sending it again safe: a client that lost its connection before the
        /// `Accepted` sends the same `Submit` again, and a kept run already submitted with
        /// this key (and this plan) is answered with its `Accepted` and attached to,
        /// instead of a second run starting. Chosen at random by the client, one per
        /// submission; the same key with another plan is refused.
        key: Option<u64>,
    },
    /// Stop run `job` (queued or running); its last record says `Cancelled`.
    Cancel { job: JobId },
    /// Send run `job`'s records after `after` (0: from the start), then its live ones;
    /// what a client that reconnects, or a second one, sends.
    Attach { job: JobId, after: u64 },
    /// A page of the runs this agent keeps, newest first: those numbered below `before`
    /// (`None`: from the newest), at most `limit` of them (and never more than
    /// [`MAX_RUNS_PER_PAGE`]).
    ListRuns { before: Option<JobId>, limit: u32 },
    /// One run's plan and where it stands (answered with `Run`).
    GetRun { job: JobId },
    /// The agent's devices, their free memory and its queue now (answered with
    /// `AgentStatus`).
    Status,
}

/// What an agent tells a client (agent → client, over the WebSocket). `Hello` comes
/// first on every connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// One message is built, sent and dropped at a time: boxing the large variants would add
// an indirection at every call site for no memory saved.
#[allow(clippy::large_enum_variant)]
pub enum ToClient {
    Hello(Hello),
    /// A submitted run was queued as `job` on `device`, with this estimate.
    Accepted {
        job: JobId,
        estimate: Estimate,
        device: String,
    },
    /// Record `seq` of run `job` (numbered from 1 with no gaps), as the agent stored it.
    Logged {
        job: JobId,
        seq: u64,
        record: Record,
    },
    /// The page `ListRuns` asked for, newest first; `more` when older runs are left (ask
    /// again with `before` the last one's number).
    Runs {
        runs: Vec<RunInfo>,
        more: bool,
    },
    /// Run `info.job`, the plan it runs as the agent resolved it, and the estimate it was
    /// accepted with (for its device and this agent's trainer).
    Run {
        info: RunInfo,
        plan: Box<Plan>,
        estimate: Option<Box<Estimate>>,
    },
    AgentStatus(AgentStatus),
    /// A problem with the last message the client sent, or with what it asked.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// What an agent tells its worker process (agent → worker, over the worker's stdin).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// One message is built, sent and dropped at a time: boxing the large variants would add
// an indirection at every call site for no memory saved.
#[allow(clippy::large_enum_variant)]
pub enum ToWorker {
    /// Train `plan` (validated and resolved by the agent); sent once, first. The job's
    /// number and files are on the worker's command line.
    Start { plan: Plan },
    /// Stop at the next micro-batch and end with `Failed{Cancelled}`.
    Cancel,
}

/// Which way a message goes: a frame says it (see `codec`), so that a message sent the
/// wrong way is refused by name instead of being misread as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ToAgent,
    ToClient,
    ToWorker,
    /// A worker's records to its agent, and a run's records as the agent stores them.
    FromWorker,
}

impl Direction {
    /// The byte a frame carries for it.
    pub const fn tag(self) -> u8 {
        match self {
            Direction::ToAgent => 1,
            Direction::ToClient => 2,
            Direction::ToWorker => 3,
            Direction::FromWorker => 4,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Direction> {
        [Direction::ToAgent, Direction::ToClient, Direction::ToWorker, Direction::FromWorker]
            .into_iter()
            .find(|d| d.tag() == tag)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Direction::ToAgent => "client-to-agent",
            Direction::ToClient => "agent-to-client",
            Direction::ToWorker => "agent-to-worker",
            Direction::FromWorker => "worker-to-agent",
        }
    }
}

/// A type that crosses an edge as a frame: the four message types, one per direction.
pub trait Wire: Serialize + serde::de::DeserializeOwned {
    const DIRECTION: Direction;
}

impl Wire for ToAgent {
    const DIRECTION: Direction = Direction::ToAgent;
}

impl Wire for ToClient {
    const DIRECTION: Direction = Direction::ToClient;
}

impl Wire for ToWorker {
    const DIRECTION: Direction = Direction::ToWorker;
}

impl Wire for Record {
    const DIRECTION: Direction = Direction::FromWorker;
}

/// An agent's devices and queue at one moment: what a fleet view polls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub devices: Vec<DeviceStatus>,
    /// Runs waiting for a slot, first to start first.
    pub queued: Vec<JobId>,
    /// The most runs the queue takes (`--max-queued`).
    pub max_queued: u32,
}

/// One device of an agent now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// `cpu` or `cuda:N`, as in `Hello`.
    pub id: String,
    pub total_memory_bytes: u64,
    /// What NVML says is free on a GPU (every process counted), or the kernel's
    /// `MemAvailable` for the CPU; `None` where neither can be read.
    pub free_memory_bytes: Option<u64>,
    /// The runs on this device now.
    pub running: Vec<JobId>,
}

/// What a worker reports, and what a run's stored records hold: a job's measurements,
/// events and end (worker → agent over the pipe; agent → client inside `Logged`, which
/// says the job and the record's number).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    Batch(BatchRecord),
    /// Something that happened in a running job, after optimizer step `step`.
    Event {
        step: u64,
        event: JobEvent,
    },
    Finished {
        summary: Summary,
    },
    Failed {
        error: JobError,
    },
}

impl Record {
    /// Whether it ends the run.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Record::Finished { .. } | Record::Failed { .. })
    }
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Waiting for a free slot (`--max-jobs`).
    Queued,
    Running,
    Finished,
    Failed,
    Cancelled,
    /// The agent stopped (or was killed) while it ran.
    Interrupted,
}

/// A run as `ListRuns` reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub job: JobId,
    /// The plan's name.
    pub name: String,
    pub state: RunState,
    pub device: String,
    pub created_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// Records stored so far (the last one's `seq`).
    pub records: u64,
    /// The optimizer steps the plan asks for (all epochs): with the records' steps, the
    /// run's progress.
    #[serde(default)]
    pub steps: u64,
    pub estimated_peak_bytes: u64,
    /// The summary's measured peak, once finished.
    pub measured_peak_bytes: Option<u64>,
    /// How it failed, was cancelled or interrupted.
    pub error: Option<JobError>,
}

/// What a running job reports besides its batch records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobEvent {
    /// Step-end allocated memory keeps rising (`shared::leak`).
    LeakSuspected(crate::leak::LeakWarning),
    /// The step ran out of memory; its tensors were freed and it is redone with this
    /// micro-batch and accumulation (the same effective batch).
    OomRecovered {
        micro_batch: u64,
        accumulation: u64,
        /// Tensor memory live when the allocation failed, and libtorch's message.
        allocated_bytes: u64,
        message: String,
    },
    /// fp16 gradients held inf or NaN: the optimizer step was skipped and the loss scale
    /// lowered to `scale`.
    LossScaleSkip { scale: f64 },
    /// `empty_cache()` ran: what it gave back to the driver and what it cost.
    CacheEmptied {
        /// Reserved bytes before minus after (0 on the CPU, which caches nothing).
        released_bytes: u64,
        micro_seconds: u64,
    },
    /// A validation pass after this step: its mean loss, its own peak (apart from the
    /// step's) and its time.
    Validation { batches: u64, micro_batch: u64, loss: f64, peak_bytes: u64, micro_seconds: u64 },
    /// A checkpoint was written (weights, optimizer state, step, loss scale).
    CheckpointSaved { path: String, bytes: u64, micro_seconds: u64 },
    /// The job continues from a checkpoint saved after this event's step.
    Resumed { path: String },
    /// Host memory ran low: the loader now runs `workers` threads keeping `prefetch`
    /// batches each. `bound` says what was close: the plan's `host_memory_limit`, the
    /// cgroup's limit or the machine's available memory.
    HostMemoryLow { workers: u64, prefetch: u64, rss_bytes: u64, headroom_bytes: u64, bound: String },
    /// W4's surface term (`distance_loss_every`) on a micro-batch: its value (weighted,
    /// as added to the loss), the host memory its distance maps took and the time the
    /// CPU spent making them.
    SurfaceTerm { value: f64, host_bytes: u64, micro_seconds: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    pub devices: Vec<DeviceInfo>,
    pub capabilities: Capabilities,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda:N`.
    pub id: String,
    pub name: String,
    pub total_memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub cuda: bool,
    pub nvml: bool,
    /// The instruction set oneDNN dispatches its CPU kernels on here (`None`: unknown).
    pub cpu_isa: Option<crate::isa::CpuIsa>,
    /// Jobs this agent runs at once; more are refused with `ErrorCode::Busy`.
    pub max_concurrent_jobs: u32,
}

/// One micro-batch of a running job, as measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub job: JobId,
    /// Optimizer step, from 1.
    pub step: u64,
    /// Epoch, from 1.
    pub epoch: u64,
    /// Micro-batch within the step, from 1 to `accumulation`.
    pub micro_batch: u64,
    /// The micro-batch's loss, before division by the accumulation steps.
    pub loss: f64,
    /// Tensor memory live at the end of the micro-batch.
    pub allocated_bytes: u64,
    /// Highest tensor memory during this micro-batch (the optimizer step included on the
    /// last micro-batch of a step).
    pub peak_bytes: u64,
    /// Memory the caching allocator holds from the driver; `None` on the CPU.
    pub reserved_bytes: Option<u64>,
    /// Device memory in use as NVML reports it (all processes); `None` without NVML.
    pub device_used_bytes: Option<u64>,
    /// Resident set size of the worker process.
    pub host_rss_bytes: u64,
    pub step_time_ms: f64,
    pub samples_per_sec: f64,
    /// The learning rate of this micro-batch's optimizer step.
    pub learning_rate: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub steps: u64,
    pub micro_batches: u64,
    pub first_loss: f64,
    pub final_loss: f64,
    /// Highest tensor memory over the whole run.
    pub peak_bytes: u64,
    pub estimated_peak_bytes: u64,
    pub peak_reserved_bytes: Option<u64>,
    pub peak_host_rss_bytes: u64,
    pub wall_time_ms: f64,
    /// Batch records not sent to a client that could not keep up; training never waits.
    pub dropped_records: u64,
    /// Highest tensor memory per phase of the last full step, measured.
    pub phase_peaks: Vec<(Phase, u64)>,
}

impl Summary {
    /// How far the estimate was from the measured peak, in percent of the measured peak
    /// (negative: the estimate was low).
    pub fn estimate_error_pct(&self) -> f64 {
        100.0 * (self.estimated_peak_bytes as f64 - self.peak_bytes as f64) / self.peak_bytes.max(1) as f64
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// Bytes that do not decode as a message.
    Malformed,
    /// A message larger than the codec's limit.
    TooLarge,
    /// A message that is valid but not expected here: one going another way (a reply
    /// sent to an agent), a text frame, a cancel of a run that has ended.
    Unexpected,
    InvalidPlan,
    /// The agent already runs as many jobs as it allows.
    Busy,
    UnknownJob,
    OutOfMemory,
    Cancelled,
    /// libtorch raised an error other than out-of-memory.
    Torch,
    /// The worker process died without reporting (a crash inside libtorch, a kill).
    WorkerCrashed,
    Internal,
    /// The job stopped before the host ran out of memory (the kernel's OOM killer would
    /// have ended it), with the loader already at its lowest.
    HostMemory,
    /// The agent stopped while the run was running.
    Interrupted,
    /// A client sent messages faster than the agent's limit.
    RateLimited,
    /// The job ran past the agent's limit on duration or steps.
    Limit,
}
