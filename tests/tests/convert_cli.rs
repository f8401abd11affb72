//! `cora convert|inspect|export` against real components: Debian's docker-registry (plain and
//! TLS + htpasswd), skopeo and umoci to move and unpack images, zstd and fsck.erofs.

use anyhow::Result;
use cora_tests::fixtures::{self, cora_bin, run, tree_manifest};
use cora_tests::registry::Registry;
use cora_tests::tls::TestCa;
use sha2::Digest as _;
use std::path::Path;
use std::process::Command;

fn cora() -> Command {
    Command::new(cora_bin("cora"))
}

/// Two real layers: a small Debian tree, and Python over it with a whiteout.
fn source_layout(dir: &Path) -> Result<std::path::PathBuf> {
    let base = fixtures::debian_tree("small", fixtures::SMALL)?;
    let upper = dir.join("upper");
    std::fs::create_dir_all(upper.join("usr/share/doc"))?;
    // Whiteout of a lower directory, and a new file.
    std::fs::write(upper.join("usr/share/doc/.wh.zlib1g"), b"")?;
    std::fs::write(upper.join("hello.txt"), b"hello from layer 1\n")?;
    let layout = dir.join("src");
    blobfmt::dirsrc::layout_from_dirs(&[&base, &upper], &layout, "v1", true)?;
    Ok(layout)
}

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> Result<std::path::PathBuf> {
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(bundle))?;
    Ok(bundle.join("rootfs"))
}

#[test]
fn registry_round_trip_unpacks_to_the_same_tree() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    let reg = Registry::start()?;
    let host = reg.host.clone();
    run(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("docker://{host}/app:v1")))?;
    let out = run(cora().args([
        "convert",
        "--insecure",
        &host,
        &format!("{host}/app:v1"),
        &format!("{host}/app:cora"),
    ]))?;
    assert!(out.contains("2 layers"), "{out}");

    // Pull the converted image with skopeo and unpack with umoci: same tree as the source.
    // umoci 0.4 cannot read zstd layers, so skopeo decodes them (its own zstd decoder,
    // which must ignore our skippable frames) and re-encodes gzip on the way.
    let pulled = tmp.path().join("pulled");
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{host}/app:cora"))
        .arg(format!("oci:{}:cora", pulled.display())))?;
    let regz = tmp.path().join("regz");
    run(Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "gzip"])
        .arg(format!("oci:{}:cora", pulled.display()))
        .arg(format!("oci:{}:cora", regz.display())))?;
    let a = umoci_unpack(&src, "v1", &tmp.path().join("b-src"))?;
    let b = umoci_unpack(&regz, "cora", &tmp.path().join("b-cora"))?;
    let (ta, tb) = (tree_manifest(&a)?, tree_manifest(&b)?);
    assert!(ta.len() > 100, "source tree suspiciously small");
    assert_eq!(ta, tb, "converted image unpacks to a different tree");
    assert!(
        !ta.contains_key("usr/share/doc/zlib1g"),
        "whiteout not applied by umoci"
    );

    // Each converted layer is a zstd stream of the original tar: zstd -d gives the diff_id.
    let img = blobfmt::oci::open_layout(&pulled, Some("cora"))?;
    for (l, diff_id) in img.manifest.layers.iter().zip(&img.config.rootfs.diff_ids) {
        assert_eq!(l.media_type, blobfmt::oci::MT_LAYER_ZSTD);
        let tar = run(Command::new("sh").arg("-c").arg(format!(
            "zstd -dc < {} | sha256sum",
            img.blob_path(&l.digest)?.display()
        )))?;
        assert_eq!(format!("sha256:{}", &tar[..64]), *diff_id);
    }

    // The lazy path rebuilds the top stack; fsck.erofs extracts the same tree.
    let image = tmp.path().join("stack.img");
    let cache = tmp.path().join("cache");
    let out = run(cora()
        .args(["export", "--insecure", &host, &format!("{host}/app:cora")])
        .arg(&image)
        .arg("--cache")
        .arg(&cache))?;
    assert!(out.contains("fetched"), "{out}");
    let ex = tmp.path().join("extracted");
    run(Command::new("fsck.erofs")
        .arg(format!("--extract={}", ex.display()))
        .arg(&image))?;
    let te = tree_manifest(&ex)?;
    // fsck.erofs drops set-id bits and the root's own entry differs; compare contents.
    let strip = |m: &std::collections::BTreeMap<String, String>| -> Vec<(String, String)> {
        m.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.split(' ').take(2).collect::<Vec<_>>().join(" "),
                )
            })
            .collect()
    };
    assert_eq!(
        strip(&ta),
        strip(&te),
        "exported stack image holds a different tree"
    );

    // inspect --verify checks every chunk over the registry.
    let out = run(cora().args([
        "inspect",
        "--verify",
        "--insecure",
        &host,
        &format!("{host}/app:cora"),
    ]))?;
    assert!(out.contains("all digests match"), "{out}");
    Ok(())
}

