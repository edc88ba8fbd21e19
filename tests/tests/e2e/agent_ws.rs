//! The agent over a real WebSocket: jobs stream, and bad clients are refused without
//! disturbing good ones.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use headroom_tests::{AgentHandle, Inbound, Ws, find_child, next, recv, recv_record, send};
use shared::codec::MAX_FRAME_BYTES;
use shared::plan::{DeviceChoice, Earlier, Optimizer, Plan, Schedule};
use shared::protocol::{BatchRecord, ErrorCode, Record, RunState, Summary, ToAgent, ToClient};
use tokio_tungstenite::tungstenite;

fn cpu_plan(mut plan: Plan, steps: u64) -> Plan {
    plan.device = DeviceChoice::Cpu;
    plan.schedule = Schedule::Steps(steps);
    plan
}

/// Submits `plan` and collects its records until it ends.
async fn run_job(ws: &mut Ws, plan: Plan) -> anyhow::Result<(u64, Vec<BatchRecord>, Result<Summary, ToClient>)> {
    run_job_with(ws, plan, false).await
}

async fn run_job_with(
    ws: &mut Ws,
    plan: Plan,
    force: bool,
) -> anyhow::Result<(u64, Vec<BatchRecord>, Result<Summary, ToClient>)> {
    send(ws, &ToAgent::Submit { plan, force, key: None }).await?;
    let estimate = match recv(ws).await? {
        ToClient::Accepted { estimate, device, .. } => {
            assert_eq!(device, "cpu");
            estimate.peak_bytes.get()
        }
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    };
    let mut records = Vec::new();
    loop {
        match recv(ws).await? {
            ToClient::Logged { record: Record::Batch(r), .. } => records.push(r),
            ToClient::Logged { record: Record::Finished { summary }, .. } => {
                return Ok((estimate, records, Ok(summary)));
            }
            other => return Ok((estimate, records, Err(other))),
        }
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[tokio::test]
async fn a_job_streams_every_micro_batch_learns_and_matches_its_estimate() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let mut plan = cpu_plan(Plan::example_mlp(), 40);
    plan.accumulation = 2;
    let (estimate, records, summary) = run_job(&mut ws, plan).await?;
    let summary = summary.map_err(|m| anyhow::anyhow!("job did not finish: {m:?}"))?;

    assert_eq!(records.len(), 80, "40 steps x 2 micro-batches");
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.step, i as u64 / 2 + 1);
        assert_eq!(r.micro_batch, i as u64 % 2 + 1);
        assert!(r.allocated_bytes > 0 && r.host_rss_bytes > 0, "{r:?}");
        assert!(r.peak_bytes >= r.allocated_bytes, "peak below allocated: {r:?}");
        assert!(r.loss.is_finite() && r.step_time_ms > 0.0);
        assert_eq!(r.reserved_bytes, None, "no caching allocator on the CPU");
    }
    let losses: Vec<f64> = records.iter().map(|r| r.loss).collect();
    let (first, last) = (mean(&losses[..10]), mean(&losses[70..]));
    assert!(last < 0.5 * first, "loss should fall: first ten {first:.3}, last ten {last:.3}");
    assert_eq!(summary.micro_batches, 80);
    assert_eq!(summary.estimated_peak_bytes, estimate);
    // The counting allocator is exact and the MLP's timeline is fully modelled.
    let err = (estimate as f64 - summary.peak_bytes as f64).abs() / summary.peak_bytes as f64;
    assert!(err < 0.005, "estimate {estimate} vs measured {} ({:.3} %)", summary.peak_bytes, err * 100.0);
    Ok(())
}

#[tokio::test]
async fn a_cnn_job_matches_its_estimate_within_two_percent() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let (estimate, records, summary) = run_job(&mut ws, cpu_plan(Plan::example_cnn(), 6)).await?;
    let summary = summary.map_err(|m| anyhow::anyhow!("job did not finish: {m:?}"))?;
    assert_eq!(records.len(), 12);
    let err = (estimate as f64 - summary.peak_bytes as f64).abs() / summary.peak_bytes as f64;
    assert!(err < 0.02, "estimate {estimate} vs measured {} ({:.3} %)", summary.peak_bytes, err * 100.0);
    Ok(())
}

