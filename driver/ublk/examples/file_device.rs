//! Serves a plain file as a read-only ublk device until the device is deleted
//! (`cora-driver del ID` or `rublk del ID`):
//!
//! ```sh
//! cargo run --release -p cora-ublk --example file_device -- disk.img
//! ```
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: file_device IMAGE_FILE")?;
    let source = Arc::new(ublk::FileSource::open(&path)?);
    // Stored with the device: what `ublk::recover` would hand back to reopen the source.
    let recipe = serde_json::json!({ "kind": "file", "path": path });
    ublk::add(&ublk::DeviceOptions::default(), recipe, source, |ready| {
        println!("{}", ready.bdev);
    })?;
    Ok(())
}
