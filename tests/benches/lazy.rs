//! `cargo bench -p cora-tests --bench lazy`: the lazy read path against Debian's
//! docker-registry on loopback, next to references measured in the same run:
//! cold sequential read of a whole stack vs `curl` of the same blobs; warm random 4 KiB and
//! 1 MiB reads through the API vs `pread` on a plain file holding the same image.
//! Prints a table and one `RESULT {json}` line, and writes `lazy.json` into `$CORA_BENCH_OUT`.
//! `CORA_BENCH_DIAG=1` adds: curl and client range reads alone, and cold reads with the cache
//! on tmpfs with and without read-ahead.

use anyhow::{Result, bail};
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::registry::Registry;
use lazy::blobs::BlobRead;
use lazy::cache::ChunkCache;
use lazy::registry::{Client, ClientConfig, Reference};
use lazy::remote::RegistryBlobs;
use lazy::source::{FetchOptions, LazySource};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = fixtures::debian_tree("base", fixtures::BASE)?;
    let reg = Registry::start()?;
    let host = reg.host.clone();
    let src = tmp.path().join("src");
    blobfmt::dirsrc::layout_from_dirs(&[&tree], &src, "v1", true)?;
    let dst = format!("{host}/base:cora");
    run(Command::new(cora_bin("cora"))
        .args(["convert", "--insecure", &host])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&dst))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let client = Client::new(ClientConfig {
        insecure_hosts: vec![host.clone()],
        ..Default::default()
    })?;
    let r: Reference = dst.parse()?;
    let lazy::remote::RemoteImage {
        manifest, config, ..
    } = rt.block_on(lazy::remote::fetch_image(&client, &r))?;
    let diff_ids = config.rootfs.diff_ids;
    let blob_bytes: u64 = manifest.layers.iter().map(|l| l.size).sum();

    // Reference: curl of the same blobs, whole, to /dev/null.
    let t = Instant::now();
    for l in &manifest.layers {
        let st = Command::new("curl")
            .args(["-sf", "-o", "/dev/null"])
            .arg(format!("http://{host}/v2/base/blobs/{}", l.digest))
            .status()?;
        if !st.success() {
            bail!("curl failed");
        }
    }
    let curl_secs = t.elapsed().as_secs_f64();

    // Diagnostic: the registry client alone, 2 MiB range reads of the blobs, 1 and 8 threads.
    if std::env::var_os("CORA_BENCH_DIAG").is_some() {
        let blobs = RegistryBlobs::new(client.clone(), r.clone(), rt.handle().clone());
        let mut ranges = Vec::new();
        for l in &manifest.layers {
            for off in (0..l.size).step_by(2 << 20) {
                ranges.push((l.digest.clone(), off, (l.size - off).min(2 << 20)));
            }
        }
        let t = Instant::now();
        for (d, o, n) in &ranges {
            let st = Command::new("curl")
                .args([
                    "-sf",
                    "-o",
                    "/dev/null",
                    "-r",
                    &format!("{o}-{}", o + n - 1),
                ])
                .arg(format!("http://{host}/v2/base/blobs/{d}"))
                .status()?;
            if !st.success() {
                bail!("curl failed");
            }
        }
        println!("curl range reads: {:.2}s", t.elapsed().as_secs_f64());
        let t = Instant::now();
        for l in &manifest.layers {
            rt.block_on(client.get_blob(&r, &l.digest, l.size))?;
        }
        println!("client whole blobs: {:.2}s", t.elapsed().as_secs_f64());
        for threads in [1usize, 8] {
            let t = Instant::now();
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|sc| {
                for _ in 0..threads {
                    sc.spawn(|| {
                        loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((d, o, n)) = ranges.get(k) else {
                                break;
                            };
                            blobs.read(d, *o, *n).expect("range read");
                        }
                    });
                }
            });
            println!(
                "client range reads, {threads} threads: {:.2}s for {} requests",
                t.elapsed().as_secs_f64(),
                ranges.len()
            );
        }
        for ra in [0u64, 2 << 20] {
            let shm = tempfile::tempdir_in("/dev/shm")?;
            let cache = ChunkCache::open(shm.path(), 10 << 30)?;
            let remotes: Vec<Arc<dyn BlobRead>> = vec![Arc::new(RegistryBlobs::new(
                client.clone(),
                r.clone(),
                rt.handle().clone(),
            ))];
            let t = Instant::now();
            let src = LazySource::open(
                &manifest,
                &diff_ids,
                manifest.layers.len() - 1,
                remotes,
                cache,
                FetchOptions {
                    readahead: ra,
                    ..Default::default()
                },
            )?;
            let size = src.size();
            let mut buf = vec![0u8; 1 << 20];
            for off in (0..size).step_by(1 << 20) {
                let n = ((size - off) as usize).min(1 << 20);
                src.read_at(off, &mut buf[..n])?;
            }
            println!(
                "diag cold read, cache on tmpfs, readahead={ra}: {:.2}s {:?}",
                t.elapsed().as_secs_f64(),
                src.stats.snapshot()
            );
        }
    }

    // Cold: whole stack, sequential 1 MiB reads, empty cache.
    let remotes: Vec<Arc<dyn BlobRead>> = vec![Arc::new(RegistryBlobs::new(
        client.clone(),
        r.clone(),
        rt.handle().clone(),
    ))];
    let cache = ChunkCache::open(&tmp.path().join("cache"), 10 << 30)?;
    let t = Instant::now();
    let cpu0 = cpu_secs();
    let src = LazySource::open(
        &manifest,
        &diff_ids,
        manifest.layers.len() - 1,
        remotes,
        cache,
        FetchOptions::default(),
    )?;
    let size = src.size();
    let mut image = vec![0u8; size as usize];
    for off in (0..size).step_by(1 << 20) {
        let n = ((size - off) as usize).min(1 << 20);
        src.read_at(off, &mut image[off as usize..off as usize + n])?;
    }
    let cold_secs = t.elapsed().as_secs_f64();
    let cold_cpu = cpu_secs() - cpu0;
    let cold_stats = src.stats.snapshot();
    let fetched = cold_stats.fetched_bytes;
    println!("cold read: {cold_cpu:.2}s CPU (user+sys) in {cold_secs:.2}s; {cold_stats:?}");
    let floor_secs = decode_floor(&client, &r, &rt, &manifest, &src)?;
    let flat = tmp.path().join("flat.img");
    std::fs::write(&flat, &image)?;
    let file = std::fs::File::open(&flat)?;

    // Warm random reads: API vs pread on the plain file, same offsets.
    let mut rng = cora_testdata::XorShift::new(0x2545F4914F6CDD1D);
    let mut rnd = move |m: u64| rng.below(m);
    let mut warm = Vec::new();
    for (bs, n) in [(4096usize, 50_000usize), (1 << 20, 300)] {
        let offs: Vec<u64> = (0..n).map(|_| rnd(size / bs as u64) * bs as u64).collect();
        let mut buf = vec![0u8; bs];
        let t = Instant::now();
        for &o in &offs {
            src.read_at(o, &mut buf)?;
        }
        let api = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for &o in &offs {
            file.read_exact_at(&mut buf, o)?;
        }
        let pread = t.elapsed().as_secs_f64();
        warm.push(serde_json::json!({"block": bs, "ops": n, "api_ops_s": n as f64 / api, "pread_ops_s": n as f64 / pread, "ratio": pread / api}));
    }
    let result = serde_json::json!({
        "image_bytes": size,
        "blob_bytes": blob_bytes,
        "fetched_bytes": fetched,
        "curl_secs": curl_secs,
        "cold_api_secs": cold_secs,
        "cold_ratio_vs_curl": curl_secs / cold_secs,
        "cold_cpu_secs": cold_cpu,
        "decode_floor_secs": floor_secs,
        "cold_ratio_vs_floor": floor_secs / cold_secs,
        "warm": warm,
    });
    println!("stack image {size} bytes from {blob_bytes} blob bytes (fetched {fetched})");
    println!(
        "cold sequential: API {cold_secs:.2}s, curl of the blobs {curl_secs:.2}s -> {:.2}x of curl",
        curl_secs / cold_secs
    );
    println!(
        "floor (zstd decode + sha256 of every chunk, 2 threads, blobs in memory): {floor_secs:.2}s -> cold read at {:.2}x of the floor",
        floor_secs / cold_secs
    );
    for w in &warm {
        println!(
            "warm random {:>7} B: API {:>9.0} ops/s, pread {:>9.0} ops/s -> {:.2}x of pread",
            w["block"],
            w["api_ops_s"].as_f64().unwrap_or(0.0),
            w["pread_ops_s"].as_f64().unwrap_or(0.0),
            w["ratio"].as_f64().unwrap_or(0.0)
        );
    }
    println!("RESULT {result}");
    cora_tests::bench::write_json("lazy", &result)?;
    Ok(())
}

