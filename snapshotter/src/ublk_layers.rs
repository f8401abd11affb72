//! The lazy backend: one `cora-driver` device per CORA layer stack, served through ublk
//! (`/dev/ublkbN`) or, where the kernel has no ublk, FUSE (the stack image as one read-only
//! file), its file system mounted read-only under `<root>/remote/<hash of the stack key>`.
//!
//! ```text
//! <root>/remote/<h>/            mount point of the stack's file system
//! <root>/remote/<h>.json        state: stack key, transport, device id, mount point, image,
//!                               layer digest, loop device (FUSE on kernels without file-backed
//!                               erofs)
//! <root>/remote/<h>.stats.json  the driver's counters (rewritten by it every second)
//! <root>/remote/<h>.log         the driver's log (`<h>.last.log` once detached: the last
//!                               device's, for what it fetched and any errors)
//! <root>/fuse/                  the drivers' FUSE mounts and their records (`--fuse-dir`)
//! ```
//!
//! The state file lets a restarted snapshotter find the live device and mount of a stack and
//! hand out the same path, so running containers keep their lowerdir. A ublk driver is started
//! in a mount namespace of its own (private propagation): a ublk server that exits in a
//! namespace holding a mount of its own device deadlocks (libublk-rs#50), and our mount is made
//! in the snapshotter's namespace, which containerd shares. A FUSE driver runs in ours: its
//! FUSE mount must be visible where we mount the image file, and a private copy of a FUSE mount
//! in any other namespace would keep its server alive after `del`.
use crate::config::Config;
use crate::remote::{
    DriverStats, KeyedLocks, LABEL_CORA_PREFIX, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST,
    LABEL_CRI_MANIFEST_DIGEST, Labels, RemoteError, RemoteLayers, lock_ignoring_poison as lock,
};
use cora_api::driver::{
    self as contract, DeviceInfo, DeviceState, Mirror, Ready, RecoverArgs, RegistryArgs, RunArgs,
    TRANSPORT_FUSE, Transport, UnpackArgs,
};
use sha2::Digest as _;
use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The converter's annotation naming the stack image's file system (erofs or ext4).
pub use blobfmt::oci::annotation::FS_TYPE as LABEL_FS_TYPE;
/// How long a device may take to become ready (manifest, index and trailers are fetched first;
/// generous because the VM tests run emulated).
const ADD_TIMEOUT: Duration = Duration::from_secs(180);
const DEL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the fallback may take to download and unpack a whole stack.
const UNPACK_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// ublk queues (server threads) per device.
const QUEUES: u16 = 2;

/// What the backend needs from the snapshotter config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// State directory (`<root>/remote`).
    pub dir: PathBuf,
    /// Which transport to serve stacks through (`auto`: ublk, else FUSE).
    pub transport: Transport,
    /// Where FUSE devices are mounted and recorded (`<root>/fuse`).
    pub fuse_dir: PathBuf,
    /// Configured driver binary; `None` = next to our own binary, then `PATH`.
    pub driver: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    /// How the driver reaches registries, for `add` and `unpack` alike.
    pub registry: RegistryArgs,
    /// What devices fetch beyond the bytes read.
    pub fetch: contract::FetchArgs,
    /// Whether ext4 stacks are mounted (config `allowExt4`); erofs always is.
    pub allow_ext4: bool,
}

impl UblkOptions {
    pub fn from_config(c: &Config) -> UblkOptions {
        UblkOptions {
            dir: c.root.join("remote"),
            transport: c.transport,
            fuse_dir: c.root.join("fuse"),
            driver: c.driver_path.clone(),
            cache_dir: c.cache_dir.clone(),
            cache_size: c.cache_size,
            registry: RegistryArgs {
                creds_file: c.credential_file.clone(),
                insecure_hosts: c.insecure_registries.clone(),
                mirrors: c
                    .mirror_registry
                    .iter()
                    .map(|m| Mirror {
                        host: m.host.clone(),
                        insecure: m.insecure,
                    })
                    .collect(),
                ca_files: Vec::new(),
            },
            fetch: c.fetch.clone(),
            allow_ext4: c.allow_ext4,
        }
    }
}

/// The transport picked at start, and why (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// [`Transport::Ublk`] or [`Transport::Fuse`], never `Auto`.
    pub transport: Transport,
    /// What was found on this host and what serves CORA layers, as one log line.
    pub reason: String,
}

impl std::fmt::Display for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A read-only loop device a FUSE image file is attached to, for kernels whose erofs cannot
/// mount a regular file (and for ext4, which never can).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct LoopDevice {
    /// `/dev/loopN`.
    device: PathBuf,
    /// The FUSE image file behind it, checked before detaching (the number may have been
    /// reused since, e.g. after a reboot).
    backing_file: PathBuf,
}

fn ublk() -> Transport {
    Transport::Ublk
}

/// What is recorded per attached stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StackState {
    stack_key: String,
    /// How the device is served (unused when `unpacked`); state files from before FUSE
    /// existed are ublk ones.
    #[serde(default = "ublk")]
    transport: Transport,
    /// Unused when `unpacked`.
    device_id: u32,
    /// Set when the FUSE image file is mounted through a loop device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loop_device: Option<LoopDevice>,
    /// The stack could not be served lazily and was unpacked into `mountpoint`, a plain
    /// directory.
    #[serde(default)]
    unpacked: bool,
    mountpoint: PathBuf,
    image: String,
    layer_digest: String,
}

pub struct UblkLayers {
    opts: UblkOptions,
    driver: Result<PathBuf, String>,
    /// The transport, probed once (on first use: at start, `available`).
    selection: OnceLock<Result<Selection, String>>,
    /// Set once the FUSE dir holds no records of an earlier boot.
    fuse_dir_checked: OnceLock<()>,
    /// Serialises attach/detach of one stack (they start and delete its device and edit its
    /// state file); different stacks attach in parallel.
    stack_locks: KeyedLocks,
    /// Counters of devices already detached, so exported totals never go backwards.
    retired: Mutex<DriverStats>,
}

impl UblkLayers {
    pub fn new(opts: UblkOptions) -> UblkLayers {
        let driver = find_driver(opts.driver.as_deref());
        UblkLayers {
            opts,
            driver,
            selection: OnceLock::new(),
            fuse_dir_checked: OnceLock::new(),
            stack_locks: KeyedLocks::default(),
            retired: Mutex::new(DriverStats::default()),
        }
    }

    fn driver(&self) -> Result<&Path, RemoteError> {
        self.driver
            .as_deref()
            .map_err(|e| RemoteError::Unavailable(e.clone()))
    }

    /// The transport stacks are served through (probed on first call), and why; an error when
    /// neither the driver nor a transport is there (CORA layers are unpacked then).
    pub fn selection(&self) -> Result<&Selection, RemoteError> {
        self.driver()?;
        self.selection
            .get_or_init(|| select_transport(self.opts.transport, probe_ublk, probe_fuse))
            .as_ref()
            .map_err(|e| RemoteError::Unavailable(e.clone()))
    }

    /// `--fuse-dir` of every driver command (all go through here); records a reboot made
    /// stale are dropped before the first, which also writes the boot marker before any
    /// driver records a device there.
    fn fuse_dir(&self) -> Option<&Path> {
        let dir = &self.opts.fuse_dir;
        self.fuse_dir_checked.get_or_init(|| {
            if let Err(e) = forget_earlier_boots(dir) {
                warn!(dir = %dir.display(), "clearing FUSE records of an earlier boot: {e}");
            }
        });
        Some(dir)
    }

    fn paths(&self, stack_key: &str) -> StackPaths {
        let h = hex::encode(sha2::Sha256::digest(stack_key.as_bytes()));
        let base = self.opts.dir.join(&h[..32]);
        StackPaths {
            state: base.with_extension("json"),
            stats: base.with_extension("stats.json"),
            log: base.with_extension("log"),
            tree: base.with_extension("tree"),
            mountpoint: base,
        }
    }

