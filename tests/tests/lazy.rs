//! The lazy read path (`lazy::source`) against Debian's docker-registry, behind a
//! fault-injecting proxy: concurrency, corruption, faults, a dead registry, and node-level
//! dedup through the shared chunk cache.

use anyhow::{Context, Result, ensure};
use cora_read::{BlockSource, Outcome};
use cora_tests::faults::{Fault, FaultProxy};
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::registry::Registry;
use lazy::blobs::BlobRead;
use lazy::cache::ChunkCache;
use lazy::registry::{Client, ClientConfig, Reference};
use lazy::remote::{RegistryBlobs, RemoteImage};
use lazy::source::{FetchOptions, LazySource};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request timeout and retries of the test client: the bound on a dead registry.
const TIMEOUT: Duration = Duration::from_secs(2);
const RETRIES: u32 = 2;

struct Env {
    rt: tokio::runtime::Runtime,
    reg: Registry,
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Result<Env> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Env {
            rt,
            reg: Registry::start()?,
            tmp: tempfile::tempdir()?,
        })
    }

    /// Convert `dirs` (as layers) to CORA and push to `repo:v1`; returns the manifest.
    fn push(&self, repo: &str, dirs: &[&Path]) -> Result<RemoteImage> {
        let src = self.tmp.path().join(format!("src-{repo}"));
        blobfmt::dirsrc::layout_from_dirs(dirs, &src, "v1", true)?;
        let dst = format!("{}/{repo}:v1", self.reg.host);
        run(Command::new(cora_bin("cora"))
            .args(["convert", "--insecure", &self.reg.host])
            .arg(format!("oci:{}:v1", src.display()))
            .arg(&dst))?;
        let client = self.client(&[&self.reg.host])?;
        let r: Reference = dst.parse()?;
        Ok(self.rt.block_on(lazy::remote::fetch_image(&client, &r))?)
    }

    fn client(&self, insecure: &[&str]) -> Result<Client> {
        Ok(Client::new(ClientConfig {
            insecure_hosts: insecure.iter().map(|s| s.to_string()).collect(),
            request_timeout: TIMEOUT,
            max_retries: RETRIES,
            retry_backoff: Duration::from_millis(50),
            ..Default::default()
        })?)
    }

    fn blobs(&self, host: &str, repo: &str) -> Result<Arc<dyn BlobRead>> {
        let r: Reference = format!("{host}/{repo}:v1").parse()?;
        Ok(Arc::new(RegistryBlobs::new(
            self.client(&[host])?,
            r,
            self.rt.handle().clone(),
        )))
    }

    fn source(
        &self,
        m: &RemoteImage,
        remotes: Vec<Arc<dyn BlobRead>>,
        cache: &Path,
    ) -> Result<LazySource> {
        self.source_with(m, remotes, cache, FetchOptions::default())
    }

    fn source_with(
        &self,
        m: &RemoteImage,
        remotes: Vec<Arc<dyn BlobRead>>,
        cache: &Path,
        opts: FetchOptions,
    ) -> Result<LazySource> {
        Ok(LazySource::open(
            &m.manifest,
            &m.config.rootfs.diff_ids,
            m.manifest.layers.len() - 1,
            remotes,
            ChunkCache::open(cache, 10 << 30)?,
            opts,
        )?)
    }
}

fn read_all(src: &LazySource, piece: usize, start_at: u64) -> Result<Vec<u8>> {
    let size = src.size();
    let mut out = vec![0u8; size as usize];
    let n_pieces = size.div_ceil(piece as u64);
    for k in 0..n_pieces {
        let idx = (k + start_at) % n_pieces;
        let off = idx * piece as u64;
        let len = (size - off).min(piece as u64) as usize;
        src.read_at(off, &mut out[off as usize..off as usize + len])?;
    }
    Ok(out)
}

fn small_tree() -> Result<std::path::PathBuf> {
    fixtures::debian_tree("small", fixtures::SMALL)
}

/// The image as the converter's own layout says it is, read without the network.
fn reference_bytes(env: &Env, m: &RemoteImage, repo: &str) -> Result<Vec<u8>> {
    let remotes = vec![env.blobs(&env.reg.host, repo)?];
    let src = env.source(
        m,
        remotes,
        &env.tmp.path().join(format!("ref-cache-{repo}")),
    )?;
    read_all(&src, 1 << 20, 0)
}

