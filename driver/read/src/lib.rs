//! The read interface between a source of image bytes and a kernel transport.
//!
//! A transport (the ublk server, the FUSE server) receives a request for `[offset, offset +
//! len)` and calls [`BlockSource::read`] once. The source plans the read once and answers with
//! one of three [`Outcome`]s:
//! - [`Outcome::Lent`]: every byte was local and memory-resident; the source handed slices of
//!   them to the transport's [`Lend`] callback (which passes them to the kernel, one copy);
//! - [`Outcome::Copied`]: every byte was local and is now in the request buffer;
//! - [`Outcome::Miss`]: some bytes are being fetched. Local bytes are already in the buffer;
//!   the transport arranges to be woken ([`Miss::when_ready`]), keeps serving other requests,
//!   and then calls [`Miss::finish`] with the same buffer, which copies in the fetched bytes
//!   (one copy from the decoded data). No thread pool of the transport's own sits in between.
//!
//! Sources never block in `read` on anything but local I/O, so transports may call it on
//! their event-loop threads.
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// A read-only image, readable at any byte offset below [`BlockSource::size`].
pub trait BlockSource: Send + Sync + 'static {
    fn size(&self) -> u64;

    /// Reads `[offset, offset + buf.len())`, which must lie inside the image (else
    /// `InvalidInput`). With `lend`, the source may hand the bytes to it instead of copying
    /// them into `buf` (then it returns [`Outcome::Lent`], or `lend`'s error).
    fn read(&self, offset: u64, buf: &mut [u8], lend: Option<&mut Lend<'_>>)
    -> io::Result<Outcome>;

    /// Counters worth exporting (cache hits, bytes fetched, latency) as JSON; `None` for
    /// sources without any.
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }

    /// Where `[offset, offset + len)` lies in open files, when every byte of it does, so a
    /// zero-copy transport can have the kernel read the files straight into the request.
    /// Appends the extents, in order, to `out` and returns true; false (and `out` unchanged)
    /// when any byte is elsewhere (memory, the network, a hole). Each fd stays open while its
    /// extent lives; the bytes there never change. A source answering true has served the
    /// read (its statistics, traces and read-ahead see it as a cached read).
    fn file_extents(&self, offset: u64, len: usize, out: &mut Vec<FileExtent>) -> bool {
        let _ = (offset, len, out);
        false
    }
}

/// `len` bytes at `offset` of the open file `fd`; see [`BlockSource::file_extents`].
#[derive(Clone)]
pub struct FileExtent {
    pub fd: RawFd,
    pub offset: u64,
    pub len: usize,
    /// Keeps `fd` open while the extent lives (`None`: the source holds it open for its life).
    pub hold: Option<std::sync::Arc<dyn Send + Sync>>,
}

/// Receives memory-resident bytes lent by a source, exactly the requested range in order.
/// The slices may be mappings of cache files: pass them to the kernel only (a `pwritev` into
/// the request), never read them in user space, so a file that shrank gives EFAULT, not SIGBUS.
pub type Lend<'a> = dyn FnMut(&[IoSlice<'_>]) -> io::Result<()> + 'a;

/// Transports ask smaller reads to be copied, not lent: lending maps a whole cached chunk
/// (about 16 pages) on its first touch, which costs more than one small pread (fio 4 KiB random
/// on a warm ublk device under TCG: 889 IOPS copying, 234 lending; 1 MiB reads gain from it).
pub const LEND_MIN_BYTES: usize = 64 << 10;

/// Most slices one read is lent as (`IOV_MAX` of `pwritev`).
pub const MAX_SLICES: usize = 1024;

/// How a read was served.
#[must_use]
pub enum Outcome {
    Lent,
    Copied,
    Miss(Miss),
}

/// A read waiting on fetches. Dropping it abandons the read (the fetches still complete and
/// are cached).
pub struct Miss(Box<dyn PendingRead>);

/// What a source implements behind [`Miss`].
pub trait PendingRead: Send {
    /// Calls `wake` exactly once, when [`PendingRead::finish`] will not block: on a fetch
    /// thread, or on the calling thread before returning if that is already the case.
    fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>);
    /// Copies the fetched bytes into the parts of `buf` (the buffer given to `read`) that were
    /// missing; or the fetch's error.
    fn finish(self: Box<Self>, buf: &mut [u8]) -> io::Result<()>;
}

impl Miss {
    pub fn new(pending: impl PendingRead + 'static) -> Miss {
        Miss(Box::new(pending))
    }

