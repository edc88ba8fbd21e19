//! Hostile input against a live agent: raw HTTP, the WebSocket handshake, frames after
//! it, plans. No input may crash the agent, hang it or get past a check; each rejection
//! is an answer (a status, an `Error`, a close), and the agent keeps serving. Then load:
//! many clients on one run, and connect/disconnect cycles, with the agent's memory
//! measured before and after.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use headroom_tests::{AgentHandle, Inbound, next, recv, send};
use shared::plan::{DeviceChoice, Plan, Schedule};
use shared::protocol::{Direction, ErrorCode, JobError, Record, ToAgent, ToClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;

/// Sends `bytes` on a fresh TCP connection and reads until the agent answers or closes
/// (at most `wait`): the first line of its answer, or "" for a close.
async fn raw(port: u16, bytes: &[u8], wait: Duration) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    // The agent may close before reading all of a hostile request: a failed write is an
    // answer too.
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    Ok(String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned())
}

fn agent_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().split(' ').next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds the agent process itself has used (user and system; its workers are
/// other processes).
fn agent_cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<u64>() as f64 / ticks
}

#[tokio::test]
async fn hostile_http_handshakes_frames_and_plans_never_get_through_or_crash_the_agent() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let p = agent.port;
    let host = format!("Host: 127.0.0.1:{p}\r\n");
    let ws_head = |target: &str, extra: &str| {
        format!(
            "GET {target} HTTP/1.1\r\n{host}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    };
    let token = agent.token.clone();
    let mut corpus: Vec<(&str, Vec<u8>)> = vec![
        ("truncated request line", b"GET / HT".to_vec()),
        ("empty", Vec::new()),
        ("random bytes", (0..2048u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()),
        ("a request line past 8 KiB", format!("GET /{} HTTP/1.1\r\n{host}\r\n", "a".repeat(9000)).into_bytes()),
        ("a header flood", format!("GET / HTTP/1.1\r\n{host}{}\r\n", "X-A: b\r\n".repeat(20_000)).into_bytes()),
        ("a bad method", format!("BREW / HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        ("path traversal", format!("GET /../../../../etc/passwd HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("encoded traversal", format!("GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("a NUL in the path", format!("GET /index.html\0.js HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("a handshake with no token", ws_head("/ws", "").into_bytes()),
        ("a handshake with an 8 KiB token", ws_head(&format!("/ws?token={}", "f".repeat(8000)), "").into_bytes()),
        ("a handshake with a cookie only", ws_head("/ws", &format!("Cookie: token={token}\r\n")).into_bytes()),
        (
            "a handshake with a lookalike origin",
            ws_head(&format!("/ws?token={token}"), &format!("Origin: http://127.0.0.1:{p}.evil.com\r\n")).into_bytes(),
        ),
        ("a handshake with origin null", ws_head(&format!("/ws?token={token}"), "Origin: null\r\n").into_bytes()),
        (
            "a handshake of another version",
            ws_head(&format!("/ws?token={token}"), "").replace("Version: 13", "Version: 8").into_bytes(),
        ),
        (
            "a handshake without a key",
            ws_head(&format!("/ws?token={token}"), "").replace("Sec-WebSocket-Key", "X-Nothing").into_bytes(),
        ),
    ];
    let n_http = corpus.len();
    let mut answers = Vec::new();
    for (name, bytes) in corpus.drain(..) {
        let first = raw(p, &bytes, Duration::from_secs(12)).await?;
        assert!(!first.starts_with("HTTP/1.1 101"), "{name} was upgraded: {first}");
        assert!(!first.contains("200") || name == "path traversal" || name == "encoded traversal", "{name}: {first}");
        answers.push(format!("{name}: {}", if first.is_empty() { "closed".to_owned() } else { first }));
    }
    // Traversal gets the planner's page or a refusal, never a file outside it.
    let page = raw(p, format!("GET /../../../../etc/passwd HTTP/1.1\r\n{host}\r\n").as_bytes(), Duration::from_secs(5))
        .await?;
    assert!(!page.contains("root:"), "{page}");

    // Frames after an authenticated handshake.
    let frames: Vec<(&str, tungstenite::Message, ErrorCode)> = vec![
        (
            "random bytes",
            tungstenite::Message::Binary(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3].into()),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "another protocol version",
            tungstenite::Message::Binary(vec![99, 0, 6, 5].into()),
            ErrorCode::UnsupportedVersion,
        ),
        (
            "a truncated message",
            {
                let mut b = shared::codec::encode(&ToAgent::Attach { job: 1, after: 2 })?;
                b.pop();
                tungstenite::Message::Binary(b.into())
            },
            ErrorCode::Malformed,
        ),
        (
            "an unknown direction",
            {
                let v = shared::protocol::PROTOCOL_VERSION.to_le_bytes();
                tungstenite::Message::Binary(vec![v[0], v[1], 250, 0].into())
            },
            ErrorCode::Malformed,
        ),
        (
            "an unknown variant",
            {
                let v = shared::protocol::PROTOCOL_VERSION.to_le_bytes();
                tungstenite::Message::Binary(vec![v[0], v[1], Direction::ToAgent.tag(), 250].into())
            },
            ErrorCode::Malformed,
        ),
        (
            "a length that lies",
            {
                // A `Submit` whose plan's name claims 2^63 bytes.
                let v = shared::protocol::PROTOCOL_VERSION.to_le_bytes();
                let (to_agent, submit) = (Direction::ToAgent.tag(), 0);
                tungstenite::Message::Binary(
                    vec![v[0], v[1], to_agent, submit, 253, 255, 255, 255, 255, 255, 255, 255, 127].into(),
                )
            },
            ErrorCode::Malformed,
        ),
        (
            "a worker's record",
            {
                let cancelled = JobError { code: ErrorCode::Cancelled, message: "x".into() };
                tungstenite::Message::Binary(shared::codec::encode(&Record::Failed { error: cancelled })?.into())
            },
            ErrorCode::Unexpected,
        ),
        ("a text frame", tungstenite::Message::Text("{\"submit\": {}}".into()), ErrorCode::Unexpected),
        (
            "an oversized frame",
            tungstenite::Message::Binary(vec![0u8; shared::codec::MAX_FRAME_BYTES + 1].into()),
            ErrorCode::TooLarge,
        ),
    ];
    let n_frames = frames.len();
    for (name, frame, want) in frames {
        let mut ws = agent.connect().await?;
        ws.send(frame).await?;
        match next(&mut ws).await? {
            Inbound::Message(ToClient::Error { code, .. }) => assert_eq!(code, want, "{name}"),
            other => panic!("{name}: expected an Error, got {other:?}"),
        }
        answers.push(format!("frame {name}: {want:?}"));
    }
    // Plans: huge dimensions, zeros, a plan for messages an agent sends.
    let with = |key: &str, value: &str| {
        let mut p = Plan::example_mlp();
        p.apply_settings(&[(key.to_owned(), value.to_owned())]).map(|()| p)
    };
    let mut ws = agent.connect().await?;
    for (name, plan) in [
        ("huge dimensions", with("in_features", "1073741824")?),
        ("zero classes", with("num_classes", "0")?),
        ("a batch past its limit", with("batch", "65537")?),
    ] {
        send(&mut ws, &ToAgent::Submit { plan, force: false, key: None }).await?;
        match recv(&mut ws).await? {
            ToClient::Error { code: ErrorCode::InvalidPlan, message } => {
                answers.push(format!("plan {name}: {message}"))
            }
            other => panic!("{name}: expected InvalidPlan, got {other:?}"),
        }
    }
    // A message going the other way is refused by name, and the session goes on.
    send(&mut ws, &ToClient::Runs { runs: Vec::new(), more: false }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Error { code: ErrorCode::Unexpected, .. }));
    send(&mut ws, &ToAgent::Status).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::AgentStatus(_)), "the session survives a wrong-way message");
    let tried = n_http + 1 + n_frames + 4;
    println!("hostile inputs: {tried} tried, 0 got through, agent alive\n  {}", answers.join("\n  "));
    // Still serving, and nothing panicked.
    let mut ws = agent.connect().await?;
    send(&mut ws, &ToAgent::ListRuns { before: None, limit: 100 }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Runs { .. }));
    Ok(())
}

/// Runs `plan` with this one client; its training wall time.
async fn run_alone(ws: &mut headroom_tests::Ws, plan: Plan) -> anyhow::Result<f64> {
    send(ws, &ToAgent::Submit { plan, force: false, key: None }).await?;
    match recv(ws).await? {
        ToClient::Accepted { .. } => {}
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    }
    loop {
        match recv(ws).await? {
            ToClient::Logged { record: Record::Finished { summary }, .. } => return Ok(summary.wall_time_ms),
            ToClient::Logged { record: Record::Batch(_), .. }
            | ToClient::Logged { record: Record::Event { .. }, .. } => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
// The guard is held across awaits on purpose: it keeps the other CPU-bound test out.
#[allow(clippy::await_holding_lock)]
async fn a_hundred_watchers_and_a_thousand_reconnects_leave_memory_flat_and_training_unslowed() -> anyhow::Result<()> {
    let _cpu = headroom_tests::exclusive();
    let agent = AgentHandle::start_flags(&["--max-connections", "128"], None)?;
    let mut plan = Plan::example_mlp();
    plan.device = DeviceChoice::Cpu;
    plan.schedule = Schedule::Steps(1500);
    // Alone first: how long the run takes with one client.
    let mut ws = agent.connect().await?;
    let alone_ms = run_alone(&mut ws, plan.clone()).await?;
    let rss_before = agent_rss_kib(agent.pid());
    // A thousand clients connect, say hello and leave.
    let t0 = Instant::now();
    for _ in 0..1000 {
        let ws = agent.connect().await?;
        drop(ws);
    }
    let cycles_s = t0.elapsed().as_secs_f64();
    // A hundred watch one run; one of them never reads.
    let mut watchers = Vec::new();
    for _ in 0..99 {
        watchers.push(agent.connect().await?);
    }
    let stalled = agent.connect_slow(4096).await?;
    send(&mut ws, &ToAgent::Submit { plan: plan.clone(), force: false, key: None }).await?;
    let job = match recv(&mut ws).await? {
        ToClient::Accepted { job, .. } => job,
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    };
    let cpu_before = agent_cpu_s(agent.pid());
    let mut stalled = stalled;
    send(&mut stalled, &ToAgent::Attach { job, after: 0 }).await?;
    for w in &mut watchers {
        send(w, &ToAgent::Attach { job, after: 0 }).await?;
    }
    let mut tasks = Vec::new();
    for mut w in watchers {
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                match recv(&mut w).await? {
                    ToClient::Logged { record: Record::Batch(_), .. } => n += 1,
                    ToClient::Logged { record: Record::Finished { .. }, .. } => return Ok::<u64, anyhow::Error>(n),
                    _ => {}
                }
            }
        }));
    }
    let wall_ms = loop {
        if let ToClient::Logged { record: Record::Finished { summary }, .. } = recv(&mut ws).await? {
            break summary.wall_time_ms;
        }
    };
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await??);
    }
    assert!(counts.iter().all(|&n| n == 1500), "every watcher got every record");
    let agent_cpu = agent_cpu_s(agent.pid()) - cpu_before;
    let rss_after = agent_rss_kib(agent.pid());
    println!(
        "load: 1000 connect/disconnect cycles in {cycles_s:.1} s; 100 clients on one run (one never reading): \
         {wall_ms:.0} ms of training against {alone_ms:.0} ms alone; the agent used {agent_cpu:.2} CPU s for \
         {} records to 100 clients; agent RSS {rss_before} KiB before, {rss_after} KiB after",
        1500 * 100
    );
    assert!(rss_after < rss_before + 64 * 1024, "the agent's memory grew from {rss_before} to {rss_after} KiB");
    drop(stalled);
    Ok(())
}
