//! `cargo bench -p cora-tests --bench dedup` (or `cargo xtask bench dedup`): deduplication.
//!
//! (a) The seed's experiment: random, pattern and mixed data at 100 KB, 1 MB, 10 MB, five
//!     seeded repetitions each, chunked by FastCDC with our chunker's parameters and by fixed
//!     sizes; unique chunks compressed with zstd at our level. Space saving is defined as
//!     `1 − stored / original`, stored = sum of the zstd frames of the unique chunks.
//! (b) Real images from Debian packages: what a successor of v1 adds once v1 is stored, for
//!     CORA (the real converter at two chunk sizes), fixed-size chunks of the same tars, and
//!     plain OCI layers (best case: only a new layer; rebuild case: the whole rebuilt layer).
//!
//! Prints tables and writes `dedup.json` into `$CORA_BENCH_OUT`.
//! `CORA_DEDUP_SKIP_IMAGES=1` runs only (a).

use anyhow::{Context, Result, bail};
use blobfmt::convert::{self, Options};
use blobfmt::writer::ChunkParams;
use cora_tests::bench::{self, mean_std, stat_json};
use cora_tests::fixtures;
use md5::{Digest as _, Md5};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The seed's published savings (table 2), shown beside ours.
const SEED_SAVING: &[(&str, f64)] = &[("random", -0.10), ("pattern", 61.51), ("mixed", 72.36)];
/// The seed's "average decompression speedup" column (its definition is not given).
const SEED_SPEEDUP: &[(&str, f64)] = &[("random", 8.31), ("pattern", 8.58), ("mixed", 8.79)];
const SIZES: &[usize] = &[100_000, 1_000_000, 10_000_000];
const REPS: u64 = 5;
const BLOCK: usize = 4096;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Random,
    Pattern,
    Mixed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Random => "random",
            Kind::Pattern => "pattern",
            Kind::Mixed => "mixed",
        }
    }
}

/// Test data, reproducible from `seed`.
/// * random: every byte from the RNG (stands in for /dev/urandom).
/// * pattern: one fixed ASCII string repeated.
/// * mixed: 4 KiB blocks alternating between one random block repeated throughout the file
///   and fresh random blocks, so about half of the bytes can be deduplicated or compressed.
fn generate(kind: Kind, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; size];
    match kind {
        Kind::Random => rng.fill(&mut data),
        Kind::Pattern => {
            let pat =
                b"CORA pattern data: the quick brown fox jumps over the lazy dog 0123456789\n";
            for (d, s) in data.iter_mut().zip(pat.iter().cycle()) {
                *d = *s;
            }
        }
        Kind::Mixed => {
            let mut repeated = [0u8; BLOCK];
            rng.fill(&mut repeated);
            for (i, block) in data.chunks_mut(BLOCK).enumerate() {
                if i % 2 == 0 {
                    block.copy_from_slice(&repeated[..block.len()]);
                } else {
                    rng.fill(block);
                }
            }
        }
    }
    data
}

#[derive(Clone, Copy, Debug)]
enum Method {
    Cdc(ChunkParams),
    Fixed(usize),
}

impl Method {
    fn name(&self) -> String {
        match self {
            Method::Cdc(p) => format!("fastcdc-{}k", p.avg >> 10),
            Method::Fixed(n) => format!("fixed-{}k", n >> 10),
        }
    }

    fn cuts(&self, data: &[u8]) -> Vec<(usize, usize)> {
        match *self {
            Method::Cdc(p) => fastcdc::v2020::FastCDC::new(data, p.min, p.avg, p.max)
                .map(|c| (c.offset, c.length))
                .collect(),
            Method::Fixed(n) => (0..data.len())
                .step_by(n)
                .map(|o| (o, n.min(data.len() - o)))
                .collect(),
        }
    }
}

struct Stored {
    /// zstd frames of the unique chunks, by sha256.
    frames: HashMap<[u8; 32], Vec<u8>>,
    /// The chunk digests in stream order.
    recipe: Vec<[u8; 32]>,
    unique_raw: u64,
}

impl Stored {
    fn stored_bytes(&self) -> u64 {
        self.frames.values().map(|f| f.len() as u64).sum()
    }
}

