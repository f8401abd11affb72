//! `cora-driver`: the device process. Serves one layer stack of a CORA image (or a plain image
//! file) read-only through a kernel transport; one process per device.
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use lazy::device::{SourceRecipe, TraceOptions};
use ublk::{DeviceOptions, Ready};

#[derive(Parser)]
#[command(name = "cora-driver", about = "CORA ublk block server", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a read-only device and serve it; prints /dev/ublkbN once it is ready.
    Add(Box<AddArgs>),
    /// List ublk devices.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete a device.
    Del { id: u32 },
    /// Serve again a device whose server died (UBLK_F_USER_RECOVERY), from what `add` recorded.
    Recover {
        id: u32,
        #[command(flatten)]
        run: RunArgs,
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

#[derive(Args)]
struct AddArgs {
    #[command(flatten)]
    source: SourceArgs,
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
    /// Do not use UBLK_F_USER_COPY even if the kernel offers it.
    #[arg(long)]
    no_user_copy: bool,
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
}

#[derive(Args)]
struct RunArgs {
    /// Return once the device is ready, leaving the server running in the background.
    #[arg(long)]
    daemon: bool,
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
            readahead: args.readahead,
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
        Cmd::Recover { id, run } => recover(id, run),
        Cmd::List { json } => list(json),
        Cmd::Del { id } => {
            init_tracing();
            ublk::delete(id).with_context(|| format!("deleting device {id}"))
        }
        Cmd::Unpack(args) => unpack(*args),
        Cmd::Features => {
            let f = ublk::kernel_features();
            println!("0x{f:x} {}", ublk::flag_names(f).join(" "));
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
        ..
    } = recipe(&args.source)?
    else {
        bail!("unpack needs --image");
    };
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

fn list(json: bool) -> Result<()> {
    let devs = ublk::list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&devs)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<9} {:>8} {:>14} {:>3} {:>5}  {:<6} FLAGS / SOURCE",
        "ID", "STATE", "PID", "SIZE", "Q", "DEPTH", "TARGET"
    );
    for d in devs {
        let source = d
            .target_data
            .as_ref()
            .and_then(|t| t.get(ublk::TARGET_NAME))
            .and_then(|t| t.get("recipe"))
            .map(|r| r.to_string())
            .unwrap_or_default();
        println!(
            "{:<4} {:<9} {:>8} {:>14} {:>3} {:>5}  {:<6} {}{} {}",
            d.id,
            d.state,
            d.pid,
            d.size,
            d.queues,
            d.depth,
            d.target.as_deref().unwrap_or("-"),
            if d.read_only { "RO " } else { "" },
            d.flag_names.join(","),
            source
        );
    }
    Ok(())
}

/// Reports readiness (or failure) to whoever started us: stdout in the foreground, the
/// parent's pipe with --daemon.
#[derive(Clone)]
struct Notifier {
    pipe: Arc<Mutex<Option<File>>>,
}

impl Notifier {
    fn ready(&self, r: &Ready) {
        match self.pipe.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(mut p) => {
                let _ = writeln!(p, "ok {}", r.bdev);
            }
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", r.bdev);
                let _ = out.flush();
            }
        }
    }

    fn failed(&self, e: &anyhow::Error) {
        if let Some(mut p) = self.pipe.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = writeln!(p, "err {e:#}");
        }
    }
}

/// With --daemon, forks: the parent waits for the child's ready line, prints it and exits;
/// the child continues detached. Must run before any thread is started.
fn start(run: &RunArgs) -> Result<Notifier> {
    if !run.daemon {
        init_tracing();
        isolate_mounts();
        return Ok(Notifier {
            pipe: Arc::new(Mutex::new(None)),
        });
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
            isolate_mounts();
            Ok(Notifier {
                pipe: Arc::new(Mutex::new(Some(File::from(wr)))),
            })
        }
        _child => {
            drop(wr);
            let mut msg = String::new();
            File::from(rd).read_to_string(&mut msg)?;
            match msg.lines().next() {
                Some(l) if l.starts_with("ok ") => {
                    println!("{}", &l[3..]);
                    std::process::exit(0);
                }
                Some(l) if l.starts_with("err ") => bail!("{}", &l[4..]),
                _ => bail!("the device server exited before the device was ready"),
            }
        }
    }
}

/// The server must not share a mount namespace with mounts of its own device: when it exits,
/// tearing such a mount down would wait for I/O only it could serve (libublk-rs#50). A private
/// namespace keeps mounts made elsewhere from propagating into ours.
fn isolate_mounts() {
    // SAFETY: plain syscalls with static, NUL-terminated arguments.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !ok {
        tracing::warn!(
            "could not enter a private mount namespace ({}); do not mount the device in this \
             server's namespace",
            std::io::Error::last_os_error()
        );
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
        // SAFETY: sigset manipulation on a local, then masking signals for this thread (and
        // the threads it starts later).
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
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
struct StatsWriter {
    path: Option<PathBuf>,
    source: Arc<dyn cora_read::BlockSource>,
}

impl StatsWriter {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    fn start(
        path: Option<PathBuf>,
        source: Arc<dyn cora_read::BlockSource>,
    ) -> std::io::Result<Self> {
        if let Some(p) = &path {
            let (p, src) = (p.clone(), source.clone());
            std::thread::Builder::new()
                .name("stats".into())
                .spawn(move || {
                    loop {
                        if let Err(e) = write_stats(&p, src.as_ref()) {
                            tracing::warn!(path = %p.display(), "writing stats: {e}");
                        }
                        std::thread::sleep(Self::INTERVAL);
                    }
                })?;
        }
        Ok(StatsWriter { path, source })
    }
}

impl Drop for StatsWriter {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = write_stats(p, self.source.as_ref());
        }
    }
}

fn write_stats(path: &std::path::Path, source: &dyn cora_read::BlockSource) -> std::io::Result<()> {
    let Some(v) = source.stats() else {
        return Ok(());
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, v.to_string())?;
    std::fs::rename(&tmp, path)
}

fn add(args: AddArgs) -> Result<()> {
    let notifier = start(&args.run)?;
    let res = (|| {
        let recipe = recipe(&args.source)?;
        let source = recipe
            .open()
            .with_context(|| format!("opening the source {recipe:?}"))?;
        let stop = StopOnSignal::install()?;
        let stats = StatsWriter::start(args.run.stats_file.clone(), source.clone())?;
        let opts = DeviceOptions {
            id: args.id,
            queues: args.queues,
            depth: args.depth,
            max_io_bytes: args.max_io,
            user_copy: !args.no_user_copy,
            lend: !args.no_lend,
        };
        let (n, stop_id) = (notifier.clone(), stop.id.clone());
        ublk::add(&opts, recipe.to_json(), source, move |r| {
            stop_id.store(r.id, Ordering::SeqCst);
            n.ready(r)
        })
        .context("serving the device")?;
        drop(stats);
        Ok(())
    })();
    if let Err(e) = &res {
        notifier.failed(e);
    }
    res
}

fn recover(id: u32, run: RunArgs) -> Result<()> {
    let notifier = start(&run)?;
    let res = (|| {
        let stop = StopOnSignal::install()?;
        stop.id.store(id, Ordering::SeqCst);
        let n = notifier.clone();
        let stats_file = run.stats_file.clone();
        let mut stats = None;
        ublk::recover(
            id,
            |v| {
                let source = SourceRecipe::from_json(v)?.open()?;
                stats = Some(StatsWriter::start(stats_file, source.clone())?);
                Ok(source)
            },
            move |r| n.ready(r),
        )
        .with_context(|| format!("recovering device {id}"))?;
        drop(stats);
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
