//! Warm read throughput of the chunk cache next to `pread` on one plain file with the same
//! bytes, measured in the same run. Prints numbers; asserts only that the bytes are right.
//!
//! `cargo bench -p driver --bench cache` (env: CACHE_BENCH_MIB, default 256).

use driver::cache::{CacheOptions, ChunkCache, raise_nofile_limit, sha256};
use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

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

fn report(name: &str, r: &Result, reference: &Result) {
    println!(
        "{name:<44} {:>12.0} ops/s {:>10.1} MB/s   {:>5.2}x pread",
        r.ops_per_s(),
        r.mb_per_s(),
        r.ops_per_s() / reference.ops_per_s()
    );
}

/// Read `len` bytes at device offset `pos` through the cache, one `read_at` per chunk piece,
/// as the ublk read path does.
fn cache_read(cache: &ChunkCache, digests: &[[u8; 32]], pos: usize, buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let at = pos + done;
        let (idx, off) = (at / CHUNK, at % CHUNK);
        let n = (CHUNK - off).min(buf.len() - done);
        let hit = cache
            .read_at(&digests[idx], off, &mut buf[done..done + n])
            .expect("read_at");
        assert!(hit, "chunk {idx} missing from a warm cache");
        done += n;
    }
}

fn run(
    positions: &[usize],
    len: usize,
    threads: usize,
    read: &(dyn Fn(usize, &mut [u8]) + Sync),
) -> Result {
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
    let nofile = raise_nofile_limit().unwrap_or(0);
    let total = mib << 20;
    let n_chunks = total / CHUNK;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(0x1234_5678_9abc_def1);

    println!(
        "chunk cache bench: {mib} MiB as {n_chunks} chunks of {} KiB, RLIMIT_NOFILE {nofile}",
        CHUNK / 1024
    );
    let setup = Instant::now();
    let writer = ChunkCache::open(&tmp.path().join("cache"), u64::MAX).expect("open cache");
    let plain_path = tmp.path().join("plain.img");
    let mut plain = File::create(&plain_path).expect("create plain file");
    let mut digests = Vec::with_capacity(n_chunks);
    let mut data = vec![0u8; CHUNK];
    for _ in 0..n_chunks {
        for word in data.chunks_exact_mut(8) {
            word.copy_from_slice(&rng.next().to_le_bytes());
        }
        let d = sha256(&data);
        writer.insert(&d, &data).expect("insert");
        plain.write_all(&data).expect("write plain");
        digests.push(d);
    }
    drop(plain);
    drop(writer);
    println!(
        "setup (hash + insert + plain write): {:.2?}",
        setup.elapsed()
    );

    let plain = File::open(&plain_path).expect("open plain");
    // A fresh handle: its first pass opens and verifies every entry (the cold-fd cost).
    let cache = ChunkCache::open(&tmp.path().join("cache"), u64::MAX).expect("open cache");
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    for d in &digests {
        assert!(cache.read_at(d, 0, &mut buf[..4096]).expect("read"));
    }
    let first = t.elapsed();
    println!(
        "first read per chunk (open + sha256 verify + pread): {:.1} us/chunk",
        first.as_secs_f64() * 1e6 / n_chunks as f64
    );
    // Warm the plain file's page cache too, and check both return the same bytes.
    let mut pbuf = vec![0u8; CHUNK];
    for (i, d) in digests.iter().enumerate() {
        plain
            .read_exact_at(&mut pbuf, (i * CHUNK) as u64)
            .expect("pread");
        assert!(cache.read_at(d, 0, &mut buf).expect("read"));
        assert_eq!(buf, pbuf, "cache and plain file differ at chunk {i}");
    }
    println!(
        "fd cache holds {} open files",
        cache.stats().expect("stats").open_files
    );

    let mut no_fd_opts = CacheOptions::new(u64::MAX);
    no_fd_opts.max_open_files = 0;
    no_fd_opts.verify_on_open = false;
    let no_fd = ChunkCache::open_with(&tmp.path().join("cache"), no_fd_opts).expect("open");

    for (len, ops) in [(4096usize, 400_000usize), (1 << 20, 3_000)] {
        let positions: Vec<usize> = (0..ops)
            .map(|_| rng.below((total - len) / 4096 + 1) * 4096)
            .collect();
        let pread = |pos: usize, b: &mut [u8]| {
            plain.read_exact_at(b, pos as u64).expect("pread");
        };
        let via_cache = |pos: usize, b: &mut [u8]| cache_read(&cache, &digests, pos, b);
        let via_open = |pos: usize, b: &mut [u8]| cache_read(&no_fd, &digests, pos, b);
        println!("\nrandom {} KiB reads:", len / 1024);
        for threads in [1, 2] {
            // Reference first, then the cache, then the reference again (drift check).
            let reference = run(&positions, len, threads, &pread);
            let cached = run(&positions, len, threads, &via_cache);
            let reference2 = run(&positions, len, threads, &pread);
            report(
                &format!("  pread plain file, {threads} thr"),
                &reference,
                &reference,
            );
            report(
                &format!("  cache read_at (fd cache), {threads} thr"),
                &cached,
                &reference,
            );
            report(
                &format!("  pread plain file again, {threads} thr"),
                &reference2,
                &reference,
            );
            if threads == 1 {
                let opened = run(&positions[..positions.len() / 4], len, 1, &via_open);
                report(
                    "  cache read_at (open per read), 1 thr",
                    &opened,
                    &reference,
                );
            }
        }
    }
}
