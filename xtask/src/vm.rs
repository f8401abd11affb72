//! `cargo xtask vm -- CMD`: run a command in a QEMU (TCG) guest with a real ublk kernel.
//!
//! The guest sees the host root read-only (9p) under a tmpfs overlay, the repository and each
//! `--share` read-write at their host paths, and runs CMD in the current directory. Recipe and
//! pitfalls: kernel-notes/README.md.
use crate::{deps, initramfs, kernels};
use anyhow::{Context, Result, bail};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "linux-image-6.12-amd64",
    "busybox-static",
    "xz-utils",
    "zstd",
];
const GUEST_SH: &str = include_str!("vm/guest.sh");
/// Host environment variables passed into the guest unchanged.
const PASS_ENV: &[&str] = &["CORA_LOG", "RUST_BACKTRACE", "RUST_TEST_THREADS"];
const PASS_ENV_PREFIX: &str = "CORA_";

#[derive(Debug, Clone, clap::Args)]
pub struct VmOpts {
    /// Guest memory (QEMU -m syntax). Guest tmpfs mounts can use up to half of it.
    #[arg(long, default_value = "4G")]
    pub mem: String,
    /// Guest vCPUs (each one is a host thread under multi-threaded TCG).
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Kill the VM and fail after this many seconds (default: 1200; for `vm-test`, a budget
    /// per guest test script, see `SCRIPT_TIMEOUT_SECS`).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Extra host directories shared read-write at the same path (the repository always is).
    #[arg(long = "share", value_name = "DIR")]
    pub shares: Vec<PathBuf>,
    /// Show the kernel log and timing.
    #[arg(long)]
    pub verbose: bool,
    /// Extra kernel command line parameters (debugging).
    #[arg(long, value_name = "ARGS")]
    pub kernel_args: Option<String>,
    /// Guest kernel: Debian 12's 6.12, or the newest Debian kernel (fetched once, cached).
    #[arg(long, value_enum, default_value = "6.12")]
    pub kernel: kernels::Which,
}

impl Default for VmOpts {
    fn default() -> Self {
        VmOpts {
            mem: "4G".into(),
            cpus: 2,
            timeout: None,
            shares: Vec::new(),
            verbose: false,
            kernel_args: None,
            kernel: kernels::Which::V6_12,
        }
    }
}

/// How long one `run` may take unless `--timeout` says otherwise.
const DEFAULT_TIMEOUT_SECS: u64 = 1200;

/// Boots of one `run` when the kernel panics before the command starts.
const BOOT_ATTEMPTS: u32 = 3;

/// Repository root (the workspace containing xtask).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Boots the VM, runs `cmd` (joined with spaces and run by `sh -c`, like ssh) in the current
/// directory, and returns its exit status.
pub fn run(opts: &VmOpts, cmd: &[String]) -> Result<i32> {
    if cmd.is_empty() {
        bail!("no command given: cargo xtask vm [OPTIONS] -- CMD [ARGS...]");
    }
    deps::ensure(PACKAGES)?;
    let kernel = kernels::find(opts.kernel)?;
    let cache = target_dir().join("vm");
    let initrd = initramfs::ensure(&cache, &kernel)?;
    let vmlinux = initramfs::ensure_vmlinux(&cache, &kernel.release, &kernel.image)?;
    let tools = crate::tools::bin_dir();

    let repo = fs::canonicalize(repo_root()).context("repository root")?;
    // The run dir must lie inside the repository: share0, the only share the init knows
    // before reading the run dir's share list.
    let run = RunDir::create(&repo.join("target/vm/runs"))?;
    let cwd = std::env::current_dir().context("current directory")?;
    let shares = canonical_shares(&repo, &opts.shares)?;

    let mut share_list = String::new();
    for (i, dir) in shares.iter().enumerate() {
        share_list += &format!("share{i} {}\n", path_str(dir)?);
    }
    let mut env = String::new();
    let path = format!(
        "{}:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        path_str(&tools)?
    );
    for (k, v) in [
        ("PATH", path.as_str()),
        ("HOME", "/root"),
        ("CORA_VM_CWD", path_str(&cwd)?),
        // The release booted, for tests that check they got the kernel asked for.
        ("CORA_VM_KERNEL", kernel.release.as_str()),
    ] {
        env += &format!("export {k}={}\n", shell_quote(v));
    }
    for (k, v) in std::env::vars() {
        if (PASS_ENV.contains(&k.as_str()) || k.starts_with(PASS_ENV_PREFIX))
            && k != "CORA_VM_CWD"
            && k != "CORA_VM_KERNEL"
        {
            env += &format!("export {k}={}\n", shell_quote(&v));
        }
    }
    run.write("shares", &share_list)?;
    run.write("env", &env)?;
    run.write("cmd", &cmd.join(" "))?;
    run.write("guest.sh", GUEST_SH)?;

    // Unknown `key=value` kernel parameters reach the init as environment variables.
    let mut append = format!(
        "console=ttyS0 panic=-1 rdinit=/init cora_repo={} cora_run={}",
        cmdline_path(&repo)?,
        cmdline_path(&run.path)?
    );
    // A kernel extracted under target/ (not installed): the guest binds its modules over
    // /lib/modules/RELEASE, so the host's modprobe finds them after the chroot.
    if kernel.modules != Path::new("/lib/modules").join(&kernel.release) {
        append += &format!(
            " cora_modules={} cora_release={}",
            cmdline_path(&kernel.modules)?,
            cmdline_path(Path::new(&kernel.release))?
        );
    }
    // Skips work that only costs time under TCG; see kernel-notes/README.md.
    append += " mitigations=off tsc=reliable no_timer_check random.trust_cpu=on cryptomgr.notests";
    append += " i8042.noaux i8042.nokbd 8250.nr_uarts=1";
    if let Some(extra) = &opts.kernel_args {
        append += " ";
        append += extra;
    }
    if opts.verbose {
        append += " cora_verbose=1";
    } else {
        append += " quiet loglevel=1";
    }
    let console_log = run.path.join("console.log");
    let console_chardev = if opts.verbose {
        "file,id=kcon,path=/proc/self/fd/2,append=on".to_string()
    } else {
        format!("file,id=kcon,path={}", qemu_opt(path_str(&console_log)?))
    };
    // A kernel that panics before the command starts (under multi-threaded TCG, 6.12 and
    // 7.3 both oops now and then in early boot: "int3" in patched kernel text, a
    // cross-modifying-code race of the emulator) has run nothing: boot it again.
    let mut attempt = 1;
    let (qemu_status, start, total) = loop {
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-smp", &opts.cpus.to_string(), "-m", &opts.mem])
        .args(["-bios", "/usr/share/qemu/qboot.rom"])
        .arg("-kernel")
        .arg(&vmlinux)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &append])
        // ttyS0: kernel console -> our stderr with --verbose, else a log shown on failure.
        .args(["-chardev", &console_chardev])
        .args(["-serial", "chardev:kcon"])
        .args(["-device", "virtio-serial-pci,id=vser"])
        .args(["-chardev", "stdio,id=out,signal=off"])
        .args(["-device", "virtconsole,bus=vser.0,chardev=out"])
        .args(["-chardev", "file,id=err,path=/proc/self/fd/2,append=on"])
        .args(["-device", "virtconsole,bus=vser.0,chardev=err"]);
        add_9p(&mut qemu, "root", Path::new("/"), true);
        for (i, dir) in shares.iter().enumerate() {
            add_9p(&mut qemu, &format!("share{i}"), dir, false);
        }
        // Pipes rather than inherited fds: QEMU reopens fd 2 via /proc, which on a pipe shares
        // nothing with our other output, whereas on a regular file it would clobber offsets.
        qemu.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        // If xtask dies (killed by a test harness's timeout), QEMU must not outlive it.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            qemu.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = SystemTime::now();
        let t0 = Instant::now();
        let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
        let pumps = [
            pump(child.stdout.take(), std::io::stdout),
            pump(child.stderr.take(), std::io::stderr),
        ];
        let timeout = opts.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS);
        let exited = wait_deadline(&mut child, Duration::from_secs(timeout))?;
        for p in pumps {
            let _ = p.join();
        }
        let Some(qemu_status) = exited else {
            show_console(&console_log);
            bail!(
                "VM timed out after {} s (QEMU killed); command: {}",
                timeout,
                cmd.join(" ")
            );
        };
        let total = t0.elapsed();
        let never_started = !run.path.join("started").exists()
            && !run.path.join("status").exists()
            && !run.path.join("error").exists();
        let panicked = fs::read_to_string(&console_log).is_ok_and(|c| c.contains("Kernel panic"));
        if never_started && panicked && attempt < BOOT_ATTEMPTS {
            show_console(&console_log);
            eprintln!(
                "xtask: the guest kernel panicked before the command started; booting again ({attempt}/{BOOT_ATTEMPTS})"
            );
            attempt += 1;
            continue;
        }
        break (qemu_status, start, total);
    };

    if let Ok(err) = fs::read_to_string(run.path.join("error")) {
        show_console(&console_log);
        bail!("guest setup failed: {}", err.trim());
    }
    let status = fs::read_to_string(run.path.join("status"));
    if status.is_err() {
        show_console(&console_log);
    }
    if opts.verbose {
        let boot = fs::metadata(run.path.join("started"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.duration_since(start).ok());
        match boot {
            Some(b) => eprintln!(
                "xtask: vm boot-to-command {:.2} s, command {:.2} s, total {:.2} s",
                b.as_secs_f64(),
                total.as_secs_f64() - b.as_secs_f64(),
                total.as_secs_f64()
            ),
            None => eprintln!("xtask: vm total {:.2} s", total.as_secs_f64()),
        }
    }
    let status = status.with_context(|| {
        format!(
            "guest wrote no exit status (QEMU {qemu_status}); kernel panic or init failure? \
             rerun with --verbose"
        )
    })?;
    status
        .trim()
        .parse()
        .with_context(|| format!("bad guest exit status {status:?}"))
}

