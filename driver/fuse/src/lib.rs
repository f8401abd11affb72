//! FUSE transport: serves any [`BlockSource`] as one read-only regular file on a FUSE mount.
//!
//! [`mount`] mounts a FUSE file system whose root holds exactly one file (default name
//! `image`, mode 0444, size [`BlockSource::size`]). Hand [`FuseMount::image_path`] to
//! `mount -t erofs -o ro FILE DIR` (erofs file-backed mount, Linux 6.12+) or to
//! `losetup -r`. Requests are served by this crate's own `/dev/fuse` loop ([`session`]) on a
//! few threads; the mount needs root (or `CAP_SYS_ADMIN`): it is a plain `mount(2)`, no
//! libfuse, no `fusermount3`.
//!
//! A connection can outlive its server: hand [`FuseMount::share_connection`] to another
//! process (a keeper), and when the server dies, [`resume`] serves the same mount again from
//! that descriptor, the requests the dead server held included. The protocol is our own
//! because no Rust FUSE library takes over an initialised connection (fuser's session always
//! starts with INIT).
//!
//! Reads call [`BlockSource::read`] once. Local bytes are answered inline on the event-loop
//! thread; a [`cora_read::Outcome::Miss`] is finished and answered on the thread that wakes
//! it, so a fetch never holds up other requests. A read is clamped to the file: one that
//! starts at or past the end gets 0 bytes (end of file), one that spans it gets the bytes
//! inside.
//!
//! The image never changes while mounted, so the kernel may keep its page cache across opens
//! (`FOPEN_KEEP_CACHE`) and attributes never expire in practice.
//!
//! FUSE over io_uring (Linux 6.14+) is not used yet: requests go over `read`/`writev` on
//! `/dev/fuse`.

mod abi;
mod fs;
mod session;

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use cora_read::BlockSource;

/// How [`mount`] exposes a source.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Name of the one file in the mount's root.
    pub file_name: OsString,
    /// Serving threads (all reading the one `/dev/fuse` descriptor); default: one per CPU, at
    /// most 4. Misses never occupy them, but local reads are `pread`s of cache files that may wait
    /// on the disk, and copying 1 MiB replies takes CPU: a few threads let those overlap.
    pub threads: usize,
    /// Let the source lend memory-resident bytes (reads of at least [`LEND_MIN_BYTES`]), which
    /// go to the kernel without a copy in user space.
    pub lend: bool,
    /// `allow_other`: other users, and root processes in other mount namespaces (containerd),
    /// may read the file. Without it only the mounting user may.
    pub allow_other: bool,
    /// Readahead of the FUSE file's page cache in KiB (`/sys/class/bdi/*/read_ahead_kb`);
    /// `None` keeps the kernel's default (128 KiB).
    pub read_ahead_kb: Option<u32>,
    /// How many background requests (readahead, async direct I/O) the kernel keeps in flight.
    /// Reads waiting on fetches count too, so it is well above the kernel default of 16.
    pub max_background: u16,
}

impl Default for FuseOptions {
    fn default() -> Self {
        FuseOptions {
            file_name: OsString::from("image"),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            lend: true,
            allow_other: true,
            read_ahead_kb: Some((MAX_REQUEST >> 10) as u32),
            max_background: 256,
        }
    }
}

/// Largest read the kernel sends (`max_read`, `max_pages`), and the readahead asked for.
pub const MAX_REQUEST: usize = 1 << 20;

pub use cora_read::LEND_MIN_BYTES;

/// Why mounting, serving or unmounting failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("invalid file name {0:?}: give one non-empty path component")]
    InvalidName(OsString),
    #[error("mounting FUSE at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("unmounting {path}: {source}")]
    Unmount { path: PathBuf, source: io::Error },
    #[error(
        "{path} is busy (an erofs mount, loop device or open file uses it); still mounted, served"
    )]
    Busy { path: PathBuf },
    #[error("FUSE session at {path} ended with an error: {source}")]
    Session { path: PathBuf, source: io::Error },
    #[error("the FUSE session thread for {path} panicked")]
    Panicked { path: PathBuf },
}

