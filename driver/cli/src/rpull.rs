//! `cora rpull`: records a registry image in containerd and prepares its layers through a
//! snapshotter, the way containerd's own pull + unpack does, but letting a remote snapshotter
//! claim CORA layers so their data is never downloaded.
//!
//! Everything goes through containerd's gRPC API on its unix socket (namespace in the
//! `containerd-namespace` header, a lease in `containerd-lease` for the duration):
//! 1. the manifest and config blobs are written to the content store with the garbage-collection
//!    labels containerd's pull sets;
//! 2. each layer, bottom first, is `Stat`ed (present: nothing to do), then `Prepare`d with the
//!    CRI labels plus the layer's `containerd.io/snapshot/*` annotations. AlreadyExists
//!    means the snapshotter committed it as a remote layer. Success means it wants the data: the
//!    layer blob is fetched into the content store, applied with the diff service onto the
//!    returned mounts and committed as its chainID (containerd's unpack);
//! 3. only then the image record is created (or updated), so a failed pull leaves no image.
use containerd_api::labels::{
    CRI_IMAGE_LAYERS, CRI_IMAGE_REF, CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, INHERITED_PREFIX,
    MAX_LABEL, TARGET_REF,
};
use containerd_api::proto::{content, diff, images, leases, snapshots, types};
use cora_api::{error_chain, rfc3339};
use lazy::registry::{Client, ClientConfig, Reference, RegistryError, sha256_digest};
use lazy::remote::{RemoteError, RemoteImage, fetch_image};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub use containerd_api::DEFAULT_ADDRESS;
/// Bytes per content Write message (containerd accepts up to 16 MiB per gRPC message).
const WRITE_CHUNK: usize = 1 << 20;
/// A lease outlives a crashed `rpull` by at most this long.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum RpullError {
    #[error("bad image reference {reference:?}: {source}")]
    Reference {
        reference: String,
        source: RegistryError,
    },
    #[error("{what}: {source}")]
    Registry { what: String, source: RemoteError },
    #[error("image {reference}: {msg}")]
    Image { reference: String, msg: String },
    #[error("cannot reach containerd at {}: {msg}", address.display())]
    Connect { address: PathBuf, msg: String },
    #[error(
        "containerd has no snapshotter {name:?} (configure it as [proxy_plugins.{name}] in containerd's config.toml, or use a built-in one such as overlayfs)"
    )]
    NoSnapshotter { name: String },
    #[error("containerd: {what}: {code}: {message}")]
    Containerd {
        what: String,
        code: Code,
        message: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

type Result<T, E = RpullError> = std::result::Result<T, E>;

/// Where to record the image and which snapshotter prepares its layers.
#[derive(Clone, Debug)]
pub struct RpullOptions {
    /// containerd's gRPC socket.
    pub address: PathBuf,
    /// containerd namespace (`ctr -n`).
    pub namespace: String,
    /// Snapshotter name as configured in containerd (`cora`, or e.g. `overlayfs`).
    pub snapshotter: String,
    /// How to reach the registry.
    pub registry: ClientConfig,
}

/// What happened to one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerState {
    /// The snapshotter claimed it (AlreadyExists on Prepare): served lazily, nothing fetched.
    Remote,
    /// Its snapshot already existed in this namespace.
    Present,
    /// Fetched (unless already in the content store), applied and committed.
    Unpacked,
}

impl std::fmt::Display for LayerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerState::Remote => "remote",
            LayerState::Present => "present",
            LayerState::Unpacked => "unpacked",
        })
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    /// Digest of the layer blob.
    pub digest: String,
    /// Size of the layer blob.
    pub size: u64,
    /// Snapshot name the layer is committed under.
    pub chain_id: String,
    pub state: LayerState,
    /// Layer bytes downloaded from the registry for this layer.
    pub bytes_fetched: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RpullReport {
    /// The image record's name (the reference as given).
    pub image: String,
    pub manifest_digest: String,
    pub layers: Vec<LayerReport>,
    /// Everything downloaded from the registry: manifest, config and layer blobs.
    pub bytes_fetched: u64,
    /// Manifest + config + all layer blobs: what a full pull would download.
    pub image_bytes: u64,
}

