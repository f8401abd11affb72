//! Serving a [`BlockSource`] as a read-only ublk device: add, recover, and the per-tag I/O path.
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use io_uring::{opcode, types};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkIOCtx, UblkQueue};
use libublk::uring_async::ublk_submit_sqe_async;
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData, sys};
use serde::{Deserialize, Serialize};

use super::mode::DataMode;
use super::wake::{self, Doorbell};
use super::{ServerError, TARGET_NAME};
use cora_read::{BlockSource, Outcome};

/// How the device is created. `Default` gives 1 queue of depth 128 with 1 MiB I/Os.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// Device id to ask for; `None` lets the kernel pick.
    pub id: Option<u32>,
    pub queues: u16,
    pub depth: u16,
    /// Largest I/O the kernel sends us (max_sectors), a multiple of the page size.
    pub max_io_bytes: u32,
    /// The most direct data mode to use; the device runs in the best one at most this that
    /// the kernel offers ([`DataMode::best`]).
    pub mode: DataMode,
    /// With user copy, hand memory-resident data to the kernel straight from the source
    /// (a lending [`BlockSource::read`]) instead of copying it through a buffer first.
    pub lend: bool,
    /// Counted into as requests are served.
    pub counters: Arc<IoCounters>,
}

/// Read requests served, by how their data reached the kernel.
#[derive(Debug, Default)]
pub struct IoCounters {
    /// Read by io_uring from the source's files into the registered request (AUTO_BUF_REG).
    pub registered: AtomicU64,
    /// Lent memory-resident bytes written into the request (user copy).
    pub lent: AtomicU64,
    /// Copied into a buffer first (local data).
    pub copied: AtomicU64,
    /// Waited for a fetch.
    pub missed: AtomicU64,
    /// Of those, read once the fetch was done like a hit: by io_uring from the cache's files
    /// into the registered request (AUTO_BUF_REG; the source stores fetched chunks before it
    /// wakes the reader).
    pub missed_registered: AtomicU64,
}

impl IoCounters {
    pub fn to_json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "registered": get(&self.registered),
            "lent": get(&self.lent),
            "copied": get(&self.copied),
            "missed": get(&self.missed),
            "missed_registered": get(&self.missed_registered),
        })
    }

    fn count(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            id: None,
            queues: 1,
            depth: 128,
            max_io_bytes: 1 << 20,
            mode: DataMode::AutoBufReg,
            lend: true,
            counters: Arc::default(),
        }
    }
}

/// What `add` records in the device's libublk json ("target_data"), so `recover` can rebuild
/// the same source in a new process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetData {
    /// Caller-defined description of the source (e.g. `{"kind":"file","path":...}`).
    pub recipe: serde_json::Value,
    pub size: u64,
    pub max_io_bytes: u32,
    /// See [`DeviceOptions::lend`]; absent in data of older devices: on.
    #[serde(default = "lend_default")]
    pub lend: bool,
}

fn lend_default() -> bool {
    true
}

/// Handed to the `ready` callback once the block device exists and is served.
#[derive(Clone, Debug)]
pub struct Ready {
    pub id: u32,
    pub bdev: String,
    /// UBLK_F_* flags the device runs with.
    pub flags: u64,
}

/// Kernel features from UBLK_U_CMD_GET_FEATURES (0 on kernels without the command).
pub fn kernel_features() -> u64 {
    UblkCtrl::get_features().unwrap_or(0)
}

fn ublk_err(what: &'static str) -> impl FnOnce(UblkError) -> ServerError {
    move |source| ServerError::Ublk { what, source }
}

