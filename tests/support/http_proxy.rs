//! A tiny forward proxy (what `HTTP_PROXY`/`HTTPS_PROXY` point at): `CONNECT host:port`
//! tunnels and absolute-form plain-HTTP requests. It records the first request line of each
//! client connection, then relays bytes both ways.
use crate::http_server::serve_loopback;
use anyhow::Result;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct ForwardProxy {
    pub addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ForwardProxy {
    pub async fn start() -> Result<ForwardProxy> {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        let (addr, task) = serve_loopback(move |tcp| relay(tcp, l2.clone())).await?;
        Ok(ForwardProxy { addr, lines, task })
    }

    /// `http://127.0.0.1:PORT`, for the proxy environment variables.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// First request line of every connection, e.g. `CONNECT 127.0.0.1:5000 HTTP/1.1` or
    /// `GET http://127.0.0.1:5000/v2/ HTTP/1.1`.
    pub fn request_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for ForwardProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(mut client: TcpStream, lines: Arc<Mutex<Vec<String>>>) -> Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let line = text.lines().next().unwrap_or("").to_string();
    lines
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(line.clone());
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method == "CONNECT" {
        let mut up = match TcpStream::connect(target).await {
            Ok(s) => s,
            Err(_) => {
                client
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                    .await?;
                return Ok(());
            }
        };
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        return Ok(());
    }
    // Absolute form: http://host:port/path. Origin servers must accept it, so forward as is.
    let authority = target
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    let Ok(mut up) = TcpStream::connect(authority).await else {
        client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    up.write_all(&head).await?;
    tokio::io::copy_bidirectional(&mut client, &mut up).await?;
    Ok(())
}
