//! Snapshot operations with containerd's semantics (snapshots/storage + the overlayfs
//! snapshotter), on a metadata store plus one directory per snapshot:
//!
//! ```text
//! <root>/metadata.redb
//! <root>/snapshots/<id>/fs     upper dir of an active snapshot, lower dir once committed
//! <root>/snapshots/<id>/work   overlayfs work dir (active snapshots)
//! ```
//!
//! Crash safety: a new snapshot's directory is built as `snapshots/tmp-<id>`, the metadata
//! transaction commits, then the directory is renamed to `<id>`. A removed snapshot's directory is
//! renamed to `rm-<id>` before its record's deletion commits, then deleted. On start (and on
//! Cleanup) `tmp-<id>` or `rm-<id>` whose record exists is renamed into place (a creation that
//! committed, a removal that did not), and every other directory without a record is deleted,
//! so a crash at any point leaves either a whole snapshot or none.
use crate::metrics::{Metrics, SnapshotCounts};
use crate::remote::{
    KeyedLocks, LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_LAYER_DIGEST, LABEL_REMOTE, LABEL_TARGET_REF,
    Labels, RemoteLayers, lock_ignoring_poison as lock, wants_remote,
};
use crate::store::{Kind, Nanos, Record, Store, StoreError, WriteTxn, now};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use tracing::{debug, info, warn};

/// Errors map one-to-one onto the gRPC codes containerd's errdefs understands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        Error::Internal(e.to_string())
    }
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let msg = format!("{what} {}", path.display());
    move |e| Error::Internal(format!("{msg}: {e}"))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A mount in containerd's terms (`containerd.types.Mount` without a target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub created: Nanos,
    pub updated: Nanos,
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

#[derive(Debug)]
struct Attachment {
    mountpoint: PathBuf,
    refs: usize,
}

