//! The registry client proper: auth, redirects, retries, mirrors and the OCI endpoints.
use super::auth::{Challenge, CredStore, Token, parse_challenge};
use super::config::{ClientConfig, Mirror};
use super::connect::{ConnectError, Connector, LazyTls};
use super::error::{ErrorKind, RegistryError, Result};
use super::proxy::{Proxies, split_host_port};
use super::reference::{Reference, validate_digest};
use super::stats::{FetchStats, StatsInner};
use bytes::{Bytes, BytesMut};
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HeaderName, HeaderValue,
    LOCATION, RANGE, RETRY_AFTER, USER_AGENT, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ReqBody = BoxBody<Bytes, BoxError>;

/// Media types sent in `Accept` for manifest fetches.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Manifests larger than this are refused (the distribution spec suggests 4 MiB).
const MAX_MANIFEST: u64 = 4 << 20;
/// Largest blob read into memory (configs, traces): a descriptor may claim any size, and the
/// read preallocates it.
pub const MAX_BLOB_IN_MEMORY: u64 = 64 << 20;
const MAX_REDIRECTS: usize = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A fetched manifest: raw bytes, media type, and the sha256 digest of the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
}

/// OCI distribution client. Cheap to clone; all clones (and [`Client::without_mirrors`]
/// views) share one connection pool, token cache, concurrency limit and counters.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    /// Tried in order before the upstream for blob reads.
    mirrors: Arc<[Mirror]>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("mirrors", &self.mirrors)
            .field("insecure_hosts", &self.inner.insecure)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Access {
    Pull,
    Push,
}

impl Access {
    fn actions(self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        }
    }
}

struct Inner {
    http: HyperClient<Connector, ReqBody>,
    creds: CredStore,
    insecure: Vec<(String, Option<u16>)>,
    timeout: Duration,
    max_retries: u32,
    backoff: Duration,
    /// Bearer tokens per (registry host, repository, access).
    tokens: Mutex<HashMap<(String, String, Access), Token>>,
    /// Hosts that answered with a Basic challenge: credentials are sent up front.
    basic_hosts: Mutex<HashSet<String>>,
    sem: Semaphore,
    stats: Arc<StatsInner>,
    proxies: Arc<Proxies>,
}

/// Where a request goes: registry authority and scheme.
#[derive(Clone, Debug)]
struct Source {
    host: String,
    https: bool,
    mirror: bool,
}

impl Source {
    fn base(&self) -> String {
        format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.host
        )
    }
}

/// Who a request acts for, for auth.
struct Ctx<'a> {
    op: &'a str,
    src: &'a Source,
    repo: &'a str,
    access: Access,
}

/// The context and URL of a request for blob `digest` of `r`'s repository at `src`.
fn blob_target<'a>(
    op: &'a str,
    src: &'a Source,
    r: &'a Reference,
    digest: &str,
    access: Access,
) -> (Ctx<'a>, String) {
    let url = format!("{}/v2/{}/blobs/{digest}", src.base(), r.repository);
    let cx = Ctx {
        op,
        src,
        repo: &r.repository,
        access,
    };
    (cx, url)
}

/// Request bodies, rebuilt for every attempt.
enum Payload<'a> {
    Empty,
    Bytes(Bytes),
    File(&'a Path, u64),
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Bytes(b) => b.len() as u64,
            Payload::File(_, n) => *n,
        }
    }

    async fn body(&self) -> std::io::Result<ReqBody> {
        Ok(match self {
            Payload::Empty => Empty::new().map_err(|never| match never {}).boxed(),
            Payload::Bytes(b) => Full::new(b.clone()).map_err(|never| match never {}).boxed(),
            Payload::File(p, n) => FileBody {
                file: tokio::fs::File::open(p).await?,
                remaining: *n,
                buf: vec![0; 256 * 1024].into_boxed_slice(),
            }
            .boxed(),
        })
    }
}

/// Streams a file of known length as a request body.
struct FileBody {
    file: tokio::fs::File,
    remaining: u64,
    buf: Box<[u8]>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = this
            .buf
            .len()
            .min(usize::try_from(this.remaining).unwrap_or(usize::MAX));
        let mut rb = ReadBuf::new(&mut this.buf[..want]);
        match Pin::new(&mut this.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "file shrank while being uploaded",
                    );
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                this.remaining -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Attempt counter: `done` attempts made so far (1-based), at most `max`.
struct Attempts {
    done: u32,
    max: u32,
}

/// What a blob read produces.
enum BlobRead<'a> {
    /// The whole blob into memory; `size` is the descriptor's.
    Whole {
        size: u64,
    },
    Range(u64, u64),
    ToFile {
        size: u64,
        dir: &'a Path,
        name: &'a str,
        dest: &'a Path,
    },
}

enum BlobOut {
    Bytes(Bytes),
    Size(u64),
}

/// Reads a response body frame by frame with a stall timeout, counting bytes.
/// The slowest body a read accepts on average, on top of one stall timeout: a server that
/// drips a byte now and then never stalls, but it cannot hold a read longer than this allows.
const MIN_BODY_RATE: f64 = 64.0 * 1024.0;

struct BodyReader {
    body: Incoming,
    stall: Duration,
    started: tokio::time::Instant,
    /// The whole body must have arrived by then.
    deadline: tokio::time::Instant,
    stats: Arc<StatsInner>,
}

