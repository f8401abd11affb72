//! Local content-addressed chunk cache, shared by every image and every device process on
//! the host.
//!
//! A chunk is keyed by the sha256 of its *uncompressed* bytes and stored uncompressed, so a
//! warm read is one `pread` on an already open file and never decompresses.
//!
//! # Layout
//! ```text
//! DIR/chunks/ab/cdef…   one file per chunk, named by its sha256 hex (2 + 62 chars)
//! DIR/tmp/              inserts in progress where O_TMPFILE is unusable: renamed into chunks/
//! DIR/lock              flock(2) target: one evictor / gc at a time across processes
//! ```
//!
//! # Consistency
//! * An entry appears under its final name only when fully written: an unnamed `O_TMPFILE`
//!   file in the entry's directory is `linkat(2)`-ed in (a crashed writer leaves nothing), or,
//!   where the filesystem lacks `O_TMPFILE`, a temp file under `tmp/` is `rename(2)`-d in (a
//!   crashed writer leaves at most that temp file, which is never served and which
//!   [`ChunkCache::gc`] removes once older than [`CacheOptions::tmp_max_age`]).
//! * Files are never modified in place, only unlinked (eviction, gc). An fd opened on an
//!   entry keeps reading correct bytes even after another process unlinked it; a lookup that
//!   loses the race against an unlink sees `ENOENT` and reports a miss.
//! * fsync policy: by default no fsync at all (a cache may lose entries on power loss). The
//!   price is that after a power loss an entry may be truncated or zero-filled under its final
//!   name, so every entry is verified (sha256) when this process first opens it
//!   ([`CacheOptions::verify_on_open`]); bad entries are removed and reported as misses.
//!   Entries written by this process are not re-hashed: the write fd is kept open and reused,
//!   and an entry reopened after falling out of the fd cache is not hashed again if its
//!   (dev, inode, ctime, size) matches the version this process verified or wrote.
//!   Set [`CacheOptions::sync_data`] to `fdatasync` each entry before the rename instead.
//! * Concurrent inserts of one digest, from threads or processes, each write their own file:
//!   the first link wins (the others see `EEXIST`), or the last rename does; all are identical.
//!
//! # Recency and eviction
//! The LRU clock is the entry's mtime (atime is unreliable under relatime). A read refreshes
//! it at most once per [`CacheOptions::touch_interval`] per entry per process. When a
//! process's estimate of the cache size passes the limit (its last scan plus what it inserted
//! since), it takes the `lock` flock, rescans, and unlinks least-recently-used entries down to
//! 90 % of the limit. Other processes' inserts are seen at the next scan, which each process
//! forces after inserting 1/8 of the limit, bounding the overshoot.
//!
//! # Measured (`cargo bench -p cora-cache --bench cache`: 256 MiB as 4096 chunks of 64 KiB, warm)
//! Best of 7 interleaved rounds on the shared 2-core dev VM (load ~13, so ±30 % noise),
//! against `pread` on one plain file holding the same bytes in the same run:
//!
//! | random reads, 1 thread (two runs)  | ops/s       | vs plain pread |
//! |-------------------------------------|-------------|----------------|
//! | 4 KiB `read_at` (pread mode)        | 155 k       | 0.69–0.70x     |
//! | 4 KiB `read_at` (mmap mode)         | 400–474 k   | 1.8–2.1x       |
//! | 4 KiB, open per read (no fd cache)  | 40–45 k     | 0.18–0.21x     |
//! | 1 MiB = 16 `read_at` (pread mode)   | 2.7–3.7 k (2.9–3.9 GB/s) | 0.61–0.76x |
//! | 1 MiB = 16 `read_at` (mmap mode)    | 4.9–6.2 k (5.2–6.6 GB/s) | 1.10–1.29x |
//!
//! Bare `pread` on the chunk files without any bookkeeping gets 0.87–0.92x (4 KiB) and
//! 0.65–0.97x (1 MiB: 16 syscalls instead of one); the bookkeeping alone (shard lock, map
//! lookup, counters, clock) is ~0.25 µs per call. First read of an entry by a process (open + sha256 verify of 64 KiB):
//! ~0.2 ms. pread stays the default because an I/O error then reaches the caller as an error
//! instead of a SIGBUS; set [`CacheOptions::mmap`] for the faster path.

