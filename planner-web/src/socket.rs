//! One agent's WebSocket: opens it, decodes with `shared::codec`, and writes what
//! arrives into that agent's `AgentState`.
//!
//! Runs outlive connections: a dropped connection is reopened (after 1, 2, 4… up to 10
//! seconds) and the watched run re-attached after its last record, so the charts go on
//! with no gap; the run's number is kept in the browser's local storage per agent, so a
//! reloaded or reopened page asks the agent for that run and replays it from the start.
//!
//! A session at the agent follows one run at a time. Comparing with a second run
//! attaches to it (it has ended, so its records come at once), then re-attaches to the
//! watched run after the last record the page has: the file fills the pause.

use leptos::prelude::*;
use shared::codec;
use shared::estimate::Estimate;
use shared::plan::Plan;
use shared::protocol::{ErrorCode, Hello, JobError, JobId, Record, RunInfo, ToAgent, ToClient};
use wasm_bindgen::JsCast;
use wasm_bindgen::closure::Closure;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use crate::state::{AgentState, Compared, Connection, HISTORY_PAGE, JobState, RunWant};
use shared::fleet::AgentAddress;

/// Failed reconnects (1 + 2 + 4 s of waiting) after which a submission the agent has not
/// answered stops waiting: the page says it may have been queued, and Run is free again.
const MAX_SUBMIT_RECONNECTS: u32 = 3;

/// An open (or closing) WebSocket with the handlers it calls. Dropped, it detaches
/// them and lets them go, so that a page reconnecting all day keeps no dead handlers.
struct Live {
    ws: WebSocket,
    _on_open: Closure<dyn FnMut()>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
    }
}

/// Sends messages to one agent; cheap to copy into event handlers.
#[derive(Clone, Copy)]
pub struct AgentSocket {
    /// The current socket; replaced (the old one dropped) by the next reconnect, which
    /// runs from a timer, never from one of the old socket's own handlers.
    socket: StoredValue<Option<Live>, LocalStorage>,
    /// Set when the agent is removed from the page: no more reconnects.
    closed: StoredValue<bool>,
}

impl AgentSocket {
    pub fn send(&self, message: &ToAgent) -> Result<(), String> {
        let bytes = codec::encode(message).map_err(|e| e.to_string())?;
        self.socket.with_value(|live| match live.as_ref().map(|l| &l.ws) {
            Some(ws) if ws.ready_state() == WebSocket::OPEN => {
                ws.send_with_u8_array(&bytes).map_err(|_| "the agent connection refused the message".to_owned())
            }
            _ => Err("not connected to this agent".to_owned()),
        })
    }

    /// Closes the socket for good.
    pub fn close(&self) {
        self.closed.set_value(true);
        self.socket.update_value(|live| {
            if let Some(live) = live.take() {
                // Detached first (as `live` drops), so no reconnect follows.
                let ws = live.ws.clone();
                drop(live);
                let _ = ws.close();
            }
        });
    }

    /// Submits `plan` as a new run with a fresh key, kept (in local storage too) until
    /// the agent answers; the session will follow the new run, so a comparison still
    /// being fetched ends.
    pub fn submit(&self, label: &str, state: AgentState, plan: Plan) -> Result<(), String> {
        if state.compare.with_untracked(|c| c.as_ref().is_some_and(|c| !c.done)) {
            state.compare.set(None);
        }
        let key = submission_key()?;
        self.send(&ToAgent::Submit { plan: plan.clone(), force: false, key: Some(key) })?;
        remember_submission(label, Some((&plan, key)));
        state.watched.update(|w| w.submitted(plan, key));
        Ok(())
    }

    /// Asks the agent to cancel the watched run, if one is live.
    pub fn cancel(&self, state: AgentState) -> Result<(), String> {
        match state.live_job() {
            Some(job) => self.send(&ToAgent::Cancel { job }),
            None => Ok(()),
        }
    }

    /// Watches run `job` (its plan and estimate first, then its records).
    pub fn watch(&self, state: AgentState, job: JobId) {
        state.pending.set(Some(RunWant::Watch(job)));
        let _ = self.send(&ToAgent::GetRun { job });
    }

