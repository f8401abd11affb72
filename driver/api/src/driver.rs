//! The contract between `cora-driver` and the programs that start it (the snapshotter): the
//! command lines they build, the ready message the driver prints, its stats file and its
//! device list.
//!
//! The driver's clap definitions stay in the daemon; its tests parse what the `to_args`
//! functions here build, so the two cannot drift. Everything the driver prints for programs
//! is JSON of a type defined here.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The transport of ublk devices (`/dev/ublkbN`), as named in [`Ready`] and [`DeviceInfo`].
pub const TRANSPORT_UBLK: &str = "ublk";
/// The FUSE transport: one read-only image file on a FUSE mount.
pub const TRANSPORT_FUSE: &str = "fuse";

/// Which kernel interface serves a device (`add --transport`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// ublk where `/dev/ublk-control` can be opened, else FUSE (the driver decides).
    #[default]
    Auto,
    /// A block device `/dev/ublkbN`.
    Ublk,
    /// A read-only image file on a FUSE mount made by the driver in its mount namespace.
    Fuse,
}

impl Transport {
    /// The name on the command line, in configs and in [`Ready::transport`] /
    /// [`DeviceInfo::transport`] (for `Ublk` and `Fuse`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Ublk => TRANSPORT_UBLK,
            Transport::Fuse => TRANSPORT_FUSE,
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transport name that is none of `auto`, `ublk`, `fuse`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?}; expected \"auto\", \"ublk\" or \"fuse\"")]
pub struct UnknownTransport(pub String);

impl std::str::FromStr for Transport {
    type Err = UnknownTransport;

    fn from_str(s: &str) -> Result<Transport, UnknownTransport> {
        match s {
            "auto" => Ok(Transport::Auto),
            TRANSPORT_UBLK => Ok(Transport::Ublk),
            TRANSPORT_FUSE => Ok(Transport::Fuse),
            other => Err(UnknownTransport(other.to_owned())),
        }
    }
}

/// A registry mirror tried before the image's own registry (`--mirror HOST[,insecure]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`.
    pub host: String,
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
}

impl Mirror {
    /// The value of `--mirror`.
    pub fn to_arg(&self) -> String {
        if self.insecure {
            format!("{},insecure", self.host)
        } else {
            self.host.clone()
        }
    }
}

/// How the driver reaches registries, for `add` and `unpack` alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryArgs {
    /// `--creds`: docker-config JSON with credentials.
    pub creds_file: Option<PathBuf>,
    /// `--insecure`: hosts reached over plain HTTP.
    pub insecure_hosts: Vec<String>,
    /// `--mirror`, in the order they are tried.
    pub mirrors: Vec<Mirror>,
    /// `--ca`: extra CA certificates (PEM).
    pub ca_files: Vec<PathBuf>,
}

impl RegistryArgs {
    fn push_args(&self, a: &mut Vec<String>) {
        if let Some(c) = &self.creds_file {
            a.extend(["--creds".into(), path_arg(c)]);
        }
        for h in &self.insecure_hosts {
            a.extend(["--insecure".into(), h.clone()]);
        }
        for m in &self.mirrors {
            a.extend(["--mirror".into(), m.to_arg()]);
        }
        for c in &self.ca_files {
            a.extend(["--ca".into(), path_arg(c)]);
        }
    }
}

/// How a serving driver (`add`, `recover`) runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunArgs {
    /// `--daemon`: return once the device is ready, the server staying in the background.
    pub daemon: bool,
    /// `--ready-json`: report readiness as one JSON [`Ready`] line instead of the bare path.
    pub ready_json: bool,
    /// `--log`: where the background server appends its log.
    pub log: Option<PathBuf>,
    /// `--stats-file`: rewritten with [`DriverStats`] every second while serving.
    pub stats_file: Option<PathBuf>,
}

impl RunArgs {
    /// In the background, reporting a [`Ready`] line: how programs start the driver.
    pub fn background(log: Option<PathBuf>, stats_file: Option<PathBuf>) -> RunArgs {
        RunArgs {
            daemon: true,
            ready_json: true,
            log,
            stats_file,
        }
    }

