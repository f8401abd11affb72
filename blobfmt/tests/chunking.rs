//! Windowed chunking must cut exactly where one pass of FastCDC over the whole stream cuts,
//! and its frames must decompress back to the stream.

use blobfmt::writer::{ChunkParams, write_chunked};

#[test]
fn windowed_cuts_equal_whole_stream_cuts() {
    // Larger than the 16 MiB window, with runs of zeros so some chunks hit `max`.
    let mut data = cora_testdata::pseudo_random(40_000_000, 0);
    data[5_000_000..7_000_000].fill(0);
    let p = ChunkParams::from_avg(64 << 10, 1).unwrap();
    let mut out = Vec::new();
    let c = write_chunked(data.as_slice(), &mut out, 0, &p, false).unwrap();
    let expect: Vec<(u64, u32)> = fastcdc::v2020::FastCDC::new(&data, p.min, p.avg, p.max)
        .map(|c| (c.offset as u64, c.length as u32))
        .collect();
    let got: Vec<(u64, u32)> = c
        .chunks
        .iter()
        .map(|c| (c.stream_offset, c.uncompressed_len))
        .collect();
    assert_eq!(got, expect);
    assert_eq!(c.stream_size, data.len() as u64);
    assert_eq!(zstd::decode_all(out.as_slice()).unwrap(), data);
}
