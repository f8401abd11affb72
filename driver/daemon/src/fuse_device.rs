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
//! A FUSE mount lives while some process holds its connection (an open `/dev/fuse` file), so
//! each device has two processes: the server, which parses registry bytes and answers
//! requests, and its keeper (`cora-driver fuse-keeper`, started by the server), which holds a
//! second descriptor of the connection and does nothing else. When the server dies, the mount
//! stays and reads wait in the kernel (the device lists as QUIESCED); the keeper at once starts
//! `cora-driver recover ID` with the connection, and the new server has the kernel resend the
//! requests the dead one held (`FUSE_NOTIFY_RESEND`, Linux 6.9+) and serves on: readers see a
//! delay, no error. The keeper ends with the connection (unmount). It is the ublk transport's
//! `UBLK_F_USER_RECOVERY`, with the keeper in the kernel's place.
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
                // A directory without a live server or keeper is left over from a crash:
                // reclaim it.
                if state_of(dir, FUSE_ID_BASE + n).is_none_or(|d| state(&d) == DeviceState::Dead) {
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

/// Whether `pid` runs: exists and is no zombie (a killed server stays one until its reaper,
/// often not us, gets to it).
fn pid_alive(pid: i32) -> bool {
    pid > 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
        })
}

/// Whether `pid` runs as the keeper of device `id` (not some process that got its pid after
/// the keeper died).
fn is_keeper_of(pid: i32, id: u32) -> bool {
    pid_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let mut args = c.split(|b| *b == 0);
            args.any(|a| a == b"fuse-keeper") && args.next() == Some(id.to_string().as_bytes())
        })
}

/// LIVE while its server runs, QUIESCED while only its keeper does (a new server is on its
/// way), DEAD when neither.
fn state(d: &DeviceInfo) -> DeviceState {
    if pid_alive(d.pid) {
        DeviceState::Live
    } else if d.keeper_pid.is_some_and(|k| is_keeper_of(k, d.id)) {
        DeviceState::Quiesced
    } else {
        DeviceState::Dead
    }
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
    recipe: &lazy::device::SourceRecipe,
    source: Arc<dyn cora_read::BlockSource>,
    stats_file: Option<&Path>,
    ready: impl FnOnce(&Ready) -> Result<()>,
) -> Result<()> {
    let (image, layer_digest) = match recipe {
        lazy::device::SourceRecipe::Image {
            image,
            layer_digest,
            ..
        } => (Some(image.clone()), layer_digest.clone()),
        lazy::device::SourceRecipe::File { .. } => (None, None),
    };
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
    let keeper = mount
        .share_connection()
        .context("sharing the FUSE connection")
        .and_then(|conn| spawn_keeper(dir, id, pid, &conn, stats_file));
    let keeper_pid = match keeper {
        Ok(k) => k,
        Err(e) => {
            let _ = mount.unmount();
            cleanup(&mnt);
            return Err(e);
        }
    };
    let info = DeviceInfo {
        id,
        state: DeviceState::Live,
        pid,
        keeper_pid: Some(keeper_pid),
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
        recipe: Some(recipe.to_json()),
    };
    publish_and_serve(stop_set, dir, mount, &info, ready)
}

/// Records the device, reports it ready and serves until the mount goes. On failure before
/// ready the mount is taken away.
fn publish_and_serve(
    stop_set: libc::sigset_t,
    dir: &Path,
    mut mount: cora_fuse::FuseMount,
    info: &DeviceInfo,
    ready: impl FnOnce(&Ready) -> Result<()>,
) -> Result<()> {
    let mnt = mount.mountpoint().to_owned();
    let cleanup = || {
        let _ = std::fs::remove_file(state_path(dir, info.id));
        let _ = std::fs::remove_dir(&mnt);
    };
    let unmounter = mount.unmounter();
    stop_on_signal(stop_set, unmounter, mnt.clone())?;
    let published = write_state(dir, info).and_then(|()| {
        ready(&Ready {
            id: info.id,
            path: info.path.clone(),
            transport: TRANSPORT_FUSE.into(),
            pid: info.pid,
        })
    });
    if let Err(e) = published {
        let _ = mount.unmount();
        cleanup();
        return Err(e);
    }
    let served = mount.join().context("serving the FUSE file system");
    cleanup();
    served
}

