//! ARCHITECTURE.md's invariants that neither the compiler nor another test holds: every
//! crate's module graph is one-way (no module reaches, through `crate::` paths, a module
//! that reaches it back), and the crates depend on tch, tokio and web-sys only where the
//! architecture says. Read from the sources and manifests of this checkout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// A file's text without its test module (by convention the file's end, opened by
/// `#[cfg(test)]` then `mod`), which may reach anything.
fn without_tests(text: &str) -> &str {
    let mut at = 0;
    while let Some(i) = text[at..].find("#[cfg(test)]") {
        let start = at + i;
        let after = text[start + "#[cfg(test)]".len()..].trim_start();
        if after.starts_with("mod ") {
            return &text[..start];
        }
        at = start + 1;
    }
    text
}

fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules `text` names through `crate::a` or `use crate::{a, b::c}`, in
/// code (comments may name anything).
fn reached(text: &str) -> BTreeSet<String> {
    reached_through(text, &["crate::"])
}

/// The modules `text` names through any of these path prefixes.
fn reached_through(text: &str, prefixes: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in prefixes {
        out.extend(reached_one(text, prefix));
    }
    out
}

fn reached_one(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: String =
        text.lines().map(|l| l.split_once("//").map_or(l, |(code, _)| code)).collect::<Vec<_>>().join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find(prefix) {
        // `super::super::x` or `a::crate::x`: part of a longer path, not this prefix.
        if rest[..i].ends_with("::") {
            rest = &rest[i + prefix.len()..];
            continue;
        }
        let after = &rest[i + prefix.len()..];
        if let Some(group) = after.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() && name != "self" {
                    out.insert(name.to_owned());
                }
            }
        } else {
            let name = ident(after);
            if !name.is_empty() {
                out.insert(name.to_owned());
            }
        }
        rest = after;
    }
    out
}

/// Each top-level module of the crate whose sources are in `src`, with the top-level
/// modules it reaches. Modules only tests compile (`#[cfg(test)] mod x;` at the root, and
/// `tests.rs` files) are left out.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    module_graph_named(src, "crate::")
}

/// As [`module_graph`], for the modules under `src` that `path` names (`crate::` for a
/// crate, `crate::estimate::` for the estimator's); its own files also name them through
/// `super::`.
fn module_graph_named(src: &Path, path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut test_only: BTreeSet<String> = BTreeSet::new();
    for root_file in ["lib.rs", "main.rs", "mod.rs"] {
        let text = std::fs::read_to_string(src.join(root_file)).unwrap_or_default();
        let mut lines = text.lines().peekable();
        while let Some(line) = lines.next() {
            if line.trim() == "#[cfg(test)]"
                && let Some(next) = lines.peek()
                && let Some(m) = next.trim().strip_prefix("mod ").and_then(|m| m.strip_suffix(';'))
            {
                test_only.insert(m.to_owned());
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy().into_owned();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
        if ["lib", "main", "mod"].contains(&module.as_str())
            || test_only.contains(&module)
            || file.file_name().is_some_and(|n| n == "tests.rs")
        {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let edges = graph.entry(module.clone()).or_default();
        // A file directly in `src` names its siblings through `super::` too.
        let prefixes: Vec<&str> =
            if path != "crate::" && rel.components().count() == 1 { vec![path, "super::"] } else { vec![path] };
        edges.extend(reached_through(without_tests(&text), &prefixes).into_iter().filter(|m| *m != module));
    }
    // Only modules of this crate (a `crate::` path may name a re-exported item).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|m| modules.contains(m));
    }
    graph
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap_or(0);
                return Some([&path[from..], &[m.to_owned()]].concat());
            }
            _ => {}
        }
        state.insert(m.to_owned(), 1);
        path.push(m.to_owned());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    graph.keys().find_map(|m| visit(m, graph, &mut state, &mut Vec::new()))
}

/// The floors of an acyclic graph: modules that reach nothing first, then those that
/// reach only lower floors, and so on.
fn floors(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while placed.len() < graph.len() {
        let floor: Vec<String> = graph
            .iter()
            .filter(|(m, edges)| !placed.contains(*m) && edges.iter().all(|e| placed.contains(e)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(!floor.is_empty(), "a cycle left: {graph:?}");
        placed.extend(floor.iter().cloned());
        out.push(floor);
    }
    out
}

#[test]
fn every_crates_module_graph_is_one_way() {
    // The e2e binary's modules stand for the tests crate (its library is one file).
    for krate in ["shared/src", "system/src", "trainer/src", "agent/src", "planner-web/src", "tests/tests/e2e"] {
        let graph = module_graph(&root().join(krate));
        assert!(!graph.is_empty(), "{krate}: no modules found");
        if let Some(c) = cycle(&graph) {
            panic!("{krate}: the modules reach each other in a circle: {}", c.join(" → "));
        }
        println!("{krate}: {} modules on {} floors: {:?}", graph.len(), floors(&graph).len(), floors(&graph));
    }
}

/// The estimator's own modules: the walk drives the rules, the rules use the engine, and
/// the engine calls neither.
#[test]
fn the_estimators_modules_are_one_way_and_the_engine_is_passive() {
    let graph = module_graph_named(&root().join("shared/src/estimate"), "crate::estimate::");
    assert!(graph.contains_key("ops") && graph.contains_key("walk"), "{graph:?}");
    if let Some(c) = cycle(&graph) {
        panic!("estimate: the modules reach each other in a circle: {}", c.join(" → "));
    }
    for passive in ["engine", "sim", "layout"] {
        let reach = &graph[passive];
        assert!(!reach.contains("ops") && !reach.contains("walk"), "{passive} reaches {reach:?}");
    }
    println!("estimate: {:?}", floors(&graph));
}

#[test]
fn the_scanner_sees_a_circle_and_the_ways_crate_paths_are_written() {
    let text =
        "use crate::{a, b::c};\n/// see crate::x\nfn f() { crate::d::g(); }\n#[cfg(test)]\nmod tests { use crate::e; }";
    assert_eq!(reached(without_tests(text)), BTreeSet::from(["a".to_owned(), "b".to_owned(), "d".to_owned()]));
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.insert("a".into(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".into(), BTreeSet::from(["c".to_owned()]));
    g.insert("c".into(), BTreeSet::new());
    assert_eq!(cycle(&g), None);
    assert_eq!(floors(&g), vec![vec!["c".to_owned()], vec!["b".to_owned()], vec!["a".to_owned()]]);
    g.get_mut("c").expect("c").insert("a".into());
    assert_eq!(cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
}

/// `[dependencies]` of a crate's manifest, by name.
fn dependencies(krate: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join(krate).join("Cargo.toml")).expect("manifest");
    let mut deps = BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[dependencies]";
        } else if inside && let Some((name, _)) = line.split_once(['=', '.']) {
            deps.insert(name.trim().to_owned());
        }
    }
    deps
}

#[test]
fn only_the_trainer_links_tch_and_shared_knows_no_runtime() {
    for krate in ["shared", "system", "trainer", "agent", "planner-web", "tests"] {
        let deps = dependencies(krate);
        assert!(!deps.is_empty(), "{krate}: no dependencies read");
        assert_eq!(deps.contains("tch"), krate == "trainer", "{krate}: tch");
        if krate == "shared" {
            for runtime in ["tokio", "web-sys", "leptos", "tch", "nvml-wrapper"] {
                assert!(!deps.contains(runtime), "shared depends on {runtime}");
            }
        }
    }
}
