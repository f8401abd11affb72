//! containerd's gRPC API as CORA uses it: the generated protos ([`proto`]), a channel over
//! containerd's (or a snapshotter's) unix socket ([`connect`]) and the snapshot label keys of
//! the remote-snapshot contract ([`labels`]).
use hyper_util::rt::TokioIo;
use std::path::Path;
use tonic::transport::{Channel, Endpoint};

pub mod proto {
    //! Generated from the vendored containerd v1.6 API; module nesting mirrors the proto
    //! packages because the generated code refers to sibling packages with `super::`.
    pub mod containerd {
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        pub mod services {
            pub mod snapshots {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
            pub mod content {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.content.v1");
                }
            }
            pub mod images {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.images.v1");
                }
            }
            pub mod leases {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.leases.v1");
                }
            }
            pub mod diff {
                pub mod v1 {
                    tonic::include_proto!("containerd.services.diff.v1");
                }
            }
        }
    }
    /// CRI's image service (`runtime.v1`), the subset tests pull through.
    pub mod cri {
        tonic::include_proto!("runtime.v1");
    }
    pub use containerd::services::content::v1 as content;
    pub use containerd::services::diff::v1 as diff;
    pub use containerd::services::images::v1 as images;
    pub use containerd::services::leases::v1 as leases;
    pub use containerd::services::snapshots::v1 as snapshots;
    pub use containerd::types;
}

pub mod labels {
    //! Snapshot labels of the remote-snapshot contract, as containerd's unpacker and CRI
    //! plugin send them with each layer's Prepare (and `cora rpull` does too).

    /// Set by containerd's unpacker: the name the layer will be committed under (its chainID).
    pub const TARGET_REF: &str = "containerd.io/snapshot.ref";
    pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
    pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
    pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
    /// Comma-separated digests of this layer and the layers above it.
    pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
    /// Layer annotations under this prefix become Prepare labels (containerd's unpacker keeps
    /// exactly these: `snapshots.FilterInheritedLabels`); remote snapshotters read their own
    /// keys from them (`cora/*`, Nydus's `nydus-blob`, stargz's TOC digest).
    pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";
    /// containerd refuses labels longer than this (key + value).
    pub const MAX_LABEL: usize = 4096;
}

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";

/// A gRPC channel to the service listening on the unix socket `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://[::1]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}
