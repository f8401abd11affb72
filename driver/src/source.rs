//! The one read path of CORA: bytes `[offset, offset + len)` of stack N of an image, served
//! from the local chunk cache when present and otherwise fetched, verified and cached.
//!
//! A read is planned by `blobfmt::Stack::plan` into zero runs and chunk pieces. Hits are
//! copied out of the cache (decompressed, no network). Misses are grouped into runs of
//! adjacent frames of one blob and fetched with one range request per run; a chunk is fetched
//! by one reader at a time however many wait for it (single flight). Every fetched chunk is
//! decompressed and its sha256 checked before it is cached or returned; a mismatch is retried
//! once from the next source, then reported as an error.

use crate::blobs::BlobRead;
use crate::cache::{ChunkCache, ChunkDigest};
use blobfmt::oci::{Manifest, annotation};
use blobfmt::{ChunkEntry, Footer, Piece, Stack, StreamId, Trailer, decode_chunk, oci_digest};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("image: {0}")]
    Image(String),
    #[error(transparent)]
    Format(#[from] blobfmt::Error),
    #[error("fetching chunk {digest} of {blob}: {msg}")]
    Fetch {
        digest: String,
        blob: String,
        msg: String,
    },
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// Counters of one source; cheap to read at any time.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Chunk pieces served from the cache.
    pub hits: AtomicU64,
    /// Chunks fetched from a remote.
    pub misses: AtomicU64,
    /// Compressed bytes received.
    pub fetched_bytes: AtomicU64,
    /// Range requests made.
    pub requests: AtomicU64,
    /// Chunks that failed verification.
    pub corrupt: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub fetched_bytes: u64,
    pub requests: u64,
    pub corrupt: u64,
}

impl SourceStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
        }
    }
}

type ChunkData = Arc<Vec<u8>>;

/// A fetch in progress that other readers of the same chunk wait for.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Result<ChunkData, String>>>,
    cv: Condvar,
}

impl Flight {
    fn finish(&self, r: Result<ChunkData, String>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.cv.notify_all();
    }
    fn wait(&self) -> Result<ChunkData, String> {
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Tuning of the fetch path.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Frames closer than this are fetched in one request, the gap read and dropped.
    pub max_gap: u64,
    /// Largest single range request.
    pub max_request: u64,
    /// Compressed bytes fetched beyond a miss when reads look sequential.
    pub readahead: u64,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_gap: 16 << 10,
            max_request: 8 << 20,
            readahead: 1 << 20,
        }
    }
}

/// A layer stack of an image, readable at any byte offset.
pub struct LazySource {
    stack: Stack,
    /// Blob digest of each layer of the stack, bottom first.
    blobs: Vec<String>,
    /// Tried in order; the next one is used when one fails or serves corrupt bytes.
    remotes: Vec<Arc<dyn BlobRead>>,
    cache: ChunkCache,
    flights: Mutex<HashMap<ChunkDigest, Arc<Flight>>>,
    opts: FetchOptions,
    /// Last missed chunk per stream, to detect sequential reads.
    last_miss: Mutex<HashMap<StreamId, usize>>,
    trace: Option<Mutex<TraceRecorder>>,
    pub stats: SourceStats,
}

/// Records the order in which chunks are first touched (for trace-based prefetch).
#[derive(Default)]
struct TraceRecorder {
    seen: std::collections::HashSet<(StreamId, usize)>,
    order: Vec<(StreamId, usize)>,
}

