//! The command line: `estimate` and `run` on the example plans, and bad input.

use headroom_tests::cli;

#[test]
fn estimate_prints_json_with_the_breakdown() -> anyhow::Result<()> {
    let (code, out, err) = cli(&["estimate", "--plan", "examples/mlp.json", "--json"])?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["params"], 85002);
    assert_eq!(v["peak_phase"], "optimizer_step");
    let breakdown = v["breakdown"].as_object().expect("breakdown object");
    let sum: u64 = breakdown.values().filter_map(serde_json::Value::as_u64).sum();
    assert_eq!(Some(sum), v["peak_bytes"].as_u64(), "the breakdown adds up to the peak");
    for key in ["weights", "gradients", "optimizer_state", "activations"] {
        assert!(breakdown.contains_key(key), "missing {key}");
    }
    Ok(())
}

#[test]
fn bad_plans_exit_with_code_2_and_name_the_field() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("headroom-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(headroom_tests::repo_root().join("examples/cnn.yaml"))?
            .replace("micro_batch: 16", "micro_batch: 0"),
    )?;
    let (code, _, err) = cli(&["estimate", "--plan", bad.to_str().unwrap_or_default()])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("micro_batch: must be between 1 and 65536, got 0"), "{err}");
    let (code, _, err) = cli(&["run", "--plan", "no/such/plan.json"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no/such/plan.json"), "{err}");
    let (code, _, err) = cli(&["run", "--plan", "examples/mlp.json", "--device", "tpu"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--device"), "{err}");
    Ok(())
}

#[test]
fn run_prints_a_json_line_per_micro_batch_then_a_summary() -> anyhow::Result<()> {
    let (code, out, err) = cli(&["run", "--plan", "examples/cnn.yaml", "--device", "cpu"])?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 30 * 2 + 1, "30 steps x 2 micro-batches + summary");
    assert_eq!(lines[0]["micro_batch"], 1);
    let summary = &lines[60]["summary"];
    assert_eq!(summary["micro_batches"], 60);
    assert!(summary["final_loss"].as_f64() < summary["first_loss"].as_f64().map(|l| l * 0.5), "{summary}");
    assert!(summary["estimate_error_pct"].as_f64().is_some_and(|e| e.abs() < 2.0), "{summary}");
    Ok(())
}
