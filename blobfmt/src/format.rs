//! On-disk structures of a CORA layer blob: footer, trailer, chunk tables, stack index.
//!
//! Layout (all integers little-endian; see FORMAT.md for the full description):
//!
//! ```text
//! [zstd frame: chunk 0] ... [zstd frame: chunk n-1]          data frames = the layer's tar
//! [skippable META: zstd frame of meta chunk 0] ...            filesystem metadata of the stack
//! [skippable TRAILER: zstd(trailer body)]                     tables, see `Trailer`
//! [skippable FOOTER: 64-byte footer]                          locates and seals the trailer
//! ```

use crate::Error;
use sha2::{Digest as _, Sha256};
use std::io::Read;

/// Format version written by this code; readers reject others.
pub const VERSION: u16 = 1;

/// Skippable frame magics (zstd reserves 0x184D2A50..=0x184D2A5F); distinct values make dumps readable.
pub const MAGIC_META: u32 = 0x184D_2A5B;
pub const MAGIC_TRAILER: u32 = 0x184D_2A5D;
pub const MAGIC_FOOTER: u32 = 0x184D_2A5E;

pub const SKIPPABLE_HEADER: usize = 8;
pub const FOOTER_PAYLOAD: usize = 64;
/// Bytes a reader fetches from the end of a blob to find the trailer.
pub const FOOTER_FRAME: usize = SKIPPABLE_HEADER + FOOTER_PAYLOAD;

const FOOTER_MAGIC: &[u8; 8] = b"CORAFOOT";
const TRAILER_MAGIC: &[u8; 8] = b"CORATRLR";
const TRAILER_HEADER_LEN: usize = 136;
const CHUNK_ENTRY_LEN: usize = 56;
const EXTENT_LEN: usize = 32;
const LOWER_LEN: usize = 64;

/// Largest chunk a reader accepts; bounds allocations driven by untrusted tables.
pub const MAX_CHUNK: u32 = 16 << 20;
/// Largest decompressed trailer a reader accepts.
pub const MAX_TRAILER: usize = 512 << 20;

/// `Extent::source` value naming the stack's metadata stream instead of a layer.
pub const SOURCE_META: u32 = u32::MAX;

pub type Sha256Digest = [u8; 32];

pub fn sha256(data: &[u8]) -> Sha256Digest {
    Sha256::digest(data).into()
}

/// `sha256:<hex>` as OCI writes digests.
pub fn oci_digest(d: &Sha256Digest) -> String {
    format!("sha256:{}", hex::encode(d))
}

pub fn parse_oci_digest(s: &str) -> Result<Sha256Digest, Error> {
    let hex_part = s
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::Format(format!("digest {s:?} is not sha256:<hex>")))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| Error::Format(format!("digest {s:?} is not 64 hex digits")))?;
    Ok(out)
}

pub fn skippable_header(magic: u32, len: usize) -> Result<[u8; 8], Error> {
    let len = u32::try_from(len)
        .map_err(|_| Error::Format(format!("skippable frame of {len} bytes exceeds 4 GiB")))?;
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&magic.to_le_bytes());
    h[4..].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// Fixed-size seal at the very end of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub version: u16,
    pub flags: u32,
    /// Offset of the trailer's skippable frame (its 8-byte header included).
    pub trailer_offset: u64,
    /// Length of the trailer's skippable frame, header included.
    pub trailer_length: u64,
    /// sha256 of those `trailer_length` bytes.
    pub trailer_digest: Sha256Digest,
}

impl Footer {
    pub fn encode(&self) -> [u8; FOOTER_FRAME] {
        let mut b = [0u8; FOOTER_FRAME];
        b[..4].copy_from_slice(&MAGIC_FOOTER.to_le_bytes());
        b[4..8].copy_from_slice(&(FOOTER_PAYLOAD as u32).to_le_bytes());
        let p = &mut b[8..];
        p[..8].copy_from_slice(FOOTER_MAGIC);
        p[8..10].copy_from_slice(&self.version.to_le_bytes());
        p[12..16].copy_from_slice(&self.flags.to_le_bytes());
        p[16..24].copy_from_slice(&self.trailer_offset.to_le_bytes());
        p[24..32].copy_from_slice(&self.trailer_length.to_le_bytes());
        p[32..64].copy_from_slice(&self.trailer_digest);
        b
    }

