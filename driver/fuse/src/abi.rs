//! The FUSE wire protocol (`linux/fuse.h`, major 7) as far as a read-only, one-file file system
//! needs it: request headers and arguments read with bounds checks (a malformed request is an
//! error, never a panic), replies encoded into byte buffers.
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

pub(crate) const IN_HEADER: usize = 40;
pub(crate) const OUT_HEADER: usize = 16;
pub(crate) const KERNEL_MAJOR: u32 = 7;
/// The protocol minor we speak: every structure we send has had its current size since before
/// 7.31 (5.4), and `max_pages` (7.28) is all we need beyond the basics. Newer kernels use ours.
pub(crate) const OUR_MINOR: u32 = 31;
/// The kernel refuses request reads into smaller buffers (`FUSE_MIN_READ_BUFFER`).
pub(crate) const MIN_READ_BUFFER: usize = 8192;

pub(crate) mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// INIT flags (`fuse_init_in.flags` / `fuse_init_out.flags`).
pub(crate) mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

pub(crate) const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub(crate) const FOPEN_CACHE_DIR: u32 = 1 << 3;
pub(crate) const FOPEN_NOFLUSH: u32 = 1 << 5;

/// `enum fuse_notify_code`: requests a dead server had read but not answered go back to the
/// pending queue (Linux 6.9+).
pub(crate) const NOTIFY_RESEND: i32 = 7;

/// A request that cannot be read. Answered with EIO when its `unique` is known.
#[derive(Debug, thiserror::Error)]
#[error("malformed FUSE request ({what})")]
pub(crate) struct Malformed {
    pub what: &'static str,
}

/// One request as read from `/dev/fuse`.
#[derive(Debug)]
pub(crate) struct Request<'a> {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub args: Args<'a>,
}

impl<'a> Request<'a> {
    /// Reads a request from the bytes one `read` of the device returned.
    pub fn parse(buf: &'a [u8]) -> Result<Request<'a>, (Option<u64>, Malformed)> {
        let mut h = Args(buf);
        let (Some(len), Some(opcode), Some(unique), Some(nodeid)) =
            (h.u32(), h.u32(), h.u64(), h.u64())
        else {
            return Err((
                None,
                Malformed {
                    what: "short header",
                },
            ));
        };
        let bad = |what| Err((Some(unique), Malformed { what }));
        // uid, gid, pid, total_extlen, padding
        let (Some(_), Some(_), Some(_), Some(extlen), Some(_)) =
            (h.u32(), h.u32(), h.u32(), h.u16(), h.u16())
        else {
            return bad("short header");
        };
        if len as usize != buf.len() {
            return bad("length disagrees with the read");
        }
        // Extensions (security contexts, supplementary groups) trail the arguments; we never
        // ask for them, but strip them if sent.
        let Some(end) = buf
            .len()
            .checked_sub(usize::from(extlen) * 8)
            .filter(|e| *e >= IN_HEADER)
        else {
            return bad("extensions longer than the request");
        };
        Ok(Request {
            opcode,
            unique,
            nodeid,
            args: Args(&buf[IN_HEADER..end]),
        })
    }
}

/// A request's arguments, read front to back.
#[derive(Debug)]
pub(crate) struct Args<'a>(&'a [u8]);

impl<'a> Args<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    /// A NUL-terminated name.
    pub fn name(&mut self) -> Option<&'a OsStr> {
        let nul = self.0.iter().position(|b| *b == 0)?;
        let (name, rest) = self.0.split_at(nul);
        self.0 = &rest[1..];
        Some(OsStr::from_bytes(name))
    }
}

/// A reply payload under construction (little endian, the structures' natural layout).
#[derive(Default)]
pub(crate) struct Out(pub Vec<u8>);

impl Out {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

/// The reply header (`fuse_out_header`); `error` is 0 or a negated errno.
pub(crate) fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    // Replies are at most a header plus `MAX_REQUEST` bytes.
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..].copy_from_slice(&unique.to_le_bytes());
    h
}

/// File attributes as `struct fuse_attr` wants them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attr {
    pub ino: u64,
    pub size: u64,
    pub time_secs: u64,
    pub time_nsecs: u32,
    /// Type and permission bits (`S_IFREG | 0o444`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

