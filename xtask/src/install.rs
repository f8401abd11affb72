//! `cargo xtask install|uninstall`: the binaries, the snapshotter's systemd unit, a default
//! config and the docs, under a prefix inside a root (a staging directory for packagers, `/`
//! for a host). What an install writes is listed in `PREFIX/share/cora/installed`, which
//! uninstall reads: it removes exactly that, and the directories install created.
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const BINARIES: [&str; 3] = ["cora", "cora-driver", "cora-snapshotter"];
const UNIT: &str = "etc/systemd/system/cora-snapshotter.service";
const CONFIG: &str = "etc/cora/snapshotter.json";
/// Manifest lines: `dir PATH` (created by install), `file PATH`, `config PATH SHA256` (removed
/// on uninstall only while unchanged, or with `--purge`). Paths are relative to the root.
const MANIFEST: &str = "share/cora/installed";

#[derive(clap::Args, Clone, Debug)]
pub struct InstallOpts {
    /// Directory everything goes under (a packaging staging tree, or / for this host).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Prefix for binaries and docs, inside the root.
    #[arg(long, default_value = "/usr/local")]
    pub prefix: PathBuf,
}

/// Installs the release binaries in `bins` (built by the caller).
pub fn install(bins: &Path, opts: &InstallOpts) -> Result<()> {
    let prefix = rel(&opts.prefix)?;
    let root = &opts.root;
    let manifest_path = root.join(&prefix).join(MANIFEST);
    if manifest_path.exists() {
        // A reinstall (an upgrade): the earlier one's files go first, except a changed config.
        uninstall(opts, false)?;
    }
    let mut lines = Vec::new();
    let mut put = |path: &Path, bytes: &[u8], mode: u32, kind: &str| -> Result<()> {
        let full = root.join(path);
        if let Some(parent) = path.parent() {
            create_dirs(root, parent, &mut lines)?;
        }
        write_file(&full, bytes, mode)?;
        lines.push(match kind {
            "config" => format!("config {} {}", path.display(), sha256_hex(bytes)),
            _ => format!("file {}", path.display()),
        });
        Ok(())
    };
    let bin_dir = prefix.join("bin");
    for b in BINARIES {
        let src = bins.join(b);
        let bytes = std::fs::read(&src)
            .with_context(|| format!("reading {} (build the release binaries)", src.display()))?;
        put(&bin_dir.join(b), &bytes, 0o755, "file")?;
    }
    let abs_bin = Path::new("/").join(&bin_dir);
    put(
        Path::new(UNIT),
        unit_text(&abs_bin)?.as_bytes(),
        0o644,
        "file",
    )?;
    // An existing config is the admin's: never overwritten, never removed.
    if !root.join(CONFIG).exists() {
        put(
            Path::new(CONFIG),
            &default_config(&abs_bin)?,
            0o644,
            "config",
        )?;
    }
    let repo = crate::vm::repo_root();
    let doc = prefix.join("share/doc/cora");
    for (src, dst) in [
        ("README.md", "README.md"),
        ("snapshotter/README.md", "snapshotter/README.md"),
        (
            "snapshotter/config.example.json",
            "snapshotter/config.example.json",
        ),
    ] {
        let bytes = std::fs::read(repo.join(src)).with_context(|| format!("reading {src}"))?;
        put(&doc.join(dst), &bytes, 0o644, "file")?;
    }
    create_dirs(root, &prefix.join("share/cora"), &mut lines)?;
    let mut text = lines.join("\n");
    text.push('\n');
    write_file(&manifest_path, text.as_bytes(), 0o644)?;
    println!(
        "installed {} under {} (list: {})",
        BINARIES.join(", "),
        root.join(&prefix).display(),
        manifest_path.display()
    );
    Ok(())
}

/// Removes what [`install`] recorded; a config the admin changed stays unless `purge`.
pub fn uninstall(opts: &InstallOpts, purge: bool) -> Result<()> {
    let prefix = rel(&opts.prefix)?;
    let root = &opts.root;
    let manifest_path = root.join(&prefix).join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!(
            "reading {} (nothing installed there?)",
            manifest_path.display()
        )
    })?;
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ' ');
        let (kind, path) = (
            f.next().unwrap_or(""),
            rel(Path::new(f.next().unwrap_or("")))?,
        );
        let full = root.join(&path);
        match kind {
            "dir" => dirs.push(full),
            "file" => remove_file(&full)?,
            "config" => {
                let want = f.next().unwrap_or("");
                let now = std::fs::read(&full).ok().map(|b| sha256_hex(&b));
                if purge || now.as_deref() == Some(want) || now.is_none() {
                    remove_file(&full)?;
                } else {
                    println!(
                        "kept {} (changed since install; --purge removes it)",
                        full.display()
                    );
                }
            }
            other => bail!("{}: unknown entry {other:?}", manifest_path.display()),
        }
    }
    remove_file(&manifest_path)?;
    // Deepest first; a directory that holds something not ours stays.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(&d);
    }
    println!("uninstalled from {}", root.join(&prefix).display());
    Ok(())
}

/// `path` without its leading `/`, refusing `..` (everything stays inside the root).
fn rel(path: &Path) -> Result<PathBuf> {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => bail!("{}: must not contain ..", path.display()),
        }
    }
    Ok(out)
}

