//! CORA layers served through FUSE on a host without ublk (like this one: `/dev/fuse`, no
//! `/dev/ublk-control`): a private containerd 1.6 with runc, the cora-snapshotter daemon with its
//! default transport (`auto`), docker-registry, and a CORA image converted from a real Debian
//! tree. `cora rpull` commits its layer remote without downloading it, a container starts from
//! the stack served by one `cora-driver` FUSE device, having fetched a small part of the image,
//! and removing container and image leaves no device, mount or driver process. A layer with a
//! CORA annotation that no driver can serve still ends in a working container (unpacked).
use anyhow::{Context, Result, bail, ensure};
use cora_api::driver::{DeviceInfo, DeviceState, DriverStats, TRANSPORT_FUSE};
use cora_tests::containerd::{Containerd, mounts_under, pids_with_arg, unmount_under};
use cora_tests::cri::{CRI_NAMESPACE, cri_config_v3, pull_image};
use cora_tests::daemon::{signal, wait_for};
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::images::{Compression, LayerSpec, Registry, busybox_rootfs, write_oci_layout};
use cora_tests::snapshotter::CoraSnapshotter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

/// Kills what a failed test leaves of the snapshotter's FUSE devices: their mounts (erofs over
/// the FUSE file, the FUSE mount) and their servers, found by the `--fuse-dir` argument only
/// our snapshotter passes.
struct FuseLeftovers {
    root: PathBuf,
    fuse_dir: PathBuf,
}

impl Drop for FuseLeftovers {
    fn drop(&mut self) {
        unmount_under(&self.root);
        for pid in pids_with_arg(&self.fuse_dir.to_string_lossy()) {
            signal(pid, libc::SIGKILL);
        }
    }
}

/// Which containerd a test runs against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runtime {
    /// Debian bookworm's 1.6, installed.
    Containerd1,
    /// Debian sid's 2.1, extracted (CRI off).
    Containerd2,
    /// Debian sid's 2.1 with its CRI plugins.
    Containerd2Cri,
}

/// Field order matters: containerd stops (and unmounts container roots) first, then the
/// snapshotter, then whatever is left of its devices; the directory goes last.
struct Env {
    ctrd: Containerd,
    snap: CoraSnapshotter,
    _leftovers: FuseLeftovers,
    registry: Registry,
    dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Result<Env> {
        Self::start_with(serde_json::json!({}))
    }

    /// As [`Self::start`], with `extra` merged into the snapshotter's config.
    fn start_with(extra: serde_json::Value) -> Result<Env> {
        Self::start_on(extra, Runtime::Containerd1)
    }

