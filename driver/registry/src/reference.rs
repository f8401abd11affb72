//! Image references: `HOST[:PORT]/REPO[:TAG|@DIGEST]`.
use super::error::{ErrorKind, RegistryError};
use std::fmt;
use std::str::FromStr;

/// A parsed image reference. The registry host is always explicit (no implicit Docker Hub).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host[:port]`, e.g. `registry.example.com`, `127.0.0.1:5000`, `localhost`.
    pub registry: String,
    /// Repository path, e.g. `library/alpine`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// `sha256:<hex>`; when set it wins over the tag for manifest fetches.
    pub digest: Option<String>,
}

impl Reference {
    /// A reference to `registry/repository` with tag `tag`.
    pub fn with_tag(registry: &str, repository: &str, tag: &str) -> Result<Self, RegistryError> {
        format!("{registry}/{repository}:{tag}").parse()
    }

    /// What goes after `/manifests/`: the digest if known, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

fn bad(input: &str, reason: impl Into<String>) -> RegistryError {
    RegistryError::new(
        format!("parse image reference {input:?}"),
        ErrorKind::InvalidReference(reason.into()),
    )
}

/// Checks `sha256:<64 lowercase hex>`; digests end up in URL paths so nothing else may pass.
pub fn validate_digest(d: &str) -> Result<(), RegistryError> {
    let ok = d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::new(
            "check digest",
            ErrorKind::InvalidDigest(d.chars().take(80).collect()),
        ))
    }
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && (h.contains('.') || h.contains(':') || h == "localhost")
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// Repository components per the distribution spec: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter().all(|&x| {
            x.is_ascii_digit() || x.is_ascii_lowercase() || matches!(x, b'.' | b'_' | b'-')
        })
        && !c.contains("..")
        && !c.contains("___")
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(input: &str) -> Result<Self, RegistryError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(bad(input, "empty string"));
        }
        let Some((host, rest)) = s.split_once('/') else {
            return Err(bad(
                input,
                "expected HOST[:PORT]/REPO[:TAG|@DIGEST], found no '/'",
            ));
        };
        if !valid_host(host) {
            return Err(bad(
                input,
                format!(
                    "{host:?} is not a registry host (it must contain '.' or ':' or be \"localhost\"); \
                     expected HOST[:PORT]/REPO[:TAG|@DIGEST]"
                ),
            ));
        }
        let (name_tag, digest) = match rest.split_once('@') {
            Some((n, d)) => {
                validate_digest(d).map_err(|_| {
                    bad(
                        input,
                        format!("digest {d:?} is not sha256:<64 lowercase hex digits>"),
                    )
                })?;
                (n, Some(d.to_string()))
            }
            None => (rest, None),
        };
        // A ':' after the last '/' separates the tag.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let t = &name_tag[at + 1..];
                if !valid_tag(t) {
                    return Err(bad(
                        input,
                        format!(
                            "tag {t:?} is invalid (allowed: [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})"
                        ),
                    ));
                }
                (&name_tag[..at], Some(t.to_string()))
            }
            None => (name_tag, None),
        };
        if repo.is_empty() {
            return Err(bad(input, "empty repository name"));
        }
        if let Some(c) = repo.split('/').find(|c| !valid_component(c)) {
            return Err(bad(
                input,
                format!(
                    "repository component {c:?} is invalid (lowercase letters, digits and \
                     single separators '.', '_', '__', '-' only)"
                ),
            ));
        }
        // Docker Hub keeps official images under `library/`.
        let repo = if matches!(host, "docker.io" | "index.docker.io") && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Reference {
            registry: host.to_string(),
            repository: repo,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_forms() {
        let r: Reference = "127.0.0.1:5000/a/b".parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);

        let r: Reference = "localhost/x:v1.2".parse().unwrap();
        assert_eq!(
            (r.registry.as_str(), r.tag.as_deref()),
            ("localhost", Some("v1.2"))
        );

        let r: Reference = format!("reg.io/x/y@{D}").parse().unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(D));
        assert_eq!(r.manifest_ref(), D);
        assert_eq!(r.to_string(), format!("reg.io/x/y@{D}"));

        let r: Reference = "docker.io/alpine:3".parse().unwrap();
        assert_eq!(r.repository, "library/alpine");

        let r: Reference = format!("reg.io:443/x:t@{D}").parse().unwrap();
        assert_eq!(r.tag.as_deref(), Some("t"));
        assert_eq!(r.manifest_ref(), D);
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        for (s, needle) in [
            ("", "empty"),
            ("alpine", "no '/'"),
            ("library/alpine", "not a registry host"),
            ("reg.io/", "empty repository"),
            ("reg.io/Upper", "component"),
            ("reg.io/a//b", "component"),
            ("reg.io/a:bad tag", "tag"),
            ("reg.io/a@sha256:abc", "digest"),
            ("reg.io/a@md5:0123", "digest"),
            ("reg.io/a:", "tag"),
        ] {
            let e = s.parse::<Reference>().unwrap_err().to_string();
            assert!(e.contains(needle), "{s:?}: {e}");
        }
    }

    #[test]
    fn digest_validation() {
        assert!(validate_digest(D).is_ok());
        assert!(validate_digest(&D.to_uppercase()).is_err());
        assert!(validate_digest("sha256:../../etc").is_err());
    }
}
