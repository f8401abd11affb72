//! `cora`: convert, inspect and export CORA images; manage the local chunk cache.

mod cache;
mod rpull;

use anyhow::{Context, Result, bail};
use blobfmt::FsType;
use blobfmt::convert::{self, Options};
use blobfmt::writer::ChunkParams;
use clap::{Parser, Subcommand};
use lazy::imageref::ImageRef;
use lazy::source::{FetchOptions, LazySource};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "cora", version, about = "CORA lazily loaded container images")]
struct Cli {
    #[command(flatten)]
    registry: RegistryOpts,
    /// Platform picked from multi-platform images: os/arch[/variant] (default: this host's).
    /// `convert` takes it repeated, for the platforms to convert (default: every one).
    #[arg(long, global = true, value_name = "PLATFORM")]
    platform: Vec<blobfmt::platform::Platform>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How to reach registries (shared by every command that reads or writes one).
#[derive(clap::Args, Clone)]
struct RegistryOpts {
    /// Docker-config JSON with credentials (default: /etc/cora/cred.json, then ~/.docker/config.json).
    #[arg(long, global = true)]
    creds: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust, besides the system roots.
    #[arg(long, global = true)]
    ca: Vec<PathBuf>,
    /// Registry host (host or host:port) to reach over plain HTTP.
    #[arg(long, global = true)]
    insecure: Vec<String>,
    /// Mirror host tried before the upstream for blob reads (host[:port]; append ",insecure"
    /// for plain HTTP). Repeatable, tried in order.
    #[arg(long, global = true)]
    mirror: Vec<String>,
}

impl RegistryOpts {
    fn config(&self) -> lazy::registry::ClientConfig {
        lazy::registry::ClientConfig {
            creds_file: self.creds.clone(),
            ca_files: self.ca.clone(),
            insecure_hosts: self.insecure.clone(),
            mirrors: self
                .mirror
                .iter()
                .map(|m| lazy::registry::Mirror::parse(m))
                .collect(),
            ..Default::default()
        }
    }
}

/// The registry side of a command: a client and the runtime its futures run on.
struct Net {
    rt: tokio::runtime::Runtime,
    cfg: lazy::registry::ClientConfig,
}

impl Net {
    fn new(opts: &RegistryOpts) -> Result<Net> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(Net {
            rt,
            cfg: opts.config(),
        })
    }
    fn client(&self) -> Result<lazy::registry::Client> {
        Ok(lazy::registry::Client::new(self.cfg.clone())?)
    }
}

