//! Share links and exports. The link keeps the whole plan, the GPU and the host RAM in
//! the URL fragment (never sent to a server, never holding the agent token); exports are
//! `shared::export`'s, each with a copy button and the notes of what it cannot hold.

use leptos::prelude::*;
use leptos::task::spawn_local;
use shared::export::{Format, export};
use shared::link::{Extras, encode};

use crate::state::{Machine, Valid};
use crate::util::{copy, set_fragment, share_base};

fn copy_button(testid: &'static str, text: Signal<String>, status: RwSignal<String>) -> impl IntoView {
    view! {
        <button data-testid=testid on:click=move |_| {
            let t = text.get_untracked();
            spawn_local(async move {
                status.set(match copy(t).await { Ok(()) => "copied".into(), Err(e) => format!("could not copy: {e}") });
            });
        }>"Copy"</button>
    }
}

#[component]
pub fn SharePanel(#[prop(into)] valid: Signal<Result<Valid, String>>, machine: RwSignal<Machine>) -> impl IntoView {
    let status = RwSignal::new(String::new());
    // The link follows the plan; the address bar follows the link.
    let body = Memo::new(move |_| {
        let v = valid.get().ok()?;
        let m = machine.get();
        Some(encode(v.plan(), &Extras { gpu: Some(m.gpu_text()), host_ram_bytes: m.host_ram_bytes().ok() }))
    });
    Effect::new(move |_| {
        if let Some(b) = body.get() {
            set_fragment(&b);
        }
    });
    let link = Signal::derive(move || body.get().map(|b| format!("{}#{b}", share_base())).unwrap_or_default());
    let format = RwSignal::new(Format::Yaml);
    let exported = Memo::new(move |_| valid.get().ok().map(|v| export(v.plan(), format.get())));
    let export_text = Signal::derive(move || exported.get().map(|e| e.text).unwrap_or_default());
    let options = Format::ALL
        .iter()
        .map(|&f| view! { <option value=f.word() selected=move || format.get() == f>{f.title()}</option> })
        .collect_view();
    view! {
        <section class="panel share" aria-labelledby="share-title">
            <h2 id="share-title">"Share and export"</h2>
            <div class="row">
                <label for="share-link">"Link"</label>
                <input id="share-link" data-testid="share-link" type="text" readonly prop:value=link />
                {copy_button("copy-link", link, status)}
            </div>
            <p class="help">{move || format!("{} characters; the plan is in the part after #, which browsers do not send to servers.", link.get().len())}</p>
            <div class="row">
                <label for="export-format">"Export as"</label>
                <select id="export-format" data-testid="export-format" on:change=move |ev| {
                    if let Some(f) = Format::from_word(&event_target_value(&ev)) { format.set(f) }
                }>{options}</select>
                {copy_button("copy-export", export_text, status)}
            </div>
            <pre class="export" data-testid="export-text" data-format=move || format.get().word() tabindex="0">{export_text}</pre>
            <ul class="notes" data-testid="export-notes">
                {move || exported.get().map(|e| e.notes).unwrap_or_default().into_iter().map(|n| view! { <li>{n}</li> }).collect_view()}
            </ul>
            <p role="status" aria-live="polite" data-testid="copy-status">{move || status.get()}</p>
        </section>
    }
}
