//! Command-line interface: `serve`, `run`, `estimate`, `probe`, `accuracy`, the planning
//! commands of `tools` (`advise`, `link`, `export`, `schema`), and the hidden `worker`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use shared::plan::Plan;
use shared::protocol::Message;

use crate::input::{BadInput, PlanSource, build_plan, find_gpu, parse_device};
use crate::jobs::JobRunner;
use crate::report::estimate_json;
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
enum TokenAction {
    /// Add a token named NAME (the file is created, mode 600, if needed) and print it:
    /// the only time it is shown.
    Add {
        name: String,
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Remove the token named NAME; a running agent refuses it from its next connection.
    Revoke {
        name: String,
        #[arg(long)]
        token_file: PathBuf,
    },
    /// The names of the file's tokens (never the tokens).
    List {
        #[arg(long)]
        token_file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the planner and the WebSocket (loopback by default), and run submitted jobs.
    Serve {
        /// Address to listen on; port 0 picks a free one. Beyond loopback it needs
        /// --token-file, and --tls-cert/--tls-key unless --insecure-http.
        #[arg(long, visible_alias = "bind", default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
        /// The built planner (Trunk's output folder).
        #[arg(long)]
        web_dir: Option<PathBuf>,
        /// Access token; a fresh random one by default. Also read from HEADROOM_TOKEN.
        #[arg(long, env = "HEADROOM_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
        token: Option<String>,
        /// Accept the named tokens of this file instead (`headroom token add`); it is
        /// re-read when it changes, so a revoked token stops working without a restart.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Serve TLS with this PEM certificate chain (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Another origin allowed to open the WebSocket (scheme://host[:port]); repeatable.
        #[arg(long = "allow-origin")]
        allow_origins: Vec<String>,
        /// Another name requests may address this agent by (its `Host`), besides loopback
        /// and the bound address; repeatable. Any other Host is refused (DNS rebinding).
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
        /// Authenticated WebSocket sessions at once; one more is refused.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_connections: u32,
        /// Connections that have not authenticated yet (page requests, handshakes in
        /// progress) at once; one more is closed at once. Each has 10 s to finish its
        /// handshakes.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_unauthenticated: u32,
        /// Jobs running at once (one per GPU keeps measurements clean).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        max_jobs: u32,
        /// The largest message a client may send, in bytes (4 KiB to the protocol's 1 MiB);
        /// a larger one is answered with TooLarge and the connection closed.
        #[arg(long, default_value_t = shared::codec::MAX_FRAME_BYTES as u32, value_parser = clap::value_parser!(u32).range(4096..=shared::codec::MAX_FRAME_BYTES as i64))]
        max_message_bytes: u32,
        /// Bytes buffered for one client before writes wait for its socket (16 KiB to
        /// 64 MiB); a client that stops reading is dropped after a 10 s wait.
        #[arg(long, default_value_t = 128 << 10, value_parser = clap::value_parser!(u32).range(16 << 10..=64 << 20))]
        write_buffer_bytes: u32,
        /// Messages a client may send a second on average (bursts of twice that); a
        /// faster one is told RateLimited and closed.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        max_messages_per_second: u32,
        /// Runs waiting for a slot at once; one more is refused as busy.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        max_queued: u32,
        /// The most optimizer steps a submitted run may have.
        #[arg(long, default_value_t = shared::plan::limits::MAX_STEPS, value_parser = clap::value_parser!(u64).range(1..=shared::plan::limits::MAX_STEPS))]
        max_job_steps: u64,
        /// A running job is stopped after this many seconds (default: 7 days).
        #[arg(long, default_value_t = 7 * 24 * 3600, value_parser = clap::value_parser!(u64).range(1..=365 * 24 * 3600))]
        max_job_seconds: u64,
        /// The folder the `data`, `data_labels` and `val_data` paths of submitted plans
        /// are relative to; nothing outside it is read. Without it, runs use synthetic
        /// data only.
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Where runs are kept (their plans, states and records), so that they survive
        /// disconnects and restarts. Default: $XDG_STATE_HOME/headroom, else
        /// ~/.local/state/headroom.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Serve plain HTTP and WebSocket on an address other than loopback, where anyone
        /// on the network can read the token in transit. Without it, an address beyond
        /// loopback needs TLS (or reach the agent through an SSH tunnel).
        #[arg(long)]
        insecure_http: bool,
    },
    /// Manage the named access tokens of a token file (`serve --token-file`).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Run a plan here: one JSON line per micro-batch on stdout, then a summary line.
    Run {
        #[command(flatten)]
        source: PlanSource,
        /// Override the plan's device: auto, cpu or cuda:N.
        #[arg(long)]
        device: Option<String>,
        #[command(flatten)]
        files: FilesArgs,
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
        /// Calibrations from `find-batch` (default $HEADROOM_CALIBRATION, else
        /// ~/.cache/headroom/calibration.json): a matching one adds a calibrated peak.
        #[arg(long)]
        calibration: Option<PathBuf>,
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
        /// The folder data and TorchScript paths are relative to.
        #[arg(long)]
        data_root: Option<PathBuf>,
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
    /// Search micro-batch x accumulation (effective batch held), precision,
    /// checkpointing and the allocator for what fits a GPU, ranked by relative step time.
    Advise {
        #[command(flatten)]
        source: PlanSource,
        /// A catalog GPU (`headroom gpus`) or a size with a generation, e.g. 24GiB@a10.
        #[arg(long)]
        gpu: String,
        /// Keep this share of the GPU free.
        #[arg(long, default_value_t = 0.1)]
        margin: f64,
        /// Also allow: resize (smaller inputs), optimizer (another optimizer). Comma-separated.
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// How many results to print.
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Find the largest micro-batch that fits a device with a margin, keeping the
    /// effective batch, from the estimate and a few real probe runs.
    FindBatch {
        #[command(flatten)]
        source: PlanSource,
        /// cpu or cuda[:N].
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The device's memory (required on the CPU, where the counting allocator
        /// enforces it), e.g. 2GiB; on CUDA the GPU's memory by default.
        #[arg(long)]
        capacity: Option<String>,
        #[arg(long, default_value_t = 0.1)]
        margin: f64,
        /// The effective batch to keep (micro-batch x accumulation); the plan's by default.
        #[arg(long)]
        effective_batch: Option<u64>,
        /// Also run the usual doubling-then-bisecting search and report its probe count.
        #[arg(long)]
        compare: bool,
        /// Where to store the fitted line (default $HEADROOM_CALIBRATION, else
        /// ~/.cache/headroom/calibration.json).
        #[arg(long)]
        calibration: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// The folder data and TorchScript paths are relative to.
        #[arg(long)]
        data_root: Option<PathBuf>,
    },
    /// Share links: the whole plan in a URL fragment, as the planner makes them.
    Link {
        #[command(subcommand)]
        action: LinkAction,
    },
    /// Print a plan as a config for another tool: yaml, json, hf, lightning, deepspeed,
    /// env or command. What the target cannot express is noted on stderr.
    Export {
        #[command(flatten)]
        source: PlanSource,
        #[arg(long)]
        format: String,
    },
    /// List the keys a plan takes (or a model and the plan): kind, default and help.
    Schema {
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        json: bool,
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
        #[command(flatten)]
        files: FilesArgs,
    },
}

/// Files a job may use on this machine, chosen on the agent's command line (never by
/// the plan): `run` takes them from its user, a worker from the agent that starts it.
#[derive(clap::Args, Debug)]
struct FilesArgs {
    /// Where checkpoints go (the plan's checkpoint_every says how often): one step-N
    /// directory per save.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Continue from a checkpoint: a step-N directory, or a checkpoint directory (its
    /// newest). The plan must be the one that saved it.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// The folder the plan's `data`, `data_labels`, `val_data` and TorchScript `file`
    /// paths are relative to; nothing outside it is read.
    #[arg(long)]
    data_root: Option<PathBuf>,
}

impl From<FilesArgs> for crate::train::JobFiles {
    fn from(a: FilesArgs) -> crate::train::JobFiles {
        crate::train::JobFiles { checkpoint_dir: a.checkpoint_dir, resume: a.resume, data_root: a.data_root }
    }
}

#[derive(Subcommand, Debug)]
enum LinkAction {
    /// Print the link for a plan (its fragment, or a whole URL with --base).
    Encode {
        #[command(flatten)]
        source: PlanSource,
        #[arg(long)]
        gpu: Option<String>,
        /// The host's RAM, e.g. 64GiB.
        #[arg(long)]
        host_ram: Option<String>,
        /// The planner's address, e.g. http://127.0.0.1:8787/
        #[arg(long)]
        base: Option<String>,
    },
    /// Print the plan a link holds (YAML, or JSON with --json).
    Decode {
        link: String,
        #[arg(long)]
        json: bool,
    },
}

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
        Command::Worker { job, files, .. } => crate::worker::run(job.unwrap_or(0), files.into()),
        Command::Estimate { source, gpu, json, trace, calibration } => {
            estimate(&source, gpu.as_deref(), json, trace, calibration.as_deref())
        }
        Command::Advise { source, gpu, margin, allow, top, json } => {
            crate::tools::advise(&source, &gpu, margin, &allow, top, json)
        }
        Command::Link { action: LinkAction::Encode { source, gpu, host_ram, base } } => {
            crate::tools::link_encode(&source, gpu.as_deref(), host_ram.as_deref(), base.as_deref())
        }
        Command::Link { action: LinkAction::Decode { link, json } } => crate::tools::link_decode(&link, json),
        Command::Export { source, format } => crate::tools::export_plan(&source, &format),
        Command::Schema { model, json } => crate::tools::schema(model.as_deref(), json),
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

fn estimate(
    source: &PlanSource,
    gpu: Option<&str>,
    json: bool,
    trace: bool,
    calibration: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (mut plan, graph) = build_plan(source)?;
    let target = match gpu {
        Some(name) => {
            let g = find_gpu(name)?;
            plan.resolve_memory_fraction(g.memory_bytes);
            shared::estimate::Target::Cuda(g)
        }
        None => {
            // A CPU job here uses this machine's threads unless the plan says otherwise.
            plan.cpu_threads.get_or_insert_with(crate::train::machine_threads);
            shared::estimate::Target::Cpu
        }
    };
    if trace {
        let mut events = Vec::new();
        shared::estimate::estimate_graph(&plan, &graph, target, Default::default(), Some(&mut events))
            .map_err(|e| BadInput(e.to_string()))?;
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
    let device = match target {
        shared::estimate::Target::Cuda(g) => g.name.to_owned(),
        shared::estimate::Target::Cpu => "cpu".to_owned(),
    };
    let calibrated = match crate::calibration::default_path(calibration) {
        Some(path) => crate::calibration::lookup(&path, &plan, &device)?,
        None => None,
    };
    if crate::probe::is_script(&plan) {
        // No description to walk: the calibrated line is the only figure, and says so.
        let Some((peak, entry)) = calibrated else {
            return Err(BadInput(format!(
                "model: {}; none is stored for this module and these knobs on {device}",
                shared::estimate::SCRIPT_NOT_WALKED
            ))
            .into());
        };
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "model": plan.model_name(), "estimated": false, "peak_bytes": null,
                    "calibrated_peak_bytes": peak.round() as u64,
                    "calibrated_from_micro_batches": entry.micro_batches, "device": device,
                })
            );
        } else {
            println!(
                "calibrated peak {} (a TorchScript module, not estimated: a line through Headroom's trainer measured at micro-batches {:?} on {device})",
                shared::Bytes(peak.round() as u64),
                entry.micro_batches
            );
        }
        return Ok(());
    }
    let e = shared::estimate::estimate_graph(&plan, &graph, target, Default::default(), None)
        .map_err(|e| BadInput(e.to_string()))?;
    if json {
        let mut out = estimate_json(&e);
        if let (Some((peak, entry)), Some(map)) = (&calibrated, out.as_object_mut()) {
            map.insert("calibrated_peak_bytes".into(), (peak.round() as u64).into());
            map.insert("calibrated_from_micro_batches".into(), entry.micro_batches.clone().into());
        }
        println!("{out}");
    } else {
        if let Some((peak, entry)) = &calibrated {
            println!(
                "calibrated peak {} (a line through Headroom's trainer measured at micro-batches {:?} on {device})",
                shared::Bytes(peak.round() as u64),
                entry.micro_batches
            );
        }
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
        Command::Serve {
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
            max_message_bytes,
            write_buffer_bytes,
            max_messages_per_second,
            max_job_steps,
            max_job_seconds,
            data_root,
            data_dir,
            insecure_http,
        } => {
            let data_dir = match data_dir {
                Some(d) => d,
                None => default_data_dir().ok_or_else(|| {
                    BadInput("--data-dir: no HOME or XDG_STATE_HOME to put runs under; give one".into())
                })?,
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
                limits: crate::runs::Limits { max_job_steps, max_job_seconds, max_queued: max_queued as usize },
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
        Command::Token { action } => token_command(action),
        Command::Run { source, device, files } => {
            let (mut plan, _) = build_plan(&source)?;
            if let Some(d) = device {
                plan.device = parse_device(&d)?;
            }
            run(plan, files.into(), exe).await
        }
        Command::Probe { source, device, steps, json, data_root } => {
            let files = crate::train::JobFiles { data_root, ..Default::default() };
            crate::probe::probe(build_plan(&source)?.0, &device, steps, json, &files, exe).await
        }
        Command::Accuracy { device, steps, out } => crate::accuracy::run(&device, steps, &out, exe).await,
        Command::FindBatch {
            source,
            device,
            capacity,
            margin,
            effective_batch,
            compare,
            calibration,
            json,
            data_root,
        } => {
            let capacity = capacity
                .map(|c| shared::units::parse_bytes(&c).map_err(|e| BadInput(format!("--capacity: {e}"))))
                .transpose()?;
            let (plan, _) = build_plan(&source)?;
            let calibration = crate::calibration::default_path(calibration.as_deref());
            let files = crate::train::JobFiles { data_root, ..Default::default() };
            let req =
                crate::finder::Request { plan, device, capacity, margin, effective_batch, compare, calibration, files };
            crate::finder::find(req, json, exe).await
        }
        // These run without a runtime (see `main`); reaching here would be a wiring bug.
        Command::Estimate { .. }
        | Command::Advise { .. }
        | Command::Link { .. }
        | Command::Export { .. }
        | Command::Schema { .. }
        | Command::Worker { .. }
        | Command::Gpus => Err(anyhow::anyhow!("internal: this command runs without the async runtime")),
    }
}

async fn run(mut plan: Plan, files: crate::train::JobFiles, exe: PathBuf) -> anyhow::Result<()> {
    let target = crate::probe::target_for(&mut plan)?;
    // Calibrations are stored under the plan as given (find-batch's key).
    let given = plan.clone();
    let plan = crate::train::as_run_here(&plan);
    // A TorchScript module has no estimate; a calibration from find-batch stands in.
    let estimated = match shared::estimate::estimate_for(&plan, target) {
        Ok(e) => Some(e.peak_bytes.get()),
        Err(_) if crate::probe::is_script(&plan) => None,
        Err(e) => return Err(BadInput(e.to_string()).into()),
    };
    let device_name = match target {
        shared::estimate::Target::Cuda(g) => g.name.to_owned(),
        shared::estimate::Target::Cpu => "cpu".to_owned(),
    };
    let calibrated = match crate::calibration::default_path(None) {
        Some(path) => crate::calibration::lookup(&path, &given, &device_name)?.map(|(peak, _)| peak.round() as u64),
        None => None,
    };
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
    let mut job = runner.start(1, plan, estimated.or(calibrated).unwrap_or(0), &files)?;
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
                        "samples_per_sec": r.samples_per_sec, "learning_rate": r.learning_rate,
                    })
                )?;
                if let Some(bar) = &bar {
                    bar.inc(1);
                    bar.set_message(format!("loss {:.4}  peak {}", r.loss, shared::Bytes(r.peak_bytes)));
                }
            }
            Message::Event { step, event, .. } => {
                let event = match event {
                    shared::protocol::JobEvent::LeakSuspected(w) => serde_json::json!({
                        "kind": "leak_suspected", "bytes_per_step": w.bytes_per_step,
                        "bytes_per_epoch": w.bytes_per_epoch, "steps_to_capacity": w.steps_to_capacity,
                        "allocated_bytes": w.allocated_bytes,
                    }),
                    shared::protocol::JobEvent::LossScaleSkip { scale } => {
                        serde_json::json!({ "kind": "loss_scale_skip", "scale": scale })
                    }
                    shared::protocol::JobEvent::CacheEmptied { released_bytes, micro_seconds } => serde_json::json!({
                        "kind": "cache_emptied", "released_bytes": released_bytes, "micro_seconds": micro_seconds,
                    }),
                    shared::protocol::JobEvent::OomRecovered {
                        micro_batch,
                        accumulation,
                        allocated_bytes,
                        message,
                    } => {
                        serde_json::json!({
                            "kind": "oom_recovered", "micro_batch": micro_batch, "accumulation": accumulation,
                            "allocated_bytes": allocated_bytes, "message": message,
                        })
                    }
                    shared::protocol::JobEvent::Validation {
                        batches,
                        micro_batch,
                        loss,
                        peak_bytes,
                        micro_seconds,
                    } => {
                        serde_json::json!({
                            "kind": "validation", "batches": batches, "micro_batch": micro_batch, "loss": loss,
                            "peak_bytes": peak_bytes, "micro_seconds": micro_seconds,
                        })
                    }
                    shared::protocol::JobEvent::CheckpointSaved { path, bytes, micro_seconds } => serde_json::json!({
                        "kind": "checkpoint_saved", "path": path, "bytes": bytes, "micro_seconds": micro_seconds,
                    }),
                    shared::protocol::JobEvent::Resumed { path } => {
                        serde_json::json!({ "kind": "resumed", "path": path })
                    }
                    shared::protocol::JobEvent::SurfaceTerm { value, host_bytes, micro_seconds } => {
                        serde_json::json!({
                            "kind": "surface_term", "value": value, "host_bytes": host_bytes,
                            "micro_seconds": micro_seconds,
                        })
                    }
                    shared::protocol::JobEvent::HostMemoryLow {
                        workers,
                        prefetch,
                        rss_bytes,
                        headroom_bytes,
                        bound,
                    } => {
                        serde_json::json!({
                            "kind": "host_memory_low", "workers": workers, "prefetch": prefetch,
                            "rss_bytes": rss_bytes, "headroom_bytes": headroom_bytes, "bound": bound,
                        })
                    }
                };
                if let Some(bar) = &bar {
                    bar.println(format!("step {step}: {event}"));
                }
                writeln!(stdout, "{}", serde_json::json!({ "event": event, "step": step }))?;
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
                            "peak_bytes": summary.peak_bytes, "estimated_peak_bytes": estimated,
                            "estimate_error_pct": estimated.map(|_| summary.estimate_error_pct()),
                            "calibrated_peak_bytes": calibrated,
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

fn token_command(action: TokenAction) -> anyhow::Result<()> {
    let bad = |e: crate::tokens::TokenFileError| BadInput(e.to_string());
    match action {
        TokenAction::Add { name, token_file } => {
            let token = crate::tokens::add(&token_file, &name).map_err(bad)?;
            // stdout holds the token alone, for scripts; the hint goes to stderr.
            println!("{token}");
            eprintln!("added token {name:?} to {}; it is not shown again", token_file.display());
        }
        TokenAction::Revoke { name, token_file } => {
            crate::tokens::revoke(&token_file, &name).map_err(bad)?;
            eprintln!("revoked token {name:?}; a running agent refuses it from its next connection");
        }
        TokenAction::List { token_file } => {
            for e in crate::tokens::read(&token_file).map_err(bad)? {
                println!("{}", e.name);
            }
        }
    }
    Ok(())
}

/// `$XDG_STATE_HOME/headroom`, else `~/.local/state/headroom`.
fn default_data_dir() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    nonempty("XDG_STATE_HOME").or_else(|| nonempty("HOME").map(|h| h.join(".local/state"))).map(|d| d.join("headroom"))
}
