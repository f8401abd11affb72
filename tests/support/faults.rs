//! A fault-injecting HTTP/1.1 reverse proxy for tests: put it between a client and a
//! registry, then tell it what to break.
//!
//! ```no_run
//! # async fn f(reg: cora_tests::registry::Registry) -> anyhow::Result<()> {
//! use cora_tests::faults::{Fault, FaultProxy};
//! let proxy = FaultProxy::start(reg.addr).await?;      // client talks to proxy.host
//! proxy.inject("/blobs/sha256:", Fault::Status(500), 2); // next 2 blob requests get 500
//! proxy.inject("/blobs/", Fault::Reset, 1);             // then one connection reset
//! assert_eq!(proxy.count("/blobs/"), 0);
//! # Ok(()) }
//! ```
//! Rules are consumed in order: a request takes the first rule whose path substring matches
//! and that has uses left; with no rule it passes through untouched. The `Host` header is
//! forwarded unchanged so the registry's upload `Location`s point back at the proxy.
use crate::http_server::serve_loopback;
use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;

/// What to do to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Wait this long before forwarding (delays the response headers).
    Delay(Duration),
    /// Abort the TCP connection with RST instead of answering.
    Reset,
    /// Answer with this status and a JSON error body, without asking the upstream.
    Status(u16),
    /// Send the upstream's headers (original Content-Length) but only the first N body bytes,
    /// then close the connection.
    Truncate(usize),
    /// Send headers and the first N body bytes, then stall forever with the connection open.
    StallBody(usize),
    /// Invert the body byte at this offset (the last byte if the body is shorter).
    FlipByte(usize),
}

/// One request as seen by the proxy.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub fault: Fault,
}

struct Rule {
    path_contains: String,
    fault: Fault,
    remaining: usize,
}

#[derive(Default)]
struct State {
    rules: VecDeque<Rule>,
    seen: Vec<Seen>,
}

/// The running proxy; stops (and drops its connections) on drop.
pub struct FaultProxy {
    pub addr: SocketAddr,
    /// `127.0.0.1:PORT`, to use as the registry host in references.
    pub host: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (plain HTTP).
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let state = Arc::new(Mutex::new(State::default()));
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let st = state.clone();
        let (addr, task) =
            serve_loopback(move |tcp| serve_conn(tcp, st.clone(), client.clone(), upstream))
                .await?;
        Ok(FaultProxy {
            addr,
            host: addr.to_string(),
            state,
            task,
        })
    }

    /// Apply `fault` to the next `times` requests whose path contains `path_contains`
    /// (`""` matches everything).
    pub fn inject(&self, path_contains: &str, fault: Fault, times: usize) {
        self.lock().rules.push_back(Rule {
            path_contains: path_contains.into(),
            fault,
            remaining: times,
        });
    }

    /// Drops all pending rules: everything passes from now on.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Requests seen whose path contains `path_contains`.
    pub fn count(&self, path_contains: &str) -> usize {
        self.lock()
            .seen
            .iter()
            .filter(|s| s.path.contains(path_contains))
            .count()
    }

    /// Rules with uses left.
    pub fn pending(&self) -> usize {
        self.lock().rules.iter().map(|r| r.remaining).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    state: Arc<Mutex<State>>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: SocketAddr,
) {
    let fd = tcp.as_raw_fd();
    let reset = Arc::new(Notify::new());
    let r2 = reset.clone();
    let svc =
        service_fn(move |req| handle(req, state.clone(), client.clone(), upstream, r2.clone()));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
    tokio::select! {
        _ = conn => {}
        _ = reset.notified() => {
            // SAFETY: `fd` belongs to the stream inside `conn`, which is still alive here
            // (it is dropped when this select returns), so the descriptor is open.
            let b = unsafe { BorrowedFd::borrow_raw(fd) };
            // Linger 0 turns the close into an RST.
            let _ = socket2::SockRef::from(&b).set_linger(Some(Duration::ZERO));
        }
    }
}

fn take_fault(state: &Mutex<State>, method: &str, path: &str) -> Fault {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let mut fault = Fault::Pass;
    if let Some(rule) = st
        .rules
        .iter_mut()
        .find(|r| r.remaining > 0 && path.contains(&r.path_contains))
    {
        rule.remaining -= 1;
        fault = rule.fault.clone();
    }
    st.rules.retain(|r| r.remaining > 0);
    st.seen.push(Seen {
        method: method.into(),
        path: path.into(),
        fault: fault.clone(),
    });
    fault
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: SocketAddr,
    reset: Arc<Notify>,
) -> Result<Response<FaultBody>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let method = req.method().clone();
    let fault = take_fault(&state, method.as_str(), &path);
    match &fault {
        Fault::Reset => {
            reset.notify_one();
            std::future::pending::<()>().await;
        }
        Fault::Status(code) => {
            let body =
                Bytes::from_static(br#"{"errors":[{"code":"INJECTED","message":"fault proxy"}]}"#);
            let mut resp = Response::new(FaultBody::new(body, End::Clean));
            *resp.status_mut() =
                StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok(resp);
        }
        Fault::Delay(d) => tokio::time::sleep(*d).await,
        _ => {}
    }
    let (mut parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(bad_gateway("reading request body")),
    };
    let Ok(uri) = format!("http://{upstream}{path}").parse() else {
        return Ok(bad_gateway("bad URI"));
    };
    parts.uri = uri;
    let up = match client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    {
        Ok(r) => r,
        Err(_) => return Ok(bad_gateway("upstream unreachable")),
    };
    let (mut parts, body) = up.into_parts();
    let mut data = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => return Ok(bad_gateway("reading upstream body")),
    };
    parts.headers.remove(http::header::TRANSFER_ENCODING);
    if method != http::Method::HEAD {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, data.len().into());
    }
    let body = match fault {
        Fault::Truncate(n) => {
            data.truncate(n);
            FaultBody::new(data.into(), End::Error)
        }
        Fault::StallBody(n) => {
            data.truncate(n);
            FaultBody::new(data.into(), End::Hang)
        }
        Fault::FlipByte(at) => {
            if !data.is_empty() {
                let i = at.min(data.len() - 1);
                data[i] ^= 0xff;
            }
            FaultBody::new(data.into(), End::Clean)
        }
        _ => FaultBody::new(data.into(), End::Clean),
    };
    Ok(Response::from_parts(parts, body))
}

fn bad_gateway(why: &'static str) -> Response<FaultBody> {
    let mut r = Response::new(FaultBody::new(
        Bytes::from_static(why.as_bytes()),
        End::Clean,
    ));
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

enum End {
    Clean,
    Error,
    Hang,
}

/// Response body that can end cleanly, with an error (connection aborted), or never.
pub struct FaultBody {
    data: Option<Bytes>,
    end: End,
}

impl FaultBody {
    fn new(data: Bytes, end: End) -> Self {
        FaultBody {
            data: (!data.is_empty()).then_some(data),
            end,
        }
    }
}

impl Body for FaultBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        match this.end {
            End::Clean => Poll::Ready(None),
            End::Error => Poll::Ready(Some(Err(std::io::Error::other("injected truncation")))),
            // Never woken: the connection stays open with no more data.
            End::Hang => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && matches!(self.end, End::Clean)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.data, &self.end) {
            (d, End::Clean) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}
