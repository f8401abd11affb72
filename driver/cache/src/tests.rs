use super::*;
use proptest::prelude::*;
use std::time::UNIX_EPOCH;

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub(crate) fn chunk_bytes(seed: u64, len: usize) -> Vec<u8> {
    cora_testdata::pseudo_random(len, seed)
}

fn entry(seed: u64, len: usize) -> (ChunkDigest, Vec<u8>) {
    let data = chunk_bytes(seed, len);
    (sha256(&data), data)
}

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn opts(mmap: bool) -> CacheOptions {
    let mut o = CacheOptions::new(u64::MAX);
    o.mmap = mmap;
    o
}

fn open_manual(dir: &Path, limit: u64, clock: &ManualClock) -> ChunkCache {
    let mut opts = CacheOptions::new(limit);
    opts.clock = Arc::new(clock.clone());
    // One chunk per segment: eviction and recency then work chunk by chunk.
    opts.segment_bytes = 1;
    ChunkCache::open_with(dir, opts).expect("open cache")
}

/// Every record on disk, by scanning the segment files (not trusting any index).
fn records_on_disk(dir: &Path) -> Vec<ChunkDigest> {
    let segs = dir.join("segments");
    let listing = index::list(&segs).expect("list");
    let mut out = Vec::new();
    for name in listing.segs {
        let file = File::open(index::seg_path(&segs, &name)).expect("open segment");
        let len = file.metadata().expect("stat").len();
        let (entries, _) =
            index::scan_records(&file, format::SEG_HEADER_LEN, len).expect("scan segment");
        out.extend(entries.iter().map(|e| e.digest));
    }
    out
}

/// The segment file holding `d` and the offset of its bytes, as `cache` sees it.
fn place(cache: &ChunkCache, d: &ChunkDigest) -> (PathBuf, u64) {
    let loc = cache.inner.view(d, None, None).flatten().expect("cached");
    let name = cache.inner.index_read().segs[&loc.seg].name.clone();
    (index::seg_path(&cache.inner.segs_dir, &name), loc.offset)
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(bytes, offset))
        .expect("patch segment");
}

#[test]
fn handle_is_clone_send_sync_and_clock_is_sane() {
    fn assert_traits<T: Clone + Send + Sync + 'static>() {}
    assert_traits::<ChunkCache>();
    let coarse = SystemClock.now();
    let precise = SystemTime::now();
    let skew = precise
        .duration_since(coarse)
        .unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(1),
        "coarse clock off by {skew:?}"
    );
}

#[test]
fn round_trip_whole_and_sub_ranges() {
    round_trip_whole_and_sub_ranges_in(false);
}

#[test]
fn round_trip_whole_and_sub_ranges_mmap() {
    round_trip_whole_and_sub_ranges_in(true);
}

fn round_trip_whole_and_sub_ranges_in(mmap: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open");
    let (d, data) = entry(1, 70_000);
    assert!(!cache.contains(&d));
    let mut buf = [0u8; 16];
    assert!(!cache.read_at(&d, 0, &mut buf).expect("read absent"));
    cache.insert(&d, &data).expect("insert");
    assert!(cache.contains(&d));
    assert_eq!(cache.get(&d).expect("get").as_deref(), Some(&data[..]));
    for (off, len) in [
        (0, 4096),
        (4096, 4096),
        (65_536, 4464),
        (69_999, 1),
        (123, 0),
    ] {
        let mut buf = vec![0u8; len];
        assert!(cache.read_at(&d, off, &mut buf).expect("read"));
        assert_eq!(buf, &data[off..off + len]);
    }
    // Another handle (another process's view, catching up from disk) reads the same bytes,
    // from the writer's segment while it is still open.
    let other = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open again");
    let mut buf = vec![0u8; 1000];
    assert!(other.read_at(&d, 5000, &mut buf).expect("read"));
    assert_eq!(buf, &data[5000..6000]);
    let s = cache.stats().expect("stats");
    assert_eq!(
        (s.entries, s.bytes, s.inserts, s.segments),
        (1, 70_000, 1, 1)
    );
    assert_eq!(s.misses, 1);
    // The chunk's bytes follow the segment header and its record header.
    assert_eq!(place(&cache, &d).1, 128);
}