/// Chunk, hash and compress each unique chunk once (what a converter does).
fn store(data: &[u8], method: &Method, level: i32) -> Result<Stored> {
    let mut frames = HashMap::new();
    let mut recipe = Vec::new();
    let mut unique_raw = 0u64;
    for (o, l) in method.cuts(data) {
        let chunk = &data[o..o + l];
        let d = blobfmt::sha256(chunk);
        if let std::collections::hash_map::Entry::Vacant(e) = frames.entry(d) {
            e.insert(zstd::bulk::compress(chunk, level)?);
            unique_raw += l as u64;
        }
        recipe.push(d);
    }
    Ok(Stored {
        frames,
        recipe,
        unique_raw,
    })
}

/// Rebuild the stream: decompress each unique frame once, then lay chunks out in order.
fn restore(s: &Stored, size: usize) -> Result<Vec<u8>> {
    let mut plain = HashMap::with_capacity(s.frames.len());
    for (d, f) in &s.frames {
        plain.insert(
            *d,
            zstd::bulk::decompress(f, blobfmt::format::MAX_CHUNK as usize)?,
        );
    }
    let mut out = Vec::with_capacity(size);
    for d in &s.recipe {
        out.extend_from_slice(plain.get(d).context("chunk missing from the store")?);
    }
    Ok(out)
}

