//! `cora-driver`: the device process. Serves one layer stack of a CORA image (or a plain image
//! file) read-only through a kernel transport (ublk, or FUSE where the kernel has no ublk);
//! one process per device.
mod fuse_device;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use cora_api::driver::{DeviceInfo, Ready, TRANSPORT_UBLK, Transport};
use fuse_device::FUSE_ID_BASE;
use lazy::device::{SourceRecipe, TraceOptions};
use ublk::DeviceOptions;

#[derive(Parser)]
#[command(
    name = "cora-driver",
    about = "CORA device server: one layer stack through ublk or FUSE",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a read-only device and serve it; prints what to mount once it is ready
    /// (/dev/ublkbN, or the FUSE image file).
    Add(Box<AddArgs>),
    /// List devices of both transports.
    List {
        /// Print a JSON array of `cora_api::driver::DeviceInfo`.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = fuse_device::DEFAULT_DIR)]
        fuse_dir: PathBuf,
    },
    /// Stop and delete a device.
    Del {
        id: u32,
        #[arg(long, default_value = fuse_device::DEFAULT_DIR)]
        fuse_dir: PathBuf,
    },
    /// Serve again a device whose server died (UBLK_F_USER_RECOVERY), from what `add` recorded.
    /// A FUSE device is recovered by its keeper, which passes the connection as descriptor 3.
    Recover {
        id: u32,
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, default_value = fuse_device::DEFAULT_DIR)]
        fuse_dir: PathBuf,
    },
    /// Holds a FUSE device's connection (descriptor 3) and starts a new server whenever the
    /// serving one dies; started by the FUSE server itself.
    #[command(hide = true)]
    FuseKeeper {
        id: u32,
        #[arg(long)]
        server_pid: i32,
        #[arg(long)]
        fuse_dir: PathBuf,
        #[arg(long)]
        stats_file: Option<PathBuf>,
    },
    /// Print the ublk features of the running kernel.
    Features,
    /// The fallback when a stack cannot be served lazily: download its layers whole (each
    /// checked against the image config) and unpack them merged into a new directory.
    Unpack(Box<UnpackArgs>),
}

#[derive(Args)]
struct UnpackArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Directory to create with the stack's merged tree (must not exist).
    #[arg(long)]
    into: PathBuf,
}

/// `--transport auto` made concrete: ublk where `/dev/ublk-control` can be opened, else FUSE.
fn resolve_transport(t: Transport) -> Transport {
    match t {
        Transport::Auto => match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/ublk-control")
        {
            Ok(_) => Transport::Ublk,
            Err(e) => {
                tracing::info!("ublk unavailable (/dev/ublk-control: {e}); serving through FUSE");
                Transport::Fuse
            }
        },
        t => t,
    }
}

#[derive(Args)]
struct AddArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Kernel interface serving the device: auto (ublk where `/dev/ublk-control` opens, else
    /// FUSE), ublk or fuse.
    #[arg(long, default_value_t = Transport::Auto)]
    transport: Transport,
    /// Where FUSE devices are mounted and recorded.
    #[arg(long, default_value = fuse_device::DEFAULT_DIR)]
    fuse_dir: PathBuf,
    /// Device id (default: the kernel picks one).
    #[arg(long)]
    id: Option<u32>,
    #[arg(long, default_value_t = 1)]
    queues: u16,
    #[arg(long, default_value_t = 128)]
    depth: u16,
    /// Largest I/O in bytes (a multiple of 4096).
    #[arg(long, default_value_t = 1 << 20)]
    max_io: u32,
    /// The most direct ublk data mode to use (buffered, user-copy, auto-buf-reg); the device
    /// runs in the best one at most this that the kernel offers. Lower it to measure.
    #[arg(long, default_value_t = ublk::DataMode::AutoBufReg)]
    data_mode: ublk::DataMode,
    /// Copy cached data through a buffer instead of handing mapped chunks to the kernel
    /// (for measuring the difference).
    #[arg(long)]
    no_lend: bool,
    #[command(flatten)]
    run: RunArgs,
}

