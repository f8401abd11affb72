//! Prometheus text exposition on 127.0.0.1:`port` at `uriPrefix`, served by a tiny tokio TCP
//! server (one GET per connection) so no HTTP framework is pulled in for a single page.
use crate::remote::DriverStats;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// RPC names, in the order of the counters in [`Metrics`].
pub const RPCS: [&str; 10] = [
    "Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update", "List", "Usage", "Cleanup",
];

/// Counters and gauges of the snapshotter itself; the lazy-serving ones come from the drivers
/// (see [`crate::remote::RemoteLayers::stats`]) at scrape time.
#[derive(Debug, Default)]
pub struct Metrics {
    rpc_total: [AtomicU64; 10],
    rpc_errors: [AtomicU64; 10],
    /// Layer stacks currently attached (ublk or FUSE devices, or unpacked fallbacks).
    pub devices: AtomicI64,
}

/// Snapshot counts by kind, taken from the store at scrape time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotCounts {
    pub active: u64,
    pub view: u64,
    pub committed: u64,
    pub remote: u64,
}

impl Metrics {
    pub fn rpc(&self, name: &str, ok: bool) {
        if let Some(i) = RPCS.iter().position(|r| *r == name) {
            self.rpc_total[i].fetch_add(1, Relaxed);
            if !ok {
                self.rpc_errors[i].fetch_add(1, Relaxed);
            }
        }
    }

    pub fn rpc_count(&self, name: &str) -> (u64, u64) {
        RPCS.iter()
            .position(|r| *r == name)
            .map(|i| {
                (
                    self.rpc_total[i].load(Relaxed),
                    self.rpc_errors[i].load(Relaxed),
                )
            })
            .unwrap_or((0, 0))
    }

    /// The Prometheus text format (version 0.0.4).
    pub fn render(&self, counts: SnapshotCounts, lazy: &DriverStats) -> String {
        let mut s = String::new();
        s.push_str("# HELP cora_snapshots Snapshots in the metadata store by kind.\n");
        s.push_str("# TYPE cora_snapshots gauge\n");
        for (kind, n) in [
            ("active", counts.active),
            ("view", counts.view),
            ("committed", counts.committed),
            ("remote", counts.remote),
        ] {
            let _ = writeln!(s, "cora_snapshots{{kind=\"{kind}\"}} {n}");
        }
        s.push_str("# HELP cora_snapshotter_rpc_total Snapshots RPCs handled.\n");
        s.push_str("# TYPE cora_snapshotter_rpc_total counter\n");
        for (i, name) in RPCS.iter().enumerate() {
            let _ = writeln!(
                s,
                "cora_snapshotter_rpc_total{{method=\"{name}\"}} {}",
                self.rpc_total[i].load(Relaxed)
            );
        }
        s.push_str(
            "# HELP cora_snapshotter_rpc_errors_total Snapshots RPCs that returned an error.\n",
        );
        s.push_str("# TYPE cora_snapshotter_rpc_errors_total counter\n");
        for (i, name) in RPCS.iter().enumerate() {
            let _ = writeln!(
                s,
                "cora_snapshotter_rpc_errors_total{{method=\"{name}\"}} {}",
                self.rpc_errors[i].load(Relaxed)
            );
        }
        let simple = [
            (
                "cora_devices",
                "gauge",
                "Attached layer stacks (ublk or FUSE devices, or unpacked fallbacks).",
                self.devices.load(Relaxed) as f64,
            ),
            (
                "cora_cache_hits_total",
                "counter",
                "Chunk reads served from the local cache.",
                lazy.hits as f64,
            ),
            (
                "cora_cache_misses_total",
                "counter",
                "Chunks fetched from the registry.",
                lazy.misses as f64,
            ),
            (
                "cora_bytes_fetched_total",
                "counter",
                "Compressed bytes fetched from the registry.",
                lazy.fetched_bytes as f64,
            ),
            (
                "cora_fetch_requests_total",
                "counter",
                "Range requests made to the registry.",
                lazy.requests as f64,
            ),
            (
                "cora_fetch_errors_total",
                "counter",
                "Range requests to the registry that failed.",
                lazy.fetch_errors as f64,
            ),
            (
                "cora_corrupt_chunks_total",
                "counter",
                "Fetched chunks that failed verification.",
                lazy.corrupt as f64,
            ),
            (
                "cora_readahead_chunks_total",
                "counter",
                "Chunks fetched by sequential read-ahead (part of the misses).",
                lazy.readahead as f64,
            ),
            (
                "cora_prefetched_chunks_total",
                "counter",
                "Chunks fetched by access-trace prefetch (part of the misses).",
                lazy.prefetched as f64,
            ),
            (
                "cora_fetch_worker_panics_total",
                "counter",
                "Fetch jobs that panicked (their reads failed; the worker lived on).",
                lazy.worker_panics as f64,
            ),
            (
                "cora_read_stalls_total",
                "counter",
                "Reads that waited for a registry fetch.",
                lazy.stalls as f64,
            ),
            (
                "cora_read_stall_seconds_total",
                "counter",
                "Seconds reads waited for registry fetches, summed.",
                lazy.stall_seconds,
            ),
        ];
        for (name, ty, help, v) in simple {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {v}");
        }
        s.push_str("# HELP cora_fetch_seconds Registry chunk fetch latency.\n");
        s.push_str("# TYPE cora_fetch_seconds histogram\n");
        let h = &lazy.fetch_seconds;
        let mut cumulative = 0;
        for (i, le) in h.le.iter().enumerate() {
            cumulative += h.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(s, "cora_fetch_seconds_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let count = h.counts.iter().sum::<u64>();
        let _ = writeln!(s, "cora_fetch_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(s, "cora_fetch_seconds_sum {}", h.sum_seconds);
        let _ = writeln!(s, "cora_fetch_seconds_count {count}");
        s
    }
}

/// Scrapes served at once; more connections wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection that has not sent its request head (or taken its reply) by then is dropped:
/// a client that trickles bytes or never reads holds no task for long.
pub const CONNECTION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `render()` output at `uri_prefix` until the listener's task is dropped.
pub async fn serve<F>(listener: TcpListener, uri_prefix: String, render: F)
where
    F: Fn() -> String + Send + Sync + Clone + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of file descriptors, typically: retrying at once would spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        let prefix = uri_prefix.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ =
                tokio::time::timeout(CONNECTION_DEADLINE, answer(&mut conn, &prefix, render)).await;
        });
    }
}

