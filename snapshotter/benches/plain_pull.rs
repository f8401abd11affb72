//! Plain OCI images through cora-snapshotter cost what containerd's built-in overlayfs costs:
//! pull + run of the same image, same containerd, alternating, printed as ratios (about 1 is
//! right). `cargo bench -p cora-snapshotter --bench plain_pull` (root; starts its own
//! docker-registry, containerd and snapshotter).
use anyhow::{Result, bail};
use cora_tests::containerd::Containerd;
use cora_tests::images::{Compression, LayerSpec, Registry, busybox_rootfs, write_oci_layout};
use cora_tests::snapshotter::CoraSnapshotter;
use std::path::Path;
use std::time::{Duration, Instant};

fn main() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("cora-bench-")
        .tempdir_in("/var/tmp")?;
    let registry = Registry::start(&dir.path().join("registry"))?;
    let sdir = dir.path().join("snapshotter");
    CoraSnapshotter::write_config(&sdir, &serde_json::json!({"verbose": "info"}))?;
    let snap = CoraSnapshotter::start(Path::new(env!("CARGO_BIN_EXE_cora-snapshotter")), &sdir)?;
    let ctrd = Containerd::start(&dir.path().join("containerd"), &[("cora", &snap.socket)])?;
    // Busybox plus 16 MiB of incompressible files in a second layer makes unpacking measurable.
    let rootfs = dir.path().join("img/rootfs");
    busybox_rootfs(&rootfs)?;
    let data = dir.path().join("img/data");
    std::fs::create_dir_all(data.join("data"))?;
    for i in 0..64 {
        let buf = cora_testdata::pseudo_random(256 << 10, i);
        std::fs::write(data.join(format!("data/f{i}")), &buf)?;
    }
    let layout = dir.path().join("img/layout");
    write_oci_layout(
        &layout,
        "v1",
        &[LayerSpec::new(&rootfs), LayerSpec::new(&data)],
        Compression::Zstd,
        &["/bin/sh"],
    )?;
    let reference = registry.push(&layout, "v1", "bench/img")?;
    let mut totals = [(Duration::ZERO, Duration::ZERO); 2];
    let rounds = 3;
    for round in 0..rounds {
        for (i, sn) in ["cora", "overlayfs"].iter().enumerate() {
            let (p, r) = pull_and_run(&ctrd, sn, &reference, &format!("b-{sn}-{round}"))?;
            totals[i].0 += p;
            totals[i].1 += r;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / rounds as f64;
    let (cp, cr) = (ms(totals[0].0), ms(totals[0].1));
    let (op, or) = (ms(totals[1].0), ms(totals[1].1));
    println!(
        "pull+run (mean of {rounds}, 16 MiB zstd image): cora pull {cp:.0} ms run {cr:.0} ms | overlayfs pull {op:.0} ms run {or:.0} ms | ratio pull {:.2} run {:.2} total {:.2}",
        cp / op,
        cr / or,
        (cp + cr) / (op + or)
    );
    // containerd stops (and unmounts) before the snapshotter.
    drop(ctrd);
    drop(snap);
    Ok(())
}

/// One pull + run, timed.
fn pull_and_run(
    c: &Containerd,
    snapshotter: &str,
    reference: &str,
    id: &str,
) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    c.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        snapshotter,
        reference,
    ])?;
    let pull = t.elapsed();
    let t = Instant::now();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        reference,
        id,
        "/bin/busybox",
        "echo",
        "hi",
    ])?;
    let run = t.elapsed();
    if out.trim() != "hi" {
        bail!("unexpected output {out:?}");
    }
    // Drop image, content and snapshots so the next pull starts cold.
    c.ctr(&["images", "rm", "--sync", reference])?;
    Ok((pull, run))
}