/// Where the device's data comes from. `recipe` turns these into what is stored with the device.
#[derive(Args)]
struct SourceArgs {
    /// A plain image file (erofs, ext4, ...).
    #[arg(
        long,
        value_name = "IMAGE",
        conflicts_with = "image",
        required_unless_present = "image"
    )]
    file: Option<PathBuf>,
    /// A CORA image: oci:PATH[:TAG] or HOST[:PORT]/REPO[:TAG|@DIGEST].
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Top layer of the stack to serve (0-based; default: the image's top layer).
    #[arg(long, requires = "image", conflicts_with = "layer_digest")]
    layer: Option<usize>,
    /// Top layer of the stack to serve, by its blob digest (sha256:…).
    #[arg(long, requires = "image", value_name = "DIGEST")]
    layer_digest: Option<String>,
    /// Chunk cache directory, shared by all images and devices on the host.
    #[arg(long, default_value = lazy::cache::DEFAULT_DIR)]
    cache: PathBuf,
    /// Cache size limit, e.g. 10G.
    #[arg(long, default_value = "10G", value_parser = cora_api::size::parse_size)]
    cache_size: u64,
    /// Docker-config JSON with registry credentials.
    #[arg(long)]
    creds: Option<PathBuf>,
    /// Extra CA certificate (PEM) for registries.
    #[arg(long)]
    ca: Vec<PathBuf>,
    /// Registry host reached over plain HTTP.
    #[arg(long)]
    insecure: Vec<String>,
    /// Mirror host tried before the upstream (append ",insecure" for plain HTTP).
    #[arg(long)]
    mirror: Vec<String>,
    /// Record the chunk access order of this start to FILE (for `cora trace push`).
    #[arg(long, value_name = "FILE", requires = "image")]
    record_trace: Option<PathBuf>,
    /// Do not prefetch the access trace stored with the image.
    #[arg(long, requires = "image")]
    no_prefetch: bool,
    /// Sequential read-ahead window of the lazy source in bytes, e.g. 256K (0 = none).
    #[arg(long, requires = "image", value_parser = cora_api::size::parse_size)]
    readahead: Option<u64>,
    /// On a miss, also fetch the chunks that follow, up to this many compressed bytes, e.g.
    /// 256K (0 = none; default 1M).
    #[arg(long, requires = "image", value_parser = cora_api::size::parse_size)]
    miss_window: Option<u64>,
    /// On a miss inside a file, the window reaches to the file's end, up to this many
    /// compressed bytes, e.g. 4M (default 0: the miss window only).
    #[arg(long, requires = "image", value_parser = cora_api::size::parse_size)]
    file_window: Option<u64>,
    /// Fetch the rest of the stack in the background: off, idle (one request at a time while
    /// nothing else is fetched), paced (as many requests as the link carries before a queue
    /// builds up) or always (a fixed number of requests beside everything else) (default off).
    #[arg(long, requires = "image", value_name = "off|idle|paced|always")]
    fill: Option<cora_api::driver::Fill>,
    /// Platform picked from a multi-platform image: os/arch[/variant] (default: this host's).
    #[arg(long, requires = "image", value_name = "PLATFORM")]
    platform: Option<lazy::blobfmt::platform::Platform>,
}

#[derive(Args)]
struct RunArgs {
    /// Return once the device is ready, leaving the server running in the background.
    #[arg(long)]
    daemon: bool,
    /// Report readiness as one JSON line (`cora_api::driver::Ready`: id, path, transport,
    /// pid) instead of the bare device path.
    #[arg(long)]
    ready_json: bool,
    /// With --daemon: append the server's log here (default: discarded).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Rewrite this JSON file with the source's counters (cache hits, bytes fetched, fetch
    /// latency histogram) every second while serving.
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
}

/// The one place where command-line source arguments become a recipe (stored with the device
/// so `recover` can rebuild the source with `SourceRecipe::open`).
fn recipe(args: &SourceArgs) -> Result<SourceRecipe> {
    if let Some(image) = &args.image {
        // Paths are made absolute: recover may run from another directory.
        let image = match image
            .parse::<lazy::imageref::ImageRef>()
            .map_err(anyhow::Error::msg)?
        {
            lazy::imageref::ImageRef::Layout { path, tag } => {
                let path = std::fs::canonicalize(&path)
                    .with_context(|| format!("image layout {}", path.display()))?;
                lazy::imageref::ImageRef::Layout { path, tag }.to_string()
            }
            other => other.to_string(),
        };
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        return Ok(SourceRecipe::Image {
            image,
            layer: args.layer,
            layer_digest: args.layer_digest.clone(),
            cache: abs(&args.cache),
            cache_size: args.cache_size,
            registry: lazy::remote::RegistryAccess {
                creds_file: args.creds.as_ref().map(abs),
                ca_files: args.ca.iter().map(abs).collect(),
                insecure_hosts: args.insecure.clone(),
                mirrors: args
                    .mirror
                    .iter()
                    .map(|m| lazy::registry::Mirror::parse(m))
                    .collect(),
            },
            trace: TraceOptions {
                record: args.record_trace.as_ref().map(abs),
                no_prefetch: args.no_prefetch,
            },
            fetch: lazy::device::FetchTuning {
                readahead: args.readahead,
                miss_window: args.miss_window,
                file_window: args.file_window,
                fill: args.fill,
            },
            platform: args.platform.as_ref().map(ToString::to_string),
        });
    }
    let file = args
        .file
        .as_ref()
        .context("--file or --image is required")?;
    let path =
        std::fs::canonicalize(file).with_context(|| format!("image file {}", file.display()))?;
    Ok(SourceRecipe::File { path })
}

