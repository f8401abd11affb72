//! Directory scans: listing entries, LRU eviction, prune and the gc/verify pass.

use super::{ChunkCache, ChunkDigest, Result, io_err, verify_file};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tracing::{debug, info, warn};

/// An exclusive flock on `DIR/lock`, released on drop (closing the fd releases it).
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    fn open(path: &Path) -> Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err("open lock file", path))
    }

    /// Takes the lock, waiting for its holder.
    pub fn acquire(path: &Path) -> Result<DirLock> {
        let file = Self::open(path)?;
        loop {
            // SAFETY: flock on an fd we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(DirLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("flock", path)(e));
            }
        }
    }
}

/// One entry under `chunks/` with a valid name.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub digest: ChunkDigest,
    pub path: PathBuf,
    pub size: u64,
    pub mtime: SystemTime,
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn parse_entry_name(fanout: &str, name: &str) -> Option<ChunkDigest> {
    if fanout.len() != 2 || name.len() != 62 || !is_lower_hex(fanout) || !is_lower_hex(name) {
        return None;
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(format!("{fanout}{name}"), &mut digest).ok()?;
    Some(digest)
}

/// Something under `chunks/` that is not a valid entry.
struct Stray {
    path: PathBuf,
    is_dir: bool,
    size: u64,
}

/// Walk `chunks/`: valid entries, plus strays (bad names, non-files). Entries that vanish
/// mid-walk (concurrent eviction) are skipped.
fn walk(chunks: &Path) -> Result<(Vec<Entry>, Vec<Stray>)> {
    let mut entries = Vec::new();
    let mut strays = Vec::new();
    let top = match fs::read_dir(chunks) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((entries, strays)),
        Err(e) => return Err(io_err("list", chunks)(e)),
    };
    for fan in top {
        let fan = fan.map_err(io_err("list", chunks))?;
        let fan_path = fan.path();
        let Ok(fan_type) = fan.file_type() else {
            continue;
        };
        let fan_name = fan.file_name();
        let fan_name = fan_name.to_str().unwrap_or("");
        if !fan_type.is_dir() || fan_name.len() != 2 || !is_lower_hex(fan_name) {
            let size = fan.metadata().map_or(0, |m| m.len());
            strays.push(Stray {
                path: fan_path,
                is_dir: fan_type.is_dir(),
                size,
            });
            continue;
        }
        let list = match fs::read_dir(&fan_path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("list", &fan_path)(e)),
        };
        for item in list {
            let item = item.map_err(io_err("list", &fan_path))?;
            let path = item.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue; // evicted while we looked
            };
            let name = item.file_name();
            let digest = name.to_str().and_then(|n| parse_entry_name(fan_name, n));
            match digest {
                Some(digest) if meta.is_file() => entries.push(Entry {
                    digest,
                    path,
                    size: meta.len(),
                    mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                _ => strays.push(Stray {
                    path,
                    is_dir: meta.is_dir(),
                    size: if meta.is_file() { meta.len() } else { 0 },
                }),
            }
        }
    }
    Ok((entries, strays))
}

pub(crate) fn list_entries(chunks: &Path) -> Result<Vec<Entry>> {
    Ok(walk(chunks)?.0)
}

/// Why gc removed something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedReason {
    /// Temp file older than `tmp_max_age`: a crashed or abandoned insert.
    StaleTemp,
    /// Name is not `ab/<62 hex>` or the entry is not a regular file.
    InvalidName,
    /// Content does not hash to the name (truncated, zero-filled, tampered).
    Corrupt,
}

impl fmt::Display for RemovedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovedReason::StaleTemp => "stale temp file",
            RemovedReason::InvalidName => "not a cache entry",
            RemovedReason::Corrupt => "content does not match name",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub path: PathBuf,
    pub reason: RemovedReason,
    pub bytes: u64,
}

/// What [`ChunkCache::gc`] checked and removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries whose content was hashed and found correct.
    pub verified: u64,
    pub verified_bytes: u64,
    pub removed: Vec<Removed>,
}

impl GcReport {
    pub fn removed_bytes(&self) -> u64 {
        self.removed.iter().map(|r| r.bytes).sum()
    }
    pub fn count(&self, reason: RemovedReason) -> usize {
        self.removed.iter().filter(|r| r.reason == reason).count()
    }
}

impl fmt::Display for GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "verified {} entries ({}); removed {} ({}): {} stale temp, {} invalid, {} corrupt",
            self.verified,
            cora_api::size::format_size(self.verified_bytes),
            self.removed.len(),
            cora_api::size::format_size(self.removed_bytes()),
            self.count(RemovedReason::StaleTemp),
            self.count(RemovedReason::InvalidName),
            self.count(RemovedReason::Corrupt),
        )?;
        for r in &self.removed {
            writeln!(
                f,
                "  removed {} ({}, {} bytes)",
                r.path.display(),
                r.reason,
                r.bytes
            )?;
        }
        Ok(())
    }
}

/// What [`ChunkCache::prune`] evicted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub target: u64,
    pub entries_before: u64,
    pub bytes_before: u64,
    pub evicted: u64,
    pub evicted_bytes: u64,
    pub bytes_after: u64,
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use cora_api::size::format_size;
        write!(
            f,
            "pruned to {}: evicted {} of {} entries ({}); {} -> {}",
            format_size(self.target),
            self.evicted,
            self.entries_before,
            format_size(self.evicted_bytes),
            format_size(self.bytes_before),
            format_size(self.bytes_after),
        )
    }
}

