//! Imports of small exported programs written by hand in torch.export's format, and of
//! hostile files.

use super::*;
use crate::estimate::reference::{OWN_FILES, own_model};
use crate::plan::Plan;

fn graph_json(id: &str) -> Vec<u8> {
    let (_, bytes) = OWN_FILES.iter().find(|(n, _)| *n == id).expect("fixture");
    let dir = zip::Directory::of(bytes).expect("zip");
    let e = graph_entry(&dir).expect("graph entry");
    let (at, len) = e.span(bytes.len() as u64);
    e.read(&bytes[at as usize..(at + len) as usize], MAX_GRAPH_JSON).expect("reads")
}

#[test]
fn every_fixture_model_imports_and_builds_at_several_batches() {
    for (id, _) in OWN_FILES {
        let m = own_model(id).expect("imports");
        assert_eq!(m.symbols.iter().filter(|s| s.key == "batch").count(), 1, "{id}: one batch symbol");
        let loss = match *id {
            "tagger" | "bert_mlm" => "token_ce",
            "regressor" => "mse",
            _ => "ce",
        };
        for batch in [1u64, 3, 16] {
            let pairs = vec![("batch".to_owned(), batch.to_string()), ("loss".to_owned(), loss.to_owned())];
            let v = Plan::from_file("x.pt2", m.clone(), &pairs);
            // Batch norm refuses one value per channel in training, as PyTorch does.
            if let Err(e) = &v {
                assert!(batch == 1 && e.to_string().contains("more than 1 value per channel"), "{id} at {batch}: {e}");
                continue;
            }
            let v = v.expect("builds");
            assert_eq!(v.graph().micro_batch(), batch, "{id}");
            crate::estimate::estimate(v.plan()).expect("estimates");
        }
    }
}

#[test]
fn repeated_modules_become_checkpoint_blocks() {
    let m = own_model("small_convnet").expect("imports");
    let v = Plan::from_file("x.pt2", m, &[("batch".into(), "4".into())]).expect("builds");
    // blocks.0 and blocks.1 of the ModuleList.
    assert_eq!(v.graph().blocks.len(), 2, "{:?}", v.graph().blocks);
    let m = own_model("tagger").expect("imports");
    let v = Plan::from_file("x.pt2", m, &[("loss".into(), "token_ce".into())]).expect("builds");
    assert_eq!(v.graph().blocks.len(), 2, "two encoder layers");
    let pairs = [("loss".to_owned(), "token_ce".to_owned()), ("checkpoint".to_owned(), "blocks".to_owned())];
    let m = own_model("tagger").expect("imports");
    let plain = crate::estimate::estimate(Plan::from_file("x.pt2", m.clone(), &pairs[..1]).expect("plain").plan())
        .expect("estimates");
    let ckpt = crate::estimate::estimate(Plan::from_file("x.pt2", m, &pairs).expect("checkpointed").plan())
        .expect("estimates");
    assert!(ckpt.breakdown.activations < plain.breakdown.activations, "checkpointing saves activations");
}

#[test]
fn a_dynamic_dimension_other_than_the_batch_is_a_model_key() {
    // Rewrite the tagger's sequence length (32) as a second symbol, as an export with
    // dynamic_shapes={0: batch, 1: seq} writes it.
    let text = String::from_utf8(graph_json("tagger")).expect("utf8");
    let m = from_graph(text.as_bytes(), "tagger").expect("imports");
    assert!(crate::import::lower::keys(&m).is_empty(), "only the batch is dynamic");
    let sym = "Symbol('s99', positive=True, integer=True)";
    let seq = format!("{{\"as_expr\": {{\"expr_str\": \"{sym}\", \"hint\": {{\"as_int\": 32}}}}}}");
    // The input `x` is [batch, 32, 64]: make its dimension 1 symbolic. Other tensors keep
    // 32, so a different length must fail the shape check, naming the node.
    let at = text.find("\"x\": {").expect("input x");
    let sizes = text[at..].find("\"sizes\": [").expect("sizes") + at;
    let first = text[sizes..].find("}}}, ").expect("batch dim") + sizes + 5;
    let second = text[first..].find('}').expect("dim 1") + first + 1;
    let edited = format!("{}{seq}{}", &text[..first], &text[second..]);
    let m = from_graph(edited.as_bytes(), "tagger").expect("imports");
    let keys = crate::import::lower::keys(&m);
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].0, keys[0].1), ("x_1", 32));
    let ok = Plan::from_file("x.pt2", m.clone(), &[("loss".into(), "token_ce".into())]);
    assert!(ok.is_ok(), "{ok:?}");
    let err = Plan::from_file("x.pt2", m, &[("loss".into(), "token_ce".into()), ("x_1".into(), "16".into())])
        .expect_err("the rest of the graph was traced at 32");
    assert!(err.to_string().contains("at node") && err.to_string().contains("the file says"), "{err}");
}