pub struct Snapshotter {
    root: PathBuf,
    store: Store,
    remote: Arc<dyn RemoteLayers>,
    auto_remove_dev: bool,
    metrics: Arc<Metrics>,
    /// Serialises mutations so a directory rename and its metadata commit are never interleaved
    /// with another mutation or with Cleanup. Lock order: `lock`, then a stack lock, then
    /// `attachments`.
    lock: Mutex<()>,
    /// Serialise attach, reference counting and detach per remote stack, so a slow attach (a
    /// device start and mount) holds up neither `lock` nor other stacks.
    stack_locks: KeyedLocks,
    attachments: Mutex<HashMap<String, Attachment>>,
    warned_fallback: AtomicBool,
    /// Set by [`Snapshotter::attach_on_pull`]: the handle a background attach at pull holds.
    me: OnceLock<Weak<Snapshotter>>,
    pull_attaches: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Snapshotter {
    /// Opens (or creates) the snapshotter state under `root`, finishes or discards what a crash
    /// left half done, and re-attaches the remote stacks that live snapshots use.
    pub fn open(
        root: &Path,
        remote: Arc<dyn RemoteLayers>,
        auto_remove_dev: bool,
        metrics: Arc<Metrics>,
    ) -> Result<Snapshotter> {
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io_err("creating", &snapshots))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", root))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let sn = Snapshotter {
            root: root.to_owned(),
            store,
            remote,
            auto_remove_dev,
            metrics,
            lock: Mutex::new(()),
            stack_locks: KeyedLocks::default(),
            attachments: Mutex::new(HashMap::new()),
            warned_fallback: AtomicBool::new(false),
            me: OnceLock::new(),
            pull_attaches: Mutex::new(Vec::new()),
        };
        sn.recover_dirs()?;
        sn.remote.reconcile();
        for (key, rec) in sn.store.all()? {
            if let Some(stack) = &rec.stack
                && let Err(e) = sn.acquire(stack)
            {
                warn!(snapshot = %key, %stack, "re-attaching remote layers failed: {e}");
            }
        }
        // Stacks a previous run left attached that no snapshot uses now: known with no
        // reference, so Cleanup (or the next release) detaches them.
        for (stack, mountpoint) in sn.remote.attached() {
            let mut att = lock(&sn.attachments);
            if let std::collections::hash_map::Entry::Vacant(e) = att.entry(stack) {
                info!(stack = %e.key(), "found an unused attached stack from an earlier run");
                e.insert(Attachment {
                    mountpoint,
                    refs: 0,
                });
                sn.metrics.devices.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(sn)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Recovers attached devices whose server died (see [`RemoteLayers::heal`]).
    pub fn heal(&self) {
        let started = std::time::Instant::now();
        for stack in self.remote.heal() {
            info!(%stack, took = ?started.elapsed(), "recovered the device of a running stack");
        }
    }

    /// The lazy backend's counters (cache hits, bytes fetched, fetch latency).
    pub fn lazy_stats(&self) -> crate::remote::DriverStats {
        self.remote.stats()
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// containerd's Prepare: a new active snapshot over `parent`, or for a lazily servable CORA
    /// layer, a remote committed snapshot and AlreadyExists.
    pub fn prepare(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        debug!(key, parent, ?labels, "prepare");
        if wants_remote(&labels) {
            match self.remote.available() {
                Ok(()) if self.remote.is_remote(&labels) => {
                    if let Some(e) = self.commit_remote(key, parent, labels.clone()) {
                        return Err(e);
                    }
                }
                Ok(()) => debug!(key, "remote backend declined the layer; unpacking it"),
                Err(e) => {
                    if !self.warned_fallback.swap(true, Ordering::Relaxed) {
                        warn!("{e}; CORA images are unpacked as plain OCI images");
                    }
                }
            }
        }
        self.create(Kind::Active, key, parent, labels)
    }

    pub fn view(&self, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    /// Commits the layer named by the target-ref label as remote; the result is an error for
    /// the caller to return (AlreadyExists on success, as containerd's remote snapshotter
    /// protocol expects), or `None` when the layer must be unpacked instead.
    ///
    /// A remote snapshot of that name is reused only for the same layer blob over the same
    /// parent, so only for the same stack of blobs. Its diff_id is a claim of the blob's index
    /// that nothing checks before the whole layer is read, and containerd hands a snapshot found
    /// by target name to every namespace: an image claiming another image's diff_ids must not
    /// have its file system served to pulls of the other image. A different blob (the same tar
    /// recompressed, or a lie) is unpacked, where containerd checks the diff_id.
    fn commit_remote(&self, key: &str, parent: &str, mut labels: Labels) -> Option<Error> {
        let Some(target) = labels.get(LABEL_TARGET_REF).cloned() else {
            return Some(Error::InvalidArgument(format!(
                "{key}: missing {LABEL_TARGET_REF}"
            )));
        };
        labels.insert(LABEL_REMOTE.to_owned(), "true".to_owned());
        let top = is_top_layer(&labels);
        let blob = labels.get(LABEL_CRI_LAYER_DIGEST).cloned();
        match self.insert(&target, Kind::Committed, parent, labels, true) {
            Ok(_) => {
                info!(key, %target, "layer committed as remote");
                if top {
                    self.start_attach_on_pull(&target);
                }
            }
            Err(Error::AlreadyExists(_)) => match self.store.get(&target) {
                Ok(Some(rec))
                    if rec.remote
                        && (rec.labels.get(LABEL_CRI_LAYER_DIGEST) != blob.as_ref()
                            || rec.parent.as_deref().unwrap_or("") != parent) =>
                {
                    warn!(
                        key,
                        %target,
                        attached_from = rec.labels.get(LABEL_CRI_LAYER_DIGEST).map(String::as_str).unwrap_or("?"),
                        attached_over = rec.parent.as_deref().unwrap_or(""),
                        requested = blob.as_deref().unwrap_or("?"),
                        requested_over = parent,
                        "the remote snapshot of this chain id was attached from another blob or \
                         over another parent; not reusing it, unpacking this layer"
                    );
                    return None;
                }
                _ => {}
            },
            Err(e) => return Some(e),
        }
        Some(Error::AlreadyExists(format!("target snapshot {target}")))
    }

    /// From now on, committing the top remote layer of an image (at pull) starts its stack's
    /// device in the background, so the first container finds it attached instead of waiting
    /// for a device start and mount (overlaybd attaches at pull too).
    pub fn attach_on_pull(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    fn start_attach_on_pull(&self, stack: &str) {
        let Some(me) = self.me.get().cloned() else {
            return;
        };
        let stack = stack.to_owned();
        let spawned = std::thread::Builder::new()
            .name("cora-attach".into())
            .spawn(move || {
                if let Some(sn) = me.upgrade() {
                    sn.attach_unused(&stack);
                }
            });
        match spawned {
            Ok(h) => {
                let mut hs = lock(&self.pull_attaches);
                hs.retain(|h| !h.is_finished());
                hs.push(h);
            }
            Err(e) => warn!("could not start the attach at pull: {e}"),
        }
    }

    /// Waits for the attaches at pull started so far.
    pub fn wait_attach_on_pull(&self) {
        let hs = std::mem::take(&mut *lock(&self.pull_attaches));
        for h in hs {
            if h.join().is_err() {
                warn!("an attach at pull panicked");
            }
        }
    }

    /// Attaches a stack with no reference (a container's Prepare takes the first), lazily
    /// only: a stack that would need its layers downloaded is left to the first container.
    fn attach_unused(&self, stack: &str) {
        let stack_lock = self.stack_locks.get(stack);
        let _s = lock(&stack_lock);
        if lock(&self.attachments).contains_key(stack) {
            return;
        }
        // Gone already (the image was removed while this thread started): nothing to do.
        let Ok(Some(rec)) = self.store.get(stack) else {
            return;
        };
        let started = std::time::Instant::now();
        match self.remote.attach_lazy(stack, &rec.labels) {
            Ok(mountpoint) => {
                self.metrics
                    .devices
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(%stack, took = ?started.elapsed(), "remote layer stack attached at pull");
                lock(&self.attachments).insert(
                    stack.to_owned(),
                    Attachment {
                        mountpoint,
                        refs: 0,
                    },
                );
            }
            Err(e) => info!(%stack, "not attached at pull ({e}); the first container attaches it"),
        }
    }

    fn create(&self, kind: Kind, key: &str, parent: &str, labels: Labels) -> Result<Vec<Mount>> {
        let rec = self.insert(key, kind, parent, labels, false)?;
        self.mounts_of(key, &rec)
    }

    /// Inserts a new snapshot record and its directory (see the module doc for the order).
    fn insert(
        &self,
        key: &str,
        kind: Kind,
        parent: &str,
        labels: Labels,
        remote: bool,
    ) -> Result<Record> {
        if key.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        if self.store.get(key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        let parent = (!parent.is_empty()).then(|| parent.to_owned());
        if let Some(p) = &parent
            && self.store.get(p)?.is_none()
        {
            return Err(Error::NotFound(format!("parent snapshot {p}")));
        }
        // Attach before taking the lock (it can take seconds: a device start and a mount), and
        // before committing: a record must never promise a stack it could not get.
        let stack = if kind == Kind::Committed {
            None
        } else {
            find_stack(|k| Ok(self.store.get(k)?), parent.as_deref())?
        };
        let attached = match &stack {
            Some(s) => Some((s.as_str(), self.acquire(s)?)),
            None => None,
        };
        let result = self.insert_record(key, kind, parent, labels, remote, attached);
        if result.is_err()
            && let Some(s) = &stack
        {
            self.release(s);
        }
        result
    }

    fn insert_record(
        &self,
        key: &str,
        kind: Kind,
        parent: Option<String>,
        labels: Labels,
        remote: bool,
        attached: Option<(&str, PathBuf)>,
    ) -> Result<Record> {
        let (stack, stack_root) = match attached {
            Some((s, root)) => (Some(s.to_owned()), Some(root)),
            None => (None, None),
        };
        let _g = lock(&self.lock);
        let tx = self.store.begin()?;
        if Store::tx_get(&tx, key)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        let mut parent_id = None;
        if let Some(p) = &parent {
            let prec = Store::tx_get(&tx, p)?
                .ok_or_else(|| Error::NotFound(format!("parent snapshot {p}")))?;
            if prec.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {p} is not a committed snapshot"
                )));
            }
            parent_id = Some(prec.id);
        }
        if kind != Kind::Committed
            && find_stack(|k| Ok(Store::tx_get(&tx, k)?), parent.as_deref())? != stack
        {
            return Err(Error::FailedPrecondition(format!(
                "the layers under {key} changed while they were being attached; retry"
            )));
        }
        let id = Store::tx_next_id(&tx)?;
        let t = now();
        let rec = Record {
            id,
            kind,
            parent,
            labels,
            created: t,
            updated: t,
            usage: (kind == Kind::Committed).then_some((0, 0)),
            remote,
            stack: stack.clone(),
        };
        Store::tx_put(&tx, key, &rec)?;
        let tmp = self.root.join("snapshots").join(format!("tmp-{id}"));
        let template = match (&stack_root, parent_id) {
            // The nearest lower decides the root directory's owner and mode, as in containerd.
            (_, Some(pid)) if !rec_is_remote(&tx, rec.parent.as_deref()) => Some(self.fs_dir(pid)),
            (Some(root), _) => Some(root.clone()),
            _ => None,
        };
        if let Err(e) = make_dirs(&tmp, kind == Kind::Active, template.as_deref()) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = Store::commit(tx) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.into());
        }
        let dir = self.dir(id);
        std::fs::rename(&tmp, &dir).map_err(io_err("renaming into place", &dir))?;
        debug!(key, id, ?kind, "snapshot created");
        Ok(rec)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        self.mounts_of(key, &rec)
    }

