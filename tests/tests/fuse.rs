//! CORA natively on a host without ublk: `cora-driver add --transport fuse` serves a CORA
//! image from docker-registry as one file on a FUSE mount, erofs mounts that file, and the
//! tree reads back equal to the one converted; a second read after dropping the page cache is
//! served from the chunk cache; `del` leaves no mount, no FUSE connection and no process; a
//! server killed under a reader is replaced by its keeper and the read finishes right.

use anyhow::{Context, Result, bail};
use cora_api::driver::{DeviceInfo, DriverStats, Ready};
use cora_tests::faults::{Fault, FaultProxy};
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::registry::Registry;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// erofs mounted with mount(2) on the FUSE file (file-backed; `mount(8)` would set up a loop
/// device instead), unmounted on drop.
struct ErofsMount(PathBuf);

impl ErofsMount {
    fn new(file: &Path, dir: &Path) -> Result<ErofsMount> {
        use std::os::unix::ffi::OsStrExt;
        std::fs::create_dir_all(dir)?;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
        let (src, dst) = (c(file)?, c(dir)?);
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                c"erofs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "mount -t erofs {} {}: {}",
                file.display(),
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(ErofsMount(dir.to_owned()))
    }
}

impl Drop for ErofsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn mounted(path: &Path) -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let p = path.to_string_lossy();
    Ok(info.lines().any(|l| l.split(' ').nth(4) == Some(&*p)))
}

/// Whether `pid` runs (a zombie does not: the server was reparented and awaits its reaper).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn stats(path: &Path) -> Result<DriverStats> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// Converts `tree` into the CORA image `HOST/app:cora`; returns its reference.
fn push_cora(tmp: &Path, host: &str, tree: &Path) -> Result<String> {
    let src = tmp.join("src");
    blobfmt::dirsrc::layout_from_dirs(&[tree], &src, "v1", true)?;
    let image = format!("{host}/app:cora");
    run(Command::new(cora_bin("cora"))
        .args(["convert", "--insecure", host])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&image))?;
    Ok(image)
}

/// `cora-driver add --transport fuse --daemon` of `image` reached at `host`, everything it
/// keeps (cache, FUSE dir, stats, log) under `tmp`.
fn add_fuse(tmp: &Path, image: &str, host: &str) -> Result<Ready> {
    add_fuse_with(tmp, image, host, &[])
}

/// [`add_fuse`] with more arguments.
fn add_fuse_with(tmp: &Path, image: &str, host: &str, more: &[&str]) -> Result<Ready> {
    let out = run(Command::new(cora_bin("cora-driver"))
        .args(["add", "--transport", "fuse", "--ready-json", "--daemon"])
        .args(["--image", image, "--insecure", host])
        .args(more)
        .arg("--cache")
        .arg(tmp.join("cache"))
        .arg("--fuse-dir")
        .arg(tmp.join("fuse"))
        .arg("--stats-file")
        .arg(tmp.join("stats.json"))
        .arg("--log")
        .arg(tmp.join("driver.log")))?;
    Ok(Ready::from_output(&out)?)
}

/// `cora-driver del` of a device `add_fuse` made under `tmp`.
fn del_fuse(tmp: &Path, id: u32) -> Result<()> {
    run(Command::new(cora_bin("cora-driver"))
        .args(["del", &id.to_string(), "--fuse-dir"])
        .arg(tmp.join("fuse")))?;
    Ok(())
}

/// A scratch directory, a registry, and the small Debian tree pushed to it as a CORA image
/// (checks first that this host has FUSE).
fn small_image_env() -> Result<(tempfile::TempDir, Registry, PathBuf, String)> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse missing: this test needs FUSE");
    }
    let tmp = tempfile::Builder::new()
        .prefix("cora-fuse-")
        .tempdir_in("/var/tmp")?;
    let reg = Registry::start()?;
    let tree = fixtures::debian_tree("small", fixtures::SMALL)?;
    let image = push_cora(tmp.path(), &reg.host, &tree)?;
    Ok((tmp, reg, tree, image))
}

