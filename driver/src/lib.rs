//! CORA run-time: lazy chunk source, local content-addressed cache, ublk server.

pub mod blobs;
pub mod cache;
pub mod imageref;
pub mod inspect;
pub mod registry;
pub mod remote;
pub mod source;
pub mod trace;
pub mod ublk;