#[test]
fn a_read_past_the_chunk_is_an_error_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (d, data) = entry(2, 1000);
    let mut buf = vec![0xeeu8; 2];
    let err = cache
        .read_at(&d, usize::MAX, &mut buf)
        .expect_err("range overflows");
    assert!(matches!(err, CacheError::OutOfRange { .. }), "{err}");
    cache.insert(&d, &data).expect("insert");
    // An empty read at the very end is in range.
    assert!(cache.read_at(&d, 1000, &mut []).expect("empty read"));
    for (off, len) in [(999, 2), (1000, 1), (5000, 10)] {
        let mut buf = vec![0xeeu8; len];
        let err = cache.read_at(&d, off, &mut buf).expect_err("out of range");
        assert!(matches!(err, CacheError::OutOfRange { .. }), "{err}");
        assert!(buf.iter().all(|&b| b == 0xee));
        assert!(cache.contains(&d));
    }
    // Lending or opening it as a chunk of another length is a miss.
    assert!(cache.lend(&d, 1001).expect("lend").is_none());
    assert!(cache.open_chunk(&d, 999).expect("open").is_none());
    assert!(cache.open_chunk(&d, 1000).expect("open").is_some());
}

#[test]
fn wrong_digest_is_rejected_and_nothing_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (d, _) = entry(3, 500);
    let err = cache.insert(&d, b"not the data").expect_err("mismatch");
    assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
    assert!(!cache.contains(&d));
    assert!(records_on_disk(dir.path()).is_empty());
    assert_eq!(cache.stats().expect("stats").entries, 0);
}

#[test]
fn empty_chunk_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    assert_eq!(sha256(b""), EMPTY_SHA256);
    cache.insert(&EMPTY_SHA256, b"").expect("insert empty");
    let (d, data) = entry(33, 100);
    cache.insert(&d, &data).expect("insert after the empty one");
    let other = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    assert_eq!(other.get(&EMPTY_SHA256).expect("get"), Some(Vec::new()));
    assert_eq!(other.get(&d).expect("get"), Some(data));
}

#[test]
fn concurrent_inserts_of_one_digest_store_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (d, data) = entry(4, 100_000);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                // Separate handles: separate writers and insert locks, as in processes.
                let c = ChunkCache::open(dir.path(), u64::MAX).expect("open");
                c.insert(&d, &data).expect("insert");
            });
            // And threads of one handle.
            s.spawn(|| cache.insert(&d, &data).expect("insert"));
        }
    });
    assert_eq!(cache.get(&d).expect("get").as_deref(), Some(&data[..]));
    assert_eq!(
        records_on_disk(dir.path()),
        vec![d],
        "stored more than once"
    );
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.bytes), (1, 100_000));
}

#[test]
fn a_dead_writers_torn_tail_is_cut_and_its_records_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chunks: Vec<_> = (0..4).map(|i| entry(50 + i, 10_000)).collect();
    let (seg, last_offset) = {
        let writer = ChunkCache::open(dir.path(), u64::MAX).expect("open");
        for (d, data) in &chunks {
            writer.insert(d, data).expect("insert");
        }
        place(&writer, &chunks[3].0)
    };
    // As if the writer had died while writing the last chunk: no index, and the file ends
    // in the middle of the last chunk's bytes. And a stale index temp file of a sealer.
    let idx = seg.with_extension("idx");
    fs::remove_file(&idx).expect("remove index");
    let torn_len = last_offset + 5000;
    File::options()
        .write(true)
        .open(&seg)
        .and_then(|f| f.set_len(torn_len))
        .expect("truncate");
    let reader = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    for (d, data) in &chunks[..3] {
        assert_eq!(reader.get(d).expect("get").as_deref(), Some(&data[..]));
    }
    assert!(!reader.contains(&chunks[3].0), "torn record served");
    // Opening sealed it: an index, and the tail cut at the end of the last whole record.
    let end = place(&reader, &chunks[2].0).1 + 10_000;
    assert_eq!(fs::metadata(&seg).expect("stat").len(), end);
    assert!(idx.exists());
    // The torn chunk can be stored again, and gc finds everything intact.
    reader.insert(&chunks[3].0, &chunks[3].1).expect("insert");
    let report = reader.gc().expect("gc");
    assert_eq!((report.verified, report.removed.len()), (4, 0), "{report}");
}