    /// Opens run `job`'s plan in the form.
    pub fn open_plan(&self, state: AgentState, job: JobId) {
        state.pending.set(Some(RunWant::OpenPlan(job)));
        let _ = self.send(&ToAgent::GetRun { job });
    }

    /// Compares the watched run with ended run `job` (`name`, `records_total` records):
    /// its records are read from the start.
    pub fn compare(&self, state: AgentState, job: JobId, name: String, records_total: u64) {
        state.compare.set(Some(Compared::new(job, name, records_total)));
        let _ = self.send(&ToAgent::Attach { job, after: 0 });
    }

    /// Stops comparing; one stopped before its records were all in leaves the session on
    /// that run, so the watched one is followed again.
    pub fn stop_comparing(&self, state: AgentState) {
        let unfinished = state.compare.with_untracked(|c| c.as_ref().is_some_and(|c| !c.done));
        state.compare.set(None);
        if unfinished {
            reattach(state, *self);
        }
    }

    /// Asks for the agent's devices and queue and the newest page of its runs (as many
    /// as the history already shows).
    pub fn poll(&self, state: AgentState) {
        let _ = self.send(&ToAgent::Status);
        if state.runs_asked.get_untracked().is_none() {
            let shown = u32::try_from(state.runs.with_untracked(Vec::len)).unwrap_or(u32::MAX);
            state.runs_asked.set(Some(None));
            let _ = self.send(&ToAgent::ListRuns { before: None, limit: shown.max(HISTORY_PAGE) });
        }
    }
}

/// A fresh key for one submission (`Submit::key`): 64 random bits from the browser's
/// CSPRNG, so two submissions, from this page or any other, never share one.
fn submission_key() -> Result<u64, String> {
    let crypto = web_sys::window()
        .ok_or("no window")?
        .crypto()
        .map_err(|e| format!("this browser has no crypto.getRandomValues: {e:?}"))?;
    let mut bytes = [0u8; 8];
    crypto.get_random_values_with_u8_array(&mut bytes).map_err(|e| format!("crypto.getRandomValues: {e:?}"))?;
    Ok(u64::from_le_bytes(bytes))
}

/// The token the agent printed in the page's URL (`?token=...`).
pub fn token_from_location() -> Option<String> {
    let search = web_sys::window()?.location().search().ok()?;
    search.trim_start_matches('?').split('&').find_map(|kv| kv.strip_prefix("token=")).map(str::to_owned)
}

/// The address of the agent that served this page, with its port even when it is the
/// scheme's default (so that the same agent typed in as `host:443` is the same entry).
pub fn home_address() -> Option<AgentAddress> {
    let location = web_sys::window()?.location();
    let secure = location.protocol().ok()? == "https:";
    let scheme = if secure { "wss" } else { "ws" };
    let port =
        location.port().ok().filter(|p| !p.is_empty()).unwrap_or_else(|| (if secure { "443" } else { "80" }).into());
    let host = format!("{}:{port}", location.hostname().ok()?);
    Some(AgentAddress { socket_url: format!("{scheme}://{host}/ws"), label: host })
}

/// Where the page keeps, per agent, the number of the run it watches (`run`) and a
/// submission not answered yet (`submit`).
fn storage_key(what: &str, label: &str) -> String {
    format!("headroom.{what}@{label}")
}

/// The browser's local storage, where the page keeps its agents and watched runs.
pub fn local_storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok()?
}

fn remember_run(label: &str, job: Option<JobId>) {
    let Some(storage) = local_storage() else {
        return;
    };
    let _ = match job {
        Some(j) => storage.set_item(&storage_key("run", label), &j.to_string()),
        None => storage.remove_item(&storage_key("run", label)),
    };
}

fn remembered_run(label: &str) -> Option<JobId> {
    local_storage()?.get_item(&storage_key("run", label)).ok()??.parse().ok()
}

/// How long a page reloaded after a lost answer still sends the submission again: one
/// found later (the tab was closed meanwhile) is forgotten, not run by surprise.
const SUBMISSION_KEPT_MS: f64 = 10.0 * 60.0 * 1000.0;

