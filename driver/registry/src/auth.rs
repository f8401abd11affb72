//! Credentials (docker-config JSON), `WWW-Authenticate` parsing and the bearer token cache.
//! Secrets live only here and in request headers; `Debug` output redacts them.
use super::error::{ErrorKind, RegistryError};
use base64::Engine;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A username and password. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Creds {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}, <redacted>)", self.username)
    }
}

impl Creds {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Credentials by normalised key (`host` or `host/repo/prefix`).
#[derive(Debug, Default)]
pub(crate) struct CredStore {
    by_key: HashMap<String, Creds>,
}

fn cfg_err(m: String) -> RegistryError {
    RegistryError::new("load registry credentials", ErrorKind::Config(m))
}

/// `https://index.docker.io/v1/` -> `index.docker.io/v1`.
fn normalise_key(k: &str) -> String {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.trim_end_matches('/').to_ascii_lowercase()
}

impl CredStore {
    /// Loads `explicit`, or else the first existing default file.
    pub fn load(explicit: Option<&Path>) -> Result<Self, RegistryError> {
        let path = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => default_paths().into_iter().find(|p| p.is_file()),
        };
        match path {
            None => Ok(CredStore::default()),
            Some(p) => {
                let text = std::fs::read(&p)
                    .map_err(|e| cfg_err(format!("reading {}: {e}", p.display())))?;
                Self::parse(&text).map_err(|m| cfg_err(format!("{}: {m}", p.display())))
            }
        }
    }

    /// Parses docker-config JSON. Errors never quote the file content.
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let cfg: DockerConfig = serde_json::from_slice(text).map_err(|e| {
            // serde_json errors carry only line/column and a category, no input text.
            format!("not a docker config JSON file: {e}")
        })?;
        let mut by_key = HashMap::new();
        for (key, e) in cfg.auths {
            let creds = if let (Some(u), Some(p)) = (&e.username, &e.password) {
                Creds {
                    username: u.clone(),
                    password: p.clone(),
                }
            } else if let Some(a) = e.auth.as_deref().filter(|a| !a.is_empty()) {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(a.trim())
                    .map_err(|_| format!("auths[{key:?}].auth is not valid base64"))?;
                let raw = String::from_utf8(raw)
                    .map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
                let Some((u, p)) = raw.split_once(':') else {
                    return Err(format!("auths[{key:?}].auth is not base64(user:password)"));
                };
                Creds {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else {
                // Entries that only name a credential helper carry nothing usable here.
                continue;
            };
            by_key.insert(normalise_key(&key), creds);
        }
        Ok(CredStore { by_key })
    }

    /// Most specific match: `host/a/b`, `host/a`, then `host` (plus Docker Hub aliases).
    pub fn lookup(&self, host: &str, repo: &str) -> Option<&Creds> {
        let host = host.to_ascii_lowercase();
        let mut path = format!("{host}/{repo}");
        loop {
            if let Some(c) = self.by_key.get(&path) {
                return Some(c);
            }
            match path.rfind('/') {
                Some(i) => path.truncate(i),
                None => break,
            }
        }
        if matches!(
            host.as_str(),
            "docker.io" | "registry-1.docker.io" | "index.docker.io"
        ) {
            for k in [
                "index.docker.io/v1",
                "index.docker.io",
                "docker.io",
                "registry-1.docker.io",
            ] {
                if let Some(c) = self.by_key.get(k) {
                    return Some(c);
                }
            }
        }
        None
    }
}

fn default_paths() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/etc/cora/cred.json")];
    if let Some(home) = std::env::var_os("HOME") {
        v.push(PathBuf::from(home).join(".docker/config.json"));
    }
    v
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses `Bearer realm="...",service="...",scope="..."` or `Basic realm="..."`.
pub(crate) fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(char::is_whitespace).unwrap_or((h, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Some(Challenge::Bearer {
        realm: get("realm")?,
        service: get("service"),
        scope: get("scope"),
    })
}

/// `k="v", k2=v2` with quoted strings that may contain commas and `\"`.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            val.push(n);
                        }
                    }
                    '"' => break,
                    _ => val.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                val.push(c);
                chars.next();
            }
        }
        out.push((key.trim().to_string(), val.trim().to_string()));
    }
    out
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub(crate) struct Token {
    pub value: String,
    pub expires: Instant,
}