#[test]
fn a_record_whose_header_never_made_it_is_invisible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, data_a) = entry(60, 9000);
    let (b, data_b) = entry(61, 9000);
    let writer = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    writer.insert(&a, &data_a).expect("insert");
    writer.insert(&b, &data_b).expect("insert");
    let (seg, offset_b) = place(&writer, &b);
    // A reader scans the open segment by its record headers: zero b's header (its bytes
    // were written, the header not yet) and b is not there; a's is still served.
    patch(&seg, offset_b - format::REC_HEADER_LEN, &[0u8; 64]);
    let reader = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    assert_eq!(reader.get(&a).expect("get"), Some(data_a));
    assert!(!reader.contains(&b));
}

#[test]
fn entries_from_an_earlier_boot_are_checked_once_and_damaged_ones_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let boot = |id: u8, verify: bool| {
        let mut o = CacheOptions::new(u64::MAX);
        o.boot_id = Some([id; 16]);
        o.verify_on_open = verify;
        ChunkCache::open_with(dir.path(), o).expect("open")
    };
    let chunks: Vec<_> = (0..5).map(|i| entry(70 + i, 20_000)).collect();
    let (seg, offset) = {
        let before = boot(1, true);
        for (d, data) in &chunks {
            before.insert(d, data).expect("insert");
        }
        place(&before, &chunks[1].0)
    };
    // A power cut lost part of chunk 1's bytes: its header made it to disk, its data not.
    patch(&seg, offset + 4096, &[0u8; 4096]);

    // The same boot trusts its own writes (no power cut can have happened in between).
    let same = boot(1, true);
    let mut buf = [0u8; 8];
    assert!(same.read_at(&chunks[0].0, 0, &mut buf).expect("read"));
    assert_eq!(same.stats().expect("stats").verified_on_open, 0);

    let after = boot(2, true);
    for round in 0..2 {
        for (i, (d, data)) in chunks.iter().enumerate() {
            let got = after.get(d).expect("get");
            if i == 1 {
                assert_eq!(got, None, "damaged entry served");
            } else {
                assert_eq!(got.as_deref(), Some(&data[..]), "round {round}");
            }
        }
    }
    let s = after.stats().expect("stats");
    assert_eq!((s.verified_on_open, s.corrupt), (5, 1), "each checked once");
    // Without the check, the damage is served; gc finds it by sha256 and puts the segment's
    // good entries under a new name, which every process loads instead.
    let trusting = boot(2, false);
    assert_ne!(
        trusting.get(&chunks[1].0).expect("get").as_deref(),
        Some(&chunks[1].1[..])
    );
    let report = after.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::Corrupt), 1, "{report}");
    assert_eq!(report.verified, 4);
    assert!(!seg.exists());
    assert!(!trusting.contains(&chunks[1].0));
    for (i, (d, data)) in chunks.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_eq!(
            trusting.get(d).expect("get").as_deref(),
            Some(&data[..]),
            "{i}"
        );
    }
    // Stored again, it is whole.
    after.insert(&chunks[1].0, &chunks[1].1).expect("insert");
    assert_eq!(
        trusting.get(&chunks[1].0).expect("get"),
        Some(chunks[1].1.clone())
    );
}