    fn push_args(&self, a: &mut Vec<String>) {
        if self.daemon {
            a.push("--daemon".into());
        }
        if self.ready_json {
            a.push("--ready-json".into());
        }
        if let Some(l) = &self.log {
            a.extend(["--log".into(), path_arg(l)]);
        }
        if let Some(s) = &self.stats_file {
            a.extend(["--stats-file".into(), path_arg(s)]);
        }
    }
}

/// Background fill of a lazily served stack: fetching the chunks nobody has read yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fill {
    /// Only what is read (and the windows and traces around it).
    Off,
    /// One small request at a time, only while nothing else is being fetched.
    Idle,
    /// Beside everything else, as many requests in flight as the link carries before a queue
    /// builds up (measured by their delay): demand reads wait behind little of it.
    Paced,
    /// Beside everything else, a fixed number of requests in flight (the trace prefetch's):
    /// the whole stack is local soonest, at the cost of queueing the start's reads behind it.
    Always,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown fill {0:?} (off, idle, paced, always)")]
pub struct UnknownFill(pub String);

impl Fill {
    pub fn as_str(self) -> &'static str {
        match self {
            Fill::Off => "off",
            Fill::Idle => "idle",
            Fill::Paced => "paced",
            Fill::Always => "always",
        }
    }
}

impl std::str::FromStr for Fill {
    type Err = UnknownFill;

    fn from_str(s: &str) -> Result<Fill, UnknownFill> {
        match s {
            "off" => Ok(Fill::Off),
            "idle" => Ok(Fill::Idle),
            "paced" => Ok(Fill::Paced),
            "always" => Ok(Fill::Always),
            other => Err(UnknownFill(other.to_owned())),
        }
    }
}

/// What a lazily served stack fetches beyond the bytes read; `None`: the driver's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchArgs {
    /// `--miss-window`: compressed bytes fetched after a missed chunk.
    pub miss_window: Option<u64>,
    /// `--file-window`: on a miss inside a file, fetch up to its end (compressed bytes).
    pub file_window: Option<u64>,
    /// `--fill`: fetch the rest of the stack in the background.
    pub fill: Option<Fill>,
}

impl FetchArgs {
    fn push_args(&self, a: &mut Vec<String>) {
        if let Some(w) = self.miss_window {
            a.extend(["--miss-window".into(), w.to_string()]);
        }
        if let Some(w) = self.file_window {
            a.extend(["--file-window".into(), w.to_string()]);
        }
        if let Some(f) = self.fill {
            a.extend(["--fill".into(), f.as_str().into()]);
        }
    }
}

/// `cora-driver add`: serve a layer stack of a CORA image as a new device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddArgs {
    /// `HOST[:PORT]/REPO[:TAG|@DIGEST]` or `oci:PATH[:TAG]`.
    pub image: String,
    /// Top layer of the stack by blob digest; `None`: the image's top layer.
    pub layer_digest: Option<String>,
    /// The chunk cache shared by all devices of the host.
    pub cache_dir: PathBuf,
    /// Cache size limit in bytes.
    pub cache_size: u64,
    /// ublk queues (one server thread each).
    pub queues: u16,
    /// `--transport`.
    pub transport: Transport,
    /// `--fuse-dir`: where FUSE devices are mounted and recorded; `None`: the driver's default.
    /// `list` and `del` must be given the same directory.
    pub fuse_dir: Option<PathBuf>,
    pub registry: RegistryArgs,
    pub fetch: FetchArgs,
    pub run: RunArgs,
}

impl AddArgs {
    /// The driver's argv after the program name.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["add".into(), "--image".into(), self.image.clone()];
        if let Some(d) = &self.layer_digest {
            a.extend(["--layer-digest".into(), d.clone()]);
        }
        a.extend([
            "--cache".into(),
            path_arg(&self.cache_dir),
            "--cache-size".into(),
            self.cache_size.to_string(),
            "--queues".into(),
            self.queues.to_string(),
            "--transport".into(),
            self.transport.as_str().into(),
        ]);
        push_fuse_dir(&mut a, self.fuse_dir.as_deref());
        self.registry.push_args(&mut a);
        self.fetch.push_args(&mut a);
        self.run.push_args(&mut a);
        a
    }
}