    /// Lower directories of a snapshot over `parent`, nearest first; the walk stops at the first
    /// remote ancestor, whose attached stack already contains every layer below it.
    fn lowers(&self, parent: Option<&str>) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut next = parent.map(str::to_owned);
        while let Some(key) = next {
            let rec = self
                .store
                .get(&key)?
                .ok_or_else(|| Error::Internal(format!("ancestor {key} is missing")))?;
            if rec.remote {
                let mountpoint = self.attached(&key)?;
                out.push(mountpoint.to_string_lossy().into_owned());
                break;
            }
            out.push(self.fs_dir(rec.id).to_string_lossy().into_owned());
            next = rec.parent;
        }
        Ok(out)
    }

    fn mounts_of(&self, key: &str, rec: &Record) -> Result<Vec<Mount>> {
        let fs = self.fs_dir(rec.id).to_string_lossy().into_owned();
        let lowers = self.lowers(rec.parent.as_deref())?;
        let bind = |source: String, rw: &str| Mount {
            kind: "bind".into(),
            source,
            options: vec![rw.into(), "rbind".into()],
        };
        Ok(vec![match rec.kind {
            Kind::Committed => {
                return Err(Error::FailedPrecondition(format!(
                    "snapshot {key} is committed; mounts exist only for active snapshots and views"
                )));
            }
            Kind::Active if lowers.is_empty() => bind(fs, "rw"),
            Kind::Active => {
                let work = self.dir(rec.id).join("work");
                Mount {
                    kind: "overlay".into(),
                    source: "overlay".into(),
                    options: vec![
                        format!("workdir={}", work.display()),
                        format!("upperdir={fs}"),
                        format!("lowerdir={}", lowers.join(":")),
                    ],
                }
            }
            Kind::View if lowers.is_empty() => bind(fs, "ro"),
            Kind::View if lowers.len() == 1 => {
                bind(lowers.into_iter().next().unwrap_or_default(), "ro")
            }
            Kind::View => Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![format!("lowerdir={}", lowers.join(":"))],
            },
        }])
    }

    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let _g = lock(&self.lock);
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        if rec.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        // Measured once here: a committed layer never changes, so its usage is cached for good.
        let usage = disk_usage(&self.fs_dir(rec.id))?;
        let tx = self.store.begin()?;
        if Store::tx_get(&tx, name)?.is_some() {
            return Err(Error::AlreadyExists(format!("snapshot {name}")));
        }
        let t = now();
        let committed = Record {
            id: rec.id,
            kind: Kind::Committed,
            parent: rec.parent.clone(),
            labels,
            created: t,
            updated: t,
            usage: Some((usage.size, usage.inodes)),
            remote: false,
            stack: None,
        };
        Store::tx_delete(&tx, key)?;
        Store::tx_put(&tx, name, &committed)?;
        Store::commit(tx)?;
        // A lower never needs a work dir.
        let _ = std::fs::remove_dir_all(self.dir(rec.id).join("work"));
        if let Some(s) = &rec.stack {
            self.release(s);
        }
        debug!(key, name, "snapshot committed");
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let _g = lock(&self.lock);
        let tx = self.store.begin()?;
        let rec =
            Store::tx_get(&tx, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        if Store::tx_has_children(&tx, key)? {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key}: it has children"
            )));
        }
        Store::tx_delete(&tx, key)?;
        let dir = self.dir(rec.id);
        let doomed = self.root.join("snapshots").join(format!("rm-{}", rec.id));
        let moved = std::fs::rename(&dir, &doomed).is_ok();
        if let Err(e) = Store::commit(tx) {
            if moved {
                let _ = std::fs::rename(&doomed, &dir);
            }
            return Err(e.into());
        }
        if moved && let Err(e) = std::fs::remove_dir_all(&doomed) {
            warn!(key, "removing {}: {e} (Cleanup retries)", doomed.display());
        }
        if let Some(s) = &rec.stack {
            self.release(s);
        }
        // A removed remote layer can have no users left (children block removal), and its
        // record, which attach needs, is gone: release its device now, not at some Cleanup.
        if rec.remote {
            let stack_lock = self.stack_locks.get(key);
            let _s = lock(&stack_lock);
            let mountpoint = lock(&self.attachments)
                .get(key)
                .map(|a| a.mountpoint.clone());
            if let Some(mp) = mountpoint {
                self.detach(key, &mp);
            }
        }
        debug!(key, "snapshot removed");
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        Ok(info(key, rec))
    }

    /// Updates labels: `fieldpaths` empty or `labels` replaces them all, `labels.<k>` sets or
    /// (when absent from `new.labels`) deletes one; other fields are immutable.
    pub fn update(&self, new: Info, fieldpaths: &[String]) -> Result<Info> {
        let _g = lock(&self.lock);
        let tx = self.store.begin()?;
        let key = new.name.as_str();
        let mut rec =
            Store::tx_get(&tx, key)?.ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        if fieldpaths.is_empty() {
            rec.labels = new.labels;
        } else {
            for path in fieldpaths {
                if let Some(label) = path.strip_prefix("labels.") {
                    match new.labels.get(label) {
                        Some(v) => rec.labels.insert(label.to_owned(), v.clone()),
                        None => rec.labels.remove(label),
                    };
                } else if path == "labels" {
                    rec.labels = new.labels.clone();
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field on snapshot {key:?}"
                    )));
                }
            }
        }
        rec.updated = now();
        Store::tx_put(&tx, key, &rec)?;
        Store::commit(tx)?;
        Ok(info(key, rec))
    }

    pub fn list(&self) -> Result<Vec<Info>> {
        Ok(self
            .store
            .all()?
            .into_iter()
            .map(|(k, r)| info(&k, r))
            .collect())
    }

    pub fn counts(&self) -> Result<SnapshotCounts> {
        let mut c = SnapshotCounts::default();
        for (_, r) in self.store.all()? {
            match r.kind {
                Kind::Active => c.active += 1,
                Kind::View => c.view += 1,
                Kind::Committed => c.committed += 1,
            }
            c.remote += u64::from(r.remote);
        }
        Ok(c)
    }

    /// Active snapshots are measured now; committed ones were measured at Commit.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self
            .store
            .get(key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
        match (rec.kind, rec.usage) {
            (Kind::Active, _) => disk_usage(&self.fs_dir(rec.id)),
            (_, Some((size, inodes))) => Ok(Usage { size, inodes }),
            (_, None) => Ok(Usage::default()),
        }
    }

    /// Deletes directories without a record and detaches unused remote stacks.
    pub fn cleanup(&self) -> Result<()> {
        let _g = lock(&self.lock);
        self.recover_dirs()?;
        let unused: Vec<String> = lock(&self.attachments)
            .iter()
            .filter(|(_, a)| a.refs == 0)
            .map(|(k, _)| k.clone())
            .collect();
        for key in unused {
            let stack_lock = self.stack_locks.get(&key);
            let _s = lock(&stack_lock);
            // Re-checked under the stack's lock: a Prepare may have taken it meanwhile.
            let mountpoint = lock(&self.attachments)
                .get(&key)
                .filter(|a| a.refs == 0)
                .map(|a| a.mountpoint.clone());
            if let Some(mp) = mountpoint {
                self.detach(&key, &mp);
            }
        }
        Ok(())
    }

    fn recover_dirs(&self) -> Result<()> {
        let ids: HashSet<u64> = self.store.all()?.into_iter().map(|(_, r)| r.id).collect();
        let snapshots = self.root.join("snapshots");
        let entries = std::fs::read_dir(&snapshots).map_err(io_err("reading", &snapshots))?;
        for entry in entries {
            let entry = entry.map_err(io_err("reading", &snapshots))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let pending = name
                .strip_prefix("tmp-")
                .or_else(|| name.strip_prefix("rm-"))
                .map(str::parse::<u64>);
            let keep = match pending {
                Some(Ok(id)) if ids.contains(&id) && !self.dir(id).exists() => {
                    info!("putting back snapshot dir {name}: its record exists");
                    std::fs::rename(&path, self.dir(id)).map_err(io_err("renaming", &path))?;
                    true
                }
                Some(_) => false,
                None => name.parse::<u64>().is_ok_and(|id| ids.contains(&id)),
            };
            if !keep {
                info!("removing orphan snapshot dir {}", path.display());
                if let Err(e) = std::fs::remove_dir_all(&path) {
                    warn!("removing {}: {e}", path.display());
                }
            }
        }
        Ok(())
    }

    /// Takes a reference on a remote stack, attaching it first if needed.
    fn acquire(&self, stack: &str) -> Result<PathBuf> {
        let stack_lock = self.stack_locks.get(stack);
        let _s = lock(&stack_lock);
        if let Some(a) = lock(&self.attachments).get_mut(stack) {
            a.refs += 1;
            return Ok(a.mountpoint.clone());
        }
        let mountpoint = self.attach(stack)?;
        lock(&self.attachments).insert(
            stack.to_owned(),
            Attachment {
                mountpoint: mountpoint.clone(),
                refs: 1,
            },
        );
        Ok(mountpoint)
    }

    fn attach(&self, stack: &str) -> Result<PathBuf> {
        let labels = self
            .store
            .get(stack)?
            .ok_or_else(|| Error::Internal(format!("remote stack {stack} has no record")))?
            .labels;
        let mountpoint = self
            .remote
            .attach(stack, &labels)
            .map_err(|e| Error::Unavailable(format!("attaching remote layers {stack}: {e}")))?;
        self.metrics
            .devices
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(%stack, mountpoint = %mountpoint.display(), "remote layer stack attached");
        Ok(mountpoint)
    }

    /// The mount point of an attached stack (attaching it without a reference if a restart lost
    /// it, so Mounts keeps working for running containers).
    fn attached(&self, stack: &str) -> Result<PathBuf> {
        let stack_lock = self.stack_locks.get(stack);
        let _s = lock(&stack_lock);
        if let Some(a) = lock(&self.attachments).get(stack) {
            return Ok(a.mountpoint.clone());
        }
        let mountpoint = self.attach(stack)?;
        lock(&self.attachments).insert(
            stack.to_owned(),
            Attachment {
                mountpoint: mountpoint.clone(),
                refs: 0,
            },
        );
        Ok(mountpoint)
    }

    fn release(&self, stack: &str) {
        let stack_lock = self.stack_locks.get(stack);
        let _s = lock(&stack_lock);
        let detach = {
            let mut att = lock(&self.attachments);
            match att.get_mut(stack) {
                Some(a) => {
                    a.refs = a.refs.saturating_sub(1);
                    (a.refs == 0 && self.auto_remove_dev).then(|| a.mountpoint.clone())
                }
                None => None,
            }
        };
        if let Some(mountpoint) = detach {
            self.detach(stack, &mountpoint);
        }
    }

    /// Detaches a stack; the caller holds its stack lock.
    fn detach(&self, stack: &str, mountpoint: &Path) {
        match self.remote.detach(stack, mountpoint) {
            Ok(()) => {
                lock(&self.attachments).remove(stack);
                self.metrics
                    .devices
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                info!(%stack, "remote layer stack detached");
            }
            Err(e) => warn!(%stack, "detaching remote layers: {e}"),
        }
    }

    /// References held on each attached stack (for tests and diagnostics).
    pub fn attachment_refs(&self) -> HashMap<String, usize> {
        lock(&self.attachments)
            .iter()
            .map(|(k, a)| (k.clone(), a.refs))
            .collect()
    }
}

