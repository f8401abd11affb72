//! Helpers shared by the integration tests: services started and stopped by PID.
//!
//! * [`registry`]: Debian's `docker-registry` (plain, TLS + htpasswd, pull-through mirror).
//! * [`tls`]: a throw-away CA and server certificate made with `openssl`.
//! * [`faults`]: a fault-injecting reverse proxy (delay, reset, truncate, 5xx, bit flips).
//! * [`http_proxy`]: a forward proxy (CONNECT + absolute-form) for proxy-env tests.
//! * [`http_server`]: a scripted HTTP server for auth/redirect corner cases.
//! * [`cold`]: a file source whose reads miss first (the transports' miss path).
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

pub mod bench;
pub mod cold;
pub mod faults;
pub mod fixtures;
pub mod http_proxy;
pub mod http_server;
pub mod registry;
pub mod tls;

/// A loopback TCP port that was free a moment ago (bind :0, read, release).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
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
pub mod snapshotter;