fn parse_reference(s: &str) -> Result<lazy::registry::Reference> {
    s.parse()
        .with_context(|| format!("parsing image reference {s:?}"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Convert an image to the CORA format.
    Convert {
        /// oci:PATH[:TAG], dir:PATH or HOST[:PORT]/REPO[:TAG|@DIGEST]
        src: ImageRef,
        /// oci:PATH[:TAG] or HOST[:PORT]/REPO[:TAG]
        dst: ImageRef,
        /// Filesystem of the stack images.
        #[arg(long, default_value = "erofs")]
        fs: FsType,
        /// Average chunk size in bytes (min = avg/4, max = avg*4 unless given).
        #[arg(long, default_value_t = 64 << 10)]
        chunk_avg: u32,
        #[arg(long)]
        chunk_min: Option<u32>,
        #[arg(long)]
        chunk_max: Option<u32>,
        #[arg(long, default_value_t = 3)]
        zstd_level: i32,
        /// Scratch directory for layer tars (and ext4 stacks' trees) (default: $TMPDIR).
        #[arg(long)]
        work: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// What a container reads first: one absolute path per line (a directory means every
        /// file below it; `#` comments). Their chunks are stored with the image as its access
        /// trace and prefetched from the start of every device (like Nydus's prefetch list;
        /// a trace recorded later with `cora trace push` replaces it). Registry destinations.
        #[arg(long, value_name = "FILE")]
        prefetch_files: Option<PathBuf>,
    },
    /// Show an image's layers, chunks and sizes.
    Inspect {
        image: ImageRef,
        #[arg(long)]
        json: bool,
        /// Check every chunk digest and the trailer seals; nonzero exit on the first bad one.
        #[arg(long)]
        verify: bool,
    },
    /// Rebuild the filesystem image of stack N through the lazy read path.
    Export {
        image: ImageRef,
        /// Top layer of the stack (0-based; default: the image's top layer).
        #[arg(long)]
        layer: Option<usize>,
        out: PathBuf,
        /// Chunk cache directory (shared by all images on the host).
        #[arg(long, default_value = lazy::cache::DEFAULT_DIR)]
        cache: PathBuf,
        /// Cache size limit, e.g. 10G.
        #[arg(long, default_value = "10G", value_parser = cora_api::size::parse_size)]
        cache_size: u64,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
        /// Write the chunk access order of this read to FILE (for `cora trace push`).
        #[arg(long, value_name = "FILE")]
        record_trace: Option<PathBuf>,
        /// Do not prefetch the chunks of the access trace stored with the image.
        #[arg(long)]
        no_prefetch: bool,
    },
    /// Access traces for trace-based prefetch.
    #[command(subcommand)]
    Trace(TraceCmd),
    /// Inspect and maintain the local chunk cache.
    Cache(cache::CacheArgs),
    /// Record an image in containerd and prepare its layers through a snapshotter: CORA layers
    /// the snapshotter serves lazily are not downloaded, others are unpacked as by `ctr pull`
    /// (the role of overlaybd's `ctr rpull`).
    Rpull {
        /// HOST[:PORT]/REPO[:TAG|@DIGEST]; also the name of the image record.
        reference: String,
        /// containerd's gRPC socket.
        #[arg(long, default_value = rpull::DEFAULT_ADDRESS)]
        address: PathBuf,
        /// containerd namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Snapshotter that prepares the layers (as named in containerd's config).
        #[arg(long, default_value = "cora")]
        snapshotter: String,
        /// Print the report as JSON (one object) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Pack root filesystem directories as a plain OCI image: one reproducible gzip layer per
    /// directory, bottom first (for building test and demo images without Docker).
    Pack {
        /// oci:PATH[:TAG]
        dst: ImageRef,
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Store a trace (from `--record-trace`) with the image in its registry, as an OCI
    /// referrer of the image manifest (plus the `sha256-<hex>` fallback tag).
    Push {
        /// HOST[:PORT]/REPO[:TAG|@DIGEST]
        image: String,
        file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    cora_api::restore_sigpipe();
    cora_api::logging::init_default("warn");
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cora: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match (cli.platform.as_slice(), &cli.cmd) {
        (_, Cmd::Convert { .. }) | ([], _) => {}
        ([p], _) => {
            blobfmt::platform::set_selected(p.clone());
        }
        _ => bail!("--platform is given more than once; only convert takes several"),
    }
    let net = Net::new(&cli.registry)?;
    match cli.cmd {
        Cmd::Convert {
            src,
            dst,
            fs,
            chunk_avg,
            chunk_min,
            chunk_max,
            zstd_level,
            work,
            json,
            prefetch_files,
        } => {
            let prefetch = prefetch_files.map(|f| read_prefetch_list(&f)).transpose()?;
            if prefetch.is_some() && !matches!(dst, ImageRef::Registry(_)) {
                bail!("--prefetch-files stores a trace in a registry: {dst} is not one");
            }
            let mut params = ChunkParams::from_avg(chunk_avg, zstd_level)?;
            params.min = chunk_min.unwrap_or(params.min);
            params.max = chunk_max.unwrap_or(params.max);
            params.validate()?;
            let opts = Options { fs, params };
            cmd_convert(
                &net,
                &src,
                &dst,
                &opts,
                work,
                json,
                prefetch.as_deref(),
                &cli.platform,
            )
        }
        Cmd::Inspect {
            image,
            json,
            verify,
        } => cmd_inspect(&net, &image, json, verify),
        Cmd::Export {
            image,
            layer,
            out,
            cache,
            cache_size,
            json,
            record_trace,
            no_prefetch,
        } => cmd_export(
            &net,
            &image,
            layer,
            &out,
            &ExportOpts {
                cache_dir: cache,
                cache_size,
                json,
                record_trace,
                prefetch: !no_prefetch,
            },
        ),
        Cmd::Trace(TraceCmd::Push { image, file }) => {
            let trace = lazy::trace::Trace::read_file(&file)?;
            let reference = parse_reference(&image)?;
            let client = net.client()?;
            let digest = net
                .rt
                .block_on(lazy::trace::push(&client, &reference, &trace.encode()))
                .with_context(|| format!("pushing the trace to {image}"))?;
            println!("{} chunks; trace manifest {digest}", trace.chunks.len());
            Ok(())
        }
        Cmd::Pack { dst, dirs } => {
            let ImageRef::Layout { path, tag } = &dst else {
                bail!("{dst}: pack writes oci:PATH[:TAG] layouts");
            };
            let dirs: Vec<&std::path::Path> = dirs.iter().map(PathBuf::as_path).collect();
            blobfmt::dirsrc::layout_from_dirs(
                &dirs,
                path,
                tag.as_deref().unwrap_or("latest"),
                true,
            )
            .with_context(|| format!("packing into {dst}"))?;
            Ok(())
        }
        Cmd::Rpull {
            reference,
            address,
            namespace,
            snapshotter,
            json,
        } => {
            let opts = rpull::RpullOptions {
                address,
                namespace,
                snapshotter,
                registry: net.cfg.clone(),
            };
            cmd_rpull(&net, &reference, &opts, json)
        }
        Cmd::Cache(args) => {
            print!("{}", cache::run_cli(&args)?);
            Ok(())
        }
    }
}

fn work_dir(work: Option<PathBuf>) -> Result<tempfile::TempDir> {
    let base = work.unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    tempfile::Builder::new()
        .prefix("cora-work-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a work directory in {}", base.display()))
}

#[allow(clippy::too_many_arguments)]
fn cmd_convert(
    net: &Net,
    src: &ImageRef,
    dst: &ImageRef,
    opts: &Options,
    work: Option<PathBuf>,
    json: bool,
    prefetch: Option<&[PathBuf]>,
    platforms: &[blobfmt::platform::Platform],
) -> Result<()> {
    let work = work_dir(work)?;
    let sources = match src {
        ImageRef::Layout { path, tag } => {
            blobfmt::oci::open_layout_platforms(path, tag.as_deref(), platforms)
                .with_context(|| format!("opening {src}"))?
        }
        ImageRef::Dir(path) => {
            let layout = work.path().join("src-layout");
            blobfmt::dirsrc::layout_from_dir(path, &layout, "latest")
                .with_context(|| format!("packing {src}"))?;
            blobfmt::oci::open_layout_platforms(&layout, Some("latest"), platforms)?
        }
        ImageRef::Registry(r) => {
            let layout = work.path().join("src-layout");
            let reference = parse_reference(r)?;
            let client = net.client()?;
            net.rt
                .block_on(lazy::remote::pull_to_layout(
                    &client, &reference, &layout, "latest", platforms,
                ))
                .with_context(|| format!("pulling {src}"))?;
            blobfmt::oci::open_layout_platforms(&layout, Some("latest"), platforms)?
        }
    };
    let (dst_root, dst_tag) = match dst {
        ImageRef::Layout { path, tag } => (path.clone(), tag.clone().unwrap_or("latest".into())),
        ImageRef::Dir(_) => bail!("dir: is a source only"),
        ImageRef::Registry(_) => (work.path().join("dst-layout"), "latest".to_string()),
    };
    let scratch = work.path().join("convert");
    std::fs::create_dir_all(&scratch)?;
    let mut reports = Vec::new();
    for source in &sources {
        let platform = source
            .descriptor
            .as_ref()
            .and_then(|d| d.platform.as_ref())
            .map(|p| format!("{}: ", blobfmt::platform::Platform::describe(p)))
            .unwrap_or_default();
        let report = convert_one(&source.image, &dst_root, opts, &scratch, &platform)
            .with_context(|| format!("converting {platform}{src} to {dst}"))?;
        reports.push((platform, report));
    }
    let only_reports: Vec<convert::ImageReport> = reports.iter().map(|r| r.1.clone()).collect();
    let tagged = convert::tag_converted(&sources, &only_reports, &dst_root, &dst_tag)?;
    if let ImageRef::Registry(r) = dst {
        let reference = parse_reference(r)?;
        let client = net.client()?;
        net.rt
            .block_on(lazy::remote::push_layout(
                &client, &dst_root, &dst_tag, &reference,
            ))
            .with_context(|| format!("pushing {dst}"))?;
        if let Some(paths) = prefetch {
            for (platform, report) in &reports {
                let blobs: Vec<&convert::LayerBlob> =
                    report.layers.iter().map(|l| &l.blob).collect();
                let (chunks, unmatched) = convert::file_chunks(&blobs, paths);
                for p in &unmatched {
                    eprintln!(
                        "{platform}prefetch list: {} is no file of the image",
                        p.display()
                    );
                }
                let n = chunks.len();
                let trace = lazy::trace::Trace { chunks };
                // The trace refers to the platform's own manifest.
                let mut image = reference.clone();
                image.digest = Some(report.manifest_digest.clone());
                let digest = net
                    .rt
                    .block_on(lazy::trace::push(&client, &image, &trace.encode()))
                    .with_context(|| format!("storing the prefetch list's trace with {dst}"))?;
                eprintln!(
                    "{platform}prefetch list: {} paths, {n} chunks; trace manifest {digest}",
                    paths.len()
                );
            }
        }
    }
    if json {
        let image_json = |report: &convert::ImageReport| {
            let layers: Vec<_> = report
                .layers
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "source_digest": l.source_digest,
                        "source_size": l.source_size,
                        "tar_size": l.tar_size,
                        "digest": blobfmt::oci_digest(&l.blob.digest),
                        "size": l.blob.size,
                        "chunks": l.blob.trailer.chunks.len(),
                        "image_size": l.blob.trailer.image_size,
                        "data_blocks": l.blob.stats.data_blocks,
                        "meta_blocks": l.blob.stats.meta_blocks,
                        "zero_blocks": l.blob.stats.zero_blocks,
                        "chunk_secs": l.blob.stats.chunk_secs,
                        "image_secs": l.blob.stats.image_secs,
                    })
                })
                .collect();
            serde_json::json!({
                "manifest_digest": report.manifest_digest,
                "secs": report.secs,
                "layers": layers,
            })
        };
        let out = match reports.as_slice() {
            [(p, report)] if p.is_empty() => image_json(report),
            _ => serde_json::json!({
                "index_digest": tagged,
                "platforms": reports
                    .iter()
                    .map(|(p, r)| {
                        let mut j = image_json(r);
                        j["platform"] = p.trim_end_matches(": ").into();
                        j
                    })
                    .collect::<Vec<_>>(),
            }),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for (platform, report) in &reports {
            let tar: u64 = report.layers.iter().map(|l| l.tar_size).sum();
            let src_size: u64 = report.layers.iter().map(|l| l.source_size).sum();
            let stored: u64 = report.layers.iter().map(|l| l.blob.size).sum();
            println!(
                "{platform}{dst}: {} layers, {} -> {} bytes stored (source {} compressed, {} tar) in {:.1}s, {:.1} MB/s of tar",
                report.layers.len(),
                src_size,
                stored,
                src_size,
                tar,
                report.secs,
                tar as f64 / report.secs / 1e6
            );
            println!("{platform}manifest {}", report.manifest_digest);
        }
        if reports.len() > 1 || reports.iter().any(|(p, _)| !p.is_empty()) {
            println!("index {tagged}");
        }
    }
    Ok(())
}

/// Converts one image into the layout at `dst_root` with a progress bar (or lines) on stderr;
/// `platform` prefixes its lines.
fn convert_one(
    image: &blobfmt::oci::LayoutImage,
    dst_root: &Path,
    opts: &Options,
    scratch: &Path,
    platform: &str,
) -> Result<convert::ImageReport> {
    let n = image.manifest.layers.len();
    // On a terminal one bar per layer, left in place with its digest when the layer is done;
    // otherwise one line per stage.
    let bars = std::io::stderr().is_terminal().then(|| {
        (
            indicatif::MultiProgress::new(),
            std::cell::RefCell::new(Vec::new()),
        )
    });
    let bar = |i: usize| {
        let (multi, list) = bars.as_ref()?;
        let mut list = list.borrow_mut();
        while list.len() <= i {
            let b = multi.add(indicatif::ProgressBar::new(0).with_style(progress_style()));
            b.set_prefix(format!("{platform}layer {}/{n}", list.len() + 1));
            list.push(b);
        }
        Some(list[i].clone())
    };
    let progress = |i: usize, step: convert::Step<'_>| match (bar(i), step) {
        (Some(bar), convert::Step::Phase(msg)) => bar.set_message(msg.to_string()),
        (Some(bar), convert::Step::Chunked { done, total }) => {
            bar.set_length(total);
            bar.set_position(done);
        }
        (Some(bar), convert::Step::Done(digest)) => bar.finish_with_message(digest.to_string()),
        (None, convert::Step::Phase(msg)) => eprintln!("{platform}layer {}/{n}: {msg}", i + 1),
        (None, convert::Step::Done(digest)) => {
            eprintln!("{platform}layer {}/{n}: done {digest}", i + 1)
        }
        (None, convert::Step::Chunked { .. }) => {}
    };
    let report = convert::convert_image(image, dst_root, opts, scratch, &progress)?;
    Ok(report)
}

