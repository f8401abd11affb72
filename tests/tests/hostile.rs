//! A hostile registry (test code on loopback) serves crafted manifests and configs and
//! bodies that disagree with their descriptors. Each case must end in a clear error from the
//! binary that meets it: no panic, nothing written where the output was to go, and no stack
//! served under diff_ids its index does not describe.
use anyhow::{Context, Result, ensure};
use blobfmt::oci::{self, Manifest, annotation};
use cora_tests::fixtures::{cora_bin, run};
use cora_tests::hostile::{Body, HostileRegistry, digest};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Two converted images that share their bottom layer: `honest` and `other`.
struct Images {
    dir: tempfile::TempDir,
    honest: oci::LayoutImage,
    other: oci::LayoutImage,
}

fn tree(root: &Path, files: &[(&str, usize, u64)]) -> Result<()> {
    for (name, len, seed) in files {
        let p = root.join(name);
        std::fs::create_dir_all(p.parent().context("file without parent")?)?;
        std::fs::write(&p, cora_testdata::pseudo_random(*len, *seed))?;
    }
    Ok(())
}

fn convert(dir: &Path, name: &str, layers: &[&Path]) -> Result<oci::LayoutImage> {
    let src = dir.join(format!("src-{name}"));
    blobfmt::dirsrc::layout_from_dirs(layers, &src, "v1", true)?;
    let dst = dir.join(format!("cora-{name}"));
    run(Command::new(cora_bin("cora"))
        .arg("convert")
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:cora", dst.display())))?;
    Ok(oci::open_layout(&dst, Some("cora"))?)
}

impl Images {
    fn build() -> Result<Images> {
        let dir = tempfile::tempdir()?;
        let (base, app, app2) = (
            dir.path().join("base"),
            dir.path().join("app"),
            dir.path().join("app2"),
        );
        tree(
            &base,
            &[("usr/lib/libbase.so", 300_000, 1), ("etc/os", 100, 2)],
        )?;
        tree(
            &app,
            &[("app/main.py", 40_000, 3), ("app/data.bin", 500_000, 4)],
        )?;
        tree(
            &app2,
            &[("app/main.py", 40_000, 5), ("app/evil.bin", 500_000, 6)],
        )?;
        let honest = convert(dir.path(), "honest", &[&base, &app])?;
        let other = convert(dir.path(), "other", &[&base, &app2])?;
        Ok(Images { dir, honest, other })
    }
}

/// Serves `manifest` with `config` (a JSON value) as `repo:v1`; the blobs of both images
/// are there already.
fn serve(reg: &HostileRegistry, manifest: &Manifest, config: &serde_json::Value) -> Result<()> {
    let bytes = serde_json::to_vec(config)?;
    let mut m = manifest.clone();
    m.config.size = bytes.len() as u64;
    m.config.digest = reg.put_blob(bytes);
    reg.put_manifest("v1", &m)?;
    Ok(())
}

fn config_json(img: &oci::LayoutImage) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&img.config_bytes)?)
}

/// Runs `cora export` (the lazy read path) or `cora-driver unpack` (the verified fallback)
/// against the hostile registry; returns stderr of a failure, or `None` on success.
fn attempt(work: &Path, reg: &HostileRegistry, how: &str) -> Result<Option<String>> {
    let image = format!("{}/app:v1", reg.host);
    let out = work.join("out");
    let mut cmd = match how {
        "export" => {
            let mut c = Command::new(cora_bin("cora"));
            c.args(["export", "--insecure", &reg.host, "--cache"])
                .arg(work.join("cache"))
                .arg(&image)
                .arg(&out);
            c
        }
        _ => {
            let mut c = Command::new(cora_bin("cora-driver"));
            c.args([
                "unpack",
                "--insecure",
                &reg.host,
                "--image",
                &image,
                "--into",
            ])
            .arg(&out)
            .arg("--cache")
            .arg(work.join("cache"));
            c
        }
    };
    let o = cmd
        .current_dir(work)
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    ensure!(
        !stderr.contains("panicked") && o.status.code().is_some_and(|c| c != 101),
        "{how} panicked: {stderr}"
    );
    if o.status.success() {
        return Ok(None);
    }
    ensure!(
        !out.exists(),
        "{how} failed but left {} behind: {stderr}",
        out.display()
    );
    Ok(Some(stderr))
}

/// One crafted image and what each path must say about it (`None`: it must succeed).
struct Case {
    name: &'static str,
    manifest: Manifest,
    config: serde_json::Value,
    /// Whole-blob GETs of the config get this body.
    config_body: Option<Body>,
    export: Option<&'static str>,
    unpack: Option<&'static str>,
}