#[test]
fn unknown_ops_are_listed_together_with_where_they_are() {
    let text = String::from_utf8(graph_json("small_convnet")).expect("utf8");
    let edited = text
        .replace("torch.ops.aten.relu_.default", "torch.ops.aten.mish_.default")
        .replace("torch.ops.aten.max_pool2d.default", "torch.ops.aten.fractional_max_pool2d.default");
    let err = from_graph(edited.as_bytes(), "m").expect_err("unknown ops").to_string();
    assert!(err.contains("2 operator(s)"), "{err}");
    assert!(err.contains("aten.mish_.default (2x; first at node"), "{err}");
    assert!(err.contains("module blocks.0.2"), "{err}");
    assert!(err.contains("aten.fractional_max_pool2d.default (1x"), "{err}");
    // The innermost frame where the user's own is not in the trace (code run by exec).
    assert!(err.contains("activation.py:"), "the source line: {err}");
}

#[test]
fn another_schema_version_is_refused_by_name() {
    let text = String::from_utf8(graph_json("regressor")).expect("utf8");
    let edited = text.replacen("\"major\": 8", "\"major\": 9", 1);
    let err = from_graph(edited.as_bytes(), "m").expect_err("version").to_string();
    assert!(err.contains("schema version 9.") && err.contains("reads version 8.x"), "{err}");
}

