//! Segment files this process holds open for reading: a small LRU, so a process keeps a
//! bounded number of descriptors however many chunks the cache holds.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

pub type SegId = u32;

/// An open segment. Its records never change once published (segments are appended to and
/// unlinked, never rewritten), so any published range can be read through it for as long as
/// it is held, even after an evictor unlinked the file.
pub struct OpenSeg {
    pub file: File,
    /// The file's length as last seen: a mapped range past it would fault (SIGBUS), so
    /// `mapped` checks against it, and looks again (fstat) before refusing.
    len: AtomicU64,
    /// Mapped on first use in mmap mode or when lending; `map_len` covers the appends a
    /// live writer may still make, so a mapping is made once per segment.
    map: OnceLock<Option<Mapping>>,
    map_len: u64,
}

impl OpenSeg {
    pub fn new(file: File, len: u64, map_len: u64) -> OpenSeg {
        OpenSeg {
            file,
            len: AtomicU64::new(len),
            map: OnceLock::new(),
            map_len,
        }
    }

    /// `offset..offset + len` of the segment as mapped memory; `None` where it cannot be
    /// mapped or lies past the mapping (a record appended after a long writer's segment
    /// outgrew it): callers fall back to `pread`.
    pub fn mapped(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len as u64)?;
        if end > self.len.load(Ordering::Relaxed) {
            let now = self.file.metadata().ok()?.len();
            self.len.fetch_max(now, Ordering::Relaxed);
            if end > now {
                return None;
            }
        }
        let map = self
            .map
            .get_or_init(|| {
                Mapping::new(&self.file, self.map_len)
                    .inspect_err(|e| tracing::debug!(error = %e, "mmap of cache segment failed"))
                    .ok()
            })
            .as_ref()?;
        let start = usize::try_from(offset).ok()?;
        map.bytes().get(start..start.checked_add(len)?)
    }
}

/// A read-only shared mapping. Mapping past the end of the file is allowed; only published
/// records (which lie inside the file) are ever touched.
struct Mapping {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only for its whole life and only read through `bytes()`.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: u64) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        if len == 0 {
            return Err(std::io::Error::other("empty mapping"));
        }
        // SAFETY: a fresh read-only shared mapping of an open regular file; the kernel picks
        // the address, and failure is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr)
            .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live PROT_READ mapping of `len` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mmap returned; no borrows outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// Digests are uniformly distributed already: maps keyed by them need no real hashing.
#[derive(Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // A digest hashes as a constant length prefix and its 32 bytes; two words suffice.
        for chunk in bytes.chunks(8).take(2) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 ^= u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<PassThroughHasher>>;

/// Bounded LRU of open segments. Lookups share a read lock and stamp an atomic tick; only
/// opening a segment takes the write lock.
pub struct OpenSegs {
    open: RwLock<FastMap<SegId, (Arc<OpenSeg>, AtomicU64)>>,
    tick: AtomicU64,
    cap: usize,
}

impl OpenSegs {
    pub fn new(cap: usize) -> OpenSegs {
        OpenSegs {
            open: RwLock::default(),
            tick: AtomicU64::new(0),
            cap: cap.max(1),
        }
    }

    pub fn get(&self, id: SegId) -> Option<Arc<OpenSeg>> {
        let open = self.open.read().unwrap_or_else(|p| p.into_inner());
        let (seg, used) = open.get(&id)?;
        used.store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Some(seg.clone())
    }

    /// Keeps `seg` open, closing the least recently used one past the bound (a reader still
    /// holding it keeps it alive until done).
    pub fn put(&self, id: SegId, seg: Arc<OpenSeg>) {
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        open.insert(id, (seg, AtomicU64::new(tick)));
        if open.len() > self.cap
            && let Some(oldest) = open
                .iter()
                .min_by_key(|(_, (_, t))| t.load(Ordering::Relaxed))
                .map(|(k, _)| *k)
        {
            open.remove(&oldest);
        }
    }

    pub fn remove(&self, id: SegId) {
        self.open
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    pub fn len(&self) -> usize {
        self.open.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}