#[test]
fn odd_files_do_not_break_reads_and_gc_removes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(0));
    let cache = open_manual(dir.path(), u64::MAX, &clock);
    let (good, data) = entry(10, 3000);
    cache.insert(&good, &data).expect("insert");
    let segs = dir.path().join("segments");
    let name = "0000000000000001-00000001-00000001";
    fs::write(segs.join("README"), b"x").expect("junk");
    fs::create_dir_all(segs.join("zz")).expect("junk dir");
    // A segment of garbage, a segment too short for a header, an index without segment.
    fs::write(segs.join(format!("{name}.seg")), vec![7u8; 9000]).expect("junk segment");
    fs::write(segs.join("0000000000000002-00000001-00000001.seg"), b"CORA").expect("short");
    fs::write(segs.join("0000000000000003-00000001-00000001.idx"), b"x").expect("orphan");
    // A sealer's temp file: young ones are kept.
    let tmp = segs.join(format!("{name}.idx.tmp.1.1"));
    fs::write(&tmp, b"partial").expect("temp");
    File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(t(0)))
        .expect("mtime");
    let other = open_manual(dir.path(), u64::MAX, &clock);
    let mut buf = [0u8; 8];
    assert!(other.read_at(&good, 0, &mut buf).expect("good"));
    let s = other.stats().expect("stats");
    assert_eq!((s.entries, s.bytes), (1, 3000));
    // Segments without a single valid record and nobody writing them are a dead writer's
    // (or junk): opening the cache removed them.
    assert!(!segs.join(format!("{name}.seg")).exists());
    assert!(!segs.join("0000000000000002-00000001-00000001.seg").exists());

    clock.set(t(7200));
    let report = cache.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::InvalidName), 3, "{report}");
    assert_eq!(report.count(RemovedReason::StaleTemp), 1, "{report}");
    assert_eq!(report.verified, 1);
    let left: Vec<_> = fs::read_dir(&segs)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(cache.read_at(&good, 0, &mut buf).expect("good"));
}

/// Disk bytes of one segment holding one chunk of `len` bytes (and its index).
fn one_chunk_segment(len: u64) -> u64 {
    format::SEG_HEADER_LEN + format::REC_HEADER_LEN + len + 68 + 48
}

#[test]
fn lru_eviction_follows_segment_recency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(0));
    let seg = one_chunk_segment(1000);
    // Room for 10 segments; eviction goes down to 90 % = 9.
    let cache = open_manual(dir.path(), 10 * seg, &clock);
    let chunks: Vec<_> = (0..10).map(|i| entry(100 + i, 1000)).collect();
    for (i, (d, data)) in chunks.iter().enumerate() {
        clock.set(t(i as u64 * 100));
        cache.insert(d, data).expect("insert");
    }
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.segments, s.disk_bytes), (10, 10, 10 * 1128));
    // Read chunks 0..3 much later: their segments' clocks move past everybody else's.
    clock.set(t(5000));
    let mut buf = [0u8; 10];
    for (d, _) in &chunks[..3] {
        assert!(cache.read_at(d, 0, &mut buf).expect("read"));
        let (path, _) = place(&cache, d);
        let m = fs::metadata(path.with_extension("idx")).expect("stat");
        assert_eq!(m.modified().expect("mtime"), t(5000));
    }
    clock.set(t(6000));
    let (extra, extra_data) = entry(200, 1000);
    cache
        .insert(&extra, &extra_data)
        .expect("insert past limit");
    // 11 segments > limit → down to 9: the two oldest untouched (3 and 4) go.
    let present: Vec<bool> = chunks.iter().map(|(d, _)| cache.contains(d)).collect();
    assert_eq!(
        present,
        [true, true, true, false, false, true, true, true, true, true]
    );
    assert!(cache.contains(&extra));
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.bytes, s.evictions), (9, 9000, 2));

    // prune: to 4 segments keeps the 4 most recent (extra, 0, 1, 2).
    let report = cache.prune(4 * seg).expect("prune");
    assert_eq!(
        (report.evicted, report.bytes_after),
        (5, 4 * seg),
        "{report}"
    );
    let kept: Vec<bool> = chunks[..3].iter().map(|(d, _)| cache.contains(d)).collect();
    assert_eq!(kept, [true, true, true]);
    assert!(cache.contains(&extra));
    assert!(!cache.contains(&chunks[9].0));
}

