//! OCI image layout and manifests: reading sources, writing converted images.

use crate::format::{Sha256Digest, oci_digest, parse_oci_digest, sha256};
use crate::{Error, IoContext};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Annotation keys, under the prefix containerd copies from layer descriptors into snapshot labels.
pub mod annotation {
    pub const PREFIX: &str = "containerd.io/snapshot/cora/";
    pub const VERSION: &str = "containerd.io/snapshot/cora/version";
    pub const TRAILER_OFFSET: &str = "containerd.io/snapshot/cora/trailer-offset";
    pub const TRAILER_LENGTH: &str = "containerd.io/snapshot/cora/trailer-length";
    pub const TRAILER_DIGEST: &str = "containerd.io/snapshot/cora/trailer-digest";
    pub const IMAGE_SIZE: &str = "containerd.io/snapshot/cora/image-size";
    pub const FS_TYPE: &str = "containerd.io/snapshot/cora/fs-type";
    /// Size of the layer this one was converted from (for reports only).
    pub const SOURCE_SIZE: &str = "containerd.io/snapshot/cora/source-size";
    pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    pub diff_ids: Vec<String>,
}

/// How a source layer is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub fn layer_compression(media_type: &str) -> Result<Compression, Error> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Ok(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Ok(Compression::Gzip),
        MT_LAYER_ZSTD => Ok(Compression::Zstd),
        other => Err(Error::Convert(format!(
            "unknown layer media type {other:?}"
        ))),
    }
}

/// Stream-decompress a layer blob into `dst`, returning the sha256 of the tar (its diff_id).
pub fn decompress_layer(
    src: &Path,
    compression: Compression,
    dst: &Path,
) -> Result<Sha256Digest, Error> {
    let f = File::open(src).ctx(|| format!("opening {}", src.display()))?;
    let mut reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(f),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(f))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(Error::Io)?),
    };
    let out = File::create(dst).ctx(|| format!("creating {}", dst.display()))?;
    let mut w = crate::writer::HashingWriter::new(io::BufWriter::with_capacity(1 << 20, out));
    io::copy(&mut reader, &mut w).ctx(|| format!("decompressing layer {}", src.display()))?;
    w.flush().ctx(|| "writing tar".into())?;
    Ok(w.finish().1)
}

/// An image as found in an OCI layout.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    pub root: PathBuf,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub config_bytes: Vec<u8>,
    pub config: Config,
}

impl LayoutImage {
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, Error> {
        blob_path(&self.root, digest)
    }
}

pub fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, Error> {
    let d = parse_oci_digest(digest)?;
    Ok(root.join("blobs/sha256").join(hex::encode(d)))
}

fn read_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::Convert(format!(
            "{what} is not valid JSON of the expected shape: {e}"
        ))
    })
}

/// Read a blob and check its digest.
pub fn read_blob(root: &Path, digest: &str) -> Result<Vec<u8>, Error> {
    let p = blob_path(root, digest)?;
    let bytes = fs::read(&p).ctx(|| format!("reading blob {digest} in {}", root.display()))?;
    if oci_digest(&sha256(&bytes)) != digest {
        return Err(Error::Convert(format!(
            "blob {digest} in {} does not match its digest",
            root.display()
        )));
    }
    Ok(bytes)
}

/// Open the image tagged `tag` (or the only image) in the layout at `root`; of a
/// multi-platform image, this process's platform.
pub fn open_layout(root: &Path, tag: Option<&str>) -> Result<LayoutImage, Error> {
    let desc = layout_entry(root, tag)?;
    if is_index(&desc.media_type) {
        let index: Index = read_json(&read_blob(root, &desc.digest)?, "image index")?;
        return open_manifest(root, select_platform(&index.manifests)?);
    }
    open_manifest(root, &desc)
}

/// An image of a layout entry, with its descriptor in the index it came from (platform fields
/// kept), or none for a tag that names one manifest.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    pub descriptor: Option<Descriptor>,
    pub image: LayoutImage,
}

/// The images tagged `tag` (or the only entry) in the layout at `root`: the one image, or an
/// index's images of `platforms` (every image when empty; see
/// [`crate::platform::select_all`]).
pub fn open_layout_platforms(
    root: &Path,
    tag: Option<&str>,
    platforms: &[crate::platform::Platform],
) -> Result<Vec<PlatformImage>, Error> {
    let desc = layout_entry(root, tag)?;
    if !is_index(&desc.media_type) {
        return Ok(vec![PlatformImage {
            descriptor: None,
            image: open_manifest(root, &desc)?,
        }]);
    }
    let index: Index = read_json(&read_blob(root, &desc.digest)?, "image index")?;
    crate::platform::select_all(&index.manifests, platforms)?
        .into_iter()
        .map(|d| {
            Ok(PlatformImage {
                descriptor: Some(d.clone()),
                image: open_manifest(root, d)?,
            })
        })
        .collect()
}

/// The media type and bytes of what `tag` names in the layout at `root` (a manifest or an
/// index), checked against its digest.
pub fn tagged_blob(root: &Path, tag: &str) -> Result<(String, Vec<u8>), Error> {
    let desc = layout_entry(root, Some(tag))?;
    Ok((desc.media_type.clone(), read_blob(root, &desc.digest)?))
}

/// Whether a manifest media type is a multi-platform index (OCI or Docker).
pub fn is_index(media_type: &str) -> bool {
    matches!(media_type, MT_OCI_INDEX | MT_DOCKER_LIST)
}

