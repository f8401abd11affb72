//! Access traces for trace-based prefetch: the chunk digests a first start read, in
//! first-access order, stored next to the image as an OCI referrer.
//!
//! File format (version 1), UTF-8 text, one item per line:
//! ```text
//! cora-trace v1
//! <64 lowercase hex digits: sha256 of an uncompressed chunk>
//! ...
//! ```
//! Blank lines are ignored; anything else is an error naming the line. At most
//! [`MAX_ENTRIES`] digests.
//!
//! In a registry the trace is a blob of media type [`LAYER_MEDIA_TYPE`] in an OCI image
//! manifest with `artifactType` [`ARTIFACT_TYPE`], the empty config, and `subject` = the
//! image manifest, so it is a referrer of the image. Registries without the referrers API
//! (docker-registry 2.8) are served by the fallback the distribution spec describes: an image
//! index under the tag `sha256-<hex of the image manifest digest>` listing the referrers.

use crate::cache::ChunkDigest;
use crate::registry::{Client, Reference, RegistryError, sha256_digest};
use blobfmt::oci;
use bytes::Bytes;
use serde_json::{Value, json};
use std::path::Path;
use tracing::debug;

pub const ARTIFACT_TYPE: &str = "application/vnd.cora.trace.v1";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.cora.trace.v1+text";
pub const HEADER: &str = "cora-trace v1";
/// 1 Mi chunks (about 64 GiB of image at the default chunk size).
pub const MAX_ENTRIES: usize = 1 << 20;
/// Upper bound on a trace blob, from `MAX_ENTRIES`.
pub const MAX_BYTES: u64 = (MAX_ENTRIES as u64 + 1) * 66;

const EMPTY_CONFIG_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";
const CREATED: &str = "org.opencontainers.image.created";

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace: {0}")]
    Format(String),
    #[error("trace file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("trace: {0}")]
    Image(String),
}

/// Chunk digests in first-access order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub chunks: Vec<ChunkDigest>,
}

impl Trace {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER.len() + 1 + self.chunks.len() * 65);
        out.extend_from_slice(HEADER.as_bytes());
        out.push(b'\n');
        for d in &self.chunks {
            out.extend_from_slice(hex::encode(d).as_bytes());
            out.push(b'\n');
        }
        out
    }

    /// Parse a trace; never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Trace, TraceError> {
        let bad = |m: String| TraceError::Format(m);
        if bytes.len() as u64 > MAX_BYTES {
            return Err(bad(format!(
                "{} bytes is more than a trace can be",
                bytes.len()
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, h)) if h.trim_end() == HEADER => {}
            Some((_, h)) => {
                return Err(bad(format!(
                    "first line is {:?}, expected {HEADER:?}",
                    h.chars().take(40).collect::<String>()
                )));
            }
            None => return Err(bad("empty".into())),
        }
        let mut chunks = Vec::new();
        for (n, line) in lines {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut d = [0u8; 32];
            if line.len() != 64 || hex::decode_to_slice(line, &mut d).is_err() {
                return Err(bad(format!(
                    "line {}: expected 64 hex digits, got {:?}",
                    n + 1,
                    line.chars().take(70).collect::<String>()
                )));
            }
            if chunks.len() == MAX_ENTRIES {
                return Err(bad(format!("more than {MAX_ENTRIES} entries")));
            }
            chunks.push(d);
        }
        Ok(Trace { chunks })
    }

    pub fn read_file(path: &Path) -> Result<Trace, TraceError> {
        let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Trace::parse(&bytes)
    }

    /// Write atomically (temporary file in the same directory, renamed into place).
    pub fn write_file(&self, path: &Path) -> Result<(), TraceError> {
        let io = |source| TraceError::Io {
            path: path.display().to_string(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".cora-trace-")
            .tempfile_in(dir)
            .map_err(io)?;
        std::io::Write::write_all(&mut tmp, &self.encode()).map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

/// The referrers fallback tag of a manifest digest: `sha256-<hex>`.
pub fn fallback_tag(manifest_digest: &str) -> String {
    manifest_digest.replacen(':', "-", 1)
}

/// The manifest digest and size `reference` resolves to (following an index to this
/// process's platform, as the lazy path does).
pub async fn resolve_manifest(
    client: &Client,
    reference: &Reference,
) -> Result<(String, u64, String), TraceError> {
    let (_, bytes) = crate::remote::fetch_manifest(client, reference)
        .await
        .map_err(|e| TraceError::Image(e.to_string()))?;
    let media_type = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string))
        .unwrap_or_else(|| oci::MT_OCI_MANIFEST.to_string());
    Ok((sha256_digest(&bytes), bytes.len() as u64, media_type))
}

