//! The chunk cache next to plain files holding the same bytes, measured in the same run, on
//! ext4 (/var/tmp) and tmpfs (/dev/shm): insert throughput vs `write`, warm random 4 KiB and
//! 1 MiB reads vs `pread`, and how long opening a cache of 1 M entries takes. Prints numbers;
//! asserts only that the bytes are right.
//!
//! `cargo bench -p cora-cache --bench cache` (env: CACHE_BENCH_MIB, default 256;
//! CACHE_BENCH_FS=ext4|tmpfs for one of them; CACHE_BENCH_ENTRIES, default 1048576).

use cache::{CacheOptions, ChunkCache, sha256};
use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;

struct Result {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Result {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Read `len` bytes at device offset `pos` through the cache, one `read_at` per chunk piece,
/// as the ublk read path does.
fn cache_read(cache: &ChunkCache, digests: &[[u8; 32]], pos: usize, buf: &mut [u8]) {
    pieces(pos, buf, |idx, off, dst| {
        let hit = cache.read_at(&digests[idx], off, dst).expect("read_at");
        assert!(hit, "chunk {idx} missing from a warm cache");
    });
}

/// Split a device range into per-chunk pieces: `f(chunk index, offset in chunk, dst)`.
fn pieces(pos: usize, buf: &mut [u8], mut f: impl FnMut(usize, usize, &mut [u8])) {
    let mut done = 0;
    while done < buf.len() {
        let at = pos + done;
        let (idx, off) = (at / CHUNK, at % CHUNK);
        let n = (CHUNK - off).min(buf.len() - done);
        f(idx, off, &mut buf[done..done + n]);
        done += n;
    }
}

fn run(positions: &[usize], len: usize, threads: usize, read: &ReadFn<'_>) -> Result {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut buf = vec![0u8; len];
                for &pos in positions.iter().skip(t).step_by(threads) {
                    read(pos, &mut buf);
                    black_box(&buf);
                }
            });
        }
    });
    Result {
        ops: positions.len() as u64,
        bytes: (positions.len() * len) as u64,
        elapsed: start.elapsed(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let mib: usize = std::env::var("CACHE_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let only = std::env::var("CACHE_BENCH_FS").ok();
    let n_chunks = (mib << 20) / CHUNK;
    let mut rng = cora_testdata::XorShift::new(0x1234_5678_9abc_def1);
    let chunks: Vec<([u8; 32], Vec<u8>)> = (0..n_chunks)
        .map(|_| {
            let data: Vec<u8> = (0..CHUNK / 8)
                .flat_map(|_| rng.next_u64().to_le_bytes())
                .collect();
            (sha256(&data), data)
        })
        .collect();
    println!(
        "chunk cache bench: {mib} MiB as {n_chunks} chunks of {} KiB",
        CHUNK / 1024
    );
    for (fs, base) in [("ext4", "/var/tmp"), ("tmpfs", "/dev/shm")] {
        if only.as_deref().is_some_and(|o| o != fs) {
            continue;
        }
        let tmp = tempfile::tempdir_in(base).expect("tempdir");
        println!("\n=== {fs} ({base}) ===");
        on_filesystem(tmp.path(), &chunks, &mut rng);
    }
    let entries: usize = std::env::var("CACHE_BENCH_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    open_large(entries);
}

/// Inserts, then warm reads, on one filesystem.
fn on_filesystem(
    dir: &std::path::Path,
    chunks: &[([u8; 32], Vec<u8>)],
    rng: &mut cora_testdata::XorShift,
) {
    let total = chunks.len() * CHUNK;
    let mb = total as f64 / 1e6;
    // Insert: the cache's own work only (the digests are known; the lazy source hashes each
    // chunk as it decodes it) vs writing the same bytes to one plain file.
    let plain_path = dir.join("plain.img");
    let t = Instant::now();
    let mut plain = File::create(&plain_path).expect("create plain file");
    for (_, data) in chunks {
        plain.write_all(data).expect("write plain");
    }
    drop(plain);
    let write_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let writer = ChunkCache::open(&dir.join("cache"), u64::MAX).expect("open cache");
    for (d, data) in chunks {
        writer.insert_verified(d, data).expect("insert");
    }
    drop(writer);
    let insert_secs = t.elapsed().as_secs_f64();
    println!(
        "insert: {:.0} MB/s vs write of the same bytes {:.0} MB/s -> {:.2}x",
        mb / insert_secs,
        mb / write_secs,
        write_secs / insert_secs
    );
    let t = Instant::now();
    let cache = ChunkCache::open(&dir.join("cache"), u64::MAX).expect("open cache");
    println!(
        "open after insert: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let digests: Vec<[u8; 32]> = chunks.iter().map(|(d, _)| *d).collect();
    let plain = File::open(&plain_path).expect("open plain");
    let mut buf = vec![0u8; CHUNK];
    let mut pbuf = vec![0u8; CHUNK];
    for (i, d) in digests.iter().enumerate() {
        plain
            .read_exact_at(&mut pbuf, (i * CHUNK) as u64)
            .expect("pread");
        assert!(cache.read_at(d, 0, &mut buf).expect("read"));
        assert_eq!(buf, pbuf, "cache and plain file differ at chunk {i}");
    }
    let mut mmap_opts = CacheOptions::new(u64::MAX);
    mmap_opts.mmap = true;
    let mapped = ChunkCache::open_with(&dir.join("cache"), mmap_opts).expect("open");
    println!(
        "\neach variant: {ROUNDS} interleaved rounds over the same random positions; best round \
         (median in brackets); ratio = best / best of pread on the plain file"
    );
    for (len, ops) in [(4096usize, 50_000usize), (1 << 20, 500)] {
        let positions: Vec<usize> = (0..ops)
            .map(|_| rng.below(((total - len) / 4096 + 1) as u64) as usize * 4096)
            .collect();
        let pread = |pos: usize, b: &mut [u8]| {
            plain.read_exact_at(b, pos as u64).expect("pread");
        };
        let via_cache = |pos: usize, b: &mut [u8]| cache_read(&cache, &digests, pos, b);
        let via_mapped = |pos: usize, b: &mut [u8]| cache_read(&mapped, &digests, pos, b);
        for threads in [1, 2] {
            println!("\nrandom {} KiB reads, {threads} thread(s):", len / 1024);
            let variants: Vec<(&str, &ReadFn<'_>)> = vec![
                ("pread on one plain file (reference)", &pread),
                ("cache read_at (pread)", &via_cache),
                ("cache read_at, mmap mode", &via_mapped),
            ];
            compare(&variants, &positions, len, threads);
        }
    }
    let s = cache.stats().expect("stats");
    println!(
        "\n{} entries, {} segments, {:.1} MB on disk for {:.1} MB of chunks ({:.1} % overhead); open files {}",
        s.entries,
        s.segments,
        s.disk_bytes as f64 / 1e6,
        s.bytes as f64 / 1e6,
        (s.disk_bytes as f64 / s.bytes as f64 - 1.0) * 100.0,
        s.open_files
    );
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opening a cache of `entries` chunks (made-up sealed segments of 1000 entries each).
fn open_large(entries: usize) {
    let tmp = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let per = 1000;
    let t = Instant::now();
    cache::synthesize_sealed_segments(tmp.path(), entries.div_ceil(per), per).expect("synthesize");
    println!(
        "\nopen of a cache with {entries} entries in {} segments (ext4, written in {:.1} s):",
        entries.div_ceil(per),
        t.elapsed().as_secs_f64()
    );
    for round in 0..3 {
        let rss = rss_kib();
        let t = Instant::now();
        let cache = ChunkCache::open(tmp.path(), u64::MAX).expect("open");
        let secs = t.elapsed().as_secs_f64();
        let grown = rss_kib().saturating_sub(rss);
        let n = cache.stats().expect("stats").entries;
        assert_eq!(n as usize, entries.div_ceil(per) * per);
        println!(
            "  round {round}: {:.0} ms, RSS +{:.0} MiB ({:.0} bytes per entry)",
            secs * 1e3,
            grown as f64 / 1024.0,
            grown as f64 * 1024.0 / n as f64
        );
    }
}

const ROUNDS: usize = 7;

/// One way of reading `buf.len()` bytes at a device offset.
type ReadFn<'a> = dyn Fn(usize, &mut [u8]) + Sync + 'a;

fn compare(variants: &[(&str, &ReadFn<'_>)], positions: &[usize], len: usize, threads: usize) {
    let mut results: Vec<Vec<Result>> = variants.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for ((_, read), out) in variants.iter().zip(&mut results) {
            out.push(run(positions, len, threads, *read));
        }
    }
    let summary: Vec<(f64, f64, f64)> = results
        .iter_mut()
        .map(|rs| {
            rs.sort_by(|a, b| a.ops_per_s().total_cmp(&b.ops_per_s()));
            let best = &rs[rs.len() - 1];
            (
                best.ops_per_s(),
                best.mb_per_s(),
                rs[rs.len() / 2].ops_per_s(),
            )
        })
        .collect();
    let reference = summary[0].0;
    for ((name, _), (ops, mb, median)) in variants.iter().zip(&summary) {
        println!(
            "  {name:<44} {ops:>9.0} ops/s [{median:>9.0}] {mb:>8.1} MB/s  {:>5.2}x",
            ops / reference
        );
    }
}
