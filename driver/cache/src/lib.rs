//! Local content-addressed chunk cache, shared by every image and every device process on
//! the host.
//!
//! A chunk is keyed by the sha256 of its *uncompressed* bytes and stored uncompressed, so a
//! warm read is one positioned read (or a memcpy from a mapping) at a known offset of an
//! already open file, and never decompresses.
//!
//! # Layout
//! ```text
//! DIR/segments/<name>.seg   append-only segment files: records of (header, chunk bytes)
//! DIR/segments/<name>.idx   a sealed segment's table of contents (its mtime: the LRU clock)
//! DIR/state                 two shared counters (layout changes, records published), mapped
//! DIR/fill.lock             per-digest insert locks (OFD byte locks)
//! DIR/lock                  flock(2): one evictor / gc at a time
//! ```
//! Formats are in [`format`]. Why segments and not a file per chunk (the layout before,
//! which an older cache directory still holds and which is discarded on open): creating a
//! file cost ~1.1 ms on ext4 (inode allocation), 1120 of them 1.2–1.4 s for a 102 MB stack;
//! each chunk needed its own fd (64 Ki per device and RLIMIT games) and its own hash on
//! first open; and an evicted chunk still open elsewhere kept its space. A segment is one
//! file per ~64 MiB: an insert is two `pwrite`s into a file already open, and the fds a
//! process holds are bounded by [`CacheOptions::max_open_segments`]. The alternative, a
//! sparse file per layer with a presence map, would make a chunk shared by two layers
//! (common: the same file in two images) a copy or a second fetch; content addressing keeps
//! it once.
//!
//! # Sharing and consistency
//! * Each process appends to a segment of its own, holding its `flock` while it does; a
//!   record's data is written before its header, and a header only counts if its CRC checks
//!   out, so a reader never sees part of a record, and a writer killed mid-insert leaves a
//!   torn tail that readers stop at. A full segment is sealed: its index is written
//!   (temp file renamed into place) and its lock dropped. A segment left unlocked without an
//!   index (its writer died) is sealed by the next process that opens the cache, evicts or
//!   runs gc: records up to the torn tail are kept, the rest is cut off.
//! * Readers never wait for writers: each process keeps a map of digest → (segment, offset)
//!   and, on a miss only, checks two counters in the shared `state` mapping; if another
//!   process published or changed segments since, it reads the new indexes and the new
//!   records at the tails of open segments ([`index`]).
//! * Concurrent inserts of one chunk store it once: an insert takes a byte lock chosen by the
//!   digest in `fill.lock` (processes) and the writer's mutex (threads), and looks again.
//! * Power loss: there is no fsync by default, so after a crash of the machine a record may
//!   name bytes that never reached the disk. Every segment carries the boot id of the boot
//!   that wrote it; entries of segments from another boot are checked against the CRC-32 in
//!   their header when this process first reads them ([`CacheOptions::verify_on_open`]), and
//!   dropped if they do not match. [`CacheOptions::sync_data`] syncs each record's data
//!   before its header instead. `gc` checks every entry's sha256.
//!
//! # Recency and eviction
//! Eviction removes whole sealed segments, least recently used first, by the mtime of their
//! index; a read refreshes it at most once per [`CacheOptions::touch_interval`] per segment
//! per process. Removing a segment bumps the layout counter, so every process drops its
//! entries and closes its fd at its next miss; a reader in the middle of a read keeps the
//! file until it is done (the bytes stay right), so space is freed as soon as no read is
//! in flight. When a process's estimate of the cache size passes the limit (its last scan
//! plus what it inserted since), it takes the `lock` flock, rescans, and evicts down to 90 %
//! of the limit; it rescans after inserting 1/8 of the limit, bounding the overshoot of
//! other processes' inserts. A segment's hot chunks go with its cold ones (no compaction).
//!
//! # Measured
//! `cargo bench -p cora-cache --bench cache` (table and analysis:
//! `bench/results/2026-12-07-cache-segments/`), against plain files in the same run, ext4:
//! inserts 0.49x of `write` (tmpfs 0.83x); warm random 4 KiB reads 0.69x of `pread` (mmap
//! mode 1.76x), 1 MiB as 16 chunk reads 0.67x (mmap 1.09x); 0.1 % disk overhead; opening a
//! cache of 1 M entries 333–355 ms and 113 bytes of memory per entry.

mod format;
mod index;
mod openseg;
mod scan;
mod shared;
mod writer;

pub use scan::{GcReport, PruneReport, Removed, RemovedReason};

