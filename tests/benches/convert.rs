//! `cargo bench -p cora-tests --bench convert`: conversion speed, memory and size on a real
//! Debian tree, beside the single-core FastCDC + sha256 + zstd limit on the same bytes, and
//! the chunk-size trade-off (stored size vs what an updated base adds), and the peer: the
//! same tree from a directory through `cora convert dir:` and Nydus's `nydus-image create`
//! (RAFS v6; `CORA_NYDUS_BIN`, set by `cargo xtask bench convert`), as child processes,
//! interleaved, warm page cache: wall time, CPU time, peak RSS, bytes written; and both on a
//! large layer (`CORA_BENCH_LARGE_GB` 1 GiB files of incompressible bytes, default 5, 0 skips).
//! Prints a human table and one JSON line (prefixed `RESULT `), and writes `convert.json`
//! into `$CORA_BENCH_OUT` for `cargo xtask bench report`.

use anyhow::Result;
use blobfmt::convert::{self, Options};
use blobfmt::writer::ChunkParams;
use cora_tests::bench::{ChildCost, run_measured};
use cora_tests::fixtures;
use cora_tests::nydus;
use std::collections::HashSet;
use std::time::Instant;

fn main() -> Result<()> {
    let work = tempfile::tempdir()?;
    let base = fixtures::debian_tree("base", fixtures::BASE)?;
    let updated = fixtures::debian_tree("base-ssl-updated", &fixtures::base_updated())?;
    let src = work.path().join("src");
    blobfmt::dirsrc::layout_from_dirs(&[&base], &src, "v1", true)?;
    let src_b = work.path().join("src-b");
    blobfmt::dirsrc::layout_from_dirs(&[&updated], &src_b, "v1", true)?;
    let img = blobfmt::oci::open_layout(&src, Some("v1"))?;
    let img_b = blobfmt::oci::open_layout(&src_b, Some("v1"))?;
    let targz = img.manifest.layers[0].size;
    let tar_path = work.path().join("base.tar");
    blobfmt::oci::decompress_layer(
        &img.blob_path(&img.manifest.layers[0].digest)?,
        blobfmt::oci::Compression::Gzip,
        &tar_path,
    )?;
    let tar = std::fs::read(&tar_path)?;

    // Reference: one core doing what conversion must do to every byte.
    let p = ChunkParams::default();
    let t = Instant::now();
    let mut zbytes = 0usize;
    for c in fastcdc::v2020::FastCDC::new(&tar, p.min, p.avg, p.max) {
        let data = &tar[c.offset..c.offset + c.length];
        std::hint::black_box(blobfmt::sha256(data));
        zbytes += zstd::bulk::compress(data, p.zstd_level)?.len();
    }
    let ref_secs = t.elapsed().as_secs_f64();
    let ref_mbs = tar.len() as f64 / ref_secs / 1e6;
    std::hint::black_box(zbytes);

    let mut rows = Vec::new();
    for avg in [16u32 << 10, 64 << 10] {
        let opts = Options {
            params: ChunkParams::from_avg(avg, 3)?,
            ..Options::default()
        };
        let mut chunk_sets = Vec::new();
        let mut first = None;
        for (name, image) in [("v1", &img), ("v1-updated", &img_b)] {
            let out = work.path().join(format!("out-{avg}-{name}"));
            let scratch = work.path().join(format!("scratch-{avg}-{name}"));
            std::fs::create_dir_all(&scratch)?;
            let t = Instant::now();
            let r = convert::convert_layout(image, &out, "v1", &opts, &scratch, &|_, _| {})?;
            let secs = t.elapsed().as_secs_f64();
            let l = &r.layers[0];
            let set: HashSet<([u8; 32], u32)> = l
                .blob
                .trailer
                .chunks
                .iter()
                .chain(&l.blob.trailer.meta_chunks)
                .map(|c| (c.digest, c.compressed_len))
                .collect();
            chunk_sets.push(set);
            if first.is_none() {
                first = Some((
                    secs,
                    l.blob.stats.chunk_secs,
                    l.blob.stats.image_secs,
                    l.blob.size,
                    l.blob.trailer.chunks.len(),
                    l.blob.stats.meta_blocks,
                    l.blob.stats.data_blocks,
                    l.blob.trailer_length,
                ));
            }
        }
        let (secs, chunk_secs, image_secs, stored, chunks, meta_blocks, data_blocks, trailer) =
            first.expect("v1 converted");
        let added: u64 = chunk_sets[1]
            .difference(&chunk_sets[0])
            .map(|&(_, len)| u64::from(len))
            .sum();
        rows.push(serde_json::json!({
            "chunk_avg": avg,
            "tar_bytes": tar.len(),
            "targz_bytes": targz,
            "stored_bytes": stored,
            "stored_vs_targz": stored as f64 / targz as f64,
            "chunks": chunks,
            "trailer_bytes": trailer,
            "meta_blocks": meta_blocks,
            "data_blocks": data_blocks,
            "convert_secs": secs,
            "chunk_phase_secs": chunk_secs,
            "image_phase_secs": image_secs,
            "convert_mbs": tar.len() as f64 / secs / 1e6,
            "chunk_phase_mbs": tar.len() as f64 / chunk_secs / 1e6,
            "updated_base_adds_bytes": added,
        }));
    }
    let peak = |who| {
        // SAFETY: getrusage only writes the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        ru.ru_maxrss as u64 * 1024
    };
    // Before the peer runs: their children start from this process's RSS (see
    // `run_measured`), so they would only repeat it.
    let child_peak = peak(libc::RUSAGE_CHILDREN);
    let peers = peer_runs(&base, work.path(), 3)?;
    // A large layer (model weights): memory must stay bounded whatever the layer's size.
    let large_gb: u64 = std::env::var("CORA_BENCH_LARGE_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let large = if large_gb > 0 {
        let tree = large_tree(work.path(), large_gb)?;
        let mut v = peer_runs(&tree, work.path(), 1)?;
        std::fs::remove_dir_all(&tree)?;
        v["tree_bytes"] = (large_gb << 30).into();
        v
    } else {
        serde_json::Value::Null
    };
    let result = serde_json::json!({
        "tree_bytes": fixtures::tree_bytes(&base)?,
        "peers": peers,
        "large": large,
        "reference_single_core_mbs": ref_mbs,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "peak_rss_bytes": peak(libc::RUSAGE_SELF),
        "peak_child_rss_bytes": child_peak,
        "runs": rows,
    });
    println!(
        "tree {:.1} MB, tar {:.1} MB, tar.gz {:.1} MB",
        fixtures::tree_bytes(&base)? as f64 / 1e6,
        tar.len() as f64 / 1e6,
        targz as f64 / 1e6
    );
    println!("single-core FastCDC+sha256+zstd reference: {ref_mbs:.1} MB/s");
    for r in result["runs"].as_array().into_iter().flatten() {
        println!(
            "avg {:>6}: stored {:>10} ({:.3}x tar.gz), {} chunks, convert {:.1} MB/s (chunk phase {:.1} MB/s = {:.2}x of 2 cores' reference), meta blocks {}, updated base adds {} bytes",
            r["chunk_avg"],
            r["stored_bytes"],
            r["stored_vs_targz"].as_f64().unwrap_or(0.0),
            r["chunks"],
            r["convert_mbs"].as_f64().unwrap_or(0.0),
            r["chunk_phase_mbs"].as_f64().unwrap_or(0.0),
            r["chunk_phase_mbs"].as_f64().unwrap_or(0.0) / (2.0 * ref_mbs),
            r["meta_blocks"],
            r["updated_base_adds_bytes"]
        );
    }
    println!(
        "peak RSS {} MB (child processes {} MB)",
        result["peak_rss_bytes"].as_u64().unwrap_or(0) >> 20,
        result["peak_child_rss_bytes"].as_u64().unwrap_or(0) >> 20
    );
    match &peers["nydus_unavailable"] {
        serde_json::Value::String(why) => println!("from a directory: no Nydus column: {why}"),
        _ => {
            let get = |who: &str, k: &str| peers[who][k].as_f64().unwrap_or(f64::NAN);
            for who in ["cora", "nydus"] {
                println!(
                    "from a directory, {who:>5}: {:.2} s wall, {:.2} s CPU, peak RSS {:.0} MB, wrote {:.1} MB (median of {})",
                    get(who, "wall_secs"),
                    get(who, "cpu_secs"),
                    get(who, "peak_rss_bytes") / 1e6,
                    get(who, "output_bytes") / 1e6,
                    peers["rounds"]
                );
            }
            let wall = get("cora", "wall_secs") / get("nydus", "wall_secs");
            let rss = get("cora", "peak_rss_bytes") / 1e6;
            let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
            println!(
                "targets: CORA wall {wall:.2}x Nydus's (≤ 1.0x: {}), CORA peak RSS {rss:.0} MB (≤ 100: {})",
                verdict(wall <= 1.0),
                verdict(rss <= 100.0)
            );
        }
    }
    if let Some(gb) = large["tree_bytes"].as_u64() {
        let get = |who: &str, k: &str| large[who][k].as_f64().unwrap_or(f64::NAN);
        for who in ["cora", "nydus"] {
            if large[who].is_null() {
                continue;
            }
            println!(
                "large layer ({:.1} GB, 1 GiB files): {who:>5}: {:.1} s wall ({:.0} MB/s), peak RSS {:.0} MB",
                gb as f64 / 1e9,
                get(who, "wall_secs"),
                gb as f64 / get(who, "wall_secs") / 1e6,
                get(who, "peak_rss_bytes") / 1e6,
            );
        }
        let rss = get("cora", "peak_rss_bytes") / 1e6;
        println!(
            "target: CORA peak RSS on the large layer {rss:.0} MB (≤ 100: {})",
            if rss <= 100.0 { "met" } else { "MISSED" }
        );
    }
    println!("RESULT {result}");
    cora_tests::bench::write_json("convert", &result)?;
    Ok(())
}

