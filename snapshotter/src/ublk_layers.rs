//! The lazy backend: one `cora-driver` ublk device per CORA layer stack, its file system
//! mounted read-only under `<root>/remote/<hash of the stack key>`.
//!
//! ```text
//! <root>/remote/<h>/            mount point of the stack's file system
//! <root>/remote/<h>.json        state: stack key, device id, mount point, image, layer digest
//! <root>/remote/<h>.stats.json  the driver's counters (rewritten by it every second)
//! <root>/remote/<h>.log         the driver's log
//! ```
//!
//! The state file lets a restarted snapshotter find the live device and mount of a stack and
//! hand out the same path, so running containers keep their lowerdir. The driver is started
//! in a mount namespace of its own (private propagation): a ublk server that exits in a
//! namespace holding a mount of its own device deadlocks (libublk-rs#50), and our mount is made
//! in the snapshotter's namespace, which containerd shares.
use crate::config::Config;
use crate::remote::{
    DriverStats, KeyedLocks, LABEL_CORA_PREFIX, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST,
    LABEL_CRI_MANIFEST_DIGEST, Labels, RemoteError, RemoteLayers, lock_ignoring_poison as lock,
};
use cora_api::driver::{
    self as contract, DeviceInfo, DeviceState, Mirror, Ready, RecoverArgs, RegistryArgs, RunArgs,
    TRANSPORT_UBLK, UnpackArgs,
};
use sha2::Digest as _;
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
    /// Configured driver binary; `None` = next to our own binary, then `PATH`.
    pub driver: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    /// How the driver reaches registries, for `add` and `unpack` alike.
    pub registry: RegistryArgs,
}

impl UblkOptions {
    pub fn from_config(c: &Config) -> UblkOptions {
        UblkOptions {
            dir: c.root.join("remote"),
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
        }
    }
}