/// `cora-driver recover ID`: serve again a device whose server died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverArgs {
    pub id: u32,
    pub run: RunArgs,
}

impl RecoverArgs {
    /// The driver's argv after the program name.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["recover".into(), self.id.to_string()];
        self.run.push_args(&mut a);
        a
    }
}

/// `cora-driver unpack`: the fallback, a stack's layers downloaded whole and unpacked into a
/// new directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackArgs {
    pub image: String,
    pub layer_digest: Option<String>,
    /// The directory to create (must not exist).
    pub into: PathBuf,
    pub registry: RegistryArgs,
}

impl UnpackArgs {
    /// The driver's argv after the program name.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["unpack".into(), "--image".into(), self.image.clone()];
        if let Some(d) = &self.layer_digest {
            a.extend(["--layer-digest".into(), d.clone()]);
        }
        a.extend(["--into".into(), path_arg(&self.into)]);
        self.registry.push_args(&mut a);
        a
    }
}

/// `cora-driver del ID`: stop and delete a device; `fuse_dir` as given to `add` (FUSE
/// devices are found there).
pub fn del_args(id: u32, fuse_dir: Option<&std::path::Path>) -> Vec<String> {
    let mut a = vec!["del".into(), id.to_string()];
    push_fuse_dir(&mut a, fuse_dir);
    a
}

/// `cora-driver list --json`: prints a JSON array of [`DeviceInfo`] (ublk devices, and the
/// FUSE devices under `fuse_dir`).
pub fn list_json_args(fuse_dir: Option<&std::path::Path>) -> Vec<String> {
    let mut a = vec!["list".into(), "--json".into()];
    push_fuse_dir(&mut a, fuse_dir);
    a
}

fn push_fuse_dir(a: &mut Vec<String>, fuse_dir: Option<&std::path::Path>) {
    if let Some(d) = fuse_dir {
        a.extend(["--fuse-dir".into(), path_arg(d)]);
    }
}

fn path_arg(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// What is wrong with what the driver printed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cora-driver printed no ready message: {0:?}")]
    NoReady(String),
    #[error("cora-driver printed a bad {what}: {source}")]
    Json {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// Printed by `add`/`recover` with `--ready-json` (one JSON line on stdout) once the device is
/// served and its node exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// The device id (`del ID`, `recover ID`).
    pub id: u32,
    /// What to mount: `/dev/ublkbN` for ublk, a read-only regular file for FUSE.
    pub path: PathBuf,
    /// [`TRANSPORT_UBLK`] or [`TRANSPORT_FUSE`].
    pub transport: String,
    /// The serving process (the background server with `--daemon`).
    pub pid: i32,
}

impl Ready {
    /// The message as the one line the driver prints (without the newline).
    pub fn to_line(&self) -> Result<String, OutputError> {
        serde_json::to_string(self).map_err(|source| OutputError::Json {
            what: "ready message",
            source,
        })
    }

    /// The ready message in a driver's stdout: its last line that is a JSON object.
    pub fn from_output(stdout: &str) -> Result<Ready, OutputError> {
        let line = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| l.starts_with('{'))
            .ok_or_else(|| OutputError::NoReady(stdout.to_owned()))?;
        serde_json::from_str(line).map_err(|source| OutputError::Json {
            what: "ready message",
            source,
        })
    }
}