fn main() {
    cora_api::restore_sigpipe();
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Add(args) => add(*args),
        Cmd::Recover { id, run, fuse_dir } if id >= FUSE_ID_BASE => {
            recover_fuse(id, run, &fuse_dir)
        }
        Cmd::Recover { id, run, .. } => recover(id, run),
        Cmd::FuseKeeper {
            id,
            server_pid,
            fuse_dir,
            stats_file,
        } => {
            init_tracing();
            fuse_device::keep(
                block_stop_signals(),
                &fuse_dir,
                id,
                server_pid,
                stats_file.as_deref(),
            )
        }
        Cmd::List { json, fuse_dir } => list(json, &fuse_dir),
        Cmd::Del { id, fuse_dir } if id >= FUSE_ID_BASE => {
            init_tracing();
            fuse_device::delete(&fuse_dir, id, std::time::Duration::from_secs(30))
        }
        Cmd::Del { id, .. } => {
            init_tracing();
            ublk::delete(id).with_context(|| format!("deleting device {id}"))
        }
        Cmd::Unpack(args) => unpack(*args),
        Cmd::Features => {
            let f = ublk::kernel_features();
            println!("0x{f:x} {}", ublk::flag_names(f).join(" "));
            println!(
                "data mode: {}",
                ublk::DataMode::best(f, ublk::DataMode::AutoBufReg)
            );
            Ok(())
        }
    };
    if let Err(e) = res {
        eprintln!("cora-driver: {e:#}");
        std::process::exit(1);
    }
}

fn unpack(args: UnpackArgs) -> Result<()> {
    init_tracing();
    let SourceRecipe::Image {
        image,
        layer,
        layer_digest,
        registry,
        platform,
        ..
    } = recipe(&args.source)?
    else {
        bail!("unpack needs --image");
    };
    if let Some(p) = &platform {
        lazy::device::use_platform(p)?;
    }
    if layer.is_some() {
        bail!("unpack takes the top layer by --layer-digest");
    }
    let image: lazy::imageref::ImageRef = image.parse().map_err(anyhow::Error::msg)?;
    let done = lazy::unpack::unpack_stack(&image, layer_digest.as_deref(), &registry, &args.into)
        .with_context(|| format!("unpacking {image} into {}", args.into.display()))?;
    println!("{}", serde_json::to_string(&done)?);
    Ok(())
}

fn init_tracing() {
    cora_api::logging::init_default("warn");
}

fn list(json: bool, fuse_dir: &std::path::Path) -> Result<()> {
    // A kernel without ublk has no ublk devices, which is no reason to fail the listing.
    let ublk_devs = match std::path::Path::new("/sys/class/ublk-char").exists() {
        true => ublk::list()?,
        false => Vec::new(),
    };
    let mut devs: Vec<DeviceInfo> = ublk_devs.into_iter().map(device_info).collect();
    devs.extend(fuse_device::list(fuse_dir));
    if json {
        println!("{}", serde_json::to_string_pretty(&devs)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<9} {:>8} {:>14} {:>3} {:>5}  {:<6} {:<4} {:<12} FLAGS / SOURCE",
        "ID", "STATE", "PID", "SIZE", "Q", "DEPTH", "TARGET", "VIA", "MODE"
    );
    for d in devs {
        println!(
            "{:<4} {:<9} {:>8} {:>14} {:>3} {:>5}  {:<6} {:<4} {:<12} {}{} {}",
            d.id,
            d.state,
            d.pid,
            d.size,
            d.queues,
            d.depth,
            d.target.as_deref().unwrap_or("-"),
            d.transport,
            d.data_mode.as_deref().unwrap_or("-"),
            if d.read_only { "RO " } else { "" },
            d.flag_names.join(","),
            d.recipe.map(|r| r.to_string()).unwrap_or_default()
        );
    }
    Ok(())
}

