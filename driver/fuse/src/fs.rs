//! The FUSE file system: a root directory holding the one image file, and its read path.
use std::cell::RefCell;
use std::ffi::{OsStr, OsString};
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use cora_read::{BlockSource, Miss, Outcome};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use crate::{FuseOptions, LEND_MIN_BYTES, MAX_REQUEST, clamp_read, errno_of};

const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);
/// Nothing here ever changes: let the kernel cache names and attributes for good (a year
/// stays far from any overflow in the kernel's jiffies arithmetic).
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
const BLOCK: u32 = 4096;

pub(crate) struct ImageFs {
    source: Arc<dyn BlockSource>,
    name: OsString,
    root: FileAttr,
    file: FileAttr,
    lend: bool,
    max_background: u16,
}

impl ImageFs {
    pub(crate) fn new(source: Arc<dyn BlockSource>, opts: &FuseOptions) -> Self {
        let size = source.size();
        // The mount's time: the image has no times of its own.
        let now = SystemTime::now();
        // SAFETY: geteuid/getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let attr = |ino, kind, perm, size, nlink| FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        };
        ImageFs {
            name: opts.file_name.clone(),
            root: attr(ROOT, FileType::Directory, 0o555, 0, 2),
            file: attr(FILE, FileType::RegularFile, 0o444, size, 1),
            source,
            lend: opts.lend,
            max_background: opts.max_background,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<&FileAttr> {
        match ino {
            ROOT => Some(&self.root),
            FILE => Some(&self.file),
            _ => None,
        }
    }
}

thread_local! {
    /// The request buffer of each event-loop thread, reused by every read answered inline.
    /// A read that misses takes it along, and the thread's next read grows a new one.
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Each call fails only by naming the nearest allowed value: take that one then.
        let _ = config
            .set_max_write(MAX_REQUEST as u32)
            .or_else(|max| config.set_max_write(max));
        let _ = config
            .set_max_readahead(MAX_REQUEST as u32)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config
            .set_max_background(self.max_background.max(1))
            .or_else(|min| config.set_max_background(min));
        // Large direct reads (erofs reads its backing file with O_DIRECT when it can) go out
        // as parallel requests instead of one after the other.
        if config.capabilities().contains(InitFlags::FUSE_ASYNC_DIO) {
            let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == self.name {
            reply.entry(&TTL, &self.file, Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, _ino: INodeNo, reply: ReplyData) {
        reply.error(Errno::EINVAL);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            FILE if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            // KEEP_CACHE: the image is immutable, so pages cached by an earlier open stay
            // valid; NOFLUSH: nothing to flush, spare the request on every close.
            FILE => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            reply.error(Errno::EISDIR);
            return;
        }
        let len = clamp_read(offset, size, self.file.size);
        if len == 0 {
            // At or past the end: an empty reply is end of file.
            reply.data(&[]);
            return;
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
                reply.data(&buf);
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
                    reply.error(Errno::EIO);
                }
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Nothing is ever written (a loop device syncs its backing file on detach).
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match ino {
            ROOT => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            FILE => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, OsStr::new(".")),
            (ROOT, FileType::Directory, OsStr::new("..")),
            (FILE, FileType::RegularFile, self.name.as_os_str()),
        ];
        // An entry's offset is where the next readdir resumes: one past its index.
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(start) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.file.size.div_ceil(u64::from(BLOCK));
        reply.statfs(blocks, 0, 0, 2, 0, BLOCK, 255, BLOCK);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Only asked without default_permissions; the mount is read-only either way.
        if self.attr(ino).is_none() {
            reply.error(Errno::ENOENT);
        } else if mask.contains(fuser::AccessFlags::W_OK) {
            reply.error(Errno::EROFS);
        } else {
            reply.ok();
        }
    }
}

/// The lend callback: answers the request with the lent bytes. One slice goes to the kernel as
/// it is (fuser's `ReplyData::data` is one `writev` of header and slice, so the mapped bytes
/// are read only by the kernel). fuser takes one data slice, so several are first gathered
/// into a buffer by the kernel (`process_vm_readv` on this process): the slices may be mapped
/// cache files and must never be read in user space, where a file that shrank would SIGBUS;
/// the kernel gives EFAULT instead. The request buffer can't take them: the source holds it.
fn lend_reply(reply: &mut Option<ReplyData>, iov: &[IoSlice<'_>], len: usize) -> io::Result<()> {
    let total: usize = iov.iter().map(|s| s.len()).sum();
    if total != len {
        return Err(io::Error::other(format!(
            "source lent {total} bytes for a read of {len}"
        )));
    }
    let Some(r) = reply.take() else {
        return Err(io::Error::other("source lent twice"));
    };
    match iov {
        [one] => r.data(one),
        many => match gather(many, total) {
            Ok(bytes) => r.data(&bytes),
            Err(e) => {
                // Unanswered: the caller answers with this error.
                *reply = Some(r);
                return Err(e);
            }
        },
    }
    Ok(())
}

/// Copies `iov` (`total` bytes) into a new buffer inside the kernel; see [`lend_reply`].
fn gather(iov: &[IoSlice<'_>], total: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; total];
    let local = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: total,
    };
    let count = libc::c_ulong::try_from(iov.len()).map_err(io::Error::other)?;
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix; `local` is `total` writable bytes
    // of `out`, the remote slices are live for the call, and the kernel only reads them.
    let n =
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, iov.as_ptr().cast(), count, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != total {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("lent memory gave {n} of {total} bytes"),
        ));
    }
    Ok(out)
}

/// A read waiting on a fetch: its buffer (local bytes already in) and its unanswered reply.
struct Pending {
    offset: u64,
    buf: Vec<u8>,
    /// Some until answered; an unanswered drop answers EIO.
    reply: Option<ReplyData>,
}

impl Pending {
    /// Copies in the fetched bytes and answers. Runs on whichever thread woke the miss.
    fn finish(mut self, miss: Miss) {
        let res = miss.finish(&mut self.buf);
        let Some(reply) = self.reply.take() else {
            return;
        };
        match res {
            Ok(()) => reply.data(&self.buf),
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
            reply.error(Errno::EIO);
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
