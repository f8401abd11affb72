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
    ChunkCache::open_with(dir, opts).expect("open cache")
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
    // A fresh handle (no fd cache, verify on open) reads the same bytes.
    let other = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open again");
    let mut buf = vec![0u8; 1000];
    assert!(other.read_at(&d, 5000, &mut buf).expect("read"));
    assert_eq!(buf, &data[5000..6000]);
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.bytes, s.inserts), (1, 70_000, 1));
    assert_eq!(s.misses, 1);
}

#[test]
fn a_read_past_the_entry_is_a_miss_and_drops_it() {
    a_read_past_the_entry_is_a_miss_and_drops_it_in(false);
}

#[test]
fn a_read_past_the_entry_is_a_miss_and_drops_it_mmap() {
    a_read_past_the_entry_is_a_miss_and_drops_it_in(true);
}

fn a_read_past_the_entry_is_a_miss_and_drops_it_in(mmap: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open");
    let (d, data) = entry(2, 1000);
    let mut buf = vec![0xeeu8; 2];
    let err = cache
        .read_at(&d, usize::MAX, &mut buf)
        .expect_err("range overflows");
    assert!(matches!(err, CacheError::OutOfRange { .. }), "{err}");
    for (off, len) in [(999, 2), (1000, 1), (5000, 10)] {
        cache.insert(&d, &data).expect("insert");
        // An empty read at the very end is in range.
        assert!(cache.read_at(&d, 1000, &mut []).expect("empty read"));
        let mut buf = vec![0xeeu8; len];
        // The entry cannot be the chunk the caller's index describes: a miss, so the
        // caller fetches it again, and the entry is gone.
        assert!(!cache.read_at(&d, off, &mut buf).expect("miss"));
        assert!(buf.iter().all(|&b| b == 0xee));
        assert!(!cache.contains(&d), "{off}+{len}: entry kept");
    }
    assert_eq!(cache.stats().expect("stats").corrupt, 3);
}

#[test]
fn wrong_digest_is_rejected_and_nothing_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (d, _) = entry(3, 500);
    let err = cache.insert(&d, b"not the data").expect_err("mismatch");
    assert!(matches!(err, CacheError::DigestMismatch { .. }), "{err}");
    assert!(!cache.contains(&d));
    assert!(!cache.entry_path(&d).exists());
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0
    );
    assert_eq!(cache.stats().expect("stats").entries, 0);
}

#[test]
fn empty_chunk_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    assert_eq!(sha256(b""), EMPTY_SHA256);
    cache.insert(&EMPTY_SHA256, b"").expect("insert empty");
    let other = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    assert_eq!(other.get(&EMPTY_SHA256).expect("get"), Some(Vec::new()));
}

#[test]
fn concurrent_inserts_of_one_digest_are_harmless() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (d, data) = entry(4, 100_000);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                // Separate handles: no shared fd cache, so all really write.
                let c = ChunkCache::open(dir.path(), u64::MAX).expect("open");
                c.insert(&d, &data).expect("insert");
            });
        }
    });
    assert_eq!(cache.get(&d).expect("get").as_deref(), Some(&data[..]));
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.bytes), (1, 100_000));
    assert_eq!(
        fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
        0
    );
}

#[test]
fn crashed_temp_file_is_never_served_and_gc_removes_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(0));
    let cache = open_manual(dir.path(), u64::MAX, &clock);
    let (d, data) = entry(5, 10_000);
    // A writer died after writing half of the chunk into its temp file.
    let tmp = dir
        .path()
        .join("tmp")
        .join(format!("{}.999.0.0.tmp", digest_hex(&d)));
    fs::write(&tmp, &data[..5000]).expect("write temp");
    File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_modified(t(0)))
        .expect("mtime");
    assert!(!cache.contains(&d));
    assert!(!cache.read_at(&d, 0, &mut [0u8; 10]).expect("read"));

    // Young temp files may be inserts in progress: kept.
    clock.set(t(60));
    let report = cache.gc().expect("gc");
    assert!(report.removed.is_empty(), "{report}");
    assert!(tmp.exists());

    clock.set(t(3600));
    let report = cache.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::StaleTemp), 1, "{report}");
    assert_eq!(report.removed_bytes(), 5000);
    assert!(!tmp.exists());
    // A proper insert still works afterwards.
    cache.insert(&d, &data).expect("insert");
    assert_eq!(cache.get(&d).expect("get").as_deref(), Some(&data[..]));
}