/// Serves device `id` again after its server died, from the connection its keeper handed
/// over (`connection`) and the source `open` builds from the recorded recipe.
pub fn resume(
    stop_set: libc::sigset_t,
    dir: &Path,
    id: u32,
    connection: OwnedFd,
    open: impl FnOnce(&serde_json::Value) -> Result<Arc<dyn cora_read::BlockSource>>,
    ready: impl FnOnce(&Ready) -> Result<()>,
) -> Result<()> {
    let mut info = state_of(dir, id)
        .with_context(|| format!("no FUSE device {id} under {}", dir.display()))?;
    if pid_alive(info.pid) {
        bail!("FUSE device {id} is served by pid {}", info.pid);
    }
    let recipe = info
        .recipe
        .clone()
        .context("the device's record has no recipe")?;
    let source = open(&recipe)?;
    // The mount point as the first server canonicalized it.
    let mnt = info
        .path
        .parent()
        .context("the device's record has no mount point")?
        .to_owned();
    let mount = cora_fuse::resume(source, connection, &mnt, &cora_fuse::FuseOptions::default())
        .context("serving the FUSE connection again")?;
    info.pid = std::process::id() as i32;
    info.state = DeviceState::Live;
    tracing::info!(id, "serving the FUSE device again");
    publish_and_serve(stop_set, dir, mount, &info, ready)
}

/// The descriptor number a keeper holds the connection at, and hands it to servers at.
pub const CONNECTION_FD: i32 = 3;

/// This very binary, even once replaced on disk by an upgrade (`current_exe` then names a
/// deleted file): keeper and servers speak the same version.
const SELF_EXE: &str = "/proc/self/exe";