#[test]
fn a_cora_image_served_through_fuse_reads_back_its_tree() -> Result<()> {
    let (tmp, reg, tree, image) = small_image_env()?;
    let blob_bytes: u64 = {
        let out = run(Command::new(cora_bin("cora")).args([
            "--insecure",
            &reg.host,
            "inspect",
            "--json",
            &image,
        ]))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["layers"]
            .as_array()
            .context("inspect --json has no layers")?
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum()
    };

    let fuse_dir = tmp.path().join("fuse");
    let stats_file = tmp.path().join("stats.json");
    let driver = cora_bin("cora-driver");
    let ready = add_fuse(tmp.path(), &image, &reg.host)?;
    assert_eq!(ready.transport, "fuse");
    assert!(
        ready.path.is_file(),
        "{} is not a file",
        ready.path.display()
    );
    let list = run(Command::new(&driver)
        .args(["list", "--json", "--fuse-dir"])
        .arg(&fuse_dir))?;
    let devs = DeviceInfo::parse_list(&list)?;
    let dev = devs
        .iter()
        .find(|d| d.id == ready.id)
        .with_context(|| format!("device {} not listed: {list}", ready.id))?;
    assert_eq!(dev.transport, "fuse");
    assert_eq!(dev.image.as_deref(), Some(image.as_str()));

    let mnt = tmp.path().join("mnt");
    {
        let _m = ErofsMount::new(&ready.path, &mnt)?;
        assert!(
            fixtures::tree_manifest(&mnt)? == fixtures::tree_manifest(&tree)?,
            "the tree served through FUSE differs from the converted one"
        );
    }
    // The stats file is rewritten every second; the final one comes with `del` below.
    let driver_log = || std::fs::read_to_string(tmp.path().join("driver.log")).unwrap_or_default();
    cora_tests::wait_until(Duration::from_secs(10), || {
        Ok(stats(&stats_file).is_ok_and(|s| s.misses > 0))
    })
    .with_context(driver_log)?;
    let cold = stats(&stats_file)?;
    assert!(
        cold.fetched_bytes <= blob_bytes,
        "fetched {} of {blob_bytes} stored bytes for one read of the tree",
        cold.fetched_bytes
    );

    // Warm: the page cache dropped, every byte again, none of it from the network.
    drop_caches()?;
    {
        let _m = ErofsMount::new(&ready.path, &mnt)?;
        assert!(fixtures::tree_manifest(&mnt)? == fixtures::tree_manifest(&tree)?);
    }
    cora_tests::wait_until(Duration::from_secs(10), || {
        Ok(stats(&stats_file).is_ok_and(|s| s.hits > cold.hits))
    })
    .with_context(driver_log)?;
    let warm = stats(&stats_file)?;
    assert_eq!(
        warm.fetched_bytes, cold.fetched_bytes,
        "a warm read went to the network"
    );
    println!(
        "fuse: cold read of the tree fetched {} of {blob_bytes} bytes ({} chunks); warm: {} more hits, 0 bytes fetched",
        cold.fetched_bytes,
        cold.misses,
        warm.hits - cold.hits
    );

    let keeper = dev.keeper_pid.context("a FUSE device without a keeper")?;
    assert!(running(keeper), "the keeper (pid {keeper}) is not running");
    del_fuse(tmp.path(), ready.id)?;
    assert!(
        !running(ready.pid),
        "the server (pid {}) outlived del",
        ready.pid
    );
    // The keeper ends with the connection, which ended with the unmount.
    cora_tests::wait_until(Duration::from_secs(10), || Ok(!running(keeper)))
        .context("the keeper outlived the device")?;
    let fuse_mnt = ready.path.parent().context("image file has no parent")?;
    assert!(!mounted(fuse_mnt)?, "{} still mounted", fuse_mnt.display());
    assert!(!fuse_mnt.exists(), "{} left behind", fuse_mnt.display());
    let list = run(Command::new(&driver)
        .args(["list", "--json", "--fuse-dir"])
        .arg(&fuse_dir))?;
    assert!(
        DeviceInfo::parse_list(&list)?
            .iter()
            .all(|d| d.id != ready.id),
        "device still listed after del: {list}"
    );
    Ok(())
}