/// Mounts a read-only FUSE file system at `mountpoint` (an existing directory) holding one
/// file, `opts.file_name`, whose bytes are `source`'s, and serves it on background threads
/// until [`FuseMount::unmount`], drop, or an `umount` from outside.
pub fn mount(
    source: Arc<dyn BlockSource>,
    mountpoint: &Path,
    opts: &FuseOptions,
) -> Result<FuseMount, FuseError> {
    let name = &opts.file_name;
    if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
        return Err(FuseError::InvalidName(name.clone()));
    }
    let mount_err = |source| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    // The path we unmount later must be the one the kernel mounted on.
    let path = mountpoint.canonicalize().map_err(mount_err)?;
    let fd = mount_fuse(&path, opts).map_err(mount_err)?;
    // Until the session runs, nothing serves the mount: on failure take it away (lazily: with
    // the device closed nothing can wait on it, but someone may have it open already).
    let detach = |e| {
        let _ = umount2(&path, libc::MNT_DETACH);
        mount_err(e)
    };
    // Our mount's device, to tell it from whatever is mounted at the same path later.
    let dev = mounted_devs(&path)
        .map_err(detach)?
        .pop()
        .ok_or_else(|| detach(io::Error::other("the new mount is not in mountinfo")))?;
    let chan = Arc::new(session::Channel::new(fd));
    let mount = start(source, chan, path.clone(), dev, opts).map_err(detach)?;
    // A first request (GETATTR of the root, after the kernel's INIT), so the caller gets a
    // mount that answers. On error the drop unmounts.
    std::fs::metadata(mount.mountpoint()).map_err(mount_err)?;
    if let Some(kb) = opts.read_ahead_kb {
        // The INIT reply can only lower readahead below the kernel's offer (128 KiB); the
        // bdi knob raises it. Best effort: reads work either way.
        let (major, minor) = dev;
        let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        if let Err(e) = std::fs::write(&knob, kb.to_string()) {
            tracing::debug!("not setting {knob}: {e}");
        }
    }
    Ok(mount)
}

/// Serves again the mount at `mountpoint` (canonical, as [`FuseMount::mountpoint`] gave it)
/// whose server died, from `connection`: a descriptor of its `/dev/fuse` open file that
/// another process kept ([`FuseMount::share_connection`]). Requests the dead server had read
/// but not answered are queued again (`FUSE_NOTIFY_RESEND`, Linux 6.9+). Where the kernel
/// cannot, those requests would wait for ever: the connection is aborted instead (its readers
/// get errors) and this fails.
pub fn resume(
    source: Arc<dyn BlockSource>,
    connection: std::os::fd::OwnedFd,
    mountpoint: &Path,
    opts: &FuseOptions,
) -> Result<FuseMount, FuseError> {
    let mount_err = |source| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        source,
    };
    let chan = Arc::new(session::Channel::new(connection));
    // No file system call on the mount point before the session runs: it would wait for us.
    // A mount detached while in use (`del` of a busy device) is in no mountinfo any more but
    // still served; unmounting it is then nobody's job.
    let dev = mounted_devs(mountpoint).map_err(mount_err)?.pop();
    if let Err(e) = chan.resend() {
        // The dead server's requests would wait for ever, and their readers with them (and
        // the readers of the pages they lock): end the connection instead, so they fail.
        if let Some((major, minor)) = dev {
            let abort = format!("/sys/fs/fuse/connections/{}/abort", (major << 20) | minor);
            if let Err(a) = std::fs::write(&abort, "1") {
                tracing::warn!("aborting the connection through {abort}: {a}");
            }
        }
        return Err(mount_err(io::Error::other(format!(
            "the kernel cannot resend the requests the dead server held (FUSE_NOTIFY_RESEND, \
             Linux 6.9+): {e}; connection aborted"
        ))));
    }
    start(
        source,
        chan,
        mountpoint.to_path_buf(),
        dev.unwrap_or((0, 0)),
        opts,
    )
    .map_err(mount_err)
}

/// Starts serving `chan` in the background.
fn start(
    source: Arc<dyn BlockSource>,
    chan: Arc<session::Channel>,
    mountpoint: PathBuf,
    dev: (u32, u32),
    opts: &FuseOptions,
) -> io::Result<FuseMount> {
    let fs = Arc::new(fs::ImageFs::new(source, opts));
    let shared = Arc::new(Shared { mountpoint, dev });
    let threads = opts.threads.max(1);
    let c = chan.clone();
    let thread = std::thread::Builder::new()
        .name("cora-fuse".into())
        .spawn(move || session::run(c, fs, threads))?;
    Ok(FuseMount {
        image_path: shared.mountpoint.join(&opts.file_name),
        shared,
        chan,
        thread: Some(thread),
    })
}

