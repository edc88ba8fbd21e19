//! Entry point: mounts the planner; everything else lives in the library.

fn main() {
    console_error_panic_hook::set_once();
    // The page's loading line (index.html) goes once the app is there.
    if let Some(loading) = web_sys::window().and_then(|w| w.document()).and_then(|d| d.get_element_by_id("loading")) {
        loading.remove();
    }
    leptos::mount::mount_to_body(planner_web::App);
}
