//! The one read path of CORA: bytes `[offset, offset + len)` of stack N of an image, served
//! from the local chunk cache when present and otherwise fetched, verified and cached.
//!
//! A read is planned by `blobfmt::Stack::plan` into zero runs and chunk pieces. Hits are
//! copied out of the cache (decompressed, no network). Misses are grouped into runs of
//! adjacent frames of one blob and fetched with one range request per run; a chunk is fetched
//! by one reader at a time however many wait for it (single flight). Every fetched chunk is
//! decompressed and its sha256 checked before it is cached or returned; a mismatch is retried
//! once from the next source, then reported as an error.
//!
//! Three kinds of fetch share a small pool of worker threads, in priority order:
//! 1. demand: runs a reader needs now (the first run is fetched on the reader's own thread);
//! 2. read-ahead: when a stream is read sequentially, a window ahead of the reader that
//!    doubles up to `max_readahead` and is refilled when the reader enters the last window, so
//!    the reader overlaps with the network.
//!    A demand miss also fetches a window of the chunks after it (`miss_window`): the tar
//!    stream is sorted by path, so the next files a program opens (the rest of a package,
//!    the next modules of an import) usually lie there, and one round trip brings them all.
//!    Not while a stored trace is being prefetched: the trace already says what comes next.
//!    A reader that goes on through the window (a large file read front to back) claims the
//!    next one, twice as large, before it gets there;
//! 3. trace prefetch: chunks of a recorded access trace, in trace order, with at most
//!    `prefetch_requests` requests in flight so demand reads always find a free worker;
//!    then, with `fill`, every chunk of the stack not yet local, in stream order: `idle`, one
//!    small request at a time and only while no other fetch is queued or running; `paced`,
//!    beside everything else with as many requests in flight as the link carries before a
//!    queue builds up (`pace`); `always`, beside everything else, `prefetch_requests` at once.
//!
//! Several runs in flight at once (over the client's reused connections) and decoding on
//! several workers is what makes a cold sequential read keep up with the wire.

use crate::blobs::BlobRead;
use crate::cache::{ChunkCache, ChunkDigest};
use crate::pace::Pacer;
use blobfmt::oci::{Manifest, annotation};
use blobfmt::{ChunkEntry, Footer, Piece, Stack, StreamId, Trailer, decode_chunk, oci_digest};
use cora_api::driver::{DriverStats, Fill, LatencyHistogram};
use cora_read::{BlockSource, FileExtent, Lend, Miss, Outcome, PendingRead};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use tracing::{debug, info, warn};

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
    /// The transport could not take lent bytes (e.g. its copy into the request failed).
    #[error("handing lent bytes to the transport: {0}")]
    Lend(std::io::Error),
}

pub type Result<T, E = SourceError> = std::result::Result<T, E>;

/// Counters of one source; cheap to read at any time.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Chunk pieces served from the cache.
    pub hits: AtomicU64,
    /// Chunks fetched from a remote (by any kind of fetch).
    pub misses: AtomicU64,
    /// Compressed bytes received.
    pub fetched_bytes: AtomicU64,
    /// Range requests made.
    pub requests: AtomicU64,
    /// Chunks that failed verification.
    pub corrupt: AtomicU64,
    /// Range requests that failed (network or HTTP errors).
    pub fetch_errors: AtomicU64,
    /// Latency of successful range requests: counts per bucket of [`FETCH_LATENCY_BOUNDS`],
    /// the last one for slower requests.
    pub fetch_latency: [AtomicU64; FETCH_LATENCY_BOUNDS.len() + 1],
    pub fetch_latency_sum_us: AtomicU64,
    /// Of `misses`: chunks fetched by sequential read-ahead.
    pub readahead: AtomicU64,
    /// Of `misses`: chunks fetched by trace prefetch.
    pub prefetched: AtomicU64,
    /// Fetch jobs that panicked (caught: their reads failed, the worker lived on).
    pub worker_panics: AtomicU64,
    /// Reads that waited for a fetch, and for how long in all (µs).
    pub stalls: AtomicU64,
    pub stall_us: AtomicU64,
}

/// Upper bounds (seconds) of the fetch latency histogram buckets (Prometheus-style `le`).
pub const FETCH_LATENCY_BOUNDS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

impl SourceStats {
    /// The counters as the driver's stats file carries them.
    pub fn snapshot(&self) -> DriverStats {
        DriverStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            fetch_errors: self.fetch_errors.load(Ordering::Relaxed),
            fetch_seconds: {
                let counts: Vec<u64> = self
                    .fetch_latency
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed))
                    .collect();
                LatencyHistogram {
                    le: FETCH_LATENCY_BOUNDS.to_vec(),
                    count: counts.iter().sum(),
                    counts,
                    sum_seconds: self.fetch_latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
                }
            },
            readahead: self.readahead.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
            worker_panics: self.worker_panics.load(Ordering::Relaxed),
            stalls: self.stalls.load(Ordering::Relaxed),
            stall_seconds: self.stall_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Records one successful range request.
    pub fn observe_fetch(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let i = FETCH_LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(FETCH_LATENCY_BOUNDS.len());
        self.fetch_latency[i].fetch_add(1, Ordering::Relaxed);
        self.fetch_latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
}

type ChunkData = Arc<Vec<u8>>;

/// A fetch in progress that other readers of the same chunk wait for (blocking, or with a
/// callback run by whoever finishes it).
#[derive(Default)]
struct Flight {
    state: Mutex<FlightState>,
    cv: Condvar,
}

#[derive(Default)]
struct FlightState {
    done: Option<Result<ChunkData, String>>,
    waiters: Vec<Box<dyn FnOnce() + Send>>,
}

impl Flight {
    fn finish(&self, r: Result<ChunkData, String>) {
        let waiters = {
            let mut st = lock(&self.state);
            st.done = Some(r);
            std::mem::take(&mut st.waiters)
        };
        self.cv.notify_all();
        for w in waiters {
            w();
        }
    }
    fn is_done(&self) -> bool {
        lock(&self.state).done.is_some()
    }
    fn result(&self) -> Option<Result<ChunkData, String>> {
        lock(&self.state).done.clone()
    }
    fn wait(&self) -> Result<ChunkData, String> {
        let mut g = lock(&self.state);
        loop {
            if let Some(r) = g.done.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    /// Runs `f` once the flight is done: now, or on the thread that finishes it.
    fn on_done(&self, f: Box<dyn FnOnce() + Send>) {
        let mut st = lock(&self.state);
        if st.done.is_some() {
            drop(st);
            f();
        } else {
            st.waiters.push(f);
        }
    }
}

/// A missing piece of a read: `len` bytes at `offset` in chunk `key` go to `buf[pos..]`.
struct MissingPiece {
    pos: usize,
    key: (StreamId, usize),
    offset: usize,
    len: usize,
}

/// The [`PendingRead`] of a read with misses: the flights its missing chunks wait on.
struct PendingChunks {
    inner: Arc<Inner>,
    missing: Vec<MissingPiece>,
    flights: Vec<((StreamId, usize), Arc<Flight>)>,
    since: std::time::Instant,
}

impl PendingRead for PendingChunks {
    fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>) {
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(self.flights.len()));
        let wake = Arc::new(Mutex::new(Some(wake)));
        if self.flights.is_empty() {
            if let Some(w) = lock(&wake).take() {
                w();
            }
            return;
        }
        for (_, f) in &self.flights {
            let (left, wake) = (left.clone(), wake.clone());
            f.on_done(Box::new(move || {
                if left.fetch_sub(1, Ordering::AcqRel) == 1
                    && let Some(w) = lock(&wake).take()
                {
                    w();
                }
            }));
        }
    }

