//! The connector under the pooled hyper client: TCP, TLS (ALPN h2/http1.1), and proxies
//! (absolute-form for `http://` targets, CONNECT tunnels for `https://` targets).
use super::proxy::{Proxies, ProxyUrl};
use super::stats::StatsInner;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Why a connection could not be made; found again by downcasting in the client's error chain.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("{0}")]
    Tcp(String),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Proxy(String),
}

pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One connection handed to hyper.
pub(crate) struct Conn {
    io: TokioIo<Stream>,
    /// Plain HTTP through a proxy: hyper must send absolute-form request targets.
    via_http_proxy: bool,
    h2: bool,
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        let mut c = Connected::new().proxy(self.via_http_proxy);
        if self.h2 {
            c = c.negotiated_h2();
        }
        c
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Connector {
    tls: Arc<LazyTls>,
    proxies: Arc<Proxies>,
    timeout: Duration,
    stats: Arc<StatsInner>,
}

impl Connector {
    pub fn new(
        tls: Arc<LazyTls>,
        proxies: Arc<Proxies>,
        timeout: Duration,
        stats: Arc<StatsInner>,
    ) -> Self {
        Connector {
            tls,
            proxies,
            timeout,
            stats,
        }
    }

    async fn connect(self, uri: Uri) -> Result<Conn, ConnectError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            other => {
                return Err(ConnectError::Tcp(format!(
                    "unsupported URL scheme {other:?}"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| ConnectError::Tcp("URL without host".into()))?;
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let proxy = self.proxies.for_target(https, host, port).cloned();
        let tcp = match &proxy {
            Some(p) => tcp_connect(&p.host, p.port, self.timeout)
                .await
                .map_err(|e| ConnectError::Proxy(format!("proxy {p:?}: {e}")))?,
            None => tcp_connect(&bare_host, port, self.timeout)
                .await
                .map_err(|e| ConnectError::Tcp(format!("{bare_host}:{port}: {e}")))?,
        };
        self.stats.connection();
        if !https {
            return Ok(Conn {
                io: TokioIo::new(Stream::Plain(tcp)),
                via_http_proxy: proxy.is_some(),
                h2: false,
            });
        }
        let tcp = match &proxy {
            Some(p) => tokio::time::timeout(self.timeout, tunnel(tcp, p, host, port))
                .await
                .map_err(|_| ConnectError::Proxy(format!("proxy {p:?}: CONNECT timed out")))??,
            None => tcp,
        };
        let name = ServerName::try_from(bare_host.clone()).map_err(|_| {
            ConnectError::Tls(format!("{bare_host:?} is not a valid TLS server name"))
        })?;
        let connector = self.tls.connector().map_err(ConnectError::Tls)?;
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| ConnectError::Tls(format!("{bare_host}:{port}: handshake timed out")))?
            .map_err(|e| {
                // tokio-rustls wraps the rustls error in io::Error; show the inner one.
                let msg = e.get_ref().map_or_else(|| e.to_string(), |i| i.to_string());
                ConnectError::Tls(format!("{bare_host}:{port}: {msg}"))
            })?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Conn {
            io: TokioIo::new(Stream::Tls(Box::new(tls))),
            via_http_proxy: false,
            h2,
        })
    }
}

async fn tcp_connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Opens a CONNECT tunnel to `host:port` through an already connected proxy socket.
async fn tunnel(
    mut s: TcpStream,
    p: &ProxyUrl,
    host: &str,
    port: u16,
) -> Result<TcpStream, ConnectError> {
    let perr = |m: String| ConnectError::Proxy(format!("proxy {p:?}: {m}"));
    let mut req = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some(a) = &p.auth {
        req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| perr(format!("sending CONNECT: {e}")))?;
    // Read byte by byte up to the blank line so no TLS bytes are swallowed.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(perr("CONNECT response header too long".into()));
        }
        let b = s
            .read_u8()
            .await
            .map_err(|e| perr(format!("reading CONNECT response: {e}")))?;
        head.push(b);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| perr("malformed CONNECT response".into()))?;
    if !(200..300).contains(&status) {
        return Err(perr(format!(
            "CONNECT {host}:{port} refused with HTTP {status}"
        )));
    }
    Ok(s)
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

/// The system's trust roots, read and parsed once per process: about 0.5 s under emulation for
/// Debian's 145 roots, and a device process builds several clients while it starts.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: std::sync::OnceLock<rustls::RootCertStore> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "system trust roots loaded");
        roots
    })
}

/// The TLS side of a client: CA files are read and checked when the client is built, the
/// rustls config (with the system roots) on the first `https://` connection, so a client of
/// plain-HTTP registries never pays for parsing the roots (about 0.5 s under emulation, on
/// the path of every device start).
pub(crate) struct LazyTls {
    extra: rustls::RootCertStore,
    connector: std::sync::OnceLock<Result<TlsConnector, String>>,
}

impl LazyTls {
    /// Reads `ca_files` (PEM); each must hold at least one valid certificate.
    pub fn new(ca_files: &[std::path::PathBuf]) -> Result<LazyTls, String> {
        let mut extra = rustls::RootCertStore::empty();
        for f in ca_files {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(f)
                .map_err(|e| format!("CA file {}: {e}", f.display()))?
                .collect::<Result<_, _>>()
                .map_err(|e| format!("CA file {}: {e}", f.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "CA file {}: no PEM certificates in it",
                    f.display()
                ));
            }
            // Parsed now, so a bad CA file is a start-up error, not a connect error.
            for c in certs {
                extra
                    .add(c)
                    .map_err(|e| format!("CA file {}: {e}", f.display()))?;
            }
        }
        Ok(LazyTls {
            extra,
            connector: std::sync::OnceLock::new(),
        })
    }

    fn connector(&self) -> Result<TlsConnector, String> {
        self.connector
            .get_or_init(|| tls_config(&self.extra).map(|c| TlsConnector::from(Arc::new(c))))
            .clone()
    }
}

/// rustls config: system roots plus `extra` roots, ALPN h2 then http/1.1.
fn tls_config(extra: &rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    let mut roots = system_roots().clone();
    roots.roots.extend(extra.roots.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
