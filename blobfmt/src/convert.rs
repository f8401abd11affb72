//! Converting an ordered list of layer tars into CORA layer blobs.

use crate::erofs;
use crate::format::{FsType, Lower, Sha256Digest, Trailer, oci_digest};
use crate::image::{self, BLOCK_SIZE};
use crate::staging;
use crate::tree::{FileContent, Tree};
use crate::writer::{ChunkParams, HashingWriter, write_chunked, write_trailer};
use crate::{Error, IoContext};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Options {
    pub fs: FsType,
    pub params: ChunkParams,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fs: FsType::Erofs,
            params: ChunkParams::default(),
        }
    }
}

/// One converted layer: a finished blob file named by its digest's hex.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    pub path: PathBuf,
    pub digest: Sha256Digest,
    pub size: u64,
    pub trailer: Trailer,
    pub trailer_offset: u64,
    pub trailer_length: u64,
    pub trailer_digest: Sha256Digest,
    pub stats: LayerStats,
    /// The regular files this layer adds, where their content lies in its tar stream.
    pub files: Vec<FileContent>,
}

#[derive(Debug, Clone, Default)]
pub struct LayerStats {
    pub data_blocks: u64,
    pub meta_blocks: u64,
    pub zero_blocks: u64,
    pub chunk_secs: f64,
    pub image_secs: f64,
}

/// What a conversion reports about one layer.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// A new phase of the layer's conversion began.
    Phase(&'a str),
    /// Bytes of the layer's tar stream chunked so far, out of `total`.
    Chunked { done: u64, total: u64 },
    /// The layer's blob is complete.
    Done(&'a str),
}

/// Progress callback: (layer index, step).
pub type Progress<'a> = &'a dyn Fn(usize, Step<'_>);

/// Counts what the chunker has read and reports it every few MiB.
struct Counted<'a, R> {
    inner: R,
    layer: usize,
    done: u64,
    total: u64,
    reported: u64,
    progress: Progress<'a>,
}

impl<R: std::io::Read> std::io::Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= 4 << 20 || (n == 0 && self.done != self.reported) {
            self.reported = self.done;
            (self.progress)(
                self.layer,
                Step::Chunked {
                    done: self.done,
                    total: self.total,
                },
            );
        }
        Ok(n)
    }
}

/// Convert layer tars (bottom first) into blobs written under `out_dir`, using `work` for
/// scratch (ext4 stacks only: erofs images are built in memory). Blobs appear under their
/// final name only when complete.
pub fn convert_layers(
    tars: &[PathBuf],
    opts: &Options,
    work: &Path,
    out_dir: &Path,
    progress: Progress<'_>,
) -> Result<Vec<LayerBlob>, Error> {
    let given = |i: usize| {
        Ok(LayerTar {
            path: tars[i].clone(),
            scratch: false,
        })
    };
    convert_layers_from(tars.len(), &given, opts, work, out_dir, progress)
}

/// A layer's tar for [`convert_layers_from`]; a scratch one is removed once its layer is done.
pub struct LayerTar {
    pub path: PathBuf,
    pub scratch: bool,
}

