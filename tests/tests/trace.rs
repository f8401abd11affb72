//! Trace-based prefetch end to end against Debian's docker-registry: record a first start's
//! chunk order (`cora export --record-trace`, and through the library), store it with the
//! image (`cora trace push`: an OCI referrer plus the `sha256-<hex>` fallback tag, since
//! docker-registry 2.8 has no referrers API), then a cold start with an empty cache finds it
//! and prefetches exactly those chunks in the background. A garbage trace is only a warning.

use anyhow::{Context, Result};
use cora_tests::fixtures::{self, cora_bin, run};
use cora_tests::registry::Registry;
use lazy::blobs::BlobRead;
use lazy::cache::ChunkCache;
use lazy::registry::{Client, ClientConfig, Reference};
use lazy::remote::RegistryBlobs;
use lazy::source::{FetchOptions, LazySource};
use lazy::trace::Trace;
use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

struct Env {
    rt: tokio::runtime::Runtime,
    reg: Registry,
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Result<Env> {
        Ok(Env {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?,
            reg: Registry::start()?,
            tmp: tempfile::tempdir()?,
        })
    }

    /// Convert the small Debian tree and push it as `REPO:v1`; returns the reference text.
    fn push_image(&self, repo: &str) -> Result<String> {
        let src = self.tmp.path().join(format!("src-{repo}"));
        let tree = fixtures::debian_tree("small", fixtures::SMALL)?;
        blobfmt::dirsrc::layout_from_dirs(&[&tree], &src, "v1", true)?;
        let dst = format!("{}/{repo}:v1", self.reg.host);
        run(Command::new(cora_bin("cora"))
            .args(["convert", "--insecure", &self.reg.host])
            .arg(format!("oci:{}:v1", src.display()))
            .arg(&dst))?;
        Ok(dst)
    }

    fn client(&self) -> Result<Client> {
        Ok(Client::new(ClientConfig {
            insecure_hosts: vec![self.reg.host.clone()],
            ..Default::default()
        })?)
    }

    fn source(&self, image: &str, cache: &Path) -> Result<LazySource> {
        let r: Reference = image.parse()?;
        let img = self
            .rt
            .block_on(lazy::remote::fetch_image(&self.client()?, &r))?;
        let remotes: Vec<Arc<dyn BlobRead>> = vec![Arc::new(RegistryBlobs::new(
            self.client()?,
            r,
            self.rt.handle().clone(),
        ))];
        Ok(LazySource::open(
            &img.manifest,
            &img.config.rootfs.diff_ids,
            img.manifest.layers.len() - 1,
            remotes,
            ChunkCache::open(cache, 10 << 30)?,
            FetchOptions::default(),
        )?)
    }

    fn cora(&self) -> Command {
        let mut c = Command::new(cora_bin("cora"));
        c.args(["--insecure", &self.reg.host]);
        c
    }
}

/// A "first start": the superblock area, a slice in the middle, the last MiB.
fn first_start(src: &LazySource) -> Result<Vec<(u64, Vec<u8>)>> {
    let size = src.size();
    let mut out = Vec::new();
    for (off, len) in [
        (0, 3 << 20),
        (size / 2, 256 << 10),
        (size.saturating_sub(1 << 20), 1 << 20),
    ] {
        let len = (size - off).min(len) as usize;
        let mut buf = vec![0u8; len];
        src.read_at(off, &mut buf)?;
        out.push((off, buf));
    }
    Ok(out)
}