/// Store `trace` (raw bytes, checked to parse) as a referrer of the image `reference`:
/// the blob, the empty config, the artifact manifest (by digest), and the fallback index.
/// Returns the digest of the artifact manifest.
pub async fn push(
    client: &Client,
    reference: &Reference,
    trace: &[u8],
) -> Result<String, TraceError> {
    let (subject, subject_size, subject_type) = resolve_manifest(client, reference).await?;
    push_for(
        client,
        reference,
        &subject,
        subject_size,
        &subject_type,
        trace,
    )
    .await
}

/// As [`push`], for a known subject manifest; `trace` is stored as given (even if it does
/// not parse, which lets tests store a garbage trace).
pub async fn push_for(
    client: &Client,
    reference: &Reference,
    subject: &str,
    subject_size: u64,
    subject_type: &str,
    trace: &[u8],
) -> Result<String, TraceError> {
    let blob = Bytes::copy_from_slice(trace);
    let blob_digest = sha256_digest(&blob);
    client
        .push_blob(reference, &blob_digest, blob.clone())
        .await?;
    let config_digest = sha256_digest(EMPTY_CONFIG);
    client
        .push_blob(reference, &config_digest, Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let created = created_now();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_CONFIG_TYPE,
            "digest": config_digest,
            "size": EMPTY_CONFIG.len(),
            "data": "e30=",
        },
        "layers": [{
            "mediaType": LAYER_MEDIA_TYPE,
            "digest": blob_digest,
            "size": blob.len(),
        }],
        "subject": {
            "mediaType": subject_type,
            "digest": subject,
            "size": subject_size,
        },
        "annotations": { CREATED: created },
    });
    let body =
        Bytes::from(serde_json::to_vec(&manifest).map_err(|e| TraceError::Image(e.to_string()))?);
    let manifest_digest = sha256_digest(&body);
    let mut by_digest = reference.clone();
    by_digest.tag = None;
    by_digest.digest = Some(manifest_digest.clone());
    client
        .put_manifest(&by_digest, oci::MT_OCI_MANIFEST, body.clone())
        .await?;

    // Fallback tag: the existing index (if any) plus this manifest.
    let mut tagged = reference.clone();
    tagged.digest = None;
    tagged.tag = Some(fallback_tag(subject));
    let mut entries: Vec<Value> = match client.get_manifest(&tagged).await {
        Ok(m) => serde_json::from_slice::<Value>(&m.bytes)
            .ok()
            .and_then(|v| v.get("manifests")?.as_array().cloned())
            .unwrap_or_default(),
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    entries.retain(|e| e.get("digest").and_then(Value::as_str) != Some(manifest_digest.as_str()));
    entries.push(json!({
        "mediaType": oci::MT_OCI_MANIFEST,
        "digest": manifest_digest,
        "size": body.len(),
        "artifactType": ARTIFACT_TYPE,
        "annotations": { CREATED: created },
    }));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": oci::MT_OCI_INDEX,
        "manifests": entries,
    });
    let index =
        Bytes::from(serde_json::to_vec(&index).map_err(|e| TraceError::Image(e.to_string()))?);
    client
        .put_manifest(&tagged, oci::MT_OCI_INDEX, index)
        .await?;
    Ok(manifest_digest)
}

fn created_now() -> String {
    cora_api::rfc3339(std::time::SystemTime::now())
}

/// Newest CORA trace descriptor in an index's `manifests` (by the created annotation, then
/// position).
fn newest_trace(index: &Value) -> Option<String> {
    let list = index.get("manifests")?.as_array()?;
    list.iter()
        .enumerate()
        .filter(|(_, d)| d.get("artifactType").and_then(Value::as_str) == Some(ARTIFACT_TYPE))
        .filter_map(|(i, d)| {
            let digest = d.get("digest")?.as_str()?.to_string();
            let created = d
                .get("annotations")
                .and_then(|a| a.get(CREATED))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            Some((created, i, digest))
        })
        .max()
        .map(|(_, _, d)| d)
}

