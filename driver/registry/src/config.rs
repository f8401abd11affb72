//! Client configuration.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// A registry mirror tried before the upstream registry for blob reads
/// (field names follow the seed's `mirrorRegistry` entries).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mirror {
    /// `host[:port]` serving the same repository paths as the upstream.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    #[serde(default)]
    pub insecure: bool,
}

impl Mirror {
    /// A mirror as given on command lines: `HOST[:PORT]`, or `HOST[:PORT],insecure` for plain
    /// HTTP.
    pub fn parse(arg: &str) -> Mirror {
        match arg.strip_suffix(",insecure") {
            Some(h) => Mirror {
                host: h.into(),
                insecure: true,
            },
            None => Mirror {
                host: arg.into(),
                insecure: false,
            },
        }
    }
}

/// Proxy settings; normally read from the environment by [`ProxyConfig::from_env`].
/// Values are kept raw and parsed by [`super::Client::new`], which reports bad ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Proxy for `http://` targets (`http_proxy` / `HTTP_PROXY`).
    pub http_proxy: Option<String>,
    /// Proxy for `https://` targets, reached with CONNECT (`https_proxy` / `HTTPS_PROXY`).
    pub https_proxy: Option<String>,
    /// Comma-separated exclusions (`no_proxy` / `NO_PROXY`): `*`, host or domain suffix
    /// (`example.com` and `.example.com` both match `a.example.com`), `host:port`, exact IP.
    pub no_proxy: Option<String>,
}

impl ProxyConfig {
    /// Reads the proxy variables from the process environment; lowercase wins over uppercase.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Same as [`ProxyConfig::from_env`] with an arbitrary variable lookup (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let pick = |lower: &str, upper: &str| {
            get(lower)
                .or_else(|| get(upper))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        ProxyConfig {
            http_proxy: pick("http_proxy", "HTTP_PROXY"),
            https_proxy: pick("https_proxy", "HTTPS_PROXY"),
            no_proxy: pick("no_proxy", "NO_PROXY"),
        }
    }
}

/// Everything [`super::Client::new`] needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Docker-config JSON (`{"auths":{"host[/repo]":{"auth":b64}|{"username","password"}}}`).
    /// `None`: first existing of `/etc/cora/cred.json`, `~/.docker/config.json`.
    pub creds_file: Option<PathBuf>,
    /// PEM files with extra trusted roots, added to the system roots.
    pub ca_files: Vec<PathBuf>,
    /// Hosts spoken to over plain HTTP: `host` (any port) or `host:port`. Nothing else
    /// is ever plain HTTP, not even `localhost`.
    pub insecure_hosts: Vec<String>,
    /// Tried in order before the upstream for blob reads.
    pub mirrors: Vec<Mirror>,
    /// Bound on connect + response headers, and on every gap between body frames.
    pub request_timeout: Duration,
    /// Extra attempts after the first for transient failures.
    pub max_retries: u32,
    /// Requests in flight at once (including their bodies).
    pub max_concurrency: usize,
    /// First backoff delay; doubled per retry (capped at 10 s), with jitter.
    pub retry_backoff: Duration,
    pub proxy: ProxyConfig,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            creds_file: None,
            ca_files: Vec::new(),
            insecure_hosts: Vec::new(),
            mirrors: Vec::new(),
            request_timeout: Duration::from_secs(30),
            max_retries: 4,
            max_concurrency: 32,
            retry_backoff: Duration::from_millis(200),
            proxy: ProxyConfig::from_env(),
        }
    }
}
