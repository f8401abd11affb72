//! cora-snapshotter behind a private, real containerd: pull from a local docker-registry, run
//! containers with runc, inspect and remove snapshots with `ctr`, restart the snapshotter.
use anyhow::{Context, Result};
use cora_tests::containerd::Containerd;
use cora_tests::daemon::wait_for;
use cora_tests::images::{
    Compression, LayerSpec, Registry, busybox_rootfs, whiteout, write_oci_layout,
};
use cora_tests::snapshotter::CoraSnapshotter;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cora-snapshotter"))
}

/// Field order matters: containerd stops (and unmounts) before the snapshotter, the directory
/// goes last.
struct Env {
    ctrd: Containerd,
    snap: Option<CoraSnapshotter>,
    registry: Registry,
    dir: tempfile::TempDir,
}

impl Env {
    fn start(snapshotter_extra: serde_json::Value) -> Result<Env> {
        let dir = tempfile::Builder::new()
            .prefix("cora-ctrd-")
            .tempdir_in("/var/tmp")?;
        let registry = Registry::start(&dir.path().join("registry"))?;
        let sdir = dir.path().join("snapshotter");
        CoraSnapshotter::write_config(&sdir, &snapshotter_extra)?;
        let snap = CoraSnapshotter::start(bin(), &sdir)?;
        let ctrd = Containerd::start(&dir.path().join("containerd"), &[("cora", &snap.socket)])?;
        Ok(Env {
            ctrd,
            snap: Some(snap),
            registry,
            dir,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn restart_snapshotter(&mut self) -> Result<()> {
        let snap = self.snap.take().context("snapshotter not running")?;
        self.snap = Some(snap.restart(bin())?);
        Ok(())
    }

    fn snapshots(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["snapshots", "--snapshotter", "cora"];
        all.extend_from_slice(args);
        self.ctrd.ctr(&all)
    }
}

/// Pushes a one-layer busybox image (`base`) and a two-layer one (`top`: adds /etc/upper and
/// whites out /etc/lower-only). Returns their references.
fn push_images(env: &Env) -> Result<(String, String)> {
    let lower = env.path("img/lower");
    busybox_rootfs(&lower)?;
    std::fs::write(lower.join("etc/lower-only"), "from-lower\n")?;
    let upper = env.path("img/upper");
    std::fs::create_dir_all(upper.join("etc"))?;
    std::fs::write(upper.join("etc/upper"), "from-upper\n")?;
    whiteout(&upper, "etc/lower-only")?;

    let base_layout = env.path("img/base-layout");
    write_oci_layout(
        &base_layout,
        "v1",
        &[LayerSpec::new(&lower)],
        Compression::Zstd,
        &["/bin/sh"],
    )?;
    let top_layout = env.path("img/top-layout");
    write_oci_layout(
        &top_layout,
        "v1",
        &[LayerSpec::new(&lower), LayerSpec::new(&upper)],
        Compression::Zstd,
        &["/bin/sh"],
    )?;
    Ok((
        env.registry.push(&base_layout, "v1", "test/base")?,
        env.registry.push(&top_layout, "v1", "test/top")?,
    ))
}

/// `ctr snapshots ls` rows as (key, parent, kind), sorted.
fn parse_ls(text: &str) -> Vec<(String, String, String)> {
    let mut rows: Vec<_> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [k, kind] => Some((k.to_string(), String::new(), kind.to_string())),
                [k, p, kind] => Some((k.to_string(), p.to_string(), kind.to_string())),
                _ => None,
            }
        })
        .collect();
    rows.sort();
    rows
}

fn task_status(ctrd: &Containerd, id: &str) -> String {
    ctrd.ctr(&["tasks", "ls"])
        .unwrap_or_default()
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_default()
}