    fn read_state(&self, path: &Path) -> Option<StackState> {
        let text = std::fs::read(path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(path = %path.display(), "ignoring unreadable state file: {e}");
                None
            }
        }
    }

    /// The live device and mount a state file describes, made whole again where possible
    /// (remount if only the mount is gone, recover if only a ublk server died; a FUSE device's
    /// keeper recovers its server by itself). `None` when the device is gone (a FUSE device
    /// whose server and keeper both died is); stale leftovers are cleared then.
    fn reuse(
        &self,
        p: &StackPaths,
        st: &StackState,
        fs_type: &str,
    ) -> Result<Option<PathBuf>, RemoteError> {
        if st.unpacked {
            if st.mountpoint.is_dir() {
                return Ok(Some(st.mountpoint.clone()));
            }
            let _ = std::fs::remove_file(&p.state);
            return Ok(None);
        }
        let driver = self.driver()?;
        let fuse = st.transport == Transport::Fuse;
        let ns = Namespace::of(st.transport);
        let dev = device_info(driver, st.device_id, self.fuse_dir(), ns)
            .map_err(|e| {
                RemoteError::Failed(format!(
                    "stack {}: cannot tell whether its device {} is alive: {e}",
                    st.stack_key, st.device_id
                ))
            })?
            .filter(|d| d.layer_digest.as_deref() == Some(st.layer_digest.as_str()));
        let Some(dev) = dev else {
            info!(stack = %st.stack_key, id = st.device_id, "device of the recorded stack is gone; attaching anew");
            if fuse {
                self.drop_fuse_mount(st);
            } else {
                let _ = unmount(&st.mountpoint);
            }
            let _ = std::fs::remove_file(&p.state);
            return Ok(None);
        };
        // A QUIESCED FUSE device is between servers: its keeper is starting the next one.
        if fuse && !matches!(dev.state, DeviceState::Live | DeviceState::Quiesced) {
            info!(stack = %st.stack_key, id = st.device_id, state = %dev.state, "the FUSE server of the recorded stack and its keeper died; attaching anew");
            self.drop_fuse_mount(st);
            // `del` of a dead FUSE device clears what its server left (the broken mount, its
            // record).
            if let Err(e) = run_driver(
                driver,
                &contract::del_args(st.device_id, self.fuse_dir()),
                DEL_TIMEOUT,
                ns,
            ) {
                warn!(id = st.device_id, "clearing the dead FUSE device: {e}");
            }
            let _ = std::fs::remove_file(&p.state);
            return Ok(None);
        }
        if !fuse
            && dev.state == DeviceState::Quiesced
            && let Err(e) = self.recover(driver, p, st)
        {
            warn!(id = st.device_id, "recover failed: {e}");
            return Ok(None);
        }
        if is_mountpoint(&st.mountpoint) {
            return Ok(Some(st.mountpoint.clone()));
        }
        if fuse {
            // A loop device of the lost mount is of no use any more.
            self.free_loop(st);
        }
        match mount_image(&dev.path, &st.mountpoint, fs_type, st.transport) {
            Ok(loop_device) => {
                if loop_device != st.loop_device {
                    let st = StackState {
                        loop_device,
                        ..st.clone()
                    };
                    if let Err(e) = write_state(&p.state, &st) {
                        warn!(id = st.device_id, "recording the remount: {e}");
                    }
                }
                Ok(Some(st.mountpoint.clone()))
            }
            Err(e) => {
                warn!(id = st.device_id, "remounting: {e}");
                Ok(None)
            }
        }
    }

    /// The mount point of the stack a device server works for, if this snapshotter started it:
    /// its command line names the stack's stats file (`<dir>/<hash>.stats.json`).
    fn stack_of_server(&self, pid: i32) -> Option<PathBuf> {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        cmdline.split(|b| *b == 0).find_map(|arg| {
            let name = std::str::from_utf8(arg).ok()?;
            let path = Path::new(name);
            let hash = path.file_name()?.to_str()?.strip_suffix(".stats.json")?;
            (path.parent() == Some(self.opts.dir.as_path())).then(|| self.opts.dir.join(hash))
        })
    }

    /// Starts a new server for a ublk device whose server died (the device is quiesced: the
    /// kernel holds its I/O, which then resumes with the new server's answers).
    fn recover(&self, driver: &Path, p: &StackPaths, st: &StackState) -> Result<(), RemoteError> {
        info!(stack = %st.stack_key, id = st.device_id, "the device's server died; recovering it");
        let args = RecoverArgs {
            id: st.device_id,
            run: self.run_args(p),
        };
        run_driver(driver, &args.to_args(), ADD_TIMEOUT, Namespace::Private).map(|_| ())
    }

    /// Takes away the erofs mount of a FUSE stack whose device is gone or dead, and its loop
    /// device. Detached, not unmounted: reads through it fail anyway, containers still using it
    /// must not keep it in the way of the new mount.
    fn drop_fuse_mount(&self, st: &StackState) {
        if is_mountpoint(&st.mountpoint)
            && let Err(e) = unmount_flags(&st.mountpoint, libc::MNT_DETACH)
        {
            warn!(mountpoint = %st.mountpoint.display(), "detaching the stale mount: {e}");
        }
        self.free_loop(st);
    }

    fn free_loop(&self, st: &StackState) {
        if let Some(l) = &st.loop_device
            && let Err(e) = loop_detach(l)
        {
            warn!(device = %l.device.display(), "freeing the loop device: {e}");
        }
    }

    /// How a device of the stack at `p` runs: in the background, logging and writing its
    /// counters beside the stack's state.
    fn run_args(&self, p: &StackPaths) -> RunArgs {
        RunArgs::background(Some(p.log.clone()), Some(p.stats.clone()))
    }

    fn add_args(
        &self,
        image: &str,
        layer_digest: &str,
        p: &StackPaths,
        transport: Transport,
    ) -> contract::AddArgs {
        let o = &self.opts;
        contract::AddArgs {
            image: image.to_owned(),
            layer_digest: Some(layer_digest.to_owned()),
            cache_dir: o.cache_dir.clone(),
            cache_size: o.cache_size,
            queues: QUEUES,
            transport,
            fuse_dir: self.fuse_dir().map(Path::to_owned),
            registry: o.registry.clone(),
            fetch: o.fetch.clone(),
            run: self.run_args(p),
        }
    }

    /// A device serving the stack, mounted read-only at `p.mountpoint`.
    fn attach_device(
        &self,
        stack_key: &str,
        image: &str,
        layer_digest: &str,
        fs_type: &str,
        p: &StackPaths,
        driver: &Path,
    ) -> Result<PathBuf, RemoteError> {
        std::fs::create_dir_all(&p.mountpoint).map_err(|e| {
            RemoteError::Failed(format!("creating {}: {e}", p.mountpoint.display()))
        })?;
        let transport = self.selection()?.transport;
        let ns = Namespace::of(transport);
        // A stats file left by an earlier device of this stack (its driver may write once more
        // after `del`) must not be counted again.
        let _ = std::fs::remove_file(&p.stats);
        let started = Instant::now();
        let out = run_driver(
            driver,
            &self.add_args(image, layer_digest, p, transport).to_args(),
            ADD_TIMEOUT,
            ns,
        )?;
        let ready = Ready::from_output(&out).map_err(|e| RemoteError::Failed(e.to_string()))?;
        let dev = ready.id;
        let delete = || {
            let args = contract::del_args(dev, self.fuse_dir());
            if let Err(e) = run_driver(driver, &args, DEL_TIMEOUT, ns) {
                warn!(id = dev, "deleting the device after a failed attach: {e}");
            }
        };
        // The driver reports ready only once the node (ublk) or the file on its FUSE mount
        // exists, so it can be mounted now.
        let mounted = if ready.transport == transport.as_str() {
            mount_image(&ready.path, &p.mountpoint, fs_type, transport)
        } else {
            Err(RemoteError::Failed(format!(
                "cora-driver add served a {:?} device, not {transport}",
                ready.transport
            )))
        };
        let loop_device = match mounted {
            Ok(l) => l,
            Err(e) => {
                delete();
                return Err(e);
            }
        };
        let st = StackState {
            stack_key: stack_key.to_owned(),
            transport,
            device_id: dev,
            loop_device,
            unpacked: false,
            mountpoint: p.mountpoint.clone(),
            image: image.to_owned(),
            layer_digest: layer_digest.to_owned(),
        };
        if let Err(e) = write_state(&p.state, &st) {
            let _ = unmount(&p.mountpoint);
            self.free_loop(&st);
            delete();
            return Err(e);
        }
        info!(stack = %stack_key, %transport, id = dev, took = ?started.elapsed(), mountpoint = %p.mountpoint.display(), "stack attached");
        Ok(p.mountpoint.clone())
    }

    /// The file system type a stack's labels name, if this snapshotter mounts it: the kernel
    /// parses that metadata as root, so only erofs unless the config allows ext4.
    fn mountable_fs<'a>(&self, labels: &'a Labels) -> Result<&'a str, String> {
        let fs_type = labels
            .get(LABEL_FS_TYPE)
            .map(String::as_str)
            .unwrap_or("erofs");
        match fs_type {
            "erofs" => Ok(fs_type),
            "ext4" if self.opts.allow_ext4 => Ok(fs_type),
            "ext4" => Err(
                "ext4 images are mounted only with allowExt4 in the config (ext4 is not \
                 hardened against crafted images)"
                    .into(),
            ),
            other => Err(format!("unsupported file system {other:?}")),
        }
    }

    /// Attach a stack; `fallback`: when no device can serve it, download and unpack its layers.
    fn attach_stack(
        &self,
        stack_key: &str,
        labels: &Labels,
        fallback: bool,
    ) -> Result<PathBuf, RemoteError> {
        let get = |k: &str| {
            labels
                .get(k)
                .ok_or_else(|| RemoteError::Failed(format!("stack {stack_key}: no label {k}")))
        };
        let fs_type = self
            .mountable_fs(labels)
            .map_err(|e| RemoteError::Failed(format!("stack {stack_key}: {e}")))?;
        let image_ref = get(LABEL_CRI_IMAGE_REF)?;
        let layer_digest = get(LABEL_CRI_LAYER_DIGEST)?;
        let image = pinned_ref(image_ref, labels.get(LABEL_CRI_MANIFEST_DIGEST))?;
        let driver = self.driver()?.to_owned();
        let stack_lock = self.stack_locks.get(stack_key);
        let _g = lock(&stack_lock);
        let p = self.paths(stack_key);
        if let Some(st) = self.read_state(&p.state)
            && st.stack_key == stack_key
            && let Some(mp) = self.reuse(&p, &st, fs_type)?
        {
            info!(stack = %stack_key, unpacked = st.unpacked, "reusing the attached stack");
            return Ok(mp);
        }
        match self.attach_device(stack_key, &image, layer_digest, fs_type, &p, &driver) {
            Ok(mp) => Ok(mp),
            Err(e) if !fallback => Err(e),
            Err(e) => {
                // Never a failed container start when the layers can still be had whole.
                warn!(stack = %stack_key, "cannot serve the stack lazily ({e}); downloading and unpacking its layers instead");
                self.attach_unpacked(stack_key, &image, layer_digest, &p, &driver)
                    .map_err(|u| RemoteError::Failed(format!("{e}; unpacking instead: {u}")))
            }
        }
    }

    /// The fallback: the stack's layers downloaded whole and unpacked into `p.tree`.
    fn attach_unpacked(
        &self,
        stack_key: &str,
        image: &str,
        layer_digest: &str,
        p: &StackPaths,
        driver: &Path,
    ) -> Result<PathBuf, RemoteError> {
        let _ = std::fs::remove_dir(&p.mountpoint);
        // A tree without a state file is what an interrupted unpack left.
        if p.tree.exists() {
            std::fs::remove_dir_all(&p.tree).map_err(|e| {
                RemoteError::Failed(format!("removing stale {}: {e}", p.tree.display()))
            })?;
        }
        let started = Instant::now();
        let args = UnpackArgs {
            image: image.to_owned(),
            layer_digest: Some(layer_digest.to_owned()),
            into: p.tree.clone(),
            registry: self.opts.registry.clone(),
        };
        // In FUSE mode even an unpack must not hold private copies of FUSE mounts (for the
        // minutes it may take, a `del` would wait on them).
        let ns = match self.selection() {
            Ok(s) => Namespace::of(s.transport),
            Err(_) => Namespace::Private,
        };
        let out = run_driver(driver, &args.to_args(), UNPACK_TIMEOUT, ns)?;
        let st = StackState {
            stack_key: stack_key.to_owned(),
            transport: Transport::Ublk,
            device_id: 0,
            loop_device: None,
            unpacked: true,
            mountpoint: p.tree.clone(),
            image: image.to_owned(),
            layer_digest: layer_digest.to_owned(),
        };
        if let Err(e) = write_state(&p.state, &st) {
            let _ = std::fs::remove_dir_all(&p.tree);
            return Err(e);
        }
        warn!(stack = %stack_key, took = ?started.elapsed(), report = %out.trim(), tree = %p.tree.display(), "stack unpacked (not lazy)");
        Ok(p.tree.clone())
    }

    /// Folds a device's last counters into the retired totals.
    fn retire_stats(&self, p: &StackPaths) {
        if let Some(s) = read_stats(&p.stats) {
            lock(&self.retired).add(&s);
        }
        let _ = std::fs::remove_file(&p.stats);
    }

    fn states(&self) -> Vec<StackState> {
        let Ok(entries) = std::fs::read_dir(&self.opts.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && !p.to_string_lossy().ends_with(".stats.json")
            })
            .filter_map(|p| self.read_state(&p))
            .collect()
    }
}

