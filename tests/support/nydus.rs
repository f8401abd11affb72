//! Nydus as a peer in the benchmarks: images converted with `nydus-image` into Nydus's OCI form
//! (RAFS v6 data blobs + one bootstrap layer) and containerd's nydus-snapshotter
//! (`containerd-nydus-grpc`) serving them through FUSE with `nydusd`.
//!
//! The tools come from `cargo xtask` (`CORA_NYDUS_BIN`: crates.io `nydus-rs` for `nydusd` and
//! `nydus-image`, Debian sid's `nydus-snapshotter`); nothing is installed over the host's
//! packages.
use crate::daemon::{Daemon, wait_for};
use crate::fixtures::run;
use anyhow::{Context, Result, bail, ensure};
use blobfmt::oci;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Media type of a RAFS data blob layer (Nydus image spec).
pub const MT_BLOB: &str = "application/vnd.oci.image.layer.nydus.blob.v1";
/// Annotations that tell nydus-snapshotter which layer is which (containerd passes
/// `containerd.io/snapshot/*` annotations on as Prepare labels).
pub const BLOB_ANNOTATION: &str = "containerd.io/snapshot/nydus-blob";
pub const BOOTSTRAP_ANNOTATION: &str = "containerd.io/snapshot/nydus-bootstrap";
pub const FS_VERSION_ANNOTATION: &str = "containerd.io/snapshot/nydus-fs-version";
/// Where the bootstrap lies inside the bootstrap layer's tar.
const BOOTSTRAP_PATH: &str = "image/image.boot";

/// The Nydus binaries: `nydusd`, `nydus-image`, `containerd-nydus-grpc`.
#[derive(Clone, Debug)]
pub struct Tools {
    pub bin: PathBuf,
}

impl Tools {
    /// The tools in `CORA_NYDUS_BIN`, or why there are none (`cargo xtask` says in
    /// `CORA_NYDUS_UNAVAILABLE` when it could not install them).
    pub fn from_env() -> Result<Tools, String> {
        let Some(bin) = std::env::var_os("CORA_NYDUS_BIN").map(PathBuf::from) else {
            return Err(std::env::var("CORA_NYDUS_UNAVAILABLE").unwrap_or_else(|_| {
                "CORA_NYDUS_BIN is not set (`cargo xtask bench coldstart` installs Nydus and sets it)"
                    .into()
            }));
        };
        for tool in ["nydusd", "nydus-image", "containerd-nydus-grpc"] {
            if !bin.join(tool).exists() {
                return Err(format!("{tool} missing from {}", bin.display()));
            }
        }
        Ok(Tools { bin })
    }

    pub fn path(&self, tool: &str) -> PathBuf {
        self.bin.join(tool)
    }

    /// What was installed, as `cargo xtask` says (`CORA_NYDUS_VERSION`): nydus-image prints
    /// no version when built from crates.io.
    pub fn version(&self) -> String {
        std::env::var("CORA_NYDUS_VERSION").unwrap_or_else(|_| "version unknown".into())
    }
}

