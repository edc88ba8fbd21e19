//! Share links: a whole plan (and the GPU and host it is checked against) in a URL
//! fragment, which browsers never send to a server.
//!
//! Format: `h1-<crc>-<model>;<key>=<value>;...` where `h1` is the format version, `crc`
//! the CRC-32 of everything after the second dash as 8 hex digits, and the pairs those of
//! [`Plan::to_settings`] plus `gpu` and `host_ram`. Keys and values are percent-encoded
//! where they hold anything but letters, digits and `.,_~:-@`. Decoding goes through
//! [`Plan::from_settings`], the path every other surface uses. An agent's token is not
//! part of a plan and so never part of a link.

use thiserror::Error;

use crate::graph::Graph;
use crate::plan::{Plan, PlanError};

/// The version this build writes and the newest it reads.
pub const VERSION: u32 = 1;
/// Longest link accepted: a plan with every key set is well under 1 KiB.
pub const MAX_LINK_CHARS: usize = 4_096;
/// Longest link of an exported model, which carries its graph (structure and sizes, no
/// weights): a URL fragment stays in the browser, but a link must survive being pasted.
pub const MAX_GRAPH_LINK_CHARS: usize = 64 * 1024;
/// The most a link's graph may inflate to.
const MAX_GRAPH_BYTES: usize = 16 << 20;

/// What a link carries besides the plan.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extras {
    /// The GPU the plan is checked against, as `gpus::resolve` reads it.
    pub gpu: Option<String>,
    /// The host's RAM, bytes.
    pub host_ram_bytes: Option<u64>,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum LinkError {
    #[error("the link holds no plan")]
    Empty,
    #[error("the link is {len} characters long, over the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error(
        "a link to {model} would be {len} characters, over the limit of {MAX_GRAPH_LINK_CHARS}: share the .pt2 file and the plan instead"
    )]
    GraphTooLarge { model: String, len: usize },
    #[error("this is not a Headroom plan link (it should start with h{VERSION}-)")]
    NotALink,
    #[error(
        "the link was made by a newer Headroom (format {got}; this one reads up to {VERSION}): update Headroom to open it"
    )]
    Newer { got: u32 },
    #[error("the link is damaged or cut short (its checksum does not match): copy the whole link again")]
    Checksum,
    #[error("the link is damaged: {0}")]
    Malformed(String),
    #[error("the link's plan is invalid: {0}")]
    Plan(#[from] PlanError),
}

/// Short names of the link's own keys (the plan's knobs take theirs from `plan::KNOBS`;
/// a model's keys are written in full).
const EXTRAS: [(&str, &str); 2] = [("gpu", "g"), ("host_ram", "hr")];

/// Model keys whose values are true/false (a plan knob says so by its kind), written 1/0.
const MODEL_FLAGS: [&str; 1] = ["use_cache"];

fn aliases() -> impl Iterator<Item = (&'static str, &'static str)> {
    crate::plan::KNOBS.iter().filter_map(|k| Some((k.key, k.alias?))).chain(EXTRAS)
}

fn is_flag(key: &str) -> bool {
    MODEL_FLAGS.contains(&key) || crate::plan::knob(key).is_some_and(|k| (k.kind)() == crate::zoo::Kind::Bool)
}

fn short(key: &str) -> &str {
    aliases().find(|(k, _)| *k == key).map_or(key, |(_, a)| a)
}

fn long(key: &str) -> &str {
    aliases().find(|(_, a)| *a == key).map_or(key, |(k, _)| k)
}

fn safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || ".,_~:-@".contains(c)
}

fn escape(text: &str, out: &mut String) {
    for c in text.chars() {
        if safe(c) {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
}

fn unescape(text: &str) -> Result<String, LinkError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex =
                text.get(i + 1..i + 3).ok_or_else(|| LinkError::Malformed(format!("a cut '%' escape in '{text}'")))?;
            let b =
                u8::from_str_radix(hex, 16).map_err(|_| LinkError::Malformed(format!("'%{hex}' is not an escape")))?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| LinkError::Malformed("an escape that is not UTF-8".to_owned()))
}

/// An exported model's graph as a link value: its structure without names or source
/// lines, bincode, deflated, base64url.
fn pack(m: &crate::import::Imported) -> String {
    use base64::Engine as _;
    let mut c = m.clone();
    for n in &mut c.nodes {
        n.name.clear();
        n.source.clear();
    }
    for (i, t) in c.tensors.iter_mut().enumerate() {
        if !m.inputs.contains(&(i as u32)) {
            t.name.clear();
        }
    }
    let bytes = bincode::serde::encode_to_vec(&c, bincode::config::standard()).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(miniz_oxide::deflate::compress_to_vec(&bytes, 9))
}