    fn finish(self: Box<Self>, buf: &mut [u8]) -> std::io::Result<()> {
        // A failed flight fails this read; the flight is forgotten, so the next read of the
        // chunk fetches it again (the registry client has already retried within its budget).
        let inner = &self.inner;
        let waited = u64::try_from(self.since.elapsed().as_micros()).unwrap_or(u64::MAX);
        inner.stats.stalls.fetch_add(1, Ordering::Relaxed);
        inner.stats.stall_us.fetch_add(waited, Ordering::Relaxed);
        for m in &self.missing {
            let flight = self
                .flights
                .iter()
                .find(|(k, _)| *k == m.key)
                .map(|(_, f)| f);
            let err = |msg: String| {
                let e = SourceError::Fetch {
                    digest: hex::encode(inner.stack.chunk(m.key.0, m.key.1).digest),
                    blob: inner.blobs[inner.blob_of(m.key.0)].clone(),
                    msg,
                };
                std::io::Error::other(e.to_string())
            };
            let data = match flight.and_then(|f| f.result()) {
                Some(Ok(d)) => d,
                Some(Err(msg)) => return Err(err(msg)),
                None => return Err(err("finished before its fetch".into())),
            };
            let src = data
                .get(m.offset..m.offset + m.len)
                .ok_or_else(|| err(format!("piece outside a chunk of {} bytes", data.len())))?;
            buf.get_mut(m.pos..m.pos + m.len)
                .ok_or_else(|| err("buffer smaller than the read".into()))?
                .copy_from_slice(src);
        }
        Ok(())
    }
}

/// The last chunk claimed in each stream.
fn last_per_stream(claimed: &[Claim]) -> Vec<(StreamId, usize)> {
    let mut last: Vec<(StreamId, usize)> = Vec::new();
    for &(s, i, _) in claimed {
        match last.iter_mut().find(|(t, _)| *t == s) {
            Some(l) => l.1 = l.1.max(i),
            None => last.push((s, i)),
        }
    }
    last
}

/// A poisoned lock only means another reader panicked; the data behind it stays consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tuning of the fetch path.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Frames closer than this are fetched in one request, the gap read and dropped.
    pub max_gap: u64,
    /// Largest single range request.
    pub max_request: u64,
    /// First read-ahead window (compressed bytes) once reads look sequential; 0 disables.
    pub readahead: u64,
    /// The window doubles on each refill up to this.
    pub max_readahead: u64,
    /// Worker threads for read-ahead, prefetch and the extra runs of a demand read.
    pub fetch_threads: usize,
    /// Trace-prefetch requests in flight at once (kept below `fetch_threads`).
    pub prefetch_requests: usize,
    /// On a demand miss, also fetch (in parallel, as read-ahead) the chunks that follow the
    /// missed one in its stream, up to this many compressed bytes; 0: only what was asked.
    pub miss_window: u64,
    /// On a demand miss inside a file's data, the window reaches at least to the end of that
    /// file (of its extent: the part of the file one layer holds in one piece), up to this
    /// many compressed bytes; 0: the miss window only.
    pub file_window: u64,
    /// After the trace prefetch, fetch the rest of the stack in the background.
    pub fill: Fill,
}

/// Trace chunks this close in a blob are prefetched in one request, the bytes between them
/// read and dropped: a trace is scattered (2392 chunks of a Python start lie in ~1000 runs
/// with a 16 KiB gap). Fewer, larger requests won once the registry's CPU was counted: a
/// docker-registry range request costs ~3.8 ms of its CPU whatever its size (it reads 4 MiB
/// ahead), and on the bench host that CPU is the workload's. wan, 2 rounds each, gap/request:
/// 128 KiB/512 KiB: Python + trace 5.64 s (registry 2.3 CPU s), Node + trace 1.86 s;
/// 512 KiB/1 MiB: 4.93 s (1.5 CPU s, 96 MB fetched instead of 81), 1.71 s;
/// 1 MiB/2 MiB: 5.12 s (130 MB), 1.78 s.
const PREFETCH_GAP: u64 = 512 << 10;

/// One prefetch or fill request (see [`PREFETCH_GAP`] for the size). Many in flight because a
/// trace is scattered: a Node start's ~1000 chunks lie in hundreds of runs, and 2 at a time
/// cost a round trip each.
const PREFETCH_REQUEST: u64 = 1 << 20;

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_gap: 16 << 10,
            max_request: 2 << 20,
            readahead: 2 << 20,
            max_readahead: 16 << 20,
            fetch_threads: 24,
            prefetch_requests: 16,
            miss_window: 0,
            file_window: 0,
            fill: Fill::Off,
        }
    }
}

/// A chunk this reader or job owns the fetch of.
type Claim = (StreamId, usize, Arc<Flight>);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Prio {
    Demand = 0,
    Readahead = 1,
    Prefetch = 2,
}

/// Sequential-read state of one stream.
#[derive(Debug, Default)]
struct Readahead {
    /// Highest chunk index the reader touched.
    last: Option<usize>,
    /// First chunk not yet issued for read-ahead.
    next: usize,
    /// Current window in compressed bytes (0: not sequential).
    window: u64,
    /// Start of the last issued window: when the reader gets there, issue the next one.
    trigger: usize,
    /// The miss window in flight: the chunks before `win_end` were claimed by it; a read that
    /// reaches `win_trigger` (the reader is consuming it) claims the next one, twice as large.
    win_trigger: usize,
    win_end: usize,
    win_bytes: u64,
}

/// A miss window that the reader keeps consuming doubles up to this many times its first
/// size: a large file read front to back streams at link speed instead of paying a round
/// trip per window.
const MISS_WINDOW_GROWTH: u64 = 16;

