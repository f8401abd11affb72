//! Devices served through FUSE: the stack image as one read-only file on a FUSE mount, for
//! kernels without ublk. erofs mounts the file (file-backed on 6.12+, else through a loop
//! device).
//!
//! The kernel keeps no registry of FUSE "devices", so the driver keeps one: device `id`
//! (numbered from [`FUSE_ID_BASE`], above every ublk id) is the directory `<dir>/<n>` holding
//! the mount, and `<dir>/<n>.json` describing it ([`DeviceInfo`]), written once the mount
//! serves and removed when the server ends. `del` signals the server, which unmounts (or, while
//! the file is still in use, detaches the mount, so serving ends with its last user).
//!
//! Unlike a ublk device, a FUSE mount cannot outlive its server: when the server dies, reads
//! of the mounted file fail with ENOTCONN until a new device is started (no recovery).
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cora_api::driver::{DeviceInfo, DeviceState, Ready, TRANSPORT_FUSE};

/// FUSE device ids start here: ublk ids stay below 2^20 (the kernel's UBLK_MINORS).
pub const FUSE_ID_BASE: u32 = 1 << 24;

/// Where FUSE devices live unless `--fuse-dir` says otherwise.
pub const DEFAULT_DIR: &str = "/run/cora/fuse";

/// Takes the lowest free device number: creating its directory is the claim.
fn claim(dir: &Path) -> Result<(u32, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for n in 0..4096u32 {
        let mnt = dir.join(n.to_string());
        match std::fs::create_dir(&mnt) {
            Ok(()) => return Ok((FUSE_ID_BASE + n, mnt)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A directory without a live server is left over from a crash: reclaim it.
                if state_of(dir, FUSE_ID_BASE + n).is_none_or(|d| !pid_alive(d.pid)) {
                    let _ = nix_umount_detach(&mnt);
                    let _ = std::fs::remove_file(state_path(dir, FUSE_ID_BASE + n));
                    return Ok((FUSE_ID_BASE + n, mnt));
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating {}", mnt.display())),
        }
    }
    bail!("no free FUSE device number under {}", dir.display())
}

fn state_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{}.json", id - FUSE_ID_BASE))
}

fn state_of(dir: &Path, id: u32) -> Option<DeviceInfo> {
    let text = std::fs::read(state_path(dir, id)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn nix_umount_detach(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()))
        .map_err(std::io::Error::other)?;
    // SAFETY: a valid C string; MNT_DETACH never blocks on users of the mount.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves `source` until the mount goes (`del`, SIGTERM/SIGINT, or `umount` from outside).
/// `ready` is called once the file can be mounted.
/// `stop_set` holds the signals that stop the device, blocked in every thread (see
/// `block_stop_signals`).
pub fn serve(
    stop_set: libc::sigset_t,
    dir: &Path,
    recipe: serde_json::Value,
    image: Option<String>,
    layer_digest: Option<String>,
    source: Arc<dyn cora_read::BlockSource>,
    ready: impl FnOnce(&Ready) -> Result<()>,
) -> Result<()> {
    let (id, mnt) = claim(dir)?;
    let cleanup = |mnt: &Path| {
        let _ = std::fs::remove_file(state_path(dir, id));
        let _ = std::fs::remove_dir(mnt);
    };
    let size = source.size();
    let mut mount = match cora_fuse::mount(source, &mnt, &cora_fuse::FuseOptions::default()) {
        Ok(m) => m,
        Err(e) => {
            cleanup(&mnt);
            return Err(e).context("mounting the FUSE file system");
        }
    };
    let pid = std::process::id() as i32;
    let info = DeviceInfo {
        id,
        state: DeviceState::Live,
        pid,
        transport: TRANSPORT_FUSE.into(),
        path: mount.image_path().to_owned(),
        size,
        read_only: true,
        queues: 0,
        depth: 0,
        max_io_bytes: cora_fuse::MAX_REQUEST as u32,
        flags: 0,
        flag_names: Vec::new(),
        data_mode: None,
        target: Some("cora".into()),
        image,
        layer_digest,
        recipe: Some(recipe),
    };
    let unmounter = mount.unmounter();
    stop_on_signal(stop_set, unmounter, mnt.clone())?;
    let published = write_state(dir, &info).and_then(|()| {
        ready(&Ready {
            id,
            path: info.path.clone(),
            transport: TRANSPORT_FUSE.into(),
            pid,
        })
    });
    if let Err(e) = published {
        let _ = mount.unmount();
        cleanup(&mnt);
        return Err(e);
    }
    let served = mount.join().context("serving the FUSE file system");
    cleanup(&mnt);
    served
}

fn write_state(dir: &Path, info: &DeviceInfo) -> Result<()> {
    let path = state_path(dir, info.id);
    let tmp = path.with_extension("json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(info)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

/// SIGINT/SIGTERM unmount; a file still in use (a mounted erofs) is detached instead, so the
/// server ends with its last user.
fn stop_on_signal(
    set: libc::sigset_t,
    unmounter: cora_fuse::Unmounter,
    mnt: PathBuf,
) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: waits on a set initialised above.
            unsafe { libc::sigwait(&set, &mut sig) };
            tracing::info!(sig, "unmounting the FUSE device");
            match unmounter.unmount() {
                Ok(()) => {}
                Err(cora_fuse::FuseError::Busy { .. }) => {
                    tracing::warn!(
                        "the image file is still in use; detaching: serving ends with its last user"
                    );
                    if let Err(e) = nix_umount_detach(&mnt) {
                        tracing::error!("detaching {}: {e}", mnt.display());
                    }
                }
                Err(e) => tracing::error!("unmounting: {e}"),
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// FUSE devices whose state file is under `dir`; a server that is gone shows as DEAD.
pub fn list(dir: &Path) -> Vec<DeviceInfo> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<DeviceInfo> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice::<DeviceInfo>(&std::fs::read(e.path()).ok()?).ok())
        .map(|mut d| {
            if !pid_alive(d.pid) {
                d.state = DeviceState::Dead;
            }
            d
        })
        .collect();
    out.sort_by_key(|d| d.id);
    out
}

/// Stops FUSE device `id` and waits (up to `timeout`) for its server to end.
pub fn delete(dir: &Path, id: u32, timeout: Duration) -> Result<()> {
    let Some(info) = state_of(dir, id) else {
        bail!("no FUSE device {id} under {}", dir.display());
    };
    let mnt = dir.join((id - FUSE_ID_BASE).to_string());
    if !pid_alive(info.pid) {
        // Its server died: whatever is left of the mount is only a broken connection.
        let _ = nix_umount_detach(&mnt);
        let _ = std::fs::remove_file(state_path(dir, id));
        let _ = std::fs::remove_dir(&mnt);
        return Ok(());
    }
    // A pidfd names exactly this process, even if its pid were reused meanwhile.
    // SAFETY: pidfd_open has no memory arguments; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, info.pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open");
    }
    // SAFETY: a fresh descriptor we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if sent != 0 {
        return Err(std::io::Error::last_os_error()).context("signalling the server");
    }
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a pidfd becomes readable when the process exits.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    if n != 1 {
        bail!(
            "FUSE device {id}: its server (pid {}) did not end within {timeout:?}; is the \
             image file still mounted? (it ends with the last user)",
            info.pid
        );
    }
    Ok(())
}
