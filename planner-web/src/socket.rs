//! `use_agent_socket`: owns the WebSocket to the agent, decodes with `shared::codec`, and
//! writes what arrives into `AgentState`.
//!
//! Runs outlive connections: a dropped connection is reopened (after 1, 2, 4… up to 10
//! seconds) and the watched run re-attached after its last record, so the charts go on
//! with no gap; the run's number is kept in the browser's local storage, so a reloaded
//! or reopened page finds the run in the agent's list and replays it from the start.

use leptos::prelude::*;
use shared::codec;
use shared::protocol::{ErrorCode, JobError, Message};
use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use crate::state::{AgentState, Connection, JobState, MAX_RECORDS};

/// Sends messages to the agent; cheap to copy into event handlers.
#[derive(Clone, Copy)]
pub struct AgentSocket {
    socket: StoredValue<Option<WebSocket>, LocalStorage>,
}

impl AgentSocket {
    pub fn send(&self, message: &Message) -> Result<(), String> {
        let bytes = codec::encode(message).map_err(|e| e.to_string())?;
        self.socket.with_value(|ws| match ws {
            Some(ws) if ws.ready_state() == WebSocket::OPEN => {
                ws.send_with_u8_array(&bytes).map_err(|_| "the agent connection refused the message".to_owned())
            }
            _ => Err("not connected to an agent".to_owned()),
        })
    }
}

/// The token the agent printed in the page's URL (`?token=...`).
fn token_from_location() -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    search.trim_start_matches('?').split('&').find_map(|kv| kv.strip_prefix("token=")).map(str::to_owned)
}

fn socket_url(token: &str) -> Option<String> {
    let location = web_sys::window()?.location();
    let scheme = if location.protocol().ok()? == "https:" { "wss" } else { "ws" };
    Some(format!("{scheme}://{}/ws?token={token}", location.host().ok()?))
}

/// Where the page keeps the number of the run it watches, per agent.
fn storage_key() -> Option<String> {
    Some(format!("headroom.run@{}", web_sys::window()?.location().host().ok()?))
}

fn remember_run(job: Option<shared::protocol::JobId>) {
    let (Some(key), Some(storage)) = (storage_key(), web_sys::window().and_then(|w| w.local_storage().ok().flatten()))
    else {
        return;
    };
    let _ = match job {
        Some(j) => storage.set_item(&key, &j.to_string()),
        None => storage.remove_item(&key),
    };
}

fn remembered_run() -> Option<shared::protocol::JobId> {
    let storage = web_sys::window()?.local_storage().ok()??;
    storage.get_item(&storage_key()?).ok()??.parse().ok()
}

fn apply(state: AgentState, message: Message) {
    match message {
        Message::Hello(hello) => state.hello.set(Some(hello)),
        Message::Accepted { job, estimate, device } => {
            remember_run(Some(job));
            state.last_seq.set(0);
            state.records.set(Vec::new());
            state.notice.set(None);
            state.estimated_peak_bytes.set(Some(estimate.peak_bytes.get()));
            state.job.set(JobState::Running { job, device, estimated_peak_bytes: estimate.peak_bytes.get() });
        }
        Message::Batch(record) => state.records.update(|r| {
            if r.len() < MAX_RECORDS {
                r.push(record);
            }
        }),
        Message::Finished { job, summary } => state.job.set(JobState::Finished { job, summary }),
        Message::Failed { job, error } => state.job.set(JobState::Failed { job: Some(job), error }),
        Message::Error { code, message } => {
            // A refused submission ends the "submitted" state; anything else (an unknown
            // job, a cancel that raced the end) is a notice beside the job's own state.
            if state.job.get_untracked() == JobState::Submitted {
                state.job.set(JobState::Failed { job: None, error: JobError { code, message } });
            } else if let (ErrorCode::UnknownJob, JobState::Running { job, .. }) = (code, state.job.get_untracked()) {
                // The run the page followed is gone from the agent (pruned, or another
                // agent answered): it will not report its end.
                state.job.set(JobState::Failed { job: Some(job), error: JobError { code, message } });
            } else {
                state.notice.set(Some(format!("the agent said ({code:?}): {message}")));
            }
        }
        Message::Event { step, event, .. } => match event {
            shared::protocol::JobEvent::LeakSuspected(w) => state.notice.set(Some(format!(
                "step {step}: allocated memory keeps rising, {} a step ({} an epoch){}",
                shared::Bytes(w.bytes_per_step),
                shared::Bytes(w.bytes_per_epoch),
                w.steps_to_capacity
                    .map(|s| format!("; at this rate it reaches capacity in {s} steps"))
                    .unwrap_or_default()
            ))),
            // Routine and frequent: the records show their effect on reserved memory.
            shared::protocol::JobEvent::CacheEmptied { .. } | shared::protocol::JobEvent::SurfaceTerm { .. } => {}
            shared::protocol::JobEvent::Validation { loss, peak_bytes, micro_batch, .. } => {
                state.notice.set(Some(format!(
                    "step {step}: validation loss {loss:.4} (micro-batch {micro_batch}, peak {})",
                    shared::Bytes(peak_bytes)
                )))
            }
            shared::protocol::JobEvent::CheckpointSaved { path, bytes, .. } => state
                .notice
                .set(Some(format!("step {step}: checkpoint saved to {path} ({})", shared::Bytes(bytes)))),
            shared::protocol::JobEvent::HostMemoryLow { workers, prefetch, bound, .. } => state.notice.set(Some(format!(
                "step {step}: host memory is short ({bound}); the loader now runs {workers} workers with {prefetch} batches each"
            ))),
            shared::protocol::JobEvent::Resumed { path } => {
                state.notice.set(Some(format!("resumed after step {step} from {path}")))
            }
            shared::protocol::JobEvent::LossScaleSkip { scale } => state.notice.set(Some(format!(
                "step {step}: fp16 gradients overflowed; the step was skipped and the loss scale lowered to {scale}"
            ))),
            shared::protocol::JobEvent::OomRecovered { micro_batch, accumulation, .. } => state.notice.set(Some(format!(
                "step {step} ran out of memory: redone as micro-batch {micro_batch} x {accumulation} accumulation (the same effective batch)"
            ))),
        },
        // The run's stored records: the page shows them as they come, once each.
        Message::Logged { job, seq, record } => {
            if seq > state.last_seq.get_untracked() {
                state.last_seq.set(seq);
                apply(state, record.into_message(job));
            }
        }
        Message::Runs { runs } => {
            // Resuming after a reload: the run, if the agent still has it, from its start.
            if let Some(job) = state.resume.get_untracked()
                && let Some(run) = runs.iter().find(|r| r.job == job)
            {
                state.records.set(Vec::new());
                state.last_seq.set(0);
                state.estimated_peak_bytes.set(Some(run.estimated_peak_bytes));
                state.job.set(JobState::Running {
                    job,
                    device: run.device.clone(),
                    estimated_peak_bytes: run.estimated_peak_bytes,
                });
            } else {
                state.resume.set(None);
            }
        }
        Message::Submit { .. } | Message::Cancel { .. } | Message::Attach { .. } | Message::ListRuns => {}
    }
}

