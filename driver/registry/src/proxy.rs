//! HTTP(S) proxy selection: which proxy (if any) a target goes through.
use super::config::ProxyConfig;
use super::error::{ErrorKind, RegistryError};
use base64::Engine;

/// A parsed `http://[user:pass@]host[:port]` proxy.
#[derive(Clone)]
pub(crate) struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// Ready-made `Proxy-Authorization` value; never logged.
    pub auth: Option<String>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn config_err(m: String) -> RegistryError {
    RegistryError::new("configure proxy", ErrorKind::Config(m))
}

impl ProxyUrl {
    pub fn parse(var: &str, raw: &str) -> Result<Self, RegistryError> {
        let rest = if let Some(r) = raw.strip_prefix("http://") {
            r
        } else if raw.contains("://") {
            let scheme = raw.split("://").next().unwrap_or_default();
            return Err(config_err(format!(
                "{var}: proxy scheme {scheme:?} unsupported (only http:// proxies)"
            )));
        } else {
            raw
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport)
            .ok_or_else(|| config_err(format!("{var}: cannot parse proxy host:port")))?;
        let port = port.unwrap_or(80);
        if host.is_empty() {
            return Err(config_err(format!("{var}: empty proxy host")));
        }
        let auth = userinfo.map(|u| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(percent_decode(u))
            )
        });
        Ok(ProxyUrl {
            host: host.to_string(),
            port,
            auth,
        })
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Splits `host[:port]` / `[v6][:port]`; `None` on a malformed port.
pub(crate) fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((h, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((h, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        // A bare IPv6 address has several ':' and no port.
        Some((h, _)) if h.contains(':') => Some((s, None)),
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

#[derive(Debug, Clone)]
enum NoProxyRule {
    All,
    /// Host or domain suffix, optionally only for one port.
    Host {
        name: String,
        port: Option<u16>,
    },
}

/// Parsed proxy settings.
#[derive(Debug, Clone, Default)]
pub(crate) struct Proxies {
    http: Option<ProxyUrl>,
    https: Option<ProxyUrl>,
    no_proxy: Vec<NoProxyRule>,
}

impl Proxies {
    pub fn new(cfg: &ProxyConfig) -> Result<Self, RegistryError> {
        let http = cfg
            .http_proxy
            .as_deref()
            .map(|v| ProxyUrl::parse("http_proxy", v))
            .transpose()?;
        let https = cfg
            .https_proxy
            .as_deref()
            .map(|v| ProxyUrl::parse("https_proxy", v))
            .transpose()?;
        let mut no_proxy = Vec::new();
        for e in cfg.no_proxy.as_deref().unwrap_or("").split(',') {
            let e = e.trim().to_ascii_lowercase();
            if e.is_empty() {
                continue;
            }
            if e == "*" {
                no_proxy.push(NoProxyRule::All);
                continue;
            }
            let (h, port) = split_host_port(&e)
                .ok_or_else(|| config_err(format!("no_proxy: cannot parse entry {e:?}")))?;
            let name = h
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .to_string();
            no_proxy.push(NoProxyRule::Host { name, port });
        }
        Ok(Proxies {
            http,
            https,
            no_proxy,
        })
    }

    fn excluded(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.no_proxy.iter().any(|r| match r {
            NoProxyRule::All => true,
            NoProxyRule::Host { name, port: p } => {
                p.is_none_or(|p| p == port)
                    && (host == *name
                        || (host.len() > name.len()
                            && host.ends_with(name.as_str())
                            && host.as_bytes()[host.len() - name.len() - 1] == b'.'))
            }
        })
    }

    /// The proxy to use for `scheme://host:port`, if any.
    pub fn for_target(&self, https: bool, host: &str, port: u16) -> Option<&ProxyUrl> {
        let p = if https {
            self.https.as_ref()
        } else {
            self.http.as_ref()
        }?;
        (!self.excluded(host, port)).then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(no_proxy: &str) -> Proxies {
        Proxies::new(&ProxyConfig {
            http_proxy: Some("http://u:p%40ss@proxy.local:3128".into()),
            https_proxy: Some("proxy.local:8080".into()),
            no_proxy: Some(no_proxy.into()),
        })
        .unwrap()
    }

    #[test]
    fn parses_proxy_urls() {
        let p = proxies("");
        let h = p.for_target(false, "reg.io", 80).unwrap();
        assert_eq!((h.host.as_str(), h.port), ("proxy.local", 3128));
        // "u:p@ss" base64
        assert_eq!(h.auth.as_deref(), Some("Basic dTpwQHNz"));
        let s = p.for_target(true, "reg.io", 443).unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.auth.is_none()),
            ("proxy.local", 8080, true)
        );
        assert!(format!("{h:?}").find("p@ss").is_none());
        let e = ProxyUrl::parse("https_proxy", "socks5://x:1").unwrap_err();
        assert!(e.to_string().contains("socks5"), "{e}");
        assert!(ProxyUrl::parse("http_proxy", "http://x:notaport").is_err());
    }

    #[test]
    fn no_proxy_rules() {
        let p = proxies("example.com, .corp.net,10.0.0.1,reg.io:5000,[::1]");
        assert!(p.for_target(true, "example.com", 443).is_none());
        assert!(p.for_target(true, "a.example.com", 443).is_none());
        assert!(p.for_target(true, "badexample.com", 443).is_some());
        assert!(p.for_target(true, "x.corp.net", 443).is_none());
        assert!(p.for_target(true, "corp.net", 443).is_none());
        assert!(p.for_target(true, "10.0.0.1", 443).is_none());
        assert!(p.for_target(true, "10.0.0.12", 443).is_some());
        assert!(p.for_target(true, "reg.io", 5000).is_none());
        assert!(p.for_target(true, "reg.io", 443).is_some());
        assert!(p.for_target(true, "[::1]", 443).is_none());
        let all = proxies("*");
        assert!(all.for_target(false, "anything", 80).is_none());
    }

    #[test]
    fn from_lookup_prefers_lowercase() {
        let c = ProxyConfig::from_lookup(|k| match k {
            "HTTPS_PROXY" => Some("upper:1".into()),
            "https_proxy" => Some("lower:1".into()),
            "NO_PROXY" => Some("a".into()),
            _ => None,
        });
        assert_eq!(c.https_proxy.as_deref(), Some("lower:1"));
        assert_eq!(c.no_proxy.as_deref(), Some("a"));
        assert_eq!(c.http_proxy, None);
    }
}
