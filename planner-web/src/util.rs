//! Browser helpers: yielding to the event loop between chunks of work, the clipboard,
//! the URL fragment and a clock.

use wasm_bindgen::JsValue;

/// Lets the browser paint and handle input before the next chunk of work. A message to
/// oneself runs as a fresh task without `setTimeout`'s 4 ms clamp on nested timers.
pub async fn next_tick() {
    let promise = js_sys::Promise::new(&mut |resolve, _| match web_sys::MessageChannel::new() {
        Ok(channel) => {
            channel.port1().set_onmessage(Some(&resolve));
            let _ = channel.port2().post_message(&JsValue::NULL);
        }
        Err(_) => {
            if let Some(w) = web_sys::window() {
                let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, 0);
            }
        }
    });
    let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
}

/// Milliseconds since the page loaded.
pub fn now_ms() -> f64 {
    web_sys::window().and_then(|w| w.performance()).map_or(0.0, |p| p.now())
}

/// Copies text to the clipboard (the page must be focused; errors are reported).
pub async fn copy(text: String) -> Result<(), String> {
    let window = web_sys::window().ok_or("no window")?;
    let promise = window.navigator().clipboard().write_text(&text);
    wasm_bindgen_futures::JsFuture::from(promise).await.map(drop).map_err(|e| js_text(&e))
}

fn js_text(e: &JsValue) -> String {
    e.as_string().unwrap_or_else(|| format!("{e:?}"))
}

/// The URL fragment without its `#`.
pub fn fragment() -> String {
    web_sys::window().and_then(|w| w.location().hash().ok()).unwrap_or_default().trim_start_matches('#').to_owned()
}

/// Replaces the fragment without adding a history entry or scrolling.
pub fn set_fragment(body: &str) {
    let Some(w) = web_sys::window() else { return };
    let Ok(href) = w.location().href() else { return };
    let base = href.split('#').next().unwrap_or_default();
    if let Ok(history) = w.history() {
        let _ = history.replace_state_with_url(&JsValue::NULL, "", Some(&format!("{base}#{body}")));
    }
}

/// The page's address without the fragment or the agent token (for share links).
pub fn share_base() -> String {
    let Some(w) = web_sys::window() else { return String::new() };
    let loc = w.location();
    format!("{}{}", loc.origin().unwrap_or_default(), loc.pathname().unwrap_or_default())
}
