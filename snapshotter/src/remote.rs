//! Extension point for lazily served CORA layers.
//!
//! containerd's unpacker calls `Prepare(key, parent, labels)` for each layer with the label
//! `containerd.io/snapshot.ref = <chainID>` and the layer descriptor's annotations under
//! `containerd.io/snapshot/` (CORA's converter writes `containerd.io/snapshot/cora/*`). When a
//! [`RemoteLayers`] backend says it can serve the layer, the snapshotter commits `<chainID>` as a
//! *remote* snapshot and answers AlreadyExists, so containerd downloads nothing. An active
//! snapshot (or view) over remote layers then gets the backend's mounted, read-only file system
//! of the nearest remote layer stack as its lowest lowerdir.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Snapshot labels as containerd sends them.
pub type Labels = BTreeMap<String, String>;

/// Set by containerd's unpacker: the name the layer will be committed under (its chainID).
pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";
/// Prefix of the annotations that CORA's converter puts on layer descriptors.
pub const LABEL_CORA_PREFIX: &str = "containerd.io/snapshot/cora/";
/// Set by this snapshotter on snapshots it committed as remote (informational; the metadata
/// store's `remote` flag is authoritative).
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/cora.remote";

/// Whether `labels` ask for a lazily served layer (target ref plus at least one CORA annotation).
pub fn wants_remote(labels: &Labels) -> bool {
    labels.contains_key(LABEL_TARGET_REF) && labels.keys().any(|k| k.starts_with(LABEL_CORA_PREFIX))
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Lazy serving cannot work on this host (e.g. no ublk); layers are unpacked normally.
    #[error("lazy layer serving is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
}

/// Serves CORA layer stacks as mounted read-only file systems.
///
/// `stack_key` is the name of the topmost remote committed snapshot of the stack: the value of
/// the target-ref label, which containerd's metadata layer makes `<namespace>/<n>/<chainID>`, so
/// treat it as opaque. `labels` are that snapshot's labels: its CORA annotations say which index
/// to serve; under CRI (`disable_snapshot_annotations = false`) they also carry
/// `containerd.io/snapshot/cri.image-ref` and `cri.layer-digest` for fetching. The
/// snapshotter reference-counts attachments: `attach` is called once per stack while at least one
/// active snapshot or view uses it (and again after a snapshotter restart, so it must accept an
/// already-attached stack and return the same path); `detach` when the last user is removed and
/// `autoRemoveDev` is set, or on `Cleanup` for unused stacks.
pub trait RemoteLayers: Send + Sync + 'static {
    /// Whether lazy serving can work on this host at all. When it cannot, Prepare does not claim
    /// layers remote and containerd unpacks them as plain OCI layers.
    fn available(&self) -> Result<(), RemoteError>;

    /// Whether this backend can serve the layer described by these Prepare labels.
    fn is_remote(&self, labels: &Labels) -> bool;

    /// Makes the stack's file system available; returns the read-only mount point.
    fn attach(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError>;

    /// Releases what `attach` set up (unmount, remove the device).
    fn detach(&self, stack_key: &str, mountpoint: &Path) -> Result<(), RemoteError>;
}

/// The backend used until the ublk-based one is plugged in: never serves layers lazily, so every
/// CORA image is unpacked as a normal OCI image (with one warning from the snapshotter).
#[derive(Debug, Default)]
pub struct NoRemoteLayers;

impl RemoteLayers for NoRemoteLayers {
    fn available(&self) -> Result<(), RemoteError> {
        Err(RemoteError::Unavailable(
            "this build has no lazy layer backend".into(),
        ))
    }

    fn is_remote(&self, _labels: &Labels) -> bool {
        false
    }

    fn attach(&self, stack_key: &str, _labels: &Labels) -> Result<PathBuf, RemoteError> {
        Err(RemoteError::Unavailable(format!(
            "cannot attach {stack_key}: this build has no lazy layer backend"
        )))
    }

    fn detach(&self, _stack_key: &str, _mountpoint: &Path) -> Result<(), RemoteError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_remote_needs_ref_and_cora_annotation() {
        let mut l = Labels::new();
        l.insert(LABEL_TARGET_REF.into(), "sha256:abc".into());
        assert!(!wants_remote(&l));
        l.insert(format!("{LABEL_CORA_PREFIX}index"), "sha256:def".into());
        assert!(wants_remote(&l));
        l.remove(LABEL_TARGET_REF);
        assert!(!wants_remote(&l));
    }
}