fn synthetic(level: i32) -> Result<Value> {
    let cdc = ChunkParams::default();
    let methods = [
        Method::Cdc(cdc),
        Method::Fixed(cdc.avg as usize),
        Method::Fixed(BLOCK),
    ];
    let kinds = [Kind::Random, Kind::Pattern, Kind::Mixed];
    let mut rows = Vec::new();
    let mut seeds = Vec::new();
    println!(
        "(a) synthetic data, zstd level {level}, {REPS} runs each; FastCDC min/avg/max {}/{}/{}",
        cdc.min, cdc.avg, cdc.max
    );
    println!(
        "{:<8} {:>9} {:<12} {:>16} {:>16} {:>14} {:>14} {:>9} {:>5}",
        "data",
        "size",
        "method",
        "saving %",
        "dedup-only %",
        "comp ms",
        "decomp ms",
        "comp/dec",
        "md5"
    );
    for (ki, kind) in kinds.iter().enumerate() {
        for (si, &size) in SIZES.iter().enumerate() {
            // One seed per (data, size, repetition), shared by every method.
            let run_seeds: Vec<u64> = (0..REPS)
                .map(|r| 0xC0A4_0000 + (ki as u64) * 100 + (si as u64) * 10 + r)
                .collect();
            seeds.push(json!({"data": kind.name(), "size": size, "seeds": run_seeds}));
            let inputs: Vec<Vec<u8>> = run_seeds
                .iter()
                .map(|&s| generate(*kind, size, s))
                .collect();
            for m in &methods {
                let (mut saving, mut dedup, mut comp, mut dec, mut ratio) =
                    (vec![], vec![], vec![], vec![], vec![]);
                let mut md5_pass = 0;
                for data in &inputs {
                    let t = Instant::now();
                    let s = store(data, m, level)?;
                    let c = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let back = restore(&s, data.len())?;
                    let d = t.elapsed().as_secs_f64();
                    if Md5::digest(&back) == Md5::digest(data) {
                        md5_pass += 1;
                    }
                    saving.push(100.0 * (1.0 - s.stored_bytes() as f64 / data.len() as f64));
                    dedup.push(100.0 * (1.0 - s.unique_raw as f64 / data.len() as f64));
                    comp.push(c);
                    dec.push(d);
                    ratio.push(c / d);
                }
                let ms = |xs: &[f64]| {
                    let (m, s) = mean_std(xs).unwrap_or_default();
                    format!("{:.3}±{:.3}", m * 1e3, s * 1e3)
                };
                let pct = |xs: &[f64]| {
                    let (m, s) = mean_std(xs).unwrap_or_default();
                    format!("{m:.2}±{s:.2}")
                };
                let comp_mean = mean_std(&comp).unwrap_or_default().0;
                let dec_mean = mean_std(&dec).unwrap_or_default().0;
                println!(
                    "{:<8} {:>9} {:<12} {:>16} {:>16} {:>14} {:>14} {:>9.2} {:>2}/{}",
                    kind.name(),
                    size,
                    m.name(),
                    pct(&saving),
                    pct(&dedup),
                    ms(&comp),
                    ms(&dec),
                    comp_mean / dec_mean.max(f64::MIN_POSITIVE),
                    md5_pass,
                    inputs.len()
                );
                rows.push(json!({
                    "data": kind.name(),
                    "size": size,
                    "method": m.name(),
                    "saving_pct": stat_json(&saving),
                    "dedup_only_saving_pct": stat_json(&dedup),
                    "compress_secs": stat_json(&comp),
                    "decompress_secs": stat_json(&dec),
                    // Ratio of the mean times: per-run ratios of sub-millisecond times are noise.
                    "compress_over_decompress": comp_mean / dec_mean.max(f64::MIN_POSITIVE),
                    "compress_over_decompress_per_run": stat_json(&ratio),
                    "md5_pass": md5_pass,
                    "runs": inputs.len(),
                }));
            }
        }
    }
    // Per data kind and method: mean over all sizes and runs, beside the seed's numbers.
    let mut summary = Vec::new();
    println!("\nsummary (mean over sizes; seed = the seed's table 2)");
    println!(
        "{:<8} {:<12} {:>10} {:>10} {:>12} {:>12} {:>6}",
        "data", "method", "saving %", "seed %", "comp/dec", "seed spdup", "md5"
    );
    for kind in kinds {
        for m in &methods {
            let mine: Vec<&Value> = rows
                .iter()
                .filter(|r| r["data"] == kind.name() && r["method"] == m.name().as_str())
                .collect();
            let avg = |key: &str| {
                mine.iter()
                    .filter_map(|r| r[key]["mean"].as_f64())
                    .sum::<f64>()
                    / mine.len().max(1) as f64
            };
            let pass: u64 = mine.iter().filter_map(|r| r["md5_pass"].as_u64()).sum();
            let runs: u64 = mine.iter().filter_map(|r| r["runs"].as_u64()).sum();
            let seed = SEED_SAVING.iter().find(|s| s.0 == kind.name()).map(|s| s.1);
            let seed_speedup = SEED_SPEEDUP
                .iter()
                .find(|s| s.0 == kind.name())
                .map(|s| s.1);
            let saving = avg("saving_pct");
            let ratio = mine
                .iter()
                .filter_map(|r| r["compress_over_decompress"].as_f64())
                .sum::<f64>()
                / mine.len().max(1) as f64;
            println!(
                "{:<8} {:<12} {:>10.2} {:>10} {:>12.2} {:>12} {:>3}/{}",
                kind.name(),
                m.name(),
                saving,
                seed.map_or("-".into(), |s| format!("{s:.2}")),
                ratio,
                seed_speedup.map_or("-".into(), |s| format!("{s:.2}")),
                pass,
                runs
            );
            summary.push(json!({
                "data": kind.name(),
                "method": m.name(),
                "saving_pct": saving,
                "dedup_only_saving_pct": avg("dedup_only_saving_pct"),
                "compress_over_decompress": ratio,
                "md5_pass": pass,
                "runs": runs,
                "seed_saving_pct": seed,
                "seed_decompress_speedup": seed_speedup,
            }));
            if pass != runs {
                bail!(
                    "MD5 round trip failed for {} {}: {pass}/{runs}",
                    kind.name(),
                    m.name()
                );
            }
        }
    }
    Ok(json!({
        "definition": "saving = 1 - stored/original; stored = sum of zstd frames (one per unique chunk, unique by sha256); dedup-only saving = 1 - unique chunk bytes/original; compress time = chunk + sha256 + zstd of unique chunks; decompress time = zstd -d of each unique chunk + reassembly; compress/decompress = mean compress time / mean decompress time (summary: averaged over sizes)",
        "zstd_level": level,
        "fastcdc": {"min": cdc.min, "avg": cdc.avg, "max": cdc.max},
        "sizes": SIZES,
        "methods": methods.iter().map(Method::name).collect::<Vec<_>>(),
        "seeds": seeds,
        "rows": rows,
        "summary": summary,
    }))
}

