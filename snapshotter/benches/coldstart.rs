//! Cold start natively on this host through containerd 1.6 + runc, every system side by side
//! in one run, against one docker-registry reached through a shaped link (RTT + bandwidth,
//! `cora_tests::shaper`):
//! - `oci`: `ctr images pull` (gzip layers) + `ctr run`, containerd's overlayfs snapshotter;
//! - `cora-w0`: `cora rpull` + `ctr run --snapshotter`, served lazily through FUSE, no miss
//!   window (each miss fetches what was read);
//! - `cora`: the same with the driver's defaults (miss window);
//! - `cora-fill`: defaults plus the background fill (`fill: always`);
//! - `cora+trace`: defaults, with an access trace recorded beforehand and pushed with the
//!   image (`cora trace push`), prefetched from the device's start;
//! - `nydus`: containerd's nydus-snapshotter + `nydusd` (FUSE, one daemon per image) with the
//!   snapshotter's shipped nydusd config (1 MiB per miss, the whole image prefetched in the
//!   background), `cora rpull --snapshotter nydus` passing the layers' `nydus-*` annotations
//!   as containerd's unpacker does; the same images converted with `nydus-image` (RAFS v6);
//! - `nydus-noprefetch`: the same without the background prefetch.
//!
//! Nydus runs when `CORA_NYDUS_BIN` names its tools (`cargo xtask bench coldstart` installs
//! them); otherwise its rows say why not.
//!
//! Images (built from Debian packages, PyPI wheels and npm, cached under
//! `target/cora-fixtures`), each with a workload that prints a line when it starts and one
//! when done: `base` (sha256sum of a binary), `python` (numpy + pandas + scipy imported and
//! used), `node` (express required, an app built and its routes listed), `large-partial` (32
//! MiB of a 1 GiB file) and `large-full` (all of it).
//!
//! Every start is cold: nothing of the image local (OCI: image removed with its content;
//! CORA: devices gone, cache emptied). Measured per start: time to first output and to the
//! workload's end, bytes over the link, CPU seconds of containerd + snapshotter + drivers,
//! peak RSS of our processes. The limit of a start is the warm start (OCI, image local) plus
//! the bytes the start reads (what the trace recorder fetched: it fetches only what the
//! kernel asks for, chunk-rounded) at link speed plus one round trip.
//!
//! `cargo xtask bench coldstart` (root; `/dev/fuse`). Knobs: `CORA_BENCH_ROUNDS` (default 1),
//! `CORA_BENCH_PROFILES` (default `lan,wan`), `CORA_BENCH_WORKLOADS` (default all),
//! `CORA_BENCH_NYDUS` (default `nydus,nydus-noprefetch`; empty: none), `CORA_BENCH_OUT`
//! (where coldstart-host.{md,json,csv} go), `CORA_BENCH_KEEP` (keep the work directory:
//! snapshotter and driver logs).
use anyhow::{Context, Result, bail, ensure};
use cora_api::driver::{DeviceInfo, DriverStats, Ready};
use cora_tests::containerd::Containerd;
use cora_tests::daemon::wait_for;
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::images::Registry;
use cora_tests::nydus::{self, NydusSnapshotter};
use cora_tests::shaper::{LinkProfile, ShapedLink};
use cora_tests::snapshotter::CoraSnapshotter;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PY_WHEELS: &[&str] = &["numpy==2.1.3", "pandas==2.2.3", "scipy==1.14.1"];
/// Debian's own node (pinned: a machine may carry another `nodejs` that apt would pick).
const NODE_DEBS: &[&str] = &[
    "nodejs=18.20.4+dfsg-1~deb12u2",
    "libnode108=18.20.4+dfsg-1~deb12u2",
    "libuv1",
    "libc-ares2",
    "libbrotli1",
    "libnghttp2-14",
    "libicu72",
    "node-acorn",
    "node-cjs-module-lexer",
    "node-undici",
];
const EXPRESS: &str = "express@4.21.2";
const LARGE_FILE: usize = 1 << 30;

const PY_WORKLOAD: &str = "print('start', flush=True)
import numpy as np, pandas as pd, scipy.linalg as la, scipy.stats as st
a = np.arange(1, 401, dtype=float).reshape(20, 20) % 7 + np.eye(20)
df = pd.DataFrame({'k': np.arange(100000) % 10, 'v': np.arange(100000) * 0.5})
print('done', round(float(la.det(a)), 3), df.groupby('k').v.sum().iloc[3], round(float(st.norm.cdf(1.0)), 6))";

const NODE_APP: &str = "console.log('start');
const express = require('express');
const app = express();
for (let i = 0; i < 50; i++) app.get('/r' + i, (req, res) => res.send(String(i)));
const n = app._router.stack.filter(l => l.route).length;
console.log('done', n, require('express/package.json').version);
";

/// One container start to measure: an image and the command run in it.
struct Workload {
    name: &'static str,
    image: &'static str,
    cmd: Vec<String>,
}

