//! The listener: one port serves the planner's files at `/` and the WebSocket at `/ws`,
//! over plain TCP or TLS, with connection limits and graceful shutdown.
//!
//! Each accepted stream (after its TLS handshake, if any) is routed by reading its
//! request line: `/ws` goes to tungstenite, whose handshake callback checks the `Host`,
//! the token and the `Origin` before the upgrade; everything else goes to the static
//! file service. Until a WebSocket is authenticated, a connection holds one of a small
//! number of slots of its own and must finish within a short deadline, so idle or slow
//! strangers cannot crowd out authenticated sessions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shared::protocol::{Capabilities, Hello, PROTOCOL_VERSION};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

use crate::auth::{self, Origin, Tokens};
use crate::connection::Connection;
use crate::http;
use crate::jobs::JobRunner;
use crate::session::{self, State};
use crate::stream::{self, BoxIo, Rewind};

/// Bytes of a request line we wait for before routing; longer lines are refused.
const MAX_REQUEST_LINE: usize = 8192;
/// A client that does not finish its TLS handshake, its request line and its WebSocket
/// handshake within this is dropped, so stalled sockets cannot hold connection slots.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Kernel send buffer asked for per connection (Linux doubles it for bookkeeping, so
/// about 512 KiB in practice). Without a cap, autotuning lets a client that stops reading
/// pin megabytes in the kernel; with it, backlog beyond this and the job's event buffer
/// is dropped (and counted) instead.
const SEND_BUFFER_BYTES: usize = 256 * 1024;
/// A page connection (HTTP, keep-alive included) lasts at most this long by default
/// (`--page-connection-seconds`), so that a client that requests a file and never reads
/// it gives its unauthenticated slot back; long enough for the 2.6 MB planner over a
/// slow link. Browsers open a new connection for later requests.
pub const DEFAULT_PAGE_CONNECTION_SECONDS: u64 = 120;
/// Unauthenticated connections one peer address may hold at once, whatever
/// `--max-unauthenticated` allows in all: one host cannot take every slot.
pub const MAX_UNAUTHENTICATED_PER_PEER: usize = 8;

#[derive(Debug)]
pub struct Config {
    pub bind: SocketAddr,
    /// The built planner (Trunk's `dist`); `None` serves a page that says how to build it.
    pub web_dir: Option<PathBuf>,
    pub tokens: Tokens,
    /// TLS from `--tls-cert`/`--tls-key`; plain TCP without.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Origins allowed besides the agent's own.
    pub extra_origins: Vec<String>,
    /// Host names a request may address the agent by besides loopback and the bound
    /// address (a DNS name of the machine); any other `Host` is refused.
    pub extra_hosts: Vec<String>,
    /// Authenticated WebSocket sessions at once; one more is refused with 503.
    pub max_connections: usize,
    /// Connections not yet authenticated at once (TLS and WebSocket handshakes, page
    /// requests); one more is closed at once.
    pub max_unauthenticated: usize,
    pub max_jobs: usize,
    /// This executable, started in worker mode for each job.
    pub worker_exe: PathBuf,
    /// Where runs are kept (`crate::runs`).
    pub data_dir: PathBuf,
    pub limits: crate::runs::Limits,
    pub session_limits: crate::session::SessionLimits,
    /// How long a page connection may last.
    pub page_timeout: Duration,
    /// The folder runs' `data` paths are relative to.
    pub data_root: Option<PathBuf>,
}

/// An unauthenticated connection's slot: one of the agent's and one of its peer's.
struct Pending {
    _slot: tokio::sync::OwnedSemaphorePermit,
    peers: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Pending {
    fn take(
        slots: &Arc<Semaphore>,
        peers: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<Pending> {
        let mut map = peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.get(&ip).is_some_and(|&n| n >= MAX_UNAUTHENTICATED_PER_PEER) {
            return None;
        }
        // The slot first: a refused peer leaves no entry behind.
        let slot = Arc::clone(slots).try_acquire_owned().ok()?;
        *map.entry(ip).or_insert(0) += 1;
        Some(Pending { _slot: slot, peers: Arc::clone(peers), ip })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut map = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

pub struct Server {
    listener: TcpListener,
    state: Arc<State>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    max_unauthenticated: usize,
}

impl Server {
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(config.bind).await.with_context(|| format!("binding {}", config.bind))?;
        let addr = listener.local_addr()?;
        let mut origins = auth::own_origins(addr.port(), &addr.ip().to_string(), config.tls.is_some());
        for o in &config.extra_origins {
            origins
                .push(Origin::parse(o).with_context(|| format!("--allow-origin {o:?} is not scheme://host[:port]"))?);
        }
        let machine = crate::devices::probe_machine(&config.worker_exe).await;
        let devices = crate::devices::discover();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            devices,
            capabilities: Capabilities {
                // What libtorch can use, not what NVML sees: a driver too old for this
                // libtorch shows GPUs in NVML that jobs cannot run on.
                cuda: machine.cuda_devices > 0,
                nvml: system::nvml::available(),
                cpu_isa: machine.cpu_isa.or_else(system::host::cpu_isa),
                max_concurrent_jobs: u32::try_from(config.max_jobs).unwrap_or(u32::MAX),
            },
        };
        let state = State {
            tokens: config.tokens,
            sessions: Arc::new(Semaphore::new(config.max_connections)),
            origins,
            hello,
            machine,
            runs: crate::runs::Runs::open(
                &config.data_dir,
                JobRunner::new(config.worker_exe, config.max_jobs),
                config.limits,
                config.data_root,
            )?,
            limits: config.limits,
            session_limits: config.session_limits,
            page_timeout: config.page_timeout,
            pages: crate::http::router(
                config.web_dir,
                auth::own_hosts(&addr.ip().to_string(), &config.extra_hosts),
                addr.port(),
            ),
            hosts: auth::own_hosts(&addr.ip().to_string(), &config.extra_hosts),
            port: addr.port(),
        };
        Ok(Server {
            listener,
            state: Arc::new(state),
            tls: config.tls.map(tokio_rustls::TlsAcceptor::from),
            max_unauthenticated: config.max_unauthenticated,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every connection and waits up to
    /// five seconds for them.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::spawn(Arc::clone(&self.state.runs).dispatch());
        let unauthenticated = Arc::new(Semaphore::new(self.max_unauthenticated));
        let peers = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // A stranger gets one of the few unauthenticated slots, or is closed at once.
            let Some(pending) = Pending::take(&unauthenticated, &peers, peer.ip()) else {
                tracing::debug!(%peer, "closed: too many unauthenticated connections");
                drop(stream);
                continue;
            };
            let state = Arc::clone(&self.state);
            let stop = stop_rx.clone();
            let tls = self.tls.clone();
            tasks.spawn(async move {
                if let Err(e) = handle(stream, tls, pending, state, stop).await {
                    tracing::debug!(%peer, "connection: {e:#}");
                }
            });
            while tasks.try_join_next().is_some() {}
        }
        tracing::info!("shutting down: finishing the current batches");
        // Running jobs stop at their next micro-batch and their last records are
        // written; then sessions are told and closed.
        self.state.runs.shutdown(crate::runs::CANCEL_GRACE).await;
        let _ = stop_tx.send(true);
        let _ =
            tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} }).await;
    }
}

