//! Host-built tools the guest uses and peers the benches run, installed into `target/tools/`
//! (`bin/` is on the guest's PATH). Nothing here touches the host's own packages.
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

/// Nydus's daemon and builder: crates.io `nydus-rs`. 2.2.0 builds only with its own lock file.
pub const NYDUS_RS_VERSION: &str = "2.2.0";

/// Installs `nydusd` and `nydus-image` (crates.io `nydus-rs`) and containerd's
/// `containerd-nydus-grpc` (Debian sid's `nydus-snapshotter`, extracted, never installed) into
/// `target/tools/bin`. Returns that directory and the versions installed.
pub fn ensure_nydus() -> Result<(PathBuf, String)> {
    let bin = bin_dir();
    let stamp = root().join(format!(".nydus-rs-{NYDUS_RS_VERSION}"));
    if !(stamp.exists() && bin.join("nydusd").exists() && bin.join("nydus-image").exists()) {
        // Its build compiles C dependencies with cmake.
        crate::deps::ensure(&["cmake"])?;
        eprintln!(
            "xtask: installing nydus-rs {NYDUS_RS_VERSION} into {}",
            root().display()
        );
        let status = Command::new("cargo")
            .args(["install", "nydus-rs", "--locked"])
            .args(["--version", NYDUS_RS_VERSION, "--root"])
            .arg(root())
            .status()
            .context("running cargo install nydus-rs")?;
        if !status.success() {
            bail!("cargo install nydus-rs {NYDUS_RS_VERSION} failed: {status}");
        }
        std::fs::write(&stamp, "").context("writing nydus-rs stamp")?;
    }
    let grpc = bin.join("containerd-nydus-grpc");
    let deb_stamp = root().join(".nydus-snapshotter");
    if !(grpc.exists() && deb_stamp.exists()) {
        let deb = sid_download("nydus-snapshotter")?;
        let tree = root().join("nydus-snapshotter");
        crate::deps::run(
            "dpkg",
            &["-x", &deb.to_string_lossy(), &tree.to_string_lossy()],
        )?;
        std::fs::copy(tree.join("usr/bin/containerd-nydus-grpc"), &grpc)
            .context("copying containerd-nydus-grpc")?;
        // nydus-snapshotter_VERSION_amd64.deb
        let name = deb.file_name().unwrap_or_default().to_string_lossy();
        let version = name.split('_').nth(1).unwrap_or("unknown");
        std::fs::write(&deb_stamp, version).context("writing nydus-snapshotter stamp")?;
    }
    let snapshotter = std::fs::read_to_string(&deb_stamp).unwrap_or_default();
    Ok((
        bin,
        format!("nydus-rs {NYDUS_RS_VERSION}, nydus-snapshotter {snapshotter} (Debian sid)"),
    ))
}

/// Extracts Debian sid's `containerd` (2.x: containerd, ctr, the runc shim) into
/// `target/tools/containerd2` (`dpkg -x`, never installed: the host keeps bookworm's 1.6),
/// for the tests that run both. Returns its `usr/bin`.
pub fn ensure_containerd2() -> Result<PathBuf> {
    let tree = root().join("containerd2");
    let bin = tree.join("usr/bin");
    let stamp = root().join(".containerd2");
    if bin.join("containerd").exists() && stamp.exists() {
        return Ok(bin);
    }
    let deb = sid_download("containerd")?;
    if tree.exists() {
        std::fs::remove_dir_all(&tree).with_context(|| format!("clearing {}", tree.display()))?;
    }
    crate::deps::run(
        "dpkg",
        &["-x", &deb.to_string_lossy(), &tree.to_string_lossy()],
    )?;
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    std::fs::write(&stamp, name.split('_').nth(1).unwrap_or("unknown"))
        .context("writing the containerd2 stamp")?;
    Ok(bin)
}

/// Downloads `package`'s .deb from Debian sid into `target/tools/sid`.
fn sid_download(package: &str) -> Result<PathBuf> {
    let sid = Archive::open("sid", &["sid"])?;
    let mut debs = sid.download(&[package.to_string()])?;
    debs.pop()
        .with_context(|| format!("no {package} .deb after apt-get download"))
}

/// A private apt state (sources, lists, cache) for Debian suites other than the host's, under
/// `target/tools/<name>`: packages are downloaded from it and extracted with `dpkg -x`, never
/// installed, so the host's apt state and packages stay bookworm's.
pub struct Archive {
    dir: PathBuf,
}

impl Archive {
    /// Writes the sources for `suites` (main, the Debian archive key) and runs `apt-get update`.
    pub fn open(name: &str, suites: &[&str]) -> Result<Archive> {
        let dir = root().join(name);
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources: String = suites
            .iter()
            .map(|s| {
                format!(
                    "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {s} main\n"
                )
            })
            .collect();
        std::fs::write(dir.join("sources.list"), sources).context("writing sources.list")?;
        let archive = Archive { dir };
        archive.apt("apt-get", &["update"])?;
        Ok(archive)
    }

    /// Runs an apt tool against this archive's state; returns its standard output.
    pub fn apt(&self, tool: &str, args: &[&str]) -> Result<String> {
        let opt = |k: &str, sub: &str| format!("{k}={}", self.dir.join(sub).display());
        let out = Command::new(tool)
            .args(["-q", "-o"])
            .arg(opt("Dir::Etc::sourcelist", "sources.list"))
            .args(["-o", "Dir::Etc::sourceparts=-", "-o"])
            .arg(opt("Dir::State::Lists", "lists"))
            .arg("-o")
            .arg(opt("Dir::Cache", "cache"))
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args)
            .current_dir(self.dir.join("debs"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} ({}) failed: {}",
                args.join(" "),
                self.dir.display(),
                out.status
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads each `package` (a name, or `name=version`); returns their .deb files.
    pub fn download(&self, packages: &[String]) -> Result<Vec<PathBuf>> {
        let mut args = vec!["download"];
        args.extend(packages.iter().map(String::as_str));
        self.apt("apt-get", &args)?;
        let debs = self.dir.join("debs");
        let mut found = Vec::new();
        for package in packages {
            let name = package.split('=').next().unwrap_or(package);
            let prefix = format!("{name}_");
            let deb = std::fs::read_dir(&debs)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f.starts_with(&prefix) && f.ends_with(".deb"))
                })
                .max()
                .with_context(|| format!("no {name} .deb after apt-get download"))?;
            found.push(deb);
        }
        Ok(found)
    }
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
