//! What a ublk device serves: a read-only block image.
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A read-only block image. Implemented by the lazy CORA source and by a plain file (tests, benches).
pub trait BlockSource: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Fast path: fill `buf` from local data only. Ok(true) if served, Ok(false) if some bytes are
    /// not local (then the caller uses read_at on a worker).
    fn read_local(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool>;
    /// Slow path: may block on the network. Called from a worker thread pool, never from a queue
    /// thread.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// A plain image file read with pread: every byte is local.
pub struct FileSource {
    file: File,
    size: u64,
    path: PathBuf,
}

impl FileSource {
    /// Opens `path` read-only; its size is fixed now (a file that shrinks later gives EIO).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(FileSource {
            file,
            size: meta.len(),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_local(&self, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
        self.read_at(offset, buf)?;
        Ok(true)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // read_exact_at turns a short read (file truncated under us) into UnexpectedEof.
        self.file.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_source_reads_and_reports_short_files() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let src = FileSource::open(f.path()).unwrap();
        assert_eq!(src.size(), 10_000);
        let mut buf = vec![0u8; 4096];
        assert!(src.read_local(4096, &mut buf).unwrap());
        assert_eq!(&buf[..], &data[4096..8192]);
        // Past the end is an error, not zeros.
        assert!(src.read_at(8192, &mut buf).is_err());
        assert!(FileSource::open(std::env::temp_dir()).is_err());
    }
}
