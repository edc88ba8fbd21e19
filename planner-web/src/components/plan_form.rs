//! The plan editor, drawn from `shared::schema`: the model picker and presets, the GPU
//! and host, then every key of the model and the plan, grouped, with its help. A new zoo
//! model appears here without planner code.

use leptos::prelude::*;
use shared::presets::PRESETS;
use shared::schema::{self, Field, Group};
use shared::zoo::{Kind, MODELS};

use crate::state::{Machine, PlanForm};

/// Keys shown only for the optimizer they belong to.
fn applies(key: &str, optimizer: &str) -> bool {
    match key {
        "momentum" | "nesterov" => optimizer == "momentum" || optimizer == "sgd",
        "beta1" | "beta2" | "eps" => optimizer == "adam" || optimizer == "adamw",
        _ => true,
    }
}

fn field_view(form: RwSignal<PlanForm>, f: Field) -> AnyView {
    let key = f.param.key.clone();
    let id = format!("field-{key}");
    let help_id = format!("help-{key}");
    let label = key.replace('_', " ");
    let unit = f.param.unit;
    let default = f.param.default.clone();
    let help = f.param.help;
    let k = key.clone();
    let value = move || form.with(|fm| fm.get(&k));
    let k = key.clone();
    let set = move |v: String| {
        form.update(|fm| {
            fm.values.insert(k.clone(), v);
        })
    };
    let input = match f.param.kind {
        Kind::Choice { allowed } => {
            let options = allowed
                .iter()
                .map(|&a| {
                    let value = value.clone();
                    let d = default.clone();
                    view! { <option value=a selected=move || { let v = value(); v == a || (v.is_empty() && d == a) }>{a}</option> }
                })
                .collect_view();
            view! {
                <select id=id.clone() data-testid=id.clone() aria-describedby=help_id.clone()
                    on:change=move |ev| set(event_target_value(&ev))>{options}</select>
            }
            .into_any()
        }
        Kind::Bool => {
            let d = default == "true";
            view! {
                <input type="checkbox" id=id.clone() data-testid=id.clone() aria-describedby=help_id.clone()
                    prop:checked=move || { let v = value(); if v.is_empty() { d } else { v == "true" } }
                    on:change=move |ev| set(event_target_checked(&ev).to_string()) />
            }
            .into_any()
        }
        _ => view! {
            <input type="text" id=id.clone() data-testid=id.clone() aria-describedby=help_id.clone()
                placeholder=default.clone() prop:value=value
                on:input=move |ev| set(event_target_value(&ev)) />
        }
        .into_any(),
    };
    view! {
        <div class="field">
            <label for=id.clone()>{label}{(!unit.is_empty()).then(|| view! { <span class="unit">{format!(" ({unit})")}</span> })}</label>
            {input}
            <small id=help_id class="help">{help}</small>
        </div>
    }
    .into_any()
}

