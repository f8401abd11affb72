//! Registry images for the lazy path and for `cora convert`: blob range reads through
//! `BlobRead`, and whole images pulled into / pushed from an OCI layout.

use crate::blobs::{BlobError, BlobRead};
use crate::registry::{Client, ClientConfig, Mirror, Reference};
use blobfmt::oci::{self, Manifest};
use std::path::Path;
use std::sync::Arc;
use tokio::runtime::Handle;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Format(#[from] blobfmt::Error),
    #[error("{0}")]
    Image(String),
}

/// Blobs of one repository on one registry host, read with range requests.
pub struct RegistryBlobs {
    client: Client,
    reference: Reference,
    rt: Handle,
}

impl RegistryBlobs {
    pub fn new(client: Client, reference: Reference, rt: Handle) -> Self {
        RegistryBlobs {
            client,
            reference,
            rt,
        }
    }

    fn err(&self, digest: &str, e: impl std::fmt::Display) -> BlobError {
        BlobError::Read {
            digest: digest.to_string(),
            source_name: self.name(),
            msg: e.to_string(),
        }
    }
}

impl BlobRead for RegistryBlobs {
    fn name(&self) -> String {
        format!("{}/{}", self.reference.registry, self.reference.repository)
    }

    fn size(&self, digest: &str) -> Result<u64, BlobError> {
        match self
            .rt
            .block_on(self.client.blob_exists(&self.reference, digest))
        {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(self.err(digest, "blob not found")),
            Err(e) => Err(self.err(digest, e)),
        }
    }

    fn read(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BlobError> {
        self.rt
            .block_on(
                self.client
                    .get_blob_range(&self.reference, digest, offset..offset + len),
            )
            .map(|b| b.to_vec())
            .map_err(|e| self.err(digest, e))
    }
}

/// The blob sources a lazy read of `reference` tries, in order: each mirror of `client`, then
/// the upstream. One source per mirror (not the client's own mirror fallback) so a source that
/// serves corrupt bytes is skipped for the next; all share `client`'s connections and tokens.
pub fn sources_for(client: &Client, reference: &Reference, rt: Handle) -> Vec<Arc<dyn BlobRead>> {
    let direct = client.without_mirrors();
    let mut out: Vec<Arc<dyn BlobRead>> = Vec::new();
    for m in client.mirrors() {
        let mut r = reference.clone();
        r.registry = m.host.clone();
        out.push(Arc::new(RegistryBlobs::new(direct.clone(), r, rt.clone())));
    }
    out.push(Arc::new(RegistryBlobs::new(direct, reference.clone(), rt)));
    out
}

/// Fetch the manifest of `reference` (following a multi-platform index to this process's
/// platform: the host's, or `--platform`).
pub async fn fetch_manifest(
    client: &Client,
    reference: &Reference,
) -> Result<(Manifest, Vec<u8>), RemoteError> {
    let m = client.get_manifest(reference).await?;
    let mut bytes = m.bytes.to_vec();
    if matches!(
        m.media_type.as_str(),
        oci::MT_OCI_INDEX | oci::MT_DOCKER_LIST
    ) {
        let index: oci::Index = serde_json::from_slice(&bytes)
            .map_err(|e| RemoteError::Image(format!("image index of {reference}: {e}")))?;
        let d = oci::select_platform(&index.manifests)
            .map_err(|e| RemoteError::Image(format!("{reference}: {e}")))?;
        let mut r = reference.clone();
        r.digest = Some(d.digest.clone());
        bytes = client.get_manifest(&r).await?.bytes.to_vec();
    }
    let manifest = oci::parse_manifest(&bytes)?;
    Ok((manifest, bytes))
}

/// A registry image's manifest (as [`fetch_manifest`]) and its image config.
pub struct RemoteImage {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub config_bytes: Vec<u8>,
    pub config: oci::Config,
}

/// The manifest of `reference` and its config, read whole (no more than the descriptor's
/// size) and checked against its digest, with one diff_id per layer.
pub async fn fetch_image(
    client: &Client,
    reference: &Reference,
) -> Result<RemoteImage, RemoteError> {
    let (manifest, manifest_bytes) = fetch_manifest(client, reference).await?;
    let config_bytes = client
        .get_blob(reference, &manifest.config.digest, manifest.config.size)
        .await?
        .to_vec();
    let config = oci::parse_config(&config_bytes, &manifest)
        .map_err(|e| RemoteError::Image(format!("{reference}: {e}")))?;
    Ok(RemoteImage {
        manifest,
        manifest_bytes,
        config_bytes,
        config,
    })
}

/// Download the image `reference` into the OCI layout at `root`, tagged `tag`. Of a
/// multi-platform image (OCI index or Docker manifest list) the images of `platforms` are
/// fetched (every image's when empty, see [`blobfmt::platform::select_all`]) and the index is
/// tagged as it is; [`oci::open_layout_platforms`] with the same `platforms` opens them.
pub async fn pull_to_layout(
    client: &Client,
    reference: &Reference,
    root: &Path,
    tag: &str,
    platforms: &[blobfmt::platform::Platform],
) -> Result<(), RemoteError> {
    let top = client.get_manifest(reference).await?;
    if !oci::is_index(&top.media_type) {
        let manifest = oci::parse_manifest(&top.bytes)?;
        pull_image(client, reference, root, &manifest, &top.bytes).await?;
        oci::put_blob(root, &top.bytes)?;
        oci::tag_manifest(root, tag, &top.bytes)?;
        return Ok(());
    }
    let index: oci::Index = serde_json::from_slice(&top.bytes)
        .map_err(|e| RemoteError::Image(format!("image index of {reference}: {e}")))?;
    for d in blobfmt::platform::select_all(&index.manifests, platforms)? {
        let mut r = reference.clone();
        r.digest = Some(d.digest.clone());
        let m = client.get_manifest(&r).await?;
        if oci::is_index(&m.media_type) {
            return Err(RemoteError::Image(format!(
                "{reference}: {} is an index inside an index; only one level is supported",
                d.digest
            )));
        }
        let manifest = oci::parse_manifest(&m.bytes)?;
        pull_image(client, reference, root, &manifest, &m.bytes).await?;
    }
    oci::put_blob(root, &top.bytes)?;
    oci::tag_blob(root, tag, &top.media_type, &top.bytes)?;
    Ok(())
}

/// The blobs of one image, then its manifest, into the layout at `root`.
async fn pull_image(
    client: &Client,
    reference: &Reference,
    root: &Path,
    manifest: &Manifest,
    manifest_bytes: &[u8],
) -> Result<(), RemoteError> {
    let blobs = root.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)
        .map_err(|e| RemoteError::Image(format!("creating {}: {e}", blobs.display())))?;
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let path = oci::blob_path(root, &d.digest)?;
        if !path.exists() {
            client
                .get_blob_to_file(reference, &d.digest, d.size, &path)
                .await?;
        }
    }
    oci::put_blob(root, manifest_bytes)?;
    Ok(())
}

