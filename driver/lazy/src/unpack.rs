//! The fallback for a layer stack that cannot be served lazily (no ublk device could be started):
//! fetch its layers whole, check each against the image config's diff_ids, and unpack them merged
//! into one directory with OCI whiteout semantics, the tree the device would have shown. CORA
//! layers are plain `tar+zstd`, so this needs nothing from the CORA index.

use crate::imageref::ImageRef;
use crate::registry::{Client, Reference};
use crate::remote::{RegistryAccess, RemoteError, fetch_image};
use blobfmt::format::oci_digest;
use blobfmt::oci::{self, Manifest};
use blobfmt::staging;
use blobfmt::tree::Tree;
use std::path::{Path, PathBuf};

/// What [`unpack_stack`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unpacked {
    /// Layers unpacked (the stack's top layer and all below it).
    pub layers: usize,
    /// Compressed bytes read (downloaded, for a registry image).
    pub blob_bytes: u64,
}

fn err(msg: impl Into<String>) -> RemoteError {
    RemoteError::Image(msg.into())
}

/// Where the layer blobs come from.
enum Blobs {
    Layout(PathBuf),
    Registry {
        client: Client,
        reference: Reference,
        rt: tokio::runtime::Runtime,
    },
}

impl Blobs {
    /// The blob as a local file: the layout's own file, or a download into `scratch` whose
    /// sha256 the client checks before it is renamed into place.
    fn file(&self, blob: &oci::Descriptor, scratch: &Path) -> Result<PathBuf, RemoteError> {
        match self {
            Blobs::Layout(root) => Ok(oci::blob_path(root, &blob.digest)?),
            Blobs::Registry {
                client,
                reference,
                rt,
            } => {
                let path = scratch.join("blob");
                rt.block_on(client.get_blob_to_file(reference, &blob.digest, blob.size, &path))?;
                Ok(path)
            }
        }
    }
}

/// Unpacks layers `0..=top` of `image` (`top` by blob digest; `None` = the top layer) into
/// `into`, which must not exist. The tree is built beside it and renamed into place, so `into`
/// appears only complete; on error nothing is left behind.
pub fn unpack_stack(
    image: &ImageRef,
    top: Option<&str>,
    access: &RegistryAccess,
    into: &Path,
) -> Result<Unpacked, RemoteError> {
    if into.exists() {
        return Err(err(format!("{} already exists", into.display())));
    }
    let parent = match into.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let (manifest, diff_ids, blobs) = open(image, access)?;
    let top = match top {
        None => manifest.layers.len().checked_sub(1),
        Some(d) => manifest.layers.iter().position(|l| l.digest == d),
    }
    .ok_or_else(|| {
        err(format!(
            "{image}: no layer {}",
            top.unwrap_or("(empty image)")
        ))
    })?;

    let work = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(parent)
        .map_err(|e| err(format!("creating a work dir in {}: {e}", parent.display())))?;
    let tree_dir = work.path().join("tree");
    std::fs::create_dir(&tree_dir)
        .map_err(|e| err(format!("creating {}: {e}", tree_dir.display())))?;
    // The merged tree is built from headers; contents are copied from the layer tars once,
    // when it is written out, so every layer's tar is kept until then.
    let mut tree = Tree::new();
    let mut tars = Vec::new();
    let mut blob_bytes = 0;
    for (i, layer) in manifest.layers[..=top].iter().enumerate() {
        let compression = oci::layer_compression(&layer.media_type)?;
        let blob = blobs.file(layer, work.path())?;
        blob_bytes += std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
        let tar = work.path().join(format!("layer-{i}.tar"));
        let diff_id = oci_digest(&oci::decompress_layer(&blob, compression, &tar)?);
        if diff_id != diff_ids[i] {
            return Err(err(format!(
                "layer {i} ({}) unpacks to {diff_id}, but the image config says {}",
                layer.digest, diff_ids[i]
            )));
        }
        let layer_no = u32::try_from(i).map_err(|_| err("too many layers"))?;
        tree.apply_layer(&tar, layer_no)?;
        let opened = std::fs::File::open(&tar);
        tars.push(opened.map_err(|e| err(format!("opening {}: {e}", tar.display())))?);
        if matches!(blobs, Blobs::Registry { .. }) {
            let _ = std::fs::remove_file(&blob);
        }
    }
    staging::materialize(&tree, &tars, &tree_dir)?;
    std::fs::rename(&tree_dir, into)
        .map_err(|e| err(format!("renaming the tree to {}: {e}", into.display())))?;
    Ok(Unpacked {
        layers: top + 1,
        blob_bytes,
    })
}

/// The manifest, the config's diff_ids (one per layer) and where the blobs are.
fn open(
    image: &ImageRef,
    access: &RegistryAccess,
) -> Result<(Manifest, Vec<String>, Blobs), RemoteError> {
    match image {
        ImageRef::Layout { path, tag } => {
            let img = oci::open_layout(path, tag.as_deref())?;
            Ok((
                img.manifest,
                img.config.rootfs.diff_ids,
                Blobs::Layout(path.clone()),
            ))
        }
        ImageRef::Dir(_) => Err(err(format!("{image}: dir: is a conversion source only"))),
        ImageRef::Registry(r) => {
            let reference: Reference = r.parse()?;
            let client = Client::new(access.config())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| err(format!("starting a runtime: {e}")))?;
            let img = rt.block_on(fetch_image(&client, &reference))?;
            Ok((
                img.manifest,
                img.config.rootfs.diff_ids,
                Blobs::Registry {
                    client,
                    reference,
                    rt,
                },
            ))
        }
    }
}
