//! A hostile registry: the distribution API served from memory, with images whose manifests,
//! configs and blobs a test has crafted, and bodies that disagree with their descriptors. A
//! real registry checks what is pushed to it; this one serves whatever the test put there,
//! as a compromised registry or a plain-HTTP mirror on the path could.
use crate::http_server::{HttpServer, respond};
use anyhow::{Context, Result};
use blobfmt::oci::{self, Manifest};
use bytes::Bytes;
use hyper::Response;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How the body of a whole-blob GET differs from the stored blob (range reads are served
/// honestly).
#[derive(Clone, Debug)]
pub enum Body {
    /// The stored bytes followed by this many more (a body longer than its descriptor).
    Padded(usize),
}

#[derive(Default)]
struct Store {
    /// By tag and by digest: (media type, bytes).
    manifests: HashMap<String, (String, Bytes)>,
    blobs: HashMap<String, Bytes>,
    bodies: HashMap<String, Body>,
}

pub struct HostileRegistry {
    pub server: HttpServer,
    /// `127.0.0.1:PORT`.
    pub host: String,
    store: Arc<Mutex<Store>>,
}

impl HostileRegistry {
    pub async fn start() -> Result<HostileRegistry> {
        let store = Arc::new(Mutex::new(Store::default()));
        let s = store.clone();
        let server = HttpServer::start(move |req| {
            let st = s.lock().unwrap_or_else(|p| p.into_inner());
            serve(&st, req.method.as_str(), &req.path, &req.headers)
        })
        .await?;
        let host = server.host.clone();
        Ok(HostileRegistry {
            server,
            host,
            store,
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves every blob of the OCI layout at `root` (as found there, unchecked).
    pub fn add_blobs_of(&self, root: &Path) -> Result<()> {
        let dir = root.join("blobs/sha256");
        let mut st = self.store();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let e = e?;
            let digest = format!("sha256:{}", e.file_name().to_string_lossy());
            st.blobs
                .insert(digest, Bytes::from(std::fs::read(e.path())?));
        }
        Ok(())
    }

    /// Stores `bytes` as a blob; returns its digest.
    pub fn put_blob(&self, bytes: Vec<u8>) -> String {
        let digest = digest(&bytes);
        self.store()
            .blobs
            .insert(digest.clone(), Bytes::from(bytes));
        digest
    }

    /// Whole-blob GETs of `digest` answer with `body` instead of the stored bytes.
    pub fn set_body(&self, digest: &str, body: Body) {
        self.store().bodies.insert(digest.to_string(), body);
    }

    /// Serves `manifest` (serialized as given) under `tag` and its digest; returns the digest.
    pub fn put_manifest(&self, tag: &str, manifest: &Manifest) -> Result<String> {
        let bytes = serde_json::to_vec(manifest)?;
        Ok(self.put_manifest_bytes(tag, oci::MT_OCI_MANIFEST, bytes))
    }

    pub fn put_manifest_bytes(&self, tag: &str, media_type: &str, bytes: Vec<u8>) -> String {
        let d = digest(&bytes);
        let entry = (media_type.to_string(), Bytes::from(bytes));
        let mut st = self.store();
        st.manifests.insert(tag.to_string(), entry.clone());
        st.manifests.insert(d.clone(), entry);
        d
    }
}

pub fn digest(bytes: &[u8]) -> String {
    blobfmt::oci_digest(&blobfmt::sha256(bytes))
}

fn serve(
    st: &Store,
    method: &str,
    path: &str,
    headers: &hyper::HeaderMap,
) -> Response<http_body_util::Full<Bytes>> {
    let head = method == "HEAD";
    let not_found = || respond(404, &[], r#"{"errors":[{"code":"NOT_FOUND"}]}"#);
    if path == "/v2/" {
        return respond(200, &[], "{}");
    }
    if let Some((_, reference)) = path.rsplit_once("/manifests/") {
        let Some((mt, bytes)) = st.manifests.get(reference) else {
            return not_found();
        };
        let d = digest(bytes);
        let body = if head { Bytes::new() } else { bytes.clone() };
        return respond(
            200,
            &[("content-type", mt), ("docker-content-digest", &d)],
            body,
        );
    }
    let Some((_, d)) = path.rsplit_once("/blobs/") else {
        return not_found();
    };
    let Some(blob) = st.blobs.get(d) else {
        return not_found();
    };
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    if head {
        let len = blob.len().to_string();
        return respond(200, &[("content-length", &len)], Bytes::new());
    }
    match range {
        Some((a, b)) if a <= b && b < blob.len() => {
            let cr = format!("bytes {a}-{b}/{}", blob.len());
            respond(206, &[("content-range", &cr)], blob.slice(a..=b))
        }
        Some(_) => respond(416, &[], ""),
        None => match st.bodies.get(d) {
            Some(Body::Padded(n)) => {
                let mut v = blob.to_vec();
                v.resize(v.len() + n, b'x');
                respond(200, &[], v)
            }
            None => respond(200, &[], blob.clone()),
        },
    }
}
