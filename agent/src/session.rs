//! One client's session: protocol messages in, run records out, until either side ends.
//!
//! A session submits runs, attaches to any run (its own, another client's, one from
//! before a restart) and cancels or lists them; runs belong to the agent (`crate::runs`),
//! so a session that ends leaves them running. An attached session gets the run's
//! records after the number it gave from the file, then live ones, each exactly once:
//! live records it already sent are skipped, and when it falls behind the live stream it
//! catches up from the file. A client that stops reading is dropped once a write has
//! waited [`WRITE_TIMEOUT`]; one that goes silent (no frame, not even a pong to the
//! agent's pings) for [`IDLE_TIMEOUT`] is closed; one that sends more messages a second
//! than its [`SessionLimits`] allow (`--max-messages-per-second`, bursts of twice that)
//! is refused and closed, and so is one that sends a message larger than
//! `--max-message-bytes`.

use std::sync::Arc;
use std::time::Duration;

use shared::codec::CodecError;
use shared::protocol::{AgentStatus, DeviceStatus, ErrorCode, Hello, JobId, ToAgent, ToClient};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::Origin;
use crate::connection::{Connection, ReadError};
use crate::runs::{LiveRecord, Logged, Runs};

/// A write that waits longer than this (the client stopped reading and every buffer on
/// the way is full) ends the session.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent pings this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A client heard from (any frame, pongs included) less recently than this is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// What one client's session may use; `serve` flags set them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SessionLimits {
    /// The largest message a client may send (at most the codec's 1 MiB).
    pub max_message_bytes: usize,
    /// Bytes the agent buffers for one client before a write waits for the socket
    /// (and a client that does not read is dropped after [`WRITE_TIMEOUT`]).
    pub write_buffer_bytes: usize,
    /// Messages a client may send a second, on average; bursts of twice that.
    pub messages_per_second: u32,
}

/// `--write-buffer-bytes` and `--max-messages-per-second` when not given.
pub const DEFAULT_WRITE_BUFFER_BYTES: u32 = 128 << 10;
pub const DEFAULT_MESSAGES_PER_SECOND: u32 = 50;

