//! Counters shared by the client and its connector.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A snapshot of [`super::Client`] counters since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// HTTP requests sent (token requests and redirect hops included).
    pub requests: u64,
    /// Response body bytes received.
    pub bytes_received: u64,
    /// Attempts repeated after a transient failure.
    pub retries: u64,
    /// Failed attempts (each retried or final failure, mirrors included).
    pub errors: u64,
    /// TCP connections opened (a low number relative to `requests` shows reuse).
    pub connections: u64,
    /// Responses that arrived over HTTP/2.
    pub http2_responses: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatsInner {
    requests: AtomicU64,
    bytes: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    connections: AtomicU64,
    h2: AtomicU64,
}

impl StatsInner {
    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }
    pub fn bytes(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Relaxed);
    }
    pub fn retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    pub fn connection(&self) {
        self.connections.fetch_add(1, Relaxed);
    }
    pub fn h2(&self) {
        self.h2.fetch_add(1, Relaxed);
    }
    pub fn snapshot(&self) -> FetchStats {
        FetchStats {
            requests: self.requests.load(Relaxed),
            bytes_received: self.bytes.load(Relaxed),
            retries: self.retries.load(Relaxed),
            errors: self.errors.load(Relaxed),
            connections: self.connections.load(Relaxed),
            http2_responses: self.h2.load(Relaxed),
        }
    }
}
