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

/// The counters a `cora-driver` writes to its stats file; [`RemoteLayers::stats`] sums them.
pub use cora_api::driver::DriverStats;

/// Snapshot labels as containerd sends them.
pub type Labels = BTreeMap<String, String>;

/// Prefix of the annotations that CORA's converter puts on layer descriptors.
pub use blobfmt::oci::annotation::PREFIX as LABEL_CORA_PREFIX;
pub use containerd_api::labels::{
    CRI_IMAGE_LAYERS as LABEL_CRI_IMAGE_LAYERS, CRI_IMAGE_REF as LABEL_CRI_IMAGE_REF,
    CRI_LAYER_DIGEST as LABEL_CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST as LABEL_CRI_MANIFEST_DIGEST,
    TARGET_REF as LABEL_TARGET_REF,
};
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
/// One mutex per key (a layer stack): attaching one stack, which can take seconds, then never
/// holds up work on another. Entries nobody holds are dropped as new keys arrive.
#[derive(Default)]
pub struct KeyedLocks {
    map: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<std::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// The mutex for `key`; lock it with [`lock_ignoring_poison`].
    pub fn get(&self, key: &str) -> std::sync::Arc<std::sync::Mutex<()>> {
        let mut map = lock_ignoring_poison(&self.map);
        map.retain(|k, m| k == key || std::sync::Arc::strong_count(m) > 1);
        map.entry(key.to_owned()).or_default().clone()
    }
}

/// Locks `m`; a panic while it was held cannot have left half-updated state here (what the locks
/// guard is on disk, written atomically), so a poisoned lock is still usable.
pub fn lock_ignoring_poison<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub trait RemoteLayers: Send + Sync + 'static {
    /// Whether lazy serving can work on this host at all. When it cannot, Prepare does not claim
    /// layers remote and containerd unpacks them as plain OCI layers.
    fn available(&self) -> Result<(), RemoteError>;

    /// Whether this backend can serve the layer described by these Prepare labels.
    fn is_remote(&self, labels: &Labels) -> bool;

    /// Makes the stack's file system available; returns the read-only mount point.
    fn attach(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError>;

    /// As `attach`, but only if the stack can be served lazily: no fallback that downloads the
    /// layers (used to start a device ahead of any container, when an image is pulled).
    fn attach_lazy(&self, stack_key: &str, _labels: &Labels) -> Result<PathBuf, RemoteError> {
        Err(RemoteError::Failed(format!(
            "stack {stack_key}: this backend attaches only for a container"
        )))
    }

    /// Releases what `attach` set up (unmount, remove the device).
    fn detach(&self, stack_key: &str, mountpoint: &Path) -> Result<(), RemoteError>;

    /// Stacks still attached from an earlier run (stack key, mount point), so that the
    /// snapshotter can release the ones no snapshot uses any more.
    fn attached(&self) -> Vec<(String, PathBuf)> {
        Vec::new()
    }

    /// At start: deletes devices an earlier run started but never recorded (it was killed
    /// between a device's start and its state file), so they neither leak nor get a second
    /// device mounted over them.
    fn reconcile(&self) {}

    /// Checks the attached stacks' devices and restarts the server of any that died and can be
    /// recovered (a quiesced ublk device: running containers' reads wait in the kernel and
    /// resume). Returns the stacks recovered. Called periodically by the snapshotter.
    fn heal(&self) -> Vec<String> {
        Vec::new()
    }

    /// Lazy-serving counters summed over all devices, past and present.
    fn stats(&self) -> DriverStats {
        DriverStats::default()
    }
}

/// The backend used until the ublk-based one is plugged in: never serves layers lazily, so every
/// CORA image is unpacked as a normal OCI image (with one warning from the snapshotter).
#[derive(Debug)]
pub struct NoRemoteLayers {
    /// Why lazy serving is off, for the snapshotter's one warning.
    reason: String,
}

impl NoRemoteLayers {
    pub fn because(reason: impl Into<String>) -> NoRemoteLayers {
        NoRemoteLayers {
            reason: reason.into(),
        }
    }
}

impl Default for NoRemoteLayers {
    fn default() -> NoRemoteLayers {
        NoRemoteLayers::because("no lazy layer backend is active")
    }
}

impl RemoteLayers for NoRemoteLayers {
    fn available(&self) -> Result<(), RemoteError> {
        Err(RemoteError::Unavailable(self.reason.clone()))
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
