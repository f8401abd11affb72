//! What a device process serves: a source described by a [`SourceRecipe`] (stored with the
//! device, so `recover` can open the same source again in a new process) and opened as a
//! [`BlockSource`] for any transport.
use cora_api::driver::Fill;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cora_read::{BlockSource, FileSource, Lend, Outcome};
use serde::{Deserialize, Serialize};

/// Everything needed to open a device's source again in a new process. Stored as the device's
/// target data by `add`, read back by `recover`. Add a variant per kind of source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// One recipe per device process, built once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum SourceRecipe {
    /// A plain image file.
    File { path: PathBuf },
    /// Stack `layer` of a CORA image, read lazily through the shared chunk cache.
    Image {
        /// `oci:PATH[:TAG]` or `HOST[:PORT]/REPO[:TAG|@DIGEST]`.
        image: String,
        /// Top layer of the stack (default: the image's top layer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<usize>,
        /// Top layer of the stack by blob digest (`sha256:…`), as containerd names layers;
        /// exclusive with `layer`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer_digest: Option<String>,
        cache: PathBuf,
        cache_size: u64,
        #[serde(default)]
        registry: crate::remote::RegistryAccess,
        /// Trace-based prefetch and recording (see `crate::trace`).
        #[serde(default)]
        trace: TraceOptions,
        /// What the source fetches beyond what is read.
        #[serde(default, flatten)]
        fetch: FetchTuning,
        /// Platform picked from a multi-platform image (`os/arch[/variant]`; default: the
        /// host's). Kept in the recipe so `recover` picks the same manifest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        platform: Option<String>,
    },
}

/// Makes `platform` (`os/arch[/variant]`) the one this process picks from image indexes; an
/// error when it does not parse or another was already chosen.
pub fn use_platform(platform: &str) -> io::Result<()> {
    use blobfmt::platform::{self, Platform};
    let p: Platform = platform
        .parse()
        .map_err(|e: blobfmt::Error| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    if !platform::set_selected(p.clone()) && platform::selected() != &p {
        return Err(io::Error::other(format!(
            "platform {p} asked for, but this process already picks {}",
            platform::selected()
        )));
    }
    Ok(())
}

/// Read-ahead of a device's lazy source: none. The kernel already reads ahead within each file
/// (adaptively, and only for files read sequentially), and a block device sees that as
/// sequential even when a container reads scattered small files, so a window here fetches data
/// nobody reads. Cold `sha256sum /usr/bin/openssl` in the base image (VM, `--readahead`):
/// 1.7 MB fetched with none, 2.1 MB with 128 KiB, 2.7 MB with 256 KiB, 5.5 MB with 1 MiB, and
/// no faster with any; a growing window fetched 25 % of the image for a container start.
pub const DEVICE_READAHEAD: u64 = 0;

/// What a device's lazy source fetches beyond the bytes read; `None`: the device default.
/// Flattened into the recipe (`readahead` kept its place there).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchTuning {
    /// Sequential read-ahead window in bytes (default [`DEVICE_READAHEAD`]; 0 = none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readahead: Option<u64>,
    /// Chunks fetched after a missed one, in compressed bytes (default [`DEVICE_MISS_WINDOW`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miss_window: Option<u64>,
    /// On a miss inside a file, fetch to its end, up to this many compressed bytes (default
    /// [`DEVICE_FILE_WINDOW`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_window: Option<u64>,
    /// Fetch the rest of the stack in the background (default [`DEVICE_FILL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill: Option<Fill>,
}

impl FetchTuning {
    fn options(&self) -> crate::source::FetchOptions {
        let readahead = self.readahead.unwrap_or(DEVICE_READAHEAD);
        crate::source::FetchOptions {
            readahead,
            // A fixed window at most (see DEVICE_READAHEAD): a growing one also pulled in
            // files never read (30-cora-image).
            max_readahead: readahead,
            miss_window: self.miss_window.unwrap_or(DEVICE_MISS_WINDOW),
            file_window: self.file_window.unwrap_or(DEVICE_FILE_WINDOW),
            fill: self.fill.unwrap_or(DEVICE_FILL),
            ..crate::source::FetchOptions::default()
        }
    }
}