#[test]
fn sixteen_readers_fetch_each_chunk_once() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("app", &[&small_tree()?])?;
    let expect = reference_bytes(&env, &m, "app")?;
    let src = Arc::new(env.source(
        &m,
        vec![env.blobs(&env.reg.host, "app")?],
        &env.tmp.path().join("cache"),
    )?);
    let distinct: std::collections::HashSet<_> = src
        .stack()
        .plan(0, src.size())?
        .into_iter()
        .filter_map(|p| match p {
            blobfmt::Piece::Chunk { stream, index, .. } => Some((stream, index)),
            _ => None,
        })
        .collect();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let src = src.clone();
            std::thread::spawn(move || read_all(&src, 128 << 10, i * 7))
        })
        .collect();
    for h in handles {
        let got = h.join().expect("reader thread")?;
        assert!(got == expect, "a reader saw different bytes");
    }
    let st = src.stats.snapshot();
    // Read-ahead may fetch chunks no extent references (tar headers), never one twice.
    let total_chunks = src
        .stack()
        .layers()
        .iter()
        .map(|t| t.chunks.len())
        .sum::<usize>()
        + src.stack().top().meta_chunks.len();
    assert!(
        st.misses as usize >= distinct.len(),
        "{st:?} < {} distinct",
        distinct.len()
    );
    assert!(
        st.misses as usize <= total_chunks,
        "a chunk was fetched twice: {st:?}, {total_chunks} chunks"
    );
    assert_eq!(st.corrupt, 0);
    // Cold readers waited for fetches, and that wait is counted; a warm read never waits.
    assert!(st.stalls > 0 && st.stall_seconds > 0.0, "{st:?}");
    assert!(read_all(&src, 128 << 10, 0)? == expect);
    let warm = src.stats.snapshot();
    assert_eq!(
        (warm.stalls, warm.stall_seconds),
        (st.stalls, st.stall_seconds)
    );
    Ok(())
}

#[test]
fn corrupt_bytes_never_come_out() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("app", &[&small_tree()?])?;
    let expect = reference_bytes(&env, &m, "app")?;
    let proxy = env.rt.block_on(FaultProxy::start(env.reg.addr))?;
    proxy.inject("/blobs/", Fault::FlipByte(100), 1_000_000);

    // A lying first source: every chunk it serves is caught, then fetched from the next one.
    let remotes = vec![
        env.blobs(&proxy.host, "app")?,
        env.blobs(&env.reg.host, "app")?,
    ];
    // The trailer comes from the second source too (the first one's fails its digest).
    let src = env.source(&m, remotes, &env.tmp.path().join("cache-a"))?;
    let got = read_all(&src, 1 << 20, 0)?;
    assert!(got == expect, "corrupted bytes came out");
    assert!(
        src.stats.snapshot().corrupt > 0,
        "the flips were not noticed"
    );

    // Only a lying source: reads fail, naming the chunk; nothing corrupt is cached.
    let good = env.source(
        &m,
        vec![env.blobs(&env.reg.host, "app")?],
        &env.tmp.path().join("cache-b"),
    )?;
    let mut first = vec![0u8; 4096];
    good.read_at(0, &mut first)?; // trailers cached, so the liar is asked only for chunks
    let liar = env.source(
        &m,
        vec![env.blobs(&proxy.host, "app")?],
        &env.tmp.path().join("cache-b"),
    )?;
    let mut buf = vec![0u8; 1 << 20];
    let off = liar.size() / 2;
    let err = liar
        .read_at(off, &mut buf)
        .expect_err("corrupt chunk served")
        .to_string();
    assert!(err.contains("digest mismatch"), "{err}");
    proxy.clear();
    liar.read_at(off, &mut buf)?;
    assert!(
        buf[..] == expect[off as usize..off as usize + buf.len()],
        "bytes after recovery differ"
    );
    Ok(())
}

#[test]
fn faults_are_survived_and_reads_succeed_once_they_stop() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("app", &[&small_tree()?])?;
    let expect = reference_bytes(&env, &m, "app")?;
    let proxy = env.rt.block_on(FaultProxy::start(env.reg.addr))?;
    let src = env.source(
        &m,
        vec![env.blobs(&proxy.host, "app")?],
        &env.tmp.path().join("cache"),
    )?;
    for (fault, times) in [
        (Fault::Status(500), 2),
        (Fault::Reset, 1),
        (Fault::Truncate(100), 1),
        (Fault::Delay(Duration::from_millis(300)), 2),
        (Fault::StallBody(10), 1),
    ] {
        proxy.inject("/blobs/", fault.clone(), times);
        let got = read_all(&src, 1 << 20, 3)?;
        assert!(got == expect, "wrong bytes after {fault:?}");
        assert_eq!(proxy.pending(), 0, "{fault:?} was never exercised");
        // Next round starts cold again.
        drop(got);
        src.cache().prune(0)?;
    }
    Ok(())
}

