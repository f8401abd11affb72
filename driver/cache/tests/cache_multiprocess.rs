//! Several real processes share one cache directory: they insert and read the same digests
//! at once while the small size limit makes them evict each other's entries.
//!
//! The parent test re-executes this test binary, running only `child_worker`, with the cache
//! directory in an environment variable; without it `child_worker` does nothing.

use cache::{ChunkCache, RemovedReason, sha256};
use std::path::Path;
use std::process::{Command, Stdio};

const CHILD_DIR_VAR: &str = "CORA_CACHE_TEST_CHILD_DIR";
const CHILD_SEED_VAR: &str = "CORA_CACHE_TEST_CHILD_SEED";
const CHUNKS: u64 = 48;
const CHUNK_LEN: usize = 32 * 1024;
/// Room for about half of the chunks, so eviction runs all the time.
const LIMIT: u64 = 24 * CHUNK_LEN as u64;

fn worker(dir: &Path, seed: u64) -> (u64, u64) {
    let chunks: Vec<_> = (0..CHUNKS)
        .map(|i| {
            let data = cora_testdata::pseudo_random(CHUNK_LEN, 1000 + i);
            (sha256(&data), data)
        })
        .collect();
    let cache = ChunkCache::open(dir, LIMIT).expect("open cache");
    let (mut hits, mut misses) = (0, 0);
    let mut rng = cora_testdata::XorShift::new(seed);
    let mut buf = vec![0u8; 4096];
    for _ in 0..1500 {
        let x = rng.next_u64();
        let (d, data) = &chunks[(x % CHUNKS) as usize];
        let off = ((x >> 8) as usize % (CHUNK_LEN / 4096)) * 4096;
        if cache.read_at(d, off, &mut buf).expect("read_at") {
            assert_eq!(buf, &data[off..off + 4096], "wrong bytes served");
            hits += 1;
        } else {
            misses += 1;
            cache.insert(d, data).expect("insert");
        }
    }
    (hits, misses)
}

#[test]
fn child_worker() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return; // run directly by the harness: nothing to do
    };
    let seed = std::env::var(CHILD_SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (hits, misses) = worker(Path::new(&dir), seed);
    println!("CHILD-OK hits={hits} misses={misses}");
}

#[test]
fn processes_share_one_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let children: Vec<_> = (0..4u64)
        .map(|i| {
            Command::new(&exe)
                .args(["--exact", "child_worker", "--nocapture", "--test-threads=1"])
                .env(CHILD_DIR_VAR, dir.path())
                .env(CHILD_SEED_VAR, (0x5eed + i * 7919).to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    let (mut hits, mut misses) = (0u64, 0u64);
    for child in children {
        let out = child.wait_with_output().expect("wait child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split("CHILD-OK ").nth(1))
            .unwrap_or_else(|| panic!("child did not report: {stdout}"));
        for field in line.split_whitespace() {
            match field.split_once('=') {
                Some(("hits", n)) => hits += n.parse::<u64>().expect("hits"),
                Some(("misses", n)) => misses += n.parse::<u64>().expect("misses"),
                _ => {}
            }
        }
    }
    println!("children: {hits} hits, {misses} misses");
    assert!(hits > 0 && misses > 0, "hits {hits} misses {misses}");

    // Everything left is intact, near the limit, and no temp file is left behind.
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let report = cache.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::Corrupt), 0, "{report}");
    assert!(report.removed.is_empty(), "{report}");
    let stats = cache.stats().expect("stats");
    assert!(stats.entries > 0);
    // Each process may overshoot by what it inserted since its last scan (<= limit / 8).
    assert!(stats.bytes <= LIMIT + 4 * (LIMIT / 8), "{stats}");
    let leftover = std::fs::read_dir(dir.path().join("tmp"))
        .expect("tmp dir")
        .count();
    assert_eq!(leftover, 0, "temp files left behind");
}
