//! `cora-snapshotter [--config PATH]`: the containerd proxy snapshotter daemon.
use anyhow::{Context, Result};
use clap::Parser;
use cora_snapshotter::config::{Config, DEFAULT_CONFIG_PATH, Verbose};
use cora_snapshotter::metrics::Metrics;
use cora_snapshotter::remote::{NoRemoteLayers, RemoteLayers};
use cora_snapshotter::ublk_layers::{UblkLayers, UblkOptions};
use std::path::PathBuf;
use std::sync::Arc;

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "cora-snapshotter",
    about = "containerd proxy snapshotter for CORA images"
)]
struct Cli {
    /// JSON config file; without this flag a missing default file means built-in defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => {
            let path = PathBuf::from(DEFAULT_CONFIG_PATH);
            if path.exists() {
                Config::load(&path)?
            } else {
                Config::from_json_str(&path, "{}")?
            }
        }
    };
    let level = match config.verbose {
        Verbose::Info => "info",
        Verbose::Debug => "debug",
    };
    cora_api::logging::init(cora_api::logging::Logging {
        default_filter: level,
        report_caller: config.log_report_caller,
    });

    let layers = UblkLayers::new(UblkOptions::from_config(&config));
    // Probed once here, so the log says at start which transport serves CORA layers and why.
    let selected = layers.selection().map(|s| s.to_string());
    let remote: Arc<dyn RemoteLayers> = match selected {
        Ok(why) => {
            tracing::info!("lazy CORA layers: {why}");
            Arc::new(layers)
        }
        Err(e) => {
            // The snapshotter warns once, with this reason, when a CORA layer first arrives.
            tracing::info!("{e}; CORA images will be unpacked as plain OCI images");
            Arc::new(NoRemoteLayers::because(e.to_string()))
        }
    };

    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing SIGTERM handler")?;
        // A watch channel keeps the "stopping" state, so late waiters still see it.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down; snapshots and mounts stay in place");
            let _ = stop_tx.send(true);
        });
        let metrics = Arc::new(Metrics::default());
        let mut stopped = stop_rx.clone();
        let server = cora_snapshotter::serve(&config, remote, metrics, async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        tokio::pin!(server);
        // Graceful shutdown waits for open connections; containerd keeps one open, so a grace
        // period bounds how long a stop can take.
        tokio::select! {
            result = &mut server => result.context("cora-snapshotter"),
            _ = async {
                let mut stop = stop_rx.clone();
                let _ = stop.wait_for(|s| *s).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting");
                Ok(())
            }
        }
    })
}