/// `--prefetch-files`: absolute paths, one per line; blank lines and `#` comments skipped.
fn read_prefetch_list(file: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the prefetch list {}", file.display()))?;
    let mut paths = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with('/') {
            bail!(
                "{}:{}: {line:?} is not an absolute path",
                file.display(),
                n + 1
            );
        }
        paths.push(PathBuf::from(line));
    }
    Ok(paths)
}

fn open_image(net: &Net, image: &ImageRef) -> Result<lazy::remote::OpenedImage> {
    lazy::remote::open_image(image, &net.cfg, net.rt.handle())
        .with_context(|| format!("opening {image}"))
}

struct ExportOpts {
    cache_dir: PathBuf,
    cache_size: u64,
    json: bool,
    record_trace: Option<PathBuf>,
    prefetch: bool,
}

fn cmd_export(
    net: &Net,
    image: &ImageRef,
    layer: Option<usize>,
    out: &std::path::Path,
    opts: &ExportOpts,
) -> Result<()> {
    use std::io::Write;
    let json = opts.json;
    let lazy::remote::OpenedImage {
        manifest,
        diff_ids,
        sources: remotes,
        client,
    } = open_image(net, image)?;
    let top = layer.unwrap_or(manifest.layers.len() - 1);
    let cache = lazy::cache::ChunkCache::open(&opts.cache_dir, opts.cache_size)?;
    let t0 = std::time::Instant::now();
    let src = LazySource::open(
        &manifest,
        &diff_ids,
        top,
        remotes,
        cache,
        FetchOptions::default(),
    )
    .with_context(|| format!("opening stack {top} of {image}"))?;
    if opts.record_trace.is_some() {
        src.record_trace();
    }
    if let Some(client) = client.filter(|_| opts.prefetch) {
        let (image, rt) = (image.clone(), net.rt.handle().clone());
        src.start_prefetch(move || lazy::trace::lookup_for_prefetch(&image, &client, &rt));
    }
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".cora-export-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let size = src.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        src.read_at(off, &mut buf[..n])
            .with_context(|| format!("reading image bytes {off}+{n}"))?;
        tmp.write_all(&buf[..n])?;
        off += n as u64;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(out)
        .with_context(|| format!("renaming to {}", out.display()))?;
    if let Some(path) = &opts.record_trace {
        let trace = lazy::trace::Trace {
            chunks: src.trace(),
        };
        trace
            .write_file(path)
            .with_context(|| format!("writing the access trace to {}", path.display()))?;
    }
    let st = src.stats.snapshot();
    let secs = t0.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({"image_size": size, "secs": secs, "stats": st})
        );
    } else {
        println!(
            "{}: {size} bytes in {secs:.2}s; fetched {} bytes in {} requests; {} chunk hits, {} chunks fetched ({} by read-ahead, {} by trace prefetch), {} corrupt",
            out.display(),
            st.fetched_bytes,
            st.requests,
            st.hits,
            st.misses,
            st.readahead,
            st.prefetched,
            st.corrupt
        );
    }
    Ok(())
}

