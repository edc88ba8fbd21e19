//! `use_agent_socket`: owns the WebSocket to the agent, decodes with `shared::codec`, and
//! writes what arrives into `AgentState`.

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

fn apply(state: AgentState, message: Message) {
    match message {
        Message::Hello(hello) => state.hello.set(Some(hello)),
        Message::Accepted { job, estimate, device } => {
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
        // The run's stored records: the page shows them as they come.
        Message::Logged { job, record, .. } => apply(state, record.into_message(job)),
        Message::Submit { .. } | Message::Cancel { .. } | Message::Attach { .. } | Message::ListRuns => {}
        Message::Runs { .. } => {}
    }
}

/// Opens the socket once, for the lifetime of the page.
pub fn use_agent_socket(state: AgentState) -> AgentSocket {
    let socket = StoredValue::new_local(None::<WebSocket>);
    let Some(token) = token_from_location() else {
        state.connection.set(Connection::Closed("no token in the page address: open the URL the agent printed".into()));
        return AgentSocket { socket };
    };
    let Some(url) = socket_url(&token) else {
        state.connection.set(Connection::Closed("cannot tell the agent's address from this page".into()));
        return AgentSocket { socket };
    };
    let ws = match WebSocket::new(&url) {
        Ok(ws) => ws,
        Err(_) => {
            state.connection.set(Connection::Closed(format!("cannot open {url}")));
            return AgentSocket { socket };
        }
    };
    ws.set_binary_type(BinaryType::Arraybuffer);

    let on_open = Closure::<dyn FnMut()>::new(move || state.connection.set(Connection::Open));
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    on_open.forget();

    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
        let Ok(buffer) = event.data().dyn_into::<js_sys::ArrayBuffer>() else {
            return;
        };
        let bytes = js_sys::Uint8Array::new(&buffer).to_vec();
        match codec::decode(&bytes) {
            Ok(message) => apply(state, message),
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
        // A job cannot report its end over a closed socket: say so instead of
        // showing it as running forever.
        if let JobState::Running { job, .. } = state.job.get_untracked() {
            state.job.set(JobState::Failed {
                job: Some(job),
                error: JobError { code: ErrorCode::Internal, message: format!("lost the agent: {reason}") },
            });
        } else if state.job.get_untracked() == JobState::Submitted {
            state.job.set(JobState::Failed {
                job: None,
                error: JobError { code: ErrorCode::Internal, message: format!("lost the agent: {reason}") },
            });
        }
        state.connection.set(Connection::Closed(reason));
    });
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    on_close.forget();

    socket.set_value(Some(ws));
    on_cleanup(move || {
        socket.with_value(|ws| {
            if let Some(ws) = ws {
                let _ = ws.close();
            }
        })
    });
    AgentSocket { socket }
}
