//! Real trees from Debian packages (not toys), cached between runs under
//! `target/cora-fixtures/`: `.deb`s from `apt-get download`, extracted with `dpkg-deb -x`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Debian base: libc, coreutils, shells and common libraries (~100 MB unpacked).
pub const BASE: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "libstdc++6",
    "coreutils",
    "bash",
    "dash",
    "busybox-static",
    "grep",
    "sed",
    "tar",
    "gzip",
    "findutils",
    "diffutils",
    "util-linux",
    "zlib1g",
    "libzstd1",
    "liblzma5",
    "libbz2-1.0",
    "libacl1",
    "libattr1",
    "libselinux1",
    "libpcre2-8-0",
    "libtinfo6",
    "libcrypt1",
    "perl-base",
    "debianutils",
    "libsqlite3-0",
    "libssl3=3.0.20-1~deb12u2",
    "openssl=3.0.20-1~deb12u2",
    "libgnutls30",
    "libp11-kit0",
    "libgmp10",
    "libnettle8",
    "libhogweed6",
    "libunistring2",
    "libidn2-0",
    "libtasn1-6",
    "libsystemd0",
    "libudev1",
    "libcap2",
    "libblkid1",
    "libmount1",
    "libsmartcols1",
    "libuuid1",
    "ncurses-base",
    "libncursesw6",
    "libreadline8",
    "readline-common",
    "libdb5.3",
    "libgdbm6",
    "libexpat1",
    "libffi8",
    "libmpfr6",
];

/// A small but real tree for functional tests (~25 MB unpacked).
pub const SMALL: &[&str] = &[
    "busybox-static",
    "libc6",
    "zlib1g",
    "libzstd1",
    "libssl3=3.0.20-1~deb12u2",
];

/// An application layer over BASE: Python 3.11.
pub const PYTHON: &[&str] = &[
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11",
    "media-types",
];

/// BASE rebuilt with one library at another version (bookworm vs bookworm-security).
pub fn base_updated() -> Vec<&'static str> {
    BASE.iter()
        .map(|p| match *p {
            "libssl3=3.0.20-1~deb12u2" => "libssl3=3.0.22-1~deb12u2",
            "openssl=3.0.20-1~deb12u2" => "openssl=3.0.22-1~deb12u2",
            other => other,
        })
        .collect()
}

/// The named trees the tests, benches and VM preps share, by name.
pub fn named_tree(name: &str) -> Result<PathBuf> {
    match name {
        "small" => debian_tree(name, SMALL),
        "base" => debian_tree(name, BASE),
        "python-layer" => debian_tree(name, PYTHON),
        "base-ssl-updated" => debian_tree(name, &base_updated()),
        _ => bail!("no fixture tree named {name:?} (small, base, python-layer, base-ssl-updated)"),
    }
}

pub fn fixtures_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("cora-fixtures")
}

/// Download (once) the given packages (`name` or `name=version`) into the shared .deb cache.
pub fn download(packages: &[&str]) -> Result<Vec<PathBuf>> {
    let debs = fixtures_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for p in packages {
        match find_deb(&debs, p)? {
            Some(d) => out.push(d),
            None => missing.push(*p),
        }
    }
    if !missing.is_empty() {
        let st = Command::new("apt-get")
            .arg("download")
            .args(&missing)
            .current_dir(&debs)
            .status()
            .context("running apt-get download")?;
        if !st.success() {
            bail!(
                "apt-get download {} failed (run apt-get update?)",
                missing.join(" ")
            );
        }
        for p in missing {
            out.push(find_deb(&debs, p)?.with_context(|| format!("{p}: no .deb after download"))?);
        }
    }
    Ok(out)
}

fn find_deb(dir: &Path, spec: &str) -> Result<Option<PathBuf>> {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v.replace(':', "%3a"))),
        None => (spec, None),
    };
    let prefix = format!("{name}_");
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let f = p.file_name().and_then(|f| f.to_str()).unwrap_or("");
        if f.starts_with(&prefix)
            && f.ends_with(".deb")
            && version
                .as_ref()
                .is_none_or(|v| f[prefix.len()..].starts_with(v.as_str()))
        {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// A tree holding the given packages extracted, built once and reused (name it by content).
/// Tests run in parallel threads: one builds while the others wait, and the tree appears
/// under its name only when complete (built in a temporary dir, then renamed).
pub fn debian_tree(name: &str, packages: &[&str]) -> Result<PathBuf> {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let trees = fixtures_dir().join("trees");
    let root = trees.join(name);
    let done = root.with_extension("done");
    if done.exists() && root.exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(&trees)?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .tempdir_in(&trees)?;
    for deb in download(packages)? {
        let st = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(tmp.path())
            .status()
            .context("running dpkg-deb")?;
        if !st.success() {
            bail!("dpkg-deb -x {} failed", deb.display());
        }
    }
    // The dirs a container runtime expects.
    for d in ["proc", "sys", "dev", "tmp", "etc", "root", "run"] {
        std::fs::create_dir_all(tmp.path().join(d))?;
    }
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::rename(tmp.keep(), &root)?;
    std::fs::write(&done, name)?;
    Ok(root)
}

/// Total bytes of regular files under `dir`.
pub fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.path().symlink_metadata()?;
        if m.is_dir() {
            total += tree_bytes(&e.path())?;
        } else if m.is_file() {
            total += m.len();
        }
    }
    Ok(total)
}

/// The `cora` binary built beside the running test (`cargo build --release --bins` first;
/// `cargo xtask test` does).
pub fn cora_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release --bins` before the tests",
        bin.display()
    );
    bin
}

/// Run a command, failing with its stderr when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// path -> (kind, mode, uid, gid, sha256 of content or link target) of every entry.
pub fn tree_manifest(root: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    use sha2::Digest as _;
    use std::os::unix::fs::MetadataExt;
    let mut out = std::collections::BTreeMap::new();
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            let m = p.symlink_metadata()?;
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            let what = if m.file_type().is_symlink() {
                format!("l {}", std::fs::read_link(&p)?.display())
            } else if m.is_dir() {
                walk(root, &p, out)?;
                "d".to_string()
            } else {
                format!(
                    "f {}",
                    hex::encode(sha2::Sha256::digest(std::fs::read(&p)?))
                )
            };
            out.insert(
                rel,
                format!("{what} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()),
            );
        }
        Ok(())
    }
    walk(root, root, &mut out)?;
    Ok(out)
}
