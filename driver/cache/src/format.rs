//! On-disk formats: segment header, record header, segment index. Pure byte layouts; every
//! decoder checks lengths and checksums and returns `None` on anything it does not accept,
//! never panics (the bytes come from disk and may be torn, zeroed or foreign).
//!
//! ```text
//! segment  = seg-header (64 B) , { padding , rec-header (64 B) , data }
//!            each record's header starts on a 64-byte boundary, its data right after it
//! seg-header = "CORASEG1" | version u32 | boot_id [16] | created_ns u64 | 24 B zero | crc u32
//! rec-header = "CREC" | len u32 | digest [32] | data_crc u32 | 16 B zero | crc u32
//! index    = "CORAIDX1" | version u32 | count u32 | boot_id [16] | end u64 | 24 B zero
//!            , count × (digest [32] | offset u64 | len u32 | data_crc u32) , crc u32
//! ```
//! All integers little endian; every `crc` is CRC-32 (IEEE) of the bytes before it. A record
//! header is written after its data, so a header that checks out names complete bytes as long
//! as the page cache survived (a process crash, not a power loss: see the crate docs).

use crate::ChunkDigest;

pub const SEG_MAGIC: &[u8; 8] = b"CORASEG1";
pub const IDX_MAGIC: &[u8; 8] = b"CORAIDX1";
pub const REC_MAGIC: &[u8; 4] = b"CREC";
pub const VERSION: u32 = 1;
pub const SEG_HEADER_LEN: u64 = 64;
pub const REC_HEADER_LEN: u64 = 64;
/// Records start on 64-byte boundaries (headers stay aligned). Not on pages: chunk boundaries
/// fall anywhere in the tar stream, so page-aligned chunks would not make the reads of image
/// blocks page-aligned, and cost ~4 KiB per chunk (6 % at 64 KiB, measured).
pub const ALIGN: u64 = 64;
const IDX_HEADER_LEN: usize = 64;
const IDX_ENTRY_LEN: usize = 48;