impl SessionLimits {
    /// tungstenite's settings for these limits: frames up to twice the message limit
    /// are read (so that the client learns why it is refused), larger ones end the
    /// connection; the write buffer holds at most one message past its size.
    pub fn websocket(&self) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        let mut c = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
        c.max_message_size = Some(2 * self.max_message_bytes);
        c.max_frame_size = Some(2 * self.max_message_bytes);
        c.write_buffer_size = self.write_buffer_bytes;
        c.max_write_buffer_size = self.write_buffer_bytes + 2 * shared::codec::MAX_FRAME_BYTES;
        c
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct State {
    pub tokens: crate::auth::Tokens,
    /// Slots for authenticated sessions (`--max-connections`).
    pub sessions: Arc<tokio::sync::Semaphore>,
    pub origins: Vec<Origin>,
    pub hello: Hello,
    /// What this machine's trainer can use, as the worker probe reported it at start:
    /// `auto` and the CPU threads are resolved with it, as the worker resolves them.
    pub machine: shared::machine::Machine,
    pub runs: Arc<Runs>,
    pub limits: crate::runs::Limits,
    pub session_limits: SessionLimits,
    /// How long a page connection may last (`--page-connection-seconds`).
    pub page_timeout: Duration,
    /// The planner's HTTP routes (`crate::http`).
    pub pages: axum::Router,
    /// Names a request's `Host` may give (`auth::host_allowed`), and the bound port.
    pub hosts: Vec<String>,
    pub port: u16,
}

/// Error text sent to a client is at most this long: what it quotes of the client's own
/// input is cut where it is made, and this bounds whatever else an error may carry.
const MAX_ERROR_BYTES: usize = 4_096;

fn error(code: ErrorCode, message: impl Into<String>) -> ToClient {
    let message = message.into();
    ToClient::Error { code, message: shared::units::clip(&message, MAX_ERROR_BYTES).into_owned() }
}

/// The run a session is attached to.
struct Watch {
    job: JobId,
    /// The last record sent.
    last: u64,
    /// Where reading its log goes on.
    cursor: crate::runlog::Cursor,
    /// Records are waiting in the file: the session reads them a page at a time,
    /// between its other work, before it follows the live stream again.
    behind: bool,
    live: Option<broadcast::Receiver<LiveRecord>>,
    /// When live records were last written.
    flushed: Instant,
}

enum Live {
    Record(LiveRecord),
    /// Fell behind the live stream, or it ended: read on from the file.
    CatchUp {
        ended: bool,
    },
}

async fn next_live(watch: &mut Option<Watch>) -> Live {
    match watch.as_mut().and_then(|w| w.live.as_mut()) {
        Some(rx) => match rx.recv().await {
            Ok(r) => Live::Record(r),
            Err(broadcast::error::RecvError::Lagged(_)) => Live::CatchUp { ended: false },
            Err(broadcast::error::RecvError::Closed) => Live::CatchUp { ended: true },
        },
        None => std::future::pending().await,
    }
}

/// A token bucket.
struct Rate {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(per_second: u32) -> Rate {
        let per_second = f64::from(per_second);
        Rate { per_second, tokens: 2.0 * per_second, at: Instant::now() }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(2.0 * self.per_second);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Writes within [`WRITE_TIMEOUT`]; `false` ends the session.
async fn send(conn: &mut Connection, message: &ToClient) -> bool {
    matches!(tokio::time::timeout(WRITE_TIMEOUT, conn.write(message)).await, Ok(Ok(())))
}

/// Sends `records` the watch has not sent yet, in one write; `false` ends the session.
async fn deliver(conn: &mut Connection, w: &mut Watch, records: Vec<Logged>) -> bool {
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        for (seq, record) in records {
            if seq <= w.last {
                continue;
            }
            let terminal = record.is_terminal();
            conn.feed(&ToClient::Logged { job: w.job, seq, record }).await?;
            w.last = seq;
            if terminal {
                w.live = None;
            }
        }
        conn.flush().await
    })
    .await;
    matches!(written, Ok(Ok(())))
}

/// Sends the next page of the watched run's file; `false` ends the session.
async fn catch_up(conn: &mut Connection, state: &State, w: &mut Watch) -> bool {
    match state.runs.read_page(w.job, w.cursor, w.last).await {
        Ok(page) => {
            w.cursor = page.cursor;
            w.behind = page.more;
            deliver(conn, w, page.records).await
        }
        Err(e) => {
            w.behind = false;
            send(conn, &error(e.code(), e.to_string())).await
        }
    }
}

/// Live records sent in one write, at most.
const LIVE_BATCH: usize = 256;
/// A session writes live records at most this often: what arrives in between goes in
/// the same write (a watcher sees records up to this much later; the agent makes one
/// write per client per window instead of one per record).
pub const LIVE_WINDOW: Duration = Duration::from_millis(20);

enum Sent {
    Done,
    /// The write failed or timed out: the session ends.
    Failed,
    /// A record is missing from the live stream (lagged, or not encodable): read on
    /// from the file.
    CatchUp,
}

/// Sends `first` and the live records already waiting behind it (up to [`LIVE_BATCH`])
/// in one write, skipping what was sent; each frame was encoded once for every client.
async fn send_live(conn: &mut Connection, w: &mut Watch, first: LiveRecord) -> Sent {
    tokio::time::sleep_until(w.flushed + LIVE_WINDOW).await;
    let mut catch_up = false;
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(r) = next.take() {
            if r.seq == w.last + 1 {
                conn.feed_frame(r.frame).await?;
                w.last = r.seq;
                if r.terminal {
                    w.live = None;
                    break;
                }
            } else if r.seq > w.last + 1 {
                catch_up = true;
                break;
            }
            n += 1;
            if n == LIVE_BATCH {
                break;
            }
            next = match w.live.as_mut().map(broadcast::Receiver::try_recv) {
                Some(Ok(r)) => Some(r),
                Some(Err(broadcast::error::TryRecvError::Lagged(_))) => {
                    catch_up = true;
                    None
                }
                Some(Err(broadcast::error::TryRecvError::Closed)) => {
                    w.live = None;
                    catch_up = true;
                    None
                }
                Some(Err(broadcast::error::TryRecvError::Empty)) | None => None,
            };
        }
        conn.flush().await
    })
    .await;
    w.flushed = Instant::now();
    match written {
        Ok(Ok(())) if catch_up => Sent::CatchUp,
        Ok(Ok(())) => Sent::Done,
        _ => Sent::Failed,
    }
}