    /// As [`Self::start_with`], on the containerd `runtime` says.
    fn start_on(extra: serde_json::Value, runtime: Runtime) -> Result<Env> {
        if !Path::new("/dev/fuse").exists() {
            bail!("/dev/fuse missing: this test needs FUSE");
        }
        let dir = tempfile::Builder::new()
            .prefix("cora-fuse-ctrd-")
            .tempdir_in("/var/tmp")?;
        let registry = Registry::start(&dir.path().join("registry"))?;
        let sdir = dir.path().join("snapshotter");
        // The default transport (auto): FUSE on a host without ublk.
        let mut config = serde_json::json!({
            "autoRemoveDev": true,
            "insecureRegistries": [registry.addr],
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        CoraSnapshotter::write_config(&sdir, &config)?;
        let snap = CoraSnapshotter::start(&cora_bin("cora-snapshotter"), &sdir)?;
        let leftovers = FuseLeftovers {
            root: snap.root.clone(),
            fuse_dir: snap.root.join("fuse"),
        };
        let ctrd_dir = dir.path().join("containerd");
        let proxies = [("cora", snap.socket.as_path())];
        let ctrd = match runtime {
            Runtime::Containerd1 => Containerd::start(&ctrd_dir, &proxies)?,
            Runtime::Containerd2 => Containerd::start_v2(&ctrd_dir, &proxies)?,
            Runtime::Containerd2Cri => {
                let cri = cri_config_v3("cora", &[&registry.addr], &dir.path().join("certs.d"))?;
                Containerd::start_v2_with(&ctrd_dir, &proxies, Some(&cri))?
            }
        };
        Ok(Env {
            ctrd,
            snap,
            _leftovers: leftovers,
            registry,
            dir,
        })
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn fuse_dir(&self) -> PathBuf {
        self.snap.root.join("fuse")
    }

    fn log(&self) -> String {
        self.snap.daemon.log_text()
    }

    /// Stops the snapshotter (SIGTERM: its devices stay) and starts it again; returns the log
    /// offset where the new run's log starts.
    fn restart_snapshotter(&mut self) -> Result<usize> {
        self.snap.daemon.stop()?;
        self.start_snapshotter_again()
    }

    /// Starts the stopped (or killed) snapshotter again; returns the log offset where the new
    /// run's log starts.
    fn start_snapshotter_again(&mut self) -> Result<usize> {
        let offset = self.log().len();
        let dir = self.dir.path().join("snapshotter");
        self.snap = CoraSnapshotter::start(&cora_bin("cora-snapshotter"), &dir)?;
        // containerd's gRPC client backs off (about 1 s) after the socket refused it.
        wait_for("containerd to reconnect", Duration::from_secs(30), || {
            self.ctrd
                .ctr(&["snapshots", "--snapshotter", "cora", "ls"])
                .is_ok()
        })?;
        Ok(offset)
    }

    /// `cora rpull REF` into this containerd through the cora snapshotter; returns its report.
    fn rpull(&self, reference: &str) -> Result<String> {
        self.rpull_in(&self.ctrd.namespace, reference)
    }

    fn rpull_in(&self, namespace: &str, reference: &str) -> Result<String> {
        // The registry part of the reference: the registry itself or a link in front of it.
        let host = reference.split('/').next().unwrap_or_default();
        let out = Command::new(cora_bin("cora"))
            .args(["--insecure", host, "rpull", "--address"])
            .arg(&self.ctrd.address)
            .args(["--namespace", namespace])
            .args(["--snapshotter", "cora", reference])
            .output()?;
        ensure!(
            out.status.success(),
            "cora rpull {reference} failed ({}): {}\nsnapshotter log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ctr run` (the container stays, so its snapshot and stack do too); returns the
    /// container's output and its id. containerd 1.6 now and then loses all output of a
    /// container that exits at once (see tests/tests/rpull.rs): an empty run is repeated under
    /// a new id, twice at most.
    fn run(&self, reference: &str, id: &str, cmd: &[&str]) -> Result<(String, String)> {
        self.run_in(&self.ctrd.namespace, reference, id, cmd)
    }

    fn run_in(
        &self,
        namespace: &str,
        reference: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<(String, String)> {
        let mut last = (String::new(), String::new());
        for attempt in 0..3 {
            if attempt > 0 {
                self.ctrd
                    .ctr_in(namespace, &["containers", "rm", &last.1])?;
            }
            let id = format!("{id}-{attempt}");
            let mut args = vec!["run", "--snapshotter", "cora", reference, &id];
            args.extend_from_slice(cmd);
            let out = self
                .ctrd
                .ctr_in(namespace, &args)
                .with_context(|| self.log())?;
            last = (out, id);
            if !last.0.is_empty() {
                break;
            }
        }
        Ok(last)
    }

    /// Removes every image and waits for containerd's garbage collection, which removes their
    /// snapshots from the snapshotter (detaching their stacks).
    fn remove_images(&self) -> Result<()> {
        let images = self.ctrd.ctr(&["images", "ls", "-q"])?;
        for name in images.lines().map(str::trim).filter(|l| !l.is_empty()) {
            self.ctrd.ctr(&["images", "rm", "--sync", name])?;
        }
        Ok(())
    }

    /// Converts `tree` to the CORA image `REPO:cora` (stack images of file system `fs`) in the
    /// registry; returns its reference.
    fn convert(&self, tree: &Path, fs: &str, repo: &str) -> Result<String> {
        let src = self.path(&format!("src-{fs}"));
        blobfmt::dirsrc::layout_from_dirs(&[tree], &src, "v1", true)?;
        let image = format!("{}/{repo}:cora", self.registry.addr);
        run(Command::new(cora_bin("cora"))
            .args(["--insecure", &self.registry.addr, "convert", "--fs", fs])
            .arg(format!("oci:{}:v1", src.display()))
            .arg(&image)
            .arg("--work")
            .arg(self.path(&format!("convert-work-{fs}"))))?;
        Ok(image)
    }

    /// Loop devices whose backing file is on one of our FUSE mounts.
    fn loop_devices(&self) -> Result<Vec<String>> {
        let out = run(Command::new("losetup").args([
            "--list",
            "--noheadings",
            "--output",
            "NAME,BACK-FILE",
        ]))?;
        let fuse_dir = self.fuse_dir();
        Ok(out
            .lines()
            .filter(|l| l.contains(&*fuse_dir.to_string_lossy()))
            .map(str::to_owned)
            .collect())
    }

    fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let out = run(Command::new(cora_bin("cora-driver"))
            .args(["list", "--json", "--fuse-dir"])
            .arg(self.fuse_dir()))?;
        Ok(DeviceInfo::parse_list(&out)?)
    }

    /// Nothing of any stack is left: no device, no mount under the snapshotter's root, no
    /// driver process, no snapshot.
    fn assert_all_detached(&self) -> Result<()> {
        let devices = self.devices()?;
        ensure!(devices.is_empty(), "devices left: {devices:?}");
        let mounts = mounts_under(&self.snap.root);
        ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
        let drivers = pids_with_arg(&self.fuse_dir().to_string_lossy());
        ensure!(
            drivers.is_empty(),
            "cora-driver processes left: {drivers:?}"
        );
        let snapshots = self
            .ctrd
            .ctr(&["snapshots", "--snapshotter", "cora", "ls"])?;
        ensure!(
            snapshots.lines().skip(1).all(|l| l.trim().is_empty()),
            "snapshots left:\n{snapshots}"
        );
        Ok(())
    }

    /// Waits until the snapshotter logged that the stack attach started at pull has ended
    /// (either way): the log is the only sign of it.
    fn wait_attach_at_pull(&self) -> Result<()> {
        wait_for("the attach at pull", Duration::from_secs(120), || {
            let log = self.log();
            log.contains("attached at pull") || log.contains("not attached at pull")
        })
        .with_context(|| self.log())
    }
}

/// Sum of the image's stored layer sizes (`cora inspect --json`).
fn stored_layer_bytes(registry: &str, image: &str) -> Result<u64> {
    let out = run(Command::new(cora_bin("cora")).args([
        "--insecure",
        registry,
        "inspect",
        "--json",
        image,
    ]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["layers"]
        .as_array()
        .context("inspect --json has no layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .sum())
}

/// The one driver stats file under `<root>/remote`, once rewritten after `after`: the driver
/// writes it every second and gives no other sign of being up to date.
fn stats_written_after(root: &Path, after: SystemTime) -> Result<DriverStats> {
    let files = || -> Vec<PathBuf> {
        std::fs::read_dir(root.join("remote"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".stats.json"))
            .collect()
    };
    let fresh = |p: &PathBuf| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > after)
    };
    wait_for("fresh driver stats", Duration::from_secs(10), || {
        files().iter().any(fresh)
    })?;
    let files = files();
    ensure!(files.len() == 1, "one stats file expected: {files:?}");
    Ok(serde_json::from_slice(&std::fs::read(&files[0])?)?)
}

#[test]
fn cora_image_is_served_through_fuse_and_leaves_nothing_behind() -> Result<()> {
    let env = Env::start()?;
    let log = env.log();
    assert!(
        log.contains("served by cora-driver FUSE devices"),
        "the snapshotter did not pick FUSE:\n{log}"
    );

    // A real Debian base (libc, coreutils, dash, bash, perl-base, ...; ~100 MB) converted to
    // CORA in the registry. The small tree is no use here: its only program is a 2 MB static
    // busybox, whose start alone fetches 16 % of that image.
    let tree = fixtures::debian_tree("base", fixtures::BASE)?;
    let image = env.convert(&tree, "erofs", "test/app")?;
    let stored = stored_layer_bytes(&env.registry.addr, &image)?;

    let t0 = Instant::now();
    let report = env.rpull(&image)?;
    let pulled = t0.elapsed();
    assert_eq!(
        report.matches(": remote, fetched 0 of ").count(),
        1,
        "{report}"
    );
    env.wait_attach_at_pull()?;
    let attached_at_pull = t0.elapsed();
    let log = env.log();
    assert!(
        log.contains("remote layer stack attached at pull"),
        "not attached at pull:\n{log}"
    );

    let t1 = Instant::now();
    // dash, the dynamic loader, libc, and the first line of one small file.
    let script = r#"read l < /etc/xattr.conf; echo "through FUSE: $l""#;
    let (out, id) = env.run(&image, "fuse", &["/bin/sh", "-c", script])?;
    let started = t1.elapsed();
    let ran = SystemTime::now();
    let file = std::fs::read_to_string(tree.join("etc/xattr.conf"))?;
    let first = file.lines().next().unwrap_or_default();
    assert_eq!(out, format!("through FUSE: {first}\n"));

    // One FUSE device serves the stack, and the container's lowest layer is erofs over its file.
    let devices = env.devices()?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    let dev = &devices[0];
    assert_eq!(
        (dev.transport.as_str(), &dev.state),
        (TRANSPORT_FUSE, &DeviceState::Live),
        "{dev:?}"
    );
    assert!(
        dev.image
            .as_deref()
            .is_some_and(|i| i.contains("/test/app@sha256:")),
        "{dev:?}"
    );
    assert!(dev.path.starts_with(env.fuse_dir()), "{dev:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let types: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&*env.snap.root.to_string_lossy()))
        .filter_map(|l| l.split(" - ").nth(1)?.split(' ').next())
        .collect();
    assert!(
        types.contains(&"erofs") && types.iter().any(|t| t.starts_with("fuse")),
        "mounts under the root: {types:?}"
    );
    // erofs reads the FUSE file with direct I/O where the kernel has the option (6.13+).
    let erofs_options: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&*env.snap.root.to_string_lossy()))
        .filter_map(|l| {
            let mut fields = l.split(" - ").nth(1)?.split(' ');
            (fields.next()? == "erofs").then(|| fields.nth(1))?
        })
        .collect();
    if cora_tests::kernel_at_least(6, 13) {
        assert!(
            !erofs_options.is_empty()
                && erofs_options
                    .iter()
                    .all(|o| o.split(',').any(|x| x == "directio")),
            "erofs mounts without directio: {erofs_options:?}"
        );
    }

    // Starting a container read a small part of the image.
    let stats = stats_written_after(&env.snap.root, ran)?;
    let stack_mount = mounts_under(&env.snap.root.join("remote"));
    println!(
        "fuse: rpull {pulled:?}, attached at pull after {attached_at_pull:?}, ctr run {started:?}; \
         fetched {} of {stored} stored layer bytes ({:.1} %), {} chunks, {} requests",
        stats.fetched_bytes,
        stats.fetched_bytes as f64 * 100.0 / stored as f64,
        stats.misses,
        stats.requests
    );
    assert!(stats.fetched_bytes > 0, "{stats:?}");
    // The start reads a few %; the miss window fetches about twice that (see `cargo xtask
    // bench coldstart`).
    assert!(
        stats.fetched_bytes * 4 < stored,
        "fetched {} of {stored} stored bytes to start a container",
        stats.fetched_bytes
    );

    // A restarted snapshotter finds the device and mount of the stack, which its container
    // snapshot still holds, and hands out the same mount.
    let mut env = env;
    let offset = env.restart_snapshotter()?;
    let log = env.log();
    assert!(
        log[offset..].contains("reusing the attached stack"),
        "{}",
        &log[offset..]
    );
    assert_eq!(env.devices()?, devices, "the same device serves");
    assert_eq!(mounts_under(&env.snap.root.join("remote")), stack_mount);
    let (out, id2) = env.run(&image, "fuse-again", &["/bin/sh", "-c", script])?;
    assert_eq!(out, format!("through FUSE: {first}\n"));

    // A FUSE server that dies is replaced by the device's keeper, under the running
    // snapshotter and with nobody's help: the same device (same mount, same connection)
    // serves on, and a container reading a file not read before gets the right bytes.
    let keeper = dev.keeper_pid.context("the FUSE device has no keeper")?;
    let big = "usr/lib/x86_64-linux-gnu/libcrypto.so.3";
    let want = run(Command::new("sha256sum").arg(tree.join(big)))?;
    let want = want
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?;
    let killed = Instant::now();
    signal(dev.pid as u32, libc::SIGKILL);
    let (out, id3) = env.run(&image, "fuse-healed", &["sha256sum", &format!("/{big}")])?;
    let healed_read = killed.elapsed();
    assert_eq!(out.split_whitespace().next(), Some(want), "{out}");
    let now = env.devices()?;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(
        (now[0].id, &now[0].state, now[0].keeper_pid),
        (dev.id, &DeviceState::Live, Some(keeper)),
        "{now:?}"
    );
    assert_ne!(now[0].pid, dev.pid, "the killed server still listed");
    assert_eq!(mounts_under(&env.snap.root.join("remote")), stack_mount);
    println!(
        "fuse: device server killed; a new container read {big} right {healed_read:?} after the kill"
    );

    // Server and keeper both killed: nothing holds the connection, the mount is broken. The
    // next start of the snapshotter clears the dead device and its mount and serves the
    // stack from a new device.
    signal(now[0].pid as u32, libc::SIGKILL);
    signal(keeper as u32, libc::SIGKILL);
    wait_for(
        "the killed processes to go",
        Duration::from_secs(10),
        || {
            [now[0].pid, keeper]
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        },
    )?;
    let offset = env.restart_snapshotter()?;
    let log = env.log();
    assert!(
        log[offset..].contains("FUSE server of the recorded stack and its keeper died"),
        "{}",
        &log[offset..]
    );
    let again = env.devices()?;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].state, DeviceState::Live, "{again:?}");
    assert!(again[0].pid != now[0].pid, "{again:?} vs {now:?}");
    let (out, id4) = env.run(&image, "fuse-new", &["/bin/sh", "-c", script])?;
    assert_eq!(out, format!("through FUSE: {first}\n"));

    // The containers go, then the image: the stack is detached (unmounted, device deleted,
    // its server gone).
    for id in [&id, &id2, &id3, &id4] {
        env.ctrd.ctr(&["containers", "rm", id])?;
    }
    env.remove_images()?;
    env.assert_all_detached().with_context(|| env.log())?;
    let log = env.log();
    assert!(log.contains("remote layer stack detached"), "{log}");
    Ok(())
}

#[test]
fn unservable_cora_annotation_with_fuse_falls_back_to_unpack() -> Result<()> {
    let env = Env::start()?;
    // A plain busybox layer posing as CORA: the snapshotter claims it remote (FUSE is there),
    // but no driver can serve it.
    let rootfs = env.path("img/rootfs");
    busybox_rootfs(&rootfs)?;
    let mut layer = LayerSpec::new(&rootfs);
    layer.annotations.insert(
        "containerd.io/snapshot/cora/index".into(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
    );
    let layout = env.path("img/layout");
    write_oci_layout(&layout, "v1", &[layer], Compression::Zstd, &["/bin/sh"])?;
    let reference = env.registry.push(&layout, "v1", "test/fake")?;

    let report = env.rpull(&reference)?;
    assert_eq!(
        report.matches(": remote, fetched 0 of ").count(),
        1,
        "{report}"
    );
    env.wait_attach_at_pull()?;
    assert!(env.log().contains("not attached at pull"), "{}", env.log());

    let (out, id) = env.run(&reference, "fake", &["/bin/busybox", "echo", "fallback"])?;
    assert_eq!(out, "fallback\n");
    let log = env.log();
    assert!(
        log.contains("downloading and unpacking its layers instead"),
        "{log}"
    );
    // The failed device left nothing behind.
    assert_eq!(env.devices()?, Vec::new());
    assert_eq!(
        pids_with_arg(&env.fuse_dir().to_string_lossy()),
        Vec::<u32>::new()
    );

    env.ctrd.ctr(&["containers", "rm", &id])?;
    env.remove_images()?;
    env.assert_all_detached().with_context(|| env.log())?;
    Ok(())
}

/// `kill -9` of the snapshotter while it attaches a stack: the device start is in flight (a
/// link with a 400 ms round trip to the registry makes it last seconds). The driver command
/// dies with the snapshotter, so nothing finishes that start; after a restart no device,
/// mount or server is left, and the image's next container starts.
#[test]
fn a_snapshotter_killed_mid_attach_leaves_nothing_behind() -> Result<()> {
    use cora_tests::shaper::{LinkProfile, ShapedLink};
    let mut env = Env::start()?;
    let slow = LinkProfile {
        name: "slow",
        rtt: Duration::from_millis(400),
        bandwidth: 1_000_000_000,
    };
    let link = ShapedLink::start(env.registry.addr.parse()?, slow)?;
    let link_addr = link.addr.to_string();
    env.snap.daemon.stop()?;
    CoraSnapshotter::write_config(
        &env.path("snapshotter"),
        &serde_json::json!({
            "autoRemoveDev": true,
            "insecureRegistries": [env.registry.addr, link_addr],
        }),
    )?;
    env.start_snapshotter_again()?;

    let tree = env.path("img/rootfs");
    busybox_rootfs(&tree)?;
    let layout = env.path("img/cora");
    convert_to_layout(&env, &tree, &layout)?;
    env.registry.push(&layout, "v1", "test/slow")?;
    let image = format!("{link_addr}/test/slow:v1");
    // The pull commits the layer remote; its attach at pull then starts a device.
    let report = env.rpull(&image)?;
    assert_eq!(report.matches(": remote").count(), 1, "{report}");
    let fuse_dir = env.fuse_dir().to_string_lossy().into_owned();
    wait_for("a device start", Duration::from_secs(60), || {
        !pids_with_arg(&fuse_dir).is_empty()
    })?;
    env.snap.daemon.kill()?;
    let log = env.log();
    assert!(
        !log.contains("attached at pull"),
        "the attach ended before the kill; the test needs a slower link:\n{log}"
    );
    let in_flight = pids_with_arg(&fuse_dir);

    let offset = env.start_snapshotter_again()?;
    wait_for(
        "the interrupted device start to leave nothing",
        Duration::from_secs(60),
        || {
            pids_with_arg(&fuse_dir).is_empty()
                && env.devices().is_ok_and(|d| d.is_empty())
                && mounts_under(&env.snap.root).is_empty()
        },
    )
    .with_context(|| {
        format!(
            "in flight at the kill: {in_flight:?}; now: {:?} {:?} {:?}\n{}",
            pids_with_arg(&fuse_dir),
            env.devices(),
            mounts_under(&env.snap.root),
            &env.log()[offset..]
        )
    })?;

    let (out, id) = env.run(&image, "after-kill", &["/bin/busybox", "echo", "started"])?;
    assert_eq!(out, "started\n");
    assert_eq!(env.devices()?.len(), 1);
    env.ctrd.ctr(&["containers", "rm", &id])?;
    env.remove_images()?;
    env.assert_all_detached().with_context(|| env.log())?;
    drop(link);
    Ok(())
}

/// containerd 2.1 (Debian sid's; 1.6 is out of upstream support): `cora rpull` commits a CORA
/// layer remote and `ctr run` starts it from the lazily served stack. `ctr image pull` goes
/// through 2.x's transfer service, which gives snapshotters no layer annotations, so the cora
/// snapshotter cannot tell a CORA layer there: that image is downloaded and unpacked, and
/// starts too.
#[test]
fn containerd_2_serves_rpull_lazily_and_unpacks_transfer_service_pulls() -> Result<()> {
    let env = Env::start_on(serde_json::json!({}), Runtime::Containerd2)?;
    let version = env.ctrd.ctr(&["version"])?;
    assert!(version.contains("Version:  2."), "{version}");
    let mut images = Vec::new();
    for who in ["lazy", "pulled"] {
        let tree = env.path(&format!("{who}/rootfs"));
        busybox_rootfs(&tree)?;
        std::fs::write(tree.join("etc/who"), format!("{who}\n"))?;
        let layout = env.path(&format!("{who}/cora"));
        convert_to_layout(&env, &tree, &layout)?;
        images.push(env.registry.push(&layout, "v1", &format!("test/{who}"))?);
    }

    let report = env.rpull(&images[0])?;
    assert_eq!(
        report.matches(": remote, fetched 0 of ").count(),
        1,
        "{report}"
    );
    env.wait_attach_at_pull()?;
    let (out, lazy_id) = env.run(&images[0], "lazy", &["cat", "/etc/who"])?;
    assert_eq!(out, "lazy\n");
    let devices = env.devices()?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].transport, TRANSPORT_FUSE);

    let pulled = env.ctrd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "cora",
        &images[1],
    ])?;
    assert!(pulled.contains("Completed pull"), "{pulled}");
    let (out, pulled_id) = env.run(&images[1], "pulled", &["cat", "/etc/who"])?;
    assert_eq!(out, "pulled\n");
    let log = env.log();
    assert_eq!(log.matches("layer committed as remote").count(), 1, "{log}");
    assert_eq!(env.devices()?.len(), 1);

