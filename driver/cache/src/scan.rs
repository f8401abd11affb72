//! Whole-directory passes: sealing dead writers' segments, LRU eviction, prune, and gc.

use crate::format::{self, SegHeader, SegIndex};
use crate::index::{self, Loaded, idx_path, scan_records, seg_path};
use crate::shared::{DirLock, flock};
use crate::writer::write_index;
use crate::{ChunkCache, ChunkDigest, Inner, Result, io_err, sha256};
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::SystemTime;
use tracing::{debug, info, warn};

/// Why gc removed something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedReason {
    /// Index temp file older than `tmp_max_age`: a crashed sealer.
    StaleTemp,
    /// Not a segment or index file of this cache (or an index whose segment is gone).
    InvalidName,
    /// Content does not hash to the name (truncated, zero-filled, tampered).
    Corrupt,
    /// The end of a dead writer's segment past its last complete record (a kill mid-insert).
    TornTail,
}

impl fmt::Display for RemovedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemovedReason::StaleTemp => "stale temp file",
            RemovedReason::InvalidName => "not a cache entry",
            RemovedReason::Corrupt => "content does not match name",
            RemovedReason::TornTail => "torn tail of a dead writer's segment",
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
            "verified {} entries ({}); removed {} ({}): {} stale temp, {} invalid, {} corrupt, {} torn tails",
            self.verified,
            cora_api::size::format_size(self.verified_bytes),
            self.removed.len(),
            cora_api::size::format_size(self.removed_bytes()),
            self.count(RemovedReason::StaleTemp),
            self.count(RemovedReason::InvalidName),
            self.count(RemovedReason::Corrupt),
            self.count(RemovedReason::TornTail),
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
    /// Segments removed.
    pub segments_evicted: u64,
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