/// The least a cold read must do besides fetching: decompress every chunk and check its
/// sha256, spread over two threads, with the blobs already in memory.
fn decode_floor(
    client: &Client,
    r: &Reference,
    rt: &tokio::runtime::Runtime,
    manifest: &blobfmt::oci::Manifest,
    src: &LazySource,
) -> Result<f64> {
    use sha2::Digest;
    let mut blobs = Vec::new();
    for l in &manifest.layers {
        blobs.push(rt.block_on(client.get_blob(r, &l.digest, l.size))?);
    }
    let jobs: Vec<(usize, &blobfmt::format::ChunkEntry)> = src
        .stack()
        .layers()
        .iter()
        .enumerate()
        .flat_map(|(i, t)| t.chunks.iter().map(move |c| (i, c)))
        .collect();
    let t = Instant::now();
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..2)
            .map(|k| {
                let (jobs, blobs) = (&jobs, &blobs);
                sc.spawn(move || -> Result<()> {
                    for (layer, c) in jobs.iter().skip(k).step_by(2) {
                        let start = c.frame_offset as usize;
                        let frame = &blobs[*layer][start..start + c.compressed_len as usize];
                        let plain = zstd::bulk::decompress(frame, c.uncompressed_len as usize)?;
                        if <[u8; 32]>::from(sha2::Sha256::digest(&plain)) != c.digest {
                            bail!("chunk digest mismatch in layer {layer}");
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("decode thread panicked"))?
        })
    })?;
    Ok(t.elapsed().as_secs_f64())
}

/// CPU time (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