    /// Parse the last `FOOTER_FRAME` bytes of a blob of `blob_size` bytes.
    pub fn decode(b: &[u8], blob_size: u64) -> Result<Footer, Error> {
        if b.len() != FOOTER_FRAME {
            return Err(Error::Format(format!(
                "footer is {} bytes, expected {FOOTER_FRAME} (truncated blob?)",
                b.len()
            )));
        }
        let mut r = Cursor::new(b, "footer");
        let magic = r.u32()?;
        let len = r.u32()?;
        if magic != MAGIC_FOOTER || len as usize != FOOTER_PAYLOAD {
            return Err(Error::NotCora(
                "no CORA footer at the end of the blob".to_string(),
            ));
        }
        if r.bytes(8)? != FOOTER_MAGIC {
            return Err(Error::NotCora("footer magic is not CORAFOOT".into()));
        }
        let version = r.u16()?;
        let _reserved = r.u16()?;
        if version != VERSION {
            return Err(Error::Format(format!(
                "unsupported CORA format version {version} (this build reads {VERSION})"
            )));
        }
        let f = Footer {
            version,
            flags: r.u32()?,
            trailer_offset: r.u64()?,
            trailer_length: r.u64()?,
            trailer_digest: r.digest()?,
        };
        let end = f
            .trailer_offset
            .checked_add(f.trailer_length)
            .ok_or_else(|| Error::Format("footer: trailer range overflows".into()))?;
        if end.checked_add(FOOTER_FRAME as u64) != Some(blob_size)
            || f.trailer_length < SKIPPABLE_HEADER as u64
        {
            return Err(Error::Format(format!(
                "footer: trailer at {}+{} does not end where the footer starts (blob is {blob_size} bytes)",
                f.trailer_offset, f.trailer_length
            )));
        }
        Ok(f)
    }
}

/// One chunk: a byte range of a stream stored as one zstd frame in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the chunk in its (uncompressed) stream.
    pub stream_offset: u64,
    /// Offset of the chunk's zstd frame in the blob.
    pub frame_offset: u64,
    pub compressed_len: u32,
    pub uncompressed_len: u32,
    /// sha256 of the uncompressed chunk: its name in every cache.
    pub digest: Sha256Digest,
}

impl ChunkEntry {
    pub fn stream_end(&self) -> u64 {
        self.stream_offset + u64::from(self.uncompressed_len)
    }
    pub fn frame_end(&self) -> u64 {
        self.frame_offset + u64::from(self.compressed_len)
    }
}

/// Image bytes `[image_offset, image_offset + length)` equal bytes `[src_offset, ..)` of a
/// stream: layer `source` of the stack, or the metadata stream (`SOURCE_META`).
/// Image bytes covered by no extent are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub image_offset: u64,
    pub length: u64,
    pub src_offset: u64,
    pub source: u32,
}

impl Extent {
    pub fn image_end(&self) -> u64 {
        self.image_offset + self.length
    }
}

/// A lower layer of the stack, as this layer was converted against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lower {
    /// Digest of the lower layer's CORA blob.
    pub blob_digest: Sha256Digest,
    /// sha256 of its uncompressed tar (the config's diff_id).
    pub diff_id: Sha256Digest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Erofs,
    Ext4,
}

impl FsType {
    fn code(self) -> u8 {
        match self {
            FsType::Erofs => 1,
            FsType::Ext4 => 2,
        }
    }
    fn from_code(c: u8) -> Result<Self, Error> {
        match c {
            1 => Ok(FsType::Erofs),
            2 => Ok(FsType::Ext4),
            _ => Err(Error::Format(format!("unknown filesystem type code {c}"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            FsType::Erofs => "erofs",
            FsType::Ext4 => "ext4",
        }
    }
}

impl std::str::FromStr for FsType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "erofs" => Ok(FsType::Erofs),
            "ext4" => Ok(FsType::Ext4),
            _ => Err(Error::Format(format!(
                "unknown filesystem {s:?} (erofs|ext4)"
            ))),
        }
    }
}

/// Everything a reader needs about one layer blob and the stack it tops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trailer {
    pub flags: u32,
    pub block_size: u32,
    pub fs_type: FsType,
    pub chunk_min: u32,
    pub chunk_avg: u32,
    pub chunk_max: u32,
    /// Length of this layer's uncompressed tar stream.
    pub stream_size: u64,
    /// Bytes of data frames at the start of the blob.
    pub data_size: u64,
    /// Size of the stack's filesystem image.
    pub image_size: u64,
    /// Length of the stack's metadata stream.
    pub meta_size: u64,
    /// sha256 of this layer's tar stream.
    pub diff_id: Sha256Digest,
    /// Layers below this one, bottom first; this layer is index `lowers.len()` of the stack.
    pub lowers: Vec<Lower>,
    pub chunks: Vec<ChunkEntry>,
    pub meta_chunks: Vec<ChunkEntry>,
    pub extents: Vec<Extent>,
}