/// Creates a read-only device serving `source` and serves it until the device is deleted.
/// `recipe` is stored with the device for [`recover`]. Blocks; calls `ready` once the
/// device is live.
pub fn add(
    opts: &DeviceOptions,
    recipe: serde_json::Value,
    source: Arc<dyn BlockSource>,
    ready: impl FnOnce(&Ready) + Send + Sync + 'static,
) -> Result<(), ServerError> {
    let features = kernel_features();
    let mut flags = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_CMD_IOCTL_ENCODE) as u64;
    // Re-issuing in-flight requests after a crash is always safe on a read-only device.
    flags |= features & sys::UBLK_F_USER_RECOVERY_REISSUE as u64;
    let mode = DataMode::best(features, opts.mode);
    flags = mode.apply(flags);
    tracing::debug!(%mode, "ublk data mode (at most {})", opts.mode);
    if features & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        tracing::warn!("kernel lacks UBLK_F_USER_RECOVERY; `recover` will not work");
        flags &= !(sys::UBLK_F_USER_RECOVERY as u64);
    }
    let target = TargetData {
        recipe,
        size: source.size(),
        max_io_bytes: opts.max_io_bytes,
        lend: opts.lend,
    };
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(opts.id.map_or(-1, |id| id as i32))
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(opts.max_io_bytes)
        .ctrl_flags(flags)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(ublk_err("adding device"))?;
    serve(&ctrl, target, source, opts.counters.clone(), ready)
}

/// Takes over device `id` whose server died (UBLK_F_USER_RECOVERY): rebuilds the source from
/// the recorded recipe with `open`, then serves until the device is deleted.
pub fn recover(
    id: u32,
    open: impl FnOnce(&serde_json::Value) -> io::Result<Arc<dyn BlockSource>>,
    counters: Arc<IoCounters>,
    ready: impl FnOnce(&Ready) + Send + Sync + 'static,
) -> Result<(), ServerError> {
    let probe = UblkCtrl::new_simple(id as i32).map_err(ublk_err("opening device"))?;
    let info = probe.dev_info();
    if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
        return Err(ServerError::NotRecoverable(id));
    }
    if info.state as u32 == sys::UBLK_S_DEV_LIVE && pid_alive(info.ublksrv_pid) {
        return Err(ServerError::StillServed {
            id,
            pid: info.ublksrv_pid,
        });
    }
    let target: TargetData = probe
        .get_target_data_from_json()
        .and_then(|v| v.get(TARGET_NAME).cloned())
        .ok_or(ServerError::NoTargetData(id))
        .and_then(|v| serde_json::from_value(v).map_err(|_| ServerError::NoTargetData(id)))?;
    drop(probe);
    let source = open(&target.recipe).map_err(ServerError::Source)?;
    if source.size() != target.size {
        return Err(ServerError::SizeChanged {
            recorded: target.size,
            now: source.size(),
        });
    }
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET_NAME)
        .id(id as i32)
        .nr_queues(info.nr_hw_queues)
        .depth(info.queue_depth)
        .io_buf_bytes(info.max_io_buf_bytes)
        .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
        .build()
        .map_err(ublk_err("opening device for recovery"))?;
    ctrl.start_user_recover()
        .map_err(ublk_err("START_USER_RECOVERY"))?;
    serve(&ctrl, target, source, counters, ready)
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

fn serve(
    ctrl: &UblkCtrl,
    target: TargetData,
    source: Arc<dyn BlockSource>,
    counters: Arc<IoCounters>,
    ready: impl FnOnce(&Ready) + Send + Sync + 'static,
) -> Result<(), ServerError> {
    let size = target.size;
    let tgt_init = |dev: &mut UblkDev| {
        let depth = dev.dev_info.queue_depth;
        // Room for every tag's command plus a target op (miss doorbell, user copy) each.
        dev.tgt.sq_depth = depth * 2;
        dev.tgt.cq_depth = depth * 2;
        dev.tgt.dev_size = size;
        dev.tgt.params = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                attrs: sys::UBLK_ATTR_READ_ONLY,
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
                // Round up: the tail past the source's end reads as zeros.
                dev_sectors: size.div_ceil(512),
                ..Default::default()
            },
            ..Default::default()
        };
        let json = serde_json::to_value(&target).map_err(UblkError::JsonError)?;
        dev.set_target_json(serde_json::json!({ TARGET_NAME: json }));
        Ok(())
    };
    let lend = target.lend;
    let q_fn = move |qid: u16, dev: &UblkDev| {
        if let Err(e) = run_queue(qid, dev, source.clone(), counters.clone(), lend) {
            tracing::error!(qid, "queue stopped: {e}");
        }
    };
    let on_ready = move |ctrl: &UblkCtrl| {
        let info = ctrl.dev_info();
        ready(&Ready {
            id: info.dev_id,
            bdev: ctrl.get_bdev_path(),
            flags: info.flags,
        });
    };
    ctrl.run_target(tgt_init, q_fn, on_ready)
        .map_err(ublk_err("serving device"))?;
    Ok(())
}

