//! Cold start natively on this host (no VM, no ublk): a real Debian base image (libc, coreutils,
//! bash, perl-base, openssl, ...) started by containerd 1.6 + runc two ways, alternating, from
//! nothing local each round:
//! - OCI: `ctr images pull` (gzip layers) + `ctr run` under containerd's built-in overlayfs
//!   snapshotter;
//! - CORA: `cora rpull` + `ctr run --snapshotter cora` of the same tree converted to CORA,
//!   served lazily by cora-snapshotter through FUSE (its default transport here).
//!
//! Printed: time to the workload's output (`sha256sum /usr/bin/openssl`), the ratio, and bytes
//! over loopback (registry traffic) per start. The registry is on loopback: no network cost,
//! so the ratio shows what lazy serving saves in unpacking, not in transfer.
//! `cargo bench -p cora-snapshotter --bench coldstart_fuse` (root; `/dev/fuse`; starts its own
//! docker-registry, containerd and snapshotter). `CORA_BENCH_ROUNDS` (default 3).
use anyhow::{Context, Result, bail, ensure};
use cora_api::driver::DeviceInfo;
use cora_tests::containerd::Containerd;
use cora_tests::daemon::wait_for;
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::images::Registry;
use cora_tests::snapshotter::CoraSnapshotter;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Bytes the loopback interface has carried (every registry byte crosses it once).
fn lo_bytes() -> Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev")?;
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("no lo line in /proc/net/dev")
}

struct Start {
    seconds: f64,
    bytes: u64,
}

fn main() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse missing");
    }
    let rounds: usize = std::env::var("CORA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::Builder::new()
        .prefix("cora-bench-coldstart-")
        .tempdir_in("/var/tmp")?;
    let registry = Registry::start(&dir.path().join("registry"))?;
    let tree = fixtures::debian_tree("base", fixtures::BASE)?;
    let layout = dir.path().join("layout");
    blobfmt::dirsrc::layout_from_dirs(&[&tree], &layout, "v1", true)?;
    let oci = registry.push(&layout, "v1", "bench/base")?;
    let cora = format!("{}/bench/base:cora", registry.addr);
    run(Command::new(cora_bin("cora"))
        .args(["--insecure", &registry.addr, "convert"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(&cora)
        .arg("--work")
        .arg(dir.path().join("convert-work")))?;
    let want = format!(
        "{}  /usr/bin/openssl",
        run(Command::new("sha256sum").arg(tree.join("usr/bin/openssl")))?
            .split_whitespace()
            .next()
            .context("sha256sum printed nothing")?
    );

    let sdir = dir.path().join("snapshotter");
    let cache = dir.path().join("cache");
    CoraSnapshotter::write_config(
        &sdir,
        &serde_json::json!({
            "insecureRegistries": [registry.addr],
            "cacheDir": cache,
            "autoRemoveDev": true,
        }),
    )?;
    let snap = CoraSnapshotter::start(Path::new(env!("CARGO_BIN_EXE_cora-snapshotter")), &sdir)?;
    let ctrd = Containerd::start(&dir.path().join("containerd"), &[("cora", &snap.socket)])?;
    let fuse_dir = snap.root.join("fuse");
    let cmd = ["/usr/bin/sha256sum", "/usr/bin/openssl"];

    let (mut oci_starts, mut cora_starts) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // OCI: pull (fetch + gunzip + unpack) then run, overlayfs.
        let b0 = lo_bytes()?;
        let t = Instant::now();
        ctrd.ctr(&["images", "pull", "--plain-http", &oci])?;
        let id = format!("oci-{round}");
        let mut args = vec!["run", "--rm", &oci, &id];
        args.extend(cmd);
        let out = ctrd.ctr(&args)?;
        oci_starts.push(Start {
            seconds: t.elapsed().as_secs_f64(),
            bytes: lo_bytes()? - b0,
        });
        ensure!(out.trim() == want, "OCI start printed {out:?}");
        ctrd.ctr(&["images", "rm", "--sync", &oci])?;

        // CORA: rpull (metadata only) then run; the stack is served through FUSE.
        let b0 = lo_bytes()?;
        let t = Instant::now();
        run(Command::new(cora_bin("cora"))
            .args(["--insecure", &registry.addr, "rpull", "--address"])
            .arg(&ctrd.address)
            .args([
                "--namespace",
                &ctrd.namespace,
                "--snapshotter",
                "cora",
                &cora,
            ]))?;
        let id = format!("cora-{round}");
        let mut args = vec!["run", "--rm", "--snapshotter", "cora", &cora, &id];
        args.extend(cmd);
        let out = ctrd.ctr(&args).with_context(|| snap.daemon.log_text())?;
        cora_starts.push(Start {
            seconds: t.elapsed().as_secs_f64(),
            bytes: lo_bytes()? - b0,
        });
        ensure!(out.trim() == want, "CORA start printed {out:?}");
        ctrd.ctr(&["images", "rm", "--sync", &cora])?;
        // Cold again next round: the stack's device gone, then its chunks.
        wait_for(
            "the stack's FUSE device to go",
            Duration::from_secs(60),
            || {
                Command::new(cora_bin("cora-driver"))
                    .args(["list", "--json", "--fuse-dir"])
                    .arg(&fuse_dir)
                    .output()
                    .ok()
                    .and_then(|o| DeviceInfo::parse_list(&String::from_utf8_lossy(&o.stdout)).ok())
                    .is_some_and(|l| l.is_empty())
            },
        )?;
        std::fs::remove_dir_all(&cache)?;
    }

    let mean = |s: &[Start]| {
        (
            s.iter().map(|x| x.seconds).sum::<f64>() / s.len() as f64,
            s.iter().map(|x| x.bytes).sum::<u64>() / s.len() as u64,
        )
    };
    let (o, ob) = mean(&oci_starts);
    let (c, cb) = mean(&cora_starts);
    let each = |s: &[Start]| {
        s.iter()
            .map(|x| format!("{:.2}", x.seconds))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "cold start to output, Debian base, host kernel {}, registry on loopback, mean of {rounds}:\n\
         | start | seconds | each round | MB over loopback |\n|---|---:|---|---:|\n\
         | OCI: ctr pull + run (overlayfs) | {o:.2} | {} | {:.1} |\n\
         | CORA: cora rpull + run (FUSE, lazy) | {c:.2} | {} | {:.1} |\n\
         OCI / CORA time: {:.2}x; CORA fetched {:.1} % of the OCI bytes",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        each(&oci_starts),
        ob as f64 / 1e6,
        each(&cora_starts),
        cb as f64 / 1e6,
        o / c,
        cb as f64 * 100.0 / ob as f64,
    );
    // containerd stops (and unmounts) before the snapshotter.
    drop(ctrd);
    drop(snap);
    Ok(())
}