impl Trailer {
    /// Position of this layer in its stack (0 = bottom).
    pub fn position(&self) -> u32 {
        self.lowers.len() as u32
    }

    pub fn encode_body(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            TRAILER_HEADER_LEN
                + self.lowers.len() * LOWER_LEN
                + (self.chunks.len() + self.meta_chunks.len()) * CHUNK_ENTRY_LEN
                + self.extents.len() * EXTENT_LEN,
        );
        b.extend_from_slice(TRAILER_MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&(TRAILER_HEADER_LEN as u16).to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.push(self.fs_type.code());
        b.extend_from_slice(&[0u8; 3]);
        b.extend_from_slice(&self.chunk_min.to_le_bytes());
        b.extend_from_slice(&self.chunk_avg.to_le_bytes());
        b.extend_from_slice(&self.chunk_max.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            self.stream_size,
            self.data_size,
            self.image_size,
            self.meta_size,
            self.lowers.len() as u64,
            self.chunks.len() as u64,
            self.meta_chunks.len() as u64,
            self.extents.len() as u64,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.diff_id);
        debug_assert_eq!(b.len(), TRAILER_HEADER_LEN);
        for l in &self.lowers {
            b.extend_from_slice(&l.blob_digest);
            b.extend_from_slice(&l.diff_id);
        }
        for c in self.chunks.iter().chain(&self.meta_chunks) {
            b.extend_from_slice(&c.stream_offset.to_le_bytes());
            b.extend_from_slice(&c.frame_offset.to_le_bytes());
            b.extend_from_slice(&c.compressed_len.to_le_bytes());
            b.extend_from_slice(&c.uncompressed_len.to_le_bytes());
            b.extend_from_slice(&c.digest);
        }
        for e in &self.extents {
            b.extend_from_slice(&e.image_offset.to_le_bytes());
            b.extend_from_slice(&e.length.to_le_bytes());
            b.extend_from_slice(&e.src_offset.to_le_bytes());
            b.extend_from_slice(&e.source.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
        }
        b
    }

    /// The trailer's skippable frame: header + zstd(body).
    pub fn encode_frame(&self, level: i32) -> Result<Vec<u8>, Error> {
        let body = self.encode_body();
        let z = zstd::bulk::compress(&body, level).map_err(Error::Io)?;
        let mut out = Vec::with_capacity(z.len() + SKIPPABLE_HEADER);
        out.extend_from_slice(&skippable_header(MAGIC_TRAILER, z.len())?);
        out.extend_from_slice(&z);
        Ok(out)
    }

    /// Parse the trailer frame after checking it against the footer's digest.
    pub fn decode_frame(frame: &[u8], footer: &Footer) -> Result<Trailer, Error> {
        if frame.len() as u64 != footer.trailer_length {
            return Err(Error::Format(format!(
                "trailer is {} bytes, footer says {}",
                frame.len(),
                footer.trailer_length
            )));
        }
        if sha256(frame) != footer.trailer_digest {
            return Err(Error::Format(
                "trailer digest mismatch (corrupted or truncated trailer)".into(),
            ));
        }
        let mut r = Cursor::new(frame, "trailer frame");
        let magic = r.u32()?;
        let len = r.u32()? as usize;
        if magic != MAGIC_TRAILER || len != frame.len() - SKIPPABLE_HEADER {
            return Err(Error::Format("trailer frame header is invalid".into()));
        }
        let mut body = Vec::new();
        zstd::stream::read::Decoder::new(&frame[SKIPPABLE_HEADER..])
            .map_err(Error::Io)?
            .take(MAX_TRAILER as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| Error::Format(format!("trailer does not decompress: {e}")))?;
        if body.len() > MAX_TRAILER {
            return Err(Error::Format(format!(
                "trailer decompresses to more than {MAX_TRAILER} bytes"
            )));
        }
        let t = Self::decode_body(&body)?;
        if t.data_size > footer.trailer_offset {
            return Err(Error::Format(
                "trailer: data frames overlap the trailer".into(),
            ));
        }
        for c in &t.meta_chunks {
            if c.frame_end() > footer.trailer_offset {
                return Err(Error::Format(
                    "trailer: a metadata frame overlaps the trailer".into(),
                ));
            }
        }
        Ok(t)
    }

    /// Parse and validate a decompressed trailer body. Never panics on any input.
    pub fn decode_body(body: &[u8]) -> Result<Trailer, Error> {
        let mut r = Cursor::new(body, "trailer");
        if r.bytes(8)? != TRAILER_MAGIC {
            return Err(Error::Format("trailer magic is not CORATRLR".into()));
        }
        let version = r.u16()?;
        if version != VERSION {
            return Err(Error::Format(format!(
                "unsupported trailer version {version} (this build reads {VERSION})"
            )));
        }
        let header_len = r.u16()? as usize;
        if header_len < TRAILER_HEADER_LEN {
            return Err(Error::Format(format!(
                "trailer header length {header_len} too small"
            )));
        }
        let flags = r.u32()?;
        let block_size = r.u32()?;
        let fs_type = FsType::from_code(r.u8()?)?;
        r.bytes(3)?;
        let (chunk_min, chunk_avg, chunk_max) = (r.u32()?, r.u32()?, r.u32()?);
        r.u32()?;
        let stream_size = r.u64()?;
        let data_size = r.u64()?;
        let image_size = r.u64()?;
        let meta_size = r.u64()?;
        let n_lowers = r.u64()?;
        let n_chunks = r.u64()?;
        let n_meta = r.u64()?;
        let n_extents = r.u64()?;
        let diff_id = r.digest()?;
        // Future versions may grow the header; skip what we do not know.
        r.bytes(header_len - TRAILER_HEADER_LEN)?;
        if !(512..=65536).contains(&block_size) || !block_size.is_power_of_two() {
            return Err(Error::Format(format!(
                "trailer: bad block size {block_size}"
            )));
        }
        // Counts must fit in the remaining bytes before anything is allocated.
        let need = n_lowers
            .checked_mul(LOWER_LEN as u64)
            .and_then(|a| {
                n_chunks
                    .checked_add(n_meta)?
                    .checked_mul(CHUNK_ENTRY_LEN as u64)?
                    .checked_add(a)
            })
            .and_then(|a| a.checked_add(n_extents.checked_mul(EXTENT_LEN as u64)?))
            .ok_or_else(|| Error::Format("trailer: table sizes overflow".into()))?;
        if need != r.remaining() as u64 {
            return Err(Error::Format(format!(
                "trailer: tables need {need} bytes, {} present",
                r.remaining()
            )));
        }
        let mut lowers = Vec::with_capacity(n_lowers as usize);
        for _ in 0..n_lowers {
            lowers.push(Lower {
                blob_digest: r.digest()?,
                diff_id: r.digest()?,
            });
        }
        let chunks = read_chunks(&mut r, n_chunks)?;
        let meta_chunks = read_chunks(&mut r, n_meta)?;
        let mut extents = Vec::with_capacity(n_extents as usize);
        for _ in 0..n_extents {
            let e = Extent {
                image_offset: r.u64()?,
                length: r.u64()?,
                src_offset: r.u64()?,
                source: r.u32()?,
            };
            r.u32()?;
            extents.push(e);
        }
        let t = Trailer {
            flags,
            block_size,
            fs_type,
            chunk_min,
            chunk_avg,
            chunk_max,
            stream_size,
            data_size,
            image_size,
            meta_size,
            diff_id,
            lowers,
            chunks,
            meta_chunks,
            extents,
        };
        t.validate()?;
        Ok(t)
    }

    /// Structural invariants every lookup relies on.
    fn validate(&self) -> Result<(), Error> {
        check_stream_table("data", &self.chunks, self.stream_size)?;
        check_stream_table("metadata", &self.meta_chunks, self.meta_size)?;
        // Data frames are back to back from offset 0.
        let mut frame = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.frame_offset != frame {
                return Err(Error::Format(format!(
                    "trailer: data chunk {i} frame at {} expected {frame}",
                    c.frame_offset
                )));
            }
            frame += u64::from(c.compressed_len);
        }
        if frame != self.data_size {
            return Err(Error::Format(
                "trailer: data frames do not add up to data size".into(),
            ));
        }
        let mut prev_meta_end = self.data_size;
        for (i, c) in self.meta_chunks.iter().enumerate() {
            // Checked: a frame ending within a header of u64::MAX is as misplaced as any.
            let earliest = prev_meta_end.checked_add(SKIPPABLE_HEADER as u64);
            if earliest.is_none_or(|min| c.frame_offset < min) {
                return Err(Error::Format(format!(
                    "trailer: metadata chunk {i} frame misplaced"
                )));
            }
            prev_meta_end = c.frame_end();
        }
        let position = self.position();
        let mut prev_end = 0u64;
        for (i, e) in self.extents.iter().enumerate() {
            let end = e.image_offset.checked_add(e.length);
            let src_end = e.src_offset.checked_add(e.length);
            let ok = e.length > 0
                && e.image_offset >= prev_end
                && end.is_some_and(|x| x <= self.image_size)
                && src_end.is_some()
                && (e.source == SOURCE_META || e.source <= position)
                && (e.source != SOURCE_META || src_end.is_some_and(|x| x <= self.meta_size))
                && (e.source != position || src_end.is_some_and(|x| x <= self.stream_size));
            if !ok {
                return Err(Error::Format(format!(
                    "trailer: extent {i} is invalid: {e:?}"
                )));
            }
            prev_end = end.unwrap_or(0);
        }
        Ok(())
    }
}

