//! Reads that miss complete on a fetch thread while the session keeps serving; failed fetches
//! give EIO until the source recovers; lent slices reach the reader intact.
mod common;

use std::collections::HashSet;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};

use common::{assert_gone, open_image, pattern, pread};
use cora_fuse::{FuseOptions, mount};
use cora_read::{BlockSource, Lend, Miss, Outcome, PendingRead, check_range};

const PIECE: u64 = 64 << 10;

/// A fetch: the pieces a read waits for, where its outcome goes, and its wake-up.
struct Job {
    pieces: Vec<u64>,
    result: Arc<Mutex<Option<io::Result<()>>>>,
    wake: Box<dyn FnOnce() + Send>,
}

/// State shared by the source, its pending reads and its fetch thread.
struct State {
    data: Vec<u8>,
    fetched: Mutex<HashSet<u64>>,
    /// The fetch thread holds every fetch until this opens.
    gate: Mutex<bool>,
    gate_cv: Condvar,
    /// Fetches registered (when_ready called), for the test to wait on.
    misses: Mutex<usize>,
    misses_cv: Condvar,
    /// Fetches fail while set.
    failing: AtomicBool,
    /// Reads answered Copied.
    hits: AtomicUsize,
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// An image whose 64 KiB pieces are local only once "fetched" by a fetch thread.
struct Lazy(Arc<State>);

impl Lazy {
    fn new(size: usize, local: Range<u64>, gate_open: bool) -> Lazy {
        let (tx, rx) = mpsc::channel::<Job>();
        let state = Arc::new(State {
            data: pattern(size, 7),
            fetched: Mutex::new(local.collect()),
            gate: Mutex::new(gate_open),
            gate_cv: Condvar::new(),
            misses: Mutex::new(0),
            misses_cv: Condvar::new(),
            failing: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            jobs: Mutex::new(tx),
        });
        // Weak, so the thread ends when the source and its pending reads (and with them the
        // sender) are gone.
        let weak = Arc::downgrade(&state);
        std::thread::spawn(move || {
            for job in rx {
                // Gone: the read was abandoned; dropping its wake-up is all that is left.
                let Some(fetcher) = weak.upgrade() else {
                    continue;
                };
                let open = fetcher.gate.lock().unwrap();
                drop(fetcher.gate_cv.wait_while(open, |open| !*open).unwrap());
                let res = if fetcher.failing.load(Ordering::SeqCst) {
                    Err(io::Error::other("simulated fetch failure"))
                } else {
                    fetcher.fetched.lock().unwrap().extend(&job.pieces);
                    Ok(())
                };
                *job.result.lock().unwrap() = Some(res);
                (job.wake)();
            }
        });
        Lazy(state)
    }

    fn open_gate(&self) {
        *self.0.gate.lock().unwrap() = true;
        self.0.gate_cv.notify_all();
    }

    fn wait_misses(&self, n: usize) {
        let m = self.0.misses.lock().unwrap();
        drop(self.0.misses_cv.wait_while(m, |m| *m < n).unwrap());
    }

    fn bytes(&self, offset: u64, len: usize) -> &[u8] {
        let end = (offset as usize + len).min(self.0.data.len());
        &self.0.data[offset as usize..end]
    }
}

fn pieces(offset: u64, len: usize) -> Range<u64> {
    offset / PIECE..(offset + len as u64).div_ceil(PIECE)
}

/// `[offset, offset + len)` ∩ piece `p`, relative to `offset`.
fn overlap(offset: u64, len: usize, p: u64) -> Range<usize> {
    let start = (p * PIECE).max(offset);
    let end = ((p + 1) * PIECE).min(offset + len as u64);
    (start - offset) as usize..(end - offset) as usize
}

impl BlockSource for Lazy {
    fn size(&self) -> u64 {
        self.0.data.len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8], _: Option<&mut Lend<'_>>) -> io::Result<Outcome> {
        check_range(offset, buf.len(), self.size())?;
        let fetched = self.0.fetched.lock().unwrap();
        let mut missing = Vec::new();
        for p in pieces(offset, buf.len()) {
            let r = overlap(offset, buf.len(), p);
            if fetched.contains(&p) {
                let src = offset as usize + r.start..offset as usize + r.end;
                buf[r].copy_from_slice(&self.0.data[src]);
            } else {
                missing.push(p);
            }
        }
        if missing.is_empty() {
            self.0.hits.fetch_add(1, Ordering::SeqCst);
            return Ok(Outcome::Copied);
        }
        Ok(Outcome::Miss(Miss::new(Pending {
            state: Arc::clone(&self.0),
            offset,
            missing,
            result: Arc::default(),
        })))
    }
}

struct Pending {
    state: Arc<State>,
    offset: u64,
    missing: Vec<u64>,
    result: Arc<Mutex<Option<io::Result<()>>>>,
}

