//! `headroom serve`: its flags, their checks (an address beyond loopback needs named
//! tokens and TLS), and the agent they start, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::input::BadInput;
use crate::server::{Config, Server};

/// The flags of `headroom serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one. Beyond loopback it needs
    /// --token-file, and --tls-cert/--tls-key unless --insecure-http.
    #[arg(long, visible_alias = "bind", default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// The built planner (Trunk's output folder).
    #[arg(long)]
    pub web_dir: Option<PathBuf>,
    /// Access token; a fresh random one by default. Also read from HEADROOM_TOKEN.
    #[arg(long, env = "HEADROOM_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Accept the named tokens of this file instead (`headroom token add`); it is
    /// re-read when it changes, so a revoked token stops working without a restart.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Another origin allowed to open the WebSocket (scheme://host[:port]); repeatable.
    #[arg(long = "allow-origin")]
    pub allow_origins: Vec<String>,
    /// Another name requests may address this agent by (its `Host`), besides loopback
    /// and the bound address; repeatable. Any other Host is refused (DNS rebinding).
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Authenticated WebSocket sessions at once; one more is refused.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
    /// Connections that have not authenticated yet (page requests, handshakes in
    /// progress) at once; one more is closed at once. Each has 10 s to finish its
    /// handshakes.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_unauthenticated: u32,
    /// Jobs running at once (one per GPU keeps measurements clean).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_jobs: u32,
    /// The largest message a client may send, in bytes (4 KiB to the protocol's 1 MiB);
    /// a larger one is answered with TooLarge and the connection closed.
    #[arg(long, default_value_t = shared::codec::MAX_FRAME_BYTES as u32, value_parser = clap::value_parser!(u32).range(4096..=shared::codec::MAX_FRAME_BYTES as i64))]
    pub max_message_bytes: u32,
    /// Bytes buffered for one client before writes wait for its socket (16 KiB to
    /// 64 MiB); a client that stops reading is dropped after a 10 s wait.
    #[arg(long, default_value_t = crate::session::DEFAULT_WRITE_BUFFER_BYTES, value_parser = clap::value_parser!(u32).range(16 << 10..=64 << 20))]
    pub write_buffer_bytes: u32,
    /// Messages a client may send a second on average (bursts of twice that); a
    /// faster one is told RateLimited and closed.
    #[arg(long, default_value_t = crate::session::DEFAULT_MESSAGES_PER_SECOND, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_messages_per_second: u32,
    /// How long a connection for the planner's files may last, in seconds (1 to 3,600),
    /// so that one that never reads gives its slot back.
    #[arg(long, default_value_t = crate::server::DEFAULT_PAGE_CONNECTION_SECONDS, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub page_connection_seconds: u64,
    /// Runs waiting for a slot at once; one more is refused as busy.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_queued: u32,
    /// Runs kept under `--data-dir` (1 to 100,000); past it the oldest ended runs are
    /// deleted, records, checkpoints and all.
    #[arg(long, default_value_t = crate::runs::MAX_RUNS_KEPT as u32, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_runs_kept: u32,
    /// The most optimizer steps a submitted run may have.
    #[arg(long, default_value_t = shared::plan::limits::MAX_STEPS, value_parser = clap::value_parser!(u64).range(1..=shared::plan::limits::MAX_STEPS))]
    pub max_job_steps: u64,
    /// A running job is stopped after this many seconds (default: 7 days).
    #[arg(long, default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(1..=365 * 24 * 3600))]
    pub max_job_seconds: u64,
    /// The folder the `data`, `data_labels` and `val_data` paths of submitted plans
    /// are relative to; nothing outside it is read. Without it, runs use synthetic
    /// data only.
    #[arg(long)]
    pub data_root: Option<PathBuf>,
    /// Where runs are kept (their plans, states and records), so that they survive
    /// disconnects and restarts. Default: $XDG_STATE_HOME/headroom, else
    /// ~/.local/state/headroom.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Serve plain HTTP and WebSocket on an address other than loopback, where anyone
    /// on the network can read the token in transit. Without it, an address beyond
    /// loopback needs TLS (or reach the agent through an SSH tunnel).
    #[arg(long)]
    pub insecure_http: bool,
}

