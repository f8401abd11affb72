//! Bounded, sharded LRU of open chunk files, so warm reads cost one `pread` and no `open`.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::SystemTime;

/// Shards keep lock hold times short when many ublk queue threads read at once.
const SHARDS: usize = 16;

/// An open, immutable chunk file. Its bytes never change while the fd is open: entries are
/// created by rename and removed by unlink, never rewritten in place.
#[derive(Debug)]
pub(crate) struct OpenChunk {
    pub file: File,
    pub size: u64,
    /// Present in mmap mode: reads become a memcpy instead of a `pread` syscall.
    pub map: Option<Mapping>,
    /// Mapping made on first [`OpenChunk::lend`] (whatever the mmap mode): its bytes are only
    /// handed to the kernel, never read by us, so a bad page is EFAULT rather than SIGBUS.
    lent: OnceLock<Option<Mapping>>,
}

impl OpenChunk {
    /// Wrap an open entry, mapping it when asked; a failed mmap falls back to `pread`.
    pub fn new(file: File, size: u64, mmap: bool) -> Self {
        let map = if mmap && size > 0 {
            match Mapping::new(&file, size) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::debug!(error = %e, "mmap of cache entry failed; using pread");
                    None
                }
            }
        } else {
            None
        };
        OpenChunk {
            file,
            size,
            map,
            lent: OnceLock::new(),
        }
    }

    /// The whole entry as mapped memory, mapping it on first use; `None` if it cannot be
    /// mapped (empty, or mmap failed: callers fall back to copying reads).
    pub fn lend(&self) -> Option<&[u8]> {
        if let Some(map) = &self.map {
            return Some(map.bytes());
        }
        self.lent
            .get_or_init(|| {
                if self.size == 0 {
                    return None;
                }
                Mapping::new_populated(&self.file, self.size)
                    .inspect_err(|e| tracing::debug!(error = %e, "mmap of cache entry failed"))
                    .ok()
            })
            .as_ref()
            .map(Mapping::bytes)
    }

    /// Copy `buf.len()` bytes at `offset`; the caller has checked the range against `size`.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match &self.map {
            Some(map) => {
                let start = usize::try_from(offset).map_err(std::io::Error::other)?;
                let src = map
                    .bytes()
                    .get(start..start + buf.len())
                    .ok_or_else(|| std::io::Error::other("read past the end of the mapping"))?;
                buf.copy_from_slice(src);
                Ok(())
            }
            None => self.file.read_exact_at(buf, offset),
        }
    }
}

/// A read-only shared mapping of a whole entry.
///
/// Safe to read as long as nobody truncates the file in place: this cache only ever creates
/// entries by rename and removes them by unlink, which leaves the mapped inode intact. A
/// truncation behind our back (or an I/O error on the backing disk) raises SIGBUS instead of
/// an error, which is why mmap mode is opt-in.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: std::ptr::NonNull<libc::c_void>,
    len: usize,
}

// SAFETY: the mapping is read-only for its whole life and only read through `bytes()`.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, size: u64) -> std::io::Result<Self> {
        Self::map(file, size, 0)
    }

    /// Pages faulted in now, so lending them later costs no page faults.
    fn new_populated(file: &File, size: u64) -> std::io::Result<Self> {
        Self::map(file, size, libc::MAP_POPULATE)
    }

    fn map(file: &File, size: u64, extra_flags: libc::c_int) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(size).map_err(std::io::Error::other)?;
        // SAFETY: a fresh read-only shared mapping of `len` bytes of an open regular file;
        // the kernel picks the address, and failure is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | extra_flags,
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

/// The digest is already uniformly distributed, so the map needs no real hashing.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u8; 32]);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[8..16]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

#[derive(Default)]
struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached through `write_u64` from `Key::hash`; fold anything else in anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Slot {
    chunk: Arc<OpenChunk>,
    last_used: u64,
    /// Last time this process set the file's mtime (the cross-process LRU clock).
    touched: SystemTime,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Key, Slot, BuildHasherDefault<PassThroughHasher>>,
    tick: u64,
}

pub(crate) struct FdCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