/// A device as `list --json` describes it: the kernel's view plus what our recipe says it
/// serves (absent for other servers' devices and recipes this build cannot read).
fn device_info(d: ublk::DeviceStatus) -> DeviceInfo {
    let recipe = d
        .target_data
        .as_ref()
        .and_then(|t| t.get(ublk::TARGET_NAME))
        .and_then(|t| t.get("recipe"))
        .cloned();
    let (image, layer_digest) = match recipe.as_ref().map(SourceRecipe::from_json) {
        Some(Ok(SourceRecipe::Image {
            image,
            layer_digest,
            ..
        })) => (Some(image), layer_digest),
        _ => (None, None),
    };
    DeviceInfo {
        id: d.id,
        state: d.state.into(),
        pid: d.pid,
        keeper_pid: None,
        transport: TRANSPORT_UBLK.into(),
        path: d.bdev.into(),
        size: d.size,
        read_only: d.read_only,
        queues: d.queues,
        depth: d.depth,
        max_io_bytes: d.max_io_bytes,
        flags: d.flags,
        flag_names: d.flag_names.iter().map(|n| (*n).to_owned()).collect(),
        // Other servers' flags do not follow our modes (rublk's zero copy lacks USER_COPY).
        data_mode: (d.target.as_deref() == Some(ublk::TARGET_NAME))
            .then(|| ublk::DataMode::of_flags(d.flags).to_string()),
        target: d.target,
        image,
        layer_digest,
        recipe,
    }
}

/// Reports readiness (or failure) to whoever started us: stdout in the foreground, the
/// parent's pipe with --daemon (`ok <Ready as JSON>` or `err <message>`, one line; the parent
/// prints it as asked).
#[derive(Clone)]
struct Notifier {
    pipe: Arc<Mutex<Option<File>>>,
    json: bool,
}

impl Notifier {
    fn new(pipe: Option<File>, json: bool) -> Notifier {
        Notifier {
            pipe: Arc::new(Mutex::new(pipe)),
            json,
        }
    }

    fn ready(&self, r: &Ready) -> Result<()> {
        let line = r.to_line()?;
        match self.pipe.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(mut p) => writeln!(p, "ok {line}").context("reporting readiness")?,
            None => print_ready(r, &line, self.json)?,
        }
        Ok(())
    }

    fn failed(&self, e: &anyhow::Error) {
        if let Some(mut p) = self.pipe.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writeln!(p, "err {e:#}");
        }
    }
}

/// With --daemon, forks: the parent waits for the child's ready line, prints it and exits;
/// the child continues detached. Must run before any thread is started.
fn start(run: &RunArgs, isolate: bool) -> Result<Notifier> {
    if !run.daemon {
        init_tracing();
        if isolate {
            isolate_mounts();
        }
        return Ok(Notifier::new(None, run.ready_json));
    }
    let log = match &run.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("log file {}", p.display()))?,
        ),
        None => None,
    };
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both descriptors are fresh and owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded at this point (no runtime or queue thread started yet).
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(rd);
            // SAFETY: plain syscalls on descriptors we own; failures leave the defaults.
            unsafe {
                libc::setsid();
                // A server reports readiness into a pipe whose reader may be gone (killed on a
                // timeout): that must be an error it handles by removing the device, not a
                // SIGPIPE that kills it and leaves a device nobody knows about.
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                libc::dup2(null, 0);
                libc::dup2(null, 1);
                match &log {
                    Some(f) => libc::dup2(std::os::fd::AsRawFd::as_raw_fd(f), 2),
                    None => libc::dup2(null, 2),
                };
                libc::close(null);
            }
            drop(log);
            init_tracing();
            if isolate {
                isolate_mounts();
            }
            Ok(Notifier::new(Some(File::from(wr)), run.ready_json))
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            File::from(rd).read_to_string(&mut msg)?;
            let line = msg.lines().next().unwrap_or("");
            if let Some(json) = line.strip_prefix("ok ") {
                let r = Ready::from_output(json)?;
                print_ready(&r, json, run.ready_json)?;
                std::process::exit(0);
            }
            match line.strip_prefix("err ") {
                Some(e) => bail!("{e}"),
                None => bail!("the device server exited before the device was ready"),
            }
        }
    }
}

/// Prints the ready message: the JSON `line` for programs, the bare path for people
/// (`mount "$(cora-driver add ... --daemon)" DIR`).
fn print_ready(r: &Ready, line: &str, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{}", r.path.display())?;
    }
    out.flush().context("printing the ready message")
}