/// Everything the reader threads and the workers share.
struct Inner {
    stack: Stack,
    /// Blob digest of each layer of the stack, bottom first.
    blobs: Vec<String>,
    /// Tried in order; the next one is used when one fails or serves corrupt bytes.
    remotes: Vec<Arc<dyn BlobRead>>,
    cache: ChunkCache,
    flights: Mutex<HashMap<ChunkDigest, Arc<Flight>>>,
    opts: FetchOptions,
    readahead: Mutex<HashMap<StreamId, Readahead>>,
    trace: OnceLock<Mutex<TraceRecorder>>,
    stats: Arc<SourceStats>,
    /// A stored trace is being prefetched: it says what the start reads next, so demand
    /// misses fetch no miss window meanwhile (on a Python start the windows were 40 % of the
    /// bytes fetched and delayed the trace's own requests on a 50 MB/s link).
    trace_prefetching: AtomicBool,
    /// Requests in flight for `Fill::Paced`, learnt from every prefetch request's time.
    pacer: Pacer,
}

/// A layer stack of an image, readable at any byte offset.
pub struct LazySource {
    inner: Arc<Inner>,
    pool: Arc<Pool>,
    prefetcher: Mutex<Option<JoinHandle<()>>>,
    pub stats: Arc<SourceStats>,
}

/// Records the order in which chunks are first touched (for trace-based prefetch).
#[derive(Default)]
struct TraceRecorder {
    seen: HashSet<ChunkDigest>,
    order: Vec<ChunkDigest>,
}

impl LazySource {
    /// Open stack `top` (0-based layer index) of the image described by `manifest`, whose
    /// config lists `diff_ids` (one per layer).
    /// Trailers are read once through the remotes and kept in the cache under their digest.
    ///
    /// Each layer's index must name the diff_id the config gives that layer: containerd
    /// files the snapshot under the chain id of those diff_ids and reuses it for every image
    /// that claims them, so an index describing some other tar must not be served under them.
    pub fn open(
        manifest: &Manifest,
        diff_ids: &[String],
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
        if diff_ids.len() != manifest.layers.len() {
            return Err(SourceError::Image(format!(
                "the image config lists {} diff_ids for {} layers",
                diff_ids.len(),
                manifest.layers.len()
            )));
        }
        let mut trailers = Vec::new();
        let mut digests = Vec::new();
        let mut raw = Vec::new();
        for (i, l) in manifest.layers[..=top].iter().enumerate() {
            let t = load_trailer(l, &remotes, &cache)
                .map_err(|e| SourceError::Image(format!("layer {i} ({}): {e}", l.digest)))?;
            let indexed = oci_digest(&t.diff_id);
            if indexed != diff_ids[i] {
                return Err(SourceError::Image(format!(
                    "layer {i} ({}): its index describes the tar {indexed}, but the image config \
                     says {}; refusing to serve it",
                    l.digest, diff_ids[i]
                )));
            }
            trailers.push(t);
            raw.push(blobfmt::parse_oci_digest(&l.digest)?);
            digests.push(l.digest.clone());
        }
        let stack = Stack::new(trailers, &raw)?;
        let stats = Arc::new(SourceStats::default());
        let pool = Arc::new(Pool::new(opts.fetch_threads.max(1), opts.prefetch_requests));
        let src = LazySource {
            inner: Arc::new(Inner {
                stack,
                blobs: digests,
                remotes,
                cache,
                flights: Mutex::new(HashMap::new()),
                opts,
                readahead: Mutex::new(HashMap::new()),
                trace: OnceLock::new(),
                trace_prefetching: AtomicBool::new(false),
                pacer: Pacer::new(pool.prefetch_slots),
                stats: stats.clone(),
            }),
            pool,
            prefetcher: Mutex::new(None),
            stats,
        };
        src.fetch_metadata();
        Ok(src)
    }

    /// Block until the file system's metadata is local (fetched by `open` in the background).
    pub fn wait_metadata(&self) -> Result<()> {
        let n = self.inner.stack.chunks(StreamId::Meta).len();
        let all: Vec<(StreamId, usize)> = (0..n).map(|i| (StreamId::Meta, i)).collect();
        self.fetch_blocking(&all)
    }

    /// Every mount and path lookup reads the file system's own metadata blocks (a few small
    /// chunks: 3 of 1217 in a Debian base image), and a kernel's partition scan reads block 0
    /// as soon as the device starts: fetch them in the background now, in one request, rather
    /// than in the serial misses of those first reads.
    fn fetch_metadata(&self) {
        let inner = &self.inner;
        let claims = inner.claim_range(StreamId::Meta, 0, inner.opts.max_readahead);
        for run in inner.runs(claims, inner.opts.max_request) {
            self.pool
                .submit(Job::new(inner.clone(), run, Prio::Readahead));
        }
    }

    pub fn size(&self) -> u64 {
        self.inner.stack.image_size()
    }

    /// Whether a prefetch would also fill in the rest of the stack.
    pub fn fills(&self) -> bool {
        self.inner.opts.fill != Fill::Off
    }

    pub fn stack(&self) -> &Stack {
        &self.inner.stack
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.inner.cache
    }

    /// Start recording the order of first access to chunks (reads before this are not seen).
    pub fn record_trace(&self) {
        let _ = self.inner.trace.set(Mutex::new(TraceRecorder::default()));
    }

    /// Digests of the chunks read so far, in first-access order (empty unless recording).
    pub fn trace(&self) -> Vec<ChunkDigest> {
        self.inner
            .trace
            .get()
            .map(|t| lock(t).order.clone())
            .unwrap_or_default()
    }