/// A good client still gets a Hello and a job done.
async fn still_serves(agent: &AgentHandle) -> anyhow::Result<()> {
    let mut ws = agent.connect().await?;
    let (_, records, summary) = run_job(&mut ws, cpu_plan(Plan::example_mlp(), 2)).await?;
    assert!(summary.is_ok(), "{summary:?}");
    assert_eq!(records.len(), 2);
    Ok(())
}

fn http_refusal(result: Result<Ws, tungstenite::Error>) -> (u16, String) {
    match result {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, but the upgrade succeeded"),
    }
}

#[tokio::test]
async fn handshakes_without_the_right_token_or_origin_are_refused() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let (status, body) = http_refusal(agent.connect_with(None, None).await);
    assert_eq!((status, body.contains("missing token")), (401, true), "{body}");
    let (status, body) = http_refusal(agent.connect_with(Some("0123456789abcdef0123456789abcdef"), None).await);
    assert_eq!((status, body.as_str()), (401, "unknown or revoked token"));
    let (status, body) = http_refusal(agent.connect_with(Some(&agent.token), Some("http://evil.example")).await);
    assert_eq!(status, 403);
    assert!(body.contains("origin \"http://evil.example\" is not allowed"), "{body}");
    // The agent's own origin is fine.
    let own = format!("http://localhost:{}", agent.port);
    let mut ws = agent.connect_with(Some(&agent.token), Some(&own)).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Hello(_)));
    still_serves(&agent).await
}

