//! The estimate: fits or not and by how much, allocated, reserved and the device total
//! with the CUDA context against the GPU, host memory against host RAM, what is live at
//! the peak, and the step's timeline. The arithmetic is `shared`'s.

use leptos::prelude::*;
use shared::estimate::TimelinePoint;
use shared::{Bytes, Estimate};

fn signed(v: i64) -> String {
    let b = Bytes(v.unsigned_abs());
    if v < 0 { format!("short by {b}") } else { format!("{b} to spare") }
}

const COLORS: [&str; 6] = ["c-weights", "c-gradients", "c-state", "c-activations", "c-batch", "c-temporaries"];

/// The step's live memory over its events, phases shaded, the peak marked.
#[component]
fn Timeline(points: Vec<TimelinePoint>, capacity: Option<u64>, peak_label: String) -> impl IntoView {
    const W: f64 = 640.0;
    const H: f64 = 200.0;
    const L: f64 = 8.0;
    const T: f64 = 18.0;
    const B: f64 = 22.0;
    if points.is_empty() {
        return view! { <p class="empty">"No timeline."</p> }.into_any();
    }
    let last = points.last().map_or(1, |p| p.event).max(1) as f64;
    let top = points.iter().map(|p| p.live_bytes.get()).max().unwrap_or(1).max(capacity.unwrap_or(0)).max(1) as f64;
    let x = |e: u64| L + (W - 2.0 * L) * e as f64 / last;
    let y = |b: u64| T + (H - T - B) * (1.0 - b as f64 / top);
    // Phase bands: each run of points in one phase.
    let mut bands = Vec::new();
    let mut start = 0usize;
    for i in 1..=points.len() {
        if i == points.len() || points[i].phase != points[start].phase {
            let (a, b) = (points[start].event, points[i - 1].event);
            bands.push((points[start].phase, x(a), (x(b) - x(a)).max(1.0)));
            start = i;
        }
    }
    let band_views = bands
        .into_iter()
        .map(|(phase, bx, bw)| {
            let class = format!("band {}", phase.key());
            // Narrow bands (the loss) go unlabelled; the legend names them.
            let label = (bw > 48.0).then(|| view! { <text class="band-label" x=format!("{:.1}", bx + 2.0) y=H - 6.0>{phase.label()}</text> });
            view! { <rect class=class x=format!("{bx:.1}") y=T width=format!("{bw:.1}") height=H - T - B><title>{phase.label()}</title></rect>{label} }
        })
        .collect_view();
    let line: String =
        points.iter().map(|p| format!("{:.1},{:.1}", x(p.event), y(p.live_bytes.get()))).collect::<Vec<_>>().join(" ");
    let peak = points.iter().max_by_key(|p| p.live_bytes).cloned().unwrap_or_else(|| points[0].clone());
    let (px, py) = (x(peak.event), y(peak.live_bytes.get()));
    let cap = capacity.map(|c| {
        let cy = y(c);
        view! { <line class="capacity" data-testid="timeline-capacity" x1=L x2=W - L y1=format!("{cy:.1}") y2=format!("{cy:.1}") />
                <text class="cap-label" x=W - L - 4.0 y=format!("{:.1}", cy - 3.0) text-anchor="end">{format!("usable after the context {}", Bytes(c))}</text> }
    });
    let n = points.len();
    view! {
        <svg class="timeline" data-testid="timeline" data-points=n.to_string() viewBox=format!("0 0 {W} {H}") role="img"
            aria-label=format!("Live memory over the step; peak {} at {}", peak.live_bytes, peak_label)>
            {band_views}
            {cap}
            <polyline class="live" points=line />
            <circle class="peak" data-testid="timeline-peak" cx=format!("{px:.1}") cy=format!("{py:.1}") r="4" />
            <text class="peak-label" x=L + 2.0 y="12">
                {format!("peak {} · {}", peak.live_bytes, peak_label)}
            </text>
        </svg>
    }
    .into_any()
}