mod fdcache;
mod scan;

pub use scan::{GcReport, PruneReport, Removed, RemovedReason};

use fdcache::{FdCache, OpenChunk};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};

/// A chunk digest: sha256 of the uncompressed chunk bytes.
pub type ChunkDigest = [u8; 32];

/// Errors from the chunk cache. I/O errors carry the action and the path.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache: {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache: refusing to store chunk {expected}: its data hashes to {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error(
        "cache: read of {len} bytes at offset {offset} is outside chunk {digest} of {size} bytes"
    )]
    OutOfRange {
        digest: String,
        offset: usize,
        len: usize,
        size: u64,
    },
}

/// The cache directory of the `cora` tools and the driver unless told otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/cora/cache";

pub type Result<T, E = CacheError> = std::result::Result<T, E>;

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Source of "now" for mtimes (the LRU clock) and temp-file ages; tests inject their own.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    /// `CLOCK_REALTIME_COARSE`: a few ns instead of ~150 ns for `SystemTime::now` on the dev
    /// VM, and millisecond resolution is plenty for an LRU clock touched once a minute.
    fn now(&self) -> SystemTime {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes into the timespec we pass.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
        match (rc, u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec)) {
            (0, Ok(secs), Ok(nanos)) => SystemTime::UNIX_EPOCH + Duration::new(secs, nanos),
            _ => SystemTime::now(),
        }
    }
}

/// A clock that moves only when told to; for deterministic LRU tests.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }
    pub fn set(&self, t: SystemTime) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Tunables; [`CacheOptions::new`] gives the defaults used by [`ChunkCache::open`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Evict least recently used entries when the cache grows past this many bytes.
    pub limit_bytes: u64,
    /// Open chunk files kept per process. Default: a quarter of `RLIMIT_NOFILE` (soft),
    /// clamped to 64..=65536; 0 disables the fd cache (open per read).
    pub max_open_files: usize,
    /// A read refreshes an entry's mtime at most this often (per entry, per process).
    pub touch_interval: Duration,
    /// Hash each entry when this process first opens it and drop it if it does not match.
    pub verify_on_open: bool,
    /// With `verify_on_open`, skip hashing entries whose ctime is after this system's boot:
    /// they were written, or verified and refreshed, by a process of this boot, so no power
    /// loss can have damaged them. For long-lived readers (a device process) that would
    /// otherwise hash every chunk it opens once. Off by default: an entry damaged in place
    /// by someone else during this boot is then served as is.
    pub trust_since_boot: bool,
    /// `fdatasync` each new entry before renaming it into place.
    pub sync_data: bool,
    /// Map open entries and serve reads by memcpy instead of `pread` (several times faster
    /// for 4 KiB reads, see the module doc). Off by default: a file truncated in place by
    /// someone else, or a disk I/O error, then kills the process with SIGBUS instead of
    /// returning an error.
    pub mmap: bool,
    /// `gc` removes temp files older than this (younger ones may be inserts in progress).
    pub tmp_max_age: Duration,
    pub clock: Arc<dyn Clock>,
}

impl CacheOptions {
    pub fn new(limit_bytes: u64) -> Self {
        CacheOptions {
            limit_bytes,
            max_open_files: default_max_open_files(),
            touch_interval: Duration::from_secs(60),
            verify_on_open: true,
            trust_since_boot: false,
            sync_data: false,
            mmap: false,
            tmp_max_age: Duration::from_secs(3600),
            clock: Arc::new(SystemClock),
        }
    }
}

fn nofile_limit() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0).then_some((lim.rlim_cur, lim.rlim_max))
}

fn default_max_open_files() -> usize {
    let soft = nofile_limit().map_or(1024, |(soft, _)| soft);
    usize::try_from(soft / 4)
        .unwrap_or(MAX_OPEN_FILES)
        .clamp(64, MAX_OPEN_FILES)
}

