//! CORA run-time: lazy chunk source, local content-addressed cache, ublk server.
pub mod ublk;