struct StackPaths {
    state: PathBuf,
    stats: PathBuf,
    log: PathBuf,
    /// Where the fallback unpacks the stack.
    tree: PathBuf,
    mountpoint: PathBuf,
}

impl RemoteLayers for UblkLayers {
    fn available(&self) -> Result<(), RemoteError> {
        self.selection().map(|_| ())
    }

    fn is_remote(&self, labels: &Labels) -> bool {
        if let Err(e) = self.mountable_fs(labels) {
            // The layer is still a plain tar+zstd layer: containerd unpacks it.
            info!("{e}; the layer is unpacked");
            return false;
        }
        labels.keys().any(|k| k.starts_with(LABEL_CORA_PREFIX))
            && labels.contains_key(LABEL_CRI_IMAGE_REF)
            && labels.contains_key(LABEL_CRI_LAYER_DIGEST)
    }

    fn attach(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError> {
        self.attach_stack(stack_key, labels, true)
    }

    fn attach_lazy(&self, stack_key: &str, labels: &Labels) -> Result<PathBuf, RemoteError> {
        self.attach_stack(stack_key, labels, false)
    }

    fn detach(&self, stack_key: &str, mountpoint: &Path) -> Result<(), RemoteError> {
        let stack_lock = self.stack_locks.get(stack_key);
        let _g = lock(&stack_lock);
        let p = self.paths(stack_key);
        if let Some(st) = self.read_state(&p.state)
            && st.unpacked
        {
            std::fs::remove_dir_all(&st.mountpoint).map_err(|e| {
                RemoteError::Failed(format!("removing {}: {e}", st.mountpoint.display()))
            })?;
            let _ = std::fs::remove_file(&p.state);
            return Ok(());
        }
        let driver = self.driver()?.to_owned();
        // The file system first: a FUSE server then unmounts cleanly and exits at once.
        unmount(mountpoint)?;
        if let Some(st) = self.read_state(&p.state) {
            if let Some(l) = &st.loop_device {
                loop_detach(l)?;
            }
            let ns = Namespace::of(st.transport);
            let id = st.device_id;
            let gone = || match st.transport {
                Transport::Fuse => {
                    matches!(device_info(&driver, id, self.fuse_dir(), ns), Ok(None))
                }
                _ => !Path::new(&format!("/sys/block/ublkb{id}")).exists(),
            };
            let args = contract::del_args(id, self.fuse_dir());
            match run_driver(&driver, &args, DEL_TIMEOUT, ns) {
                Ok(_) => {}
                // Already gone (e.g. after a reboot) is what we wanted.
                Err(e) if gone() => debug!(id, "del: {e} (device already gone)"),
                Err(e) => return Err(e),
            }
            self.retire_stats(&p);
            let _ = std::fs::remove_file(&p.state);
            let _ = std::fs::rename(&p.log, p.log.with_extension("last.log"));
        }
        let _ = std::fs::remove_dir(mountpoint);
        Ok(())
    }

    fn attached(&self) -> Vec<(String, PathBuf)> {
        self.states()
            .into_iter()
            .filter(|s| {
                if s.unpacked {
                    s.mountpoint.is_dir()
                } else {
                    is_mountpoint(&s.mountpoint)
                }
            })
            .map(|s| (s.stack_key, s.mountpoint))
            .collect()
    }

    fn reconcile(&self) {
        let Ok(driver) = self.driver() else {
            return;
        };
        let recorded: HashSet<u32> = self
            .states()
            .iter()
            .filter(|s| !s.unpacked)
            .map(|s| s.device_id)
            .collect();
        let args = contract::list_json_args(self.fuse_dir());
        let list = run_driver(driver, &args, DEL_TIMEOUT, Namespace::Private).and_then(|out| {
            DeviceInfo::parse_list(&out)
                .map_err(|e| RemoteError::Failed(format!("listing devices: {e}")))
        });
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                warn!("reconciling devices at start: {e}");
                return;
            }
        };
        for d in list {
            if recorded.contains(&d.id) {
                continue;
            }
            // Only servers this snapshotter started: their arguments name its stack files. A
            // FUSE device between servers is known by its keeper's (the same files).
            let Some(mountpoint) = std::iter::once(d.pid)
                .chain(d.keeper_pid)
                .filter(|p| *p > 0)
                .find_map(|p| self.stack_of_server(p))
            else {
                continue;
            };
            warn!(id = d.id, mountpoint = %mountpoint.display(), "deleting a device an earlier run started but never recorded");
            if is_mountpoint(&mountpoint) {
                let _ = unmount(&mountpoint);
            }
            let transport = if d.transport == TRANSPORT_FUSE {
                Transport::Fuse
            } else {
                Transport::Ublk
            };
            let del = contract::del_args(d.id, self.fuse_dir());
            if let Err(e) = run_driver(driver, &del, DEL_TIMEOUT, Namespace::of(transport)) {
                warn!(id = d.id, "deleting the unrecorded device: {e}");
            }
        }
    }

    fn heal(&self) -> Vec<String> {
        let ublk: Vec<StackState> = self
            .states()
            .into_iter()
            .filter(|s| !s.unpacked && s.transport == Transport::Ublk)
            .collect();
        if ublk.is_empty() {
            return Vec::new();
        }
        let Ok(driver) = self.driver() else {
            return Vec::new();
        };
        let ns = Namespace::of(Transport::Ublk);
        let list = run_driver(
            driver,
            &contract::list_json_args(self.fuse_dir()),
            DEL_TIMEOUT,
            ns,
        )
        .and_then(|out| {
            DeviceInfo::parse_list(&out)
                .map_err(|e| RemoteError::Failed(format!("listing devices: {e}")))
        });
        let list = match list {
            Ok(l) => l,
            Err(e) => {
                warn!("watching devices: {e}");
                return Vec::new();
            }
        };
        let mut healed = Vec::new();
        for st in ublk {
            let quiesced = list.iter().any(|d| {
                d.id == st.device_id
                    && d.state == DeviceState::Quiesced
                    && d.layer_digest.as_deref() == Some(st.layer_digest.as_str())
            });
            if !quiesced {
                continue;
            }
            let stack_lock = self.stack_locks.get(&st.stack_key);
            let _g = lock(&stack_lock);
            let p = self.paths(&st.stack_key);
            // Re-read under the stack's lock: a detach or another recover may have won.
            let Some(now) = self
                .read_state(&p.state)
                .filter(|s| s.device_id == st.device_id)
            else {
                continue;
            };
            let still = device_info(driver, now.device_id, self.fuse_dir(), ns)
                .is_ok_and(|d| d.is_some_and(|d| d.state == DeviceState::Quiesced));
            if !still {
                continue;
            }
            match self.recover(driver, &p, &now) {
                Ok(()) => healed.push(now.stack_key.clone()),
                Err(e) => warn!(stack = %now.stack_key, id = now.device_id, "recover failed: {e}"),
            }
        }
        healed
    }

    fn stats(&self) -> DriverStats {
        let mut total = lock(&self.retired).clone();
        for st in self.states() {
            if let Some(s) = read_stats(&self.paths(&st.stack_key).stats) {
                total.add(&s);
            }
        }
        total
    }
}

