//! CORA images read lazily: an image's layer stack as a [`cora_read::BlockSource`] whose
//! chunks come from the host's cache ([`cache`]) or, on a miss, from the registry
//! ([`registry`]), verified before use.

pub use blobfmt;
pub use cache;
pub use registry;

pub mod blobs;
pub mod device;
pub mod imageref;
pub mod inspect;
pub mod pace;
pub mod remote;
pub mod source;
pub mod trace;
pub mod unpack;
