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

/// containerd 2.x (config version 3): the CRI image plugin pulls with `snapshotter`, passing
/// snapshot annotations (2.1's CRI passes them with `use_local_image_pull` on or off; checked);
/// `plain_http_registries` are reached over plain HTTP through host files written under
/// `hosts_dir` (2.x has no `registry.mirrors`).
pub fn cri_config_v3(
    snapshotter: &str,
    plain_http_registries: &[&str],
    hosts_dir: &Path,
) -> Result<String> {
    for r in plain_http_registries {
        let dir = hosts_dir.join(r);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{r}\"\n\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
    }
    Ok(format!(
        r#"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{snapshotter}"
  disable_snapshot_annotations = false
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{hosts}"
"#,
        hosts = hosts_dir.display()
    ))
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
