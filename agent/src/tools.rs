//! The commands that need no trainer: `estimate`, `advise`, `link`, `export`,
//! `schema`, and `token` for token files.
//! Each prints JSON with stable keys under `--json`, for other tools to script.

use shared::advise::{Advice, Request};
use shared::export::{Format, export};
use shared::link::{self, Extras};
use shared::schema::{self, Field};

use crate::input::{BadInput, PlanSource, bad_input, build_plan, find_gpu};
use crate::report::estimate_json;

/// What the advisor may change besides batch, precision, checkpointing and the allocator.
fn parse_allow(allow: &[String]) -> anyhow::Result<(bool, bool)> {
    let (mut resize, mut optimizer) = (false, false);
    for word in allow.iter().flat_map(|a| a.split(',')).map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "resize" => resize = true,
            "optimizer" => optimizer = true,
            other => return Err(bad_input(format!("--allow: expected resize or optimizer, got '{other}'"))),
        }
    }
    Ok((resize, optimizer))
}

pub fn advise_json(a: &Advice) -> serde_json::Value {
    let candidates: Vec<serde_json::Value> = a
        .candidates
        .iter()
        .map(|c| {
            let changes: serde_json::Map<String, serde_json::Value> =
                c.changes.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
            serde_json::json!({
                "changes": changes, "micro_batch": c.micro_batch, "accumulation": c.accumulation,
                "effective_batch": c.effective_batch, "precision": c.precision.word(), "checkpoint": c.checkpoint,
                "expandable_segments": c.expandable_segments, "optimizer": c.optimizer, "input_scale": c.input_scale,
                "device_peak_bytes": c.device_peak_bytes, "capacity_bytes": c.capacity_bytes,
                "headroom_bytes": c.headroom_bytes, "relative_time": c.relative_time, "reason": c.reason,
            })
        })
        .collect();
    serde_json::json!({
        "effective_batch": a.effective_batch, "current_fits": a.current_fits,
        "current_device_peak_bytes": a.current_device_peak_bytes, "budget_bytes": a.budget_bytes,
        "combinations": a.combinations, "exact_estimates": a.exact_estimates, "note": a.note,
        "candidates": candidates,
    })
}

pub fn advise(
    source: &PlanSource,
    gpu: &str,
    margin: f64,
    allow: &[String],
    top: usize,
    json: bool,
) -> anyhow::Result<()> {
    let plan = build_plan(source)?.into_parts().0;
    let gpu = find_gpu(gpu)?;
    let (allow_resize, allow_optimizer) = parse_allow(allow)?;
    let req = Request { plan, gpu, margin, allow_resize, allow_optimizer, top };
    let start = std::time::Instant::now();
    let advice = shared::advise::advise(req.clone()).map_err(|e| bad_input(e.to_string()))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if json {
        println!("{}", advise_json(&advice));
        return Ok(());
    }
    println!(
        "{} on {}: {} at the high end against a budget of {} ({} margin) -> {}",
        req.plan.name,
        gpu.name,
        shared::Bytes(advice.current_device_peak_bytes),
        shared::Bytes(advice.budget_bytes),
        margin,
        if advice.current_fits { "fits" } else { "does not fit" }
    );
    println!(
        "searched {} combinations with {} exact estimates in {ms:.0} ms; effective batch {}",
        advice.combinations, advice.exact_estimates, advice.effective_batch
    );
    if let Some(note) = &advice.note {
        println!("note: {note}");
    }
    if advice.candidates.is_empty() {
        println!("nothing fits; allow more changes (--allow resize,optimizer), a smaller margin or a larger GPU");
    }
    for (i, c) in advice.candidates.iter().enumerate() {
        let sets: Vec<String> = c.changes.iter().map(|(k, v)| format!("--set {k}={v}")).collect();
        println!("{:>2}. {:.2}x time, {} headroom: {}", i + 1, c.relative_time, signed(c.headroom_bytes), c.reason);
        println!("    {}", if sets.is_empty() { "(no change)".to_owned() } else { sets.join(" ") });
    }
    Ok(())
}

fn signed(b: i64) -> String {
    if b < 0 { format!("-{}", shared::Bytes(b.unsigned_abs())) } else { shared::Bytes(b as u64).to_string() }
}