/// Keeps a submission the agent has not answered yet (its plan and key), so that a page
/// reloaded meanwhile sends it again too; `None` forgets it.
pub fn remember_submission(label: &str, submission: Option<(&shared::plan::Plan, u64)>) {
    let Some(storage) = local_storage() else {
        return;
    };
    let key = storage_key("submit", label);
    let text = submission.map(|(plan, k)| {
        serde_json::to_string(&serde_json::json!({ "key": k, "plan": plan, "at_ms": js_sys::Date::now() }))
    });
    let _ = match text {
        Some(Ok(text)) => storage.set_item(&key, &text),
        _ => storage.remove_item(&key),
    };
}

/// Ends an unanswered submission with `error`, forgetting the kept copy.
fn submission_failed(label: &str, state: AgentState, error: JobError) {
    remember_submission(label, None);
    state.watched.update(|w| w.job = JobState::Failed { job: None, error });
}

/// The submission kept by [`remember_submission`], if it is recent; an old or damaged one
/// is forgotten.
fn remembered_submission(label: &str) -> Option<(shared::plan::Plan, u64)> {
    let text = local_storage()?.get_item(&storage_key("submit", label)).ok()??;
    let found = (|| {
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let age = js_sys::Date::now() - v.get("at_ms")?.as_f64()?;
        if !(0.0..SUBMISSION_KEPT_MS).contains(&age) {
            return None;
        }
        Some((serde_json::from_value(v.get("plan")?.clone()).ok()?, v.get("key")?.as_u64()?))
    })();
    if found.is_none() {
        remember_submission(label, None);
    }
    found
}

fn apply(label: &str, state: AgentState, socket: AgentSocket, message: ToClient) {
    match message {
        ToClient::Hello(hello) => on_hello(label, state, socket, hello),
        ToClient::Accepted { job, estimate, device } => {
            remember_submission(label, None);
            remember_run(label, Some(job));
            state.notice.set(None);
            state.watched.update(|w| w.accepted(job, device, estimate));
            socket.poll(state);
        }
        ToClient::Error { code, message } => on_error(label, state, socket, JobError { code, message }),
        ToClient::Logged { job, seq, record } => on_logged(state, socket, job, seq, record),
        ToClient::Run { info, plan, estimate } => on_run(label, state, socket, info, *plan, estimate.map(|e| *e)),
        ToClient::Runs { runs, more } => on_runs(state, runs, more),
        ToClient::AgentStatus(status) => state.status.set(Some(status)),
    }
}

/// A (re)opened connection: carry on where the page was. A submission whose answer a
/// lost connection (or a reload) took is sent again with its key (the agent answers with
/// the run it became, or queues it now); a comparison being fetched (the watched run
/// follows it); the watched run; a run asked for; or the one a reloaded page watched.
fn on_hello(label: &str, state: AgentState, socket: AgentSocket, hello: Hello) {
    state.hello.set(Some(hello));
    let submitted = match state.job_untracked() {
        JobState::Submitted { plan, key } => Some((plan, key)),
        _ => None,
    };
    let comparing = state.compare.with_untracked(|c| c.as_ref().filter(|c| !c.done).map(|c| (c.job, c.last_seq)));
    if let Some((plan, key)) = submitted {
        if let Err(e) = socket.send(&ToAgent::Submit { plan: *plan, force: false, key: Some(key) }) {
            let message = format!("sending the plan again: {e}");
            submission_failed(label, state, JobError { code: ErrorCode::Internal, message });
        }
    } else if let Some((job, after)) = comparing {
        let _ = socket.send(&ToAgent::Attach { job, after });
    } else if let Some(job) = state.live_job() {
        let _ = socket.send(&ToAgent::Attach { job, after: state.watched.with_untracked(|w| w.last_seq) });
    }
    if let Some(RunWant::Watch(job) | RunWant::OpenPlan(job)) = state.pending.get_untracked() {
        let _ = socket.send(&ToAgent::GetRun { job });
    } else if comparing.is_none()
        && state.live_job().is_none()
        && !matches!(state.job_untracked(), JobState::Submitted { .. })
        && let Some(job) = state.resume.get_untracked()
    {
        state.resume.set(None);
        state.pending.set(Some(RunWant::Watch(job)));
        let _ = socket.send(&ToAgent::GetRun { job });
    }
    state.runs_asked.set(None);
    socket.poll(state);
}