#[test]
fn touch_is_rate_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(0));
    let cache = open_manual(dir.path(), u64::MAX, &clock);
    let (d, data) = entry(20, 100);
    cache.insert(&d, &data).expect("insert");
    let idx = place(&cache, &d).0.with_extension("idx");
    let mtime = || {
        fs::metadata(&idx)
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    assert_eq!(mtime(), t(0), "sealed at insert time");
    let mut buf = [0u8; 1];
    clock.set(t(30));
    cache.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(30), "first read by this process touches");
    clock.set(t(89));
    cache.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(30), "within the interval: no touch");
    clock.set(t(90));
    cache.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(90));
    // Another process touches on its own first read.
    clock.set(t(100));
    let other = open_manual(dir.path(), u64::MAX, &clock);
    other.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(100));
}

/// This process's descriptors open on deleted files under `dir`.
fn deleted_files_held(dir: &Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir) && p.to_string_lossy().ends_with(" (deleted)"))
        .count()
}

#[test]
fn an_evicted_segment_frees_its_space_once_reads_of_it_are_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(0));
    let cache = open_manual(dir.path(), u64::MAX, &clock);
    let (d, data) = entry(21, 4096);
    cache.insert(&d, &data).expect("insert");
    let reader = open_manual(dir.path(), u64::MAX, &clock);
    let mut buf = vec![0u8; 4096];
    assert!(reader.read_at(&d, 0, &mut buf).expect("read"));
    // A read in flight (a chunk handed to io_uring) while another process evicts.
    let held = reader.open_chunk(&d, 4096).expect("open").expect("cached");
    let report = cache.prune(0).expect("prune");
    assert_eq!(report.segments_evicted, 1);
    let mut again = vec![0u8; 4096];
    held_read(&held, &mut again);
    assert_eq!(again, data, "bytes of a held chunk changed under eviction");
    drop(held);
    // The reader's next lookup sees the eviction and closes its descriptor.
    assert!(!reader.read_at(&d, 0, &mut buf).expect("read"));
    assert_eq!(
        deleted_files_held(dir.path()),
        0,
        "evicted segment kept open"
    );
    assert_eq!(reader.stats().expect("stats").open_files, 0);
}

fn held_read(held: &HeldChunk, buf: &mut [u8]) {
    // SAFETY: the fd is valid while `held` is; a File view that is never closed by us.
    let file = std::mem::ManuallyDrop::new(unsafe {
        <File as std::os::fd::FromRawFd>::from_raw_fd(held.as_raw_fd())
    });
    file.read_exact_at(buf, held.offset()).expect("read held");
}

#[test]
fn few_open_segments_still_serve_everything() {
    for mmap in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut opts = opts(mmap);
        opts.max_open_segments = 2;
        opts.segment_bytes = 4096;
        let cache = ChunkCache::open_with(dir.path(), opts).expect("open");
        let chunks: Vec<_> = (0..100).map(|i| entry(300 + i, 2000)).collect();
        for (d, data) in &chunks {
            cache.insert(d, data).expect("insert");
        }
        let mut buf = vec![0u8; 100];
        for round in 0..3 {
            for (d, data) in &chunks {
                assert!(cache.read_at(d, round * 100, &mut buf).expect("read"));
                assert_eq!(buf, &data[round * 100..round * 100 + 100]);
            }
        }
        let s = cache.stats().expect("stats");
        assert!(s.segments >= 40, "{s}");
        assert!(s.open_files <= 2, "{s}");
    }
}

#[test]
fn readers_race_an_evictor() {
    readers_race_an_evictor_in(false);
}

#[test]
fn readers_race_an_evictor_mmap() {
    readers_race_an_evictor_in(true);
}

