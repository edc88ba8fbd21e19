//! Command-line interface: `serve`, `run`, `estimate`, and the hidden `worker`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shared::plan::{DeviceChoice, Plan};
use shared::protocol::Message;

use crate::jobs::JobRunner;
use crate::server::{Config, Server};

#[derive(Parser, Debug)]
#[command(
    name = "headroom",
    version,
    about = "Will this training job fit in GPU memory? Estimate it, then run it and watch."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the planner and the WebSocket on loopback, and run submitted jobs.
    Serve {
        /// Address to listen on; port 0 picks a free one.
        #[arg(long, default_value = "127.0.0.1:8787")]
        bind: SocketAddr,
        /// The built planner (Trunk's output folder).
        #[arg(long)]
        web_dir: Option<PathBuf>,
        /// Access token; a fresh random one by default. Also read from HEADROOM_TOKEN.
        #[arg(long, env = "HEADROOM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Another origin allowed to open the WebSocket (scheme://host[:port]); repeatable.
        #[arg(long = "allow-origin")]
        allow_origins: Vec<String>,
        /// Connections open at once.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_connections: u32,
        /// Jobs running at once (one per GPU keeps measurements clean).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        max_jobs: u32,
    },
    /// Run a plan here: one JSON line per micro-batch on stdout, then a summary line.
    Run {
        #[arg(long)]
        plan: PathBuf,
        /// Override the plan's device: auto, cpu or cuda:N.
        #[arg(long)]
        device: Option<String>,
    },
    /// Estimate a plan's or a zoo model's peak memory without running it.
    Estimate {
        #[command(flatten)]
        source: PlanSource,
        /// A GPU from the catalog (`headroom gpus`): adds reserved memory, the CUDA
        /// context, the capacity and whether it fits.
        #[arg(long)]
        gpu: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Print every change of live memory in the step, one JSON line each (phase,
        /// op, node, bytes, live), to set beside a profiler's memory events.
        #[arg(long, conflicts_with = "json")]
        trace: bool,
    },
    /// Run a plan or zoo model for a few steps with the real trainer and compare the
    /// measured peak with the estimate.
    Probe {
        #[command(flatten)]
        source: PlanSource,
        /// cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Optimizer steps to run (the first creates the optimizer state).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=1000))]
        steps: u64,
        #[arg(long)]
        json: bool,
    },
    /// Measure the estimator's error over a fixed set of configurations and write the
    /// table to a Markdown file.
    Accuracy {
        /// cpu (scaled zoo configurations) or cuda[:N] (the five workloads at real size).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=100))]
        steps: u64,
        #[arg(long, default_value = "docs/accuracy.md")]
        out: PathBuf,
    },
    /// List the GPU catalog.
    Gpus,
    /// Internal: run one job, speaking the protocol over stdin/stdout.
    #[command(hide = true)]
    Worker {
        #[arg(long, required_unless_present = "probe")]
        job: Option<u64>,
        /// Print the number of CUDA devices libtorch can use, and exit.
        #[arg(long)]
        probe: bool,
    },
}

/// Where a plan comes from: a file, or a zoo model with settings.
#[derive(clap::Args, Debug)]
struct PlanSource {
    /// A plan file (JSON or YAML).
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    plan: Option<PathBuf>,
    /// A zoo model: mlp, small_cnn, resnet18, resnet34, resnet50, seresnext50_32x4d, vit,
    /// unet2d, unet3d, swin_unetr, clip, gpt2.
    #[arg(long)]
    model: Option<String>,
    /// KEY=VALUE: batch, accum, precision, optimizer, optimizer_impl, lr, weight_decay,
    /// nesterov, checkpoint (blocks|off), checkpoint_segments, loss (ce|bce|dice|dice_ce),
    /// label_smoothing, runtime (pytorch|headroom), onednn, threads, steps, seed,
    /// expandable_segments, memory_fraction, workers, prefetch, pin_memory,
    /// distance_loss_every, or a model key (feature_size, volume, n_layer, ...). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// An error whose exit code is 2: the user's input was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BadInput(String);

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    // The server narrates its lifecycle; one-shot commands keep the terminal for their
    // own output unless HEADROOM_LOG asks for more.
    let default_level = if matches!(cli.command, Command::Serve { .. }) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEADROOM_LOG").unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Worker { probe: true, .. } => crate::worker::probe(),
        Command::Worker { job, .. } => crate::worker::run(job.unwrap_or(0)),
        Command::Estimate { source, gpu, json, trace } => estimate(&source, gpu.as_deref(), json, trace),
        Command::Gpus => {
            for g in &shared::gpus::CATALOG {
                println!(
                    "{:<14} {:<34} {:>8.2} GiB  sm_{}{}",
                    g.key,
                    g.name,
                    g.memory_bytes as f64 / (1u64 << 30) as f64,
                    g.compute_capability.0,
                    g.compute_capability.1
                );
            }
            Ok(())
        }
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(async_main(command))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("headroom: {e:#}");
            if e.downcast_ref::<BadInput>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}

