//! Where blob bytes come from: a local OCI layout or a registry. Everything that reads CORA
//! blobs (the lazy source, `cora inspect`, `cora export`) goes through `BlobRead`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {digest} from {source_name}: {msg}")]
    Read {
        digest: String,
        source_name: String,
        msg: String,
    },
}

/// Byte-range access to the blobs of one repository. Calls may block (network); they are
/// made from worker threads, never from a ublk queue thread.
pub trait BlobRead: Send + Sync {
    /// A short name for logs and errors (never contains credentials).
    fn name(&self) -> String;
    fn size(&self, digest: &str) -> Result<u64, BlobError>;
    /// Exactly `len` bytes at `offset`, or an error.
    fn read(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BlobError>;
}

/// Blobs of an OCI image layout on a local filesystem.
pub struct LayoutBlobs {
    pub root: PathBuf,
}

impl LayoutBlobs {
    fn open(&self, digest: &str) -> Result<File, BlobError> {
        let path = blobfmt::oci::blob_path(&self.root, digest).map_err(|e| self.err(digest, e))?;
        File::open(&path).map_err(|e| self.err(digest, e))
    }

    fn err(&self, digest: &str, e: impl std::fmt::Display) -> BlobError {
        BlobError::Read {
            digest: digest.to_string(),
            source_name: self.name(),
            msg: e.to_string(),
        }
    }
}

impl BlobRead for LayoutBlobs {
    fn name(&self) -> String {
        format!("oci:{}", self.root.display())
    }

    fn size(&self, digest: &str) -> Result<u64, BlobError> {
        Ok(self
            .open(digest)?
            .metadata()
            .map_err(|e| self.err(digest, e))?
            .len())
    }

    fn read(&self, digest: &str, offset: u64, len: u64) -> Result<Vec<u8>, BlobError> {
        let f = self.open(digest)?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| self.err(digest, format!("reading {offset}+{len}: {e}")))?;
        Ok(buf)
    }
}