fn readers_race_an_evictor_in(mmap: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let small_segments = |mut o: CacheOptions| {
        o.segment_bytes = 64 * 1024;
        o
    };
    let cache = ChunkCache::open_with(dir.path(), small_segments(opts(mmap))).expect("open");
    let chunks: Vec<_> = (0..64).map(|i| entry(400 + i, 16 * 1024)).collect();
    for (d, data) in &chunks {
        cache.insert(d, data).expect("insert");
    }
    let stop = AtomicBool::new(false);
    let hits = AtomicU64::new(0);
    let misses = AtomicU64::new(0);
    std::thread::scope(|s| {
        for th in 0..16u64 {
            let (cache, chunks, stop, hits, misses) = (&cache, &chunks, &stop, &hits, &misses);
            let dir = dir.path();
            s.spawn(move || {
                // Odd readers keep one segment open, so they reopen all the time and really
                // race the unlinks; even ones share a handle.
                let own;
                let c = if th % 2 == 0 {
                    cache
                } else {
                    let mut o = small_segments(opts(mmap));
                    o.max_open_segments = 1;
                    own = ChunkCache::open_with(dir, o).expect("open");
                    &own
                };
                let mut buf = vec![0u8; 4096];
                let mut i = th as usize;
                while !stop.load(Ordering::Relaxed) {
                    let (d, data) = &chunks[i % chunks.len()];
                    let off = (i * 4096) % (16 * 1024);
                    if c.read_at(d, off, &mut buf).expect("read") {
                        assert_eq!(buf, &data[off..off + 4096], "wrong bytes");
                        hits.fetch_add(1, Ordering::Relaxed);
                    } else {
                        misses.fetch_add(1, Ordering::Relaxed);
                        c.insert(d, data).expect("refill");
                    }
                    i += 7;
                }
            });
        }
        let evictor = ChunkCache::open(dir.path(), u64::MAX).expect("open");
        let mut evicted = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut round = 0;
        while round < 200 || misses.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < deadline, "readers never missed");
            let target = if round % 2 == 0 { 0 } else { 512 * 1024 };
            evicted += evictor.prune(target).expect("prune").evicted;
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        assert!(evicted > 0);
    });
    assert!(hits.load(Ordering::Relaxed) > 0);
}

#[test]
fn auto_eviction_keeps_cache_near_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 400_000;
    let cache = ChunkCache::open(dir.path(), limit).expect("open");
    let segment = cache.inner.segment_bytes;
    for i in 0..200 {
        let (d, data) = entry(500 + i, 5000);
        cache.insert(&d, &data).expect("insert");
        let s = cache.stats().expect("stats");
        // The segment being written is not evictable: at most one over.
        assert!(
            s.disk_bytes <= limit + segment + 8192,
            "over limit after insert {i}: {s}"
        );
    }
    assert!(cache.stats().expect("stats").evictions > 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn read_at_matches_slice(len in 1usize..20_000, a in 0usize..20_000, b in 0usize..20_000) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
        let (d, data) = entry(len as u64, len);
        cache.insert(&d, &data).expect("insert");
        let (off, end) = (a.min(b), a.max(b));
        let mut buf = vec![0u8; end - off];
        let r = cache.read_at(&d, off, &mut buf);
        if end <= len {
            prop_assert!(r.expect("in range"));
            prop_assert_eq!(&buf[..], &data[off..end]);
        } else {
            prop_assert!(r.is_err());
        }
    }
}

#[test]
fn lend_maps_cached_chunks_in_either_mode() {
    for mmap in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open");
        let (d, data) = entry(41, 70_000);
        let len = data.len() as u64;
        assert!(cache.lend(&d, len).expect("lend").is_none());
        cache.insert(&d, &data).expect("insert");
        let lent = cache
            .lend(&d, len)
            .expect("lend")
            .expect("cached chunk lent");
        assert_eq!(lent.len(), data.len());
        assert!(lent.kernel_bytes() == &data[..]);
        let again = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open");
        let lent = again
            .lend(&d, len)
            .expect("lend")
            .expect("lent after reopen");
        assert!(lent.kernel_bytes() == &data[..]);
    }
}