impl BodyReader {
    async fn next(&mut self) -> std::result::Result<Option<Bytes>, ErrorKind> {
        loop {
            let now = tokio::time::Instant::now();
            let left = self.deadline.saturating_duration_since(now);
            let wait = self.stall.min(left);
            match tokio::time::timeout(wait, self.body.frame()).await {
                Err(_) if wait < self.stall => {
                    return Err(ErrorKind::Timeout {
                        phase: "body data (too slow overall)",
                        after: self.started.elapsed(),
                    });
                }
                Err(_) => {
                    return Err(ErrorKind::Timeout {
                        phase: "body data (stalled)",
                        after: self.stall,
                    });
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(ErrorKind::Transport(cora_api::error_chain(&e))),
                Ok(Some(Ok(frame))) => {
                    if let Ok(d) = frame.into_data()
                        && !d.is_empty()
                    {
                        self.stats.bytes(d.len());
                        return Ok(Some(d));
                    }
                }
            }
        }
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> ErrorKind {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(ce) = c.downcast_ref::<ConnectError>() {
            return match ce {
                ConnectError::Tls(m) => ErrorKind::Tls(m.clone()),
                ConnectError::Tcp(m) | ConnectError::Proxy(m) => ErrorKind::Connect(m.clone()),
            };
        }
        cur = c.source();
    }
    ErrorKind::Transport(cora_api::error_chain(e))
}

fn content_length(resp: &Response<Incoming>) -> Option<u64> {
    resp.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `sha256:<hex>` of `data`: the OCI digest of a blob.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `scheme://authority` of an absolute URL, lowercased, for same-origin checks.
/// `url` for logs: a redirect target's query is often a pre-signed credential
/// (`X-Amz-Signature=…`), so it is left out.
fn loggable(url: &str) -> std::borrow::Cow<'_, str> {
    match url.split_once(['?', '#']) {
        Some((base, _)) => format!("{base}?…").into(),
        None => url.into(),
    }
}

fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let auth = rest.split(['/', '?', '#']).next().unwrap_or("");
    format!("{scheme}://{auth}").to_ascii_lowercase()
}

/// Resolves a `Location` header against the URL it came from.
fn resolve(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_string()
    } else if let Some(rest) = loc.strip_prefix("//") {
        let scheme = base.split_once("://").map_or("https", |(s, _)| s);
        format!("{scheme}://{rest}")
    } else if loc.starts_with('/') {
        format!("{}{loc}", origin(base))
    } else {
        let path_end = base.find('?').unwrap_or(base.len());
        let dir = base[..path_end].rfind('/').map_or(base, |i| &base[..=i]);
        format!("{dir}{loc}")
    }
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn backoff(base: Duration, attempt: u32) -> Duration {
    let d = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    // Jitter to 50–100 % so that parallel readers do not retry in lock step.
    d.mul_f64(0.5 + fastrand::f64() * 0.5)
}

fn parse_retry_after(resp: &Response<Incoming>) -> Option<Duration> {
    let secs: u64 = resp
        .headers()
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

impl Client {
    /// Builds a client: loads credentials and CA files, parses proxy settings.
    pub fn new(cfg: ClientConfig) -> Result<Client> {
        let config_err =
            |m: String| RegistryError::new("create registry client", ErrorKind::Config(m));
        if cfg.max_concurrency == 0 {
            return Err(config_err("max_concurrency must be at least 1".into()));
        }
        if cfg.request_timeout.is_zero() {
            return Err(config_err("request_timeout must be positive".into()));
        }
        let creds = CredStore::load(cfg.creds_file.as_deref())?;
        let tls = Arc::new(LazyTls::new(&cfg.ca_files).map_err(config_err)?);
        let proxies = Arc::new(Proxies::new(&cfg.proxy)?);
        let stats = Arc::new(StatsInner::default());
        let connector = Connector::new(tls, proxies.clone(), cfg.request_timeout, stats.clone());
        let http = HyperClient::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let mut insecure = Vec::new();
        for h in &cfg.insecure_hosts {
            let (name, port) = split_host_port(h.trim())
                .ok_or_else(|| config_err(format!("insecure_hosts: cannot parse {h:?}")))?;
            insecure.push((name.to_ascii_lowercase(), port));
        }
        // A mirror marked insecure is reached over plain HTTP also when addressed directly
        // (a lazy source reads each mirror as a source of its own, see without_mirrors).
        for m in cfg.mirrors.iter().filter(|m| m.insecure) {
            if let Some((name, port)) = split_host_port(m.host.trim()) {
                insecure.push((name.to_ascii_lowercase(), port));
            }
        }
        Ok(Client {
            mirrors: cfg.mirrors.into(),
            inner: Arc::new(Inner {
                http,
                creds,
                insecure,
                timeout: cfg.request_timeout,
                max_retries: cfg.max_retries,
                backoff: cfg.retry_backoff,
                tokens: Mutex::new(HashMap::new()),
                basic_hosts: Mutex::new(HashSet::new()),
                sem: Semaphore::new(cfg.max_concurrency),
                stats,
                proxies,
            }),
        })
    }

    /// This client without its mirrors: requests go only where their reference points. Shares
    /// connections, tokens and counters with `self`.
    pub fn without_mirrors(&self) -> Client {
        Client {
            inner: self.inner.clone(),
            mirrors: Arc::from(Vec::new()),
        }
    }

    /// The mirrors this client tries before the upstream.
    pub fn mirrors(&self) -> &[Mirror] {
        &self.mirrors
    }

    /// Counters since creation.
    pub fn stats(&self) -> FetchStats {
        self.inner.stats.snapshot()
    }

    fn is_insecure(&self, authority: &str) -> bool {
        let Some((h, port)) = split_host_port(authority) else {
            return false;
        };
        let h = h.to_ascii_lowercase();
        self.inner
            .insecure
            .iter()
            .any(|(n, p)| *n == h && p.is_none_or(|p| Some(p) == port))
    }

    fn upstream(&self, r: &Reference) -> Source {
        // Docker Hub's API lives on another host than its reference name.
        let host = match r.registry.as_str() {
            "docker.io" | "index.docker.io" => "registry-1.docker.io".to_string(),
            h => h.to_string(),
        };
        Source {
            https: !self.is_insecure(&host),
            host,
            mirror: false,
        }
    }

    fn blob_sources(&self, r: &Reference) -> Vec<Source> {
        let mut v: Vec<Source> = self
            .mirrors
            .iter()
            .map(|m| Source {
                host: m.host.clone(),
                https: !m.insecure,
                mirror: true,
            })
            .collect();
        v.push(self.upstream(r));
        v
    }

    /// Runs one attempt while holding a concurrency permit (body included).
    async fn permitted<T>(&self, attempt: impl Future<Output = Result<T>>) -> Result<T> {
        let _permit = self.inner.sem.acquire().await;
        attempt.await
    }

    /// After a failed attempt: `Err` with the final error, or `Ok` once the backoff has
    /// elapsed and another attempt may start.
    async fn on_failure(&self, op: &str, e: RegistryError, tries: &mut Attempts) -> Result<()> {
        self.inner.stats.error();
        if !e.is_retryable() || tries.done >= tries.max {
            return Err(e.with_attempts(tries.done));
        }
        let mut delay = backoff(self.inner.backoff, tries.done);
        if let Some(ra) = e.retry_after() {
            delay = delay.max(ra);
        }
        warn!(op, attempt = tries.done, error = %e.kind(), ?delay, "registry request failed; retrying");
        self.inner.stats.retry();
        tokio::time::sleep(delay).await;
        tries.done += 1;
        Ok(())
    }

    fn upstream_tries(&self) -> Attempts {
        Attempts {
            done: 1,
            max: self.inner.max_retries + 1,
        }
    }

    /// Blob reads: each mirror once, then the upstream with the full retry budget.
    async fn read_blob(&self, r: &Reference, digest: &str, how: &BlobRead<'_>) -> Result<BlobOut> {
        validate_digest(digest)?;
        let mut last = None;
        for src in self.blob_sources(r) {
            let op = match how {
                BlobRead::Whole { .. } => {
                    format!("GET blob {digest} from {}/{}", src.host, r.repository)
                }
                BlobRead::Range(a, b) => format!(
                    "GET blob {digest} bytes {a}..{b} from {}/{}",
                    src.host, r.repository
                ),
                BlobRead::ToFile { dest, .. } => format!(
                    "GET blob {digest} from {}/{} to {}",
                    src.host,
                    r.repository,
                    dest.display()
                ),
            };
            let mut tries = if src.mirror {
                Attempts { done: 1, max: 1 }
            } else {
                self.upstream_tries()
            };
            loop {
                match self
                    .permitted(self.blob_once(&src, &op, r, digest, how))
                    .await
                {
                    Ok(v) => return Ok(v),
                    Err(e) => match self.on_failure(&op, e, &mut tries).await {
                        Ok(()) => {}
                        Err(e) if src.mirror => {
                            warn!(error = %e, "mirror failed; trying the next source");
                            last = Some(e);
                            break;
                        }
                        Err(e) => return Err(e),
                    },
                }
            }
        }
        // Unreachable in practice: the upstream is always the last source and returns.
        Err(last.unwrap_or_else(|| {
            RegistryError::new("read blob", ErrorKind::Protocol("no source".into()))
        }))
    }

    async fn blob_once(
        &self,
        src: &Source,
        op: &str,
        r: &Reference,
        digest: &str,
        how: &BlobRead<'_>,
    ) -> Result<BlobOut> {
        match how {
            BlobRead::Whole { size } => {
                let (cx, url) = blob_target(op, src, r, digest, Access::Pull);
                let resp = self
                    .send(&cx, Method::GET, url, &[], &Payload::Empty, true)
                    .await?;
                let resp = self.expect(op, resp, &[200]).await?;
                let data = self.read_all(op, resp, *size).await?;
                if data.len() as u64 != *size {
                    return Err(RegistryError::new(
                        op,
                        ErrorKind::ShortBody {
                            expected: *size,
                            got: data.len() as u64,
                        },
                    ));
                }
                let actual = sha256_digest(&data);
                if actual != digest {
                    return Err(RegistryError::new(
                        op,
                        ErrorKind::DigestMismatch {
                            expected: digest.to_string(),
                            actual,
                        },
                    ));
                }
                Ok(BlobOut::Bytes(data))
            }
            BlobRead::Range(a, b) => Ok(BlobOut::Bytes(
                self.range_once(src, op, r, digest, *a, *b).await?,
            )),
            BlobRead::ToFile {
                size,
                dir,
                name,
                dest,
            } => {
                let tmp = dir.join(format!(
                    ".{name}.part-{}-{:08x}",
                    std::process::id(),
                    fastrand::u32(..)
                ));
                let res = match self.download_once(src, op, r, digest, *size, &tmp).await {
                    Ok(n) => tokio::fs::rename(&tmp, dest)
                        .await
                        .map(|()| n)
                        .map_err(|e| RegistryError::new(op, ErrorKind::Io(e))),
                    Err(e) => Err(e),
                };
                if res.is_err() {
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
                res.map(BlobOut::Size)
            }
        }
    }

    fn auth_header(&self, host: &str, repo: &str, access: Access) -> Option<String> {
        {
            let tokens = self.inner.tokens.lock().unwrap_or_else(|p| p.into_inner());
            let mut keys = vec![(host.to_string(), repo.to_string(), access)];
            if access == Access::Pull {
                keys.push((host.to_string(), repo.to_string(), Access::Push));
            }
            for k in keys {
                if let Some(t) = tokens.get(&k).filter(|t| t.valid()) {
                    return Some(format!("Bearer {}", t.value));
                }
            }
        }
        let basic = self
            .inner
            .basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(host);
        if basic {
            return self
                .inner
                .creds
                .lookup(host, repo)
                .map(|c| c.basic_header());
        }
        None
    }

    /// One HTTP exchange, no auth or redirect handling. `auth` is marked sensitive so hyper
    /// and HTTP/2 HPACK never expose it.
    async fn raw(
        &self,
        op: &str,
        method: &Method,
        url: &str,
        headers: &[(HeaderName, String)],
        payload: &Payload<'_>,
        auth: Option<&str>,
    ) -> Result<Response<Incoming>> {
        let err = |k| RegistryError::new(op, k);
        let mut b = Request::builder()
            .method(method.clone())
            .uri(url)
            .header(USER_AGENT, concat!("cora/", env!("CARGO_PKG_VERSION")));
        if let Some(a) = auth {
            let mut v = HeaderValue::from_str(a).map_err(|_| {
                err(ErrorKind::Protocol(
                    "credential is not a valid header value".into(),
                ))
            })?;
            v.set_sensitive(true);
            b = b.header(AUTHORIZATION, v);
        }
        // Plain-HTTP targets through an authenticating proxy carry the proxy credentials on
        // every request (HTTPS targets send them in CONNECT instead).
        if url.starts_with("http://")
            && let Ok(uri) = url.parse::<http::Uri>()
            && let Some(p) = self.inner.proxies.for_target(
                false,
                uri.host().unwrap_or(""),
                uri.port_u16().unwrap_or(80),
            )
            && let Some(pa) = &p.auth
        {
            let mut v = HeaderValue::from_str(pa)
                .map_err(|_| err(ErrorKind::Config("bad proxy credentials".into())))?;
            v.set_sensitive(true);
            b = b.header(http::header::PROXY_AUTHORIZATION, v);
        }
        for (k, v) in headers {
            b = b.header(k, v);
        }
        if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
            b = b.header(CONTENT_LENGTH, payload.len());
        }
        let body = payload.body().await.map_err(|e| err(ErrorKind::Io(e)))?;
        let req = b
            .body(body)
            .map_err(|e| err(ErrorKind::Protocol(format!("cannot build request: {e}"))))?;
        self.inner.stats.request();
        debug!(%method, url = %loggable(url), "registry request");
        match tokio::time::timeout(self.inner.timeout, self.inner.http.request(req)).await {
            Err(_) => Err(err(ErrorKind::Timeout {
                phase: "connection and response headers",
                after: self.inner.timeout,
            })),
            Ok(Err(e)) => Err(err(classify(&e))),
            Ok(Ok(resp)) => {
                if resp.version() == Version::HTTP_2 {
                    self.inner.stats.h2();
                }
                debug!(%method, url = %loggable(url), status = resp.status().as_u16(), version = ?resp.version(), "registry response");
                Ok(resp)
            }
        }
    }

    /// Reads and discards a small body so the connection can be reused.
    async fn drain(&self, resp: Response<Incoming>) {
        let mut r = self.reader(resp, 64 * 1024);
        let mut n = 0;
        while let Ok(Some(c)) = r.next().await {
            n += c.len();
            if n > 64 * 1024 {
                break;
            }
        }
    }

    /// Sends with auth (one 401 round trip to obtain credentials) and, if `follow`,
    /// redirects; `Authorization` is only sent to the registry's own origin.
    async fn send(
        &self,
        cx: &Ctx<'_>,
        method: Method,
        url: String,
        headers: &[(HeaderName, String)],
        payload: &Payload<'_>,
        follow: bool,
    ) -> Result<Response<Incoming>> {
        let err = |k| RegistryError::new(cx.op, k);
        let home = origin(&cx.src.base());
        let mut url = url;
        let mut hops = 0;
        let mut authenticated = false;
        loop {
            let same_origin = origin(&url) == home;
            let auth = same_origin
                .then(|| self.auth_header(&cx.src.host, cx.repo, cx.access))
                .flatten();
            let resp = self
                .raw(cx.op, &method, &url, headers, payload, auth.as_deref())
                .await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && same_origin {
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                self.drain(resp).await;
                if authenticated {
                    return Err(err(ErrorKind::Unauthorized(format!(
                        "{} refused the credentials or token",
                        cx.src.host
                    ))));
                }
                authenticated = true;
                self.authenticate(cx, challenge.as_deref(), auth.is_some())
                    .await?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED {
                return Err(err(ErrorKind::Unauthorized(format!(
                    "redirect target {} demands authentication",
                    origin(&url)
                ))));
            }
            let redirect = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
            if follow && redirect {
                hops += 1;
                if hops > MAX_REDIRECTS {
                    return Err(err(ErrorKind::Protocol(format!(
                        "more than {MAX_REDIRECTS} redirects"
                    ))));
                }
                let loc = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| {
                        err(ErrorKind::Protocol(format!(
                            "HTTP {status} without Location"
                        )))
                    })?
                    .to_string();
                self.drain(resp).await;
                let next = resolve(&url, &loc);
                let next_origin = origin(&next);
                if next.starts_with("http://") {
                    let authority = next_origin.trim_start_matches("http://");
                    if !self.is_insecure(authority) {
                        return Err(err(ErrorKind::Protocol(format!(
                            "refusing redirect to plain-HTTP {next_origin}: host not in insecure_hosts"
                        ))));
                    }
                }
                debug!(from = %origin(&url), to = %next_origin, "following redirect");
                url = next;
                continue;
            }
            return Ok(resp);
        }
    }

    async fn authenticate(
        &self,
        cx: &Ctx<'_>,
        challenge: Option<&str>,
        sent_auth: bool,
    ) -> Result<()> {
        let err = |m: String| RegistryError::new(cx.op, ErrorKind::Unauthorized(m));
        let host = &cx.src.host;
        let creds = self.inner.creds.lookup(host, cx.repo);
        match challenge.and_then(parse_challenge) {
            None => Err(err(format!(
                "{host} answered 401 without a usable WWW-Authenticate challenge"
            ))),
            Some(Challenge::Basic) => {
                if creds.is_none() {
                    return Err(err(format!(
                        "{host} requires basic authentication and no credentials are configured for it"
                    )));
                }
                if sent_auth {
                    return Err(err(format!("{host} rejected the configured credentials")));
                }
                self.inner
                    .basic_hosts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(host.clone());
                Ok(())
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let ours = format!("repository:{}:{}", cx.repo, cx.access.actions());
                let mut scopes = vec![ours.clone()];
                if let Some(s) = scope
                    && s != ours
                {
                    scopes.push(s);
                }
                let token = self
                    .fetch_token(cx, &realm, service.as_deref(), &scopes)
                    .await?;
                self.inner
                    .tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((host.clone(), cx.repo.to_string(), cx.access), token);
                Ok(())
            }
        }
    }

    async fn fetch_token(
        &self,
        cx: &Ctx<'_>,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<Token> {
        let err = |m: String| RegistryError::new(cx.op, ErrorKind::Unauthorized(m));
        let realm_origin = origin(realm);
        if realm.starts_with("http://") {
            if !self.is_insecure(realm_origin.trim_start_matches("http://")) {
                return Err(err(format!(
                    "token realm {realm_origin} is plain HTTP and not in insecure_hosts"
                )));
            }
        } else if !realm.starts_with("https://") {
            return Err(err(format!("token realm {realm:?} is not an http(s) URL")));
        }
        let mut url = realm.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(s) = service {
            url.push_str(&format!("{sep}service={}", enc(s)));
            sep = '&';
        }
        for s in scopes {
            url.push_str(&format!("{sep}scope={}", enc(s)));
            sep = '&';
        }
        let basic = self
            .inner
            .creds
            .lookup(&cx.src.host, cx.repo)
            .map(|c| c.basic_header());
        let resp = self
            .raw(
                cx.op,
                &Method::GET,
                &url,
                &[],
                &Payload::Empty,
                basic.as_deref(),
            )
            .await?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            self.drain(resp).await;
            return Err(err(format!(
                "token server {realm_origin} refused {} (HTTP {})",
                if basic.is_some() {
                    "the configured credentials"
                } else {
                    "anonymous access"
                },
                status.as_u16()
            )));
        }
        let resp = self.expect(cx.op, resp, &[200]).await?;
        let body = self.read_all(cx.op, resp, 1 << 20).await?;
        Token::parse(&body).map_err(|m| err(format!("token server {realm_origin}: {m}")))
    }

    /// Maps unexpected statuses to errors, keeping a short excerpt of the registry's message.
    async fn expect(
        &self,
        op: &str,
        resp: Response<Incoming>,
        ok: &[u16],
    ) -> Result<Response<Incoming>> {
        let status = resp.status().as_u16();
        if ok.contains(&status) {
            return Ok(resp);
        }
        let retry_after = parse_retry_after(&resp);
        let kind = match status {
            404 => {
                self.drain(resp).await;
                ErrorKind::NotFound
            }
            416 => {
                self.drain(resp).await;
                ErrorKind::RangeNotSatisfiable("HTTP 416".into())
            }
            _ => {
                let detail = match self.read_all(op, resp, 4096).await {
                    Ok(b) => error_detail(&b),
                    Err(_) => String::new(),
                };
                ErrorKind::Status {
                    status,
                    detail,
                    retry_after,
                }
            }
        };
        Err(RegistryError::new(op, kind))
    }

    /// A reader of a body of up to `expect` bytes: each frame within the stall timeout, the
    /// whole within one timeout plus `expect` at [`MIN_BODY_RATE`].
    fn reader(&self, resp: Response<Incoming>, expect: u64) -> BodyReader {
        let started = tokio::time::Instant::now();
        let allowance = self
            .inner
            .timeout
            .saturating_add(Duration::from_secs_f64(expect as f64 / MIN_BODY_RATE));
        BodyReader {
            body: resp.into_body(),
            stall: self.inner.timeout,
            started,
            // An absurd `expect` must not overflow the clock: a day is the most a body gets.
            deadline: started + allowance.min(Duration::from_secs(86_400)),
            stats: self.inner.stats.clone(),
        }
    }

    /// Whole body, at most `max` bytes, exactly `Content-Length` if announced.
    async fn read_all(&self, op: &str, resp: Response<Incoming>, max: u64) -> Result<Bytes> {
        let err = |k| RegistryError::new(op, k);
        let expected = content_length(&resp);
        if let Some(n) = expected
            && n > max
        {
            return Err(err(ErrorKind::Protocol(format!(
                "body of {n} bytes exceeds the {max}-byte limit"
            ))));
        }
        let mut r = self.reader(resp, expected.unwrap_or(max).min(max));
        let mut out = BytesMut::with_capacity(expected.unwrap_or(0).min(max) as usize);
        loop {
            match r.next().await {
                Ok(Some(c)) => {
                    if out.len() as u64 + c.len() as u64 > max {
                        return Err(err(ErrorKind::Protocol(format!(
                            "body exceeds the {max}-byte limit"
                        ))));
                    }
                    out.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(ErrorKind::Transport(_)) if expected.is_some() => {
                    return Err(err(ErrorKind::ShortBody {
                        expected: expected.unwrap_or(0),
                        got: out.len() as u64,
                    }));
                }
                Err(k) => return Err(err(k)),
            }
        }
        if let Some(n) = expected
            && (out.len() as u64) < n
        {
            return Err(err(ErrorKind::ShortBody {
                expected: n,
                got: out.len() as u64,
            }));
        }
        Ok(out.freeze())
    }

    /// Fetches a manifest (by digest if the reference has one, else by tag) from the upstream.
    /// Accepts OCI manifests/indexes and Docker schema 2 manifests/lists.
    pub async fn get_manifest(&self, r: &Reference) -> Result<Manifest> {
        let src = self.upstream(r);
        let op = format!(
            "GET manifest {} from {}/{}",
            r.manifest_ref(),
            src.host,
            r.repository
        );
        let mut tries = self.upstream_tries();
        loop {
            match self.permitted(self.manifest_once(&src, &op, r)).await {
                Ok(m) => return Ok(m),
                Err(e) => self.on_failure(&op, e, &mut tries).await?,
            }
        }
    }

    async fn manifest_once(&self, src: &Source, op: &str, r: &Reference) -> Result<Manifest> {
        let cx = Ctx {
            op,
            src,
            repo: &r.repository,
            access: Access::Pull,
        };
        let url = format!(
            "{}/v2/{}/manifests/{}",
            src.base(),
            r.repository,
            r.manifest_ref()
        );
        let accept = [(ACCEPT, MANIFEST_MEDIA_TYPES.join(", "))];
        let resp = self
            .send(&cx, Method::GET, url, &accept, &Payload::Empty, true)
            .await?;
        let resp = self.expect(op, resp, &[200]).await?;
        let header_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .filter(|v| !v.is_empty());
        let bytes = self.read_all(op, resp, MAX_MANIFEST).await?;
        let digest = sha256_digest(&bytes);
        if let Some(want) = &r.digest
            && *want != digest
        {
            return Err(RegistryError::new(
                op,
                ErrorKind::DigestMismatch {
                    expected: want.clone(),
                    actual: digest,
                },
            ));
        }
        let media_type = match header_type {
            Some(t) if t != "application/json" && t != "application/octet-stream" => t,
            _ => serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
                .ok_or_else(|| {
                    RegistryError::new(
                        op,
                        ErrorKind::Protocol(
                            "manifest has neither a Content-Type nor a mediaType".into(),
                        ),
                    )
                })?,
        };
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The referrers of manifest `digest` with `artifactType` (OCI distribution 1.1,
    /// `GET /v2/<name>/referrers/<digest>`) as the raw image index. `Ok(None)` when the
    /// registry has no referrers API (404), as docker-registry 2.8.
    pub async fn get_referrers(
        &self,
        r: &Reference,
        digest: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>> {
        validate_digest(digest)?;
        let src = self.upstream(r);
        let op = format!(
            "GET referrers of {digest} from {}/{}",
            src.host, r.repository
        );
        let mut tries = self.upstream_tries();
        loop {
            let attempt = async {
                let cx = Ctx {
                    op: &op,
                    src: &src,
                    repo: &r.repository,
                    access: Access::Pull,
                };
                let url = format!(
                    "{}/v2/{}/referrers/{digest}?artifactType={}",
                    src.base(),
                    r.repository,
                    enc(artifact_type)
                );
                let accept = [(
                    ACCEPT,
                    "application/vnd.oci.image.index.v1+json".to_string(),
                )];
                let resp = self
                    .send(&cx, Method::GET, url, &accept, &Payload::Empty, true)
                    .await?;
                let resp = self.expect(&op, resp, &[200]).await?;
                self.read_all(&op, resp, MAX_MANIFEST).await
            };
            match self.permitted(attempt).await {
                Ok(b) => return Ok(Some(b)),
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => self.on_failure(&op, e, &mut tries).await?,
            }
        }
    }

    /// Fetches a whole blob of `size` bytes (its descriptor's) into memory and checks its
    /// length and sha256; a body longer than `size` is cut off, not buffered. Mirrors first.
    pub async fn get_blob(&self, r: &Reference, digest: &str, size: u64) -> Result<Bytes> {
        if size > MAX_BLOB_IN_MEMORY {
            return Err(RegistryError::new(
                format!("GET blob {digest}"),
                ErrorKind::Protocol(format!(
                    "its descriptor says {size} bytes, over the {MAX_BLOB_IN_MEMORY}-byte limit for blobs read into memory"
                )),
            ));
        }
        match self.read_blob(r, digest, &BlobRead::Whole { size }).await? {
            BlobOut::Bytes(b) => Ok(b),
            BlobOut::Size(_) => Err(RegistryError::new(
                "get blob",
                ErrorKind::Protocol("internal: size".into()),
            )),
        }
    }

    /// Streams a blob of `size` bytes (its descriptor's) to `path`, via a temporary file in the
    /// same directory renamed when length and sha256 match; a body longer than `size` is
    /// cut off, not written. Returns the blob size. Mirrors first.
    pub async fn get_blob_to_file(
        &self,
        r: &Reference,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<u64> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                RegistryError::new(
                    format!("download blob {digest} to {}", path.display()),
                    ErrorKind::Config("destination has no file name".into()),
                )
            })?;
        let how = BlobRead::ToFile {
            size,
            dir: &dir,
            name: &name,
            dest: path,
        };
        match self.read_blob(r, digest, &how).await? {
            BlobOut::Size(n) => Ok(n),
            BlobOut::Bytes(_) => Err(RegistryError::new(
                "get blob",
                ErrorKind::Protocol("internal: bytes".into()),
            )),
        }
    }

    async fn download_once(
        &self,
        src: &Source,
        op: &str,
        r: &Reference,
        digest: &str,
        size: u64,
        tmp: &Path,
    ) -> Result<u64> {
        let err = |k| RegistryError::new(op, k);
        let (cx, url) = blob_target(op, src, r, digest, Access::Pull);
        let resp = self
            .send(&cx, Method::GET, url, &[], &Payload::Empty, true)
            .await?;
        let resp = self.expect(op, resp, &[200]).await?;
        let expected = content_length(&resp);
        if let Some(n) = expected
            && n != size
        {
            return Err(err(ErrorKind::Protocol(format!(
                "the registry announces {n} bytes, the descriptor says {size}"
            ))));
        }
        let mut file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| err(ErrorKind::Io(e)))?;
        let mut rd = self.reader(resp, size);
        let mut hasher = Sha256::new();
        let mut n: u64 = 0;
        loop {
            match rd.next().await {
                Ok(Some(c)) => {
                    n += c.len() as u64;
                    if n > size {
                        return Err(err(ErrorKind::Protocol(format!(
                            "body exceeds the descriptor's {size} bytes"
                        ))));
                    }
                    hasher.update(&c);
                    file.write_all(&c)
                        .await
                        .map_err(|e| err(ErrorKind::Io(e)))?;
                }
                Ok(None) => break,
                Err(ErrorKind::Transport(_)) => {
                    return Err(err(ErrorKind::ShortBody {
                        expected: size,
                        got: n,
                    }));
                }
                Err(k) => return Err(err(k)),
            }
        }
        if n < size {
            return Err(err(ErrorKind::ShortBody {
                expected: size,
                got: n,
            }));
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(err(ErrorKind::DigestMismatch {
                expected: digest.to_string(),
                actual,
            }));
        }
        file.flush().await.map_err(|e| err(ErrorKind::Io(e)))?;
        file.sync_all().await.map_err(|e| err(ErrorKind::Io(e)))?;
        Ok(n)
    }

    /// Reads bytes `range` of a blob: exactly `range.end - range.start` bytes or an error.
    /// Mirrors first, then the upstream. Content is not verified here (chunk digests are).
    pub async fn get_blob_range(
        &self,
        r: &Reference,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes> {
        validate_digest(digest)?;
        if range.end <= range.start {
            if range.end == range.start {
                return Ok(Bytes::new());
            }
            return Err(RegistryError::new(
                format!("GET blob {digest} bytes {}..{}", range.start, range.end),
                ErrorKind::RangeNotSatisfiable("range end before start".into()),
            ));
        }
        match self
            .read_blob(r, digest, &BlobRead::Range(range.start, range.end))
            .await?
        {
            BlobOut::Bytes(b) => Ok(b),
            BlobOut::Size(_) => Err(RegistryError::new(
                "get blob range",
                ErrorKind::Protocol("internal: size".into()),
            )),
        }
    }

    async fn range_once(
        &self,
        src: &Source,
        op: &str,
        r: &Reference,
        digest: &str,
        start: u64,
        end: u64,
    ) -> Result<Bytes> {
        let err = |k| RegistryError::new(op, k);
        let hdr = [(RANGE, format!("bytes={start}-{}", end - 1))];
        let (cx, url) = blob_target(op, src, r, digest, Access::Pull);
        let resp = self
            .send(&cx, Method::GET, url, &hdr, &Payload::Empty, true)
            .await?;
        let resp = self.expect(op, resp, &[200, 206]).await?;
        let len = end - start;
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        // Bytes of the full blob that precede the first byte of this response.
        let mut pos = if partial {
            let cr = resp
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| err(ErrorKind::Protocol("206 without Content-Range".into())))?;
            let (a, b) = parse_content_range(cr)
                .ok_or_else(|| err(ErrorKind::Protocol(format!("bad Content-Range {cr:?}"))))?;
            if a != start {
                return Err(err(ErrorKind::Protocol(format!(
                    "asked for bytes {start}-{}, got {cr:?}",
                    end - 1
                ))));
            }
            if b < end - 1 {
                return Err(err(ErrorKind::RangeNotSatisfiable(format!(
                    "blob ends at byte {b} ({cr:?})"
                ))));
            }
            start
        } else {
            if let Some(total) = content_length(&resp)
                && total < end
            {
                return Err(err(ErrorKind::RangeNotSatisfiable(format!(
                    "blob is only {total} bytes"
                ))));
            }
            0
        };
        let mut out = BytesMut::with_capacity(len.min(64 << 20) as usize);
        // A 200 answer sends the blob from its start: the bytes before `start` count too.
        let mut rd = self.reader(resp, end - pos);
        while (out.len() as u64) < len {
            match rd.next().await {
                Ok(Some(c)) => {
                    let c_end = pos + c.len() as u64;
                    if partial && c_end > end {
                        return Err(err(ErrorKind::Protocol(
                            "206 body longer than the requested range".into(),
                        )));
                    }
                    if c_end > start {
                        let from = start.saturating_sub(pos) as usize;
                        let to = (end.min(c_end) - pos) as usize;
                        out.extend_from_slice(&c[from..to]);
                    }
                    pos = c_end;
                }
                Ok(None) => break,
                Err(ErrorKind::Transport(_)) => break,
                Err(k) => return Err(err(k)),
            }
        }
        if (out.len() as u64) < len {
            return Err(err(ErrorKind::ShortBody {
                expected: len,
                got: out.len() as u64,
            }));
        }
        // A 200 body may continue; dropping the reader closes that connection.
        Ok(out.freeze())
    }

    /// `Some(size)` if the upstream has the blob, `None` if not.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<Option<u64>> {
        validate_digest(digest)?;
        let src = self.upstream(r);
        self.exists_with(r, digest, &src, Access::Pull).await
    }

    async fn exists_with(
        &self,
        r: &Reference,
        digest: &str,
        src: &Source,
        access: Access,
    ) -> Result<Option<u64>> {
        let op = format!("HEAD blob {digest} on {}/{}", src.host, r.repository);
        let mut tries = self.upstream_tries();
        loop {
            match self
                .permitted(self.exists_once(&op, r, digest, src, access))
                .await
            {
                Ok(v) => return Ok(v),
                Err(e) => self.on_failure(&op, e, &mut tries).await?,
            }
        }
    }

    async fn exists_once(
        &self,
        op: &str,
        r: &Reference,
        digest: &str,
        src: &Source,
        access: Access,
    ) -> Result<Option<u64>> {
        let (cx, url) = blob_target(op, src, r, digest, access);
        let resp = self
            .send(&cx, Method::HEAD, url, &[], &Payload::Empty, true)
            .await?;
        match self.expect(op, resp, &[200]).await {
            Ok(resp) => content_length(&resp).map(Some).ok_or_else(|| {
                RegistryError::new(
                    op,
                    ErrorKind::Protocol("HEAD answer without Content-Length".into()),
                )
            }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob from a file unless the registry already has it (POST + monolithic PUT).
    pub async fn push_blob_file(&self, r: &Reference, digest: &str, path: &Path) -> Result<()> {
        validate_digest(digest)?;
        let len = tokio::fs::metadata(path)
            .await
            .map_err(|e| {
                RegistryError::new(
                    format!("push blob {digest} from {}", path.display()),
                    ErrorKind::Io(e),
                )
            })?
            .len();
        self.push(r, digest, Payload::File(path, len)).await
    }

    /// Uploads an in-memory blob unless the registry already has it; the data must hash to
    /// `digest`.
    pub async fn push_blob(&self, r: &Reference, digest: &str, data: Bytes) -> Result<()> {
        validate_digest(digest)?;
        let actual = sha256_digest(&data);
        if actual != digest {
            return Err(RegistryError::new(
                format!("push blob {digest} to {}/{}", r.registry, r.repository),
                ErrorKind::DigestMismatch {
                    expected: digest.to_string(),
                    actual,
                },
            ));
        }
        self.push(r, digest, Payload::Bytes(data)).await
    }

    async fn push(&self, r: &Reference, digest: &str, payload: Payload<'_>) -> Result<()> {
        let src = self.upstream(r);
        if let Some(n) = self.exists_with(r, digest, &src, Access::Push).await? {
            if n == payload.len() {
                debug!(digest, host = %src.host, repo = %r.repository, "blob already present; skipping upload");
                return Ok(());
            }
            warn!(
                digest,
                have = n,
                want = payload.len(),
                "registry has the blob with another size; uploading"
            );
        }
        let op = format!(
            "push blob {digest} ({} bytes) to {}/{}",
            payload.len(),
            src.host,
            r.repository
        );
        let mut tries = self.upstream_tries();
        loop {
            match self
                .permitted(self.push_once(&op, &src, r, digest, &payload))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => self.on_failure(&op, e, &mut tries).await?,
            }
        }
    }

    /// POST to open an upload session, then one monolithic PUT with the digest.
    async fn push_once(
        &self,
        op: &str,
        src: &Source,
        r: &Reference,
        digest: &str,
        payload: &Payload<'_>,
    ) -> Result<()> {
        let cx = Ctx {
            op,
            src,
            repo: &r.repository,
            access: Access::Push,
        };
        let url = format!("{}/v2/{}/blobs/uploads/", src.base(), r.repository);
        let resp = self
            .send(&cx, Method::POST, url.clone(), &[], &Payload::Empty, false)
            .await?;
        let resp = self.expect(op, resp, &[202]).await?;
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                RegistryError::new(
                    op,
                    ErrorKind::Protocol("upload start without Location".into()),
                )
            })?
            .to_string();
        self.drain(resp).await;
        let mut put = resolve(&url, &loc);
        put.push(if put.contains('?') { '&' } else { '?' });
        put.push_str(&format!("digest={}", enc(digest)));
        let hdr = [(CONTENT_TYPE, "application/octet-stream".to_string())];
        let resp = self
            .send(&cx, Method::PUT, put, &hdr, payload, false)
            .await?;
        let resp = self.expect(op, resp, &[201, 204]).await?;
        self.drain(resp).await;
        Ok(())
    }

    /// Uploads a manifest under the reference's digest or tag; returns its sha256 digest.
    pub async fn put_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        body: Bytes,
    ) -> Result<String> {
        let src = self.upstream(r);
        let op = format!(
            "PUT manifest {} to {}/{}",
            r.manifest_ref(),
            src.host,
            r.repository
        );
        let digest = sha256_digest(&body);
        if let Some(want) = &r.digest
            && *want != digest
        {
            return Err(RegistryError::new(
                &op,
                ErrorKind::DigestMismatch {
                    expected: want.clone(),
                    actual: digest,
                },
            ));
        }
        let mut tries = self.upstream_tries();
        loop {
            match self
                .permitted(self.put_manifest_once(&op, &src, r, media_type, &body, &digest))
                .await
            {
                Ok(()) => return Ok(digest),
                Err(e) => self.on_failure(&op, e, &mut tries).await?,
            }
        }
    }