/// Converts an image given as its layer directories (bottom first) into Nydus's OCI form in
/// the layout `layout`, tagged `tag`: one RAFS v6 data blob per layer (`nydus-image create`,
/// each layer stacked on the previous one's bootstrap, as nydusify does), then the last
/// bootstrap, which describes the whole stack, as a tar+gzip layer on top.
pub fn convert(
    tools: &Tools,
    layers: &[PathBuf],
    work: &Path,
    layout: &Path,
    tag: &str,
) -> Result<()> {
    let blob_dir = work.join("blobs");
    std::fs::create_dir_all(&blob_dir)?;
    let mut parent: Option<PathBuf> = None;
    let mut blobs: Vec<String> = Vec::new();
    for (i, dir) in layers.iter().enumerate() {
        let boot = work.join(format!("layer{i}.boot"));
        let out = work.join(format!("layer{i}.json"));
        let mut cmd = Command::new(tools.path("nydus-image"));
        cmd.args([
            "create",
            "--type",
            "dir-rafs",
            "--fs-version",
            "6",
            "--log-level",
            "warn",
        ])
        .arg("--blob-dir")
        .arg(&blob_dir)
        .arg("--bootstrap")
        .arg(&boot)
        .arg("--output-json")
        .arg(&out);
        if let Some(p) = &parent {
            cmd.arg("--parent-bootstrap").arg(p);
        }
        run(cmd.arg(dir)).with_context(|| format!("nydus-image create {}", dir.display()))?;
        let result: serde_json::Value = serde_json::from_slice(&std::fs::read(&out)?)?;
        // The stack's blobs so far; a layer with no file data adds none.
        blobs = result["blobs"]
            .as_array()
            .context("nydus-image printed no blobs")?
            .iter()
            .filter_map(|b| b.as_str().map(str::to_string))
            .collect();
        parent = Some(boot);
    }
    let bootstrap = parent.context("an image needs at least one layer")?;

    std::fs::create_dir_all(layout)?;
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for id in &blobs {
        let bytes = std::fs::read(blob_dir.join(id))?;
        let digest = oci::put_blob(layout, &bytes)?;
        // nydusd fetches a blob from the registry by its id: they must be the same.
        ensure!(
            digest == format!("sha256:{id}"),
            "blob {id} has digest {digest}"
        );
        diff_ids.push(digest.clone());
        descs.push(oci::Descriptor {
            media_type: MT_BLOB.into(),
            digest,
            size: bytes.len() as u64,
            annotations: Some(BTreeMap::from([(BLOB_ANNOTATION.into(), "true".into())])),
            platform: None,
        });
    }
    // As nydus-snapshotter's converter packs it: the directory, then the bootstrap read-only.
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut h, "image/", std::io::empty())?;
    let boot = std::fs::read(&bootstrap)?;
    let mut h = tar::Header::new_ustar();
    h.set_size(boot.len() as u64);
    h.set_mode(0o444);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, BOOTSTRAP_PATH, boot.as_slice())?;
    let tar = tar.into_inner()?;
    diff_ids.push(blobfmt::format::oci_digest(&blobfmt::format::sha256(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar)?;
    let gz = gz.finish()?;
    descs.push(oci::Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: oci::put_blob(layout, &gz)?,
        size: gz.len() as u64,
        annotations: Some(BTreeMap::from([
            (BOOTSTRAP_ANNOTATION.into(), "true".into()),
            (FS_VERSION_ANNOTATION.into(), "6".into()),
        ])),
        platform: None,
    });
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    let manifest = oci::Manifest {
        schema_version: 2,
        media_type: Some(oci::MT_OCI_MANIFEST.into()),
        config: oci::Descriptor {
            media_type: oci::MT_OCI_CONFIG.into(),
            digest: oci::put_blob(layout, &config)?,
            size: config.len() as u64,
            annotations: None,
            platform: None,
        },
        layers: descs,
        annotations: None,
    };
    let manifest = serde_json::to_vec(&manifest)?;
    oci::put_blob(layout, &manifest)?;
    oci::tag_manifest(layout, tag, &manifest)?;
    Ok(())
}

/// containerd's nydus-snapshotter with `nydusd` in FUSE mode, one daemon per image
/// (`dedicated`), its state under a directory of its own.
pub struct NydusSnapshotter {
    pub daemon: Daemon,
    pub socket: PathBuf,
    pub root: PathBuf,
}