fn workloads() -> Vec<Workload> {
    let sh = |s: &str| vec!["/bin/sh".to_string(), "-c".into(), s.into()];
    vec![
        Workload {
            name: "base",
            image: "base",
            cmd: sh("echo start; sha256sum /usr/bin/openssl"),
        },
        Workload {
            name: "python",
            image: "python",
            cmd: vec![
                "/usr/bin/python3.11".into(),
                "-c".into(),
                PY_WORKLOAD.into(),
            ],
        },
        Workload {
            name: "node",
            image: "node",
            cmd: vec!["/usr/bin/node".into(), "/app/main.js".into()],
        },
        Workload {
            name: "large-partial",
            image: "large",
            cmd: sh(
                "echo start; dd if=/models/weights.bin bs=1M skip=600 count=32 status=none | sha256sum",
            ),
        },
        Workload {
            name: "large-full",
            image: "large",
            cmd: sh("echo start; sha256sum /models/weights.bin"),
        },
    ]
}

/// A directory built once by `build` (into a temporary sibling, renamed when complete).
fn cached_dir(name: &str, build: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let base = fixtures::fixtures_dir().join("bench");
    let dir = base.join(name);
    let done = dir.with_extension("done");
    if done.exists() && dir.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&base)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .tempdir_in(&base)?;
    build(tmp.path()).with_context(|| format!("building {name}"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(tmp.keep(), &dir)?;
    std::fs::write(&done, name)?;
    Ok(dir)
}

/// Layers of each image, bottom first.
fn image_layers(name: &str) -> Result<Vec<PathBuf>> {
    let base = fixtures::debian_tree("base", fixtures::BASE)?;
    Ok(match name {
        "base" => vec![base],
        "python" => {
            let wheels = cached_dir("python-wheels", |d| {
                let dl = d.join("dl");
                run(Command::new("pip")
                    .args(["download", "-q", "--only-binary=:all:"])
                    .args(["--platform", "manylinux2014_x86_64"])
                    .args(["--platform", "manylinux_2_17_x86_64"])
                    .args(["--python-version", "3.11", "--implementation", "cp"])
                    .args(["--abi", "cp311", "-d"])
                    .arg(&dl)
                    .args(PY_WHEELS))?;
                let site = d.join("usr/local/lib/python3.11/dist-packages");
                std::fs::create_dir_all(&site)?;
                for w in std::fs::read_dir(&dl)? {
                    run(Command::new("unzip")
                        .args(["-q", "-o"])
                        .arg(w?.path())
                        .arg("-d")
                        .arg(&site))?;
                }
                std::fs::remove_dir_all(&dl)?;
                Ok(())
            })?;
            vec![
                base,
                fixtures::debian_tree("python-layer", fixtures::PYTHON)?,
                wheels,
            ]
        }
        "node" => {
            let app = cached_dir("node-app", |d| {
                let app = d.join("app");
                std::fs::create_dir_all(&app)?;
                run(Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&app)
                    .arg(EXPRESS))?;
                std::fs::write(app.join("main.js"), NODE_APP)?;
                Ok(())
            })?;
            vec![base, fixtures::debian_tree("node-layer", NODE_DEBS)?, app]
        }
        "large" => {
            let weights = cached_dir("large-weights", |d| {
                use std::io::Write;
                std::fs::create_dir_all(d.join("models"))?;
                let mut f =
                    std::io::BufWriter::new(std::fs::File::create(d.join("models/weights.bin"))?);
                let mut rng = cora_testdata::XorShift::new(0x5eed);
                let mut block = vec![0u8; 1 << 20];
                for _ in 0..LARGE_FILE / block.len() {
                    rng.fill(&mut block);
                    f.write_all(&block)?;
                }
                f.flush()?;
                Ok(())
            })?;
            vec![base, weights]
        }
        other => bail!("no bench image {other:?}"),
    })
}

/// CPU seconds (user + system) a process has used so far; 0 once it is gone.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is the first.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// Peak resident set of a process (VmHWM: anonymous memory and mapped files, e.g. cached
/// chunks lent to the kernel), bytes; 0 once it is gone.
fn peak_rss(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:")
}

/// Anonymous resident memory of a process now (RssAnon), bytes; 0 once it is gone.
fn anon_rss(pid: u32) -> u64 {
    status_kb(pid, "RssAnon:")
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[derive(Clone, Debug, serde::Serialize)]
struct Start {
    profile: String,
    workload: String,
    system: String,
    round: usize,
    /// When the pull (`ctr images pull`, `cora rpull`) returned.
    pull_s: f64,
    first_output_s: f64,
    done_s: f64,
    bytes: u64,
    cpu_s: f64,
    /// Peak RSS of the snapshotter and the stack's drivers (CORA) — our processes.
    rss_bytes: u64,
    /// Their anonymous memory at the workload's end.
    anon_bytes: u64,
    /// CORA: reads that waited for a fetch, and their waits summed (the drivers' counters).
    stalls: u64,
    stall_s: f64,
    /// CPU seconds of the registry during the start: it runs on this host's cores, so each
    /// range request it serves takes CPU from the workload (not so with a remote registry).
    registry_cpu_s: f64,
}

/// Runs `ctr ARGS` and times, from `t0`, its first line of output and its end.
fn ctr_timed(ctrd: &Containerd, args: &[&str], t0: Instant) -> Result<(f64, f64, String)> {
    let mut child = Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["--namespace", &ctrd.namespace])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ctr")?;
    let stdout = child.stdout.take().context("ctr stdout")?;
    let mut first = None;
    let mut out = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        out.push_str(&line);
        out.push('\n');
    }
    let o = child.wait_with_output()?;
    let done = t0.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!(
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok((first.unwrap_or(done), done, out))
}

