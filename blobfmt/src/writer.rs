//! Writing a CORA layer blob: data frames from a tar stream, metadata frames, trailer, footer.

use crate::format::{
    ChunkEntry, Footer, MAGIC_META, SKIPPABLE_HEADER, Sha256Digest, Trailer, VERSION, sha256,
    skippable_header,
};
use crate::{Error, IoContext};
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};
use std::io::{Read, Write};

/// FastCDC v2020 parameters and the zstd level of the frames.
#[derive(Debug, Clone, Copy)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    pub zstd_level: i32,
}

impl ChunkParams {
    /// min = avg/4 and max = avg*4, the spread FastCDC's authors use.
    pub fn from_avg(avg: u32, zstd_level: i32) -> Result<Self, Error> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN};
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg) || avg < 1024 {
            return Err(Error::Convert(format!(
                "chunk average {avg} outside 1024..={AVERAGE_MAX}"
            )));
        }
        Ok(ChunkParams {
            min: avg / 4,
            avg,
            max: avg.saturating_mul(4).min(crate::format::MAX_CHUNK),
            zstd_level,
        })
    }

    pub fn validate(&self) -> Result<(), Error> {
        use fastcdc::v2020::{MAXIMUM_MAX, MINIMUM_MIN};
        let ok = self.min >= MINIMUM_MIN
            && self.min <= self.avg
            && self.avg <= self.max
            && self.max <= MAXIMUM_MAX.min(crate::format::MAX_CHUNK);
        if !ok {
            return Err(Error::Convert(format!(
                "chunk sizes need {MINIMUM_MIN} <= min <= avg <= max <= {}: got {}/{}/{}",
                crate::format::MAX_CHUNK,
                self.min,
                self.avg,
                self.max
            )));
        }
        Ok(())
    }
}

impl Default for ChunkParams {
    fn default() -> Self {
        // Average 64 KiB: see FORMAT.md "Chunk size" for the measurement behind it.
        ChunkParams {
            min: 16 << 10,
            avg: 64 << 10,
            max: 256 << 10,
            zstd_level: 3,
        }
    }
}

/// Result of chunking one stream.
pub struct Chunked {
    pub chunks: Vec<ChunkEntry>,
    pub stream_size: u64,
    pub stream_digest: Sha256Digest,
    /// Bytes written to the output.
    pub written: u64,
}

/// Frame each chunk as one zstd frame (`meta == false`) or as a zstd frame inside a
/// skippable frame (`meta == true`), written to `out` starting at blob offset `base`.
/// Compression and hashing run on every core; cutting is sequential.
pub fn write_chunked<R: Read, W: Write>(
    mut input: R,
    out: &mut W,
    base: u64,
    params: &ChunkParams,
    meta: bool,
) -> Result<Chunked, Error> {
    params.validate()?;
    // FastCDC restarts its rolling hash at every cut and looks at most `max` bytes ahead, so
    // cutting a large window and carrying its last (possibly truncated) chunk into the next
    // window gives exactly the cuts of one pass over the whole stream.
    let window = (16usize << 20).max(4 * params.max as usize);
    let mut buf = vec![0u8; window];
    let mut len = 0usize;
    let mut eof = false;
    let mut hasher = Sha256::new();
    let mut chunks = Vec::new();
    let mut frame_pos = base;
    let mut stream_pos = 0u64;
    loop {
        while !eof && len < window {
            match input.read(&mut buf[len..]) {
                Ok(0) => eof = true,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Convert(format!("reading stream to chunk: {e}"))),
            }
        }
        if len == 0 {
            break;
        }
        let mut cuts: Vec<(usize, usize)> =
            fastcdc::v2020::FastCDC::new(&buf[..len], params.min, params.avg, params.max)
                .map(|c| (c.offset, c.length))
                .collect();
        if !eof && cuts.len() > 1 {
            cuts.pop();
        }
        let consumed = cuts.last().map_or(0, |&(o, l)| o + l);
        // The stream's digest is one sequential pass: it runs beside the chunks' compression
        // instead of after it.
        let (framed, ()) = rayon::join(
            || {
                cuts.par_iter()
                    .map(|&(o, l)| {
                        let data = &buf[o..o + l];
                        Ok((sha256(data), compress(data, params.zstd_level)?))
                    })
                    .collect::<Result<Vec<(Sha256Digest, Vec<u8>)>, Error>>()
            },
            || hasher.update(&buf[..consumed]),
        );
        for (&(_, l), (digest, z)) in cuts.iter().zip(framed?) {
            if meta {
                out.write_all(&skippable_header(MAGIC_META, z.len())?)
                    .ctx(|| "writing blob".into())?;
                frame_pos += SKIPPABLE_HEADER as u64;
            }
            out.write_all(&z).ctx(|| "writing blob".into())?;
            let compressed_len = u32::try_from(z.len())
                .map_err(|_| Error::Convert("a compressed chunk exceeds 4 GiB".into()))?;
            chunks.push(ChunkEntry {
                stream_offset: stream_pos,
                frame_offset: frame_pos,
                compressed_len,
                uncompressed_len: l as u32,
                digest,
            });
            frame_pos += z.len() as u64;
            stream_pos += l as u64;
        }
        buf.copy_within(consumed..len, 0);
        len -= consumed;
    }
    Ok(Chunked {
        chunks,
        stream_size: stream_pos,
        stream_digest: hasher.finalize().into(),
        written: frame_pos - base,
    })
}

/// One zstd frame of `data`, with a compression context kept per thread: a context is ~1 MB
/// of tables, worth reusing across thousands of 64 KiB chunks.
fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, Error> {
    use std::cell::RefCell;
    thread_local! {
        static CONTEXT: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { RefCell::new(None) };
    }
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((
                level,
                zstd::bulk::Compressor::new(level).map_err(Error::Io)?,
            ));
        }
        match c.as_mut() {
            Some((_, z)) => z.compress(data).map_err(Error::Io),
            None => Err(Error::Convert("no zstd context".into())),
        }
    })
}

/// Append the trailer and footer; returns the footer written.
pub fn write_trailer<W: Write>(
    out: &mut W,
    trailer_offset: u64,
    trailer: &Trailer,
    zstd_level: i32,
) -> Result<Footer, Error> {
    let frame = trailer.encode_frame(zstd_level)?;
    let footer = Footer {
        version: VERSION,
        flags: 0,
        trailer_offset,
        trailer_length: frame.len() as u64,
        trailer_digest: sha256(&frame),
    };
    out.write_all(&frame).ctx(|| "writing trailer".into())?;
    out.write_all(&footer.encode())
        .ctx(|| "writing footer".into())?;
    Ok(footer)
}

/// A `Write` that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    pub written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }
    pub fn finish(self) -> (W, Sha256Digest, u64) {
        (self.inner, self.hasher.finalize().into(), self.written)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
