//! The guest kernels of the VM harness: Debian's 6.12 (installed on the host as a package) and
//! the newest Debian kernel (sid or trixie-backports, whichever is newer), downloaded and
//! extracted into `target/vm/kernels/` with `dpkg -x`, never installed.
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Suites searched for the newest `linux-image-amd64`.
const LATEST_SUITES: &[&str] = &["sid", "trixie-backports"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Debian 12's 6.12 (`linux-image-6.12-amd64`, installed on the host).
    #[value(name = "6.12")]
    V6_12,
    /// The newest Debian kernel, fetched once and cached.
    Latest,
}

/// A bootable kernel and its modules.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The release (`uname -r`).
    pub release: String,
    /// The bzImage.
    pub image: PathBuf,
    /// `.../lib/modules/<release>`, with modules.dep.
    pub modules: PathBuf,
}

pub fn find(which: Which) -> Result<Kernel> {
    match which {
        Which::V6_12 => installed_6_12(),
        Which::Latest => latest(),
    }
}

/// Highest installed Debian 6.12 generic kernel (the cloud flavour lacks 9p).
fn installed_6_12() -> Result<Kernel> {
    let mut found: Vec<(Vec<u64>, String)> = Vec::new();
    for entry in fs::read_dir("/boot").context("reading /boot")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(kver) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        if kver.starts_with("6.12.")
            && kver.ends_with("-amd64")
            && !kver.ends_with("cloud-amd64")
            && !kver.ends_with("rt-amd64")
            && Path::new("/lib/modules")
                .join(kver)
                .join("modules.dep")
                .exists()
        {
            found.push((version_key(kver), kver.to_string()));
        }
    }
    found.sort();
    let (_, release) = found.pop().context(
        "no /boot/vmlinuz-6.12.*-amd64 with modules; apt-get install linux-image-6.12-amd64",
    )?;
    Ok(Kernel {
        image: PathBuf::from("/boot").join(format!("vmlinuz-{release}")),
        modules: PathBuf::from("/lib/modules").join(&release),
        release,
    })
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest Debian kernel. Resolved once (the release is recorded in
/// `target/vm/kernels/latest`); delete that file to look for a newer one.
fn latest() -> Result<Kernel> {
    let dir = crate::vm::target_dir().join("vm/kernels");
    let record = dir.join("latest");
    if let Ok(release) = fs::read_to_string(&record)
        && let Some(k) = extracted(&dir, release.trim())
    {
        return Ok(k);
    }
    crate::deps::ensure(&["kmod"])?;
    let archive = crate::tools::Archive::open("kernels", LATEST_SUITES)?;
    // `madison` lists every suite's version; the default candidate would prefer sid over a
    // newer backport (backports are pinned low).
    let madison = archive.apt("apt-cache", &["madison", "linux-image-amd64"])?;
    let mut newest: Option<String> = None;
    for version in madison.lines().filter_map(|l| l.split('|').nth(1)) {
        let version = version.trim().to_string();
        if newest.as_ref().is_none_or(|n| dpkg_newer(&version, n)) {
            newest = Some(version);
        }
    }
    let version = newest.context("no linux-image-amd64 in sid or trixie-backports")?;
    let meta = format!("linux-image-amd64={version}");
    let depends = archive.apt("apt-cache", &["depends", &meta])?;
    let image_pkg = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .with_context(|| format!("{meta} depends on no linux-image-*-amd64:\n{depends}"))?;
    let release = image_pkg["linux-image-".len()..].to_string();
    // Newer kernel packages are split (linux-binary-*, linux-modules-*); older ones are one.
    let image_deps = archive.apt("apt-cache", &["depends", &format!("{image_pkg}={version}")])?;
    let mut packages = vec![format!("{image_pkg}={version}")];
    for dep in image_deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
    {
        let dep = dep.split_whitespace().next().unwrap_or(dep);
        if dep == format!("linux-binary-{release}") || dep == format!("linux-modules-{release}") {
            packages.push(format!("{dep}={version}"));
        }
    }
    eprintln!("xtask: fetching kernel {release} ({version}): {packages:?}");
    let debs = archive.download(&packages)?;
    let tree = dir.join(&release);
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("clearing {}", tree.display()))?;
    }
    fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
    for deb in &debs {
        crate::deps::run(
            "dpkg",
            &["-x", &deb.to_string_lossy(), &tree.to_string_lossy()],
        )?;
    }
    // depmod -b wants BASE/lib/modules; merged-/usr packages ship usr/lib/modules.
    if !tree.join("lib").exists() {
        std::os::unix::fs::symlink("usr/lib", tree.join("lib")).context("linking lib")?;
    }
    crate::deps::run("depmod", &["-b", &tree.to_string_lossy(), &release])?;
    let kernel = extracted(&dir, &release)
        .with_context(|| format!("{} holds no kernel image and modules", tree.display()))?;
    fs::write(&record, &release).context("recording the latest kernel")?;
    Ok(kernel)
}

/// The kernel extracted under `dir/release`, if it is complete.
fn extracted(dir: &Path, release: &str) -> Option<Kernel> {
    let tree = dir.join(release);
    let modules = tree.join("lib/modules").join(release);
    let image = [
        tree.join("boot").join(format!("vmlinuz-{release}")),
        modules.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())?;
    modules.join("modules.dep").is_file().then(|| Kernel {
        release: release.to_string(),
        image,
        modules,
    })
}

/// `dpkg --compare-versions a gt b`.
fn dpkg_newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}
