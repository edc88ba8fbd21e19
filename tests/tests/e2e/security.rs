//! An agent beyond loopback: named tokens from a file (revoked without a restart), bearer
//! tokens, TLS, and limits on connections that have not authenticated.

use std::sync::Arc;
use std::time::{Duration, Instant};

use headroom_tests::{AgentHandle, cli, recv};
use shared::protocol::ToClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, http::HeaderValue};

fn token_add(file: &std::path::Path, name: &str) -> anyhow::Result<String> {
    let (code, out, err) = cli(&["token", "add", name, "--token-file", &file.display().to_string()])?;
    anyhow::ensure!(code == 0, "token add: {err}");
    Ok(out.trim().to_owned())
}

/// Opens `/ws` on plain TCP with the token as a query parameter or a bearer header;
/// the HTTP status of a refusal, or 101 and the first message.
async fn open(port: u16, token: &str, bearer: bool) -> anyhow::Result<(u16, Option<ToClient>)> {
    let url =
        if bearer { format!("ws://127.0.0.1:{port}/ws") } else { format!("ws://127.0.0.1:{port}/ws?token={token}") };
    let mut req = url.into_client_request()?;
    if bearer {
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((mut ws, _)) => Ok((101, Some(recv(&mut ws).await?))),
        Err(tungstenite::Error::Http(resp)) => Ok((resp.status().as_u16(), None)),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test]
async fn named_tokens_from_a_file_work_as_query_or_bearer_and_revocation_needs_no_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tokens");
    let laptop = token_add(&file, "laptop")?;
    let ci = token_add(&file, "ci")?;
    assert_eq!(laptop.len(), 64, "256-bit tokens in hex: {laptop}");
    let (code, names, _) = cli(&["token", "list", "--token-file", &file.display().to_string()])?;
    assert_eq!((code, names.as_str()), (0, "laptop\nci\n"), "names only, never the tokens");
    let path = file.display().to_string();
    let agent = AgentHandle::start_with(&["--listen", "127.0.0.1:0", "--token-file", &path], laptop.clone(), None)?;
    let (status, hello) = open(agent.port, &laptop, false).await?;
    assert!(status == 101 && matches!(hello, Some(ToClient::Hello(_))), "{status} {hello:?}");
    let (status, hello) = open(agent.port, &ci, true).await?;
    assert!(status == 101 && matches!(hello, Some(ToClient::Hello(_))), "bearer: {status} {hello:?}");
    assert_eq!(open(agent.port, &"0".repeat(64), false).await?.0, 401, "an unknown token");
    assert_eq!(open(agent.port, &"0".repeat(64), true).await?.0, 401, "an unknown bearer token");
    let (code, _, err) = cli(&["token", "revoke", "laptop", "--token-file", &path])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(open(agent.port, &laptop, false).await?.0, 401, "revoked, the running agent refuses it");
    assert_eq!(open(agent.port, &ci, true).await?.0, 101, "the others still work");
    // The token file is private, and the agent will not start on one others can read.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file)?.permissions().mode() & 0o777, 0o600);
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640))?;
    let (code, _, err) = cli(&["serve", "--listen", "127.0.0.1:0", "--token-file", &path])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    Ok(())
}

#[test]
fn beyond_loopback_the_agent_needs_a_token_file_and_tls_or_an_explicit_flag() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tokens");
    token_add(&file, "lab")?;
    let path = file.display().to_string();
    for addr in ["0.0.0.0:0", "192.0.2.1:8787"] {
        let (code, _, err) = cli(&["serve", "--listen", addr])?;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("needs --token-file"), "{err}");
        let (code, _, err) = cli(&["serve", "--listen", addr, "--token-file", &path])?;
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("--tls-cert") && err.contains("SSH tunnel") && err.contains("--insecure-http"), "{err}");
    }
    let (code, _, err) = cli(&["serve", "--tls-cert", &path])?;
    assert_eq!(code, 2, "--tls-cert alone: {err}");
    let (code, _, err) = cli(&["serve", "--tls-cert", &path, "--tls-key", &path])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-cert"), "not a certificate: {err}");
    Ok(())
}

/// A self-signed certificate for 127.0.0.1 and localhost, as PEM files, and a client
/// configuration that trusts it.
fn certificate(dir: &std::path::Path) -> anyhow::Result<(String, String, Arc<rustls::ClientConfig>)> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((cert_path.display().to_string(), key_path.display().to_string(), Arc::new(client)))
}

async fn tls_connect(
    port: u16,
    client: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    Ok(tokio_rustls::TlsConnector::from(Arc::clone(client)).connect(name, tcp).await?)
}

