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

    // Everything left is intact and near the limit, and every writer sealed its segment on
    // the way out (no index temp files, no segment without an index).
    let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
    let report = cache.gc().expect("gc");
    assert_eq!(report.count(RemovedReason::Corrupt), 0, "{report}");
    assert!(report.removed.is_empty(), "{report}");
    let stats = cache.stats().expect("stats");
    assert!(stats.entries > 0);
    // Each process may overshoot by what it inserted since its last scan (<= limit / 8) and
    // by the segment it is writing (64 KiB here, plus one record).
    let per_process = LIMIT / 8 + 64 * 1024 + CHUNK_LEN as u64 + 4096;
    assert!(stats.disk_bytes <= LIMIT + 4 * per_process, "{stats}");
    assert_sealed(dir.path());
}

fn assert_sealed(dir: &Path) {
    let names: Vec<String> = std::fs::read_dir(dir.join("segments"))
        .expect("segments dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for n in &names {
        let stem = n
            .strip_suffix(".seg")
            .or_else(|| n.strip_suffix(".idx"))
            .unwrap_or_else(|| panic!("stray file {n} in {names:?}"));
        assert!(
            names.contains(&format!("{stem}.seg")) && names.contains(&format!("{stem}.idx")),
            "{n} without its pair: {names:?}"
        );
    }
}

const CRASH_DIR_VAR: &str = "CORA_CACHE_TEST_CRASH_DIR";
const CRASH_CHUNK: usize = 256 * 1024;

fn crash_chunk(i: u64) -> (cache::ChunkDigest, Vec<u8>) {
    let data = cora_testdata::pseudo_random(CRASH_CHUNK, 50_000 + i);
    (sha256(&data), data)
}

/// Inserts chunk after chunk and says which are stored, until it is killed.
#[test]
fn child_inserter() {
    use std::io::Write;
    let Some(dir) = std::env::var_os(CRASH_DIR_VAR) else {
        return;
    };
    let cache = ChunkCache::open(Path::new(&dir), u64::MAX).expect("open cache");
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let (d, data) = crash_chunk(i);
        cache.insert(&d, &data).expect("insert");
        writeln!(out, "stored {i}").expect("stdout");
        out.flush().expect("stdout");
    }
}

#[test]
fn a_writer_killed_mid_insert_loses_nothing_it_stored() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    for round in 0..3u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_inserter",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_VAR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
        let mut stored = Vec::new();
        let mut line = String::new();
        // Kill it at a different point each round, while it is busy inserting.
        while stored.len() < 10 + 7 * round as usize {
            line.clear();
            assert!(lines.read_line(&mut line).expect("read") > 0, "child ended");
            if let Some(i) = line.trim().strip_prefix("stored ") {
                stored.push(i.parse::<u64>().expect("index"));
            }
        }
        child.kill().expect("kill -9");
        // What it said before dying counts too.
        for l in lines.lines() {
            if let Some(i) = l.expect("read").trim().strip_prefix("stored ") {
                stored.push(i.parse::<u64>().expect("index"));
            }
        }
        child.wait().expect("reap");
        // A new process seals the dead writer's segment and serves every chunk it stored.
        let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
        for &i in &stored {
            let (d, data) = crash_chunk(i);
            assert_eq!(
                cache.get(&d).expect("get").as_deref(),
                Some(&data[..]),
                "round {round}: chunk {i} lost or wrong"
            );
        }
        let report = cache.gc().expect("gc");
        assert_eq!(report.count(RemovedReason::Corrupt), 0, "{report}");
        assert_eq!(
            report.verified,
            cache.stats().expect("stats").entries,
            "{report}"
        );
        drop(cache);
        assert_sealed(dir.path());
    }
}
