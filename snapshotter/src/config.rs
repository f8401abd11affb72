//! `/etc/cora/snapshotter.json`: field names follow the seed's snapshotter config.
//!
//! Unknown fields and bad values are rejected at start with an error naming the field, so a typo
//! never silently falls back to a default.
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// How CORA layer stacks are served: `auto` (ublk, else FUSE), `ublk` or `fuse`.
pub use cora_api::driver::Transport;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/cora/snapshotter.json";
pub const DEFAULT_ROOT: &str = "/var/lib/cora-snapshotter";
pub const DEFAULT_ADDRESS: &str = "/run/cora-snapshotter/cora.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbose {
    Info,
    Debug,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RwMode {
    /// Writable layer as an overlayfs upper dir, like containerd's overlayfs snapshotter.
    Overlayfs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExporterConfig {
    pub enable: bool,
    pub uri_prefix: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorRegistry {
    pub host: String,
    #[serde(default)]
    pub insecure: bool,
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub root: PathBuf,
    pub address: PathBuf,
    pub verbose: Verbose,
    pub rw_mode: RwMode,
    pub log_report_caller: bool,
    pub auto_remove_dev: bool,
    /// Start the device of an image's layer stack when its top layer is committed as remote
    /// (at pull), so that the first container does not wait for it.
    pub attach_on_pull: bool,
    pub exporter_config: ExporterConfig,
    pub mirror_registry: Vec<MirrorRegistry>,
    pub credential_file: Option<PathBuf>,
    pub cache_size: u64,
    pub cache_dir: PathBuf,
    /// The `cora-driver` binary; `None`: next to the snapshotter's binary, then `PATH`.
    pub driver_path: Option<PathBuf>,
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The kernel interface for lazily served stacks; without one, CORA layers are unpacked.
    pub transport: Transport,
    /// What devices fetch beyond the bytes read (`missWindow`, `fileWindow`, `fill`; unset: the
    /// driver's).
    pub fetch: cora_api::driver::FetchArgs,
    /// Mount ext4 stacks lazily too. Off by default: the image's file system metadata is
    /// mounted by the kernel as root, and ext4 is not hardened against crafted images (erofs
    /// is read-only and checks its metadata); off, ext4 layers are unpacked as plain layers.
    pub allow_ext4: bool,
}

/// The file as written; enums and sizes stay strings here so their errors can name the field.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    root: Option<PathBuf>,
    address: Option<PathBuf>,
    verbose: Option<String>,
    rw_mode: Option<String>,
    #[serde(default)]
    log_report_caller: bool,
    #[serde(default)]
    auto_remove_dev: bool,
    attach_on_pull: Option<bool>,
    exporter_config: Option<RawExporter>,
    #[serde(default)]
    mirror_registry: Vec<MirrorRegistry>,
    credential_file: Option<PathBuf>,
    cache_size: Option<String>,
    cache_dir: Option<PathBuf>,
    driver_path: Option<PathBuf>,
    #[serde(default)]
    insecure_registries: Vec<String>,
    transport: Option<String>,
    miss_window: Option<String>,
    file_window: Option<String>,
    fill: Option<String>,
    #[serde(default)]
    allow_ext4: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawExporter {
    #[serde(default)]
    enable: bool,
    uri_prefix: Option<String>,
    port: Option<u16>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_json_str(path, &text)
    }

    /// Parses and validates config text; `path` only labels errors.
    pub fn from_json_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let field_err = |field: &str, message: String| ConfigError::Field {
            path: path.to_owned(),
            field: field.to_owned(),
            message,
        };
        let de = &mut serde_json::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "<top level>".to_owned()
            } else {
                field
            };
            field_err(&field, e.into_inner().to_string())
        })?;

        let root = raw.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT));
        if !root.is_absolute() {
            return Err(field_err("root", "must be an absolute path".into()));
        }
        let address = raw
            .address
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS));
        if !address.is_absolute() {
            return Err(field_err("address", "must be an absolute path".into()));
        }
        let verbose = match raw.verbose.as_deref() {
            None | Some("info") => Verbose::Info,
            Some("debug") => Verbose::Debug,
            Some(other) => {
                return Err(field_err(
                    "verbose",
                    format!("unknown value {other:?}; expected \"info\" or \"debug\""),
                ));
            }
        };
        let rw_mode = match raw.rw_mode.as_deref() {
            None | Some("overlayfs") => RwMode::Overlayfs,
            Some(other) => {
                return Err(field_err(
                    "rwMode",
                    format!(
                        "unsupported value {other:?}; the only supported mode is \"overlayfs\""
                    ),
                ));
            }
        };
        let exp = raw.exporter_config.unwrap_or_default();
        let uri_prefix = exp.uri_prefix.unwrap_or_else(|| "/metrics".to_owned());
        if !uri_prefix.starts_with('/') {
            return Err(field_err(
                "exporterConfig.uriPrefix",
                format!("{uri_prefix:?} must start with '/'"),
            ));
        }
        let port = exp.port.unwrap_or(9110);
        if exp.enable && port == 0 {
            return Err(field_err(
                "exporterConfig.port",
                "must be non-zero when the exporter is enabled".into(),
            ));
        }
        let is_host =
            |h: &str| !h.is_empty() && !h.contains('/') && !h.contains(char::is_whitespace);
        for (i, m) in raw.mirror_registry.iter().enumerate() {
            if !is_host(&m.host) {
                return Err(field_err(
                    &format!("mirrorRegistry[{i}].host"),
                    format!("{:?} is not a host[:port]", m.host),
                ));
            }
        }
        for (i, h) in raw.insecure_registries.iter().enumerate() {
            if !is_host(h) {
                return Err(field_err(
                    &format!("insecureRegistries[{i}]"),
                    format!("{h:?} is not a host[:port]"),
                ));
            }
        }
        if let Some(d) = &raw.driver_path
            && !d.is_absolute()
        {
            return Err(field_err("driverPath", "must be an absolute path".into()));
        }
        let cache_size = match raw.cache_size.as_deref() {
            None => 10 << 30,
            Some(s) => parse_size(s).map_err(|m| field_err("cacheSize", m))?,
        };
        let transport = match raw.transport.as_deref() {
            None => Transport::Auto,
            Some(t) => t
                .parse()
                .map_err(|e| field_err("transport", format!("{e}")))?,
        };
        let miss_window = match raw.miss_window.as_deref() {
            None => None,
            Some(s) => Some(cora_api::size::parse_size(s).map_err(|m| field_err("missWindow", m))?),
        };
        let file_window = match raw.file_window.as_deref() {
            None => None,
            Some(s) => Some(cora_api::size::parse_size(s).map_err(|m| field_err("fileWindow", m))?),
        };
        let fill = match raw.fill.as_deref() {
            None => None,
            Some(f) => Some(f.parse().map_err(|e| field_err("fill", format!("{e}")))?),
        };
        let cache_dir = raw.cache_dir.unwrap_or_else(|| root.join("cache"));
        if !cache_dir.is_absolute() {
            return Err(field_err("cacheDir", "must be an absolute path".into()));
        }
        Ok(Config {
            root,
            address,
            verbose,
            rw_mode,
            log_report_caller: raw.log_report_caller,
            auto_remove_dev: raw.auto_remove_dev,
            attach_on_pull: raw.attach_on_pull.unwrap_or(true),
            exporter_config: ExporterConfig {
                enable: exp.enable,
                uri_prefix,
                port,
            },
            mirror_registry: raw.mirror_registry,
            credential_file: raw.credential_file,
            cache_size,
            cache_dir,
            driver_path: raw.driver_path,
            insecure_registries: raw.insecure_registries,
            transport,
            fetch: cora_api::driver::FetchArgs {
                miss_window,
                file_window,
                fill,
            },
            allow_ext4: raw.allow_ext4,
        })
    }
}