/// What a lookup found, and whether the caller should refresh the file's mtime.
pub(crate) struct Hit {
    pub chunk: Arc<OpenChunk>,
    pub touch: bool,
}

impl FdCache {
    pub fn new(capacity: usize) -> Self {
        FdCache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> MutexGuard<'_, Shard> {
        let shard = &self.shards[usize::from(digest[0]) % SHARDS];
        // A panic while holding the lock cannot leave the map inconsistent (every mutation is
        // a single insert/remove), so a poisoned lock is still usable.
        shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Look up an open chunk; `touch` is set when its mtime is older than `touch_interval`
    /// by this process's account, and the slot then records `now` as the new touch time.
    pub fn get(
        &self,
        digest: &[u8; 32],
        now: SystemTime,
        touch_interval: std::time::Duration,
    ) -> Option<Hit> {
        let mut shard = self.shard(digest);
        shard.tick += 1;
        let tick = shard.tick;
        let slot = shard.map.get_mut(&Key(*digest))?;
        slot.last_used = tick;
        let due = now
            .duration_since(slot.touched)
            .is_ok_and(|age| age >= touch_interval);
        if due {
            slot.touched = now;
        }
        Some(Hit {
            chunk: Arc::clone(&slot.chunk),
            touch: due,
        })
    }

    /// Remember an open chunk, evicting the least recently used one of its shard when full.
    /// If another thread raced us and already stored one, that one is kept and returned.
    pub fn put(
        &self,
        digest: &[u8; 32],
        chunk: Arc<OpenChunk>,
        touched: SystemTime,
    ) -> Arc<OpenChunk> {
        if self.per_shard == 0 {
            return chunk;
        }
        let mut shard = self.shard(digest);
        shard.tick += 1;
        let tick = shard.tick;
        if let Some(slot) = shard.map.get_mut(&Key(*digest)) {
            slot.last_used = tick;
            return Arc::clone(&slot.chunk);
        }
        if shard.map.len() >= self.per_shard {
            let oldest = shard
                .map
                .iter()
                .min_by_key(|(_, slot)| slot.last_used)
                .map(|(key, _)| *key);
            if let Some(key) = oldest {
                shard.map.remove(&key);
            }
        }
        shard.map.insert(
            Key(*digest),
            Slot {
                chunk: Arc::clone(&chunk),
                last_used: tick,
                touched,
            },
        );
        chunk
    }

    pub fn remove(&self, digest: &[u8; 32]) {
        self.shard(digest).map.remove(&Key(*digest));
    }

    pub fn contains(&self, digest: &[u8; 32]) -> bool {
        self.shard(digest).map.contains_key(&Key(*digest))
    }

    #[cfg(test)]
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|p| p.into_inner()).map.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chunk() -> Arc<OpenChunk> {
        let file = tempfile::tempfile().expect("tempfile");
        Arc::new(OpenChunk::new(file, 0, false))
    }

    #[test]
    fn evicts_least_recently_used_within_a_shard() {
        // Capacity 16 over 16 shards: one slot per shard; same first byte = same shard.
        let cache = FdCache::new(SHARDS);
        let now = SystemTime::UNIX_EPOCH;
        let a = [1u8; 32];
        let mut b = [1u8; 32];
        b[8] = 2;
        cache.put(&a, chunk(), now);
        cache.put(&b, chunk(), now);
        assert!(!cache.contains(&a));
        assert!(cache.contains(&b));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn touch_is_due_only_after_interval() {
        let cache = FdCache::new(64);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let d = [7u8; 32];
        cache.put(&d, chunk(), t0);
        let interval = Duration::from_secs(60);
        let hit = cache.get(&d, t0 + Duration::from_secs(59), interval);
        assert!(!hit.expect("present").touch);
        let hit = cache.get(&d, t0 + Duration::from_secs(60), interval);
        assert!(hit.expect("present").touch);
        // The slot now records the new touch time.
        let hit = cache.get(&d, t0 + Duration::from_secs(61), interval);
        assert!(!hit.expect("present").touch);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let cache = FdCache::new(0);
        cache.put(&[3u8; 32], chunk(), SystemTime::UNIX_EPOCH);
        assert_eq!(cache.len(), 0);
    }
}