#[test]
fn tls_registry_with_htpasswd_needs_ca_and_credentials() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    let ca = TestCa::new()?;
    let reg = Registry::builder()
        .tls(&ca)
        .htpasswd("alice", "s3cret-pw")
        .start()?;
    let host = reg.host.clone();
    let creds = tmp.path().join("cred.json");
    std::fs::write(
        &creds,
        format!(r#"{{"auths":{{"{host}":{{"username":"alice","password":"s3cret-pw"}}}}}}"#),
    )?;
    let ca_file = reg.ca_file.clone().expect("tls registry has a CA");
    let dst = format!("{host}/secure:v1");
    let src_ref = format!("oci:{}:v1", src.display());

    let no_ca = cora()
        .args(["convert", &src_ref, &dst])
        .arg("--creds")
        .arg(&creds)
        .output()?;
    assert!(!no_ca.status.success(), "must fail without the CA");
    let err = String::from_utf8_lossy(&no_ca.stderr);
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("tls"),
        "{err}"
    );

    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        format!(r#"{{"auths":{{"{host}":{{"username":"alice","password":"wrong"}}}}}}"#),
    )?;
    let denied = cora()
        .args(["convert", &src_ref, &dst])
        .arg("--ca")
        .arg(&ca_file)
        .arg("--creds")
        .arg(&bad)
        .output()?;
    assert!(!denied.status.success(), "must fail with a wrong password");
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !err.contains("wrong"),
        "password leaked into the error: {err}"
    );

    run(cora()
        .args(["convert", &src_ref, &dst])
        .arg("--ca")
        .arg(&ca_file)
        .arg("--creds")
        .arg(&creds))?;
    let out = run(cora()
        .args(["inspect", "--verify", &dst])
        .arg("--ca")
        .arg(&ca_file)
        .arg("--creds")
        .arg(&creds))?;
    assert!(out.contains("all digests match"), "{out}");
    Ok(())
}

/// Copy the layout, then damage one layer blob in place (its digest no longer matches, which
/// is what a bad disk or a lying server produces).
fn damaged_copy(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&mut Vec<u8>, &blobfmt::Trailer),
) -> Result<String> {
    run(Command::new("cp").arg("-a").arg(src).arg(dst))?;
    let img = blobfmt::oci::open_layout(dst, Some("cora"))?;
    let l = &img.manifest.layers[0];
    let path = img.blob_path(&l.digest)?;
    let mut bytes = std::fs::read(&path)?;
    let size = bytes.len() as u64;
    let (_, t) = blobfmt::read_trailer(size, &mut |o, n| {
        Ok(bytes[o as usize..(o + n) as usize].to_vec())
    })?;
    edit(&mut bytes, &t);
    std::fs::write(&path, &bytes)?;
    Ok(l.digest.clone())
}