/// A refused submission ends the "submitted" state; a compared run that is gone ends
/// the comparison; anything else (a cancel that raced the end) is a notice beside the
/// job's own state.
fn on_error(label: &str, state: AgentState, socket: AgentSocket, error: JobError) {
    let code = error.code;
    if matches!(state.job_untracked(), JobState::Submitted { .. }) {
        submission_failed(label, state, error);
    } else if code == ErrorCode::UnknownJob && state.pending.get_untracked().is_some() {
        if matches!(state.pending.get_untracked(), Some(RunWant::Watch(_))) {
            remember_run(label, None);
        }
        state.pending.set(None);
        state.notice.set(Some(format!("the agent no longer has that run: {}", error.message)));
    } else if code == ErrorCode::UnknownJob && state.compare.with_untracked(|c| c.as_ref().is_some_and(|c| !c.done)) {
        state.compare.update(|c| {
            if let Some(c) = c.as_mut() {
                c.gone(error.clone());
            }
        });
        reattach(state, socket);
    } else if let (ErrorCode::UnknownJob, Some(job)) = (code, state.live_job()) {
        // The run the page followed is gone from the agent (pruned): it will not report
        // its end.
        state.watched.update(|w| w.job = JobState::Failed { job: Some(job), error });
    } else {
        state.notice.set(Some(format!("the agent said ({:?}): {}", error.code, error.message)));
    }
}

/// A run's stored record: each shown once, in order, in the comparison or the watched
/// run.
fn on_logged(state: AgentState, socket: AgentSocket, job: JobId, seq: u64, record: Record) {
    if state.compare.with_untracked(|c| c.as_ref().is_some_and(|c| c.job == job)) {
        let mut ended = false;
        state.compare.update(|c| ended = c.as_mut().is_some_and(|c| c.apply(seq, record)));
        if ended {
            reattach(state, socket);
        }
    } else if state.watched.with_untracked(|w| w.takes(job, seq))
        && state.watched.try_update(|w| w.apply(job, seq, record)).flatten() == Some(true)
    {
        socket.poll(state);
    }
}

/// A run asked for with `GetRun`: watched from its first record, or its plan opened.
fn on_run(label: &str, state: AgentState, socket: AgentSocket, info: RunInfo, plan: Plan, estimate: Option<Estimate>) {
    match state.pending.get_untracked() {
        Some(RunWant::Watch(job)) if job == info.job => {
            state.pending.set(None);
            remember_run(label, Some(job));
            state.notice.set(None);
            state.watched.update(|w| w.watch(&info, estimate));
            // The session now follows this run: a comparison still being fetched (or of
            // this very run) is dropped.
            if state.compare.with_untracked(|c| c.as_ref().is_some_and(|c| c.job == job || !c.done)) {
                state.compare.set(None);
            }
            let _ = socket.send(&ToAgent::Attach { job, after: 0 });
        }
        Some(RunWant::OpenPlan(job)) if job == info.job => {
            state.pending.set(None);
            state.open_plan.set(Some(plan));
        }
        _ => {}
    }
}

/// A page of the agent's runs: an older page goes after what is shown; the newest
/// replaces what it covers, and older rows paged in before stay below it.
fn on_runs(state: AgentState, runs: Vec<RunInfo>, more: bool) {
    let asked = state.runs_asked.get_untracked();
    state.runs_asked.set(None);
    if let Some(Some(_)) = asked {
        state.runs.update(|r| r.extend(runs));
        state.runs_more.set(more);
        return;
    }
    let oldest_new = runs.last().map(|r| r.job);
    let mut kept_older = false;
    state.runs.update(|r| {
        let older: Vec<_> = match oldest_new {
            Some(o) if more => r.iter().filter(|x| x.job < o).cloned().collect(),
            _ => Vec::new(),
        };
        kept_older = !older.is_empty();
        *r = runs;
        r.extend(older);
    });
    if !kept_older {
        state.runs_more.set(more);
    }
}