/// What the driver writes to its stats file (`--stats-file`) every second: counters of its
/// lazy source since it started. Fields missing in a file (older drivers) read as 0.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriverStats {
    /// Chunk pieces served from the local cache.
    pub hits: u64,
    /// Chunks fetched from a registry (by any kind of fetch).
    pub misses: u64,
    /// Compressed bytes received from registries.
    pub fetched_bytes: u64,
    /// Range requests made.
    pub requests: u64,
    /// Chunks that failed verification.
    pub corrupt: u64,
    /// Range requests that failed (network or HTTP errors).
    pub fetch_errors: u64,
    /// Latency of successful range requests.
    pub fetch_seconds: LatencyHistogram,
    /// Of `misses`: chunks fetched by sequential read-ahead.
    pub readahead: u64,
    /// Of `misses`: chunks fetched by trace prefetch.
    pub prefetched: u64,
    /// Fetch jobs that panicked; each failed its reads and its worker lived on.
    pub worker_panics: u64,
    /// Reads that had to wait for a fetch (a transport's reads; kernel read-ahead included).
    pub stalls: u64,
    /// Seconds those reads waited, summed: where a cold start's time goes beyond its work.
    pub stall_seconds: f64,
}

impl DriverStats {
    /// Adds `o`'s counters (totals over several devices).
    pub fn add(&mut self, o: &DriverStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.fetched_bytes += o.fetched_bytes;
        self.requests += o.requests;
        self.corrupt += o.corrupt;
        self.fetch_errors += o.fetch_errors;
        self.fetch_seconds.add(&o.fetch_seconds);
        self.readahead += o.readahead;
        self.prefetched += o.prefetched;
        self.worker_panics += o.worker_panics;
        self.stalls += o.stalls;
        self.stall_seconds += o.stall_seconds;
    }
}

/// Latency histogram: `counts[i]` requests took at most `le[i]` seconds (and more than
/// `le[i - 1]`); `counts[le.len()]` took longer. Counts are not cumulative.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LatencyHistogram {
    pub le: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencyHistogram {
    /// Adds `o`'s counts; a bucket of `o` goes to the first of our buckets whose bound is at
    /// least its own, so differing bounds never under-state a latency.
    pub fn add(&mut self, o: &LatencyHistogram) {
        if self.le.is_empty() && self.counts.is_empty() {
            self.le = o.le.clone();
            self.counts = vec![0; o.le.len() + 1];
        }
        self.counts.resize(self.le.len() + 1, 0);
        for (j, c) in o.counts.iter().enumerate() {
            let i = match o.le.get(j) {
                Some(b) => self
                    .le
                    .iter()
                    .position(|ours| ours >= b)
                    .unwrap_or(self.le.len()),
                None => self.le.len(),
            };
            self.counts[i] += c;
        }
        self.sum_seconds += o.sum_seconds;
        self.count += o.count;
    }
}

/// The state of a device, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum DeviceState {
    /// Served.
    Live,
    /// Its server died; `recover` can serve it again.
    Quiesced,
    /// Stopped.
    Dead,
    /// Its server died and I/O fails (UBLK_F_USER_RECOVERY_FAIL_IO).
    FailIo,
    /// A state this build does not know, by its name.
    Other(String),
}

impl DeviceState {
    pub fn as_str(&self) -> &str {
        match self {
            DeviceState::Live => "LIVE",
            DeviceState::Quiesced => "QUIESCED",
            DeviceState::Dead => "DEAD",
            DeviceState::FailIo => "FAIL_IO",
            DeviceState::Other(s) => s,
        }
    }
}

impl std::fmt::Display for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for DeviceState {
    fn from(s: String) -> DeviceState {
        match s.as_str() {
            "LIVE" => DeviceState::Live,
            "QUIESCED" => DeviceState::Quiesced,
            "DEAD" => DeviceState::Dead,
            "FAIL_IO" => DeviceState::FailIo,
            _ => DeviceState::Other(s),
        }
    }
}

impl From<DeviceState> for String {
    fn from(s: DeviceState) -> String {
        match s {
            DeviceState::Other(s) => s,
            known => known.as_str().to_owned(),
        }
    }
}