fn read_plan(path: &PathBuf) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path).map_err(|e| BadInput(format!("reading {}: {e}", path.display())))?;
    Plan::from_text(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())).into())
}

pub(crate) fn bad_input(text: String) -> anyhow::Error {
    BadInput(text).into()
}

/// `cpu` or `cuda[:N]` for the probe.
pub(crate) fn parse_device_arg(text: &str) -> anyhow::Result<DeviceChoice> {
    if text == "cuda" {
        return Ok(DeviceChoice::Cuda(0));
    }
    match parse_device(text)? {
        DeviceChoice::Auto => Err(BadInput("--device: expected cpu or cuda[:N], got auto".into()).into()),
        d => Ok(d),
    }
}

fn parse_device(text: &str) -> anyhow::Result<DeviceChoice> {
    match text {
        "auto" => Ok(DeviceChoice::Auto),
        "cpu" => Ok(DeviceChoice::Cpu),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(DeviceChoice::Cuda)
            .ok_or_else(|| BadInput(format!("--device: expected auto, cpu or cuda:N, got {text:?}")).into()),
    }
}

/// The plan a source describes, with its `--set` overrides applied.
fn build_plan(source: &PlanSource) -> anyhow::Result<Plan> {
    let mut plan = match (&source.plan, &source.model) {
        (Some(path), _) => read_plan(path)?,
        (None, Some(model)) => {
            if !shared::zoo::MODELS.contains(&model.as_str()) {
                return Err(BadInput(format!(
                    "--model: unknown model '{model}'; known models: {}",
                    shared::zoo::MODELS.join(", ")
                ))
                .into());
            }
            Plan::zoo(model)
        }
        (None, None) => return Err(BadInput("give --plan FILE or --model NAME".into()).into()),
    };
    let mut pairs = Vec::new();
    for item in &source.set {
        let (k, v) = item.split_once('=').ok_or_else(|| BadInput(format!("--set {item}: expected KEY=VALUE")))?;
        pairs.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    plan.apply_settings(&pairs).map_err(|e| BadInput(e.to_string()))?;
    plan.validate().map_err(|e| BadInput(e.to_string()))?;
    Ok(plan)
}

pub(crate) fn find_gpu(name: &str) -> anyhow::Result<&'static shared::gpus::Gpu> {
    shared::gpus::find(name).ok_or_else(|| {
        let keys: Vec<&str> = shared::gpus::CATALOG.iter().map(|g| g.key).collect();
        BadInput(format!("--gpu: unknown GPU '{name}'; known: {}", keys.join(", "))).into()
    })
}

