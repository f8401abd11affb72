//! Plain, gzip and zstd source layers, decompressed and extracted; see `checks::layer`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one check
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::layer(data);
});
