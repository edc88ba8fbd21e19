//! `headroom accuracy`: the estimator's published error, in `docs/accuracy.md`:
//! - against the reference implementations (torchvision, timm, MONAI, open_clip,
//!   Hugging Face) as PyTorch runs them on the CPU, from the checked-in fixture that
//!   `scripts/reference_peaks.py` measures (`shared::estimate::reference`), with oneDNN on
//!   (PyTorch's default), limited to older instruction sets, and off; then the random
//!   configurations `scripts/random_configs.py` draws and measures;
//! - against Headroom's own trainer (runtime `headroom`): a fixed set of configurations
//!   spanning the zoo, each run in its own worker process for a few steps.
//!
//! The CPU set is scaled to finish on a 2-core machine with 24 GiB in a few minutes; the CUDA
//! set runs the five workloads of docs/workloads.md at their real sizes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use shared::plan::Plan;

use crate::probe::{Outcome, measure};

const VIT_SMALL: [(&str, &str); 7] = [
    ("image", "128"),
    ("patch_size", "16"),
    ("num_layers", "6"),
    ("hidden_dim", "384"),
    ("num_heads", "6"),
    ("mlp_dim", "1536"),
    ("num_classes", "100"),
];

const GPT2_SMALL: [(&str, &str); 5] =
    [("n_layer", "6"), ("n_embd", "256"), ("n_head", "8"), ("seq", "256"), ("vocab_size", "8000")];

const CLIP_SMALL: [(&str, &str); 10] = [
    ("embed_dim", "256"),
    ("vision_layers", "4"),
    ("vision_width", "256"),
    ("patch_size", "16"),
    ("image", "128"),
    ("seq", "64"),
    ("vocab_size", "8000"),
    ("text_width", "256"),
    ("text_heads", "4"),
    ("text_layers", "4"),
];

/// Scaled configurations for the CPU: every zoo family, every optimizer, checkpointing on
/// and off, fp32 and bf16 autocast. About four minutes on 2 cores, under 4 GiB each.
fn cpu_configs() -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut add = |model: &str, base: &[(&str, &str)], extra: &[(&str, &str)]| {
        let pairs = base.iter().chain(extra).map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        out.push((model.to_owned(), pairs));
    };
    add("mlp", &[("batch", "256")], &[("optimizer", "adamw")]);
    add("mlp", &[("batch", "256")], &[("optimizer", "sgd"), ("precision", "bf16")]);
    add("small_cnn", &[("batch", "64")], &[("optimizer", "momentum"), ("accum", "2")]);
    add("resnet18", &[("image", "128"), ("batch", "16")], &[("optimizer", "sgd")]);
    add("resnet18", &[("image", "128"), ("batch", "16")], &[("optimizer", "sgd"), ("onednn", "false")]);
    add("resnet18", &[("image", "96"), ("batch", "8")], &[("optimizer", "momentum"), ("precision", "bf16")]);
    add("resnet34", &[("image", "128"), ("batch", "8")], &[("optimizer", "adamw"), ("checkpoint_segments", "2")]);
    add("resnet50", &[("image", "128"), ("batch", "16")], &[("optimizer", "adam")]);
    add("seresnext50_32x4d", &[("image", "128"), ("batch", "8")], &[("optimizer", "momentum")]);
    add(
        "seresnext50_32x4d",
        &[("image", "128"), ("batch", "8")],
        &[("optimizer", "momentum"), ("checkpoint", "blocks")],
    );
    add("vit", &VIT_SMALL, &[("batch", "16"), ("optimizer", "adamw")]);
    add(
        "vit",
        &VIT_SMALL,
        &[("batch", "8"), ("optimizer", "sgd"), ("checkpoint_segments", "3"), ("precision", "bf16")],
    );
    add("unet2d", &[("image", "256"), ("batch", "4")], &[("optimizer", "adam")]);
    add("unet2d", &[("image", "256"), ("batch", "4")], &[("optimizer", "sgd"), ("loss", "dice")]);
    add(
        "unet2d",
        &[("image", "256"), ("batch", "2"), ("out_channels", "1")],
        &[("optimizer", "adamw"), ("loss", "bce")],
    );
    add("unet3d", &[("volume", "64"), ("batch", "1")], &[("optimizer", "adamw")]);
    add("unet3d", &[("volume", "48"), ("batch", "1")], &[("optimizer", "momentum"), ("precision", "bf16")]);
    add("swin_unetr", &[("volume", "64"), ("feature_size", "24"), ("batch", "1")], &[("optimizer", "adamw")]);
    add(
        "swin_unetr",
        &[("volume", "64"), ("feature_size", "24"), ("batch", "1")],
        &[("optimizer", "sgd"), ("checkpoint", "blocks"), ("loss", "dice_ce")],
    );
    add("clip", &CLIP_SMALL, &[("batch", "16"), ("optimizer", "adamw")]);
    add("gpt2", &GPT2_SMALL, &[("batch", "8"), ("optimizer", "adamw")]);
    add("gpt2", &GPT2_SMALL, &[("batch", "8"), ("optimizer", "momentum"), ("checkpoint", "blocks"), ("accum", "2")]);
    add("gpt2", &GPT2_SMALL, &[("batch", "8"), ("optimizer", "sgd"), ("precision", "bf16")]);
    out
}