/// Find the newest trace of the image manifest `subject` in the repository of `reference`:
/// the referrers API first, then the fallback tag. `Ok(None)` if there is none.
pub async fn find(
    client: &Client,
    reference: &Reference,
    subject: &str,
) -> Result<Option<Trace>, TraceError> {
    let mut found = None;
    match client
        .get_referrers(reference, subject, ARTIFACT_TYPE)
        .await
    {
        Ok(Some(body)) => match serde_json::from_slice::<Value>(&body) {
            Ok(v) => found = newest_trace(&v),
            Err(e) => debug!(error = %e, "referrers response is not JSON; trying the fallback tag"),
        },
        Ok(None) => debug!("no referrers API; trying the fallback tag"),
        Err(e) => debug!(error = %e, "referrers request failed; trying the fallback tag"),
    }
    if found.is_none() {
        let mut tagged = reference.clone();
        tagged.digest = None;
        tagged.tag = Some(fallback_tag(subject));
        match client.get_manifest(&tagged).await {
            Ok(m) => {
                let v: Value = serde_json::from_slice(&m.bytes).map_err(|e| {
                    TraceError::Format(format!("referrers index {}: {e}", fallback_tag(subject)))
                })?;
                found = newest_trace(&v);
            }
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    let Some(manifest_digest) = found else {
        return Ok(None);
    };
    let mut by_digest = reference.clone();
    by_digest.tag = None;
    by_digest.digest = Some(manifest_digest.clone());
    let m = client.get_manifest(&by_digest).await?;
    let v: Value = serde_json::from_slice(&m.bytes)
        .map_err(|e| TraceError::Format(format!("trace manifest {manifest_digest}: {e}")))?;
    let layer = v
        .get("layers")
        .and_then(Value::as_array)
        .and_then(|l| l.first())
        .ok_or_else(|| {
            TraceError::Format(format!("trace manifest {manifest_digest} has no layer"))
        })?;
    let blob = layer.get("digest").and_then(Value::as_str).ok_or_else(|| {
        TraceError::Format(format!(
            "trace manifest {manifest_digest}: layer without digest"
        ))
    })?;
    let size = layer.get("size").and_then(Value::as_u64).ok_or_else(|| {
        TraceError::Format(format!(
            "trace manifest {manifest_digest}: layer without size"
        ))
    })?;
    if size > MAX_BYTES {
        return Err(TraceError::Format(format!(
            "trace blob of {size} bytes is too large"
        )));
    }
    let bytes = client.get_blob(reference, blob, size).await?;
    Trace::parse(&bytes).map(Some)
}

/// The trace for `image` if it is in a registry, for a background prefetch: every problem
/// is a warning and an empty list, never a failure of the caller.
pub fn lookup_for_prefetch(
    image: &crate::imageref::ImageRef,
    client: &Client,
    rt: &tokio::runtime::Handle,
) -> Vec<ChunkDigest> {
    let crate::imageref::ImageRef::Registry(r) = image else {
        return Vec::new();
    };
    let found = (|| -> Result<Option<Trace>, TraceError> {
        let reference: Reference = r.parse()?;
        rt.block_on(async {
            // A reference by digest (as the snapshotter pins images) already names the manifest:
            // one request less before the prefetch can start. A tag is resolved first (an index
            // to this platform's manifest, which is what `cora trace push` stores the trace for).
            let subject = match &reference.digest {
                Some(d) => d.clone(),
                None => resolve_manifest(client, &reference).await?.0,
            };
            find(client, &reference, &subject).await
        })
    })();
    match found {
        Ok(Some(t)) => {
            debug!(image = %image, chunks = t.chunks.len(), "prefetching from the image's trace");
            t.chunks
        }
        Ok(None) => {
            debug!(image = %image, "no access trace stored with the image");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(image = %image, error = %e, "ignoring the image's access trace");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let t = Trace {
            chunks: vec![[1u8; 32], [0xab; 32]],
        };
        assert_eq!(Trace::parse(&t.encode()).unwrap(), t);
        assert!(Trace::parse(b"").is_err());
        assert!(Trace::parse(b"cora-trace v2\n").is_err());
        let e = Trace::parse(b"cora-trace v1\n\nzz\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        assert!(Trace::parse(&[0xff, 0xfe, 0x00]).is_err());
        assert_eq!(Trace::parse(b"cora-trace v1\n").unwrap().chunks.len(), 0);
    }

    #[test]
    fn fallback_tag_and_newest() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(fallback_tag(&d), format!("sha256-{}", "a".repeat(64)));
        let idx = json!({"manifests": [
            {"digest": "sha256:old", "artifactType": ARTIFACT_TYPE, "annotations": {CREATED: "2026-01-01T00:00:00Z"}},
            {"digest": "sha256:other", "artifactType": "application/x-sig"},
            {"digest": "sha256:new", "artifactType": ARTIFACT_TYPE, "annotations": {CREATED: "2026-02-01T00:00:00Z"}},
        ]});
        assert_eq!(newest_trace(&idx).as_deref(), Some("sha256:new"));
        assert_eq!(newest_trace(&json!({"manifests": 3})), None);
        assert!(created_now().ends_with('Z'));
    }
}
