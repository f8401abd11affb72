//! A private containerd instance (own config, root, state and socket under a test directory)
//! that never touches the system containerd, plus `ctr` against it.
use crate::daemon::{Daemon, signal, wait_for};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// runc's state root for the runc v2 shim: `<this>/<namespace>`, shared by every containerd on
/// the host, hence a namespace per test instance.
const RUNC_ROOT: &str = "/run/containerd/runc";

pub struct Containerd {
    daemon: Daemon,
    /// Where containerd, ctr and the runc shim come from (`None`: Debian's, on PATH).
    bin_dir: Option<PathBuf>,
    pub dir: PathBuf,
    pub address: PathBuf,
    /// Unique per instance so runc state never collides with other instances or the system's.
    pub namespace: String,
}

impl Containerd {
    /// Starts containerd with its state under `dir` and one `[proxy_plugins.NAME]` snapshotter
    /// per `(name, socket)`. CRI is disabled: tests drive containerd with `ctr`.
    pub fn start(dir: &Path, proxy_snapshotters: &[(&str, &Path)]) -> Result<Containerd> {
        Self::start_with(dir, proxy_snapshotters, None)
    }

    /// Like [`Self::start`]; with `cri = Some(toml)` the CRI plugin is enabled and `toml` (e.g.
    /// from [`crate::cri::cri_config`]) is appended to the config.
    pub fn start_with(
        dir: &Path,
        proxy_snapshotters: &[(&str, &Path)],
        cri: Option<&str>,
    ) -> Result<Containerd> {
        std::fs::create_dir_all(dir)?;
        let address = dir.join("containerd.sock");
        let mut config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
{disabled}

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = address.display(),
            opt = dir.join("opt").display(),
            disabled = if cri.is_some() {
                ""
            } else {
                r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#
            },
        );
        config.push_str(cri.unwrap_or_default());
        for (name, socket) in proxy_snapshotters {
            config.push_str(&format!(
                "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            ));
        }
        Self::spawn(dir, address, config, None)
    }

    /// containerd 2.1 (Debian sid's, extracted into `target/tools/containerd2` by `cargo xtask
    /// test`, never installed over bookworm's) with a version 3 config: CRI disabled, and the
    /// transfer service told to unpack for each proxy snapshotter as for overlayfs.
    pub fn start_v2(dir: &Path, proxy_snapshotters: &[(&str, &Path)]) -> Result<Containerd> {
        Self::start_v2_with(dir, proxy_snapshotters, None)
    }

    /// Like [`Self::start_v2`]; with `cri = Some(toml)` (from [`crate::cri::cri_config_v3`])
    /// the CRI plugins are enabled and `toml` is appended to the config.
    pub fn start_v2_with(
        dir: &Path,
        proxy_snapshotters: &[(&str, &Path)],
        cri: Option<&str>,
    ) -> Result<Containerd> {
        let bin_dir = containerd2_bin_dir();
        if !bin_dir.join("containerd").exists() {
            bail!(
                "{} has no containerd 2.x: `cargo xtask test` (or `cargo xtask tools`) extracts \
                 Debian sid's there",
                bin_dir.display()
            );
        }
        std::fs::create_dir_all(dir)?;
        let address = dir.join("containerd.sock");
        let mut config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
{disabled}

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = address.display(),
            disabled = if cri.is_some() {
                ""
            } else {
                r#"disabled_plugins = ["io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri"]"#
            },
        );
        for (name, socket) in proxy_snapshotters {
            config.push_str(&format!(
                "  [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n    \
                 platform = \"linux/amd64\"\n    snapshotter = \"{name}\"\n"
            ));
            config.push_str(&format!(
                "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                socket.display()
            ));
        }
        config.push_str(cri.unwrap_or_default());
        Self::spawn(dir, address, config, Some(bin_dir))
    }