fn unpack(text: &str) -> Result<crate::import::Imported, LinkError> {
    use base64::Engine as _;
    let bad = |why: String| LinkError::Malformed(format!("its model: {why}"));
    let packed = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text).map_err(|e| bad(e.to_string()))?;
    let bytes = miniz_oxide::inflate::decompress_to_vec_with_limit(&packed, MAX_GRAPH_BYTES)
        .map_err(|_| bad(format!("does not inflate within {MAX_GRAPH_BYTES} bytes")))?;
    let config = bincode::config::standard().with_limit::<{ 4 * MAX_GRAPH_BYTES }>();
    let (m, _): (crate::import::Imported, usize) =
        bincode::serde::decode_from_slice(&bytes, config).map_err(|e| bad(e.to_string()))?;
    m.check().map_err(|e| bad(e.to_string()))?;
    Ok(m)
}

/// The link body for a plan, refused where it cannot carry it: an exported model whose
/// graph was not read, or is too large for a link.
pub fn encode_checked(plan: &Plan, extras: &Extras) -> Result<String, LinkError> {
    if let Some(file) = &plan.model.file {
        if file.graph.is_none() {
            return Err(LinkError::Malformed(format!("{} has not been read", file.path)));
        }
        let link = encode(plan, extras);
        if link.len() > MAX_GRAPH_LINK_CHARS {
            return Err(LinkError::GraphTooLarge { model: plan.name.clone(), len: link.len() });
        }
        return Ok(link);
    }
    Ok(encode(plan, extras))
}

/// The link body (no `#`) for a plan and its extras.
pub fn encode(plan: &Plan, extras: &Extras) -> String {
    let mut body = String::new();
    escape(plan.model_name(), &mut body);
    let mut pairs = plan.to_settings();
    if let Some(gpu) = &extras.gpu {
        pairs.push(("gpu".to_owned(), gpu.clone()));
    }
    if let Some(ram) = extras.host_ram_bytes {
        pairs.push(("host_ram".to_owned(), ram.to_string()));
    }
    if let Some(graph) = plan.model.file.as_ref().and_then(|f| f.graph.as_ref()) {
        pairs.push(("graph".to_owned(), pack(graph)));
    }
    for (k, v) in &pairs {
        body.push(';');
        escape(short(k), &mut body);
        body.push('=');
        let v = match v.as_str() {
            "true" if is_flag(k) => "1",
            "false" if is_flag(k) => "0",
            v => v,
        };
        escape(v, &mut body);
    }
    format!("h{VERSION}-{:08x}-{body}", crc32fast::hash(body.as_bytes()))
}

