//! The VM's initramfs: static busybox, the 9p/overlay modules of the guest kernel and a PID 1
//! script. Built at run time into the cache dir and rebuilt only when an input changes.
use crate::kernels::Kernel;
use anyhow::{Context, Result, bail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules the init loads before mounting anything (their dependencies are added from
/// modules.dep); everything else is autoloaded after the chroot by the host's modprobe.
/// ublk_drv is loaded here too: insmod from the initramfs is much faster than running the
/// host's modprobe over 9p.
const MODULES: &[&str] = &["9pnet_virtio", "9p", "overlay", "ublk_drv"];
const BUSYBOX: &str = "/bin/busybox";
/// The busybox applets init.sh uses, linked in /bin.
const APPLETS: &[&str] = &[
    "sh", "mount", "insmod", "mkdir", "mknod", "cut", "cat", "hostname", "ip", "stty", "chroot",
];
const INIT: &str = include_str!("vm/init.sh");

/// Returns the path of an up-to-date initramfs for `kernel`.
pub fn ensure(cache: &Path, kernel: &Kernel) -> Result<PathBuf> {
    let kver = &kernel.release;
    let moddir = &kernel.modules;
    let modules = resolve_modules(moddir, MODULES)?;
    // The key names every input; an unchanged key means the cached archive is current.
    let mut key = format!(
        "kernel {kver}\n{}\n{APPLETS:?}\n",
        file_stamp(Path::new(BUSYBOX))?
    );
    for (name, path) in &modules {
        key += &format!("{name} {}\n", file_stamp(path)?);
    }
    let nodes = static_nodes(moddir)?;
    key += &nodes;
    key += INIT;

    // One archive per kernel, so runs alternating kernels do not rebuild it each boot.
    let out = cache.join(format!("initramfs-{kver}.cpio"));
    let key_path = cache.join(format!("initramfs-{kver}.key"));
    if out.exists() && fs::read_to_string(&key_path).ok().as_deref() == Some(key.as_str()) {
        return Ok(out);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    eprintln!("xtask: building {}", out.display());

    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "lib",
        "lib/modules",
        "lower",
        "upper",
        "newroot",
        "cora",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for PID 1's stdio before devtmpfs is mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1);
    let busybox = fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for applet in APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for (name, path) in &modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &decompress(path)?);
        order += name;
        order.push('\n');
    }
    cpio.file("modules.order", 0o644, order.as_bytes());
    cpio.file("static-nodes", 0o644, nodes.as_bytes());
    let bytes = cpio.finish();

    // Write-then-rename so a concurrent run never boots a half-written archive.
    let tmp = cache.join(format!("initramfs-{kver}.cpio.{}", std::process::id()));
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    let tmp_key = cache.join(format!("initramfs-{kver}.key.{}", std::process::id()));
    fs::write(&tmp_key, key).context("writing initramfs key")?;
    fs::rename(&tmp_key, &key_path).context("renaming initramfs key")?;
    Ok(out)
}

/// `path c|b major minor` lines from modules.devname: the device nodes whose opening makes
/// the kernel load the module (/dev/loop-control, /dev/fuse...). Without udev or
/// systemd-tmpfiles nobody else creates them.
fn static_nodes(moddir: &Path) -> Result<String> {
    let file = moddir.join("modules.devname");
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let parsed = (|| {
            let mut f = line.split_whitespace();
            let (_module, path, dev) = (f.next()?, f.next()?, f.next()?);
            let kind = dev.get(..1).filter(|k| *k == "c" || *k == "b")?;
            let (major, minor) = dev[1..].split_once(':')?;
            let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
            (!path.contains("..")).then(|| format!("{path} {kind} {major} {minor}\n"))
        })();
        out += &parsed.with_context(|| format!("bad line in {}: {line:?}", file.display()))?;
    }
    Ok(out)
}

fn file_stamp(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{} {} {mtime}", path.display(), meta.len()))
}

/// The uncompressed ELF kernel inside `bzimage`, cached in `cache`. Booting it through its PVH
/// entry point skips the in-guest zstd decompression, which takes ~8 s under TCG.
pub fn ensure_vmlinux(cache: &Path, kver: &str, bzimage: &Path) -> Result<PathBuf> {
    let out = cache.join(format!("vmlinux-{kver}"));
    let key_path = cache.join(format!("vmlinux-{kver}.key"));
    let key = file_stamp(bzimage)?;
    if out.exists() && fs::read_to_string(&key_path).ok().as_deref() == Some(key.as_str()) {
        return Ok(out);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    eprintln!(
        "xtask: extracting {} from {}",
        out.display(),
        bzimage.display()
    );
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let elf = extract_vmlinux(&image)
        .with_context(|| format!("extracting the kernel from {}", bzimage.display()))?;
    let tmp = cache.join(format!("vmlinux-{kver}.{}", std::process::id()));
    fs::write(&tmp, elf).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &out).with_context(|| format!("renaming to {}", out.display()))?;
    fs::write(&key_path, key).context("writing vmlinux key")?;
    Ok(out)
}

