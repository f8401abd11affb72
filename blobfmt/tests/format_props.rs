//! Property tests: trailer round trips, lookups against naive models, and that parsing
//! arbitrary or corrupted bytes never panics.

use blobfmt::format::{
    ChunkEntry, Extent, Footer, FsType, Lower, SOURCE_META, Trailer, chunk_at, first_extent_from,
};
use blobfmt::{Piece, Stack, StreamId};
use proptest::prelude::*;

fn table(lens: &[u32]) -> Vec<ChunkEntry> {
    let (mut s, mut f) = (0u64, 0u64);
    lens.iter()
        .enumerate()
        .map(|(i, &l)| {
            let c = ChunkEntry {
                stream_offset: s,
                frame_offset: f,
                compressed_len: l / 2 + 1,
                uncompressed_len: l,
                digest: [i as u8; 32],
            };
            s += u64::from(l);
            f += u64::from(l / 2 + 1);
            c
        })
        .collect()
}

/// A one-layer trailer over `chunk_lens`, with an image of `blocks` 4 KiB blocks whose
/// extents are generated from `ext` (gap, length, source selector).
fn trailer(chunk_lens: &[u32], meta_lens: &[u32], ext: &[(u16, u16, bool)]) -> Trailer {
    let chunks = table(chunk_lens);
    let stream_size: u64 = chunk_lens.iter().map(|&l| u64::from(l)).sum();
    let data_size = chunks.last().map_or(0, |c| c.frame_end());
    let mut meta_chunks = table(meta_lens);
    let mut pos = data_size;
    for c in &mut meta_chunks {
        c.frame_offset = pos + 8;
        pos = c.frame_end();
    }
    let meta_size: u64 = meta_lens.iter().map(|&l| u64::from(l)).sum();
    let mut extents = Vec::new();
    let mut img = 0u64;
    for &(gap, len, meta) in ext {
        img += u64::from(gap);
        let (size, source) = if meta {
            (meta_size, SOURCE_META)
        } else {
            (stream_size, 0)
        };
        let len = u64::from(len).min(size);
        if len == 0 {
            continue;
        }
        let src_offset = (img * 7) % (size - len + 1);
        extents.push(Extent {
            image_offset: img,
            length: len,
            src_offset,
            source,
        });
        img += len;
    }
    Trailer {
        flags: 0,
        block_size: 4096,
        fs_type: FsType::Erofs,
        chunk_min: 1,
        chunk_avg: 2,
        chunk_max: 3,
        stream_size,
        data_size,
        image_size: img + 100,
        meta_size,
        diff_id: [9; 32],
        lowers: Vec::<Lower>::new(),
        chunks,
        meta_chunks,
        extents,
    }
}

