//! Serves the built planner (Trunk's `dist` folder) over HTTP/1.1 with axum and
//! tower-http: files streamed by `ServeDir` (conditional requests, content types, no
//! traversal), a `Host` check against DNS rebinding, plain names only, and security
//! headers on every response. The WebSocket never comes here: `server` routes `/ws`
//! to its own strict handshake before any HTTP is parsed.

use std::path::PathBuf;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::stream::BoxIo;

const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const NOT_BUILT: &str = "<!doctype html><title>Headroom</title><h1>The planner is not built</h1>\
<p>Run <code>scripts/run.sh</code>, which builds it with Trunk, or pass <code>--web-dir</code>.</p>";

/// Names a request's `Host` may give, and the agent's port.
#[derive(Clone)]
struct Hosts {
    names: std::sync::Arc<Vec<String>>,
    port: u16,
}

/// The planner's routes: the files of `web_dir` (or a page that says how to build it),
/// behind the Host check, the name check and the security headers.
pub fn router(web_dir: Option<PathBuf>, hosts: Vec<String>, port: u16) -> Router {
    let files = match web_dir {
        Some(dir) => Router::new().fallback_service(
            ServeDir::new(dir).append_index_html_on_directories(true).call_fallback_on_method_not_allowed(false),
        ),
        None => Router::new().fallback(|| async { (StatusCode::OK, axum::response::Html(NOT_BUILT)) }),
    };
    let set = |name: header::HeaderName, value: &'static str| {
        SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value))
    };
    files
        .layer(middleware::from_fn(plain_names))
        .layer(middleware::from_fn_with_state(Hosts { names: std::sync::Arc::new(hosts), port }, host_check))
        // The page's URL may hold a token: no referrer; no framing; no sniffing. Files
        // are revalidated (Trunk's names change when their content does; index.html
        // does not).
        .layer(set(header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"))
        .layer(set(header::X_FRAME_OPTIONS, "DENY"))
        .layer(set(header::REFERRER_POLICY, "no-referrer"))
        .layer(set(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(SetResponseHeaderLayer::if_not_present(header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], why).into_response()
}

/// DNS rebinding: a page on a foreign name that resolves here gets nothing.
async fn host_check(State(hosts): State<Hosts>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    if crate::auth::host_allowed(host, hosts.port, &hosts.names) {
        next.run(req).await
    } else {
        refuse(StatusCode::FORBIDDEN, "this agent is not served under that host name (see --allow-host)\n")
    }
}

/// Only GET and HEAD, and only plain names below the folder: no dot files, no
/// percent-escapes, no odd bytes.
async fn plain_names(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let path = req.uri().path().trim_start_matches('/');
    let plain = path.is_empty()
        || path.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if plain { next.run(req).await } else { refuse(StatusCode::NOT_FOUND, "not found\n") }
}

/// Serves one connection with `pages`; hyper closes slow headers and idle keep-alive
/// connections.
pub async fn serve(stream: BoxIo, pages: Router) -> anyhow::Result<()> {
    let service = hyper_util::service::TowerToHyperService::new(pages);
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        // A client that shuts its side after the request still gets the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn get(app: &Router, method: Method, path: &str, host: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let req = Request::builder().method(method).uri(path).header("host", host).body(Body::empty()).expect("req");
        let resp = app.clone().oneshot(req).await.expect("infallible");
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    #[tokio::test]
    async fn files_hosts_names_and_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("index.html"), "<p>planner</p>").expect("write");
        std::fs::write(dir.path().join("app_bg.wasm"), b"\0asm").expect("write");
        std::fs::write(dir.path().join(".secret"), "no").expect("write");
        let app = router(Some(dir.path().to_owned()), crate::auth::own_hosts("127.0.0.1", &[]), 8787);
        let host = "127.0.0.1:8787";
        let (status, headers, body) = get(&app, Method::GET, "/", host).await;
        assert_eq!((status, body.as_slice()), (StatusCode::OK, b"<p>planner</p>".as_slice()));
        for (name, value) in [
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("x-content-type-options", "nosniff"),
            ("cache-control", "no-cache"),
        ] {
            assert_eq!(headers.get(name).and_then(|v| v.to_str().ok()), Some(value), "{name}");
        }
        let (status, headers, _) = get(&app, Method::GET, "/app_bg.wasm", host).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/wasm"));
        assert_eq!(get(&app, Method::HEAD, "/index.html", host).await.0, StatusCode::OK);
        // Refused: other methods, dot files, escapes, traversal, missing files, foreign hosts.
        assert_eq!(get(&app, Method::POST, "/", host).await.0, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get(&app, Method::GET, "/.secret", host).await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(&app, Method::GET, "/%2e%2e/etc/passwd", host).await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(&app, Method::GET, "/../etc/passwd", host).await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(&app, Method::GET, "/nothing.js", host).await.0, StatusCode::NOT_FOUND);
        let (status, headers, _) = get(&app, Method::GET, "/", "evil.example:8787").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(headers.get("content-security-policy").is_some(), "refusals carry the headers too");
        // Without a built planner, a page that says how to build it.
        let bare = router(None, crate::auth::own_hosts("127.0.0.1", &[]), 8787);
        let (status, _, body) = get(&bare, Method::GET, "/", host).await;
        assert!(status == StatusCode::OK && String::from_utf8_lossy(&body).contains("not built"));
    }
}