#[test]
fn bad_blobs_are_named_and_never_served() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    let good = tmp.path().join("good");
    run(cora().args([
        "convert",
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:cora", good.display()),
    ]))?;

    // A flipped byte inside chunk 3's frame: --verify names the layer and the chunk.
    let bad = tmp.path().join("bad-chunk");
    let digest = damaged_copy(&good, &bad, |b, t| {
        let c = &t.chunks[3];
        b[(c.frame_offset + u64::from(c.compressed_len) / 2) as usize] ^= 0x40;
    })?;
    let out = cora()
        .args([
            "inspect",
            "--verify",
            &format!("oci:{}:cora", bad.display()),
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&digest) && err.contains("chunk 3"), "{err}");
    // The lazy path refuses to export it, and leaves no output behind.
    let img = tmp.path().join("out.img");
    let out = cora()
        .args(["export", &format!("oci:{}:cora", bad.display())])
        .arg(&img)
        .arg("--cache")
        .arg(tmp.path().join("cache"))
        .output()?;
    assert!(!out.status.success(), "corrupt chunk must fail the export");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("digest mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !img.exists(),
        "a failed export left an output that looks complete"
    );

    // Truncated blob: the footer is gone.
    let trunc = tmp.path().join("truncated");
    damaged_copy(&good, &trunc, |b, _| b.truncate(b.len() - 10))?;
    let out = cora()
        .args(["inspect", &format!("oci:{}:cora", trunc.display())])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("footer") || err.contains("trailer"), "{err}");

    // Trailer digest mismatch.
    let sealed = tmp.path().join("bad-trailer");
    damaged_copy(&good, &sealed, |b, _| {
        let n = b.len();
        b[n - 100] ^= 1;
    })?;
    let out = cora()
        .args(["inspect", &format!("oci:{}:cora", sealed.display())])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trailer digest mismatch"));
    Ok(())
}

#[test]
fn unusable_sources_fail_clearly_without_output() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    // Unknown layer media type.
    let odd = tmp.path().join("odd");
    run(Command::new("cp").arg("-a").arg(&src).arg(&odd))?;
    let img = blobfmt::oci::open_layout(&odd, Some("v1"))?;
    let mut m = img.manifest.clone();
    m.layers[1].media_type = "application/x-mystery".into();
    let bytes = serde_json::to_vec(&m)?;
    blobfmt::oci::put_blob(&odd, &bytes)?;
    blobfmt::oci::tag_manifest(&odd, "v1", &bytes)?;
    let dst = tmp.path().join("dst");
    let out = cora()
        .args([
            "convert",
            &format!("oci:{}:v1", odd.display()),
            &format!("oci:{}:x", dst.display()),
        ])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown layer media type") && err.contains("application/x-mystery"),
        "{err}"
    );
    assert!(
        !dst.join("index.json").exists(),
        "failed conversion wrote an index"
    );

    // A manifest without layers.
    m.layers.clear();
    let bytes = serde_json::to_vec(&m)?;
    blobfmt::oci::put_blob(&odd, &bytes)?;
    blobfmt::oci::tag_manifest(&odd, "empty", &bytes)?;
    let out = cora()
        .args([
            "convert",
            &format!("oci:{}:empty", odd.display()),
            &format!("oci:{}:x", dst.display()),
        ])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest has no layers"));

    // A plain (non-CORA) image is reported as such, not misread.
    let out = run(cora().args(["inspect", &format!("oci:{}:v1", src.display())]))?;
    assert!(out.contains("not CORA"), "{out}");
    Ok(())
}

#[test]
fn sha256_of_blob_matches_its_name() -> Result<()> {
    // Converted blobs are content-addressed like every OCI blob.
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    let dst = tmp.path().join("dst");
    run(cora().args([
        "convert",
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:cora", dst.display()),
    ]))?;
    for e in std::fs::read_dir(dst.join("blobs/sha256"))? {
        let p = e?.path();
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        assert_eq!(hex::encode(sha2::Sha256::digest(std::fs::read(&p)?)), name);
    }
    Ok(())
}