/// Pulls `reference` into containerd as described in the module docs. `on_layer` is called
/// after each layer, bottom first, with its index.
pub async fn rpull(
    reference: &str,
    opts: &RpullOptions,
    on_layer: &mut dyn FnMut(usize, &LayerReport),
) -> Result<RpullReport> {
    let parsed: Reference = reference.parse().map_err(|source| RpullError::Reference {
        reference: reference.to_owned(),
        source,
    })?;
    // containerd first: a missing daemon is reported before any registry traffic.
    let mut ctrd = Containerd::connect(&opts.address, &opts.namespace).await?;

    let client = Client::new(opts.registry.clone()).map_err(|e| RpullError::Registry {
        what: "registry client".into(),
        source: e.into(),
    })?;
    let RemoteImage {
        manifest,
        manifest_bytes,
        config_bytes,
        config,
    } = fetch_image(&client, &parsed)
        .await
        .map_err(|source| RpullError::Registry {
            what: format!("fetching the manifest of {reference} and its config"),
            source,
        })?;
    let bad_image = |msg: String| RpullError::Image {
        reference: reference.to_owned(),
        msg,
    };
    let diff_ids = config.rootfs.diff_ids;
    if manifest.layers.is_empty() {
        return Err(bad_image("the manifest has no layers".into()));
    }
    let chain_ids = chain_ids(&diff_ids);

    // The first snapshots call also tells whether the snapshotter exists.
    ctrd.stat(&opts.snapshotter, &chain_ids[0]).await?;

    let manifest_digest = sha256_digest(&manifest_bytes);
    let media_type = manifest
        .media_type
        .clone()
        .unwrap_or_else(|| blobfmt::oci::MT_OCI_MANIFEST.to_owned());
    let plan = Plan {
        reference,
        parsed: &parsed,
        client: &client,
        opts,
        manifest: &manifest,
        manifest_bytes: &manifest_bytes,
        manifest_digest: &manifest_digest,
        manifest_media_type: &media_type,
        config_bytes: &config_bytes,
        diff_ids: &diff_ids,
        chain_ids: &chain_ids,
    };

    let lease = ctrd.create_lease().await?;
    ctrd.lease = Some(header_value(&lease, "lease id")?);
    let result = plan.run(&ctrd, on_layer).await;
    ctrd.lease = None;
    if let Err(e) = ctrd.delete_lease(&lease).await {
        // Not fatal: the lease expires by itself (containerd.io/gc.expire).
        tracing::warn!("deleting lease {lease}: {e}");
    }
    let layers = result?;
    let layer_bytes: u64 = layers.iter().map(|l| l.bytes_fetched).sum();
    let all_layers: u64 = manifest.layers.iter().map(|l| l.size).sum();
    let meta = (manifest_bytes.len() + config_bytes.len()) as u64;
    Ok(RpullReport {
        image: reference.to_owned(),
        manifest_digest,
        layers,
        bytes_fetched: meta + layer_bytes,
        image_bytes: meta + all_layers,
    })
}

/// Everything known about the image before containerd is changed.
struct Plan<'a> {
    reference: &'a str,
    parsed: &'a Reference,
    client: &'a Client,
    opts: &'a RpullOptions,
    manifest: &'a blobfmt::oci::Manifest,
    manifest_bytes: &'a [u8],
    manifest_digest: &'a str,
    manifest_media_type: &'a str,
    config_bytes: &'a [u8],
    diff_ids: &'a [String],
    chain_ids: &'a [String],
}

