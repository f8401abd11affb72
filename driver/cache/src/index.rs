//! This process's map of the cache: digest → (segment, offset, length), kept up to date
//! with what other processes append, seal and evict.
//!
//! A refresh runs only on a lookup miss and only when the shared counters moved (one atomic
//! load each): a changed layout lists `segments/` (new segments are loaded from their index,
//! or scanned record by record while still open; vanished ones are dropped); a changed
//! publish count scans the tails of the segments other processes are still appending to.

use crate::format::{self, IdxEntry, RecHeader, SegHeader, SegIndex};
use crate::openseg::{FastMap, SegId};
use crate::{ChunkDigest, Inner, Result, io_err};
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub(crate) struct Seg {
    pub name: String,
    /// Written during this boot: its bytes are whole (no power loss since), so its entries
    /// need no check on first read.
    pub trusted: bool,
    /// Has an index file; nobody appends to it any more.
    pub sealed: bool,
    /// This process's own segment, appended to by its writer.
    pub own: bool,
    /// End of the last record this process knows of (unsealed segments).
    pub scanned_to: u64,
    /// Last LRU touch by this process (clock seconds), to rate-limit touches.
    pub touched: AtomicU64,
}

pub(crate) struct Loc {
    pub seg: SegId,
    pub offset: u64,
    pub len: u32,
    pub data_crc: u32,
    /// Known good: trusted segment, or checked by this process.
    pub checked: AtomicBool,
}

#[derive(Default)]
pub(crate) struct Index {
    pub entries: FastMap<ChunkDigest, Loc>,
    pub segs: FastMap<SegId, Seg>,
    pub by_name: HashMap<String, SegId>,
    pub next_id: SegId,
    pub seen: (u64, u64),
}

impl Index {
    /// Registers a segment and its entries; a digest already present keeps its first home.
    pub fn add_segment(&mut self, seg: Seg, entries: &[IdxEntry], verify: bool) -> SegId {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let checked = seg.trusted || !verify;
        self.by_name.insert(seg.name.clone(), id);
        self.segs.insert(id, seg);
        self.add_entries(id, entries, checked);
        id
    }

    pub fn add_entries(&mut self, id: SegId, entries: &[IdxEntry], checked: bool) {
        for e in entries {
            self.entries.entry(e.digest).or_insert_with(|| Loc {
                seg: id,
                offset: e.offset,
                len: e.len,
                data_crc: e.data_crc,
                checked: AtomicBool::new(checked),
            });
        }
    }

    pub fn remove_segment(&mut self, id: SegId) {
        if let Some(seg) = self.segs.remove(&id) {
            self.by_name.remove(&seg.name);
            self.entries.retain(|_, loc| loc.seg != id);
        }
    }
}

/// What `segments/` holds.
#[derive(Default)]
pub(crate) struct Listing {
    pub segs: HashSet<String>,
    pub idxs: HashSet<String>,
    /// Anything else (including index temp files), for gc.
    pub strays: Vec<PathBuf>,
}

