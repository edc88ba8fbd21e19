//! Every zoo entry against the parameter counts of its reference implementation, from
//! `shared/fixtures/reference_params.json` (written by `scripts/reference_params.py`,
//! which instantiates torchvision, timm, MONAI, open_clip and transformers models).

use std::collections::BTreeMap;

use super::*;

fn settings_of(case: &serde_json::Value) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for (k, v) in case["settings"].as_object().expect("settings object") {
        let text = match v {
            serde_json::Value::Array(items) => items.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","),
            other => other.to_string(),
        };
        map.insert(k.clone(), text);
    }
    map
}

#[test]
fn every_zoo_count_matches_its_reference() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../fixtures/reference_params.json")).expect("fixture parses");
    let cases = fixture["cases"].as_array().expect("cases");
    let mut covered = BTreeSet::new();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["model"].as_str().expect("model name");
        let settings = settings_of(case);
        let want = case["params"].as_u64().expect("params");
        match build(name, &settings, 1, &BuildOptions::default()) {
            Ok(g) if g.n_params() == want => {}
            Ok(g) => failures.push(format!("{name} {settings:?}: {} != reference {want}", g.n_params())),
            Err(e) => failures.push(format!("{name} {settings:?}: {e}")),
        }
        covered.insert(name.to_owned());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for model in MODELS.iter().filter(|m| **m != "small_cnn") {
        assert!(covered.contains(*model), "{model} has no reference count");
    }
}

#[test]
fn feature_size_must_be_divisible_by_12_and_suggests_neighbours() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../../fixtures/reference_params.json")).expect("fixture parses");
    assert_eq!(fixture["swin_unetr_rejects_feature_size_32"], serde_json::Value::Bool(true));
    let map = BTreeMap::from([("feature_size".to_owned(), "32".to_owned())]);
    let err = build("swin_unetr", &map, 1, &BuildOptions::default()).expect_err("32 is not a multiple of 12");
    assert_eq!(err.to_string(), "feature_size: must be divisible by 12 (MONAI's SwinUNETR refuses 32); use 24 or 36");
}

#[test]
fn unknown_models_keys_and_values_are_named() {
    let empty = BTreeMap::new();
    assert!(matches!(build("resnet101", &empty, 1, &BuildOptions::default()), Err(ZooError::UnknownModel(_))));
    let map = BTreeMap::from([("depth".to_owned(), "3".to_owned())]);
    let err = build("gpt2", &map, 1, &BuildOptions::default()).expect_err("unknown key");
    assert!(err.to_string().starts_with("gpt2: unknown key 'depth'; known keys: "), "{err}");
    let map = BTreeMap::from([("n_layer".to_owned(), "two".to_owned())]);
    assert_eq!(
        build("gpt2", &map, 1, &BuildOptions::default()).expect_err("bad value").to_string(),
        "n_layer: expected a whole number, got 'two'"
    );
    let map = BTreeMap::from([("volume".to_owned(), "64,64,60".to_owned())]);
    let err = build("swin_unetr", &map, 1, &BuildOptions::default()).expect_err("not divisible by 32");
    assert!(err.to_string().starts_with("volume: each size must be divisible by 32"), "{err}");
    let map = BTreeMap::from([("n_head".to_owned(), "5".to_owned())]);
    assert_eq!(
        build("gpt2", &map, 1, &BuildOptions::default()).expect_err("heads").to_string(),
        "n_head: 5 heads must divide the width 768"
    );
}

#[test]
fn every_model_builds_with_its_defaults_at_batch_two() {
    for name in MODELS {
        let map = BTreeMap::from(match name {
            // Small inputs keep this test quick; the shapes are what is being checked.
            "swin_unetr" | "unet3d" => [("volume".to_owned(), "64".to_owned())],
            "gpt2" | "clip" => [("seq".to_owned(), "16".to_owned())],
            _ => [("image".to_owned(), if name == "mlp" { "" } else { "64" }.to_owned())],
        });
        let map: BTreeMap<String, String> = map.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let g = build(name, &map, 2, &BuildOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!g.nodes.is_empty(), "{name}");
        assert_eq!(g.micro_batch(), 2, "{name}");
    }
}

#[test]
fn every_model_key_has_help_and_its_default_builds() {
    for name in crate::zoo::MODELS {
        let schema = crate::zoo::schema(name).expect(name);
        assert!(!schema.is_empty(), "{name} reads no keys");
        let mut settings = std::collections::BTreeMap::new();
        for p in &schema {
            assert!(!p.help.is_empty(), "{name}.{} has no help", p.key);
            settings.insert(p.key.clone(), p.default.clone());
        }
        // Every default, written out as a user would, builds the same model.
        let opts = crate::zoo::BuildOptions::default();
        let a = crate::zoo::build(name, &settings, 1, &opts).expect(name);
        let b = crate::zoo::build(name, &Default::default(), 1, &opts).expect(name);
        assert_eq!(a.n_params(), b.n_params(), "{name}");
    }
}
