//! Helpers shared by the FUSE tests (they mount, so they run as root).
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use cora_fuse::FuseMount;

/// Held by every test that mounts, for its whole run. The kernel reuses a gone connection's
/// number for the next FUSE mount, so a test running beside another could find "its"
/// connection alive; and a mount(8) child forked by one test holds copies of the other's open
/// files until it execs, which can make an unmount busy.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `cmd`, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mountinfo line of the mount at `path`, if any (the last one: the visible mount).
pub fn mountinfo_line(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_str().unwrap();
    info.lines()
        .rfind(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(want))
        .map(str::to_owned)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

const CONNECTIONS: &str = "/sys/fs/fuse/connections";

/// Whether the kernel still has FUSE connection `id`.
pub fn connection_exists(id: u64) -> bool {
    ensure_fusectl();
    Path::new(CONNECTIONS).join(id.to_string()).exists()
}

/// Mounts fusectl where systemd would, if nothing has (a container, a bare VM): without it
/// connections can't be seen.
fn ensure_fusectl() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if mountinfo_line(Path::new(CONNECTIONS)).is_none() {
            run(Command::new("mount").args(["-t", "fusectl", "fusectl", CONNECTIONS]));
        }
    });
}

/// Checks that `mount` is gone: nothing mounted at its mount point, no FUSE connection left.
pub fn assert_gone(mountpoint: &Path, connection: u64) {
    assert_eq!(mountinfo_line(mountpoint), None, "still mounted");
    assert!(!connection_exists(connection), "FUSE connection left");
}

/// A mount made with mount(8) (erofs on the FUSE file); unmounted on drop, so a failing test
/// doesn't leave it behind (and keep the FUSE mount busy).
pub struct MountGuard {
    dir: PathBuf,
    mounted: bool,
}

impl MountGuard {
    pub fn mount(dir: &Path, args: &[&str]) -> MountGuard {
        run(Command::new("mount").args(args).arg(dir));
        MountGuard {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// A file-backed erofs mount of `image` with mount(2). Not mount(8): util-linux 2.38
    /// turns a regular-file source into a loop device on its own.
    pub fn erofs_file(image: &Path, dir: &Path) -> MountGuard {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let (source, target) = (c(image), c(dir));
        // SAFETY: NUL-terminated strings that live across the call; no data argument.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                c"erofs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount erofs: {}", std::io::Error::last_os_error());
        MountGuard {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    pub fn unmount(&mut self) {
        if std::mem::take(&mut self.mounted) {
            run(Command::new("umount").arg(&self.dir));
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if std::mem::take(&mut self.mounted) {
            let ok = Command::new("umount")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Still busy while a test fails: at least take it out of the tree.
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
    }
}

/// A loop device attached read-only to a file; detached on drop.
pub struct LoopGuard(pub String);

impl LoopGuard {
    /// `None` where loop devices can't be had here.
    pub fn attach(file: &Path) -> Option<LoopGuard> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(LoopGuard(
            String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        ))
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Opens the mount's image file, with O_DIRECT if `direct` (reads then reach the FUSE server
/// exactly as asked, no page cache, no readahead).
pub fn open_image(mount: &FuseMount, direct: bool) -> File {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(mount.image_path()).unwrap()
}

/// One pread, returning what it read (short at the end of the file) or its error.
pub fn pread(f: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    // Page-aligned, for O_DIRECT.
    let mut buf = AlignedBuf::new(len);
    let n = f.read_at(buf.as_mut(), offset)?;
    Ok(buf.as_mut()[..n].to_vec())
}

/// A page-aligned buffer.
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let v = vec![0u8; len + 4096];
        let start = v.as_ptr().align_offset(4096);
        AlignedBuf { v, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// Deterministic bytes that differ at every offset worth telling apart.
pub use cora_testdata::pseudo_random as pattern;
