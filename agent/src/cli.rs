//! Command-line interface: the clap definitions of every command and where each goes —
//! `serve` (`crate::serve`), `run` (`crate::local`), `probe`, `accuracy`, `find-batch`,
//! the commands of `tools` (`estimate`, `advise`, `link`, `export`, `schema`, `token`),
//! `gpus`, and the hidden `worker`. No command's body lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::input::{BadInput, PlanSource, build_plan, parse_device};

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
    /// Serve the planner and the WebSocket (loopback by default), and run submitted jobs.
    Serve(crate::serve::ServeArgs),
    /// Manage the named access tokens of a token file (`serve --token-file`).
    Token {
        #[command(subcommand)]
        action: crate::tools::TokenAction,
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
        /// An exported model (`.pt2`): its keys (dynamic sizes), then the plan's.
        #[arg(long, conflicts_with = "model", value_name = "PATH")]
        model_file: Option<PathBuf>,
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
    /// An exported model's file, to read its weights from (set by `run` itself from
    /// --model-file; a worker gets it from its parent).
    #[arg(long, hide = true)]
    weights_file: Option<PathBuf>,
}

impl From<FilesArgs> for system::job::JobFiles {
    fn from(a: FilesArgs) -> system::job::JobFiles {
        system::job::JobFiles {
            checkpoint_dir: a.checkpoint_dir,
            resume: a.resume,
            data_root: a.data_root,
            weights: a.weights_file,
        }
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
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEADROOM_LOG").unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Worker { probe: true, .. } => trainer::worker::probe(),
        Command::Worker { job, files, .. } => trainer::worker::run(job.unwrap_or(0), files.into()),
        Command::Estimate { source, gpu, json, trace, calibration } => {
            crate::tools::estimate(&source, gpu.as_deref(), json, trace, calibration.as_deref())
        }
        Command::Advise { source, gpu, margin, allow, top, json } => {
            crate::tools::advise(&source, &gpu, margin, &allow, top, json)
        }
        Command::Link { action: LinkAction::Encode { source, gpu, host_ram, base } } => {
            crate::tools::link_encode(&source, gpu.as_deref(), host_ram.as_deref(), base.as_deref())
        }
        Command::Link { action: LinkAction::Decode { link, json } } => crate::tools::link_decode(&link, json),
        Command::Export { source, format } => crate::tools::export_plan(&source, &format),
        Command::Schema { model, model_file, json } => {
            crate::tools::schema(model.as_deref(), model_file.as_deref(), json)
        }
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

async fn async_main(command: Command) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this executable for worker processes")?;
    match command {
        Command::Serve(args) => crate::serve::serve(args, exe).await,
        Command::Token { action } => crate::tools::token(action),
        Command::Run { source, device, files } => {
            let mut plan = build_plan(&source)?.into_parts().0;
            if let Some(d) = device {
                plan.device = parse_device(&d)?;
            }
            let mut files: system::job::JobFiles = files.into();
            files.weights = files.weights.or_else(|| local_weights(&plan));
            crate::local::run(plan, files, exe).await
        }
        Command::Probe { source, device, steps, json, data_root } => {
            let plan = build_plan(&source)?.into_parts().0;
            let files = system::job::JobFiles { data_root, weights: local_weights(&plan), ..Default::default() };
            crate::probe::probe(plan, &device, steps, json, &files, exe).await
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
            let plan = build_plan(&source)?.into_parts().0;
            let calibration = crate::calibration::default_path(calibration.as_deref());
            let files = system::job::JobFiles { data_root, weights: local_weights(&plan), ..Default::default() };
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

/// The file a locally run exported model's weights come from: the one the command line
/// named (read by the CLI itself, so the user's own path, not the agent's data root).
fn local_weights(plan: &shared::plan::Plan) -> Option<PathBuf> {
    plan.model.file.as_ref().map(|f| PathBuf::from(&f.path))
}
