//! The client's overall body deadline against a registry that drips its answer. In a test
//! binary of its own: `registry.rs` captures logs with a scoped tracing subscriber, and a test
//! hitting the client's log call sites on another thread at the same moment can leave them
//! cached as uninteresting there (tracing's call-site interest is process-wide).
use cora_tests::http_server::serve_loopback;
use lazy::registry::{Client, ClientConfig, ErrorKind, Reference};
use std::time::{Duration, Instant};

fn sha(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(data))
    )
}

/// A server that never stalls long enough to trip the stall timeout but sends a byte every
/// 100 ms: the read still ends, within one timeout plus the body at the minimum rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_drip_body_cannot_hold_a_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let len: u64 = 64 * 1024;
    let (addr, server) = serve_loopback(move |mut tcp| async move {
        let mut head = vec![0u8; 4096];
        let _ = tcp.read(&mut head).await;
        let hdr = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{}/{len}\r\nContent-Length: {len}\r\n\r\n",
            len - 1
        );
        if tcp.write_all(hdr.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..len {
            if tcp.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    let host = addr.to_string();
    let client = Client::new(ClientConfig {
        insecure_hosts: vec![host.clone()],
        request_timeout: Duration::from_millis(500),
        max_retries: 0,
        ..ClientConfig::default()
    })
    .unwrap();
    let r: Reference = format!("{host}/drip/app:v1").parse().unwrap();
    let t = Instant::now();
    let e = client
        .get_blob_range(&r, &sha(b"drip"), 0..len)
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert!(matches!(e.kind(), ErrorKind::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("too slow overall"), "{e}");
    // Allowance: 0.5 s + 64 KiB at 64 KiB/s = 1.5 s; the drip alone would take 109 minutes.
    assert!(took < Duration::from_secs(10), "{took:?}");
    server.abort();
}
