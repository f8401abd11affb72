//! OCI distribution client: manifests and blobs for `cora convert` (pull/push) and byte-range
//! blob reads for the lazy chunk source.
//!
//! Why hyper + rustls rather than `oci-client`: the lazy source lives on small HTTP range
//! reads, so this layer must own exactly the parts a generic OCI crate hides —
//! * range requests with exact-length enforcement (and handling of servers that ignore
//!   `Range` and answer 200 with the whole blob),
//! * retries with backoff on 5xx/429/resets/stalls/short bodies, with a stall timeout on the
//!   body and not only on the headers,
//! * one pooled connection set (HTTP/1.1 keep-alive or HTTP/2 via ALPN) shared by all
//!   requests, with bounded concurrency,
//! * redirects followed by hand so `Authorization` is dropped when the origin changes,
//! * mirrors tried before the upstream, proxies (absolute-form and CONNECT) and
//!   `insecure_hosts` decided per host, and counters for the benchmarks.
//!
//! Retry budget: an upstream operation makes at most `max_retries + 1` attempts; each attempt
//! is bounded by `request_timeout` for connect + response headers and by `request_timeout`
//! per gap between body frames. Backoff between attempts starts at `retry_backoff`, doubles,
//! is capped at 10 s, and is jittered to 50–100 % of its value. Mirrors get one attempt each.
//!
//! Range reads: a 206 must carry exactly the requested `Content-Range`; a 200 (range ignored)
//! is accepted by streaming the body, keeping the requested slice and dropping the connection
//! once the slice is complete. Either way the result has exactly the requested length or the
//! attempt fails (and is retried).
mod auth;
mod client;
mod config;
mod connect;
mod error;
mod proxy;
mod reference;
mod stats;

pub use client::{Client, MANIFEST_MEDIA_TYPES, Manifest, sha256_digest};
pub use config::{ClientConfig, Mirror, ProxyConfig};
pub use error::{ErrorKind, RegistryError, Result};
pub use reference::{Reference, validate_digest};
pub use stats::FetchStats;