pub async fn serve(args: ServeArgs, exe: PathBuf) -> anyhow::Result<()> {
    let ServeArgs {
        listen,
        web_dir,
        token,
        token_file,
        tls_cert,
        tls_key,
        allow_origins,
        allow_hosts,
        max_connections,
        max_unauthenticated,
        max_jobs,
        max_queued,
        max_runs_kept,
        max_message_bytes,
        write_buffer_bytes,
        max_messages_per_second,
        page_connection_seconds,
        max_job_steps,
        max_job_seconds,
        data_root,
        data_dir,
        insecure_http,
    } = args;
    let data_dir = match data_dir {
        Some(d) => d,
        None => default_data_dir()
            .ok_or_else(|| BadInput("--data-dir: no HOME or XDG_STATE_HOME to put runs under; give one".into()))?,
    };
    // An agent runs jobs: beyond loopback it must know who connects (named tokens
    // from a file) and must not be reachable in clear text by accident.
    let tls = match (&tls_cert, &tls_key) {
        (Some(c), Some(k)) => Some(crate::stream::tls_config(c, k).map_err(|e| BadInput(format!("{e:#}")))?),
        _ => None,
    };
    if !listen.ip().is_loopback() {
        if token_file.is_none() {
            return Err(BadInput(format!(
                "--listen {listen}: beyond loopback the agent needs --token-file FILE (create one with `headroom token add NAME --token-file FILE`)"
            ))
            .into());
        }
        if tls.is_none() && !insecure_http {
            return Err(BadInput(format!(
                "--listen {listen}: not a loopback address; serve TLS with --tls-cert and --tls-key, reach a loopback agent through an SSH tunnel (ssh -L 8787:127.0.0.1:8787 HOST), or pass --insecure-http to accept clear text on the network"
            ))
            .into());
        }
        if tls.is_none() {
            tracing::warn!(%listen, "serving plain HTTP beyond loopback (--insecure-http): tokens travel in clear text");
        }
    }
    let (tokens, printed) = match &token_file {
        Some(path) => (
            crate::auth::Tokens::File(
                crate::tokens::TokenStore::open(path).map_err(|e| BadInput(format!("--token-file: {e}")))?,
            ),
            None,
        ),
        None => {
            let token = match token {
                Some(t) => t,
                None => crate::tokens::generate()?,
            };
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(BadInput("--token: use at least 16 letters or digits".into()).into());
            }
            (crate::auth::Tokens::One(token.clone()), Some(token))
        }
    };
    if let Some(dir) = &web_dir
        && !dir.join("index.html").is_file()
    {
        return Err(BadInput(format!("--web-dir {}: no index.html there", dir.display())).into());
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = Server::bind(Config {
        bind: listen,
        web_dir,
        tokens,
        tls,
        extra_origins: allow_origins,
        extra_hosts: allow_hosts,
        max_connections: max_connections as usize,
        max_unauthenticated: max_unauthenticated as usize,
        max_jobs: max_jobs as usize,
        worker_exe: exe,
        data_dir,
        limits: crate::runs::Limits {
            max_job_steps,
            max_job_seconds,
            max_queued: max_queued as usize,
            max_runs_kept: max_runs_kept as usize,
        },
        page_timeout: std::time::Duration::from_secs(page_connection_seconds),
        session_limits: crate::session::SessionLimits {
            max_message_bytes: max_message_bytes as usize,
            write_buffer_bytes: write_buffer_bytes as usize,
            messages_per_second: max_messages_per_second,
        },
        data_root,
    })
    .await?;
    let addr = server.local_addr()?;
    let host = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    // The one line on stdout: scripts and tests read the URL from it. Tokens from a
    // file are never printed: add `?token=` with one of them.
    match printed {
        Some(token) => println!("Headroom planner: {scheme}://{host}:{}/?token={token}", addr.port()),
        None => {
            println!("Headroom planner: {scheme}://{host}:{}/ (open it with ?token=YOUR_TOKEN)", addr.port())
        }
    }
    tracing::info!(%addr, "serving");
    server
        .run(async {
            // SIGINT or SIGTERM: stop accepting, let running jobs finish their batch
            // and write their last records, tell clients, then exit.
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    match term.as_mut() {
                        Some(t) => { t.recv().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
            }
        })
        .await;
    Ok(())
}

/// `$XDG_STATE_HOME/headroom`, else `~/.local/state/headroom`.
fn default_data_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    nonempty("XDG_STATE_HOME").or_else(|| nonempty("HOME").map(|h| h.join(".local/state"))).map(|d| d.join("headroom"))
}