/// Segment names are `<created ns>-<pid>-<seq>` in fixed-width lowercase hex.
pub(crate) fn valid_name(stem: &str) -> bool {
    stem.len() == 34
        && stem.bytes().enumerate().all(|(i, b)| match i {
            16 | 25 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

pub(crate) fn list(dir: &Path) -> Result<Listing> {
    let mut out = Listing::default();
    let items = match fs::read_dir(dir) {
        Ok(items) => items,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for item in items {
        let item = item.map_err(io_err("list", dir))?;
        let name = item.file_name();
        let parsed = name.to_str().and_then(|n| {
            let (stem, ext) = n.rsplit_once('.')?;
            valid_name(stem).then_some((stem, ext))
        });
        match parsed {
            Some((stem, "seg")) => out.segs.insert(stem.to_string()),
            Some((stem, "idx")) => out.idxs.insert(stem.to_string()),
            _ => {
                out.strays.push(item.path());
                true
            }
        };
    }
    Ok(out)
}

pub(crate) fn seg_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.seg"))
}

pub(crate) fn idx_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.idx"))
}

/// The records of `file` after `from` (the end of a record, or the segment header), up to
/// the first one not complete within `len` bytes: a torn tail, or a record still being written.
pub(crate) fn scan_records(file: &File, from: u64, len: u64) -> io::Result<(Vec<IdxEntry>, u64)> {
    let mut entries = Vec::new();
    let mut end = from;
    let mut header = [0u8; format::REC_HEADER_LEN as usize];
    while let Some((at, data)) = format::next_record_at(end) {
        if data > len {
            break;
        }
        file.read_exact_at(&mut header, at)?;
        let Some(rec) = RecHeader::decode(&header) else {
            break;
        };
        let Some(data_end) = data.checked_add(u64::from(rec.len)).filter(|e| *e <= len) else {
            break;
        };
        entries.push(IdxEntry {
            digest: rec.digest,
            offset: data,
            len: rec.len,
            data_crc: rec.data_crc,
        });
        end = data_end;
    }
    Ok((entries, end))
}

pub(crate) enum Loaded {
    Sealed(SegIndex),
    Open {
        header: SegHeader,
        entries: Vec<IdxEntry>,
        end: u64,
    },
    /// Not a segment yet (being created) or not one at all (crashed at birth; gc's to drop).
    Unreadable,
}

pub(crate) fn read_index(path: &Path) -> Option<SegIndex> {
    SegIndex::decode(&fs::read(path).ok()?)
}

/// Loads one segment: from its index if it has a good one, else by scanning its records.
pub(crate) fn load(dir: &Path, name: &str, has_idx: bool) -> io::Result<Loaded> {
    let path = seg_path(dir, name);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Loaded::Unreadable),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if has_idx && let Some(mut idx) = read_index(&idx_path(dir, name)) {
        // After a power cut an index can outlive the end of its segment: entries past the
        // file are not there.
        idx.entries
            .retain(|e| e.offset.saturating_add(u64::from(e.len)) <= len);
        return Ok(Loaded::Sealed(idx));
    }
    let mut head = [0u8; format::SEG_HEADER_LEN as usize];
    if len < format::SEG_HEADER_LEN || file.read_exact_at(&mut head, 0).is_err() {
        return Ok(Loaded::Unreadable);
    }
    let Some(header) = SegHeader::decode(&head) else {
        return Ok(Loaded::Unreadable);
    };
    let (entries, end) = scan_records(&file, format::SEG_HEADER_LEN, len)?;
    Ok(Loaded::Open {
        header,
        entries,
        end,
    })
}

/// What a refresh found, gathered without holding the index lock.
#[derive(Default)]
struct Found {
    new: Vec<(Seg, Vec<IdxEntry>)>,
    gone: Vec<SegId>,
    sealed: Vec<(SegId, Vec<IdxEntry>)>,
    tails: Vec<(SegId, Vec<IdxEntry>, u64)>,
}

impl Inner {
    /// Brings this process's index up to date if another process changed the cache since.
    pub(crate) fn refresh(&self) -> Result<()> {
        let inner = self;
        let now = (
            inner.shared.layout().load(Ordering::Acquire),
            inner.shared.published().load(Ordering::Acquire),
        );
        if inner.index_read().seen == now {
            return Ok(());
        }
        let _one = inner.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        // Snapshot what we know; the I/O below runs without the index lock.
        let (seen, known, open) = {
            let idx = inner.index_read();
            if idx.seen == now {
                return Ok(());
            }
            let open: Vec<(SegId, String, u64)> = idx
                .segs
                .iter()
                .filter(|(_, s)| !s.sealed && !s.own)
                .map(|(id, s)| (*id, s.name.clone(), s.scanned_to))
                .collect();
            (idx.seen, idx.by_name.clone(), open)
        };
        let dir = &inner.segs_dir;
        let mut found = Found::default();
        let mut newly_sealed = HashSet::new();
        if now.0 != seen.0 {
            let listing = list(dir)?;
            for (name, id) in &known {
                if !listing.segs.contains(name) {
                    found.gone.push(*id);
                }
            }
            for name in &listing.segs {
                if known.contains_key(name) {
                    continue;
                }
                let seg = match load(dir, name, listing.idxs.contains(name)) {
                    Ok(Loaded::Sealed(idx)) => Some((idx.boot_id, true, idx.end, idx.entries)),
                    Ok(Loaded::Open {
                        header,
                        entries,
                        end,
                    }) => Some((header.boot_id, false, end, entries)),
                    Ok(Loaded::Unreadable) => None,
                    // Evicted while we looked, or unreadable: a miss, like a chunk never cached.
                    Err(e) => {
                        tracing::debug!(segment = %name, error = %e, "cache segment not loaded");
                        None
                    }
                };
                if let Some((boot, sealed, end, entries)) = seg {
                    found.new.push((
                        Seg {
                            name: name.clone(),
                            trusted: boot == inner.boot_id,
                            sealed,
                            own: false,
                            scanned_to: end,
                            touched: AtomicU64::new(0),
                        },
                        entries,
                    ));
                }
            }
            for (id, name, _) in &open {
                if listing.idxs.contains(name)
                    && let Some(idx) = read_index(&idx_path(dir, name))
                {
                    newly_sealed.insert(*id);
                    found.sealed.push((*id, idx.entries));
                }
            }
        }
        for (id, _, from) in &open {
            if newly_sealed.contains(id) || found.gone.contains(id) {
                continue;
            }
            let Some(seg) = self.open_seg(*id)? else {
                continue;
            };
            let len = seg.file.metadata().map_or(0, |m| m.len());
            if len <= *from {
                continue;
            }
            match scan_records(&seg.file, *from, len) {
                Ok((entries, end)) if !entries.is_empty() => found.tails.push((*id, entries, end)),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cache segment tail not scanned"),
            }
        }
        let verify = inner.opts.verify_on_open;
        let mut idx = inner.index_write();
        for id in found.gone {
            idx.remove_segment(id);
            inner.open.remove(id);
        }
        for (seg, entries) in found.new {
            // Registered meanwhile (this process's writer opened it during our listing).
            if !idx.by_name.contains_key(&seg.name) {
                idx.add_segment(seg, &entries, verify);
            }
        }
        for (id, entries) in found.sealed {
            let Some(seg) = idx.segs.get_mut(&id) else {
                continue;
            };
            seg.sealed = true;
            let checked = seg.trusted || !verify;
            idx.add_entries(id, &entries, checked);
        }
        for (id, entries, end) in found.tails {
            let Some(seg) = idx.segs.get_mut(&id) else {
                continue;
            };
            seg.scanned_to = seg.scanned_to.max(end);
            let checked = seg.trusted || !verify;
            idx.add_entries(id, &entries, checked);
        }
        idx.seen = now;
        Ok(())
    }
}