/// Per-queue state shared by the queue thread's tasks.
struct QueueCtx {
    source: Arc<dyn BlockSource>,
    doorbell: Arc<Doorbell>,
    mode: DataMode,
    counters: Arc<IoCounters>,
    /// /dev/ublkcN when UBLK_F_USER_COPY is on.
    user_copy_fd: Option<RawFd>,
    qid: u16,
    size: u64,
    max_io: usize,
    lend: bool,
}

fn run_queue(
    qid: u16,
    dev: &UblkDev,
    source: Arc<dyn BlockSource>,
    counters: Arc<IoCounters>,
    lend: bool,
) -> Result<(), ServerError> {
    let user_copy = dev.dev_info.flags & sys::UBLK_F_USER_COPY as u64 != 0;
    let ctx = Rc::new(QueueCtx {
        mode: DataMode::of_flags(dev.dev_info.flags),
        counters,
        size: source.size(),
        source,
        doorbell: Arc::new(Doorbell::new().map_err(ServerError::Io)?),
        user_copy_fd: user_copy.then_some(dev.tgt.fds[0]),
        qid,
        max_io: dev.dev_info.max_io_buf_bytes as usize,
        lend,
    });
    let q = Rc::new(UblkQueue::new(qid, dev).map_err(ublk_err("creating queue"))?);
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (q, ctx) = (q.clone(), ctx.clone());
        tasks.push(exe.spawn(async move {
            match io_task(&q, tag, &ctx).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(qid = ctx.qid, tag, "io task failed: {e}"),
            }
        }));
    }
    let bell_ctx = ctx.clone();
    // Not in `tasks`: it never ends by itself and is dropped with the executor.
    let _bell = exe.spawn(async move { doorbell_task(&bell_ctx).await });

    let run_exe = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while run_exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await
    }))
    .map_err(ublk_err("queue event loop"))
}

/// Keeps a poll on the doorbell in the queue ring, so a fetch finishing a miss interrupts the
/// ring wait; the finished task itself was already woken through its Waker.
async fn doorbell_task(ctx: &QueueCtx) {
    let fd = ctx.doorbell.raw_fd();
    loop {
        let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        match ublk_submit_sqe_async(sqe, UblkUringData::Target as u64).await {
            Ok(res) if res >= 0 => ctx.doorbell.drain(),
            Ok(res) => {
                tracing::error!(qid = ctx.qid, "doorbell poll failed: {res}");
                return;
            }
            Err(e) => {
                tracing::error!(qid = ctx.qid, "doorbell poll failed: {e}");
                return;
            }
        }
    }
}

/// One tag's life: fetch a request, serve it, commit the result and fetch the next.
async fn io_task(q: &UblkQueue<'_>, tag: u16, ctx: &QueueCtx) -> Result<(), UblkError> {
    // Without user copy the kernel copies from this buffer on commit; with it, it only stages
    // local hits before the pwrite into the request.
    let mut io_buf = IoBuf::<u8>::new(ctx.max_io);
    // AUTO_BUF_REG: the kernel registers the request's pages at buffer index `tag` of this
    // queue's ring; with FALLBACK, a failed registration reaches us as UBLK_IO_F_NEED_REG_BUF
    // instead of failing the request, and the request is served by user copy.
    let auto_reg = sys::ublk_auto_buf_reg {
        index: tag,
        flags: sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
        ..Default::default()
    };
    match ctx.mode {
        DataMode::AutoBufReg => {
            q.submit_io_prep_cmd(tag, BufDesc::AutoReg(auto_reg), 0, None)
                .await?
        }
        DataMode::UserCopy => {
            q.submit_io_prep_cmd(tag, BufDesc::Slice(&[]), 0, None)
                .await?
        }
        DataMode::Buffered => {
            q.submit_io_prep_cmd(tag, BufDesc::Slice(io_buf.as_slice()), 0, Some(&io_buf))
                .await?
        }
    };
    let mut extents = Vec::new();
    loop {
        let res = handle(q, tag, ctx, &mut io_buf, &mut extents).await;
        let desc = match ctx.mode {
            DataMode::AutoBufReg => BufDesc::AutoReg(auto_reg),
            DataMode::UserCopy => BufDesc::Slice(&[]),
            DataMode::Buffered => BufDesc::Slice(io_buf.as_slice()),
        };
        q.submit_io_commit_cmd(tag, desc, res).await?;
    }
}