/// The server must not share a mount namespace with mounts of its own device: when it exits,
/// tearing such a mount down would wait for I/O only it could serve (libublk-rs#50). A private
/// namespace keeps mounts made elsewhere from propagating into ours.
fn isolate_mounts() {
    if let Err(e) = cora_api::private_mount_namespace() {
        tracing::warn!(
            "could not enter a private mount namespace ({e}); do not mount the device in this \
             server's namespace"
        );
    }
}

/// The ready message for a served ublk device, once its node exists: devtmpfs creates it
/// during START_DEV, so a missing node means whoever started us could not mount the path.
fn ready_message(r: &ublk::Ready) -> Result<Ready> {
    use std::os::unix::fs::FileTypeExt;
    let path = PathBuf::from(&r.bdev);
    let meta = std::fs::metadata(&path).with_context(|| {
        format!(
            "device {} is served but its node {} is missing (is /dev a devtmpfs?)",
            r.id,
            path.display()
        )
    })?;
    if !meta.file_type().is_block_device() {
        bail!("{} is not a block device", path.display());
    }
    Ok(Ready {
        id: r.id,
        path,
        transport: TRANSPORT_UBLK.into(),
        pid: std::process::id() as i32,
    })
}

/// What the transport's ready callback does: report the device, or, when it cannot be
/// reported, stop it (so serving ends) and leave the error for the caller to return.
fn on_ready(n: &Notifier, failed: &Mutex<Option<anyhow::Error>>, r: &ublk::Ready) {
    if let Err(e) = ready_message(r).and_then(|m| n.ready(&m)) {
        tracing::error!(id = r.id, "{e:#}; stopping the device");
        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        if let Err(s) = ublk::stop(r.id) {
            tracing::error!(id = r.id, "stopping the device: {s}");
        }
    }
}

/// The error `on_ready` left, if any.
fn take_failed(failed: &Mutex<Option<anyhow::Error>>) -> Result<()> {
    match failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts later), for one thread
/// to take them with `sigwait` on the returned set.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, then masking signals for this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// SIGINT/SIGTERM stop the device (and so the server). Signals are blocked in every thread
/// and taken by one waiter, which needs the device id once known.
struct StopOnSignal {
    id: Arc<AtomicU32>,
    requested: Arc<AtomicBool>,
}

impl StopOnSignal {
    fn install() -> Result<Self> {
        let set = block_stop_signals();
        let id = Arc::new(AtomicU32::new(u32::MAX));
        let requested = Arc::new(AtomicBool::new(false));
        let (w_id, w_req) = (id.clone(), requested.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: waits on a set initialised above.
                unsafe { libc::sigwait(&set, &mut sig) };
                w_req.store(true, Ordering::SeqCst);
                let id = w_id.load(Ordering::SeqCst);
                if id == u32::MAX {
                    std::process::exit(1);
                }
                tracing::info!(id, sig, "stopping device");
                if let Err(e) = ublk::stop(id) {
                    tracing::error!(id, "stopping device: {e}");
                    std::process::exit(1);
                }
            })
            .context("starting the signal thread")?;
        Ok(StopOnSignal { id, requested })
    }
}

/// Writes the source's counters to a file every second (atomically: temp file + rename), and a
/// last time when dropped, so a reader (the snapshotter's metrics) never sees a torn file.
/// Dropping it also ends its thread, which holds the source: the source's own drop (which
/// writes a recorded trace the last time) must not wait for a thread that never ends.
struct StatsWriter {
    path: Option<PathBuf>,
    source: Arc<dyn cora_read::BlockSource>,
    ublk: Option<Arc<ublk::IoCounters>>,
    /// The writer thread and the sender whose drop ends it (none without a path).
    thread: Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
}

impl StatsWriter {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    /// Writes the source's stats to `path` every second, with the ublk server's request
    /// counters under "ublk" when given.
    fn start(
        path: Option<PathBuf>,
        source: Arc<dyn cora_read::BlockSource>,
        ublk: Option<Arc<ublk::IoCounters>>,
    ) -> std::io::Result<Self> {
        let mut w = StatsWriter {
            path,
            source,
            ublk,
            thread: None,
        };
        if let Some(p) = &w.path {
            let (p, src, counters) = (p.clone(), w.source.clone(), w.ublk.clone());
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("stats".into())
                .spawn(move || {
                    loop {
                        if let Err(e) = write_stats(&p, src.as_ref(), counters.as_deref()) {
                            tracing::warn!(path = %p.display(), "writing stats: {e}");
                        }
                        if rx.recv_timeout(Self::INTERVAL)
                            != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                        {
                            return;
                        }
                    }
                })?;
            w.thread = Some((tx, thread));
        }
        Ok(w)
    }
}