/// Miss window of a device: 1 MiB. A container start reads many small files in path order
/// (Python imports, shared libraries of one package), each miss otherwise paying one round
/// trip; see `cargo xtask bench coldstart` for the numbers behind the choice.
pub const DEVICE_MISS_WINDOW: u64 = 1 << 20;

/// File window of a device (see `FetchOptions::file_window`): off. Measured with 4 MiB
/// (`cargo xtask bench coldstart`, wan, 2 rounds, same run, off vs 4 MiB;
/// `bench/results/2026-12-07-coldstart-wan-filewindow-fixed/`): stalls fall (Python 150 → 98,
/// large-partial 104 → 69) but not the time spent in them: Python 9.45 / 9.64 s (peak RSS 213 /
/// 268 MB), Node 3.17 / 3.20 s, large-partial 2.14 / 1.96 s (69 / 56 MB fetched). A start pages
/// in parts of its large files (shared libraries), so the rest of a file is mostly bytes
/// nobody reads, competing with demand fetches for the link; only the large-file workload
/// gains, and not enough to trade Python's time and memory for it.
pub const DEVICE_FILE_WINDOW: u64 = 0;

/// Background fill of a device: off. `idle` runs only while no demand fetch is queued or on
/// the wire, one 1 MiB request at a time, so a start pays at most one such request per
/// miss; `always` fetches beside the start. See `cargo xtask bench coldstart` for what each
/// costs and buys.
pub const DEVICE_FILL: Fill = Fill::Off;

/// What a lazily served image does with access traces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceOptions {
    /// Write the chunk access order here (rewritten every second while it grows, and on exit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<PathBuf>,
    /// Do not prefetch the trace stored with the image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_prefetch: bool,
}

impl SourceRecipe {
    /// Opens the source this recipe describes.
    pub fn open(&self) -> io::Result<Arc<dyn BlockSource>> {
        match self {
            SourceRecipe::File { path } => Ok(Arc::new(FileSource::open(path)?)),
            SourceRecipe::Image {
                image,
                layer,
                layer_digest,
                cache,
                cache_size,
                registry,
                trace,
                fetch,
                platform,
            } => {
                if let Some(p) = platform {
                    use_platform(p)?;
                }
                Ok(Arc::new(LazyImage::open(
                    image,
                    TopLayer::pick(*layer, layer_digest.as_deref())?,
                    cache,
                    *cache_size,
                    registry,
                    trace,
                    fetch,
                )?))
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        // A derived Serialize of plain fields cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    pub fn from_json(v: &serde_json::Value) -> io::Result<Self> {
        serde_json::from_value(v.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad source recipe {v}: {e}"),
            )
        })
    }
}

/// Which layer tops the served stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopLayer<'a> {
    /// The image's top layer.
    Top,
    Index(usize),
    Digest(&'a str),
}

impl<'a> TopLayer<'a> {
    fn pick(index: Option<usize>, digest: Option<&'a str>) -> io::Result<TopLayer<'a>> {
        match (index, digest) {
            (None, None) => Ok(TopLayer::Top),
            (Some(i), None) => Ok(TopLayer::Index(i)),
            (None, Some(d)) => Ok(TopLayer::Digest(d)),
            (Some(_), Some(_)) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "give the top layer by index or by digest, not both",
            )),
        }
    }

    /// The 0-based index of this layer among `layers`.
    pub fn resolve(self, layers: &[blobfmt::oci::Descriptor]) -> io::Result<usize> {
        match self {
            TopLayer::Top => Ok(layers.len().saturating_sub(1)),
            TopLayer::Index(i) => Ok(i),
            TopLayer::Digest(d) => layers.iter().position(|l| l.digest == d).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the image has no layer {d}"),
                )
            }),
        }
    }
}

