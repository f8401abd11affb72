//! CORA images pulled through containerd's CRI plugin, the path that hands layer annotations to
//! the snapshotter: with a lazy backend the layers are never downloaded and the container sees
//! the backend's file system; without one they are unpacked normally after one warning.
use anyhow::{Context, Result};
use cora_snapshotter::config::Config;
use cora_snapshotter::metrics::Metrics;
use cora_snapshotter::remote::{
    LABEL_CORA_PREFIX, LABEL_REMOTE, Labels, RemoteError, RemoteLayers,
};
use cora_tests::containerd::Containerd;
use cora_tests::cri::{CRI_NAMESPACE, cri_config, pull_image};
use cora_tests::daemon::wait_for;
use cora_tests::images::{Compression, LayerSpec, Registry, busybox_rootfs, write_oci_layout};
use cora_tests::snapshotter::CoraSnapshotter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const INDEX_LABEL: &str = "containerd.io/snapshot/cora/index";

/// Serves a stack from a directory chosen by the layer's `cora/index` annotation.
struct DirLayers {
    by_index: HashMap<String, PathBuf>,
    attached: Mutex<Vec<String>>,
}

impl RemoteLayers for DirLayers {
    fn available(&self) -> Result<(), RemoteError> {
        Ok(())
    }
    fn is_remote(&self, labels: &Labels) -> bool {
        labels
            .get(INDEX_LABEL)
            .is_some_and(|i| self.by_index.contains_key(i))
    }
    fn attach(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError> {
        let index = labels.get(INDEX_LABEL).cloned().unwrap_or_default();
        self.attached
            .lock()
            .map_err(|e| RemoteError::Failed(e.to_string()))?
            .push(stack_key.to_owned());
        self.by_index
            .get(&index)
            .cloned()
            .ok_or_else(|| RemoteError::Failed(format!("unknown index {index}")))
    }
    fn detach(&self, _stack_key: &str, _mountpoint: &Path) -> Result<(), RemoteError> {
        Ok(())
    }
}

/// Every snapshot the snapshotter lists.
async fn list_snapshots(
    client: &mut cora_snapshotter::proto::snapshots::snapshots_client::SnapshotsClient<
        tonic::transport::Channel,
    >,
) -> Result<Vec<cora_snapshotter::proto::snapshots::Info>> {
    let mut stream = client
        .list(cora_snapshotter::proto::snapshots::ListSnapshotsRequest::default())
        .await?
        .into_inner();
    let mut infos = Vec::new();
    while let Some(b) = stream.message().await? {
        infos.extend(b.info);
    }
    Ok(infos)
}

/// A two-layer busybox image whose layers carry CORA index annotations `idx-1`, `idx-2`.
fn cora_image(dir: &Path, registry: &Registry) -> Result<(String, Vec<String>)> {
    let lower = dir.join("img/lower");
    busybox_rootfs(&lower)?;
    std::fs::write(lower.join("etc/lower-only"), "from-lower\n")?;
    let upper = dir.join("img/upper");
    std::fs::create_dir_all(upper.join("etc"))?;
    std::fs::write(upper.join("etc/upper"), "from-upper\n")?;
    let mut layers = vec![LayerSpec::new(&lower), LayerSpec::new(&upper)];
    for (i, l) in layers.iter_mut().enumerate() {
        l.annotations.insert(
            format!("{LABEL_CORA_PREFIX}index"),
            format!("idx-{}", i + 1),
        );
    }
    let layout = dir.join("img/layout");
    write_oci_layout(&layout, "v1", &layers, Compression::Zstd, &["/bin/sh"])?;
    let manifest: serde_json::Value = {
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .context("no manifest")?;
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex))?)?
    };
    let layer_digests = manifest["layers"]
        .as_array()
        .context("no layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect();
    Ok((registry.push(&layout, "v1", "test/cora")?, layer_digests))
}

