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
    // The saved optimizer state brings its own options: another optimizer is refused.
    let out = second.to_str().expect("present");
    let (code, _, err) = cli(&[
        &["run", "--device", "cpu"][..],
        &plan[..],
        &["--set", "weight_decay=0.1", "--checkpoint-dir", out, "--resume", step3.to_str().expect("present")],
    ]
    .concat())?;
    assert_ne!(code, 0);
    assert!(err.contains("was saved with optimizer"), "{err}");
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

/// Writes `n` learnable `[C, S, S]` float32 `.npy` samples per class into
/// `root/name/class{c}/` (class c's values centred on `2c - 1`).
fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn write_classes(root: &std::path::Path, name: &str, classes: usize, n: usize, c: u64, s: u64) -> anyhow::Result<()> {
    use npyz::WriterBuilder;
    for k in 0..classes {
        let dir = root.join(name).join(format!("class{k}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..n {
            let len = (c * s * s) as usize;
            let centre = 2.0 * k as f32 - 1.0;
            // A fixed pattern per file, so the data is learnable and the test repeatable.
            let values: Vec<f32> =
                (0..len).map(|j| centre + 0.3 * (((i * 31 + j * 7) % 13) as f32 / 13.0 - 0.5)).collect();
            let mut out = Vec::new();
            {
                let mut w =
                    npyz::WriteOptions::<f32>::new().default_dtype().shape(&[c, s, s]).writer(&mut out).begin_nd()?;
                w.extend(values)?;
                w.finish()?;
            }
            std::fs::write(dir.join(format!("{i}.npy")), out)?;
        }
    }
    Ok(())
}

#[test]
fn a_model_learns_from_npy_files_on_disk_through_loader_threads() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    write_classes(root.path(), "train", 2, 24, 3, 20)?;
    let data_root = root.path().to_str().expect("utf-8");
    // 20x20 files cropped to the model's 16x16; two loader threads, two batches each.
    let plan = [
        "--model",
        "small_cnn",
        "--set",
        "image=16",
        "--set",
        "num_classes=2",
        "--set",
        "batch=8",
        "--set",
        "steps=30",
        "--set",
        "optimizer=sgd",
        "--set",
        "lr=0.05",
        "--set",
        "threads=1",
        "--set",
        "workers=2",
        "--set",
        "prefetch=2",
    ];
    let args: Vec<&str> = plan.iter().copied().chain(["--set", "data=train", "--data-root", data_root]).collect();
    let lines = run(&args)?;
    let s = summary(&lines);
    let (first, last) = (s["first_loss"].as_f64().expect("first"), s["final_loss"].as_f64().expect("final"));
    assert!(last < 0.5 * first, "the loss falls on real data: {first} -> {last}");
    // The loader's batches live in host memory until taken: the measured peak is the
    // synthetic run's to the byte, and the estimate's within its 1 % residual.
    let same = run(&plan)?;
    assert_eq!(summary(&same)["peak_bytes"], s["peak_bytes"], "{s}");
    assert!(s["estimate_error_pct"].as_f64().is_some_and(|e| e.abs() < 1.0), "{s}");

    // Paths are confined to the data root, and a data path needs one.
    for (bad, needle) in [("data=../train", "climbs out"), ("data=/etc", "absolute")] {
        let mut a: Vec<&str> = vec!["run", "--device", "cpu", "--model", "small_cnn", "--set", bad];
        a.extend(["--data-root", data_root]);
        let (code, _, err) = cli(&a)?;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains(needle), "{err}");
    }
    std::os::unix::fs::symlink("/etc", root.path().join("etc"))?;
    let (code, _, err) =
        cli(&["run", "--device", "cpu", "--model", "small_cnn", "--set", "data=etc", "--data-root", data_root])?;
    assert_ne!(code, 0);
    assert!(err.contains("outside the data root"), "{err}");
    let (code, _, err) = cli(&["run", "--device", "cpu", "--model", "small_cnn", "--set", "data=train"])?;
    assert_ne!(code, 0);
    assert!(err.contains("--data-root"), "{err}");
    Ok(())
}

