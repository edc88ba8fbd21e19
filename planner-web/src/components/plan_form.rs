//! The plan editor: model, data shape and training knobs.

use leptos::prelude::*;

use crate::state::PlanForm;

fn text_field(
    form: RwSignal<PlanForm>,
    label: &'static str,
    testid: &'static str,
    hint: &'static str,
    get: fn(&PlanForm) -> String,
    set: fn(&mut PlanForm, String),
) -> impl IntoView {
    view! {
        <label>
            <span>{label}</span>
            <input
                type="text"
                data-testid=testid
                title=hint
                prop:value=move || form.with(get)
                on:input=move |ev| form.update(|f| set(f, event_target_value(&ev)))
            />
        </label>
    }
}

const OPTIMIZERS: &[(&str, &str)] =
    &[("adamw", "AdamW"), ("adam", "Adam"), ("momentum", "SGD + momentum 0.9"), ("sgd", "SGD")];
const DEVICES: &[(&str, &str)] = &[("auto", "auto (GPU if present)"), ("cpu", "CPU"), ("cuda:0", "cuda:0")];

fn select_field(
    form: RwSignal<PlanForm>,
    label: &'static str,
    testid: &'static str,
    options: &'static [(&'static str, &'static str)],
    get: fn(&PlanForm) -> String,
    set: fn(&mut PlanForm, String),
) -> impl IntoView {
    let options = options
        .iter()
        .map(|&(value, text)| view! { <option value=value selected=move || form.with(get) == value>{text}</option> })
        .collect_view();
    view! {
        <label>
            <span>{label}</span>
            <select data-testid=testid on:change=move |ev| form.update(|f| set(f, event_target_value(&ev)))>
                {options}
            </select>
        </label>
    }
}

#[component]
pub fn PlanEditor(form: RwSignal<PlanForm>) -> impl IntoView {
    view! {
        <section class="panel plan">
            <h2>"Plan"</h2>
            <label>
                <span>"Model"</span>
                <select
                    data-testid="model"
                    on:change=move |ev| {
                        let model = event_target_value(&ev);
                        form.update(|f| {
                            // Switching family swaps in shapes that suit it.
                            if model == "small_cnn" && f.model != "small_cnn" {
                                f.widths = "16,32".into();
                                f.input_shape = "3,32,32".into();
                            } else if model == "mlp" && f.model != "mlp" {
                                f.widths = "256,256".into();
                                f.input_shape = "64".into();
                            }
                            f.model = model;
                        });
                    }
                >
                    <option value="mlp" selected=move || form.with(|f| f.model == "mlp")>"MLP"</option>
                    <option value="small_cnn" selected=move || form.with(|f| f.model == "small_cnn")>"Small CNN"</option>
                </select>
            </label>
            {text_field(form, "Widths / channels", "widths", "hidden widths (MLP) or conv channels (CNN), comma separated",
                |f| f.widths.clone(), |f, v| f.widths = v)}
            {text_field(form, "Input shape", "input-shape", "per sample: features, or channels,height,width",
                |f| f.input_shape.clone(), |f, v| f.input_shape = v)}
            {text_field(form, "Classes", "classes", "number of classes", |f| f.classes.clone(), |f, v| f.classes = v)}
            {text_field(form, "Micro-batch", "micro-batch", "samples per forward/backward", |f| f.micro_batch.clone(), |f, v| f.micro_batch = v)}
            {text_field(form, "Accumulation", "accumulation", "micro-batches per optimizer step", |f| f.accumulation.clone(), |f, v| f.accumulation = v)}
            {text_field(form, "Steps", "steps", "optimizer steps", |f| f.steps.clone(), |f, v| f.steps = v)}
            {select_field(form, "Optimizer", "optimizer", OPTIMIZERS, |f| f.optimizer.clone(), |f, v| f.optimizer = v)}
            {text_field(form, "Learning rate", "learning-rate", "learning rate", |f| f.learning_rate.clone(), |f, v| f.learning_rate = v)}
            {select_field(form, "Device", "device", DEVICES, |f| f.device.clone(), |f, v| f.device = v)}
            <p class="effective" data-testid="effective-batch">
                {move || form.with(|f| match (f.micro_batch.trim().parse::<u64>(), f.accumulation.trim().parse::<u64>()) {
                    (Ok(m), Ok(a)) => format!("effective batch {} = {m} × {a}", m.saturating_mul(a)),
                    _ => String::new(),
                })}
            </p>
        </section>
    }
}
