//! Durable, re-attachable runs: a run outlives its client, reconnects resume without a
//! gap or a duplicate, and the agent's death (`kill -9`) or shutdown (SIGTERM) leaves
//! every record a client saw on disk and the run marked interrupted.

use std::time::{Duration, Instant};

use headroom_tests::{AgentHandle, Ws, find_child, recv, recv_record, send};
use shared::plan::{DeviceChoice, Plan, Schedule};
use shared::protocol::{ErrorCode, JobId, Record, RunState, ToAgent, ToClient};

fn cpu_plan(steps: u64) -> Plan {
    let mut plan = Plan::example_mlp();
    plan.device = DeviceChoice::Cpu;
    plan.schedule = Schedule::Steps(steps);
    plan
}

async fn submit(ws: &mut Ws, plan: Plan) -> anyhow::Result<JobId> {
    send(ws, &ToAgent::Submit { plan, force: false, key: None }).await?;
    match recv(ws).await? {
        ToClient::Accepted { job, .. } => Ok(job),
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    }
}

/// Reads up to `n` numbered records, stopping after a terminal one; returns them.
async fn take(ws: &mut Ws, n: usize) -> anyhow::Result<Vec<(u64, Record)>> {
    let mut out = Vec::new();
    while out.len() < n {
        let (seq, _, m) = recv_record(ws).await?;
        let end = m.is_terminal();
        out.push((seq, m));
        if end {
            break;
        }
    }
    Ok(out)
}

/// Whether process `pid` still runs (a zombie waiting to be reaped has stopped).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

fn ended(records: &[(u64, Record)]) -> bool {
    records.last().is_some_and(|(_, m)| m.is_terminal())
}

/// The agent's newest runs (one page), newest first.
pub(crate) async fn runs(ws: &mut Ws) -> anyhow::Result<Vec<shared::protocol::RunInfo>> {
    send(ws, &ToAgent::ListRuns { before: None, limit: 100 }).await?;
    match recv(ws).await? {
        ToClient::Runs { runs, .. } => Ok(runs),
        other => anyhow::bail!("expected Runs, got {other:?}"),
    }
}

#[tokio::test]
async fn connections_cut_at_random_points_resume_with_no_gap_and_no_duplicate() -> anyhow::Result<()> {
    const STEPS: u64 = 400;
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let job = submit(&mut ws, cpu_plan(STEPS)).await?;
    // A second client watches the whole run from the start, uninterrupted.
    let mut watcher = agent.connect().await?;
    send(&mut watcher, &ToAgent::Attach { job, after: 0 }).await?;
    // The first reads a few records at a time and drops its connection each time (a
    // closed tab, a network blip), then attaches again after the last record it has.
    let mut got: Vec<(u64, Record)> = take(&mut ws, 3).await?;
    drop(ws);
    let mut cuts = 0;
    let mut x = 0x9E37_79B9u64;
    while !ended(&got) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut ws = agent.connect().await?;
        send(&mut ws, &ToAgent::Attach { job, after: got.last().map_or(0, |r| r.0) }).await?;
        got.extend(take(&mut ws, 1 + (x % 60) as usize).await?);
        cuts += 1;
    }
    let seqs: Vec<u64> = got.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap, no duplicate over {cuts} cuts");
    let steps: Vec<u64> =
        got.iter().filter_map(|(_, m)| if let Record::Batch(b) = m { Some(b.step) } else { None }).collect();
    assert_eq!(steps, (1..=STEPS).collect::<Vec<_>>());
    assert!(matches!(got.last(), Some((_, Record::Finished { .. }))));
    let all = take(&mut watcher, usize::MAX).await?;
    assert_eq!(all.len(), got.len(), "the uninterrupted watcher saw the same records");
    assert!(all.iter().zip(&got).all(|(a, b)| a == b));
    println!("{cuts} reconnects, {} records, none lost or repeated", got.len());
    Ok(())
}

