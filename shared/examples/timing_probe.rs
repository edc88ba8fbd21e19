use shared::estimate::{Options, Target, estimate_with};
use shared::plan::Plan;
use std::time::Instant;
fn main() {
    let gpu = shared::gpus::find("v100-16gb").unwrap();
    for f in ["w1-before", "w1-after", "w2-before", "w3-before", "w4-before", "w5-before"] {
        let text = std::fs::read_to_string(format!("examples/{f}.yaml")).unwrap();
        let plan = Plan::from_text(&text).unwrap();
        let t = Instant::now();
        let g = plan.validate().unwrap();
        let tv = t.elapsed();
        let t = Instant::now();
        let n = 20;
        for _ in 0..n {
            let _ = shared::estimate::estimate_graph(&plan, &g, Target::Cuda(*gpu), Options::default(), None);
        }
        let te = t.elapsed() / n;
        let e = estimate_with(&plan, Target::Cuda(*gpu), Options { timeline_points: 200 }).unwrap();
        println!(
            "{f}: nodes {} validate {:?} estimate {:?} peak {} dev {:?}",
            g.nodes.len(),
            tv,
            te,
            e.peak_bytes,
            e.device.map(|d| d.device_peak_bytes)
        );
    }
}