    /// The one read path: plans `[offset, offset + buf.len())` once; copies (or, with `lend`,
    /// lends) what is cached, claims what is missing and hands every missing run to the fetch
    /// workers. Never waits on the network: misses come back as a [`cora_read::Miss`].
    pub fn read_planned(
        &self,
        offset: u64,
        buf: &mut [u8],
        lend: Option<&mut Lend<'_>>,
    ) -> Result<Outcome> {
        let inner = &self.inner;
        let plan = inner.stack.plan(offset, buf.len() as u64)?;
        inner.note_trace(&plan);
        // Before any fetch of ours, so read-ahead runs while this reader waits.
        self.advance_miss_window(&plan);
        self.advise(&plan);
        if let Some(lend) = lend
            && let Some(lent) = self.lend_cached(&plan, lend)?
        {
            return lent.map(|()| Outcome::Lent).map_err(SourceError::Lend);
        }
        let mut missing = Vec::new();
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
                    let c = inner.stack.chunk(stream, index);
                    if inner.cache.read_at(&c.digest, offset as usize, dst)? {
                        inner.stats.hits.fetch_add(1, Ordering::Relaxed);
                    } else {
                        missing.push(MissingPiece {
                            pos,
                            key: (stream, index),
                            offset: offset as usize,
                            len: n,
                        });
                    }
                }
            }
            pos += n;
        }
        if missing.is_empty() {
            return Ok(Outcome::Copied);
        }
        let mut keys: Vec<(StreamId, usize)> = missing.iter().map(|m| m.key).collect();
        keys.sort_by_key(|&(s, i)| (stream_key(s), i));
        keys.dedup();
        let (mine, mut flights, cached) = inner.claim(&keys, true);
        // The demand runs first, so that they reach the link before their window.
        let last = last_per_stream(&mine);
        self.submit_demand(mine);
        let file_last = match buf.len() {
            n if inner.opts.file_window > 0 && n > 0 => {
                inner.stack.extent_last_chunk(offset + n as u64 - 1)
            }
            _ => None,
        };
        self.widen_miss(last, file_last);
        if !cached.is_empty() {
            // Chunks that arrived between our cache miss and the claim: copy them now. One
            // that is gone again (evicted at once) is claimed without asking the cache again.
            let mut again = Vec::new();
            for m in missing.iter().filter(|m| cached.contains(&m.key)) {
                let c = inner.stack.chunk(m.key.0, m.key.1);
                let dst = &mut buf[m.pos..m.pos + m.len];
                if !inner.cache.read_at(&c.digest, m.offset, dst)? {
                    again.push(m.key);
                }
            }
            missing.retain(|m| !cached.contains(&m.key) || again.contains(&m.key));
            again.dedup();
            let (more, theirs, _) = inner.claim(&again, false);
            flights.extend(theirs);
            self.submit_demand(more);
        }
        if missing.is_empty() {
            return Ok(Outcome::Copied);
        }
        Ok(Outcome::Miss(Miss::new(PendingChunks {
            inner: inner.clone(),
            missing,
            flights,
            since: std::time::Instant::now(),
        })))
    }

    /// The miss window: after the last chunk of each stream this read claimed, claim up to
    /// `miss_window` compressed bytes of what follows, fetched beside the demand runs (not in
    /// them, so the reader waits for its own chunks only). When the read ended inside a
    /// file whose last chunk is `file_last`, the window reaches that chunk too (up to
    /// `file_window` bytes): one request for the rest of a file instead of a round trip per
    /// later fault in it. Container starts measured slower with it (they page in parts of
    /// large shared libraries; see `DEVICE_FILE_WINDOW`), hence off by default.
    fn widen_miss(&self, last: Vec<(StreamId, usize)>, file_last: Option<(StreamId, usize)>) {
        let inner = &self.inner;
        let opts = &inner.opts;
        if (opts.miss_window == 0 && opts.file_window == 0)
            || inner.trace_prefetching.load(Ordering::Relaxed)
        {
            return;
        }
        for (s, i) in last {
            let mut bytes = opts.miss_window;
            if let Some((fs, fl)) = file_last
                && fs == s
                && fl > i
            {
                let rest: u64 = inner.stack.chunks(s)[i + 1..=fl]
                    .iter()
                    .map(|c| u64::from(c.compressed_len))
                    .sum();
                bytes = bytes.max(rest.min(opts.file_window));
            }
            if bytes == 0 {
                continue;
            }
            let end = inner.window_end(s, i + 1, bytes);
            {
                let mut ra = lock(&inner.readahead);
                let st = ra.entry(s).or_default();
                // Consumed past its middle: the reader is going through it, not hopping.
                st.win_trigger = i + 1 + (end - i - 1) / 2;
                st.win_end = end;
                // The next window grows from the miss window, not from a file's rest (a
                // reader going on past a 4 MiB file would otherwise claim 8 MiB after it).
                st.win_bytes = opts.miss_window;
            }
            self.claim_window(s, i + 1, bytes);
        }
    }

    /// Claims the chunks of `[from, from + bytes)` not cached or in flight, as read-ahead.
    fn claim_window(&self, s: StreamId, from: usize, bytes: u64) {
        let inner = &self.inner;
        let claims = inner.claim_range(s, from, bytes);
        for run in inner.runs(claims, inner.opts.max_request) {
            self.pool
                .submit(Job::new(inner.clone(), run, Prio::Readahead));
        }
    }

    /// A read inside the last miss window of a stream, at or past its trigger, claims the
    /// next window right after it (double the size, up to [`MISS_WINDOW_GROWTH`] times the
    /// first), its trigger at its start.
    fn advance_miss_window(&self, plan: &[Piece]) {
        let inner = &self.inner;
        if inner.opts.miss_window == 0 || inner.trace_prefetching.load(Ordering::Relaxed) {
            return;
        }
        let mut issue: Vec<(StreamId, usize, u64)> = Vec::new();
        {
            let mut ra = lock(&inner.readahead);
            for p in plan {
                let Piece::Chunk { stream, index, .. } = *p else {
                    continue;
                };
                let Some(st) = ra.get_mut(&stream) else {
                    continue;
                };
                if st.win_bytes == 0 || index < st.win_trigger || index >= st.win_end {
                    continue;
                }
                let bytes = (st.win_bytes * 2).min(inner.opts.miss_window * MISS_WINDOW_GROWTH);
                let from = st.win_end;
                st.win_trigger = from;
                st.win_end = inner.window_end(stream, from, bytes);
                st.win_bytes = bytes;
                if st.win_end > from {
                    issue.push((stream, from, bytes));
                }
            }
        }
        for (s, from, bytes) in issue {
            self.claim_window(s, from, bytes);
        }
    }

    /// Demand runs go to the fetch workers; the reader waits on their flights.
    fn submit_demand(&self, claims: Vec<Claim>) {
        let inner = &self.inner;
        for run in inner.runs(claims, inner.opts.max_request) {
            self.pool.submit(Job::new(inner.clone(), run, Prio::Demand));
        }
    }

    /// Reads on this thread, waiting for misses (tools and tests; transports use
    /// [`BlockSource::read`]).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        cora_read::read_blocking(self, offset, buf)
    }

    /// Lends the cached chunks under `plan` to `lend` if every one of them is cached and can
    /// be mapped, within [`cora_read::MAX_SLICES`] slices; `Ok(None)` (nothing lent) otherwise.
    fn lend_cached(
        &self,
        plan: &[Piece],
        lend: &mut Lend<'_>,
    ) -> Result<Option<std::io::Result<()>>> {
        let inner = &self.inner;
        let mut lent = Vec::with_capacity(plan.len());
        let mut slices = 0usize;
        for p in plan {
            match *p {
                Piece::Zero { len } => {
                    slices += (len as usize).div_ceil(ZEROS.len());
                    lent.push(None);
                }
                Piece::Chunk { stream, index, .. } => {
                    slices += 1;
                    let c = inner.stack.chunk(stream, index);
                    match inner.cache.lend(&c.digest, u64::from(c.uncompressed_len))? {
                        Some(chunk) => lent.push(Some(chunk)),
                        None => return Ok(None),
                    }
                }
            }
            if slices > cora_read::MAX_SLICES {
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
        Ok(Some(lend(&iov)))
    }

    /// Fetches (or waits for) the given chunks on the fetch workers; blocks this thread.
    fn fetch_blocking(&self, wanted: &[(StreamId, usize)]) -> Result<()> {
        let inner = &self.inner;
        let (mine, flights, _cached) = inner.claim(wanted, true);
        self.submit_demand(mine);
        for ((s, i), f) in flights {
            f.wait().map_err(|msg| SourceError::Fetch {
                digest: hex::encode(inner.stack.chunk(s, i).digest),
                blob: inner.blobs[inner.blob_of(s)].clone(),
                msg,
            })?;
        }
        Ok(())
    }

    /// Sequential detection per stream; issues read-ahead windows to the workers.
    fn advise(&self, plan: &[Piece]) {
        let inner = &self.inner;
        if inner.opts.readahead == 0 {
            return;
        }
        // (stream, lowest, highest chunk index) touched by this read.
        let mut spans: Vec<(StreamId, usize, usize)> = Vec::new();
        for p in plan {
            if let Piece::Chunk { stream, index, .. } = *p {
                match spans.iter_mut().find(|(s, _, _)| *s == stream) {
                    Some(span) => {
                        span.1 = span.1.min(index);
                        span.2 = span.2.max(index);
                    }
                    None => spans.push((stream, index, index)),
                }
            }
        }
        if spans.is_empty() {
            return;
        }
        let mut issue: Vec<(StreamId, usize, u64)> = Vec::new();
        {
            let mut ra = lock(&inner.readahead);
            for (s, lo, hi) in spans {
                let st = ra.entry(s).or_default();
                // The same chunk again (small reads, or read_local then read_at of one
                // request) says nothing; moving forward by at most a chunk or two is
                // sequential; anything else starts over.
                if st.last == Some(hi) {
                    continue;
                }
                let sequential = st.last.is_some_and(|l| hi > l && lo <= l + 2);
                st.last = Some(hi);
                if !sequential {
                    st.window = 0;
                    st.next = hi + 1;
                    continue;
                }
                st.next = st.next.max(hi + 1);
                if st.window == 0 {
                    st.window = inner.opts.readahead;
                } else if hi >= st.trigger {
                    st.window = (st.window * 2).min(inner.opts.max_readahead.max(st.window));
                } else {
                    continue;
                }
                st.trigger = st.next;
                let end = inner.window_end(s, st.next, st.window);
                issue.push((s, st.next, st.window));
                st.next = end;
            }
        }
        for (s, from, bytes) in issue {
            let claims = inner.claim_range(s, from, bytes);
            let size = (bytes / 4).clamp(256 << 10, inner.opts.max_request.max(256 << 10));
            for run in inner.runs(claims, size) {
                self.pool
                    .submit(Job::new(inner.clone(), run, Prio::Readahead));
            }
        }
    }

    /// Fetch the chunks `load` returns in the background, in order, below demand reads and
    /// read-ahead, then (with `fill`) the rest of the stack. `load` runs on the background
    /// thread too (it may ask a registry for the trace), so opening a source never waits for
    /// it. One prefetch per source.
    pub fn start_prefetch<F>(&self, load: F)
    where
        F: FnOnce() -> Vec<ChunkDigest> + Send + 'static,
    {
        let mut slot = lock(&self.prefetcher);
        if slot.is_some() {
            warn!("a prefetch is already running; ignoring another");
            return;
        }
        let (inner, pool) = (self.inner.clone(), self.pool.clone());
        let spawned = std::thread::Builder::new()
            .name("cora-prefetch".into())
            .spawn(move || prefetch_feeder(&inner, &pool, load()));
        match spawned {
            Ok(h) => *slot = Some(h),
            Err(e) => warn!(error = %e, "could not start the prefetch thread"),
        }
    }

    /// Block until a background prefetch has fetched everything it set out to (or the source
    /// is being dropped). Returns at once if none was started.
    pub fn wait_prefetch(&self) {
        let h = lock(&self.prefetcher).take();
        if let Some(h) = h
            && h.join().is_err()
        {
            warn!("the prefetch thread panicked");
        }
    }
}

impl BlockSource for LazySource {
    fn size(&self) -> u64 {
        self.inner.stack.image_size()
    }

    fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        lend: Option<&mut Lend<'_>>,
    ) -> std::io::Result<Outcome> {
        cora_read::check_range(offset, buf.len(), self.size())?;
        self.read_planned(offset, buf, lend).map_err(|e| match e {
            SourceError::Lend(e) => e,
            e => std::io::Error::other(e.to_string()),
        })
    }

    fn stats(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.stats.snapshot()).ok()
    }

    fn file_extents(&self, offset: u64, len: usize, out: &mut Vec<FileExtent>) -> bool {
        match self.cached_files(offset, len, out) {
            Ok(found) => found,
            Err(e) => {
                debug!(offset, len, "no file extents: {e}");
                false
            }
        }
    }
}