/// Most chunk files the fd cache keeps open: every chunk of a 4 GiB image at 64 KiB.
const MAX_OPEN_FILES: usize = 65536;
/// The `RLIMIT_NOFILE` a long-lived reader asks for: room for a full fd cache.
const WANT_NOFILE: u64 = 4 * MAX_OPEN_FILES as u64;

/// Raise this process's `RLIMIT_NOFILE` so the fd cache can hold a whole image's chunks: to
/// [`WANT_NOFILE`] where privileged (a ublk server runs as root, and a bare init leaves the hard
/// limit at 4096, an fd cache of 1024 for 16 Ki chunks per GiB), else the soft limit to the hard
/// one. Call before [`ChunkCache::open`]; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = nofile_limit().ok_or_else(io::Error::last_os_error)?;
    let set = |cur: u64, max: u64| {
        let lim = libc::rlimit {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
    };
    // The kernel refuses limits above fs.nr_open.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    let want = WANT_NOFILE.min(nr_open).max(soft);
    if want > hard && set(want, want) {
        return Ok(want);
    }
    if set(hard, hard) {
        return Ok(hard);
    }
    Err(io::Error::last_os_error())
}

/// Cache occupancy (from disk) and this process's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub limit: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    /// Entries found corrupt on open and removed by this process.
    pub corrupt: u64,
    /// Entries hashed on open by this process (fd-cache misses on entries not yet verified).
    pub verified_on_open: u64,
    /// Open chunk files held by this process.
    pub open_files: u64,
}

impl fmt::Display for CacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "entries:   {}", self.entries)?;
        writeln!(
            f,
            "bytes:     {} ({})",
            self.bytes,
            cora_api::size::format_size(self.bytes)
        )?;
        if self.limit == u64::MAX {
            writeln!(f, "limit:     none")?;
        } else {
            writeln!(
                f,
                "limit:     {} ({})",
                self.limit,
                cora_api::size::format_size(self.limit)
            )?;
        }
        write!(
            f,
            "this process: hits {} misses {} inserts {} evictions {} corrupt {} verified {} open files {}",
            self.hits,
            self.misses,
            self.inserts,
            self.evictions,
            self.corrupt,
            self.verified_on_open,
            self.open_files
        )
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
    evictions: AtomicU64,
    corrupt: AtomicU64,
    verified_on_open: AtomicU64,
}

/// This process's idea of the cache size: last scan plus its own inserts since.
#[derive(Default)]
struct SizeEstimate {
    scanned: Option<u64>,
    inserted_since_scan: u64,
}

/// Identity of one on-disk version of an entry. A file renamed into place later (even one
/// reusing the inode number) has a newer ctime, since rename updates it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            size: meta.len(),
        }
    }
}

/// Entries this process has already hashed (or written), so reopening one after it fell out
/// of the fd cache does not hash it again. Cleared wholesale when it grows past the bound.
#[derive(Default)]
struct VerifiedSet(Mutex<HashMap<ChunkDigest, FileId>>);

const VERIFIED_MAX: usize = 1 << 20;

impl VerifiedSet {
    fn contains(&self, digest: &ChunkDigest, id: FileId) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(digest) == Some(&id)
    }

    fn insert(&self, digest: &ChunkDigest, id: FileId) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= VERIFIED_MAX {
            map.clear();
        }
        map.insert(*digest, id);
    }
}

struct Inner {
    dir: PathBuf,
    chunks: PathBuf,
    tmp: PathBuf,
    lock_path: PathBuf,
    opts: CacheOptions,
    fds: FdCache,
    verified: VerifiedSet,
    counters: Counters,
    estimate: Mutex<SizeEstimate>,
    evicting: AtomicBool,
    tmp_seq: AtomicU64,
    /// Set once `O_TMPFILE` + `linkat` proved unusable here.
    no_tmpfile: AtomicBool,
}

/// Outcome of [`ChunkCache::write_unnamed`].
enum Unnamed {
    /// Linked in under the final name; the fd is the entry's.
    Placed(File),
    /// The entry was already there.
    Exists,
    /// Use a named temp file instead.
    Unsupported,
}

