//! Building a stack's filesystem image and describing it as extents over layer streams.

use crate::format::{Extent, SOURCE_META, sha256};
use crate::tree::FileContent;
use crate::{Error, IoContext};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

pub const BLOCK_SIZE: u32 = 4096;
/// Fixed so the same tree always gives the same image bytes.
pub(crate) const FS_UUID: &str = "c0ca0000-0000-4000-8000-000000000001";

/// Run mke2fs over `tree`, writing an ext4 `image`. (erofs images are written directly:
/// see [`crate::erofs`].)
pub fn build_ext4(tree: &Path, image: &Path) -> Result<(), Error> {
    let size = ext4_size(tree)?;
    File::create(image)
        .and_then(|f| f.set_len(size))
        .ctx(|| format!("creating {}", image.display()))?;
    let mut cmd = Command::new("mke2fs");
    cmd.args([
        "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-I", "256",
    ]);
    cmd.args(["-O", "^has_journal,^resize_inode", "-U", FS_UUID]);
    cmd.args([
        "-E",
        &format!("hash_seed={FS_UUID},lazy_itable_init=0,nodiscard"),
    ]);
    cmd.env("E2FSPROGS_FAKE_TIME", "1");
    cmd.arg("-d").arg(tree).arg(image);
    cmd.env("SOURCE_DATE_EPOCH", "0");
    let out = cmd.output().map_err(|e| Error::IoAt {
        context: format!("running {:?} (is e2fsprogs installed?)", cmd.get_program()),
        source: e,
    })?;
    if !out.status.success() {
        return Err(Error::Convert(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Bytes of file data plus generous room for metadata: mke2fs needs the size up front.
fn ext4_size(tree: &Path) -> Result<u64, Error> {
    fn walk(p: &Path, acc: &mut (u64, u64)) -> Result<(), Error> {
        for e in std::fs::read_dir(p).ctx(|| format!("listing {}", p.display()))? {
            let e = e.ctx(|| "listing".into())?;
            let m = e.metadata().ctx(|| "stat".into())?;
            acc.1 += 1;
            acc.0 += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                walk(&e.path(), acc)?;
            }
        }
        Ok(())
    }
    let mut acc = (0u64, 0u64);
    walk(tree, &mut acc)?;
    let bytes = (acc.0 + acc.1 * 512) * 6 / 5 + (16 << 20);
    Ok(bytes.div_ceil(4096) * 4096)
}

/// Where one block of some file's content comes from.
#[derive(Clone, Copy)]
struct BlockSource {
    layer: u32,
    offset: u64,
    /// Bytes of content in the block; the rest of the block is zero.
    valid: u32,
}

/// The stack index for `image`, plus the metadata bytes it references (source `SOURCE_META`).
pub struct Described {
    pub extents: Vec<Extent>,
    pub meta: Vec<u8>,
    pub image_size: u64,
    pub data_blocks: u64,
    pub meta_blocks: u64,
    pub zero_blocks: u64,
}

/// Match every non-zero image block to a block of file content in one of `tars` (by hash,
/// then confirmed byte for byte); whatever matches nothing is metadata.
pub fn describe(image: &Path, tars: &[File], contents: &[FileContent]) -> Result<Described, Error> {
    let bs = BLOCK_SIZE as usize;
    // Hash file blocks on every core; insert in content order so the first (lowest-layer)
    // copy of a block wins deterministically.
    let hashed: Vec<Vec<([u8; 16], BlockSource)>> = contents
        .par_iter()
        .map(|c| -> Result<_, Error> {
            let tar = &tars[c.layer as usize];
            let mut buf = vec![0u8; bs];
            let mut out = Vec::with_capacity(c.size.div_ceil(bs as u64) as usize);
            let mut off = 0u64;
            while off < c.size {
                let valid = (c.size - off).min(bs as u64) as usize;
                buf[valid..].fill(0);
                tar.read_exact_at(&mut buf[..valid], c.offset + off)
                    .ctx(|| format!("reading layer {} tar", c.layer))?;
                if buf.iter().any(|&b| b != 0) {
                    let src = BlockSource {
                        layer: c.layer,
                        offset: c.offset + off,
                        valid: valid as u32,
                    };
                    out.push((short_hash(&buf), src));
                }
                off += bs as u64;
            }
            Ok(out)
        })
        .collect::<Result<_, Error>>()?;
    let mut by_hash: HashMap<[u8; 16], BlockSource> = HashMap::new();
    for (h, src) in hashed.into_iter().flatten() {
        by_hash.entry(h).or_insert(src);
    }

    let mut f = File::open(image).ctx(|| format!("opening {}", image.display()))?;
    let image_size = f.metadata().ctx(|| "stat image".into())?.len();
    if image_size % bs as u64 != 0 {
        return Err(Error::Convert(format!(
            "image size {image_size} is not block aligned"
        )));
    }
    let mut d = Described {
        extents: Vec::new(),
        meta: Vec::new(),
        image_size,
        data_blocks: 0,
        meta_blocks: 0,
        zero_blocks: 0,
    };
    let mut check = vec![0u8; bs];
    let mut big = vec![0u8; 256 * bs];
    let mut pos = 0u64;
    while pos < image_size {
        let n = ((image_size - pos) as usize).min(big.len());
        f.read_exact(&mut big[..n]).ctx(|| "reading image".into())?;
        let hashes: Vec<Option<[u8; 16]>> = big[..n]
            .par_chunks(bs)
            .map(|b| b.iter().any(|&x| x != 0).then(|| short_hash(b)))
            .collect();
        for (block, hash) in big[..n].chunks(bs).zip(hashes) {
            let at = pos;
            pos += bs as u64;
            let Some(hash) = hash else {
                d.zero_blocks += 1;
                continue;
            };
            let found = by_hash.get(&hash).copied().filter(|s| {
                let v = s.valid as usize;
                tars[s.layer as usize]
                    .read_exact_at(&mut check[..v], s.offset)
                    .is_ok()
                    && check[..v] == block[..v]
                    && block[v..].iter().all(|&b| b == 0)
            });
            let (source, src_offset, len) = match found {
                Some(s) => {
                    d.data_blocks += 1;
                    (s.layer, s.offset, u64::from(s.valid))
                }
                None => {
                    d.meta_blocks += 1;
                    let off = d.meta.len() as u64;
                    d.meta.extend_from_slice(block);
                    (SOURCE_META, off, bs as u64)
                }
            };
            push_extent(&mut d.extents, at, len, source, src_offset);
        }
    }
    Ok(d)
}

pub(crate) fn push_extent(
    v: &mut Vec<Extent>,
    image_offset: u64,
    length: u64,
    source: u32,
    src_offset: u64,
) {
    if let Some(last) = v.last_mut()
        && last.source == source
        && last.image_end() == image_offset
        && last.src_offset + last.length == src_offset
    {
        last.length += length;
        return;
    }
    v.push(Extent {
        image_offset,
        length,
        src_offset,
        source,
    });
}

fn short_hash(block: &[u8]) -> [u8; 16] {
    let mut h = [0u8; 16];
    h.copy_from_slice(&sha256(block)[..16]);
    h
}
