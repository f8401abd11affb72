//! `cargo xtask bench dedup|convert|lazy|fio|fuse|coldstart|coldstart-vm|report|all`: run the measurements, each writing
//! `<bench>.json` into `$CORA_BENCH_OUT` (default `bench/results/latest`), and compose them.
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::Command;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// The seed's dedup experiment on synthetic data, and real images v1/v2/v2b.
    Dedup,
    /// Conversion speed, memory and size on a real Debian tree.
    Convert,
    /// The lazy read path against docker-registry on loopback.
    Lazy,
    /// fio on a CORA image device (cold and cached) vs kernel loop, rublk loop and rublk null,
    /// in one VM boot; writes fio.json and fio.md.
    Fio(crate::fio_bench::FioBenchOpts),
    /// The FUSE transport natively on this host: fio and tree reads through FUSE vs the same
    /// image as a plain file and a loop device; writes fuse.json and fuse.md.
    Fuse(crate::fio_bench::FuseBenchOpts),
    /// Cold start natively on this host through containerd, FUSE transport: OCI and CORA
    /// variants side by side over shaped links (lan, wan) on Debian, Python, Node and large
    /// images; writes coldstart-host.{md,csv,json}.
    Coldstart,
    /// Cold start CORA vs OCI through containerd in the VM, ublk (tests/vm/40-containerd.sh
    /// writes coldstart.csv and coldstart_usage.csv when CORA_BENCH_OUT is set).
    ColdstartVm,
    /// Compose REPORT.md and PNG charts from the results found in the output directory.
    Report,
    /// dedup, convert, lazy, fio, coldstart-vm, coldstart, then the report (a failed bench is
    /// reported, not fatal).
    All,
}

/// `$CORA_BENCH_OUT` made absolute (benches run with another working directory), or the
/// default under the repository.
pub fn out_dir() -> Result<PathBuf> {
    let repo = crate::vm::repo_root();
    let dir = match std::env::var_os("CORA_BENCH_OUT") {
        Some(d) if !d.is_empty() => std::env::current_dir()?.join(d),
        _ => repo.join("bench/results/latest"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    let out = out_dir()?;
    match cmd {
        BenchCmd::Dedup => cargo_bench("dedup", &out),
        BenchCmd::Convert => {
            // The peer column (nydus-image) and `cora convert` as child processes, measured
            // by GNU time.
            crate::deps::ensure(&["time"])?;
            crate::deps::run("cargo", &["build", "--release", "--workspace", "--bins"])?;
            let mut bench = Command::new("cargo");
            with_nydus(&mut bench);
            cargo_bench_with(bench, "convert", &out)
        }
        BenchCmd::Lazy => {
            // The lazy bench runs the `cora` CLI next to it: build the binaries first.
            crate::deps::ensure(crate::deps::TEST_PACKAGES)?;
            build_driver_bins()?;
            cargo_bench("lazy", &out)
        }
        BenchCmd::Fio(opts) => crate::fio_bench::run(&opts),
        BenchCmd::Fuse(opts) => crate::fio_bench::run_fuse(&opts),
        BenchCmd::Coldstart => {
            crate::deps::ensure(crate::deps::TEST_PACKAGES)?;
            crate::deps::ensure_commands(crate::deps::BENCH_COMMANDS)?;
            crate::deps::run("cargo", &["build", "--release", "--workspace", "--bins"])?;
            eprintln!(
                "xtask: cargo bench -p cora-snapshotter --bench coldstart (results into {})",
                out.display()
            );
            let mut bench = Command::new("cargo");
            bench
                .args(["bench", "-p", "cora-snapshotter", "--bench", "coldstart"])
                .env("CORA_BENCH_OUT", &out);
            let st = with_nydus(&mut bench)
                .status()
                .context("running cargo bench")?;
            if !st.success() {
                bail!("bench coldstart failed: {st}");
            }
            Ok(())
        }
        BenchCmd::ColdstartVm => coldstart_vm(&out),
        BenchCmd::Report => report(&out),
        BenchCmd::All => all(&out),
    }
}

/// Points the cold-start bench at Nydus (`CORA_NYDUS_BIN`), installing it first; when that
/// fails the bench still runs and its report says why (`CORA_NYDUS_UNAVAILABLE`).
pub fn with_nydus(bench: &mut Command) -> &mut Command {
    match crate::tools::ensure_nydus() {
        Ok((bin, versions)) => bench
            .env("CORA_NYDUS_BIN", bin)
            .env("CORA_NYDUS_VERSION", versions),
        Err(e) => {
            eprintln!("xtask: Nydus not available, its column stays empty: {e:#}");
            bench.env("CORA_NYDUS_UNAVAILABLE", format!("{e:#}"))
        }
    }
}

/// `cora-driver` and `cora` in release mode, as the benches run them.
pub fn build_driver_bins() -> Result<()> {
    crate::deps::run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "cora-driver",
            "-p",
            "cora-cli",
            "--bins",
        ],
    )
}