/// Handle on a cache directory; cheap to clone, shareable between threads.
#[derive(Clone)]
pub struct ChunkCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkCache")
            .field("dir", &self.inner.dir)
            .field("limit_bytes", &self.inner.opts.limit_bytes)
            .finish_non_exhaustive()
    }
}

const EMPTY_SHA256: ChunkDigest = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

/// Lowercase hex of a digest.
pub fn digest_hex(digest: &ChunkDigest) -> String {
    hex::encode(digest)
}

/// sha256 of `data`.
pub fn sha256(data: &[u8]) -> ChunkDigest {
    Sha256::digest(data).into()
}

impl ChunkCache {
    /// Open (creating if needed) the cache in `dir` with default options.
    pub fn open(dir: &Path, limit_bytes: u64) -> Result<ChunkCache> {
        Self::open_with(dir, CacheOptions::new(limit_bytes))
    }

    pub fn open_with(dir: &Path, opts: CacheOptions) -> Result<ChunkCache> {
        let chunks = dir.join("chunks");
        let tmp = dir.join("tmp");
        // Private to its owner (root): the chunks are image contents, and anyone who could
        // open the lock file could flock it and stall every eviction, and so every insert
        // that waits for one.
        for d in [dir, &chunks, &tmp] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io_err("create directory", d))?;
        }
        let lock_path = dir.join("lock");
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("create lock file", &lock_path))?;
        debug!(dir = %dir.display(), limit = opts.limit_bytes, fds = opts.max_open_files, "chunk cache opened");
        Ok(ChunkCache {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                chunks,
                tmp,
                lock_path,
                fds: FdCache::new(opts.max_open_files),
                verified: VerifiedSet::default(),
                opts,
                counters: Counters::default(),
                estimate: Mutex::default(),
                evicting: AtomicBool::new(false),
                tmp_seq: AtomicU64::new(0),
                no_tmpfile: AtomicBool::new(false),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn limit(&self) -> u64 {
        self.inner.opts.limit_bytes
    }

    /// Final path of an entry: `chunks/ab/cdef…`.
    pub fn entry_path(&self, digest: &ChunkDigest) -> PathBuf {
        let hex = digest_hex(digest);
        self.inner.chunks.join(&hex[..2]).join(&hex[2..])
    }

    /// Copy `buf.len()` bytes of the chunk starting at `offset` into `buf`.
    ///
    /// Returns `Ok(false)` if the chunk is not cached (including when it vanished between
    /// lookup and open, or was found corrupt and removed). A range that does not lie inside
    /// the entry means the entry is not that chunk (cut short in place, not verified because
    /// trusted, see [`CacheOptions::trust_since_boot`]): it is removed and this is a miss, so
    /// the caller fetches the chunk again. A range that does not fit in `usize` is an
    /// [`CacheError::OutOfRange`] error.
    pub fn read_at(&self, digest: &ChunkDigest, offset: usize, buf: &mut [u8]) -> Result<bool> {
        let Some(end) = offset.checked_add(buf.len()) else {
            return Err(CacheError::OutOfRange {
                digest: digest_hex(digest),
                offset,
                len: buf.len(),
                size: 0,
            });
        };
        let Some(chunk) = self.lookup(digest)? else {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        };
        if end as u64 > chunk.size {
            self.discard(digest, &chunk, end as u64);
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        chunk
            .read_exact_at(buf, offset as u64)
            .map_err(|e| io_err("read", &self.entry_path(digest))(e))?;
        Ok(true)
    }

    /// The whole chunk, or `None` if not cached.
    pub fn get(&self, digest: &ChunkDigest) -> Result<Option<Vec<u8>>> {
        let Some(chunk) = self.lookup(digest)? else {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        let len = usize::try_from(chunk.size).map_err(|_| CacheError::OutOfRange {
            digest: digest_hex(digest),
            offset: 0,
            len: usize::MAX,
            size: chunk.size,
        })?;
        let mut data = vec![0u8; len];
        chunk
            .read_exact_at(&mut data, 0)
            .map_err(|e| io_err("read", &self.entry_path(digest))(e))?;
        Ok(Some(data))
    }

    /// Lend the whole cached chunk as mapped memory, for handing it to the kernel without a
    /// copy (e.g. `pwritev` into a ublk request). `Ok(None)` if the chunk is not cached or
    /// cannot be mapped. Counts a hit like [`ChunkCache::read_at`].
    ///
    /// Only pass [`LentChunk::kernel_bytes`] to system calls: a page that cannot be read (an
    /// entry truncated in place by someone else, a disk error) then fails the call with
    /// `EFAULT`, whereas touching it from user space would raise SIGBUS.
    ///
    /// `len` is the chunk's length by the index: an entry of another size is removed (as in
    /// [`ChunkCache::read_at`]) and this is a miss.
    pub fn lend(&self, digest: &ChunkDigest, len: u64) -> Result<Option<LentChunk>> {
        let Some(chunk) = self.lookup_sized(digest, len)? else {
            return Ok(None);
        };
        if chunk.lend().is_none() {
            return Ok(None);
        }
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(LentChunk(chunk)))
    }

    /// The cached chunk as an open file, for reading by fd (an io_uring read into a ublk
    /// request); `Ok(None)` if it is not cached. Counts a hit like [`ChunkCache::read_at`];
    /// sizes are checked as in [`ChunkCache::lend`].
    pub fn open_chunk(&self, digest: &ChunkDigest, len: u64) -> Result<Option<HeldChunk>> {
        let Some(chunk) = self.lookup_sized(digest, len)? else {
            return Ok(None);
        };
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(HeldChunk(chunk)))
    }

    /// [`ChunkCache::lookup`] of an entry that must be `len` bytes: one of another size is
    /// removed. Counts misses (not hits).
    fn lookup_sized(&self, digest: &ChunkDigest, len: u64) -> Result<Option<Arc<OpenChunk>>> {
        let Some(chunk) = self.lookup(digest)? else {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        if chunk.size != len {
            self.discard(digest, &chunk, len);
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        Ok(Some(chunk))
    }

    /// Whether the chunk is cached (without verifying it or counting a hit). An entry this
    /// process holds open counts as cached even if another process has unlinked it since:
    /// its bytes are still readable through the open fd.
    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        self.inner.fds.contains(digest)
            || fs::metadata(self.entry_path(digest)).is_ok_and(|m| m.is_file())
    }

    /// Drops an entry whose size shows it is not the chunk it is named after (`want` bytes
    /// were needed): from the fd cache, and from disk if the file there is still this one.
    fn discard(&self, digest: &ChunkDigest, chunk: &OpenChunk, want: u64) {
        let path = self.entry_path(digest);
        warn!(path = %path.display(), size = chunk.size, want, "cache entry of the wrong size removed");
        self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        self.inner.fds.remove(digest);
        if let Ok(meta) = chunk.file.metadata() {
            remove_if_same_inode(&path, &meta);
        }
    }

    /// Find an open fd for the entry, opening (and verifying) it on an fd-cache miss.
    fn lookup(&self, digest: &ChunkDigest) -> Result<Option<Arc<OpenChunk>>> {
        let inner = &*self.inner;
        let now = inner.opts.clock.now();
        if let Some(hit) = inner.fds.get(digest, now, inner.opts.touch_interval) {
            if hit.touch {
                self.touch(digest, &hit.chunk.file, now);
            }
            return Ok(Some(hit.chunk));
        }
        let path = self.entry_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            // Absent, evicted since the caller looked, or a fan-out entry that is a file.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let meta = file.metadata().map_err(io_err("stat", &path))?;
        if !meta.is_file() {
            warn!(path = %path.display(), "cache entry is not a regular file; treating as absent");
            return Ok(None);
        }
        let id = FileId::of(&meta);
        let suspicious_empty = meta.len() == 0 && *digest != EMPTY_SHA256;
        // See `CacheOptions::trust_since_boot`.
        let must_verify = inner.opts.verify_on_open
            && !inner.verified.contains(digest, id)
            && !(inner.opts.trust_since_boot && changed_since_boot(&meta));
        if suspicious_empty || (must_verify && !verify_file(&file, digest, &path)?) {
            warn!(path = %path.display(), size = meta.len(), "corrupt cache entry removed");
            inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            remove_if_same_inode(&path, &meta);
            return Ok(None);
        }
        if must_verify {
            inner
                .counters
                .verified_on_open
                .fetch_add(1, Ordering::Relaxed);
            inner.verified.insert(digest, id);
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        let stale = now
            .duration_since(mtime)
            .is_ok_and(|age| age >= inner.opts.touch_interval);
        if stale {
            self.touch(digest, &file, now);
        }
        let touched = if stale { now } else { mtime };
        let chunk = Arc::new(OpenChunk::new(file, meta.len(), inner.opts.mmap));
        Ok(Some(inner.fds.put(digest, chunk, touched)))
    }

    /// Refresh the entry's mtime, the LRU clock shared by all processes. Best effort: a
    /// failure only makes the entry look older than it is.
    fn touch(&self, digest: &ChunkDigest, file: &File, now: SystemTime) {
        if let Err(e) = file.set_modified(now) {
            debug!(digest = %digest_hex(digest), error = %e, "could not refresh cache entry mtime");
        }
    }

    /// Store a chunk after checking that `data` hashes to `digest`.
    ///
    /// Already-present entries of the right size are left alone. The data goes to a temp file
    /// in `DIR/tmp` that is renamed into place, so no reader ever sees a partial entry.
    pub fn insert(&self, digest: &ChunkDigest, data: &[u8]) -> Result<()> {
        let actual = sha256(data);
        if actual != *digest {
            return Err(CacheError::DigestMismatch {
                expected: digest_hex(digest),
                actual: digest_hex(&actual),
            });
        }
        self.insert_verified(digest, data)
    }

    /// As [`insert`](Self::insert), for a caller that has just checked that `data` hashes to
    /// `digest` (the lazy source verifies every chunk it decodes; hashing twice cost ~10 % of
    /// a cold read).
    pub fn insert_verified(&self, digest: &ChunkDigest, data: &[u8]) -> Result<()> {
        let inner = &*self.inner;
        let path = self.entry_path(digest);
        if inner.fds.contains(digest)
            || fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == data.len() as u64)
        {
            return Ok(());
        }
        let file = match self.write_unnamed(&path, data)? {
            Unnamed::Placed(file) => file,
            Unnamed::Exists => return Ok(()),
            Unnamed::Unsupported => self.write_renamed(digest, &path, data)?,
        };
        inner.counters.inserts.fetch_add(1, Ordering::Relaxed);
        // After the link or rename, so the recorded ctime is the final one.
        if let Ok(meta) = file.metadata() {
            inner.verified.insert(digest, FileId::of(&meta));
        }
        // The write fd now names the final entry; keep it so the next read needs no open and
        // no verification (we just hashed these bytes).
        let chunk = Arc::new(OpenChunk::new(file, data.len() as u64, inner.opts.mmap));
        inner.fds.put(digest, chunk, inner.opts.clock.now());
        self.note_inserted(data.len() as u64);
        Ok(())
    }

    /// Writes `data` to an unnamed file (`O_TMPFILE`) in the entry's own directory and links
    /// it in under its final name. Cheaper than a temp file renamed across directories (one
    /// directory operation, no filesystem-wide rename lock, no shared `tmp/` whose lock every
    /// writer takes), and a crash leaves nothing behind. `Unsupported` where the filesystem
    /// or a missing `/proc` does not allow it: the caller falls back to a named temp file.
    fn write_unnamed(&self, path: &Path, data: &[u8]) -> Result<Unnamed> {
        let inner = &*self.inner;
        if inner.no_tmpfile.load(Ordering::Relaxed) {
            return Ok(Unnamed::Unsupported);
        }
        let Some(dir) = path.parent() else {
            return Ok(Unnamed::Unsupported);
        };
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o644)
                .open(dir)
        };
        let opened = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The fan-out directory does not exist yet (created lazily).
                fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
                open()
            }
            r => r,
        };
        let mut file = match opened {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                inner.no_tmpfile.store(true, Ordering::Relaxed);
                return Ok(Unnamed::Unsupported);
            }
            Err(e) => return Err(io_err("create unnamed file in", dir)(e)),
        };
        self.fill(&mut file, data, path)?;
        let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| io_err("link", path)(io::ErrorKind::InvalidInput.into()))?;
        let dest = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io_err("link", path)(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: both arguments are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                proc_path.as_ptr(),
                libc::AT_FDCWD,
                dest.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if rc == 0 {
            return Ok(Unnamed::Placed(file));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Another writer (thread or process) placed the same, verified bytes first.
            Some(libc::EEXIST) => Ok(Unnamed::Exists),
            // No procfs here (or it hides our fds): stop trying.
            Some(libc::ENOENT | libc::EACCES | libc::EPERM) => {
                inner.no_tmpfile.store(true, Ordering::Relaxed);
                Ok(Unnamed::Unsupported)
            }
            _ => Err(io_err("link into place", path)(e)),
        }
    }

    /// The portable insert: a named temp file under `tmp/`, renamed into place.
    fn write_renamed(&self, digest: &ChunkDigest, path: &Path, data: &[u8]) -> Result<File> {
        let (tmp_path, mut file) = self.create_temp(digest)?;
        let written = self
            .fill(&mut file, data, &tmp_path)
            .and_then(|()| self.rename_into_place(&tmp_path, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }
        Ok(file)
    }

    /// Writes a new entry's bytes, stamps its LRU clock and, if configured, syncs it.
    fn fill(&self, file: &mut File, data: &[u8], path: &Path) -> Result<()> {
        let opts = &self.inner.opts;
        file.write_all(data).map_err(io_err("write", path))?;
        file.set_modified(opts.clock.now())
            .map_err(io_err("set mtime of", path))?;
        if opts.sync_data {
            file.sync_data().map_err(io_err("fdatasync", path))?;
        }
        Ok(())
    }

    fn create_temp(&self, digest: &ChunkDigest) -> Result<(PathBuf, File)> {
        let inner = &*self.inner;
        let hex = digest_hex(digest);
        let pid = std::process::id();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        loop {
            let seq = inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
            // pid + sequence is unique among live processes of one pid namespace; the nanos
            // make clashes across namespaces unlikely, and create_new makes them harmless.
            let tmp_path = inner.tmp.join(format!("{hex}.{pid}.{nanos:x}.{seq}.tmp"));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp_path)
            {
                Ok(f) => return Ok((tmp_path, f)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Someone removed tmp/; recreate it once and retry.
                    fs::create_dir_all(&inner.tmp)
                        .map_err(io_err("create directory", &inner.tmp))?;
                    if seq > 8 {
                        return Err(io_err("create temp file", &tmp_path)(e));
                    }
                }
                Err(e) => return Err(io_err("create temp file", &tmp_path)(e)),
            }
        }
    }

    fn rename_into_place(&self, tmp_path: &Path, path: &Path) -> Result<()> {
        match fs::rename(tmp_path, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The fan-out directory does not exist yet (created lazily).
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
                }
                fs::rename(tmp_path, path).map_err(io_err("rename into place", path))
            }
            Err(e) => Err(io_err("rename into place", path)(e)),
        }
    }

    fn note_inserted(&self, bytes: u64) {
        let limit = self.inner.opts.limit_bytes;
        let due = {
            let mut est = self
                .inner
                .estimate
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            est.inserted_since_scan += bytes;
            match est.scanned {
                None => true,
                Some(scanned) => {
                    scanned.saturating_add(est.inserted_since_scan) > limit
                        || est.inserted_since_scan >= limit / 8
                }
            }
        };
        if due
            && limit != u64::MAX
            && let Err(e) = self.auto_evict()
        {
            warn!(error = %e, "cache eviction failed");
        }
    }

    /// Evict to 90 % of the limit unless another thread of this process is already evicting.
    /// Another process's eviction is waited for, then this one scans again: that process may
    /// have scanned before our inserts, and skipping would leave them uncounted for good when
    /// we insert nothing more (a burst of inserts by several processes then overshot the limit
    /// by far more than the limit / 8 each process may hold unscanned). The cost: an insert
    /// that is due to evict waits while `cora cache gc` (which hashes every entry) runs.
    fn auto_evict(&self) -> Result<()> {
        let inner = &*self.inner;
        if inner.evicting.swap(true, Ordering::Acquire) {
            return Ok(());
        }
        let result = (|| {
            let _lock = scan::DirLock::acquire(&inner.lock_path)?;
            let target = inner.opts.limit_bytes / 10 * 9;
            self.evict_locked(target).map(|_| ())
        })();
        inner.evicting.store(false, Ordering::Release);
        result
    }

    /// Statistics: entries and bytes from a scan of the directory, counters of this process.
    pub fn stats(&self) -> Result<CacheStats> {
        let listing = scan::list_entries(&self.inner.chunks)?;
        let c = &self.inner.counters;
        Ok(CacheStats {
            entries: listing.len() as u64,
            bytes: listing.iter().map(|e| e.size).sum(),
            limit: self.inner.opts.limit_bytes,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            inserts: c.inserts.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            verified_on_open: c.verified_on_open.load(Ordering::Relaxed),
            open_files: self.inner.fds.len() as u64,
        })
    }
}

