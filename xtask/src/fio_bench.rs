//! `cargo xtask bench fio`: fio on a CORA image device (cold, and fully cached) next to the
//! kernel loop device, `rublk add loop -o` and `rublk add null`, in one VM boot.
//!
//! The host converts a ~1 GiB tree of real files into registry storage
//! (driver/fio/prepare-image.sh); the guest serves it from tmpfs and runs the fio jobs of
//! driver/fio (driver/fio/bench-image-vm.sh), writing one line per result; this module turns
//! those lines into a table with ratios and target checks, `fio.json` and `fio.md` in
//! `$CORA_BENCH_OUT` (default bench/results/latest).
use crate::{deps, tools, vm};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, clap::Args)]
pub struct FioBenchOpts {
    /// Size of the tree of real files converted into the image, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mb: u64,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// Guest memory: the registry, a full cache and the flat image all live in guest tmpfs.
    #[arg(long, default_value = "4G")]
    pub mem: String,
    /// Skip the cold runs (whole-tree read, fio with an empty cache): slow under TCG.
    #[arg(long)]
    pub skip_cold: bool,
    /// Use the release binaries as they are (do not run cargo build first).
    #[arg(long)]
    pub no_build: bool,
    /// Kill the VM after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Guest kernel (see `cargo xtask vm --kernel`).
    #[arg(long, value_enum, default_value = "6.12")]
    pub kernel: crate::kernels::Which,
    /// Also show where each warm server's time goes in the 4 KiB QD32 and 1 MiB jobs (its
    /// threads' CPU, the guest's CPU split, its syscalls): profile.md. Runs those jobs twice
    /// more per server.
    #[arg(long)]
    pub profile: bool,
    /// Only these `cora-driver add` variants of the warm runs (lines NAME=ARGS, as the
    /// script's CORA_VARIANTS); default: all.
    #[arg(long)]
    pub variants: Option<String>,
}

/// One fio result line: `fio DEVICE STATE IOPS MBPS LAT_AVG_US LAT_P99_US BYTES_FETCHED`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FioRow {
    pub device: String,
    /// "warm" (fully cached / local) or "cold" (empty cache, each job on a fresh device).
    pub state: String,
    pub iops_4k_qd32: f64,
    pub mbps_1m_qd8: f64,
    pub lat_avg_us_4k_qd1: f64,
    pub lat_p99_us_4k_qd1: f64,
    pub bytes_fetched: u64,
}

/// A whole-tree read (`tar cf /dev/zero .`) or the first full read of the device ("fill").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TreeRow {
    pub state: String,
    pub seconds: f64,
    pub bytes_fetched: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub device: String,
    pub what: String,
    pub ratio: f64,
    /// The ratio must be at least this (for latency: at most).
    pub target: f64,
    pub ok: bool,
}

/// 4 KiB random reads over the files of a mounted file system (host FUSE bench).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FsRandRow {
    pub mount: String,
    pub iops: f64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Results {
    pub info: BTreeMap<String, String>,
    pub fio: Vec<FioRow>,
    pub tree: Vec<TreeRow>,
    pub fsrand: Vec<FsRandRow>,
}

/// Parses the guest's result lines; unknown kinds are an error (a changed script).
pub fn parse(text: &str) -> Result<Results> {
    let mut r = Results::default();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("results line {}: {line:?}", n + 1);
        let num = |s: &str| s.parse::<f64>().with_context(bad);
        let int = |s: &str| s.parse::<u64>().with_context(bad);
        match f.as_slice() {
            [] => {}
            ["fio", device, state, iops, mbps, lat, p99, fetched] => r.fio.push(FioRow {
                device: device.to_string(),
                state: state.to_string(),
                iops_4k_qd32: num(iops)?,
                mbps_1m_qd8: num(mbps)?,
                lat_avg_us_4k_qd1: num(lat)?,
                lat_p99_us_4k_qd1: num(p99)?,
                bytes_fetched: int(fetched)?,
            }),
            ["tree", state, secs, fetched] => r.tree.push(TreeRow {
                state: state.to_string(),
                seconds: num(secs)?,
                bytes_fetched: int(fetched)?,
            }),
            ["fsrand", mount, iops] => r.fsrand.push(FsRandRow {
                mount: mount.to_string(),
                iops: num(iops)?,
            }),
            ["info", key, value @ ..] => {
                r.info.insert(key.to_string(), value.join(" "));
            }
            _ => bail!("{}", bad()),
        }
    }
    Ok(r)
}