fn tmpdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("cora-cri-")
        .tempdir_in("/var/tmp")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_of_cora_image_is_served_lazily() -> Result<()> {
    let dir = tmpdir()?;
    let registry = Registry::start(&dir.path().join("registry"))?;
    let (reference, layer_digests) = cora_image(dir.path(), &registry)?;

    // The "attached" stack of the top layer: the image's files plus one the layers do not have,
    // so the container proves where its root file system came from.
    let stack = dir.path().join("stack-2");
    busybox_rootfs(&stack)?;
    std::fs::write(stack.join("etc/upper"), "from-upper\n")?;
    std::fs::write(stack.join("marker"), "served lazily\n")?;
    let backend = Arc::new(DirLayers {
        by_index: [
            ("idx-1".to_owned(), dir.path().join("stack-1")),
            ("idx-2".to_owned(), stack.clone()),
        ]
        .into_iter()
        .collect(),
        attached: Mutex::new(Vec::new()),
    });

    let config = Config::from_json_str(
        Path::new("test"),
        &serde_json::json!({
            "root": dir.path().join("snap-root"),
            "address": dir.path().join("cora.sock"),
        })
        .to_string(),
    )?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let config = config.clone();
        let backend: Arc<dyn RemoteLayers> = backend.clone();
        tokio::spawn(async move {
            cora_snapshotter::serve(&config, backend, Arc::new(Metrics::default()), async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    wait_for("snapshotter socket", Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&config.address).is_ok()
    })?;
    let cri = cri_config("cora", &[&registry.addr]);
    let ctrd = Containerd::start_with(
        &dir.path().join("containerd"),
        &[("cora", &config.address)],
        Some(&cri),
    )?;

    let pulled = pull_image(&ctrd.address, &reference).await;
    pulled.with_context(|| format!("containerd log:\n{}", ctrd.log_text()))?;

    // Both layers were committed remote, and containerd fetched neither blob.
    let mut client = cora_snapshotter::client::connect(&config.address).await?;
    let infos = list_snapshots(&mut client).await?;
    let remote = infos
        .iter()
        .filter(|i| i.labels.get(LABEL_REMOTE).is_some_and(|v| v == "true"))
        .count();
    assert_eq!(remote, 2, "{infos:?}");
    let content = ctrd.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"])?;
    for d in &layer_digests {
        assert!(
            !content.contains(d.as_str()),
            "layer {d} was downloaded: {content}"
        );
    }

    // A container over the image reads the backend's file system.
    let id = format!("{}-lazy", ctrd.namespace);
    let out = ctrd.ctr_in(
        CRI_NAMESPACE,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "cora",
            &reference,
            &id,
            "/bin/cat",
            "/marker",
            "/etc/upper",
        ],
    )?;
    assert_eq!(out, "served lazily\nfrom-upper\n");
    let attached = backend
        .attached
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default();
    assert_eq!(attached.len(), 1, "{attached:?}");

    // Removing the image (CRI records it by tag, digest and id) lets containerd's garbage
    // collection remove its remote layers from the snapshotter too.
    let images = ctrd.ctr_in(CRI_NAMESPACE, &["images", "ls", "-q"])?;
    for name in images.lines().filter(|l| !l.trim().is_empty()) {
        ctrd.ctr_in(CRI_NAMESPACE, &["images", "rm", "--sync", name.trim()])?;
    }
    let left: Vec<String> = list_snapshots(&mut client)
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert!(
        left.is_empty(),
        "snapshots left after the image went: {left:?}"
    );

    drop(ctrd);
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_of_cora_image_without_backend_unpacks_with_one_warning() -> Result<()> {
    let dir = tmpdir()?;
    let registry = Registry::start(&dir.path().join("registry"))?;
    let (reference, layer_digests) = cora_image(dir.path(), &registry)?;
    let sdir = dir.path().join("snapshotter");
    // No lazy backend: on a host with FUSE the default transport (auto) would be one, so ask
    // for ublk, which this host (and any without ublk) lacks.
    CoraSnapshotter::write_config(
        &sdir,
        &serde_json::json!({"verbose": "info", "transport": "ublk"}),
    )?;
    let snap = CoraSnapshotter::start(Path::new(env!("CARGO_BIN_EXE_cora-snapshotter")), &sdir)?;
    let cri = cri_config("cora", &[&registry.addr]);
    let ctrd = Containerd::start_with(
        &dir.path().join("containerd"),
        &[("cora", &snap.socket)],
        Some(&cri),
    )?;
    let pulled = pull_image(&ctrd.address, &reference).await;
    pulled.with_context(|| format!("containerd log:\n{}", ctrd.log_text()))?;

    let log = snap.daemon.log_text();
    let warnings = log
        .matches("CORA images are unpacked as plain OCI images")
        .count();
    assert_eq!(warnings, 1, "{log}");
    let content = ctrd.ctr_in(CRI_NAMESPACE, &["content", "ls", "-q"])?;
    for d in &layer_digests {
        assert!(content.contains(d.as_str()), "layer {d} missing: {content}");
    }
    let id = format!("{}-plain", ctrd.namespace);
    let out = ctrd.ctr_in(
        CRI_NAMESPACE,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "cora",
            &reference,
            &id,
            "/bin/cat",
            "/etc/lower-only",
            "/etc/upper",
        ],
    )?;
    assert_eq!(out, "from-lower\nfrom-upper\n");
    Ok(())
}
