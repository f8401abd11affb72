//! `cora rpull` against a private, real containerd 1.6 with runc, the cora-snapshotter daemon and
//! Debian's docker-registry: plain OCI images, CORA images on a host without ublk (unpacked after
//! one snapshotter warning), containerd's own overlayfs snapshotter, and bad input.
use anyhow::{Context, Result};
use cora_tests::containerd::Containerd;
use cora_tests::fixtures::cora_bin;
use cora_tests::images::{Compression, LayerSpec, Registry, busybox_rootfs, write_oci_layout};
use cora_tests::snapshotter::CoraSnapshotter;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Field order matters: containerd stops (and unmounts) before the snapshotter, the directory
/// goes last.
struct Env {
    ctrd: Containerd,
    snap: CoraSnapshotter,
    registry: Registry,
    dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Result<Env> {
        let dir = tempfile::Builder::new()
            .prefix("cora-rpull-")
            .tempdir_in("/var/tmp")?;
        let registry = Registry::start(&dir.path().join("registry"))?;
        let snap = CoraSnapshotter::start(
            &cora_bin("cora-snapshotter"),
            &dir.path().join("snapshotter"),
        )?;
        let ctrd = Containerd::start(&dir.path().join("containerd"), &[("cora", &snap.socket)])?;
        Ok(Env {
            ctrd,
            snap,
            registry,
            dir,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `cora rpull` against this containerd; `extra` goes before the reference.
    fn rpull_output(&self, reference: &str, extra: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(cora_bin("cora"));
        cmd.args(["--insecure", &self.registry.addr, "rpull", "--address"])
            .arg(&self.ctrd.address)
            .args(["--namespace", &self.ctrd.namespace])
            .args(extra)
            .arg(reference);
        cmd.output().with_context(|| format!("running {cmd:?}"))
    }

    fn rpull(&self, reference: &str, extra: &[&str]) -> Result<String> {
        let out = self.rpull_output(reference, extra)?;
        anyhow::ensure!(
            out.status.success(),
            "cora rpull {reference} failed ({}): {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.ctrd.log_text()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn images(&self) -> Result<Vec<String>> {
        Ok(self
            .ctrd
            .ctr(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_owned)
            .collect())
    }

    fn run(&self, snapshotter: &str, reference: &str, id: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["run", "--rm", "--snapshotter", snapshotter, reference, id];
        args.extend_from_slice(cmd);
        self.ctrd.ctr(&args)
    }
}

/// Pushes a two-layer busybox image (the upper layer adds /etc/upper) as `test/app:v1`; returns
/// the reference and the layer digests.
fn push_app(env: &Env) -> Result<(String, Vec<String>)> {
    let lower = env.path("img/lower");
    busybox_rootfs(&lower)?;
    std::fs::write(lower.join("etc/lower"), "from-lower\n")?;
    let upper = env.path("img/upper");
    std::fs::create_dir_all(upper.join("etc"))?;
    std::fs::write(upper.join("etc/upper"), "from-upper\n")?;
    let layout = env.path("img/layout");
    write_oci_layout(
        &layout,
        "v1",
        &[LayerSpec::new(&lower), LayerSpec::new(&upper)],
        Compression::Zstd,
        &["/bin/sh"],
    )?;
    let reference = env.registry.push(&layout, "v1", "test/app")?;
    Ok((reference, layer_digests(&layout)?))
}

fn layer_digests(layout: &Path) -> Result<Vec<String>> {
    let read = |digest: &str| -> Result<serde_json::Value> {
        let hex = digest.trim_start_matches("sha256:");
        Ok(serde_json::from_slice(&std::fs::read(
            layout.join("blobs/sha256").join(hex),
        )?)?)
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifest = read(
        index["manifests"][0]["digest"]
            .as_str()
            .context("no manifest in index.json")?,
    )?;
    Ok(manifest["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect())
}

/// Converts `src` (in the test registry) to the CORA image `test/app:cora`.
fn convert(env: &Env, src: &str) -> Result<String> {
    let dst = format!("{}/test/app:cora", env.registry.addr);
    let out = Command::new(cora_bin("cora"))
        .args(["--insecure", &env.registry.addr, "convert", src, &dst])
        .arg("--work")
        .arg(env.path("convert-work"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cora convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dst)
}

fn content_digests(env: &Env) -> Result<String> {
    env.ctrd.ctr(&["content", "ls", "-q"])
}

#[test]
fn plain_oci_image_is_unpacked_and_runs() -> Result<()> {
    let env = Env::start()?;
    let (reference, layers) = push_app(&env)?;

    let out = env.rpull(&reference, &["--snapshotter", "cora"])?;
    assert_eq!(out.matches(": unpacked, fetched ").count(), 2, "{out}");
    assert!(env.images()?.contains(&reference), "{:?}", env.images()?);
    let content = content_digests(&env)?;
    for l in &layers {
        assert!(content.contains(l.as_str()), "{l} not in {content}");
    }

    let out = env.run(
        "cora",
        &reference,
        "rpull-plain",
        &["/bin/cat", "/etc/lower", "/etc/upper"],
    )?;
    assert_eq!(out, "from-lower\nfrom-upper\n");

    // Without the layer blobs in the content store, a second rpull still fetches none: the
    // snapshots exist, so nothing is downloaded or unpacked again.
    let snapshots = env
        .ctrd
        .ctr(&["snapshots", "--snapshotter", "cora", "ls"])?;
    for l in &layers {
        env.ctrd.ctr(&["content", "rm", l])?;
    }
    let out = env.rpull(&reference, &["--snapshotter", "cora"])?;
    assert_eq!(out.matches(": present, fetched 0 of ").count(), 2, "{out}");
    let content = content_digests(&env)?;
    for l in &layers {
        assert!(
            !content.contains(l.as_str()),
            "{l} fetched again: {content}"
        );
    }
    assert_eq!(
        env.ctrd
            .ctr(&["snapshots", "--snapshotter", "cora", "ls"])?,
        snapshots
    );
    assert_eq!(env.images()?.iter().filter(|i| **i == reference).count(), 1);
    let out = env.run(
        "cora",
        &reference,
        "rpull-plain-2",
        &["/bin/cat", "/etc/upper"],
    )?;
    assert_eq!(out, "from-upper\n");
    Ok(())
}

#[test]
fn cora_image_without_ublk_is_unpacked_and_runs_on_both_snapshotters() -> Result<()> {
    let env = Env::start()?;
    let (src, _) = push_app(&env)?;
    let reference = convert(&env, &src)?;

    let out = env.rpull(&reference, &["--snapshotter", "cora"])?;
    assert_eq!(out.matches(": unpacked, fetched ").count(), 2, "{out}");
    assert!(env.images()?.contains(&reference));
    let out = env.run(
        "cora",
        &reference,
        "rpull-cora",
        &["/bin/cat", "/etc/lower", "/etc/upper"],
    )?;
    assert_eq!(out, "from-lower\nfrom-upper\n");
    // The snapshotter declined lazy serving (no ublk here) with exactly one warning.
    let log = std::fs::read_to_string(env.snap.root.with_file_name("snapshotter.log"))?;
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("unpacked as plain OCI images"),
        "{warnings:?}"
    );

    // containerd's built-in overlayfs snapshotter: no CORA anywhere on the containerd side.
    let out = env.rpull(&reference, &["--snapshotter", "overlayfs"])?;
    assert_eq!(out.matches(": unpacked, fetched 0 of ").count(), 2, "{out}");
    let out = env.run(
        "overlayfs",
        &reference,
        "rpull-overlayfs",
        &["/bin/cat", "/etc/upper"],
    )?;
    assert_eq!(out, "from-upper\n");
    Ok(())
}

#[test]
fn bad_input_gives_clear_errors_and_no_image() -> Result<()> {
    let env = Env::start()?;
    let (reference, _) = push_app(&env)?;
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    let missing = format!("{}/test/app:nope", env.registry.addr);
    let out = env.rpull_output(&missing, &[])?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("fetching the manifest of") && err.contains("not found"),
        "{err}"
    );

    let out = env.rpull_output(&reference, &["--snapshotter", "nosuch"])?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no snapshotter \"nosuch\""), "{err}");

    let out = env.rpull_output("not a reference", &[])?;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("bad image reference"),
        "{}",
        stderr(&out)
    );

    assert_eq!(env.images()?, Vec::<String>::new());

    let gone = env.path("no-such-dir/containerd.sock");
    let out = Command::new(cora_bin("cora"))
        .args(["rpull", "--address"])
        .arg(&gone)
        .arg(&reference)
        .output()?;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach containerd at {}", gone.display())),
        "{err}"
    );
    Ok(())
}