impl Results {
    fn warm(&self, device: &str) -> Option<&FioRow> {
        self.fio
            .iter()
            .find(|r| r.device == device && r.state == "warm")
    }

    /// The issue's targets for every warm CORA row, against references of the same boot.
    pub fn targets(&self) -> Vec<Target> {
        let (Some(rl), Some(null)) = (self.warm("rublk-loop"), self.warm("rublk-null")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for c in self
            .fio
            .iter()
            .filter(|r| r.state == "warm" && r.device.starts_with("cora"))
        {
            let mut t = |what: &str, ratio: f64, target: f64, higher_better: bool| {
                out.push(Target {
                    device: c.device.clone(),
                    what: what.into(),
                    ratio,
                    target,
                    ok: if higher_better {
                        ratio >= target
                    } else {
                        ratio <= target
                    },
                });
            };
            t(
                "4k IOPS vs rublk-loop",
                c.iops_4k_qd32 / rl.iops_4k_qd32,
                1.0,
                true,
            );
            t(
                "4k QD1 avg latency vs rublk-loop",
                c.lat_avg_us_4k_qd1 / rl.lat_avg_us_4k_qd1,
                1.0,
                false,
            );
            t(
                "4k QD1 p99 latency vs rublk-loop",
                c.lat_p99_us_4k_qd1 / rl.lat_p99_us_4k_qd1,
                1.0,
                false,
            );
            t(
                "1M MB/s vs rublk-loop",
                c.mbps_1m_qd8 / rl.mbps_1m_qd8,
                2.0,
                true,
            );
            t(
                "4k IOPS vs rublk-null",
                c.iops_4k_qd32 / null.iops_4k_qd32,
                0.7,
                true,
            );
        }
        out
    }

    /// Markdown of the host FUSE bench (driver/fio/bench-fuse-host.sh): the FUSE file against
    /// the same image as a plain file and a loop device over it, all measured in one run.
    pub fn fuse_markdown(&self) -> String {
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}x", a / b)
            } else {
                "-".into()
            }
        };
        let mut s = String::new();
        let info: Vec<String> = self.info.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            s,
            "FUSE transport on the host (native, no VM), one run: {}\n",
            info.join(", ")
        );
        let _ = writeln!(
            s,
            "Raw image file, fully cached, direct I/O, both sides in memory (fio jobs of driver/fio):\n\n\
             | file | 4k QD32 IOPS | 1M QD8 MB/s | 4k QD1 avg µs | 4k QD1 p99 µs | IOPS vs file / loop | MB/s vs file / loop | QD1 avg vs file |\n\
             |---|---:|---:|---:|---:|---|---|---:|"
        );
        let (file, lp) = (self.warm("file"), self.warm("loop"));
        for r in &self.fio {
            let vs = |f: fn(&FioRow) -> f64| {
                [file, lp]
                    .map(|x| x.map_or("-".into(), |x| ratio(f(r), f(x))))
                    .join(" / ")
            };
            let _ = writeln!(
                s,
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                r.device,
                r.iops_4k_qd32,
                r.mbps_1m_qd8,
                r.lat_avg_us_4k_qd1,
                r.lat_p99_us_4k_qd1,
                vs(|x| x.iops_4k_qd32),
                vs(|x| x.mbps_1m_qd8),
                file.map_or("-".into(), |x| ratio(
                    r.lat_avg_us_4k_qd1,
                    x.lat_avg_us_4k_qd1
                )),
            );
        }
        let tree = |name: &str| self.tree.iter().find(|t| t.state == name);
        if !self.tree.is_empty() {
            let _ = writeln!(
                s,
                "\nWhole-tree reads of the mounted erofs (`tar cf /dev/zero .`, page cache dropped):\n\n\
                 | read | seconds | fetched MB | time vs plain file |\n|---|---:|---:|---:|"
            );
            let reference = tree("file-warm");
            for t in &self.tree {
                let what = match t.state.as_str() {
                    "fuse-cold" => "through FUSE, empty cache (lazy, from the registry)",
                    "fuse-fill" => "the FUSE file read whole once (dd; makes the plain copy)",
                    "fuse-warm" => "through FUSE, fully cached",
                    "file-warm" => "plain file (erofs file-backed), reference",
                    other => other,
                };
                let _ = writeln!(
                    s,
                    "| {what} | {:.2} | {:.1} | {} |",
                    t.seconds,
                    t.bytes_fetched as f64 / 1e6,
                    reference.map_or("-".into(), |r| ratio(t.seconds, r.seconds)),
                );
            }
        }
        if !self.fsrand.is_empty() {
            let _ = writeln!(
                s,
                "\n4 KiB random reads over the mounted file system's files (fio psync, 4 jobs, \
                 buffered, page cache dropped first):\n\n| mount | IOPS | vs plain file |\n|---|---:|---:|"
            );
            let reference = self.fsrand.iter().find(|r| r.mount == "file");
            for r in &self.fsrand {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {} |",
                    r.mount,
                    r.iops,
                    reference.map_or("-".into(), |x| ratio(r.iops, x.iops)),
                );
            }
        }
        s
    }

    /// Markdown: the fio table with ratios to the references, targets, tree reads.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let info: Vec<String> = self.info.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "fio, one VM boot (QEMU TCG): {}\n", info.join(", "));
        let _ = writeln!(
            s,
            "| device | state | 4k QD32 IOPS | 1M QD8 MB/s | 4k QD1 avg µs | 4k QD1 p99 µs | fetched MB | IOPS vs loop / rublk-loop / rublk-null | MB/s vs rublk-loop |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|---:|");
        let refs = ["loop", "rublk-loop", "rublk-null"].map(|d| self.warm(d));
        for r in &self.fio {
            let ratios: Vec<String> = refs
                .iter()
                .map(|x| match x {
                    Some(x) if x.iops_4k_qd32 > 0.0 => {
                        format!("{:.2}x", r.iops_4k_qd32 / x.iops_4k_qd32)
                    }
                    _ => "-".into(),
                })
                .collect();
            let mbps = match refs[1] {
                Some(x) if x.mbps_1m_qd8 > 0.0 => format!("{:.2}x", r.mbps_1m_qd8 / x.mbps_1m_qd8),
                _ => "-".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |",
                r.device,
                r.state,
                r.iops_4k_qd32,
                r.mbps_1m_qd8,
                r.lat_avg_us_4k_qd1,
                r.lat_p99_us_4k_qd1,
                r.bytes_fetched as f64 / 1e6,
                ratios.join(" / "),
                mbps
            );
        }
        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(
                s,
                "\n| device | target | ratio | need | |\n|---|---|---:|---:|---|"
            );
            for t in &targets {
                let need = if t.what.contains("latency") {
                    format!("≤ {:.1}x", t.target)
                } else {
                    format!("≥ {:.1}x", t.target)
                };
                let verdict = if t.ok { "ok" } else { "MISSED" };
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.2}x | {need} | {verdict} |",
                    t.device, t.what, t.ratio
                );
            }
        }
        if !self.tree.is_empty() {
            let _ = writeln!(
                s,
                "\n| whole-tree read (`tar cf /dev/zero .` after drop_caches) | seconds | fetched MB |\n|---|---:|---:|"
            );
            for t in &self.tree {
                let what = match t.state.as_str() {
                    "fill" => "first full read of the device (dd, fills the cache)",
                    "cold" => "tree read, empty cache",
                    "warm" => "tree read, cache filled by the cold read",
                    other => other,
                };
                let _ = writeln!(
                    s,
                    "| {what} | {:.2} | {:.1} |",
                    t.seconds,
                    t.bytes_fetched as f64 / 1e6
                );
            }
        }
        s
    }
}

