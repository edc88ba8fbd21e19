//! Bounded-time fuzzing of everything that parses untrusted input: the wire codec, the
//! plan parser (JSON and YAML, and `--set` pairs) and the share-link decoder.
//!
//! Each target runs for `HEADROOM_FUZZ_SECONDS` (2 s in the normal test run;
//! `scripts/fuzz.sh` gives each minutes) on inputs from proptest's generators: random
//! bytes and text, and valid inputs mutated (bytes flipped, cut, repeated, spliced,
//! values swapped for hostile ones). A panic anywhere fails the run; every input must
//! come back as a value or a clear error. The figures (inputs tried, rejected, panics)
//! are printed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};

use crate::plan::Plan;
use crate::protocol::{ToAgent, ToClient};

fn budget() -> Duration {
    let secs = std::env::var("HEADROOM_FUZZ_SECONDS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(2.0);
    Duration::from_secs_f64(secs.max(0.1))
}

/// Runs `target` on values of `strategy` until the budget is spent; returns (inputs,
/// rejected, panics).
fn fuzz<T: std::fmt::Debug>(
    name: &str,
    strategy: impl Strategy<Value = T>,
    mut target: impl FnMut(&T) -> bool,
) -> (u64, u64, u64) {
    let mut runner = TestRunner::new(Config { failure_persistence: None, ..Config::default() });
    let (start, budget) = (Instant::now(), budget());
    let (mut n, mut rejected, mut panics) = (0u64, 0u64, 0u64);
    while start.elapsed() < budget {
        let Ok(tree) = strategy.new_tree(&mut runner) else { continue };
        let value = tree.current();
        n += 1;
        match catch_unwind(AssertUnwindSafe(|| target(&value))) {
            Ok(true) => {}
            Ok(false) => rejected += 1,
            Err(_) => {
                panics += 1;
                eprintln!("{name}: panicked on {value:?}");
            }
        }
    }
    println!("fuzz {name}: {n} inputs in {:.1} s, {rejected} rejected, {panics} panics", start.elapsed().as_secs_f64());
    (n, rejected, panics)
}

/// A valid input with bytes flipped, cut, repeated or spliced in.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = seed.len().max(1);
    (prop::collection::vec((0..len, any::<u8>(), 0u8..5), 1..8)).prop_map(move |edits| {
        let mut v = seed.clone();
        for (at, byte, kind) in edits {
            let at = at.min(v.len());
            match kind {
                0 if at < v.len() => v[at] ^= byte | 1,
                1 => v.truncate(at),
                2 => v.insert(at, byte),
                3 if at < v.len() => {
                    let tail = v[at..].to_vec();
                    v.extend_from_slice(&tail[..tail.len().min(64)]);
                }
                _ => v.push(byte),
            }
        }
        v
    })
}

fn valid_frames() -> Vec<Vec<u8>> {
    let plan = Plan::example_cnn();
    let estimate = crate::estimate::estimate(&plan).expect("estimate");
    let mut frames: Vec<Vec<u8>> = [
        ToAgent::Submit { plan: plan.clone(), force: false, key: Some(7) },
        ToAgent::Attach { job: 3, after: 9 },
        ToAgent::ListRuns { before: None, limit: 100 },
        ToAgent::GetRun { job: 1 },
        ToAgent::Status,
        ToAgent::Cancel { job: 2 },
    ]
    .iter()
    .map(|m| crate::codec::encode(m).expect("encode"))
    .collect();
    // A reply sent the wrong way, mutated.
    frames.push(crate::codec::encode(&ToClient::Accepted { job: 1, estimate, device: "cpu".into() }).expect("encode"));
    frames
}

#[test]
fn the_codec_never_panics_on_random_or_mutated_frames() {
    let frames = valid_frames();
    let strategy = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096),
        (0..frames.len()).prop_flat_map(move |i| mutated(frames[i].clone())),
    ];
    // What an agent, a client and a run's log read; whatever decodes must encode again.
    let (n, _, panics) = fuzz("codec", strategy, |bytes| {
        let request = crate::codec::decode::<ToAgent>(bytes).map(|m| crate::codec::encode(&m).is_ok());
        let reply = crate::codec::decode::<ToClient>(bytes).map(|m| crate::codec::encode(&m).is_ok());
        let stored = crate::codec::decode_stored(bytes).map(|m| crate::codec::encode(&m).is_ok());
        request.or(reply).or(stored).unwrap_or(false)
    });
    assert!(n > 0);
    assert_eq!(panics, 0);
}

/// Hostile plan texts: valid ones with values swapped, deep nesting, huge numbers.
fn hostile_plan_text() -> impl Strategy<Value = String> {
    let json = serde_json::to_string(&Plan::example_cnn()).expect("json");
    let yaml = serde_yaml_ng::to_string(&Plan::example_mlp()).expect("yaml");
    let values = prop_oneof![
        Just("1e308".to_owned()),
        Just("-1".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("null".to_owned()),
        Just("\"\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("NaN".to_owned()),
        (1usize..20_000).prop_map(|d| "[".repeat(d)),
        (1usize..20_000).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
        ".{0,40}",
    ];
    prop_oneof![
        ".{0,400}",
        (Just(json.clone()), 0..json.len(), values.clone()).prop_map(|(s, at, v)| {
            let at = (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            format!("{}{v}{}", &s[..at], &s[at..])
        }),
        (Just(yaml), values.clone()).prop_map(|(s, v)| format!("{s}\nextra: {v}\n")),
        (0usize..3).prop_map(|k| match k {
            0 => "a: &a [*a]".to_owned(),
            1 => format!("{}x", "- ".repeat(5000)),
            _ => "{\"model\":{\"zoo\":{\"name\":\"resnet18\",\"settings\":{\"image\":\"99999999,99999999\"}}}}"
                .to_owned(),
        }),
    ]
}

#[test]
fn the_plan_parser_never_panics_on_hostile_text_or_settings() {
    let (n, _, panics) = fuzz("plan text", hostile_plan_text(), |text| match Plan::from_text(text) {
        // A plan that parses has passed its limits: estimating it must not panic either.
        Ok(plan) => {
            let _ = crate::estimate::estimate(&plan);
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "an error must say what is wrong");
            false
        }
    });
    assert!(n > 0);
    assert_eq!(panics, 0);
    let keys: Vec<String> = crate::plan::plan_keys().map(|k| k.to_string()).collect();
    let pairs = prop::collection::vec(
        (
            prop::sample::select(keys),
            prop_oneof![".{0,12}", Just("99999999999999999999".to_owned()), Just("0".to_owned())],
        ),
        1..6,
    );
    let (n, _, panics) = fuzz("plan --set", pairs, |pairs| {
        let mut plan = Plan::zoo("resnet18");
        plan.apply_settings(pairs).is_ok() && plan.validate().is_ok()
    });
    assert!(n > 0);
    assert_eq!(panics, 0);
}

#[test]
fn the_link_decoder_never_panics_on_random_or_mutated_links() {
    let good = crate::link::encode(&Plan::example_cnn(), &crate::link::Extras::default()).into_bytes();
    let strategy = prop_oneof![".{0,600}".prop_map(String::into_bytes), mutated(good),];
    let (n, _, panics) = fuzz("link", strategy, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        crate::link::decode(&text).is_ok()
    });
    assert!(n > 0);
    assert_eq!(panics, 0);
}
