//! The trainer's knobs through `headroom run`: validation passes and checkpoints.

use headroom_tests::{cli, json_lines};
use serde_json::Value;

fn run(args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut all = vec!["run", "--device", "cpu"];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&all)?;
    anyhow::ensure!(code == 0, "headroom {all:?} failed: {err}");
    Ok(json_lines(&out))
}

fn events<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|v| v["event"]["kind"] == kind).collect()
}

fn summary(lines: &[Value]) -> &Value {
    &lines.last().expect("a summary line")["summary"]
}

/// The estimate's peak for one phase (`estimate --json`'s `phase_peaks`).
fn estimated_phase(args: &[&str], phase: &str) -> anyhow::Result<u64> {
    let mut all = vec!["estimate", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&all)?;
    anyhow::ensure!(code == 0, "{err}");
    let v: Value = serde_json::from_str(&out)?;
    v["phase_peaks"][phase].as_u64().ok_or_else(|| anyhow::anyhow!("no {phase} in {v}"))
}

/// `run` then `estimate` of one plan with validation: (measured validation peaks by
/// step, estimated validation peak).
/// Measured validation peaks by step, the estimated validation peak, the run's summary.
type Validation = (Vec<(u64, u64)>, u64, Value);

fn validation_of(model: &[&str], val: &[&str]) -> anyhow::Result<Validation> {
    let args: Vec<&str> = model.iter().chain(val).copied().collect();
    let lines = run(&args)?;
    let passes: Vec<(u64, u64)> = events(&lines, "validation")
        .iter()
        .map(|v| {
            assert!(v["event"]["loss"].as_f64().is_some_and(f64::is_finite), "{v}");
            (v["step"].as_u64().expect("step"), v["event"]["peak_bytes"].as_u64().expect("peak"))
        })
        .collect();
    let s = summary(&lines).clone();
    // The estimate for the trainer's own runtime, which is what `run` measures.
    let mut est = args.clone();
    est.extend(["--set", "runtime=headroom"]);
    Ok((passes, estimated_phase(&est, "validation")?, s))
}

#[test]
fn validation_runs_in_eval_mode_at_its_own_batch_and_its_peak_is_estimated_apart() -> anyhow::Result<()> {
    // ViT with dropout and ResNet-18 with batch norm (eval mode changes both); a pass of
    // 3 batches every 2 steps and after the last, at 8x the training micro-batch.
    let vit = [
        "--model",
        "vit",
        "--set",
        "image=32",
        "--set",
        "patch_size=8",
        "--set",
        "hidden_dim=64",
        "--set",
        "mlp_dim=128",
        "--set",
        "num_layers=2",
        "--set",
        "num_heads=2",
        "--set",
        "dropout=0.1",
        "--set",
        "num_classes=10",
        "--set",
        "batch=4",
        "--set",
        "steps=5",
        "--set",
        "threads=1",
    ];
    let val = ["--set", "val_batches=3", "--set", "val_every=2", "--set", "val_batch=32"];
    let (passes, estimated, s) = validation_of(&vit, &val)?;
    assert_eq!(passes.iter().map(|p| p.0).collect::<Vec<_>>(), vec![2, 4, 5], "{passes:?}");
    let measured = passes[0].1;
    assert_eq!(s["phase_peaks"]["validation"].as_u64(), Some(measured), "{s}");
    // Here the validation batch sets the run's peak: the summary's peak is it.
    assert!(measured > s["phase_peaks"]["backward"].as_u64().expect("present"));
    assert_eq!(s["peak_bytes"].as_u64(), Some(measured));
    // The estimator meets the trainer on the CPU within its exact residual (1 %).
    let err = (estimated as f64 - measured as f64).abs() / measured as f64;
    assert!(err <= 0.01, "ViT validation peak: estimated {estimated}, measured {measured}");

    let resnet = ["--model", "resnet18", "--set", "image=32", "--set", "num_classes=10", "--set", "batch=4"];
    let resnet: Vec<&str> = resnet.iter().chain(&["--set", "steps=2", "--set", "threads=1"]).copied().collect();
    let (passes, estimated, _) = validation_of(&resnet, &["--set", "val_batches=2", "--set", "val_batch=16"])?;
    let measured = passes[0].1;
    let err = (estimated as f64 - measured as f64).abs() / measured as f64;
    assert!(err <= 0.01, "ResNet-18 validation peak: estimated {estimated}, measured {measured}");

    // Without validation the phase is absent; a larger validation batch raises it.
    let (code, out, _) = cli(&["estimate", "--json", "--model", "small_cnn", "--set", "batch=4"])?;
    assert_eq!(code, 0);
    assert!(serde_json::from_str::<Value>(&out)?["phase_peaks"].get("validation").is_none());
    let at = |b: &str| -> anyhow::Result<u64> {
        let set = format!("val_batch={b}");
        estimated_phase(&["--model", "small_cnn", "--set", "val_batches=2", "--set", &set], "validation")
    };
    assert!(at("64")? > at("8")?);
    Ok(())
}

