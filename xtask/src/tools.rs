//! Host-built tools the guest uses, installed into `target/tools/` (on the guest's PATH).
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::process::Command;

/// rublk: a ublk server CLI (`rublk features`, `rublk list`) from the ublk-org project.
pub const RUBLK_VERSION: &str = "0.2.15";

pub fn root() -> PathBuf {
    crate::vm::repo_root().join("target/tools")
}

pub fn bin_dir() -> PathBuf {
    root().join("bin")
}

/// Installs the pinned rublk into `target/tools/bin` unless that exact version is there.
pub fn ensure_rublk() -> Result<PathBuf> {
    let bin = bin_dir().join("rublk");
    let stamp = root().join(format!(".rublk-{RUBLK_VERSION}"));
    if bin.exists() && stamp.exists() {
        return Ok(bin);
    }
    // libublk's build script runs bindgen, which needs libclang.
    crate::deps::ensure(&["libclang-dev", "clang"])?;
    let root = root();
    eprintln!(
        "xtask: installing rublk {RUBLK_VERSION} into {}",
        root.display()
    );
    // Default features pull in OpenCL (vram target); the harness needs none of it.
    let status = Command::new("cargo")
        .args(["install", "rublk", "--locked", "--no-default-features"])
        .args(["--version", RUBLK_VERSION, "--root"])
        .arg(&root)
        .status()
        .context("running cargo install rublk")?;
    if !status.success() {
        bail!("cargo install rublk {RUBLK_VERSION} failed: {status}");
    }
    std::fs::write(&stamp, "").context("writing rublk stamp")?;
    Ok(bin)
}
