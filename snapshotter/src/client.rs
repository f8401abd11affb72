//! A snapshots API client over the unix socket (tests, diagnostics).
use crate::proto::snapshots::snapshots_client::SnapshotsClient;
use std::path::Path;
use tonic::transport::Channel;

/// Connects to a snapshots service listening on `socket`.
pub async fn connect(socket: &Path) -> Result<SnapshotsClient<Channel>, tonic::transport::Error> {
    Ok(SnapshotsClient::new(containerd_api::connect(socket).await?))
}