/// A cache size: see [`cora_api::size::parse_size`]; zero is refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    match cora_api::size::parse_size(s)? {
        0 => Err(format!("{s:?}: a cache of 0 bytes holds nothing")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_json_str(Path::new("test.json"), text)
    }

    #[test]
    fn defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.rw_mode, RwMode::Overlayfs);
        assert_eq!(c.cache_size, 10 << 30);
        assert_eq!(c.cache_dir, PathBuf::from(DEFAULT_ROOT).join("cache"));
        assert!(!c.exporter_config.enable);
        assert!(c.attach_on_pull);
        assert_eq!(c.transport, Transport::Auto);
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"{"root":"/r","address":"/s.sock","verbose":"debug","rwMode":"overlayfs",
            "logReportCaller":true,"autoRemoveDev":true,"attachOnPull":false,
            "exporterConfig":{"enable":true,"uriPrefix":"/m","port":9000},
            "mirrorRegistry":[{"host":"127.0.0.1:5000","insecure":true}],
            "credentialFile":"/etc/cora/creds.json","cacheSize":"512M","cacheDir":"/c",
            "driverPath":"/usr/bin/cora-driver","insecureRegistries":["127.0.0.1:5000"],
            "transport":"fuse"}"#,
        )
        .unwrap();
        assert_eq!(c.verbose, Verbose::Debug);
        assert!(c.auto_remove_dev && c.log_report_caller && !c.attach_on_pull);
        assert_eq!(c.exporter_config.port, 9000);
        assert_eq!(c.exporter_config.uri_prefix, "/m");
        assert_eq!(c.mirror_registry[0].host, "127.0.0.1:5000");
        assert!(c.mirror_registry[0].insecure);
        assert_eq!(c.cache_size, 512 << 20);
        assert_eq!(c.cache_dir, PathBuf::from("/c"));
        assert_eq!(c.driver_path, Some(PathBuf::from("/usr/bin/cora-driver")));
        assert_eq!(c.insecure_registries, ["127.0.0.1:5000"]);
        assert_eq!(c.transport, Transport::Fuse);
        assert_eq!(
            parse(r#"{"transport":"ublk"}"#).unwrap().transport,
            Transport::Ublk
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse(r#"{"rootDir":"/x"}"#).unwrap_err().to_string();
        assert!(e.contains("rootDir"), "{e}");
        let e = parse(r#"{"exporterConfig":{"enabled":true}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("enabled"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse(r#"{"rwMode":"btrfs"}"#).unwrap_err().to_string();
        assert!(e.contains("rwMode") && e.contains("btrfs"), "{e}");
        let e = parse(r#"{"verbose":"trace"}"#).unwrap_err().to_string();
        assert!(e.contains("verbose"), "{e}");
        let e = parse(r#"{"cacheSize":"ten"}"#).unwrap_err().to_string();
        assert!(e.contains("cacheSize"), "{e}");
        let e = parse(r#"{"exporterConfig":{"port":"x"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exporterConfig.port"), "{e}");
        let e = parse(r#"{"driverPath":"cora-driver"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("driverPath"), "{e}");
        let e = parse(r#"{"insecureRegistries":["a/b"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("insecureRegistries[0]"), "{e}");
        let e = parse(r#"{"transport":"nbd"}"#).unwrap_err().to_string();
        assert!(e.contains("transport") && e.contains("nbd"), "{e}");
        let e = parse(r#"{"root":"relative"}"#).unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
        assert!(parse("{").is_err());
    }

    #[test]
    fn shipped_example_parses() {
        let c = parse(include_str!("../config.example.json")).unwrap();
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert!(c.exporter_config.enable && c.auto_remove_dev);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64MB").unwrap(), 64 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1Q").is_err());
    }
}
