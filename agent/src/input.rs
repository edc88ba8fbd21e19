//! What the user typed, turned into a plan: plan sources (`--plan FILE` or `--model
//! NAME` with `--set`), device and GPU arguments, and the error type whose exit code is
//! 2. Every command module reads its input through here; nothing here imports them.

use std::path::PathBuf;

use shared::plan::{DeviceChoice, Plan, Validated};

/// Where a plan comes from: a file, or a zoo model with settings.
#[derive(clap::Args, Debug)]
pub struct PlanSource {
    /// A plan file (JSON or YAML).
    #[arg(long, conflicts_with_all = ["model", "model_file"], required_unless_present_any = ["model", "model_file"])]
    plan: Option<PathBuf>,
    /// Your own model, exported with torch.export (`torch.export.save(ep, "model.pt2")`):
    /// the same keys as a zoo model; its dynamic sizes other than the batch are model
    /// keys (`<input>_<dim>`).
    #[arg(long, conflicts_with = "model", value_name = "PATH")]
    model_file: Option<PathBuf>,
    /// A zoo model: mlp, small_cnn, resnet18, resnet34, resnet50, seresnext50_32x4d, vit,
    /// unet2d, unet3d, swin_unetr, clip, gpt2.
    #[arg(long)]
    model: Option<String>,
    /// KEY=VALUE: batch, accum, precision, optimizer, optimizer_impl, lr, weight_decay,
    /// nesterov, checkpoint (blocks|off), checkpoint_segments, loss (ce|bce|dice|dice_ce),
    /// label_smoothing, runtime (pytorch|headroom), outputs (auto|kept|dropped), onednn,
    /// threads, steps, seed, expandable_segments, memory_fraction, workers, prefetch,
    /// pin_memory, distance_loss_every, or a model key (feature_size, volume, n_layer,
    /// ...); `headroom schema` lists them all. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// An error whose exit code is 2: the user's input was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// An exported model read from `path`: only the end of the file (its zip directory) and
/// the graph entry are read, never the weights, however large the file.
pub(crate) fn read_model_file(path: &std::path::Path) -> anyhow::Result<shared::import::Imported> {
    system::pt2::Archive::open(path)
        .and_then(|mut a| a.model())
        .map_err(|e| BadInput(format!("--model-file {e}")).into())
}

fn read_plan_text(path: &PathBuf) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path).map_err(|e| BadInput(format!("reading {}: {e}", path.display())))?;
    let mut plan = Plan::parse(&text).map_err(|e| BadInput(format!("{}: {e}", path.display())))?;
    // A model file named by the plan is read relative to the plan's folder.
    if let Some(file) = &mut plan.model.file
        && file.graph.is_none()
    {
        let at = path.parent().unwrap_or(std::path::Path::new(".")).join(&file.path);
        file.graph = Some(std::sync::Arc::new(read_model_file(&at)?));
        // Where the trainer finds its weights, from here.
        file.path = at.display().to_string();
    }
    Ok(plan)
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

pub(crate) fn parse_device(text: &str) -> anyhow::Result<DeviceChoice> {
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

/// The plan a source describes, with its `--set` overrides applied, validated, and its
/// graph (built once: every command reuses it).
pub(crate) fn build_plan(source: &PlanSource) -> anyhow::Result<Validated> {
    let mut pairs = Vec::new();
    for item in &source.set {
        let (k, v) = item.split_once('=').ok_or_else(|| BadInput(format!("--set {item}: expected KEY=VALUE")))?;
        pairs.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    let bad = |e: shared::PlanError| BadInput(e.to_string());
    if let Some(path) = &source.model_file {
        let graph = read_model_file(path)?;
        return Plan::from_file(&path.display().to_string(), graph, &pairs).map_err(|e| bad(e).into());
    }
    match (&source.plan, &source.model) {
        (Some(path), _) => {
            let mut plan = read_plan_text(path)?;
            plan.apply_settings(&pairs).map_err(bad)?;
            Ok(plan.validated().map_err(|e| BadInput(format!("{}: {e}", path.display())))?)
        }
        (None, Some(model)) => Plan::from_settings(model, &pairs).map_err(|e| match e {
            shared::PlanError::Invalid { field: "model", reason } if !shared::zoo::MODELS.contains(&model.as_str()) => {
                BadInput(format!("--model: {reason}")).into()
            }
            e => bad(e).into(),
        }),
        (None, None) => Err(BadInput("give --plan FILE, --model NAME or --model-file PATH".into()).into()),
    }
}

/// A catalog GPU or a custom one (`24GiB@a10`).
pub(crate) fn find_gpu(name: &str) -> anyhow::Result<shared::gpus::Gpu> {
    shared::gpus::resolve(name).map_err(|e| BadInput(format!("--gpu: {e}")).into())
}
