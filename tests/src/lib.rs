//! Support for the end-to-end tests: start a real agent on a free loopback port, talk
//! to it over a real WebSocket, and stop it when the handle drops.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use shared::codec;
use shared::protocol::{JobId, Record, ToClient, Wire};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single expected message may take; jobs in tests finish in seconds.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository root. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test, which is
/// right even when two checkouts share one target directory (their test binaries have
/// the same name, so one may run the other's); the path compiled in is the fallback.
pub fn repo_root() -> PathBuf {
    let dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("..")
}

/// The `headroom` binary built next to this test binary (`target/<profile>/headroom`),
/// or `HEADROOM_BIN`.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("HEADROOM_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/headroom
    let bin = exe.parent().and_then(|d| d.parent()).map(|d| d.join("headroom")).context("no target dir")?;
    if !bin.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build -p headroom-agent` (scripts/test.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The built planner, or `HEADROOM_WEB_DIR`.
pub fn web_dir() -> anyhow::Result<PathBuf> {
    let dir =
        std::env::var("HEADROOM_WEB_DIR").map(PathBuf::from).unwrap_or_else(|_| repo_root().join("planner-web/dist"));
    if !dir.join("index.html").is_file() {
        bail!("{} has no built planner: run `trunk build --release` first (scripts/test.sh does)", dir.display());
    }
    Ok(dir)
}

/// A running agent; killed when dropped.
pub struct AgentHandle {
    child: Child,
    pub port: u16,
    pub token: String,
    /// Where it keeps its runs: its own temporary folder unless `--data-dir` was given.
    pub data_dir: PathBuf,
    _own_data: Option<tempfile::TempDir>,
}

impl AgentHandle {
    pub fn start(web_dir: Option<PathBuf>) -> anyhow::Result<AgentHandle> {
        AgentHandle::start_flags(&[], web_dir)
    }

    /// A loopback agent with a fresh token and these further `serve` flags.
    pub fn start_flags(flags: &[&str], web_dir: Option<PathBuf>) -> anyhow::Result<AgentHandle> {
        let token = format!("{:032x}", rand_u128());
        let mut args = vec!["--listen", "127.0.0.1:0", "--token", &token];
        args.extend_from_slice(flags);
        AgentHandle::start_with(&args, token.clone(), web_dir)
    }

    /// An agent started with `serve ARGS`, whose clients present `token`.
    pub fn start_with(args: &[&str], token: String, web_dir: Option<PathBuf>) -> anyhow::Result<AgentHandle> {
        let mut cmd = Command::new(agent_binary()?);
        cmd.arg("serve").args(args).env("HEADROOM_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::inherit());
        let (data_dir, own) = match args.iter().position(|a| *a == "--data-dir") {
            Some(i) => (PathBuf::from(args.get(i + 1).context("--data-dir needs a value")?), None),
            None => {
                let own = tempfile::tempdir()?;
                cmd.arg("--data-dir").arg(own.path());
                (own.path().to_owned(), Some(own))
            }
        };
        if let Some(dir) = web_dir {
            cmd.arg("--web-dir").arg(dir);
        }
        let mut child = cmd.spawn().context("starting the agent")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        // "Headroom planner: http[s]://127.0.0.1:PORT/..."
        let port = line
            .split("127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("no port in the agent's first line {line:?}"))?;
        Ok(AgentHandle { child, port, token, data_dir, _own_data: own })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/?token={}", self.port, self.token)
    }

    /// Sends `signal` to the agent and waits up to `within` for it to exit; its status.
    pub fn signal_and_wait(&mut self, signal: i32, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: signalling the process this handle started.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let t0 = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(t0.elapsed() < within, "the agent did not exit within {within:?} of signal {signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Opens `/ws` with the given token and Origin; the error is the HTTP refusal.
    pub async fn connect_with(&self, token: Option<&str>, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
        let url = match token {
            Some(t) => format!("ws://127.0.0.1:{}/ws?token={t}", self.port),
            None => format!("ws://127.0.0.1:{}/ws", self.port),
        };
        let mut req = url.into_client_request()?;
        if let Some(o) = origin {
            req.headers_mut().insert(
                "origin",
                http::HeaderValue::from_str(o).map_err(|e| tungstenite::Error::HttpFormat(e.into()))?,
            );
        }
        Ok(tokio_tungstenite::connect_async(req).await?.0)
    }

    /// A valid client that has read the agent's Hello.
    pub async fn connect(&self) -> anyhow::Result<Ws> {
        let ws = self.connect_with(Some(&self.token), None).await?;
        expect_hello(ws).await
    }

    /// A valid client whose socket receive buffer is only `bytes` long, so that the
    /// agent's writes back up as soon as the client stops reading.
    pub async fn connect_slow(&self, bytes: u32) -> anyhow::Result<Ws> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(bytes)?;
        let stream = socket.connect(([127, 0, 0, 1], self.port).into()).await?;
        let req = format!("ws://127.0.0.1:{}/ws?token={}", self.port, self.token).into_client_request()?;
        let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)).await?;
        expect_hello(ws).await
    }
}

async fn expect_hello(mut ws: Ws) -> anyhow::Result<Ws> {
    {
        match recv(&mut ws).await? {
            ToClient::Hello(h) => {
                anyhow::ensure!(h.protocol_version == shared::protocol::PROTOCOL_VERSION);
                // The CPU's instruction set, as oneDNN sees it, on every x86-64 Linux host.
                if cfg!(all(target_arch = "x86_64", target_os = "linux")) {
                    anyhow::ensure!(h.capabilities.cpu_isa.is_some(), "Hello without the CPU's ISA: {h:?}");
                }
            }
            other => bail!("expected Hello first, got {other:?}"),
        }
    }
    Ok(ws)
}

/// The pid of a child of `parent` whose command line contains `needle`.
pub fn find_child(parent: u32, needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let ppid: u32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read_to_string(entry.path().join("cmdline")).ok()?;
        (ppid == parent && cmdline.contains(needle)).then_some(pid)
    })
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    u128::from_le_bytes(bytes) ^ u128::from(std::process::id())
}

/// Sends `message` as a frame of its direction: `ToAgent` as a client does, or another
/// direction's to see it refused.
pub async fn send<S: AsyncRead + AsyncWrite + Unpin, M: Wire>(
    ws: &mut WebSocketStream<S>,
    message: &M,
) -> anyhow::Result<()> {
    ws.send(tungstenite::Message::Binary(codec::encode(message)?.into())).await?;
    Ok(())
}

/// What arrived next: a decoded message, or how the agent closed.
#[derive(Debug)]
// One value at a time in tests, matched on at once: boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum Inbound {
    Message(ToClient),
    Closed(Option<tungstenite::protocol::CloseFrame>),
}

pub async fn next<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> anyhow::Result<Inbound> {
    loop {
        let frame =
            tokio::time::timeout(MESSAGE_TIMEOUT, ws.next()).await.context("timed out waiting for the agent")?;
        match frame {
            None => return Ok(Inbound::Closed(None)),
            Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => {
                return Ok(Inbound::Closed(None));
            }
            Some(Err(e)) => bail!("websocket: {e}"),
            Some(Ok(tungstenite::Message::Binary(b))) => return Ok(Inbound::Message(codec::decode(&b)?)),
            Some(Ok(tungstenite::Message::Close(frame))) => return Ok(Inbound::Closed(frame)),
            Some(Ok(_)) => continue,
        }
    }
}

pub async fn recv<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> anyhow::Result<ToClient> {
    match next(ws).await? {
        Inbound::Message(m) => Ok(m),
        Inbound::Closed(frame) => bail!("the agent closed the connection: {frame:?}"),
    }
}

/// The next message, which must be a run's stored record (`Logged`): its number, its
/// run and the record.
pub async fn recv_record<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
) -> anyhow::Result<(u64, JobId, Record)> {
    match recv(ws).await? {
        ToClient::Logged { job, seq, record } => Ok((seq, job, record)),
        other => bail!("expected a run's record, got {other:?}"),
    }
}

/// Runs the `headroom` CLI and returns (exit code, stdout, stderr).
pub fn cli(args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(agent_binary()?).args(args).env("HEADROOM_LOG", "warn").current_dir(repo_root()).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The JSON lines of a command's output (`run` prints one per micro-batch and event,
/// then a summary); other lines are skipped.
pub fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// A free loopback port (for chromedriver).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Tests whose figures depend on having the CPU to themselves (the loader racing the
/// trainer, a hundred clients at once) take this, so that they never overlap each other.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
