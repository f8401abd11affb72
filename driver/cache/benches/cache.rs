//! Warm read throughput of the chunk cache next to `pread` on one plain file with the same
//! bytes, measured in the same run. Prints numbers; asserts only that the bytes are right.
//!
//! `cargo bench -p cora-cache --bench cache` (env: CACHE_BENCH_MIB, default 256).

use cache::{CacheOptions, ChunkCache, raise_nofile_limit, sha256};
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

/// A read-only shared mapping of a whole chunk file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and never mutated; the files are not truncated while
// the bench runs.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File) -> Mapping {
        use std::os::fd::AsRawFd;
        let len = file.metadata().expect("stat").len() as usize;
        // SAFETY: mapping a regular file read-only; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap failed");
        Mapping { ptr, len }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr/len describe a live read-only mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned.
        unsafe { libc::munmap(self.ptr, self.len) };
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
    let nofile = raise_nofile_limit().unwrap_or(0);
    let total = mib << 20;
    let n_chunks = total / CHUNK;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut rng = cora_testdata::XorShift::new(0x1234_5678_9abc_def1);

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
            word.copy_from_slice(&rng.next_u64().to_le_bytes());
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

    // Lower bounds for one-file-per-chunk storage, without any cache bookkeeping: pread on
    // fds held in a Vec, and memcpy from mmap'd chunk files (the road not taken: a file
    // truncated behind our back would SIGBUS the server instead of returning an error).
    let chunk_files: Vec<File> = digests
        .iter()
        .map(|d| File::open(cache.entry_path(d)).expect("open chunk file"))
        .collect();
    let maps: Vec<Mapping> = chunk_files.iter().map(Mapping::new).collect();

    let mut mmap_opts = CacheOptions::new(u64::MAX);
    mmap_opts.mmap = true;
    let mapped_cache = ChunkCache::open_with(&tmp.path().join("cache"), mmap_opts).expect("open");
    for d in &digests {
        assert!(mapped_cache.read_at(d, 0, &mut buf).expect("read"));
    }

    let mut no_fd_opts = CacheOptions::new(u64::MAX);
    no_fd_opts.max_open_files = 0;
    no_fd_opts.verify_on_open = false;
    let no_fd = ChunkCache::open_with(&tmp.path().join("cache"), no_fd_opts).expect("open");

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
        let via_open = |pos: usize, b: &mut [u8]| cache_read(&no_fd, &digests, pos, b);
        let via_mapped = |pos: usize, b: &mut [u8]| cache_read(&mapped_cache, &digests, pos, b);
        let bookkeeping_only = |pos: usize, b: &mut [u8]| {
            pieces(pos, b, |idx, off, _| {
                let hit = cache.read_at(&digests[idx], off, &mut []).expect("read_at");
                assert!(hit, "chunk {idx} missing from a warm cache");
            })
        };
        let bare_pread = |pos: usize, b: &mut [u8]| {
            pieces(pos, b, |idx, off, dst| {
                chunk_files[idx]
                    .read_exact_at(dst, off as u64)
                    .expect("pread chunk");
            })
        };
        let bare_mmap = |pos: usize, b: &mut [u8]| {
            pieces(pos, b, |idx, off, dst| {
                dst.copy_from_slice(&maps[idx].bytes()[off..off + dst.len()]);
            })
        };
        for threads in [1, 2] {
            println!("\nrandom {} KiB reads, {threads} thread(s):", len / 1024);
            let mut variants: Vec<(&str, &ReadFn<'_>)> = vec![
                ("pread on one plain file (reference)", &pread),
                ("cache read_at", &via_cache),
                ("cache read_at, mmap mode", &via_mapped),
                ("cache read_at, no fd cache (open per read)", &via_open),
                ("bare pread on chunk files (no bookkeeping)", &bare_pread),
                ("bare memcpy from mmap'd chunk files", &bare_mmap),
                (
                    "cache read_at of 0 bytes (bookkeeping only)",
                    &bookkeeping_only,
                ),
            ];
            if threads > 1 {
                variants.truncate(3);
            }
            compare(&variants, &positions, len, threads);
        }
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