impl PendingRead for Pending {
    fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>) {
        let job = Job {
            pieces: self.missing.clone(),
            result: Arc::clone(&self.result),
            wake,
        };
        self.state.jobs.lock().unwrap().send(job).unwrap();
        *self.state.misses.lock().unwrap() += 1;
        self.state.misses_cv.notify_all();
    }

    fn finish(self: Box<Self>, buf: &mut [u8]) -> io::Result<()> {
        let res = self.result.lock().unwrap().take();
        res.unwrap_or_else(|| Err(io::Error::other("finished before the wake-up")))?;
        for &p in &self.missing {
            let r = overlap(self.offset, buf.len(), p);
            let src = self.offset as usize + r.start..self.offset as usize + r.end;
            buf[r].copy_from_slice(&self.state.data[src]);
        }
        Ok(())
    }
}

fn one_thread() -> FuseOptions {
    // One event loop: if a miss held it, nothing else would be answered.
    FuseOptions {
        threads: 1,
        ..FuseOptions::default()
    }
}

#[test]
fn a_local_read_is_answered_while_misses_wait() {
    let _serial = common::serial();
    let size = (16 * PIECE + 1234) as usize;
    // Pieces 0..4 are local, the rest are fetched on demand.
    let src = Arc::new(Lazy::new(size, 0..4, false));
    let dir = tempfile::tempdir().unwrap();
    let mut fuse = mount(src.clone(), dir.path(), &one_thread()).unwrap();
    let connection = fuse.connection();
    let file = Arc::new(open_image(&fuse, true));

    // (offset, len): a missing piece, local + missing, an unaligned pair of missing pieces,
    // and the last piece past the end of the file.
    let reads = [
        (5 * PIECE, PIECE as usize),
        (3 * PIECE, 2 * PIECE as usize),
        (9 * PIECE + 4096, PIECE as usize + 8192),
        (16 * PIECE, PIECE as usize),
    ];
    let readers: Vec<_> = reads
        .iter()
        .map(|&(offset, len)| {
            let file = Arc::clone(&file);
            std::thread::spawn(move || pread(&file, offset, len).unwrap())
        })
        .collect();
    // Every reader is now waiting on its fetch, which the closed gate holds.
    src.wait_misses(reads.len());
    let local = pread(&file, PIECE, 2 * PIECE as usize).unwrap();
    assert!(local == src.bytes(PIECE, 2 * PIECE as usize));
    assert!(readers.iter().all(|r| !r.is_finished()));

    src.open_gate();
    for (r, (offset, len)) in readers.into_iter().zip(reads) {
        let got = r.join().unwrap();
        assert_eq!(got.len(), src.bytes(offset, len).len(), "read at {offset}");
        assert!(got == src.bytes(offset, len), "read at {offset}");
    }
    assert_eq!(
        pread(&file, 16 * PIECE, PIECE as usize).unwrap().len(),
        1234
    );

    // Fetched now: served inline.
    let hits = src.0.hits.load(Ordering::SeqCst);
    assert!(
        pread(&file, 5 * PIECE, PIECE as usize).unwrap() == src.bytes(5 * PIECE, PIECE as usize)
    );
    assert_eq!(src.0.hits.load(Ordering::SeqCst), hits + 1);

    drop(file);
    fuse.unmount().unwrap();
    assert_gone(dir.path(), connection);
}