/// Attaches to run `job` after record `after`; `false` ends the session.
async fn attach(conn: &mut Connection, state: &State, watch: &mut Option<Watch>, job: JobId, after: u64) -> bool {
    match state.runs.subscribe(job, after) {
        Ok(live) => {
            let cursor = crate::runlog::Cursor::START;
            let mut w = Watch { job, last: after, cursor, behind: true, live, flushed: Instant::now() };
            // The first page at once; the rest between the session's other work.
            let ok = catch_up(conn, state, &mut w).await;
            *watch = Some(w);
            ok
        }
        Err(e) => send(conn, &error(e.code(), e.to_string())).await,
    }
}

pub async fn run(mut conn: Connection, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    if !send(&mut conn, &ToClient::Hello(state.hello.clone())).await {
        return;
    }
    let mut watch: Option<Watch> = None;
    let mut rate = Rate::new(state.session_limits.messages_per_second);
    let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            inbound = conn.read() => {
                // A message going another way (a reply sent back, say) is answered and
                // the session goes on, as with any other request it cannot serve.
                let message = match inbound {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => break,
                    Err(ReadError::Codec(wrong @ CodecError::WrongDirection { .. })) => Err(wrong),
                    Err(ReadError::Transport(e)) if !matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
                        tracing::debug!("connection ended: {e}");
                        break;
                    }
                    Err(e) => {
                        tracing::info!("closing a connection: {e}");
                        let code = match &e {
                            ReadError::Codec(c) => c.code(),
                            ReadError::Text => ErrorCode::Unexpected,
                            ReadError::Transport(_) => ErrorCode::TooLarge,
                        };
                        let _ = send(&mut conn, &error(code, e.to_string())).await;
                        conn.close(e.close_code(), &e.to_string()).await;
                        break;
                    }
                };
                if !rate.allow() {
                    let why = format!(
                        "more than {} messages a second (--max-messages-per-second)",
                        state.session_limits.messages_per_second
                    );
                    let _ = send(&mut conn, &error(ErrorCode::RateLimited, why.clone())).await;
                    conn.close(CloseCode::Policy, &why).await;
                    break;
                }
                let ok = match message {
                    Err(wrong) => send(&mut conn, &error(wrong.code(), wrong.to_string())).await,
                    Ok(ToAgent::Submit { plan, force, key }) => match submit(&state, plan, force, key).await {
                        Ok((job, accepted)) => {
                            send(&mut conn, &accepted).await && attach(&mut conn, &state, &mut watch, job, 0).await
                        }
                        Err(refusal) => send(&mut conn, &refusal).await,
                    },
                    Ok(ToAgent::Attach { job, after }) => attach(&mut conn, &state, &mut watch, job, after).await,
                    Ok(ToAgent::Cancel { job }) => match state.runs.cancel(job).await {
                        Ok(()) => true,
                        Err(e) => send(&mut conn, &error(e.code(), e.to_string())).await,
                    },
                    Ok(ToAgent::ListRuns { before, limit }) => {
                        let (runs, more) = state.runs.page(before, limit);
                        send(&mut conn, &ToClient::Runs { runs, more }).await
                    }
                    Ok(ToAgent::GetRun { job }) => match state.runs.get(job) {
                        Ok((info, plan, estimate)) => {
                            let run = ToClient::Run { info, plan: Box::new(plan), estimate: estimate.map(Box::new) };
                            send(&mut conn, &run).await
                        }
                        Err(e) => send(&mut conn, &error(e.code(), e.to_string())).await,
                    },
                    Ok(ToAgent::Status) => send(&mut conn, &ToClient::AgentStatus(agent_status(&state))).await,
                };
                if !ok {
                    break;
                }
            },
            // Records waiting in the file, a page per turn of the loop.
            () = std::future::ready(()), if watch.as_ref().is_some_and(|w| w.behind) => {
                let Some(w) = watch.as_mut() else { continue };
                if !catch_up(&mut conn, &state, w).await {
                    tracing::info!("dropped a client that did not keep up");
                    break;
                }
            },
            live = next_live(&mut watch), if !watch.as_ref().is_some_and(|w| w.behind) => {
                let Some(w) = watch.as_mut() else { continue };
                let ok = match live {
                    Live::Record(r) => match send_live(&mut conn, w, r).await {
                        Sent::Done => true,
                        Sent::Failed => false,
                        // A record that did not come live: the file has every one.
                        Sent::CatchUp => {
                            w.behind = true;
                            true
                        }
                    },
                    Live::CatchUp { ended } => {
                        if ended {
                            w.live = None;
                        }
                        w.behind = true;
                        true
                    }
                };
                if !ok {
                    tracing::info!("dropped a client that did not keep up");
                    break;
                }
            },
            _ = ping.tick() => {
                if conn.heard().elapsed() > IDLE_TIMEOUT {
                    conn.close(CloseCode::Away, "idle: no frame for a minute").await;
                    break;
                }
                if !matches!(tokio::time::timeout(WRITE_TIMEOUT, conn.ping()).await, Ok(Ok(()))) {
                    break;
                }
            },
            _ = shutdown.changed() => {
                conn.close(CloseCode::Away, "agent shutting down").await;
                break;
            }
        }
    }
}