    /// See [`PendingRead::when_ready`].
    pub fn when_ready(&mut self, wake: impl FnOnce() + Send + 'static) {
        self.0.when_ready(Box::new(wake));
    }

    /// See [`PendingRead::finish`]; call after the wake-up.
    pub fn finish(self, buf: &mut [u8]) -> io::Result<()> {
        self.0.finish(buf)
    }

    /// Blocks this thread until the fetch is done, then finishes into `buf`.
    pub fn wait(mut self, buf: &mut [u8]) -> io::Result<()> {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        self.when_ready(move || {
            let _ = tx.send(());
        });
        // A source that drops `wake` without calling it gives RecvError: report, don't hang.
        rx.recv()
            .map_err(|_| io::Error::other("source dropped a pending read"))?;
        self.finish(buf)
    }
}

/// Reads `buf.len()` bytes at `offset` on this thread, waiting for misses (for callers that
/// are not event loops: `cora export`, tests, benches).
pub fn read_blocking<S: BlockSource + ?Sized>(
    src: &S,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    match src.read(offset, buf, None)? {
        Outcome::Copied | Outcome::Lent => Ok(()),
        Outcome::Miss(miss) => miss.wait(buf),
    }
}

/// `InvalidInput` unless `[offset, offset + len)` lies inside an image of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("read of {len} bytes at {offset} is outside the image ({size} bytes)"),
        )),
    }
}

/// A plain image file: every byte is local. Reads are `pread`s; lending hands out a read-only
/// mapping of the file.
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
                file.as_raw_fd(),
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

    fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        lend: Option<&mut Lend<'_>>,
    ) -> io::Result<Outcome> {
        check_range(offset, buf.len(), self.size)?;
        if let Some(lend) = lend
            && let Some(bytes) = self.map.as_ref().and_then(|m| m.slice(offset, buf.len()))
        {
            lend(&[IoSlice::new(bytes)])?;
            return Ok(Outcome::Lent);
        }
        // Not through the mapping: touching it from user space would SIGBUS if the file
        // shrank. read_exact_at turns a short read (file truncated under us) into an error.
        self.file.read_exact_at(buf, offset)?;
        Ok(Outcome::Copied)
    }

    fn file_extents(&self, offset: u64, len: usize, out: &mut Vec<FileExtent>) -> bool {
        if check_range(offset, len, self.size).is_err() {
            return false;
        }
        out.push(FileExtent {
            fd: self.file.as_raw_fd(),
            offset,
            len,
            hold: None,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_source_reads_lends_and_refuses_reads_past_its_end() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let src = FileSource::open(f.path()).unwrap();
        assert_eq!(src.size(), 10_000);
        let mut buf = vec![0u8; 4096];
        read_blocking(&src, 4096, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[4096..8192]);
        let err = read_blocking(&src, 8192, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(read_blocking(&src, u64::MAX, &mut buf).is_err());
        assert!(FileSource::open(std::env::temp_dir()).is_err());

        let mut got = Vec::new();
        let mut lend = |iov: &[IoSlice<'_>]| {
            got = iov.iter().flat_map(|s| s.to_vec()).collect();
            Ok(())
        };
        let mut small = [0u8; 50];
        assert!(matches!(
            src.read(100, &mut small, Some(&mut lend)).unwrap(),
            Outcome::Lent
        ));
        assert_eq!(got, &data[100..150]);
        assert_eq!(small, [0u8; 50], "a lent read leaves the buffer alone");

        let mut ext = Vec::new();
        assert!(src.file_extents(4096, 4096, &mut ext));
        assert_eq!(ext.len(), 1);
        let mut via_fd = vec![0u8; 4096];
        // SAFETY: pread into a live buffer of the stated length.
        let n = unsafe { libc::pread(ext[0].fd, via_fd.as_mut_ptr().cast(), 4096, 4096) };
        assert_eq!(n, 4096);
        assert_eq!(via_fd, &data[4096..8192]);
        assert!(!src.file_extents(8192, 4096, &mut ext), "past the end");
        assert_eq!(ext.len(), 1, "a refused range appends nothing");
    }

    /// A pending read whose source forgets to wake it fails instead of hanging the reader.
    #[test]
    fn a_dropped_wake_fails_the_wait() {
        struct Forgetful;
        impl PendingRead for Forgetful {
            fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>) {
                drop(wake);
            }
            fn finish(self: Box<Self>, _: &mut [u8]) -> io::Result<()> {
                Ok(())
            }
        }
        assert!(Miss::new(Forgetful).wait(&mut [0u8; 8]).is_err());
    }
}