/// [`convert_layers`] of `n` layers whose tars `make_tar(i)` makes (decompressing a source
/// layer, say), the next one while the current layer converts. An erofs stack needs only the
/// tree of its lower layers, not their tars, so scratch space stays about two layers deep.
pub fn convert_layers_from(
    n: usize,
    make_tar: &(dyn Fn(usize) -> Result<LayerTar, Error> + Sync),
    opts: &Options,
    work: &Path,
    out_dir: &Path,
    progress: Progress<'_>,
) -> Result<Vec<LayerBlob>, Error> {
    opts.params.validate()?;
    let mut tree = Tree::new();
    // Only ext4 stacks read lower layers' tars again (an open file outlives its removal).
    let mut open_tars = Vec::new();
    let mut contents: Vec<FileContent> = Vec::new();
    let mut out: Vec<LayerBlob> = Vec::new();
    std::thread::scope(|scope| -> Result<(), Error> {
        let mut next = (n > 0).then(|| scope.spawn(move || make_tar(0)));
        for i in 0..n {
            let Some(making) = next.take() else { break };
            if !making.is_finished() {
                progress(i, Step::Phase("decompressing source layer"));
            }
            let tar = making
                .join()
                .unwrap_or_else(|_| Err(Error::Convert("making a layer tar panicked".into())))?;
            next = (i + 1 < n).then(|| scope.spawn(move || make_tar(i + 1)));
            let blob = convert_layer(
                i,
                &tar.path,
                &mut tree,
                &mut open_tars,
                &mut contents,
                &out,
                opts,
                work,
                out_dir,
                progress,
            )?;
            if tar.scratch {
                std::fs::remove_file(&tar.path)
                    .ctx(|| format!("removing {}", tar.path.display()))?;
            }
            out.push(blob);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Layer `i` of a stack whose lower layers are `lowers` (and already in `tree`).
#[allow(clippy::too_many_arguments)]
fn convert_layer(
    i: usize,
    tar_path: &Path,
    tree: &mut Tree,
    open_tars: &mut Vec<File>,
    contents: &mut Vec<FileContent>,
    lowers: &[LayerBlob],
    opts: &Options,
    work: &Path,
    out_dir: &Path,
    progress: Progress<'_>,
) -> Result<LayerBlob, Error> {
    let layer = i as u32;
    let tmp = tempfile::Builder::new()
        .prefix(".cora-blob-")
        .tempfile_in(out_dir)
        .ctx(|| format!("creating a temporary blob in {}", out_dir.display()))?;
    let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp.as_file()));

    // Chunking (compression on every core) and building the stack image (reading the
    // tar's headers, then metadata in memory) read the same tar independently: overlap them.
    progress(i, Step::Phase("chunking and building the filesystem image"));
    if opts.fs == FsType::Ext4 {
        open_tars.push(File::open(tar_path).ctx(|| format!("opening {}", tar_path.display()))?);
    }
    let (chunked, imaged) = std::thread::scope(|scope| {
        let imaging = scope.spawn(|| -> Result<_, Error> {
            let t1 = Instant::now();
            let added = tree.apply_layer(tar_path, layer)?;
            let described = match opts.fs {
                FsType::Erofs => erofs::build(tree)?,
                FsType::Ext4 => {
                    contents.extend(added.iter().cloned());
                    ext4_image(tree, open_tars, contents, work, i)?
                }
            };
            Ok((described, t1.elapsed().as_secs_f64(), added))
        });
        let t0 = Instant::now();
        let chunked = File::open(tar_path)
            .and_then(|tar| Ok((tar.metadata()?.len(), tar)))
            .ctx(|| format!("opening {}", tar_path.display()))
            .and_then(|(total, tar)| {
                let counted = Counted {
                    inner: tar,
                    layer: i,
                    done: 0,
                    total,
                    reported: 0,
                    progress,
                };
                write_chunked(counted, &mut w, 0, &opts.params, false)
            })
            .map(|d| (d, t0.elapsed().as_secs_f64()));
        let imaged = imaging
            .join()
            .unwrap_or_else(|_| Err(Error::Convert("image builder thread panicked".into())));
        (chunked, imaged)
    });
    let (data, chunk_secs) = chunked?;
    let (described, image_secs, files) = imaged?;
    let image_size = described.image_size;

    let meta = write_chunked(
        described.meta.as_slice(),
        &mut w,
        data.written,
        &opts.params,
        true,
    )?;
    let trailer = Trailer {
        flags: 0,
        block_size: BLOCK_SIZE,
        fs_type: opts.fs,
        chunk_min: opts.params.min,
        chunk_avg: opts.params.avg,
        chunk_max: opts.params.max,
        stream_size: data.stream_size,
        data_size: data.written,
        image_size,
        meta_size: meta.stream_size,
        diff_id: data.stream_digest,
        lowers: lowers
            .iter()
            .map(|l| Lower {
                blob_digest: l.digest,
                diff_id: l.trailer.diff_id,
            })
            .collect(),
        chunks: data.chunks,
        meta_chunks: meta.chunks,
        extents: described.extents,
    };
    let trailer_offset = data.written + meta.written;
    let footer = write_trailer(&mut w, trailer_offset, &trailer, opts.params.zstd_level)?;
    w.flush().ctx(|| "writing blob".into())?;
    let (_, digest, size) = w.finish();
    let path = out_dir.join(hex::encode(digest));
    tmp.persist(&path).map_err(|e| Error::IoAt {
        context: format!("renaming blob to {}", path.display()),
        source: e.error,
    })?;
    progress(i, Step::Done(&oci_digest(&digest)));
    Ok(LayerBlob {
        path,
        digest,
        size,
        trailer_offset,
        trailer_length: footer.trailer_length,
        trailer_digest: footer.trailer_digest,
        trailer,
        stats: LayerStats {
            data_blocks: described.data_blocks,
            meta_blocks: described.meta_blocks,
            zero_blocks: described.zero_blocks,
            chunk_secs,
            image_secs,
        },
        files,
    })
}

/// An ext4 stack image: mke2fs needs a directory, so the tree is written out under `work`,
/// and the image's blocks are matched back to tar bytes.
fn ext4_image(
    tree: &Tree,
    tars: &[File],
    contents: &[FileContent],
    work: &Path,
    i: usize,
) -> Result<image::Described, Error> {
    let dir = work.join(format!("tree-{i}"));
    let image_path = work.join(format!("stack-{i}.img"));
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    staging::materialize(tree, tars, &dir)?;
    image::build_ext4(&dir, &image_path)?;
    let described = image::describe(&image_path, tars, contents)?;
    std::fs::remove_file(&image_path).ctx(|| "removing image".into())?;
    std::fs::remove_dir_all(&dir).ctx(|| format!("removing {}", dir.display()))?;
    Ok(described)
}

/// The chunks that hold the content of `paths` in the stack of `layers` (bottom first), for a
/// prefetch list given at convert time: in the order of `paths`, each path a regular file or
/// a directory (every file below it, in tar order), the topmost layer's copy of a file; each
/// chunk once. Symlinks are not followed, and a file whited out by a higher layer still counts
/// (a list names what the entrypoint reads). Also returns the paths that matched no file.
pub fn file_chunks(layers: &[&LayerBlob], paths: &[PathBuf]) -> (Vec<Sha256Digest>, Vec<PathBuf>) {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut unmatched = Vec::new();
    for wanted in paths {
        let rel: PathBuf = wanted
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        let mut matched = false;
        // Files already taken from a higher layer hide the lower layers' copies.
        let mut taken = std::collections::HashSet::new();
        for layer in layers.iter().rev() {
            for f in layer.files.iter().filter(|f| f.path.starts_with(&rel)) {
                if !taken.insert(f.path.clone()) {
                    continue;
                }
                matched = true;
                let chunks = &layer.trailer.chunks;
                let end = f.offset + f.size;
                let first = chunks.partition_point(|c| c.stream_end() <= f.offset);
                for c in chunks[first..].iter().take_while(|c| c.stream_offset < end) {
                    if f.size > 0 && seen.insert(c.digest) {
                        out.push(c.digest);
                    }
                }
            }
        }
        if !matched {
            unmatched.push(wanted.clone());
        }
    }
    (out, unmatched)
}

/// One layer of a converted image, with its source for comparison.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub source_digest: String,
    pub source_size: u64,
    pub tar_size: u64,
    pub blob: LayerBlob,
}

#[derive(Debug, Clone)]
pub struct ImageReport {
    pub layers: Vec<LayerReport>,
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub manifest: crate::oci::Manifest,
    pub secs: f64,
}

/// Convert the image `src` into a CORA image tagged `dst_tag` in the layout at `dst_root`.
pub fn convert_layout(
    src: &crate::oci::LayoutImage,
    dst_root: &Path,
    dst_tag: &str,
    opts: &Options,
    work: &Path,
    progress: Progress<'_>,
) -> Result<ImageReport, Error> {
    let report = convert_image(src, dst_root, opts, work, progress)?;
    let bytes = crate::oci::read_blob(dst_root, &report.manifest_digest)?;
    crate::oci::tag_manifest(dst_root, dst_tag, &bytes)?;
    Ok(report)
}

/// Tags the converted images of `sources` (one report each, in order) as `dst_tag` in the
/// layout at `dst_root`: a single image as itself, the images of an index as an OCI index
/// whose descriptors keep the source descriptors' platform and annotations. Returns the
/// tagged manifest's or index's digest.
pub fn tag_converted(
    sources: &[crate::oci::PlatformImage],
    reports: &[ImageReport],
    dst_root: &Path,
    dst_tag: &str,
) -> Result<String, Error> {
    use crate::oci::{self, Descriptor, Index};
    if let ([only], [report]) = (sources, reports)
        && only.descriptor.is_none()
    {
        let bytes = oci::read_blob(dst_root, &report.manifest_digest)?;
        oci::tag_manifest(dst_root, dst_tag, &bytes)?;
        return Ok(report.manifest_digest.clone());
    }
    if sources.len() != reports.len() {
        return Err(Error::Convert(format!(
            "{} images converted of {}",
            reports.len(),
            sources.len()
        )));
    }
    let manifests = sources
        .iter()
        .zip(reports)
        .map(|(src, report)| {
            let from = src.descriptor.as_ref();
            Descriptor {
                media_type: oci::MT_OCI_MANIFEST.into(),
                digest: report.manifest_digest.clone(),
                size: report.manifest_size,
                annotations: from.and_then(|d| d.annotations.clone()),
                platform: from.and_then(|d| d.platform.clone()),
            }
        })
        .collect();
    let index = Index {
        schema_version: 2,
        media_type: Some(oci::MT_OCI_INDEX.into()),
        manifests,
    };
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::Convert(e.to_string()))?;
    let digest = oci::put_blob(dst_root, &bytes)?;
    oci::tag_blob(dst_root, dst_tag, oci::MT_OCI_INDEX, &bytes)?;
    Ok(digest)
}

