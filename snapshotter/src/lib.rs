//! cora-snapshotter: a containerd proxy snapshotter. Plain OCI layers are overlayfs snapshots
//! like containerd's built-in overlayfs snapshotter; CORA layers can be served lazily through a
//! [`remote::RemoteLayers`] backend.
pub mod client;
pub mod config;
pub mod filters;
pub mod metrics;
pub mod remote;
pub mod service;
pub mod snapshotter;
pub mod store;
pub mod ublk_layers;

pub use containerd_api::proto;

use config::Config;
use proto::snapshots::snapshots_server::SnapshotsServer;
use remote::RemoteLayers;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening snapshotter state: {0}")]
    Open(#[from] snapshotter::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ServeError {
    let path = path.to_owned();
    move |source| ServeError::Io { what, path, source }
}

/// How often attached devices are checked for a dead server.
pub const HEAL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the snapshots API on `config.address` (and metrics when enabled) until `shutdown`
/// resolves. `metrics` is shared with the lazy backend, which updates its device, cache and
/// fetch counters. Snapshots, mounts and attached stacks are left in place on exit, so running
/// containers keep running across a restart.
pub async fn serve(
    config: &Config,
    remote: Arc<dyn RemoteLayers>,
    metrics: Arc<metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.root).map_err(io("creating", &config.root))?;
    let root = config.root.clone();
    let auto_remove = config.auto_remove_dev;
    let m = metrics.clone();
    let sn = tokio::task::spawn_blocking(move || {
        snapshotter::Snapshotter::open(&root, remote, auto_remove, m)
    })
    .await
    .map_err(|e| snapshotter::Error::Internal(e.to_string()))??;
    let sn = Arc::new(sn);
    if config.attach_on_pull {
        sn.attach_on_pull();
    }

    let exporter = if config.exporter_config.enable {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], config.exporter_config.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io("binding metrics port", &PathBuf::from(addr.to_string())))?;
        let sn = sn.clone();
        let render = move || {
            let counts = sn.counts().unwrap_or_default();
            sn.metrics().render(counts, &sn.lazy_stats())
        };
        tracing::info!(
            "metrics on http://{addr}{}",
            config.exporter_config.uri_prefix
        );
        Some(tokio::spawn(metrics::serve(
            listener,
            config.exporter_config.uri_prefix.clone(),
            render,
        )))
    } else {
        None
    };

    let address = &config.address;
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    // Only a stale socket is replaced; any other file there is a configuration mistake.
    if let Ok(md) = std::fs::symlink_metadata(address) {
        if !md.file_type().is_socket() {
            return Err(ServeError::Io {
                what: "refusing to replace non-socket",
                path: address.clone(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        std::fs::remove_file(address).map_err(io("removing stale socket", address))?;
    }
    let listener = tokio::net::UnixListener::bind(address).map_err(io("binding", address))?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", address))?;
    tracing::info!("cora-snapshotter serving on {}", address.display());

    // Nothing else notices a device server that died: with ublk, running containers' reads
    // would wait in the kernel until the stack's next attach. Within about this long of the
    // death, a new server takes over the device and the reads resume.
    let watcher = {
        let sn = sn.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEAL_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let sn = sn.clone();
                let _ = tokio::task::spawn_blocking(move || sn.heal()).await;
            }
        })
    };

    let result = tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(service::Service::new(sn)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await;
    watcher.abort();
    if let Some(e) = exporter {
        e.abort();
    }
    let _ = std::fs::remove_file(address);
    result.map_err(ServeError::from)
}
