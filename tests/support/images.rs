//! Small real images without Docker: a busybox rootfs from Debian's busybox-static package,
//! OCI image layouts written here (tar layers, optionally zstd), a local `docker-registry` and
//! `skopeo copy` to push.
use crate::daemon::{Daemon, wait_for};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes a rootfs with a static `/bin/busybox` (from `apt-get download busybox-static`, or the
/// installed package when the download is impossible) plus `/bin/sh` and `/bin/echo` links.
pub fn busybox_rootfs(dest: &Path) -> Result<()> {
    let debs = std::env::temp_dir().join("cora-test-debs");
    std::fs::create_dir_all(&debs)?;
    let find_deb = || -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("busybox-static_"))
            })
    };
    if find_deb().is_none() {
        let _ = run(Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(&debs));
    }
    std::fs::create_dir_all(dest.join("bin"))?;
    match find_deb() {
        Some(deb) => {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest))?;
        }
        None => {
            let installed = run(Command::new("dpkg").args(["-L", "busybox-static"]))
                .context("busybox-static: no .deb could be downloaded and it is not installed")?;
            if !installed.lines().any(|l| l == "/bin/busybox") {
                bail!("busybox-static is installed without /bin/busybox");
            }
            std::fs::copy("/bin/busybox", dest.join("bin/busybox"))?;
        }
    }
    for applet in ["sh", "echo", "cat", "ls", "sleep", "test"] {
        let link = dest.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link)?;
        }
    }
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(dest.join(d))?;
    }
    Ok(())
}

/// Marks `name` (relative to the layer root) as deleted from lower layers: an OCI whiteout.
pub fn whiteout(layer_dir: &Path, name: &str) -> Result<()> {
    let p = Path::new(name);
    let parent = layer_dir.join(p.parent().unwrap_or(Path::new("")));
    std::fs::create_dir_all(&parent)?;
    let file = p.file_name().context("whiteout of an empty name")?;
    std::fs::write(parent.join(format!(".wh.{}", file.to_string_lossy())), b"")?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
}

/// One image layer: the tree under `dir`, with descriptor annotations.
#[derive(Debug, Clone)]
pub struct LayerSpec {
    pub dir: PathBuf,
    pub annotations: BTreeMap<String, String>,
}

impl LayerSpec {
    pub fn new(dir: &Path) -> LayerSpec {
        LayerSpec {
            dir: dir.to_owned(),
            annotations: BTreeMap::new(),
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> Result<String> {
    let digest = sha256(bytes);
    let hexpart = &digest["sha256:".len()..];
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(hexpart), bytes)?;
    Ok(digest)
}

/// Tars `dir` with stable ordering and owner root.
fn tar_dir(dir: &Path) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Deterministic);
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
            let path = e?.path();
            if path.symlink_metadata()?.is_dir() {
                stack.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    for path in paths {
        let rel = path.strip_prefix(dir)?;
        b.append_path_with_name(&path, rel)
            .with_context(|| format!("adding {}", path.display()))?;
    }
    Ok(b.into_inner()?)
}

/// Writes an OCI image layout at `layout` holding one linux/amd64 image tagged `tag`.
/// Returns the manifest digest.
pub fn write_oci_layout(
    layout: &Path,
    tag: &str,
    layers: &[LayerSpec],
    compression: Compression,
    cmd: &[&str],
) -> Result<String> {
    std::fs::create_dir_all(layout)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        let tar = tar_dir(&l.dir)?;
        diff_ids.push(sha256(&tar));
        let (blob, media_type) = match compression {
            Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Compression::Zstd => (
                zstd::encode_all(tar.as_slice(), 3)?,
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let digest = write_blob(layout, &blob)?;
        let mut d =
            serde_json::json!({"mediaType": media_type, "digest": digest, "size": blob.len()});
        if !l.annotations.is_empty() {
            d["annotations"] = serde_json::to_value(&l.annotations)?;
        }
        descs.push(d);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config)?;
    let config_digest = write_blob(layout, &config)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = write_blob(layout, &manifest)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(manifest_digest)
}

/// Debian's `docker-registry` on 127.0.0.1, storage under a test directory.
pub struct Registry {
    _daemon: Daemon,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Registry {
    /// The registry process (a benchmark counts its CPU: it shares the host with the work).
    pub fn pid(&self) -> Option<u32> {
        self._daemon.pid()
    }

    pub fn start(dir: &Path) -> Result<Registry> {
        std::fs::create_dir_all(dir)?;
        let port = crate::reserve_port()?;
        let addr = format!("127.0.0.1:{}", port.port);
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )?;
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let mut daemon = Daemon::spawn("docker-registry", cmd, &dir.join("registry.log"))?;
        let probe = addr.clone();
        let ready = wait_for("docker-registry to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&probe).is_ok()
        });
        drop(port);
        if let Err(e) = ready {
            let running = daemon.running();
            bail!("{e} (running: {running}): {}", daemon.log_text());
        }
        Ok(Registry {
            _daemon: daemon,
            addr,
        })
    }

    /// Pushes `layout:tag` as `REPO:tag` with skopeo; returns the pullable reference.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> Result<String> {
        let reference = format!("{}/{repo}:{tag}", self.addr);
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}")))?;
        Ok(reference)
    }
}