pub type BootId = [u8; 16];

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// CRC-32 of a chunk's bytes, as stored beside it.
pub fn data_crc(data: &[u8]) -> u32 {
    crc(data)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegHeader {
    pub boot_id: BootId,
    pub created_ns: u64,
}

impl SegHeader {
    pub fn encode(&self) -> [u8; SEG_HEADER_LEN as usize] {
        let mut b = [0u8; SEG_HEADER_LEN as usize];
        b[..8].copy_from_slice(SEG_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..28].copy_from_slice(&self.boot_id);
        b[28..36].copy_from_slice(&self.created_ns.to_le_bytes());
        let c = crc(&b[..60]);
        b[60..].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<SegHeader> {
        let b = b.get(..SEG_HEADER_LEN as usize)?;
        if &b[..8] != SEG_MAGIC || u32_at(b, 8)? != VERSION || u32_at(b, 60)? != crc(&b[..60]) {
            return None;
        }
        Some(SegHeader {
            boot_id: b[12..28].try_into().ok()?,
            created_ns: u64_at(b, 28)?,
        })
    }
}

/// Where the record after one ending at `end` has its header, and its data.
pub fn next_record_at(end: u64) -> Option<(u64, u64)> {
    let data = end
        .checked_add(REC_HEADER_LEN)?
        .checked_next_multiple_of(ALIGN)?;
    Some((data - REC_HEADER_LEN, data))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecHeader {
    pub len: u32,
    pub digest: ChunkDigest,
    pub data_crc: u32,
}

impl RecHeader {
    pub fn encode(&self) -> [u8; REC_HEADER_LEN as usize] {
        let mut b = [0u8; REC_HEADER_LEN as usize];
        b[..4].copy_from_slice(REC_MAGIC);
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..40].copy_from_slice(&self.digest);
        b[40..44].copy_from_slice(&self.data_crc.to_le_bytes());
        let c = crc(&b[..60]);
        b[60..].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<RecHeader> {
        let b = b.get(..REC_HEADER_LEN as usize)?;
        if &b[..4] != REC_MAGIC || u32_at(b, 60)? != crc(&b[..60]) {
            return None;
        }
        Some(RecHeader {
            len: u32_at(b, 4)?,
            digest: b[8..40].try_into().ok()?,
            data_crc: u32_at(b, 40)?,
        })
    }
}

/// One entry of a segment: its chunk's bytes lie at `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdxEntry {
    pub digest: ChunkDigest,
    pub offset: u64,
    pub len: u32,
    pub data_crc: u32,
}

/// A sealed segment's table of contents: its presence means nobody appends to the segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegIndex {
    pub boot_id: BootId,
    /// End of the last record; the segment file is this long.
    pub end: u64,
    pub entries: Vec<IdxEntry>,
}

impl SegIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(IDX_HEADER_LEN + self.entries.len() * IDX_ENTRY_LEN + 4);
        b.extend_from_slice(IDX_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        let count = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&self.boot_id);
        b.extend_from_slice(&self.end.to_le_bytes());
        b.resize(IDX_HEADER_LEN, 0);
        for e in self.entries.iter().take(count as usize) {
            b.extend_from_slice(&e.digest);
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
            b.extend_from_slice(&e.data_crc.to_le_bytes());
        }
        let c = crc(&b);
        b.extend_from_slice(&c.to_le_bytes());
        b
    }

    /// Decodes an index; entries must lie inside `end` and after the segment header.
    pub fn decode(b: &[u8]) -> Option<SegIndex> {
        let body_len = b.len().checked_sub(4)?;
        let (body, tail) = b.split_at(body_len);
        if body.len() < IDX_HEADER_LEN
            || &body[..8] != IDX_MAGIC
            || u32_at(body, 8)? != VERSION
            || u32_at(tail, 0)? != crc(body)
        {
            return None;
        }
        let count = u32_at(body, 12)? as usize;
        if body.len() != IDX_HEADER_LEN + count.checked_mul(IDX_ENTRY_LEN)? {
            return None;
        }
        let end = u64_at(body, 32)?;
        let mut entries = Vec::with_capacity(count);
        for e in body[IDX_HEADER_LEN..].chunks_exact(IDX_ENTRY_LEN) {
            let entry = IdxEntry {
                digest: e[..32].try_into().ok()?,
                offset: u64_at(e, 32)?,
                len: u32_at(e, 40)?,
                data_crc: u32_at(e, 44)?,
            };
            let fits = entry.offset >= SEG_HEADER_LEN + REC_HEADER_LEN
                && entry
                    .offset
                    .checked_add(u64::from(entry.len))
                    .is_some_and(|e| e <= end);
            if !fits {
                return None;
            }
            entries.push(entry);
        }
        Some(SegIndex {
            boot_id: body[16..32].try_into().ok()?,
            end,
            entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index() -> SegIndex {
        SegIndex {
            boot_id: [7; 16],
            end: 3 * 4096 + 100,
            entries: vec![
                IdxEntry {
                    digest: [1; 32],
                    offset: 4096,
                    len: 4096,
                    data_crc: 5,
                },
                IdxEntry {
                    digest: [2; 32],
                    offset: 3 * 4096,
                    len: 100,
                    data_crc: 6,
                },
            ],
        }
    }

    #[test]
    fn headers_and_index_round_trip() {
        let s = SegHeader {
            boot_id: [3; 16],
            created_ns: 42,
        };
        assert_eq!(SegHeader::decode(&s.encode()), Some(s));
        let r = RecHeader {
            len: 65536,
            digest: [9; 32],
            data_crc: 77,
        };
        assert_eq!(RecHeader::decode(&r.encode()), Some(r));
        let i = index();
        assert_eq!(SegIndex::decode(&i.encode()), Some(i));
    }

    #[test]
    fn records_are_packed_on_64_byte_boundaries() {
        assert_eq!(next_record_at(SEG_HEADER_LEN), Some((64, 128)));
        assert_eq!(next_record_at(128), Some((128, 192)));
        assert_eq!(next_record_at(129), Some((192, 256)));
        assert_eq!(next_record_at(192), Some((192, 256)));
        assert_eq!(next_record_at(u64::MAX - 10), None);
    }

    #[test]
    fn an_index_naming_bytes_past_its_end_is_refused() {
        let mut i = index();
        i.entries[1].len = 200;
        assert_eq!(SegIndex::decode(&i.encode()), None);
        let mut i = index();
        i.entries[0].offset = 0;
        assert_eq!(SegIndex::decode(&i.encode()), None);
    }

    proptest! {
        #[test]
        fn decoders_never_panic_and_refuse_any_flipped_byte(
            at in 0usize..400, bits in 1u8..=255, junk in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            prop_assert!(SegHeader::decode(&junk).is_none() || junk.len() >= 64);
            let _ = RecHeader::decode(&junk);
            let _ = SegIndex::decode(&junk);
            let mut b = index().encode();
            let at = at % b.len();
            b[at] ^= bits;
            prop_assert_eq!(SegIndex::decode(&b), None);
            let mut r = RecHeader { len: 1, digest: [4; 32], data_crc: 1 }.encode();
            r[at % 64] ^= bits;
            prop_assert_eq!(RecHeader::decode(&r), None);
            let mut s = SegHeader { boot_id: [1; 16], created_ns: 1 }.encode();
            s[at % 64] ^= bits;
            prop_assert_eq!(SegHeader::decode(&s), None);
        }
    }
}
