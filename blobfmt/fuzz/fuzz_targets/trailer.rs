//! The footer/trailer parsers and the stack planner on arbitrary bytes: errors are fine,
//! panics and out-of-range indexing are not.
#![no_main]
use blobfmt::format::{FOOTER_FRAME, Footer, Trailer, read_trailer};
use blobfmt::{Stack, sha256};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a whole blob: footer at the end, trailer where it points.
    let size = data.len() as u64;
    let _ = read_trailer(size, &mut |off, len| {
        let (o, l) = (off as usize, len as usize);
        data.get(o..o.saturating_add(l))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| blobfmt::Error::Format("out of range".into()))
    });
    if data.len() >= FOOTER_FRAME {
        let _ = Footer::decode(&data[data.len() - FOOTER_FRAME..], size);
    }
    // As a decompressed trailer body; if it parses, planning any range must not panic.
    if let Ok(t) = Trailer::decode_body(data) {
        let size = t.image_size;
        if let Ok(stack) = Stack::new(vec![t], &[sha256(data)]) {
            let _ = stack.plan(0, size.min(1 << 20));
            let _ = stack.plan(size / 2, size - size / 2);
        }
    }
});