/// A cached chunk from [`ChunkCache::open_chunk`]: its fd stays open while this is held
/// (eviction only drops the cache's own reference), and its bytes never change.
pub struct HeldChunk(Arc<OpenChunk>);

impl AsRawFd for HeldChunk {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.file.as_raw_fd()
    }
}

/// A cached chunk lent by [`ChunkCache::lend`]; keeps its mapping alive while held.
pub struct LentChunk(Arc<OpenChunk>);

impl LentChunk {
    /// The chunk's bytes, mapped. Hand them to the kernel only (see [`ChunkCache::lend`]).
    pub fn kernel_bytes(&self) -> &[u8] {
        // `lend` returned this chunk only after its mapping was made; it never goes away.
        self.0.lend().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.kernel_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether the entry's ctime is after this system's boot (`btime` of /proc/stat). Only
/// writes (rename into place) and mtime refreshes change an entry's ctime, and a refresh
/// happens only after the entry was verified or written, so a lost power (a reboot) since then
/// is ruled out. Unknown boot time: false (verify).
fn changed_since_boot(meta: &fs::Metadata) -> bool {
    static BOOT: std::sync::OnceLock<Option<i64>> = std::sync::OnceLock::new();
    let boot = BOOT.get_or_init(|| {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        stat.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    });
    boot.is_some_and(|b| meta.ctime() > b)
}

/// Hash the whole file and compare with its name.
fn verify_file(file: &File, digest: &ChunkDigest, path: &Path) -> Result<bool> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut reader = file;
    // `&File` reads from the current position; the fd is fresh, so that is 0. Later reads
    // use pread and ignore the position.
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        hasher.update(&buf[..n]);
    }
    let actual: ChunkDigest = hasher.finalize().into();
    Ok(actual == *digest)
}