/// Compressed bytes of the unique fixed-size chunks of `tars`, by digest.
fn fixed_chunks(tars: &[&Path], size: usize, level: i32) -> Result<HashMap<[u8; 32], u64>> {
    let mut out = HashMap::new();
    for t in tars {
        let data = std::fs::read(t).with_context(|| format!("reading {}", t.display()))?;
        let s = store(&data, &Method::Fixed(size), level)?;
        for (d, f) in s.frames {
            out.insert(d, f.len() as u64);
        }
    }
    Ok(out)
}

/// Bytes in `succ` whose chunk digest is not in `base`.
fn added(base: &HashMap<[u8; 32], u64>, succ: &HashMap<[u8; 32], u64>) -> u64 {
    succ.iter()
        .filter(|(d, _)| !base.contains_key(*d))
        .map(|(_, n)| n)
        .sum()
}

/// One image as an OCI layout (gzip layers) plus each layer's tar.
struct Img {
    layout: PathBuf,
    tars: Vec<PathBuf>,
    gz_sizes: Vec<(String, u64)>,
}

fn tar_paths(i: &Img) -> Vec<&Path> {
    i.tars.iter().map(PathBuf::as_path).collect()
}

fn make_image(work: &Path, name: &str, dirs: &[&Path]) -> Result<Img> {
    let layout = work.join(name);
    blobfmt::dirsrc::layout_from_dirs(dirs, &layout, "v", true)?;
    let img = blobfmt::oci::open_layout(&layout, Some("v"))?;
    let mut tars = Vec::new();
    let mut gz_sizes = Vec::new();
    for (i, l) in img.manifest.layers.iter().enumerate() {
        let tar = work.join(format!("{name}-{i}.tar"));
        blobfmt::oci::decompress_layer(
            &img.blob_path(&l.digest)?,
            blobfmt::oci::Compression::Gzip,
            &tar,
        )?;
        tars.push(tar);
        gz_sizes.push((l.digest.clone(), l.size));
    }
    Ok(Img {
        layout,
        tars,
        gz_sizes,
    })
}

/// Layer digests → blob size, and chunk digest → frame bytes, of a CORA conversion.
struct CoraStore {
    blobs: HashSet<[u8; 32]>,
    chunks: HashMap<[u8; 32], u64>,
    /// Per blob: bytes that are not chunk frames (trailer, footer, skippable headers).
    overhead: Vec<([u8; 32], u64)>,
    stored: u64,
}

fn cora_convert(img: &Img, work: &Path, avg: u32, level: i32) -> Result<CoraStore> {
    let name = img
        .layout
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("img");
    let out = work.join(format!("cora-{avg}-{name}"));
    let scratch = work.join(format!("scratch-{avg}-{name}"));
    std::fs::create_dir_all(&scratch)?;
    let opts = Options {
        params: ChunkParams::from_avg(avg, level)?,
        ..Options::default()
    };
    let src = blobfmt::oci::open_layout(&img.layout, Some("v"))?;
    let r = convert::convert_layout(&src, &out, "v", &opts, &scratch, &|_, _| {})?;
    let mut s = CoraStore {
        blobs: HashSet::new(),
        chunks: HashMap::new(),
        overhead: Vec::new(),
        stored: 0,
    };
    for l in &r.layers {
        let b = &l.blob;
        let mut frames = 0u64;
        for c in b.trailer.chunks.iter().chain(&b.trailer.meta_chunks) {
            s.chunks.insert(c.digest, u64::from(c.compressed_len));
            frames += u64::from(c.compressed_len);
        }
        s.blobs.insert(b.digest);
        s.overhead.push((b.digest, b.size.saturating_sub(frames)));
        s.stored += b.size;
    }
    std::fs::remove_dir_all(&out)?;
    std::fs::remove_dir_all(&scratch)?;
    Ok(s)
}

