//! The estimate: peak, the phase where it happens, what is live at that moment, and how
//! it compares with the agent's devices. The arithmetic is `shared`'s.

use leptos::prelude::*;
use shared::{Bytes, Estimate};

use crate::state::AgentState;

#[component]
pub fn EstimatePanel(#[prop(into)] estimate: Signal<Result<Estimate, String>>) -> impl IntoView {
    let agent = expect_context::<AgentState>();
    view! {
        <section class="panel estimate">
            <h2>"Estimate"</h2>
            {move || match estimate.get() {
                Err(e) => view! { <p class="error" data-testid="plan-error">{e}</p> }.into_any(),
                Ok(e) => {
                    let peak = e.peak_bytes.get().max(1) as f64;
                    let maxima = e.category_peaks.entries();
                    let rows = e.breakdown.entries().into_iter().zip(maxima).map(|((name, bytes), (_, max))| {
                        let pct = 100.0 * bytes.get() as f64 / peak;
                        view! {
                            <tr data-testid=format!("breakdown-{name}")>
                                <td>{name.replace('_', " ")}</td>
                                <td class="num">{bytes.to_string()}</td>
                                <td class="bar"><div style=format!("width:{pct:.1}%")></div></td>
                                <td class="num max" data-testid=format!("max-{name}")>{max.to_string()}</td>
                            </tr>
                        }
                    }).collect_view();
                    // Whether it fits is decided by the interval's high end.
                    let devices = agent.hello.get().map(|h| h.devices).unwrap_or_default().into_iter().map(|d| {
                        let fits = e.peak_bytes_high.get() <= d.total_memory_bytes;
                        let left = Bytes(d.total_memory_bytes) - e.peak_bytes_high;
                        view! {
                            <li class=if fits { "fits" } else { "no-fit" }>
                                {format!("{} ({}): {}", d.id, d.name,
                                    if fits { format!("fits, {left} to spare of {}", Bytes(d.total_memory_bytes)) }
                                    else { format!("does not fit in {}", Bytes(d.total_memory_bytes)) })}
                            </li>
                        }
                    }).collect_view();
                    view! {
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
                        <p class="params">{format!("{} parameters · {} between steps", e.params, e.steady_bytes)}</p>
                        <table class="breakdown">
                            <thead><tr><th>"live at the peak"</th><th></th><th></th><th class="num">"own maximum in the step"</th></tr></thead>
                            <tbody>{rows}</tbody>
                        </table>
                        <ul class="devices">{devices}</ul>
                    }.into_any()
                }
            }}
        </section>
    }
}
