//! The planner in headless Chromium, driven through ChromeDriver: load the page the
//! agent serves, run a job from the UI and check the charts received the stream; edit,
//! advise, share, open links (good and damaged) and export; screenshots of the main
//! views at 1280 and 390 px under `target/e2e-screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use headroom_tests::{AgentHandle, free_port, repo_root, web_dir};
use shared::plan::Plan;

struct ChromeDriver(Child);

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_chromedriver() -> anyhow::Result<(ChromeDriver, u16)> {
    let port = free_port()?;
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting chromedriver (scripts/setup.sh installs it): {e}"))?;
    let driver = ChromeDriver(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "chromedriver did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((driver, port))
}

/// Polls `f` until it returns `Some`, or fails after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn browser() -> anyhow::Result<(fantoccini::Client, ChromeDriver, std::path::PathBuf)> {
    let (driver, port) = start_chromedriver().await?;
    let profile = std::env::temp_dir().join(format!("headroom-chromium-{}-{port}", std::process::id()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,1400",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await?;
    Ok((client, driver, profile))
}

fn shots_dir() -> anyhow::Result<std::path::PathBuf> {
    let shots = repo_root().join("target/e2e-screenshots");
    std::fs::create_dir_all(&shots)?;
    Ok(shots)
}

async fn screenshot(client: &fantoccini::Client, name: &str) -> anyhow::Result<()> {
    let png = client.screenshot().await?;
    std::fs::write(shots_dir()?.join(format!("{name}.png")), png)?;
    Ok(())
}

#[tokio::test]
async fn the_planner_runs_a_job_and_charts_the_stream() -> anyhow::Result<()> {
    let agent = AgentHandle::start(Some(web_dir()?))?;
    let (client, _driver, profile) = browser().await?;
    let result = drive(&client, &agent).await;
    // Save what the page looked like, pass or fail, for people to look at.
    let _ = screenshot(&client, "run").await;
    client.close().await?;
    let _ = std::fs::remove_dir_all(&profile);
    result
}

#[tokio::test]
async fn the_planner_explains_advises_shares_and_exports() -> anyhow::Result<()> {
    let agent = AgentHandle::start(Some(web_dir()?))?;
    let (client, _driver, profile) = browser().await?;
    let result = plan_views(&client, &agent).await;
    if result.is_err() {
        let _ = screenshot(&client, "failure").await;
    }
    client.close().await?;
    let _ = std::fs::remove_dir_all(&profile);
    result
}

#[tokio::test]
async fn the_planner_runs_on_a_second_agent_compares_runs_and_keeps_its_agents() -> anyhow::Result<()> {
    let home = AgentHandle::start(Some(web_dir()?))?;
    // A second agent, as on a lab machine: it allows the page the first one serves.
    let origin = format!("http://127.0.0.1:{}", home.port);
    let lab = AgentHandle::start_flags(&["--allow-origin", &origin], None)?;
    let (client, _driver, profile) = browser().await?;
    let result = fleet(&client, &home, &lab).await;
    let _ = screenshot(&client, "fleet").await;
    client.close().await?;
    let _ = std::fs::remove_dir_all(&profile);
    result
}

async fn click(client: &fantoccini::Client, testid: &str) -> anyhow::Result<()> {
    client.find(Locator::Css(&format!("[data-testid={testid}]"))).await?.click().await?;
    Ok(())
}

/// Waits until the element `testid` has a text that `ok` accepts; that text.
async fn wait_text(
    client: &fantoccini::Client,
    testid: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    eventually(what, Duration::from_secs(60), || async { Ok(text(client, testid).await.ok().filter(|t| ok(t))) }).await
}

async fn run_to_end(client: &fantoccini::Client, steps: u64) -> anyhow::Result<String> {
    click(client, "run").await?;
    run_to_end_of(client, steps).await
}

/// Waits for the watched run to finish after `steps` steps; its status line. Generous:
/// the full test run shares two cores with this test's two agents and Chromium.
async fn run_to_end_of(client: &fantoccini::Client, steps: u64) -> anyhow::Result<String> {
    wait_status(client, &format!("finished: {steps} steps")).await
}

/// Waits for the run view's status line to contain `end`, failing at once if it says
/// the run failed or was refused; the line.
async fn wait_status(client: &fantoccini::Client, end: &str) -> anyhow::Result<String> {
    eventually("the run to finish", Duration::from_secs(240), || async {
        let t = text(client, "job-status").await.unwrap_or_default();
        anyhow::ensure!(!t.contains("failed") && !t.contains("refused"), "the run failed in the page: {t}");
        Ok(t.contains(end).then_some(t))
    })
    .await
}

async fn fleet(client: &fantoccini::Client, home: &AgentHandle, lab: &AgentHandle) -> anyhow::Result<()> {
    client.goto(&url_for(home, &Plan::example_mlp(), "v100-16gb")).await?;
    wait_text(client, "agent-0-connection", "the home agent", |t| t.starts_with("connected")).await?;

    // Unsafe and repeated addresses are refused with the reason.
    type_into(client, "agent-address", "http://10.1.2.3:7878").await?;
    type_into(client, "agent-token", "abc").await?;
    click(client, "agent-add").await?;
    let error = text(client, "agent-error").await?;
    assert!(error.contains("in clear") && error.contains("SSH tunnel"), "{error}");
    type_into(client, "agent-address", &format!("127.0.0.1:{}", home.port)).await?;
    click(client, "agent-add").await?;
    // Without a scheme TLS is assumed: another address than the home agent's.
    assert!(client.find(Locator::Css("[data-testid=agent-error]")).await.is_err(), "wss:// is another address");
    click(client, "agent-1-remove").await?;

    // The lab agent by the URL it printed (the token inside), its devices and queue.
    type_into(client, "agent-token", "").await?;
    type_into(client, "agent-address", &lab.url()).await?;
    click(client, "agent-add").await?;
    wait_text(client, "agent-1-connection", "the lab agent", |t| t.starts_with("connected")).await?;
    let queue = wait_text(client, "agent-1-queue", "the lab agent's queue", |t| t.contains("waiting")).await?;
    assert!(queue.starts_with("queue: 0 waiting"), "{queue}");
    let lab_row = text(client, "agent-1").await?;
    assert!(lab_row.contains("cpu") && lab_row.contains("free of"), "{lab_row}");
    type_into(client, "agent-address", &lab.url()).await?;
    click(client, "agent-add").await?;
    assert!(text(client, "agent-error").await?.contains("already"));
    // Stored for the next visit: the lab agent's token, never the home agent's.
    let stored = client.execute("return localStorage.getItem('headroom.agents')", vec![]).await?;
    let stored = stored.as_str().unwrap_or_default().to_owned();
    assert!(stored.contains(&lab.token) && !stored.contains(&home.token), "{stored}");

    // Run twice on the lab agent, on its CPU; the second with a larger micro-batch.
    click(client, "agent-1-select").await?;
    client.find(Locator::Css("[data-testid=group-run] summary")).await?.click().await?;
    type_into(client, "field-steps", "300").await?;
    select(client, "run-device", "cpu").await?;
    click(client, "run").await?;
    let progress =
        wait_text(client, "job-progress", "progress and ETA", |t| t.contains(" of 300") && t.contains("left")).await?;
    println!("progress line: {progress}");
    eventually("the first run to finish", Duration::from_secs(90), || async {
        Ok(text(client, "job-status").await.ok().filter(|t| t.contains("finished: 300 steps")))
    })
    .await?;
    // Its phases against the estimate it was accepted with.
    let phases = client.find_all(Locator::Css("[data-testid=phase-table] tr")).await?;
    assert!(phases.len() >= 4, "forward, loss, backward, optimizer step");
    type_into(client, "field-steps", "40").await?;
    type_into(client, "field-batch", "64").await?;
    let status = run_to_end(client, 40).await?;
    assert!(status.starts_with("Job 2 finished"), "{status}");

    // The lab agent's history, newest first; compare run 2 (watched) with run 1.
    let rows = eventually("two runs in the history", Duration::from_secs(30), || async {
        let rows = client.find_all(Locator::Css("[data-testid=history] tr")).await?;
        Ok((rows.len() == 3).then_some(rows))
    })
    .await?;
    assert!(rows[1].text().await?.starts_with('2'), "newest first");
    assert!(text(client, "run-1-state").await?.contains("Finished"));
    click(client, "compare-1").await?;
    let table = wait_text(client, "compare-table", "the comparison", |t| t.contains("run 1 (")).await?;
    assert!(table.contains("run 2 (watched)") && table.contains("300") && table.contains("40"), "{table}");
    let compared = client.find_all(Locator::Css("[data-testid=memory-chart] polyline.s-compare")).await?;
    assert_eq!(compared.len(), 1, "the compared run's peak on the memory chart");
    let estimate =
        client.find_all(Locator::Css("[data-testid=memory-chart] [data-testid=memory-chart-estimate]")).await?;
    assert_eq!(estimate.len(), 1, "one estimate line");
    let labels = client.find_all(Locator::Css("[data-testid=memory-chart] text.reference-label")).await?;
    assert_eq!(labels.len(), 2, "the estimate's label and the capacity's");
    assert_eq!(
        client.find(Locator::Css("[data-testid=loss-chart]")).await?.attr("data-points").await?.as_deref(),
        Some("300"),
        "the x axis spans the longer run"
    );
    client.execute("document.querySelector('.agents').scrollIntoView()", vec![]).await?;
    screenshot(client, "fleet-compare").await?;
    client.execute("document.querySelector('[data-testid=compare-table]').scrollIntoView()", vec![]).await?;
    screenshot(client, "fleet-history").await?;

    // Compare while the watched run is live: the session follows the other run for a
    // moment, then the watched one again from its last record; none of its records is lost.
    click(client, "stop-compare").await?;
    type_into(client, "field-steps", "2000").await?;
    click(client, "run").await?;
    wait_text(client, "job-progress", "run 3 under way", |t| t.contains(" of 2000")).await?;
    let row = eventually("run 3 in the history", Duration::from_secs(30), || async {
        Ok(client.find(Locator::Css("[data-testid=compare-1]")).await.ok())
    })
    .await?;
    row.click().await?;
    let status = run_to_end_of(client, 2000).await?;
    assert!(status.starts_with("Job 3 finished"), "{status}");
    wait_text(client, "compare-table", "run 1 beside run 3", |t| t.contains("run 1 (")).await?;
    assert_eq!(
        client.find(Locator::Css("[data-testid=loss-chart]")).await?.attr("data-points").await?.as_deref(),
        Some("2000"),
        "every record of the watched run, the pause for the comparison made up from the file"
    );

    // Watch run 1 again; open its plan in the editor.
    click(client, "watch-1").await?;
    wait_text(client, "job-status", "run 1 in the run view", |t| t.starts_with("Job 1 finished: 300 steps")).await?;
    click(client, "open-1").await?;
    eventually("run 1's plan in the form", Duration::from_secs(30), || async {
        Ok((value(client, "field-steps").await? == "300").then_some(()))
    })
    .await?;
    assert_ne!(value(client, "field-batch").await?, "64");

    // A reloaded page has both agents again; a removed one stays removed.
    client.refresh().await?;
    wait_text(client, "agent-1-connection", "the lab agent after a reload", |t| t.starts_with("connected")).await?;
    click(client, "agent-1-remove").await?;
    client.refresh().await?;
    wait_text(client, "agent-0-connection", "the home agent after a reload", |t| t.starts_with("connected")).await?;
    assert!(client.find(Locator::Css("[data-testid=agent-1]")).await.is_err(), "removed for good");
    Ok(())
}

async fn text(client: &fantoccini::Client, testid: &str) -> anyhow::Result<String> {
    Ok(client.find(Locator::Css(&format!("[data-testid={testid}]"))).await?.text().await?)
}

async fn value(client: &fantoccini::Client, testid: &str) -> anyhow::Result<String> {
    Ok(client.find(Locator::Css(&format!("[data-testid={testid}]"))).await?.prop("value").await?.unwrap_or_default())
}

async fn type_into(client: &fantoccini::Client, testid: &str, text: &str) -> anyhow::Result<()> {
    let field = client.find(Locator::Css(&format!("[data-testid={testid}]"))).await?;
    field.clear().await?;
    field.send_keys(text).await?;
    Ok(())
}

async fn select(client: &fantoccini::Client, testid: &str, value: &str) -> anyhow::Result<()> {
    client.find(Locator::Css(&format!("[data-testid={testid}]"))).await?.select_by_value(value).await?;
    Ok(())
}

/// The page's address for a plan: the agent's URL with the plan's link as fragment.
fn url_for(agent: &AgentHandle, plan: &Plan, gpu: &str) -> String {
    let body = shared::link::encode(plan, &shared::link::Extras { gpu: Some(gpu.to_owned()), host_ram_bytes: None });
    format!("{}#{body}", agent.url())
}

fn bytes_of(text: &str) -> f64 {
    let (n, unit) = text.trim().split_once(' ').unwrap_or((text, "B"));
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    n * match unit {
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1.0,
    }
}

async fn drive(client: &fantoccini::Client, agent: &AgentHandle) -> anyhow::Result<()> {
    client.goto(&url_for(agent, &Plan::example_mlp(), "v100-16gb")).await?;
    eventually("the agent's hello", Duration::from_secs(30), || async {
        Ok(text(client, "connection").await.ok().filter(|t| t.contains("connected to agent")))
    })
    .await?;

    // Edit the plan: a bad value is explained, a good one re-estimates.
    client.find(Locator::Css("[data-testid=group-run] summary")).await?.click().await?;
    type_into(client, "field-steps", "zero").await?;
    let error = text(client, "plan-error").await?;
    assert!(error.contains("steps"), "{error}");
    type_into(client, "field-steps", "25").await?;
    type_into(client, "field-batch", "16").await?;
    type_into(client, "field-accum", "2").await?;
    assert_eq!(text(client, "effective-batch").await?, "effective batch 32 = 16 × 2");
    let peak = text(client, "estimate-peak").await?;
    assert!(peak.ends_with("MiB") || peak.ends_with("KiB"), "{peak}");
    // The interval and whose program the estimate is for.
    let interval = text(client, "estimate-interval").await?;
    assert!(interval.starts_with("between ") && interval.contains("PyTorch's reference implementation"), "{interval}");

    client.find(Locator::Css("[data-testid=run]")).await?.click().await?;
    let status = eventually("the job to finish", Duration::from_secs(60), || async {
        let t = text(client, "job-status").await?;
        anyhow::ensure!(!t.contains("failed") && !t.contains("refused"), "job failed in the page: {t}");
        Ok(t.contains("finished").then_some(t))
    })
    .await?;
    assert!(status.contains("25 steps"), "{status}");

    // Every streamed micro-batch reached both charts: each series drew 50 points (counted
    // in what the SVG holds, chart by chart), and the estimate is drawn once.
    for (chart, series) in [("loss-chart", 1), ("memory-chart", 2)] {
        let polylines = client.find_all(Locator::Css(&format!("[data-testid={chart}] polyline"))).await?;
        assert!(polylines.len() >= series, "{chart}: {} series", polylines.len());
        for line in polylines {
            let points = line.attr("points").await?.unwrap_or_default();
            assert_eq!(points.split_whitespace().count(), 50, "{chart}: {points}");
        }
    }
    client.find(Locator::Css("[data-testid=memory-chart-estimate]")).await?;
    let labels = client.find_all(Locator::Css("[data-testid=memory-chart] text.estimate")).await?;
    assert_eq!(labels.len(), 1, "one estimate label");

    // Reloading the page (a closed tab reopened) finds the run again at the agent and
    // replays it: the same 50 points, the same end.
    client.refresh().await?;
    let status = eventually("the run resumed after a reload", Duration::from_secs(30), || async {
        // The reloading page has no status element for a moment.
        Ok(text(client, "job-status").await.ok().filter(|t| t.contains("finished")))
    })
    .await?;
    assert!(status.contains("25 steps"), "{status}");
    for chart in ["loss-chart", "memory-chart"] {
        let points = client.find(Locator::Css(&format!("[data-testid={chart}]"))).await?.attr("data-points").await?;
        assert_eq!(points.as_deref(), Some("50"), "{chart} after the reload");
    }

    // The connection drops right after the page sends a Submit, before the agent's
    // answer (the page's socket is closed just after the frame goes): on reconnecting
    // the page sends the same submission again with its key, and the agent answers
    // with the run the first one became. One run, not two, and it is watched to its end.
    client.execute(&cut_after_submit()?, vec![]).await?;
    client.find(Locator::Css("[data-testid=run]")).await?.click().await?;
    // The status still shows job 1's end for a moment: wait for job 2's.
    let status = wait_job_end(client, 2, 25).await?;
    let cuts = client.execute("return window.__cuts;", vec![]).await?;
    assert_eq!(cuts.as_u64(), Some(1), "the connection was cut after the Submit");
    let mut ws = agent.connect().await?;
    let runs = crate::runs::runs(&mut ws).await?;
    let jobs: Vec<u64> = runs.iter().map(|r| r.job).collect();
    assert_eq!(jobs, vec![2, 1], "the submission sent again ran once: {status}");
    // And the run is the first Submit's (made before the second was sent), so the agent
    // did answer the second with it rather than never having seen the first.
    let sent = client.execute("return window.__submits;", vec![]).await?;
    let sent: Vec<u64> = sent.as_array().into_iter().flatten().filter_map(serde_json::Value::as_u64).collect();
    assert_eq!(sent.len(), 2, "sent twice: {sent:?}");
    assert!(
        runs[0].created_unix_ms < sent[1],
        "run 2 came from the first Submit: {} vs {sent:?}",
        runs[0].created_unix_ms
    );
    println!("a Submit cut off from its answer in the browser: sent again, ran once as run 2 ({status})");

    // Cut again, and the page reloaded before it reconnects: the reloaded page finds the
    // unanswered submission in its storage and sends it again.
    client.execute(&cut_after_submit()?, vec![]).await?;
    client.find(Locator::Css("[data-testid=run]")).await?.click().await?;
    client.refresh().await?;
    let status = wait_job_end(client, 3, 25).await?;
    let runs = crate::runs::runs(&mut ws).await?;
    let jobs: Vec<u64> = runs.iter().map(|r| r.job).collect();
    assert_eq!(jobs, vec![3, 2, 1], "the submission sent again by the reloaded page ran once: {status}");
    let kept = kept_submissions(client).await?;
    assert_eq!(kept, serde_json::json!([]), "an answered submission is forgotten");
    println!("a Submit cut off and the page reloaded: sent again from storage, ran once as run 3");

    // One kept from a tab closed long ago is forgotten, not run by surprise.
    let stale = serde_json::json!({ "key": 5, "plan": Plan::example_mlp(), "at_ms": 0 }).to_string();
    client
        .execute(
            "localStorage.setItem('headroom.submit@' + location.host, arguments[0]);",
            vec![serde_json::Value::String(stale)],
        )
        .await?;
    client.refresh().await?;
    wait_job_end(client, 3, 25).await?;
    let kept = kept_submissions(client).await?;
    assert_eq!(kept, serde_json::json!([]), "a stale submission is forgotten");
    let runs = crate::runs::runs(&mut ws).await?;
    assert_eq!(runs.len(), 3, "nothing submitted");
    Ok(())
}

/// A script that closes the page's socket right after its first `Submit` goes, and counts
/// the `Submit`s sent. A frame's first bytes are the version (2), the direction and the
/// variant: taken from a `Submit` this codec encodes, so the script follows the format.
fn cut_after_submit() -> anyhow::Result<String> {
    let submit = shared::codec::encode(&shared::protocol::ToAgent::Submit {
        plan: Plan::example_mlp(),
        force: false,
        key: None,
    })?;
    let (direction, variant) = (submit[2], submit[3]);
    Ok(format!(
        r#"const send = WebSocket.prototype.send;
   window.__cuts = 0;
   window.__submits = [];
   WebSocket.prototype.send = function (data) {{
     send.call(this, data);
     const b = data instanceof ArrayBuffer ? new Uint8Array(data)
                                           : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
     const submit = b[2] === {direction} && b[3] === {variant};
     if (submit) window.__submits.push(Date.now());
     if (submit && window.__cuts === 0) {{
       window.__cuts = 1;
       this.close(4000, "test: cut after Submit");
     }}
   }};"#
    ))
}

/// Waits for run `job` to finish after `steps` steps in the run view; its status line.
async fn wait_job_end(client: &fantoccini::Client, job: u64, steps: u64) -> anyhow::Result<String> {
    wait_status(client, &format!("Job {job} finished: {steps} steps")).await
}

/// The page's kept unanswered submissions (their local-storage keys).
async fn kept_submissions(client: &fantoccini::Client) -> anyhow::Result<serde_json::Value> {
    Ok(client.execute("return Object.keys(localStorage).filter(k => k.startsWith('headroom.submit'));", vec![]).await?)
}

async fn plan_views(client: &fantoccini::Client, agent: &AgentHandle) -> anyhow::Result<()> {
    let mut perf = serde_json::Map::new();
    // A fresh page opens on W1 as its users first ran it: navigation to first estimate.
    let start = Instant::now();
    client.goto(&agent.url()).await?;
    let status = eventually("the first estimate", Duration::from_secs(30), || async {
        Ok(text(client, "fit-status").await.ok())
    })
    .await?;
    perf.insert("first_estimate_ms".into(), (start.elapsed().as_secs_f64() * 1e3).round().into());
    assert!(status.contains("V100") && !status.starts_with("Fits"), "W1-before on a 16 GB card: {status}");
    let points: usize = client
        .find(Locator::Css("[data-testid=timeline]"))
        .await?
        .attr("data-points")
        .await?
        .unwrap_or_default()
        .parse()?;
    assert!(points > 50, "a step timeline with {points} points");
    client.find(Locator::Css("[data-testid=timeline-peak]")).await?;
    eventually("the knob effects", Duration::from_secs(30), || async {
        let rows = client.find_all(Locator::Css("[data-testid=effects] tr")).await?;
        let t = text(client, "effects").await?;
        Ok((rows.len() >= 5 && t.contains("empty_cache()") && t.contains("activations")).then_some(()))
    })
    .await?;
    screenshot(client, "plan-1280").await?;
    client.set_window_size(390, 1600).await?;
    screenshot(client, "plan-390").await?;
    client.set_window_size(1280, 1400).await?;

    // A zoo model and a knob change update the estimate. Switching from W1 keeps the
    // job's knobs and says so, but not W1's name or its Dice-CE, which a classifier does
    // not train with.
    select(client, "model", "resnet18").await?;
    let kept = text(client, "carried-over").await?;
    assert!(kept.contains("batch=2") && !kept.contains("loss=") && !kept.contains("name="), "{kept}");
    let resnet = text(client, "estimate-peak").await?;
    type_into(client, "field-batch", "64").await?;
    let bigger = text(client, "estimate-peak").await?;
    assert!(bytes_of(&bigger) > bytes_of(&resnet), "batch 64 ({bigger}) above batch 2 ({resnet})");

    // W1-before does not fit a 16 GB card; the advisor's top choice fits with the margin
    // and keeps the effective batch.
    select(client, "preset", "w1-before").await?;
    let capacity = bytes_of(&text(client, "capacity").await?);
    client.find(Locator::Css("[data-testid=advise]")).await?.click().await?;
    let summary =
        eventually("the advisor", Duration::from_secs(60), || async { Ok(text(client, "advisor-summary").await.ok()) })
            .await?;
    let top = client.find(Locator::Css("[data-testid=advice-0]")).await?;
    assert_eq!(top.attr("data-effective").await?.as_deref(), Some("4"), "{summary}");
    let peak: f64 = top.attr("data-peak").await?.unwrap_or_default().parse()?;
    assert!(peak <= 0.9 * capacity, "top choice {peak} within 90 % of {capacity}");
    screenshot(client, "advisor-1280").await?;
    client.find(Locator::Css("[data-testid=apply-0]")).await?.click().await?;
    let after = text(client, "fit-status").await?;
    assert!(after.starts_with("Fits"), "after applying the top choice: {after}");

    // The share link restores exactly the same plan in a new tab.
    let link = value(client, "share-link").await?;
    assert!(link.contains("#h1-"), "{link}");
    let export_yaml = text(client, "export-text").await?;
    let first = client.window().await?;
    let tab = client.new_window(true).await?;
    client.switch_to_window(tab.handle).await?;
    client.goto(&link).await?;
    let notice =
        eventually("the opened link", Duration::from_secs(30), || async { Ok(text(client, "notice").await.ok()) })
            .await?;
    assert!(notice.contains("Opened the shared plan"), "{notice}");
    assert_eq!(value(client, "share-link").await?, link, "the new tab makes the same link");
    assert_eq!(text(client, "export-text").await?, export_yaml, "and the same plan");
    client.close_window().await?;
    client.switch_to_window(first).await?;

    // Every export parses back.
    let restored = Plan::from_text(&export_yaml)?;
    for format in ["yaml", "json", "hf", "lightning", "deepspeed", "env", "command"] {
        select(client, "export-format", format).await?;
        let t = text(client, "export-text").await?;
        match format {
            "yaml" | "json" => assert_eq!(Plan::from_text(&t)?, restored, "{format}"),
            "hf" => assert_eq!(
                serde_json::from_str::<serde_json::Value>(&t)?["per_device_train_batch_size"],
                restored.micro_batch
            ),
            "deepspeed" => assert_eq!(
                serde_json::from_str::<serde_json::Value>(&t)?["train_micro_batch_size_per_gpu"],
                restored.micro_batch
            ),
            "lightning" => assert!(t.contains(&format!("accumulate_grad_batches: {}", restored.accumulation)), "{t}"),
            "env" => assert!(t.lines().any(|l| l.starts_with("PYTORCH_CUDA_ALLOC_CONF=expandable_segments:")), "{t}"),
            _ => assert!(t.starts_with("headroom run --model swin_unetr"), "{t}"),
        }
    }
    screenshot(client, "share-1280").await?;

    // A corrupted, a truncated and a newer link each say what is wrong and keep a page.
    let (base, body) = link.split_once('#').expect("fragment");
    for (bad, says) in [
        (body.replacen("b=", "b=9", 1), "checksum"),
        (body[..body.len() / 2].to_owned(), "cut short"),
        (body.replacen("h1-", "h7-", 1), "newer Headroom"),
    ] {
        client.goto("about:blank").await?;
        client.goto(&format!("{base}#{bad}")).await?;
        let notice =
            eventually("the link's error", Duration::from_secs(30), || async { Ok(text(client, "notice").await.ok()) })
                .await?;
        assert!(notice.contains(says) && notice.contains("default plan"), "{notice}");
        text(client, "fit-status").await?;
    }
    screenshot(client, "bad-link-1280").await?;

    // The advisor's 10,000-combination search in the browser, timed by the page.
    let wide = Plan { micro_batch: 24, accumulation: 15, ..Plan::zoo("resnet50") };
    client.goto("about:blank").await?;
    client.goto(&url_for(agent, &wide, "a100-40gb")).await?;
    eventually("the estimate", Duration::from_secs(30), || async { Ok(text(client, "fit-status").await.ok()) }).await?;
    client.find(Locator::Css("[data-testid=allow-resize]")).await?.click().await?;
    client.find(Locator::Css("[data-testid=allow-optimizer]")).await?.click().await?;
    // Main-thread tasks over 50 ms while the search runs (Chromium's long-task entries).
    client
        .execute(
            "window.__long = []; new PerformanceObserver(l => l.getEntries().forEach(e => window.__long.push(e.duration))).observe({type: 'longtask'});",
            vec![],
        )
        .await?;
    client.find(Locator::Css("[data-testid=advise]")).await?.click().await?;
    let summary = eventually("the wide search", Duration::from_secs(60), || async {
        Ok(text(client, "advisor-summary").await.ok())
    })
    .await?;
    let combos: usize = summary.split(' ').next().unwrap_or_default().parse()?;
    assert!(combos >= 10_000, "{summary}");
    let ms: f64 = summary
        .split_once(" ms ·")
        .and_then(|(head, _)| head.rsplit(' ').next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no time in '{summary}'"))?;
    let long = client.execute("return window.__long;", vec![]).await?;
    let longest = long.as_array().map_or(0.0, |a| a.iter().filter_map(serde_json::Value::as_f64).fold(0.0, f64::max));
    // A figure for scripts/bench.sh, not an assertion: timings under the parallel test
    // run's load are not the page's (the bench runs this test alone).
    perf.insert("advisor_longest_task_ms".into(), longest.into());
    perf.insert("advisor_combinations".into(), combos.into());
    perf.insert("advisor_browser_ms".into(), ms.into());
    std::fs::write(repo_root().join("target/e2e-perf.json"), serde_json::to_string_pretty(&perf)?)?;
    eprintln!("browser figures: {}", serde_json::Value::Object(perf));
    Ok(())
}