fn cargo_bench(name: &str, out: &std::path::Path) -> Result<()> {
    cargo_bench_with(Command::new("cargo"), name, out)
}

/// `cargo bench -p cora-tests --bench NAME` through `cargo` (a `Command` with its env set).
fn cargo_bench_with(mut cargo: Command, name: &str, out: &std::path::Path) -> Result<()> {
    eprintln!(
        "xtask: cargo bench -p cora-tests --bench {name} (results into {})",
        out.display()
    );
    let st = cargo
        .args(["bench", "-p", "cora-tests", "--bench", name])
        .env("CORA_BENCH_OUT", out)
        .status()
        .context("running cargo bench")?;
    if !st.success() {
        bail!("bench {name} failed: {st}");
    }
    Ok(())
}

fn report(out: &std::path::Path) -> Result<()> {
    let host = crate::report::host_stamp(&crate::vm::repo_root());
    let path = crate::report::compose(out, &host)?;
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

const COLDSTART_SCRIPT: &str = "tests/vm/40-containerd.sh";

fn coldstart_vm(out: &std::path::Path) -> Result<()> {
    let repo = crate::vm::repo_root();
    if !repo.join(COLDSTART_SCRIPT).exists() {
        bail!("{COLDSTART_SCRIPT} is missing from this checkout");
    }
    if !out.starts_with(&repo) {
        // The guest sees the repository through its share, not arbitrary host paths.
        bail!(
            "CORA_BENCH_OUT must lie inside {} for the VM to write it",
            repo.display()
        );
    }
    crate::deps::run("cargo", &["build", "--release", "--bins"])?;
    let exe = std::env::current_exe().context("locating xtask")?;
    // CORA_* variables pass into the guest, so the script sees where to write its CSVs.
    let st = Command::new(exe)
        .args(["vm-test", "40"])
        .env("CORA_BENCH_OUT", out)
        .status()
        .context("running xtask vm-test 40")?;
    if !st.success() {
        bail!("cold-start VM test failed: {st}");
    }
    for f in ["coldstart.csv", "coldstart_usage.csv"] {
        if !out.join(f).exists() {
            bail!("the VM test passed but wrote no {}", out.join(f).display());
        }
    }
    Ok(())
}

fn all(out: &std::path::Path) -> Result<()> {
    let mut failed = Vec::new();
    for (name, cmd) in [
        ("dedup", BenchCmd::Dedup),
        ("convert", BenchCmd::Convert),
        ("lazy", BenchCmd::Lazy),
    ] {
        if let Err(e) = run(cmd) {
            eprintln!("xtask: bench {name} failed: {e:#}");
            failed.push(name);
        }
    }
    let exe = std::env::current_exe().context("locating xtask")?;
    // Each boots its own VM; run as children so one failing does not stop the report.
    for name in ["fio", "coldstart-vm", "coldstart"] {
        let st = Command::new(&exe)
            .args(["bench", name])
            .env("CORA_BENCH_OUT", out)
            .status()
            .with_context(|| format!("running xtask bench {name}"))?;
        if !st.success() {
            eprintln!("xtask: bench {name} failed: {st}");
            failed.push(name);
        }
    }
    // The report shows whatever was measured, and names what is missing.
    report(out)?;
    if !failed.is_empty() {
        bail!("benches failed: {}", failed.join(", "));
    }
    Ok(())
}