#[test]
fn ext4_stacks_pass_e2fsck_and_hold_the_tree() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    let dst = tmp.path().join("ext4");
    run(cora()
        .args(["convert", "--fs", "ext4"])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:cora", dst.display())))?;
    let out = run(cora().args(["inspect", &format!("oci:{}:cora", dst.display())]))?;
    assert!(out.contains("ext4"), "{out}");
    let image = tmp.path().join("stack.img");
    run(cora()
        .args(["export", &format!("oci:{}:cora", dst.display())])
        .arg(&image)
        .arg("--cache")
        .arg(tmp.path().join("cache")))?;
    run(Command::new("e2fsck").arg("-fn").arg(&image))?;
    // Extract with debugfs (no mount needed) and compare contents with umoci's unpack.
    let ex = tmp.path().join("rdump");
    std::fs::create_dir(&ex)?;
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", ex.display()))
        .arg(&image))?;
    let a = umoci_unpack(&src, "v1", &tmp.path().join("b-src"))?;
    let files = |m: std::collections::BTreeMap<String, String>| -> Vec<(String, String)> {
        m.into_iter()
            .filter(|(k, v)| v.starts_with("f ") && !k.starts_with("lost+found"))
            .map(|(k, v)| (k, v.split(' ').take(2).collect::<Vec<_>>().join(" ")))
            .collect()
    };
    let (ta, te) = (files(tree_manifest(&a)?), files(tree_manifest(&ex)?));
    assert!(ta.len() > 100);
    assert_eq!(ta, te, "ext4 stack image holds different file contents");
    Ok(())
}

/// The snapshotter's fallback when no device can start: `cora-driver unpack` of a CORA image
/// from the registry gives the tree umoci unpacks from the source image; a lower stack stops at
/// its layer; bad input is refused and leaves nothing behind.
#[test]
fn driver_unpack_gives_the_tree_of_the_stack() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let src = source_layout(tmp.path())?;
    let reg = Registry::start()?;
    let host = reg.host.clone();
    let image = format!("{host}/app:cora");
    run(cora()
        .args(["convert", "--insecure", &host])
        .arg(format!("oci:{}:v1", src.display()))
        .arg(&image))?;
    let unpack = |extra: &[&str], into: &Path| {
        let mut cmd = Command::new(cora_bin("cora-driver"));
        cmd.args(["unpack", "--insecure", &host, "--image", &image])
            .args(extra)
            .arg("--into")
            .arg(into);
        cmd
    };
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir)?;

    let top = out_dir.join("top");
    let out = run(&mut unpack(&[], &top))?;
    let report: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(report["layers"], 2, "{out}");
    assert!(
        report["blob_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "{out}"
    );
    let reference = umoci_unpack(&src, "v1", &tmp.path().join("b-src"))?;
    let want = tree_manifest(&reference)?;
    assert!(want.len() > 100, "source tree suspiciously small");
    assert_eq!(
        tree_manifest(&top)?,
        want,
        "unpacked stack differs from umoci's"
    );

    // The stack under layer 1: the whiteout and the new file are not there.
    let manifest = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}")))?;
    let manifest: serde_json::Value = serde_json::from_str(&manifest)?;
    let layer0 = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let lower = out_dir.join("lower");
    run(&mut unpack(&["--layer-digest", &layer0], &lower))?;
    assert!(lower.join("usr/share/doc/zlib1g").is_dir());
    assert!(!lower.join("hello.txt").exists());
    assert!(top.join("hello.txt").is_file() && !top.join("usr/share/doc/zlib1g").exists());

    // Bad input: an unknown layer, an existing target, an unreachable registry.
    let missing = out_dir.join("missing");
    let err = unpack(
        &["--layer-digest", &format!("sha256:{}", "0".repeat(64))],
        &missing,
    )
    .output()?;
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("no layer"),
        "{err:?}"
    );
    let err = unpack(&[], &top).output()?;
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("already exists"),
        "{err:?}"
    );
    let err = Command::new(cora_bin("cora-driver"))
        .args([
            "unpack",
            "--insecure",
            "127.0.0.1:1",
            "--image",
            "127.0.0.1:1/app:cora",
            "--into",
        ])
        .arg(&missing)
        .output()?;
    assert!(!err.status.success(), "{err:?}");
    let mut left: Vec<String> = std::fs::read_dir(&out_dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    left.sort();
    assert_eq!(
        left,
        ["lower", "top"],
        "scratch or partial trees left behind"
    );
    Ok(())
}