    for id in [&lazy_id, &pulled_id] {
        env.ctrd.ctr(&["containers", "rm", id])?;
    }
    env.remove_images()?;
    env.assert_all_detached().with_context(|| env.log())?;
    Ok(())
}

/// containerd 2.1's CRI (`use_local_image_pull`, snapshot annotations on): `PullImage` of a
/// CORA image commits its layer remote without downloading it, and a container of the pulled
/// image (started with `ctr` in CRI's namespace: no CNI here for a pod) reads the lazily served
/// stack.
#[test]
fn containerd_2_cri_pulls_cora_layers_lazily() -> Result<()> {
    let env = Env::start_on(serde_json::json!({}), Runtime::Containerd2Cri)?;
    let tree = env.path("cri/rootfs");
    busybox_rootfs(&tree)?;
    std::fs::write(tree.join("etc/who"), "cri\n")?;
    let layout = env.path("cri/cora");
    convert_to_layout(&env, &tree, &layout)?;
    let image = env.registry.push(&layout, "v1", "test/cri")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(pull_image(&env.ctrd.address, &image))
        .with_context(|| env.ctrd.log_text())?;
    let log = env.log();
    assert_eq!(log.matches("layer committed as remote").count(), 1, "{log}");
    let (out, id) = env.run_in(CRI_NAMESPACE, &image, "cri", &["cat", "/etc/who"])?;
    assert_eq!(out, "cri\n");
    let devices = env.devices()?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    env.ctrd.ctr_in(CRI_NAMESPACE, &["containers", "rm", &id])?;
    for name in env
        .ctrd
        .ctr_in(CRI_NAMESPACE, &["images", "ls", "-q"])?
        .lines()
    {
        env.ctrd
            .ctr_in(CRI_NAMESPACE, &["images", "rm", "--sync", name.trim()])?;
    }
    env.assert_all_detached().with_context(|| env.log())?;
    Ok(())
}

