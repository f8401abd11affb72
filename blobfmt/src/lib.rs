//! The CORA image format. See `FORMAT.md` beside this crate.