/// What `succ` adds once `base` is stored: new chunk frames plus the trailer of each new blob.
fn cora_added(base: &CoraStore, succ: &CoraStore) -> u64 {
    let overhead: u64 = succ
        .overhead
        .iter()
        .filter(|(d, _)| !base.blobs.contains(d))
        .map(|(_, n)| n)
        .sum();
    added(&base.chunks, &succ.chunks) + overhead
}

/// Files of `new` that are missing from or differ in `old`, copied into `out`, plus empty
/// `.wh.NAME` whiteouts for what `new` dropped: the smallest layer that turns old into new.
fn diff_tree(old: &Path, new: &Path, out: &Path, rel: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (o, n) = (old.join(rel), new.join(rel));
    let names = |d: &Path| -> Result<HashSet<std::ffi::OsString>> {
        if !d.is_dir() || d.is_symlink() {
            return Ok(HashSet::new());
        }
        std::fs::read_dir(d)?
            .map(|e| Ok(e?.file_name()))
            .collect::<Result<_>>()
    };
    let (old_names, new_names) = (names(&o)?, names(&n)?);
    for name in &new_names {
        let r = rel.join(name);
        let (op, np) = (old.join(&r), new.join(&r));
        let nm = np.symlink_metadata()?;
        let om = op.symlink_metadata().ok();
        let dst = out.join(&r);
        if nm.is_dir() {
            diff_tree(old, new, out, &r)?;
            continue;
        }
        let same = match &om {
            Some(om) if nm.file_type().is_symlink() && om.file_type().is_symlink() => {
                std::fs::read_link(&np)? == std::fs::read_link(&op)?
            }
            Some(om) if nm.is_file() && om.is_file() => {
                om.len() == nm.len()
                    && om.mode() == nm.mode()
                    && std::fs::read(&op)? == std::fs::read(&np)?
            }
            _ => false,
        };
        if same {
            continue;
        }
        std::fs::create_dir_all(dst.parent().context("no parent")?)?;
        if nm.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&np)?, &dst)?;
        } else {
            std::fs::copy(&np, &dst)?;
        }
    }
    for name in old_names.difference(&new_names) {
        let wh = out
            .join(rel)
            .join(format!(".wh.{}", name.to_string_lossy()));
        std::fs::create_dir_all(wh.parent().context("no parent")?)?;
        std::fs::write(wh, b"")?;
    }
    Ok(())
}