/// Whether Prepare labels describe an image's top layer: CRI's image-layers label lists the
/// layer itself and those above it, so the top layer's list is just its own digest.
fn is_top_layer(labels: &Labels) -> bool {
    match (
        labels.get(LABEL_CRI_IMAGE_LAYERS),
        labels.get(LABEL_CRI_LAYER_DIGEST),
    ) {
        (Some(layers), Some(digest)) => layers == digest,
        _ => false,
    }
}

fn rec_is_remote(tx: &WriteTxn, key: Option<&str>) -> bool {
    key.and_then(|k| Store::tx_get(tx, k).ok().flatten())
        .is_some_and(|r| r.remote)
}

/// The key of the nearest remote ancestor, whose stack a new snapshot over `parent` mounts.
fn find_stack(
    get: impl Fn(&str) -> Result<Option<Record>>,
    parent: Option<&str>,
) -> Result<Option<String>> {
    let mut next = parent.map(str::to_owned);
    while let Some(key) = next {
        let rec =
            get(&key)?.ok_or_else(|| Error::Internal(format!("ancestor {key} is missing")))?;
        if rec.remote {
            return Ok(Some(key));
        }
        next = rec.parent;
    }
    Ok(None)
}

fn make_dirs(dir: &Path, work: bool, template: Option<&Path>) -> Result<()> {
    let fs = dir.join("fs");
    std::fs::create_dir_all(&fs).map_err(io_err("creating", &fs))?;
    std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &fs))?;
    if work {
        let w = dir.join("work");
        std::fs::create_dir(&w).map_err(io_err("creating", &w))?;
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o711))
            .map_err(io_err("chmod", &w))?;
    }
    if let Some(t) = template {
        let md = std::fs::metadata(t).map_err(io_err("stat", t))?;
        std::os::unix::fs::chown(&fs, Some(md.uid()), Some(md.gid()))
            .map_err(io_err("chown", &fs))?;
        std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(io_err("chmod", &fs))?;
    }
    Ok(())
}