/// A tree of `gb` 1 GiB files of incompressible bytes, written in 16 MiB pieces.
fn large_tree(work: &std::path::Path, gb: u64) -> Result<std::path::PathBuf> {
    use std::io::Write;
    let tree = work.join("large");
    std::fs::create_dir_all(&tree)?;
    for i in 0..gb {
        let mut f = std::io::BufWriter::new(std::fs::File::create(
            tree.join(format!("weights-{i}.bin")),
        )?);
        for piece in 0..64u64 {
            f.write_all(&cora_testdata::pseudo_random(16 << 20, (i << 8) | piece))?;
        }
        f.flush()?;
    }
    Ok(tree)
}

/// `cora convert dir:TREE` and `nydus-image create` of the same tree, `rounds` times each,
/// interleaved (the same page-cache state for both); the median round of each by wall time.
fn peer_runs(
    tree: &std::path::Path,
    work: &std::path::Path,
    rounds: usize,
) -> Result<serde_json::Value> {
    let tools = match nydus::Tools::from_env() {
        Ok(t) => Some(t),
        Err(why) => {
            println!("Nydus not available: {why}");
            None
        }
    };
    let mut runs: [Vec<(ChildCost, u64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        let out = work.join(format!("peer-cora-{round}"));
        let scratch = work.join(format!("peer-scratch-{round}"));
        std::fs::create_dir_all(&scratch)?;
        let cost = run_measured(
            std::process::Command::new(fixtures::cora_bin("cora"))
                .arg("convert")
                .arg(format!("dir:{}", tree.display()))
                .arg(format!("oci:{}", out.display()))
                .arg("--work")
                .arg(&scratch),
        )?;
        runs[0].push((cost, fixtures::tree_bytes(&out)?));
        std::fs::remove_dir_all(&out)?;
        std::fs::remove_dir_all(&scratch)?;
        let Some(tools) = &tools else { continue };
        let out = work.join(format!("peer-nydus-{round}"));
        std::fs::create_dir_all(&out)?;
        let cost = run_measured(
            std::process::Command::new(tools.path("nydus-image"))
                .args(["create", "--type", "dir-rafs", "--fs-version", "6"])
                .args(["--log-level", "warn", "--blob-dir"])
                .arg(&out)
                .arg("--bootstrap")
                .arg(out.join("bootstrap"))
                .arg(tree),
        )?;
        runs[1].push((cost, fixtures::tree_bytes(&out)?));
        std::fs::remove_dir_all(&out)?;
    }
    let median = |v: &mut Vec<(ChildCost, u64)>| {
        v.sort_by(|a, b| a.0.wall_secs.total_cmp(&b.0.wall_secs));
        v.get(v.len() / 2).map(|(c, bytes)| {
            serde_json::json!({
                "wall_secs": c.wall_secs,
                "cpu_secs": c.cpu_secs,
                "peak_rss_bytes": c.peak_rss_bytes,
                "output_bytes": bytes,
            })
        })
    };
    let [mut cora, mut nydus] = runs;
    let mut v = serde_json::json!({ "rounds": rounds, "cora": median(&mut cora) });
    match (tools, median(&mut nydus)) {
        (Some(t), Some(n)) => {
            v["nydus"] = n;
            v["nydus_version"] = t.version().into();
        }
        _ => {
            v["nydus_unavailable"] = std::env::var("CORA_NYDUS_UNAVAILABLE")
                .unwrap_or_else(|_| "CORA_NYDUS_BIN is not set".into())
                .into();
        }
    }
    Ok(v)
}