fn layout_entry(root: &Path, tag: Option<&str>) -> Result<Descriptor, Error> {
    let index_bytes = fs::read(root.join("index.json"))
        .ctx(|| format!("{} is not an OCI layout (index.json)", root.display()))?;
    let index: Index = read_json(&index_bytes, "index.json")?;
    pick_manifest(&index.manifests, tag)
        .cloned()
        .ok_or_else(|| {
            Error::Convert(format!(
                "no image {} in {}",
                tag.unwrap_or("(untagged)"),
                root.display()
            ))
        })
}

fn open_manifest(root: &Path, desc: &Descriptor) -> Result<LayoutImage, Error> {
    if is_index(&desc.media_type) {
        return Err(Error::Convert(format!(
            "{} is an index inside an index; only one level is supported",
            desc.digest
        )));
    }
    let bytes = read_blob(root, &desc.digest)?;
    let manifest = parse_manifest(&bytes)?;
    let config_bytes = read_blob(root, &manifest.config.digest)?;
    let config = parse_config(&config_bytes, &manifest)?;
    Ok(LayoutImage {
        root: root.to_path_buf(),
        manifest,
        manifest_bytes: bytes,
        config_bytes,
        config,
    })
}

/// The image config of `manifest` (bytes already checked against its digest): one
/// well-formed diff_id per layer.
pub fn parse_config(bytes: &[u8], manifest: &Manifest) -> Result<Config, Error> {
    let config: Config = read_json(bytes, "image config")?;
    if config.rootfs.diff_ids.len() != manifest.layers.len() {
        return Err(Error::Convert(format!(
            "config lists {} diff_ids for {} layers",
            config.rootfs.diff_ids.len(),
            manifest.layers.len()
        )));
    }
    for d in &config.rootfs.diff_ids {
        parse_oci_digest(d)?;
    }
    Ok(config)
}

pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, Error> {
    let m: Manifest = read_json(bytes, "image manifest")?;
    if m.layers.is_empty() {
        return Err(Error::Convert("manifest has no layers".into()));
    }
    Ok(m)
}

fn pick_manifest<'a>(all: &'a [Descriptor], tag: Option<&str>) -> Option<&'a Descriptor> {
    match tag {
        Some(t) => all.iter().find(|d| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(annotation::REF_NAME))
                .is_some_and(|n| n == t)
        }),
        None if all.len() == 1 => all.first(),
        None => None,
    }
}

/// The manifest of this process's platform ([`crate::platform::selected`]: the host's unless
/// `--platform` says otherwise) among an index's manifests.
pub fn select_platform(all: &[Descriptor]) -> Result<&Descriptor, Error> {
    crate::platform::select(all, crate::platform::selected())
}

/// Write `bytes` as a blob of the layout (temporary name, then rename).
pub fn put_blob(root: &Path, bytes: &[u8]) -> Result<String, Error> {
    let dir = root.join("blobs/sha256");
    fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).ctx(|| "temporary blob".into())?;
    tmp.write_all(bytes).ctx(|| "writing blob".into())?;
    persist_blob(root, tmp, &sha256(bytes))
}

/// Move a finished blob file (written in the layout's blob directory) to its name, `digest`
/// being the sha256 of its bytes; returns the OCI digest.
pub fn persist_blob(
    root: &Path,
    file: tempfile::NamedTempFile,
    digest: &crate::format::Sha256Digest,
) -> Result<String, Error> {
    let d = oci_digest(digest);
    file.persist(blob_path(root, &d)?)
        .map_err(|e| Error::IoAt {
            context: "renaming blob".into(),
            source: e.error,
        })?;
    Ok(d)
}

/// Record `manifest_bytes` (already stored as a blob) in index.json under `tag`.
pub fn tag_manifest(root: &Path, tag: &str, manifest_bytes: &[u8]) -> Result<(), Error> {
    tag_blob(root, tag, MT_OCI_MANIFEST, manifest_bytes)
}

/// Record the manifest or index `bytes` of `media_type` (already stored as a blob) in
/// index.json under `tag`.
pub fn tag_blob(root: &Path, tag: &str, media_type: &str, bytes: &[u8]) -> Result<(), Error> {
    let manifest_bytes = bytes;
    fs::create_dir_all(root).ctx(|| format!("creating {}", root.display()))?;
    let layout = root.join("oci-layout");
    if !layout.exists() {
        fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .ctx(|| "writing oci-layout".into())?;
    }
    let index_path = root.join("index.json");
    let mut index: Index = match fs::read(&index_path) {
        Ok(b) => read_json(&b, "index.json")?,
        Err(_) => Index {
            schema_version: 2,
            media_type: Some(MT_OCI_INDEX.into()),
            manifests: vec![],
        },
    };
    index.manifests.retain(|d| {
        d.annotations
            .as_ref()
            .and_then(|a| a.get(annotation::REF_NAME))
            .map(String::as_str)
            != Some(tag)
    });
    let mut ann = BTreeMap::new();
    ann.insert(annotation::REF_NAME.to_string(), tag.to_string());
    index.manifests.push(Descriptor {
        media_type: media_type.into(),
        digest: oci_digest(&sha256(manifest_bytes)),
        size: manifest_bytes.len() as u64,
        annotations: Some(ann),
        platform: None,
    });
    let bytes = serde_json::to_vec_pretty(&index).map_err(|e| Error::Convert(e.to_string()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(root).ctx(|| "temporary index".into())?;
    tmp.write_all(&bytes).ctx(|| "writing index.json".into())?;
    tmp.persist(&index_path).map_err(|e| Error::IoAt {
        context: "renaming index.json".into(),
        source: e.error,
    })?;
    Ok(())
}
