//! A layer stack as a reader sees it: the top layer's stack index over every layer's chunk
//! table, and the plan that turns an image byte range into chunk pieces.

use crate::Error;
use crate::format::{
    ChunkEntry, SOURCE_META, Sha256Digest, Trailer, chunk_at, first_extent_from, oci_digest,
};

/// A stream whose chunks hold image bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamId {
    /// The tar stream of layer `n` of the stack (0 = bottom).
    Layer(u32),
    /// The top layer's metadata stream.
    Meta,
}

/// One step of serving an image range, in image order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` zero bytes (a hole or padding after a file's last byte).
    Zero { len: u64 },
    /// Bytes `[offset, offset + len)` of chunk `index` of `stream`.
    Chunk {
        stream: StreamId,
        index: usize,
        offset: u32,
        len: u32,
    },
}

impl Piece {
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Zero { len } => len,
            Piece::Chunk { len, .. } => u64::from(len),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Stack {
    /// Trailers bottom first; the last one is the top whose stack index is served.
    layers: Vec<Trailer>,
}

impl Stack {
    /// `layers[i]` is the trailer of the blob whose digest is `blob_digests[i]`.
    /// Checks that each layer was converted against exactly these lowers and that every
    /// extent stays inside its stream, so `plan` never indexes out of range.
    pub fn new(layers: Vec<Trailer>, blob_digests: &[Sha256Digest]) -> Result<Stack, Error> {
        let Some(top) = layers.last() else {
            return Err(Error::Format("a stack needs at least one layer".into()));
        };
        if blob_digests.len() != layers.len() {
            return Err(Error::Format(
                "one blob digest per layer is required".into(),
            ));
        }
        for (i, t) in layers.iter().enumerate() {
            if t.lowers.len() != i {
                return Err(Error::Format(format!(
                    "layer {i} ({}) was converted as layer {} of its stack",
                    oci_digest(&blob_digests[i]),
                    t.lowers.len()
                )));
            }
            for (j, lower) in t.lowers.iter().enumerate() {
                if lower.blob_digest != blob_digests[j] || lower.diff_id != layers[j].diff_id {
                    return Err(Error::Format(format!(
                        "layer {i} was converted over {} as layer {j}, but the image has {}",
                        oci_digest(&lower.blob_digest),
                        oci_digest(&blob_digests[j])
                    )));
                }
            }
        }
        for (i, e) in top.extents.iter().enumerate() {
            if e.source == SOURCE_META {
                continue;
            }
            let size = layers[e.source as usize].stream_size;
            if e.src_offset + e.length > size {
                return Err(Error::Format(format!(
                    "stack index extent {i} reads past the end of layer {}",
                    e.source
                )));
            }
        }
        Ok(Stack { layers })
    }

    pub fn top(&self) -> &Trailer {
        self.layers.last().expect("Stack::new checked non-empty")
    }

    pub fn layers(&self) -> &[Trailer] {
        &self.layers
    }

    pub fn image_size(&self) -> u64 {
        self.top().image_size
    }

    pub fn chunks(&self, stream: StreamId) -> &[ChunkEntry] {
        match stream {
            StreamId::Layer(n) => &self.layers[n as usize].chunks,
            StreamId::Meta => &self.top().meta_chunks,
        }
    }

    pub fn chunk(&self, stream: StreamId, index: usize) -> &ChunkEntry {
        &self.chunks(stream)[index]
    }

    /// The last chunk of the extent that holds image byte `offset`: a regular file's data is
    /// one extent (the tar stream holds it in one piece), so this is where the file around
    /// `offset` ends in its stream. `None` in a hole or past the end.
    pub fn extent_last_chunk(&self, offset: u64) -> Option<(StreamId, usize)> {
        let extents = &self.top().extents;
        let e = extents
            .get(first_extent_from(extents, offset))
            .filter(|e| e.image_offset <= offset && e.length > 0)?;
        let stream = if e.source == SOURCE_META {
            StreamId::Meta
        } else {
            StreamId::Layer(e.source)
        };
        let last = chunk_at(self.chunks(stream), e.src_offset.checked_add(e.length - 1)?)?;
        Some((stream, last))
    }

    /// The pieces that make up image bytes `[offset, offset + len)`, in order.
    pub fn plan(&self, offset: u64, len: u64) -> Result<Vec<Piece>, Error> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.image_size())
            .ok_or_else(|| {
                Error::Format(format!(
                    "read {offset}+{len} past the image end {}",
                    self.image_size()
                ))
            })?;
        let extents = &self.top().extents;
        let mut out = Vec::new();
        let mut pos = offset;
        let mut i = first_extent_from(extents, offset);
        while pos < end {
            let Some(e) = extents.get(i).filter(|e| e.image_offset < end) else {
                out.push(Piece::Zero { len: end - pos });
                break;
            };
            if e.image_offset > pos {
                out.push(Piece::Zero {
                    len: e.image_offset - pos,
                });
                pos = e.image_offset;
            }
            let stop = e.image_end().min(end);
            let stream = if e.source == SOURCE_META {
                StreamId::Meta
            } else {
                StreamId::Layer(e.source)
            };
            let chunks = self.chunks(stream);
            let mut src = e.src_offset + (pos - e.image_offset);
            let src_end = src + (stop - pos);
            while src < src_end {
                let index = chunk_at(chunks, src).ok_or_else(|| {
                    Error::Format(format!("no chunk covers {stream:?} offset {src}"))
                })?;
                let c = &chunks[index];
                let take = (c.stream_end().min(src_end)) - src;
                out.push(Piece::Chunk {
                    stream,
                    index,
                    offset: (src - c.stream_offset) as u32,
                    len: take as u32,
                });
                src += take;
            }
            pos = stop;
            i += 1;
        }
        Ok(out)
    }
}