use index::Index;
use openseg::{OpenSeg, OpenSegs, SegId};
use sha2::{Digest, Sha256};
use shared::{DirLock, FillLocks, SharedState};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};
use writer::Writer;

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
    /// Evict least recently used segments when the cache grows past this many bytes.
    pub limit_bytes: u64,
    /// Segment files a process keeps open for reading (closing the least recently used).
    pub max_open_segments: usize,
    /// A segment is sealed once it holds this many bytes. 0: a sixteenth of the limit,
    /// between 64 KiB and 64 MiB (eviction frees a segment at a time).
    pub segment_bytes: u64,
    /// A read refreshes a segment's LRU clock at most this often (per segment, per process).
    pub touch_interval: Duration,
    /// Check entries written during an earlier boot against their CRC-32 when this process
    /// first reads them, and drop those that do not match (bytes lost in a power cut).
    pub verify_on_open: bool,
    /// `fdatasync` each record's data before writing its header.
    pub sync_data: bool,
    /// Serve reads by memcpy from a mapping of the segment instead of `pread` (faster for
    /// small reads). Off by default: a disk I/O error then kills the process with SIGBUS
    /// instead of returning an error.
    pub mmap: bool,
    /// `gc` removes index temp files older than this (younger ones may be being written).
    pub tmp_max_age: Duration,
    pub clock: Arc<dyn Clock>,
    /// Stand-in for this boot's id, for tests that play a reboot.
    #[doc(hidden)]
    pub boot_id: Option<[u8; 16]>,
}

impl CacheOptions {
    pub fn new(limit_bytes: u64) -> Self {
        CacheOptions {
            limit_bytes,
            max_open_segments: 64,
            segment_bytes: 0,
            touch_interval: Duration::from_secs(60),
            verify_on_open: true,
            sync_data: false,
            mmap: false,
            tmp_max_age: Duration::from_secs(3600),
            clock: Arc::new(SystemClock),
            boot_id: None,
        }
    }

    fn effective_segment_bytes(&self) -> u64 {
        if self.segment_bytes > 0 {
            return self.segment_bytes;
        }
        (self.limit_bytes / 16).clamp(64 << 10, 64 << 20)
    }
}

/// Cache occupancy (as this process sees it after catching up) and this process's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    /// Bytes of the cached chunks.
    pub bytes: u64,
    /// Bytes of the segment files (chunks, headers, page alignment, torn tails).
    pub disk_bytes: u64,
    pub segments: u64,
    pub limit: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    /// Entries removed by this process's evictions.
    pub evictions: u64,
    /// Entries found corrupt and dropped by this process.
    pub corrupt: u64,
    /// Entries of earlier boots checked on first read by this process.
    pub verified_on_open: u64,
    /// Segment files held open by this process.
    pub open_files: u64,
}