/// Sends raw bytes and expects an Error with `code`, then a close with `close_code`.
async fn expect_rejected(
    agent: &AgentHandle,
    frame: tungstenite::Message,
    code: ErrorCode,
    close_code: u16,
) -> anyhow::Result<()> {
    let mut ws = agent.connect().await?;
    ws.send(frame).await?;
    match next(&mut ws).await? {
        Inbound::Message(ToClient::Error { code: got, message }) => {
            assert_eq!(got, code, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected an Error message for {code:?}, got {other:?}"),
    }
    match next(&mut ws).await? {
        Inbound::Closed(Some(frame)) => assert_eq!(u16::from(frame.code), close_code, "{frame:?}"),
        other => panic!("expected a close frame, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn bad_frames_get_an_error_and_a_close_and_others_keep_working() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    // A client that stays connected throughout must not notice anything.
    let mut bystander = agent.connect().await?;

    let mut other_version = shared::codec::encode(&ToAgent::Cancel { job: 1 })?;
    other_version[..2].copy_from_slice(&(shared::protocol::PROTOCOL_VERSION + 1).to_le_bytes());
    expect_rejected(&agent, tungstenite::Message::Binary(other_version.into()), ErrorCode::UnsupportedVersion, 1002)
        .await?;
    expect_rejected(
        &agent,
        // This version's header, then bytes that decode to nothing.
        tungstenite::Message::Binary(
            [shared::protocol::PROTOCOL_VERSION.to_le_bytes().as_slice(), &[0xff, 0xfe, 0xfd]].concat().into(),
        ),
        ErrorCode::Malformed,
        1007,
    )
    .await?;
    let oversized = vec![0u8; MAX_FRAME_BYTES + 512 * 1024];
    expect_rejected(&agent, tungstenite::Message::Binary(oversized.into()), ErrorCode::TooLarge, 1009).await?;
    expect_rejected(&agent, tungstenite::Message::Text("{\"submit\": {}}".into()), ErrorCode::Unexpected, 1003).await?;

    // Far past the limit, tungstenite itself refuses to buffer the frame.
    let mut ws = agent.connect().await?;
    let _ = ws.send(tungstenite::Message::Binary(vec![0u8; 3 * MAX_FRAME_BYTES].into())).await;
    // The agent answers TooLarge or drops the connection (a close, a reset), well within
    // the client's own 60 s timeout, which must not pass for an answer.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(tungstenite::Message::Close(_))) => return "closed",
                Some(Ok(tungstenite::Message::Binary(b))) => {
                    if let Ok(ToClient::Error { code: ErrorCode::TooLarge, .. }) = shared::codec::decode(&b) {
                        return "refused as too large";
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a huge frame must end the connection within 20 s; it is still open");

    let (_, records, summary) = run_job(&mut bystander, cpu_plan(Plan::example_mlp(), 3)).await?;
    assert!(summary.is_ok() && records.len() == 3, "{summary:?}");
    still_serves(&agent).await
}

/// A Submit just under the 1 MiB message limit (a plan with a megabyte-long unknown model
/// key) decodes and is refused as an invalid plan, its reply quoting the key cut short;
/// over the limit it is too large.
#[tokio::test]
async fn a_submit_just_under_the_message_limit_is_refused_for_its_plan_not_its_size() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let submit = |len: usize| {
        let mut plan = cpu_plan(Plan::example_mlp(), 3);
        plan.model.settings.insert("k".repeat(len), "1".into());
        ToAgent::Submit { plan, force: false, key: None }
    };
    let base = shared::codec::encode(&submit(0))?.len();
    let frame = shared::codec::encode(&submit(MAX_FRAME_BYTES - base - 8))?;
    assert!(frame.len() > MAX_FRAME_BYTES - 16 && frame.len() <= MAX_FRAME_BYTES, "{}", frame.len());
    let mut ws = agent.connect().await?;
    ws.send(tungstenite::Message::Binary(frame.into())).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::InvalidPlan, message } => {
            assert!(
                message.contains("unknown key 'kkkk") && message.len() < 2_000,
                "{} bytes: {}",
                message.len(),
                &message[..200.min(message.len())]
            );
        }
        other => panic!("expected InvalidPlan, got {other:?}"),
    }
    // The connection goes on serving.
    let (_, records, summary) = run_job(&mut ws, cpu_plan(Plan::example_mlp(), 2)).await?;
    assert!(summary.is_ok() && records.len() == 2, "{summary:?}");
    let mut over = shared::codec::encode(&submit(0))?;
    over.resize(MAX_FRAME_BYTES + 1, 0);
    expect_rejected(&agent, tungstenite::Message::Binary(over.into()), ErrorCode::TooLarge, 1009).await
}

#[tokio::test]
async fn the_configured_message_size_and_rate_limits_hold() -> anyhow::Result<()> {
    let flags = ["--max-message-bytes", "4096", "--max-messages-per-second", "1"];
    let agent = AgentHandle::start_flags(&flags, None)?;
    // Over the configured 4 KiB, far below the protocol's 1 MiB.
    let big = shared::codec::encode(&ToClient::Error { code: ErrorCode::Internal, message: "x".repeat(5000) })?;
    expect_rejected(&agent, tungstenite::Message::Binary(big.into()), ErrorCode::TooLarge, 1009).await?;
    // 1 a second with bursts of 2: a client asking as fast as it is answered gets 2
    // answers, and what refills meanwhile, then is told why and closed.
    let mut ws = agent.connect().await?;
    let mut answered = 0;
    for _ in 0..14 {
        send(&mut ws, &ToAgent::ListRuns { before: None, limit: 1 }).await?;
        match next(&mut ws).await? {
            Inbound::Message(ToClient::Runs { .. }) => answered += 1,
            Inbound::Message(ToClient::Error { code: ErrorCode::RateLimited, message }) => {
                assert!(message.contains("--max-messages-per-second"), "{message}");
                break;
            }
            other => panic!("expected Runs or RateLimited, got {other:?}"),
        }
    }
    assert!((2..=4).contains(&answered), "{answered} answered");
    assert!(matches!(next(&mut ws).await?, Inbound::Closed(Some(f)) if u16::from(f.code) == 1008));
    still_serves(&agent).await?;
    // Out-of-range limits are refused before the agent starts.
    let (code, _, err) = headroom_tests::cli(&["serve", "--max-message-bytes", "100"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-message-bytes") && err.contains("4096"), "{err}");
    let (code, _, err) = headroom_tests::cli(&["serve", "--write-buffer-bytes", "1"])?;
    assert!(code == 2 && err.contains("--write-buffer-bytes"), "{err}");
    let (code, _, err) = headroom_tests::cli(&["serve", "--max-runs-kept", "0"])?;
    assert!(code == 2 && err.contains("--max-runs-kept"), "{err}");
    Ok(())
}

#[tokio::test]
async fn invalid_plans_busy_agents_and_unknown_jobs_get_clear_errors() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let mut bad = Plan::example_mlp();
    bad.micro_batch = 0;
    send(&mut ws, &ToAgent::Submit { plan: bad, force: false, key: None }).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::InvalidPlan, message } => {
            assert!(message.starts_with("micro_batch:"), "{message}")
        }
        other => panic!("expected InvalidPlan, got {other:?}"),
    }
    send(&mut ws, &ToAgent::Cancel { job: 99 }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Error { code: ErrorCode::UnknownJob, .. }));

    // One job at a time: a second client's run waits in the queue.
    send(&mut ws, &ToAgent::Submit { plan: cpu_plan(Plan::example_mlp(), 100_000), force: false, key: None }).await?;
    let job = match recv(&mut ws).await? {
        ToClient::Accepted { job, .. } => job,
        other => panic!("expected Accepted, got {other:?}"),
    };
    // It runs once its first record arrives.
    assert!(matches!(recv(&mut ws).await?, ToClient::Logged { record: Record::Batch(_), .. }));
    let mut second = agent.connect().await?;
    send(&mut second, &ToAgent::Submit { plan: cpu_plan(Plan::example_mlp(), 2), force: false, key: None }).await?;
    let queued = match recv(&mut second).await? {
        ToClient::Accepted { job, .. } => job,
        other => panic!("expected Accepted (queued), got {other:?}"),
    };
    send(&mut second, &ToAgent::ListRuns { before: None, limit: 100 }).await?;
    match recv(&mut second).await? {
        ToClient::Runs { runs, .. } => {
            let state = |j| runs.iter().find(|r| r.job == j).map(|r| r.state);
            assert_eq!(state(job), Some(RunState::Running), "{runs:?}");
            assert_eq!(state(queued), Some(RunState::Queued), "{runs:?}");
        }
        other => panic!("expected Runs, got {other:?}"),
    }
    // What a fleet view polls: the devices' free memory and the queue.
    send(&mut second, &ToAgent::Status).await?;
    match recv(&mut second).await? {
        ToClient::AgentStatus(status) => {
            let cpu = status.devices.iter().find(|d| d.id == "cpu").expect("cpu");
            assert_eq!(cpu.running, vec![job], "{status:?}");
            assert!(cpu.free_memory_bytes.is_some_and(|f| f > 0 && f <= cpu.total_memory_bytes), "{status:?}");
            assert_eq!(status.queued, vec![queued], "{status:?}");
            assert!(status.max_queued > 0);
        }
        other => panic!("expected AgentStatus, got {other:?}"),
    }
    // One run's plan, as the agent resolved it, and its planned steps.
    send(&mut second, &ToAgent::GetRun { job: queued }).await?;
    match recv(&mut second).await? {
        ToClient::Run { info, plan, estimate } => {
            assert_eq!((info.job, info.state, info.steps), (queued, RunState::Queued, 2));
            assert_eq!(estimate.map(|e| e.peak_bytes.get()), Some(info.estimated_peak_bytes));
            assert_eq!(plan.device, DeviceChoice::Cpu);
        }
        other => panic!("expected Run, got {other:?}"),
    }
    send(&mut second, &ToAgent::GetRun { job: 9999 }).await?;
    assert!(matches!(recv(&mut second).await?, ToClient::Error { code: ErrorCode::UnknownJob, .. }));
    // A third run is cancelled while it waits.
    send(&mut second, &ToAgent::Submit { plan: cpu_plan(Plan::example_mlp(), 2), force: false, key: None }).await?;
    let third = match recv(&mut second).await? {
        ToClient::Accepted { job, .. } => job,
        other => panic!("expected Accepted, got {other:?}"),
    };
    send(&mut second, &ToAgent::Cancel { job: third }).await?;
    match recv(&mut second).await? {
        ToClient::Logged { job, record: Record::Failed { error }, .. } => {
            assert_eq!((job, error.code), (third, ErrorCode::Cancelled), "{}", error.message);
            assert!(error.message.contains("queued"), "{}", error.message);
        }
        other => panic!("expected the queued run cancelled, got {other:?}"),
    }

    // Cancelling ends the long job with Cancelled (from any connection).
    send(&mut second, &ToAgent::Cancel { job }).await?;
    loop {
        match recv(&mut ws).await? {
            ToClient::Logged { record: Record::Batch(_), .. } => continue,
            ToClient::Logged { record: Record::Failed { error }, .. } => {
                assert_eq!(error.code, ErrorCode::Cancelled, "{}", error.message);
                break;
            }
            other => panic!("expected Failed(Cancelled), got {other:?}"),
        }
    }
    // Then the queued run runs. A session watches one run at a time (the last it
    // submitted or attached to): back to the queued one, from its start.
    send(&mut second, &ToAgent::Attach { job: queued, after: 0 }).await?;
    loop {
        match recv(&mut second).await? {
            ToClient::Logged { record: Record::Batch(b), .. } => assert_eq!(b.job, queued),
            ToClient::Logged { job, record: Record::Finished { .. }, .. } => {
                assert_eq!(job, queued);
                break;
            }
            other => panic!("expected the queued run's records, got {other:?}"),
        }
    }
    // Cancelling a run that has ended: known, nothing to cancel; not an unknown run.
    send(&mut ws, &ToAgent::Cancel { job }).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::Unexpected, message } => assert!(message.contains("has ended"), "{message}"),
        other => panic!("expected an error for an ended run, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn running_out_of_memory_fails_the_job_not_the_agent() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let mut plan = cpu_plan(Plan::example_mlp(), 5);
    // The plan needs about 1.8 MiB at its peak; give it 1.5 MiB.
    plan.memory_limit_bytes = Some(1536 * 1024);
    // Its estimate exceeds that, so the agent runs it only when told to.
    let (_, _, result) = run_job_with(&mut ws, plan, true).await?;
    match result {
        Err(ToClient::Logged { record: Record::Failed { error }, .. }) => {
            assert_eq!(error.code, ErrorCode::OutOfMemory, "{}", error.message);
            assert!(error.message.contains("limit of 1572864 bytes"), "{}", error.message);
        }
        other => panic!("expected an out-of-memory failure, got {other:?}"),
    }
    still_serves(&agent).await
}

#[tokio::test]
async fn a_crashed_worker_is_reported_and_the_agent_lives_on() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    send(&mut ws, &ToAgent::Submit { plan: cpu_plan(Plan::example_mlp(), 100_000), force: false, key: None }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Accepted { .. }));
    assert!(matches!(recv(&mut ws).await?, ToClient::Logged { record: Record::Batch(_), .. }));
    // Kill the worker as a segfault inside libtorch would.
    let worker = find_child(agent.pid(), "worker").expect("a worker process");
    // SAFETY: sending a signal to a process this test started (through the agent).
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    loop {
        match recv(&mut ws).await? {
            ToClient::Logged { record: Record::Batch(_), .. } => continue,
            ToClient::Logged { record: Record::Failed { error }, .. } => {
                assert_eq!(error.code, ErrorCode::WorkerCrashed, "{}", error.message);
                assert!(error.message.contains("signal: 9"), "{}", error.message);
                let after = killed.elapsed();
                println!("the crash was reported {:.0} ms after the kill", after.as_secs_f64() * 1e3);
                assert!(after < std::time::Duration::from_secs(1), "{after:?}");
                break;
            }
            other => panic!("expected WorkerCrashed, got {other:?}"),
        }
    }
    still_serves(&agent).await
}