/// The packages and binaries the fio benches need, and the image both serve: a tree of `mb`
/// MiB of real files converted into registry storage under target/bench/fio (reused while
/// the size stays). Returns that directory.
fn prepare_image(mb: u64, no_build: bool) -> Result<std::path::PathBuf> {
    deps::ensure(deps::TEST_PACKAGES)?;
    if !no_build {
        crate::benches::build_driver_bins()?;
    }
    let repo = vm::repo_root();
    let work = repo.join("target/bench/fio");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    deps::run(
        "sh",
        &[
            &s(&repo.join("driver/fio/prepare-image.sh")),
            &s(&work),
            &mb.to_string(),
        ],
    )?;
    Ok(work)
}

pub fn run(opts: &FioBenchOpts) -> Result<()> {
    tools::ensure_rublk()?;
    if opts.profile {
        crate::deps::ensure(&["linux-perf", "strace"])?;
    }
    let work = prepare_image(opts.mb, opts.no_build)?;
    let repo = vm::repo_root();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let results = work.join("results.txt");
    let _ = std::fs::remove_file(&results);
    let profile = work.join("profile");
    let _ = std::fs::remove_dir_all(&profile);
    let cmd = format!(
        "CORA_FIO_PERF={} CORA_VARIANTS={} CORA_FIO_SKIP_COLD={} CORA_FIO_REGISTRY={} \
         CORA_FIO_RESULTS={} FIO_RUNTIME={} sh {}",
        if opts.profile {
            vm::shell_quote(&s(&profile))
        } else {
            String::new()
        },
        vm::shell_quote(opts.variants.as_deref().unwrap_or("")),
        if opts.skip_cold { "1" } else { "" },
        vm::shell_quote(&s(&work.join("registry"))),
        vm::shell_quote(&s(&results)),
        opts.runtime,
        vm::shell_quote(&s(&repo.join("driver/fio/bench-image-vm.sh"))),
    );
    let vm_opts = vm::VmOpts {
        mem: opts.mem.clone(),
        timeout: Some(opts.timeout),
        kernel: opts.kernel,
        ..vm::VmOpts::default()
    };
    let code = vm::run(&vm_opts, &[cmd])?;
    if code != 0 {
        bail!("the fio bench failed in the VM (exit status {code})");
    }
    let text = std::fs::read_to_string(&results)
        .with_context(|| format!("reading {}", results.display()))?;
    let r = parse(&text)?;
    let md = r.markdown();
    println!("{md}");
    let out = crate::benches::out_dir()?;
    let json = serde_json::json!({
        "bench": "fio",
        "info": r.info,
        "fio": r.fio,
        "tree": r.tree,
        "targets": r.targets(),
    });
    std::fs::write(out.join("fio.json"), serde_json::to_string_pretty(&json)?)
        .context("writing fio.json")?;
    std::fs::write(out.join("fio.md"), &md).context("writing fio.md")?;
    eprintln!("xtask: wrote fio.json and fio.md to {}", out.display());
    if opts.profile {
        let md = profile_markdown(&profile, &r)?;
        println!("{md}");
        std::fs::write(out.join("profile.md"), md).context("writing profile.md")?;
    }
    Ok(())
}