fn remove_any(path: &Path, is_dir: bool) -> io::Result<()> {
    if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

impl ChunkCache {
    /// Evict least recently used entries (oldest mtime first) until at most `target_bytes`
    /// remain. Takes the cache-wide lock, waiting for a running eviction or gc.
    pub fn prune(&self, target_bytes: u64) -> Result<PruneReport> {
        let _lock = DirLock::acquire(&self.inner.lock_path)?;
        self.evict_locked(target_bytes)
    }

    /// Eviction proper; the caller holds the directory lock.
    pub(crate) fn evict_locked(&self, target: u64) -> Result<PruneReport> {
        let inner = &*self.inner;
        let mut entries = list_entries(&inner.chunks)?;
        let bytes_before: u64 = entries.iter().map(|e| e.size).sum();
        let mut report = PruneReport {
            target,
            entries_before: entries.len() as u64,
            bytes_before,
            bytes_after: bytes_before,
            ..PruneReport::default()
        };
        if bytes_before > target {
            // Oldest first; the digest breaks ties so the order is deterministic.
            entries.sort_unstable_by(|a, b| a.mtime.cmp(&b.mtime).then(a.digest.cmp(&b.digest)));
            let mut remaining = bytes_before;
            for e in &entries {
                if remaining <= target {
                    break;
                }
                match fs::remove_file(&e.path) {
                    Ok(()) => {
                        report.evicted += 1;
                        report.evicted_bytes += e.size;
                    }
                    // Removed by someone else (gc, an evictor without our lock): gone anyway.
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => {
                        warn!(path = %e.path.display(), error = %err, "cannot evict cache entry");
                        continue;
                    }
                }
                remaining -= e.size;
                // Our fd would keep the deleted file's space allocated.
                inner.fds.remove(&e.digest);
            }
            report.bytes_after = remaining;
            inner
                .counters
                .evictions
                .fetch_add(report.evicted, Ordering::Relaxed);
            info!(
                evicted = report.evicted,
                bytes = report.evicted_bytes,
                remaining,
                target,
                "cache eviction"
            );
        }
        let mut est = inner.estimate.lock().unwrap_or_else(|p| p.into_inner());
        est.scanned = Some(report.bytes_after);
        est.inserted_since_scan = 0;
        Ok(report)
    }

    /// Remove stale temp files, anything under `chunks/` that is not a validly named regular
    /// file, and every entry whose content does not hash to its name (reads all entries).
    pub fn gc(&self) -> Result<GcReport> {
        let inner = &*self.inner;
        let _lock = DirLock::acquire(&inner.lock_path)?;
        let mut report = GcReport::default();
        let now = inner.opts.clock.now();

        match fs::read_dir(&inner.tmp) {
            Ok(list) => {
                for item in list {
                    let item = item.map_err(io_err("list", &inner.tmp))?;
                    let path = item.path();
                    let Ok(meta) = fs::symlink_metadata(&path) else {
                        continue; // renamed into place meanwhile
                    };
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    // Future mtimes (clock skew) count as young: never delete a live insert.
                    let old = now
                        .duration_since(mtime)
                        .is_ok_and(|age| age >= inner.opts.tmp_max_age);
                    if !old {
                        continue;
                    }
                    let bytes = if meta.is_file() { meta.len() } else { 0 };
                    match remove_any(&path, meta.is_dir()) {
                        Ok(()) => report.removed.push(Removed {
                            path,
                            reason: RemovedReason::StaleTemp,
                            bytes,
                        }),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err("remove", &path)(e)),
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("list", &inner.tmp)(e)),
        }

        let (entries, strays) = walk(&inner.chunks)?;
        for s in strays {
            match remove_any(&s.path, s.is_dir) {
                Ok(()) => report.removed.push(Removed {
                    path: s.path,
                    reason: RemovedReason::InvalidName,
                    bytes: s.size,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &s.path)(e)),
            }
        }

        for e in entries {
            let file = match File::open(&e.path) {
                Ok(f) => f,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err("open", &e.path)(err)),
            };
            let meta = file.metadata().map_err(io_err("stat", &e.path))?;
            if verify_file(&file, &e.digest, &e.path)? {
                report.verified += 1;
                report.verified_bytes += meta.len();
                continue;
            }
            warn!(path = %e.path.display(), "gc: corrupt cache entry");
            inner.fds.remove(&e.digest);
            if super::remove_if_same_inode(&e.path, &meta) {
                report.removed.push(Removed {
                    path: e.path,
                    reason: RemovedReason::Corrupt,
                    bytes: meta.len(),
                });
            }
        }
        debug!(
            digests = report.verified,
            removed = report.removed.len(),
            "gc done"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest_hex;

    #[test]
    fn entry_names_are_strict() {
        let d = [0xabu8; 32];
        let hex = digest_hex(&d);
        assert_eq!(parse_entry_name(&hex[..2], &hex[2..]), Some(d));
        assert_eq!(parse_entry_name("AB", &hex[2..]), None);
        assert_eq!(parse_entry_name(&hex[..2], &hex[2..].to_uppercase()), None);
        assert_eq!(parse_entry_name(&hex[..2], &hex[3..]), None);
        assert_eq!(
            parse_entry_name(&hex[..2], &format!("{}.tmp", &hex[2..])),
            None
        );
        assert_eq!(parse_entry_name("zz", &hex[2..]), None);
    }
}