/// Mounts like [`mount`] and serves until the file system is unmounted from outside
/// (`umount MOUNTPOINT`): the blocking form for a daemon.
pub fn serve(
    source: Arc<dyn BlockSource>,
    mountpoint: &Path,
    opts: &FuseOptions,
) -> Result<(), FuseError> {
    mount(source, mountpoint, opts)?.join()
}

/// Mounts a FUSE file system at `path` with mount(2) and returns its `/dev/fuse` connection.
///
/// No libfuse and no `fusermount3`: owning the mount, this crate unmounts exactly once and
/// only its own mount (by device), never whatever is mounted at the path by then, such as a
/// new mount of the same image.
fn mount_fuse(path: &Path, opts: &FuseOptions) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let rootmode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(path)?) & libc::S_IFMT;
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let fd = dev.as_raw_fd();
    let mut data = format!(
        "fd={fd},rootmode={rootmode:o},user_id={uid},group_id={gid},\
         default_permissions,max_read={MAX_REQUEST}"
    );
    if opts.allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &[u8]| std::ffi::CString::new(s).map_err(io::Error::other);
    let (target, data) = (c(path.as_os_str().as_bytes())?, c(data.as_bytes())?);
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    // "fuse.cora": the kernel takes what follows the dot as the subtype (as libfuse mounts).
    // SAFETY: every pointer is a NUL-terminated string that lives across the call.
    let rc = unsafe {
        libc::mount(
            c"cora".as_ptr(),
            target.as_ptr(),
            c"fuse.cora".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(dev.into())
}

struct Shared {
    mountpoint: PathBuf,
    /// The mount's device (major, minor).
    dev: (u32, u32),
}

impl Shared {
    /// Unmounts our mount, if it is still there: not whatever is mounted at the path by now.
    fn umount(&self, flags: libc::c_int) -> Result<(), FuseError> {
        let path = &self.mountpoint;
        let err = |source| FuseError::Unmount {
            path: path.clone(),
            source,
        };
        let devs = mounted_devs(path).map_err(err)?;
        match devs.iter().position(|d| *d == self.dev) {
            // Gone already (unmounted from outside); the session ends by itself.
            None => return Ok(()),
            Some(i) if i + 1 < devs.len() => {
                return Err(err(io::Error::other("another mount covers it")));
            }
            Some(_) => {}
        }
        match umount2(path, flags) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                Err(FuseError::Busy { path: path.clone() })
            }
            // Gone between the look and the unmount.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(err(e)),
        }
    }
}

/// The devices (major, minor) of the mounts at `path`, bottom to top, from
/// `/proc/self/mountinfo`.
fn mounted_devs(path: &Path) -> io::Result<Vec<(u32, u32)>> {
    // mountinfo escapes these as octal.
    let mut want = String::new();
    for c in path.to_string_lossy().chars() {
        match c {
            ' ' => want.push_str("\\040"),
            '\t' => want.push_str("\\011"),
            '\n' => want.push_str("\\012"),
            '\\' => want.push_str("\\134"),
            c => want.push(c),
        }
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT ...
            let mut fields = line.split(' ');
            let dev = fields.nth(2)?;
            (fields.nth(1)? == want).then_some(())?;
            let (major, minor) = dev.split_once(':')?;
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect())
}

/// A mounted source. Unmounts on drop (lazily, if something still uses the file).
pub struct FuseMount {
    shared: Arc<Shared>,
    chan: Arc<session::Channel>,
    image_path: PathBuf,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("image_path", &self.image_path)
            .field("dev", &self.shared.dev)
            .finish_non_exhaustive()
    }
}

impl FuseMount {
    /// The file to mount (`mount -t erofs -o ro FILE DIR`) or attach to a loop device.
    pub fn image_path(&self) -> &Path {
        &self.image_path
    }