/// The five workloads of docs/workloads.md at their real sizes, before and after their
/// users' hand fixes (`shared::presets`), as (label, plan).
fn presets() -> anyhow::Result<Vec<(String, Plan)>> {
    shared::presets::PRESETS
        .iter()
        .map(|p| {
            let plan = p.plan().map_err(|e| anyhow::anyhow!("examples/{}.yaml: {e}", p.id))?;
            Ok((p.id.to_owned(), plan))
        })
        .collect()
}

fn plan_for(model: &str, pairs: &[(String, String)]) -> anyhow::Result<Plan> {
    let mut plan = Plan::zoo(model);
    plan.apply_settings(pairs).map_err(|e| crate::input::bad_input(e.to_string()))?;
    plan.validate().map_err(|e| crate::input::bad_input(e.to_string()))?;
    Ok(plan)
}

fn mib(b: u64) -> String {
    format!("{:.2}", b as f64 / (1u64 << 20) as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The comparisons with the reference implementations, from the embedded fixtures: the
/// curated set, then the random one.
fn reference_sections() -> anyhow::Result<String> {
    use shared::estimate::reference;
    let curated = reference::compare().map_err(anyhow::Error::msg)?;
    let random =
        reference::compare_cases(reference::random_cases().map_err(anyhow::Error::msg)?).map_err(anyhow::Error::msg)?;
    let mut doc = String::new();
    let _ = writeln!(doc, "## PyTorch's reference implementations (CPU)\n");
    let fixture: serde_json::Value = serde_json::from_str(reference::FIXTURE)?;
    let _ = writeln!(
        doc,
        "Measured by `scripts/reference_peaks.py` on {cpu} ({threads} threads, {versions}) on {date}: the absolute peak of live tensor \
         memory in the last of {steps} steps of the canonical training loop (or, for the entries named `trainer-loop`, \
         measured later, Hugging Face Trainer's loop, which keeps only the loss), from the profiler's memory events, with oneDNN \
         on (PyTorch's CPU default) and off (libtorch's native kernels). A second process cross-checks it: the `RSS` \
         column is how far the step's rise in resident memory (glibc's mmap threshold lowered, so that freed blocks go \
         back to the system) differs from the profiler's rise; native bf16 kernels allocate outside PyTorch's \
         allocator, which RSS sees and the profiler does not. The fixture `shared/fixtures/reference_peaks.json` records each model's exact constructor call; \
         the tests check every entry against its estimate and interval.\n\n\
         The modes `oneDNN:ISA` ran the same jobs with oneDNN (and ATen) limited to an older instruction set \
         (`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`): the kernels, blocking and scratch a CPU with only that ISA \
         gets, each estimated with `cpu_isa` set to it. AMX (`avx512_core_amx`) needs a CPU that has it: none was \
         available, so its figures are not measured; where a plan names no ISA the interval covers every ISA's \
         estimate.\n",
        cpu = fixture["cpu"].as_str().unwrap_or("?"),
        threads = fixture["threads"],
        versions = versions(&fixture),
        date = fixture["date"].as_str().unwrap_or("?"),
        steps = fixture["steps"],
    );
    summaries(&mut doc, &curated, &fixture, "");
    table(&mut doc, &curated);
    let random_doc: serde_json::Value = serde_json::from_str(reference::RANDOM_FIXTURE)?;
    let _ = writeln!(doc, "## Random configurations (CPU)\n");
    let _ = writeln!(
        doc,
        "Drawn by `scripts/random_configs.py` ({draws}; {kept} measured{left}) and measured the same way \
         on {cpu} ({threads} threads, {versions}) on {date}: every zoo model in turn, its own keys within ranges its \
         reference constructor accepts, with a random micro-batch, input size, optimizer (weight decay, momentum, Nesterov, \
         for-loop, foreach or fused), precision, loss and label smoothing, checkpointing, accumulation and what the loop \
         keeps of the outputs. No number here was fitted: where a draw exposed a mechanism the curated set never \
         exercised, the mechanism was modelled (`docs/estimator.md`), and the next draw, measured after that change, \
         is the held-out check; each draw is summarised apart below. The fixture `shared/fixtures/random_peaks.json` \
         has each constructor call.\n",
        draws = random_doc["drawn"]
            .as_array()
            .map(|d| {
                d.iter()
                    .map(|d| {
                        format!("seed {} on {}: {} drawn", d["seed"], d["date"].as_str().unwrap_or("?"), d["count"])
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default(),
        kept = random_doc["entries"].as_array().map_or(0, Vec::len),
        left = random_doc["left_out"].as_array().map_or(String::new(), |l| format!(
            "; left out because PyTorch refused them: {}",
            l.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
        )),
        cpu = random_doc["cpu"].as_str().unwrap_or("?"),
        threads = random_doc["threads"],
        versions = versions(&random_doc),
        date = random_doc["date"].as_str().unwrap_or("?"),
    );
    summaries(&mut doc, &random, &random_doc, "");
    // Each draw apart: a draw measured after an estimator change is the held-out check.
    let draws: Vec<String> =
        random_doc["drawn"].as_array().map(|d| d.iter().map(|d| d["seed"].to_string()).collect()).unwrap_or_default();
    if draws.len() > 1 {
        for seed in draws {
            let prefix = format!("r{seed}-");
            let rows: Vec<_> = random.iter().filter(|r| r.case.id.starts_with(&prefix)).cloned().collect();
            summaries(&mut doc, &rows, &random_doc, &format!("draw {seed}, "));
        }
    }
    table(&mut doc, &random);
    doc.push_str(&own_section()?);
    Ok(doc)
}

/// The exported models outside the zoo (`docs/own-models.md` holds the same section).
fn own_section() -> anyhow::Result<String> {
    use shared::estimate::reference;
    let rows =
        reference::compare_cases(reference::own_cases().map_err(anyhow::Error::msg)?).map_err(anyhow::Error::msg)?;
    let fixture: serde_json::Value = serde_json::from_str(reference::OWN_FIXTURE)?;
    let mut doc = String::new();
    let _ = writeln!(
        doc,
        "## Exported models outside the zoo (CPU)
"
    );
    let _ = writeln!(
        doc,
        "Models `scripts/own_models.py` exports with `torch.export` (hand-written 1-D, 2-D and 3-D networks, \
         `nn.TransformerEncoder`, torchvision and timm classifiers, Hugging Face BERT, a segmentation_models_pytorch \
         U-Net), imported from their `.pt2` files \
         (`shared/fixtures/own/`, graphs only) and estimated with the plan's loss; measured as above, the eager model \
         trained with that loss and optimizer, on {cpu} ({threads} threads, {versions}) on {date}. With oneDNN a worst \
         case past 5 % is allowed inside the interval, as for the zoo.\n",
        cpu = fixture["cpu"].as_str().unwrap_or("?"),
        threads = fixture["threads"],
        versions = versions(&fixture),
        date = fixture["date"].as_str().unwrap_or("?"),
    );
    summaries(&mut doc, &rows, &fixture, "");
    table(&mut doc, &rows);
    Ok(doc)
}

/// Replaces the text between the own-model markers of `docs/own-models.md` with the
/// accuracy section.
pub fn write_own_models_doc(path: &Path) -> anyhow::Result<()> {
    const START: &str = "<!-- accuracy: written by `headroom accuracy` -->";
    const END: &str = "<!-- end of accuracy -->";
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(START), text.find(END)) else {
        anyhow::bail!("{}: no accuracy markers", path.display());
    };
    let section = own_section()?.replacen("## Exported models outside the zoo (CPU)\n\n", "", 1);
    let out = format!("{}{START}\n\n{section}{}", &text[..a], &text[b..]);
    std::fs::write(path, out).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

fn versions(fixture: &serde_json::Value) -> String {
    fixture["versions"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?"))).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

/// One line per mode (and so per instruction set) with its median and worst error
/// against the targets.
fn summaries(doc: &mut String, rows: &[shared::estimate::reference::Row], fixture: &serde_json::Value, label: &str) {
    use shared::estimate::reference;
    let own = fixture["cpu_isa"].as_str().unwrap_or("?");
    for mode in reference::modes_of(rows) {
        let (med_target, worst_target) = reference::targets(&mode);
        let (med, worst) = reference::summary(rows, &mode);
        let all_inside = rows.iter().filter(|r| r.case.mode == mode).all(|r| r.inside);
        let what = match mode.strip_prefix("onednn:") {
            Some(isa) => format!("oneDNN limited to {isa}"),
            None if mode == "native" => "oneDNN off (native kernels)".to_owned(),
            None => format!("oneDNN on (PyTorch's default; this CPU's {own})"),
        };
        let _ = writeln!(
            doc,
            "- {label}{what}: median |error| {med:.2} % (target {med_target} %: {}), worst {worst:.2} % (target {worst_target} %: {}); \
             every measured peak inside the interval: {}.",
            if med <= med_target { "met" } else { "**missed**" },
            if worst <= worst_target { "met" } else { "**missed**" },
            if all_inside { "yes" } else { "**no**" },
        );
    }
}

fn table(doc: &mut String, rows: &[shared::estimate::reference::Row]) {
    let _ = writeln!(
        doc,
        "\n| configuration | mode | measured MiB | estimated MiB | error | interval MiB | measured phase | estimated phase | RSS |"
    );
    let _ = writeln!(doc, "|---|---|---:|---:|---:|---|---|---|---:|");
    for r in rows {
        let e = &r.estimate;
        let _ = writeln!(
            doc,
            "| {} | {} | {} | {} | {:+.2} % | {} to {}{} | {} | {} | {} |",
            r.case.id,
            r.case.mode.replace("onednn", "oneDNN"),
            mib(r.case.measured_bytes),
            mib(e.peak_bytes.get()),
            r.error_pct,
            mib(e.peak_bytes_low.get()),
            mib(e.peak_bytes_high.get()),
            if r.inside { "" } else { " (**outside**)" },
            r.case.measured_phase,
            e.peak_phase.key(),
            r.case.rss_vs_profiler_pct.map_or("-".to_owned(), |p| format!("{p:+.1} %")),
        );
    }
    doc.push('\n');
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

pub async fn run(device: &str, steps: u64, out: &Path, exe: PathBuf) -> anyhow::Result<()> {
    let cuda = device.starts_with("cuda");
    // (model, settings shown, plan): the CPU set from `--set` pairs, the GPU set from
    // the preset files.
    let configs: Vec<(String, Vec<String>, Plan)> = if cuda {
        presets()?
            .into_iter()
            .map(|(name, plan)| (plan.model_name().to_owned(), vec![format!("examples/{name}.yaml")], plan))
            .collect()
    } else {
        cpu_configs()
            .into_iter()
            .map(|(model, pairs)| {
                let plan = plan_for(&model, &pairs)?;
                Ok((model, pairs.iter().map(|(k, v)| format!("{k}={v}")).collect(), plan))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let started = std::time::Instant::now();
    let mut rows = String::new();
    let mut errors = Vec::new();
    let mut reserved_errors = Vec::new();
    for (i, (model, settings, plan)) in configs.into_iter().enumerate() {
        eprintln!("[{}] {model} {}", i + 1, settings.join(" "));
        let t0 = std::time::Instant::now();
        match measure(plan, device, steps, &Default::default(), exe.clone()).await {
            Ok(Outcome { estimate: Some(estimate), summary, device_used_peak, .. }) => {
                let err = summary.estimate_error_pct();
                errors.push(err.abs());
                let mut row = format!(
                    "| {} | {model} | {} | {} | {} | {} | {} | {:+.2} % |",
                    i + 1,
                    settings.join(" "),
                    estimate.params,
                    estimate.peak_phase.label(),
                    mib(estimate.peak_bytes.get()),
                    mib(summary.peak_bytes),
                    err
                );
                if cuda {
                    let est_res = estimate.device.as_ref().map(|d| d.reserved_peak_bytes.get());
                    let meas_res = summary.peak_reserved_bytes;
                    if let (Some(e), Some(m)) = (est_res, meas_res) {
                        reserved_errors.push((100.0 * (e as f64 - m as f64) / m.max(1) as f64).abs());
                    }
                    let _ = write!(
                        row,
                        " {} | {} | {} | {} |",
                        est_res.map_or("-".into(), mib),
                        meas_res.map_or("-".into(), mib),
                        estimate.device.as_ref().map_or("-".into(), |d| mib(d.device_peak_bytes.get())),
                        device_used_peak.map_or("-".into(), mib)
                    );
                }
                let _ = write!(row, " {:.1} |", t0.elapsed().as_secs_f64());
                rows.push_str(&row);
                rows.push('\n');
            }
            // The configurations are zoo models, which always have an estimate.
            Ok(Outcome { estimate: None, .. }) => {
                let _ =
                    writeln!(rows, "| {} | {model} | {} | - | - | - | - | no estimate |", i + 1, settings.join(" "));
            }
            Err(e) => {
                let cols = if cuda { " - | - | - | - |" } else { "" };
                let _ = writeln!(
                    rows,
                    "| {} | {model} | {} | - | - | - | - | failed: {e:#} |{cols} - |",
                    i + 1,
                    settings.join(" ")
                );
            }
        }
    }
    let n = errors.len();
    let mut sorted = errors.clone();
    let med = median(&mut sorted);
    let worst = errors.iter().copied().fold(0.0f64, f64::max);
    let (med_target, worst_target) = if cuda { (3.0, 8.0) } else { (2.0, 5.0) };
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let days = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400);
    let (y, m, d) = civil_date(days as i64);

    let mut doc = String::new();
    let _ = writeln!(doc, "# Estimator accuracy\n");
    let _ = writeln!(
        doc,
        "Written by `headroom accuracy --device {device} --steps {steps}` (see the README) on {y}-{m:02}-{d:02}. \
         Two comparisons: the estimate for PyTorch's reference implementations (runtime `pytorch`, the default) \
         against those implementations measured in PyTorch, and the estimate for Headroom's trainer (runtime \
         `headroom`) against the trainer. Error = (estimated - measured) / measured.\n"
    );
    doc.push_str(&reference_sections()?);
    let _ = writeln!(doc, "## Headroom's trainer ({})\n", if cuda { "CUDA" } else { "CPU" });
    let _ = writeln!(
        doc,
        "Each configuration ran {steps} optimizer steps in its own worker process with libtorch from torch 2.11.0; \
         \"measured\" is the highest {} over those steps, \"estimated\" is `headroom estimate --set runtime=headroom` \
         for the same plan with this machine's threads{}.\n",
        if cuda { "`max_memory_allocated`" } else { "live tensor memory of the exact counting CPU allocator" },
        if cuda { " and this GPU" } else { "" }
    );
    let _ = writeln!(
        doc,
        "Machine: {} ({} threads){}.\n",
        cpu_model(),
        std::thread::available_parallelism().map_or(1, |p| p.get()),
        if cuda {
            system::nvml::devices()
                .first()
                .map_or(String::new(), |(name, total)| format!(", {name} ({} MiB)", total >> 20))
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        doc,
        "Median |error| {med:.3} %, worst {worst:.3} % over {n} configurations (targets: median <= {med_target} %: {}, worst <= {worst_target} %: {}).",
        verdict(med <= med_target),
        verdict(worst <= worst_target)
    );
    if cuda && !reserved_errors.is_empty() {
        let mut r = reserved_errors.clone();
        let _ = writeln!(doc, "Reserved (caching allocator segments): median |error| {:.2} %.", median(&mut r));
    }
    let _ = writeln!(doc, "Total run time {:.0} s.\n", started.elapsed().as_secs_f64());
    if cuda {
        let _ = writeln!(
            doc,
            "| # | model | settings | params | peak phase | estimated MiB | measured MiB | error | est. reserved MiB | meas. reserved MiB | est. device MiB | NVML used MiB | seconds |"
        );
        let _ = writeln!(doc, "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    } else {
        let _ = writeln!(
            doc,
            "| # | model | settings | params | peak phase | estimated MiB | measured MiB | error | seconds |"
        );
        let _ = writeln!(doc, "|---|---|---|---:|---|---:|---:|---:|---:|");
    }
    doc.push_str(&rows);
    std::fs::write(out, &doc).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
    let own = out.with_file_name("own-models.md");
    if own.exists() {
        write_own_models_doc(&own)?;
    }
    print!("{doc}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_builds_a_valid_plan() {
        let cpu = cpu_configs();
        assert!(cpu.len() >= 15);
        for (model, pairs) in &cpu {
            plan_for(model, pairs).unwrap_or_else(|e| panic!("{model} {pairs:?}: {e}"));
        }
        assert_eq!(presets().expect("every preset is a valid plan").len(), 10);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(20_415), (2025, 11, 23));
    }
}