/// The longest a token is kept, whatever the token server says.
const MAX_TOKEN_LIFE_SECS: u64 = 24 * 3600;

impl Token {
    /// Parses a token-server response. Per the distribution spec the default lifetime is 60 s;
    /// we stop using a token a little early so it does not expire in flight.
    pub fn parse(body: &[u8]) -> Result<Token, String> {
        let t: TokenResponse = serde_json::from_slice(body)
            .map_err(|e| format!("token server answered with invalid JSON: {e}"))?;
        let value = t
            .token
            .or(t.access_token)
            .filter(|v| !v.is_empty())
            .ok_or("token server response has no token")?;
        // Clamped: `Instant + Duration` panics on overflow, and a server-chosen lifetime of
        // years is no reason to keep a token for longer than a day.
        let life = Duration::from_secs(t.expires_in.unwrap_or(60).clamp(1, MAX_TOKEN_LIFE_SECS));
        let margin = (life / 10).min(Duration::from_secs(30));
        Ok(Token {
            value,
            expires: Instant::now() + life - margin,
        })
    }

    pub fn valid(&self) -> bool {
        Instant::now() < self.expires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.io/token",service="reg.io",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.io/token".into(),
                service: Some("reg.io".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
        assert_eq!(
            parse_challenge(r#"bearer realm=http://t/x, scope="a\"b""#),
            Some(Challenge::Bearer {
                realm: "http://t/x".into(),
                service: None,
                scope: Some("a\"b".into()),
            })
        );
    }

    #[test]
    fn cred_store() {
        let json = br#"{"auths":{
            "https://reg.io/":{"auth":"dXNlcjpwYXNz"},
            "reg.io/team/app":{"username":"app","password":"apppw"},
            "https://index.docker.io/v1/":{"auth":"aHViOmh1YnB3"},
            "helper.io":{}
        }, "credsStore":"desktop"}"#;
        let s = CredStore::parse(json).unwrap();
        assert_eq!(s.lookup("reg.io", "other").unwrap().username, "user");
        assert_eq!(s.lookup("reg.io", "team/app/sub").unwrap().username, "app");
        assert_eq!(s.lookup("REG.IO", "team/x").unwrap().password, "pass");
        assert_eq!(
            s.lookup("registry-1.docker.io", "library/a")
                .unwrap()
                .username,
            "hub"
        );
        assert!(s.lookup("helper.io", "x").is_none());
        assert!(s.lookup("nope.io", "x").is_none());
        assert!(!format!("{s:?}").contains("pass"));
    }

    #[test]
    fn cred_store_errors_do_not_echo_secrets() {
        let e = CredStore::parse(br#"{"auths":{"r.io":{"auth":"!!sekrit!!"}}}"#).unwrap_err();
        assert!(e.contains("base64") && !e.contains("sekrit"), "{e}");
        let e = CredStore::parse(br#"{"auths":{"r.io":{"auth":"bm9jb2xvbg=="}}}"#).unwrap_err();
        assert!(e.contains("user:password"), "{e}");
        let e = CredStore::parse(b"{\"auths\": sekrit").unwrap_err();
        assert!(!e.contains("sekrit"), "{e}");
    }

    #[test]
    fn token_parse() {
        let t = Token::parse(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.value, "abc");
        assert!(t.valid());
        let t = Token::parse(br#"{"access_token":"x"}"#).unwrap();
        assert_eq!(t.value, "x");
        assert!(Token::parse(br#"{"expires_in":3}"#).is_err());
        // A hostile lifetime neither panics nor keeps the token past a day.
        let t = Token::parse(br#"{"token":"t","expires_in":18446744073709551615}"#).unwrap();
        assert!(t.valid());
        assert!(t.expires <= Instant::now() + Duration::from_secs(MAX_TOKEN_LIFE_SECS));
        assert!(Token::parse(b"<html>").is_err());
    }
}