impl LazySource {
    /// Open stack `top` (0-based layer index) of the image described by `manifest`.
    /// Trailers are read once through the remotes and kept in the cache under their digest.
    pub fn open(
        manifest: &Manifest,
        top: usize,
        remotes: Vec<Arc<dyn BlobRead>>,
        cache: ChunkCache,
        opts: FetchOptions,
    ) -> Result<LazySource> {
        if top >= manifest.layers.len() {
            return Err(SourceError::Image(format!(
                "layer {top} requested, the image has {}",
                manifest.layers.len()
            )));
        }
        if remotes.is_empty() {
            return Err(SourceError::Image("no blob source given".into()));
        }
        let mut trailers = Vec::new();
        let mut digests = Vec::new();
        let mut raw = Vec::new();
        for (i, l) in manifest.layers[..=top].iter().enumerate() {
            let t = load_trailer(l, &remotes, &cache)
                .map_err(|e| SourceError::Image(format!("layer {i} ({}): {e}", l.digest)))?;
            trailers.push(t);
            raw.push(blobfmt::parse_oci_digest(&l.digest)?);
            digests.push(l.digest.clone());
        }
        let stack = Stack::new(trailers, &raw)?;
        Ok(LazySource {
            stack,
            blobs: digests,
            remotes,
            cache,
            flights: Mutex::new(HashMap::new()),
            opts,
            last_miss: Mutex::new(HashMap::new()),
            trace: None,
            stats: SourceStats::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.stack.image_size()
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// Start recording the order of first access to chunks.
    pub fn record_trace(&mut self) {
        self.trace = Some(Mutex::new(TraceRecorder::default()));
    }

    /// The recorded access order as (layer index or "meta", chunk index) pairs.
    pub fn trace(&self) -> Vec<TraceEntry> {
        let Some(t) = &self.trace else {
            return Vec::new();
        };
        let t = t.lock().unwrap_or_else(|e| e.into_inner());
        t.order
            .iter()
            .map(|&(s, i)| TraceEntry {
                layer: match s {
                    StreamId::Layer(n) => Some(n),
                    StreamId::Meta => None,
                },
                chunk: i,
            })
            .collect()
    }

    /// Fill `buf` from local data only; `Ok(false)` if some chunk is not cached (nothing
    /// waits on the network).
    pub fn read_local(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        let plan = self.stack.plan(offset, buf.len() as u64)?;
        self.note_trace(&plan);
        let mut pos = 0usize;
        for p in &plan {
            let n = p.len() as usize;
            let dst = &mut buf[pos..pos + n];
            match *p {
                Piece::Zero { .. } => dst.fill(0),
                Piece::Chunk {
                    stream,
                    index,
                    offset,
                    ..
                } => {
                    let c = self.stack.chunk(stream, index);
                    if !self.cache.read_at(&c.digest, offset as usize, dst)? {
                        return Ok(false);
                    }
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                }
            }
            pos += n;
        }
        Ok(true)
    }

    /// Zero-copy read of local data: if every chunk under `[offset, offset + len)` is cached
    /// and can be mapped, calls `f` once with slices that are exactly those bytes in order
    /// (holes as shared zeros) and returns `Ok(Some(f(..)))`; `Ok(None)` (nothing waits on the
    /// network, `f` not called) when some chunk is not local or the read needs more than
    /// `max_slices` slices. The slices may be mapped cache files: pass them to the kernel only
    /// (see [`ChunkCache::lend`]).
    pub fn lend_local<R>(
        &self,
        offset: u64,
        len: usize,
        max_slices: usize,
        f: impl FnOnce(&[std::io::IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        let plan = self.stack.plan(offset, len as u64)?;
        self.note_trace(&plan);
        let mut lent = Vec::with_capacity(plan.len());
        let mut slices = 0usize;
        for p in &plan {
            match *p {
                Piece::Zero { len } => {
                    slices += (len as usize).div_ceil(ZEROS.len());
                    lent.push(None);
                }
                Piece::Chunk { stream, index, .. } => {
                    slices += 1;
                    let c = self.stack.chunk(stream, index);
                    match self.cache.lend(&c.digest)? {
                        Some(chunk) => lent.push(Some(chunk)),
                        None => return Ok(None),
                    }
                }
            }
            if slices > max_slices {
                return Ok(None);
            }
        }
        let mut iov = Vec::with_capacity(slices);
        for (p, chunk) in plan.iter().zip(&lent) {
            match (*p, chunk) {
                (Piece::Zero { len }, _) => {
                    let mut left = len as usize;
                    while left > 0 {
                        let n = left.min(ZEROS.len());
                        iov.push(std::io::IoSlice::new(&ZEROS[..n]));
                        left -= n;
                    }
                }
                (Piece::Chunk { offset, len, .. }, Some(chunk)) => {
                    let (o, l) = (offset as usize, len as usize);
                    let bytes = chunk.kernel_bytes().get(o..o + l).ok_or_else(|| {
                        SourceError::Image(format!(
                            "chunk piece {o}+{l} outside a cached chunk of {} bytes",
                            chunk.len()
                        ))
                    })?;
                    iov.push(std::io::IoSlice::new(bytes));
                }
                (Piece::Chunk { .. }, None) => return Ok(None),
            }
        }
        self.stats
            .hits
            .fetch_add((lent.iter().flatten().count()) as u64, Ordering::Relaxed);
        Ok(Some(f(&iov)))
    }

    /// Fill `buf` with image bytes at `offset`, fetching what is missing. May block.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let plan = self.stack.plan(offset, buf.len() as u64)?;
        self.note_trace(&plan);
        let mut missing = Vec::new();
        let mut pos = 0usize;
        for (k, p) in plan.iter().enumerate() {
            let n = p.len() as usize;
            let dst = &mut buf[pos..pos + n];
            match *p {
                Piece::Zero { .. } => dst.fill(0),
                Piece::Chunk {
                    stream,
                    index,
                    offset,
                    ..
                } => {
                    let c = self.stack.chunk(stream, index);
                    if self.cache.read_at(&c.digest, offset as usize, dst)? {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    } else {
                        missing.push((k, pos));
                    }
                }
            }
            pos += n;
        }
        if missing.is_empty() {
            return Ok(());
        }
        let wanted: Vec<(StreamId, usize)> = missing
            .iter()
            .filter_map(|&(k, _)| match plan[k] {
                Piece::Chunk { stream, index, .. } => Some((stream, index)),
                Piece::Zero { .. } => None,
            })
            .collect();
        let got = self.fetch(&wanted)?;
        for &(k, pos) in &missing {
            if let Piece::Chunk {
                stream,
                index,
                offset,
                len,
            } = plan[k]
            {
                let data = &got[&(stream, index)];
                let (o, l) = (offset as usize, len as usize);
                buf[pos..pos + l].copy_from_slice(&data[o..o + l]);
            }
        }
        Ok(())
    }

    /// Fetch (or wait for) the given chunks; plus read-ahead when the reads look sequential.
    pub fn fetch(
        &self,
        wanted: &[(StreamId, usize)],
    ) -> Result<HashMap<(StreamId, usize), ChunkData>> {
        let mut want: Vec<(StreamId, usize)> = wanted.to_vec();
        want.sort_by_key(|&(s, i)| (stream_key(s), i));
        want.dedup();
        let extra = self.readahead_for(&want);
        // Claim each chunk: either we fetch it, or someone else already is.
        let mut mine: Vec<(StreamId, usize, Arc<Flight>)> = Vec::new();
        let mut theirs: Vec<((StreamId, usize), Arc<Flight>)> = Vec::new();
        let mut cached: Vec<(StreamId, usize)> = Vec::new();
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            for &(s, i) in want.iter().chain(&extra) {
                let d = self.stack.chunk(s, i).digest;
                let is_wanted = want
                    .binary_search_by_key(&(stream_key(s), i), |&(s, i)| (stream_key(s), i))
                    .is_ok();
                match flights.get(&d) {
                    Some(f) => {
                        if is_wanted {
                            theirs.push(((s, i), f.clone()));
                        }
                    }
                    None => {
                        // Another reader may have finished this chunk since our cache miss.
                        if self.cache.contains(&d) {
                            if is_wanted {
                                cached.push((s, i));
                            }
                            continue;
                        }
                        let f = Arc::new(Flight::default());
                        flights.insert(d, f.clone());
                        mine.push((s, i, f));
                    }
                }
            }
        }
        let mut out = HashMap::new();
        let result = self.fetch_runs(&mine, &mut out);
        // Whatever happened, nobody may wait forever on a flight we own.
        {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            for (s, i, f) in &mine {
                let d = self.stack.chunk(*s, *i).digest;
                if f.done.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                    f.finish(Err(match &result {
                        Err(e) => e.to_string(),
                        Ok(()) => "fetch abandoned".into(),
                    }));
                }
                flights.remove(&d);
            }
        }
        result?;
        for (s, i) in cached {
            let d = match self.cache.get(&self.stack.chunk(s, i).digest)? {
                Some(d) => Arc::new(d),
                // Evicted in between: fetch it after all.
                None => self.fetch_one_verified(s, i)?,
            };
            out.insert((s, i), d);
        }
        for (key, f) in theirs {
            match f.wait() {
                Ok(d) => {
                    out.insert(key, d);
                }
                Err(msg) => {
                    // The other reader failed; try once ourselves rather than inherit its error.
                    let (s, i) = key;
                    debug!(%msg, "shared fetch failed, retrying");
                    let d = self.fetch_one_verified(s, i)?;
                    out.insert(key, d);
                }
            }
        }
        out.retain(|k, _| want.contains(k));
        Ok(out)
    }

    /// Chunks after the last wanted one in its stream, when the access looks sequential.
    fn readahead_for(&self, want: &[(StreamId, usize)]) -> Vec<(StreamId, usize)> {
        if self.opts.readahead == 0 {
            return Vec::new();
        }
        let mut extra = Vec::new();
        let mut last = self.last_miss.lock().unwrap_or_else(|e| e.into_inner());
        for &(s, i) in want {
            let sequential = last.get(&s).is_some_and(|&prev| i >= prev && i <= prev + 2);
            last.insert(s, i);
            if !sequential {
                continue;
            }
            let chunks = self.stack.chunks(s);
            let mut budget = self.opts.readahead;
            let mut j = i + 1;
            while j < chunks.len() && budget > 0 {
                if !want.contains(&(s, j)) {
                    extra.push((s, j));
                }
                budget = budget.saturating_sub(u64::from(chunks[j].compressed_len));
                j += 1;
            }
            last.insert(s, j - 1);
        }
        extra
    }

    /// Fetch our claimed chunks, adjacent frames of one blob in one request each.
    fn fetch_runs(
        &self,
        mine: &[(StreamId, usize, Arc<Flight>)],
        out: &mut HashMap<(StreamId, usize), ChunkData>,
    ) -> Result<()> {
        let mut sorted: Vec<&(StreamId, usize, Arc<Flight>)> = mine.iter().collect();
        sorted.sort_by_key(|(s, i, _)| (self.blob_of(*s), self.stack.chunk(*s, *i).frame_offset));
        let mut run: Vec<&(StreamId, usize, Arc<Flight>)> = Vec::new();
        for item in sorted {
            if let Some(&last) = run.last() {
                let (a, b) = (
                    self.stack.chunk(last.0, last.1),
                    self.stack.chunk(item.0, item.1),
                );
                let first = self.stack.chunk(run[0].0, run[0].1);
                let same_blob = self.blob_of(last.0) == self.blob_of(item.0);
                if !same_blob
                    || b.frame_offset > a.frame_end() + self.opts.max_gap
                    || b.frame_end() - first.frame_offset > self.opts.max_request
                {
                    self.fetch_run(&run, out)?;
                    run.clear();
                }
            }
            run.push(item);
        }
        if !run.is_empty() {
            self.fetch_run(&run, out)?;
        }
        Ok(())
    }

    fn blob_of(&self, s: StreamId) -> usize {
        match s {
            StreamId::Layer(n) => n as usize,
            StreamId::Meta => self.blobs.len() - 1,
        }
    }

    fn fetch_run(
        &self,
        run: &[&(StreamId, usize, Arc<Flight>)],
        out: &mut HashMap<(StreamId, usize), ChunkData>,
    ) -> Result<()> {
        let blob = &self.blobs[self.blob_of(run[0].0)];
        let start = self.stack.chunk(run[0].0, run[0].1).frame_offset;
        let end = run
            .iter()
            .map(|r| self.stack.chunk(r.0, r.1).frame_end())
            .max()
            .unwrap_or(start);
        let mut last_err = String::new();
        for (n, remote) in self.remotes.iter().enumerate() {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let bytes = match remote.read(blob, start, end - start) {
                Ok(b) => b,
                Err(e) => {
                    warn!(remote = %remote.name(), %blob, error = %e, "range read failed");
                    last_err = e.to_string();
                    continue;
                }
            };
            self.stats
                .fetched_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let mut all_ok = true;
            for (s, i, flight) in run {
                if flight
                    .done
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some()
                {
                    continue;
                }
                let c = self.stack.chunk(*s, *i);
                let lo = (c.frame_offset - start) as usize;
                let frame = &bytes[lo..lo + c.compressed_len as usize];
                match decode_chunk(frame, c) {
                    Ok(data) => {
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        self.store(c, &data);
                        let data = Arc::new(data);
                        out.insert((*s, *i), data.clone());
                        flight.finish(Ok(data));
                    }
                    Err(e) => {
                        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        warn!(chunk = %hex::encode(c.digest), %blob, remote = %remote.name(), attempt = n + 1, error = %e, "corrupt chunk");
                        last_err = e.to_string();
                        all_ok = false;
                    }
                }
            }
            if all_ok {
                return Ok(());
            }
        }
        let bad = run
            .iter()
            .find(|(_, _, f)| f.done.lock().unwrap_or_else(|e| e.into_inner()).is_none())
            .map(|(s, i, _)| hex::encode(self.stack.chunk(*s, *i).digest))
            .unwrap_or_default();
        Err(SourceError::Fetch {
            digest: bad,
            blob: blob.clone(),
            msg: format!(
                "all {} sources failed; last: {last_err}",
                self.remotes.len()
            ),
        })
    }

    /// Fetch one chunk without sharing, trying each remote once.
    fn fetch_one_verified(&self, s: StreamId, i: usize) -> Result<ChunkData> {
        let c = *self.stack.chunk(s, i);
        if let Some(d) = self.cache.get(&c.digest)? {
            return Ok(Arc::new(d));
        }
        let f = Arc::new(Flight::default());
        let mut out = HashMap::new();
        self.fetch_run(&[&(s, i, f)], &mut out)?;
        out.remove(&(s, i)).ok_or_else(|| SourceError::Fetch {
            digest: hex::encode(c.digest),
            blob: self.blobs[self.blob_of(s)].clone(),
            msg: "fetch returned nothing".into(),
        })
    }

    fn store(&self, c: &ChunkEntry, data: &[u8]) {
        // A full or read-only cache must not fail the read: the bytes are verified already.
        if let Err(e) = self.cache.insert(&c.digest, data) {
            warn!(chunk = %hex::encode(c.digest), error = %e, "could not cache chunk");
        }
    }

    fn note_trace(&self, plan: &[Piece]) {
        let Some(t) = &self.trace else { return };
        let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
        for p in plan {
            if let Piece::Chunk { stream, index, .. } = *p
                && t.seen.insert((stream, index))
            {
                t.order.push((stream, index));
            }
        }
    }

    /// Fetch the chunks of a recorded trace that are not cached yet, in order.
    pub fn prefetch(&self, trace: &[TraceEntry]) -> Result<usize> {
        let mut wanted = Vec::new();
        for e in trace {
            let s = match e.layer {
                Some(n) if (n as usize) < self.blobs.len() => StreamId::Layer(n),
                Some(_) => continue,
                None => StreamId::Meta,
            };
            if e.chunk < self.stack.chunks(s).len()
                && !self.cache.contains(&self.stack.chunk(s, e.chunk).digest)
            {
                wanted.push((s, e.chunk));
            }
        }
        for batch in wanted.chunks(64) {
            self.fetch(batch)?;
        }
        Ok(wanted.len())
    }
}

/// Shared zeros for holes lent by [`LazySource::lend_local`].
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// One entry of an access trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TraceEntry {
    /// Layer of the stack, or `None` for the metadata stream.
    pub layer: Option<u32>,
    pub chunk: usize,
}

fn stream_key(s: StreamId) -> u64 {
    match s {
        StreamId::Layer(n) => u64::from(n),
        StreamId::Meta => u64::MAX,
    }
}

/// A layer's trailer: from the cache by its digest, or through the remotes.
fn load_trailer(
    layer: &blobfmt::oci::Descriptor,
    remotes: &[Arc<dyn BlobRead>],
    cache: &ChunkCache,
) -> Result<Trailer, String> {
    let ann = layer.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).cloned();
    if get(annotation::VERSION).is_none() {
        return Err(format!(
            "not a CORA layer ({}); convert the image with `cora convert`",
            layer.media_type
        ));
    }
    let parsed = (|| {
        let offset: u64 = get(annotation::TRAILER_OFFSET)?.parse().ok()?;
        let length: u64 = get(annotation::TRAILER_LENGTH)?.parse().ok()?;
        let digest = blobfmt::parse_oci_digest(&get(annotation::TRAILER_DIGEST)?).ok()?;
        Some(Footer {
            version: blobfmt::format::VERSION,
            flags: 0,
            trailer_offset: offset,
            trailer_length: length,
            trailer_digest: digest,
        })
    })();
    let mut last = String::from("no source");
    for remote in remotes {
        let footer = match &parsed {
            Some(f) => f.clone(),
            None => {
                // Annotations missing or garbled: fall back to the footer in the blob.
                let size = layer.size;
                match remote.read(
                    &layer.digest,
                    size.saturating_sub(blobfmt::format::FOOTER_FRAME as u64),
                    blobfmt::format::FOOTER_FRAME as u64,
                ) {
                    Ok(b) => match Footer::decode(&b, size) {
                        Ok(f) => f,
                        Err(e) => return Err(e.to_string()),
                    },
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                }
            }
        };
        if footer.trailer_length > blobfmt::format::MAX_TRAILER as u64 {
            return Err("trailer is implausibly large".into());
        }
        if let Ok(Some(frame)) = cache.get(&footer.trailer_digest)
            && let Ok(t) = Trailer::decode_frame(&frame, &footer)
        {
            return Ok(t);
        }
        match remote.read(&layer.digest, footer.trailer_offset, footer.trailer_length) {
            Ok(frame) => match Trailer::decode_frame(&frame, &footer) {
                Ok(t) => {
                    if let Err(e) = cache.insert(&footer.trailer_digest, &frame) {
                        warn!(error = %e, "could not cache trailer");
                    }
                    return Ok(t);
                }
                Err(e) => {
                    warn!(remote = %remote.name(), blob = %layer.digest, error = %e, "bad trailer");
                    last = e.to_string();
                }
            },
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "reading trailer {}: {last}",
        parsed
            .map(|f| oci_digest(&f.trailer_digest))
            .unwrap_or_default()
    ))
}
