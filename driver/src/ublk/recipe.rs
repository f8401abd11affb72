//! How a device's source is described (stored with the device) and rebuilt (`add`, `recover`).
use std::collections::HashSet;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::source::{BlockSource, FileSource};

/// Everything needed to open a device's source again in a new process. Stored as the device's
/// target data by `add`, read back by `recover`. Add a variant per kind of source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceRecipe {
    /// A plain image file.
    File {
        path: PathBuf,
        /// Testing aid: serve the file as if each `chunk`-byte piece were remote until first
        /// fetched, a fetch taking `delay_ms`; exercises the miss path with real devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        simulate_misses: Option<SimulatedMisses>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimulatedMisses {
    pub delay_ms: u64,
    pub chunk: u64,
}

impl SourceRecipe {
    /// Opens the source this recipe describes.
    pub fn open(&self) -> io::Result<Arc<dyn BlockSource>> {
        match self {
            SourceRecipe::File {
                path,
                simulate_misses,
            } => {
                let file = FileSource::open(path)?;
                match simulate_misses {
                    None => Ok(Arc::new(file)),
                    Some(sim) => Ok(Arc::new(ColdFile::new(file, *sim)?)),
                }
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        // A derived Serialize of plain fields cannot fail.
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    pub fn from_json(v: &serde_json::Value) -> io::Result<Self> {
        serde_json::from_value(v.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad source recipe {v}: {e}"),
            )
        })
    }
}

/// A file whose chunks count as local only after a (delayed) `read_at` fetched them.
struct ColdFile {
    file: FileSource,
    sim: SimulatedMisses,
    fetched: Mutex<HashSet<u64>>,
}

impl ColdFile {
    fn new(file: FileSource, sim: SimulatedMisses) -> io::Result<Self> {
        if sim.chunk == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "simulated miss chunk size must be > 0",
            ));
        }
        Ok(ColdFile {
            file,
            sim,
            fetched: Mutex::new(HashSet::new()),
        })
    }

    fn chunks(&self, offset: u64, len: usize) -> std::ops::Range<u64> {
        let end = offset + len as u64;
        offset / self.sim.chunk..end.div_ceil(self.sim.chunk)
    }
}

impl BlockSource for ColdFile {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_local(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        let all_local = {
            let fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            self.chunks(offset, buf.len()).all(|c| fetched.contains(&c))
        };
        if !all_local {
            return Ok(false);
        }
        self.file.read_local(offset, buf)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::thread::sleep(Duration::from_millis(self.sim.delay_ms));
        self.file.read_at(offset, buf)?;
        let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
        fetched.extend(self.chunks(offset, buf.len()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn recipe_round_trips_and_cold_file_warms_up() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; 8192]).unwrap();
        let r = SourceRecipe::File {
            path: f.path().to_path_buf(),
            simulate_misses: Some(SimulatedMisses {
                delay_ms: 1,
                chunk: 4096,
            }),
        };
        let back = SourceRecipe::from_json(&r.to_json()).unwrap();
        assert_eq!(back, r);
        let src = back.open().unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(!src.read_local(0, &mut buf).unwrap());
        src.read_at(0, &mut buf).unwrap();
        assert!(src.read_local(0, &mut buf).unwrap());
        assert!(!src.read_local(2048, &mut buf).unwrap());
        assert!(buf.iter().all(|b| *b == 7));
        assert!(SourceRecipe::from_json(&serde_json::json!({"kind": "nope"})).is_err());
    }
}