/// The small Debian tree as a CORA image in a registry, and that image as the driver sees
/// it: through a fault proxy (same repository and tag). Fields drop in order: the proxy, its
/// runtime, the registry, then the directory.
struct ProxiedImage {
    image: String,
    /// The tree the image was converted from.
    tree: PathBuf,
    proxy: FaultProxy,
    _rt: tokio::runtime::Runtime,
    _reg: Registry,
    tmp: tempfile::TempDir,
}

fn proxied_image(prefix: &str) -> Result<ProxiedImage> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse missing: this test needs FUSE");
    }
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")?;
    let reg = Registry::start()?;
    let tree = fixtures::debian_tree("small", fixtures::SMALL)?;
    let image = push_cora(tmp.path(), &reg.host, &tree)?;
    let rt = tokio::runtime::Runtime::new()?;
    let proxy = rt.block_on(FaultProxy::start(reg.addr))?;
    Ok(ProxiedImage {
        image: image.replacen(&reg.host, &proxy.host, 1),
        tree,
        proxy,
        _rt: rt,
        _reg: reg,
        tmp,
    })
}

/// A registry failing while a container reads: the read through FUSE gets EIO (not a hang,
/// not wrong bytes) within the registry client's retry bound, and the same read succeeds once
/// the registry answers again; the device keeps serving throughout.
#[test]
fn a_failing_registry_gives_eio_through_fuse_and_reads_recover() -> Result<()> {
    // Kept whole: its runtime and registry must live as long as the proxy is used.
    let px = proxied_image("cora-fuse-fault-")?;
    let (tmp, tree, image, proxy) = (&px.tmp, &px.tree, &px.image, &px.proxy);
    let ready = add_fuse(tmp.path(), image, &proxy.host)?;
    let mnt = tmp.path().join("mnt");
    let m = ErofsMount::new(&ready.path, &mnt)?;
    // Directory entries are file system metadata, fetched at open; file contents are not.
    let rel = "lib/x86_64-linux-gnu/libc.so.6";
    assert!(mnt.join(rel).is_file(), "{rel} missing in the mounted tree");

    proxy.inject("/blobs/", Fault::Status(500), usize::MAX);
    let t = Instant::now();
    let err = std::fs::read(mnt.join(rel)).expect_err("a read with the registry failing");
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        proxy.count("/blobs/") > 0,
        "the read never reached the registry"
    );
    // The driver's registry client (ClientConfig defaults): 4 retries, backoff from 0.2 s
    // doubling (about 3 s in all, with jitter); a 500 comes back at once. The kernel asks more
    // than once before it gives up (readahead, then the page itself): about 10 s here.
    assert!(took < Duration::from_secs(40), "EIO after {took:?}");
    println!("fuse: EIO after {took:?} with the registry answering 500");

    proxy.clear();
    let got = std::fs::read(mnt.join(rel)).context("the same read, registry back")?;
    assert!(got == std::fs::read(tree.join(rel))?, "{rel} differs");
    drop(m);
    del_fuse(tmp.path(), ready.id)?;
    assert!(!running(ready.pid), "the server outlived del");
    Ok(())
}