#[test]
fn the_host_memory_guard_lowers_the_loader_and_stops_a_job_before_the_kernel_would() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    // The loader must be able to run ahead of the trainer for the guard to have work.
    let _cpu = headroom_tests::exclusive();
    // 3x256x256 float samples: a batch of 32 is 24 MiB; 4 workers x 4 batches hold 384 MiB.
    write_classes(root.path(), "big", 2, 32, 3, 256)?;
    let data_root = root.path().to_str().expect("utf-8");
    let plan = |extra: &[&str]| -> Vec<String> {
        let base = [
            "--model",
            "small_cnn",
            "--set",
            "image=256",
            "--set",
            "num_classes=2",
            "--set",
            "batch=32",
            "--set",
            "threads=1",
            "--set",
            "data=big",
            "--data-root",
            data_root,
        ];
        base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    let alone = run(&as_strs(&plan(&["--set", "workers=0", "--set", "steps=3"])))?;
    let baseline = summary(&alone)["peak_host_rss_bytes"].as_u64().expect("rss");
    assert!(events(&alone, "host_memory_low").is_empty());

    // 100 MiB above the loader-less run's peak: short of the 384 MiB that 4 x 4
    // prefetched batches need. Workers look for room before each batch, counting the
    // batches the others are still making, so four that look at the same moment do not
    // all take the same room: the peak stays near the limit and the job finishes.
    let limit = baseline + (100 << 20);
    let limit_key = format!("host_memory_limit={limit}");
    let gated =
        run(&as_strs(&plan(&["--set", "workers=4", "--set", "prefetch=4", "--set", "steps=8", "--set", &limit_key])))?;
    assert_eq!(summary(&gated)["steps"], 8);
    let peak = summary(&gated)["peak_host_rss_bytes"].as_u64().expect("rss");
    // Not under it exactly: workers look at the resident set between steps plus the last
    // step's rise above it, and on the CPU the resident set between steps moves with
    // what the allocator keeps of the step's freed tensors (506 to 576 MB measured in one
    // run), the next step's rise moving the other way by as much. Measured 53 to 133 MiB
    // above the loader-less run on a loaded machine; an unguarded loader keeps 16
    // batches, 384 MiB. The bound is six batches past the limit.
    assert!(peak < limit + 6 * (24 << 20), "the workers kept near the limit: {peak} vs {limit}");
    println!(
        "host memory guard: 4 workers x 4 batches under a limit 100 MiB above the loader-less run: peak {} MiB above it, {} lowering(s)",
        (peak.saturating_sub(baseline)) >> 20,
        events(&gated, "host_memory_low").len()
    );

    // Memory the loader does not hold grows: the run keeps 32 MiB more each step (on the
    // CPU, host memory, and part of each step's peak). Within a few steps the room is
    // short of the two batches and 8 MiB the guard keeps, whatever the loader holds
    // (measured: 12 MiB a step took until step 7), so the guard lowers the loader; it
    // waits two micro-batches between lowerings, so 8 steps see at most four of the
    // five it takes to reach 0 workers, and the job finishes.
    let lowered = run(&as_strs(&plan(&[
        "--set",
        "workers=4",
        "--set",
        "prefetch=4",
        "--set",
        "steps=8",
        "--set",
        "retain_bytes_per_step=33554432",
        "--set",
        &limit_key,
    ])))?;
    let low = events(&lowered, "host_memory_low");
    assert!(!low.is_empty(), "the guard acted");
    assert_eq!(low[0]["event"]["bound"], "the plan's host_memory_limit");
    let last = low.last().expect("one");
    let in_flight = last["event"]["workers"].as_u64().expect("w") * last["event"]["prefetch"].as_u64().expect("p");
    assert!(in_flight < 16, "{low:?}");
    println!(
        "host memory guard: lowered {} times from step {}, to {in_flight} batches in flight",
        low.len(),
        low[0]["step"]
    );
    assert_eq!(summary(&lowered)["steps"], 8);

    // A limit the worker itself is above: lowered to nothing, the job stops cleanly with
    // the reason instead of being killed.
    let (code, out, err) = cli(&as_strs(
        &[
            &["run".to_owned(), "--device".to_owned(), "cpu".to_owned()][..],
            &plan(&[
                "--set",
                "workers=2",
                "--set",
                "prefetch=1",
                "--set",
                "steps=16",
                "--set",
                "host_memory_limit=64MiB",
            ]),
        ]
        .concat(),
    ))?;
    assert_ne!(code, 0);
    assert!(err.contains("HostMemory") && err.contains("host_memory_limit"), "{err}");
    let lines = json_lines(&out);
    let low = events(&lines, "host_memory_low");
    assert_eq!(low.last().map(|v| v["event"]["workers"].as_u64()), Some(Some(0)), "{low:?}");
    Ok(())
}