impl Plan<'_> {
    async fn run(
        &self,
        ctrd: &Containerd,
        on_layer: &mut dyn FnMut(usize, &LayerReport),
    ) -> Result<Vec<LayerReport>> {
        let m = self.manifest;
        let source = self.source_label();

        let mut labels = HashMap::from([source.clone()]);
        labels.insert(
            "containerd.io/gc.ref.content.config".into(),
            m.config.digest.clone(),
        );
        for (i, l) in m.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        ctrd.put_blob(
            &format!("manifest-{}", self.manifest_digest),
            self.manifest_digest,
            self.manifest_bytes,
            labels,
        )
        .await?;

        let top = self.chain_ids.last().cloned().unwrap_or_default();
        let labels = HashMap::from([
            source.clone(),
            (
                format!("containerd.io/gc.ref.snapshot.{}", self.opts.snapshotter),
                top,
            ),
        ]);
        ctrd.put_blob(
            &format!("config-{}", m.config.digest),
            &m.config.digest,
            self.config_bytes,
            labels,
        )
        .await?;

        let mut out = Vec::with_capacity(m.layers.len());
        for i in 0..m.layers.len() {
            let report = self.layer(ctrd, i).await?;
            on_layer(i, &report);
            out.push(report);
        }

        let target = types::Descriptor {
            media_type: self.manifest_media_type.to_owned(),
            digest: self.manifest_digest.to_owned(),
            size: self.manifest_bytes.len() as i64,
            annotations: HashMap::new(),
        };
        ctrd.put_image(self.reference, target).await?;
        Ok(out)
    }

    /// `containerd.io/distribution.source.<host>` = repository, as containerd's fetcher sets.
    fn source_label(&self) -> (String, String) {
        (
            format!("containerd.io/distribution.source.{}", self.parsed.registry),
            self.parsed.repository.clone(),
        )
    }

    fn prepare_labels(&self, i: usize) -> HashMap<String, String> {
        let layer = &self.manifest.layers[i];
        let mut labels = HashMap::from([
            (TARGET_REF.to_owned(), self.chain_ids[i].clone()),
            (CRI_IMAGE_REF.to_owned(), self.reference.to_owned()),
            (
                CRI_MANIFEST_DIGEST.to_owned(),
                self.manifest_digest.to_owned(),
            ),
            (CRI_LAYER_DIGEST.to_owned(), layer.digest.clone()),
            (
                CRI_IMAGE_LAYERS.to_owned(),
                // This layer and those above it, as CRI sends them.
                image_layers_label(
                    self.manifest.layers[i..].iter().map(|l| l.digest.as_str()),
                    MAX_LABEL - CRI_IMAGE_LAYERS.len(),
                ),
            ),
        ]);
        for (k, v) in layer.annotations.iter().flatten() {
            if k.starts_with(INHERITED_PREFIX) {
                labels.insert(k.clone(), v.clone());
            }
        }
        labels
    }

    async fn layer(&self, ctrd: &Containerd, i: usize) -> Result<LayerReport> {
        let layer = &self.manifest.layers[i];
        let chain_id = &self.chain_ids[i];
        let sn = &self.opts.snapshotter;
        let mut report = LayerReport {
            digest: layer.digest.clone(),
            size: layer.size,
            chain_id: chain_id.clone(),
            state: LayerState::Present,
            bytes_fetched: 0,
        };
        if ctrd.stat(sn, chain_id).await? {
            return Ok(report);
        }
        let parent = if i == 0 {
            String::new()
        } else {
            self.chain_ids[i - 1].clone()
        };
        let key = format!("extract-{}-{chain_id}", nonce());
        let labels = self.prepare_labels(i);
        let mounts = match ctrd.prepare(sn, &key, &parent, labels.clone()).await? {
            None => {
                report.state = LayerState::Remote;
                return Ok(report);
            }
            Some(mounts) => mounts,
        };
        report.state = LayerState::Unpacked;
        match self.unpack(ctrd, i, &key, mounts, labels).await {
            Ok(fetched) => {
                report.bytes_fetched = fetched;
                Ok(report)
            }
            Err(e) => {
                if let Err(r) = ctrd.remove_snapshot(sn, &key).await {
                    tracing::warn!("removing {key} after a failed unpack: {r}");
                }
                Err(e)
            }
        }
    }

    /// containerd's unpack of one layer into the active snapshot `key`; returns the layer bytes
    /// fetched from the registry.
    async fn unpack(
        &self,
        ctrd: &Containerd,
        i: usize,
        key: &str,
        mounts: Vec<types::Mount>,
        labels: HashMap<String, String>,
    ) -> Result<u64> {
        let layer = &self.manifest.layers[i];
        let mut fetched = 0;
        if !ctrd.has_blob(&layer.digest).await? {
            fetched = self.fetch_layer(ctrd, i).await?;
        }
        let desc = types::Descriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size as i64,
            annotations: layer
                .annotations
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect(),
        };
        let applied = ctrd.apply(desc, mounts).await?;
        if applied != self.diff_ids[i] {
            return Err(RpullError::Image {
                reference: self.reference.to_owned(),
                msg: format!(
                    "layer {} unpacked to {applied}, but the config says {}",
                    layer.digest, self.diff_ids[i]
                ),
            });
        }
        ctrd.commit(&self.opts.snapshotter, &self.chain_ids[i], key, labels)
            .await?;
        Ok(fetched)
    }

    /// Downloads layer `i` (verified) to a temporary file and writes it to the content store.
    async fn fetch_layer(&self, ctrd: &Containerd, i: usize) -> Result<u64> {
        let layer = &self.manifest.layers[i];
        let tmp = tempfile::Builder::new()
            .prefix("cora-rpull-")
            .tempdir()
            .map_err(|source| RpullError::Io {
                what: "creating a temporary directory".into(),
                source,
            })?;
        let path = tmp.path().join("layer");
        let size = self
            .client
            .get_blob_to_file(self.parsed, &layer.digest, layer.size, &path)
            .await
            .map_err(|e| RpullError::Registry {
                what: format!("fetching layer {} of {}", layer.digest, self.reference),
                source: e.into(),
            })?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| RpullError::Io {
                what: format!("opening {}", path.display()),
                source,
            })?;
        let labels = HashMap::from([
            self.source_label(),
            (
                "containerd.io/uncompressed".into(),
                self.diff_ids[i].clone(),
            ),
        ]);
        ctrd.write_blob(
            &format!("layer-{}", layer.digest),
            &layer.digest,
            size,
            file,
            labels,
        )
        .await?;
        Ok(size)
    }
}