#[test]
fn corrupt_entries_are_dropped_on_open_and_by_gc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (truncated, data_t) = entry(6, 8000);
    let (flipped, data_f) = entry(7, 8000);
    let (zeroed, data_z) = entry(8, 8000);
    let (good, data_g) = entry(9, 8000);
    for (d, data) in [
        (truncated, &data_t),
        (flipped, &data_f),
        (zeroed, &data_z),
        (good, &data_g),
    ] {
        writer.insert(&d, data).expect("insert");
    }
    fs::write(writer.entry_path(&truncated), &data_t[..4000]).expect("truncate");
    let mut bad = data_f.clone();
    bad[1234] ^= 1;
    fs::write(writer.entry_path(&flipped), &bad).expect("flip");
    fs::write(writer.entry_path(&zeroed), b"").expect("zero");

    // A process that opens the entries afresh verifies them and reports misses.
    let reader = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let mut buf = [0u8; 100];
    assert!(!reader.read_at(&flipped, 0, &mut buf).expect("read"));
    assert!(
        !writer.entry_path(&flipped).exists(),
        "bad entry removed on open"
    );
    assert_eq!(reader.stats().expect("stats").corrupt, 1);

    // Without verify-on-open a truncated entry is still caught by gc, and a read past its
    // end is a miss that drops it (so the reader fetches the chunk again).
    let mut opts = CacheOptions::new(u64::MAX);
    opts.verify_on_open = false;
    let trusting = ChunkCache::open_with(dir.path(), opts).expect("open");
    assert!(trusting.read_at(&truncated, 0, &mut buf).expect("read"));
    assert!(!trusting.read_at(&truncated, 7000, &mut buf).expect("miss"));
    assert!(!writer.entry_path(&truncated).exists(), "short entry kept");
    trusting.insert(&truncated, &data_t).expect("insert again");
    assert!(trusting.read_at(&truncated, 7000, &mut buf).expect("read"));
    assert_eq!(&buf[..], &data_t[7000..7100]);
    // Zero-length entries are always suspicious (only the empty chunk may be empty).
    assert!(!trusting.read_at(&zeroed, 0, &mut buf).expect("read"));

    fs::write(writer.entry_path(&zeroed), b"").expect("zero again");
    fs::write(writer.entry_path(&truncated), &data_t[..4000]).expect("truncate again");
    let report = reader.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::Corrupt), 2, "{report}");
    assert_eq!(report.verified, 1);
    assert!(!writer.entry_path(&truncated).exists());
    assert!(!writer.entry_path(&zeroed).exists());
    assert!(writer.entry_path(&good).exists());
    assert!(reader.read_at(&good, 0, &mut buf).expect("read"));
    assert_eq!(&buf[..], &data_g[..100]);
}

#[test]
fn odd_files_do_not_break_reads_and_gc_removes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (good, data) = entry(10, 3000);
    cache.insert(&good, &data).expect("insert");
    let (dir_entry, _) = entry(11, 10);
    let (under_file_fanout, _) = entry(12, 10);
    let chunks = dir.path().join("chunks");
    // A directory where a chunk file is expected.
    fs::create_dir_all(cache.entry_path(&dir_entry).join("x")).expect("mkdir");
    // A fan-out "directory" that is a file.
    let fan = chunks.join(&digest_hex(&under_file_fanout)[..2]);
    let _ = fs::remove_dir_all(&fan);
    fs::write(&fan, b"junk").expect("fan file");
    let fan_of_good = cache
        .entry_path(&good)
        .parent()
        .expect("parent")
        .to_path_buf();
    fs::write(fan_of_good.join("not-a-digest"), b"x").expect("junk");
    fs::write(
        fan_of_good.join(digest_hex(&good)[2..].to_uppercase()),
        b"x",
    )
    .expect("junk");
    fs::write(chunks.join("README"), b"x").expect("junk");
    fs::create_dir_all(chunks.join("zz")).expect("junk dir");

    let mut buf = [0u8; 8];
    assert!(!cache.read_at(&dir_entry, 0, &mut buf).expect("dir entry"));
    assert!(
        !cache
            .read_at(&under_file_fanout, 0, &mut buf)
            .expect("file fan-out")
    );
    assert!(!cache.contains(&dir_entry));
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.bytes), (1, 3000));

    let report = cache.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::InvalidName), 6, "{report}");
    assert_eq!(report.verified, 1);
    assert!(!cache.entry_path(&dir_entry).exists());
    assert!(!fan.exists());
    assert!(cache.read_at(&good, 0, &mut buf).expect("good"));
    // Inserting under the formerly file-blocked fan-out works again.
    let (d, data) = entry(13, 100);
    cache.insert(&d, &data).expect("insert");
}