#[tokio::test]
async fn a_client_that_stops_reading_never_holds_training_back() -> anyhow::Result<()> {
    // Many tiny micro-batches: far more records than the live buffer (1024) and the
    // connection's 256 KiB send buffer hold, produced in seconds.
    const STEPS: u64 = 20_000;
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect_slow(4096).await?;
    let plan = Plan {
        model: Earlier::Mlp { hidden: vec![4] }.into(),
        input_shape: vec![4],
        classes: 2,
        micro_batch: 1,
        optimizer: Optimizer::Sgd { momentum: 0.0, weight_decay: 0.0, nesterov: false },
        learning_rate: 0.01,
        ..cpu_plan(Plan::example_mlp(), STEPS)
    };
    send(&mut ws, &ToAgent::Submit { plan, force: false, key: None }).await?;
    let job = match recv(&mut ws).await? {
        ToClient::Accepted { job, .. } => job,
        other => panic!("expected Accepted, got {other:?}"),
    };
    // Read nothing: if a full socket held the worker back, the run would never finish.
    let started = std::time::Instant::now();
    let mut probe = agent.connect().await?;
    loop {
        anyhow::ensure!(started.elapsed().as_secs() < 240, "training stalled while the client was not reading");
        send(&mut probe, &ToAgent::ListRuns { before: None, limit: 100 }).await?;
        match recv(&mut probe).await? {
            ToClient::Runs { runs, .. } if runs.iter().any(|r| r.job == job && r.state == RunState::Finished) => break,
            ToClient::Runs { .. } => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            other => panic!("expected Runs, got {other:?}"),
        }
    }
    let trained = started.elapsed();
    // The stalled client is dropped once a write has waited 10 s; the run's records are
    // all on disk, and attaching again delivers every one, in order, once.
    let mut fresh = agent.connect().await?;
    send(&mut fresh, &ToAgent::Attach { job, after: 0 }).await?;
    let mut seqs = Vec::new();
    let summary = loop {
        match recv_record(&mut fresh).await? {
            (seq, _, Record::Batch(_)) => seqs.push(seq),
            (seq, _, Record::Finished { summary }) => {
                seqs.push(seq);
                break summary;
            }
            other => panic!("expected records then Finished, got {other:?}"),
        }
    };
    eprintln!(
        "slow client: the run took {:.1} s while it read nothing; {} records replayed, {} dropped",
        trained.as_secs_f64(),
        seqs.len(),
        summary.dropped_records
    );
    assert_eq!(summary.micro_batches, STEPS);
    assert_eq!(summary.dropped_records, 0, "nothing is dropped between the worker and the disk");
    assert_eq!(seqs, (1..=STEPS + 1).collect::<Vec<_>>(), "every record once, in order");
    Ok(())
}