/// The plan, its graph and the extras of a link body (with or without a leading `#`).
pub fn decode(link: &str) -> Result<(Plan, Graph, Extras), LinkError> {
    let link = link.trim().trim_start_matches('#');
    if link.is_empty() {
        return Err(LinkError::Empty);
    }
    // Only an exported model's link (its body starts with that model) may be long.
    let carries_graph =
        link.splitn(3, '-').nth(2).is_some_and(|b| b.starts_with(&format!("{};", crate::zoo::IMPORTED)));
    let limit = if carries_graph { MAX_GRAPH_LINK_CHARS } else { MAX_LINK_CHARS };
    if link.len() > limit {
        return Err(LinkError::TooLong { len: link.len(), limit });
    }
    let rest = link.strip_prefix('h').ok_or(LinkError::NotALink)?;
    let (version, rest) = rest.split_once('-').ok_or(LinkError::NotALink)?;
    let version: u32 = version.parse().map_err(|_| LinkError::NotALink)?;
    if version > VERSION {
        return Err(LinkError::Newer { got: version });
    }
    if version == 0 {
        return Err(LinkError::NotALink);
    }
    let (crc, body) = rest.split_once('-').ok_or(LinkError::Checksum)?;
    if crc.len() != 8 || u32::from_str_radix(crc, 16).ok() != Some(crc32fast::hash(body.as_bytes())) {
        return Err(LinkError::Checksum);
    }
    let mut parts = body.split(';');
    let model = unescape(parts.next().unwrap_or_default())?;
    let imported = model == crate::zoo::IMPORTED;
    let mut graph = None;
    let mut pairs = Vec::new();
    let mut extras = Extras::default();
    for part in parts {
        let (k, v) = part.split_once('=').ok_or_else(|| LinkError::Malformed(format!("'{part}' is not key=value")))?;
        let (k, v) = (long(&unescape(k)?).to_owned(), unescape(v)?);
        match k.as_str() {
            "gpu" => {
                crate::gpus::resolve(&v).map_err(|reason| PlanError::Setting { key: k.clone(), reason })?;
                extras.gpu = Some(v);
            }
            "graph" if imported => graph = Some(unpack(&v)?),
            "host_ram" => {
                let b =
                    crate::units::parse_bytes(&v).map_err(|reason| PlanError::Setting { key: k.clone(), reason })?;
                extras.host_ram_bytes = Some(b);
            }
            _ => pairs.push((k, v)),
        }
    }
    let validated = match graph {
        Some(g) if imported => {
            let path = format!("{}.pt2", g.name);
            Plan::from_file(&path, g, &pairs)?
        }
        _ if imported => return Err(LinkError::Malformed("an exported model's link without its graph".into())),
        _ => Plan::from_settings(&model, &pairs)?,
    };
    let (plan, graph) = validated.into_parts();
    Ok((plan, graph, extras))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::PRESETS;
    use proptest::prelude::*;

    #[test]
    fn exported_models_round_trip_with_their_graph_and_say_how_long() {
        let mut lengths = Vec::new();
        for (id, _) in crate::estimate::reference::OWN_FILES {
            let m = crate::estimate::reference::own_model(id).expect("fixture");
            let loss = if ["tagger", "bert_mlm"].contains(id) {
                "token_ce"
            } else if *id == "regressor" {
                "mse"
            } else {
                "ce"
            };
            let v =
                Plan::from_file(&format!("{id}.pt2"), m, &[("batch".into(), "4".into()), ("loss".into(), loss.into())])
                    .expect("plan");
            let link = encode_checked(v.plan(), &Extras::default()).expect("fits a link");
            lengths.push(format!("{id} {}", link.len()));
            let (back, graph, _) = decode(&link).expect(id);
            assert_eq!(back.micro_batch, 4, "{id}");
            assert_eq!(graph, *v.graph(), "{id}: the same graph");
            assert_eq!(
                crate::estimate::estimate(&back).expect("estimates").peak_bytes,
                crate::estimate::estimate(v.plan()).expect("estimates").peak_bytes,
                "{id}"
            );
        }
        eprintln!("link characters: {}", lengths.join(", "));
        // A damaged graph is refused by name, never read out of bounds.
        let m = crate::estimate::reference::own_model("regressor").expect("fixture");
        let v = Plan::from_file("r.pt2", m, &[("loss".into(), "mse".into())]).expect("plan");
        let link = encode(v.plan(), &Extras::default());
        let (head, value) = link.rsplit_once("graph=").expect("graph pair");
        let body = format!(
            "{}graph={}",
            head.split_once('-').and_then(|(_, r)| r.split_once('-')).map(|(_, b)| b).unwrap_or(""),
            &value[..value.len() / 2]
        );
        let cut = format!("h1-{:08x}-{body}", crc32fast::hash(body.as_bytes()));
        assert!(decode(&cut).expect_err("damaged").to_string().contains("its model"));
    }

    #[test]
    fn presets_round_trip_in_under_200_characters() {
        for p in &PRESETS {
            let plan = p.plan().expect("preset");
            let extras = Extras { gpu: Some(p.gpu.to_owned()), host_ram_bytes: None };
            let link = encode(&plan, &extras);
            assert!(link.len() < 200, "{}: {} characters: {link}", p.id, link.len());
            let (back, _, e) = decode(&format!("#{link}")).expect(p.id);
            assert_eq!(back, plan, "{}", p.id);
            assert_eq!(e, extras);
        }
    }

    #[test]
    fn short_names_collide_with_no_key() {
        let mut keys: Vec<String> = crate::schema::plan_fields().into_iter().map(|f| f.param.key).collect();
        for m in crate::zoo::MODELS {
            keys.extend(crate::zoo::schema(m).expect(m).into_iter().map(|p| p.key));
        }
        let mut shorts = std::collections::BTreeSet::new();
        for (long, short) in aliases() {
            assert!(!keys.iter().any(|k| k == short), "'{short}' is a key itself");
            assert!(keys.iter().any(|k| k == long) || ["gpu", "host_ram"].contains(&long), "{long}");
            assert!(shorts.insert(short), "'{short}' names two keys");
        }
    }

    #[test]
    fn every_true_false_model_key_is_written_as_a_flag() {
        for m in crate::zoo::MODELS {
            for p in crate::zoo::schema(m).expect(m) {
                assert_eq!(p.kind == crate::zoo::Kind::Bool, MODEL_FLAGS.contains(&p.key.as_str()), "{m}: {}", p.key);
            }
        }
    }

    #[test]
    fn damaged_links_say_what_is_wrong() {
        let plan = PRESETS[0].plan().expect("preset");
        let link = encode(&plan, &Extras::default());
        assert_eq!(decode(""), Err(LinkError::Empty));
        assert_eq!(decode("hello"), Err(LinkError::NotALink));
        assert_eq!(decode(&link[..link.len() - 5]), Err(LinkError::Checksum));
        assert_eq!(decode(&link.replacen("feature_size=48", "feature_size=47", 1)), Err(LinkError::Checksum));
        assert_eq!(decode(&link.replacen("h1-", "h2-", 1)), Err(LinkError::Newer { got: 2 }));
        assert!(matches!(decode(&"x".repeat(MAX_LINK_CHARS + 1)), Err(LinkError::TooLong { .. })));
        // A well-formed link whose plan breaks a limit names the field.
        let bad = Plan { micro_batch: 0, ..plan.clone() };
        let err = decode(&encode(&bad, &Extras::default())).expect_err("invalid plan");
        assert!(err.to_string().contains("micro_batch"), "{err}");
        let odd = encode(&Plan { name: "a b;c=d%é".to_owned(), ..plan.clone() }, &Extras::default());
        assert_eq!(decode(&odd).expect("escaped").0.name, "a b;c=d%é");
    }

    fn arb_plan() -> impl Strategy<Value = Plan> {
        let models = prop::sample::select(vec!["mlp", "small_cnn", "resnet18", "vit", "unet2d", "gpt2"]);
        (
            models,
            1u64..64,
            1u64..16,
            prop::sample::select(vec!["fp32", "fp16", "bf16"]),
            prop::sample::select(vec!["sgd", "momentum", "adam", "adamw"]),
            0u32..4,
            any::<bool>(),
            (0u64..8, 1u64..8, any::<bool>()),
            (1e-6f64..1.0, 0.0f64..0.5, any::<u64>()),
            prop::option::of(0.05f64..1.0),
        )
            .prop_filter_map(
                "a valid plan",
                |(
                    model,
                    batch,
                    accum,
                    precision,
                    opt,
                    ckpt,
                    expandable,
                    (workers, prefetch, pin),
                    (lr, wd, seed),
                    frac,
                )| {
                    let mut pairs = vec![
                        ("batch", batch.to_string()),
                        ("accum", accum.to_string()),
                        ("precision", precision.to_owned()),
                        ("optimizer", opt.to_owned()),
                        ("expandable_segments", expandable.to_string()),
                        ("workers", workers.to_string()),
                        ("prefetch", prefetch.to_string()),
                        ("pin_memory", pin.to_string()),
                        ("lr", lr.to_string()),
                        ("weight_decay", wd.to_string()),
                        ("seed", seed.to_string()),
                    ];
                    match ckpt {
                        1 => pairs.push(("checkpoint", "blocks".to_owned())),
                        2 => pairs.push(("checkpoint_segments", "2".to_owned())),
                        _ => {}
                    }
                    if let Some(f) = frac {
                        pairs.push(("memory_fraction", f.to_string()));
                    }
                    let pairs: Vec<(String, String)> = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                    Plan::from_settings(model, &pairs).ok().map(|v| v.plan().clone())
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn any_valid_plan_survives_a_link(plan in arb_plan(), ram in prop::option::of(1u64..1 << 40)) {
            let extras = Extras { gpu: Some("a100-40gb".to_owned()), host_ram_bytes: ram };
            let (back, _, e) = decode(&encode(&plan, &extras)).expect("decodes");
            prop_assert_eq!(back, plan);
            prop_assert_eq!(e, extras);
        }

        /// A body of model and `key=value` pairs with arbitrary values behind a valid
        /// header and checksum reaches the plan's own checks: it opens, or the error is
        /// about its contents, never a panic; what opens encodes to a link that opens to
        /// the same plan.
        #[test]
        fn any_body_behind_a_valid_checksum_opens_or_says_what_is_wrong(
            model in proptest::sample::select(crate::zoo::MODELS.to_vec()),
            pairs in proptest::collection::vec(
                (proptest::sample::select(vec!["b", "a", "p", "ck", "o", "lr", "wd", "w", "steps", "g", "hr", "depth", "width", "x", "%zz"]), ".{0,12}"),
                0..6,
            ),
        ) {
            let mut body = String::new();
            escape(model, &mut body);
            for (k, v) in &pairs {
                body.push(';');
                body.push_str(k);
                body.push('=');
                escape(v, &mut body);
            }
            let link = format!("h{VERSION}-{:08x}-{body}", crc32fast::hash(body.as_bytes()));
            match decode(&link) {
                Ok((plan, _, extras)) => {
                    let (back, _, e) = decode(&encode(&plan, &extras)).expect("a plan that opened opens again");
                    prop_assert_eq!(back, plan);
                    prop_assert_eq!(e, extras);
                }
                Err(e) => prop_assert!(
                    matches!(e, LinkError::Plan(_) | LinkError::Malformed(_)),
                    "the header was valid, so only the body can be wrong: {e:?}"
                ),
            }
        }
    }
}
