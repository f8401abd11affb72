//! What the processes sharing a cache directory tell each other: two counters in a mapped
//! file, and locks.

use crate::{Result, io_err};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// `DIR/state`, mapped shared: a reader learns with one load whether anything changed since
/// it last looked, instead of a `stat` per segment on every miss.
pub struct SharedState {
    ptr: *mut libc::c_void,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for SharedState {}
unsafe impl Sync for SharedState {}

const STATE_LEN: usize = 4096;

impl SharedState {
    pub fn open(path: &Path) -> Result<SharedState> {
        let file = open_rw(path)?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        if len < STATE_LEN as u64 {
            // Concurrent openers may both extend it: same length, zero-filled, harmless.
            file.set_len(STATE_LEN as u64)
                .map_err(io_err("extend", path))?;
        }
        // SAFETY: a shared read-write mapping of a file at least STATE_LEN long; checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STATE_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_err("map", path)(io::Error::last_os_error()));
        }
        Ok(SharedState { ptr })
    }

    fn counter(&self, i: usize) -> &AtomicU64 {
        // SAFETY: the mapping is page aligned and STATE_LEN long, so slot i (< 2) is an
        // aligned u64 inside it, alive as long as self.
        unsafe { &*(self.ptr as *const AtomicU64).add(i) }
    }

    /// Bumped whenever a segment is created, sealed or removed.
    pub fn layout(&self) -> &AtomicU64 {
        self.counter(0)
    }

    /// Bumped after every record a writer makes visible.
    pub fn published(&self) -> &AtomicU64 {
        self.counter(1)
    }

    pub fn bump_layout(&self) {
        self.layout().fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for SharedState {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what open mapped.
        unsafe { libc::munmap(self.ptr, STATE_LEN) };
    }
}

/// `flock(2)` on `file`; `Ok(false)` if `nonblock` and someone else holds it.
pub fn flock(file: &File, op: libc::c_int, nonblock: bool, path: &Path) -> Result<bool> {
    let op = if nonblock { op | libc::LOCK_NB } else { op };
    loop {
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblock => return Ok(false),
            _ => return Err(io_err("flock", path)(e)),
        }
    }
}

/// An exclusive flock on `DIR/lock`, released on drop: one evictor / gc at a time.
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Opens (creating) the lock file without locking it.
    pub fn create(path: &Path) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("open lock file", path))
    }

    /// Takes the lock if nobody holds it.
    pub fn try_acquire(path: &Path) -> Result<Option<DirLock>> {
        let file = Self::create(path)?;
        Ok(flock(&file, libc::LOCK_EX, true, path)?.then_some(DirLock { _file: file }))
    }

    pub fn acquire(path: &Path) -> Result<DirLock> {
        let file = Self::create(path)?;
        flock(&file, libc::LOCK_EX, false, path)?;
        Ok(DirLock { _file: file })
    }
}

/// Per-digest insert locks across processes: an open-file-description lock on one byte of
/// `DIR/fill.lock` chosen by the digest, so two processes filling the same chunk store it
/// once. Threads of one process share the description (the lock does not exclude them); the
/// writer's mutex orders those.
pub struct FillLocks {
    file: File,
}

pub struct FillGuard<'a> {
    file: &'a File,
    slot: i64,
}

const FILL_SLOTS: u64 = 1 << 16;

impl FillLocks {
    pub fn open(path: &Path) -> Result<FillLocks> {
        let file = open_rw(path)?;
        Ok(FillLocks { file })
    }

    /// Waits for the digest's slot. A lock that cannot be taken (a filesystem without OFD
    /// locks) gives `None`: inserts then only dedupe within a process.
    pub fn lock(&self, digest: &crate::ChunkDigest) -> Option<FillGuard<'_>> {
        let slot = (u64::from(u16::from_le_bytes([digest[0], digest[1]])) % FILL_SLOTS) as i64;
        set_ofd_lock(&self.file, slot, libc::F_WRLCK as libc::c_short).then_some(FillGuard {
            file: &self.file,
            slot,
        })
    }
}

fn set_ofd_lock(file: &File, slot: i64, kind: libc::c_short) -> bool {
    loop {
        // SAFETY: flock is plain data; zeroed is a valid value that we then fill in.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = slot;
        fl.l_len = 1;
        // SAFETY: F_OFD_SETLKW reads the flock struct we pass; pid must be 0.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) } == 0 {
            return true;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        set_ofd_lock(self.file, self.slot, libc::F_UNLCK as libc::c_short);
    }
}

/// Opens (creating, never truncating) a file the cache's processes share read-write.
fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io_err("open", path))
}