#[tokio::test]
async fn kill_9_of_the_agent_keeps_every_record_seen_and_marks_the_run_interrupted() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let dir = data.path().display().to_string();
    let token = "b".repeat(32);
    let args = ["--listen", "127.0.0.1:0", "--token", &token, "--data-dir", &dir];
    let mut agent = AgentHandle::start_with(&args, token.clone(), None)?;
    let mut ws = agent.connect().await?;
    let job = submit(&mut ws, cpu_plan(1_000_000)).await?;
    let mut other = agent.connect().await?;
    let queued = submit(&mut other, cpu_plan(3)).await?;
    let seen = take(&mut ws, 20).await?;
    let worker = find_child(agent.pid(), "worker").expect("a worker process");
    let status = agent.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))?;
    println!("agent: {status}");
    // The worker dies with the agent (PR_SET_PDEATHSIG): no orphan holds the device.
    let t0 = Instant::now();
    while alive(worker) {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(2), "the worker outlived the agent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("worker gone {:.0} ms after the agent", t0.elapsed().as_secs_f64() * 1e3);
    let agent = AgentHandle::start_with(&args, token.clone(), None)?;
    let mut ws = agent.connect().await?;
    let list = runs(&mut ws).await?;
    let info = list.iter().find(|r| r.job == job).expect("the run survives the restart");
    assert_eq!(info.state, RunState::Interrupted, "{info:?}");
    // Every record the client saw is there, the same, followed by the interruption.
    send(&mut ws, &ToAgent::Attach { job, after: 0 }).await?;
    let replay = take(&mut ws, usize::MAX).await?;
    assert!(replay.len() > seen.len());
    assert!(seen.iter().zip(&replay).all(|(a, b)| a == b), "a record seen before the kill changed");
    match replay.last() {
        Some((_, Record::Failed { error })) => assert_eq!(error.code, ErrorCode::Interrupted, "{}", error.message),
        other => panic!("expected the run to end interrupted, got {other:?}"),
    }
    let seqs: Vec<u64> = replay.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // The queued run survived the restart in the queue, and now runs.
    send(&mut ws, &ToAgent::Attach { job: queued, after: 0 }).await?;
    let rest = take(&mut ws, usize::MAX).await?;
    assert!(matches!(rest.last(), Some((_, Record::Finished { .. }))), "{:?}", rest.last());
    // New runs get new numbers.
    let next = submit(&mut ws, cpu_plan(1)).await?;
    assert!(next > queued, "{next} after {queued}");
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_the_batch_finish_tells_clients_and_leaves_no_worker() -> anyhow::Result<()> {
    let mut agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let job = submit(&mut ws, cpu_plan(1_000_000)).await?;
    take(&mut ws, 5).await?;
    let worker = find_child(agent.pid(), "worker").expect("a worker process");
    // SAFETY: signalling the agent this test started.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGTERM) };
    // The client is told how its run ended before the agent goes.
    let end = loop {
        if let (_, _, Record::Failed { error }) = recv_record(&mut ws).await? {
            break error;
        }
    };
    assert_eq!(end.code, ErrorCode::Interrupted, "{}", end.message);
    let status = agent.signal_and_wait(0, Duration::from_secs(15))?;
    assert!(status.success(), "a graceful exit: {status}");
    assert!(!alive(worker), "the worker is gone");
    // On disk the run ended interrupted.
    let stored = std::fs::read_to_string(agent.data_dir.join(format!("runs/{job}/run.json")))?;
    assert!(stored.contains("\"Interrupted\""), "{stored}");
    Ok(())
}

#[tokio::test]
async fn a_run_outlives_its_client_and_unknown_runs_are_refused() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let mut ws = agent.connect().await?;
    let job = submit(&mut ws, cpu_plan(50)).await?;
    drop(ws);
    let mut ws = agent.connect().await?;
    let t0 = Instant::now();
    loop {
        let list = runs(&mut ws).await?;
        if list.iter().any(|r| r.job == job && r.state == RunState::Finished) {
            break;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(60), "the run did not finish without its client");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send(&mut ws, &ToAgent::Attach { job: 9999, after: 0 }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Error { code: ErrorCode::UnknownJob, .. }));
    // Attaching past the last record is refused, naming how many there are...
    send(&mut ws, &ToAgent::Attach { job, after: 52 }).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::Unexpected, message } => {
            assert!(message.contains("51 records"), "{message}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
    // ... and attaching after the last record of an ended run sends nothing more.
    send(&mut ws, &ToAgent::Attach { job, after: 51 }).await?;
    send(&mut ws, &ToAgent::ListRuns { before: None, limit: 100 }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Runs { .. }));
    Ok(())
}