/// Unlink `path` only if it still names the inode described by `meta`: a concurrent insert
/// may have renamed a good copy over the bad one since we opened it.
fn remove_if_same_inode(path: &Path, meta: &fs::Metadata) -> bool {
    match fs::symlink_metadata(path) {
        Ok(now) if now.ino() == meta.ino() && now.dev() == meta.dev() => {
            fs::remove_file(path).is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod boot_tests {
    use super::*;

    #[test]
    fn entries_written_this_boot_skip_verification_only_when_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = vec![5u8; 10_000];
        let d = sha256(&data);
        ChunkCache::open(dir.path(), u64::MAX)
            .expect("open")
            .insert(&d, &data)
            .expect("insert");
        let mut opts = CacheOptions::new(u64::MAX);
        let mut buf = vec![0u8; 100];
        let strict = ChunkCache::open_with(dir.path(), opts.clone()).expect("open");
        assert!(strict.read_at(&d, 0, &mut buf).expect("read"));
        assert_eq!(strict.stats().expect("stats").verified_on_open, 1);
        opts.trust_since_boot = true;
        let trusting = ChunkCache::open_with(dir.path(), opts).expect("open");
        assert!(trusting.read_at(&d, 0, &mut buf).expect("read"));
        assert_eq!(trusting.stats().expect("stats").verified_on_open, 0);
        assert_eq!(buf, vec![5u8; 100]);
    }
}
