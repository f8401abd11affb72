//! Which manifest of a multi-platform image this host runs: OCI platforms (`os/arch[/variant]`),
//! the host's own, a process-wide override (`--platform`), and the choice from an index.
use crate::Error;
use crate::oci::Descriptor;
use std::sync::OnceLock;

/// An OCI platform as image indexes describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this build: Linux and the CPU architecture in OCI's (Go's) names.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }

    /// Whether a descriptor's `platform` object is this platform. Without a variant asked
    /// for, any variant matches; arm64 without a variant is v8.
    pub fn matches(&self, p: &serde_json::Value) -> bool {
        let field = |k: &str| p.get(k).and_then(|v| v.as_str());
        if field("os") != Some(self.os.as_str())
            || field("architecture") != Some(self.architecture.as_str())
        {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let have = field("variant").filter(|v| !v.is_empty());
        let have = have.or((self.architecture == "arm64").then_some("v8"));
        have == Some(want.as_str())
    }

    /// `os/arch[/variant]` of a descriptor's `platform` object.
    pub fn describe(p: &serde_json::Value) -> String {
        let field = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("?");
        match p.get("variant").and_then(|v| v.as_str()) {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", field("os"), field("architecture")),
            _ => format!("{}/{}", field("os"), field("architecture")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = Error;

    /// `os/arch` or `os/arch/variant`, e.g. `linux/arm64/v8`.
    fn from_str(s: &str) -> Result<Platform, Error> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric());
        match parts.as_slice() {
            [os, arch] if ok(os) && ok(arch) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(variant.to_string()),
            }),
            _ => Err(Error::Convert(format!(
                "bad platform {s:?}: expected os/architecture[/variant], e.g. linux/arm64/v8"
            ))),
        }
    }
}

static SELECTED: OnceLock<Platform> = OnceLock::new();

/// Sets the platform this process picks from image indexes (`--platform`), once, before any
/// image is opened; false when it was already set.
pub fn set_selected(p: Platform) -> bool {
    SELECTED.set(p).is_ok()
}

/// The platform this process picks from image indexes: the one set by `--platform`, else the
/// host's.
pub fn selected() -> &'static Platform {
    SELECTED.get_or_init(Platform::host)
}

/// The manifest of `want` among an index's `manifests`; the error names what the index has.
pub fn select<'a>(manifests: &'a [Descriptor], want: &Platform) -> Result<&'a Descriptor, Error> {
    manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
        .ok_or_else(|| {
            let have: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(Platform::describe))
                .collect();
            let have = if have.is_empty() {
                "no platform-tagged manifests".to_string()
            } else {
                have.join(", ")
            };
            Error::Convert(format!(
                "the image index has no manifest for {want} (it has {have}); choose one with --platform"
            ))
        })
}

/// The manifests of an index to convert: those of `wants` (each must be there), or with
/// `wants` empty every image's, skipping attestation manifests (platform `unknown/unknown`,
/// as BuildKit writes them), which are not runnable images.
pub fn select_all<'a>(
    manifests: &'a [Descriptor],
    wants: &[Platform],
) -> Result<Vec<&'a Descriptor>, Error> {
    if wants.is_empty() {
        return Ok(manifests
            .iter()
            .filter(|d| {
                !d.platform.as_ref().is_some_and(|p| {
                    p.get("os").and_then(|v| v.as_str()) == Some("unknown")
                        && p.get("architecture").and_then(|v| v.as_str()) == Some("unknown")
                })
            })
            .collect());
    }
    let mut picked: Vec<&Descriptor> = Vec::new();
    for want in wants {
        let d = select(manifests, want)?;
        if !picked.iter().any(|p| p.digest == d.digest) {
            picked.push(d);
        }
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(platform: serde_json::Value) -> Descriptor {
        Descriptor {
            media_type: crate::oci::MT_OCI_MANIFEST.into(),
            digest: format!("sha256:{:064}", platform.to_string().len()),
            size: 1,
            annotations: None,
            platform: Some(platform),
        }
    }

    #[test]
    fn parses_prints_and_maps_the_host() {
        for s in ["linux/amd64", "linux/arm64/v8", "windows/amd64"] {
            assert_eq!(s.parse::<Platform>().unwrap().to_string(), s);
        }
        for bad in ["", "linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            let e = bad.parse::<Platform>().unwrap_err().to_string();
            assert!(e.contains("bad platform"), "{bad}: {e}");
        }
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host.to_string(), "linux/amd64");
        }
    }

    #[test]
    fn selects_by_os_architecture_and_variant() {
        let all = [
            desc(serde_json::json!({"os": "linux", "architecture": "amd64"})),
            desc(serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v6"})),
            desc(serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"})),
            desc(serde_json::json!({"os": "linux", "architecture": "arm64"})),
        ];
        let pick = |s: &str| select(&all, &s.parse().unwrap()).map(|d| d.platform.clone());
        assert_eq!(pick("linux/amd64").unwrap(), all[0].platform);
        assert_eq!(pick("linux/arm/v7").unwrap(), all[2].platform);
        assert_eq!(pick("linux/arm").unwrap(), all[1].platform);
        // arm64 without a variant is v8.
        assert_eq!(pick("linux/arm64/v8").unwrap(), all[3].platform);
        let e = pick("linux/riscv64").unwrap_err().to_string();
        assert!(
            e.contains("linux/riscv64")
                && e.contains("linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64"),
            "{e}"
        );
        let e = select(&[], &Platform::host()).unwrap_err().to_string();
        assert!(e.contains("no platform-tagged manifests"), "{e}");
    }

    #[test]
    fn selects_every_image_or_the_named_platforms() {
        let attestation = desc(serde_json::json!({"os": "unknown", "architecture": "unknown"}));
        let mut all = [
            desc(serde_json::json!({"os": "linux", "architecture": "amd64"})),
            attestation,
            desc(serde_json::json!({"os": "linux", "architecture": "arm64"})),
        ];
        for (i, d) in all.iter_mut().enumerate() {
            d.digest = format!("sha256:{i:064}");
        }
        let digests = |wants: &[&str]| {
            let wants: Vec<Platform> = wants.iter().map(|w| w.parse().unwrap()).collect();
            select_all(&all, &wants).map(|v| v.iter().map(|d| d.digest.clone()).collect::<Vec<_>>())
        };
        assert_eq!(
            digests(&[]).unwrap(),
            [all[0].digest.clone(), all[2].digest.clone()]
        );
        assert_eq!(
            digests(&["linux/arm64", "linux/arm64/v8"]).unwrap(),
            [all[2].digest.clone()]
        );
        let e = digests(&["linux/amd64", "linux/s390x"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no manifest for linux/s390x"), "{e}");
    }
}