/// One raw HTTP/1.1 request with this `Host`; the response's head and body as text.
async fn get_with_host(port: u16, host: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out.to_ascii_lowercase())
}

#[tokio::test]
async fn requests_for_a_foreign_host_name_are_refused_and_pages_carry_security_headers() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let agent = AgentHandle::start(None)?;
    // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    let page = get_with_host(agent.port, &format!("evil.example:{}", agent.port)).await?;
    assert!(page.starts_with("http/1.1 403"), "{page}");
    let mut req = format!("ws://127.0.0.1:{}/ws?token={}", agent.port, agent.token).into_client_request()?;
    req.headers_mut()
        .insert("host", tungstenite::http::HeaderValue::from_str(&format!("evil.example:{}", agent.port))?);
    let (status, body) = http_refusal(tokio_tungstenite::connect_async(req).await.map(|(ws, _)| ws));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not this agent's"), "{body}");
    // Its own names are served, with headers against framing, referrers and sniffing.
    for host in [format!("127.0.0.1:{}", agent.port), format!("localhost:{}", agent.port)] {
        let page = get_with_host(agent.port, &host).await?;
        assert!(page.starts_with("http/1.1 200"), "{page}");
        for header in ["x-frame-options: deny", "referrer-policy: no-referrer", "x-content-type-options: nosniff"] {
            assert!(page.contains(header), "{header} missing: {page}");
        }
        assert!(page.contains("content-security-policy: frame-ancestors 'none'"), "{page}");
    }
    still_serves(&agent).await
}