fn images(level: i32) -> Result<Value> {
    let work = tempfile::tempdir()?;
    let w = work.path();
    let base = fixtures::debian_tree("base", fixtures::BASE)?;
    let python = fixtures::debian_tree("python-layer", fixtures::PYTHON)?;
    let updated = fixtures::debian_tree("base-ssl-updated", &fixtures::base_updated())?;

    let v1 = make_image(w, "v1", &[&base])?;
    let v2 = make_image(w, "v2", &[&base, &python])?;
    let v2b = make_image(w, "v2b", &[&updated])?;
    if v2.gz_sizes[0].0 != v1.gz_sizes[0].0 {
        bail!("v2's base layer differs from v1's: layer builds are not reproducible");
    }
    // OCI rebuild of v2: one flattened layer holding base + python (a squashed build).
    let merged = w.join("merged");
    std::fs::create_dir_all(&merged)?;
    for d in [&base, &python] {
        fixtures::run(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", d.display()))
                .arg(&merged),
        )?;
    }
    let v2_flat = make_image(w, "v2-flat", &[&merged])?;
    std::fs::remove_dir_all(&merged)?;
    // OCI best case of v2b: v1 plus a layer holding only what changed.
    let delta = w.join("delta");
    std::fs::create_dir_all(&delta)?;
    diff_tree(&base, &updated, &delta, Path::new(""))?;
    let v2b_delta = make_image(w, "v2b-delta", &[&delta])?;

    let v1_tar = std::fs::metadata(&v1.tars[0])?.len();
    let mut cora: Vec<(u32, CoraStore, CoraStore, CoraStore)> = Vec::new();
    for avg in [16u32 << 10, 64 << 10] {
        let t = Instant::now();
        let a = cora_convert(&v1, w, avg, level)?;
        let b = cora_convert(&v2, w, avg, level)?;
        let c = cora_convert(&v2b, w, avg, level)?;
        println!(
            "converted v1, v2, v2b at {} KiB in {:.1}s",
            avg >> 10,
            t.elapsed().as_secs_f64()
        );
        cora.push((avg, a, b, c));
    }
    let mut fixed = Vec::new();
    for size in [4096usize, 64 << 10] {
        let a = fixed_chunks(&tar_paths(&v1), size, level)?;
        let b = fixed_chunks(&tar_paths(&v2), size, level)?;
        let c = fixed_chunks(&tar_paths(&v2b), size, level)?;
        fixed.push((size, added(&a, &b), added(&a, &c)));
    }

    let mut successors = Vec::new();
    for (i, (name, what)) in [
        ("v2", "v1 + a Python 3.11 layer"),
        (
            "v2b",
            "v1 rebuilt with libssl3/openssl 3.0.22 (bookworm-security) instead of 3.0.20",
        ),
    ]
    .iter()
    .enumerate()
    {
        let mut adds = Vec::new();
        for (avg, a, b, c) in &cora {
            let n = if i == 0 {
                cora_added(a, b)
            } else {
                cora_added(a, c)
            };
            adds.push(json!({"method": format!("cora-{}k", avg >> 10), "bytes": n}));
        }
        for (size, b, c) in &fixed {
            let n = if i == 0 { *b } else { *c };
            adds.push(json!({"method": format!("fixed-{}k", size >> 10), "bytes": n}));
        }
        let (best, rebuild) = if i == 0 {
            (v2.gz_sizes[1].1, v2_flat.gz_sizes[0].1)
        } else {
            (v2b_delta.gz_sizes[0].1, v2b.gz_sizes[0].1)
        };
        adds.push(json!({"method": "oci-best-gzip", "bytes": best}));
        adds.push(json!({"method": "oci-rebuild-gzip", "bytes": rebuild}));
        successors.push(json!({"name": name, "description": what, "adds": adds}));
    }
    let v1_cora: Vec<Value> = cora
        .iter()
        .map(|(avg, a, _, _)| json!({"method": format!("cora-{}k", avg >> 10), "bytes": a.stored}))
        .collect();
    println!(
        "\n(b) real images: v1 = Debian base, tar {:.1} MB, tar.gz {:.1} MB",
        v1_tar as f64 / 1e6,
        v1.gz_sizes[0].1 as f64 / 1e6
    );
    for s in &successors {
        println!(
            "{} ({}): bytes added once v1 is stored",
            s["name"], s["description"]
        );
        for a in s["adds"].as_array().into_iter().flatten() {
            println!(
                "  {:<18} {:>12} ({:.2} MB)",
                a["method"].as_str().unwrap_or(""),
                a["bytes"],
                a["bytes"].as_f64().unwrap_or(0.0) / 1e6
            );
        }
    }
    Ok(json!({
        "definition": "bytes the successor adds once v1 is stored: CORA = frames of chunks (data + metadata) whose sha256 v1 lacks + trailer/footer of each layer blob v1 lacks (real converter, erofs, zstd level shown); fixed-N = zstd frames of the unique N-byte chunks of the successor's layer tars that v1's tar lacks; oci-best-gzip = the gzip layer holding only the change (v2: the Python layer; v2b: changed files + whiteouts); oci-rebuild-gzip = the whole rebuilt gzip layer (v2: base+Python squashed; v2b: the rebuilt base)",
        "zstd_level": level,
        "v1": {
            "tar_bytes": v1_tar,
            "gzip_bytes": v1.gz_sizes[0].1,
            "tree_bytes": fixtures::tree_bytes(&base)?,
            "cora_stored": v1_cora,
        },
        "successors": successors,
    }))
}

fn main() -> Result<()> {
    let level = ChunkParams::default().zstd_level;
    let synthetic = synthetic(level)?;
    let skip = std::env::var("CORA_DEDUP_SKIP_IMAGES").is_ok_and(|v| v == "1");
    let images = if skip {
        println!("\n(b) real images skipped (CORA_DEDUP_SKIP_IMAGES=1)");
        Value::Null
    } else {
        images(level)?
    };
    bench::write_json("dedup", &json!({"synthetic": synthetic, "images": images}))?;
    Ok(())
}
