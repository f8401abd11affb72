//! The snapshots gRPC service driven directly with a tonic client: containerd's semantics and
//! status codes, restart and crash recovery, config errors, the CORA fallback and remote path.
use anyhow::{Context, Result};
use cora_snapshotter::client::connect;
use cora_snapshotter::config::Config;
use cora_snapshotter::proto::snapshots::snapshots_client::SnapshotsClient;
use cora_snapshotter::proto::snapshots::{self as pb, Kind};
use cora_snapshotter::remote::{
    LABEL_CORA_PREFIX, LABEL_REMOTE, LABEL_TARGET_REF, Labels, RemoteError, RemoteLayers,
};
use cora_tests::snapshotter::CoraSnapshotter;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use tonic::Code;
use tonic::transport::Channel;

type Client = SnapshotsClient<Channel>;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cora-snapshotter"))
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn prepare(
    c: &mut Client,
    key: &str,
    parent: &str,
    l: HashMap<String, String>,
) -> Result<Vec<cora_snapshotter::proto::types::Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "cora".into(),
        key: key.into(),
        parent: parent.into(),
        labels: l,
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn view(
    c: &mut Client,
    key: &str,
    parent: &str,
) -> Result<Vec<cora_snapshotter::proto::types::Mount>, tonic::Status> {
    c.view(pb::ViewSnapshotRequest {
        snapshotter: "cora".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "cora".into(),
        name: name.into(),
        key: key.into(),
        labels: labels(&[("layer", name)]),
    })
    .await
    .map(|_| ())
}

async fn remove(c: &mut Client, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "cora".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

async fn stat(c: &mut Client, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "cora".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.unwrap_or_default())
}

async fn list(c: &mut Client) -> Result<Vec<pb::Info>> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest::default())
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn tmpdir() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("cora-grpc-")
        .tempdir_in("/var/tmp")?)
}

