//! What a connection travels on: plain TCP or TLS (rustls), behind one type, with the
//! bytes read to route a request put back in front.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream a connection can run on.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type BoxIo = Box<dyn Io>;

/// `inner` with `prefix` read first: what was read to find the request line.
pub struct Rewind {
    prefix: Vec<u8>,
    at: usize,
    inner: BoxIo,
}

impl Rewind {
    pub fn new(prefix: Vec<u8>, inner: BoxIo) -> Rewind {
        Rewind { prefix, at: 0, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads until the end of the first line (`\r\n`), at most `limit` bytes, and returns
/// the line and everything read (to be put back with [`Rewind`]).
pub async fn read_request_line(stream: &mut BoxIo, limit: usize) -> anyhow::Result<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            anyhow::bail!("closed before a request line");
        }
        let start = buf.len().saturating_sub(1);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf[start..].windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..start + end]).into_owned();
            return Ok((line, buf));
        }
        if buf.len() >= limit {
            anyhow::bail!("request line longer than {limit} bytes");
        }
    }
}

/// A TLS server configuration from PEM files: a certificate chain and its private key.
pub fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use anyhow::Context as _;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--tls-cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--tls-cert {}: not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("--tls-cert {}: no certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key {}: no PEM private key in it", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not make a usable pair")?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_request_line_is_found_and_every_byte_put_back() {
        let (mut client, server) = tokio::io::duplex(64);
        let text = b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\n\r\nrest";
        client.write_all(text).await.expect("write");
        drop(client);
        let mut s: BoxIo = Box::new(server);
        let (line, read) = read_request_line(&mut s, 8192).await.expect("line");
        assert_eq!(line, "GET /ws?token=abc HTTP/1.1");
        let mut all = Vec::new();
        Rewind::new(read, s).read_to_end(&mut all).await.expect("read");
        assert_eq!(all, text);
    }

    #[tokio::test]
    async fn a_line_past_the_limit_is_refused() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&vec![b'a'; 10_000]).await.expect("write");
        let mut s: BoxIo = Box::new(server);
        let err = read_request_line(&mut s, 8192).await.expect_err("too long");
        assert!(err.to_string().contains("longer than 8192"), "{err}");
    }
}