/// A CORA stack served through `LazySource`; owns the runtime its registry reads run on.
pub struct LazyImage {
    source: Arc<crate::source::LazySource>,
    trace_writer: Option<TraceWriter>,
    _rt: tokio::runtime::Runtime,
}

/// Rewrites the trace file every second while it grows; a last time when dropped.
struct TraceWriter {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TraceWriter {
    fn start(source: Arc<crate::source::LazySource>, path: PathBuf) -> io::Result<TraceWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cora-trace".into())
            .spawn(move || {
                let mut written = usize::MAX;
                loop {
                    let stopping = !matches!(
                        rx.recv_timeout(Duration::from_secs(1)),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    );
                    let chunks = source.trace();
                    if chunks.len() != written {
                        written = chunks.len();
                        if let Err(e) = (crate::trace::Trace { chunks }).write_file(&path) {
                            tracing::warn!(error = %e, "could not write the access trace");
                        }
                    }
                    if stopping {
                        return;
                    }
                }
            })?;
        Ok(TraceWriter {
            stop: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io_other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LazyImage {
    /// Opens stack `layer` of `image`, recording and/or prefetching access traces as `trace`
    /// says.
    pub fn open(
        image: &str,
        layer: TopLayer<'_>,
        cache: &std::path::Path,
        cache_size: u64,
        registry: &crate::remote::RegistryAccess,
        trace: &TraceOptions,
        fetch: &FetchTuning,
    ) -> io::Result<LazyImage> {
        let image: crate::imageref::ImageRef = image.parse().map_err(io_other)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cora-fetch")
            .enable_all()
            .build()?;
        let crate::remote::OpenedImage {
            manifest,
            diff_ids,
            sources: remotes,
            client,
        } = crate::remote::open_image(&image, &registry.config(), rt.handle()).map_err(io_other)?;
        let top = layer.resolve(&manifest.layers)?;
        let opts = crate::cache::CacheOptions::new(cache_size);
        let cache = crate::cache::ChunkCache::open_with(cache, opts).map_err(io_other)?;
        let source = crate::source::LazySource::open(
            &manifest,
            &diff_ids,
            top,
            remotes,
            cache,
            fetch.options(),
        )
        .map_err(io_other)?;
        let source = Arc::new(source);
        let trace_writer = match &trace.record {
            Some(path) => {
                source.record_trace();
                Some(TraceWriter::start(source.clone(), path.clone())?)
            }
            None => None,
        };
        let client = client.filter(|_| !trace.no_prefetch);
        if client.is_some() || source.fills() {
            let handle = rt.handle().clone();
            source.start_prefetch(move || match client {
                Some(client) => crate::trace::lookup_for_prefetch(&image, &client, &handle),
                None => Vec::new(),
            });
        }
        Ok(LazyImage {
            source,
            trace_writer,
            _rt: rt,
        })
    }
}

impl Drop for LazyImage {
    fn drop(&mut self) {
        // The last trace write before the source (and its workers) go away.
        drop(self.trace_writer.take());
    }
}

impl BlockSource for LazyImage {
    fn size(&self) -> u64 {
        BlockSource::size(&*self.source)
    }
    fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        lend: Option<&mut Lend<'_>>,
    ) -> io::Result<Outcome> {
        self.source.read(offset, buf, lend)
    }
    fn stats(&self) -> Option<serde_json::Value> {
        BlockSource::stats(&*self.source)
    }
    fn file_extents(&self, offset: u64, len: usize, out: &mut Vec<cora_read::FileExtent>) -> bool {
        self.source.file_extents(offset, len, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_round_trips() {
        let r = SourceRecipe::File {
            path: PathBuf::from("/images/base.img"),
        };
        assert_eq!(SourceRecipe::from_json(&r.to_json()).unwrap(), r);
        assert!(SourceRecipe::from_json(&serde_json::json!({"kind": "nope"})).is_err());
    }
}
