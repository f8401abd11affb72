//! A scripted HTTP/1.1 server for protocol corner cases a real registry will not produce
//! (bearer token realms, cross-host redirects). The handler sees each request and its
//! recorded headers; every request is logged for assertions.
use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A request as the handler and the log see it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    /// Path and query.
    pub path: String,
    pub headers: HeaderMap,
}

/// Binds a free loopback port and serves every connection with `serve`, each on a task of its
/// own, until the returned task is aborted (which aborts every connection with it).
pub async fn serve_loopback<F, Fut>(serve: F) -> Result<(SocketAddr, JoinHandle<()>)>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Owning the JoinSet here means aborting this task aborts every connection.
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                acc = listener.accept() => {
                    let Ok((tcp, _)) = acc else { continue };
                    conns.spawn(serve(tcp));
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    });
    Ok((addr, task))
}

type Handler = dyn Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync;

pub struct HttpServer {
    pub addr: SocketAddr,
    /// `127.0.0.1:PORT`.
    pub host: String,
    log: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(
        handler: impl Fn(&Recorded) -> Response<Full<Bytes>> + Send + Sync + 'static,
    ) -> Result<HttpServer> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let l2 = log.clone();
        let (addr, task) = serve_loopback(move |tcp| {
            let (h, l) = (handler.clone(), l2.clone());
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (h, l) = (h.clone(), l.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let _ = body.collect().await;
                    let rec = Recorded {
                        method: parts.method,
                        path: parts
                            .uri
                            .path_and_query()
                            .map_or("/".into(), |p| p.to_string()),
                        headers: parts.headers,
                    };
                    let resp = h(&rec);
                    l.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
                    Ok::<_, Infallible>(resp)
                }
            });
            async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            }
        })
        .await?;
        Ok(HttpServer {
            addr,
            host: addr.to_string(),
            log,
            task,
        })
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A response with `status`, headers and body.
pub fn respond(
    status: u16,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"bad test response"))))
}