impl LazySource {
    /// [`BlockSource::file_extents`]: the cache files of a read whose chunks are all cached;
    /// zeros (holes, the padding after each file's last byte) come from /dev/zero. A read
    /// answered here is a cached read: it is traced, advances the miss window and counts its
    /// hits.
    fn cached_files(&self, offset: u64, len: usize, out: &mut Vec<FileExtent>) -> Result<bool> {
        static DEV_ZERO: OnceLock<Option<std::fs::File>> = OnceLock::new();
        let inner = &self.inner;
        let plan = inner.stack.plan(offset, len as u64)?;
        let start = out.len();
        for p in &plan {
            let (stream, index, offset, len) = match *p {
                Piece::Chunk {
                    stream,
                    index,
                    offset,
                    len,
                } => (stream, index, offset, len),
                Piece::Zero { len } => {
                    let zero = DEV_ZERO.get_or_init(|| std::fs::File::open("/dev/zero").ok());
                    let (Some(zero), Ok(len)) = (zero, usize::try_from(len)) else {
                        out.truncate(start);
                        return Ok(false);
                    };
                    out.push(FileExtent {
                        fd: zero.as_raw_fd(),
                        offset: 0,
                        len,
                        hold: None,
                    });
                    continue;
                }
            };
            let c = inner.stack.chunk(stream, index);
            let Some(held) = inner
                .cache
                .open_chunk(&c.digest, u64::from(c.uncompressed_len))?
            else {
                out.truncate(start);
                return Ok(false);
            };
            out.push(FileExtent {
                fd: held.as_raw_fd(),
                offset: held.offset() + u64::from(offset),
                len: len as usize,
                hold: Some(Arc::new(held)),
            });
        }
        inner.note_trace(&plan);
        self.advance_miss_window(&plan);
        self.advise(&plan);
        let chunks = plan
            .iter()
            .filter(|p| matches!(p, Piece::Chunk { .. }))
            .count();
        self.stats.hits.fetch_add(chunks as u64, Ordering::Relaxed);
        Ok(true)
    }
}