#[test]
fn a_resumed_run_continues_exactly_where_the_checkpoint_left_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let first = dir.path().join("first");
    let second = dir.path().join("second");
    // Adam's moments, fp16's loss scale and the step all have to come back.
    let plan = [
        "--model",
        "small_cnn",
        "--set",
        "batch=4",
        "--set",
        "steps=6",
        "--set",
        "optimizer=adam",
        "--set",
        "lr_schedule=cosine",
        "--set",
        "checkpoint_every=3",
    ];
    let with = |d: &std::path::Path, extra: &[&str]| -> anyhow::Result<Vec<Value>> {
        let d = d.to_str().expect("utf-8 path").to_owned();
        let mut a: Vec<String> = plan.iter().map(|s| (*s).to_owned()).collect();
        a.extend(["--checkpoint-dir".to_owned(), d]);
        a.extend(extra.iter().map(|s| (*s).to_owned()));
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let whole = with(&first, &[])?;
    let saved: Vec<u64> =
        events(&whole, "checkpoint_saved").iter().map(|v| v["step"].as_u64().expect("present")).collect();
    assert_eq!(saved, vec![3, 6]);
    for name in ["weights.safetensors", "optimizer.pt", "state.json"] {
        assert!(first.join("step-00000003").join(name).is_file(), "{name}");
    }
    let losses = |lines: &[Value]| -> Vec<(u64, f64)> {
        lines
            .iter()
            .filter(|v| v.get("loss").is_some() && v.get("event").is_none())
            .map(|v| (v["step"].as_u64().expect("present"), v["loss"].as_f64().expect("present")))
            .collect()
    };
    let step3 = first.join("step-00000003");
    let resumed = with(&second, &["--resume", step3.to_str().expect("present")])?;
    assert_eq!(events(&resumed, "resumed")[0]["step"], 3);
    let tail: Vec<(u64, f64)> = losses(&whole).into_iter().filter(|(s, _)| *s > 3).collect();
    assert_eq!(losses(&resumed), tail, "the resumed steps reproduce the uninterrupted run");
    assert_eq!(summary(&resumed)["final_loss"], summary(&whole)["final_loss"]);
    assert_eq!(summary(&resumed)["first_loss"], summary(&whole)["first_loss"]);

    // A directory of checkpoints resumes from its newest; wrong plans are refused with
    // the file and the reason.
    let (code, _, err) =
        cli(&[&["run", "--device", "cpu"][..], &plan[..], &["--resume", first.to_str().expect("present")]].concat())?;
    assert_ne!(code, 0);
    assert!(err.contains("step-00000006") && err.contains("nothing left to run"), "{err}");
    let (code, _, err) =
        cli(&["run", "--device", "cpu", "--model", "mlp", "--resume", step3.to_str().expect("present")])?;
    assert_ne!(code, 0);
    assert!(err.contains("state.json") && err.contains("small_cnn"), "{err}");
    let (code, _, err) = cli(&[
        &["run", "--device", "cpu"][..],
        &plan[..],
        &["--set", "batch=2", "--resume", step3.to_str().expect("present")],
    ]
    .concat())?;
    assert_ne!(code, 0);
    assert!(err.contains("effective batch"), "{err}");
    let (code, _, err) = cli(&[&["run", "--device", "cpu"][..], &plan[..]].concat())?;
    assert_ne!(code, 0);
    assert!(err.contains("checkpoint_every") && err.contains("--checkpoint-dir"), "{err}");
    // A damaged file is named.
    std::fs::write(step3.join("weights.safetensors"), b"not a safetensors file")?;
    let out = second.to_str().expect("present");
    let (code, _, err) = cli(&[
        &["run", "--device", "cpu"][..],
        &plan[..],
        &["--checkpoint-dir", out, "--resume", step3.to_str().expect("present")],
    ]
    .concat())?;
    assert_ne!(code, 0);
    assert!(err.contains("weights.safetensors"), "{err}");
    Ok(())
}
