//! Helpers shared by the integration tests: services started and stopped by PID.
pub mod fixtures;