/// Saves a small TorchScript classifier (conv, batch norm, dropout, linear) for
/// `[3, 16, 16]` inputs and 10 classes with the torch venv's python.
fn save_torchscript(path: &std::path::Path) -> anyhow::Result<()> {
    let script = path.with_extension("py");
    std::fs::write(
        &script,
        r#"import sys, torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.flatten(1)))

torch.manual_seed(0)
torch.jit.save(torch.jit.script(Net()), sys.argv[1])
"#,
    )?;
    let python =
        std::env::var("HEADROOM_TORCH_VENV").map_or_else(|_| "python3".to_owned(), |v| format!("{v}/bin/python"));
    let out = std::process::Command::new(python).arg(&script).arg(path).output()?;
    anyhow::ensure!(out.status.success(), "saving the module: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn a_torchscript_module_trains_with_the_same_loop_and_is_calibrated_not_estimated() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    save_torchscript(&root.path().join("net.pt"))?;
    let data_root = root.path().to_str().expect("utf-8");
    let calibration = root.path().join("calibration.json");
    let calibration = calibration.to_str().expect("utf-8");
    let model = ["--model", "torchscript", "--set", "file=net.pt", "--set", "input=3,16,16", "--set", "num_classes=10"];
    let bare = |extra: &[&str]| -> Vec<String> { model.iter().chain(extra).map(|s| (*s).to_owned()).collect() };
    let with = |extra: &[&str]| -> Vec<String> {
        model.iter().chain(extra).chain(&["--data-root", data_root]).map(|s| (*s).to_owned()).collect()
    };
    // The loop, knobs and telemetry of any plan: validation in eval mode, checkpoints.
    let ck = root.path().join("ck");
    let lines = run(&as_strs(&with(&[
        "--set",
        "batch=8",
        "--set",
        "steps=20",
        "--set",
        "lr=0.01",
        "--set",
        "val_batches=2",
        "--set",
        "checkpoint_every=10",
        "--checkpoint-dir",
        ck.to_str().expect("utf-8"),
    ])))?;
    let s = summary(&lines);
    assert!(s["final_loss"].as_f64() < s["first_loss"].as_f64().map(|f| 0.5 * f), "{s}");
    assert!(s["estimated_peak_bytes"].is_null(), "a TorchScript module is not estimated: {s}");
    assert!(s["phase_peaks"]["validation"].as_u64().is_some_and(|v| v > 0));
    assert_eq!(events(&lines, "checkpoint_saved").len(), 2);
    assert!(ck.join("step-00000020/weights.safetensors").is_file());

    // No estimate until find-batch has measured it; then a calibrated one, labelled.
    let (code, _, err) =
        cli(&as_strs(&[&["estimate".to_owned()][..], &bare(&["--calibration", calibration])].concat()))?;
    assert_eq!(code, 2);
    assert!(err.contains("find-batch") && err.contains("TorchScript"), "{err}");
    let (code, out, err) = cli(&as_strs(
        &[
            &["find-batch".to_owned()][..],
            &with(&[
                "--set",
                "batch=4",
                "--set",
                "accum=16",
                "--device",
                "cpu",
                "--capacity",
                "2MiB",
                "--calibration",
                calibration,
                "--json",
            ]),
        ]
        .concat(),
    ))?;
    assert_eq!(code, 0, "{err}");
    let found: Value = serde_json::from_str(&out)?;
    let b = found["micro_batch"].as_u64().expect("a micro-batch");
    assert_eq!(b * found["accumulation"].as_u64().expect("accumulation"), 64);
    let probed = found["probes"].as_array().expect("probes").iter().find(|p| p["micro_batch"] == b).cloned();
    let (code, out, err) = cli(&as_strs(
        &[
            &["estimate".to_owned(), "--json".to_owned()][..],
            &bare(&[
                "--set",
                &format!("batch={b}"),
                "--set",
                &format!("accum={}", 64 / b),
                "--calibration",
                calibration,
            ]),
        ]
        .concat(),
    ))?;
    assert_eq!(code, 0, "{err}");
    let e: Value = serde_json::from_str(&out)?;
    assert_eq!(e["estimated"], false);
    assert_eq!(e["calibrated_peak_bytes"], probed.expect("the answer was probed")["peak_bytes"], "{e}");

    // A module that returns another shape, or a file that is not one, is named.
    let (code, _, err) = cli(&as_strs(
        &[&["run".to_owned(), "--device".to_owned(), "cpu".to_owned()][..], &with(&["--set", "num_classes=5"])]
            .concat(),
    ))?;
    assert_ne!(code, 0);
    assert!(err.contains("returned [") && err.contains("num_classes"), "{err}");
    std::fs::write(root.path().join("bad.pt"), b"not a module")?;
    let (code, _, err) =
        cli(&["run", "--device", "cpu", "--model", "torchscript", "--set", "file=bad.pt", "--data-root", data_root])?;
    assert_ne!(code, 0);
    assert!(err.contains("bad.pt") && err.contains("not a TorchScript module"), "{err}");
    Ok(())
}

#[test]
fn w4s_surface_term_runs_every_kth_step_trains_the_model_and_meets_its_estimate() -> anyhow::Result<()> {
    let plan = |k: &str| {
        [
            "--plan".to_owned(),
            "examples/cpu/w4.yaml".into(),
            "--set".into(),
            "steps=4".into(),
            "--set".into(),
            format!("distance_loss_every={k}"),
        ]
    };
    let every = |k: &str| -> anyhow::Result<Vec<Value>> {
        let args = plan(k);
        run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let with = every("2")?;
    let d = events(&with, "surface_term");
    assert_eq!(d.iter().map(|v| v["step"].as_u64().expect("step")).collect::<Vec<_>>(), vec![2, 4], "{d:?}");
    // The host memory of the maps is what the estimate counts for it, to the byte:
    // float32 labels and map for both 24x40x40 samples, then one sample's two masks, two
    // float64 transforms and three int32 index arrays.
    let mut est_args = plan("2").to_vec();
    est_args.extend(["--set".to_owned(), "runtime=headroom".to_owned()]);
    let est_args: Vec<&str> = est_args.iter().map(String::as_str).collect();
    let (code, out, err) = cli(&[&["estimate", "--json"][..], &est_args[..]].concat())?;
    anyhow::ensure!(code == 0, "{err}");
    let est: Value = serde_json::from_str(&out)?;
    let v = 24 * 40 * 40;
    assert_eq!(est["host_breakdown"]["distance_loss"].as_u64(), Some(2 * v * 4 * 2 + v * (2 + 16 + 12)));
    for e in &d {
        assert!(e["event"]["value"].as_f64().is_some_and(f64::is_finite), "{e}");
        assert_eq!(e["event"]["host_bytes"], est["host_breakdown"]["distance_loss"], "{e}");
    }
    let without = every("0")?;
    assert!(events(&without, "surface_term").is_empty());
    // The term is in the gradient: after step 2's update, step 3 (no term in either run)
    // starts from other weights.
    let loss_at =
        |lines: &[Value], step: u64| lines.iter().find(|v| v["step"] == step).and_then(|v| v["loss"].as_f64());
    assert_ne!(loss_at(&with, 3), loss_at(&without, 3), "step 2's surface term changed the weights");
    // Its device tensors (the softmax, the map, the product) raise the loss phase, as
    // estimated.
    let (lw, lo) = (summary(&with)["phase_peaks"]["loss"].as_u64(), summary(&without)["phase_peaks"]["loss"].as_u64());
    let (lw, lo) = (lw.expect("loss phase"), lo.expect("loss phase"));
    assert!(lw > lo + 300_000, "{lw} vs {lo}");
    let estimated = est["phase_peaks"]["loss"].as_u64().expect("estimated loss phase");
    let err = (estimated as f64 - lw as f64) / lw as f64 * 100.0;
    println!(
        "loss phase with the surface term: measured {lw} B, estimated {estimated} B ({err:+.4} %); without {lo} B"
    );
    assert!(err.abs() < 0.01, "{err} %");
    Ok(())
}

#[test]
fn a_unet_learns_synthetic_vessel_masks_and_meets_its_estimate() -> anyhow::Result<()> {
    let lines = run(&[
        "--model",
        "unet2d",
        "--set",
        "image=64",
        "--set",
        "out_channels=1",
        "--set",
        "loss=bce",
        "--set",
        "batch=4",
        "--set",
        "steps=30",
        "--set",
        "lr=0.01",
        "--set",
        "threads=1",
    ])?;
    let s = summary(&lines);
    let (first, last) = (s["first_loss"].as_f64().expect("first"), s["final_loss"].as_f64().expect("final"));
    assert!(last < 0.7 * first, "vessels are learnable: {first} -> {last}");
    assert!(s["estimate_error_pct"].as_f64().is_some_and(|e| e.abs() < 0.1), "{s}");
    Ok(())
}

#[test]
fn loader_threads_make_synthetic_batches_too_without_adding_device_memory() -> anyhow::Result<()> {
    let plan = |workers: &str| -> anyhow::Result<Vec<Value>> {
        run(&[
            "--model",
            "small_cnn",
            "--set",
            "image=16",
            "--set",
            "num_classes=4",
            "--set",
            "batch=8",
            "--set",
            "steps=30",
            "--set",
            "optimizer=sgd",
            "--set",
            "lr=0.05",
            "--set",
            "threads=1",
            "--set",
            workers,
            "--set",
            "prefetch=2",
        ])
    };
    let threads = plan("workers=3")?;
    let inline = plan("workers=0")?;
    let s = summary(&threads);
    assert_eq!(s["peak_bytes"], summary(&inline)["peak_bytes"], "{s}");
    let (first, last) = (s["first_loss"].as_f64().expect("first"), s["final_loss"].as_f64().expect("final"));
    assert!(last < 0.5 * first, "learnable from the host too: {first} -> {last}");
    Ok(())
}

/// Exports a small 1-D classifier with torch.export (weights included) and eight fixed
/// samples as `.npy` files with their labels, with the torch venv's python; prints
/// PyTorch's cross-entropy of the whole set with the exported weights.
fn export_with_data(root: &std::path::Path) -> anyhow::Result<f64> {
    let script = root.join("export.py");
    std::fs::write(
        &script,
        r#"import os, sys, torch, torch.nn as nn, torch.nn.functional as F

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 16, 7, stride=2, padding=3)
        self.bn = nn.BatchNorm1d(16)
        self.act = nn.SiLU(inplace=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(x))).mean(2))

root = sys.argv[1]
torch.manual_seed(3)
model = Net().train()
batch = torch.export.Dim("batch", min=1, max=4096)
ep = torch.export.export(model, (torch.randn(2, 2, 64),), dynamic_shapes=({0: batch},))
torch.export.save(ep, os.path.join(root, "net.pt2"))
x = torch.randn(8, 2, 64)
y = torch.randint(0, 5, (8,))
os.makedirs(os.path.join(root, "set"), exist_ok=True)
rows = ["input,label"]
for i in range(8):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 64), }"
    header += " " * (128 - 10 - len(header) - 1) + "\n"
    with open(os.path.join(root, "set", f"s{i}.npy"), "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
        f.write(bytes(x[i].clone().untyped_storage()))
    rows.append(f"s{i}.npy,{int(y[i])}")
open(os.path.join(root, "labels.csv"), "w").write("\n".join(rows) + "\n")
with torch.no_grad():
    print(F.cross_entropy(model(x), y).item())
"#,
    )?;
    let python =
        std::env::var("HEADROOM_TORCH_VENV").map_or_else(|_| "python3".to_owned(), |v| format!("{v}/bin/python"));
    let out = std::process::Command::new(python).arg(&script).arg(root).output()?;
    anyhow::ensure!(out.status.success(), "exporting: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().last().unwrap_or_default().trim().parse()?)
}

