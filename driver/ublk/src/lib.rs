//! The ublk transport: serves any [`cora_read::BlockSource`] as a read-only `/dev/ublkbN`.
//!
//! Each queue runs on its own thread with an io_uring (libublk) and one async task per tag. A
//! request is one [`BlockSource::read`]: local data is lent or copied inline on the queue
//! thread; a miss parks the tag's task until the source's fetch wakes it (through the queue's
//! [`wake::Doorbell`]), so one slow fetch never holds up the other tags of its queue, and no
//! thread pool of this crate sits between the source and the kernel. In [`DataMode::AutoBufReg`]
//! a request whose bytes all lie in files ([`BlockSource::file_extents`]) is instead read by
//! io_uring straight into the request's pages, which the kernel registered in the queue's ring.
//!
//! This crate knows nothing of images, registries or caches: what a device serves is the
//! caller's `BlockSource`, and what `recover` needs to open it again is the caller's JSON
//! (`recipe`), stored with the device. `examples/file_device.rs` serves a plain file.
mod admin;
mod mode;
mod server;
pub mod wake;

pub use admin::{DeviceStatus, delete, flag_names, list, status, stop};
pub use cora_read::{BlockSource, FileSource};
pub use mode::DataMode;
pub use server::{DeviceOptions, IoCounters, Ready, TargetData, add, kernel_features, recover};

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