/// After a comparison's records (or one stopped before they were in): follow the
/// watched run again from its last record.
pub fn reattach(state: AgentState, socket: AgentSocket) {
    if let Some(job) = state.live_job() {
        let _ = socket.send(&ToAgent::Attach { job, after: state.watched.with_untracked(|w| w.last_seq) });
    }
}

/// Opens the WebSocket to `address` with `token` for the lifetime of the page (or until
/// [`AgentSocket::close`]), reopening it when it drops.
pub fn connect(address: AgentAddress, token: String, state: AgentState) -> AgentSocket {
    let agent = AgentSocket { socket: StoredValue::new_local(None), closed: StoredValue::new(false) };
    state.resume.set(remembered_run(&address.label));
    if let Some((plan, key)) = remembered_submission(&address.label) {
        state.watched.update(|w| w.submitted(plan, key));
    }
    open(std::rc::Rc::new((address, token)), state, agent, 0);
    agent
}

/// Opens the WebSocket; `attempt` counts reconnects since the last open one.
fn open(target: std::rc::Rc<(AgentAddress, String)>, state: AgentState, agent: AgentSocket, attempt: u32) {
    if agent.closed.get_value() {
        return;
    }
    let url = target.0.url_with_token(&target.1);
    let ws = match WebSocket::new(&url) {
        Ok(ws) => ws,
        Err(_) => {
            state.connection.set(Connection::Closed(format!("cannot open {}", target.0.socket_url)));
            return;
        }
    };
    ws.set_binary_type(BinaryType::Arraybuffer);
    state.connection.set(Connection::Connecting);

    // Whether this socket opened: a reconnect that got through starts the back-off anew.
    let opened = std::rc::Rc::new(std::cell::Cell::new(false));
    let was_opened = std::rc::Rc::clone(&opened);
    let on_open = Closure::<dyn FnMut()>::new(move || {
        was_opened.set(true);
        state.connection.set(Connection::Open)
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));

    let label = target.0.label.clone();
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
        let Ok(buffer) = event.data().dyn_into::<js_sys::ArrayBuffer>() else {
            return;
        };
        let bytes = js_sys::Uint8Array::new(&buffer).to_vec();
        match codec::decode::<ToClient>(&bytes) {
            Ok(message) => apply(&label, state, agent, message),
            Err(e) => state.notice.set(Some(format!("the agent sent something this page cannot read: {e}"))),
        }
    });
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));

    let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |event: CloseEvent| {
        let reason = if !event.reason().is_empty() {
            format!("connection closed: {}", event.reason())
        } else if !opened.get() {
            // The browser tells a page nothing about a refused handshake.
            "could not connect: check the address and the token, and that the agent allows this page's \
             origin (serve --allow-origin)"
                .to_owned()
        } else {
            format!("connection closed (code {})", event.code())
        };
        // A submission in flight stays submitted: it is sent again, with its key, when
        // the connection is back (see `Hello`). Past a few failed reconnects the page
        // stops waiting, so that Run is free again.
        let attempt = if opened.get() { 0 } else { attempt + 1 };
        if matches!(state.job_untracked(), JobState::Submitted { .. }) {
            if attempt >= MAX_SUBMIT_RECONNECTS {
                let message = format!(
                    "lost the agent before it answered the submission ({reason}); it may have queued it: its \
                     history will show the run once the agent is back"
                );
                submission_failed(&target.0.label, state, JobError { code: ErrorCode::Internal, message });
            } else {
                state.notice.set(Some(format!(
                    "lost the agent before it answered the submission ({reason}); it is sent again on \
                     reconnecting, and the agent runs it once"
                )));
            }
        }
        state.runs_asked.set(None);
        // The run goes on at the agent: reconnect and re-attach.
        let delay = 1000 * 2i32.pow(attempt.min(4)).min(10);
        state.connection.set(Connection::Closed(format!("{reason}; reconnecting in {} s", delay / 1000)));
        let target = std::rc::Rc::clone(&target);
        let retry = Closure::once_into_js(move || open(target, state, agent, attempt));
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(retry.unchecked_ref(), delay);
        }
    });
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    agent.socket.set_value(Some(Live { ws, _on_open: on_open, _on_message: on_message, _on_close: on_close }));
}