    /// Where the FUSE file system is mounted (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.shared.mountpoint
    }

    /// The kernel's id of this FUSE connection: its directory in `/sys/fs/fuse/connections/`
    /// (with `abort`, `waiting`, `max_background`).
    pub fn connection(&self) -> u64 {
        // The kernel's own dev_t encoding.
        (u64::from(self.shared.dev.0) << 20) | u64::from(self.shared.dev.1)
    }

    /// A second descriptor of this mount's FUSE connection. While another process holds it,
    /// the mount outlives this server: its requests wait until [`resume`] serves them.
    pub fn share_connection(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.chan.share()
    }

    /// A handle that unmounts from another thread (a signal handler thread, say); [`join`]
    /// then returns.
    ///
    /// [`join`]: FuseMount::join
    pub fn unmounter(&self) -> Unmounter {
        Unmounter(Arc::clone(&self.shared))
    }

    /// Unmounts and waits for the session to end. [`FuseError::Busy`] while an erofs mount or
    /// loop device still uses the file: then nothing changed (still mounted and served), and
    /// this may be called again once that is gone.
    ///
    /// If another mount namespace holds a private copy of this mount (created by `unshare`
    /// after it was mounted), the kernel keeps the session until that copy goes too, and this
    /// waits for it.
    pub fn unmount(&mut self) -> Result<(), FuseError> {
        self.shared.umount(0)?;
        self.wait()
    }

    /// Serves until the file system is unmounted (from outside or through an [`Unmounter`]).
    pub fn join(mut self) -> Result<(), FuseError> {
        self.wait()
    }

    fn wait(&mut self) -> Result<(), FuseError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let path = self.shared.mountpoint.clone();
        match thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(FuseError::Session { path, source }),
            Err(_) => Err(FuseError::Panicked { path }),
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        match self.shared.umount(0) {
            Ok(()) => {
                if let Err(e) = self.wait() {
                    tracing::warn!("{e}");
                }
            }
            Err(FuseError::Busy { path }) => {
                // Can't wait here: detach, and the kernel ends the session when its last user
                // (an erofs mount, a loop device) lets go; the detached thread serves till then.
                tracing::warn!(
                    "{} is busy; detaching it, served until its last user goes",
                    path.display()
                );
                if let Err(e) = self.shared.umount(libc::MNT_DETACH) {
                    tracing::warn!("{e}");
                }
            }
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Unmounts a [`FuseMount`] from any thread; see [`FuseMount::unmount`]. Returns once the
/// kernel has unmounted it; the session then ends and [`FuseMount::join`] returns.
#[derive(Clone)]
pub struct Unmounter(Arc<Shared>);

impl std::fmt::Debug for Unmounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Unmounter")
            .field(&self.0.mountpoint)
            .finish()
    }
}

impl Unmounter {
    pub fn unmount(&self) -> Result<(), FuseError> {
        self.0.umount(0)
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: umount2 reads a NUL-terminated path that lives across the call.
    if unsafe { libc::umount2(c_path.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes of a read of `size` at `offset` that lie inside a file of `file_size` bytes.
fn clamp_read(offset: u64, size: u32, file_size: u64) -> usize {
    let left = file_size.saturating_sub(offset);
    // Both fit: `size` is a u32, and the min is at most `size`.
    left.min(u64::from(size)) as usize
}

/// The errno a reader sees for a failed source read.
fn errno_of(e: &io::Error) -> i32 {
    match e.kind() {
        io::ErrorKind::InvalidInput => libc::EINVAL,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_clamped_to_the_file() {
        assert_eq!(clamp_read(0, 4096, 10_000), 4096);
        assert_eq!(clamp_read(8192, 4096, 10_000), 1808);
        assert_eq!(clamp_read(10_000, 4096, 10_000), 0);
        assert_eq!(clamp_read(u64::MAX, u32::MAX, 10_000), 0);
        assert_eq!(clamp_read(0, u32::MAX, u64::MAX), u32::MAX as usize);
        assert_eq!(clamp_read(0, 4096, 0), 0);
    }

    #[test]
    fn errors_map_to_einval_or_eio() {
        let invalid = io::Error::new(io::ErrorKind::InvalidInput, "outside");
        assert_eq!(errno_of(&invalid), libc::EINVAL);
        assert_eq!(errno_of(&io::Error::other("fetch")), libc::EIO);
    }

    #[test]
    fn bad_file_names_are_refused() {
        let src: Arc<dyn BlockSource> = Arc::new(Empty);
        for bad in ["", ".", "..", "a/b"] {
            let opts = FuseOptions {
                file_name: bad.into(),
                ..FuseOptions::default()
            };
            let err = mount(src.clone(), Path::new("/nonexistent"), &opts).unwrap_err();
            assert!(matches!(err, FuseError::InvalidName(_)), "{bad:?}: {err}");
        }
    }

    struct Empty;
    impl BlockSource for Empty {
        fn size(&self) -> u64 {
            0
        }
        fn read(
            &self,
            offset: u64,
            buf: &mut [u8],
            _: Option<&mut cora_read::Lend<'_>>,
        ) -> io::Result<cora_read::Outcome> {
            cora_read::check_range(offset, buf.len(), 0)?;
            Ok(cora_read::Outcome::Copied)
        }
    }
}