#[test]
fn dead_registry_fails_uncached_reads_within_bound_and_cached_reads_work() -> Result<()> {
    let mut env = Env::new()?;
    let m = env.push("app", &[&small_tree()?])?;
    let src = env.source(
        &m,
        vec![env.blobs(&env.reg.host, "app")?],
        &env.tmp.path().join("cache"),
    )?;
    let half = src.size() / 2;
    let mut cached = vec![0u8; 1 << 20];
    src.read_at(0, &mut cached)?;
    env.reg.kill();
    // Stated bound: every attempt fails fast (connection refused) or within TIMEOUT;
    // (RETRIES + 1) attempts plus capped backoff.
    let bound = TIMEOUT * (RETRIES + 1) + Duration::from_secs(5);
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let err = src
        .read_at(half, &mut buf)
        .expect_err("read from a dead registry");
    assert!(
        t.elapsed() < bound,
        "took {:?}, bound {bound:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("fetching chunk"), "{err}");
    let mut again = vec![0u8; 1 << 20];
    src.read_at(0, &mut again)?;
    assert!(again == cached);
    Ok(())
}

#[test]
fn successors_fetch_only_what_they_add() -> Result<()> {
    let env = Env::new()?;
    let base = small_tree()?;
    let mut updated: Vec<&str> = fixtures::SMALL.to_vec();
    updated.retain(|p| !p.starts_with("libssl3"));
    updated.push("libssl3=3.0.22-1~deb12u2");
    let base_b = fixtures::debian_tree("small-ssl-updated", &updated)?;
    let app = fixtures::debian_tree("python-layer", fixtures::PYTHON)?;
    let v1 = env.push("v1", &[&base])?;
    let v2 = env.push("v2", &[&base, &app])?;
    let v2b = env.push("v2b", &[&base_b])?;
    let cache = env.tmp.path().join("cache");
    let stored = |m: &RemoteImage| m.manifest.layers.iter().map(|l| l.size).sum::<u64>();
    let s1 = env.source(&v1, vec![env.blobs(&env.reg.host, "v1")?], &cache)?;
    read_all(&s1, 1 << 20, 0)?;
    for (name, m, limit) in [("v2", &v2, 0.6), ("v2b", &v2b, 0.5)] {
        let s = env.source(m, vec![env.blobs(&env.reg.host, name)?], &cache)?;
        let bytes = read_all(&s, 1 << 20, 0)?;
        assert_eq!(bytes.len() as u64, s.size());
        let fetched = s.stats.snapshot().fetched_bytes;
        let ratio = fetched as f64 / stored(m) as f64;
        println!(
            "{name}: fetched {fetched} of {} stored bytes after v1 ({ratio:.3})",
            stored(m)
        );
        assert!(
            ratio < limit,
            "{name} fetched {ratio:.3} of its size with v1 cached"
        );
    }
    Ok(())
}

#[test]
fn lent_slices_and_file_extents_are_the_cached_bytes_and_none_exist_before_caching() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("app", &[&small_tree()?])?;
    let src = env.source(
        &m,
        vec![env.blobs(&env.reg.host, "app")?],
        &env.tmp.path().join("cache"),
    )?;
    let size = src.size();
    // The bytes lent for a read, or None if the source copied (or missed) instead.
    let lend = |off: u64, len: usize| -> Result<Option<Vec<u8>>> {
        let mut got = Vec::new();
        let mut gather = |iov: &[std::io::IoSlice<'_>]| {
            got = iov.iter().flat_map(|s| s.iter().copied()).collect();
            Ok(())
        };
        let mut buf = vec![0u8; len];
        Ok(
            match BlockSource::read(&src, off, &mut buf, Some(&mut gather))? {
                Outcome::Lent => Some(got),
                Outcome::Copied | Outcome::Miss(_) => None,
            },
        )
    };
    // The bytes of a read's file extents (what a zero-copy transport reads), or None.
    let in_files = |off: u64, len: usize| -> Result<Option<Vec<u8>>> {
        let mut ext = Vec::new();
        if !BlockSource::file_extents(&src, off, len, &mut ext) {
            assert!(ext.is_empty(), "a refused range left extents");
            return Ok(None);
        }
        let mut got = Vec::with_capacity(len);
        for e in &ext {
            let mut piece = vec![0u8; e.len];
            // SAFETY: pread into a live buffer of the stated length.
            let n = unsafe { libc::pread(e.fd, piece.as_mut_ptr().cast(), e.len, e.offset as i64) };
            assert_eq!(n, e.len as isize, "short read of an extent");
            got.extend(piece);
        }
        Ok(Some(got))
    };
    assert!(lend(0, 4096)?.is_none(), "lent before cached");
    assert!(in_files(0, 4096)?.is_none(), "in files before cached");
    let all = read_all(&src, 1 << 20, 0)?;
    // Reads return before their chunks are stored: wait for the last inserts.
    let plan = src.stack().plan(0, size)?;
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(plan.iter().all(|p| match *p {
            blobfmt::Piece::Chunk { stream, index, .. } => src
                .cache()
                .contains(&src.stack().chunk(stream, index).digest),
            blobfmt::Piece::Zero { .. } => true,
        }))
    })?;
    let mut ranges: Vec<(u64, usize)> = vec![(0, 4096), (size - 4096, 4096), (size - 512, 512)];
    let mut rng = cora_testdata::XorShift::new(1);
    for len in [4096usize, 65536, 1 << 20] {
        for _ in 0..50 {
            let off = rng.below(size - len as u64) & !511;
            ranges.push((off, len));
        }
    }
    let hits = || BlockSource::stats(&src).and_then(|v| v["hits"].as_u64());
    let before = hits().expect("hits in the source's stats");
    for &(off, len) in &ranges {
        let lent = lend(off, len)?.unwrap_or_else(|| panic!("{off}+{len} not lent though cached"));
        assert!(lent == all[off as usize..off as usize + len], "{off}+{len}");
        let files = in_files(off, len)?.unwrap_or_else(|| panic!("{off}+{len} not in files"));
        assert!(
            files == all[off as usize..off as usize + len],
            "{off}+{len} in files"
        );
    }
    assert!(
        hits() >= Some(before + 2 * ranges.len() as u64),
        "reads served from files count as hits"
    );
    Ok(())
}