fn check_stream_table(what: &str, chunks: &[ChunkEntry], size: u64) -> Result<(), Error> {
    let mut off = 0u64;
    for (i, c) in chunks.iter().enumerate() {
        if c.stream_offset != off
            || c.uncompressed_len == 0
            || c.uncompressed_len > MAX_CHUNK
            || c.compressed_len == 0
            || c.frame_offset
                .checked_add(u64::from(c.compressed_len))
                .is_none()
        {
            return Err(Error::Format(format!(
                "trailer: {what} chunk {i} is invalid: {c:?}"
            )));
        }
        off += u64::from(c.uncompressed_len);
    }
    if off != size {
        return Err(Error::Format(format!(
            "trailer: {what} chunks cover {off} bytes, stream is {size}"
        )));
    }
    Ok(())
}

fn read_chunks(r: &mut Cursor<'_>, n: u64) -> Result<Vec<ChunkEntry>, Error> {
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        v.push(ChunkEntry {
            stream_offset: r.u64()?,
            frame_offset: r.u64()?,
            compressed_len: r.u32()?,
            uncompressed_len: r.u32()?,
            digest: r.digest()?,
        });
    }
    Ok(v)
}

/// Index of the chunk holding stream byte `offset`, O(log n).
pub fn chunk_at(chunks: &[ChunkEntry], offset: u64) -> Option<usize> {
    let i = chunks.partition_point(|c| c.stream_end() <= offset);
    (i < chunks.len() && chunks[i].stream_offset <= offset).then_some(i)
}