/// Creates the missing directories of `dir` (relative to `root`), recording each one.
fn create_dirs(root: &Path, dir: &Path, lines: &mut Vec<String>) -> Result<()> {
    let mut cur = PathBuf::new();
    for c in dir.components() {
        cur.push(c);
        let full = root.join(&cur);
        if !full.exists() {
            std::fs::create_dir(&full).with_context(|| format!("creating {}", full.display()))?;
            lines.push(format!("dir {}", cur.display()));
        }
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("no parent directory")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// The repository's unit with ExecStart pointing at the installed binary.
fn unit_text(bin: &Path) -> Result<String> {
    let path = crate::vm::repo_root().join("snapshotter/cora-snapshotter.service");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let from = "ExecStart=/usr/local/bin/cora-snapshotter";
    if !text.contains(from) {
        bail!("{}: no line {from}", path.display());
    }
    Ok(text.replace(
        from,
        &format!("ExecStart={}", bin.join("cora-snapshotter").display()),
    ))
}

/// The defaults the unit's directories match; the driver next to the installed snapshotter.
fn default_config(bin: &Path) -> Result<Vec<u8>> {
    let config = serde_json::json!({
        "root": "/var/lib/cora-snapshotter",
        "address": "/run/cora-snapshotter/cora.sock",
        "verbose": "info",
        "autoRemoveDev": true,
        "attachOnPull": true,
        "transport": "auto",
        "cacheDir": "/var/lib/cora-snapshotter/cache",
        "cacheSize": "10G",
        "driverPath": bin.join("cora-driver"),
    });
    let mut bytes = serde_json::to_vec_pretty(&config)?;
    bytes.push(b'\n');
    Ok(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                out.push(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
                if p.is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// The release binaries (built before the tests by the README's test command) installed
    /// into an empty root: the unit starts the installed snapshotter, the default config is
    /// one it accepts (it starts with it, moved into the test's directory), an admin's config
    /// survives a reinstall and an uninstall, and uninstall leaves the root as it was.
    #[test]
    fn installs_into_a_clean_root_and_uninstalls_to_nothing() -> Result<()> {
        let bins = crate::vm::repo_root().join("target/release");
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        std::fs::create_dir(&root)?;
        let opts = InstallOpts {
            root: root.clone(),
            prefix: "/opt/cora".into(),
        };
        install(&bins, &opts)?;
        let files = files_under(&root);
        for want in [
            "opt/cora/bin/cora",
            "opt/cora/bin/cora-driver",
            "opt/cora/bin/cora-snapshotter",
            UNIT,
            CONFIG,
            "opt/cora/share/doc/cora/README.md",
            "opt/cora/share/cora/installed",
        ] {
            assert!(
                files.contains(&PathBuf::from(want)),
                "{want} missing: {files:?}"
            );
        }
        let unit = std::fs::read_to_string(root.join(UNIT))?;
        assert!(
            unit.contains(
                "ExecStart=/opt/cora/bin/cora-snapshotter --config /etc/cora/snapshotter.json"
            ),
            "{unit}"
        );
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join(CONFIG))?)?;
        assert_eq!(config["driverPath"], "/opt/cora/bin/cora-driver");

        // The installed snapshotter runs with the installed config, its paths moved here.
        let mut moved = config.clone();
        moved["root"] = tmp.path().join("state").to_string_lossy().into();
        moved["address"] = tmp.path().join("cora.sock").to_string_lossy().into();
        moved["cacheDir"] = tmp.path().join("cache").to_string_lossy().into();
        moved["driverPath"] = root
            .join("opt/cora/bin/cora-driver")
            .to_string_lossy()
            .into();
        let moved_path = tmp.path().join("snapshotter.json");
        std::fs::write(&moved_path, serde_json::to_vec(&moved)?)?;
        let mut child = std::process::Command::new(root.join("opt/cora/bin/cora-snapshotter"))
            .arg("--config")
            .arg(&moved_path)
            .stderr(std::fs::File::create(tmp.path().join("snap.log"))?)
            .spawn()?;
        let sock = tmp.path().join("cora.sock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut up = false;
        while std::time::Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                up = true;
                break;
            }
            if child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let log = std::fs::read_to_string(tmp.path().join("snap.log")).unwrap_or_default();
        assert!(up, "the installed snapshotter did not serve:\n{log}");

        // The admin edits the config; a reinstall and an uninstall keep it, --purge not.
        std::fs::write(root.join(CONFIG), b"{\"verbose\": \"debug\"}\n")?;
        install(&bins, &opts)?;
        assert_eq!(
            std::fs::read(root.join(CONFIG))?,
            b"{\"verbose\": \"debug\"}\n"
        );
        uninstall(&opts, false)?;
        assert_eq!(
            files_under(&root),
            ["etc", "etc/cora", CONFIG].map(PathBuf::from)
        );
        std::fs::remove_dir_all(root.join("etc"))?;
        install(&bins, &opts)?;
        uninstall(&opts, true)?;
        assert_eq!(files_under(&root), Vec::<PathBuf>::new());
        Ok(())
    }
}
