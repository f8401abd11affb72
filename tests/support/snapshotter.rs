//! The cora-snapshotter daemon under test: config written to a test directory, started by
//! path, ready once its socket accepts connections.
use crate::daemon::{Daemon, wait_for};
use anyhow::{Result, bail};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct CoraSnapshotter {
    pub daemon: Daemon,
    pub socket: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
}

impl CoraSnapshotter {
    /// Writes `{"root": DIR/root, "address": DIR/cora.sock, ...extra}` to DIR/snapshotter.json.
    /// `extra` is a JSON object whose fields are merged in (e.g. exporterConfig).
    pub fn write_config(dir: &Path, extra: &serde_json::Value) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let mut cfg = serde_json::json!({
            "root": dir.join("root"),
            "address": dir.join("cora.sock"),
            "verbose": "debug",
        });
        if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let path = dir.join("snapshotter.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(path)
    }

    /// Starts `bin --config DIR/snapshotter.json` (written by [`Self::write_config`] first if
    /// missing) and waits until the socket accepts connections.
    pub fn start(bin: &Path, dir: &Path) -> Result<CoraSnapshotter> {
        let config = dir.join("snapshotter.json");
        if !config.exists() {
            Self::write_config(dir, &serde_json::json!({}))?;
        }
        let text = std::fs::read_to_string(&config)?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let socket = PathBuf::from(v["address"].as_str().unwrap_or_default());
        let root = PathBuf::from(v["root"].as_str().unwrap_or_default());
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config);
        let mut daemon = Daemon::spawn("cora-snapshotter", cmd, &dir.join("snapshotter.log"))?;
        let ready = wait_for("cora-snapshotter socket", Duration::from_secs(20), || {
            UnixStream::connect(&socket).is_ok()
        });
        if let Err(e) = ready {
            let running = daemon.running();
            bail!("{e} (running: {running}); log:\n{}", daemon.log_text());
        }
        Ok(CoraSnapshotter {
            daemon,
            socket,
            root,
            config,
        })
    }

    /// Stops (SIGTERM) and starts again with the same config.
    pub fn restart(self, bin: &Path) -> Result<CoraSnapshotter> {
        let dir = self.config.parent().map(Path::to_owned).unwrap_or_default();
        let mut me = self;
        me.daemon.stop()?;
        CoraSnapshotter::start(bin, &dir)
    }
}
