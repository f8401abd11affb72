//! Trailer bodies and the stack index over them; see `checks::trailer`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one check
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = checks::trailer(data);
});