#[tokio::test]
async fn snapshot_semantics_and_status_codes() -> Result<()> {
    let dir = tmpdir()?;
    let snap = CoraSnapshotter::start(bin(), dir.path())?;
    let mode = std::fs::metadata(&snap.socket)?;
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    let mut c = connect(&snap.socket).await?;
    let fs_of = |id: &str| snap.root.join("snapshots").join(id).join("fs");

    // Active without parent: a read-write bind of its own fs dir.
    let m = prepare(&mut c, "a", "", HashMap::new()).await?;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    let a_fs = PathBuf::from(&m[0].source);
    assert_eq!(a_fs, fs_of("1"));
    std::fs::write(a_fs.join("file"), vec![7u8; 100_000])?;
    assert_eq!(
        code(prepare(&mut c, "a", "", HashMap::new()).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(prepare(&mut c, "", "", HashMap::new()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(prepare(&mut c, "x", "nope", HashMap::new()).await),
        Code::NotFound
    );
    assert_eq!(
        code(prepare(&mut c, "x", "a", HashMap::new()).await),
        Code::InvalidArgument
    );
    assert_eq!(code(stat(&mut c, "nope").await), Code::NotFound);
    let info = stat(&mut c, "a").await?;
    assert_eq!(info.kind, Kind::Active as i32);
    assert!(info.created_at.is_some_and(|t| t.seconds > 1_600_000_000));

    let usage = c
        .usage(pb::UsageRequest {
            snapshotter: "cora".into(),
            key: "a".into(),
        })
        .await?
        .into_inner();
    assert!(usage.size >= 100_000 && usage.inodes == 2, "{usage:?}");

    // Commit: the active becomes a committed lower under a new name.
    commit(&mut c, "base", "a").await?;
    assert_eq!(code(commit(&mut c, "base2", "a").await), Code::NotFound);
    assert_eq!(code(stat(&mut c, "a").await), Code::NotFound);
    let info = stat(&mut c, "base").await?;
    assert_eq!(info.kind, Kind::Committed as i32);
    assert_eq!(info.labels.get("layer").map(String::as_str), Some("base"));
    let committed_usage = c
        .usage(pb::UsageRequest {
            snapshotter: "cora".into(),
            key: "base".into(),
        })
        .await?
        .into_inner();
    assert_eq!(committed_usage, usage);
    assert_eq!(
        code(
            c.mounts(pb::MountsRequest {
                snapshotter: "cora".into(),
                key: "base".into()
            })
            .await
        ),
        Code::FailedPrecondition
    );

    // Second layer, then an active over both: overlay, nearest lower first.
    prepare(&mut c, "b", "base", HashMap::new()).await?;
    assert_eq!(code(commit(&mut c, "base", "b").await), Code::AlreadyExists);
    commit(&mut c, "top", "b").await?;
    let m = prepare(&mut c, "ctr", "top", HashMap::new()).await?;
    assert_eq!(m[0].r#type, "overlay");
    let lowerdir = format!("lowerdir={}:{}", fs_of("2").display(), fs_of("1").display());
    assert!(m[0].options.contains(&lowerdir), "{:?}", m[0].options);
    assert!(
        m[0].options
            .contains(&format!("upperdir={}", fs_of("3").display()))
    );
    assert!(m[0].options.iter().any(|o| o.starts_with("workdir=")));
    let again = c
        .mounts(pb::MountsRequest {
            snapshotter: "cora".into(),
            key: "ctr".into(),
        })
        .await?
        .into_inner()
        .mounts;
    assert_eq!(again, m);

    // Views: one parent → read-only bind of it; two → read-only overlay; never committable.
    let v = view(&mut c, "v1", "base").await?;
    assert_eq!(
        (v[0].r#type.as_str(), v[0].source.clone()),
        ("bind", fs_of("1").display().to_string())
    );
    assert_eq!(v[0].options, ["ro", "rbind"]);
    let v = view(&mut c, "v2", "top").await?;
    assert_eq!(v[0].r#type, "overlay");
    assert_eq!(v[0].options, std::slice::from_ref(&lowerdir));
    assert_eq!(
        code(commit(&mut c, "vc", "v1").await),
        Code::FailedPrecondition
    );
    assert_eq!(stat(&mut c, "v1").await?.kind, Kind::View as i32);

    // Update: labels only, by field path.
    let mut info = stat(&mut c, "top").await?;
    info.labels = labels(&[("a", "1"), ("b", "2")]);
    let up = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "cora".into(),
            info: Some(info.clone()),
            update_mask: None,
        })
        .await?
        .into_inner()
        .info
        .context("no info")?;
    assert_eq!(up.labels, labels(&[("a", "1"), ("b", "2")]));
    info.labels = labels(&[("a", "9")]);
    let up = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "cora".into(),
            info: Some(info.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels.a".into(), "labels.b".into()],
            }),
        })
        .await?
        .into_inner()
        .info
        .context("no info")?;
    assert_eq!(up.labels, labels(&[("a", "9")]));
    assert_eq!(up.parent, "base");
    let bad = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "cora".into(),
            info: Some(info.clone()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
    info.name = "nope".into();
    let missing = c
        .update(pb::UpdateSnapshotRequest {
            snapshotter: "cora".into(),
            info: Some(info),
            update_mask: None,
        })
        .await;
    assert_eq!(code(missing), Code::NotFound);

    // List sees everything; Remove refuses parents and unknown keys.
    let names: Vec<String> = list(&mut c).await?.into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["base", "ctr", "top", "v1", "v2"]);
    assert_eq!(code(remove(&mut c, "base").await), Code::FailedPrecondition);
    assert_eq!(code(remove(&mut c, "top").await), Code::FailedPrecondition);
    for k in ["ctr", "v2", "top", "v1", "base"] {
        remove(&mut c, k).await?;
    }
    assert_eq!(code(remove(&mut c, "base").await), Code::NotFound);
    assert!(list(&mut c).await?.is_empty());
    let left: Vec<_> = std::fs::read_dir(snap.root.join("snapshots"))?.collect();
    assert!(left.is_empty(), "{left:?}");
    c.cleanup(pb::CleanupRequest::default()).await?;
    Ok(())
}

#[tokio::test]
async fn restart_and_crash_keep_snapshots_and_drop_orphans() -> Result<()> {
    let dir = tmpdir()?;
    let mut snap = CoraSnapshotter::start(bin(), dir.path())?;
    let mut c = connect(&snap.socket).await?;
    prepare(&mut c, "a", "", HashMap::new()).await?;
    commit(&mut c, "base", "a").await?;
    prepare(&mut c, "work", "base", HashMap::new()).await?;
    let before = list(&mut c).await?;
    drop(c);

    // SIGKILL, then leave what a crash mid-create / mid-remove would: dirs without records.
    snap.daemon.kill()?;
    let snapshots = snap.root.join("snapshots");
    for orphan in ["77", "tmp-78", "rm-1000"] {
        std::fs::create_dir_all(snapshots.join(orphan).join("fs"))?;
    }
    let snap = snap.restart(bin())?;
    let mut c = connect(&snap.socket).await?;
    assert_eq!(list(&mut c).await?, before);
    let mut dirs: Vec<String> = std::fs::read_dir(&snapshots)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    dirs.sort();
    assert_eq!(dirs, ["1", "2"]);

    // A crash between the metadata commit and the rename: recovered on start.
    std::fs::rename(snapshots.join("2"), snapshots.join("tmp-2"))?;
    drop(c);
    let snap = snap.restart(bin())?;
    assert!(snapshots.join("2/fs").is_dir());
    let mut c = connect(&snap.socket).await?;
    let m = c
        .mounts(pb::MountsRequest {
            snapshotter: "cora".into(),
            key: "work".into(),
        })
        .await?
        .into_inner()
        .mounts;
    assert_eq!(m[0].r#type, "overlay");

    // A crash in Remove between the rename and the metadata commit: the record is still
    // there, so its directory is put back, not deleted as an orphan.
    std::fs::write(snapshots.join("2/fs/kept"), b"data")?;
    std::fs::rename(snapshots.join("2"), snapshots.join("rm-2"))?;
    drop(c);
    let snap = snap.restart(bin())?;
    assert_eq!(std::fs::read(snapshots.join("2/fs/kept"))?, b"data");
    assert!(!snapshots.join("rm-2").exists());
    let mut c = connect(&snap.socket).await?;
    assert_eq!(list(&mut c).await?, before);
    Ok(())
}

#[test]
fn bad_config_fails_with_a_clear_message() -> Result<()> {
    let dir = tmpdir()?;
    for (body, expect) in [
        (r#"{"root":"/tmp/x","rootdir":"/y"}"#, "rootdir"),
        (r#"{"rwMode":"ext4"}"#, "rwMode"),
        (
            r#"{"exporterConfig":{"enable":true,"port":"abc"}}"#,
            "exporterConfig.port",
        ),
        (r#"{"cacheSize":"lots"}"#, "cacheSize"),
    ] {
        let path = dir.path().join("bad.json");
        std::fs::write(&path, body)?;
        let out = Command::new(bin()).arg("--config").arg(&path).output()?;
        assert!(!out.status.success(), "{body}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{body}: {err}");
    }
    let out = Command::new(bin())
        .arg("--config")
        .arg(dir.path().join("missing.json"))
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.json"));
    Ok(())
}

fn cora_labels(target: &str) -> HashMap<String, String> {
    labels(&[
        (LABEL_TARGET_REF, target),
        (&format!("{LABEL_CORA_PREFIX}index"), "sha256:1234"),
    ])
}

#[tokio::test]
async fn cora_layers_fall_back_to_unpack_with_one_warning() -> Result<()> {
    let dir = tmpdir()?;
    // No lazy backend in the daemon (ublk only, and the host has none; FUSE, which `auto`
    // would pick here, is not asked for): Prepare must not claim the layer, containerd
    // unpacks it.
    CoraSnapshotter::write_config(dir.path(), &serde_json::json!({"transport": "ublk"}))?;
    let snap = CoraSnapshotter::start(bin(), dir.path())?;
    let mut c = connect(&snap.socket).await?;
    let m = prepare(&mut c, "extract-1 sha256:l1", "", cora_labels("sha256:l1")).await?;
    assert_eq!(m[0].r#type, "bind");
    commit(&mut c, "sha256:l1", "extract-1 sha256:l1").await?;
    let m = prepare(
        &mut c,
        "extract-2 sha256:l2",
        "sha256:l1",
        cora_labels("sha256:l2"),
    )
    .await?;
    assert_eq!(m[0].r#type, "overlay");
    let warnings = snap
        .daemon
        .log_text()
        .matches("CORA images are unpacked as plain OCI images")
        .count();
    assert_eq!(warnings, 1, "{}", snap.daemon.log_text());
    assert!(
        !stat(&mut c, "sha256:l1")
            .await?
            .labels
            .contains_key(LABEL_REMOTE)
    );
    Ok(())
}

/// A backend that "attaches" a stack by pointing at a directory the test filled, and records
/// calls: enough to check label handling, reference counting and mount composition.
#[derive(Default)]
struct DirLayers {
    dirs: HashMap<String, PathBuf>,
    calls: Mutex<Vec<String>>,
}

impl RemoteLayers for DirLayers {
    fn available(&self) -> Result<(), RemoteError> {
        Ok(())
    }
    fn is_remote(&self, labels: &Labels) -> bool {
        labels
            .get(LABEL_TARGET_REF)
            .is_some_and(|t| self.dirs.contains_key(t))
    }
    fn attach(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError> {
        assert!(labels.contains_key(&format!("{LABEL_CORA_PREFIX}index")));
        self.calls
            .lock()
            .unwrap()
            .push(format!("attach {stack_key}"));
        self.dirs
            .get(stack_key)
            .cloned()
            .ok_or_else(|| RemoteError::Failed(format!("no stack {stack_key}")))
    }
    fn detach(&self, stack_key: &str, _mountpoint: &Path) -> Result<(), RemoteError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("detach {stack_key}"));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_layers_commit_attach_refcount_and_mount() -> Result<()> {
    let dir = tmpdir()?;
    let stack = dir.path().join("stack-l2");
    std::fs::create_dir_all(&stack)?;
    std::fs::write(stack.join("marker"), "served lazily\n")?;
    let backend = Arc::new(DirLayers {
        dirs: [
            ("sha256:l1".to_owned(), dir.path().join("unused")),
            ("sha256:l2".to_owned(), stack.clone()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    });
    let config = Config::from_json_str(
        Path::new("test"),
        &serde_json::json!({
            "root": dir.path().join("root"),
            "address": dir.path().join("cora.sock"),
            "autoRemoveDev": true,
        })
        .to_string(),
    )?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = Arc::new(cora_snapshotter::metrics::Metrics::default());
    let devices = || metrics.devices.load(std::sync::atomic::Ordering::Relaxed);
    let server = {
        let metrics = metrics.clone();
        let config = config.clone();
        let backend: Arc<dyn RemoteLayers> = backend.clone();
        tokio::spawn(async move {
            cora_snapshotter::serve(&config, backend, metrics, async {
                let _ = stop_rx.await;
            })
            .await
        })
    };
    cora_tests::daemon::wait_for("socket", std::time::Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&config.address).is_ok()
    })?;
    let mut c = connect(&config.address).await?;

    // containerd's unpacker: Prepare with the target ref → AlreadyExists → Stat(target) works.
    let r = prepare(&mut c, "extract-1 sha256:l1", "", cora_labels("sha256:l1")).await;
    assert_eq!(code(r), Code::AlreadyExists);
    let r = prepare(
        &mut c,
        "extract-2 sha256:l2",
        "sha256:l1",
        cora_labels("sha256:l2"),
    )
    .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let l2 = stat(&mut c, "sha256:l2").await?;
    assert_eq!(l2.kind, Kind::Committed as i32);
    assert_eq!(l2.parent, "sha256:l1");
    assert_eq!(
        l2.labels.get(LABEL_REMOTE).map(String::as_str),
        Some("true")
    );
    assert_eq!(
        code(stat(&mut c, "extract-2 sha256:l2").await),
        Code::NotFound
    );
    assert!(
        backend.calls.lock().unwrap().is_empty(),
        "nothing attaches before a container"
    );

    // A container over the stack: lowerdir is the attached stack only (it holds every layer).
    let m = prepare(&mut c, "ctr1", "sha256:l2", HashMap::new()).await?;
    assert_eq!(m[0].r#type, "overlay");
    assert!(
        m[0].options
            .contains(&format!("lowerdir={}", stack.display())),
        "{:?}",
        m[0].options
    );
    let m2 = view(&mut c, "ctr2", "sha256:l2").await?;
    assert_eq!(m2[0].r#type, "bind");
    assert_eq!(m2[0].source, stack.display().to_string());
    assert_eq!(*backend.calls.lock().unwrap(), ["attach sha256:l2"]);
    assert_eq!(devices(), 1);

    // Mount the overlay for real: the container sees the stack's files and writes to its upper.
    let target = dir.path().join("mnt");
    std::fs::create_dir_all(&target)?;
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &m[0].options.join(",")])
        .arg(&target)
        .status()?;
    assert!(status.success());
    let seen = std::fs::read_to_string(target.join("marker"));
    std::fs::write(target.join("new"), "x")?;
    Command::new("umount").arg(&target).status()?;
    assert_eq!(seen?, "served lazily\n");
    assert!(
        !stack.join("new").exists(),
        "writes must not reach the stack"
    );

    // A local layer committed over the remote one sits above the stack.
    commit(&mut c, "sha256:l3", "ctr1").await?;
    let m = prepare(&mut c, "ctr3", "sha256:l3", HashMap::new()).await?;
    let l3_fs = config.root.join("snapshots/3/fs");
    assert!(
        m[0].options
            .contains(&format!("lowerdir={}:{}", l3_fs.display(), stack.display())),
        "{:?}",
        m[0].options
    );
    assert_eq!(
        code(remove(&mut c, "sha256:l1").await),
        Code::FailedPrecondition
    );

    // autoRemoveDev: the stack is detached when its last user goes.
    remove(&mut c, "ctr2").await?;
    assert!(
        !backend
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("detach"))
    );
    remove(&mut c, "ctr3").await?;
    assert_eq!(
        backend.calls.lock().unwrap().last().map(String::as_str),
        Some("detach sha256:l2")
    );
    assert_eq!(devices(), 0);
    for k in ["sha256:l3", "sha256:l2", "sha256:l1"] {
        remove(&mut c, k).await?;
    }
    assert!(list(&mut c).await?.is_empty());
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}