/// Index of the first extent ending after image byte `offset`, O(log n).
pub fn first_extent_from(extents: &[Extent], offset: u64) -> usize {
    extents.partition_point(|e| e.image_end() <= offset)
}

/// Bounds-checked little-endian reader over untrusted bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.remaining() < n {
            return Err(Error::Format(format!(
                "{} truncated at byte {} (needed {n} more)",
                self.what, self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn digest(&mut self) -> Result<Sha256Digest, Error> {
        self.array()
    }
}

/// Decompress one chunk's frame and check it against its table entry. The only way chunk
/// bytes should ever be produced from untrusted data.
pub fn decode_chunk(frame: &[u8], entry: &ChunkEntry) -> Result<Vec<u8>, Error> {
    if frame.len() != entry.compressed_len as usize {
        return Err(Error::Format(format!(
            "chunk {}: frame is {} bytes, table says {}",
            hex::encode(entry.digest),
            frame.len(),
            entry.compressed_len
        )));
    }
    let data = decompress_frame(frame, entry.uncompressed_len as usize).map_err(|e| {
        Error::Format(format!(
            "chunk {}: does not decompress: {e}",
            hex::encode(entry.digest)
        ))
    })?;
    if data.len() != entry.uncompressed_len as usize || sha256(&data) != entry.digest {
        return Err(Error::Format(format!(
            "chunk {}: digest mismatch (corrupted data)",
            hex::encode(entry.digest)
        )));
    }
    Ok(data)
}

/// `zstd::bulk::decompress` with one decompression context per thread: creating a context per
/// chunk showed as ~10 % of the fetch threads' time in a cold whole-stack read.
fn decompress_frame(frame: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = match &mut *slot {
            Some(d) => d,
            None => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(frame, capacity)
    })
}

/// Read footer then trailer through `read(offset, len)` (two range reads).
pub fn read_trailer(
    blob_size: u64,
    read: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>, Error>,
) -> Result<(Footer, Trailer), Error> {
    if blob_size < FOOTER_FRAME as u64 {
        return Err(Error::NotCora(format!(
            "blob of {blob_size} bytes is too short for a CORA footer"
        )));
    }
    let tail = read(blob_size - FOOTER_FRAME as u64, FOOTER_FRAME as u64)?;
    let footer = Footer::decode(&tail, blob_size)?;
    if footer.trailer_length > (MAX_TRAILER as u64) {
        return Err(Error::Format("trailer frame is implausibly large".into()));
    }
    let frame = read(footer.trailer_offset, footer.trailer_length)?;
    let trailer = Trailer::decode_frame(&frame, &footer)?;
    Ok((footer, trailer))
}