/// Every chunk of the stack: (stream, index, digest).
fn all_chunks(src: &LazySource) -> Vec<(blobfmt::StreamId, usize, lazy::cache::ChunkDigest)> {
    let n = src.stack().layers().len() as u32;
    std::iter::once(blobfmt::StreamId::Meta)
        .chain((0..n).map(blobfmt::StreamId::Layer))
        .flat_map(|s| {
            src.stack()
                .chunks(s)
                .iter()
                .enumerate()
                .map(move |(i, c)| (s, i, c.digest))
        })
        .collect()
}

/// The small tree pushed as `repo`, opened with a miss window of `window` bytes and no
/// sequential read-ahead, its metadata fetched.
fn windowed_source(env: &Env, repo: &str, window: u64) -> Result<LazySource> {
    let m = env.push(repo, &[&small_tree()?])?;
    let src = env.source_with(
        &m,
        vec![env.blobs(&env.reg.host, repo)?],
        &env.tmp.path().join("cache"),
        FetchOptions {
            readahead: 0,
            miss_window: window,
            ..FetchOptions::default()
        },
    )?;
    src.wait_metadata()?;
    Ok(src)
}

#[test]
fn a_miss_also_fetches_the_window_after_it_and_no_more() -> Result<()> {
    let env = Env::new()?;
    let window = 256 << 10;
    let src = windowed_source(&env, "window", window)?;
    // A 4 KiB read inside a chunk in the middle of the layer's stream.
    let layer = blobfmt::StreamId::Layer(0);
    let chunks = src.stack().chunks(layer);
    let plan = src.stack().plan(0, src.size())?;
    let (offset, index) = {
        let mut pos = 0u64;
        let mut found = None;
        for p in &plan {
            if let blobfmt::Piece::Chunk { stream, index, .. } = *p
                && stream == layer
                && index >= chunks.len() / 2
                && p.len() >= 4096
            {
                found = Some((pos, index));
                break;
            }
            pos += p.len();
        }
        found.context("no layer chunk piece in the second half of the stream")?
    };
    let mut buf = vec![0u8; 4096];
    src.read_at(offset, &mut buf)?;
    // The read returns before the chunk is stored (readers do not wait for the cache).
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(src.cache().contains(&chunks[index].digest))
    })?;
    // The window: the chunks after `index` whose compressed sizes add up to `window`.
    let end = window_end(chunks, index + 1, window);
    assert!(end > index + 1, "the window holds no chunk");
    let in_window = &chunks[index + 1..end];
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(in_window.iter().all(|c| src.cache().contains(&c.digest)))
    })?;
    let st = src.stats.snapshot();
    let meta = src.stack().chunks(blobfmt::StreamId::Meta).len() as u64;
    assert_eq!(
        st.readahead,
        meta + in_window.len() as u64,
        "the window (and the metadata fetch) only: {st:?}"
    );
    assert_eq!(st.misses, st.readahead + 1, "{st:?}");
    for c in chunks[..index].iter().chain(chunks.get(end)) {
        assert!(
            !src.cache().contains(&c.digest),
            "a chunk outside the window was fetched"
        );
    }
    Ok(())
}

