//! Serves the built planner (Trunk's `dist` folder) over plain HTTP/1.1.

use std::convert::Infallible;
use std::path::{Path, PathBuf};

use crate::stream::BoxIo;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Files larger than this are not served; the wasm bundle (2.6 MB) is well under it.
const MAX_FILE_BYTES: u64 = 64 << 20;
/// Served files are kept in memory, shared by every connection, up to this much in all
/// (beyond it a file is read for each request); a file that changes is read again.
const CACHE_BYTES: u64 = 128 << 20;

type Cache = std::collections::HashMap<PathBuf, (std::time::SystemTime, Bytes)>;
static CACHE: std::sync::Mutex<Option<Cache>> = std::sync::Mutex::new(None);

/// The file's bytes: from the cache while its length and modification time are those
/// cached, else read (and cached if there is room).
async fn file_bytes(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<Bytes> {
    let modified = meta.modified()?;
    let lock = || CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((at, bytes)) = lock().get_or_insert_with(Cache::new).get(path)
        && *at == modified
        && bytes.len() as u64 == meta.len()
    {
        return Ok(bytes.clone());
    }
    let bytes = Bytes::from(tokio::fs::read(path).await?);
    let mut cache = lock();
    let cache = cache.get_or_insert_with(Cache::new);
    cache.remove(path);
    let held: u64 = cache.values().map(|(_, b)| b.len() as u64).sum();
    if held + bytes.len() as u64 <= CACHE_BYTES {
        cache.insert(path.to_owned(), (modified, bytes.clone()));
    }
    Ok(bytes)
}

const NOT_BUILT: &str = "<!doctype html><title>Headroom</title><h1>The planner is not built</h1>\
<p>Run <code>scripts/run.sh</code>, which builds it with Trunk, or pass <code>--web-dir</code>.</p>";

pub async fn serve(stream: BoxIo, web_dir: Option<PathBuf>, hosts: Vec<String>, port: u16) -> anyhow::Result<()> {
    let hosts = std::sync::Arc::new(hosts);
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let dir = web_dir.clone();
        let hosts = std::sync::Arc::clone(&hosts);
        async move {
            let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
            // DNS rebinding: a foreign name that resolves here gets nothing.
            let mut resp = if crate::auth::host_allowed(host, port, &hosts) {
                respond(dir.as_deref(), &req).await
            } else {
                text(
                    StatusCode::FORBIDDEN,
                    "this agent is not served under that host name (see --allow-host)\n",
                    "text/plain",
                )
            };
            security_headers(&mut resp);
            Ok::<_, Infallible>(resp)
        }
    });
    // Idle keep-alive connections and slow headers are closed after this, so they cannot
    // hold connection slots.
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await?;
    Ok(())
}

/// Headers every response carries: no framing by other sites, no referrer (the page's
/// URL may hold a token), no content sniffing.
fn security_headers(resp: &mut Response<Full<Bytes>>) {
    let h = resp.headers_mut();
    let v = hyper::header::HeaderValue::from_static;
    h.insert("content-security-policy", v("frame-ancestors 'none'; base-uri 'none'; form-action 'none'"));
    h.insert("x-frame-options", v("DENY"));
    h.insert("referrer-policy", v("no-referrer"));
    h.insert("x-content-type-options", v("nosniff"));
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("wasm") => "application/wasm",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        Some("md") => "text/markdown; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn text(status: StatusCode, body: &'static str, kind: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static(kind));
    resp
}

async fn respond<B>(dir: Option<&Path>, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n", "text/plain");
    }
    let Some(dir) = dir else {
        return text(StatusCode::OK, NOT_BUILT, "text/html; charset=utf-8");
    };
    let rel = req.uri().path().trim_start_matches('/');
    let rel = if rel.is_empty() { "index.html" } else { rel };
    // Only plain names below the folder: no dot-dot, no hidden files, no odd bytes.
    let safe = rel.split('/').all(|part| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    });
    if !safe {
        return text(StatusCode::NOT_FOUND, "not found\n", "text/plain");
    }
    let path = dir.join(rel);
    let meta = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() && m.len() <= MAX_FILE_BYTES => m,
        _ if rel == "index.html" => {
            return text(StatusCode::OK, NOT_BUILT, "text/html; charset=utf-8");
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    };
    match file_bytes(&path, &meta).await {
        Ok(bytes) => {
            let mut resp = Response::new(Full::new(bytes));
            let headers = resp.headers_mut();
            headers.insert("content-type", hyper::header::HeaderValue::from_static(content_type(&path)));
            headers.insert("cache-control", hyper::header::HeaderValue::from_static("no-cache"));
            headers.insert("x-content-type-options", hyper::header::HeaderValue::from_static("nosniff"));
            resp
        }
        Err(_) => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn served_files_are_cached_until_they_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("app.js");
        std::fs::write(&path, "one").expect("write");
        let meta = std::fs::metadata(&path).expect("meta");
        let first = file_bytes(&path, &meta).await.expect("read");
        assert_eq!(&first[..], b"one");
        // The same bytes, shared, while the file is unchanged.
        let again = file_bytes(&path, &meta).await.expect("cached");
        assert_eq!(again.as_ptr(), first.as_ptr());
        // A rebuilt file is read again.
        std::fs::write(&path, "two!").expect("rewrite");
        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!(&file_bytes(&path, &meta).await.expect("re-read")[..], b"two!");
    }
}