#[component]
pub fn EstimatePanel(
    #[prop(into)] estimate: Signal<Result<Estimate, String>>,
    #[prop(into)] host_ram: Signal<Result<u64, String>>,
) -> impl IntoView {
    view! {
        <section class="panel estimate" aria-labelledby="estimate-title">
            <h2 id="estimate-title">"Estimate"</h2>
            {move || match estimate.get() {
                Err(e) => view! { <p class="error" role="alert" data-testid="plan-error">{e}</p> }.into_any(),
                Ok(e) => {
                    let peak = e.peak_bytes.get().max(1) as f64;
                    let maxima = e.category_peaks.entries();
                    let rows = e.breakdown.entries().into_iter().zip(maxima).enumerate().map(|(i, ((name, bytes), (_, max)))| {
                        let pct = 100.0 * bytes.get() as f64 / peak;
                        view! {
                            <tr data-testid=format!("breakdown-{name}")>
                                <td><span class=format!("swatch {}", COLORS[i])></span>{name.replace('_', " ")}</td>
                                <td class="num">{bytes.to_string()}</td>
                                <td class="num">{format!("{pct:.0} %")}</td>
                                <td class="num max" data-testid=format!("max-{name}")>{max.to_string()}</td>
                            </tr>
                        }
                    }).collect_view();
                    let stack = e.breakdown.entries().into_iter().enumerate().map(|(i, (name, bytes))| {
                        let pct = 100.0 * bytes.get() as f64 / peak;
                        view! { <div class=format!("seg {}", COLORS[i]) style=format!("width:{pct:.2}%") title=format!("{name}: {bytes}")></div> }
                    }).collect_view();
                    let live_at_peak = e.breakdown.entries().into_iter().filter(|(_, b)| b.get() * 10 >= e.peak_bytes.get())
                        .map(|(n, b)| format!("{} {b}", n.replace('_', " "))).collect::<Vec<_>>().join(", ");
                    let device = e.device.clone();
                    let status = match &device {
                        Some(d) => {
                            let high = d.device_peak_bytes_high.get();
                            let left = shared::units::signed_difference(d.capacity_bytes.get(), high);
                            if d.fits { format!("Fits on {}: {} at the high end, {}", d.gpu, d.device_peak_bytes_high, signed(left)) }
                            else if d.device_peak_bytes.get() <= d.capacity_bytes.get() {
                                format!("May not fit on {}: {} point estimate fits, but the high end {} does not ({})", d.gpu, d.device_peak_bytes, d.device_peak_bytes_high, signed(left))
                            } else { format!("Does not fit on {}: {} ({})", d.gpu, d.device_peak_bytes, signed(left)) }
                        }
                        None => "CPU estimate".to_owned(),
                    };
                    let fits_class = match &device { Some(d) if d.fits => "status fits", Some(_) => "status no-fit", None => "status" };
                    let host = match host_ram.get() {
                        Ok(ram) => {
                            let ok = e.host_peak_bytes.get() <= ram;
                            format!("Host: {} of {} RAM — {}", e.host_peak_bytes, Bytes(ram), if ok { "fits" } else { "does not fit" })
                        }
                        Err(err) => err,
                    };
                    let capacity = device.as_ref().map(|d| d.capacity_bytes.get().saturating_sub(d.context_bytes.get()));
                    let figures = device.as_ref().map(|d| view! {
                        <dl class="figures">
                            <dt>"Allocated peak"</dt><dd data-testid="allocated-peak">{e.peak_bytes.to_string()}</dd>
                            <dt>"Reserved peak"</dt><dd data-testid="reserved-peak">{d.reserved_peak_bytes.to_string()}</dd>
                            <dt>"CUDA context"</dt><dd>{d.context_bytes.to_string()}</dd>
                            <dt>"Device total"</dt><dd data-testid="device-total">{format!("{} ({} to {})", d.device_peak_bytes, d.device_peak_bytes_low, d.device_peak_bytes_high)}</dd>
                            <dt>"Capacity"</dt><dd data-testid="capacity">{d.capacity_bytes.to_string()}</dd>
                        </dl>
                    });
                    let label = format!("{} (live: {live_at_peak})", e.peak_phase.label());
                    let timeline = e.timeline.clone();
                    view! {
                        <p class=fits_class data-testid="fit-status" role="status" aria-live="polite">{status}</p>
                        <p class="peak">
                            "Peak " <strong data-testid="estimate-peak">{e.peak_bytes.to_string()}</strong>
                            " during the " <span data-testid="estimate-phase">{e.peak_phase.label()}</span>
                        </p>
                        <p class="interval" data-testid="estimate-interval">
                            {format!("between {} and {}", e.peak_bytes_low, e.peak_bytes_high)}
                            " · for " <span data-testid="estimate-runtime">{match e.runtime {
                                shared::plan::Runtime::Pytorch => "PyTorch's reference implementation and defaults",
                                shared::plan::Runtime::Headroom => "Headroom's trainer",
                            }}</span>
                        </p>
                        {figures}
                        <p class="host" data-testid="host-status">{host}</p>
                        <p class="params">{format!("{} parameters · {} between steps", e.params, e.steady_bytes)}</p>
                        <div class="stack" data-testid="breakdown-stack" role="img" aria-label=format!("at the peak: {live_at_peak}")>{stack}</div>
                        <table class="breakdown">
                            <thead><tr><th>"live at the peak"</th><th></th><th></th><th class="num">"own maximum in the step"</th></tr></thead>
                            <tbody>{rows}</tbody>
                        </table>
                        <h3>"Step timeline"</h3>
                        <Timeline points=timeline capacity=capacity peak_label=label />
                        <p class="legend">{e.phase_peaks.iter().map(|(p, _)| view! { <span class=format!("key {}", p.key())>{p.label()}</span> }).collect_view()}</p>
                    }.into_any()
                }
            }}
        </section>
    }
}