    async fn put_manifest_once(
        &self,
        op: &str,
        src: &Source,
        r: &Reference,
        media_type: &str,
        body: &Bytes,
        digest: &str,
    ) -> Result<()> {
        let cx = Ctx {
            op,
            src,
            repo: &r.repository,
            access: Access::Push,
        };
        let url = format!(
            "{}/v2/{}/manifests/{}",
            src.base(),
            r.repository,
            r.manifest_ref()
        );
        let hdr = [(CONTENT_TYPE, media_type.to_string())];
        let resp = self
            .send(
                &cx,
                Method::PUT,
                url,
                &hdr,
                &Payload::Bytes(body.clone()),
                false,
            )
            .await?;
        let resp = self.expect(op, resp, &[200, 201, 204]).await?;
        let theirs = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        self.drain(resp).await;
        if let Some(t) = theirs
            && t.starts_with("sha256:")
            && t != digest
        {
            return Err(RegistryError::new(
                op,
                ErrorKind::Protocol(format!(
                    "registry stored the manifest as {t}, expected {digest}"
                )),
            ));
        }
        Ok(())
    }
}

/// `bytes A-B/TOTAL` (TOTAL may be `*`) -> (A, B).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (span, _total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a, b))
}

/// A short, single-line excerpt of a registry error body (its JSON `errors` if present).
fn error_detail(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(errs) = v.get("errors").and_then(|e| e.as_array())
    {
        let parts: Vec<String> = errs
            .iter()
            .map(|e| {
                let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
                let msg = e.get("message").and_then(|c| c.as_str()).unwrap_or("");
                format!("{code}: {msg}")
            })
            .collect();
        if !parts.is_empty() {
            return truncate(&parts.join("; "));
        }
    }
    truncate(&String::from_utf8_lossy(body))
}

