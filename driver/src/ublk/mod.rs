//! The ublk block server: exposes a [`BlockSource`] as a read-only `/dev/ublkbN`.
//!
//! Each queue runs on its own thread with an io_uring (libublk) and one async task per tag.
//! Local hits are served inline on the queue thread; misses go to a worker pool
//! ([`pool::MissPool`]) and complete asynchronously, so one slow fetch never holds up the
//! other tags of its queue.
//!
//! Plugging in a new kind of source (e.g. the lazy CORA source):
//! 1. implement [`BlockSource`] (and optionally [`BlockSource::local_slices`] for memory-resident
//!    data, the one-copy path);
//! 2. add a [`SourceRecipe`] variant holding what is needed to open it again (it is stored in
//!    the device's json and read back by `recover`), and open it in [`SourceRecipe::open`];
//! 3. in `cora-driver` (src/bin/cora-driver.rs), add its flags to `SourceArgs` and build the
//!    variant in `recipe()`.
mod admin;
pub mod pool;
pub mod recipe;
mod server;
pub mod source;

pub use admin::{DeviceStatus, delete, flag_names, list, status, stop};
pub use recipe::{SimulatedMisses, SourceRecipe, TraceOptions};
pub use server::{DeviceOptions, Ready, TargetData, add, kernel_features, recover};
pub use source::{BlockSource, FileSource};

/// libublk target name of CORA devices, and the key of our entry in the device json.
pub const TARGET_NAME: &str = "cora";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what}: {source:?}")]
    Ublk {
        what: &'static str,
        source: libublk::UblkError,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("opening the block source: {0}")]
    Source(std::io::Error),
    #[error("device {0} was not created with UBLK_F_USER_RECOVERY")]
    NotRecoverable(u32),
    #[error("device {id} is still served by pid {pid}")]
    StillServed { id: u32, pid: i32 },
    #[error("device {0} has no CORA target data in /run/ublksrvd (not created by cora-driver?)")]
    NoTargetData(u32),
    #[error("source size changed: recorded {recorded} bytes, now {now}")]
    SizeChanged { recorded: u64, now: u64 },
    #[error("no ublk device {0}")]
    NoDevice(u32),
}