impl Drop for LazySource {
    fn drop(&mut self) {
        self.pool.stop();
        if let Some(h) = lock(&self.prefetcher).take() {
            let _ = h.join();
        }
        self.pool.join();
    }
}

/// Claim trace chunks a few runs at a time, so that a demand reader never waits behind a
/// long queue of prefetch work for a chunk the prefetch has claimed; then, with `fill`, the
/// whole stack in stream order, one small request at a time while the source is otherwise idle.
fn prefetch_feeder(inner: &Arc<Inner>, pool: &Arc<Pool>, trace: Vec<ChunkDigest>) {
    let started = std::time::Instant::now();
    let traced_chunks = trace.len();
    if !trace.is_empty() {
        let index = inner.chunk_index();
        let unknown = trace.iter().filter(|d| !index.contains_key(*d)).count();
        if unknown > 0 {
            debug!(unknown, "trace chunks not in this stack are skipped");
        }
        let traced = trace.iter().filter_map(|d| index.get(d).copied());
        // No miss windows until the trace's own fetches are done, not just submitted.
        inner.trace_prefetching.store(true, Ordering::Relaxed);
        let fed = feed(inner, pool, traced, Gate::Slots);
        if fed {
            pool.wait_prefetch_idle();
        }
        inner.trace_prefetching.store(false, Ordering::Relaxed);
        if !fed {
            return;
        }
    }
    let gate = match inner.opts.fill {
        Fill::Off => None,
        Fill::Idle => Some(Gate::Quiet),
        Fill::Paced => Some(Gate::Paced(&inner.pacer)),
        Fill::Always => Some(Gate::Slots),
    };
    if let Some(gate) = gate {
        let streams = std::iter::once(StreamId::Meta)
            .chain((0..inner.stack.layers().len() as u32).map(StreamId::Layer));
        let all = streams.flat_map(|s| (0..inner.stack.chunks(s).len()).map(move |i| (s, i)));
        if feed(inner, pool, all, gate) {
            debug!(
                in_flight = inner.pacer.slots(),
                floor_ms = inner.pacer.floor().map(|f| f.as_secs_f64() * 1e3),
                "background fill done"
            );
        }
    }
    pool.wait_prefetch_idle();
    // Where a start's time goes: how long the trace prefetch (and fill) took, against the
    // demand fetches that happened meanwhile.
    let s = inner.stats.snapshot();
    info!(
        seconds = started.elapsed().as_secs_f64(),
        traced_chunks,
        prefetched = s.prefetched,
        readahead = s.readahead,
        misses = s.misses,
        requests = s.requests,
        fetched_bytes = s.fetched_bytes,
        stalls = s.stalls,
        stall_seconds = s.stall_seconds,
        "prefetch done"
    );
}

/// When the prefetch feeder may submit its next job.
#[derive(Clone, Copy)]
enum Gate<'a> {
    /// While fewer prefetch jobs than the pool's prefetch slots are queued or running.
    Slots,
    /// Only while no fetch of any kind is queued or running.
    Quiet,
    /// While fewer prefetch jobs than the pacer allows are queued or running.
    Paced(&'a Pacer),
}

/// Submits prefetch jobs for `chunks` (those neither cached nor in flight), up to
/// [`PREFETCH_REQUEST`] bytes each, as `gate` lets them through. False when the pool stopped.
fn feed(
    inner: &Arc<Inner>,
    pool: &Arc<Pool>,
    chunks: impl Iterator<Item = (StreamId, usize)>,
    gate: Gate<'_>,
) -> bool {
    let mut pending = chunks.peekable();
    while pending.peek().is_some() {
        if !pool.wait_prefetch_slot(gate) {
            return false;
        }
        let mut claims = Vec::new();
        let mut bytes = 0u64;
        {
            let mut flights = lock(&inner.flights);
            for (s, i) in pending.by_ref() {
                let c = inner.stack.chunk(s, i);
                if flights.contains_key(&c.digest) || inner.cache.contains(&c.digest) {
                    continue;
                }
                let f = Arc::new(Flight::default());
                flights.insert(c.digest, f.clone());
                claims.push((s, i, f));
                bytes += u64::from(c.compressed_len);
                if bytes >= PREFETCH_REQUEST || claims.len() >= 256 {
                    break;
                }
            }
        }
        for run in inner.runs_with_gap(claims, PREFETCH_REQUEST, PREFETCH_GAP) {
            pool.submit(Job::new(inner.clone(), run, Prio::Prefetch));
        }
    }
    true
}

impl Inner {
    fn blob_of(&self, s: StreamId) -> usize {
        match s {
            StreamId::Layer(n) => n as usize,
            StreamId::Meta => self.blobs.len() - 1,
        }
    }

    /// Where each chunk digest of the stack lives (any one place if it occurs twice).
    fn chunk_index(&self) -> HashMap<ChunkDigest, (StreamId, usize)> {
        let mut m = HashMap::new();
        let streams = (0..self.stack.layers().len() as u32)
            .map(StreamId::Layer)
            .chain(std::iter::once(StreamId::Meta));
        for s in streams {
            for (i, c) in self.stack.chunks(s).iter().enumerate() {
                m.entry(c.digest).or_insert((s, i));
            }
        }
        m
    }

    /// Index after the last chunk of a window of `bytes` compressed bytes starting at `from`.
    fn window_end(&self, s: StreamId, from: usize, bytes: u64) -> usize {
        let chunks = self.stack.chunks(s);
        let mut budget = bytes;
        let mut j = from;
        while j < chunks.len() && budget > 0 {
            budget = budget.saturating_sub(u64::from(chunks[j].compressed_len));
            j += 1;
        }
        j
    }