#[test]
fn lru_eviction_follows_mtime_recency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(t(0));
    // Room for 10 chunks of 1000 bytes; eviction goes down to 90 % = 9 chunks.
    let cache = open_manual(dir.path(), 10_000, &clock);
    let chunks: Vec<_> = (0..10).map(|i| entry(100 + i, 1000)).collect();
    for (i, (d, data)) in chunks.iter().enumerate() {
        clock.set(t(i as u64 * 100));
        cache.insert(d, data).expect("insert");
    }
    assert_eq!(cache.stats().expect("stats").entries, 10);
    // Read chunks 0..3 much later: their mtimes move past everybody else's.
    clock.set(t(5000));
    let mut buf = [0u8; 10];
    for (d, _) in &chunks[..3] {
        assert!(cache.read_at(d, 0, &mut buf).expect("read"));
    }
    // A fresh process's view (its own fd cache must not hide anything).
    for (d, _) in &chunks[..3] {
        let m = fs::metadata(cache.entry_path(d)).expect("stat");
        assert_eq!(m.modified().expect("mtime"), t(5000));
    }
    clock.set(t(6000));
    let (extra, extra_data) = entry(200, 1000);
    cache
        .insert(&extra, &extra_data)
        .expect("insert past limit");
    // 11 000 bytes > limit → down to 9 000: the two oldest untouched (3 and 4) go.
    let present: Vec<bool> = chunks.iter().map(|(d, _)| cache.contains(d)).collect();
    assert_eq!(
        present,
        [true, true, true, false, false, true, true, true, true, true]
    );
    assert!(cache.contains(&extra));
    let s = cache.stats().expect("stats");
    assert_eq!((s.entries, s.bytes, s.evictions), (9, 9000, 2));

    // prune: to 4000 keeps the 4 most recent (extra, 0, 1, 2).
    let report = cache.prune(4000).expect("prune");
    assert_eq!((report.evicted, report.bytes_after), (5, 4000), "{report}");
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
    let mtime = || {
        fs::metadata(cache.entry_path(&d))
            .and_then(|m| m.modified())
            .expect("mtime")
    };
    let mut buf = [0u8; 1];
    clock.set(t(59));
    cache.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(0), "within the interval: no touch");
    clock.set(t(60));
    cache.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(60));
    // A new process whose first open finds a stale mtime touches too.
    clock.set(t(200));
    let other = open_manual(dir.path(), u64::MAX, &clock);
    other.read_at(&d, 0, &mut buf).expect("read");
    assert_eq!(mtime(), t(200));
}

#[test]
fn file_removed_under_a_reader_is_a_miss_or_still_correct() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let (d, data) = entry(21, 4096);
    cache.insert(&d, &data).expect("insert");
    let other = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    // `cache` holds an fd; `other` does not. Another process evicts the entry.
    fs::remove_file(cache.entry_path(&d)).expect("unlink");
    let mut buf = vec![0u8; 4096];
    assert!(cache.read_at(&d, 0, &mut buf).expect("read via held fd"));
    assert_eq!(buf, data);
    assert!(!other.read_at(&d, 0, &mut buf).expect("read after unlink"));
}

#[test]
fn small_fd_cache_still_serves_everything() {
    small_fd_cache_still_serves_everything_in(false);
}

#[test]
fn small_fd_cache_still_serves_everything_mmap() {
    small_fd_cache_still_serves_everything_in(true);
}

fn small_fd_cache_still_serves_everything_in(mmap: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = opts(mmap);
    opts.max_open_files = 16; // one per shard
    let cache = ChunkCache::open_with(dir.path(), opts).expect("open");
    let chunks: Vec<_> = (0..100).map(|i| entry(300 + i, 2000)).collect();
    for (d, data) in &chunks {
        cache.insert(d, data).expect("insert");
    }
    assert!(cache.stats().expect("stats").open_files <= 16);
    let mut buf = vec![0u8; 100];
    for round in 0..3 {
        for (d, data) in &chunks {
            assert!(cache.read_at(d, round * 100, &mut buf).expect("read"));
            assert_eq!(buf, &data[round * 100..round * 100 + 100]);
        }
    }
}

