//! Layer tars extracted onto a tree with symlinks out of it; see `checks::tar`.
#![no_main]

#[path = "../checks.rs"]
#[allow(dead_code)] // each target uses one check
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Mutated headers rarely keep a valid checksum; fix it so they reach the parser.
    let mut data = data.to_vec();
    checks::fix_tar_checksums(&mut data);
    let _ = checks::tar(&data);
});
