//! The FUSE file system: a root directory holding the one image file, and its read path.
use std::cell::RefCell;
use std::ffi::OsString;
use std::io::{self, IoSlice};
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use cora_read::{BlockSource, Miss, Outcome};

use crate::abi::{self, Args, Attr, Out, Request, op};
use crate::session::Reply;
use crate::{FuseOptions, LEND_MIN_BYTES, MAX_REQUEST, clamp_read, errno_of};

const ROOT: u64 = 1;
const FILE: u64 = 2;
/// Nothing here ever changes: let the kernel cache names and attributes for good (a year
/// stays far from any overflow in the kernel's jiffies arithmetic).
const TTL_SECS: u64 = 365 * 24 * 3600;
const BLOCK: u32 = 4096;
/// `DT_DIR`, `DT_REG` for directory entries.
const DT_DIR: u32 = 4;
const DT_REG: u32 = 8;

pub(crate) struct ImageFs {
    source: Arc<dyn BlockSource>,
    name: OsString,
    root: Attr,
    file: Attr,
    lend: bool,
    max_background: u16,
}

impl ImageFs {
    pub(crate) fn new(source: Arc<dyn BlockSource>, opts: &FuseOptions) -> Self {
        let size = source.size();
        // The mount's time: the image has no times of its own.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let attr = |ino, mode, size, nlink| Attr {
            ino,
            size,
            time_secs: now.as_secs(),
            time_nsecs: now.subsec_nanos(),
            mode,
            nlink,
            uid,
            gid,
            blksize: BLOCK,
        };
        ImageFs {
            name: opts.file_name.clone(),
            root: attr(ROOT, libc::S_IFDIR | 0o555, 0, 2),
            file: attr(FILE, libc::S_IFREG | 0o444, size, 1),
            source,
            lend: opts.lend,
            max_background: opts.max_background,
        }
    }

    fn attr(&self, ino: u64) -> Option<&Attr> {
        match ino {
            ROOT => Some(&self.root),
            FILE => Some(&self.file),
            _ => None,
        }
    }

    /// Answers one request.
    pub(crate) fn dispatch(&self, req: Request<'_>, reply: Reply) {
        let Request {
            opcode,
            nodeid,
            mut args,
            ..
        } = req;
        match opcode {
            op::INIT => self.init(&mut args, reply),
            op::LOOKUP => match args.name() {
                Some(name) if nodeid == ROOT && name == self.name => {
                    reply.ok(&abi::entry_out(&self.file, TTL_SECS).0)
                }
                Some(_) => reply.error(libc::ENOENT),
                None => reply.error(libc::EINVAL),
            },
            op::GETATTR => match self.attr(nodeid) {
                Some(a) => reply.ok(&abi::attr_out(a, TTL_SECS).0),
                None => reply.error(libc::ENOENT),
            },
            op::OPEN => match (nodeid, args.u32()) {
                (FILE, Some(flags)) if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY => {
                    reply.error(libc::EROFS)
                }
                // KEEP_CACHE: the image is immutable, so pages cached by an earlier open stay
                // valid; NOFLUSH: nothing to flush, spare the request on every close.
                (FILE, Some(_)) => {
                    reply.ok(&abi::open_out(0, abi::FOPEN_KEEP_CACHE | abi::FOPEN_NOFLUSH).0)
                }
                (_, None) => reply.error(libc::EINVAL),
                (ROOT, _) => reply.error(libc::EISDIR),
                _ => reply.error(libc::ENOENT),
            },
            op::OPENDIR => match nodeid {
                ROOT => reply.ok(&abi::open_out(0, abi::FOPEN_CACHE_DIR | abi::FOPEN_KEEP_CACHE).0),
                FILE => reply.error(libc::ENOTDIR),
                _ => reply.error(libc::ENOENT),
            },
            op::READ => match read_in(&mut args) {
                Some(_) if nodeid != FILE => reply.error(libc::EISDIR),
                Some((offset, size)) => self.read(offset, size, reply),
                None => reply.error(libc::EINVAL),
            },
            op::READDIR => match read_in(&mut args) {
                Some(_) if nodeid != ROOT => reply.error(libc::ENOTDIR),
                Some((offset, size)) => self.readdir(offset, size, reply),
                None => reply.error(libc::EINVAL),
            },
            op::STATFS => {
                let blocks = self.file.size.div_ceil(u64::from(BLOCK));
                let mut o = Out::default();
                // blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare
                o.u64(blocks).u64(0).u64(0).u64(2).u64(0);
                o.u32(BLOCK).u32(255).u32(BLOCK).u32(0).zeros(24);
                reply.ok(&o.0)
            }
            op::GETXATTR => reply.error(libc::ENODATA),
            op::LISTXATTR => match args.u32() {
                // The size of the (empty) list, as `fuse_getxattr_out`.
                Some(0) => reply.ok(&Out::default().u32(0).u32(0).0),
                Some(_) => reply.empty(),
                None => reply.error(libc::EINVAL),
            },
            op::ACCESS => match (self.attr(nodeid), args.u32()) {
                (None, _) => reply.error(libc::ENOENT),
                (Some(_), Some(mask)) if mask as i32 & libc::W_OK != 0 => reply.error(libc::EROFS),
                (Some(_), _) => reply.empty(),
            },
            op::READLINK => reply.error(libc::EINVAL),
            // Nothing is ever written (a loop device syncs its backing file on detach).
            op::RELEASE | op::RELEASEDIR | op::FLUSH | op::FSYNC | op::FSYNCDIR | op::DESTROY => {
                reply.empty()
            }
            // No answer expected. Interrupted reads still finish: they are short and bounded
            // by the fetch deadline.
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => reply.none(),
            _ => reply.error(libc::ENOSYS),
        }
    }

    fn init(&self, args: &mut Args<'_>, reply: Reply) {
        let (Some(major), Some(minor), Some(readahead), Some(flags)) =
            (args.u32(), args.u32(), args.u32(), args.u32())
        else {
            return reply.error(libc::EINVAL);
        };
        if major < abi::KERNEL_MAJOR {
            tracing::error!(major, minor, "the kernel's FUSE protocol is too old");
            return reply.error(libc::EPROTO);
        }
        let mut o = Out::default();
        if major > abi::KERNEL_MAJOR {
            // The kernel then sends INIT again with our major.
            o.u32(abi::KERNEL_MAJOR).zeros(60);
            return reply.ok(&o.0);
        }
        use abi::init::*;
        let want = ASYNC_READ | BIG_WRITES | PARALLEL_DIROPS | MAX_PAGES
            // Large direct reads (erofs reads its backing file with O_DIRECT when it can) go
            // out as parallel requests instead of one after the other.
            | ASYNC_DIO;
        let background = self.max_background.max(1);
        o.u32(abi::KERNEL_MAJOR).u32(minor.min(abi::OUR_MINOR));
        o.u32(readahead.min(MAX_REQUEST as u32)).u32(flags & want);
        // max_background, congestion_threshold (3/4 of it, as the kernel's default)
        o.u16(background).u16((background / 4 * 3).max(1));
        // max_write (nothing is written), time_gran, max_pages, map_alignment, flags2
        o.u32(4096)
            .u32(1)
            .u16((MAX_REQUEST / 4096) as u16)
            .u16(0)
            .u32(0);
        o.zeros(28);
        tracing::debug!(minor, flags = format_args!("{flags:#x}"), "FUSE INIT");
        reply.ok(&o.0)
    }

    fn readdir(&self, offset: u64, size: u32, reply: Reply) {
        let entries: [(u64, u32, &[u8]); 3] = [
            (ROOT, DT_DIR, b"."),
            (ROOT, DT_DIR, b".."),
            (FILE, DT_REG, self.name.as_bytes()),
        ];
        // An entry's offset is where the next readdir resumes: one past its index.
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut o = Out::default();
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(start) {
            if !abi::push_dirent(&mut o, size as usize, *ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok(&o.0)
    }

    fn read(&self, offset: u64, size: u32, reply: Reply) {
        let len = clamp_read(offset, size, self.file.size);
        if len == 0 {
            // At or past the end: an empty reply is end of file.
            return reply.empty();
        }
        let mut buf = BUF.take();
        buf.resize(len, 0);
        let mut reply = Some(reply);
        let res = if self.lend && len >= LEND_MIN_BYTES {
            let mut lend = |iov: &[IoSlice<'_>]| lend_reply(&mut reply, iov, len);
            self.source.read(offset, &mut buf, Some(&mut lend))
        } else {
            self.source.read(offset, &mut buf, None)
        };
        match (res, reply) {
            (Ok(Outcome::Copied), Some(reply)) => {
                reply.ok(&buf);
                BUF.set(buf);
            }
            (Ok(Outcome::Lent), None) => BUF.set(buf),
            (Ok(Outcome::Miss(miss)), Some(reply)) => wait_for_miss(
                miss,
                Pending {
                    offset,
                    buf,
                    reply: Some(reply),
                },
            ),
            (Err(e), reply) => {
                tracing::warn!(offset, len, "read failed: {e}");
                // None: the lend callback answered already, the source failed after it.
                if let Some(reply) = reply {
                    reply.error(errno_of(&e));
                }
                BUF.set(buf);
            }
            // The source broke its contract (Lent without lending, or lent and then something
            // else): answer what is still unanswered with EIO.
            (Ok(outcome), reply) => {
                let what = match outcome {
                    Outcome::Lent => "Lent without lending",
                    Outcome::Copied => "Copied after lending",
                    Outcome::Miss(_) => "Miss after lending",
                };
                tracing::warn!(offset, len, "source answered {what}");
                if let Some(reply) = reply {
                    reply.error(libc::EIO);
                }
            }
        }
    }
}

/// `fuse_read_in`'s offset and size (READ and READDIR).
fn read_in(args: &mut Args<'_>) -> Option<(u64, u32)> {
    let (_fh, offset, size) = (args.u64()?, args.u64()?, args.u32()?);
    Some((offset, size))
}

thread_local! {
    /// The request buffer of each serving thread, reused by every read answered inline.
    /// A read that misses takes it along, and the thread's next read grows a new one.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The lend callback: answers the request with the lent bytes, one `writev` of header and
/// slices. The slices may be mapped cache files and must never be read in user space, where a
/// file that shrank would SIGBUS; the kernel reading them gives EFAULT instead.
fn lend_reply(reply: &mut Option<Reply>, iov: &[IoSlice<'_>], len: usize) -> io::Result<()> {
    let total: usize = iov.iter().map(|s| s.len()).sum();
    if total != len {
        return Err(io::Error::other(format!(
            "source lent {total} bytes for a read of {len}"
        )));
    }
    let Some(r) = reply.as_mut() else {
        return Err(io::Error::other("source lent twice"));
    };
    // One writev takes at most IOV_MAX (1024) slices, the reply header included: more are
    // first gathered into one buffer, by the kernel.
    if iov.len() < 1024 {
        // On error still unanswered: the caller answers with it.
        r.try_data(iov)?;
    } else {
        r.try_data(&[IoSlice::new(&gather(iov, total)?)])?;
    }
    *reply = None;
    Ok(())
}

/// Copies `iov` (`total` bytes) into a new buffer inside the kernel (`process_vm_readv` on
/// this process): lent slices may be mapped cache files and are never read in user space.
fn gather(iov: &[IoSlice<'_>], total: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; total];
    let mut done = 0;
    // process_vm_readv takes at most IOV_MAX remote slices per call.
    for part in iov.chunks(1024) {
        let len: usize = part.iter().map(|s| s.len()).sum();
        let local = libc::iovec {
            iov_base: out[done..].as_mut_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: IoSlice is ABI-compatible with iovec; `local` is `len` writable bytes of
        // `out`; the remote slices are live for the call and only read.
        let n = unsafe {
            libc::process_vm_readv(
                libc::getpid(),
                &local,
                1,
                part.as_ptr().cast(),
                part.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("lent memory gave {n} of {len} bytes"),
            ));
        }
        done += len;
    }
    Ok(out)
}

/// A read waiting on a fetch: its buffer (local bytes already in) and its unanswered reply.
struct Pending {
    offset: u64,
    buf: Vec<u8>,
    /// Some until answered; an unanswered drop answers EIO.
    reply: Option<Reply>,
}

impl Pending {
    /// Copies in the fetched bytes and answers. Runs on whichever thread woke the miss.
    fn finish(mut self, miss: Miss) {
        let res = miss.finish(&mut self.buf);
        let Some(reply) = self.reply.take() else {
            return;
        };
        match res {
            Ok(()) => reply.ok(&self.buf),
            Err(e) => {
                let len = self.buf.len();
                tracing::warn!(offset = self.offset, len, "read failed: {e}");
                reply.error(errno_of(&e));
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // A source that dropped its wake-up: fail the read instead of leaving it hanging.
        if let Some(reply) = self.reply.take() {
            tracing::warn!(
                offset = self.offset,
                len = self.buf.len(),
                "source dropped a pending read"
            );
            reply.error(libc::EIO);
        }
    }
}

/// Hands a miss over to its wake-up. `when_ready` may call the wake-up before it returns (on
/// this thread) or later (on a fetch thread), and the [`Miss`] can only be parked for it after
/// `when_ready` returns; so whichever of the two comes second finishes the read.
enum Handoff {
    /// `when_ready` has not returned yet and the wake-up has not run.
    Arming,
    /// The wake-up ran first: this thread finishes once `when_ready` returns.
    Woken,
    /// Parked for the wake-up, which will finish it.
    Parked(Miss, Pending),
    Done,
}

fn wait_for_miss(mut miss: Miss, pending: Pending) {
    let slot = Arc::new(Mutex::new(Handoff::Arming));
    let waker = Arc::clone(&slot);
    miss.when_ready(move || {
        let mut state = waker.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *state, Handoff::Done) {
            Handoff::Arming => *state = Handoff::Woken,
            Handoff::Parked(miss, pending) => {
                drop(state);
                pending.finish(miss);
            }
            // Woken twice: the first wake-up counts.
            other => *state = other,
        }
    });
    let mut state = slot.lock().unwrap_or_else(PoisonError::into_inner);
    match std::mem::replace(&mut *state, Handoff::Done) {
        Handoff::Woken => {
            drop(state);
            // Ready already: finish does not block.
            pending.finish(miss);
        }
        _ => *state = Handoff::Parked(miss, pending),
    }
}
