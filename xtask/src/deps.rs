//! System packages: installed with apt-get when we are root, otherwise we print the exact line.
use anyhow::{Context, Result, bail};
use std::process::Command;

/// Everything the README test command needs on a fresh Debian/Ubuntu machine.
pub const TEST_PACKAGES: &[&str] = &[
    "zstd",
    "e2fsprogs",
    "erofs-utils",
    "docker-registry",
    "skopeo",
    "umoci",
    "apache2-utils",
    "openssl",
    "curl",
    "libclang-dev",
    "clang",
    "fio",
    "jq",
    "containerd",
    "runc",
    "busybox-static",
    // containerd's snapshotter conformance suite (snapshotter/tests/conformance.rs): Go
    // source built in GOPATH mode.
    "golang-go",
    "golang-github-containerd-containerd-dev",
    // Chart text in `xtask bench report` (see report::FONT_FILE).
    "fonts-dejavu-core",
];

/// What `cargo xtask bench coldstart` needs beyond the tests (it builds its images from PyPI
/// wheels and npm packages): a command, and the package to install when it is not on PATH
/// (a machine may have them from elsewhere, e.g. npm from a nodejs build that conflicts with
/// Debian's npm).
pub const BENCH_COMMANDS: &[(&str, &str)] =
    &[("unzip", "unzip"), ("pip", "python3-pip"), ("npm", "npm")];

/// Installs the package of each command that is not on PATH.
pub fn ensure_commands(cmds: &[(&str, &str)]) -> Result<()> {
    let on_path = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c} >/dev/null")])
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = cmds
        .iter()
        .filter(|(c, _)| !on_path(c))
        .map(|(_, p)| *p)
        .collect();
    ensure(&missing)
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn ensure(pkgs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let line = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    // SAFETY-free check of the effective uid: `id -u` avoids a libc dependency here.
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "missing packages: {}\nrun as root: {line}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let status = Command::new("sh")
        .arg("-c")
        .arg(&line)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get failed ({status}); the command was: {line}");
    }
    Ok(())
}

pub fn run(prog: &str, args: &[&str]) -> Result<()> {
    eprintln!("xtask: {prog} {}", args.join(" "));
    let status = Command::new(prog)
        .args(args)
        .status()
        .with_context(|| format!("starting {prog}"))?;
    if !status.success() {
        bail!("{prog} {} failed: {status}", args.join(" "));
    }
    Ok(())
}