/// chainID(0) = diffID(0); chainID(n) = sha256(chainID(n-1) + " " + diffID(n)).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Comma-separated digests, lowest first, cut to whole digests within `max` bytes (containerd
/// limits label size; CRI cuts the list the same way).
pub fn image_layers_label<'a>(digests: impl Iterator<Item = &'a str>, max: usize) -> String {
    let mut out = String::new();
    for d in digests {
        let extra = if out.is_empty() { d.len() } else { d.len() + 1 };
        if out.len() + extra > max {
            break;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(d);
    }
    out
}

fn nonce() -> String {
    format!("{:016x}", fastrand::u64(..))
}

fn header_value(s: &str, what: &str) -> Result<AsciiMetadataValue> {
    s.parse().map_err(|_| RpullError::Containerd {
        what: format!("{what} {s:?}"),
        code: Code::InvalidArgument,
        message: "not a valid gRPC header value".into(),
    })
}

fn status_error(what: impl Into<String>, s: Status) -> RpullError {
    RpullError::Containerd {
        what: what.into(),
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// The containerd services `rpull` uses, over one connection.
struct Containerd {
    channel: Channel,
    namespace: AsciiMetadataValue,
    lease: Option<AsciiMetadataValue>,
}

impl Containerd {
    async fn connect(address: &Path, namespace: &str) -> Result<Containerd> {
        let namespace = header_value(namespace, "namespace")?;
        let err = |msg: String| RpullError::Connect {
            address: address.to_owned(),
            msg,
        };
        let channel = containerd_api::connect(address)
            .await
            .map_err(|e| err(error_chain(&e)))?;
        Ok(Containerd {
            channel,
            namespace,
            lease: None,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        if let Some(l) = &self.lease {
            r.metadata_mut().insert("containerd-lease", l.clone());
        }
        r
    }

    fn content(&self) -> content::content_client::ContentClient<Channel> {
        content::content_client::ContentClient::new(self.channel.clone())
    }

    fn snapshots(&self) -> snapshots::snapshots_client::SnapshotsClient<Channel> {
        snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
    }

    async fn create_lease(&self) -> Result<String> {
        let id = format!("cora-rpull-{}", nonce());
        let expire = rfc3339(SystemTime::now() + LEASE_EXPIRY);
        let req = leases::CreateRequest {
            id: id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".into(), expire)]),
        };
        leases::leases_client::LeasesClient::new(self.channel.clone())
            .create(self.req(req))
            .await
            .map_err(|s| status_error("creating a lease", s))?;
        Ok(id)
    }

    async fn delete_lease(&self, id: &str) -> Result<()> {
        let req = leases::DeleteRequest {
            id: id.to_owned(),
            sync: false,
        };
        leases::leases_client::LeasesClient::new(self.channel.clone())
            .delete(self.req(req))
            .await
            .map_err(|s| status_error(format!("deleting lease {id}"), s))?;
        Ok(())
    }

    async fn has_blob(&self, digest: &str) -> Result<bool> {
        let req = content::InfoRequest {
            digest: digest.to_owned(),
        };
        match self.content().info(self.req(req)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(status_error(format!("content info {digest}"), s)),
        }
    }

    /// Writes a small blob held in memory (manifest, config), or just sets its labels when the
    /// content store has it already.
    async fn put_blob(
        &self,
        reference: &str,
        digest: &str,
        bytes: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.has_blob(digest).await? {
            return self.set_labels(digest, labels).await;
        }
        self.write_blob(reference, digest, bytes.len() as u64, bytes, labels)
            .await
    }

    async fn set_labels(&self, digest: &str, labels: HashMap<String, String>) -> Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = content::UpdateRequest {
            info: Some(content::Info {
                digest: digest.to_owned(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.content()
            .update(self.req(req))
            .await
            .map_err(|s| status_error(format!("setting labels of {digest}"), s))?;
        Ok(())
    }

    /// The content API's Write stream, one request and one response at a time: WRITE messages
    /// with the data, then COMMIT with the expected digest, size and labels.
    async fn write_blob(
        &self,
        reference: &str,
        digest: &str,
        size: u64,
        mut data: impl AsyncRead + Unpin,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let what = || format!("writing {digest} to the content store");
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut rx = Some(rx);
        let mut responses: Option<tonic::Streaming<content::WriteContentResponse>> = None;
        let base = content::WriteContentRequest {
            r#ref: reference.to_owned(),
            total: size as i64,
            expected: digest.to_owned(),
            ..Default::default()
        };
        let mut buf = vec![0u8; WRITE_CHUNK];
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut data, &mut buf)
                .await
                .map_err(|source| RpullError::Io {
                    what: what(),
                    source,
                })?;
            let last = n < buf.len();
            if last && offset + n as u64 != size {
                return Err(RpullError::Io {
                    what: what(),
                    source: std::io::Error::other(format!(
                        "read {} bytes, expected {size}",
                        offset + n as u64
                    )),
                });
            }
            let mut msg = content::WriteContentRequest {
                action: content::WriteAction::Write as i32,
                offset: offset as i64,
                data: buf[..n].to_vec(),
                ..base.clone()
            };
            if last {
                msg.action = content::WriteAction::Commit as i32;
                msg.labels = labels.clone();
            }
            offset += n as u64;
            if tx.send(msg).await.is_err() {
                return Err(RpullError::Containerd {
                    what: what(),
                    code: Code::Aborted,
                    message: "the write stream closed early".into(),
                });
            }
            // The call is made after the first message is queued: containerd sends its response
            // headers only once it has read one.
            let stream = match (responses.as_mut(), rx.take()) {
                (Some(s), _) => s,
                (None, Some(rx)) => {
                    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
                    match self.content().write(self.req(requests)).await {
                        Ok(r) => responses.insert(r.into_inner()),
                        Err(s) if s.code() == Code::AlreadyExists => {
                            return self.set_labels(digest, labels).await;
                        }
                        Err(s) => return Err(status_error(what(), s)),
                    }
                }
                (None, None) => {
                    return Err(RpullError::Containerd {
                        what: what(),
                        code: Code::Internal,
                        message: "write stream lost".into(),
                    });
                }
            };
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(RpullError::Containerd {
                        what: what(),
                        code: Code::Aborted,
                        message: "the write stream ended early".into(),
                    });
                }
                // Another writer committed the same blob first.
                Err(s) if s.code() == Code::AlreadyExists => {
                    return self.set_labels(digest, labels).await;
                }
                Err(s) => return Err(status_error(what(), s)),
            }
            if last {
                return Ok(());
            }
        }
    }

    /// Whether `key` exists in `snapshotter`; an unknown snapshotter is a clear error.
    async fn stat(&self, snapshotter: &str, key: &str) -> Result<bool> {
        let req = snapshots::StatSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
        };
        match self.snapshots().stat(self.req(req)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(snapshot_error(snapshotter, format!("stat {key}"), s)),
        }
    }

    /// Prepare; `None` when the snapshot already exists (a remote layer the snapshotter claimed).
    async fn prepare(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Option<Vec<types::Mount>>> {
        let req = snapshots::PrepareSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels,
        };
        match self.snapshots().prepare(self.req(req)).await {
            Ok(r) => Ok(Some(r.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(None),
            Err(s) => Err(snapshot_error(snapshotter, format!("prepare {key}"), s)),
        }
    }

    async fn commit(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let req = snapshots::CommitSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            name: name.to_owned(),
            key: key.to_owned(),
            labels,
        };
        match self.snapshots().commit(self.req(req)).await {
            Ok(_) => Ok(()),
            // Committed meanwhile by a concurrent pull: ours is redundant.
            Err(s) if s.code() == Code::AlreadyExists => {
                self.remove_snapshot(snapshotter, key).await
            }
            Err(s) => Err(snapshot_error(snapshotter, format!("commit {key}"), s)),
        }
    }

    async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        let req = snapshots::RemoveSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
        };
        self.snapshots()
            .remove(self.req(req))
            .await
            .map_err(|s| snapshot_error(snapshotter, format!("remove {key}"), s))?;
        Ok(())
    }

    /// Applies a layer blob from the content store onto `mounts`; returns the diffID.
    async fn apply(&self, desc: types::Descriptor, mounts: Vec<types::Mount>) -> Result<String> {
        let what = format!("applying layer {}", desc.digest);
        let req = diff::ApplyRequest {
            diff: Some(desc),
            mounts,
            payloads: HashMap::new(),
        };
        let r = diff::diff_client::DiffClient::new(self.channel.clone())
            .apply(self.req(req))
            .await
            .map_err(|s| status_error(what.clone(), s))?;
        r.into_inner()
            .applied
            .map(|d| d.digest)
            .ok_or_else(|| RpullError::Containerd {
                what,
                code: Code::Internal,
                message: "no applied descriptor in the response".into(),
            })
    }

    /// Creates the image record, or points an existing one at `target`.
    async fn put_image(&self, name: &str, target: types::Descriptor) -> Result<()> {
        let image = images::Image {
            name: name.to_owned(),
            target: Some(target),
            ..Default::default()
        };
        let mut client = images::images_client::ImagesClient::new(self.channel.clone());
        let req = images::CreateImageRequest {
            image: Some(image.clone()),
        };
        match client.create(self.req(req)).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                let req = images::UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".into()],
                    }),
                };
                client
                    .update(self.req(req))
                    .await
                    .map_err(|s| status_error(format!("updating image {name}"), s))?;
                Ok(())
            }
            Err(s) => Err(status_error(format!("creating image {name}"), s)),
        }
    }
}

/// Fills `buf` unless the input ends first; returns the bytes read.
async fn read_full(r: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = r.read(&mut buf[n..]).await?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

fn snapshot_error(snapshotter: &str, what: String, s: Status) -> RpullError {
    if s.code() == Code::InvalidArgument && s.message().contains("snapshotter not loaded") {
        return RpullError::NoSnapshotter {
            name: snapshotter.to_owned(),
        };
    }
    status_error(format!("snapshotter {snapshotter}: {what}"), s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn image_layers_label_keeps_whole_digests_within_the_limit() {
        let d = ["sha256:aa", "sha256:bb", "sha256:cc"];
        assert_eq!(
            image_layers_label(d.into_iter(), 100),
            "sha256:aa,sha256:bb,sha256:cc"
        );
        assert_eq!(image_layers_label(d.into_iter(), 19), "sha256:aa,sha256:bb");
        assert_eq!(image_layers_label(d.into_iter(), 18), "sha256:aa");
        assert_eq!(image_layers_label(d.into_iter(), 3), "");
    }
}
