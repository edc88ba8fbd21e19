// Development aid (not committed): prints the estimator's trace for a fixture case.
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let id = &args[1];
    let onednn = args.get(2).map_or(true, |s| s == "1");
    let cases = shared::estimate::reference::cases().unwrap();
    let c = cases.iter().find(|c| &c.id == id && c.onednn == onednn).unwrap();
    let plan = shared::estimate::reference::plan(c).unwrap();
    let (e, events) = shared::estimate::trace(&plan, shared::estimate::Target::Cpu).unwrap();
    let g = plan.validate().unwrap();
    for ev in &events {
        let name = ev.node.map(|n| format!("{}#{}", g.nodes[n].op.name(), n)).unwrap_or(ev.label.to_owned());
        println!("{:<15} {:<40} {:>14} {:>14}", ev.phase.map_or("-", |p| p.key()), name, ev.delta, ev.live);
    }
    eprintln!("peak {} measured {}", e.peak_bytes.get(), c.measured_bytes);
}