    /// Claims `keys` (sorted, distinct): returns the claims this caller now owns the fetch
    /// of, the flights to wait on (its own and those already in flight), and, with
    /// `check_cache`, the keys found cached after all (another reader finished them).
    #[allow(clippy::type_complexity)]
    fn claim(
        &self,
        keys: &[(StreamId, usize)],
        check_cache: bool,
    ) -> (
        Vec<Claim>,
        Vec<((StreamId, usize), Arc<Flight>)>,
        Vec<(StreamId, usize)>,
    ) {
        let (mut mine, mut waits, mut cached) = (Vec::new(), Vec::new(), Vec::new());
        let mut flights = lock(&self.flights);
        for &(s, i) in keys {
            let d = self.stack.chunk(s, i).digest;
            if let Some(f) = flights.get(&d) {
                waits.push(((s, i), f.clone()));
                continue;
            }
            if check_cache && self.cache.contains(&d) {
                cached.push((s, i));
                continue;
            }
            let f = Arc::new(Flight::default());
            flights.insert(d, f.clone());
            waits.push(((s, i), f.clone()));
            mine.push((s, i, f));
        }
        (mine, waits, cached)
    }

    /// Claim the chunks of a read-ahead window that are neither cached nor in flight.
    fn claim_range(&self, s: StreamId, from: usize, bytes: u64) -> Vec<Claim> {
        let end = self.window_end(s, from, bytes);
        let mut claims = Vec::new();
        let mut flights = lock(&self.flights);
        for j in from..end {
            let d = self.stack.chunk(s, j).digest;
            if flights.contains_key(&d) || self.cache.contains(&d) {
                continue;
            }
            let f = Arc::new(Flight::default());
            flights.insert(d, f.clone());
            claims.push((s, j, f));
        }
        claims
    }

    /// Group claims into runs of adjacent frames of one blob, each at most `max` bytes.
    fn runs(&self, claims: Vec<Claim>, max: u64) -> Vec<Vec<Claim>> {
        self.runs_with_gap(claims, max, self.opts.max_gap)
    }

    /// Like [`Self::runs`], frames up to `max_gap` apart in one run (the gap read and dropped).
    fn runs_with_gap(&self, mut claims: Vec<Claim>, max: u64, max_gap: u64) -> Vec<Vec<Claim>> {
        claims.sort_by_key(|(s, i, _)| (self.blob_of(*s), self.stack.chunk(*s, *i).frame_offset));
        let mut out: Vec<Vec<Claim>> = Vec::new();
        let mut run: Vec<Claim> = Vec::new();
        for item in claims {
            if let Some(last) = run.last() {
                let a = self.stack.chunk(last.0, last.1);
                let b = self.stack.chunk(item.0, item.1);
                let first = self.stack.chunk(run[0].0, run[0].1);
                let same_blob = self.blob_of(last.0) == self.blob_of(item.0);
                if !same_blob
                    || b.frame_offset > a.frame_end() + max_gap
                    || b.frame_end() - first.frame_offset > max
                {
                    out.push(std::mem::take(&mut run));
                }
            }
            run.push(item);
        }
        if !run.is_empty() {
            out.push(run);
        }
        out
    }

    /// Finish the flights of a run that are still open (with `err`) and forget them all.
    fn release(&self, run: &[Claim], err: Option<&SourceError>) {
        let mut flights = lock(&self.flights);
        for (s, i, f) in run {
            if !f.is_done() {
                f.finish(Err(match err {
                    Some(e) => e.to_string(),
                    None => "fetch abandoned".into(),
                }));
            }
            let d = self.stack.chunk(*s, *i).digest;
            if flights.get(&d).is_some_and(|g| Arc::ptr_eq(g, f)) {
                flights.remove(&d);
            }
        }
    }