impl Attr {
    pub fn put(&self, o: &mut Out) {
        o.u64(self.ino).u64(self.size).u64(self.size.div_ceil(512));
        // atime, mtime, ctime, then their nanoseconds
        o.u64(self.time_secs)
            .u64(self.time_secs)
            .u64(self.time_secs);
        o.u32(self.time_nsecs)
            .u32(self.time_nsecs)
            .u32(self.time_nsecs);
        o.u32(self.mode).u32(self.nlink).u32(self.uid).u32(self.gid);
        // rdev, blksize, flags
        o.u32(0).u32(self.blksize).u32(0);
    }
}

/// `struct fuse_entry_out`: a LOOKUP's answer.
pub(crate) fn entry_out(attr: &Attr, ttl_secs: u64) -> Out {
    let mut o = Out::default();
    // nodeid, generation, entry_valid, attr_valid, their nanoseconds
    o.u64(attr.ino)
        .u64(0)
        .u64(ttl_secs)
        .u64(ttl_secs)
        .u32(0)
        .u32(0);
    attr.put(&mut o);
    o
}

/// `struct fuse_attr_out`: a GETATTR's answer.
pub(crate) fn attr_out(attr: &Attr, ttl_secs: u64) -> Out {
    let mut o = Out::default();
    o.u64(ttl_secs).u32(0).u32(0);
    attr.put(&mut o);
    o
}

/// `struct fuse_open_out`.
pub(crate) fn open_out(fh: u64, flags: u32) -> Out {
    let mut o = Out::default();
    o.u64(fh).u32(flags).u32(0);
    o
}

/// Appends one `struct fuse_dirent` (8-byte aligned) if it fits in `max` bytes in all.
pub(crate) fn push_dirent(
    o: &mut Out,
    max: usize,
    ino: u64,
    next: u64,
    kind: u32,
    name: &[u8],
) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if o.0.len() + len > max {
        return false;
    }
    o.u64(ino).u64(next).u32(name.len() as u32).u32(kind);
    o.0.extend_from_slice(name);
    o.zeros(len - 24 - name.len());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, opcode: u32, unique: u64, extlen: u16) -> Vec<u8> {
        let mut o = Out::default();
        o.u32(len)
            .u32(opcode)
            .u64(unique)
            .u64(1)
            .u32(0)
            .u32(0)
            .u32(0)
            .u16(extlen)
            .u16(0);
        o.0
    }

    #[test]
    fn requests_are_read_with_their_arguments() {
        let mut b = header(40 + 6, op::LOOKUP, 9, 0);
        b.extend_from_slice(b"image\0");
        let r = Request::parse(&b).unwrap();
        assert_eq!((r.opcode, r.unique, r.nodeid), (op::LOOKUP, 9, 1));
        let mut a = r.args;
        assert_eq!(a.name(), Some(OsStr::new("image")));
        assert_eq!(a.u32(), None);
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        assert!(Request::parse(&[]).is_err());
        assert!(Request::parse(&[0; 39]).is_err());
        // Length field disagrees with the bytes read.
        let e = Request::parse(&header(41, op::GETATTR, 5, 0)).unwrap_err();
        assert_eq!(e.0, Some(5));
        // Extensions longer than the request.
        assert!(Request::parse(&header(40, op::GETATTR, 5, 1)).is_err());
        assert!(Request::parse(&header(40, op::GETATTR, 5, u16::MAX)).is_err());
        // A name without its NUL.
        let mut b = header(45, op::LOOKUP, 5, 0);
        b.extend_from_slice(b"image");
        assert_eq!(Request::parse(&b).unwrap().args.name(), None);
        // Every truncation of a valid request.
        let mut b = header(40 + 16, op::READ, 5, 0);
        b.extend_from_slice(&[0; 16]);
        for n in 0..b.len() {
            let _ = Request::parse(&b[..n]);
        }
    }

    #[test]
    fn replies_have_the_kernels_sizes() {
        let attr = Attr {
            ino: 2,
            size: 1,
            time_secs: 0,
            time_nsecs: 0,
            mode: 0o100444,
            nlink: 1,
            uid: 0,
            gid: 0,
            blksize: 4096,
        };
        // sizeof(struct fuse_entry_out), fuse_attr_out, fuse_open_out
        assert_eq!(entry_out(&attr, 1).0.len(), 128);
        assert_eq!(attr_out(&attr, 1).0.len(), 104);
        assert_eq!(open_out(0, 0).0.len(), 16);
        let mut o = Out::default();
        assert!(push_dirent(&mut o, 64, 1, 1, 4, b"."));
        assert_eq!(o.0.len(), 32);
        assert!(!push_dirent(&mut o, 64, 2, 2, 8, b"a-name-too-long-to-fit"));
        assert_eq!(o.0.len(), 32);
    }
}