#[test]
fn plain_oci_images_pull_run_and_survive_restart() -> Result<()> {
    // Held while the snapshotter binds it (tokio's listener sets SO_REUSEADDR).
    let metrics = cora_tests::reserve_port()?;
    let metrics_port = metrics.port;
    let mut env = Env::start(serde_json::json!({
        "exporterConfig": {"enable": true, "uriPrefix": "/metrics", "port": metrics_port}
    }))?;
    let (base, top) = push_images(&env)?;
    let c = &env.ctrd;

    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cora",
        &base,
    ])?;
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "cora",
        &base,
        "hello",
        "/bin/busybox",
        "echo",
        "hello",
    ])?;
    assert_eq!(out.trim(), "hello");

    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cora",
        &top,
    ])?;
    let script =
        "if test -e /etc/lower-only; then echo present; else echo gone; fi; cat /etc/upper";
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "cora",
        &top,
        "whiteout",
        "/bin/sh",
        "-c",
        script,
    ])?;
    assert_eq!(out.trim(), "gone\nfrom-upper");
    // The shared lower layer itself still has the file.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "cora",
        &base,
        "lower",
        "/bin/cat",
        "/etc/lower-only",
    ])?;
    assert_eq!(out.trim(), "from-lower");

    // Both images share the first layer: two committed snapshots, the second over the first.
    let rows = parse_ls(&env.snapshots(&["ls"])?);
    let committed: Vec<_> = rows.iter().filter(|r| r.2 == "Committed").collect();
    assert_eq!(committed.len(), 2, "{rows:?}");
    let (bottom, upper) = if committed[0].1.is_empty() {
        (committed[0], committed[1])
    } else {
        (committed[1], committed[0])
    };
    assert!(bottom.1.is_empty(), "{rows:?}");
    assert_eq!(upper.1, bottom.0, "{rows:?}");

    let info: serde_json::Value = serde_json::from_str(&env.snapshots(&["info", &upper.0])?)?;
    assert_eq!(info["Kind"], "Committed", "{info}");
    assert_eq!(info["Parent"], bottom.0.as_str(), "{info}");

    // A layer with a child cannot go.
    let out = env
        .ctrd
        .ctr_output(&["snapshots", "--snapshotter", "cora", "rm", &bottom.0])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failed precondition"), "{err}");

    // prepare / mounts / rm through ctr.
    env.snapshots(&["prepare", "scratch", &upper.0])?;
    let mounts = env.snapshots(&["mounts", "/mnt/x", "scratch"])?;
    assert!(mounts.contains("-t overlay"), "{mounts}");
    assert!(
        mounts.contains(&format!(
            "lowerdir={}",
            env.snap
                .as_ref()
                .map(|s| s.root.join("snapshots"))
                .unwrap_or_default()
                .display()
        )),
        "{mounts}"
    );
    let usage = env.snapshots(&["usage", "scratch"])?;
    assert!(usage.contains("scratch"), "{usage}");
    env.snapshots(&["rm", "scratch"])?;
    assert!(
        !parse_ls(&env.snapshots(&["ls"])?)
            .iter()
            .any(|r| r.0 == "scratch")
    );

    // Metrics see the snapshots and the RPCs.
    let page = cora_tests::http_get(metrics_port, "/metrics")?;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("cora_snapshots{kind=\"committed\"} 2"),
        "{page}"
    );
    assert!(
        !page.contains("cora_snapshotter_rpc_total{method=\"Prepare\"} 0"),
        "{page}"
    );
    assert!(cora_tests::http_get(metrics_port, "/other")?.starts_with("HTTP/1.1 404"));

    // A container keeps running while the snapshotter restarts; snapshots survive it.
    let c = &env.ctrd;
    c.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "cora",
        &top,
        "sleeper",
        "/bin/sleep",
        "600",
    ])?;
    wait_for("sleeper running", Duration::from_secs(20), || {
        task_status(c, "sleeper") == "RUNNING"
    })?;
    let before = parse_ls(&env.snapshots(&["ls"])?);
    assert!(
        before.iter().any(|r| r.0 == "sleeper" && r.2 == "Active"),
        "{before:?}"
    );
    env.restart_snapshotter()?;
    // containerd's gRPC client backs off (about 1 s) after seeing the socket refuse connections.
    wait_for("containerd to reconnect", Duration::from_secs(30), || {
        env.snapshots(&["ls"]).is_ok()
    })?;
    let after = parse_ls(&env.snapshots(&["ls"])?);
    assert_eq!(before, after);
    let c = &env.ctrd;
    assert_eq!(task_status(c, "sleeper"), "RUNNING");
    let out = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "probe",
        "sleeper",
        "/bin/cat",
        "/etc/upper",
    ])?;
    assert_eq!(out.trim(), "from-upper");
    c.ctr(&["tasks", "kill", "-s", "SIGKILL", "sleeper"])?;
    wait_for("sleeper stopped", Duration::from_secs(20), || {
        task_status(c, "sleeper") == "STOPPED"
    })?;
    c.ctr(&["tasks", "rm", "sleeper"])?;
    c.ctr(&["containers", "rm", "sleeper"])?;
    let rows = parse_ls(&env.snapshots(&["ls"])?);
    assert!(!rows.iter().any(|r| r.0 == "sleeper"), "{rows:?}");
    Ok(())
}

/// A CORA-annotated image (an index no driver could serve) pulled with `ctr images pull`
/// through a snapshotter with the default config, whose lazy backend here is FUSE: ctr 1.6 hands
/// no layer annotations to the snapshotter, so nothing is claimed remote, containerd unpacks the
/// layer and the container runs. (Such an annotation reaching the snapshotter, through `cora
/// rpull`, is tests/fuse.rs's `unservable_cora_annotation_with_fuse_falls_back_to_unpack`; no
/// lazy backend at all is tests/cri.rs's `..._without_backend_...`.)
#[test]
fn cora_annotated_image_falls_back_to_plain_unpack() -> Result<()> {
    let env = Env::start(serde_json::json!({}))?;
    let rootfs = env.path("img/rootfs");
    busybox_rootfs(&rootfs)?;
    let mut layer = LayerSpec::new(&rootfs);
    layer.annotations.insert(
        "containerd.io/snapshot/cora/index".into(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
    );
    let layout = env.path("img/layout");
    write_oci_layout(&layout, "v1", &[layer], Compression::Zstd, &["/bin/sh"])?;
    let reference = env.registry.push(&layout, "v1", "test/cora")?;
    let c = &env.ctrd;
    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cora",
        &reference,
    ])?;
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "cora",
        &reference,
        "cora",
        "/bin/busybox",
        "echo",
        "fallback",
    ])?;
    assert_eq!(out.trim(), "fallback");
    // Nothing was claimed remote: every committed layer is a local one.
    let rows = parse_ls(&env.snapshots(&["ls"])?);
    assert_eq!(
        rows.iter().filter(|r| r.2 == "Committed").count(),
        1,
        "{rows:?}"
    );
    Ok(())
}
