//! A line chart drawn as SVG: one or more series over the micro-batch index, and
//! dashed reference lines (the estimate, the device's capacity).

use leptos::prelude::*;
use shared::chart::thin;

/// Points drawn per series; longer series are thinned evenly (the data stays whole).
pub const MAX_CHART_POINTS: usize = 1_000;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 24.0;

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: &'static str,
    /// CSS class giving the stroke colour.
    pub class: &'static str,
    /// (micro-batch index, value), already thinned with [`thin`].
    pub points: Vec<(usize, f64)>,
}

/// A horizontal line at `value`. One that sets the scale widens the chart to show it;
/// one that does not (a GPU's capacity far above a small job) is drawn only when it falls
/// inside, and otherwise named at the top edge.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub name: &'static str,
    /// CSS class; the line's test id is `<chart>-<class>`.
    pub class: &'static str,
    pub value: f64,
    pub sets_scale: bool,
}

/// Builds a series from `n` records, reading only the ones that will be drawn, so an
/// update costs O(MAX_CHART_POINTS) however long the run.
pub fn series(name: &'static str, class: &'static str, n: usize, value: impl Fn(usize) -> f64) -> Series {
    Series { name, class, points: thin(n, MAX_CHART_POINTS).into_iter().map(|i| (i, value(i))).collect() }
}

fn polyline(points: &[(usize, f64)], n: usize, y_max: f64) -> String {
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    points
        .iter()
        .map(|&(i, v)| {
            let x = LEFT + if n > 1 { plot_w * i as f64 / (n - 1) as f64 } else { 0.0 };
            let y = TOP + plot_h * (1.0 - (v / y_max).clamp(0.0, 1.0));
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[component]
pub fn LineChart(
    title: &'static str,
    testid: &'static str,
    #[prop(into)] series: Signal<Vec<Series>>,
    /// Records behind the series (the x axis), before thinning.
    #[prop(into)]
    count: Signal<usize>,
    #[prop(into)] references: Signal<Vec<Reference>>,
    format: fn(f64) -> String,
) -> impl IntoView {
    let y_max = move || {
        let data_max = series.with(|s| s.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max));
        let scale = references.with(|r| r.iter().filter(|r| r.sets_scale).map(|r| r.value).fold(0.0f64, f64::max));
        let m = data_max.max(scale) * 1.1;
        if m > 0.0 && m.is_finite() { m } else { 1.0 }
    };
    let count = move || count.get();
    let lines = move || {
        let top = y_max();
        let mut above = 0.0;
        references
            .get()
            .into_iter()
            .map(|r| {
                let label = format!("{} {}", r.name, format(r.value));
                let id = format!("{testid}-{}", r.class);
                if r.value <= top {
                    let y = TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - r.value / top);
                    view! {
                        <line class=format!("reference {}", r.class) data-testid=id x1=LEFT y1=y x2=WIDTH - RIGHT y2=y />
                        <text class=format!("tick reference-label {}", r.class) x=WIDTH - RIGHT y=y - 4.0 text-anchor="end">{label}</text>
                    }
                    .into_any()
                } else {
                    above += 12.0;
                    view! {
                        <text class=format!("tick reference-label {}", r.class) data-testid=id x=LEFT + 6.0 y=TOP + above text-anchor="start">{format!("↑ {label} (above the chart)")}</text>
                    }
                    .into_any()
                }
            })
            .collect_view()
    };
    view! {
        <figure class="chart" data-testid=testid data-points=move || count().to_string()>
            <figcaption>{title}</figcaption>
            <svg viewBox=format!("0 0 {WIDTH} {HEIGHT}") role="img" aria-label=title>
                <line class="axis" x1=LEFT y1=TOP x2=LEFT y2=HEIGHT - BOTTOM />
                <line class="axis" x1=LEFT y1=HEIGHT - BOTTOM x2=WIDTH - RIGHT y2=HEIGHT - BOTTOM />
                <text class="tick" x=LEFT - 6.0 y=TOP + 10.0 text-anchor="end">{move || format(y_max())}</text>
                <text class="tick" x=LEFT - 6.0 y=HEIGHT - BOTTOM text-anchor="end">"0"</text>
                <text class="tick" x=WIDTH - RIGHT y=HEIGHT - 6.0 text-anchor="end">
                    {move || format!("{} micro-batches", count())}
                </text>
                {lines}
                {move || series.get().into_iter().map(|s| {
                    let points = polyline(&s.points, count(), y_max());
                    view! { <polyline class=format!("series {}", s.class) points=points><title>{s.name}</title></polyline> }
                }).collect_view()}
            </svg>
            <div class="legend">
                {move || series.get().into_iter().map(|s| view! { <span class=format!("key {}", s.class)>{s.name}</span> }).collect_view()}
            </div>
        </figure>
    }
}