/// One device in `cora-driver list --json` (which prints a JSON array of these). Devices of
/// other servers (e.g. rublk's) are listed too, without an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: u32,
    pub state: DeviceState,
    /// The serving process (meaningless unless `state` is LIVE).
    pub pid: i32,
    /// FUSE devices: the process that holds the connection and starts a new server when the
    /// serving one dies (the device is QUIESCED meanwhile: reads wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keeper_pid: Option<i32>,
    /// [`TRANSPORT_UBLK`] or [`TRANSPORT_FUSE`].
    pub transport: String,
    /// What to mount: the block device node (`/dev/ublkbN`) or the FUSE image file.
    pub path: PathBuf,
    /// Size in bytes (0 until the device was started once).
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub queues: u16,
    #[serde(default)]
    pub depth: u16,
    #[serde(default)]
    pub max_io_bytes: u32,
    /// Transport flags (UBLK_F_*) and their names.
    #[serde(default)]
    pub flags: u64,
    #[serde(default)]
    pub flag_names: Vec<String>,
    /// How request data reaches the kernel (ublk: "buffered", "user-copy", "auto-buf-reg";
    /// absent for FUSE devices and other servers' devices).
    #[serde(default)]
    pub data_mode: Option<String>,
    /// The server kind recorded with the device ("cora" for cora-driver's).
    #[serde(default)]
    pub target: Option<String>,
    /// The served image, for a device serving a CORA image.
    #[serde(default)]
    pub image: Option<String>,
    /// The top layer of the served stack by blob digest, when given that way.
    #[serde(default)]
    pub layer_digest: Option<String>,
    /// The driver's description of the source (`{"kind": "image" | "file", ...}`), as
    /// recorded for `recover`. For people and tests; programs use the fields above.
    #[serde(default)]
    pub recipe: Option<serde_json::Value>,
}