/// Validates and estimates a submitted plan and queues it as a run: `(run, Accepted)`,
/// or the refusal to send.
async fn submit(
    state: &State,
    plan: shared::Plan,
    force: bool,
    key: Option<u64>,
) -> Result<(JobId, ToClient), Box<ToClient>> {
    let steps = plan.total_steps();
    if steps > state.limits.max_job_steps {
        let max = state.limits.max_job_steps;
        return Err(Box::new(error(
            ErrorCode::Limit,
            format!("{steps} steps: this agent runs at most {max} (--max-job-steps)"),
        )));
    }
    // A key names the plan as the client sent it, before anything is resolved here.
    let submission = match key.map(|k| crate::runs::Submission::of(k, &plan)).transpose() {
        Ok(s) => s,
        Err(e) => return Err(Box::new(error(e.code(), e.to_string()))),
    };
    let mut plan = plan;
    // Resolve `auto` here, by the worker's rule, so the client learns the device before
    // the first batch; estimate for it: a GPU's allocator and context, or the CPU's
    // kernels.
    let (runs_on, target) = match crate::devices::target_for(&mut plan, &state.machine, &state.hello.devices) {
        Ok(t) => t,
        Err(e) => return Err(Box::new(error(ErrorCode::InvalidPlan, format!("{e:#}")))),
    };
    let device = runs_on.id();
    // The job runs in this agent's trainer: the estimate streamed next to it is the
    // trainer's.
    let plan = state.machine.as_run_here(&plan);
    let estimate = match shared::estimate::estimate_for(&plan, target) {
        Ok(e) => e,
        Err(e) => return Err(Box::new(error(ErrorCode::InvalidPlan, e.to_string()))),
    };
    // A run that cannot fit is refused unless the client insists.
    let total = state.hello.devices.iter().find(|d| d.id == device).map_or(u64::MAX, |d| d.total_memory_bytes);
    let capacity = plan.memory_cap(total).map_or(total, |l| l.min(total));
    let peak = estimate.peak_bytes.get();
    if peak > capacity && !force {
        return Err(Box::new(error(
            ErrorCode::Limit,
            format!(
                "the estimate, {}, exceeds {device}'s {} (or the plan's memory limit); submit with force to run it anyway",
                shared::Bytes(peak),
                shared::Bytes(capacity)
            ),
        )));
    }
    match state.runs.submit(plan, device, &estimate, submission).await {
        Ok(s) => {
            if s.again {
                tracing::info!(job = s.job, "a submission sent again: answered with its run");
            } else {
                tracing::info!(job = s.job, device = %s.device, "run accepted");
            }
            Ok((s.job, ToClient::Accepted { job: s.job, estimate: s.estimate, device: s.device }))
        }
        Err(e) => Err(Box::new(error(e.code(), e.to_string()))),
    }
}

/// The devices' free memory and the queue, now. Reading NVML or `/proc/meminfo` takes
/// microseconds, and the session's rate limit bounds how often a client asks.
fn agent_status(state: &State) -> AgentStatus {
    let (queued, running) = state.runs.queue();
    let devices = state
        .hello
        .devices
        .iter()
        .map(|d| DeviceStatus {
            id: d.id.clone(),
            total_memory_bytes: d.total_memory_bytes,
            free_memory_bytes: crate::devices::free_memory_bytes(d),
            running: running.iter().filter(|(_, on)| *on == d.id).map(|(j, _)| *j).collect(),
        })
        .collect();
    AgentStatus { devices, queued, max_queued: u32::try_from(state.limits.max_queued).unwrap_or(u32::MAX) }
}