impl Drop for StatsWriter {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.thread.take() {
            drop(stop);
            let _ = thread.join();
        }
        if let Some(p) = &self.path {
            let _ = write_stats(p, self.source.as_ref(), self.ublk.as_deref());
        }
    }
}

fn write_stats(
    path: &std::path::Path,
    source: &dyn cora_read::BlockSource,
    ublk: Option<&ublk::IoCounters>,
) -> std::io::Result<()> {
    let mut v = source.stats();
    if let Some(c) = ublk {
        let obj = v.get_or_insert_with(|| serde_json::json!({}));
        if let Some(map) = obj.as_object_mut() {
            map.insert("ublk".into(), c.to_json());
        }
    }
    let Some(v) = v else {
        return Ok(());
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(&tmp, path)
}

fn add(args: AddArgs) -> Result<()> {
    let transport = resolve_transport(args.transport);
    // A FUSE mount must be made where its users are: only ublk servers get a namespace of
    // their own (see isolate_mounts).
    let notifier = start(&args.run, transport == Transport::Ublk)?;
    // Before opening the source starts any thread: a thread that does not block SIGTERM would
    // take it with the default action (exit) instead of the stopping thread.
    let stop_set = block_stop_signals();
    let res = (|| {
        let recipe = recipe(&args.source)?;
        let source = recipe
            .open()
            .with_context(|| format!("opening the source {recipe:?}"))?;
        if transport == Transport::Fuse {
            let stats = StatsWriter::start(args.run.stats_file.clone(), source.clone(), None)?;
            let n = notifier.clone();
            fuse_device::serve(
                stop_set,
                &args.fuse_dir,
                &recipe,
                source,
                args.run.stats_file.as_deref(),
                move |r| n.ready(r),
            )?;
            drop(stats);
            return Ok(());
        }
        let stop = StopOnSignal::install()?;
        let counters = Arc::new(ublk::IoCounters::default());
        let stats = StatsWriter::start(
            args.run.stats_file.clone(),
            source.clone(),
            Some(counters.clone()),
        )?;
        let opts = DeviceOptions {
            id: args.id,
            queues: args.queues,
            depth: args.depth,
            max_io_bytes: args.max_io,
            mode: args.data_mode,
            lend: !args.no_lend,
            counters,
        };
        let (n, stop_id) = (notifier.clone(), stop.id.clone());
        let failed = Arc::new(Mutex::new(None));
        let f = failed.clone();
        ublk::add(&opts, recipe.to_json(), source, move |r| {
            stop_id.store(r.id, Ordering::SeqCst);
            on_ready(&n, &f, r)
        })
        .context("serving the device")?;
        drop(stats);
        take_failed(&failed)
    })();
    if let Err(e) = &res {
        notifier.failed(e);
    }
    res
}

/// Serves a FUSE device again from the connection its keeper passes as descriptor 3.
fn recover_fuse(id: u32, run: RunArgs, fuse_dir: &std::path::Path) -> Result<()> {
    let conn = fuse_device::take_connection().with_context(|| {
        format!(
            "FUSE device {id} is recovered by its keeper (`cora-driver fuse-keeper`), which \
             passes the connection as descriptor {}",
            fuse_device::CONNECTION_FD
        )
    })?;
    let notifier = start(&run, false)?;
    let stop_set = block_stop_signals();
    let mut stats = None;
    let res = fuse_device::resume(
        stop_set,
        fuse_dir,
        id,
        conn,
        |v| {
            let source = SourceRecipe::from_json(v)?.open()?;
            stats = Some(StatsWriter::start(
                run.stats_file.clone(),
                source.clone(),
                None,
            )?);
            Ok(source)
        },
        |r| notifier.ready(r),
    );
    drop(stats);
    if let Err(e) = &res {
        notifier.failed(e);
    }
    res
}

fn recover(id: u32, run: RunArgs) -> Result<()> {
    let notifier = start(&run, true)?;
    let res = (|| {
        let stop = StopOnSignal::install()?;
        stop.id.store(id, Ordering::SeqCst);
        let n = notifier.clone();
        let stats_file = run.stats_file.clone();
        let mut stats = None;
        let failed = Arc::new(Mutex::new(None));
        let f = failed.clone();
        let counters = Arc::new(ublk::IoCounters::default());
        let c = counters.clone();
        ublk::recover(
            id,
            |v| {
                let source = SourceRecipe::from_json(v)?.open()?;
                stats = Some(StatsWriter::start(stats_file, source.clone(), Some(c))?);
                Ok(source)
            },
            counters,
            move |r| on_ready(&n, &f, r),
        )
        .with_context(|| format!("recovering device {id}"))?;
        drop(stats);
        take_failed(&failed)?;
        // A recovering server does not own the device's deletion, except when told to stop.
        if stop.requested.load(Ordering::SeqCst) {
            let _ = ublk::delete(id);
        }
        Ok(())
    })();
    if let Err(e) = &res {
        notifier.failed(e);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use cora_api::driver as api;
    use std::path::Path;

    fn parse(args: Vec<String>) -> Cmd {
        let argv = std::iter::once("cora-driver".to_owned()).chain(args.iter().cloned());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.cmd,
            Err(e) => panic!("{args:?} does not parse: {e}"),
        }
    }

    // Building the contract's structs back from what clap parsed names every field, so a
    // field added there fails to compile here until the daemon takes it.
    fn registry_of(s: &SourceArgs) -> api::RegistryArgs {
        api::RegistryArgs {
            creds_file: s.creds.clone(),
            insecure_hosts: s.insecure.clone(),
            mirrors: s
                .mirror
                .iter()
                .map(|m| {
                    let m = lazy::registry::Mirror::parse(m);
                    api::Mirror {
                        host: m.host,
                        insecure: m.insecure,
                    }
                })
                .collect(),
            ca_files: s.ca.clone(),
        }
    }

    fn run_of(r: &RunArgs) -> api::RunArgs {
        api::RunArgs {
            daemon: r.daemon,
            ready_json: r.ready_json,
            log: r.log.clone(),
            stats_file: r.stats_file.clone(),
        }
    }

    fn registry() -> api::RegistryArgs {
        api::RegistryArgs {
            creds_file: Some("/etc/cora/cred.json".into()),
            insecure_hosts: vec!["127.0.0.1:5000".into(), "r:1".into()],
            mirrors: vec![
                api::Mirror {
                    host: "m:1".into(),
                    insecure: true,
                },
                api::Mirror {
                    host: "m:2".into(),
                    insecure: false,
                },
            ],
            ca_files: vec!["/ca1.pem".into(), "/ca 2.pem".into()],
        }
    }

    #[test]
    fn the_contracts_add_arguments_parse_into_every_field() {
        let want = api::AddArgs {
            image: "127.0.0.1:5000/app@sha256:1".into(),
            layer_digest: Some("sha256:2".into()),
            cache_dir: "/var/lib/cora/cache".into(),
            cache_size: 3 << 30,
            queues: 2,
            transport: api::Transport::Fuse,
            fuse_dir: Some("/r/fuse".into()),
            registry: registry(),
            fetch: api::FetchArgs {
                miss_window: Some(256 << 10),
                file_window: Some(8 << 20),
                fill: Some(api::Fill::Idle),
            },
            run: api::RunArgs::background(Some("/r/h.log".into()), Some("/r/h.stats.json".into())),
        };
        let Cmd::Add(a) = parse(want.to_args()) else {
            panic!("not add")
        };
        let got = api::AddArgs {
            image: a.source.image.clone().unwrap_or_default(),
            layer_digest: a.source.layer_digest.clone(),
            cache_dir: a.source.cache.clone(),
            cache_size: a.source.cache_size,
            queues: a.queues,
            transport: a.transport,
            fuse_dir: Some(a.fuse_dir.clone()),
            registry: registry_of(&a.source),
            fetch: api::FetchArgs {
                miss_window: a.source.miss_window,
                file_window: a.source.file_window,
                fill: a.source.fill,
            },
            run: run_of(&a.run),
        };
        assert_eq!(got, want);
        // And what the contract leaves out keeps the daemon's defaults.
        assert_eq!(
            (a.source.file.as_ref(), a.source.layer, a.id),
            (None, None, None)
        );

        let bare = api::AddArgs {
            layer_digest: None,
            transport: api::Transport::Auto,
            fuse_dir: None,
            registry: api::RegistryArgs::default(),
            fetch: api::FetchArgs::default(),
            run: api::RunArgs::default(),
            ..want
        };
        let Cmd::Add(a) = parse(bare.to_args()) else {
            panic!("not add")
        };
        assert_eq!(a.source.layer_digest, None);
        assert_eq!(a.transport, Transport::Auto);
        assert_eq!(a.fuse_dir, Path::new(fuse_device::DEFAULT_DIR));
        assert_eq!(registry_of(&a.source), api::RegistryArgs::default());
        assert_eq!(run_of(&a.run), api::RunArgs::default());
        assert_eq!(
            (a.source.miss_window, a.source.file_window, a.source.fill),
            (None, None, None)
        );
    }

    #[test]
    fn the_contracts_other_commands_parse() {
        let want = api::RecoverArgs {
            id: 7,
            run: api::RunArgs::background(Some("/l".into()), Some("/s".into())),
        };
        let Cmd::Recover { id, run, .. } = parse(want.to_args()) else {
            panic!("not recover")
        };
        assert_eq!(
            api::RecoverArgs {
                id,
                run: run_of(&run)
            },
            want
        );

        let want = api::UnpackArgs {
            image: "h/app@sha256:1".into(),
            layer_digest: Some("sha256:2".into()),
            into: "/r/h.tree".into(),
            registry: registry(),
        };
        let Cmd::Unpack(u) = parse(want.to_args()) else {
            panic!("not unpack")
        };
        let got = api::UnpackArgs {
            image: u.source.image.clone().unwrap_or_default(),
            layer_digest: u.source.layer_digest.clone(),
            into: u.into.clone(),
            registry: registry_of(&u.source),
        };
        assert_eq!(got, want);

        let fuse_dir = Path::new("/r/fuse");
        let Cmd::Del { id, fuse_dir: d } = parse(api::del_args(3, Some(fuse_dir))) else {
            panic!("not del")
        };
        assert_eq!((id, d.as_path()), (3, fuse_dir));
        let Cmd::Del { fuse_dir: d, .. } = parse(api::del_args(3, None)) else {
            panic!("not del")
        };
        assert_eq!(d, Path::new(fuse_device::DEFAULT_DIR));
        let Cmd::List { json, fuse_dir: d } = parse(api::list_json_args(Some(fuse_dir))) else {
            panic!("not list")
        };
        assert_eq!((json, d.as_path()), (true, fuse_dir));
        assert!(matches!(
            parse(api::list_json_args(None)),
            Cmd::List { json: true, .. }
        ));
    }

    #[test]
    fn ready_needs_the_block_device_node() {
        let r = |bdev: &str| ublk::Ready {
            id: 9,
            bdev: bdev.into(),
            flags: 0,
        };
        let e = ready_message(&r("/dev/ublkb-none")).unwrap_err();
        assert!(format!("{e:#}").contains("is missing"), "{e:#}");
        assert!(
            ready_message(&r("/dev/null")).is_err(),
            "not a block device"
        );
        if let Some(b) = std::fs::read_dir("/dev")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
            })
        {
            let m = ready_message(&r(&b.display().to_string())).unwrap();
            assert_eq!((m.id, m.path.as_path()), (9, b.as_path()));
            assert_eq!(m.transport, TRANSPORT_UBLK);
            assert_eq!(m.pid, std::process::id() as i32);
        }
    }

    #[test]
    fn device_info_reads_our_recipe() {
        let recipe = SourceRecipe::Image {
            image: "h/app@sha256:1".into(),
            layer: None,
            layer_digest: Some("sha256:2".into()),
            cache: "/c".into(),
            cache_size: 1,
            registry: Default::default(),
            trace: Default::default(),
            fetch: Default::default(),
            platform: None,
        };
        let status = |target_data| ublk::DeviceStatus {
            id: 4,
            state: "QUIESCED".into(),
            pid: -1,
            size: 8192,
            queues: 2,
            depth: 128,
            max_io_bytes: 1 << 20,
            flags: 0,
            flag_names: vec!["USER_RECOVERY"],
            read_only: true,
            bdev: "/dev/ublkb4".into(),
            target: Some("cora".into()),
            target_data,
        };
        let d = device_info(status(Some(serde_json::json!({
            ublk::TARGET_NAME: { "recipe": recipe.to_json(), "size": 8192 }
        }))));
        assert_eq!(d.state, api::DeviceState::Quiesced);
        assert_eq!(d.path, Path::new("/dev/ublkb4"));
        assert_eq!(d.image.as_deref(), Some("h/app@sha256:1"));
        assert_eq!(d.layer_digest.as_deref(), Some("sha256:2"));
        assert_eq!(
            d.recipe.as_ref().and_then(|r| r.get("kind")),
            Some(&"image".into())
        );
        assert_eq!(d.flag_names, ["USER_RECOVERY"]);
        assert_eq!(d.data_mode.as_deref(), Some("buffered"));
        // Another server's device: listed, with nothing of ours.
        let other = device_info(status(Some(serde_json::json!({ "loop": {} }))));
        assert_eq!(
            (other.image, other.layer_digest, other.recipe),
            (None, None, None)
        );
    }
}