impl NydusSnapshotter {
    /// Starts `containerd-nydus-grpc` with state in `dir`. `prefetch_all`: nydusd fetches the
    /// whole image in the background from the start (the snapshotter's shipped nydusd
    /// config does); otherwise only what is read, 1 MiB per miss (`amplify_io`). Registries
    /// are reached over plain HTTP (the benches' registries are on loopback).
    pub fn start(tools: &Tools, dir: &Path, prefetch_all: bool) -> Result<NydusSnapshotter> {
        std::fs::create_dir_all(dir)?;
        let root = dir.join("root");
        let socket = dir.join("nydus.sock");
        // This sandbox caps open files below nydusd's default rlimit request (1000000:
        // EPERM); `--rlimit-nofile 0` keeps the inherited limit.
        let nydusd = dir.join("nydusd");
        std::fs::write(
            &nydusd,
            format!(
                "#!/bin/sh\nexec '{}' \"$@\" --rlimit-nofile 0\n",
                tools.path("nydusd").display()
            ),
        )?;
        std::fs::set_permissions(&nydusd, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        // nydus-snapshotter's misc/snapshotter/nydusd-config.fusedev.json, with the scheme
        // fixed to http (it fills host, repo and the cache directory per image).
        let nydusd_config = dir.join("nydusd-config.json");
        std::fs::write(
            &nydusd_config,
            serde_json::to_vec_pretty(&serde_json::json!({
                "device": {
                    "backend": {"type": "registry", "config": {
                        "scheme": "http", "timeout": 5, "connect_timeout": 5, "retry_limit": 4,
                    }},
                    "cache": {"type": "blobcache"},
                },
                "mode": "direct",
                "digest_validate": false,
                "iostats_files": false,
                "enable_xattr": true,
                "amplify_io": 1048576,
                "fs_prefetch": {
                    "enable": prefetch_all, "threads_count": 8, "merging_size": 1048576,
                    "prefetch_all": prefetch_all,
                },
            }))?,
        )?;
        let config = dir.join("config.toml");
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        std::fs::write(
            &config,
            format!(
                "version = 1
root = {root}
address = {socket}
daemon_mode = \"dedicated\"
cleanup_on_close = false
[system]
enable = false
[cgroup]
enable = false
[daemon]
nydusd_path = {nydusd}
nydusimage_path = {image}
fs_driver = \"fusedev\"
recover_policy = \"restart\"
nydusd_config = {nydusd_config}
threads_number = 4
[log]
log_to_stdout = true
level = \"info\"
[metrics]
address = \"\"
[remote.auth]
enable_kubeconfig_keychain = false
enable_cri_keychain = false
[snapshot]
enable_nydus_overlayfs = false
sync_remove = true
[cache_manager]
disable = false
gc_period = \"24h\"
[experimental]
enable_stargz = false
enable_referrer_detect = false
",
                root = q(&root),
                socket = q(&socket),
                nydusd = q(&nydusd),
                image = q(&tools.path("nydus-image")),
                nydusd_config = q(&nydusd_config),
            ),
        )?;
        let mut cmd = Command::new(tools.path("containerd-nydus-grpc"));
        cmd.arg("--config").arg(&config);
        let mut daemon = Daemon::spawn("containerd-nydus-grpc", cmd, &dir.join("nydus.log"))?;
        let ready = wait_for("nydus-snapshotter socket", Duration::from_secs(20), || {
            UnixStream::connect(&socket).is_ok()
        });
        if let Err(e) = ready {
            let running = daemon.running();
            bail!("{e} (running: {running}); log:\n{}", daemon.log_text());
        }
        Ok(NydusSnapshotter {
            daemon,
            socket,
            root,
        })
    }

    /// The `nydusd` processes serving this snapshotter's images.
    pub fn nydusd_pids(&self) -> Vec<u32> {
        crate::containerd::pids_with_arg_under(&self.root)
    }

    /// Where nydusd keeps fetched blob data.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }
}

impl Drop for NydusSnapshotter {
    /// nydusd outlives its snapshotter by design (it keeps serving running containers): stop
    /// both, then what they left mounted.
    fn drop(&mut self) {
        let _ = self.daemon.stop();
        let pids = self.nydusd_pids();
        for &pid in &pids {
            crate::daemon::signal(pid, libc::SIGTERM);
        }
        let _ = wait_for("nydusd to exit", Duration::from_secs(10), || {
            pids.iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        });
        crate::containerd::unmount_under(&self.root);
    }
}