/// The FUSE connection handed over at [`CONNECTION_FD`], checked to be one, and kept from
/// this process's children.
pub fn take_connection() -> Result<OwnedFd> {
    // SAFETY: checks whether the descriptor is open, touching nothing.
    if unsafe { libc::fcntl(CONNECTION_FD, libc::F_GETFD) } < 0 {
        bail!("no FUSE connection at descriptor {CONNECTION_FD}");
    }
    // SAFETY: open (checked); owned from here on: nothing else in this process uses it.
    let conn = unsafe { OwnedFd::from_raw_fd(CONNECTION_FD) };
    // SAFETY: fstat writes into a zeroed stat of the right type.
    let mut st = unsafe { std::mem::zeroed::<libc::stat>() };
    let is_fuse = unsafe { libc::fstat(conn.as_raw_fd(), &mut st) } == 0
        && st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && st.st_rdev == libc::makedev(10, 229);
    if !is_fuse {
        bail!("descriptor {CONNECTION_FD} is not a /dev/fuse connection");
    }
    // SAFETY: sets a flag on a descriptor we own.
    unsafe { libc::fcntl(conn.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(conn)
}

/// Runs `cmd` with `conn` as its descriptor [`CONNECTION_FD`].
fn pass_connection(cmd: &mut std::process::Command, conn: &OwnedFd) {
    let fd = conn.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == CONNECTION_FD {
                // dup2 onto itself would keep close-on-exec set.
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, CONNECTION_FD)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts the keeper of device `id` (served by `server`) with a descriptor of its connection.
fn spawn_keeper(
    dir: &Path,
    id: u32,
    server: i32,
    conn: &OwnedFd,
    stats_file: Option<&Path>,
) -> Result<i32> {
    let mut cmd = std::process::Command::new(SELF_EXE);
    cmd.arg("fuse-keeper")
        .arg(id.to_string())
        .arg("--server-pid")
        .arg(server.to_string())
        .arg("--fuse-dir")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    if let Some(f) = stats_file {
        cmd.arg("--stats-file").arg(f);
    }
    pass_connection(&mut cmd, conn);
    // Its own session: signals for the server's process group (a terminal's ^C) are not
    // meant for it.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting the FUSE keeper")?;
    Ok(child.id() as i32)
}

/// A process watched through its pidfd.
struct Watched {
    pid: i32,
    fd: OwnedFd,
    /// Started by us: reaped when it ends.
    child: bool,
    since: Instant,
}

impl Watched {
    fn open(pid: i32, child: bool) -> std::io::Result<Watched> {
        // SAFETY: pidfd_open has no memory arguments; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Watched {
            pid,
            // SAFETY: a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            child,
            since: Instant::now(),
        })
    }
}

/// How long a new server may take to open its source (registry round trips) and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// A server that dies this soon after it started counts as a failed start.
const SHORT_LIVED: Duration = Duration::from_secs(10);
/// Failed starts in a row after which the keeper gives up: the mount goes and its readers get
/// errors instead of waiting for good.
const MAX_FAILED_STARTS: u32 = 8;

/// The keeper of device `id`: holds the connection at [`CONNECTION_FD`] and starts a new
/// server whenever the current one dies while the mount is still there. Ends with the
/// connection. SIGTERM/SIGINT: passed on to a live server (which unmounts); with none, the
/// keeper takes the mount away itself.
pub fn keep(
    stop_set: libc::sigset_t,
    dir: &Path,
    id: u32,
    server_pid: i32,
    stats_file: Option<&Path>,
) -> Result<()> {
    let conn = take_connection()?;
    let signals = signal_fd(&stop_set)?;
    let mut server = match Watched::open(server_pid, false) {
        Ok(w) => Some(w),
        // Gone already (it died before we looked): recover at once.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => None,
        Err(e) => return Err(e).context("watching the server (pidfd_open)"),
    };
    let mut failed = 0u32;
    loop {
        // Between servers (a start failed), wait before the next try: less and less often
        // for a server that cannot start (the registry is down, say).
        let timeout = match (&server, failed) {
            (Some(_), _) => -1,
            (None, 0) => 0,
            (None, n) => 100 << n.min(6),
        };
        // The connection itself is not polled: every request would wake the keeper (poll
        // waiters are woken with the serving threads), costing each read a context switch.
        // It ends only with an unmount, after which the server exits too: checked then.
        let mut fds = [
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: server.as_ref().map_or(-1, |s| s.fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds (a negative fd is ignored).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            // SAFETY: reads one siginfo into a buffer of its size.
            unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
            match &server {
                Some(s) if pid_alive(s.pid) => {
                    // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
                    unsafe {
                        libc::syscall(
                            libc::SYS_pidfd_send_signal,
                            s.fd.as_raw_fd(),
                            libc::SIGTERM,
                            std::ptr::null::<libc::siginfo_t>(),
                            0,
                        )
                    };
                }
                _ => {
                    give_up(dir, id, "told to stop while no server runs");
                    return Ok(());
                }
            }
        }
        // A pidfd is readable once its process has exited.
        if server.is_some() && fds[1].revents & libc::POLLIN == 0 {
            continue;
        }
        if let Some(s) = server.take() {
            if s.child {
                // SAFETY: reaps our own child; no memory arguments beyond the null status.
                unsafe { libc::waitpid(s.pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
            if s.child && s.since.elapsed() < SHORT_LIVED {
                failed += 1;
            } else {
                failed = 0;
            }
            tracing::warn!(id, pid = s.pid, "the FUSE server died; starting a new one");
        }
        // The connection may have ended with the server (unmounted): then nothing to do.
        if connection_ended(&conn) {
            return Ok(());
        }
        // A server that ended with an error took the record with it: the device is gone.
        if !record_is_ours(dir, id) {
            tracing::warn!(id, "the FUSE device's record is gone; not serving it again");
            return Ok(());
        }
        if failed >= MAX_FAILED_STARTS {
            give_up(dir, id, "its servers keep failing");
            bail!("FUSE device {id}: {failed} servers in a row failed; gave up");
        }
        match start_server(dir, id, &conn, stats_file) {
            Ok(s) => server = Some(s),
            Err(e) => {
                tracing::warn!(id, "starting a FUSE server: {e:#}");
                failed += 1;
            }
        }
    }
}

fn connection_ended(conn: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents & (libc::POLLERR | libc::POLLHUP) != 0 }
}

/// Starts `cora-driver recover ID` with the connection and waits for it to report ready.
fn start_server(dir: &Path, id: u32, conn: &OwnedFd, stats_file: Option<&Path>) -> Result<Watched> {
    let mut cmd = std::process::Command::new(SELF_EXE);
    cmd.arg("recover")
        .arg(id.to_string())
        .arg("--fuse-dir")
        .arg(dir)
        .arg("--ready-json")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    if let Some(f) = stats_file {
        cmd.arg("--stats-file").arg(f);
    }
    pass_connection(&mut cmd, conn);
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting cora-driver recover")?;
    let pid = child.id() as i32;
    let mut line = String::new();
    let mut ready = false;
    if let Some(out) = child.stdout.take() {
        let mut p = libc::pollfd {
            fd: out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = READY_TIMEOUT.as_millis() as i32;
        // SAFETY: one valid pollfd. The ready line comes in one write, or EOF if it fails.
        if unsafe { libc::poll(&mut p, 1, ms) } == 1 {
            ready = std::io::BufReader::new(out).read_line(&mut line).is_ok()
                && Ready::from_output(&line).is_ok();
        }
    }
    if !ready {
        let _ = child.kill();
        let status = child.wait()?;
        bail!(
            "the new server was not ready within {READY_TIMEOUT:?} ({status}): {}",
            line.trim()
        );
    }
    let mut s = Watched::open(pid, true)?;
    s.since = started;
    tracing::info!(id, pid, took = ?started.elapsed(), "a new FUSE server serves the device");
    Ok(s)
}

/// Whether device `id`'s record names this process as its keeper: its number may have gone
/// to another device since.
fn record_is_ours(dir: &Path, id: u32) -> bool {
    state_of(dir, id).is_some_and(|d| d.keeper_pid == Some(std::process::id() as i32))
}

/// Takes the mount away (detached: users still holding it get errors, not a hang, once the
/// keeper's descriptor closes) and the device's record, if they are still this keeper's.
fn give_up(dir: &Path, id: u32, why: &str) {
    if !record_is_ours(dir, id) {
        tracing::warn!(id, "FUSE device gone or taken over; leaving it: {why}");
        return;
    }
    tracing::warn!(id, "removing the FUSE device: {why}");
    let mnt = dir.join((id - FUSE_ID_BASE).to_string());
    let _ = nix_umount_detach(&mnt);
    let _ = std::fs::remove_file(state_path(dir, id));
    let _ = std::fs::remove_dir(&mnt);
}

/// A descriptor to read the signals of `set` from (blocked already, see
/// `block_stop_signals`).
fn signal_fd(set: &libc::sigset_t) -> Result<OwnedFd> {
    // SAFETY: a new descriptor for an initialised set.
    let fd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("signalfd");
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
            d.state = state(&d);
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
    // The server stops it; between servers, the keeper.
    let pid = match state(&info) {
        DeviceState::Live => info.pid,
        DeviceState::Quiesced => info.keeper_pid.unwrap_or(-1),
        _ => {
            // Nobody holds the connection: whatever is left of the mount is broken.
            let _ = nix_umount_detach(&mnt);
            let _ = std::fs::remove_file(state_path(dir, id));
            let _ = std::fs::remove_dir(&mnt);
            return Ok(());
        }
    };
    // A pidfd names exactly this process, even if its pid were reused meanwhile.
    let target = Watched::open(pid, false).context("pidfd_open")?;
    // The keeper ends with the connection, right after the server: wait for it too, so
    // nothing of the device runs once this returns.
    let keeper = info
        .keeper_pid
        .filter(|k| *k != pid)
        .and_then(|k| Watched::open(k, false).ok());
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    let sent = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            target.fd.as_raw_fd(),
            libc::SIGTERM,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if sent != 0 {
        return Err(std::io::Error::last_os_error()).context("signalling the server");
    }
    let deadline = Instant::now() + timeout;
    for w in std::iter::once(&target).chain(keeper.as_ref()) {
        let mut p = libc::pollfd {
            fd: w.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd; a pidfd becomes readable when the process exits.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n != 1 {
            bail!(
                "FUSE device {id}: pid {} did not end within {timeout:?}; is the image file \
                 still mounted? (it is served until its last user goes)",
                w.pid
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(pid: i32, keeper_pid: Option<i32>) -> DeviceInfo {
        DeviceInfo {
            id: FUSE_ID_BASE,
            state: DeviceState::Live,
            pid,
            keeper_pid,
            transport: TRANSPORT_FUSE.into(),
            path: PathBuf::from("/run/cora/fuse/0/image"),
            size: 0,
            read_only: true,
            queues: 0,
            depth: 0,
            max_io_bytes: 0,
            flags: 0,
            flag_names: Vec::new(),
            data_mode: None,
            target: None,
            image: None,
            layer_digest: None,
            recipe: None,
        }
    }

    /// A FUSE device is QUIESCED only while its keeper (a process whose arguments say it keeps
    /// this device) runs: a reused keeper pid does not keep a dead device looking alive.
    #[test]
    fn a_device_is_quiesced_only_while_its_own_keeper_runs() {
        let mut done = std::process::Command::new("true").spawn().unwrap();
        done.wait().unwrap();
        let dead = done.id() as i32;
        let me = std::process::id() as i32;
        let id = FUSE_ID_BASE.to_string();
        // `; :` keeps the shell from exec'ing sleep, so its arguments stay; its first line
        // says it runs (exec done: /proc shows its own arguments).
        let mut keeper = std::process::Command::new("sh")
            .args(["-c", "echo up; sleep 30; :", "fuse-keeper", &id])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(keeper.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "up\n");
        let k = keeper.id() as i32;
        assert_eq!(state(&device(me, Some(k))), DeviceState::Live);
        assert_eq!(state(&device(dead, Some(k))), DeviceState::Quiesced);
        // This test process is alive but keeps nothing.
        assert_eq!(state(&device(dead, Some(me))), DeviceState::Dead);
        assert_eq!(state(&device(dead, None)), DeviceState::Dead);
        keeper.kill().unwrap();
        keeper.wait().unwrap();
        assert_eq!(state(&device(dead, Some(k))), DeviceState::Dead);
    }
}