#[tokio::test]
async fn tls_serves_the_planner_and_the_websocket_and_refuses_clear_text() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tokens");
    let token = token_add(&file, "lab")?;
    let (cert, key, client) = certificate(dir.path())?;
    let path = file.display().to_string();
    let agent = AgentHandle::start_with(
        &["--listen", "127.0.0.1:0", "--token-file", &path, "--tls-cert", &cert, "--tls-key", &key],
        token.clone(),
        None,
    )?;
    // The page over HTTPS, with its security headers.
    let mut tls = tls_connect(agent.port, &client).await?;
    let host = format!("127.0.0.1:{}", agent.port);
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut page = Vec::new();
    tls.read_to_end(&mut page).await?;
    let page = String::from_utf8_lossy(&page).to_ascii_lowercase();
    assert!(page.starts_with("http/1.1 200"), "{page}");
    assert!(page.contains("x-frame-options: deny"), "{page}");
    // The WebSocket over TLS, from the agent's https origin.
    let tls = tls_connect(agent.port, &client).await?;
    let mut req = format!("wss://{host}/ws?token={token}").into_client_request()?;
    req.headers_mut().insert("origin", HeaderValue::from_str(&format!("https://{host}"))?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Hello(_)));
    // Clear text on the TLS port gets no page.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", agent.port)).await?;
    plain.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut got)).await;
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "clear text was served");
    Ok(())
}

#[tokio::test]
async fn idle_strangers_cannot_crowd_out_a_real_client() -> anyhow::Result<()> {
    let agent = AgentHandle::start_flags(&["--max-unauthenticated", "12"], None)?;
    let token = agent.token.clone();
    // One host opens sockets and sends nothing: it gets its share of slots (8), the rest
    // are closed at once.
    let mut idle = Vec::new();
    for _ in 0..12 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", agent.port)).await?);
    }
    // The agent closes the extra ones as it accepts them; a busy machine may take a
    // moment to get there.
    let mut is_closed = vec![false; idle.len()];
    let t0 = Instant::now();
    while is_closed.iter().filter(|&&c| c).count() < 4 && t0.elapsed() < Duration::from_secs(5) {
        for (s, c) in idle.iter_mut().zip(is_closed.iter_mut()) {
            let mut b = [0u8; 1];
            if !*c && matches!(tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await, Ok(Ok(0))) {
                *c = true;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (s, c) in idle.iter_mut().zip(is_closed.iter_mut()) {
        let mut b = [0u8; 1];
        if !*c && matches!(tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await, Ok(Ok(0))) {
            *c = true;
        }
    }
    let closed = is_closed.iter().filter(|&&c| c).count();
    assert_eq!(closed, 4, "one peer holds at most 8 unauthenticated slots");
    // A client from another address still gets in.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.2:0".parse()?)?;
    let stream = socket.connect(([127, 0, 0, 1], agent.port).into()).await?;
    let req = format!("ws://127.0.0.1:{}/ws?token={token}", agent.port).into_client_request()?;
    let (mut ws, _) = tokio_tungstenite::client_async(req, stream).await?;
    assert!(matches!(recv(&mut ws).await?, ToClient::Hello(_)));
    // The idle ones are dropped at the handshake deadline (10 s).
    let t0 = Instant::now();
    for s in &mut idle {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await?;
        assert!(matches!(n, Ok(0) | Err(_)), "an idle socket got data");
    }
    let waited = t0.elapsed();
    println!("idle sockets closed after {:.1} s", waited.as_secs_f64() + 0.3);
    assert!(waited < Duration::from_secs(12), "{waited:?}");
    Ok(())
}

/// Asks for the page on a fresh connection: whether an HTTP answer came within 2 s (a
/// connection past the unauthenticated limits is closed without one).
async fn page_served(port: u16) -> anyhow::Result<bool> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut head = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut head)).await {
        Ok(Ok(_)) => Ok(head.starts_with(b"HTTP/1.1 200")),
        _ => Ok(false),
    }
}

#[tokio::test]
async fn page_clients_that_never_read_give_their_slots_back_at_the_deadline() -> anyhow::Result<()> {
    let web = tempfile::tempdir()?;
    std::fs::write(web.path().join("index.html"), "<!doctype html><title>page</title>")?;
    // Far more than the socket buffers on both sides hold: the agent's writes wait.
    std::fs::write(web.path().join("big.bin"), vec![7u8; 32 << 20])?;
    let flags = ["--max-unauthenticated", "3", "--page-connection-seconds", "5"];
    let agent = AgentHandle::start_flags(&flags, Some(web.path().to_owned()))?;
    assert!(page_served(agent.port).await?, "the page is served");
    let mut stuck = Vec::new();
    while stuck.len() < 3 {
        // Each is answered (it holds a slot) before the next comes; one that came while
        // the last check's connection still held its slot is closed unanswered: again.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", agent.port)).await?;
        s.write_all(format!("GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", agent.port).as_bytes()).await?;
        let mut head = [0u8; 12];
        match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await {
            Ok(Ok(_)) if head.starts_with(b"HTTP/1.1 200") => stuck.push(s),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let t0 = Instant::now();
    assert!(!page_served(agent.port).await?, "three readers that never read hold every slot");
    // They are closed at the page deadline (5 s here), and the page is served again.
    while !page_served(agent.port).await? {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(20), "the slots never came back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let waited = t0.elapsed().as_secs_f64() + 0.5;
    println!("page connections that never read were closed after {waited:.1} s");
    assert!(waited > 4.0, "not before the deadline: {waited:.1} s");
    drop(stuck);
    Ok(())
}
