//! This process's appends: one open segment at a time, flock-ed while it is written to, sealed
//! (index file written, lock dropped) when full or when the process lets go of the cache.

use crate::format::{self, IdxEntry, RecHeader, SegHeader, SegIndex};
use crate::index::{Seg, idx_path, seg_path};
use crate::openseg::SegId;
use crate::shared::flock;
use crate::{ChunkDigest, Inner, Result, io_err};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub(crate) struct Writer {
    id: SegId,
    name: String,
    path: PathBuf,
    /// Holds the segment's flock: while it is open, nobody else seals or scans it as dead.
    file: File,
    pos: u64,
    entries: Vec<IdxEntry>,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A new segment name: `<ns>-<pid>-<seq>`, unique among live processes (and
/// `create_new` makes a clash harmless).
pub(crate) fn fresh_name() -> String {
    format!(
        "{:016x}-{:08x}-{:08x}",
        now_ns(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff
    )
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Writes `idx` beside its segment: a temp file renamed into place, so a reader sees the old
/// index or the new one, never part of one. `mtime` (the LRU clock) is stamped before the
/// rename.
pub(crate) fn write_index(
    dir: &Path,
    name: &str,
    idx: &SegIndex,
    mtime: SystemTime,
    sync: bool,
) -> Result<()> {
    let tmp = dir.join(format!(
        "{name}.idx.tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all_at(&idx.encode(), 0)
            .map_err(io_err("write", &tmp))?;
        file.set_modified(mtime)
            .map_err(io_err("set mtime of", &tmp))?;
        if sync {
            file.sync_data().map_err(io_err("fdatasync", &tmp))?;
        }
        let dest = idx_path(dir, name);
        fs::rename(&tmp, &dest).map_err(io_err("rename into place", &dest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

impl Inner {
    /// Appends one verified chunk to this process's segment and publishes it. The caller holds
    /// the writer mutex and has checked the chunk is not cached yet.
    pub(crate) fn append(
        &self,
        writer: &mut Option<Writer>,
        digest: &ChunkDigest,
        data: &[u8],
    ) -> Result<u64> {
        let inner = self;
        let len = u32::try_from(data.len()).map_err(|_| crate::CacheError::OutOfRange {
            digest: crate::digest_hex(digest),
            offset: 0,
            len: data.len(),
            size: u64::from(u32::MAX),
        })?;
        if writer.is_none() {
            *writer = Some(self.new_segment()?);
        }
        let Some(w) = writer.as_mut() else {
            unreachable!("writer was just set");
        };
        let overflow = || io_err("append to", &w.path)(io::Error::other("segment offset overflow"));
        let (at, offset) = format::next_record_at(w.pos).ok_or_else(overflow)?;
        let end = offset.checked_add(u64::from(len)).ok_or_else(overflow)?;
        let rec = RecHeader {
            len,
            digest: *digest,
            data_crc: format::data_crc(data),
        };
        // Data first, header after: a header that checks out always names complete bytes.
        w.file
            .write_all_at(data, offset)
            .map_err(io_err("write", &w.path))?;
        if inner.opts.sync_data {
            w.file.sync_data().map_err(io_err("fdatasync", &w.path))?;
        }
        w.file
            .write_all_at(&rec.encode(), at)
            .map_err(io_err("write", &w.path))?;
        let added = end - w.pos;
        w.pos = end;
        let entry = IdxEntry {
            digest: *digest,
            offset,
            len,
            data_crc: rec.data_crc,
        };
        w.entries.push(entry);
        {
            let mut idx = inner.index_write();
            idx.add_entries(w.id, &[entry], true);
            if let Some(seg) = idx.segs.get_mut(&w.id) {
                seg.scanned_to = end;
            }
        }
        inner.shared.published().fetch_add(1, Ordering::AcqRel);
        if w.pos >= inner.segment_bytes {
            let full = writer.take();
            if let Some(full) = full {
                self.seal(full)?;
            }
        }
        Ok(added)
    }

    fn new_segment(&self) -> Result<Writer> {
        let inner = self;
        let dir = &inner.segs_dir;
        loop {
            let name = fresh_name();
            let path = seg_path(dir, &name);
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create", &path)(e)),
            };
            // A sealer that found the empty file first has taken it for a dead writer's (and
            // removes it): take another name.
            if !flock(&file, libc::LOCK_EX, true, &path)? {
                continue;
            }
            let meta = file.metadata().map_err(io_err("stat", &path))?;
            if !crate::scan::same_file(&path, &meta) {
                continue;
            }
            let header = SegHeader {
                boot_id: inner.boot_id,
                created_ns: now_ns(),
            };
            file.write_all_at(&header.encode(), 0)
                .map_err(io_err("write", &path))?;
            let id = inner.index_write().add_segment(
                Seg {
                    name: name.clone(),
                    trusted: true,
                    sealed: false,
                    own: true,
                    scanned_to: format::SEG_HEADER_LEN,
                    touched: AtomicU64::new(0),
                },
                &[],
                false,
            );
            inner.shared.bump_layout();
            return Ok(Writer {
                id,
                name,
                path,
                file,
                pos: format::SEG_HEADER_LEN,
                entries: Vec::new(),
            });
        }
    }

    /// Writes the segment's index and lets go of it; an empty segment is removed instead.
    pub(crate) fn seal(&self, w: Writer) -> Result<()> {
        let inner = self;
        let dir = &inner.segs_dir;
        if w.entries.is_empty() {
            let _ = fs::remove_file(&w.path);
            inner.index_write().remove_segment(w.id);
            inner.shared.bump_layout();
            return Ok(());
        }
        let idx = SegIndex {
            boot_id: inner.boot_id,
            end: w.pos,
            entries: w.entries,
        };
        let written = write_index(
            dir,
            &w.name,
            &idx,
            inner.opts.clock.now(),
            inner.opts.sync_data,
        );
        if let Some(seg) = inner.index_write().segs.get_mut(&w.id) {
            // Even without an index (write failed) the segment is full: another process finds
            // it unlocked and seals it.
            seg.own = false;
            seg.sealed = written.is_ok();
        }
        drop(w.file);
        inner.shared.bump_layout();
        written
    }
}
