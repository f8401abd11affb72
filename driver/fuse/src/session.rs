//! The request loop on one `/dev/fuse` connection: threads reading requests from the same
//! descriptor and answering with `writev`.
//!
//! All threads read one descriptor (no `FUSE_DEV_IOC_CLONE`), so every request a server has
//! read but not answered sits in that descriptor's processing queue. If the server dies while
//! another process (the device's keeper) holds the same open file, the connection lives on and
//! a new server takes it over with [`Channel::resend`]: the kernel queues those requests again.
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::abi::{self, OUT_HEADER};
use crate::fs::ImageFs;

/// Room for any request a read-only file system is sent (names are at most 255 bytes; writes
/// never come).
const REQUEST_BUFFER: usize = 64 << 10;

/// One FUSE connection's device descriptor.
#[derive(Debug)]
pub(crate) struct Channel {
    fd: OwnedFd,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// A second descriptor of the same open file: whoever holds it keeps the connection alive
    /// when this process dies.
    pub fn share(&self) -> io::Result<OwnedFd> {
        self.fd.as_fd().try_clone_to_owned()
    }

    /// Asks the kernel to queue again every request read but not answered on this connection
    /// (`FUSE_NOTIFY_RESEND`, Linux 6.9+): those a dead server took with it.
    pub fn resend(&self) -> io::Result<()> {
        let h = abi::out_header(OUT_HEADER, abi::NOTIFY_RESEND, 0);
        self.send(&[IoSlice::new(&h)])
    }

    fn receive(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn send(&self, iov: &[IoSlice<'_>]) -> io::Result<()> {
        let total: usize = iov.iter().map(|s| s.len()).sum();
        let count = libc::c_int::try_from(iov.len()).map_err(io::Error::other)?;
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices live across the call and
        // the kernel only reads them (a fault is EFAULT, not a signal).
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr().cast(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // The device takes a reply whole or not at all.
        if n as usize != total {
            return Err(io::Error::other(format!(
                "the FUSE device took {n} of {total} reply bytes"
            )));
        }
        Ok(())
    }
}

/// The answer to one request. Dropped unanswered, it answers EIO: a request is never left
/// waiting because a code path forgot it.
pub(crate) struct Reply {
    chan: Arc<Channel>,
    unique: u64,
    done: bool,
}

impl Reply {
    pub fn new(chan: Arc<Channel>, unique: u64) -> Reply {
        Reply {
            chan,
            unique,
            done: false,
        }
    }

    /// Answers with `payload` (a reply structure, or read data).
    pub fn ok(self, payload: &[u8]) {
        self.data(&[IoSlice::new(payload)]);
    }

    pub fn empty(self) {
        self.data(&[]);
    }

    pub fn data(mut self, iov: &[IoSlice<'_>]) {
        if let Err(e) = self.try_data(iov) {
            tracing::warn!(unique = self.unique, "answering a FUSE request: {e}");
            // Drop answers EIO.
        }
    }

    /// Answers with `iov`; on error the request is still unanswered.
    pub fn try_data(&mut self, iov: &[IoSlice<'_>]) -> io::Result<()> {
        let len: usize = OUT_HEADER + iov.iter().map(|s| s.len()).sum::<usize>();
        let h = abi::out_header(len, 0, self.unique);
        let mut all = Vec::with_capacity(iov.len() + 1);
        all.push(IoSlice::new(&h));
        all.extend_from_slice(iov);
        self.finish(&all)
    }

    pub fn error(mut self, errno: i32) {
        let h = abi::out_header(OUT_HEADER, -errno, self.unique);
        if let Err(e) = self.finish(&[IoSlice::new(&h)]) {
            tracing::warn!(unique = self.unique, "answering a FUSE request: {e}");
            self.done = true;
        }
    }

    /// Requests the kernel expects no answer to (FORGET, INTERRUPT).
    pub fn none(mut self) {
        self.done = true;
    }

    fn finish(&mut self, iov: &[IoSlice<'_>]) -> io::Result<()> {
        match self.chan.send(iov) {
            // ENOENT: the request is gone (interrupted, or the connection aborted): nobody
            // waits for an answer any more.
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
            _ => {
                self.done = true;
                Ok(())
            }
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.done {
            let h = abi::out_header(OUT_HEADER, -libc::EIO, self.unique);
            let _ = self.chan.send(&[IoSlice::new(&h)]);
        }
    }
}

/// Serves the connection on `threads` threads (this one included) until it ends (unmounted
/// or aborted). Returns the first error a thread stopped with.
pub(crate) fn run(chan: Arc<Channel>, fs: Arc<ImageFs>, threads: usize) -> io::Result<()> {
    let mut workers = Vec::new();
    for i in 1..threads.max(1) {
        let (chan, fs) = (chan.clone(), fs.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("cora-fuse-{i}"))
            .spawn(move || serve(&chan, &fs));
        match spawned {
            Ok(w) => workers.push(w),
            Err(e) => tracing::warn!("starting FUSE thread {i}: {e}; serving with fewer"),
        }
    }
    let mut res = serve(&chan, &fs);
    for w in workers {
        let r = w
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("a FUSE thread panicked")));
        res = res.and(r);
    }
    res
}

fn serve(chan: &Arc<Channel>, fs: &ImageFs) -> io::Result<()> {
    let mut buf = vec![0u8; REQUEST_BUFFER.max(abi::MIN_READ_BUFFER)];
    loop {
        let n = match chan.receive(&mut buf) {
            Ok(n) => n,
            Err(e) => match e.raw_os_error() {
                // ENOENT: the request was interrupted while being read.
                Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => continue,
                // Unmounted, or the connection was aborted: the session is over.
                Some(libc::ENODEV) => return Ok(()),
                _ => return Err(e),
            },
        };
        match abi::Request::parse(&buf[..n]) {
            Ok(req) => {
                let reply = Reply::new(chan.clone(), req.unique);
                fs.dispatch(req, reply);
            }
            Err((unique, e)) => {
                tracing::warn!("{e}");
                if let Some(unique) = unique {
                    Reply::new(chan.clone(), unique).error(libc::EIO);
                }
            }
        }
    }
}
