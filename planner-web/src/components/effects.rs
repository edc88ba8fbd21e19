//! What each knob does: every single change a user would try, estimated exactly in
//! chunks after the plan's own estimate (so typing never waits for them).

use leptos::prelude::*;
use leptos::task::spawn_local;
use shared::Estimate;
use shared::estimate::Target;
use shared::whatif::{Effect as KnobEffect, effect, knob_changes};

use crate::state::Valid;
use crate::util::next_tick;

#[component]
pub fn EffectsPanel(
    #[prop(into)] valid: Signal<Result<Valid, String>>,
    #[prop(into)] target: Signal<Result<Target, String>>,
    #[prop(into)] estimate: Signal<Result<Estimate, String>>,
) -> impl IntoView {
    let effects = RwSignal::new(Vec::<Result<KnobEffect, String>>::new());
    let generation = StoredValue::new(0u64);
    Effect::new(move |_| {
        let (Ok(v), Ok(t), Ok(base)) = (valid.get(), target.get(), estimate.get()) else {
            effects.set(Vec::new());
            return;
        };
        generation.update_value(|g| *g += 1);
        let mine = generation.get_value();
        effects.set(Vec::new());
        spawn_local(async move {
            next_tick().await;
            for change in knob_changes(v.plan(), v.graph(), t) {
                if generation.get_value() != mine {
                    return;
                }
                let e = effect(v.plan(), &change, t, &base);
                effects.update(|list| list.push(e));
                next_tick().await;
            }
        });
    });
    view! {
        <section class="panel effects" aria-labelledby="effects-title">
            <h2 id="effects-title">"What each knob does"</h2>
            <table class="effects" data-testid="effects">
                <tbody>
                    {move || effects.get().into_iter().enumerate().map(|(i, e)| match e {
                        Ok(e) => view! {
                            <tr data-testid=format!("effect-{i}") class={if e.delta_bytes < 0 { "down" } else if e.delta_bytes > 0 { "up" } else { "same" }}>
                                <td>{e.label.clone()}</td>
                                <td>{e.detail.clone()}{e.belief.clone().map(|b| view! { <br/><small class="belief">{b}</small> })}</td>
                            </tr>
                        }.into_any(),
                        Err(err) => view! { <tr><td colspan="2" class="error">{err}</td></tr> }.into_any(),
                    }).collect_view()}
                </tbody>
            </table>
        </section>
    }
}