fn read_stats(path: &Path) -> Option<DriverStats> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes)
        .map_err(|e| warn!(path = %path.display(), "unreadable driver stats: {e}"))
        .ok()
}

/// `<name>@<manifest digest>` when the digest is known (the tag may have moved since the pull),
/// else the reference as given.
pub fn pinned_ref(
    image_ref: &str,
    manifest_digest: Option<&String>,
) -> Result<String, RemoteError> {
    let Some(digest) = manifest_digest else {
        return Ok(image_ref.to_owned());
    };
    if !digest.starts_with("sha256:") || digest.len() != 71 {
        return Err(RemoteError::Failed(format!(
            "bad manifest digest label {digest:?}"
        )));
    }
    let name = image_ref.split('@').next().unwrap_or(image_ref);
    // A ':' after the last '/' starts a tag; one before it belongs to host:port.
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let name = match name[slash..].rfind(':') {
        Some(i) => &name[..slash + i],
        None => name,
    };
    if name.is_empty() {
        return Err(RemoteError::Failed(format!(
            "bad image reference {image_ref:?}"
        )));
    }
    Ok(format!("{name}@{digest}"))
}

/// The configured driver, else `cora-driver` next to our binary, else on `PATH`.
fn find_driver(configured: Option<&Path>) -> Result<PathBuf, String> {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        })
    };
    if let Some(p) = configured {
        return if executable(p) {
            Ok(p.to_owned())
        } else {
            Err(format!(
                "driverPath {} is not an executable file",
                p.display()
            ))
        };
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("cora-driver")));
    let on_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("cora-driver"))
                .collect()
        })
        .unwrap_or_default();
    beside
        .into_iter()
        .chain(on_path)
        .find(|p| executable(p))
        .ok_or_else(|| "cora-driver not found next to cora-snapshotter nor on PATH".to_owned())
}

/// Picks the transport: `wanted`, or for `Auto` ublk when it works, else FUSE. The probes
/// say what they found (`Ok`) or what is missing (`Err`), in words for the log.
fn select_transport(
    wanted: Transport,
    ublk: impl FnOnce() -> Result<String, String>,
    fuse: impl FnOnce() -> Result<String, String>,
) -> Result<Selection, String> {
    let via_ublk = |found: String, how: &str| Selection {
        transport: Transport::Ublk,
        reason: format!("{how}ublk: {found}; CORA layers served by cora-driver ublk devices"),
    };
    let via_fuse = |found: String, how: &str| Selection {
        transport: Transport::Fuse,
        reason: format!(
            "{how}; serving CORA layers through FUSE ({found}; served by cora-driver FUSE devices)"
        ),
    };
    match wanted {
        Transport::Ublk => ublk()
            .map(|found| via_ublk(found, "transport \"ublk\" configured; "))
            .map_err(|e| format!("transport \"ublk\" configured, but ublk: {e}")),
        Transport::Fuse => fuse()
            .map(|found| via_fuse(found, "transport \"fuse\" configured"))
            .map_err(|e| format!("transport \"fuse\" configured, but FUSE: {e}")),
        Transport::Auto => match ublk() {
            Ok(found) => Ok(via_ublk(found, "")),
            Err(no_ublk) => fuse()
                .map(|found| via_fuse(found, &format!("ublk: {no_ublk}")))
                .map_err(|no_fuse| format!("ublk: {no_ublk}; FUSE: {no_fuse}")),
        },
    }
}

/// Whether ublk works: `/dev/ublk-control` (after `modprobe ublk_drv` if needed) opens.
fn probe_ublk() -> Result<String, String> {
    let ctl = Path::new("/dev/ublk-control");
    let mut loaded = "";
    if !ctl.exists() {
        let _ = Command::new("modprobe")
            .arg("ublk_drv")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !ctl.exists() {
            return Err("/dev/ublk-control missing (modprobe ublk_drv failed)".into());
        }
        loaded = " after modprobe ublk_drv";
    }
    open_rw(ctl).map(|()| format!("/dev/ublk-control opens{loaded}"))
}

/// Whether FUSE works: `/dev/fuse` opens (the driver mounts with it; erofs then mounts the
/// image file, or a loop device over it).
fn probe_fuse() -> Result<String, String> {
    open_rw(Path::new("/dev/fuse")).map(|()| "/dev/fuse opens".to_owned())
}

