//! `cora-cold-device FILE DELAY_MS CHUNK`: serves FILE as a read-only ublk device whose
//! CHUNK-byte pieces each take DELAY_MS to "fetch" on first read; prints /dev/ublkbN once
//! ready and serves until the device is deleted (`cora-driver del ID`).
use anyhow::{Context, Result};
use cora_tests::cold::ColdFile;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, file, delay_ms, chunk] = args.as_slice() else {
        anyhow::bail!("usage: cora-cold-device FILE DELAY_MS CHUNK");
    };
    let source = ColdFile::new(
        cora_read::FileSource::open(file).with_context(|| format!("opening {file}"))?,
        chunk.parse().context("CHUNK")?,
        Duration::from_millis(delay_ms.parse().context("DELAY_MS")?),
    )?;
    let recipe = serde_json::json!({ "kind": "cold_file", "path": file });
    ublk::add(
        &ublk::DeviceOptions::default(),
        recipe,
        Arc::new(source),
        |ready| {
            println!("{}", ready.bdev);
            let _ = std::io::stdout().flush();
        },
    )?;
    Ok(())
}