/// A miss inside a file brings the rest of that file (its extent), up to `file_window`
/// compressed bytes, and nothing after it; with a smaller cap, only that much.
#[test]
fn a_miss_inside_a_file_fetches_to_the_files_end_within_the_cap() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("filewin", &[&small_tree()?])?;
    let layer = blobfmt::StreamId::Layer(0);
    for (run, cap_chunks) in [(0, None), (1, Some(1usize))] {
        let open = |file_window: u64, cache: &str| {
            env.source_with(
                &m,
                vec![env.blobs(&env.reg.host, "filewin")?],
                &env.tmp.path().join(format!("{cache}-{run}")),
                FetchOptions {
                    readahead: 0,
                    miss_window: 0,
                    file_window,
                    ..FetchOptions::default()
                },
            )
        };
        // The layer's file spanning the most chunks: where it starts and ends in chunks.
        let probe = open(0, "probe")?;
        let chunks = probe.stack().chunks(layer).to_vec();
        let at = |src: u64| {
            chunks.partition_point(|c| c.stream_offset + u64::from(c.uncompressed_len) <= src)
        };
        let e = *probe
            .stack()
            .top()
            .extents
            .iter()
            .filter(|e| e.source == 0 && e.length > 0)
            .max_by_key(|e| at(e.src_offset + e.length - 1) - at(e.src_offset))
            .context("no file extents")?;
        let (first, last) = (at(e.src_offset), at(e.src_offset + e.length - 1));
        assert!(
            last >= first + 3,
            "no file spans four chunks: {first}..={last}"
        );
        // The chunks the read itself needs (4 KiB may straddle two).
        let len = 4096u64;
        let demand_last = probe
            .stack()
            .plan(e.image_offset, len)?
            .iter()
            .filter_map(|p| match *p {
                blobfmt::Piece::Chunk { index, .. } => Some(index),
                blobfmt::Piece::Zero { .. } => None,
            })
            .max()
            .context("the file's first bytes are in no chunk")?;
        drop(probe);
        let end = match cap_chunks {
            None => last + 1,
            Some(n) => demand_last + 1 + n,
        };
        let cap = match cap_chunks {
            None => 64 << 20,
            Some(_) => chunks[demand_last + 1..end]
                .iter()
                .map(|c| u64::from(c.compressed_len))
                .sum(),
        };
        let src = open(cap, "cache")?;
        src.wait_metadata()?;
        let mut buf = vec![0u8; len as usize];
        src.read_at(e.image_offset, &mut buf)?;
        let want = &chunks[first..end];
        cora_tests::wait_until(Duration::from_secs(30), || {
            Ok(want.iter().all(|c| src.cache().contains(&c.digest)))
        })?;
        let st = src.stats.snapshot();
        let meta = src.stack().chunks(blobfmt::StreamId::Meta).len() as u64;
        assert_eq!(
            st.readahead,
            meta + (end - demand_last - 1) as u64,
            "run {run}: the rest of the file (and the metadata) only: {st:?}"
        );
        for c in chunks[..first].iter().chain(chunks.get(end)) {
            assert!(
                !src.cache().contains(&c.digest),
                "run {run}: a chunk outside the file's window was fetched"
            );
        }
    }
    Ok(())
}