/// A multi-platform source (an OCI index of linux/amd64 and linux/arm64/v8): `cora convert`
/// converts every platform into an index that keeps each descriptor's platform, or those
/// `--platform` names (repeatable); a platform the index lacks is a clear error naming those
/// it has. Pushed to a registry, the index and each platform's CORA manifest are there.
#[test]
fn every_platform_of_an_index_is_converted_or_those_named() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let multi = tmp.path().join("multi");
    std::fs::create_dir_all(&multi)?;
    let mut manifests = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let tree = tmp.path().join(format!("tree-{arch}"));
        std::fs::create_dir_all(&tree)?;
        std::fs::write(tree.join("arch"), arch)?;
        let one = tmp.path().join(format!("layout-{arch}"));
        blobfmt::dirsrc::layout_from_dirs(&[&tree], &one, "v1", true)?;
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(one.join("index.json"))?)?;
        let mut desc = index["manifests"][0].clone();
        desc.as_object_mut().map(|d| d.remove("annotations"));
        desc["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            desc["platform"]["variant"] = v.into();
        }
        let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
            one.join("blobs/sha256").join(
                desc["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("sha256:"),
            ),
        )?)?;
        manifests.push((desc, manifest["layers"][0]["digest"].clone()));
        run(Command::new("cp")
            .args(["-a", "--no-clobber"])
            .arg(one.join("blobs"))
            .arg(&multi))?;
    }
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": blobfmt::oci::MT_OCI_INDEX,
        "manifests": manifests.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
    }))?;
    let digest = blobfmt::oci::put_blob(&multi, &inner)?;
    std::fs::write(
        multi.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": blobfmt::oci::MT_OCI_INDEX,
                "digest": digest,
                "size": inner.len(),
                "annotations": {"org.opencontainers.image.ref.name": "v1"},
            }],
        }))?,
    )?;
    std::fs::write(
        multi.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    // The converted platforms: (platform, source layer digest, manifest digest, layer digest).
    type Converted = Vec<(String, String, String, String)>;
    let converted = |platforms: &[&str], tag: &str| -> Result<Converted> {
        let mut cmd = cora();
        for p in platforms {
            cmd.args(["--platform", p]);
        }
        let out_dir = tmp.path().join("out");
        let out = run(cmd
            .args(["convert", "--json"])
            .arg(format!("oci:{}:v1", multi.display()))
            .arg(format!("oci:{}:{tag}", out_dir.display())))?;
        let report: serde_json::Value = serde_json::from_str(&out)?;
        let mut got = Vec::new();
        for p in report["platforms"].as_array().into_iter().flatten() {
            got.push((
                p["platform"].as_str().unwrap_or_default().to_owned(),
                p["layers"][0]["source_digest"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["manifest_digest"].as_str().unwrap_or_default().to_owned(),
                p["layers"][0]["digest"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
        // The layout's tag names an index of exactly those manifests, platforms kept.
        let index_digest = report["index_digest"].as_str().unwrap_or_default();
        let index: serde_json::Value =
            serde_json::from_slice(&blobfmt::oci::read_blob(&out_dir, index_digest)?)?;
        let listed: Vec<(String, String)> = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let p = blobfmt::platform::Platform::describe(&d["platform"]);
                (p, d["digest"].as_str().unwrap_or_default().to_owned())
            })
            .collect();
        let want: Vec<(String, String)> = got
            .iter()
            .map(|(p, _, m, _)| (p.clone(), m.clone()))
            .collect();
        assert_eq!(listed, want, "{index}");
        let img = blobfmt::oci::open_layout_platforms(&out_dir, Some(tag), &[])?;
        assert_eq!(img.len(), got.len());
        for i in &img {
            let ann = i.image.manifest.layers[0]
                .annotations
                .clone()
                .unwrap_or_default();
            assert!(
                ann.contains_key(blobfmt::oci::annotation::TRAILER_DIGEST),
                "{ann:?}"
            );
        }
        Ok(got)
    };
    let (amd64, arm64) = (
        manifests[0].1.as_str().unwrap_or_default(),
        manifests[1].1.as_str().unwrap_or_default(),
    );
    let sources = |got: &Converted| -> Vec<(String, String)> {
        got.iter()
            .map(|(p, s, _, _)| (p.clone(), s.clone()))
            .collect()
    };
    let every = converted(&[], "all")?;
    assert_eq!(
        sources(&every),
        [
            ("linux/amd64".to_owned(), amd64.to_owned()),
            ("linux/arm64/v8".to_owned(), arm64.to_owned())
        ]
    );
    let arm = converted(&["linux/arm64"], "arm")?;
    assert_eq!(
        sources(&arm),
        [("linux/arm64/v8".to_owned(), arm64.to_owned())]
    );
    let both = converted(&["linux/arm64/v8", "linux/amd64"], "both")?;
    assert_eq!(both.len(), 2, "{both:?}");
    // Conversion is reproducible: the same manifests whichever platforms are asked for.
    assert_eq!(arm[0].2, every[1].2);

    // The same platforms as a Docker manifest list (what Docker Hub serves for multi-arch
    // images): the same converted manifests, in an OCI index.
    let list = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": blobfmt::oci::MT_DOCKER_LIST,
        "manifests": manifests.iter().map(|(d, _)| d.clone()).collect::<Vec<_>>(),
    }))?;
    blobfmt::oci::put_blob(&multi, &list)?;
    blobfmt::oci::tag_blob(&multi, "docker", blobfmt::oci::MT_DOCKER_LIST, &list)?;
    let out = run(cora()
        .args(["convert", "--json"])
        .arg(format!("oci:{}:docker", multi.display()))
        .arg(format!("oci:{}:docker", tmp.path().join("out").display())))?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    let from_list: Vec<&str> = report["platforms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["manifest_digest"].as_str())
        .collect();
    let from_index: Vec<&str> = every.iter().map(|c| c.2.as_str()).collect();
    assert_eq!(from_list, from_index, "{out}");

    // Through a registry: the index and every platform's manifest arrive, and consumers
    // pick their platform from it.
    let reg = Registry::start()?;
    let host = reg.host.clone();
    let image = format!("{host}/multi:cora");
    run(cora()
        .args(["convert", "--insecure", &host])
        .arg(format!("oci:{}:v1", multi.display()))
        .arg(&image))?;
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}")))?;
    let index: serde_json::Value = serde_json::from_str(&raw)?;
    assert_eq!(index["mediaType"], blobfmt::oci::MT_OCI_INDEX, "{raw}");
    let pushed: Vec<(String, String)> = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                blobfmt::platform::Platform::describe(&d["platform"]),
                d["digest"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = every
        .iter()
        .map(|(p, _, m, _)| (p.clone(), m.clone()))
        .collect();
    assert_eq!(pushed, want);
    for (platform, _, _, layer) in &every {
        let out = run(cora()
            .args([
                "--insecure",
                &host,
                "--platform",
                platform,
                "inspect",
                "--json",
            ])
            .arg(&image))?;
        assert!(out.contains(layer.as_str()), "{platform}: {out}");
    }

    let out = cora()
        .args([
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/riscv64",
            "convert",
        ])
        .arg(format!("oci:{}:v1", multi.display()))
        .arg(format!("oci:{}:rv", tmp.path().join("out").display()))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no manifest for linux/riscv64")
            && err.contains("linux/amd64, linux/arm64/v8"),
        "{err}"
    );
    let out = cora()
        .args(["--platform", "linux", "inspect", "oci:/nonexistent"])
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad platform"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