    fn spawn(
        dir: &Path,
        address: PathBuf,
        config: String,
        bin_dir: Option<PathBuf>,
    ) -> Result<Containerd> {
        let config_path = dir.join("containerd.toml");
        std::fs::write(&config_path, config)?;
        let mut cmd = match &bin_dir {
            Some(b) => {
                let mut cmd = Command::new(b.join("containerd"));
                // Its runc shim is found on PATH.
                let path = std::env::var("PATH").unwrap_or_default();
                cmd.env("PATH", format!("{}:{path}", b.display()));
                cmd
            }
            None => Command::new("containerd"),
        };
        cmd.arg("--config").arg(&config_path);
        let daemon = Daemon::spawn("containerd", cmd, &dir.join("containerd.log"))?;
        let mut c = Containerd {
            daemon,
            bin_dir,
            dir: dir.to_owned(),
            address,
            namespace: format!("cora-test-{}", std::process::id()) + &unique_suffix(dir),
        };
        let ready = wait_for("containerd to answer", Duration::from_secs(30), || {
            c.ctr_output(&["version"]).is_ok_and(|o| o.status.success())
        });
        if let Err(e) = ready {
            let running = c.daemon.running();
            bail!("{e} (running: {running}); log:\n{}", c.daemon.log_text());
        }
        Ok(c)
    }

    pub fn ctr_output(&self, args: &[&str]) -> Result<Output> {
        self.ctr_output_in(&self.namespace, args)
    }

    /// `ctr` in another containerd namespace (e.g. CRI's `k8s.io`).
    pub fn ctr_output_in(&self, namespace: &str, args: &[&str]) -> Result<Output> {
        let ctr = match &self.bin_dir {
            Some(b) => b.join("ctr"),
            None => PathBuf::from("ctr"),
        };
        Command::new(ctr)
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", namespace])
            .args(args)
            .output()
            .context("running ctr")
    }

    /// Like [`Self::ctr`] in another namespace.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let out = self.ctr_output_in(namespace, args)?;
        if !out.status.success() {
            bail!(
                "ctr -n {namespace} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ctr ARGS`; returns stdout, or an error with stderr when it fails.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        self.ctr_in(&self.namespace, args)
    }

    /// containerd's process id (for CPU accounting in benches).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.daemon.stop();
        // Shims outlive containerd by design; ours are the ones pointed at our socket.
        for pid in pids_with_arg(&self.address.to_string_lossy()) {
            signal(pid, libc::SIGKILL);
        }
        unmount_under(&self.dir);
        // runc state of our containers: all of our namespace, and in CRI's shared `k8s.io`
        // the ones whose IDs start with our namespace name.
        for (ns, all) in [
            (self.namespace.as_str(), true),
            (crate::cri::CRI_NAMESPACE, false),
        ] {
            let runc_root = Path::new(RUNC_ROOT).join(ns);
            let Ok(entries) = std::fs::read_dir(&runc_root) else {
                continue;
            };
            for e in entries.flatten() {
                if all || e.file_name().to_string_lossy().starts_with(&self.namespace) {
                    let _ = Command::new("runc")
                        .arg("--root")
                        .arg(&runc_root)
                        .args(["delete", "--force"])
                        .arg(e.file_name())
                        .output();
                }
            }
            if all {
                let _ = std::fs::remove_dir_all(&runc_root);
            }
        }
    }
}

/// `target/tools/containerd2/usr/bin`, beside the running test's target directory.
pub fn containerd2_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target
    let target = exe
        .ancestors()
        .nth(3)
        .map(Path::to_owned)
        .unwrap_or_default();
    target.join("tools/containerd2/usr/bin")
}

/// A short suffix derived from the instance directory (distinct directories, distinct names).
fn unique_suffix(dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    format!("-{:08x}", h.finish() as u32)
}

/// PIDs of processes whose command line contains `needle` as one argument.
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    pids_where(|arg| arg == needle.as_bytes())
}

/// PIDs of processes with an argument naming a path below `dir` (daemons a service started
/// under its state directory).
pub fn pids_with_arg_under(dir: &Path) -> Vec<u32> {
    let prefix = [dir.as_os_str().as_encoded_bytes(), b"/"].concat();
    pids_where(|arg| arg.starts_with(&prefix))
}

fn pids_where(matches: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(&matches))
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    out
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let oct: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&oct, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&oct);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Lazily unmounts everything at or below `dir` so the directory can be deleted.
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        if let Ok(c) = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}