#[tokio::test]
async fn a_submission_whose_answer_was_lost_is_sent_again_with_its_key_and_runs_once() -> anyhow::Result<()> {
    let agent = AgentHandle::start(None)?;
    let key = Some(0x5eed_1234_abcd_0001);
    let plan = cpu_plan(40);
    // The connection drops after the Submit is sent, before the client reads Accepted.
    let mut ws = agent.connect().await?;
    send(&mut ws, &ToAgent::Submit { plan: plan.clone(), force: false, key }).await?;
    drop(ws);
    let mut ws = agent.connect().await?;
    let t0 = Instant::now();
    let job = loop {
        if let Some(r) = runs(&mut ws).await?.first() {
            break r.job;
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(10), "the first Submit never became a run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Sent again, it is answered with the run it became, and the records come from the
    // first, each once.
    send(&mut ws, &ToAgent::Submit { plan: plan.clone(), force: false, key }).await?;
    match recv(&mut ws).await? {
        ToClient::Accepted { job: j, device, .. } => assert_eq!((j, device.as_str()), (job, "cpu")),
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    }
    let records = take(&mut ws, 1000).await?;
    assert!(ended(&records), "the run ends");
    let seqs: Vec<u64> = records.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "from the first record, no gap, no duplicate");
    let list = runs(&mut ws).await?;
    assert_eq!(list.iter().map(|r| r.job).collect::<Vec<_>>(), vec![job], "one run, not two");
    // The same key with another plan is refused, naming the run; a new key is a new run.
    send(&mut ws, &ToAgent::Submit { plan: cpu_plan(41), force: false, key }).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::InvalidPlan, message } => {
            assert!(message.contains(&format!("run {job}")) && message.contains("another plan"), "{message}");
        }
        other => anyhow::bail!("expected an error, got {other:?}"),
    }
    send(&mut ws, &ToAgent::Submit { plan, force: false, key: Some(0x5eed_1234_abcd_0002) }).await?;
    match recv(&mut ws).await? {
        ToClient::Accepted { job: j, .. } => assert_eq!(j, job + 1),
        other => anyhow::bail!("expected Accepted, got {other:?}"),
    }
    println!(
        "a lost answer: the Submit sent again with its key came back as run {job} ({} records, once each)",
        seqs.len()
    );
    Ok(())
}

#[tokio::test]
async fn limits_on_steps_time_queue_and_capacity_are_enforced() -> anyhow::Result<()> {
    let flags = ["--max-job-steps", "1000000", "--max-job-seconds", "2", "--max-queued", "1"];
    let agent = AgentHandle::start_flags(&flags, None)?;
    let mut ws = agent.connect().await?;
    // Steps past the limit are refused before anything runs.
    send(&mut ws, &ToAgent::Submit { plan: cpu_plan(1_000_001), force: false, key: None }).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::Limit, message } => {
            assert!(message.contains("--max-job-steps"), "{message}")
        }
        other => panic!("expected a step limit, got {other:?}"),
    }
    // A run past its time is stopped.
    let t0 = Instant::now();
    let long = submit(&mut ws, cpu_plan(1_000_000)).await?;
    // Once it runs (its first record), the queue holds one more; the next is refused.
    take(&mut ws, 1).await?;
    let mut other = agent.connect().await?;
    submit(&mut other, cpu_plan(2)).await?;
    send(&mut other, &ToAgent::Submit { plan: cpu_plan(2), force: false, key: None }).await?;
    match recv(&mut other).await? {
        ToClient::Error { code: ErrorCode::Busy, message } => {
            assert!(message.contains("1 runs are queued"), "{message}")
        }
        other => panic!("expected a full queue, got {other:?}"),
    }
    let end = loop {
        if let (_, job, Record::Failed { error }) = recv_record(&mut ws).await? {
            assert_eq!(job, long);
            break error;
        }
    };
    assert_eq!(end.code, ErrorCode::Limit, "{}", end.message);
    assert!(end.message.contains("--max-job-seconds"), "{}", end.message);
    println!("stopped {:.1} s after it was submitted (limit 2 s)", t0.elapsed().as_secs_f64());
    // The queued run then runs to its end (and leaves the queue empty).
    let rest = take(&mut other, usize::MAX).await?;
    assert!(matches!(rest.last(), Some((_, Record::Finished { .. }))), "{:?}", rest.last());
    // A run whose estimate exceeds its memory is refused unless forced; forced, it runs
    // and meets the limit for real.
    let mut big = cpu_plan(3);
    big.memory_limit_bytes = Some(512 * 1024);
    send(&mut ws, &ToAgent::Submit { plan: big.clone(), force: false, key: None }).await?;
    match recv(&mut ws).await? {
        ToClient::Error { code: ErrorCode::Limit, message } => assert!(message.contains("force"), "{message}"),
        other => panic!("expected a refusal over capacity, got {other:?}"),
    }
    send(&mut ws, &ToAgent::Submit { plan: big, force: true, key: None }).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Accepted { .. }));
    let end = loop {
        if let (_, _, Record::Failed { error }) = recv_record(&mut ws).await? {
            break error;
        }
    };
    assert_eq!(end.code, ErrorCode::OutOfMemory, "{}", end.message);
    Ok(())
}