/// The TLS handshake (if any) and the request line, within the handshake deadline.
async fn open(
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<(String, BoxIo)> {
    let mut io: BoxIo = match tls {
        Some(acceptor) => Box::new(acceptor.accept(stream).await.context("TLS handshake")?),
        None => Box::new(stream),
    };
    let (line, read) = stream::read_request_line(&mut io, MAX_REQUEST_LINE).await?;
    Ok((line, Box::new(Rewind::new(read, io))))
}

async fn handle(
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    pending: Pending,
    state: Arc<State>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER_BYTES)?;
    let (line, io) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, open(stream, tls)).await.context("no request line in time")??;
    let target = line.split(' ').nth(1).unwrap_or("");
    if !(target == "/ws" || target.starts_with("/ws?")) {
        // Page requests keep their unauthenticated slot while the connection lasts, at
        // most --page-connection-seconds; hyper closes slow headers and idle keep-alive
        // connections sooner.
        let _pending = pending;
        let page = http::serve(io, state.pages.clone());
        return match tokio::time::timeout(state.page_timeout, page).await {
            Ok(served) => served,
            Err(_) => anyhow::bail!("page connection closed after {:?}", state.page_timeout),
        };
    }
    let check_state = Arc::clone(&state);
    // tungstenite's `Callback` fixes this signature, large error type and all.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        authorize(&check_state, req).map(|()| resp)
    };
    let config = state.session_limits.websocket();
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(io, callback, Some(config));
    let ws = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await.context("websocket handshake timed out")??;
    // Authenticated: the unauthenticated slot goes, a session slot is taken.
    drop(pending);
    let mut conn = Connection::new(ws, state.session_limits.max_message_bytes);
    let Ok(_session) = Arc::clone(&state.sessions).try_acquire_owned() else {
        tracing::warn!("refused a session: --max-connections reached");
        conn.close(
            tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Again,
            "too many sessions on this agent; try again later",
        )
        .await;
        return Ok(());
    };
    session::run(conn, state, stop).await;
    Ok(())
}

fn reject(status: StatusCode, reason: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(reason.to_owned()));
    *resp.status_mut() = status;
    resp
}

/// Runs inside the handshake, before the upgrade: nothing reaches a session unchecked.
#[allow(clippy::result_large_err)] // what the handshake callback returns, unchanged
fn authorize(state: &State, req: &Request) -> Result<(), ErrorResponse> {
    // A page on a foreign name that resolves here (DNS rebinding) is refused first.
    let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
    if !auth::host_allowed(host, state.port, &state.hosts) {
        tracing::warn!(host, "refused a WebSocket addressed to a foreign host");
        return Err(reject(StatusCode::FORBIDDEN, &format!("host {host:?} is not this agent's (see --allow-host)")));
    }
    // A token in the query (what a browser can send) or as a bearer header (other
    // clients); a cookie never counts.
    let bearer = req.headers().get("authorization").and_then(|h| h.to_str().ok());
    let given = auth::token_from_query(req.uri().query()).or_else(|| auth::token_from_bearer(bearer));
    let Some(given) = given else {
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            "missing token: connect to /ws?token=TOKEN or send Authorization: Bearer TOKEN",
        ));
    };
    let Some(name) = state.tokens.check(given) else {
        tracing::warn!("refused a WebSocket with an unknown or revoked token");
        return Err(reject(StatusCode::UNAUTHORIZED, "unknown or revoked token"));
    };
    // Browsers always send Origin on a WebSocket; programs (the CLI, tests) may not, and
    // the token already authenticates them.
    if let Some(origin) = req.headers().get("origin") {
        let text = origin.to_str().unwrap_or("");
        let allowed = Origin::parse(text).is_some_and(|o| state.origins.contains(&o));
        if !allowed {
            tracing::warn!(origin = text, "refused a WebSocket from a foreign origin");
            return Err(reject(StatusCode::FORBIDDEN, &format!("origin {text:?} is not allowed")));
        }
    }
    tracing::info!(token = name, "session authenticated");
    Ok(())
}