#[test]
fn no_miss_window_while_a_stored_trace_is_prefetched() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("traced", &[&small_tree()?])?;
    let proxy = env.rt.block_on(FaultProxy::start(env.reg.addr))?;
    let src = env.source_with(
        &m,
        vec![env.blobs(&proxy.host, "traced")?],
        &env.tmp.path().join("cache"),
        FetchOptions {
            readahead: 0,
            miss_window: 256 << 10,
            ..FetchOptions::default()
        },
    )?;
    src.wait_metadata()?;
    let layer = blobfmt::StreamId::Layer(0);
    let chunks = src.stack().chunks(layer).to_vec();
    ensure!(chunks.len() >= 8, "the test tree has too few chunks");
    // Every request from now on takes a while: the trace's fetch is still on the wire when
    // the demand read below misses.
    let before = proxy.count("/blobs/");
    proxy.inject("/blobs/", Fault::Delay(Duration::from_millis(1500)), 1000);
    let trace: Vec<_> = chunks[..2].iter().map(|c| c.digest).collect();
    src.start_prefetch(move || trace);
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(proxy.count("/blobs/") > before)
    })?;
    // A demand miss in the second half of the stream, far from the trace.
    let index = (chunks.len() / 2..chunks.len())
        .find(|&i| offset_of_chunk(&src, layer, i).ok().flatten().is_some())
        .context("no served chunk in the second half of the stream")?;
    let offset = offset_of_chunk(&src, layer, index)?.context("chunk not served")?;
    let mut buf = vec![0u8; 512];
    src.read_at(offset, &mut buf)?;
    src.wait_prefetch();
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(src.cache().contains(&chunks[index].digest))
    })?;
    let st = src.stats.snapshot();
    let meta = src.stack().chunks(blobfmt::StreamId::Meta).len() as u64;
    assert_eq!(st.readahead, meta, "a miss window was fetched: {st:?}");
    if let Some(next) = chunks.get(index + 1) {
        assert!(
            !src.cache().contains(&next.digest),
            "the chunk after the miss was fetched"
        );
    }
    // Once the trace is in, a miss fetches its window again (a chunk between the trace and
    // the first miss).
    proxy.clear();
    let again = (2..chunks.len() / 2 - 1)
        .find(|&i| offset_of_chunk(&src, layer, i).ok().flatten().is_some())
        .context("no served chunk in the first half of the stream")?;
    let offset = offset_of_chunk(&src, layer, again)?.context("chunk not served")?;
    src.read_at(offset, &mut buf)?;
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(src.stats.snapshot().readahead > meta)
    })?;
    Ok(())
}

#[test]
fn fill_fetches_the_whole_stack_in_the_background() -> Result<()> {
    use cora_api::driver::Fill;
    let env = Env::new()?;
    let tree = small_tree()?;
    let m = env.push("fill", &[&tree])?;
    let expect = reference_bytes(&env, &m, "fill")?;
    for fill in [Fill::Idle, Fill::Paced, Fill::Always] {
        let src = env.source_with(
            &m,
            vec![env.blobs(&env.reg.host, "fill")?],
            &env.tmp.path().join(format!("cache-{}", fill.as_str())),
            FetchOptions {
                fill,
                ..FetchOptions::default()
            },
        )?;
        assert!(src.fills());
        // No trace: the prefetch is the fill alone.
        src.start_prefetch(Vec::new);
        src.wait_prefetch();
        for (s, i, d) in all_chunks(&src) {
            assert!(
                src.cache().contains(&d),
                "{fill:?}: chunk {i} of {s:?} not filled in"
            );
        }
        let st = src.stats.snapshot();
        assert_eq!(st.misses, st.prefetched + st.readahead, "{fill:?}: {st:?}");
        assert!(st.prefetched > 0, "{fill:?}: {st:?}");
        // Every read is now local and right.
        assert!(read_all(&src, 1 << 20, 3)? == expect, "{fill:?}");
        assert_eq!(
            src.stats.snapshot().misses,
            st.misses,
            "{fill:?}: a read missed"
        );
    }
    Ok(())
}

/// Image offset of the first byte of chunk `index` of `stream` that the image serves (some
/// chunks, e.g. of tar headers, back no image byte).
fn offset_of_chunk(
    src: &LazySource,
    stream: blobfmt::StreamId,
    index: usize,
) -> Result<Option<u64>> {
    let mut pos = 0u64;
    for p in src.stack().plan(0, src.size())? {
        if let blobfmt::Piece::Chunk {
            stream: s,
            index: i,
            ..
        } = p
            && s == stream
            && i == index
        {
            return Ok(Some(pos));
        }
        pos += p.len();
    }
    Ok(None)
}