    /// Fetch one run with one range request, trying the next source on failure or corruption.
    fn fetch_run(&self, run: &[Claim], prio: Prio) -> Result<()> {
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
            let began = std::time::Instant::now();
            let bytes = match remote.read(blob, start, end - start) {
                Ok(b) if b.len() as u64 == end - start => {
                    let took = began.elapsed();
                    self.stats.observe_fetch(took);
                    if prio == Prio::Prefetch {
                        self.pacer.observe(end - start, took);
                    }
                    b
                }
                Ok(b) => {
                    self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(remote = %remote.name(), %blob, got = b.len(), want = end - start, "short range read");
                    last_err = format!("short read: {} of {} bytes", b.len(), end - start);
                    continue;
                }
                Err(e) => {
                    self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
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
                if flight.is_done() {
                    continue;
                }
                let c = self.stack.chunk(*s, *i);
                let lo = (c.frame_offset - start) as usize;
                let frame = &bytes[lo..lo + c.compressed_len as usize];
                match decode_chunk(frame, c) {
                    Ok(data) => {
                        self.stats.misses.fetch_add(1, Ordering::Relaxed);
                        match prio {
                            Prio::Demand => {}
                            Prio::Readahead => {
                                self.stats.readahead.fetch_add(1, Ordering::Relaxed);
                            }
                            Prio::Prefetch => {
                                self.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Stored before waiting readers wake (two `pwrite`s into an open
                        // cache segment, ~20 us for 64 KiB): a ublk reader in AUTO_BUF_REG
                        // mode then reads the chunk from the cache file into the request,
                        // like a hit, instead of copying it in from user space.
                        let data = Arc::new(data);
                        self.store(c, &data);
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
            .find(|(_, _, f)| !f.is_done())
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

    fn store(&self, c: &ChunkEntry, data: &[u8]) {
        // A full or read-only cache must not fail the read: the bytes are verified already
        // (decode_chunk checked the sha256).
        if let Err(e) = self.cache.insert_verified(&c.digest, data) {
            warn!(chunk = %hex::encode(c.digest), error = %e, "could not cache chunk");
        }
    }

    fn note_trace(&self, plan: &[Piece]) {
        let Some(t) = self.trace.get() else { return };
        let mut t = lock(t);
        for p in plan {
            if let Piece::Chunk { stream, index, .. } = *p {
                let d = self.stack.chunk(stream, index).digest;
                if t.seen.insert(d) {
                    t.order.push(d);
                }
            }
        }
    }
}

/// A run handed to a worker. Dropped unrun (the source is closing), it fails its flights so
/// no reader waits forever.
struct Job {
    inner: Arc<Inner>,
    run: Vec<Claim>,
    prio: Prio,
}

impl Job {
    fn new(inner: Arc<Inner>, run: Vec<Claim>, prio: Prio) -> Job {
        Job { inner, run, prio }
    }

    fn execute(&self) {
        let result = self.inner.fetch_run(&self.run, self.prio);
        if let Err(e) = &result {
            debug!(error = %e, prio = ?self.prio, "background fetch failed");
        }
        self.inner.release(&self.run, result.as_ref().err());
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // After `execute` every flight is done and forgotten; this only acts on unrun jobs.
        if self.run.iter().any(|(_, _, f)| !f.is_done()) {
            self.inner.release(&self.run, None);
        }
    }
}

/// Worker threads taking jobs by priority; started on demand up to `threads`.
struct Pool {
    state: Mutex<PoolState>,
    /// Workers wait here for jobs.
    work: Condvar,
    /// The prefetch feeder waits here for a free prefetch slot.
    progress: Condvar,
    threads: usize,
    prefetch_slots: usize,
}

#[derive(Default)]
struct PoolState {
    queues: [VecDeque<Job>; 3],
    running: [usize; 3],
    idle: usize,
    handles: Vec<JoinHandle<()>>,
    stop: bool,
}

impl Pool {
    fn new(threads: usize, prefetch_slots: usize) -> Pool {
        Pool {
            state: Mutex::new(PoolState::default()),
            work: Condvar::new(),
            progress: Condvar::new(),
            threads,
            prefetch_slots: prefetch_slots.clamp(1, threads.saturating_sub(1).max(1)),
        }
    }

    fn submit(self: &Arc<Self>, job: Job) {
        let mut st = lock(&self.state);
        if st.stop {
            return; // dropping the job fails its flights
        }
        st.queues[job.prio as usize].push_back(job);
        let queued: usize = st.queues.iter().map(VecDeque::len).sum();
        if queued > st.idle && st.handles.len() < self.threads {
            let pool = self.clone();
            match std::thread::Builder::new()
                .name("cora-fetch".into())
                .spawn(move || pool.work_loop())
            {
                Ok(h) => st.handles.push(h),
                Err(e) => warn!(error = %e, "could not start a fetch worker"),
            }
        }
        // With no worker at all the job would never run: fail it rather than hang readers.
        if st.handles.is_empty() {
            let jobs: Vec<Job> = st.queues.iter_mut().flat_map(|q| q.drain(..)).collect();
            drop(st);
            drop(jobs);
            return;
        }
        self.work.notify_one();
    }

    fn pop(&self, st: &mut PoolState) -> Option<Job> {
        for p in [Prio::Demand, Prio::Readahead, Prio::Prefetch] {
            if p == Prio::Prefetch && st.running[p as usize] >= self.prefetch_slots {
                continue;
            }
            if let Some(j) = st.queues[p as usize].pop_front() {
                st.running[p as usize] += 1;
                return Some(j);
            }
        }
        None
    }

    fn work_loop(&self) {
        loop {
            let job = {
                let mut st = lock(&self.state);
                loop {
                    if st.stop {
                        return;
                    }
                    if let Some(j) = self.pop(&mut st) {
                        break j;
                    }
                    st.idle += 1;
                    st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.idle -= 1;
                }
            };
            let prio = job.prio;
            let stats = job.inner.stats.clone();
            // A panic fails this job's flights (its Drop releases them) and the worker lives
            // on: a pool that counted a dead worker would leave later reads waiting forever.
            // Counted before the drop, so a read failed by it already sees the count.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.execute())).is_err() {
                stats.worker_panics.fetch_add(1, Ordering::Relaxed);
                warn!("a fetch worker panicked; its reads fail");
            }
            drop(job);
            let mut st = lock(&self.state);
            st.running[prio as usize] -= 1;
            drop(st);
            // A finished job may free a prefetch slot or unblock a queued prefetch job.
            self.work.notify_one();
            self.progress.notify_all();
        }
    }

    /// Wait until `gate` lets the next prefetch job through; false when stopping.
    fn wait_prefetch_slot(&self, gate: Gate<'_>) -> bool {
        let mut st = lock(&self.state);
        loop {
            if st.stop {
                return false;
            }
            let p = Prio::Prefetch as usize;
            let busy = |q: usize| st.queues[q].len() + st.running[q];
            let free = match gate {
                Gate::Quiet => (0..3).all(|q| busy(q) == 0),
                Gate::Slots => busy(p) < self.prefetch_slots,
                Gate::Paced(pacer) => busy(p) < pacer.slots().min(self.prefetch_slots),
            };
            if free {
                return true;
            }
            st = self.progress.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Wait until no prefetch job is queued or running (or the pool stops).
    fn wait_prefetch_idle(&self) {
        let mut st = lock(&self.state);
        let p = Prio::Prefetch as usize;
        while !st.stop && st.queues[p].len() + st.running[p] > 0 {
            st = self.progress.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn stop(&self) {
        let jobs: Vec<Job> = {
            let mut st = lock(&self.state);
            st.stop = true;
            st.queues.iter_mut().flat_map(|q| q.drain(..)).collect()
        };
        drop(jobs);
        self.work.notify_all();
        self.progress.notify_all();
    }

    fn join(&self) {
        let handles = std::mem::take(&mut lock(&self.state).handles);
        for h in handles {
            let _ = h.join();
        }
    }
}

/// Shared zeros for holes in lent reads.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

fn stream_key(s: StreamId) -> u64 {
    match s {
        StreamId::Layer(n) => u64::from(n),
        StreamId::Meta => u64::MAX,
    }
}

/// A layer's trailer: from the cache by its digest, or through the remotes.
///
/// The trailer maps the image to chunk digests, so everything served rests on it: it is
/// accepted only under the digest the manifest's annotations give (the manifest is what the
/// user pulled by name or digest). The footer at the end of the blob says the same but is
/// unauthenticated bytes from a range read, so a layer without the annotations is refused.
fn load_trailer(
    layer: &blobfmt::oci::Descriptor,
    remotes: &[Arc<dyn BlobRead>],
    cache: &ChunkCache,
) -> Result<Trailer, String> {
    let ann = layer.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k));
    if get(annotation::VERSION).is_none() {
        return Err(format!(
            "not a CORA layer ({}); convert the image with `cora convert`",
            layer.media_type
        ));
    }
    let field = |k: &str| {
        get(k).ok_or_else(|| {
            format!(
                "the manifest lacks annotation {k}, which authenticates the layer's index; \
                 convert the image again with `cora convert`"
            )
        })
    };
    let number = |k: &str| {
        field(k)?
            .parse::<u64>()
            .map_err(|e| format!("annotation {k}: {e}"))
    };
    let footer = Footer {
        version: blobfmt::format::VERSION,
        flags: 0,
        trailer_offset: number(annotation::TRAILER_OFFSET)?,
        trailer_length: number(annotation::TRAILER_LENGTH)?,
        trailer_digest: blobfmt::parse_oci_digest(field(annotation::TRAILER_DIGEST)?)
            .map_err(|e| format!("annotation {}: {e}", annotation::TRAILER_DIGEST))?,
    };
    if footer.trailer_length > blobfmt::format::MAX_TRAILER as u64 {
        return Err("trailer is implausibly large".into());
    }
    if let Ok(Some(frame)) = cache.get(&footer.trailer_digest)
        && let Ok(t) = Trailer::decode_frame(&frame, &footer)
    {
        return Ok(t);
    }
    let mut last = String::from("no source");
    for remote in remotes {
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
        oci_digest(&footer.trailer_digest)
    ))
}
