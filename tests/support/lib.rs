//! Helpers shared by the integration tests: services started and stopped by PID.

pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod images;
pub mod snapshotter;
