//! `cora-snapshotter [--config PATH]`: the containerd proxy snapshotter daemon.
use anyhow::{Context, Result};
use clap::Parser;
use cora_snapshotter::config::{Config, DEFAULT_CONFIG_PATH, Verbose};
use cora_snapshotter::metrics::Metrics;
use cora_snapshotter::remote::NoRemoteLayers;
use std::path::PathBuf;
use std::sync::Arc;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_file(config.log_report_caller)
        .with_line_number(config.log_report_caller)
        .with_writer(std::io::stderr)
        .init();

    let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing SIGTERM handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down; snapshots and mounts stay in place");
        };
        let metrics = Arc::new(Metrics::default());
        cora_snapshotter::serve(&config, Arc::new(NoRemoteLayers), metrics, shutdown)
            .await
            .context("cora-snapshotter")
    })
}