/// Converts the one-layer tree `tree` to a CORA image (erofs) in the OCI layout `layout`, tag v1.
fn convert_to_layout(env: &Env, tree: &Path, layout: &Path) -> Result<()> {
    let name = layout.file_name().context("layout path")?.to_string_lossy();
    let src = env.path(&format!("src-{name}"));
    blobfmt::dirsrc::layout_from_dirs(&[tree], &src, "v1", true)?;
    run(Command::new(cora_bin("cora"))
        .args(["convert", "--fs", "erofs"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:v1", layout.display()))
        .arg("--work")
        .arg(env.path(&format!("work-{name}"))))?;
    Ok(())
}

/// Rewrites the one-layer CORA image in `layout` (tag v1) to claim the tar `diff_id`: its
/// trailer (resealed, with the manifest's trailer annotations to match) and its config say so.
/// Every check a reader can make without reading the whole layer passes; its file system is
/// still its own.
fn claim_diff_id(layout: &Path, diff_id: &str) -> Result<()> {
    use blobfmt::oci::{annotation, put_blob, read_blob, tag_manifest};
    let img = blobfmt::oci::open_layout(layout, Some("v1"))?;
    let mut manifest = img.manifest.clone();
    ensure!(manifest.layers.len() == 1, "{manifest:?}");
    let layer = &mut manifest.layers[0];
    let blob = read_blob(layout, &layer.digest)?;
    let (footer, mut trailer) = blobfmt::read_trailer(blob.len() as u64, &mut |o, n| {
        Ok(blob[o as usize..(o + n) as usize].to_vec())
    })?;
    trailer.diff_id = blobfmt::parse_oci_digest(diff_id)?;
    let frame = trailer.encode_frame(3)?;
    let footer = blobfmt::Footer {
        trailer_length: frame.len() as u64,
        trailer_digest: blobfmt::sha256(&frame),
        ..footer
    };
    let mut forged = blob[..footer.trailer_offset as usize].to_vec();
    forged.extend_from_slice(&frame);
    forged.extend_from_slice(&footer.encode());
    layer.digest = put_blob(layout, &forged)?;
    layer.size = forged.len() as u64;
    let ann = layer.annotations.get_or_insert_default();
    ann.insert(annotation::TRAILER_LENGTH.into(), frame.len().to_string());
    ann.insert(
        annotation::TRAILER_DIGEST.into(),
        blobfmt::oci_digest(&footer.trailer_digest),
    );
    let mut config: serde_json::Value = serde_json::from_slice(&img.config_bytes)?;
    config["rootfs"]["diff_ids"] = serde_json::json!([diff_id]);
    let config = serde_json::to_vec(&config)?;
    manifest.config.digest = put_blob(layout, &config)?;
    manifest.config.size = config.len() as u64;
    let bytes = serde_json::to_vec(&manifest)?;
    put_blob(layout, &bytes)?;
    tag_manifest(layout, "v1", &bytes)?;
    Ok(())
}

/// containerd finds a remote snapshot by its chain id for every namespace. An image whose
/// index claims another image's diff_ids (which nothing can check before the whole layer is
/// read) is served as it is in its own namespace, but a pull of the real image elsewhere gets
/// the real layer, unpacked and checked by containerd, not the impostor's file system.
#[test]
fn an_image_claiming_anothers_diff_ids_is_not_served_to_other_namespaces() -> Result<()> {
    let env = Env::start()?;
    let mut layouts = Vec::new();
    for who in ["honest", "impostor"] {
        let tree = env.path(&format!("{who}/rootfs"));
        busybox_rootfs(&tree)?;
        std::fs::write(tree.join("etc/who"), format!("{who}\n"))?;
        let layout = env.path(&format!("{who}/cora"));
        convert_to_layout(&env, &tree, &layout)?;
        layouts.push(layout);
    }
    let honest = blobfmt::oci::open_layout(&layouts[0], Some("v1"))?;
    let diff_id = honest.config.rootfs.diff_ids[0].clone();
    claim_diff_id(&layouts[1], &diff_id)?;
    let honest_ref = env.registry.push(&layouts[0], "v1", "test/honest")?;
    let impostor_ref = env.registry.push(&layouts[1], "v1", "test/impostor")?;

    // The impostor, pulled first in a namespace of its own, passes every check made before
    // its layer is read whole: it is lazily served, its own file system.
    let report = env.rpull_in("tenant", &impostor_ref)?;
    assert_eq!(report.matches(": remote").count(), 1, "{report}");
    let (out, impostor_id) =
        env.run_in("tenant", &impostor_ref, "impostor", &["cat", "/etc/who"])?;
    assert_eq!(out, "impostor\n");

    // The real image in the default namespace: same chain id, another blob.
    let report = env.rpull(&honest_ref)?;
    assert_eq!(report.matches(": unpacked").count(), 1, "{report}");
    let (out, honest_id) = env.run(&honest_ref, "honest", &["cat", "/etc/who"])?;
    assert_eq!(out, "honest\n", "the impostor's file system was served");
    let log = env.log();
    assert!(
        log.contains("not reusing it, unpacking this layer"),
        "{log}"
    );

    env.ctrd
        .ctr_in("tenant", &["containers", "rm", &impostor_id])?;
    env.ctrd.ctr(&["containers", "rm", &honest_id])?;
    env.ctrd
        .ctr_in("tenant", &["images", "rm", "--sync", &impostor_ref])?;
    env.remove_images()?;
    env.assert_all_detached().with_context(|| env.log())?;
    Ok(())
}

/// The kernel's ext4 is not hardened against crafted images: by default an ext4 CORA layer
/// is unpacked by containerd like any tar+zstd layer, and never mounted from the image.
#[test]
fn ext4_stacks_are_unpacked_unless_allowed() -> Result<()> {
    let env = Env::start()?;
    let tree = fixtures::debian_tree("small", fixtures::SMALL)?;
    let image = env.convert(&tree, "ext4", "test/ext4")?;
    let report = env.rpull(&image)?;
    assert_eq!(report.matches(": remote").count(), 0, "{report}");
    assert_eq!(report.matches(": unpacked").count(), 1, "{report}");
    let (out, id) = env.run(&image, "ext4", &["/bin/busybox", "echo", "unpacked ext4"])?;
    assert_eq!(out, "unpacked ext4\n");
    let log = env.log();
    assert!(log.contains("allowExt4"), "{log}");
    assert_eq!(env.devices()?, Vec::new());
    env.ctrd.ctr(&["containers", "rm", &id])?;
    env.remove_images()?;
    Ok(())
}

#[test]
fn ext4_stack_through_fuse_goes_through_a_loop_device_freed_on_detach() -> Result<()> {
    let env = Env::start_with(serde_json::json!({ "allowExt4": true }))?;
    // ext4 never mounts a regular file: the FUSE image file gets a read-only loop device (the
    // path erofs takes on kernels before 6.12).
    let tree = fixtures::debian_tree("small", fixtures::SMALL)?;
    let image = env.convert(&tree, "ext4", "test/ext4")?;
    let report = env.rpull(&image)?;
    assert_eq!(
        report.matches(": remote, fetched 0 of ").count(),
        1,
        "{report}"
    );
    env.wait_attach_at_pull()?;
    let (out, id) = env.run(
        &image,
        "ext4",
        &["/bin/busybox", "echo", "ext4 through FUSE"],
    )?;
    assert_eq!(out, "ext4 through FUSE\n");
    let log = env.log();
    assert!(log.contains("mounted it through a loop device"), "{log}");
    let loops = env.loop_devices()?;
    assert_eq!(loops.len(), 1, "{loops:?}");
    let devices = env.devices()?;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].transport, TRANSPORT_FUSE);

    env.ctrd.ctr(&["containers", "rm", &id])?;
    env.remove_images()?;
    env.assert_all_detached().with_context(|| env.log())?;
    let loops = env.loop_devices()?;
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
    Ok(())
}