async fn handle(
    q: &UblkQueue<'_>,
    tag: u16,
    ctx: &QueueCtx,
    io_buf: &mut IoBuf<u8>,
    extents: &mut Vec<FileExtent>,
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let registered =
        ctx.mode == DataMode::AutoBufReg && iod.op_flags & sys::UBLK_IO_F_NEED_REG_BUF == 0;
    match op {
        sys::UBLK_IO_OP_READ if registered && ctx.in_files(offset, len, extents) => {
            let res = read_files_into_request(tag, extents).await;
            // The extents hold cache files open: release them now, not at this tag's next
            // request (an evicted chunk would keep its disk space until then).
            extents.clear();
            match res {
                Ok(()) => {
                    IoCounters::count(&ctx.counters.registered);
                    len as i32
                }
                Err(e) => {
                    tracing::warn!(qid = ctx.qid, tag, offset, len, "read failed: {e}");
                    -libc::EIO
                }
            }
        }
        sys::UBLK_IO_OP_READ => {
            match read(ctx, tag, offset, len, io_buf, registered, extents).await {
                Ok(()) => len as i32,
                Err(e) => {
                    tracing::warn!(qid = ctx.qid, tag, offset, len, "read failed: {e}");
                    -libc::EIO
                }
            }
        }
        sys::UBLK_IO_OP_FLUSH => 0,
        sys::UBLK_IO_OP_WRITE
        | sys::UBLK_IO_OP_DISCARD
        | sys::UBLK_IO_OP_WRITE_ZEROES
        | sys::UBLK_IO_OP_WRITE_SAME => -libc::EROFS,
        _ => -libc::EOPNOTSUPP,
    }
}

use cora_read::{FileExtent, LEND_MIN_BYTES};

impl QueueCtx {
    /// Whether the whole request lies in the source's files (never the zero tail past the
    /// source's end); if so, `extents` holds where.
    fn in_files(&self, offset: u64, len: usize, extents: &mut Vec<FileExtent>) -> bool {
        extents.clear();
        len <= self.max_io
            && offset.saturating_add(len as u64) <= self.size
            && self.source.file_extents(offset, len, extents)
    }
}