/// Upload the image `tag` of the layout at `root` to `reference`: a single image, or each
/// image of an index (by digest) and then the index. Returns the tagged manifest's digest.
pub async fn push_layout(
    client: &Client,
    root: &Path,
    tag: &str,
    reference: &Reference,
) -> Result<String, RemoteError> {
    let entries = oci::open_layout_platforms(root, Some(tag), &[])?;
    let single = matches!(entries.as_slice(), [e] if e.descriptor.is_none());
    for e in &entries {
        let img = &e.image;
        for d in std::iter::once(&img.manifest.config).chain(&img.manifest.layers) {
            client
                .push_blob_file(reference, &d.digest, &img.blob_path(&d.digest)?)
                .await?;
        }
        let media_type = img
            .manifest
            .media_type
            .clone()
            .unwrap_or_else(|| oci::MT_OCI_MANIFEST.to_string());
        let mut r = reference.clone();
        if !single {
            r.digest = e.descriptor.as_ref().map(|d| d.digest.clone());
        }
        let digest = client
            .put_manifest(&r, &media_type, img.manifest_bytes.clone().into())
            .await?;
        if single {
            return Ok(digest);
        }
    }
    let (media_type, bytes) = oci::tagged_blob(root, tag)?;
    Ok(client
        .put_manifest(reference, &media_type, bytes.into())
        .await?)
}

/// How to reach registries, in a form that can be stored with a device and read back.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegistryAccess {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_files: Vec<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
}

impl RegistryAccess {
    pub fn config(&self) -> ClientConfig {
        ClientConfig {
            creds_file: self.creds_file.clone(),
            ca_files: self.ca_files.clone(),
            insecure_hosts: self.insecure_hosts.clone(),
            mirrors: self.mirrors.clone(),
            ..Default::default()
        }
    }
}

/// An image opened for lazy reads: its manifest, its config's diff_ids, the blob sources
/// tried in order, and (for a registry image) the one client every request of this image
/// goes through.
pub struct OpenedImage {
    pub manifest: Manifest,
    pub diff_ids: Vec<String>,
    pub sources: Vec<Arc<dyn BlobRead>>,
    pub client: Option<Client>,
}

/// Opens `image` for lazy reads (one registry client for the manifest, blobs and traces).
pub fn open_image(
    image: &crate::imageref::ImageRef,
    cfg: &ClientConfig,
    rt: &Handle,
) -> Result<OpenedImage, RemoteError> {
    use crate::imageref::ImageRef;
    match image {
        ImageRef::Layout { path, tag } => {
            let img = oci::open_layout(path, tag.as_deref())?;
            let blobs: Arc<dyn BlobRead> =
                Arc::new(crate::blobs::LayoutBlobs { root: path.clone() });
            Ok(OpenedImage {
                manifest: img.manifest,
                diff_ids: img.config.rootfs.diff_ids,
                sources: vec![blobs],
                client: None,
            })
        }
        ImageRef::Dir(_) => Err(RemoteError::Image(format!(
            "{image}: dir: is a conversion source only"
        ))),
        ImageRef::Registry(r) => {
            let reference: Reference = r.parse()?;
            let client = Client::new(cfg.clone())?;
            let img = rt.block_on(fetch_image(&client, &reference))?;
            let sources = sources_for(&client, &reference, rt.clone());
            Ok(OpenedImage {
                manifest: img.manifest,
                diff_ids: img.config.rootfs.diff_ids,
                sources,
                client: Some(client),
            })
        }
    }
}
