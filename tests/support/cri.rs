//! Pulling through containerd's CRI plugin (namespace `k8s.io`): unlike `ctr images pull`, it
//! unpacks with the layer annotations as snapshot labels and skips fetching layers that the
//! snapshotter reports as already present.
use anyhow::{Context, Result};
use containerd_api::proto::cri as proto;
use std::path::Path;

/// The containerd namespace CRI uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// `[plugins."io.containerd.grpc.v1.cri"]` settings: pull with `snapshotter`, passing snapshot
/// annotations, and reach each of `plain_http_registries` (`host:port`) over plain HTTP.
pub fn cri_config(snapshotter: &str, plain_http_registries: &[&str]) -> String {
    let mut s = format!(
        r#"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{snapshotter}"
  disable_snapshot_annotations = false
"#
    );
    for r in plain_http_registries {
        s.push_str(&format!(
            "\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{r}\"]\n  endpoint = [\"http://{r}\"]\n"
        ));
    }
    s
}

/// CRI `PullImage` on containerd's socket; returns the image ref containerd reports.
pub async fn pull_image(containerd_socket: &Path, image: &str) -> Result<String> {
    let channel = containerd_api::connect(containerd_socket)
        .await
        .context("connecting to containerd")?;
    let mut client = proto::image_service_client::ImageServiceClient::new(channel);
    let resp = client
        .pull_image(proto::PullImageRequest {
            image: Some(proto::ImageSpec {
                image: image.to_owned(),
                annotations: Default::default(),
            }),
        })
        .await
        .with_context(|| format!("CRI PullImage {image}"))?;
    Ok(resp.into_inner().image_ref)
}