async fn answer<F: Fn() -> String>(
    conn: &mut tokio::net::TcpStream,
    prefix: &str,
    render: F,
) -> std::io::Result<()> {
    // Only the request line matters; 8 KiB is far more than any scraper sends.
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        match conn.read(&mut buf[len..]).await? {
            0 => break,
            n => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, body) = if method == "GET" && path == prefix {
        ("200 OK", render())
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use cora_api::driver::LatencyHistogram;

    #[test]
    fn render_counts_and_histogram() {
        let m = Metrics::default();
        m.rpc("Prepare", true);
        m.rpc("Prepare", false);
        m.devices.store(2, Relaxed);
        let lazy = DriverStats {
            hits: 7,
            fetched_bytes: 150,
            fetch_errors: 1,
            readahead: 4,
            prefetched: 5,
            fetch_seconds: LatencyHistogram {
                le: vec![0.0025, 0.005],
                counts: vec![0, 1, 1],
                sum_seconds: 2.003,
                count: 2,
            },
            ..Default::default()
        };
        let text = m.render(
            SnapshotCounts {
                active: 1,
                committed: 3,
                ..Default::default()
            },
            &lazy,
        );
        assert!(
            text.contains("cora_snapshots{kind=\"committed\"} 3"),
            "{text}"
        );
        assert!(text.contains("cora_snapshotter_rpc_total{method=\"Prepare\"} 2"));
        assert!(text.contains("cora_snapshotter_rpc_errors_total{method=\"Prepare\"} 1"));
        assert!(text.contains("cora_bytes_fetched_total 150"));
        assert!(text.contains("cora_devices 2"));
        assert!(text.contains("cora_cache_hits_total 7"));
        assert!(text.contains("cora_fetch_errors_total 1"));
        assert!(text.contains("cora_readahead_chunks_total 4"));
        assert!(text.contains("cora_prefetched_chunks_total 5"));
        assert!(text.contains("cora_fetch_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("cora_fetch_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("cora_fetch_seconds_bucket{le=\"+Inf\"} 2"));
    }

    /// Clients that connect and send nothing hold every slot; they are dropped at the
    /// deadline and a real scrape is then answered (without the deadline it waits forever).
    #[tokio::test(flavor = "current_thread")]
    async fn silent_clients_do_not_starve_a_scrape() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, "/metrics".into(), || "up 1\n".into()));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let scrape = async {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            out
        };
        let out = tokio::time::timeout(CONNECTION_DEADLINE * 4, scrape)
            .await
            .expect("scrape starved by idle connections");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(out.ends_with("up 1\n"), "{out}");
        server.abort();
    }
}