/// `init=file` trains an exported model from its own weights: on the same data, its first
/// loss is PyTorch's with those weights, to float precision; `init=random` starts
/// elsewhere.
#[test]
fn an_exported_model_trains_from_the_files_weights() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let pytorch = export_with_data(root.path())?;
    let file = root.path().join("net.pt2");
    let data_root = root.path().to_str().expect("utf-8");
    let args = |init: &str| -> Vec<String> {
        [
            "--model-file",
            file.to_str().expect("utf-8"),
            "--data-root",
            data_root,
            "--set",
            "data=set",
            "--set",
            "data_labels=labels.csv",
            "--set",
            "batch=8",
            "--set",
            "steps=1",
            "--set",
            "optimizer=sgd",
            "--set",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([format!("init={init}")])
        .collect()
    };
    let lines = run(&as_strs(&args("file")))?;
    let first = lines.last().and_then(|v| v["summary"]["first_loss"].as_f64()).expect("summary");
    assert!((first - pytorch).abs() < 1e-5 * pytorch.abs().max(1.0), "headroom {first} vs pytorch {pytorch}");
    let lines = run(&as_strs(&args("random")))?;
    let random = lines.last().and_then(|v| v["summary"]["first_loss"].as_f64()).expect("summary");
    assert!((random - pytorch).abs() > 1e-3, "fresh weights start elsewhere: {random} vs {pytorch}");
    Ok(())
}