/// What is recorded per attached stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct StackState {
    stack_key: String,
    /// Unused when `unpacked`.
    device_id: u32,
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
    kernel: OnceLock<Result<(), String>>,
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
            kernel: OnceLock::new(),
            stack_locks: KeyedLocks::default(),
            retired: Mutex::new(DriverStats::default()),
        }
    }

    fn driver(&self) -> Result<&Path, RemoteError> {
        self.driver
            .as_deref()
            .map_err(|e| RemoteError::Unavailable(e.clone()))
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
    /// (remount if only the mount is gone, recover if only the server died). `None` when the
    /// device is gone; stale leftovers are cleared then.
    fn reuse(&self, p: &StackPaths, st: &StackState, fs_type: &str) -> Option<PathBuf> {
        if st.unpacked {
            if st.mountpoint.is_dir() {
                return Some(st.mountpoint.clone());
            }
            let _ = std::fs::remove_file(&p.state);
            return None;
        }
        let driver = self.driver().ok()?;
        let dev = device_info(driver, st.device_id)
            .filter(|d| d.layer_digest.as_deref() == Some(st.layer_digest.as_str()));
        let Some(dev) = dev else {
            info!(stack = %st.stack_key, id = st.device_id, "device of the recorded stack is gone; attaching anew");
            let _ = unmount(&st.mountpoint);
            let _ = std::fs::remove_file(&p.state);
            return None;
        };
        if dev.state == DeviceState::Quiesced {
            info!(id = st.device_id, "the device's server died; recovering it");
            let args = RecoverArgs {
                id: st.device_id,
                run: self.run_args(p),
            };
            if let Err(e) = run_driver(driver, &args.to_args(), ADD_TIMEOUT) {
                warn!(id = st.device_id, "recover failed: {e}");
                return None;
            }
        }
        if !is_mountpoint(&st.mountpoint)
            && let Err(e) = mount_ro(&dev.path, &st.mountpoint, fs_type)
        {
            warn!(id = st.device_id, "remounting: {e}");
            return None;
        }
        Some(st.mountpoint.clone())
    }

    /// How a device of the stack at `p` runs: in the background, logging and writing its
    /// counters beside the stack's state.
    fn run_args(&self, p: &StackPaths) -> RunArgs {
        RunArgs::background(Some(p.log.clone()), Some(p.stats.clone()))
    }

    fn add_args(&self, image: &str, layer_digest: &str, p: &StackPaths) -> contract::AddArgs {
        let o = &self.opts;
        contract::AddArgs {
            image: image.to_owned(),
            layer_digest: Some(layer_digest.to_owned()),
            cache_dir: o.cache_dir.clone(),
            cache_size: o.cache_size,
            queues: QUEUES,
            registry: o.registry.clone(),
            run: self.run_args(p),
        }
    }

    /// A ublk device serving the stack, mounted read-only at `p.mountpoint`.
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
        // A stats file left by an earlier device of this stack (its driver may write once more
        // after `del`) must not be counted again.
        let _ = std::fs::remove_file(&p.stats);
        let started = Instant::now();
        let out = run_driver(
            driver,
            &self.add_args(image, layer_digest, p).to_args(),
            ADD_TIMEOUT,
        )?;
        let ready = Ready::from_output(&out).map_err(|e| RemoteError::Failed(e.to_string()))?;
        let dev = ready.id;
        let delete = || {
            if let Err(e) = run_driver(driver, &contract::del_args(dev), DEL_TIMEOUT) {
                warn!(id = dev, "deleting the device after a failed attach: {e}");
            }
        };
        // The driver reports ready only once the node exists, so it can be mounted now.
        let mounted = if ready.transport == TRANSPORT_UBLK {
            mount_ro(&ready.path, &p.mountpoint, fs_type)
        } else {
            Err(RemoteError::Failed(format!(
                "cora-driver add served a {:?} device, not ublk",
                ready.transport
            )))
        };
        if let Err(e) = mounted {
            delete();
            return Err(e);
        }
        let st = StackState {
            stack_key: stack_key.to_owned(),
            device_id: dev,
            unpacked: false,
            mountpoint: p.mountpoint.clone(),
            image: image.to_owned(),
            layer_digest: layer_digest.to_owned(),
        };
        if let Err(e) = write_atomic(&p.state, &serde_json::to_vec(&st).unwrap_or_default()) {
            let _ = unmount(&p.mountpoint);
            delete();
            return Err(e);
        }
        info!(stack = %stack_key, id = dev, took = ?started.elapsed(), mountpoint = %p.mountpoint.display(), "stack attached");
        Ok(p.mountpoint.clone())
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
        let image_ref = get(LABEL_CRI_IMAGE_REF)?;
        let layer_digest = get(LABEL_CRI_LAYER_DIGEST)?;
        let image = pinned_ref(image_ref, labels.get(LABEL_CRI_MANIFEST_DIGEST))?;
        let fs_type = labels
            .get(LABEL_FS_TYPE)
            .map(String::as_str)
            .unwrap_or("erofs");
        if !matches!(fs_type, "erofs" | "ext4") {
            return Err(RemoteError::Failed(format!(
                "stack {stack_key}: unsupported file system {fs_type:?}"
            )));
        }
        let driver = self.driver()?.to_owned();
        let stack_lock = self.stack_locks.get(stack_key);
        let _g = lock(&stack_lock);
        let p = self.paths(stack_key);
        if let Some(st) = self.read_state(&p.state)
            && st.stack_key == stack_key
            && let Some(mp) = self.reuse(&p, &st, fs_type)
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
        let out = run_driver(driver, &args.to_args(), UNPACK_TIMEOUT)?;
        let st = StackState {
            stack_key: stack_key.to_owned(),
            device_id: 0,
            unpacked: true,
            mountpoint: p.tree.clone(),
            image: image.to_owned(),
            layer_digest: layer_digest.to_owned(),
        };
        if let Err(e) = write_atomic(&p.state, &serde_json::to_vec(&st).unwrap_or_default()) {
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
        self.driver()?;
        self.kernel
            .get_or_init(kernel_has_ublk)
            .clone()
            .map_err(RemoteError::Unavailable)
    }

    fn is_remote(&self, labels: &Labels) -> bool {
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
        unmount(mountpoint)?;
        if let Some(st) = self.read_state(&p.state) {
            match run_driver(&driver, &contract::del_args(st.device_id), DEL_TIMEOUT) {
                Ok(_) => {}
                // Already gone (e.g. after a reboot) is what we wanted.
                Err(e) if !Path::new(&format!("/sys/block/ublkb{}", st.device_id)).exists() => {
                    debug!(id = st.device_id, "del: {e} (device already gone)");
                }
                Err(e) => return Err(e),
            }
            self.retire_stats(&p);
            let _ = std::fs::remove_file(&p.state);
            let _ = std::fs::remove_file(&p.log);
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

fn kernel_has_ublk() -> Result<(), String> {
    let ctl = Path::new("/dev/ublk-control");
    if ctl.exists() {
        return Ok(());
    }
    let _ = Command::new("modprobe")
        .arg("ublk_drv")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if ctl.exists() {
        Ok(())
    } else {
        Err("the kernel has no ublk (/dev/ublk-control missing, `modprobe ublk_drv` failed)".into())
    }
}

/// Runs the driver with `args` in a mount namespace of its own and returns its stdout; fails on
/// a nonzero exit or after `timeout` (the process is killed then).
fn run_driver(driver: &Path, args: &[String], timeout: Duration) -> Result<String, RemoteError> {
    let mut cmd = Command::new(driver);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: private_mount_namespace is async-signal-safe (two syscalls, no allocation).
    unsafe {
        cmd.pre_exec(cora_api::private_mount_namespace);
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

/// Device `id` as `cora-driver list --json` describes it; `None` when it is not listed (or the
/// list cannot be had: then it is treated as gone, and the stack attached anew).
fn device_info(driver: &Path, id: u32) -> Option<DeviceInfo> {
    let list = run_driver(driver, &contract::list_json_args(), DEL_TIMEOUT)
        .map_err(|e| e.to_string())
        .and_then(|out| DeviceInfo::parse_list(&out).map_err(|e| e.to_string()));
    match list {
        Ok(list) => list.into_iter().find(|d| d.id == id),
        Err(e) => {
            warn!(id, "listing devices: {e}");
            None
        }
    }
}

fn cstr(p: &Path) -> Result<CString, RemoteError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| RemoteError::Failed(format!("path {} contains NUL", p.display())))
}

fn mount_ro(dev: &Path, mountpoint: &Path, fs_type: &str) -> Result<(), RemoteError> {
    let (src, dst) = (cstr(dev)?, cstr(mountpoint)?);
    let fs = CString::new(fs_type).map_err(|_| RemoteError::Failed("bad fs type".into()))?;
    // ext4 on a read-only device: never replay the journal.
    let data = if fs_type == "ext4" { c"noload" } else { c"" };
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
        return Err(RemoteError::Failed(format!(
            "mounting {} ({fs_type}) on {}: {}",
            dev.display(),
            mountpoint.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Unmounts; a path that is not mounted is fine, a busy mount is an error (the device then
/// stays, since deleting it would fail every read of its users).
fn unmount(mountpoint: &Path) -> Result<(), RemoteError> {
    if !is_mountpoint(mountpoint) {
        return Ok(());
    }
    let p = cstr(mountpoint)?;
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(p.as_ptr(), 0) } != 0 {
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

    #[test]
    fn is_remote_needs_cora_annotation_and_cri_labels() {
        let dir = tempfile::tempdir().unwrap();
        let b = UblkLayers::new(UblkOptions {
            dir: dir.path().join("remote"),
            driver: None,
            cache_dir: dir.path().join("cache"),
            cache_size: 1 << 30,
            registry: RegistryArgs::default(),
        });
        assert!(b.is_remote(&labels(&[
            LABEL_FS_TYPE,
            LABEL_CRI_IMAGE_REF,
            LABEL_CRI_LAYER_DIGEST
        ])));
        assert!(!b.is_remote(&labels(&[LABEL_FS_TYPE, LABEL_CRI_IMAGE_REF])));
        assert!(!b.is_remote(&labels(&[LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST])));
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
            driver: Some(fake),
            cache_dir: PathBuf::from("/c"),
            cache_size: 4096,
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
        let a = b.add_args("h/app@sha256:1", D, &p);
        assert_eq!(a.layer_digest.as_deref(), Some(D));
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
            run_driver(&d, &args(&["ok", "x"]), Duration::from_secs(20)).unwrap(),
            "out x\n"
        );
        let e = run_driver(&d, &args(&["fail"]), Duration::from_secs(20))
            .unwrap_err()
            .to_string();
        assert!(e.contains("failed") && e.contains("bad things"), "{e}");
        let t0 = Instant::now();
        let e = run_driver(&d, &args(&["slow"]), Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish within"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "killed on timeout");
    }

    #[test]
    fn reuse_reads_the_typed_device_list_and_recovers_a_quiesced_device() {
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls");
        let list = dir.path().join("list.json");
        let d = fake_driver(
            dir.path(),
            &format!(
                r#"echo "$@" >>{calls}
                   case $1 in list) cat {list} ;; esac"#,
                calls = calls.display(),
                list = list.display()
            ),
        );
        let mut opts = state_only_opts(dir.path());
        opts.driver = Some(d);
        let b = UblkLayers::new(opts);
        let p = b.paths("ns/3/L");
        // /proc is a mount point, so a live device is reused without mounting anything.
        let st = StackState {
            stack_key: "ns/3/L".into(),
            device_id: 5,
            unpacked: false,
            mountpoint: PathBuf::from("/proc"),
            image: "h/a@x".into(),
            layer_digest: D.into(),
        };
        let device = |state: &str, digest: &str| DeviceInfo {
            id: 5,
            state: state.to_owned().into(),
            pid: 1,
            transport: TRANSPORT_UBLK.into(),
            path: "/dev/ublkb5".into(),
            size: 0,
            read_only: true,
            queues: 2,
            depth: 128,
            max_io_bytes: 1 << 20,
            flags: 0,
            flag_names: vec![],
            target: Some("cora".into()),
            image: Some("h/a@x".into()),
            layer_digest: Some(digest.into()),
            recipe: None,
        };
        let write_list = |devs: &[DeviceInfo]| {
            std::fs::write(&list, serde_json::to_vec(devs).unwrap()).unwrap();
        };
        write_list(&[device("LIVE", D)]);
        assert_eq!(b.reuse(&p, &st, "erofs"), Some(PathBuf::from("/proc")));
        write_list(&[device("QUIESCED", D)]);
        assert_eq!(b.reuse(&p, &st, "erofs"), Some(PathBuf::from("/proc")));
        let log = std::fs::read_to_string(&calls).unwrap();
        assert_eq!(
            log.lines().collect::<Vec<_>>(),
            [
                "list --json".to_owned(),
                "list --json".to_owned(),
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
            ..st
        };
        write_atomic(&p.state, &serde_json::to_vec(&elsewhere).unwrap()).unwrap();
        write_list(&[device("LIVE", "sha256:other")]);
        assert_eq!(b.reuse(&p, &elsewhere, "erofs"), None);
        assert!(!p.state.exists());
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
            driver: None,
            cache_dir: PathBuf::from("/c"),
            cache_size: 4096,
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
        let st = StackState {
            stack_key: "ns/1/L".into(),
            device_id: 7,
            unpacked: false,
            mountpoint: PathBuf::from("/proc"),
            image: "h/a@x".into(),
            layer_digest: D.into(),
        };
        write_atomic(&p.state, &serde_json::to_vec(&st).unwrap()).unwrap();
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
            stack_key: "ns/2/L".into(),
            device_id: 0,
            unpacked: true,
            mountpoint: p.tree.clone(),
            image: "h/a@x".into(),
            layer_digest: D.into(),
        };
        write_atomic(&p.state, &serde_json::to_vec(&st).unwrap()).unwrap();
        let b2 = UblkLayers::new(opts);
        assert_eq!(b2.attached(), vec![("ns/2/L".to_owned(), p.tree.clone())]);
        assert_eq!(b2.reuse(&p, &st, "erofs"), Some(p.tree.clone()));
        b2.detach("ns/2/L", &p.tree).unwrap();
        assert!(!p.tree.exists() && !p.state.exists());
        assert!(b2.attached().is_empty());
        // A state whose tree is gone is dropped, not reused.
        write_atomic(&p.state, &serde_json::to_vec(&st).unwrap()).unwrap();
        assert_eq!(b2.reuse(&p, &st, "erofs"), None);
        assert!(!p.state.exists());
    }
}