fn open_rw(p: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map(drop)
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// After a reboot nothing is mounted under the FUSE dir, but the drivers' records there
/// (`<n>.json`, naming a server pid) outlive it on a persistent root, and `del` would signal
/// whatever process has such a pid now. So records of an earlier boot (by `boot_id`, kept
/// beside them) are dropped before any driver reads them. Records without a marker count as
/// older: the marker is written before our first driver command.
fn forget_earlier_boots(fuse_dir: &Path) -> std::io::Result<()> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let marker = fuse_dir.join("boot_id");
    if std::fs::read_to_string(&marker).is_ok_and(|b| b == boot) {
        return Ok(());
    }
    if let Ok(entries) = std::fs::read_dir(fuse_dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "json") {
                std::fs::remove_file(&path)?;
            } else if path.is_dir() && !is_mountpoint(&path) {
                // Best effort: a directory that is not empty is not a leftover mount point.
                let _ = std::fs::remove_dir(&path);
            }
        }
    }
    std::fs::create_dir_all(fuse_dir)?;
    let tmp = marker.with_extension("tmp");
    std::fs::write(&tmp, boot)?;
    std::fs::rename(&tmp, &marker)
}

/// The mount namespace a driver command runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Namespace {
    /// One of its own (private propagation): every command for ublk devices, whose servers
    /// must not see our mounts of their devices (libublk-rs#50).
    Private,
    /// The snapshotter's: for FUSE devices, whose mounts must be where we mount their files,
    /// and of which no other namespace may hold a copy (it would keep a deleted device's server
    /// alive as long as that namespace lives).
    Shared,
}

impl Namespace {
    fn of(transport: Transport) -> Namespace {
        match transport {
            Transport::Fuse => Namespace::Shared,
            Transport::Ublk | Transport::Auto => Namespace::Private,
        }
    }
}

/// Runs the driver with `args` in the namespace `ns` and returns its stdout; fails on a nonzero
/// exit or after `timeout` (the process is killed then).
fn run_driver(
    driver: &Path,
    args: &[String],
    timeout: Duration,
    ns: Namespace,
) -> Result<String, RemoteError> {
    let mut cmd = Command::new(driver);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if ns == Namespace::Private {
        // SAFETY: private_mount_namespace is async-signal-safe (two syscalls, no allocation).
        unsafe {
            cmd.pre_exec(cora_api::private_mount_namespace);
        }
    }
    // A driver command dies with the snapshotter: a device start whose result nobody will
    // record must not finish. (`add --daemon` then exits before its server is ready, and that
    // server, told so by the broken pipe, removes its device; a server already ready outlives
    // this, and the next start's reconcile deletes its device.)
    let snapshotter = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Died between fork and prctl: the signal would never come.
            if libc::getppid() != snapshotter {
                return Err(std::io::Error::other("the snapshotter exited"));
            }
            Ok(())
        });
    }
    let what = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| RemoteError::Failed(format!("starting {what}: {e}")))?;
    // Readers on their own threads: a chatty child must not block on a full pipe.
    let pipe = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(child.stdout.take().map(|r| Box::new(r) as _));
    let err = pipe(child.stderr.take().map(|r| Box::new(r) as _));
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(wait_exited(pid));
    });
    let status = match rx.recv_timeout(timeout) {
        // Exited and not yet reaped: reaping now does not block.
        Ok(Ok(())) => child
            .wait()
            .map_err(|e| RemoteError::Failed(format!("waiting for {what}: {e}")))?,
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RemoteError::Failed(format!("waiting for {what}: {e}")));
        }
        Err(_) => {
            // Still ours to kill: the waiter does not reap, so the pid cannot have been reused.
            let _ = child.kill();
            let _ = child.wait();
            return Err(RemoteError::Failed(format!(
                "{what} did not finish within {timeout:?}"
            )));
        }
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(RemoteError::Failed(format!(
            "{what} failed ({status}): {}",
            err.trim()
        )));
    }
    Ok(out)
}

/// Blocks until child `pid` has exited, leaving it unreaped (`WNOWAIT`): its `Child` stays the
/// one to reap (or kill) it.
fn wait_exited(pid: u32) -> std::io::Result<()> {
    let pid = libc::id_t::from(pid);
    loop {
        // SAFETY: waitid writes only into the zeroed siginfo we pass.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Device `id` as `cora-driver list --json` describes it; `Ok(None)` when it is not listed.
/// A list that cannot be had is an error, never "gone": a live device taken for gone would be
/// forgotten, and a second one started on its mountpoint.
fn device_info(
    driver: &Path,
    id: u32,
    fuse_dir: Option<&Path>,
    ns: Namespace,
) -> Result<Option<DeviceInfo>, RemoteError> {
    let out = run_driver(driver, &contract::list_json_args(fuse_dir), DEL_TIMEOUT, ns)?;
    let list = DeviceInfo::parse_list(&out)
        .map_err(|e| RemoteError::Failed(format!("listing devices: {e}")))?;
    Ok(list.into_iter().find(|d| d.id == id))
}

fn cstr(p: &Path) -> Result<CString, RemoteError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RemoteError::Failed(format!("path {} contains NUL", p.display())))
}

/// Mounts what a device serves read-only on `mountpoint`; returns the loop device it took.
/// A ublk block device is mounted as it is, and so is a FUSE image file where erofs mounts
/// regular files (file-backed, Linux 6.12+; not mount(8), which would set up a loop device).
/// Where the kernel refuses a file (older kernels; ext4 always), the file is attached to a
/// read-only loop device, which is mounted instead.
///
/// erofs reads a FUSE image file with direct I/O (`directio`, Linux 6.13+; without it where
/// the kernel does not know the option): its data then skips the FUSE file's page cache, so a
/// page the container reads is cached once (by erofs), not twice, and copied once fewer. wan,
/// 2 rounds each, with / without: warm Python start 2.75 / 3.33 s (OCI 2.44 / 2.51 s), cold
/// Python 6.91 / 7.72 s, Node 2.67 / 2.74 s, with a trace 4.97 / 4.95 s and 1.44 / 1.51 s;
/// peak RSS of our processes 209 / 226 MB.
fn mount_image(
    path: &Path,
    mountpoint: &Path,
    fs_type: &str,
    transport: Transport,
) -> Result<Option<LoopDevice>, RemoteError> {
    let failed = |what: &Path, e: std::io::Error| {
        RemoteError::Failed(format!(
            "mounting {} ({fs_type}) on {}: {e}",
            what.display(),
            mountpoint.display()
        ))
    };
    if transport == Transport::Fuse && fs_type == "erofs" {
        match mount_ro_with(path, mountpoint, fs_type, c"directio") {
            Ok(()) => return Ok(None),
            // An unknown option (EINVAL), or no file-backed mounts at all (ENOTBLK, before
            // 6.12): as without it, which falls back to a loop device where needed.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTBLK)) => {
                debug!(file = %path.display(), "erofs refused directio ({e}); mounting without")
            }
            Err(e) => return Err(failed(path, e)),
        }
    }
    let direct = match mount_ro(path, mountpoint, fs_type) {
        Ok(()) => return Ok(None),
        Err(e) => e,
    };
    if transport != Transport::Fuse
        || !matches!(direct.raw_os_error(), Some(libc::EINVAL | libc::ENOTBLK))
    {
        return Err(failed(path, direct));
    }
    let l = loop_attach(path)?;
    if let Err(e) = mount_ro(&l.device, mountpoint, fs_type) {
        let _ = loop_detach(&l);
        return Err(RemoteError::Failed(format!(
            "{}; through {}: {}",
            failed(path, direct),
            l.device.display(),
            failed(&l.device, e)
        )));
    }
    info!(file = %path.display(), device = %l.device.display(), "the kernel does not mount the image file itself ({direct}); mounted it through a loop device");
    Ok(Some(l))
}