fn add_9p(qemu: &mut Command, tag: &str, dir: &Path, readonly: bool) {
    // multidevs=remap: the shared tree spans several host filesystems; without remapping,
    // inode numbers from different devices can collide inside the single 9p device.
    let mut fsdev = format!(
        "local,id={tag},path={},security_model=none,multidevs=remap",
        qemu_opt(&dir.display().to_string())
    );
    if readonly {
        fsdev += ",readonly=on";
    }
    qemu.args(["-fsdev", &fsdev]).args([
        "-device",
        &format!("virtio-9p-pci,fsdev={tag},mount_tag={tag}"),
    ]);
}

/// The repository first (share0), then the extra shares that it does not already contain,
/// parents before children so a nested share is mounted on top of its parent.
fn canonical_shares(repo: &Path, extra: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = Vec::new();
    for d in extra {
        let c = fs::canonicalize(d).with_context(|| format!("share {}", d.display()))?;
        if !c.is_dir() {
            bail!("share {} is not a directory", c.display());
        }
        if repo.starts_with(&c) && c != repo {
            bail!(
                "share {} contains the repository {}; share a sibling or a subdirectory instead",
                c.display(),
                repo.display()
            );
        }
        if !c.starts_with(repo) && !out.contains(&c) {
            out.push(c);
        }
    }
    out.sort_by_key(|p| p.components().count());
    out.insert(0, repo.to_path_buf());
    Ok(out)
}