/// Index after the chunks whose compressed sizes add up to `bytes`, from `from`.
fn window_end(chunks: &[blobfmt::ChunkEntry], from: usize, bytes: u64) -> usize {
    let (mut end, mut budget) = (from, bytes);
    while end < chunks.len() && budget > 0 {
        budget = budget.saturating_sub(u64::from(chunks[end].compressed_len));
        end += 1;
    }
    end
}

#[test]
fn a_reader_going_through_the_window_claims_the_next_one_twice_as_large() -> Result<()> {
    let env = Env::new()?;
    let window = 128 << 10;
    let src = windowed_source(&env, "stream", window)?;
    let layer = blobfmt::StreamId::Layer(0);
    let chunks = src.stack().chunks(layer).to_vec();
    // A chunk a quarter into the stream that backs image bytes, and whose first window has a
    // backed chunk at or past its middle (the trigger) to read next.
    let mut start = None;
    for i in chunks.len() / 4..chunks.len() / 2 {
        let Some(at) = offset_of_chunk(&src, layer, i)? else {
            continue;
        };
        let end = window_end(&chunks, i + 1, window);
        let trigger = i + 1 + (end - i - 1) / 2;
        let mut next = None;
        for j in (trigger..end).rev() {
            if let Some(o) = offset_of_chunk(&src, layer, j)? {
                next = Some((j, o));
                break;
            }
        }
        if let Some(next) = next {
            start = Some((i, at, end, next));
            break;
        }
    }
    let (_, at, end, (_, next_at)) = start.context("no chunk with a readable window")?;
    let mut buf = vec![0u8; 512];
    src.read_at(at, &mut buf)?;
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(chunks[..end]
            .iter()
            .rev()
            .take(1)
            .all(|c| src.cache().contains(&c.digest)))
    })?;
    // Reading inside the window, past its middle: the next window, 2 x 128 KiB, follows.
    src.read_at(next_at, &mut buf)?;
    let second_end = window_end(&chunks, end, 2 * window);
    assert!(second_end > end, "the stream ends at the first window");
    cora_tests::wait_until(Duration::from_secs(30), || {
        Ok(chunks[end..second_end]
            .iter()
            .all(|c| src.cache().contains(&c.digest)))
    })?;
    for c in chunks.iter().skip(second_end).take(4) {
        assert!(
            !src.cache().contains(&c.digest),
            "fetched past the second window"
        );
    }
    Ok(())
}

/// A blob source that panics on its next read once armed (a bug in a fetch path).
struct PanicsWhenArmed {
    inner: Arc<dyn BlobRead>,
    armed: std::sync::atomic::AtomicBool,
}

impl BlobRead for PanicsWhenArmed {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self, digest: &str) -> Result<u64, lazy::blobs::BlobError> {
        self.inner.size(digest)
    }
    fn read(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, lazy::blobs::BlobError> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("injected fetch panic");
        }
        self.inner.read(digest, offset, len)
    }
}

/// A fetch that panics fails its read with an error, is counted, and the pool keeps its
/// worker: the same read succeeds next time instead of waiting forever.
#[test]
fn a_panicking_fetch_fails_its_read_and_is_counted() -> Result<()> {
    let env = Env::new()?;
    let m = env.push("panics", &[&small_tree()?])?;
    let expect = reference_bytes(&env, &m, "panics")?;
    let remote = Arc::new(PanicsWhenArmed {
        inner: env.blobs(&env.reg.host, "panics")?,
        armed: false.into(),
    });
    let src = env.source_with(
        &m,
        vec![remote.clone()],
        &env.tmp.path().join("cache"),
        FetchOptions {
            fetch_threads: 1,
            ..FetchOptions::default()
        },
    )?;
    src.wait_metadata()?;
    remote
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let off = src.size() / 2;
    let mut buf = vec![0u8; 4096];
    src.read_at(off, &mut buf)
        .expect_err("a read whose fetch panicked succeeded");
    assert_eq!(src.stats.snapshot().worker_panics, 1);
    src.read_at(off, &mut buf)?;
    assert!(buf[..] == expect[off as usize..off as usize + buf.len()]);
    Ok(())
}