/// `losetup --read-only --find --show FILE`.
fn loop_attach(file: &Path) -> Result<LoopDevice, RemoteError> {
    let out = Command::new("losetup")
        .args(["--read-only", "--find", "--show"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RemoteError::Failed(format!("running losetup: {e}")))?;
    let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || device.is_empty() {
        return Err(RemoteError::Failed(format!(
            "losetup --read-only --find --show {} failed ({}): {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(LoopDevice {
        device: PathBuf::from(device),
        backing_file: file.to_owned(),
    })
}

/// Frees a loop device we attached, unless it is gone or now backs another file.
fn loop_detach(l: &LoopDevice) -> Result<(), RemoteError> {
    let name = l.device.file_name().unwrap_or_default();
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    let Ok(file) = std::fs::read_to_string(&backing) else {
        return Ok(());
    };
    let file = file.trim_end_matches('\n');
    if Path::new(file.strip_suffix(" (deleted)").unwrap_or(file)) != l.backing_file {
        debug!(device = %l.device.display(), file, "the loop device backs another file now; leaving it");
        return Ok(());
    }
    let out = Command::new("losetup")
        .arg("--detach")
        .arg(&l.device)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RemoteError::Failed(format!("running losetup: {e}")))?;
    if !out.status.success() {
        return Err(RemoteError::Failed(format!(
            "losetup --detach {} failed ({}): {}",
            l.device.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn mount_ro(dev: &Path, mountpoint: &Path, fs_type: &str) -> std::io::Result<()> {
    // ext4 on a read-only device: never replay the journal.
    let data = if fs_type == "ext4" { c"noload" } else { c"" };
    mount_ro_with(dev, mountpoint, fs_type, data)
}

fn mount_ro_with(
    dev: &Path,
    mountpoint: &Path,
    fs_type: &str,
    data: &std::ffi::CStr,
) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (src, dst) = (c(dev)?, c(mountpoint)?);
    let fs = CString::new(fs_type).map_err(std::io::Error::other)?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fs.as_ptr(),
            libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts; a path that is not mounted is fine, a busy mount is an error (the device then
/// stays, since deleting it would fail every read of its users).
fn unmount(mountpoint: &Path) -> Result<(), RemoteError> {
    if !is_mountpoint(mountpoint) {
        return Ok(());
    }
    unmount_flags(mountpoint, 0)
}

fn unmount_flags(mountpoint: &Path, flags: libc::c_int) -> Result<(), RemoteError> {
    let p = cstr(mountpoint)?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(p.as_ptr(), flags) } != 0 {
        return Err(RemoteError::Failed(format!(
            "unmounting {}: {}",
            mountpoint.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Whether `p` is a mount point in our namespace (field 5 of /proc/self/mountinfo).
pub fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = p.as_os_str().as_bytes();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|m| unescape_mountinfo(m) == want)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn write_state(path: &Path, st: &StackState) -> Result<(), RemoteError> {
    let bytes = serde_json::to_vec(st)
        .map_err(|e| RemoteError::Failed(format!("encoding {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RemoteError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| RemoteError::Failed(format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn pinned_ref_drops_tag_keeps_port() {
        let d = D.to_owned();
        assert_eq!(
            pinned_ref("127.0.0.1:5000/app:v1", Some(&d)).unwrap(),
            format!("127.0.0.1:5000/app@{D}")
        );
        assert_eq!(
            pinned_ref("127.0.0.1:5000/a/b", Some(&d)).unwrap(),
            format!("127.0.0.1:5000/a/b@{D}")
        );
        assert_eq!(
            pinned_ref("h/app:v1@sha256:22", Some(&d)).unwrap(),
            format!("h/app@{D}")
        );
        assert_eq!(pinned_ref("h/app:v1", None).unwrap(), "h/app:v1");
        assert!(pinned_ref("h/app:v1", Some(&"md5:x".to_owned())).is_err());
    }

    fn labels(keys: &[&str]) -> Labels {
        keys.iter()
            .map(|k| (k.to_string(), "x".to_string()))
            .collect()
    }

    fn layers_in(dir: &Path, allow_ext4: bool) -> UblkLayers {
        UblkLayers::new(UblkOptions {
            dir: dir.join("remote"),
            transport: Transport::Auto,
            fuse_dir: dir.join("fuse"),
            driver: None,
            cache_dir: dir.join("cache"),
            cache_size: 1 << 30,
            fetch: Default::default(),
            allow_ext4,
            registry: RegistryArgs::default(),
        })
    }

    /// CRI labels plus a CORA fs-type annotation of `fs`.
    fn cora_labels(fs: &str) -> Labels {
        let mut l = labels(&[LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST]);
        l.insert(LABEL_FS_TYPE.into(), fs.into());
        l
    }

    #[test]
    fn is_remote_needs_cora_annotation_and_cri_labels() {
        let dir = tempfile::tempdir().unwrap();
        let b = layers_in(dir.path(), false);
        assert!(b.is_remote(&cora_labels("erofs")));
        let mut no_layer = cora_labels("erofs");
        no_layer.remove(LABEL_CRI_LAYER_DIGEST);
        assert!(!b.is_remote(&no_layer));
        assert!(!b.is_remote(&labels(&[LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST])));
    }

    #[test]
    fn only_erofs_is_mounted_unless_ext4_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let strict = layers_in(dir.path(), false);
        assert!(!strict.is_remote(&cora_labels("ext4")));
        assert!(!strict.is_remote(&cora_labels("xfs")));
        let e = strict
            .attach_stack("s", &cora_labels("ext4"), false)
            .unwrap_err();
        assert!(e.to_string().contains("allowExt4"), "{e}");
        let lenient = layers_in(dir.path(), true);
        assert!(lenient.is_remote(&cora_labels("ext4")));
        assert!(!lenient.is_remote(&cora_labels("xfs")));
    }

    #[test]
    fn driver_lookup_and_args() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(
            find_driver(Some(&missing))
                .unwrap_err()
                .contains("driverPath")
        );
        let fake = dir.path().join("cora-driver");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        assert!(find_driver(Some(&fake)).is_err(), "not executable yet");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_driver(Some(&fake)).unwrap(), fake);

        let b = UblkLayers::new(UblkOptions {
            dir: dir.path().join("remote"),
            transport: Transport::Auto,
            fuse_dir: dir.path().join("fuse"),
            driver: Some(fake),
            cache_dir: PathBuf::from("/c"),
            cache_size: 4096,
            fetch: Default::default(),
            allow_ext4: false,
            registry: RegistryArgs {
                creds_file: Some(PathBuf::from("/creds.json")),
                insecure_hosts: vec!["127.0.0.1:5000".into()],
                mirrors: vec![
                    Mirror {
                        host: "m:1".into(),
                        insecure: true,
                    },
                    Mirror {
                        host: "m:2".into(),
                        insecure: false,
                    },
                ],
                ca_files: vec![],
            },
        });
        let p = b.paths("default/7/sha256:abc");
        assert_eq!(
            p.mountpoint.parent(),
            Some(dir.path().join("remote").as_path())
        );
        assert_ne!(p.mountpoint, b.paths("default/8/sha256:abc").mountpoint);
        let a = b.add_args("h/app@sha256:1", D, &p, Transport::Fuse);
        assert_eq!(a.layer_digest.as_deref(), Some(D));
        assert_eq!(a.transport, Transport::Fuse);
        assert_eq!(
            a.fuse_dir.as_deref(),
            Some(dir.path().join("fuse").as_path())
        );
        assert!(
            dir.path().join("fuse/boot_id").exists(),
            "the boot is marked before any device is added"
        );
        assert_eq!((a.cache_size, a.queues), (4096, QUEUES));
        assert_eq!(a.registry, b.opts.registry);
        assert!(a.run.daemon && a.run.ready_json);
        assert_eq!(a.run.stats_file.as_ref(), Some(&p.stats));
        assert_eq!(a.run.log.as_ref(), Some(&p.log));
    }

    /// An executable shell script standing in for cora-driver.
    fn fake_driver(dir: &Path, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("cora-driver");
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn run_driver_returns_stdout_and_reports_failure_and_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let d = fake_driver(
            dir.path(),
            r#"case $1 in
                 ok) echo "out $2" ;;
                 fail) echo "bad things" >&2; exit 3 ;;
                 slow) exec sleep 30 ;;
               esac"#,
        );
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            run_driver(
                &d,
                &args(&["ok", "x"]),
                Duration::from_secs(20),
                Namespace::Shared
            )
            .unwrap(),
            "out x\n"
        );
        let e = run_driver(
            &d,
            &args(&["fail"]),
            Duration::from_secs(20),
            Namespace::Private,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("failed") && e.contains("bad things"), "{e}");
        let t0 = Instant::now();
        let e = run_driver(
            &d,
            &args(&["slow"]),
            Duration::from_millis(300),
            Namespace::Private,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did not finish within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "killed on timeout");
    }

    /// A fake driver that logs its arguments and answers `list` with what the test wrote.
    struct FakeDriver {
        calls: PathBuf,
        list: PathBuf,
    }

    impl FakeDriver {
        fn new(dir: &Path) -> (FakeDriver, PathBuf) {
            let f = FakeDriver {
                calls: dir.join("calls"),
                list: dir.join("list.json"),
            };
            let d = fake_driver(
                dir,
                &format!(
                    r#"echo "$@" >>{calls}
                       case $1 in list) cat {list} ;; esac"#,
                    calls = f.calls.display(),
                    list = f.list.display()
                ),
            );
            (f, d)
        }

        fn lists(&self, devs: &[DeviceInfo]) {
            std::fs::write(&self.list, serde_json::to_vec(devs).unwrap()).unwrap();
        }

        /// The calls so far, forgotten.
        fn take_calls(&self) -> Vec<String> {
            let log = std::fs::read_to_string(&self.calls).unwrap_or_default();
            let _ = std::fs::remove_file(&self.calls);
            log.lines().map(str::to_owned).collect()
        }
    }

    fn device(id: u32, transport: Transport, state: &str, digest: &str) -> DeviceInfo {
        DeviceInfo {
            id,
            state: state.to_owned().into(),
            pid: 1,
            keeper_pid: None,
            transport: transport.as_str().into(),
            path: format!("/dev/ublkb{id}").into(),
            size: 0,
            read_only: true,
            queues: 2,
            depth: 128,
            max_io_bytes: 1 << 20,
            flags: 0,
            flag_names: vec![],
            data_mode: None,
            target: Some("cora".into()),
            image: Some("h/a@x".into()),
            layer_digest: Some(digest.into()),
            recipe: None,
        }
    }

    fn stack(key: &str, transport: Transport, id: u32, mountpoint: &Path) -> StackState {
        StackState {
            stack_key: key.into(),
            transport,
            device_id: id,
            loop_device: None,
            unpacked: false,
            mountpoint: mountpoint.to_owned(),
            image: "h/a@x".into(),
            layer_digest: D.into(),
        }
    }

    /// A backend whose driver is a [`FakeDriver`]; also returns its FUSE dir.
    fn with_fake_driver(dir: &Path) -> (FakeDriver, UblkLayers, PathBuf) {
        let (fake, d) = FakeDriver::new(dir);
        let mut opts = state_only_opts(dir);
        opts.driver = Some(d);
        let fuse_dir = opts.fuse_dir.clone();
        (fake, UblkLayers::new(opts), fuse_dir)
    }

    #[test]
    fn reuse_reads_the_typed_device_list_and_recovers_a_quiesced_device() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, b, fuse_dir) = with_fake_driver(dir.path());
        let p = b.paths("ns/3/L");
        // /proc is a mount point, so a live device is reused without mounting anything.
        let st = stack("ns/3/L", Transport::Ublk, 5, Path::new("/proc"));
        fake.lists(&[device(5, Transport::Ublk, "LIVE", D)]);
        assert_eq!(
            b.reuse(&p, &st, "erofs").unwrap(),
            Some(PathBuf::from("/proc"))
        );
        fake.lists(&[device(5, Transport::Ublk, "QUIESCED", D)]);
        assert_eq!(
            b.reuse(&p, &st, "erofs").unwrap(),
            Some(PathBuf::from("/proc"))
        );
        let list = format!("list --json --fuse-dir {}", fuse_dir.display());
        assert_eq!(
            fake.take_calls(),
            [
                list.clone(),
                list,
                format!(
                    "recover 5 --daemon --ready-json --log {} --stats-file {}",
                    p.log.display(),
                    p.stats.display()
                ),
            ]
        );
        // Another stack's device under the recorded id: not ours, the state is dropped.
        let elsewhere = StackState {
            mountpoint: dir.path().join("not-mounted"),
            ..st.clone()
        };
        write_state(&p.state, &elsewhere).unwrap();
        fake.lists(&[device(5, Transport::Ublk, "LIVE", "sha256:other")]);
        assert_eq!(b.reuse(&p, &elsewhere, "erofs").unwrap(), None);
        assert!(!p.state.exists());
        // No list at all (the driver failed): an error, and the device is not forgotten.
        write_state(&p.state, &st).unwrap();
        std::fs::remove_file(&fake.list).unwrap();
        let e = b.reuse(&p, &st, "erofs").unwrap_err();
        assert!(e.to_string().contains("cannot tell whether"), "{e}");
        assert!(p.state.exists(), "a device that may be live was forgotten");
    }

    /// At start, a live device whose server works for one of our stacks but that no state file
    /// records (the snapshotter died between its start and the state write) is deleted;
    /// recorded devices and other people's devices are left alone.
    #[test]
    fn reconcile_deletes_only_our_unrecorded_devices() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, b, fuse_dir) = with_fake_driver(dir.path());
        let orphan_of = b.paths("ns/9/L");
        // A process whose arguments look like a server of that stack.
        let mut ours = Command::new("sh")
            // `; :` keeps the shell from exec-ing sleep (and losing these arguments).
            .args(["-c", "sleep 600; :", "cora-driver", "--stats-file"])
            .arg(&orphan_of.stats)
            .spawn()
            .unwrap();
        let recorded = b.paths("ns/3/L");
        write_state(
            &recorded.state,
            &stack("ns/3/L", Transport::Ublk, 5, Path::new("/proc")),
        )
        .unwrap();
        let mut orphan = device(7, Transport::Ublk, "LIVE", D);
        orphan.pid = ours.id() as i32;
        let mut foreign = device(8, Transport::Ublk, "LIVE", D);
        foreign.pid = std::process::id() as i32;
        let mut kept = device(5, Transport::Ublk, "LIVE", D);
        kept.pid = ours.id() as i32;
        // A FUSE device whose server died, known by its keeper's arguments.
        let fuse_id = (1 << 24) + 3;
        let mut between = device(fuse_id, Transport::Fuse, "QUIESCED", D);
        between.pid = -1;
        between.keeper_pid = Some(ours.id() as i32);
        fake.lists(&[kept, orphan, foreign, between]);
        b.reconcile();
        let _ = ours.kill();
        let _ = ours.wait();
        let list = format!("list --json --fuse-dir {}", fuse_dir.display());
        assert_eq!(
            fake.take_calls(),
            [
                list,
                format!("del 7 --fuse-dir {}", fuse_dir.display()),
                format!("del {fuse_id} --fuse-dir {}", fuse_dir.display())
            ]
        );
    }

    /// The watcher's check: a quiesced ublk device of an attached stack gets a new server; a
    /// live one, or one whose list says it serves another stack, is left alone.
    #[test]
    fn heal_recovers_quiesced_ublk_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, b, fuse_dir) = with_fake_driver(dir.path());
        let p = b.paths("ns/3/L");
        write_state(
            &p.state,
            &stack("ns/3/L", Transport::Ublk, 5, Path::new("/proc")),
        )
        .unwrap();
        let list = format!("list --json --fuse-dir {}", fuse_dir.display());
        fake.lists(&[device(5, Transport::Ublk, "LIVE", D)]);
        assert!(b.heal().is_empty());
        assert_eq!(fake.take_calls(), std::slice::from_ref(&list));
        fake.lists(&[device(5, Transport::Ublk, "QUIESCED", "sha256:other")]);
        assert!(b.heal().is_empty());
        fake.take_calls();
        fake.lists(&[device(5, Transport::Ublk, "QUIESCED", D)]);
        assert_eq!(b.heal(), ["ns/3/L"]);
        assert_eq!(
            fake.take_calls(),
            [
                list.clone(),
                list,
                format!(
                    "recover 5 --daemon --ready-json --log {} --stats-file {}",
                    p.log.display(),
                    p.stats.display()
                ),
            ]
        );
    }

    #[test]
    fn reuse_keeps_a_live_or_recovering_fuse_device_and_clears_a_dead_one() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, b, fuse_dir) = with_fake_driver(dir.path());
        let p = b.paths("ns/4/L");
        let id = 1 << 24;
        let st = stack("ns/4/L", Transport::Fuse, id, Path::new("/proc"));
        fake.lists(&[device(id, Transport::Fuse, "LIVE", D)]);
        assert_eq!(
            b.reuse(&p, &st, "erofs").unwrap(),
            Some(PathBuf::from("/proc"))
        );
        let list = format!("list --json --fuse-dir {}", fuse_dir.display());
        assert_eq!(fake.take_calls(), std::slice::from_ref(&list));

        // Its server died and its keeper is starting the next one: kept as it is, no driver
        // command but the list.
        fake.lists(&[device(id, Transport::Fuse, "QUIESCED", D)]);
        assert_eq!(
            b.reuse(&p, &st, "erofs").unwrap(),
            Some(PathBuf::from("/proc"))
        );
        assert_eq!(fake.take_calls(), std::slice::from_ref(&list));

        // Its server and keeper died: `del` clears its leftovers and the stack is attached
        // anew.
        let unmounted = StackState {
            mountpoint: dir.path().join("not-mounted"),
            ..st
        };
        write_state(&p.state, &unmounted).unwrap();
        fake.lists(&[device(id, Transport::Fuse, "DEAD", D)]);
        assert_eq!(b.reuse(&p, &unmounted, "erofs").unwrap(), None);
        assert!(!p.state.exists());
        assert_eq!(
            fake.take_calls(),
            [list, format!("del {id} --fuse-dir {}", fuse_dir.display())]
        );
    }

    #[test]
    fn detach_unmounts_then_deletes_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let (fake, b, fuse_dir) = with_fake_driver(dir.path());
        let p = b.paths("ns/5/L");
        std::fs::create_dir_all(&p.mountpoint).unwrap();
        let id = (1 << 24) + 1;
        write_state(
            &p.state,
            &stack("ns/5/L", Transport::Fuse, id, &p.mountpoint),
        )
        .unwrap();
        std::fs::write(&p.stats, r#"{"fetched_bytes":7}"#).unwrap();
        b.detach("ns/5/L", &p.mountpoint).unwrap();
        assert_eq!(
            fake.take_calls(),
            [format!("del {id} --fuse-dir {}", fuse_dir.display())]
        );
        assert!(!p.state.exists() && !p.mountpoint.exists());
        assert_eq!(b.stats().fetched_bytes, 7, "its counters are retired");
    }

    #[test]
    fn state_files_of_older_snapshotters_are_ublk_stacks() {
        let st: StackState = serde_json::from_str(
            r#"{"stack_key":"k","device_id":3,"unpacked":false,"mountpoint":"/m",
                "image":"h/a@x","layer_digest":"sha256:1"}"#,
        )
        .unwrap();
        assert_eq!((st.transport, st.loop_device), (Transport::Ublk, None));
        let with_loop = StackState {
            transport: Transport::Fuse,
            loop_device: Some(LoopDevice {
                device: "/dev/loop7".into(),
                backing_file: "/r/fuse/0/image".into(),
            }),
            ..st
        };
        let text = serde_json::to_string(&with_loop).unwrap();
        assert!(text.contains(r#""transport":"fuse""#), "{text}");
        assert_eq!(
            serde_json::from_str::<StackState>(&text).unwrap(),
            with_loop
        );
        // A loop device that is not there (any more) needs no freeing.
        let gone = LoopDevice {
            device: "/dev/loop-none".into(),
            backing_file: "/x".into(),
        };
        loop_detach(&gone).unwrap();
    }

    #[test]
    fn transport_selection_prefers_ublk_then_fuse_and_says_why() {
        let ok = |s: &'static str| move || Ok::<_, String>(s.to_owned());
        let no = |s: &'static str| move || Err::<String, _>(s.to_owned());
        let never = || -> Result<String, String> { panic!("not probed") };

        let s = select_transport(Transport::Auto, ok("/dev/ublk-control opens"), never).unwrap();
        assert_eq!(s.transport, Transport::Ublk);
        // tests/vm/40-containerd.sh looks for this phrase.
        assert!(
            s.reason.contains("served by cora-driver ublk devices"),
            "{s}"
        );

        let s = select_transport(
            Transport::Auto,
            no("/dev/ublk-control missing (modprobe ublk_drv failed)"),
            ok("/dev/fuse opens"),
        )
        .unwrap();
        assert_eq!(s.transport, Transport::Fuse);
        assert!(
            s.reason.starts_with(
                "ublk: /dev/ublk-control missing (modprobe ublk_drv failed); serving CORA \
                 layers through FUSE"
            ),
            "{s}"
        );

        let e = select_transport(Transport::Auto, no("no ublk"), no("no fuse")).unwrap_err();
        assert_eq!(e, "ublk: no ublk; FUSE: no fuse");

        let s = select_transport(Transport::Fuse, never, ok("/dev/fuse opens")).unwrap();
        assert_eq!(s.transport, Transport::Fuse);
        assert!(s.reason.contains("\"fuse\" configured"), "{s}");
        let e = select_transport(Transport::Ublk, no("no ublk"), never).unwrap_err();
        assert!(
            e.contains("\"ublk\" configured") && e.contains("no ublk"),
            "{e}"
        );
        let e = select_transport(Transport::Fuse, never, no("no fuse")).unwrap_err();
        assert!(e.contains("no fuse"), "{e}");
    }

    #[test]
    fn fuse_records_of_an_earlier_boot_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let fuse = dir.path().join("fuse");
        std::fs::create_dir_all(fuse.join("0")).unwrap();
        std::fs::write(fuse.join("0.json"), "{}").unwrap();
        std::fs::write(fuse.join("boot_id"), "another boot\n").unwrap();
        forget_earlier_boots(&fuse).unwrap();
        assert!(!fuse.join("0.json").exists() && !fuse.join("0").exists());
        // Records of this boot stay.
        std::fs::write(fuse.join("1.json"), "{}").unwrap();
        forget_earlier_boots(&fuse).unwrap();
        assert!(fuse.join("1.json").exists());
    }

    #[test]
    fn mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/a\\"), br"/a\\");
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
    }

    /// Options for tests that only touch state files (no driver, no device).
    fn state_only_opts(dir: &Path) -> UblkOptions {
        let opts = UblkOptions {
            dir: dir.join("remote"),
            transport: Transport::Auto,
            fuse_dir: dir.join("fuse"),
            driver: None,
            cache_dir: PathBuf::from("/c"),
            cache_size: 4096,
            fetch: Default::default(),
            allow_ext4: false,
            registry: RegistryArgs::default(),
        };
        std::fs::create_dir_all(&opts.dir).unwrap();
        opts
    }

    #[test]
    fn state_survives_a_new_backend_and_attach_reuses_it() {
        // No kernel device is needed to check that a restarted backend lists what the last
        // one recorded; `attached` only reports stacks whose mount is live, so record /proc.
        let dir = tempfile::tempdir().unwrap();
        let opts = state_only_opts(dir.path());
        let b = UblkLayers::new(opts.clone());
        let p = b.paths("ns/1/L");
        let st = stack("ns/1/L", Transport::Ublk, 7, Path::new("/proc"));
        write_state(&p.state, &st).unwrap();
        std::fs::write(
            &p.stats,
            r#"{"hits":3,"misses":2,"fetched_bytes":100,"requests":1,"corrupt":0,"fetch_errors":1,
               "fetch_seconds":{"le":[0.001,1.0],"counts":[0,1,0],"sum_seconds":0.5,"count":1}}"#,
        )
        .unwrap();
        let b2 = UblkLayers::new(opts);
        assert_eq!(
            b2.attached(),
            vec![("ns/1/L".to_owned(), PathBuf::from("/proc"))]
        );
        let s = b2.stats();
        assert_eq!(
            (s.hits, s.misses, s.fetched_bytes, s.fetch_errors),
            (3, 2, 100, 1)
        );
        b2.retire_stats(&p);
        assert!(!p.stats.exists());
        assert_eq!(
            b2.stats().fetched_bytes,
            100,
            "retired counters stay counted"
        );
    }

    #[test]
    fn unpacked_stacks_are_listed_reused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let opts = state_only_opts(dir.path());
        let b = UblkLayers::new(opts.clone());
        let p = b.paths("ns/2/L");
        std::fs::create_dir_all(p.tree.join("bin")).unwrap();
        std::fs::write(p.tree.join("bin/sh"), b"#!").unwrap();
        let st = StackState {
            unpacked: true,
            ..stack("ns/2/L", Transport::Ublk, 0, &p.tree)
        };
        write_state(&p.state, &st).unwrap();
        let b2 = UblkLayers::new(opts);
        assert_eq!(b2.attached(), vec![("ns/2/L".to_owned(), p.tree.clone())]);
        assert_eq!(b2.reuse(&p, &st, "erofs").unwrap(), Some(p.tree.clone()));
        b2.detach("ns/2/L", &p.tree).unwrap();
        assert!(!p.tree.exists() && !p.state.exists());
        assert!(b2.attached().is_empty());
        // A state whose tree is gone is dropped, not reused.
        write_state(&p.state, &st).unwrap();
        assert_eq!(b2.reuse(&p, &st, "erofs").unwrap(), None);
        assert!(!p.state.exists());
    }
}
