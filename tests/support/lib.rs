//! Helpers shared by the integration tests: services started and stopped by PID.
//!
//! * [`registry`]: Debian's `docker-registry` (plain, TLS + htpasswd, pull-through mirror).
//! * [`tls`]: a throw-away CA and server certificate made with `openssl`.
//! * [`faults`]: a fault-injecting reverse proxy (delay, reset, truncate, 5xx, bit flips).
//! * [`http_proxy`]: a forward proxy (CONNECT + absolute-form) for proxy-env tests.
//! * [`http_server`]: a scripted HTTP server for auth/redirect corner cases.
//! * [`hostile`]: a registry from memory serving crafted images and lying bodies.
//! * [`cold`]: a file source whose reads miss first (the transports' miss path).
//! * [`shaper`]: a TCP relay with a set RTT and bandwidth (link profiles for benchmarks).
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

pub mod bench;
pub mod cold;
pub mod faults;
pub mod fixtures;
pub mod hostile;
pub mod http_proxy;
pub mod http_server;
pub mod registry;
pub mod shaper;
pub mod tls;

/// A loopback TCP port held for a server we start: bound (with SO_REUSEADDR) but not
/// listening, so the kernel gives it to no one else, while a server that also sets
/// SO_REUSEADDR (Go's `net.Listen`, tokio's listeners) can still bind and listen on it. Keep
/// it until that server listens; connecting to it meanwhile is refused, which also makes it a
/// "dead" address for tests.
pub struct PortReservation {
    _socket: socket2::Socket,
    pub port: u16,
}

/// Whether the running kernel is at least `major.minor` (from /proc/sys/kernel/osrelease).
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0)) >= (major, minor)
}

/// One `GET path` to 127.0.0.1:`port` (HTTP/1.1, the server closes): the whole response.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub fn reserve_port() -> Result<PortReservation> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let port = socket
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .ok_or_else(|| anyhow::anyhow!("reserved socket has no inet address"))?;
    Ok(PortReservation {
        _socket: socket,
        port,
    })
}

/// Polls `cond` every 50 ms until it returns `Ok(true)`, an error, or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod images;
pub mod nydus;
pub mod snapshotter;