/// Opens the socket for the lifetime of the page, reopening it when it drops.
pub fn use_agent_socket(state: AgentState) -> AgentSocket {
    let socket = StoredValue::new_local(None::<WebSocket>);
    let agent = AgentSocket { socket };
    state.resume.set(remembered_run());
    open(state, agent, 0);
    on_cleanup(move || {
        socket.update_value(|ws| {
            if let Some(ws) = ws.take() {
                ws.set_onclose(None);
                let _ = ws.close();
            }
        })
    });
    agent
}

/// Opens the WebSocket; `attempt` counts reconnects since the last open one.
fn open(state: AgentState, agent: AgentSocket, attempt: u32) {
    let socket = agent.socket;
    let Some(token) = token_from_location() else {
        state.connection.set(Connection::Closed("no token in the page address: open the URL the agent printed".into()));
        return;
    };
    let Some(url) = socket_url(&token) else {
        state.connection.set(Connection::Closed("cannot tell the agent's address from this page".into()));
        return;
    };
    let ws = match WebSocket::new(&url) {
        Ok(ws) => ws,
        Err(_) => {
            state.connection.set(Connection::Closed(format!("cannot open {url}")));
            return;
        }
    };
    ws.set_binary_type(BinaryType::Arraybuffer);

    // Whether this socket opened: a reconnect that got through starts the back-off anew.
    let opened = std::rc::Rc::new(std::cell::Cell::new(false));
    let was_opened = std::rc::Rc::clone(&opened);
    let on_open = Closure::<dyn FnMut()>::new(move || {
        was_opened.set(true);
        state.connection.set(Connection::Open)
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    on_open.forget();

    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
        let Ok(buffer) = event.data().dyn_into::<js_sys::ArrayBuffer>() else {
            return;
        };
        let bytes = js_sys::Uint8Array::new(&buffer).to_vec();
        match codec::decode(&bytes) {
            Ok(message) => {
                let hello = matches!(message, Message::Hello(_));
                let runs = matches!(message, Message::Runs { .. });
                apply(state, message);
                // After the hello: carry on with the watched run, or look for the one a
                // reloaded page watched.
                if hello {
                    if let JobState::Running { job, .. } = state.job.get_untracked() {
                        let _ = agent.send(&Message::Attach { job, after: state.last_seq.get_untracked() });
                    } else if state.resume.get_untracked().is_some() {
                        let _ = agent.send(&Message::ListRuns);
                    }
                }
                if runs && let Some(job) = state.resume.get_untracked() {
                    state.resume.set(None);
                    if matches!(state.job.get_untracked(), JobState::Running { job: j, .. } if j == job) {
                        let _ = agent.send(&Message::Attach { job, after: 0 });
                    }
                }
            }
            Err(e) => {
                apply(state, Message::Error { code: ErrorCode::Malformed, message: format!("from the agent: {e}") })
            }
        }
    });
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    on_message.forget();

    let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
        let reason = if event.reason().is_empty() {
            format!("connection closed (code {})", event.code())
        } else {
            format!("connection closed: {}", event.reason())
        };
        // A submission in flight has no answer coming: say so.
        if state.job.get_untracked() == JobState::Submitted {
            state.job.set(JobState::Failed {
                job: None,
                error: JobError { code: ErrorCode::Internal, message: format!("lost the agent: {reason}") },
            });
        }
        // The run goes on at the agent: reconnect and re-attach.
        let attempt = if opened.get() { 0 } else { attempt + 1 };
        let delay = 1000 * 2i32.pow(attempt.min(4)).min(10);
        state.connection.set(Connection::Closed(format!("{reason}; reconnecting in {} s", delay / 1000)));
        let retry = Closure::once_into_js(move || open(state, agent, attempt));
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(retry.unchecked_ref(), delay);
        }
    });
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    on_close.forget();
    socket.set_value(Some(ws));
}