#[test]
fn hostile_and_damaged_files_get_named_errors() {
    // Deep nesting.
    let deep = format!(
        "{{\"schema_version\": {{\"major\": 8, \"minor\": 17}}, \"graph_module\": {{\"graph\": {{\"nodes\": [{{\"target\": \"t\", \"outputs\": [], \"inputs\": [{{\"name\": \"a\", \"arg\": {}",
        "[".repeat(100_000)
    );
    let err = from_graph(deep.as_bytes(), "m").expect_err("refused").to_string();
    assert!(err.contains("deeper than 128"), "{err}");
    // Not JSON of the format.
    assert!(from_graph(b"{\"hello\": 1}", "m").expect_err("refused").to_string().contains("not torch.export's format"));
    // A zip without the graph.
    let z = zip::tests::zip(&[("m/data/weights/weight_0", b"1234")], false);
    assert!(open(&z, "m").expect_err("refused").to_string().contains("no models/model.json"));
    // A traversal name.
    let z = zip::tests::zip(&[("m/../../etc/passwd", b"x"), ("m/models/model.json", b"{}")], false);
    assert!(open(&z, "m").expect_err("refused").to_string().contains("leaves the archive"));
    // Truncated halfway.
    let (_, bytes) = OWN_FILES[0];
    assert!(open(&bytes[..bytes.len() / 2], "m").expect_err("refused").to_string().contains("zip"));
    // A graph entry that claims more than the limit.
    let mut z = zip::tests::zip(&[("m/models/model.json", b"{}")], false);
    let pos = z.windows(4).rposition(|w| w == [0x50, 0x4b, 0x01, 0x02]).expect("central");
    z[pos + 24..pos + 28].copy_from_slice(&u32::MAX.to_le_bytes());
    z[pos + 20..pos + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = open(&z, "m").expect_err("refused").to_string();
    assert!(err.contains("over the limit") || err.contains("overlap"), "{err}");
    // Sizes that overflow when evaluated.
    let text = String::from_utf8(graph_json("regressor")).expect("utf8");
    let edited = text.replacen("{\"as_int\": 256}", "{\"as_int\": 9223372036854775807}", 1);
    let m = from_graph(edited.as_bytes(), "m");
    if let Ok(m) = m {
        let err = Plan::from_file("x.pt2", m, &[("loss".into(), "mse".into())]).expect_err("absurd size").to_string();
        assert!(!err.is_empty());
    }
}

#[test]
fn the_whole_file_and_the_graph_entry_alone_import_the_same() {
    for (id, bytes) in OWN_FILES {
        let whole = open(bytes, id).expect("whole");
        // The page's way: the last bytes for the directory, then the entry's span.
        let len = bytes.len() as u64;
        let tail = &bytes[bytes.len().saturating_sub(1024)..];
        let dir = match zip::Directory::read(tail, len).expect("reads") {
            Ok(d) => d,
            Err(zip::NeedTail(n)) => {
                zip::Directory::read(&bytes[(len - n) as usize..], len).expect("reads").expect("enough")
            }
        };
        let read = |e: &zip::Entry, limit: u64| {
            let (at, n) = e.span(len);
            e.read(&bytes[at as usize..(at + n) as usize], limit).expect("reads")
        };
        let json = read(graph_entry(&dir).expect("entry"), MAX_GRAPH_JSON);
        let config = dir.find(weights::WEIGHTS_CONFIG).expect("one").map(|e| read(e, weights::MAX_CONFIG_BYTES));
        assert_eq!(from_parts(&json, config.as_deref(), id).expect("imports"), whole);
    }
}

#[test]
fn tied_weights_are_one_tensor_as_pytorch_holds_them() {
    // BertForMaskedLM ties its decoder to the word embeddings: the export lists both
    // names, the weights' configuration stores one storage.
    let m = own_model("bert_mlm").expect("imports");
    let tied: Vec<&str> = m.params.iter().filter(|p| p.alias_of.is_some()).map(|p| p.fqn.as_str()).collect();
    assert!(tied.contains(&"cls.predictions.decoder.weight"), "{tied:?}");
    let v = Plan::from_file("x.pt2", m, &[("loss".into(), "token_ce".into())]).expect("builds");
    // sum(p.numel() for p in model.parameters()) of the same configuration.
    assert_eq!(v.graph().n_params(), 556_624);
}

#[test]
fn the_documented_coverage_table_is_the_importers() {
    let doc = include_str!("../../../docs/own-models.md");
    for (op, primitive) in crate::import::lower::coverage() {
        assert!(doc.contains(&format!("| `{op}` | `{primitive}` |")), "docs/own-models.md lacks {op}");
    }
}

#[test]
fn a_damaged_description_from_a_plan_or_link_is_refused_not_followed() {
    let good = own_model("small_convnet").expect("imports");
    let build = |m: Imported| Plan::from_file("x.pt2", m, &[("batch".into(), "2".into())]).map(|_| ());
    // A module that is its own ancestor.
    let mut m = good.clone();
    let last = m.modules.len() as u32 - 1;
    m.modules[1].parent = Some(last);
    assert!(build(m).expect_err("refused").to_string().contains("damaged"));
    // A size naming a dynamic dimension the model does not have.
    let mut m = good.clone();
    m.tensors[0].shape[0] = expr::Expr::Sym(99);
    assert!(build(m).expect_err("refused").to_string().contains("damaged"));
    // A tensor index past the table.
    let mut m = good.clone();
    m.output = m.tensors.len() as u32;
    assert!(build(m).expect_err("refused").to_string().contains("damaged"));
    // An absurd size is refused by name, before anything is sized by it.
    let mut m = good;
    let x = m.inputs[0] as usize;
    m.tensors[x].shape[2] = expr::Expr::Int(1 << 40);
    let err = build(m).expect_err("refused").to_string();
    assert!(err.contains("over the limits"), "{err}");
}