impl fmt::Display for CacheStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use cora_api::size::format_size;
        writeln!(f, "entries:   {}", self.entries)?;
        writeln!(f, "bytes:     {} ({})", self.bytes, format_size(self.bytes))?;
        writeln!(
            f,
            "on disk:   {} ({}) in {} segments",
            self.disk_bytes,
            format_size(self.disk_bytes),
            self.segments
        )?;
        if self.limit == u64::MAX {
            writeln!(f, "limit:     none")?;
        } else {
            writeln!(f, "limit:     {} ({})", self.limit, format_size(self.limit))?;
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

pub(crate) struct Inner {
    dir: PathBuf,
    segs_dir: PathBuf,
    lock_path: PathBuf,
    opts: CacheOptions,
    segment_bytes: u64,
    boot_id: format::BootId,
    shared: SharedState,
    fills: FillLocks,
    index: RwLock<Index>,
    /// One refresh at a time; lookups meanwhile use the index as it is.
    refreshing: Mutex<()>,
    writer: Mutex<Option<Writer>>,
    open: OpenSegs,
    counters: Counters,
    estimate: Mutex<SizeEstimate>,
    evicting: AtomicBool,
}

impl Inner {
    fn index_read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn index_write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The segment open for reading; `None` if it is gone (evicted, or unknown).
    fn open_seg(&self, id: SegId) -> Result<Option<Arc<OpenSeg>>> {
        if let Some(seg) = self.open.get(id) {
            return Ok(Some(seg));
        }
        let Some(name) = self.index_read().segs.get(&id).map(|s| s.name.clone()) else {
            return Ok(None);
        };
        let path = index::seg_path(&self.segs_dir, &name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        // Room for what a writer may still append (it seals past segment_bytes, by at most
        // one chunk); records past the mapping are read with pread.
        let map_len = len.max(self.segment_bytes.saturating_mul(2) + (16 << 20));
        let seg = Arc::new(OpenSeg::new(file, len, map_len));
        // Kept only if the segment is still known: one evicted meanwhile (refresh dropped it)
        // would otherwise hold its deleted file open. Lock order: index, then open segments.
        let idx = self.index_read();
        if idx.segs.contains_key(&id) {
            self.open.put(id, seg.clone());
        }
        drop(idx);
        Ok(Some(seg))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let writer = self
            .writer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(w) = writer
            && let Err(e) = self.seal(w)
        {
            warn!(error = %e, "could not seal cache segment (the next process to open the cache does)");
        }
    }
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

#[cfg(test)]
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

/// Where a cached chunk's bytes are, in a segment this process holds open.
struct Found {
    seg: Arc<OpenSeg>,
    offset: u64,
    len: u32,
}

/// This boot's id: segments carry it, so entries written before a power cut are told apart.
/// Unreadable: an id of this process alone (nothing written by others is trusted).
fn read_boot_id() -> format::BootId {
    let parsed = fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| {
            let mut id = [0u8; 16];
            hex::decode_to_slice(s.trim().replace('-', ""), &mut id).ok()?;
            Some(id)
        });
    parsed.unwrap_or_else(|| {
        let seed = format!("{}-{:?}", std::process::id(), SystemTime::now());
        let d = sha256(seed.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        id
    })
}

impl ChunkCache {
    /// Open (creating if needed) the cache in `dir` with default options.
    pub fn open(dir: &Path, limit_bytes: u64) -> Result<ChunkCache> {
        Self::open_with(dir, CacheOptions::new(limit_bytes))
    }

    pub fn open_with(dir: &Path, opts: CacheOptions) -> Result<ChunkCache> {
        let segs_dir = dir.join("segments");
        // Private to its owner (root): the chunks are image contents, and anyone who could
        // open the lock files could stall every eviction and insert.
        for d in [dir, &segs_dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(io_err("create directory", d))?;
        }
        let lock_path = dir.join("lock");
        drop(DirLock::create(&lock_path)?);
        discard_old_layout(dir, &lock_path)?;
        let shared = SharedState::open(&dir.join("state"))?;
        let fills = FillLocks::open(&dir.join("fill.lock"))?;
        let segment_bytes = opts.effective_segment_bytes();
        let boot_id = opts.boot_id.unwrap_or_else(read_boot_id);
        let cache = ChunkCache {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                segs_dir,
                lock_path,
                open: OpenSegs::new(opts.max_open_segments),
                segment_bytes,
                opts,
                boot_id,
                shared,
                fills,
                index: RwLock::new(Index {
                    // Never equal to the shared counters' values: the first refresh lists.
                    seen: (u64::MAX, u64::MAX),
                    ..Index::default()
                }),
                refreshing: Mutex::default(),
                writer: Mutex::default(),
                counters: Counters::default(),
                estimate: Mutex::default(),
                evicting: AtomicBool::new(false),
            }),
        };
        if let Err(e) = cache.inner.seal_dead(&mut Vec::new(), false) {
            warn!(error = %e, "could not seal dead writers' cache segments");
        }
        cache.inner.refresh()?;
        debug!(dir = %dir.display(), limit = cache.inner.opts.limit_bytes, "chunk cache opened");
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn limit(&self) -> u64 {
        self.inner.opts.limit_bytes
    }

    /// Copy `buf.len()` bytes of the chunk starting at `offset` into `buf`.
    ///
    /// Returns `Ok(false)` if the chunk is not cached (including when it was evicted between
    /// lookup and open, or was found corrupt and dropped). A range outside the chunk is an
    /// [`CacheError::OutOfRange`] error: the chunk's length follows from its digest, so the
    /// caller's idea of it is wrong.
    pub fn read_at(&self, digest: &ChunkDigest, offset: usize, buf: &mut [u8]) -> Result<bool> {
        if offset.checked_add(buf.len()).is_none() {
            return Err(CacheError::OutOfRange {
                digest: digest_hex(digest),
                offset,
                len: buf.len(),
                size: 0,
            });
        }
        let Some(found) = self.locate(digest)? else {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        };
        let out_of_range = || CacheError::OutOfRange {
            digest: digest_hex(digest),
            offset,
            len: buf.len(),
            size: u64::from(found.len),
        };
        let end = offset.checked_add(buf.len()).ok_or_else(out_of_range)?;
        if end as u64 > u64::from(found.len) {
            return Err(out_of_range());
        }
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        self.copy_out(&found, offset as u64, buf)?;
        Ok(true)
    }

    fn copy_out(&self, found: &Found, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = found.offset + offset;
        if self.inner.opts.mmap
            && let Some(src) = found.seg.mapped(at, buf.len())
        {
            buf.copy_from_slice(src);
            return Ok(());
        }
        found
            .seg
            .file
            .read_exact_at(buf, at)
            .map_err(|e| io_err("read", &self.inner.segs_dir)(e))
    }

    /// The whole chunk, or `None` if not cached.
    pub fn get(&self, digest: &ChunkDigest) -> Result<Option<Vec<u8>>> {
        let Some(found) = self.locate(digest)? else {
            self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        let mut data = vec![0u8; found.len as usize];
        self.copy_out(&found, 0, &mut data)?;
        Ok(Some(data))
    }

    /// Lend the whole cached chunk as mapped memory, for handing it to the kernel without a
    /// copy (e.g. `pwritev` into a ublk request). `Ok(None)` if the chunk is not cached, is
    /// not `len` bytes long, or cannot be mapped. Counts a hit like [`ChunkCache::read_at`].
    ///
    /// Only pass [`LentChunk::kernel_bytes`] to system calls: a page that cannot be read (a
    /// disk error) then fails the call with `EFAULT`, whereas touching it from user space
    /// would raise SIGBUS.
    pub fn lend(&self, digest: &ChunkDigest, len: u64) -> Result<Option<LentChunk>> {
        let Some(found) = self.locate_sized(digest, len)? else {
            return Ok(None);
        };
        if found.seg.mapped(found.offset, found.len as usize).is_none() {
            return Ok(None);
        }
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(LentChunk(found)))
    }

    /// The cached chunk as an open file and the offset of its bytes in it, for reading by fd
    /// (an io_uring read into a ublk request); `Ok(None)` if it is not cached or not `len`
    /// bytes long. Counts a hit like [`ChunkCache::read_at`].
    pub fn open_chunk(&self, digest: &ChunkDigest, len: u64) -> Result<Option<HeldChunk>> {
        let Some(found) = self.locate_sized(digest, len)? else {
            return Ok(None);
        };
        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(HeldChunk(found)))
    }

    /// [`ChunkCache::locate`] of a chunk that must be `len` bytes. Counts misses.
    fn locate_sized(&self, digest: &ChunkDigest, len: u64) -> Result<Option<Found>> {
        match self.locate(digest)? {
            Some(found) if u64::from(found.len) == len => Ok(Some(found)),
            Some(found) => {
                warn!(digest = %digest_hex(digest), size = found.len, want = len, "cached chunk of another length asked for");
                self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            None => {
                self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Whether the chunk is cached (without checking it or counting a hit).
    pub fn contains(&self, digest: &ChunkDigest) -> bool {
        self.inner.lookup(digest, false).is_ok_and(|l| l.is_some())
    }

    /// Finds a chunk, opens its segment, checks it if it was written before this boot, and
    /// refreshes its segment's LRU clock.
    fn locate(&self, digest: &ChunkDigest) -> Result<Option<Found>> {
        let inner = &*self.inner;
        let Some(loc) = inner.lookup(digest, true)? else {
            return Ok(None);
        };
        let Some(seg) = inner.open_seg(loc.seg)? else {
            // Evicted since we loaded it: forget it, so the chunk is fetched and stored anew.
            inner.forget(digest, loc.seg);
            return Ok(None);
        };
        let found = Found {
            seg,
            offset: loc.offset,
            len: loc.len,
        };
        if !loc.checked {
            inner
                .counters
                .verified_on_open
                .fetch_add(1, Ordering::Relaxed);
            let mut data = vec![0u8; loc.len as usize];
            // A record past the end of its file (the index reached the disk, the data did
            // not) reads short: damage like a bad CRC.
            let read = self.copy_out(&found, 0, &mut data);
            if read.is_err() || format::data_crc(&data) != loc.data_crc {
                warn!(digest = %digest_hex(digest), "cache entry from an earlier boot is damaged (power loss?); dropped");
                inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                inner.forget(digest, loc.seg);
                return Ok(None);
            }
            if let Some(l) = inner.index_read().entries.get(digest) {
                l.checked.store(true, Ordering::Relaxed);
            }
        }
        if let Some(path) = &loc.touch {
            inner.touch(path);
        }
        Ok(Some(found))
    }

    /// Store a chunk after checking that `data` hashes to `digest`. A chunk already cached
    /// is left alone.
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
        if inner.lookup(digest, false)?.is_some() {
            return Ok(());
        }
        // Another process may be storing the same chunk: wait for it, then look again.
        let _fill = inner.fills.lock(digest);
        if inner.lookup(digest, false)?.is_some() {
            return Ok(());
        }
        let added = {
            let mut writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            if inner.index_read().entries.contains_key(digest) {
                return Ok(()); // another thread of ours stored it meanwhile
            }
            inner.append(&mut writer, digest, data)?
        };
        drop(_fill);
        inner.counters.inserts.fetch_add(1, Ordering::Relaxed);
        self.note_inserted(added);
        Ok(())
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

    /// Evict to 90 % of the limit unless another thread of this process, or another process
    /// (an eviction, or a gc that may hash the whole cache for minutes), holds the lock: the
    /// insert path never waits for it. The estimate stays over, so the next insert tries
    /// again and counts what the other evictor could not have seen.
    fn auto_evict(&self) -> Result<()> {
        let inner = &*self.inner;
        if inner.evicting.swap(true, Ordering::Acquire) {
            return Ok(());
        }
        let result = (|| {
            let Some(_lock) = DirLock::try_acquire(&inner.lock_path)? else {
                return Ok(());
            };
            let target = inner.opts.limit_bytes / 10 * 9;
            inner.evict_locked(target).map(|_| ())
        })();
        inner.evicting.store(false, Ordering::Release);
        result
    }

    /// Entries and bytes as this process sees them after catching up, disk use from a
    /// listing, and this process's counters.
    pub fn stats(&self) -> Result<CacheStats> {
        let inner = &*self.inner;
        inner.refresh()?;
        let (entries, bytes) = {
            let idx = inner.index_read();
            let bytes = idx.entries.values().map(|l| u64::from(l.len)).sum();
            (idx.entries.len() as u64, bytes)
        };
        let listing = index::list(&inner.segs_dir)?;
        let disk_bytes = listing
            .segs
            .iter()
            .filter_map(|n| fs::metadata(index::seg_path(&inner.segs_dir, n)).ok())
            .map(|m| m.len())
            .sum();
        let c = &inner.counters;
        Ok(CacheStats {
            entries,
            bytes,
            disk_bytes,
            segments: listing.segs.len() as u64,
            limit: inner.opts.limit_bytes,
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            inserts: c.inserts.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            verified_on_open: c.verified_on_open.load(Ordering::Relaxed),
            open_files: inner.open.len() as u64,
        })
    }
}

/// A copy of an index entry's fields.
struct LocView {
    seg: SegId,
    offset: u64,
    len: u32,
    data_crc: u32,
    checked: bool,
    /// The segment's index, when its LRU clock is due a touch (at most once per
    /// `touch_interval` per segment per process).
    touch: Option<PathBuf>,
}

impl Inner {
    /// The entry, read under one index lock; `None` (outer) when segments were added or
    /// removed since this process last caught up. With `now` (a read), also says whether the
    /// entry's segment is due for an LRU touch, claiming it.
    fn view(
        &self,
        digest: &ChunkDigest,
        layout: Option<u64>,
        now: Option<u64>,
    ) -> Option<Option<LocView>> {
        let idx = self.index_read();
        if layout.is_some_and(|l| l != idx.seen.0) {
            return None;
        }
        let Some(l) = idx.entries.get(digest) else {
            return Some(None);
        };
        let touch = now.and_then(|secs| {
            let seg = idx.segs.get(&l.seg).filter(|s| s.sealed)?;
            let last = seg.touched.load(Ordering::Relaxed);
            if last != 0 && secs >= last && secs - last < self.opts.touch_interval.as_secs() {
                return None;
            }
            seg.touched.store(secs.max(1), Ordering::Relaxed);
            Some(index::idx_path(&self.segs_dir, &seg.name))
        });
        Some(Some(LocView {
            seg: l.seg,
            offset: l.offset,
            len: l.len,
            data_crc: l.data_crc,
            checked: l.checked.load(Ordering::Relaxed),
            touch,
        }))
    }

    /// The chunk's place. Catches up with other processes first when segments were added or
    /// removed, and on a miss when anything was published. `read`: the caller reads it now
    /// (its segment's LRU clock may be due, see [`LocView::touch`]).
    fn lookup(&self, digest: &ChunkDigest, read: bool) -> Result<Option<LocView>> {
        let now = read.then(|| {
            self.opts
                .clock
                .now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        let layout = self.shared.layout().load(Ordering::Acquire);
        if let Some(Some(v)) = self.view(digest, Some(layout), now) {
            return Ok(Some(v));
        }
        self.refresh()?;
        Ok(self.view(digest, None, now).flatten())
    }

    /// Drops an entry this process can no longer serve (its segment is gone, or it is damaged)
    /// if it still points into `seg`.
    fn forget(&self, digest: &ChunkDigest, seg: SegId) {
        let mut idx = self.index_write();
        if idx.entries.get(digest).is_some_and(|l| l.seg == seg) {
            idx.entries.remove(digest);
        }
    }

    /// Moves a sealed segment's LRU clock (its index's mtime) to now.
    fn touch(&self, idx_path: &Path) {
        if let Err(e) = set_mtime(idx_path, self.opts.clock.now()) {
            debug!(path = %idx_path.display(), error = %e, "could not refresh cache segment clock");
        }
    }
}

fn set_mtime(path: &Path, t: SystemTime) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(io::Error::other)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: libc::time_t::try_from(d.as_secs()).map_err(io::Error::other)?,
            tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
        },
    ];
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path and two timespecs that outlive the call.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A cache directory in the layout before segments (`chunks/ab/cdef…`, a file per chunk) is
/// emptied, with one message: its chunks are fetched again as needed.
fn discard_old_layout(dir: &Path, lock_path: &Path) -> Result<()> {
    let old = [dir.join("chunks"), dir.join("tmp")];
    if !old.iter().any(|p| p.exists()) {
        return Ok(());
    }
    let _lock = DirLock::acquire(lock_path)?;
    for p in &old {
        match fs::remove_dir_all(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove old cache layout", p)(e)),
        }
    }
    warn!(dir = %dir.display(), "discarded a chunk cache in the old file-per-chunk layout; chunks are fetched again as needed");
    Ok(())
}

/// A cached chunk from [`ChunkCache::open_chunk`]: its segment stays open while this is held
/// (eviction only unlinks the file), and its bytes never change.
pub struct HeldChunk(Found);

impl HeldChunk {
    /// Where the chunk's bytes start in the file.
    pub fn offset(&self) -> u64 {
        self.0.offset
    }
}

impl AsRawFd for HeldChunk {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.seg.file.as_raw_fd()
    }
}

/// A cached chunk lent by [`ChunkCache::lend`]; keeps its mapping alive while held.
pub struct LentChunk(Found);

impl LentChunk {
    /// The chunk's bytes, mapped. Hand them to the kernel only (see [`ChunkCache::lend`]).
    pub fn kernel_bytes(&self) -> &[u8] {
        // `lend` returned this chunk only after its range was mapped; it never goes away.
        self.0
            .seg
            .mapped(self.0.offset, self.0.len as usize)
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.kernel_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes `segments` sealed segments of `per_segment` made-up entries each into the cache
/// at `dir` (sparse files: no chunk bytes behind the entries), to measure how long opening a
/// large cache takes. What it writes must not be read as a cache.
#[doc(hidden)]
pub fn synthesize_sealed_segments(dir: &Path, segments: usize, per_segment: usize) -> Result<()> {
    let segs_dir = dir.join("segments");
    fs::create_dir_all(&segs_dir).map_err(io_err("create directory", &segs_dir))?;
    let boot_id = read_boot_id();
    let mut seed = 0u64;
    for _ in 0..segments {
        let name = writer::fresh_name();
        let mut end = format::SEG_HEADER_LEN;
        let mut entries = Vec::with_capacity(per_segment);
        for _ in 0..per_segment {
            seed += 1;
            let (_, offset) = format::next_record_at(end).unwrap_or_default();
            end = offset + 65_536;
            entries.push(format::IdxEntry {
                digest: sha256(&seed.to_le_bytes()),
                offset,
                len: 65_536,
                data_crc: 0,
            });
        }
        let path = index::seg_path(&segs_dir, &name);
        let file = File::create(&path).map_err(io_err("create", &path))?;
        let header = format::SegHeader {
            boot_id,
            created_ns: 0,
        };
        file.write_all_at(&header.encode(), 0)
            .and_then(|()| file.set_len(end))
            .map_err(io_err("write", &path))?;
        let idx = format::SegIndex {
            boot_id,
            end,
            entries,
        };
        writer::write_index(&segs_dir, &name, &idx, SystemTime::now(), false)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