#[test]
fn concurrent_reads_from_many_threads_return_the_right_bytes() {
    let _serial = common::serial();
    let size = (40 * PIECE + 777) as usize;
    let src = Arc::new(Lazy::new(size, 0..0, true));
    let dir = tempfile::tempdir().unwrap();
    let opts = FuseOptions {
        threads: 2,
        ..FuseOptions::default()
    };
    let fuse = mount(src.clone(), dir.path(), &opts).unwrap();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let (src, direct) = (Arc::clone(&src), t % 2 == 0);
            let file = open_image(&fuse, direct);
            std::thread::spawn(move || {
                for i in 0..20u64 {
                    // Spread over the image, unaligned, some across piece edges and the end.
                    let offset = ((t * 7919 + i * 104_729) * 4096) % (size as u64 + 8192);
                    let len = (4096 * (1 + (i + t) % 40)) as usize;
                    let got = pread(&file, offset, len).unwrap();
                    let want = if offset >= size as u64 {
                        &[][..]
                    } else {
                        src.bytes(offset, len)
                    };
                    assert!(got == want, "thread {t} read {len} at {offset}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Drop unmounts as well.
    let connection = fuse.connection();
    drop(fuse);
    assert_gone(dir.path(), connection);
}

#[test]
fn a_failed_fetch_gives_eio_and_a_later_read_succeeds() {
    let _serial = common::serial();
    let size = (8 * PIECE) as usize;
    let src = Arc::new(Lazy::new(size, 0..1, true));
    let dir = tempfile::tempdir().unwrap();
    let fuse = mount(src.clone(), dir.path(), &one_thread()).unwrap();
    for direct in [true, false] {
        let file = open_image(&fuse, direct);
        // Different pieces each round: the first round fetched its piece in the end.
        let offset = if direct { 2 * PIECE } else { 5 * PIECE };
        src.0.failing.store(true, Ordering::SeqCst);
        let err = pread(&file, offset, 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        // Still serving.
        assert!(pread(&file, 0, 4096).unwrap() == src.bytes(0, 4096));
        src.0.failing.store(false, Ordering::SeqCst);
        assert!(pread(&file, offset, 4096).unwrap() == src.bytes(offset, 4096));
    }
}

/// Lends its bytes as several slices of its own memory, to exercise the gathered reply.
struct Slicing {
    data: Vec<u8>,
    lent: AtomicUsize,
}

impl BlockSource for Slicing {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        lend: Option<&mut Lend<'_>>,
    ) -> io::Result<Outcome> {
        check_range(offset, buf.len(), self.size())?;
        let bytes = &self.data[offset as usize..offset as usize + buf.len()];
        match lend {
            Some(lend) => {
                // Uneven slices, one per started 20000 bytes.
                let iov: Vec<_> = bytes.chunks(20_000).map(IoSlice::new).collect();
                // Counted first: lending answers the reader, who may look right away.
                self.lent.fetch_add(1, Ordering::SeqCst);
                lend(&iov)?;
                Ok(Outcome::Lent)
            }
            None => {
                buf.copy_from_slice(bytes);
                Ok(Outcome::Copied)
            }
        }
    }
}

#[test]
fn lent_slices_reach_the_reader() {
    let _serial = common::serial();
    let src = Arc::new(Slicing {
        data: pattern(3 << 20, 11),
        lent: AtomicUsize::new(0),
    });
    let dir = tempfile::tempdir().unwrap();
    let fuse = mount(src.clone(), dir.path(), &FuseOptions::default()).unwrap();
    let file = open_image(&fuse, true);
    let got = pread(&file, 12_288, 1 << 20).unwrap();
    assert!(got == src.data[12_288..12_288 + (1 << 20)]);
    assert!(src.lent.load(Ordering::SeqCst) > 0, "lent");
    // Small reads are copied.
    let lent = src.lent.load(Ordering::SeqCst);
    assert!(pread(&file, 4096, 4096).unwrap() == src.data[4096..8192]);
    assert_eq!(src.lent.load(Ordering::SeqCst), lent);
    // The whole file through the page cache.
    assert!(std::fs::read(fuse.image_path()).unwrap() == src.data);
}

/// Misses whose wake-up runs inside `when_ready` (the fetch was done by then), or never runs
/// because the source drops it.
struct Quirky {
    data: Vec<u8>,
    drop_wake: bool,
}

struct QuirkyPending {
    bytes: Vec<u8>,
    drop_wake: bool,
}

impl PendingRead for QuirkyPending {
    fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>) {
        if self.drop_wake {
            drop(wake);
        } else {
            wake();
        }
    }
    fn finish(self: Box<Self>, buf: &mut [u8]) -> io::Result<()> {
        buf.copy_from_slice(&self.bytes);
        Ok(())
    }
}

impl BlockSource for Quirky {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read(&self, offset: u64, buf: &mut [u8], _: Option<&mut Lend<'_>>) -> io::Result<Outcome> {
        check_range(offset, buf.len(), self.size())?;
        let bytes = self.data[offset as usize..offset as usize + buf.len()].to_vec();
        Ok(Outcome::Miss(Miss::new(QuirkyPending {
            bytes,
            drop_wake: self.drop_wake,
        })))
    }
}

#[test]
fn misses_woken_inline_are_answered_and_dropped_wake_ups_fail() {
    let _serial = common::serial();
    for drop_wake in [false, true] {
        let src = Arc::new(Quirky {
            data: pattern(200_000, 13),
            drop_wake,
        });
        let dir = tempfile::tempdir().unwrap();
        let fuse = mount(src.clone(), dir.path(), &one_thread()).unwrap();
        let file = open_image(&fuse, true);
        for (offset, len) in [(0, 4096), (8192, 100_000), (196_608, 8192)] {
            match pread(&file, offset, len) {
                Ok(got) if !drop_wake => {
                    let end = (offset as usize + len).min(src.data.len());
                    assert!(got == src.data[offset as usize..end], "read at {offset}");
                }
                Err(e) if drop_wake => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
                other => panic!("drop_wake {drop_wake}, read at {offset}: {other:?}"),
            }
        }
        let connection = fuse.connection();
        drop(file);
        drop(fuse);
        assert_gone(dir.path(), connection);
    }
}