/// A lazily pulling system: a proxy snapshotter and the processes serving its images.
struct Lazy {
    /// The system's name in the report, also its snapshotter's name in containerd.
    name: String,
    served: Served,
}

enum Served {
    /// cora-snapshotter; devices are `cora-driver` processes; chunks in `cache`.
    Cora {
        snap: CoraSnapshotter,
        cache: PathBuf,
        /// Its metrics endpoint (127.0.0.1): the drivers' counters, retired ones included.
        metrics_port: u16,
    },
    Nydus(NydusSnapshotter),
}

impl Lazy {
    /// The image tag this system pulls (its converted form).
    fn tag(&self) -> &'static str {
        match self.served {
            Served::Cora { .. } => "cora",
            Served::Nydus(_) => "nydus",
        }
    }

    fn snapshotter_pid(&self) -> u32 {
        match &self.served {
            Served::Cora { snap, .. } => snap.daemon.pid(),
            Served::Nydus(n) => n.daemon.pid(),
        }
        .unwrap_or(0)
    }

    /// The processes serving images now: CORA's devices, Nydus's daemons.
    fn servers(&self) -> Vec<u32> {
        match &self.served {
            Served::Cora { snap, .. } => Command::new(cora_bin("cora-driver"))
                .args(["list", "--json", "--fuse-dir"])
                .arg(snap.root.join("fuse"))
                .output()
                .ok()
                .and_then(|o| DeviceInfo::parse_list(&String::from_utf8_lossy(&o.stdout)).ok())
                .unwrap_or_default()
                .iter()
                .map(|d| d.pid as u32)
                .collect(),
            Served::Nydus(n) => n.nydusd_pids(),
        }
    }

    fn cache(&self) -> PathBuf {
        match &self.served {
            Served::Cora { cache, .. } => cache.clone(),
            Served::Nydus(n) => n.cache(),
        }
    }

    /// The drivers' read stalls so far (count, seconds summed); zeros for other systems.
    fn stalls(&self) -> Result<(u64, f64)> {
        let Served::Cora { metrics_port, .. } = &self.served else {
            return Ok((0, 0.0));
        };
        let page = cora_tests::http_get(*metrics_port, "/metrics")?;
        let value = |name: &str| -> Result<f64> {
            page.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .with_context(|| format!("{name} not in the metrics page:\n{page}"))
        };
        Ok((
            value("cora_read_stalls_total")? as u64,
            value("cora_read_stall_seconds_total")?,
        ))
    }

    fn log_text(&self) -> String {
        match &self.served {
            Served::Cora { snap, .. } => snap.daemon.log_text(),
            Served::Nydus(n) => n.daemon.log_text(),
        }
    }
}

struct Bench {
    ctrd: Containerd,
    systems: Vec<Lazy>,
    /// The registry process, for its CPU time.
    registry_pid: u32,
    /// The registry as pushed to (no shaping): conversion, traces.
    direct: String,
}

impl Bench {
    /// A cold OCI start; the image stays local (for the warm start) until `drop_image`.
    fn oci(
        &self,
        reference: &str,
        w: &Workload,
        id: &str,
        link: &ShapedLink,
    ) -> Result<(Start, String)> {
        let (b0, c0, r0) = (
            link.bytes_down(),
            self.containerd_cpu(),
            cpu_seconds(self.registry_pid),
        );
        let t0 = Instant::now();
        self.ctrd
            .ctr(&["images", "pull", "--plain-http", reference])?;
        let pull_s = t0.elapsed().as_secs_f64();
        let mut args = vec!["run", "--rm", reference, id];
        args.extend(w.cmd.iter().map(String::as_str));
        let (first, done, out) = ctr_timed(&self.ctrd, &args, t0)?;
        let registry_cpu_s = cpu_seconds(self.registry_pid) - r0;
        let s = Start {
            profile: link.profile.name.into(),
            workload: w.name.into(),
            system: "oci".into(),
            round: 0,
            pull_s,
            first_output_s: first,
            done_s: done,
            bytes: link.bytes_down() - b0,
            cpu_s: self.containerd_cpu() - c0,
            rss_bytes: 0,
            anon_bytes: 0,
            stalls: 0,
            stall_s: 0.0,
            registry_cpu_s,
        };
        Ok((s, out))
    }

    fn drop_image(&self, reference: &str) -> Result<()> {
        self.ctrd.ctr(&["images", "rm", "--sync", reference])?;
        Ok(())
    }

    /// The same container again with the image local: the warm start.
    fn warm(&self, reference: &str, w: &Workload, id: &str) -> Result<f64> {
        let mut args = vec!["run", "--rm", reference, id];
        args.extend(w.cmd.iter().map(String::as_str));
        Ok(ctr_timed(&self.ctrd, &args, Instant::now())?.1)
    }

    fn containerd_cpu(&self) -> f64 {
        self.ctrd.pid().map_or(0.0, cpu_seconds)
    }