/// profile.md from the files the script left in `dir` (NAME.threads, NAME.cpu,
/// NAME.syscalls for each profiled server), in the order of the fio rows.
fn profile_markdown(dir: &Path, r: &Results) -> Result<String> {
    let mut md = format!(
        "# Where a warm ublk server's time goes: fio 4 KiB random read QD32 and 1 MiB read QD8 \
         (kernel {})\n\n\
         Per server: its threads' CPU time (`perf stat --per-thread -e task-clock`), the \
         guest's CPU split over the same run (/proc/stat), its syscalls (`strace -c -f`, a \
         separate run). Under TCG: compare rows, not absolute times.\n",
        r.info.get("kernel").map_or("?", String::as_str)
    );
    let jobs = [
        ("randread-4k-qd32", "4 KiB QD32"),
        ("seqread-1m-qd8", "1 MiB QD8"),
    ];
    for row in r.fio.iter().filter(|f| f.state == "warm") {
        for (job, what) in jobs {
            let read = |ext: &str| {
                std::fs::read_to_string(dir.join(format!("{}.{job}.{ext}", row.device)))
            };
            let Ok(threads) = read("threads") else {
                continue;
            };
            let threads: String = threads
                .lines()
                .filter(|l| l.contains("task-clock") && !l.contains("<not counted>"))
                .map(|l| format!("{}\n", l.trim()))
                .collect();
            let measured = match job {
                "randread-4k-qd32" => format!("{:.0} IOPS", row.iops_4k_qd32),
                _ => format!("{:.0} MB/s", row.mbps_1m_qd8),
            };
            md += &format!(
                "\n## {}, {what} ({measured} unobserved)\n\nguest CPU: {}\n```\n{threads}```\n\
                 ```\n{}```\n",
                row.device,
                read("cpu").unwrap_or_default().trim(),
                read("syscalls").unwrap_or_default()
            );
        }
    }
    Ok(md)
}

#[derive(Debug, Clone, clap::Args)]
pub struct FuseBenchOpts {
    /// Size of the tree of real files converted into the image, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub mb: u64,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// Use the release binaries as they are (do not run cargo build first).
    #[arg(long)]
    pub no_build: bool,
}