/// The estimate as one JSON object; the keys are a contract for scripts.
pub(crate) fn estimate_json(e: &shared::Estimate) -> serde_json::Value {
    let bytes_map = |entries: &[(&'static str, shared::Bytes)]| -> serde_json::Map<String, serde_json::Value> {
        entries.iter().map(|(k, v)| ((*k).to_owned(), v.get().into())).collect()
    };
    let phases: serde_json::Map<String, serde_json::Value> =
        e.phase_peaks.iter().map(|(p, v)| (p.key().to_owned(), v.get().into())).collect();
    let mut out = serde_json::json!({
        "runtime": e.runtime.word(),
        "params": e.params,
        "peak_bytes": e.peak_bytes.get(),
        "peak_bytes_low": e.peak_bytes_low.get(),
        "peak_bytes_high": e.peak_bytes_high.get(),
        "peak_phase": e.peak_phase.key(),
        "breakdown": bytes_map(&e.breakdown.entries()),
        "category_peaks": bytes_map(&e.category_peaks.entries()),
        "steady_bytes": e.steady_bytes.get(),
        "phase_peaks": phases,
        "host_peak_bytes": e.host_peak_bytes.get(),
        "host_breakdown": bytes_map(&e.host.entries()),
    });
    if let (Some(d), Some(map)) = (&e.device, out.as_object_mut()) {
        map.insert("gpu".into(), d.gpu.clone().into());
        map.insert("reserved_peak_bytes".into(), d.reserved_peak_bytes.get().into());
        map.insert("device_peak_bytes".into(), d.device_peak_bytes.get().into());
        map.insert("device_peak_bytes_low".into(), d.device_peak_bytes_low.get().into());
        map.insert("device_peak_bytes_high".into(), d.device_peak_bytes_high.get().into());
        map.insert("context_bytes".into(), d.context_bytes.get().into());
        map.insert("cublas_workspace_bytes".into(), d.cublas_workspace_bytes.get().into());
        map.insert("capacity_bytes".into(), d.capacity_bytes.get().into());
        map.insert("headroom_bytes".into(), d.headroom_bytes.into());
        map.insert("fits".into(), d.fits.into());
    }
    out
}

fn estimate(source: &PlanSource, gpu: Option<&str>, json: bool, trace: bool) -> anyhow::Result<()> {
    let mut plan = build_plan(source)?;
    let target = match gpu {
        Some(name) => {
            let g = find_gpu(name)?;
            plan.resolve_memory_fraction(g.memory_bytes);
            shared::estimate::Target::Cuda(*g)
        }
        None => {
            // A CPU job here uses this machine's threads unless the plan says otherwise.
            plan.cpu_threads.get_or_insert_with(crate::train::machine_threads);
            shared::estimate::Target::Cpu
        }
    };
    if trace {
        let (_, events) = shared::estimate::trace(&plan, target).map_err(|e| BadInput(e.to_string()))?;
        let graph = plan.validate().map_err(|e| BadInput(e.to_string()))?;
        let mut stdout = std::io::stdout().lock();
        use std::io::Write;
        for ev in events {
            let op = ev.node.and_then(|n| graph.nodes.get(n)).map(|n| n.op.name());
            writeln!(
                stdout,
                "{}",
                serde_json::json!({
                    "phase": ev.phase.map(shared::estimate::Phase::key), "label": ev.label, "op": op,
                    "node": ev.node, "bytes": ev.delta, "live": ev.live,
                })
            )?;
        }
        return Ok(());
    }
    let e = shared::estimate::estimate_for(&plan, target).map_err(|e| BadInput(e.to_string()))?;
    if json {
        println!("{}", estimate_json(&e));
    } else {
        println!("{}: {} parameters (runtime {})", plan.name, e.params, e.runtime.word());
        println!(
            "peak {} during the {} (interval {} to {})",
            e.peak_bytes,
            e.peak_phase.label(),
            e.peak_bytes_low,
            e.peak_bytes_high
        );
        for (name, bytes) in e.breakdown.entries() {
            println!("  {name:<16} {bytes}");
        }
        println!("between steps {}", e.steady_bytes);
        println!("host peak {}", e.host_peak_bytes);
        if let Some(d) = &e.device {
            println!(
                "{}: reserved {}, with the CUDA context {} of {} -> {}",
                d.gpu,
                d.reserved_peak_bytes,
                d.device_peak_bytes,
                d.capacity_bytes,
                if d.fits { "fits" } else { "does not fit" }
            );
        }
    }
    Ok(())
}

async fn async_main(command: Command) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this executable for worker processes")?;
    match command {
        Command::Serve { bind, web_dir, token, allow_origins, max_connections, max_jobs } => {
            let token = token.unwrap_or_else(crate::auth::new_token);
            if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(BadInput("--token: use at least 16 letters or digits".into()).into());
            }
            if let Some(dir) = &web_dir
                && !dir.join("index.html").is_file()
            {
                return Err(BadInput(format!("--web-dir {}: no index.html there", dir.display())).into());
            }
            let server = Server::bind(Config {
                bind,
                web_dir,
                token: token.clone(),
                extra_origins: allow_origins,
                max_connections: max_connections as usize,
                max_jobs: max_jobs as usize,
                worker_exe: exe,
            })
            .await?;
            let addr = server.local_addr()?;
            let host = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
            let host = if host.contains(':') { format!("[{host}]") } else { host };
            // The one line on stdout: scripts and tests read the URL from it.
            println!("Headroom planner: http://{host}:{}/?token={token}", addr.port());
            tracing::info!(%addr, "serving");
            server
                .run(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await;
            Ok(())
        }
        Command::Run { plan, device } => {
            let mut plan = read_plan(&plan)?;
            if let Some(d) = device {
                plan.device = parse_device(&d)?;
            }
            run(plan, exe).await
        }
        Command::Probe { source, device, steps, json } => {
            crate::probe::probe(build_plan(&source)?, &device, steps, json, exe).await
        }
        Command::Accuracy { device, steps, out } => crate::accuracy::run(&device, steps, &out, exe).await,
        // These run without a runtime (see `main`); reaching here would be a wiring bug.
        Command::Estimate { .. } | Command::Worker { .. } | Command::Gpus => {
            Err(anyhow::anyhow!("internal: this command runs without the async runtime"))
        }
    }
}

