//! The planner in headless Chromium, driven through ChromeDriver: load the page the
//! agent serves, run a job from the UI, and check that the charts received the stream.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use headroom_tests::{AgentHandle, free_port, repo_root, web_dir};

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

#[tokio::test]
async fn the_planner_runs_a_job_and_charts_the_stream() -> anyhow::Result<()> {
    let agent = AgentHandle::start(Some(web_dir()?))?;
    let (_driver, port) = start_chromedriver().await?;
    let profile = std::env::temp_dir().join(format!("headroom-chromium-{}-{port}", std::process::id()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1200,1400",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await?;
    let result = drive(&client, &agent).await;
    // Save what the page looked like, pass or fail, for people to look at.
    let shots = repo_root().join("target/e2e-screenshots");
    std::fs::create_dir_all(&shots)?;
    if let Ok(png) = client.screenshot().await {
        std::fs::write(shots.join("planner.png"), png)?;
    }
    client.close().await?;
    let _ = std::fs::remove_dir_all(&profile);
    result
}

async fn text(client: &fantoccini::Client, testid: &str) -> anyhow::Result<String> {
    Ok(client.find(Locator::Css(&format!("[data-testid={testid}]"))).await?.text().await?)
}

async fn drive(client: &fantoccini::Client, agent: &AgentHandle) -> anyhow::Result<()> {
    client.goto(&agent.url()).await?;
    eventually("the agent's hello", Duration::from_secs(30), || async {
        Ok(text(client, "connection").await.ok().filter(|t| t.contains("connected to agent")))
    })
    .await?;

    // Edit the plan: a bad value is explained, a good one re-estimates.
    let steps = client.find(Locator::Css("[data-testid=steps]")).await?;
    steps.clear().await?;
    steps.send_keys("zero").await?;
    let error = text(client, "plan-error").await?;
    assert!(error.contains("steps"), "{error}");
    steps.clear().await?;
    steps.send_keys("25").await?;
    let micro = client.find(Locator::Css("[data-testid=micro-batch]")).await?;
    micro.clear().await?;
    micro.send_keys("16").await?;
    let accumulation = client.find(Locator::Css("[data-testid=accumulation]")).await?;
    accumulation.clear().await?;
    accumulation.send_keys("2").await?;
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

    // Every streamed micro-batch reached both charts, and the estimate is drawn.
    for chart in ["loss-chart", "memory-chart"] {
        let points = client.find(Locator::Css(&format!("[data-testid={chart}]"))).await?.attr("data-points").await?;
        assert_eq!(points.as_deref(), Some("50"), "{chart}");
    }
    client.find(Locator::Css("[data-testid=memory-chart-reference]")).await?;
    let polylines = client.find_all(Locator::Css("[data-testid=memory-chart] polyline")).await?;
    assert!(polylines.len() >= 2, "peak and allocated series");
    Ok(())
}