fn work_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let d = root.join("work").join(name);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_images_end_in_clear_errors() -> Result<()> {
    let imgs = tokio::task::spawn_blocking(Images::build).await??;
    let reg = HostileRegistry::start().await?;
    reg.add_blobs_of(&imgs.honest.root)?;
    reg.add_blobs_of(&imgs.other.root)?;
    let honest = &imgs.honest.manifest;
    let honest_config = config_json(&imgs.honest)?;

    let mut cases = vec![Case {
        name: "honest",
        manifest: honest.clone(),
        config: honest_config.clone(),
        config_body: None,
        export: None,
        unpack: None,
    }];

    // The other image's layers under the honest image's diff_ids: what would poison the
    // honest image's chain ids in containerd.
    let mut forged = config_json(&imgs.other)?;
    forged["rootfs"]["diff_ids"] = honest_config["rootfs"]["diff_ids"].clone();
    cases.push(Case {
        name: "claims another image's diff_ids",
        manifest: imgs.other.manifest.clone(),
        config: forged,
        config_body: None,
        export: Some("refusing to serve it"),
        unpack: Some("but the image config says"),
    });

    let mut no_digest = honest.clone();
    for l in &mut no_digest.layers {
        if let Some(a) = l.annotations.as_mut() {
            a.remove(annotation::TRAILER_DIGEST);
        }
    }
    cases.push(Case {
        name: "layer without its trailer digest",
        manifest: no_digest,
        config: honest_config.clone(),
        config_body: None,
        export: Some("lacks annotation containerd.io/snapshot/cora/trailer-digest"),
        unpack: None,
    });

    // The top layer's trailer digest swapped for the other image's: the index read from
    // the blob does not match what the manifest vouches for.
    let mut swapped = honest.clone();
    let other_top = imgs.other.manifest.layers.last().context("no layers")?;
    let other_digest = other_top
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotation::TRAILER_DIGEST))
        .context("other image without trailer digest")?
        .clone();
    if let Some(a) = swapped
        .layers
        .last_mut()
        .and_then(|l| l.annotations.as_mut())
    {
        a.insert(annotation::TRAILER_DIGEST.into(), other_digest);
    }
    cases.push(Case {
        name: "trailer digest of another layer",
        manifest: swapped,
        config: honest_config.clone(),
        config_body: None,
        export: Some("trailer digest mismatch"),
        unpack: None,
    });

    let mut miscounted = honest_config.clone();
    if let Some(ids) = miscounted["rootfs"]["diff_ids"].as_array_mut() {
        ids.pop();
    }
    cases.push(Case {
        name: "config with one diff_id too few",
        manifest: honest.clone(),
        config: miscounted,
        config_body: None,
        export: Some("config lists 1 diff_ids for 2 layers"),
        unpack: Some("config lists 1 diff_ids for 2 layers"),
    });

    let mut malformed = honest_config.clone();
    malformed["rootfs"]["diff_ids"][0] = "sha256:../../etc/passwd".into();
    cases.push(Case {
        name: "config with a malformed diff_id",
        manifest: honest.clone(),
        config: malformed,
        config_body: None,
        export: Some("digest"),
        unpack: Some("digest"),
    });

    cases.push(Case {
        name: "config body longer than its descriptor",
        manifest: honest.clone(),
        config: honest_config.clone(),
        config_body: Some(Body::Padded(1 << 20)),
        export: Some("exceeds"),
        unpack: Some("exceeds"),
    });

    let mut tally = Vec::new();
    for case in &cases {
        let work = work_dir(imgs.dir.path(), &case.name.replace(' ', "-"))?;
        serve(&reg, &case.manifest, &case.config)?;
        let config_digest = {
            let bytes = serde_json::to_vec(&case.config)?;
            digest(&bytes)
        };
        if let Some(b) = &case.config_body {
            reg.set_body(&config_digest, b.clone());
        }
        for (how, want) in [("export", case.export), ("unpack", case.unpack)] {
            let w = work_dir(&work, how)?;
            let r = {
                let reg = &reg;
                let w = w.clone();
                tokio::task::block_in_place(|| attempt(&w, reg, how))?
            };
            let outcome = match (want, r) {
                (None, None) => "ok".to_string(),
                (None, Some(e)) => anyhow::bail!("{}: {how} failed: {e}", case.name),
                (Some(w), None) => anyhow::bail!("{}: {how} succeeded, expected {w:?}", case.name),
                (Some(w), Some(e)) => {
                    ensure!(
                        e.contains(w),
                        "{}: {how}: expected {w:?} in: {e}",
                        case.name
                    );
                    e.trim().lines().last().unwrap_or_default().to_string()
                }
            };
            tally.push(format!("{} / {how}: {outcome}", case.name));
        }
    }
    // The forged case must have been asked for the other image's top layer: the refusal
    // came after reading its index, not from a request that never happened.
    let other_top_digest = &imgs.other.manifest.layers[1].digest;
    ensure!(
        reg.server
            .requests()
            .iter()
            .any(|r| r.path.ends_with(other_top_digest.as_str())),
        "the forged image's top layer was never read"
    );
    println!("{}", tally.join("\n"));
    Ok(())
}

/// A manifest over the 4 MiB limit and a config descriptor claiming a terabyte are refused
/// before any of it is buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_manifests_and_configs_are_refused_unread() -> Result<()> {
    let imgs = tokio::task::spawn_blocking(Images::build).await??;
    let reg = HostileRegistry::start().await?;
    reg.add_blobs_of(&imgs.honest.root)?;

    let mut huge = serde_json::to_value(&imgs.honest.manifest)?;
    huge["annotations"] = serde_json::json!({ "padding": "x".repeat(5 << 20) });
    reg.put_manifest_bytes("v1", oci::MT_OCI_MANIFEST, serde_json::to_vec(&huge)?);
    let work = work_dir(imgs.dir.path(), "huge-manifest")?;
    let e = tokio::task::block_in_place(|| attempt(&work, &reg, "export"))?
        .context("a 5 MiB manifest was accepted")?;
    ensure!(e.contains("limit"), "{e}");

    let mut m = imgs.honest.manifest.clone();
    m.config.size = 1 << 40;
    reg.put_manifest("v1", &m)?;
    let before = reg.server.requests().len();
    for how in ["export", "unpack"] {
        let work = work_dir(imgs.dir.path(), &format!("huge-config-{how}"))?;
        let e = tokio::task::block_in_place(|| attempt(&work, &reg, how))?
            .context("a 1 TiB config was accepted")?;
        ensure!(e.contains("limit for blobs read into memory"), "{how}: {e}");
    }
    ensure!(
        !reg.server.requests()[before..]
            .iter()
            .any(|r| r.path.ends_with(&m.config.digest)),
        "the config was requested anyway"
    );
    Ok(())
}