fn info(key: &str, r: Record) -> Info {
    Info {
        name: key.to_owned(),
        parent: r.parent,
        kind: r.kind,
        created: r.created,
        updated: r.updated,
        labels: r.labels,
    }
}

/// Like containerd's `fs.DiskUsage`: allocated bytes and inode count, hard links counted once.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let md = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.size += (md.blocks() * 512) as i64;
            usage.inodes += 1;
        }
        if md.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io_err("reading", &path))? {
                stack.push(entry.map_err(io_err("reading", &path))?.path());
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{LABEL_CORA_PREFIX, RemoteError};

    /// Serves every stack from one directory and records attach/detach calls.
    struct Recorder {
        dir: PathBuf,
        calls: Mutex<Vec<String>>,
    }

    impl RemoteLayers for Recorder {
        fn available(&self) -> Result<(), RemoteError> {
            Ok(())
        }
        fn is_remote(&self, _labels: &Labels) -> bool {
            true
        }
        fn attach(&self, stack_key: &str, _labels: &Labels) -> Result<PathBuf, RemoteError> {
            lock(&self.calls).push(format!("attach {stack_key}"));
            Ok(self.dir.clone())
        }
        fn attach_lazy(&self, stack_key: &str, _labels: &Labels) -> Result<PathBuf, RemoteError> {
            lock(&self.calls).push(format!("attach_lazy {stack_key}"));
            if stack_key.starts_with("fail") {
                return Err(RemoteError::Failed("no device".into()));
            }
            Ok(self.dir.clone())
        }
        fn detach(&self, stack_key: &str, _mountpoint: &Path) -> Result<(), RemoteError> {
            lock(&self.calls).push(format!("detach {stack_key}"));
            Ok(())
        }
    }

    /// Remote labels as `cora rpull` and CRI send them; `above`: digests of the layers above.
    fn pull_labels(target: &str, digest: &str, above: &[&str]) -> Labels {
        let mut l = remote_labels(target);
        l.insert(LABEL_CRI_LAYER_DIGEST.to_owned(), digest.to_owned());
        let layers: Vec<&str> = std::iter::once(digest)
            .chain(above.iter().copied())
            .collect();
        l.insert(LABEL_CRI_IMAGE_LAYERS.to_owned(), layers.join(","));
        l
    }

    #[test]
    fn the_top_layer_of_a_pull_attaches_its_stack_for_the_first_container() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Recorder {
            dir: dir.path().join("stack"),
            calls: Mutex::new(Vec::new()),
        });
        std::fs::create_dir_all(&backend.dir).unwrap();
        let sn = Arc::new(
            Snapshotter::open(
                &dir.path().join("root"),
                backend.clone(),
                true,
                Arc::new(Metrics::default()),
            )
            .unwrap(),
        );
        sn.attach_on_pull();
        let e = sn.prepare("x1", "", pull_labels("L1", "sha256:a", &["sha256:b"]));
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        let e = sn.prepare("x2", "L1", pull_labels("L2", "sha256:b", &[]));
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        sn.wait_attach_on_pull();
        // Only the top layer's stack, with no reference yet.
        assert_eq!(*lock(&backend.calls), ["attach_lazy L2"]);
        assert_eq!(sn.attachment_refs().get("L2"), Some(&0));
        // The container takes it as it is; its removal (autoRemoveDev) detaches it.
        sn.prepare("c", "L2", Labels::new()).unwrap();
        assert_eq!(sn.attachment_refs().get("L2"), Some(&1));
        sn.remove("c").unwrap();
        assert_eq!(*lock(&backend.calls), ["attach_lazy L2", "detach L2"]);

        // A stack that cannot be attached lazily at pull is attached (with the fallback) by
        // the first container instead.
        let e = sn.prepare("x3", "", pull_labels("fail3", "sha256:c", &[]));
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        sn.wait_attach_on_pull();
        assert!(!sn.attachment_refs().contains_key("fail3"));
        sn.prepare("c3", "fail3", Labels::new()).unwrap();
        assert_eq!(
            lock(&backend.calls)[2..],
            ["attach_lazy fail3", "attach fail3"]
        );
    }

    fn remote_labels(target: &str) -> Labels {
        [
            (LABEL_TARGET_REF.to_owned(), target.to_owned()),
            (format!("{LABEL_CORA_PREFIX}index"), "sha256:00".to_owned()),
        ]
        .into_iter()
        .collect()
    }

    /// Holds every attach until `want` attaches are in progress at once, counting the calls;
    /// attaches of `failing` fail at once. The timeout only keeps a broken snapshotter (one
    /// that attaches serially) from hanging the test: a passing run never reaches it.
    struct Rendezvous {
        dir: PathBuf,
        want: usize,
        failing: &'static str,
        inside: Mutex<usize>,
        arrived: std::sync::Condvar,
        calls: Mutex<Vec<String>>,
    }

    impl RemoteLayers for Rendezvous {
        fn available(&self) -> Result<(), RemoteError> {
            Ok(())
        }
        fn is_remote(&self, _labels: &Labels) -> bool {
            true
        }
        fn attach(&self, stack_key: &str, _labels: &Labels) -> Result<PathBuf, RemoteError> {
            lock(&self.calls).push(format!("attach {stack_key}"));
            if stack_key == self.failing {
                return Err(RemoteError::Failed(format!(
                    "{stack_key}: injected failure"
                )));
            }
            let mut inside = lock(&self.inside);
            *inside += 1;
            self.arrived.notify_all();
            let (inside, timeout) = self
                .arrived
                .wait_timeout_while(inside, std::time::Duration::from_secs(60), |n| {
                    *n < self.want
                })
                .unwrap_or_else(|p| p.into_inner());
            drop(inside);
            if timeout.timed_out() {
                return Err(RemoteError::Failed(format!("{stack_key} attached alone")));
            }
            Ok(self.dir.clone())
        }
        fn detach(&self, _stack_key: &str, _mountpoint: &Path) -> Result<(), RemoteError> {
            Ok(())
        }
    }

    #[test]
    fn stacks_attach_in_parallel_and_each_stack_once() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Rendezvous {
            dir: dir.path().join("stack"),
            want: 2,
            failing: "L3",
            inside: Mutex::new(0),
            arrived: std::sync::Condvar::new(),
            calls: Mutex::new(Vec::new()),
        });
        std::fs::create_dir_all(&backend.dir).unwrap();
        let sn = Snapshotter::open(
            &dir.path().join("root"),
            backend.clone(),
            false,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        for l in ["L1", "L2"] {
            let err = sn
                .prepare(&format!("x-{l}"), "", remote_labels(l))
                .unwrap_err();
            assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        }
        // Two containers of different images: both attaches must be in progress at once.
        std::thread::scope(|s| {
            let a = s.spawn(|| sn.prepare("c1", "L1", Labels::new()));
            let b = s.spawn(|| sn.prepare("c2", "L2", Labels::new()));
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        // Two more containers on L1 at once: the stack is already attached, so no attach.
        std::thread::scope(|s| {
            let a = s.spawn(|| sn.prepare("c3", "L1", Labels::new()));
            let b = s.spawn(|| sn.prepare("c4", "L1", Labels::new()));
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
        let mut calls = lock(&backend.calls).clone();
        calls.sort();
        assert_eq!(calls, ["attach L1", "attach L2"]);
        assert_eq!(sn.attachment_refs().get("L1"), Some(&3));
        assert_eq!(sn.attachment_refs().get("L2"), Some(&1));
        // A failed attach leaves no record and no reference.
        let err = sn.prepare("x-L3", "", remote_labels("L3")).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        let err = sn.prepare("c5", "L3", Labels::new()).unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err}");
        assert!(matches!(sn.stat("c5"), Err(Error::NotFound(_))));
        assert_eq!(sn.attachment_refs().get("L3"), None);
    }

    #[test]
    fn a_remote_snapshot_is_reused_only_for_the_same_blob_over_the_same_parent() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Recorder {
            dir: dir.path().join("stack"),
            calls: Mutex::new(Vec::new()),
        });
        std::fs::create_dir_all(&backend.dir).unwrap();
        let sn = Snapshotter::open(
            &dir.path().join("root"),
            backend,
            false,
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let pulled = |key: &str, parent: &str, target: &str, blob: &str| {
            sn.prepare(key, parent, pull_labels(target, blob, &[]))
        };
        let e = pulled("a1", "", "L1", "sha256:a");
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        let e = pulled("a2", "L1", "L2", "sha256:b");
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        // The same blobs again (another namespace's pull of the same image): reused.
        let e = pulled("b1", "", "L1", "sha256:a");
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");
        let e = pulled("b2", "L1", "L2", "sha256:b");
        assert!(matches!(e, Err(Error::AlreadyExists(_))), "{e:?}");

        // Another blob claiming the same chain id: an active snapshot for containerd to unpack
        // into (and check the diff_id of); the remote one is left as it was.
        let m = pulled("c1", "", "L1", "sha256:other").unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(sn.stat("c1").unwrap().kind, Kind::Active);
        assert!(sn.store.get("L1").unwrap().unwrap().remote);
        // containerd commits the unpacked layer under a name of its own; the same blob over it
        // must not be given the remote snapshot that was attached over another parent.
        sn.commit("ns/9/L1", "c1", Labels::new()).unwrap();
        pulled("c2", "ns/9/L1", "L2", "sha256:b").unwrap();
        assert_eq!(sn.stat("c2").unwrap().kind, Kind::Active);
        assert_eq!(sn.stat("L2").unwrap().parent.as_deref(), Some("L1"));
    }

    #[test]
    fn stacks_survive_restart_and_cleanup_detaches_unused() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Recorder {
            dir: dir.path().join("stack"),
            calls: Mutex::new(Vec::new()),
        });
        std::fs::create_dir_all(&backend.dir).unwrap();
        let root = dir.path().join("root");
        let open = || {
            Snapshotter::open(&root, backend.clone(), false, Arc::new(Metrics::default())).unwrap()
        };
        let sn = open();
        let err = sn.prepare("x1", "", remote_labels("L1")).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        // The same layer again (a second pull) is still AlreadyExists, and creates nothing.
        let err = sn.prepare("x2", "", remote_labels("L1")).unwrap_err();
        assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
        sn.prepare("c1", "L1", Labels::new()).unwrap();
        assert_eq!(sn.attachment_refs().get("L1"), Some(&1));
        drop(sn);

        // A restart re-attaches the stack a live snapshot uses.
        let sn = open();
        assert_eq!(*lock(&backend.calls), ["attach L1", "attach L1"]);
        assert_eq!(sn.attachment_refs().get("L1"), Some(&1));
        let m = sn.mounts("c1").unwrap();
        assert!(
            m[0].options
                .contains(&format!("lowerdir={}", backend.dir.display()))
        );

        // Without autoRemoveDev the stack stays attached until Cleanup.
        sn.remove("c1").unwrap();
        assert_eq!(sn.attachment_refs().get("L1"), Some(&0));
        assert_eq!(lock(&backend.calls).len(), 2);
        sn.cleanup().unwrap();
        assert_eq!(
            lock(&backend.calls).last().map(String::as_str),
            Some("detach L1")
        );
        assert!(sn.attachment_refs().is_empty());
        let counts = sn.counts().unwrap();
        assert_eq!((counts.committed, counts.remote, counts.active), (1, 1, 0));
    }

    /// Also reports one stack as attached by an earlier run.
    struct Leftover(Recorder);

    impl RemoteLayers for Leftover {
        fn available(&self) -> Result<(), RemoteError> {
            Ok(())
        }
        fn is_remote(&self, _labels: &Labels) -> bool {
            true
        }
        fn attach(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError> {
            self.0.attach(stack_key, labels)
        }
        fn detach(&self, stack_key: &str, mountpoint: &Path) -> Result<(), RemoteError> {
            self.0.detach(stack_key, mountpoint)
        }
        fn attached(&self) -> Vec<(String, PathBuf)> {
            vec![("old".into(), self.0.dir.clone())]
        }
    }

    #[test]
    fn leftover_stacks_are_released_and_removed_layers_detach_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Leftover(Recorder {
            dir: dir.path().join("stack"),
            calls: Mutex::new(Vec::new()),
        }));
        std::fs::create_dir_all(&backend.0.dir).unwrap();
        let metrics = Arc::new(Metrics::default());
        let sn = Snapshotter::open(
            &dir.path().join("root"),
            backend.clone(),
            false,
            metrics.clone(),
        )
        .unwrap();
        assert_eq!(sn.attachment_refs().get("old"), Some(&0));
        assert_eq!(metrics.devices.load(Ordering::Relaxed), 1);
        sn.cleanup().unwrap();
        assert_eq!(*lock(&backend.0.calls), ["detach old"]);
        assert_eq!(metrics.devices.load(Ordering::Relaxed), 0);

        // Even without autoRemoveDev, removing the remote layer itself releases its device.
        let _ = sn.prepare("x", "", remote_labels("L1"));
        sn.prepare("c", "L1", Labels::new()).unwrap();
        sn.remove("c").unwrap();
        assert_eq!(sn.attachment_refs().get("L1"), Some(&0));
        sn.remove("L1").unwrap();
        assert_eq!(
            lock(&backend.0.calls).last().map(String::as_str),
            Some("detach L1")
        );
        assert!(sn.attachment_refs().is_empty());
    }
}