#[test]
fn a_new_cache_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("new/cache");
    let cache = ChunkCache::open(&dir, u64::MAX).expect("open");
    let (d, data) = entry(42, 10);
    cache.insert(&d, &data).expect("insert");
    drop(cache);
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    for d in [dir.clone(), dir.join("segments")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in ["lock", "state", "fill.lock"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    for f in fs::read_dir(dir.join("segments")).expect("list") {
        let p = f.expect("entry").path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
}

#[test]
fn a_cache_in_the_old_layout_is_discarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = dir.path().join("chunks/ab");
    fs::create_dir_all(&old).expect("mkdir");
    fs::write(old.join("cdef"), b"old chunk").expect("old entry");
    fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    assert!(!dir.path().join("chunks").exists());
    assert!(!dir.path().join("tmp").exists());
    let (d, data) = entry(43, 100);
    cache.insert(&d, &data).expect("insert");
    assert_eq!(cache.get(&d).expect("get"), Some(data));
}

#[test]
fn descriptors_stay_bounded_however_many_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = CacheOptions::new(u64::MAX);
    o.segment_bytes = 8192;
    o.max_open_segments = 4;
    let cache = ChunkCache::open_with(dir.path(), o).expect("open");
    let chunks: Vec<_> = (0..300).map(|i| entry(700 + i, 3000)).collect();
    for (d, data) in &chunks {
        cache.insert(d, data).expect("insert");
    }
    let reader = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    for (d, data) in &chunks {
        assert_eq!(reader.get(d).expect("get").as_deref(), Some(&data[..]));
    }
    let held = fs::read_dir("/proc/self/fd")
        .expect("fds")
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir.path()))
        .count();
    // Per handle: its open segments, its writer's, state mapping's fd is closed, fill.lock.
    assert!(held <= 4 + 64 + 4, "{held} descriptors into the cache");
    assert!(cache.stats().expect("stats").segments >= 100);
}

#[test]
fn prune_gives_up_this_processs_open_segment_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let other = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (mine, data) = entry(80, 5000);
    let (theirs, their_data) = entry(81, 5000);
    cache.insert(&mine, &data).expect("insert");
    other.insert(&theirs, &their_data).expect("insert");
    // Both segments are open (their writers alive). Pruning to zero takes ours, sealed on
    // the way, and leaves the one another process is still writing.
    let report = cache.prune(0).expect("prune");
    assert_eq!(
        (report.segments_evicted, report.evicted),
        (1, 1),
        "{report}"
    );
    assert!(!cache.contains(&mine));
    assert!(cache.contains(&theirs));
    // Inserting again opens a new segment.
    cache.insert(&mine, &data).expect("insert");
    assert_eq!(other.get(&mine).expect("get"), Some(data));
}

#[test]
fn an_index_that_outlived_its_segments_end_is_a_miss_not_a_fault() {
    for mmap in [false, true] {
        let dir = tempfile::tempdir().expect("tempdir");
        let chunks: Vec<_> = (0..3).map(|i| entry(90 + i, 30_000)).collect();
        let mut o = opts(mmap);
        o.boot_id = Some([1; 16]);
        let (seg, last) = {
            let before = ChunkCache::open_with(dir.path(), o.clone()).expect("open");
            for (d, data) in &chunks {
                before.insert(d, data).expect("insert");
            }
            place(&before, &chunks[2].0)
        };
        // A power cut: the index made it to disk, the segment's last pages did not.
        File::options()
            .write(true)
            .open(&seg)
            .and_then(|f| f.set_len(last + 100))
            .expect("truncate");
        o.boot_id = Some([2; 16]);
        let after = ChunkCache::open_with(dir.path(), o).expect("open");
        assert_eq!(after.get(&chunks[2].0).expect("a miss, not an error"), None);
        for (d, data) in &chunks[..2] {
            assert_eq!(after.get(d).expect("get").as_deref(), Some(&data[..]));
        }
        assert!(after.lend(&chunks[2].0, 30_000).expect("lend").is_none());
    }
}