fn truncate(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    match clean.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &clean[..i]),
        None => clean.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_helpers() {
        assert_eq!(origin("https://Reg.io:5000/v2/x?y"), "https://reg.io:5000");
        assert_eq!(
            resolve(
                "http://a:1/v2/x/blobs/uploads/",
                "/v2/x/blobs/uploads/u?s=1"
            ),
            "http://a:1/v2/x/blobs/uploads/u?s=1"
        );
        assert_eq!(resolve("http://a:1/v2/x", "https://b/y"), "https://b/y");
        assert_eq!(resolve("https://a/v2/x", "//c/z"), "https://c/z");
        assert_eq!(resolve("http://a/v2/x/y?q", "z"), "http://a/v2/x/z");
        assert_eq!(
            enc("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }

    /// A pre-signed redirect target's query is a credential: logs get the URL without it.
    #[test]
    fn logged_urls_leave_out_queries() {
        assert_eq!(
            loggable("https://s3.example/bucket/blob?X-Amz-Signature=abc&X-Amz-Credential=k"),
            "https://s3.example/bucket/blob?…"
        );
        assert_eq!(loggable("https://cdn/x#frag"), "https://cdn/x?…");
        assert_eq!(
            loggable("http://reg:5000/v2/a/blobs/sha256:0"),
            "http://reg:5000/v2/a/blobs/sha256:0"
        );
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5)));
        assert_eq!(parse_content_range("bytes 9-5/10"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Duration::from_millis(100);
        for a in 1..6 {
            let d = backoff(b, a);
            let full = b * (1 << (a - 1));
            assert!(d >= full / 2 && d <= full, "attempt {a}: {d:?}");
        }
        assert!(backoff(b, 40) <= MAX_BACKOFF);
    }

    #[test]
    fn error_detail_excerpt() {
        let d = error_detail(
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#,
        );
        assert_eq!(d, "BLOB_UNKNOWN: blob unknown to registry");
        let long = "x".repeat(1000);
        assert!(error_detail(long.as_bytes()).chars().count() <= 201);
        assert_eq!(error_detail(b"a\nb"), "a b");
    }
}
