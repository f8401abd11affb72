//! A plain file whose `chunk`-byte pieces count as remote until first read, each such read
//! completing on another thread after `delay`: the miss path of a transport, exercised with a
//! real device and no registry.
use cora_read::{BlockSource, FileSource, Lend, Miss, Outcome, PendingRead};
use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct ColdFile {
    file: Arc<FileSource>,
    chunk: u64,
    delay: Duration,
    fetched: Arc<Mutex<HashSet<u64>>>,
}

impl ColdFile {
    pub fn new(file: FileSource, chunk: u64, delay: Duration) -> io::Result<ColdFile> {
        if chunk == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "simulated miss chunk size must be > 0",
            ));
        }
        Ok(ColdFile {
            file: Arc::new(file),
            chunk,
            delay,
            fetched: Arc::default(),
        })
    }

    fn chunks(&self, offset: u64, len: usize) -> std::ops::Range<u64> {
        offset / self.chunk..(offset + len as u64).div_ceil(self.chunk)
    }
}

impl BlockSource for ColdFile {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8], _: Option<&mut Lend<'_>>) -> io::Result<Outcome> {
        cora_read::check_range(offset, buf.len(), self.size())?;
        let chunks = self.chunks(offset, buf.len());
        let local = {
            let fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            chunks.clone().all(|c| fetched.contains(&c))
        };
        if local {
            return cora_read::read_blocking(&*self.file, offset, buf).map(|()| Outcome::Copied);
        }
        Ok(Outcome::Miss(Miss::new(SlowFetch {
            file: self.file.clone(),
            offset,
            chunks,
            delay: self.delay,
            fetched: self.fetched.clone(),
        })))
    }
}

struct SlowFetch {
    file: Arc<FileSource>,
    offset: u64,
    chunks: std::ops::Range<u64>,
    delay: Duration,
    fetched: Arc<Mutex<HashSet<u64>>>,
}

impl PendingRead for SlowFetch {
    fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>) {
        let (delay, chunks, fetched) = (self.delay, self.chunks.clone(), self.fetched.clone());
        // The "network": another thread, as a real source's fetch workers are.
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            fetched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(chunks);
            wake();
        });
    }

    fn finish(self: Box<Self>, buf: &mut [u8]) -> io::Result<()> {
        cora_read::read_blocking(&*self.file, self.offset, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cold_pieces_miss_once_then_read_locally() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let src = ColdFile::new(
            FileSource::open(f.path()).unwrap(),
            4096,
            Duration::from_millis(1),
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let Outcome::Miss(miss) = src.read(0, &mut buf, None).unwrap() else {
            panic!("a cold piece was served as local");
        };
        miss.wait(&mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        assert!(matches!(
            src.read(0, &mut buf, None).unwrap(),
            Outcome::Copied
        ));
        assert!(matches!(
            src.read(2048, &mut buf, None).unwrap(),
            Outcome::Miss(_)
        ));
        assert!(ColdFile::new(FileSource::open(f.path()).unwrap(), 0, Duration::ZERO).is_err());
    }
}