proptest! {
    #[test]
    fn trailer_round_trips(
        lens in prop::collection::vec(1u32..5000, 0..40),
        meta in prop::collection::vec(1u32..5000, 0..10),
        ext in prop::collection::vec((0u16..300, 1u16..3000, any::<bool>()), 0..30),
    ) {
        let t = trailer(&lens, &meta, &ext);
        let body = t.encode_body();
        prop_assert_eq!(Trailer::decode_body(&body).unwrap(), t);
    }

    #[test]
    fn chunk_lookup_matches_linear_scan(lens in prop::collection::vec(1u32..5000, 1..60), probe in 0u64..400_000) {
        let t = table(&lens);
        let naive = t.iter().position(|c| c.stream_offset <= probe && probe < c.stream_end());
        prop_assert_eq!(chunk_at(&t, probe), naive);
    }

    #[test]
    fn extent_lookup_matches_linear_scan(
        ext in prop::collection::vec((0u16..300, 1u16..3000, any::<bool>()), 1..30),
        probe in 0u64..100_000,
    ) {
        let t = trailer(&[100_000], &[100_000], &ext);
        let naive = t.extents.iter().position(|e| e.image_end() > probe).unwrap_or(t.extents.len());
        prop_assert_eq!(first_extent_from(&t.extents, probe), naive);
    }

    /// `plan` against a byte-by-byte model of the described image.
    #[test]
    fn plan_matches_naive_model(
        lens in prop::collection::vec(1u32..3000, 1..20),
        meta in prop::collection::vec(1u32..3000, 1..5),
        ext in prop::collection::vec((0u16..200, 1u16..2000, any::<bool>()), 0..15),
        start_frac in 0.0f64..1.0, len_frac in 0.0f64..1.0,
    ) {
        let t = trailer(&lens, &meta, &ext);
        let size = t.image_size;
        let start = ((size as f64) * start_frac) as u64;
        let len = (((size - start) as f64) * len_frac) as u64;
        // Model: image byte -> (stream, stream offset) or zero.
        let model = |b: u64| -> Option<(StreamId, u64)> {
            t.extents.iter().find(|e| e.image_offset <= b && b < e.image_end()).map(|e| {
                let s = if e.source == SOURCE_META { StreamId::Meta } else { StreamId::Layer(e.source) };
                (s, e.src_offset + (b - e.image_offset))
            })
        };
        let stack = Stack::new(vec![t.clone()], &[[0u8; 32]]).unwrap();
        let plan = stack.plan(start, len).unwrap();
        let mut b = start;
        for p in plan {
            match p {
                Piece::Zero { len } => {
                    for x in b..b + len { prop_assert_eq!(model(x), None); }
                    b += len;
                }
                Piece::Chunk { stream, index, offset, len } => {
                    let c = stack.chunk(stream, index);
                    for k in 0..u64::from(len) {
                        prop_assert_eq!(model(b + k), Some((stream, c.stream_offset + u64::from(offset) + k)));
                    }
                    b += u64::from(len);
                }
            }
        }
        prop_assert_eq!(b, start + len);
    }

    /// Arbitrary bytes and single corruptions of a valid trailer never panic the parser.
    #[test]
    fn trailer_parser_never_panics(noise in prop::collection::vec(any::<u8>(), 0..600), flip in any::<prop::sample::Index>(), bit in 0u8..8) {
        let _ = Trailer::decode_body(&noise);
        let mut body = trailer(&[1000, 2000], &[500], &[(0, 1000, false), (10, 400, true)]).encode_body();
        let i = flip.index(body.len());
        body[i] ^= 1 << bit;
        let _ = Trailer::decode_body(&body);
        body.truncate(i);
        prop_assert!(Trailer::decode_body(&body).is_err());
        let _ = Footer::decode(&noise, noise.len() as u64);
    }
}

/// Offsets near u64::MAX are errors, not arithmetic overflows (which panic in debug builds;
/// `cargo xtask test` runs this file in a debug build as well for that reason).
#[test]
fn offsets_near_the_top_of_u64_are_rejected() {
    // The second metadata frame ends 4 bytes below u64::MAX: no room for the next header.
    let mut t = trailer(&[1000], &[500, 500, 500], &[(0, 1000, false)]);
    t.meta_chunks[0].frame_offset = u64::MAX - 600;
    t.meta_chunks[0].compressed_len = 100;
    t.meta_chunks[1].frame_offset = u64::MAX - 400;
    t.meta_chunks[1].compressed_len = 396;
    let e = Trailer::decode_body(&t.encode_body()).expect_err("misplaced frames");
    assert!(e.to_string().contains("metadata chunk 2"), "{e}");
    // A frame running past u64::MAX.
    let mut t = trailer(&[1000], &[500], &[(0, 1000, false)]);
    t.meta_chunks[0].frame_offset = u64::MAX - 5;
    assert!(Trailer::decode_body(&t.encode_body()).is_err());
}

#[test]
fn footer_rejects_wrong_magic_version_and_placement() {
    let f = Footer {
        version: 1,
        flags: 0,
        trailer_offset: 100,
        trailer_length: 50,
        trailer_digest: [1; 32],
    };
    let good = f.encode();
    assert_eq!(Footer::decode(&good, 222).unwrap(), f);
    let err = Footer::decode(&good, 223).unwrap_err().to_string();
    assert!(
        err.contains("does not end where the footer starts"),
        "{err}"
    );
    let mut bad = good;
    bad[8] = b'X';
    assert!(
        Footer::decode(&bad, 222)
            .unwrap_err()
            .to_string()
            .contains("not a CORA blob")
    );
    let mut v2 = good;
    v2[16] = 2;
    assert!(
        Footer::decode(&v2, 222)
            .unwrap_err()
            .to_string()
            .contains("unsupported CORA format version 2")
    );
    assert!(Footer::decode(&good[..40], 222).is_err());
}

#[test]
fn stack_rejects_wrong_lowers() {
    let mut top = trailer(&[100], &[], &[]);
    top.lowers = vec![Lower {
        blob_digest: [1; 32],
        diff_id: [9; 32],
    }];
    let bottom = trailer(&[100], &[], &[]);
    let ok = Stack::new(vec![bottom.clone(), top.clone()], &[[1; 32], [2; 32]]);
    assert!(ok.is_ok());
    let err = Stack::new(vec![bottom, top], &[[3; 32], [2; 32]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("converted over"), "{err}");
}