async fn run(mut plan: Plan, exe: PathBuf) -> anyhow::Result<()> {
    let target = crate::probe::target_for(&mut plan)?;
    let plan = crate::train::as_run_here(&plan);
    let estimate = shared::estimate::estimate_for(&plan, target).map_err(|e| BadInput(e.to_string()))?;
    let total = plan.total_steps() * plan.accumulation;
    let bar = if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} micro-batches  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(bar)
    } else {
        None
    };
    let runner = JobRunner::new(exe, 1);
    let mut job = runner.start(plan, estimate.peak_bytes.get())?;
    let mut stdout = std::io::stdout().lock();
    use std::io::Write;
    while let Some(event) = job.events.recv().await {
        match event {
            Message::Batch(r) => {
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({
                        "step": r.step, "epoch": r.epoch, "micro_batch": r.micro_batch, "loss": r.loss,
                        "allocated_bytes": r.allocated_bytes, "peak_bytes": r.peak_bytes,
                        "reserved_bytes": r.reserved_bytes, "device_used_bytes": r.device_used_bytes,
                        "host_rss_bytes": r.host_rss_bytes, "step_time_ms": r.step_time_ms,
                        "samples_per_sec": r.samples_per_sec,
                    })
                )?;
                if let Some(bar) = &bar {
                    bar.inc(1);
                    bar.set_message(format!("loss {:.4}  peak {}", r.loss, shared::Bytes(r.peak_bytes)));
                }
            }
            Message::Finished { summary, .. } => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                writeln!(
                    stdout,
                    "{}",
                    serde_json::json!({
                        "summary": {
                            "steps": summary.steps, "micro_batches": summary.micro_batches,
                            "first_loss": summary.first_loss, "final_loss": summary.final_loss,
                            "peak_bytes": summary.peak_bytes, "estimated_peak_bytes": summary.estimated_peak_bytes,
                            "estimate_error_pct": summary.estimate_error_pct(),
                            "peak_reserved_bytes": summary.peak_reserved_bytes,
                            "peak_host_rss_bytes": summary.peak_host_rss_bytes, "wall_time_ms": summary.wall_time_ms,
                            "phase_peaks": summary.phase_peaks.iter().map(|(p, b)| (p.key(), *b)).collect::<std::collections::BTreeMap<_, _>>(),
                        }
                    })
                )?;
                return Ok(());
            }
            Message::Failed { error, .. } => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                anyhow::bail!("job failed ({:?}): {}", error.code, error.message);
            }
            _ => {}
        }
    }
    anyhow::bail!("the worker ended without a result")
}