#[test]
fn recorded_trace_is_pushed_found_and_prefetched() -> Result<()> {
    let env = Env::new()?;
    let image = env.push_image("app")?;
    let tmp = env.tmp.path();

    // `cora export --record-trace`: every chunk the whole image needs, each once.
    let full_path = tmp.join("full.trace");
    let flat = tmp.join("flat.img");
    run(env
        .cora()
        .args(["export", &image])
        .arg(&flat)
        .arg("--cache")
        .arg(tmp.join("cache-export"))
        .arg("--record-trace")
        .arg(&full_path))?;
    let full = Trace::read_file(&full_path)?;
    let reference = env.source(&image, &tmp.join("cache-ref"))?;
    let needed: HashSet<_> = reference
        .stack()
        .plan(0, reference.size())?
        .into_iter()
        .filter_map(|p| match p {
            blobfmt::Piece::Chunk { stream, index, .. } => {
                Some(reference.stack().chunk(stream, index).digest)
            }
            blobfmt::Piece::Zero { .. } => None,
        })
        .collect();
    assert_eq!(full.chunks.len(), needed.len(), "trace of a whole read");
    assert_eq!(
        full.chunks.iter().collect::<HashSet<_>>().len(),
        needed.len()
    );
    let flat = std::fs::read(&flat)?;
    drop(reference);

    // A partial first start recorded through the library, then pushed with the CLI.
    let first = env.source(&image, &tmp.join("cache-first"))?;
    first.record_trace();
    let reads = first_start(&first)?;
    let partial = Trace {
        chunks: first.trace(),
    };
    assert!(
        !partial.chunks.is_empty() && partial.chunks.len() < full.chunks.len(),
        "{} of {}",
        partial.chunks.len(),
        full.chunks.len()
    );
    for (off, buf) in &reads {
        assert!(buf[..] == flat[*off as usize..*off as usize + buf.len()]);
    }
    drop(first);
    let partial_path = tmp.join("partial.trace");
    partial.write_file(&partial_path)?;
    let out = run(env
        .cora()
        .args(["trace", "push", &image])
        .arg(&partial_path))?;
    assert!(out.contains("trace manifest sha256:"), "{out}");

    // docker-registry 2.8 has no referrers API: the fallback tag lists the trace manifest.
    let client = env.client()?;
    let r: Reference = image.parse()?;
    let (subject, _, _) = env
        .rt
        .block_on(lazy::trace::resolve_manifest(&client, &r))?;
    assert_eq!(
        env.rt
            .block_on(client.get_referrers(&r, &subject, lazy::trace::ARTIFACT_TYPE))?,
        None
    );
    let mut tagged = r.clone();
    tagged.tag = Some(lazy::trace::fallback_tag(&subject));
    let index = env.rt.block_on(client.get_manifest(&tagged))?;
    let index: serde_json::Value = serde_json::from_slice(&index.bytes)?;
    assert_eq!(
        index["manifests"][0]["artifactType"],
        lazy::trace::ARTIFACT_TYPE
    );
    let found = env
        .rt
        .block_on(lazy::trace::find(&client, &r, &subject))?
        .context("pushed trace not found")?;
    assert_eq!(found, partial);

    // Cold start, empty cache: the background prefetch fetches exactly the trace's chunks.
    let cold_cache = tmp.join("cache-cold");
    let cold = env.source(&image, &cold_cache)?;
    let (img, cfg, handle) = (
        image
            .parse::<lazy::imageref::ImageRef>()
            .map_err(anyhow::Error::msg)?,
        Client::new(ClientConfig {
            insecure_hosts: vec![env.reg.host.clone()],
            ..Default::default()
        })?,
        env.rt.handle().clone(),
    );
    cold.start_prefetch(move || lazy::trace::lookup_for_prefetch(&img, &cfg, &handle));
    cold.wait_prefetch();
    cold.wait_metadata()?;
    let st = cold.stats.snapshot();
    // The trace's chunks came from the prefetch, or (file system metadata) from the
    // metadata fetch every source starts at open; nothing else was fetched.
    let meta = cold.stack().chunks(blobfmt::StreamId::Meta).len() as u64;
    assert!(st.readahead <= meta, "{st:?}");
    assert!(
        st.prefetched as usize <= partial.chunks.len()
            && st.prefetched as usize + meta as usize >= partial.chunks.len(),
        "{st:?}"
    );
    assert_eq!(
        st.misses,
        st.prefetched + st.readahead,
        "only the prefetch and the metadata fetch fetched: {st:?}"
    );
    for d in &partial.chunks {
        assert!(cold.cache().contains(d), "trace chunk not cached");
    }
    // The first start again: every read is now served from the cache, with the right bytes.
    for (off, buf) in first_start(&cold)? {
        assert!(buf[..] == flat[off as usize..off as usize + buf.len()]);
    }
    assert_eq!(
        cold.stats.snapshot().misses,
        st.misses,
        "a read went to the network"
    );
    drop(cold);

    // The CLI finds the trace too (debug log), and --no-prefetch leaves it alone.
    let out = env
        .cora()
        .env("CORA_LOG", "lazy=debug")
        .args(["export", "--json", &image])
        .arg(tmp.join("again.img"))
        .arg("--cache")
        .arg(tmp.join("cache-cli"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("prefetching from the image's trace"),
        "{stderr}"
    );
    assert!(std::fs::read(tmp.join("again.img"))? == flat);
    let out = run(env
        .cora()
        .args(["export", "--json", "--no-prefetch", &image])
        .arg(tmp.join("again2.img"))
        .arg("--cache")
        .arg(tmp.join("cache-cli2")))?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(v["stats"]["prefetched"], 0, "{v}");
    Ok(())
}

/// Regular files under `dir` (not following symlinks).
fn regular_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let m = p.symlink_metadata()?;
        if m.is_dir() {
            regular_files(&p, out)?;
        } else if m.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

#[test]
fn a_prefetch_list_given_at_convert_is_stored_as_the_trace() -> Result<()> {
    let env = Env::new()?;
    let tmp = env.tmp.path();
    let tree = fixtures::debian_tree("small", fixtures::SMALL)?;
    let mut bins = Vec::new();
    regular_files(&tree.join("bin"), &mut bins)?;
    let binary = bins
        .iter()
        .max_by_key(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .context("no file in bin")?
        .clone();
    let rel = binary.strip_prefix(&tree)?;
    let list = tmp.join("prefetch.list");
    std::fs::write(
        &list,
        format!(
            "# what the entrypoint reads\n/{}\n\n/etc\n/no/such/file\n",
            rel.display()
        ),
    )?;
    let src = tmp.join("src-listed");
    blobfmt::dirsrc::layout_from_dirs(&[&tree], &src, "v1", true)?;
    let src_ref = format!("oci:{}:v1", src.display());

    // `cora convert SRC DST --prefetch-files LIST`: success and stderr.
    let convert = |dst: &str, list: &Path| -> Result<(bool, String)> {
        let out = env
            .cora()
            .args(["convert", &src_ref, dst, "--prefetch-files"])
            .arg(list)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };

    // Bad lists and destinations that cannot hold a trace are refused before converting.
    let relative = tmp.join("relative.list");
    std::fs::write(&relative, "/etc\netc/passwd\n")?;
    let dst = format!("{}/listed:v1", env.reg.host);
    let (ok, stderr) = convert(&dst, &relative)?;
    assert!(!ok);
    assert!(
        stderr.contains("relative.list:2") && stderr.contains("not an absolute path"),
        "{stderr}"
    );
    let layout = format!("oci:{}:v1", tmp.join("dst-layout").display());
    let (ok, stderr) = convert(&layout, &list)?;
    assert!(!ok);
    assert!(stderr.contains("is not one"), "{stderr}");

    let (ok, stderr) = convert(&dst, &list)?;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("/no/such/file is no file of the image"),
        "{stderr}"
    );

    // The stored trace: the listed files' content, each chunk once, not the whole image.
    let client = env.client()?;
    let r: Reference = dst.parse()?;
    let (subject, _, _) = env
        .rt
        .block_on(lazy::trace::resolve_manifest(&client, &r))?;
    let trace = env
        .rt
        .block_on(lazy::trace::find(&client, &r, &subject))?
        .context("no trace stored with the image")?;
    let unique: HashSet<_> = trace.chunks.iter().collect();
    assert_eq!(unique.len(), trace.chunks.len(), "a chunk listed twice");
    let cold = env.source(&dst, &tmp.join("cache-listed"))?;
    let layer_chunks = cold.stack().chunks(blobfmt::StreamId::Layer(0)).len();
    assert!(
        !trace.chunks.is_empty() && trace.chunks.len() < layer_chunks,
        "{} of {layer_chunks} chunks",
        trace.chunks.len()
    );
    let chunks = trace.chunks.clone();
    cold.start_prefetch(move || chunks);
    cold.wait_prefetch();
    let mut bytes = Vec::new();
    for d in &trace.chunks {
        bytes.extend(
            cold.cache()
                .get(d)?
                .context("a trace chunk was not prefetched")?,
        );
    }
    let holds =
        |needle: &[u8]| needle.is_empty() || bytes.windows(needle.len()).any(|w| w == needle);
    let mut listed = vec![binary.clone()];
    regular_files(&tree.join("etc"), &mut listed)?;
    for f in &listed {
        assert!(
            holds(&std::fs::read(f)?),
            "{} not in the trace",
            f.display()
        );
    }
    // The first listed file comes first.
    let head = std::fs::read(&binary)?;
    let first = cold.cache().get(&trace.chunks[0])?.context("first chunk")?;
    let probe = &head[..head.len().min(64)];
    let at = bytes.windows(probe.len()).position(|w| w == probe);
    assert!(
        at.is_some_and(|at| at < first.len()),
        "the trace does not start with {}",
        binary.display()
    );
    Ok(())
}

#[test]
fn garbage_trace_is_a_warning_not_a_failure() -> Result<()> {
    let env = Env::new()?;
    let image = env.push_image("junk")?;
    let client = env.client()?;
    let r: Reference = image.parse()?;
    let (subject, size, media_type) = env
        .rt
        .block_on(lazy::trace::resolve_manifest(&client, &r))?;
    env.rt.block_on(lazy::trace::push_for(
        &client,
        &r,
        &subject,
        size,
        &media_type,
        b"\x00\xffnot a trace at all",
    ))?;
    let tmp = env.tmp.path();
    let out = env
        .cora()
        .args(["export", &image])
        .arg(tmp.join("a.img"))
        .arg("--cache")
        .arg(tmp.join("cache-a"))
        .arg("--no-prefetch")
        .output()?;
    assert!(out.status.success());
    let expect = std::fs::read(tmp.join("a.img"))?;
    let out = env
        .cora()
        .args(["export", &image])
        .arg(tmp.join("b.img"))
        .arg("--cache")
        .arg(tmp.join("cache-b"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ignoring the image's access trace") && stderr.contains("not UTF-8"),
        "{stderr}"
    );
    assert!(std::fs::read(tmp.join("b.img"))? == expect);
    // The library path says the same as an error the caller can inspect.
    let err = env
        .rt
        .block_on(lazy::trace::find(&client, &r, &subject))
        .expect_err("garbage parsed");
    assert!(err.to_string().contains("not UTF-8"), "{err}");
    Ok(())
}
