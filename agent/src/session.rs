//! One client's session: protocol messages in, job events out, until either side ends.

use std::path::PathBuf;
use std::sync::Arc;

use shared::protocol::{ErrorCode, Hello, Message};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::Origin;
use crate::connection::{Connection, ReadError};
use crate::jobs::{JobRunner, RunningJob, StartError};

async fn next_event(job: &mut Option<RunningJob>) -> Option<Message> {
    match job {
        Some(job) => job.events.recv().await,
        None => std::future::pending().await,
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
    pub runner: JobRunner,
    pub web_dir: Option<PathBuf>,
    /// Names a request's `Host` may give (`auth::host_allowed`), and the bound port.
    pub hosts: Vec<String>,
    pub port: u16,
}

fn error(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error { code, message: message.into() }
}

pub async fn run(mut conn: Connection, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    if conn.write(&Message::Hello(state.hello.clone())).await.is_err() {
        return;
    }
    // Dropping the job (client gone) closes the worker's stdin, which stops it.
    let mut job: Option<RunningJob> = None;
    loop {
        tokio::select! {
            inbound = conn.read() => match inbound {
                Ok(Some(Message::Submit { plan })) => {
                    let reply = submit(&state, &mut job, plan);
                    if conn.write(&reply).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Message::Cancel { job: id })) => match &job {
                    Some(running) if running.id == id => running.cancel(),
                    _ => {
                        if conn.write(&error(ErrorCode::UnknownJob, format!("no running job {id} on this connection"))).await.is_err() {
                            break;
                        }
                    }
                },
                Ok(Some(other)) => {
                    let msg = format!("an agent does not accept {} messages", variant_name(&other));
                    if conn.write(&error(ErrorCode::Unexpected, msg)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
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
                    let _ = conn.write(&error(code, e.to_string())).await;
                    conn.close(e.close_code(), &e.to_string()).await;
                    break;
                }
            },
            event = next_event(&mut job) => {
                let Some(event) = event else { job = None; continue };
                let terminal = matches!(event, Message::Finished { .. } | Message::Failed { .. });
                if terminal {
                    job = None;
                }
                if conn.write(&event).await.is_err() {
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

fn submit(state: &State, job: &mut Option<RunningJob>, plan: shared::Plan) -> Message {
    if job.is_some() {
        return error(ErrorCode::Busy, "this connection already runs a job; cancel it or wait for it to finish");
    }
    let mut plan = plan;
    // Resolve `auto` here, so the client learns the device before the first batch.
    if plan.device == shared::plan::DeviceChoice::Auto {
        plan.device = if state.hello.capabilities.cuda {
            shared::plan::DeviceChoice::Cuda(0)
        } else {
            shared::plan::DeviceChoice::Cpu
        };
    }
    let device = match plan.device {
        shared::plan::DeviceChoice::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_owned(),
    };
    // Estimate for the device the job will run on: a GPU's allocator and context, or
    // the CPU's kernels.
    let target = match state.hello.devices.iter().find(|d| d.id == device) {
        Some(d) if device.starts_with("cuda") => {
            let gpu = crate::probe::gpu_for(&d.name, d.total_memory_bytes);
            plan.resolve_memory_fraction(gpu.memory_bytes);
            shared::estimate::Target::Cuda(*gpu)
        }
        _ => shared::estimate::Target::Cpu,
    };
    // The job runs in this agent's trainer: the estimate streamed next to it is the
    // trainer's.
    let plan = crate::train::as_run_here(&plan);
    let estimate = match shared::estimate::estimate_for(&plan, target) {
        Ok(e) => e,
        Err(e) => return error(ErrorCode::InvalidPlan, e.to_string()),
    };
    match state.runner.start(plan, estimate.peak_bytes.get(), &Default::default()) {
        Ok(running) => {
            let id = running.id;
            tracing::info!(job = id, %device, "job accepted");
            *job = Some(running);
            Message::Accepted { job: id, estimate, device }
        }
        Err(e @ StartError::Busy { .. }) => error(ErrorCode::Busy, e.to_string()),
        Err(e) => error(ErrorCode::Internal, e.to_string()),
    }
}

fn variant_name(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Submit { .. } => "Submit",
        Message::Accepted { .. } => "Accepted",
        Message::Batch(_) => "Batch",
        Message::Finished { .. } => "Finished",
        Message::Failed { .. } => "Failed",
        Message::Cancel { .. } => "Cancel",
        Message::Error { .. } => "Error",
        Message::Event { .. } => "Event",
    }
}