fn cmd_rpull(net: &Net, reference: &str, opts: &rpull::RpullOptions, json: bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut on_layer = |i: usize, l: &rpull::LayerReport| {
        if json {
            return;
        }
        println!(
            "layer {}: {}: {}, fetched {} of {} bytes",
            i + 1,
            l.digest,
            l.state,
            l.bytes_fetched,
            l.size
        );
    };
    let report = net
        .rt
        .block_on(rpull::rpull(reference, opts, &mut on_layer))
        .with_context(|| format!("rpull {reference}"))?;
    let secs = t0.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&report)?;
        v["secs"] = secs.into();
        v["snapshotter"] = opts.snapshotter.clone().into();
        println!("{v}");
        return Ok(());
    }
    let count = |s| report.layers.iter().filter(|l| l.state == s).count();
    use rpull::LayerState;
    println!(
        "{}: {} layers ({} remote, {} unpacked, {} present) with snapshotter {}; fetched {} of {} bytes in {:.2}s; manifest {}",
        report.image,
        report.layers.len(),
        count(LayerState::Remote),
        count(LayerState::Unpacked),
        count(LayerState::Present),
        opts.snapshotter,
        report.bytes_fetched,
        report.image_bytes,
        secs,
        report.manifest_digest
    );
    Ok(())
}

fn cmd_inspect(net: &Net, image: &ImageRef, json: bool, verify: bool) -> Result<()> {
    let opened = open_image(net, image)?;
    let (manifest, remotes) = (opened.manifest, opened.sources);
    let blobs = remotes.last().context("no blob source")?.as_ref();
    let info = lazy::inspect::inspect(&manifest, blobs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!(
            "{:>3} {:<71} {:>12} {:>12} {:>8} {:>12} {:>6}",
            "#", "digest", "stored", "tar", "chunks", "image", "fs"
        );
        for l in &info.layers {
            match &l.cora {
                Some(c) => println!(
                    "{:>3} {:<71} {:>12} {:>12} {:>8} {:>12} {:>6}",
                    l.index, l.digest, l.size, c.tar_size, c.chunks, c.image_size, c.fs_type
                ),
                None => println!(
                    "{:>3} {:<71} {:>12} (not CORA: {})",
                    l.index, l.digest, l.size, l.media_type
                ),
            }
        }
    }
    if verify {
        let n = lazy::inspect::verify(&manifest, blobs)?;
        println!("verified {n} chunks: all digests match");
    }
    Ok(())
}

fn progress_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ")
}