/// `cargo xtask bench fuse`: the FUSE transport natively on this host (no VM) against the same
/// image as a plain file; writes fuse.json and fuse.md.
pub fn run_fuse(opts: &FuseBenchOpts) -> Result<()> {
    let work = prepare_image(opts.mb, opts.no_build)?;
    let repo = vm::repo_root();
    let results = repo.join("target/bench/fuse/results.txt");
    let _ = std::fs::remove_file(&results);
    let st = std::process::Command::new("sh")
        .arg(repo.join("driver/fio/bench-fuse-host.sh"))
        .env("CORA_FIO_REGISTRY", work.join("registry"))
        .env("CORA_FUSE_RESULTS", &results)
        .env("FIO_RUNTIME", opts.runtime.to_string())
        .status()
        .context("running bench-fuse-host.sh")?;
    if !st.success() {
        bail!("the FUSE bench failed: {st}");
    }
    let text = std::fs::read_to_string(&results)
        .with_context(|| format!("reading {}", results.display()))?;
    let r = parse(&text)?;
    let md = r.fuse_markdown();
    println!("{md}");
    let out = crate::benches::out_dir()?;
    let json = serde_json::json!({
        "bench": "fuse",
        "info": r.info,
        "fio": r.fio,
        "tree": r.tree,
        "fsrand": r.fsrand,
    });
    std::fs::write(out.join("fuse.json"), serde_json::to_string_pretty(&json)?)
        .context("writing fuse.json")?;
    std::fs::write(out.join("fuse.md"), &md).context("writing fuse.md")?;
    eprintln!("xtask: wrote fuse.json and fuse.md to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "info image_bytes 1073741824\ninfo kernel 6.12.1 amd64\n\
        tree cold 12.5 700000000\ntree warm 3.25 0\n\
        fio cora cold 100 20 9000 20000 50000000\n\
        fio cora warm 4000 600 1000 5000 0\n\
        fio loop warm 7000 500 900 4000 0\n\
        fio rublk-loop warm 3000 100 1100 6000 0\n\
        fio rublk-null warm 5000 600 800 3000 0\n";

    #[test]
    fn parses_and_checks_targets() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.info["kernel"], "6.12.1 amd64");
        assert_eq!(r.fio.len(), 5);
        assert_eq!(r.tree[1].seconds, 3.25);
        let t = r.targets();
        // Only the warm cora row is checked, five targets.
        assert_eq!(t.len(), 5);
        let get = |w: &str| t.iter().find(|t| t.what == w).unwrap();
        assert!(get("4k IOPS vs rublk-loop").ok);
        assert!((get("4k IOPS vs rublk-loop").ratio - 4000.0 / 3000.0).abs() < 1e-9);
        assert!(get("4k QD1 avg latency vs rublk-loop").ok);
        assert!(get("1M MB/s vs rublk-loop").ok);
        // 4000 / 5000 = 0.8 >= 0.7
        assert!(get("4k IOPS vs rublk-null").ok);
        let md = r.markdown();
        assert!(md.contains("| cora | warm | 4000 | 600 |"), "{md}");
        assert!(md.contains("1.33x"), "{md}");
    }

    #[test]
    fn fuse_results_compare_with_the_plain_file() {
        let r = parse(
            "info kernel 6.18\nfio cora-fuse warm 3000 800 200 400 0\n\
             fio file warm 6000 1600 100 200 0\nfio loop warm 5000 1000 120 300 0\n\
             tree fuse-cold 4.0 300000000\ntree fuse-warm 1.5 0\ntree file-warm 1.0 0\n\
             fsrand fuse 900\nfsrand file 1000\n",
        )
        .unwrap();
        assert_eq!(r.fsrand.len(), 2);
        let md = r.fuse_markdown();
        // IOPS 3000 vs 6000 (file) and 5000 (loop); MB/s 800 vs 1600 / 1000; QD1 200 vs 100.
        assert!(
            md.contains(
                "| cora-fuse | 3000 | 800 | 200 | 400 | 0.50x / 0.60x | 0.50x / 0.80x | 2.00x |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| through FUSE, fully cached | 1.50 | 0.0 | 1.50x |"),
            "{md}"
        );
        assert!(md.contains("| fuse | 900 | 0.90x |"), "{md}");
        assert!(parse("fsrand fuse").is_err());
    }

    #[test]
    fn missed_targets_and_bad_lines() {
        let r = parse(&SAMPLE.replace("fio cora warm 4000 600", "fio cora warm 2000 150")).unwrap();
        let t = r.targets();
        assert!(
            !t.iter()
                .find(|t| t.what == "1M MB/s vs rublk-loop")
                .unwrap()
                .ok
        );
        assert!(
            !t.iter()
                .find(|t| t.what == "4k IOPS vs rublk-null")
                .unwrap()
                .ok
        );
        assert!(r.markdown().contains("MISSED"));
        assert!(parse("fio cora warm x 1 2 3 4").is_err());
        assert!(parse("bogus 1 2").is_err());
        // Without references there is nothing to check.
        assert!(
            parse("fio cora warm 1 2 3 4 5")
                .unwrap()
                .targets()
                .is_empty()
        );
    }
}