    /// A cold start through a lazy system; with `warm`, the same container again with the
    /// image's data local.
    fn lazy(
        &self,
        sys: &Lazy,
        reference: &str,
        w: &Workload,
        id: &str,
        link: &ShapedLink,
        warm: Option<&mut f64>,
    ) -> Result<(Start, String)> {
        let snap_pid = sys.snapshotter_pid();
        let stalls0 = sys.stalls()?;
        let (b0, c0, s0, r0) = (
            link.bytes_down(),
            self.containerd_cpu(),
            cpu_seconds(snap_pid),
            cpu_seconds(self.registry_pid),
        );
        let t0 = Instant::now();
        let host = reference.split('/').next().unwrap_or_default();
        run(Command::new(cora_bin("cora"))
            .args(["--insecure", host, "rpull", "--address"])
            .arg(&self.ctrd.address)
            .args([
                "--namespace",
                &self.ctrd.namespace,
                "--snapshotter",
                &sys.name,
                reference,
            ]))?;
        let pull_s = t0.elapsed().as_secs_f64();
        let mut args = vec!["run", "--rm", "--snapshotter", &sys.name, reference, id];
        args.extend(w.cmd.iter().map(String::as_str));
        let (first, done, out) =
            ctr_timed(&self.ctrd, &args, t0).with_context(|| sys.log_text())?;
        let registry_cpu_s = cpu_seconds(self.registry_pid) - r0;
        let servers = sys.servers();
        let drivers_cpu: f64 = servers.iter().map(|&p| cpu_seconds(p)).sum();
        let drivers_rss: u64 = servers.iter().map(|&p| peak_rss(p)).sum();
        let drivers_anon: u64 = servers.iter().map(|&p| anon_rss(p)).sum();
        let mut s = Start {
            profile: link.profile.name.into(),
            workload: w.name.into(),
            system: sys.name.clone(),
            round: 0,
            pull_s,
            first_output_s: first,
            done_s: done,
            bytes: link.bytes_down() - b0,
            cpu_s: self.containerd_cpu() - c0 + cpu_seconds(snap_pid) - s0 + drivers_cpu,
            rss_bytes: peak_rss(snap_pid) + drivers_rss,
            anon_bytes: anon_rss(snap_pid) + drivers_anon,
            stalls: 0,
            stall_s: 0.0,
            registry_cpu_s,
        };
        if let Some(warm) = warm {
            // Again, its chunks local: the transport's own cost (after the counters above:
            // the device may be removed and attached again with its last container).
            let again = format!("{id}-warm");
            let mut args = vec!["run", "--rm", "--snapshotter", &sys.name, reference, &again];
            args.extend(w.cmd.iter().map(String::as_str));
            *warm = ctr_timed(&self.ctrd, &args, Instant::now())?.1;
        }
        self.drop_image(reference)?;
        // Cold again next time: the image's servers gone, then its data.
        wait_for("the image's servers to go", Duration::from_secs(60), || {
            sys.servers().is_empty()
        })?;
        // Now that the devices are gone their final counters are in the snapshotter's totals
        // (the warm start's reads never wait: its chunks are local).
        let stalls1 = sys.stalls()?;
        (s.stalls, s.stall_s) = (stalls1.0 - stalls0.0, stalls1.1 - stalls0.1);
        // Emptied, not removed: the snapshotter may hold the directory.
        let cache = sys.cache();
        if cache.exists() {
            for e in std::fs::read_dir(&cache)? {
                let p = e?.path();
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        Ok((s, out))
    }

    /// Records the chunks `w` reads at its start (a FUSE device of its own, the command run in
    /// a chroot of the mounted stack) and, with `push`, stores them with the image (`cora
    /// trace push`).
    fn record_trace(
        &self,
        reference: &str,
        w: &Workload,
        dir: &Path,
        push: bool,
    ) -> Result<Traced> {
        let fuse_dir = dir.join("fuse");
        let trace = dir.join(format!("{}.trace", w.image));
        let stats = dir.join(format!("{}.stats.json", w.image));
        let out = run(Command::new(cora_bin("cora-driver"))
            .args(["add", "--image", reference, "--insecure", &self.direct])
            .arg("--cache")
            .arg(dir.join("cache"))
            .args(["--no-prefetch", "--miss-window", "0", "--fill", "off"])
            .arg("--record-trace")
            .arg(&trace)
            .arg("--stats-file")
            .arg(&stats)
            .args(["--transport", "fuse", "--fuse-dir"])
            .arg(&fuse_dir)
            .args(["--daemon", "--ready-json", "--log"])
            .arg(dir.join(format!("{}-driver.log", w.image))))?;
        let ready: Ready = serde_json::from_str(out.lines().last().unwrap_or_default())
            .with_context(|| format!("cora-driver add printed {out:?}"))?;
        let mnt = dir.join(format!("{}-mnt", w.image));
        std::fs::create_dir_all(&mnt)?;
        let q = |p: &Path| format!("'{}'", p.display());
        let script = format!(
            "mount -t erofs -o ro {dev} {m} && mount --bind /dev {m}/dev && mount -t proc proc {m}/proc && exec chroot {m} \"$@\"",
            dev = q(&ready.path),
            m = q(&mnt)
        );
        let ran = run(Command::new("unshare")
            .args(["-m", "sh", "-c", &script, "sh"])
            .args(&w.cmd));
        run(Command::new(cora_bin("cora-driver"))
            .args(["del", &ready.id.to_string(), "--fuse-dir"])
            .arg(&fuse_dir))?;
        wait_for(
            "the trace recorder to exit",
            Duration::from_secs(60),
            || !Path::new(&format!("/proc/{}", ready.pid)).exists(),
        )?;
        let printed = ran.context("the traced run")?;
        ensure!(
            printed.contains("start"),
            "the traced run printed {printed:?}"
        );
        let chunks = std::fs::read_to_string(&trace)
            .with_context(|| format!("reading the trace {}", trace.display()))?
            .lines()
            .count()
            .saturating_sub(1);
        ensure!(chunks > 0, "the trace of {} recorded no chunks", w.image);
        // Written last when the recorder exits (waited for above).
        let fetched: DriverStats = std::fs::read(&stats)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
            .with_context(|| format!("the trace recorder's stats {}", stats.display()))?;
        if push {
            run(Command::new(cora_bin("cora"))
                .args(["trace", "push", "--insecure", &self.direct, reference])
                .arg(&trace))?;
        }
        Ok(Traced {
            chunks,
            read_bytes: fetched.fetched_bytes,
        })
    }
}

/// What a workload's start reads, from recording its trace: a device that fetches only what
/// the kernel asks for (no miss window, prefetch or fill).
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Traced {
    chunks: usize,
    /// Compressed bytes fetched: what the kernel read, chunk-rounded.
    read_bytes: u64,
}

/// The CORA variants: `CORA_BENCH_CORA` = `NAME[:FIELD=VALUE,...];...` (snapshotter config
/// fields, e.g. `cora-w4m:missWindow=4M`); the default compares no miss window, the driver's
/// defaults, and background fill. `cora+trace` is the one named `cora` (it must exist).
fn cora_variants() -> Result<Vec<(String, serde_json::Value)>> {
    let spec = std::env::var("CORA_BENCH_CORA")
        .unwrap_or_else(|_| "cora-w0:missWindow=0;cora;cora-fill:fill=always".into());
    let mut out = Vec::new();
    for v in spec.split(';').map(str::trim).filter(|v| !v.is_empty()) {
        let (name, fields) = v.split_once(':').unwrap_or((v, ""));
        let mut cfg = serde_json::Map::new();
        for f in fields.split(',').filter(|f| !f.is_empty()) {
            let (k, val) = f
                .split_once('=')
                .with_context(|| format!("{f:?} in CORA_BENCH_CORA is not FIELD=VALUE"))?;
            // Booleans as such; everything else (sizes: "4M") is a string in the config.
            let val = match val {
                "true" => serde_json::json!(true),
                "false" => serde_json::json!(false),
                v => serde_json::json!(v),
            };
            cfg.insert(k.to_string(), val);
        }
        out.push((name.to_string(), serde_json::Value::Object(cfg)));
    }
    ensure!(
        out.iter().any(|(n, _)| n == "cora"),
        "CORA_BENCH_CORA must name a variant `cora` (the traced runs use it)"
    );
    Ok(out)
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn main() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse missing");
    }
    let rounds: usize = std::env::var("CORA_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let profiles: Vec<LinkProfile> = env_list("CORA_BENCH_PROFILES", "lan,wan")
        .iter()
        .map(|p| {
            LinkProfile::by_name(p).with_context(|| format!("no link profile {p:?} (lan, wan)"))
        })
        .collect::<Result<_>>()?;
    let wanted = env_list(
        "CORA_BENCH_WORKLOADS",
        "base,python,node,large-partial,large-full",
    );
    let all = workloads();
    for w in &wanted {
        ensure!(all.iter().any(|x| x.name == w), "no workload {w:?}");
    }
    let work: Vec<&Workload> = all
        .iter()
        .filter(|w| wanted.iter().any(|x| x == w.name))
        .collect();

    let dir = tempfile::Builder::new()
        .prefix("cora-bench-coldstart-")
        .tempdir_in("/var/tmp")?;
    let registry = Registry::start(&dir.path().join("registry"))?;
    let upstream: std::net::SocketAddr = registry.addr.parse()?;
    let links: Vec<ShapedLink> = profiles
        .iter()
        .map(|p| ShapedLink::start(upstream, *p))
        .collect::<std::io::Result<_>>()?;

    // Nydus: its tools, or why it does not run.
    let mut nydus_not_run: Option<String> = None;
    let nydus_variants = env_list("CORA_BENCH_NYDUS", "nydus,nydus-noprefetch");
    let nydus_tools = match nydus::Tools::from_env() {
        Ok(t) if !nydus_variants.is_empty() => Some(t),
        Ok(_) => None,
        Err(why) => {
            eprintln!("coldstart: Nydus not run: {why}");
            nydus_not_run = Some(why);
            None
        }
    };
    if nydus_variants.is_empty() {
        nydus_not_run = Some("not asked for (CORA_BENCH_NYDUS is empty)".into());
    }

    // Images: plain OCI (gzip), CORA and Nydus, pushed once through the direct address.
    let mut images: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for w in &work {
        if images.contains_key(w.image) {
            continue;
        }
        let layers = image_layers(w.image)?;
        let refs: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
        let layout = dir.path().join(format!("layout-{}", w.image));
        eprintln!("coldstart: building image {}", w.image);
        blobfmt::dirsrc::layout_from_dirs(&refs, &layout, "v1", true)?;
        registry.push(&layout, "v1", &format!("bench/{}", w.image))?;
        let cora = format!("{}/bench/{}:cora", registry.addr, w.image);
        run(Command::new(cora_bin("cora"))
            .args(["--insecure", &registry.addr, "convert"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(&cora)
            .arg("--work")
            .arg(dir.path().join(format!("convert-{}", w.image))))?;
        if let Some(tools) = &nydus_tools {
            let nlayout = dir.path().join(format!("layout-nydus-{}", w.image));
            let work = dir.path().join(format!("nydus-{}", w.image));
            nydus::convert(tools, &layers, &work, &nlayout, "nydus")
                .with_context(|| format!("converting {} for Nydus", w.image))?;
            registry.push(&nlayout, "nydus", &format!("bench/{}", w.image))?;
        }
        let tree: u64 = layers
            .iter()
            .map(|l| fixtures::tree_bytes(l))
            .sum::<Result<u64>>()?;
        let gz = fixtures::tree_bytes(&layout.join("blobs"))?;
        images.insert(w.image, (tree, gz));
    }

    // One snapshotter per CORA variant, each with its own cache.
    let variants = cora_variants()?;
    let insecure: Vec<String> = links
        .iter()
        .map(|l| l.addr.to_string())
        .chain([registry.addr.clone()])
        .collect();
    let mut systems = Vec::new();
    for (name, extra) in variants {
        let sdir = dir.path().join(&name);
        let cache = sdir.join("cache");
        let metrics = cora_tests::reserve_port()?;
        let mut cfg = serde_json::json!({
            "exporterConfig": {"enable": true, "uriPrefix": "/metrics", "port": metrics.port},
            "insecureRegistries": insecure,
            "cacheDir": cache,
            "autoRemoveDev": true,
            "transport": "fuse",
            "verbose": "info",
        });
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        CoraSnapshotter::write_config(&sdir, &cfg)?;
        let snap =
            CoraSnapshotter::start(Path::new(env!("CARGO_BIN_EXE_cora-snapshotter")), &sdir)?;
        systems.push(Lazy {
            name,
            served: Served::Cora {
                snap,
                cache,
                metrics_port: metrics.port,
            },
        });
    }
    if let Some(tools) = &nydus_tools {
        for name in &nydus_variants {
            let prefetch_all = match name.as_str() {
                "nydus" => true,
                "nydus-noprefetch" => false,
                other => bail!("no Nydus variant {other:?} (nydus, nydus-noprefetch)"),
            };
            let snap = NydusSnapshotter::start(tools, &dir.path().join(name), prefetch_all)?;
            systems.push(Lazy {
                name: name.clone(),
                served: Served::Nydus(snap),
            });
        }
    }
    let sockets: Vec<(&str, &Path)> = systems
        .iter()
        .map(|c| {
            let socket = match &c.served {
                Served::Cora { snap, .. } => snap.socket.as_path(),
                Served::Nydus(n) => n.socket.as_path(),
            };
            (c.name.as_str(), socket)
        })
        .collect();
    let ctrd = Containerd::start(&dir.path().join("containerd"), &sockets)?;
    let bench = Bench {
        ctrd,
        systems,
        registry_pid: registry.pid().unwrap_or(0),
        direct: registry.addr.clone(),
    };

    let mut starts: Vec<Start> = Vec::new();
    let mut warm: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut warm_cora: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut n = 0usize;
    let mut id = || {
        n += 1;
        format!("c{n}")
    };
    // Phase 1: every system without traces (a pushed trace would be prefetched by all).
    for round in 0..rounds {
        for link in &links {
            for w in &work {
                let host = link.addr.to_string();
                let oci = format!("{host}/bench/{}:v1", w.image);
                let (mut s, out) = bench.oci(&oci, w, &id(), link)?;
                s.round = round;
                let want = out.lines().last().unwrap_or_default().to_string();
                ensure!(
                    out.lines().count() >= 2 && want != "start",
                    "{} printed {out:?}",
                    w.name
                );
                if round == 0 {
                    let t = bench.warm(&oci, w, &id())?;
                    warm.insert((link.profile.name.to_string(), w.name.to_string()), t);
                }
                bench.drop_image(&oci)?;
                eprintln!(
                    "coldstart: {} {} oci {:.2}s",
                    link.profile.name, w.name, s.done_s
                );
                starts.push(s);
                for sys in &bench.systems {
                    let mut warm_s = f64::NAN;
                    let measure_warm = round == 0 && sys.name == "cora";
                    let reference = format!("{host}/bench/{}:{}", w.image, sys.tag());
                    let (mut s, out) = bench.lazy(
                        sys,
                        &reference,
                        w,
                        &id(),
                        link,
                        measure_warm.then_some(&mut warm_s),
                    )?;
                    if measure_warm {
                        warm_cora
                            .insert((link.profile.name.to_string(), w.name.to_string()), warm_s);
                    }
                    s.round = round;
                    ensure!(
                        out.lines().last() == Some(want.as_str()),
                        "{} {} printed {out:?}, OCI {want:?}",
                        sys.name,
                        w.name
                    );
                    eprintln!(
                        "coldstart: {} {} {} {:.2}s",
                        link.profile.name, w.name, sys.name, s.done_s
                    );
                    starts.push(s);
                }
            }
        }
    }
    // Phase 2: traces recorded and pushed, then the default CORA with them.
    // Every workload's start is recorded (what it reads sets its limit); an image stores
    // the trace of its first workload (large-partial's for large-full too: a trace is the
    // image's, and the one that reads all of the file needs none).
    let mut traced: BTreeMap<&str, Traced> = BTreeMap::new();
    let mut pushed: Vec<&str> = Vec::new();
    for w in &work {
        let reference = format!("{}/bench/{}:cora", registry.addr, w.image);
        let tdir = dir.path().join(format!("trace-{}", w.name));
        std::fs::create_dir_all(&tdir)?;
        let push = !pushed.contains(&w.image);
        let t = bench
            .record_trace(&reference, w, &tdir, push)
            .with_context(|| format!("recording the trace of {}", w.name))?;
        if push {
            pushed.push(w.image);
        }
        traced.insert(w.name, t);
    }
    let default = bench
        .systems
        .iter()
        .find(|c| c.name == "cora")
        .context("no default CORA snapshotter")?;
    for round in 0..rounds {
        for link in &links {
            for w in &work {
                let cora_ref = format!("{}/bench/{}:cora", link.addr, w.image);
                let (mut s, _) = bench.lazy(default, &cora_ref, w, &id(), link, None)?;
                s.round = round;
                s.system = "cora+trace".into();
                eprintln!(
                    "coldstart: {} {} cora+trace {:.2}s",
                    link.profile.name, w.name, s.done_s
                );
                starts.push(s);
            }
        }
    }

    let nydus_version = nydus_tools.as_ref().map(nydus::Tools::version);
    let peers = Peers {
        nydus_version: nydus_version.clone(),
        nydus_not_run: nydus_not_run.clone(),
    };
    let report = render(
        &starts, &warm, &warm_cora, &profiles, &work, &images, &traced, rounds, &peers,
    )?;
    print!("{report}");
    let out = cora_tests::bench::out_dir()?;
    std::fs::write(out.join("coldstart-host.md"), &report)?;
    let mut csv = String::from(
        "profile,workload,system,round,pull_s,first_output_s,done_s,bytes,cpu_s,rss_bytes,anon_bytes,stalls,stall_s,registry_cpu_s\n",
    );
    for s in &starts {
        csv.push_str(&format!(
            "{},{},{},{},{:.3},{:.3},{:.3},{},{:.2},{},{},{},{:.3},{:.2}\n",
            s.profile,
            s.workload,
            s.system,
            s.round,
            s.pull_s,
            s.first_output_s,
            s.done_s,
            s.bytes,
            s.cpu_s,
            s.rss_bytes,
            s.anon_bytes,
            s.stalls,
            s.stall_s,
            s.registry_cpu_s
        ));
    }
    std::fs::write(out.join("coldstart-host.csv"), csv)?;
    cora_tests::bench::write_json(
        "coldstart-host",
        &serde_json::json!({
            "profiles": profiles.iter().map(|p| serde_json::json!({
                "name": p.name, "rtt_ms": p.rtt.as_secs_f64() * 1e3, "bandwidth_bytes_per_s": p.bandwidth,
            })).collect::<Vec<_>>(),
            "transport": "fuse",
            "emulated": false,
            "starts": starts,
            "warm_s": warm.iter().map(|((p, w), s)| serde_json::json!({"profile": p, "workload": w, "seconds": s})).collect::<Vec<_>>(),
            "warm_cora_s": warm_cora.iter().map(|((p, w), s)| serde_json::json!({"profile": p, "workload": w, "seconds": s})).collect::<Vec<_>>(),
            "traced": traced,
            "nydus": {"version": nydus_version, "not_run": nydus_not_run},
        }),
    )?;
    // containerd stops (and unmounts) before the snapshotters.
    drop(bench);
    drop(links);
    if std::env::var_os("CORA_BENCH_KEEP").is_some() {
        eprintln!("coldstart: kept {}", dir.keep().display());
    }
    Ok(())
}

/// The peers of this run, as the report states them.
struct Peers {
    nydus_version: Option<String>,
    /// Why Nydus has no rows, when it has none.
    nydus_not_run: Option<String>,
}

/// `{:.2}` of `v`, or `–` when it could not be measured in this run (NaN).
fn fmt2(v: f64, suffix: &str) -> String {
    if v.is_finite() {
        format!("{v:.2}{suffix}")
    } else {
        "–".into()
    }
}

/// A CORA-only counter: "–" in other systems' rows (no such counter there).
fn stall_cell(system: &str, v: f64, suffix: &str, decimals: usize) -> String {
    if system.starts_with("cora") && v.is_finite() {
        format!("{v:.decimals$}{suffix}")
    } else {
        "–".into()
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

#[allow(clippy::too_many_arguments)]
fn render(
    starts: &[Start],
    warm: &BTreeMap<(String, String), f64>,
    warm_cora: &BTreeMap<(String, String), f64>,
    profiles: &[LinkProfile],
    work: &[&Workload],
    images: &BTreeMap<&str, (u64, u64)>,
    traced: &BTreeMap<&str, Traced>,
    rounds: usize,
    peers: &Peers,
) -> Result<String> {
    use std::fmt::Write;
    let mut r = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    writeln!(
        r,
        "# Cold start, containerd 1.6 + runc on the host (kernel {}, no emulation), CORA through FUSE\n",
        kernel.trim()
    )?;
    writeln!(
        r,
        "Mean of {rounds} round(s); every start cold. Seconds from the pull's start to the pull's end / the workload's first line / its end; MB over the link; CPU s of containerd + our processes, and of the registry (it shares this host's two cores with the workload: every range request it serves costs CPU here, as a remote registry's would not); peak RSS of our processes (snapshotter + drivers; it counts cached chunks mapped to be lent to the kernel) and their anonymous memory at the end; stalls: reads of a CORA device that waited for a fetch (kernel read-ahead included), and their waits summed.\n"
    )?;
    writeln!(
        r,
        "| image | unpacked MB | gzip MB | chunks in its stored trace |\n|---|---:|---:|---:|"
    )?;
    for (name, (tree, gz)) in images {
        // The image stores its first workload's trace.
        let stored = work
            .iter()
            .find(|w| w.image == *name)
            .and_then(|w| traced.get(w.name));
        writeln!(
            r,
            "| {name} | {:.0} | {:.0} | {} |",
            *tree as f64 / 1e6,
            *gz as f64 / 1e6,
            stored.map_or(0, |t| t.chunks),
        )?;
    }
    let mut systems: Vec<&str> = Vec::new();
    for s in starts {
        if !systems.contains(&s.system.as_str()) {
            systems.push(&s.system);
        }
    }
    for p in profiles {
        writeln!(r, "\n## `{}`: {}\n", p.name, p.describe())?;
        writeln!(
            r,
            "| workload | system | pulled s | first output s | done s | MB fetched | CPU s | registry CPU s | peak RSS MB | anon MB | stalls | stall s | OCI/this (done) | Nydus/this | this/limit | fetched/read |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )?;
        for w in work {
            let pick = |sys: &str| -> Vec<&Start> {
                starts
                    .iter()
                    .filter(|s| s.profile == p.name && s.workload == w.name && s.system == sys)
                    .collect()
            };
            let done = |sys: &str| mean(pick(sys).iter().map(|s| s.done_s));
            let oci_done = done("oci");
            let nydus_done = done("nydus");
            let read_bytes = traced.get(w.name).map_or(f64::NAN, |t| t.read_bytes as f64);
            let warm_s = warm
                .get(&(p.name.to_string(), w.name.to_string()))
                .copied()
                .unwrap_or(f64::NAN);
            let limit = warm_s + read_bytes / p.bandwidth as f64 + p.rtt.as_secs_f64();
            for &sys in &systems {
                let ss = pick(sys);
                if ss.is_empty() {
                    continue;
                }
                let d = done(sys);
                writeln!(
                    r,
                    "| {} | {sys} | {:.2} | {:.2} | {d:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {} | {:.2}x | {} | {} | {} |",
                    w.name,
                    mean(ss.iter().map(|s| s.pull_s)),
                    mean(ss.iter().map(|s| s.first_output_s)),
                    mean(ss.iter().map(|s| s.bytes as f64)) / 1e6,
                    mean(ss.iter().map(|s| s.cpu_s)),
                    mean(ss.iter().map(|s| s.registry_cpu_s)),
                    mean(ss.iter().map(|s| s.rss_bytes as f64)) / 1e6,
                    mean(ss.iter().map(|s| s.anon_bytes as f64)) / 1e6,
                    stall_cell(sys, mean(ss.iter().map(|s| s.stalls as f64)), "", 0),
                    stall_cell(sys, mean(ss.iter().map(|s| s.stall_s)), "", 2),
                    oci_done / d,
                    fmt2(nydus_done / d, "x"),
                    fmt2(d / limit, "x"),
                    fmt2(mean(ss.iter().map(|s| s.bytes as f64)) / read_bytes, "x"),
                )?;
            }
            if peers.nydus_not_run.is_some() {
                writeln!(
                    r,
                    "| {} | nydus | – | – | – | – | – | – | – | – | – | – | – | – | – | – |",
                    w.name
                )?;
            }
            if limit.is_finite() {
                writeln!(
                    r,
                    "| {} | *limit* |  |  | {limit:.2} | {:.1} |  |  |  |  |  |  | {:.2}x |  |  |  |",
                    w.name,
                    read_bytes / 1e6,
                    oci_done / limit
                )?;
            }
        }
    }
    match (&peers.nydus_not_run, &peers.nydus_version) {
        (Some(why), _) => writeln!(r, "\nNydus: not run: {why}.")?,
        (None, v) => writeln!(
            r,
            "\nNydus: {}: FUSE, one nydusd per image; images converted with `nydus-image create` (RAFS v6, 1 MiB chunks, zstd). `nydus`: the snapshotter's shipped nydusd config (1 MiB per miss, whole image prefetched in the background); `nydus-noprefetch`: no background prefetch.",
            v.as_deref().unwrap_or("version unknown")
        )?,
    }
    writeln!(
        r,
        "\nWarm starts (image local), OCI vs CORA (chunks cached; the transport's own cost): {}.",
        warm.iter()
            .map(|(k, s)| format!(
                "{} {} {s:.2}s vs {}",
                k.0,
                k.1,
                warm_cora.get(k).map_or("–".into(), |c| format!("{c:.2}s"))
            ))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        r,
        "\nlimit = warm start (OCI, image local) + bytes the start reads (the MB of the limit row) / bandwidth + one RTT. Bytes the start reads: what recording the workload's trace fetched (a device that fetches only what the kernel asks for: chunk-rounded, kernel read-ahead included); fetched/read compares each start's bytes over the link with them."
    )?;
    Ok(r)
}