fn remove_quietly(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// An evictable segment: sealed, with its size on disk and its LRU clock.
struct Sealed {
    name: String,
    bytes: u64,
    entries: u64,
    used: SystemTime,
}

impl Inner {
    /// Seals every segment whose writer died (no index, nobody holds its lock): keeps its
    /// records up to the first incomplete one, cuts off the rest, writes its index. Segments
    /// with no complete record are removed. What was cut or removed goes to `removed`.
    /// `thorough` (gc) also reseals segments whose index is unreadable (a power cut); else a
    /// segment with an index file counts as sealed without reading it.
    pub(crate) fn seal_dead(&self, removed: &mut Vec<Removed>, thorough: bool) -> Result<()> {
        let dir = &self.segs_dir;
        let listing = index::list(dir)?;
        let mut changed = false;
        for name in &listing.segs {
            if listing.idxs.contains(name)
                && (!thorough || index::read_index(&idx_path(dir, name)).is_some())
            {
                continue;
            }
            let path = seg_path(dir, name);
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &path)(e)),
            };
            if !flock(&file, libc::LOCK_EX, true, &path)? {
                continue; // its writer is alive
            }
            // Sealed by someone else between our listing and our lock?
            if index::read_index(&idx_path(dir, name)).is_some() {
                continue;
            }
            let meta = file.metadata().map_err(io_err("stat", &path))?;
            let len = meta.len();
            let mut head = [0u8; format::SEG_HEADER_LEN as usize];
            let header = file
                .read_exact_at(&mut head, 0)
                .ok()
                .and_then(|()| SegHeader::decode(&head));
            let (entries, end) = match header {
                Some(_) => scan_records(&file, format::SEG_HEADER_LEN, len)
                    .map_err(io_err("read", &path))?,
                None => (Vec::new(), 0),
            };
            changed = true;
            let Some(header) = header.filter(|_| !entries.is_empty()) else {
                warn!(path = %path.display(), "cache segment of a dead writer holds no complete record; removed");
                if remove_quietly(&path)? {
                    removed.push(Removed {
                        path,
                        reason: RemovedReason::TornTail,
                        bytes: len,
                    });
                }
                continue;
            };
            if end < len {
                warn!(path = %path.display(), bytes = len - end, "torn tail of a dead writer's cache segment cut off");
                file.set_len(end).map_err(io_err("truncate", &path))?;
                removed.push(Removed {
                    path: path.clone(),
                    reason: RemovedReason::TornTail,
                    bytes: len - end,
                });
            }
            let idx = SegIndex {
                boot_id: header.boot_id,
                end,
                entries,
            };
            write_index(dir, name, &idx, self.opts.clock.now(), self.opts.sync_data)?;
            debug!(segment = %name, entries = idx.entries.len(), "sealed a dead writer's cache segment");
        }
        if changed {
            self.shared.bump_layout();
        }
        Ok(())
    }

    fn sealed_segments(&self) -> Result<(Vec<Sealed>, u64)> {
        let dir = &self.segs_dir;
        let listing = index::list(dir)?;
        let mut sealed = Vec::new();
        let mut total = 0;
        for name in &listing.segs {
            let Ok(seg) = fs::metadata(seg_path(dir, name)) else {
                continue; // removed while we looked
            };
            let idx = listing
                .idxs
                .contains(name)
                .then(|| fs::metadata(idx_path(dir, name)).ok())
                .flatten();
            let idx_len = idx.as_ref().map_or(0, |m| m.len());
            total += seg.len() + idx_len;
            if let Some(idx) = idx {
                sealed.push(Sealed {
                    name: name.clone(),
                    bytes: seg.len() + idx_len,
                    // The index holds a 64-byte header, 48 bytes per entry and a CRC.
                    entries: idx_len.saturating_sub(68) / 48,
                    used: idx.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        Ok((sealed, total))
    }

    /// Eviction proper; the caller holds the directory lock.
    pub(crate) fn evict_locked(&self, target: u64) -> Result<PruneReport> {
        self.seal_dead(&mut Vec::new(), false)?;
        self.refresh()?;
        let entries_before = self.index_read().entries.len() as u64;
        let (mut sealed, bytes_before) = self.sealed_segments()?;
        let mut report = PruneReport {
            target,
            entries_before,
            bytes_before,
            bytes_after: bytes_before,
            ..PruneReport::default()
        };
        let mut remaining = bytes_before;
        for pass in 0..2 {
            if remaining <= target {
                break;
            }
            if pass == 1 {
                // Still over: this process's own open segment is the last thing it can give
                // up (other writers' are theirs). Sealed, it goes like any other.
                let own = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
                let Some(own) = own else {
                    break;
                };
                self.seal(own)?;
                sealed = self.sealed_segments()?.0;
            }
            // Oldest first; the name breaks ties so the order is deterministic.
            sealed.sort_unstable_by(|a, b| a.used.cmp(&b.used).then(a.name.cmp(&b.name)));
            for s in &sealed {
                if remaining <= target {
                    break;
                }
                // The segment first: that frees the space; an index left alone is gc's.
                let seg = seg_path(&self.segs_dir, &s.name);
                match remove_quietly(&seg) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Removed by someone else meanwhile: gone all the same.
                        remaining = remaining.saturating_sub(s.bytes);
                        continue;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot evict cache segment");
                        continue;
                    }
                }
                remove_quietly(&idx_path(&self.segs_dir, &s.name))?;
                report.segments_evicted += 1;
                report.evicted += s.entries;
                report.evicted_bytes += s.bytes;
                remaining = remaining.saturating_sub(s.bytes);
            }
        }
        report.bytes_after = remaining;
        if report.segments_evicted > 0 {
            self.shared.bump_layout();
            // Drop our entries and close our fds on the removed files now.
            self.refresh()?;
            self.counters
                .evictions
                .fetch_add(report.evicted, Ordering::Relaxed);
            info!(
                segments = report.segments_evicted,
                evicted = report.evicted,
                bytes = report.evicted_bytes,
                remaining,
                target,
                "cache eviction"
            );
        }
        let mut est = self.estimate.lock().unwrap_or_else(|p| p.into_inner());
        est.scanned = Some(report.bytes_after);
        est.inserted_since_scan = 0;
        Ok(report)
    }
}

impl ChunkCache {
    /// Evict least recently used segments (oldest first) until at most `target_bytes`
    /// remain. Takes the cache-wide lock, waiting for a running eviction or gc.
    pub fn prune(&self, target_bytes: u64) -> Result<PruneReport> {
        let _lock = DirLock::acquire(&self.inner.lock_path)?;
        self.inner.evict_locked(target_bytes)
    }

    /// Seal dead writers' segments, remove stale index temp files and anything in
    /// `segments/` that is not a segment or index, and check every entry's sha256 (reads
    /// the whole cache). A segment with bad entries gets a new name and an index without
    /// them, so every process drops its view of the old one.
    pub fn gc(&self) -> Result<GcReport> {
        let inner = &*self.inner;
        let _lock = DirLock::acquire(&inner.lock_path)?;
        let mut report = GcReport::default();
        inner.seal_dead(&mut report.removed, true)?;
        let dir = &inner.segs_dir;
        let now = inner.opts.clock.now();
        let listing = index::list(dir)?;
        for path in &listing.strays {
            let Ok(meta) = fs::symlink_metadata(path) else {
                continue;
            };
            let is_temp = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.contains(".idx.tmp."));
            let reason = if is_temp {
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                // Future mtimes (clock skew) count as young: never delete a live sealer's.
                let old = now
                    .duration_since(mtime)
                    .is_ok_and(|age| age >= inner.opts.tmp_max_age);
                if !old {
                    continue;
                }
                RemovedReason::StaleTemp
            } else {
                RemovedReason::InvalidName
            };
            let bytes = if meta.is_file() { meta.len() } else { 0 };
            match remove_any(path, meta.is_dir()) {
                Ok(()) => report.removed.push(Removed {
                    path: path.clone(),
                    reason,
                    bytes,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", path)(e)),
            }
        }
        for name in listing.idxs.difference(&listing.segs) {
            let path = idx_path(dir, name);
            let bytes = fs::metadata(&path).map_or(0, |m| m.len());
            if remove_quietly(&path)? {
                report.removed.push(Removed {
                    path,
                    reason: RemovedReason::InvalidName,
                    bytes,
                });
            }
        }
        let listing = index::list(dir)?;
        let mut names: Vec<&String> = listing.segs.iter().collect();
        names.sort();
        for name in names {
            self.gc_segment(name, &mut report, true)?;
        }
        debug!(
            verified = report.verified,
            removed = report.removed.len(),
            "gc done"
        );
        Ok(report)
    }

    /// Check every entry's sha256 (reads the whole cache) and report bad ones in `removed`
    /// without changing anything: what `gc` would drop.
    pub fn verify(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        let listing = index::list(&self.inner.segs_dir)?;
        let mut names: Vec<&String> = listing.segs.iter().collect();
        names.sort();
        for name in names {
            self.gc_segment(name, &mut report, false)?;
        }
        Ok(report)
    }

    /// Checks one segment's entries; with `repair`, rewrites a sealed one without its bad
    /// entries and drops them from this process's view.
    fn gc_segment(&self, name: &str, report: &mut GcReport, repair: bool) -> Result<()> {
        let inner = &*self.inner;
        let dir = &inner.segs_dir;
        let path = seg_path(dir, name);
        let (sealed, idx) = match index::load(dir, name, true).map_err(io_err("read", &path))? {
            Loaded::Sealed(idx) => (true, idx),
            Loaded::Open {
                header,
                entries,
                end,
            } => (
                false,
                SegIndex {
                    boot_id: header.boot_id,
                    end,
                    entries,
                },
            ),
            Loaded::Unreadable => return Ok(()), // a segment being created
        };
        let file = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let mut bad: Vec<ChunkDigest> = Vec::new();
        let mut buf = Vec::new();
        for e in &idx.entries {
            buf.resize(e.len as usize, 0);
            let ok = file.read_exact_at(&mut buf, e.offset).is_ok() && sha256(&buf) == e.digest;
            if ok {
                report.verified += 1;
                report.verified_bytes += u64::from(e.len);
            } else {
                warn!(segment = %name, digest = %crate::digest_hex(&e.digest), "gc: corrupt cache entry");
                bad.push(e.digest);
                report.removed.push(Removed {
                    path: path.clone(),
                    reason: RemovedReason::Corrupt,
                    bytes: u64::from(e.len),
                });
            }
        }
        if bad.is_empty() || !repair {
            return Ok(());
        }
        for d in &bad {
            let mut index = inner.index_write();
            if index.entries.remove(d).is_some() {
                drop(index);
                inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !sealed {
            return Ok(()); // its writer is alive: the bad bytes stay until it is sealed
        }
        // A new name for the good entries: processes that loaded the old index drop it.
        let used = fs::metadata(idx_path(dir, name))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let new_name = crate::writer::fresh_name();
        let new_seg = seg_path(dir, &new_name);
        let good = SegIndex {
            entries: idx
                .entries
                .into_iter()
                .filter(|e| !bad.contains(&e.digest))
                .collect(),
            ..idx
        };
        if !good.entries.is_empty() {
            // The index first: a segment without one looks like a dead writer's to a process
            // opening the cache meanwhile, which would reseal it with every entry.
            write_index(dir, &new_name, &good, used, inner.opts.sync_data)?;
            fs::hard_link(&path, &new_seg).map_err(io_err("link", &new_seg))?;
        }
        remove_quietly(&path)?;
        remove_quietly(&idx_path(dir, name))?;
        inner.shared.bump_layout();
        Ok(())
    }
}

/// Whether `path` still names the inode `meta` describes.
pub(crate) fn same_file(path: &PathBuf, meta: &fs::Metadata) -> bool {
    fs::metadata(path).is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev())
}