pub fn link_encode(
    source: &PlanSource,
    gpu: Option<&str>,
    host_ram: Option<&str>,
    base: Option<&str>,
) -> anyhow::Result<()> {
    let plan = build_plan(source)?.into_parts().0;
    if let Some(g) = gpu {
        find_gpu(g)?;
    }
    let host_ram_bytes = host_ram
        .map(|r| shared::units::parse_bytes(r).map_err(|e| bad_input(format!("--host-ram: {e}"))))
        .transpose()?;
    let body = link::encode_checked(&plan, &Extras { gpu: gpu.map(str::to_owned), host_ram_bytes })
        .map_err(|e| bad_input(format!("link: {e}")))?;
    match base {
        Some(base) => {
            let url = url::Url::parse(base).map_err(|e| bad_input(format!("--base: {e}")))?;
            let mut url = url;
            url.set_fragment(Some(&body));
            println!("{url}");
        }
        None => println!("{body}"),
    }
    Ok(())
}

pub fn link_decode(text: &str, json: bool) -> anyhow::Result<()> {
    // A whole URL or just its fragment.
    let fragment = match url::Url::parse(text) {
        Ok(u) => u.fragment().unwrap_or_default().to_owned(),
        Err(_) => text.to_owned(),
    };
    let (plan, _, extras) = link::decode(&fragment).map_err(|e| bad_input(format!("link: {e}")))?;
    if json {
        let plan_value: serde_json::Value = serde_json::from_str(&plan.to_json())?;
        println!(
            "{}",
            serde_json::json!({ "plan": plan_value, "gpu": extras.gpu, "host_ram_bytes": extras.host_ram_bytes })
        );
    } else {
        if let Some(g) = &extras.gpu {
            println!("# gpu: {g}");
        }
        if let Some(r) = extras.host_ram_bytes {
            println!("# host RAM: {}", shared::Bytes(r));
        }
        print!("{}", export(&plan, Format::Yaml).text);
    }
    Ok(())
}

pub fn export_plan(source: &PlanSource, format: &str) -> anyhow::Result<()> {
    let format = Format::from_word(format).ok_or_else(|| {
        let words: Vec<&str> = Format::ALL.iter().map(|f| f.word()).collect();
        bad_input(format!("--format: expected {}, got '{format}'", words.join(", ")))
    })?;
    let plan = build_plan(source)?.into_parts().0;
    let e = export(&plan, format);
    println!("{}", e.text.trim_end());
    for n in &e.notes {
        eprintln!("note: {n}");
    }
    Ok(())
}

fn field_json(f: &Field) -> serde_json::Value {
    serde_json::to_value(f).unwrap_or_default()
}

pub fn schema(model: Option<&str>, model_file: Option<&std::path::Path>, json: bool) -> anyhow::Result<()> {
    let fields = match (model, model_file) {
        (_, Some(path)) => schema::file_fields(&crate::input::read_model_file(path)?),
        (Some(m), None) => schema::fields(m).map_err(|e| bad_input(format!("--model: {e}")))?,
        (None, None) => schema::plan_fields(),
    };
    if json {
        println!("{}", serde_json::Value::Array(fields.iter().map(field_json).collect()));
        return Ok(());
    }
    for f in &fields {
        let p = &f.param;
        let default = if p.default.is_empty() { "(unset)".to_owned() } else { p.default.clone() };
        println!("{:<22} {:<10} default {:<14} {}", p.key, f.group.label(), default, p.help);
    }
    Ok(())
}

/// `headroom estimate`: the estimate as a table, or as JSON with stable keys.
pub fn estimate(
    source: &PlanSource,
    gpu: Option<&str>,
    json: bool,
    trace: bool,
    calibration: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (mut plan, graph) = build_plan(source)?.into_parts();
    let target = match gpu {
        Some(name) => {
            let g = find_gpu(name)?;
            shared::estimate::Target::Cuda(g)
        }
        None => {
            // A CPU job here uses this machine's threads and instruction set unless the
            // plan says otherwise.
            if plan.cpu_threads.is_none() {
                let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("locating this executable: {e}"))?;
                plan.cpu_threads = Some(crate::devices::probe_machine_blocking(&exe).cpu_threads);
            }
            if plan.cpu_isa.is_none() {
                plan.cpu_isa = system::host::cpu_isa();
            }
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

/// What `headroom token` does.
#[derive(clap::Subcommand, Debug)]
pub enum TokenAction {
    /// Add a token named NAME (the file is created, mode 600, if needed) and print it:
    /// the only time it is shown.
    Add {
        name: String,
        #[arg(long)]
        token_file: std::path::PathBuf,
    },
    /// Remove the token named NAME; a running agent refuses it from its next connection.
    Revoke {
        name: String,
        #[arg(long)]
        token_file: std::path::PathBuf,
    },
    /// The names of the file's tokens (never the tokens).
    List {
        #[arg(long)]
        token_file: std::path::PathBuf,
    },
}

/// `headroom token add|revoke|list`.
pub fn token(action: TokenAction) -> anyhow::Result<()> {
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