/// AUTO_BUF_REG: io_uring reads of the files straight into the request's registered pages
/// (buffer index `tag`, addresses are offsets into the request), on the queue's own ring.
async fn read_files_into_request(tag: u16, extents: &[FileExtent]) -> io::Result<()> {
    // All extents at once: their reads go into the ring together and complete in one
    // submission (a 1 MiB request spans ~16 cached chunks). Each future pushes its SQE when
    // first polled.
    let mut reads = Vec::with_capacity(extents.len());
    let mut at = 0usize;
    for e in extents {
        reads.push(Box::pin(read_extent(tag, e, at)));
        at += e.len;
    }
    let mut results: Vec<Option<io::Result<()>>> = (0..reads.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (read, result) in reads.iter_mut().zip(results.iter_mut()) {
            if result.is_none() {
                match read.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *result = Some(r),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// One extent into the registered request at byte `at`.
async fn read_extent(tag: u16, e: &FileExtent, at: usize) -> io::Result<()> {
    let mut done = 0usize;
    // Regular files return short reads only at their end; loop for robustness.
    while done < e.len {
        let want = u32::try_from(e.len - done).map_err(io::Error::other)?;
        let sqe = opcode::ReadFixed::new(types::Fd(e.fd), (at + done) as *mut u8, want, tag)
            .offset(e.offset + done as u64)
            .build();
        let res = ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
            .await
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        if res == 0 {
            return Err(io::Error::other(format!(
                "file read ended {} bytes short (file shrank?)",
                e.len - done
            )));
        }
        done += res as usize;
    }
    Ok(())
}

/// A read by copy (or lent slices); with `registered` (AUTO_BUF_REG), a miss is read like a
/// hit once its fetch is done, by io_uring from the cache's files into the request.
async fn read(
    ctx: &QueueCtx,
    tag: u16,
    offset: u64,
    len: usize,
    io_buf: &mut IoBuf<u8>,
    registered: bool,
    extents: &mut Vec<FileExtent>,
) -> io::Result<()> {
    if len > ctx.max_io || offset.saturating_add(len as u64) > ctx.size.next_multiple_of(512) {
        return Err(io::Error::other("request outside the device"));
    }
    // Bytes of the request that exist in the source; the rest is the zero tail.
    let avail = (ctx.size.saturating_sub(offset)).min(len as u64) as usize;
    let buf = &mut io_buf.as_mut_slice()[..len];
    buf[avail..].fill(0);
    if avail > 0 {
        // Lending hands memory-resident bytes straight to the request: one copy.
        let lend_to = ctx
            .user_copy_fd
            .filter(|_| ctx.lend && avail == len && len >= LEND_MIN_BYTES);
        let mut lend = |iov: &[io::IoSlice<'_>]| match lend_to {
            Some(fd) => copy_slices_to_request(fd, ctx.qid, tag, iov, len),
            None => Err(io::Error::other("not lending")),
        };
        let lend = lend_to
            .is_some()
            .then_some(&mut lend as &mut cora_read::Lend<'_>);
        match ctx.source.read(offset, &mut buf[..avail], lend)? {
            Outcome::Lent => {
                IoCounters::count(&ctx.counters.lent);
                return Ok(());
            }
            Outcome::Copied => IoCounters::count(&ctx.counters.copied),
            Outcome::Miss(mut miss) => {
                IoCounters::count(&ctx.counters.missed);
                // This task waits; the queue's other tags go on being served.
                wake::ready(&mut miss, ctx.doorbell.clone()).await;
                if registered && avail == len && ctx.in_files(offset, len, extents) {
                    // Local now: no user copy of the fetched bytes.
                    drop(miss);
                    let res = read_files_into_request(tag, extents).await;
                    extents.clear();
                    res?;
                    IoCounters::count(&ctx.counters.missed_registered);
                    return Ok(());
                }
                miss.finish(&mut buf[..avail])?;
            }
        }
    }
    if let Some(fd) = ctx.user_copy_fd {
        copy_to_request(fd, ctx.qid, tag, buf)?;
    }
    Ok(())
}

/// UBLK_F_USER_COPY: write the data into the request's pages through /dev/ublkcN.
fn copy_to_request(fd: RawFd, qid: u16, tag: u16, data: &[u8]) -> io::Result<()> {
    let pos = UblkIOCtx::ublk_user_copy_pos(qid, tag, 0);
    // SAFETY: pwrite reads `data.len()` bytes from a live slice.
    let n = unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), pos as libc::off_t) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::other(format!(
            "short user copy: {n} of {}",
            data.len()
        )));
    }
    Ok(())
}

/// UBLK_F_USER_COPY of lent slices: one `pwritev` into the request's pages.
fn copy_slices_to_request(
    fd: RawFd,
    qid: u16,
    tag: u16,
    iov: &[io::IoSlice<'_>],
    len: usize,
) -> io::Result<()> {
    let pos = UblkIOCtx::ublk_user_copy_pos(qid, tag, 0);
    let count = libc::c_int::try_from(iov.len()).map_err(io::Error::other)?;
    // SAFETY: IoSlice is ABI-compatible with iovec on Unix; the slices outlive the call and
    // pwritev only reads from them.
    let n = unsafe { libc::pwritev(fd, iov.as_ptr().cast(), count, pos as libc::off_t) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != len {
        return Err(io::Error::other(format!("short user copy: {n} of {len}")));
    }
    Ok(())
}
