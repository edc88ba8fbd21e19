//! Native figures for docs/performance.md: one estimate per zoo model, the advisor's
//! search, and the share-link length of every preset. `scripts/bench.sh` runs it in
//! release mode next to the browser's figures.

use std::time::Instant;

use shared::advise::{Request, Search};
use shared::estimate::{Options, Target, estimate_graph};
use shared::link::{Extras, encode};
use shared::plan::Plan;
use shared::presets::PRESETS;

fn best_of<T>(n: u32, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..n {
        let t = Instant::now();
        let v = f();
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
        out = Some(v);
    }
    (best, out.expect("ran"))
}

fn main() {
    let gpu = *shared::gpus::find("a100-40gb").expect("catalog");
    println!("## One estimate per zoo model (default settings, micro-batch 1, best of 5, ms)\n");
    println!("| model | nodes | CPU fp32 | CUDA fp32 | CUDA bf16 |\n|---|---:|---:|---:|---:|");
    for name in shared::zoo::MODELS {
        let plan = Plan::zoo(name);
        let graph = plan.validate().expect("zoo default");
        let bf16 = Plan { precision: shared::plan::Precision::Bf16, ..plan.clone() };
        let (cpu, _) = best_of(5, || estimate_graph(&plan, &graph, Target::Cpu, Options::default(), None));
        let (cuda, _) = best_of(5, || estimate_graph(&plan, &graph, Target::Cuda(gpu), Options::default(), None));
        let (half, _) = best_of(5, || estimate_graph(&bf16, &graph, Target::Cuda(gpu), Options::default(), None));
        println!("| {name} | {} | {cpu:.2} | {cuda:.2} | {half:.2} |", graph.nodes.len());
    }
    println!("\n## Advisor search (best of 3)\n");
    println!(
        "| plan | GPU | combinations | exact estimates | structures ms | search ms | verify ms | total ms |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    let w1 = shared::presets::Preset::find("w1-before").expect("w1").plan().expect("w1");
    let cases = [
        (
            "resnet50, effective batch 360, resize+optimizer",
            Plan { micro_batch: 24, accumulation: 15, ..Plan::zoo("resnet50") },
            "a100-40gb",
            true,
        ),
        ("w1-before", w1, "v100-16gb", false),
    ];
    for (label, plan, gpu_key, wide) in cases {
        let g = *shared::gpus::find(gpu_key).expect("catalog");
        let req = Request { plan, gpu: g, margin: 0.1, allow_resize: wide, allow_optimizer: wide, top: 10 };
        let mut best = (f64::INFINITY, 0.0, 0.0, 0.0, 0, 0);
        for _ in 0..3 {
            let mut s = Search::new(req.clone()).expect("search");
            let (mut structures, mut search, mut verify) = (0.0, 0.0, 0.0);
            loop {
                let before = s.result().combinations;
                let t = Instant::now();
                let more = s.step();
                let ms = t.elapsed().as_secs_f64() * 1e3;
                match (before, s.result().combinations) {
                    (0, 0) => structures += ms,
                    (0, _) => search += ms,
                    _ => verify += ms,
                }
                if !more {
                    break;
                }
            }
            let total = structures + search + verify;
            let r = s.result();
            if total < best.0 {
                best = (total, structures, search, verify, r.combinations, r.exact_estimates);
            }
        }
        let (total, structures, search, verify, combos, exact) = best;
        println!(
            "| {label} | {gpu_key} | {combos} | {exact} | {structures:.1} | {search:.1} | {verify:.1} | {total:.1} |"
        );
    }
    println!("\n## Exported models (`shared/fixtures/own`, graphs only): import and first estimate (best of 5, ms)\n");
    println!(
        "| model | file bytes | nodes | import | CPU fp32 | CUDA fp32 | CUDA bf16 |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for (id, bytes) in shared::estimate::reference::OWN_FILES {
        let (import, m) = best_of(5, || shared::import::open(bytes, id).expect("imports"));
        let loss = match *id {
            "tagger" | "bert_mlm" => "token_ce",
            "regressor" => "mse",
            _ => "ce",
        };
        let v =
            Plan::from_file("m.pt2", m, &[("batch".into(), "8".into()), ("loss".into(), loss.into())]).expect("builds");
        let (plan, graph) = (v.plan(), v.graph());
        let bf16 = Plan { precision: shared::plan::Precision::Bf16, ..plan.clone() };
        let (cpu, _) = best_of(5, || estimate_graph(plan, graph, Target::Cpu, Options::default(), None));
        let (cuda, _) = best_of(5, || estimate_graph(plan, graph, Target::Cuda(gpu), Options::default(), None));
        let (half, _) = best_of(5, || estimate_graph(&bf16, graph, Target::Cuda(gpu), Options::default(), None));
        println!("| {id} | {} | {} | {import:.2} | {cpu:.2} | {cuda:.2} | {half:.2} |", bytes.len(), graph.nodes.len());
    }
    // A whole file with its weights (`HEADROOM_BENCH_PT2`, which scripts/bench.sh
    // exports): the directory from the file's end and the graph entry are all that is
    // read, as the CLI and the page read it.
    if let Ok(path) = std::env::var("HEADROOM_BENCH_PT2") {
        let len = std::fs::metadata(&path).expect("file").len();
        let (ms, (m, read)) = best_of(5, || read_two_steps(&path, len));
        let v =
            Plan::from_file(&path, m, &[("batch".into(), "8".into()), ("loss".into(), "mse".into())]).expect("builds");
        let (est, _) = best_of(5, || estimate_graph(v.plan(), v.graph(), Target::Cpu, Options::default(), None));
        println!(
            "\nA whole `.pt2` with its weights ({len} bytes): import {ms:.2} ms reading {read} bytes of it, first CPU estimate {est:.2} ms."
        );
    }
    println!("\n## Share links\n");
    println!("| preset | characters |\n|---|---:|");
    for p in &PRESETS {
        let plan = p.plan().expect("preset");
        let link = encode(&plan, &Extras { gpu: Some(p.gpu.to_owned()), host_ram_bytes: None });
        println!("| {} | {} |", p.id, link.len());
    }
}

/// Reads an exported model as the CLI does: the end of the file, then the graph entry.
fn read_two_steps(path: &str, len: u64) -> (shared::import::Imported, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).expect("open");
    let mut read_at = |at: u64, n: u64| {
        f.seek(SeekFrom::Start(at)).expect("seek");
        let mut buf = vec![0u8; n as usize];
        f.read_exact(&mut buf).expect("read");
        buf
    };
    let mut n = (64 << 10) + shared::import::zip::TAIL_OVERHEAD;
    let mut read = 0;
    let dir = loop {
        let m = n.min(len);
        read += m;
        match shared::import::zip::Directory::read(&read_at(len - m, m), len).expect("zip") {
            Ok(d) => break d,
            Err(shared::import::zip::NeedTail(more)) => n = more,
        }
    };
    let e = shared::import::graph_entry(&dir).expect("entry").clone();
    let (at, span) = e.span(len);
    read += span;
    let json = e.read(&read_at(at, span), shared::import::MAX_GRAPH_JSON).expect("graph");
    (shared::import::from_graph(&json, "big").expect("imports"), read)
}