/// A trace recorded beside `--stats-file` is written when the device ends, however short its
/// life: the stats writer's thread once held the source for good, so the source was never
/// dropped and a trace not yet written by its once-a-second writer was lost (a start shorter
/// than a second recorded nothing).
#[test]
fn a_trace_recorded_beside_stats_is_written_when_the_device_ends() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let (tmp, reg, _tree, image) = small_image_env()?;
    let trace = tmp.path().join("start.trace");
    let trace_arg = trace.to_string_lossy().into_owned();
    let ready = add_fuse_with(
        tmp.path(),
        &image,
        &reg.host,
        &["--no-prefetch", "--record-trace", &trace_arg],
    )?;
    let mut buf = vec![0u8; 256 << 10];
    std::fs::File::open(&ready.path)?.read_exact_at(&mut buf, 0)?;
    del_fuse(tmp.path(), ready.id)?;
    assert!(!running(ready.pid), "the server outlived del");
    let recorded = lazy::trace::Trace::read_file(&trace)
        .context("the trace of a start shorter than a second")?;
    let s = stats(&tmp.path().join("stats.json"))?;
    assert!(!recorded.chunks.is_empty(), "the trace lists no chunk");
    // Fetched chunks include the miss window's and read-ahead's, which nothing read.
    assert!(
        recorded.chunks.len() as u64 <= s.misses,
        "{} chunks traced, {} fetched",
        recorded.chunks.len(),
        s.misses
    );
    assert!(s.fetched_bytes > 0, "the last stats show no fetch: {s:?}");
    Ok(())
}

/// `add --daemon` killed by whoever started it (e.g. the snapshotter's add timeout) before the
/// device was ready: the forked server finds nobody to report to when it gets ready, and
/// removes the device instead of leaving one nobody knows about.
#[test]
fn a_server_whose_starter_died_before_ready_removes_its_device() -> Result<()> {
    let px = proxied_image("cora-fuse-orphan-")?;
    let (tmp, image, proxy) = (&px.tmp, &px.image, &px.proxy);
    // The manifest is held back: the server has forked and waits for it.
    proxy.inject("/manifests/", Fault::Delay(Duration::from_secs(3)), 1);
    let fuse_dir = tmp.path().join("fuse");
    let mut starter = Command::new(cora_bin("cora-driver"))
        .args(["add", "--transport", "fuse", "--ready-json", "--daemon"])
        .args(["--image", image, "--insecure", &proxy.host])
        .arg("--cache")
        .arg(tmp.path().join("cache"))
        .arg("--fuse-dir")
        .arg(&fuse_dir)
        .arg("--log")
        .arg(tmp.path().join("driver.log"))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let needle = fuse_dir.to_string_lossy().into_owned();
    let mut server = None;
    cora_tests::wait_until(Duration::from_secs(20), || {
        server = cora_tests::containerd::pids_with_arg(&needle)
            .into_iter()
            .find(|p| *p != starter.id());
        Ok(server.is_some())
    })?;
    let server = server.context("no forked server")? as i32;
    assert!(
        proxy.count("/manifests/") <= 1,
        "the manifest was fetched before the starter was killed"
    );
    starter.kill()?;
    starter.wait()?;
    cora_tests::wait_until(Duration::from_secs(60), || Ok(!running(server)))?;
    let log = std::fs::read_to_string(tmp.path().join("driver.log"))?;
    assert!(
        proxy.count("/blobs/") > 0,
        "the server ended before it got ready: {log}"
    );
    let list = run(Command::new(cora_bin("cora-driver"))
        .args(["list", "--json", "--fuse-dir"])
        .arg(&fuse_dir))?;
    assert_eq!(
        list.trim(),
        "[]",
        "a device outlived its unreported start: {log}"
    );
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!info.contains(&needle), "a mount is left under {needle}");
    Ok(())
}

/// The kernel's id of the FUSE connection mounted at `mnt` (its directory under
/// `/sys/fs/fuse/connections/`).
fn fuse_connection(mnt: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mnt)?.dev();
    Ok((u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev)))
}

/// The devices `cora-driver list` shows under `fuse_dir`.
fn list_fuse(fuse_dir: &Path) -> Result<Vec<DeviceInfo>> {
    let out = run(Command::new(cora_bin("cora-driver"))
        .args(["list", "--json", "--fuse-dir"])
        .arg(fuse_dir))?;
    Ok(DeviceInfo::parse_list(&out)?)
}