#[test]
fn reopened_entries_are_hashed_once_per_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = |verify| {
        let mut opts = CacheOptions::new(u64::MAX);
        opts.max_open_files = 16;
        opts.verify_on_open = verify;
        ChunkCache::open_with(dir.path(), opts).expect("open")
    };
    let writer = small(true);
    let chunks: Vec<_> = (0..100).map(|i| entry(600 + i, 3000)).collect();
    for (d, data) in &chunks {
        writer.insert(d, data).expect("insert");
    }
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        for (d, _) in &chunks {
            assert!(writer.read_at(d, 0, &mut buf).expect("read"));
        }
    }
    assert_eq!(
        writer.stats().expect("stats").verified_on_open,
        0,
        "own writes trusted"
    );

    let reader = small(true);
    for _ in 0..3 {
        for (d, data) in &chunks {
            assert!(reader.read_at(d, 100, &mut buf).expect("read"));
            assert_eq!(&buf[..], &data[100..164]);
        }
    }
    assert_eq!(reader.stats().expect("stats").verified_on_open, 100);

    // Rewriting an entry in place gives it a new ctime: the next open hashes it again.
    let (d, data) = &chunks[0];
    let mut bad = data.clone();
    bad[0] ^= 0xff;
    fs::write(reader.entry_path(d), &bad).expect("corrupt in place");
    reader.inner.fds.clear(); // as if d's fd had fallen out of the LRU
    assert!(
        !reader.read_at(d, 0, &mut buf).expect("read"),
        "corruption detected"
    );
    assert_eq!(reader.stats().expect("stats").corrupt, 1);
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
    let cache = ChunkCache::open_with(dir.path(), opts(mmap)).expect("open");
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
                // Odd readers open the file on every read, so they really race the unlinks;
                // even ones share a handle whose fds outlive the unlinks.
                let own;
                let c = if th % 2 == 0 {
                    cache
                } else {
                    let mut o = opts(mmap);
                    o.max_open_files = 0;
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
    let cache = ChunkCache::open(dir.path(), 100_000).expect("open");
    for i in 0..100 {
        let (d, data) = entry(500 + i, 5000);
        cache.insert(&d, &data).expect("insert");
        let s = cache.stats().expect("stats");
        assert!(
            s.bytes <= 100_000,
            "over limit after insert {i}: {}",
            s.bytes
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
            prop_assert!(!r.expect("a miss"));
        }
    }
}

#[test]
fn lend_maps_cached_chunks_in_either_mode() {
    for mmap in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open_with(dir.path(), opts(mmap)).unwrap();
        let (d, data) = entry(41, 70_000);
        let len = data.len() as u64;
        assert!(cache.lend(&d, len).unwrap().is_none());
        cache.insert(&d, &data).unwrap();
        let lent = cache.lend(&d, len).unwrap().expect("cached chunk lent");
        assert_eq!(lent.len(), data.len());
        assert!(lent.kernel_bytes() == &data[..]);
        // Reopened from disk (not the write fd): still lent, same bytes.
        let again = ChunkCache::open_with(dir.path(), opts(mmap)).unwrap();
        let lent = again.lend(&d, len).unwrap().expect("lent after reopen");
        assert!(lent.kernel_bytes() == &data[..]);
        drop(lent);
        // An entry of another size than the index says is not that chunk: dropped, a miss.
        assert!(again.lend(&d, len + 1).unwrap().is_none());
        assert!(!again.contains(&d));
    }
}

#[test]
fn both_insert_paths_place_whole_entries_and_leave_no_temp_files() {
    for unnamed in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
        // The named-temp-file path is the fallback where O_TMPFILE or /proc is missing.
        cache.inner.no_tmpfile.store(!unnamed, Ordering::Relaxed);
        for k in 0..20u8 {
            let (d, data) = entry(k as u64, 10_000 + k as usize);
            cache.insert(&d, &data).expect("insert");
            let other = ChunkCache::open(dir.path(), u64::MAX).expect("open");
            assert_eq!(other.get(&d).expect("get").as_deref(), Some(&data[..]));
            assert_eq!(
                fs::metadata(cache.entry_path(&d)).expect("entry").len(),
                data.len() as u64
            );
        }
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0,
            "unnamed={unnamed}"
        );
        assert_eq!(cache.stats().expect("stats").entries, 20);
    }
}

#[test]
fn a_new_cache_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new/cache");
    ChunkCache::open(&dir, u64::MAX).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for d in [dir.clone(), dir.join("chunks"), dir.join("tmp")] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(&dir.join("lock")), 0o600);
}
