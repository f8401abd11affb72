//! Errors of the registry client. Every error names the operation (host, repository, digest,
//! range) it belongs to; none ever carries a credential, token or `Authorization` header.
use std::fmt;
use std::time::Duration;

/// An error from [`super::Client`]: what was being done (`op`) and why it failed (`kind`).
#[derive(Debug)]
pub struct RegistryError {
    op: String,
    kind: ErrorKind,
    attempts: u32,
}

/// Why a registry operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ErrorKind {
    /// An image reference string could not be parsed.
    InvalidReference(String),
    /// A digest is not `sha256:` followed by 64 lowercase hex digits.
    InvalidDigest(String),
    /// Bad client configuration (CA file, credentials file, proxy URL, ...).
    Config(String),
    /// Local file I/O.
    Io(std::io::Error),
    /// The registry answered with an unexpected HTTP status.
    Status {
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    /// HTTP 404: the manifest, blob or repository does not exist.
    NotFound,
    /// HTTP 416 or a range beyond the end of the blob.
    RangeNotSatisfiable(String),
    /// Authentication was refused or the token server failed.
    Unauthorized(String),
    /// TCP connect (or proxy tunnel) failed.
    Connect(String),
    /// TLS handshake or certificate verification failed. Not retried.
    Tls(String),
    /// The connection broke while sending or receiving (reset, early close, HTTP/2 error).
    Transport(String),
    /// No progress within the timeout; `phase` says where (response headers or body).
    Timeout {
        phase: &'static str,
        after: Duration,
    },
    /// The body ended before the announced or requested length.
    ShortBody { expected: u64, got: u64 },
    /// Content does not hash to the requested digest.
    DigestMismatch { expected: String, actual: String },
    /// The server broke the protocol (bad header, body longer than announced, ...).
    Protocol(String),
}

impl RegistryError {
    pub(crate) fn new(op: impl Into<String>, kind: ErrorKind) -> Self {
        RegistryError {
            op: op.into(),
            kind,
            attempts: 1,
        }
    }

    pub(crate) fn with_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// The operation that failed, e.g. `GET blob sha256:… bytes 0..4096 from host/repo`.
    pub fn op(&self) -> &str {
        &self.op
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// How many attempts were made before giving up.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self.kind, ErrorKind::NotFound)
    }

    /// Transient failures worth another attempt: 5xx, 408, 429, broken connections,
    /// stalls, short bodies and corrupted content. Auth, TLS and 4xx errors are final.
    pub fn is_retryable(&self) -> bool {
        match &self.kind {
            ErrorKind::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            ErrorKind::Connect(_)
            | ErrorKind::Transport(_)
            | ErrorKind::Timeout { .. }
            | ErrorKind::ShortBody { .. }
            | ErrorKind::DigestMismatch { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn retry_after(&self) -> Option<Duration> {
        match &self.kind {
            ErrorKind::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.kind)?;
        if self.attempts > 1 {
            write!(f, " (gave up after {} attempts)", self.attempts)?;
        }
        Ok(())
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::InvalidReference(m) => write!(f, "invalid image reference: {m}"),
            ErrorKind::InvalidDigest(d) => {
                write!(
                    f,
                    "invalid digest {d:?}: expected sha256:<64 lowercase hex digits>"
                )
            }
            ErrorKind::Config(m) => write!(f, "configuration: {m}"),
            ErrorKind::Io(e) => write!(f, "I/O: {e}"),
            ErrorKind::Status { status, detail, .. } => {
                write!(f, "HTTP {status}")?;
                if !detail.is_empty() {
                    write!(f, ": {detail}")?;
                }
                Ok(())
            }
            ErrorKind::NotFound => write!(f, "not found (HTTP 404)"),
            ErrorKind::RangeNotSatisfiable(m) => write!(f, "range not satisfiable: {m}"),
            ErrorKind::Unauthorized(m) => write!(f, "authentication failed: {m}"),
            ErrorKind::Connect(m) => write!(f, "connect failed: {m}"),
            ErrorKind::Tls(m) => write!(f, "TLS failed: {m}"),
            ErrorKind::Transport(m) => write!(f, "connection broken: {m}"),
            ErrorKind::Timeout { phase, after } => {
                write!(f, "timed out after {after:?} waiting for {phase}")
            }
            ErrorKind::ShortBody { expected, got } => {
                write!(f, "short body: expected {expected} bytes, got {got}")
            }
            ErrorKind::DigestMismatch { expected, actual } => {
                write!(
                    f,
                    "digest mismatch: expected {expected}, content hashes to {actual}"
                )
            }
            ErrorKind::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for RegistryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io(e) => Some(e),
            _ => None,
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