/// Convert the image `src` into a CORA image in the layout at `dst_root` (untagged: see
/// [`convert_layout`] and [`tag_converted`]).
pub fn convert_image(
    src: &crate::oci::LayoutImage,
    dst_root: &Path,
    opts: &Options,
    work: &Path,
    progress: Progress<'_>,
) -> Result<ImageReport, Error> {
    use crate::oci::{self, Descriptor, Manifest, annotation};
    use std::collections::BTreeMap;
    let t0 = Instant::now();
    let blob_dir = dst_root.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).ctx(|| format!("creating {}", blob_dir.display()))?;
    let mut compressions = Vec::new();
    for (i, l) in src.manifest.layers.iter().enumerate() {
        if l.media_type.contains("nondistributable") || l.media_type.contains("foreign") {
            return Err(Error::Convert(format!(
                "layer {i} ({}) is non-distributable ({}): its content may not be pushed \
                 elsewhere, so it cannot be converted",
                l.digest, l.media_type
            )));
        }
        compressions.push(
            oci::layer_compression(&l.media_type)
                .map_err(|e| Error::Convert(format!("layer {i} ({}): {e}", l.digest)))?,
        );
    }
    // An uncompressed layer is its own tar: read in place, not copied. Every layer's diff_id is
    // checked below against the digest the chunker takes of the stream anyway.
    let make_tar = |i: usize| -> Result<LayerTar, Error> {
        let blob = src.blob_path(&src.manifest.layers[i].digest)?;
        if compressions[i] == oci::Compression::None {
            return Ok(LayerTar {
                path: blob,
                scratch: false,
            });
        }
        let tar = work.join(format!("layer-{i}.tar"));
        oci::decompress_layer(&blob, compressions[i], &tar)?;
        Ok(LayerTar {
            path: tar,
            scratch: true,
        })
    };
    let n = src.manifest.layers.len();
    let blobs = convert_layers_from(n, &make_tar, opts, work, &blob_dir, progress)?;
    // Nothing names the blobs until every layer is what the config says it is.
    for (i, (l, blob)) in src.manifest.layers.iter().zip(&blobs).enumerate() {
        let diff_id = oci_digest(&blob.trailer.diff_id);
        if diff_id != src.config.rootfs.diff_ids[i] {
            return Err(Error::Convert(format!(
                "layer {i} ({}) decompresses to {diff_id}, but the config's diff_id is {}",
                l.digest, src.config.rootfs.diff_ids[i]
            )));
        }
    }
    let mut layers = Vec::new();
    let mut descs = Vec::new();
    for (l, blob) in src.manifest.layers.iter().zip(blobs) {
        let mut ann = BTreeMap::new();
        ann.insert(
            annotation::VERSION.into(),
            crate::format::VERSION.to_string(),
        );
        ann.insert(
            annotation::TRAILER_OFFSET.into(),
            blob.trailer_offset.to_string(),
        );
        ann.insert(
            annotation::TRAILER_LENGTH.into(),
            blob.trailer_length.to_string(),
        );
        ann.insert(
            annotation::TRAILER_DIGEST.into(),
            oci_digest(&blob.trailer_digest),
        );
        ann.insert(
            annotation::IMAGE_SIZE.into(),
            blob.trailer.image_size.to_string(),
        );
        ann.insert(annotation::FS_TYPE.into(), opts.fs.name().into());
        ann.insert(annotation::SOURCE_SIZE.into(), l.size.to_string());
        descs.push(Descriptor {
            media_type: oci::MT_LAYER_ZSTD.into(),
            digest: oci_digest(&blob.digest),
            size: blob.size,
            annotations: Some(ann),
            platform: None,
        });
        layers.push(LayerReport {
            source_digest: l.digest.clone(),
            source_size: l.size,
            tar_size: blob.trailer.stream_size,
            blob,
        });
    }
    let config_digest = oci::put_blob(dst_root, &src.config_bytes)?;
    let mut mann = BTreeMap::new();
    mann.insert(
        annotation::VERSION.into(),
        crate::format::VERSION.to_string(),
    );
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(oci::MT_OCI_MANIFEST.into()),
        config: Descriptor {
            media_type: oci::MT_OCI_CONFIG.into(),
            digest: config_digest,
            size: src.config_bytes.len() as u64,
            annotations: None,
            platform: None,
        },
        layers: descs,
        annotations: Some(mann),
    };
    let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::Convert(e.to_string()))?;
    let manifest_digest = oci::put_blob(dst_root, &bytes)?;
    Ok(ImageReport {
        layers,
        manifest_digest,
        manifest_size: bytes.len() as u64,
        manifest,
        secs: t0.elapsed().as_secs_f64(),
    })
}
