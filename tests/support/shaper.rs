//! A network link on loopback for benchmarks: a TCP relay in front of a server that adds a
//! set round-trip time and caps the bandwidth of each direction. The cap is shared by every
//! connection through the relay, as one uplink to a registry is shared by everything a host
//! pulls. User space because this kernel has TBF but no netem.
//!
//! Model: a byte read from one side is written to the other one half RTT later, after the
//! bytes queued before it in that direction have drained at the link's rate. A new
//! connection pays one extra RTT before its first request goes out (the TCP handshake).
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Round-trip time and per-direction bandwidth of a link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkProfile {
    pub name: &'static str,
    pub rtt: Duration,
    /// Bytes per second in each direction.
    pub bandwidth: u64,
}

/// A data-centre network: 1 ms RTT, 1 GB/s.
pub const LAN: LinkProfile = LinkProfile {
    name: "lan",
    rtt: Duration::from_millis(1),
    bandwidth: 1_000_000_000,
};

/// A registry in another region or behind a busy uplink: 25 ms RTT, 50 MB/s.
pub const WAN: LinkProfile = LinkProfile {
    name: "wan",
    rtt: Duration::from_millis(25),
    bandwidth: 50_000_000,
};

impl LinkProfile {
    pub fn by_name(name: &str) -> Option<LinkProfile> {
        [LAN, WAN].into_iter().find(|p| p.name == name)
    }

    /// `25 ms RTT, 50 MB/s`.
    pub fn describe(&self) -> String {
        format!(
            "{} ms RTT, {} MB/s each way",
            self.rtt.as_secs_f64() * 1e3,
            self.bandwidth / 1_000_000
        )
    }
}

/// One direction of the link: when its queue drains, and what crossed it.
struct Direction {
    free_at: Mutex<Instant>,
    bandwidth: u64,
    bytes: AtomicU64,
}

impl Direction {
    fn new(bandwidth: u64) -> Direction {
        Direction {
            free_at: Mutex::new(Instant::now()),
            bandwidth: bandwidth.max(1),
            bytes: AtomicU64::new(0),
        }
    }

    /// Queue `n` bytes behind what is already queued; returns when they have drained.
    fn transmit(&self, n: usize) -> Instant {
        let took = Duration::from_secs_f64(n as f64 / self.bandwidth as f64);
        let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*free_at).max(Instant::now());
        *free_at = start + took;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        *free_at
    }
}

/// A running shaped link: connect to `addr` to reach the upstream server.
pub struct ShapedLink {
    pub addr: SocketAddr,
    pub profile: LinkProfile,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
    down: Arc<Direction>,
    up: Arc<Direction>,
}

impl ShapedLink {
    /// Listens on an ephemeral loopback port and relays every connection to `upstream`.
    pub fn start(upstream: SocketAddr, profile: LinkProfile) -> io::Result<ShapedLink> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let down = Arc::new(Direction::new(profile.bandwidth));
        let up = Arc::new(Direction::new(profile.bandwidth));
        let accept = {
            let (stop, conns, down, up) = (stop.clone(), conns.clone(), down.clone(), up.clone());
            std::thread::Builder::new()
                .name("shaper-accept".into())
                .spawn(move || {
                    for client in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let Ok(client) = client else { continue };
                        if let Err(e) = relay(client, upstream, profile, &conns, &down, &up) {
                            tracing::warn!(error = %e, "shaped link: could not relay a connection");
                        }
                    }
                })?
        };
        Ok(ShapedLink {
            addr,
            profile,
            stop,
            conns,
            accept: Some(accept),
            down,
            up,
        })
    }

    /// Bytes relayed from the server to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.down.bytes.load(Ordering::Relaxed)
    }

    /// Bytes relayed from clients to the server so far.
    pub fn bytes_up(&self) -> u64 {
        self.up.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop, then end every relayed connection (their threads exit).
        let _ = TcpStream::connect(self.addr);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

type Segment = Option<(Instant, Vec<u8>)>;

fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    profile: LinkProfile,
    conns: &Mutex<Vec<TcpStream>>,
    down: &Arc<Direction>,
    up: &Arc<Direction>,
) -> io::Result<()> {
    let accepted = Instant::now();
    let server = TcpStream::connect(upstream)?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    {
        let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
        // Forget connections both of whose sides are closed.
        c.retain(|s| s.peer_addr().is_ok());
        c.push(client.try_clone()?);
        c.push(server.try_clone()?);
    }
    let one_way = profile.rtt / 2;
    let handshake_done = accepted + profile.rtt;
    pipe(
        client.try_clone()?,
        server.try_clone()?,
        up.clone(),
        one_way,
        handshake_done,
    )?;
    pipe(server, client, down.clone(), one_way, accepted)?;
    Ok(())
}

/// Relays `from` → `to` through `dir`: a reader thread timestamps what arrives, a writer
/// thread delivers it one-way-delay later at the direction's rate.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    dir: Arc<Direction>,
    one_way: Duration,
    not_before: Instant,
) -> io::Result<()> {
    // Bounded: a fast sender is held back by TCP once ~4 MiB wait in the relay.
    let (tx, rx): (SyncSender<Segment>, Receiver<Segment>) = sync_channel(256);
    std::thread::Builder::new()
        .name("shaper-read".into())
        .spawn(move || {
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Some((Instant::now(), buf[..n].to_vec()))).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = tx.send(None);
        })?;
    std::thread::Builder::new()
        .name("shaper-write".into())
        .spawn(move || {
            while let Ok(Some((arrived, bytes))) = rx.recv() {
                sleep_until(arrived.max(not_before) + one_way);
                sleep_until(dir.transmit(bytes.len()));
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })?;
    Ok(())
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo-like server: answers each connection with `n` bytes after reading one byte.
    fn server(n: usize) -> (SocketAddr, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&vec![7u8; n]);
                }
            }
        });
        (addr, h)
    }

    #[test]
    fn a_request_pays_the_round_trips_and_the_bandwidth() {
        let n = 2_000_000;
        let (addr, h) = server(n);
        let profile = LinkProfile {
            name: "test",
            rtt: Duration::from_millis(40),
            bandwidth: 20_000_000,
        };
        let link = ShapedLink::start(addr, profile).unwrap();
        let t = Instant::now();
        let mut c = TcpStream::connect(link.addr).unwrap();
        c.write_all(b"?").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        let took = t.elapsed();
        h.join().unwrap();
        assert_eq!(got.len(), n);
        assert!(got.iter().all(|&b| b == 7));
        // Handshake + request/response round trip + 2 MB at 20 MB/s = 80 + 100 ms.
        let floor = Duration::from_millis(175);
        assert!(took >= floor, "took {took:?}, less than the link allows");
        // Only a loose upper bound: a loaded machine may add its own delays.
        assert!(
            took < floor * 10,
            "took {took:?}, far more than the link costs"
        );
        assert_eq!(link.bytes_down(), n as u64);
        assert_eq!(link.bytes_up(), 1);
    }
}