/// Finds the first compressed payload that decompresses to an ELF file (what the kernel's
/// scripts/extract-vmlinux does). Decompressors exit nonzero on the bytes trailing the
/// payload, so success is judged by the output, not the exit status.
fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    const FORMATS: &[(&[u8], &str)] = &[
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x1f\x8b\x08", "gzip"),
    ];
    for (magic, tool) in FORMATS {
        let Some(at) = image.windows(magic.len()).position(|w| w == *magic) else {
            continue;
        };
        let mut child = Command::new(tool)
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("running {tool}"))?;
        let mut stdin = child.stdin.take().context("decompressor stdin")?;
        let payload = image[at..].to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            // The decompressor may stop reading at the end of its frame: ignore EPIPE.
            let _ = stdin.write_all(&payload);
        });
        let out = child
            .wait_with_output()
            .context("waiting for decompressor")?;
        let _ = writer.join();
        if out.stdout.starts_with(b"\x7fELF") {
            return Ok(out.stdout);
        }
    }
    bail!("no compressed ELF payload found")
}

/// Module names (as insmod wants them, in load order) with their files, dependencies first.
fn resolve_modules(moddir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let dep_file = moddir.join("modules.dep");
    let deps =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let mut order: Vec<(String, PathBuf)> = Vec::new();
    for want in wanted {
        let line = deps
            .lines()
            .find(|l| {
                l.split_once(':')
                    .is_some_and(|(m, _)| module_name(m) == Some(want))
            })
            .with_context(|| format!("module {want} not in {}", dep_file.display()))?;
        let (module, rest) = line.split_once(':').unwrap_or((line, ""));
        // modules.dep lists the full dependency closure, the deepest dependency last.
        for rel in rest.split_whitespace().rev().chain([module]) {
            let name = module_name(rel)
                .with_context(|| format!("odd module path {rel} in modules.dep"))?
                .to_string();
            if !order.iter().any(|(n, _)| *n == name) {
                order.push((name, moddir.join(rel)));
            }
        }
    }
    Ok(order)
}

/// `kernel/fs/9p/9p.ko.xz` -> `9p`.
fn module_name(rel: &str) -> Option<&str> {
    let file = rel.rsplit('/').next()?;
    let (name, _) = file.split_once(".ko")?;
    Some(name)
}

/// Busybox insmod hands the bytes to init_module, which cannot take compressed modules.
fn decompress(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("ko") => return fs::read(path).with_context(|| format!("reading {}", path.display())),
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("unknown module compression: {}", path.display()),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} -dc {}", path.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// A minimal writer for the "newc" cpio format the kernel unpacks.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | perm, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so identical inputs give identical archives
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko.xz"), Some("9p"));
        assert_eq!(
            module_name("kernel/net/9p/9pnet_virtio.ko"),
            Some("9pnet_virtio")
        );
        assert_eq!(module_name("kernel/fs/9p/README"), None);
    }

    #[test]
    fn resolves_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("modules.dep"),
            "kernel/a.ko.xz: kernel/b.ko.xz kernel/c.ko.xz\nkernel/b.ko.xz: kernel/c.ko.xz\n\
             kernel/c.ko.xz:\nkernel/d.ko:\n",
        )
        .unwrap();
        let got = resolve_modules(dir.path(), &["a", "d", "b"]).unwrap();
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["c", "b", "a", "d"]);
        assert_eq!(got[2].1, dir.path().join("kernel/a.ko.xz"));
        assert!(resolve_modules(dir.path(), &["nope"]).is_err());
    }

    #[test]
    fn parses_modules_devname() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(static_nodes(dir.path()).unwrap(), "");
        fs::write(
            dir.path().join("modules.devname"),
            "# comment\nloop loop-control c10:237\ndm_mod mapper/control c10:236\n",
        )
        .unwrap();
        assert_eq!(
            static_nodes(dir.path()).unwrap(),
            "loop-control c 10 237\nmapper/control c 10 236\n"
        );
        fs::write(
            dir.path().join("modules.devname"),
            "loop loop-control x10:237\n",
        )
        .unwrap();
        assert!(static_nodes(dir.path()).is_err());
    }

    #[test]
    fn cpio_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abcde");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        // Header is 110 bytes; "init\0" pads to 116; data "abcde" pads to 124.
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(&out[116..121], b"abcde");
        assert_eq!(&out[124..130], b"070701");
        assert_eq!(out.len() % 4, 0);
        // File size field (7th) of the first header.
        assert_eq!(&out[6 + 6 * 8..6 + 7 * 8], b"00000005");
    }
}