/// `kill -9` of a FUSE server while a reader waits on it: the device's keeper holds the
/// connection, so the mount stays and the read waits; the keeper starts a new server, which
/// has the kernel resend the request the dead one held, and the reader gets the right bytes,
/// no error. Then the device is deleted like any other: nothing is left.
#[test]
fn a_killed_fuse_server_is_replaced_and_the_read_it_held_finishes() -> Result<()> {
    let px = proxied_image("cora-fuse-kill-")?;
    let (tmp, tree, image, proxy) = (&px.tmp, &px.tree, &px.image, &px.proxy);
    // No background fill: only the reader fetches.
    let ready = add_fuse_with(tmp.path(), image, &proxy.host, &["--fill", "off"])?;
    let fuse_dir = tmp.path().join("fuse");
    let fuse_mnt = ready.path.parent().context("image file has no parent")?;
    let waiting = PathBuf::from(format!(
        "/sys/fs/fuse/connections/{}/waiting",
        fuse_connection(fuse_mnt)?
    ));
    let mnt = tmp.path().join("mnt");
    let m = ErofsMount::new(&ready.path, &mnt)?;
    let rel = "lib/x86_64-linux-gnu/libc.so.6";
    let want = std::fs::read(tree.join(rel))?;
    let keeper = list_fuse(&fuse_dir)?
        .iter()
        .find(|d| d.id == ready.id)
        .and_then(|d| d.keeper_pid)
        .context("no keeper listed")?;

    // Fetches are held back, so the reader's request sits in the server when it dies.
    proxy.inject("/blobs/", Fault::Delay(Duration::from_secs(2)), usize::MAX);
    let path = mnt.join(rel);
    let reader = std::thread::spawn(move || std::fs::read(path));
    cora_tests::wait_until(Duration::from_secs(20), || {
        Ok(proxy.count("/blobs/") > 0
            && std::fs::read_to_string(&waiting)?.trim().parse::<u64>()? > 0)
    })
    .context("the read never reached the server")?;
    assert!(!reader.is_finished(), "the read finished before the kill");
    let killed = Instant::now();
    // SAFETY: a plain kill of the server's pid.
    assert_eq!(unsafe { libc::kill(ready.pid, libc::SIGKILL) }, 0);
    proxy.clear();

    let mut new_pid = None;
    cora_tests::wait_until(Duration::from_secs(30), || {
        new_pid = list_fuse(&fuse_dir)?
            .into_iter()
            .find(|d| d.id == ready.id && d.pid != ready.pid && d.state.as_str() == "LIVE")
            .map(|d| d.pid);
        Ok(new_pid.is_some())
    })
    .context("no new server")?;
    let new_pid = new_pid.context("no new server")?;
    cora_tests::wait_until(Duration::from_secs(60), || Ok(reader.is_finished()))
        .context("the read held by the killed server never finished")?;
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))?
        .context("the read through the killed server")?;
    let took = killed.elapsed();
    assert!(got == want, "{rel} read back different bytes");
    assert!(running(keeper), "the keeper changed or died");
    // Another file, read after the recovery.
    let rel2 = "bin/busybox";
    assert!(std::fs::read(mnt.join(rel2))? == std::fs::read(tree.join(rel2))?);
    let log = std::fs::read_to_string(tmp.path().join("driver.log"))?;
    assert!(log.contains("the FUSE server died"), "{log}");
    println!(
        "fuse: server killed under a read; new server pid {new_pid}, the read finished with the right bytes {took:?} after the kill"
    );

    drop(m);
    del_fuse(tmp.path(), ready.id)?;
    assert!(!running(new_pid), "the new server outlived del");
    cora_tests::wait_until(Duration::from_secs(10), || Ok(!running(keeper)))
        .context("the keeper outlived the device")?;
    assert!(!mounted(fuse_mnt)?, "{} still mounted", fuse_mnt.display());
    assert!(list_fuse(&fuse_dir)?.is_empty());
    Ok(())
}
