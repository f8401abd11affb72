//! The CORA image format: chunked `tar+zstd` layer blobs with a trailer that indexes each
//! layer's tar stream and describes the filesystem image of the layer stack.
//! See `FORMAT.md` beside this crate for the byte layout and the design trade-offs.

pub mod convert;
pub mod dirsrc;
pub mod erofs;
pub mod format;
pub mod image;
pub mod oci;
pub mod platform;
pub mod stack;
pub mod staging;
pub mod tree;
pub mod writer;

pub use format::{ChunkEntry, Extent, Footer, FsType, Lower, Sha256Digest, Trailer};
pub use stack::{Piece, Stack, StreamId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are not a CORA blob at all (a plain OCI layer, say).
    #[error("not a CORA blob: {0}")]
    NotCora(String),
    /// The bytes claim to be CORA but are malformed, truncated or of another version.
    #[error("invalid CORA data: {0}")]
    Format(String),
    #[error("{context}: {source}")]
    IoAt {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(std::io::Error),
    #[error("{0}")]
    Convert(String),
}

pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|source| Error::IoAt {
            context: context(),
            source,
        })
    }
}

pub use format::{decode_chunk, oci_digest, parse_oci_digest, read_trailer, sha256};
