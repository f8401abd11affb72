//! CORA run-time: lazy chunk source, local content-addressed cache, ublk server.

pub mod blobs;
pub mod cache;
pub mod imageref;
pub mod inspect;
pub mod registry;
pub mod remote;
pub mod rpull;
pub mod source;
pub mod trace;
pub mod ublk;
pub mod unpack;

/// Restores the default SIGPIPE action, which Rust's runtime sets to "ignore": a CLI whose
/// output goes to a closed pipe (`cora inspect | head`) should end quietly, not panic in
/// `println!`.
pub fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
