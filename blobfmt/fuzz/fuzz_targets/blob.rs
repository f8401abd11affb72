//! Whole CORA blobs: footer, trailer frame, chunks and image plans; see `checks::blob`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one check
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::blob(data);
});
