//! Developer tasks: `cargo xtask test`, `cargo xtask vm -- CMD`, `cargo xtask demo`, benches.
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

mod benches;
mod deps;
mod fio_bench;
mod initramfs;
mod install;
mod kernels;
mod report;
mod tools;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "CORA developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests need, then run every test (the README's test command); the
    /// guest tests run on both VM kernels.
    Test,
    /// Install the Debian packages the project needs (apt-get when root).
    Deps,
    /// Run CMD (joined with spaces, run by `sh -c`) in a QEMU guest with a ublk kernel, in the
    /// current directory; exits with CMD's exit status.
    Vm {
        #[command(flatten)]
        opts: vm::VmOpts,
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Run tests/vm/*.sh (those whose name contains FILTER) in one VM boot.
    VmTest {
        filter: Option<String>,
        #[command(flatten)]
        opts: vm::VmOpts,
    },
    /// Install the pinned rublk into target/tools/bin (the guest's PATH) and extract Debian
    /// sid's containerd 2.x into target/tools/containerd2.
    Tools,
    /// The main job: images built from Debian packages, PyPI and npm (Debian base, Python data
    /// stack, Node app), pushed to a local registry as plain OCI and converted to CORA, then
    /// cold-started through containerd on this host both ways (ctr pull vs cora rpull, CORA
    /// served through FUSE) over shaped links (lan, wan); one table.
    Demo {
        /// Also the ublk demo in the VM (two Debian images, cold-started by containerd on a
        /// ublk kernel under TCG): a second table.
        #[arg(long)]
        vm: bool,
    },
    /// Build and install the binaries, the snapshotter's systemd unit, a default config
    /// (kept if one exists) and the docs under ROOT/PREFIX; listed for uninstall.
    Install {
        #[command(flatten)]
        opts: install::InstallOpts,
    },
    /// Remove what install wrote (a config changed since stays, unless --purge).
    Uninstall {
        #[command(flatten)]
        opts: install::InstallOpts,
        #[arg(long)]
        purge: bool,
    },
    /// Benchmarks and the report: results into $CORA_BENCH_OUT (default bench/results/latest).
    Bench {
        #[command(subcommand)]
        which: benches::BenchCmd,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Deps => deps::ensure(deps::TEST_PACKAGES),
        Cmd::Test => test(),
        Cmd::Vm { opts, cmd } => {
            let code = vm::run(&opts, &cmd)?;
            std::process::exit(code);
        }
        Cmd::VmTest { filter, opts } => vm_test(&opts, filter.as_deref()),
        Cmd::Tools => {
            tools::ensure_rublk()?;
            tools::ensure_containerd2().map(drop)
        }
        Cmd::Demo { vm } => demo(vm),
        Cmd::Bench { which } => benches::run(which),
        Cmd::Install { opts } => {
            let mut args = vec!["build", "--release"];
            for b in ["cora-cli", "cora-driver", "cora-snapshotter"] {
                args.extend(["-p", b]);
            }
            deps::run("cargo", &args)?;
            install::install(&vm::repo_root().join("target/release"), &opts)
        }
        Cmd::Uninstall { opts, purge } => install::uninstall(&opts, purge),
    }
}

fn test() -> Result<()> {
    deps::ensure(deps::TEST_PACKAGES)?;
    deps::run("cargo", &["fmt", "--all", "--", "--check"])?;
    deps::run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // containerd 2.x beside bookworm's 1.6, for the tests that run both.
    tools::ensure_containerd2()?;
    // Integration tests run the binaries; build them with the same profile first.
    deps::run("cargo", &["build", "--workspace", "--release", "--bins"])?;
    deps::run("cargo", &["test", "--workspace", "--release"])?;
    // The format's parsers once more with overflow checks (debug build): an arithmetic
    // overflow on hostile input must be an error, and release builds would wrap silently.
    // `fuzz_parsers` mutates the committed corpus (blobfmt/fuzz/corpus) for a bounded number
    // of cases per parser (CORA_FUZZ_CASES).
    deps::run(
        "cargo",
        &[
            "test",
            "-p",
            "blobfmt",
            "--lib",
            "--test",
            "format_props",
            "--test",
            "fuzz_parsers",
        ],
    )?;
    // Every guest test on both kernels: Debian 12's 6.12 (user copy) and the newest Debian
    // kernel (auto buffer registration, the other data path).
    for kernel in [kernels::Which::V6_12, kernels::Which::Latest] {
        eprintln!("xtask: guest tests on kernel {kernel:?}");
        vm_test(
            &vm::VmOpts {
                kernel,
                ..vm::VmOpts::default()
            },
            None,
        )?;
    }
    Ok(())
}

/// How long one guest test script may run before the guest runner kills it and fails it. The
/// slowest (41-containerd2) takes 500-600 s under TCG on these machines; a per-script limit
/// names the script that hung instead of the VM deadline killing the whole suite.
const SCRIPT_TIMEOUT_SECS: u64 = 1200;
/// Boot, host preps aside, and the runner's own work: on top of the scripts' budgets.
const VM_TEST_OVERHEAD_SECS: u64 = 300;

/// One boot runs every guest test script, then exits with a fixed nonzero status: seeing that
/// status and the scripts' output file on the host proves exit codes and rw shares work.
fn vm_test(opts: &vm::VmOpts, filter: Option<&str>) -> Result<()> {
    const PROBE_STATUS: i32 = 3;
    let repo = vm::repo_root();
    let tests = repo.join("tests/vm");
    let filter_s = filter.unwrap_or("");
    let scripts = guest_test_files(&tests, "sh", filter_s)?.len() as u64;
    let mut opts = opts.clone();
    opts.timeout
        .get_or_insert(scripts * SCRIPT_TIMEOUT_SECS + VM_TEST_OVERHEAD_SECS);
    tools::ensure_rublk()?;
    let out = repo.join("target/vm/test-out");
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for prep in guest_test_files(&tests, "prep", filter_s)? {
        deps::run("sh", &[&prep.to_string_lossy()])?;
    }
    let runner = repo.join("xtask/src/vm/run-tests.sh");
    let q = |p: &Path| vm::shell_quote(&p.display().to_string());
    let cmd = format!(
        "CORA_VM_TEST_OUT={out} CORA_VM_TEST_SCRIPT_TIMEOUT={SCRIPT_TIMEOUT_SECS} sh {runner} {tests} {filter}; echo $? >{out}/suite-status; exit {PROBE_STATUS}",
        out = q(&out),
        runner = q(&runner),
        tests = q(&tests),
        filter = vm::shell_quote(filter_s),
    );
    let code = vm::run(&opts, &[cmd])?;
    let suite = std::fs::read_to_string(out.join("suite-status"))
        .context("guest's suite-status is not visible on the host (rw share broken?)")?;
    if code != PROBE_STATUS {
        bail!(
            "VM returned exit status {code}, expected {PROBE_STATUS}: statuses are not propagated"
        );
    }
    if suite.trim() != "0" {
        bail!("VM tests failed (runner exit status {})", suite.trim());
    }
    eprintln!("xtask: vm-test passed (exit status and rw share verified)");
    Ok(())
}

/// The files `tests/vm/*.EXT` whose name contains `filter`, in name order (the order the
/// runner takes the scripts in): `sh`, the guest test scripts; `prep`, work a guest test
/// needs that is much faster native than under TCG (e.g. building images), run on the host.
fn guest_test_files(dir: &Path, ext: &str, filter: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(filter))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn demo(with_vm: bool) -> Result<()> {
    deps::ensure(deps::TEST_PACKAGES)?;
    deps::ensure_commands(deps::BENCH_COMMANDS)?;
    deps::run("cargo", &["build", "--workspace", "--release", "--bins"])?;
    let repo = vm::repo_root();
    // The host table: the cold-start bench on three of its workloads, one round, the default
    // CORA and CORA with a stored trace beside OCI.
    let out = repo.join("target/demo/host");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut bench = std::process::Command::new("cargo");
    let st = benches::with_nydus(&mut bench)
        .args(["bench", "-p", "cora-snapshotter", "--bench", "coldstart"])
        .env("CORA_BENCH_OUT", &out)
        .env("CORA_BENCH_WORKLOADS", "base,python,node")
        .env("CORA_BENCH_PROFILES", "lan,wan")
        .env("CORA_BENCH_CORA", "cora")
        .env("CORA_BENCH_ROUNDS", "1")
        .status()
        .context("running the cold-start bench")?;
    if !st.success() {
        bail!("the demo's cold starts failed ({st})");
    }
    eprintln!(
        "xtask: demo table in {}",
        out.join("coldstart-host.md").display()
    );
    if !with_vm {
        return Ok(());
    }
    let repo_s = repo.to_string_lossy().into_owned();
    let script = |name: &str| {
        repo.join("xtask/src/demo")
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    deps::run("sh", &[&script("prepare.sh"), &repo_s])?;
    let guest = vec!["sh".to_string(), script("guest.sh"), repo_s];
    let code = vm::run(&vm::VmOpts::default(), &guest)?;
    if code != 0 {
        bail!("the demo failed in the VM (exit status {code})");
    }
    Ok(())
}
