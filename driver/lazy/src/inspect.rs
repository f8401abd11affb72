//! `cora inspect`: what an image's layers hold, and `--verify` of every byte of them.

use crate::blobs::BlobRead;
use blobfmt::oci::{Manifest, annotation};
use blobfmt::{Trailer, decode_chunk, oci_digest};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

#[derive(Debug, Serialize)]
pub struct LayerInfo {
    pub index: usize,
    pub digest: String,
    pub media_type: String,
    /// Stored blob size.
    pub size: u64,
    pub cora: Option<CoraLayerInfo>,
}

#[derive(Debug, Serialize)]
pub struct CoraLayerInfo {
    pub diff_id: String,
    pub tar_size: u64,
    pub chunks: usize,
    pub data_bytes: u64,
    pub meta_chunks: usize,
    pub meta_bytes: u64,
    pub trailer_bytes: u64,
    pub fs_type: String,
    pub image_size: u64,
    pub extents: usize,
    pub chunk_avg: u32,
    pub source_size: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct ImageInfo {
    pub layers: Vec<LayerInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("layer {index} ({digest}): {msg}")]
    Layer {
        index: usize,
        digest: String,
        msg: String,
    },
}

fn layer_err(index: usize, digest: &str, msg: impl ToString) -> InspectError {
    InspectError::Layer {
        index,
        digest: digest.to_string(),
        msg: msg.to_string(),
    }
}

/// Read a layer's footer and trailer through `blobs` (two range reads).
pub fn read_layer_trailer(
    blobs: &dyn BlobRead,
    digest: &str,
) -> Result<(blobfmt::Footer, Trailer), blobfmt::Error> {
    let size = blobs
        .size(digest)
        .map_err(|e| blobfmt::Error::Format(e.to_string()))?;
    blobfmt::read_trailer(size, &mut |off, len| {
        blobs
            .read(digest, off, len)
            .map_err(|e| blobfmt::Error::Format(e.to_string()))
    })
}

pub fn inspect(manifest: &Manifest, blobs: &dyn BlobRead) -> Result<ImageInfo, InspectError> {
    let mut layers = Vec::new();
    for (index, l) in manifest.layers.iter().enumerate() {
        let is_cora = l
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(annotation::VERSION));
        let cora = if is_cora {
            let (footer, t) =
                read_layer_trailer(blobs, &l.digest).map_err(|e| layer_err(index, &l.digest, e))?;
            Some(CoraLayerInfo {
                diff_id: oci_digest(&t.diff_id),
                tar_size: t.stream_size,
                chunks: t.chunks.len(),
                data_bytes: t.data_size,
                meta_chunks: t.meta_chunks.len(),
                meta_bytes: t.meta_size,
                trailer_bytes: footer.trailer_length,
                fs_type: t.fs_type.name().to_string(),
                image_size: t.image_size,
                extents: t.extents.len(),
                chunk_avg: t.chunk_avg,
                source_size: l
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(annotation::SOURCE_SIZE))
                    .and_then(|s| s.parse().ok()),
            })
        } else {
            None
        };
        layers.push(LayerInfo {
            index,
            digest: l.digest.clone(),
            media_type: l.media_type.clone(),
            size: l.size,
            cora,
        });
    }
    Ok(ImageInfo { layers })
}

/// Check every chunk, the trailer seal and the tar digest of every CORA layer; the first
/// problem is named precisely.
pub fn verify(manifest: &Manifest, blobs: &dyn BlobRead) -> Result<u64, InspectError> {
    let mut chunks = 0u64;
    for (index, l) in manifest.layers.iter().enumerate() {
        let (_, t) =
            read_layer_trailer(blobs, &l.digest).map_err(|e| layer_err(index, &l.digest, e))?;
        let mut tar_hash = Sha256::new();
        for (i, c) in t.chunks.iter().chain(&t.meta_chunks).enumerate() {
            let frame = blobs
                .read(&l.digest, c.frame_offset, u64::from(c.compressed_len))
                .map_err(|e| layer_err(index, &l.digest, e))?;
            let data = decode_chunk(&frame, c).map_err(|e| {
                layer_err(
                    index,
                    &l.digest,
                    format!("chunk {i} at blob offset {}: {e}", c.frame_offset),
                )
            })?;
            if i < t.chunks.len() {
                tar_hash.update(&data);
            }
            chunks += 1;
        }
        let diff_id: [u8; 32] = tar_hash.finalize().into();
        if diff_id != t.diff_id {
            return Err(layer_err(
                index,
                &l.digest,
                "chunks are intact but the tar stream does not match the diff_id",
            ));
        }
    }
    Ok(chunks)
}