fn path_str(p: &Path) -> Result<&str> {
    let s = p
        .to_str()
        .with_context(|| format!("path is not UTF-8: {}", p.display()))?;
    if s.contains('\n') {
        bail!("path contains a newline: {s:?}");
    }
    Ok(s)
}

/// QEMU option values escape a comma by doubling it.
fn qemu_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// The tail of the kernel console log, for when the guest failed without --verbose.
fn show_console(log: &Path) {
    const LINES: usize = 40;
    let Ok(text) = fs::read(log) else { return };
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    eprintln!(
        "xtask: last {LINES} lines of the guest console ({}):",
        log.display()
    );
    for line in &lines[lines.len().saturating_sub(LINES)..] {
        eprintln!("  {line}");
    }
}

/// Paths on the kernel command line cannot be quoted.
fn cmdline_path(p: &Path) -> Result<&str> {
    let s = path_str(p)?;
    if s.contains(char::is_whitespace) || s.contains('"') {
        bail!("path {s:?} cannot go on the kernel command line (whitespace or quote)");
    }
    Ok(s)
}

pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn pump<R, W, F>(src: Option<R>, dst: F) -> thread::JoinHandle<()>
where
    R: Read + Send + 'static,
    W: Write,
    F: FnOnce() -> W + Send + 'static,
{
    thread::spawn(move || {
        let Some(mut src) = src else { return };
        let mut dst = dst();
        let mut buf = [0u8; 8192];
        // Forward as bytes arrive (no line buffering) so progress shows up live. If our side
        // is closed (`| head`), keep draining so QEMU, and with it the guest, never blocks.
        let mut open = true;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if open {
                open = dst.write_all(&buf[..n]).and_then(|()| dst.flush()).is_ok();
            }
        }
    })
}

/// Waits for QEMU until `timeout`; kills it on expiry and returns None.
fn wait_deadline(child: &mut Child, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().context("waiting for qemu")? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Removes run dirs left by xtask processes that died without cleaning up (e.g. Ctrl-C).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Per-run directory shared with the guest; removed when dropped.
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create(parent: &Path) -> Result<Self> {
        remove_stale(parent);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!("{}-{nanos:09}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(RunDir { path })
    }

    fn write(&self, name: &str, contents: &str) -> Result<()> {
        let p = self.path.join(name);
        fs::write(&p, contents).with_context(|| format!("writing {}", p.display()))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn shares_repo_first_then_parents_first() {
        let d = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(d.path()).unwrap();
        let repo = root.join("repo");
        let child = root.join("x/y");
        fs::create_dir_all(&child).unwrap();
        fs::create_dir_all(repo.join("sub")).unwrap();
        let extra = [
            child.clone(),
            root.join("x"),
            child.clone(),
            repo.join("sub"),
        ];
        let got = canonical_shares(&repo, &extra).unwrap();
        assert_eq!(got, [repo.clone(), root.join("x"), child]);
        assert!(canonical_shares(&repo, &[root.join("missing")]).is_err());
        // A parent of the repository would be mounted over it.
        assert!(canonical_shares(&repo, std::slice::from_ref(&root)).is_err());
        assert!(canonical_shares(&repo, &["/".into()]).is_err());
    }
}