impl DeviceInfo {
    /// The output of `cora-driver list --json`.
    pub fn parse_list(stdout: &str) -> Result<Vec<DeviceInfo>, OutputError> {
        serde_json::from_str(stdout).map_err(|source| OutputError::Json {
            what: "device list",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_carry_every_field() {
        let a = AddArgs {
            image: "h/app@sha256:1".into(),
            layer_digest: Some("sha256:2".into()),
            cache_dir: "/c".into(),
            cache_size: 4096,
            queues: 2,
            transport: Transport::Fuse,
            fuse_dir: Some("/f".into()),
            registry: RegistryArgs {
                creds_file: Some("/creds.json".into()),
                insecure_hosts: vec!["127.0.0.1:5000".into()],
                mirrors: vec![
                    Mirror {
                        host: "m:1".into(),
                        insecure: true,
                    },
                    Mirror {
                        host: "m:2".into(),
                        insecure: false,
                    },
                ],
                ca_files: vec!["/ca.pem".into()],
            },
            fetch: FetchArgs {
                miss_window: Some(256 << 10),
                file_window: Some(0),
                fill: Some(Fill::Always),
            },
            run: RunArgs::background(Some("/l".into()), Some("/s".into())),
        }
        .to_args()
        .join(" ");
        assert_eq!(
            a,
            "add --image h/app@sha256:1 --layer-digest sha256:2 --cache /c --cache-size 4096 \
             --queues 2 --transport fuse --fuse-dir /f --creds /creds.json --insecure 127.0.0.1:5000 --mirror m:1,insecure \
             --mirror m:2 --ca /ca.pem --miss-window 262144 --file-window 0 --fill always --daemon --ready-json \
             --log /l --stats-file /s"
        );
        let r = RecoverArgs {
            id: 3,
            run: RunArgs::default(),
        };
        assert_eq!(r.to_args(), ["recover", "3"]);
        for f in [Fill::Off, Fill::Idle, Fill::Paced, Fill::Always] {
            assert_eq!(f.as_str().parse::<Fill>().ok(), Some(f));
        }
        assert!("on".parse::<Fill>().is_err());
        assert_eq!(del_args(4, None), ["del", "4"]);
        assert_eq!(
            del_args(4, Some("/f".as_ref())),
            ["del", "4", "--fuse-dir", "/f"]
        );
        assert_eq!(list_json_args(None), ["list", "--json"]);
        assert_eq!(
            list_json_args(Some("/f".as_ref())),
            ["list", "--json", "--fuse-dir", "/f"]
        );
        let u = UnpackArgs {
            image: "i".into(),
            layer_digest: None,
            into: "/t".into(),
            registry: RegistryArgs::default(),
        };
        assert_eq!(u.to_args(), ["unpack", "--image", "i", "--into", "/t"]);
    }

    #[test]
    fn transports_parse_and_print_their_names() {
        for t in [Transport::Auto, Transport::Ublk, Transport::Fuse] {
            assert_eq!(t.as_str().parse::<Transport>(), Ok(t));
            assert_eq!(
                serde_json::to_string(&t).unwrap(),
                format!("\"{}\"", t.as_str())
            );
        }
        assert_eq!(Transport::default(), Transport::Auto);
        let e = "nbd".parse::<Transport>().unwrap_err().to_string();
        assert!(e.contains("nbd") && e.contains("fuse"), "{e}");
    }

    #[test]
    fn ready_round_trips_through_a_line() {
        let r = Ready {
            id: 7,
            path: "/dev/ublkb7".into(),
            transport: TRANSPORT_UBLK.into(),
            pid: 42,
        };
        let out = format!("noise\n{}\n", r.to_line().unwrap());
        assert_eq!(Ready::from_output(&out).unwrap(), r);
        assert!(matches!(
            Ready::from_output("/dev/ublkb7\n"),
            Err(OutputError::NoReady(_))
        ));
        assert!(matches!(
            Ready::from_output("{\"id\":1}"),
            Err(OutputError::Json { .. })
        ));
    }

    #[test]
    fn stats_of_older_drivers_parse_and_add() {
        // Written before readahead/prefetched existed.
        let old: DriverStats = serde_json::from_str(
            r#"{"hits":3,"misses":2,"fetched_bytes":100,"requests":1,"corrupt":0,
                "fetch_errors":1,"fetch_seconds":{"le":[0.001,1.0],"counts":[0,1,0],
                "sum_seconds":0.5,"count":1}}"#,
        )
        .unwrap();
        assert_eq!((old.hits, old.readahead, old.prefetched), (3, 0, 0));
        let mut t = DriverStats::default();
        t.add(&old);
        t.add(&DriverStats {
            readahead: 2,
            prefetched: 5,
            ..old.clone()
        });
        assert_eq!(
            (t.hits, t.fetched_bytes, t.readahead, t.prefetched),
            (6, 200, 2, 5)
        );
        assert_eq!(t.fetch_seconds.counts, [0, 2, 0]);
        let back: DriverStats = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn histograms_add_across_bounds() {
        let a = LatencyHistogram {
            le: vec![0.01, 0.1],
            counts: vec![1, 2, 3],
            sum_seconds: 1.0,
            count: 6,
        };
        let mut t = LatencyHistogram::default();
        t.add(&a);
        t.add(&a);
        assert_eq!(t.counts, [2, 4, 6]);
        assert_eq!(t.count, 12);
        // Finer bounds fold into the next bound up; unknown tails go to +Inf.
        t.add(&LatencyHistogram {
            le: vec![0.005, 0.05, 0.5],
            counts: vec![1, 1, 1, 1],
            sum_seconds: 0.0,
            count: 4,
        });
        assert_eq!(t.counts, [3, 5, 8]);
    }

    #[test]
    fn device_list_parses_with_unknown_states() {
        let list = DeviceInfo::parse_list(
            r#"[{"id":0,"state":"QUIESCED","pid":-1,"transport":"ublk","path":"/dev/ublkb0",
                 "image":"h/a@sha256:1","layer_digest":"sha256:2","recipe":{"kind":"image"}},
                {"id":1,"state":"UNKNOWN(9)","pid":5,"transport":"ublk","path":"/dev/ublkb1"}]"#,
        )
        .unwrap();
        assert_eq!(list[0].state, DeviceState::Quiesced);
        assert_eq!(list[0].layer_digest.as_deref(), Some("sha256:2"));
        assert_eq!(list[1].state, DeviceState::Other("UNKNOWN(9)".into()));
        assert_eq!(list[1].image, None);
        let again = DeviceInfo::parse_list(&serde_json::to_string(&list).unwrap()).unwrap();
        assert_eq!(again, list);
        assert!(DeviceInfo::parse_list("not json").is_err());
    }
}