#[component]
pub fn PlanEditor(
    form: RwSignal<PlanForm>,
    machine: RwSignal<Machine>,
    notice: RwSignal<Option<String>>,
) -> impl IntoView {
    // The schema of the chosen model; recomputed only when the model changes.
    let model = Memo::new(move |_| form.with(|f| f.model.clone()));
    let fields = Memo::new(move |_| schema::fields(&model.get()).map_err(|e| e.to_string()));
    let optimizer = Memo::new(move |_| {
        form.with(|f| {
            let v = f.get("optimizer");
            if v.is_empty() { "adamw".to_owned() } else { v }
        })
    });
    let preset = RwSignal::new(String::new());
    // The knobs the last model switch kept from the plan before it.
    let carried = RwSignal::new(Vec::<String>::new());
    let load_preset = move |id: String| {
        carried.set(Vec::new());
        if let Some(p) = shared::presets::Preset::find(&id) {
            match p.plan() {
                Ok(plan) => {
                    form.set(PlanForm::from_plan(&plan));
                    machine.update(|m| m.gpu = p.gpu.to_owned());
                    notice.set(Some(format!("Loaded {}: {}", p.id, p.story())));
                }
                Err(e) => notice.set(Some(format!("{}: {e}", p.id))),
            }
        }
        preset.set(id);
    };
    let model_options =
        MODELS.iter().map(|&m| view! { <option value=m selected=move || model.get() == m>{m}</option> }).collect_view();
    let preset_options = PRESETS
        .iter()
        .map(|p| view! { <option value=p.id selected=move || preset.get() == p.id>{format!("{} ({})", p.id, p.gpu)}</option> })
        .collect_view();
    let gpu_options = shared::gpus::CATALOG
        .iter()
        .map(|g| view! { <option value=g.key selected=move || machine.with(|m| m.gpu == g.key)>{g.name}</option> })
        .collect_view();
    let like_options = shared::gpus::CATALOG
        .iter()
        .map(|g| view! { <option value=g.key selected=move || machine.with(|m| m.custom_like == g.key)>{format!("like {}", g.name)}</option> })
        .collect_view();
    let groups = move || {
        let optimizer = optimizer.get();
        match fields.get() {
            Err(e) => view! { <p class="error">{e}</p> }.into_any(),
            Ok(all) => Group::ALL
                .iter()
                .map(|&g| {
                    let items = all
                        .iter()
                        .filter(|f| f.group == g && applies(&f.param.key, &optimizer))
                        .cloned()
                        .map(|f| field_view(form, f))
                        .collect_view();
                    let open = matches!(g, Group::Model | Group::Batch | Group::Memory);
                    view! {
                        <details class="group" open=open data-testid=format!("group-{}", g.label().to_lowercase().replace(' ', "-"))>
                            <summary>{g.label()}</summary>
                            <div class="fields">{items}</div>
                        </details>
                    }
                })
                .collect_view()
                .into_any(),
        }
    };
    view! {
        <section class="panel plan" aria-labelledby="plan-title">
            <h2 id="plan-title">"Plan"</h2>
            <div class="field">
                <label for="preset">"Preset"</label>
                <select id="preset" data-testid="preset" on:change=move |ev| load_preset(event_target_value(&ev))>
                    <option value="" selected=move || preset.get().is_empty()>"— W1–W5 before and after —"</option>
                    {preset_options}
                </select>
                <small class="help">"The five out-of-memory stories of docs/workloads.md, as their users ran them and after their fixes."</small>
            </div>
            <div class="field">
                <label for="model">"Model"</label>
                <select id="model" data-testid="model" on:change=move |ev| {
                    let m = event_target_value(&ev);
                    let mut kept = Vec::new();
                    form.update(|f| kept = f.switch_model(&m));
                    carried.set(kept);
                    preset.set(String::new());
                }>{model_options}</select>
                {move || carried.with(|kept| (!kept.is_empty()).then(|| view! {
                    <small class="help" data-testid="carried-over">{format!("Kept from the previous plan: {}.", kept.join(", "))}</small>
                }))}
            </div>
            <div class="field">
                <label for="gpu">"GPU"</label>
                <select id="gpu" data-testid="gpu" on:change=move |ev| { let v = event_target_value(&ev); machine.update(|m| m.gpu = v) }>
                    {gpu_options}
                    <option value="custom" selected=move || machine.with(|m| m.gpu == "custom")>"Custom memory size…"</option>
                </select>
            </div>
            <Show when=move || machine.with(|m| m.gpu == "custom")>
                <div class="field">
                    <label for="custom-memory">"GPU memory"</label>
                    <input id="custom-memory" data-testid="custom-memory" type="text" prop:value=move || machine.with(|m| m.custom_memory.clone())
                        on:input=move |ev| { let v = event_target_value(&ev); machine.update(|m| m.custom_memory = v) } />
                    <select aria-label="generation" data-testid="custom-like" on:change=move |ev| { let v = event_target_value(&ev); machine.update(|m| m.custom_like = v) }>
                        {like_options.clone()}
                    </select>
                </div>
            </Show>
            <div class="field">
                <label for="host-ram">"Host RAM"</label>
                <input id="host-ram" data-testid="host-ram" type="text" prop:value=move || machine.with(|m| m.host_ram.clone())
                    on:input=move |ev| { let v = event_target_value(&ev); machine.update(|m| m.host_ram = v) } />
            </div>
            <p class="effective" data-testid="effective-batch">
                {move || form.with(|f| {
                    let num = |k: &str, d: u64| { let v = f.get(k); if v.trim().is_empty() { Some(d) } else { v.trim().parse::<u64>().ok() } };
                    match (num("batch", 1), num("accum", 1)) {
                        (Some(m), Some(a)) => format!("effective batch {} = {m} × {a}", m.saturating_mul(a)),
                        _ => String::new(),
                    }
                })}
            </p>
            {groups}
        </section>
    }
}
