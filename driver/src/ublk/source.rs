//! What a ublk device serves: a read-only block image.
use std::fs::File;
use std::io::{self, IoSlice};
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

    /// Optional one-copy fast path: if all of `[offset, offset + len)` is local and
    /// memory-resident (a mapped file, mapped cache chunks), call `send` once with slices that
    /// are exactly those bytes in order and return `Some(send's result)`; `None` (without
    /// calling `send`) otherwise, and the caller uses `read_local`. The server only passes the
    /// slices to the kernel (`pwritev` into the request with UBLK_F_USER_COPY), saving the copy
    /// through `read_local`'s buffer; a mapping that went bad then fails the read with EIO
    /// instead of faulting the process. Default: `None`.
    fn local_slices(
        &self,
        _offset: u64,
        _len: usize,
        _send: &mut SendSlices<'_>,
    ) -> Option<io::Result<()>> {
        None
    }

    /// Counters worth exporting (cache hits, bytes fetched, latency), as JSON; `None` for
    /// sources without any (plain files).
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Receives the slices lent by [`BlockSource::local_slices`].
pub type SendSlices<'a> = dyn FnMut(&[IoSlice<'_>]) -> io::Result<()> + 'a;

/// Most slices one request is lent as (`IOV_MAX` of `pwritev`).
pub const MAX_SLICES: usize = 1024;

/// A plain image file: every byte is local. `read_local`/`read_at` use pread; `local_slices`
/// lends a read-only mapping of the file, which the server only hands to the kernel (a pwrite
/// into the request), so a file shrinking under us gives EFAULT -> EIO, never SIGBUS.
pub struct FileSource {
    file: File,
    size: u64,
    path: PathBuf,
    map: Option<Mapping>,
}

/// A read-only shared mapping of a whole file.
struct Mapping {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until drop; shared reads from any thread are fine.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to map"))?;
        // SAFETY: maps `len` bytes of an open file read-only; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                // Populate now: faulting pages in later would cost every first read.
                libc::MAP_SHARED | libc::MAP_POPULATE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr as *const u8,
            len,
        })
    }

    fn slice(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        if start.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: in bounds of a mapping that lives as long as `self`.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

impl FileSource {
    /// Opens (and maps) `path` read-only; its size is fixed now (a file that shrinks later
    /// gives EIO).
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
        let size = meta.len();
        let map = match size {
            0 => None,
            // Without a mapping reads still work, through pread.
            _ => Mapping::new(&file, size)
                .inspect_err(|e| tracing::debug!("not mapping {}: {e}", path.display()))
                .ok(),
        };
        Ok(FileSource {
            file,
            size,
            path,
            map,
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
        // Not through the mapping: touching it from user space would SIGBUS if the file shrank.
        // read_exact_at turns a short read (file truncated under us) into UnexpectedEof.
        self.file.read_exact_at(buf, offset)
    }

    fn local_slices(
        &self,
        offset: u64,
        len: usize,
        send: &mut SendSlices<'_>,
    ) -> Option<io::Result<()>> {
        let bytes = self.map.as_ref()?.slice(offset, len)?;
        Some(send(&[IoSlice::new(bytes)]))
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
        let mut got = Vec::new();
        let mut send = |iov: &[IoSlice<'_>]| {
            got = iov.iter().flat_map(|s| s.to_vec()).collect();
            Ok(())
        };
        assert!(src.local_slices(100, 50, &mut send).unwrap().is_ok());
        assert!(src.local_slices(9_999, 2, &mut send).is_none());
        assert_eq!(got, &data[100..150]);
    }
}
