//! An erofs image written straight from a stack's [`Tree`]: the metadata (superblock, inodes,
//! xattrs, directories) is built in memory, and the file data is never written at all: each
//! file's blocks are one extent over its bytes in a layer tar. No staging tree, no mkfs, no
//! matching image blocks back to tar bytes.
//!
//! The image: 4 KiB blocks, uncompressed, extended (64-byte) inodes so ids and times keep
//! their full width. Block 0 holds the superblock and the first inodes; inodes follow in
//! breadth-first order (a directory's children sit together), then the directory blocks, then
//! file data in tar order, so reading ahead in the image reads ahead in the layer stream.
//! A file's last block is never packed into metadata: its blocks stay a copy of its tar
//! bytes, zero-padded. Directory and symlink tails are packed behind their inode.

use crate::Error;
use crate::format::SOURCE_META;
use crate::image::{BLOCK_SIZE, Described, FS_UUID, push_extent};
use crate::tree::{Kind, NodeId, ROOT, Tree};

const BS: usize = BLOCK_SIZE as usize;
const SUPER_OFFSET: usize = 1024;
const SUPER_SIZE: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
const INODE_SIZE: usize = 64;
/// Inodes sit on 32-byte slots; an inode's nid is its slot number.
const SLOT: usize = 32;
const DIRENT_SIZE: usize = 12;
const XATTR_HEADER: usize = 12;
const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 2;

/// A directory's entries in byte order: (name, child).
type Entries = Vec<(Vec<u8>, NodeId)>;

/// Where one inode's data lives, decided before any nid is known.
struct Inode {
    id: NodeId,
    nid: u64,
    nlink: u32,
    /// The inline xattr area (header + entries), empty without xattrs.
    xattrs: Vec<u8>,
    size: u64,
    /// Bytes of data packed right behind the inode (directory or symlink tail).
    tail: usize,
    /// Whole blocks of data, in the metadata area (directories, long symlinks) or in the data
    /// area (files).
    blocks: u64,
    start_block: u64,
    /// A directory's entries, grouped by the block they go in: (name, child).
    dir_blocks: Vec<Entries>,
}

impl Inode {
    fn layout(&self) -> u16 {
        if self.tail > 0 {
            FLAT_INLINE
        } else {
            FLAT_PLAIN
        }
    }

    fn record_size(&self) -> usize {
        INODE_SIZE + self.xattrs.len() + self.tail
    }
}

/// Build the erofs image of `tree`: its metadata bytes and the extents that make the image.
pub fn build(tree: &Tree) -> Result<Described, Error> {
    let (order, parent) = breadth_first(tree);
    let mut index = vec![usize::MAX; tree.len()];
    for (i, &id) in order.iter().enumerate() {
        index[id] = i;
    }
    let mut nlink = vec![0u32; order.len()];
    for &id in &order {
        if let Kind::Dir(entries) = &tree.node(id).kind {
            nlink[index[id]] += 2;
            for &child in entries.values() {
                match tree.node(child).kind {
                    Kind::Dir(_) => nlink[index[id]] += 1,
                    _ => nlink[index[child]] += 1,
                }
            }
        }
    }

    // Sizes and layouts.
    let mut inodes = Vec::with_capacity(order.len());
    for (i, &id) in order.iter().enumerate() {
        let node = tree.node(id);
        let mut inode = Inode {
            id,
            nid: 0,
            nlink: nlink[i].max(1),
            xattrs: xattr_area(&node.xattrs)?,
            size: 0,
            tail: 0,
            blocks: 0,
            start_block: 0,
            dir_blocks: Vec::new(),
        };
        let inline_room = BS.saturating_sub(INODE_SIZE + inode.xattrs.len());
        match &node.kind {
            Kind::Dir(entries) => {
                let mut all: Entries = Vec::with_capacity(entries.len() + 2);
                all.push((b".".to_vec(), id));
                all.push((b"..".to_vec(), parent[i]));
                all.extend(entries.iter().map(|(n, &c)| (n.clone(), c)));
                all.sort_by(|a, b| a.0.cmp(&b.0));
                let (blocks, last_used) = pack_dir(all);
                inode.size = ((blocks.len() - 1) * BS + last_used) as u64;
                inode.dir_blocks = blocks;
                meta_layout(&mut inode, inline_room);
            }
            Kind::Symlink(target) => {
                inode.size = target.len() as u64;
                meta_layout(&mut inode, inline_room);
            }
            Kind::File { size, .. } => {
                inode.size = *size;
                inode.blocks = size.div_ceil(BS as u64);
            }
            Kind::Char { .. } | Kind::Block { .. } | Kind::Fifo => {}
        }
        inodes.push(inode);
    }

    // Inode slots: a packed tail must not cross a block, nor should an inode's fixed part.
    let mut cursor = SUPER_OFFSET + SUPER_SIZE;
    for inode in &mut inodes {
        cursor = cursor.next_multiple_of(SLOT);
        let in_block = cursor % BS;
        let fits = |len: usize| in_block + len <= BS;
        if (inode.tail > 0 && !fits(inode.record_size())) || !fits(INODE_SIZE) {
            cursor = cursor.next_multiple_of(BS);
        }
        inode.nid = (cursor / SLOT) as u64;
        cursor += inode.record_size();
    }
    let root_nid = u16::try_from(inodes[0].nid)
        .map_err(|_| Error::Convert("the root inode is past what erofs can address".into()))?;

    // Whole metadata blocks (directories, long symlinks) after the inodes, then file data
    // in tar order.
    let mut next_block = cursor.div_ceil(BS) as u64;
    for inode in &mut inodes {
        if !matches!(tree.node(inode.id).kind, Kind::File { .. }) && inode.blocks > 0 {
            inode.start_block = next_block;
            next_block += inode.blocks;
        }
    }
    let meta_blocks = next_block;
    let mut files: Vec<(u32, u64, usize)> = inodes
        .iter()
        .enumerate()
        .filter_map(|(i, inode)| match tree.node(inode.id).kind {
            Kind::File {
                layer,
                offset,
                size,
            } if size > 0 => Some((layer, offset, i)),
            _ => None,
        })
        .collect();
    files.sort_unstable();
    for &(_, _, i) in &files {
        inodes[i].start_block = next_block;
        next_block += inodes[i].blocks;
    }
    let total_blocks = u32::try_from(next_block).map_err(|_| {
        Error::Convert(format!(
            "the image needs {next_block} blocks, past erofs's 32-bit block numbers"
        ))
    })?;

    let nid_of = |id: NodeId| inodes[index[id]].nid;
    let mut meta = vec![0u8; meta_blocks as usize * BS];
    write_super(&mut meta, root_nid, inodes.len() as u64, total_blocks);
    for (i, inode) in inodes.iter().enumerate() {
        let node = tree.node(inode.id);
        let at = inode.nid as usize * SLOT;
        let (mode, i_u) = match &node.kind {
            Kind::Dir(_) => (0o040000, inode.start_block as u32),
            Kind::File { .. } => (0o100000, inode.start_block as u32),
            Kind::Symlink(_) => (0o120000, inode.start_block as u32),
            Kind::Char { major, minor } => (0o020000, encode_dev(*major, *minor)?),
            Kind::Block { major, minor } => (0o060000, encode_dev(*major, *minor)?),
            Kind::Fifo => (0o010000, 0),
        };
        let rec = &mut meta[at..at + inode.record_size()];
        put16(rec, 0, 1 | (inode.layout() << 1));
        let icount = if inode.xattrs.is_empty() {
            0
        } else {
            (inode.xattrs.len() - XATTR_HEADER) / 4 + 1
        };
        put16(rec, 2, icount as u16);
        put16(rec, 4, (mode | node.perm) as u16);
        put64(rec, 8, inode.size);
        put32(rec, 16, i_u);
        put32(rec, 20, i as u32 + 1);
        put32(rec, 24, node.uid);
        put32(rec, 28, node.gid);
        put64(rec, 32, node.mtime);
        put32(rec, 44, inode.nlink);
        rec[INODE_SIZE..INODE_SIZE + inode.xattrs.len()].copy_from_slice(&inode.xattrs);

        // The data, as bytes: whole blocks first, then the packed tail.
        let data: Vec<u8> = match &node.kind {
            Kind::Dir(_) => {
                let mut out = Vec::with_capacity(inode.dir_blocks.len() * BS);
                for (b, entries) in inode.dir_blocks.iter().enumerate() {
                    render_dir_block(&mut out, entries, nid_of, |c| file_type(&tree.node(c).kind));
                    if b + 1 < inode.dir_blocks.len() {
                        out.resize((b + 1) * BS, 0);
                    }
                }
                out
            }
            Kind::Symlink(target) => target.clone(),
            _ => continue,
        };
        let whole = inode.blocks as usize * BS;
        let start = inode.start_block as usize * BS;
        let in_blocks = data.len().min(whole);
        meta[start..start + in_blocks].copy_from_slice(&data[..in_blocks]);
        if inode.tail > 0 {
            let tail_at = at + INODE_SIZE + inode.xattrs.len();
            meta[tail_at..tail_at + inode.tail].copy_from_slice(&data[whole..]);
        }
    }

    let mut described = Described {
        extents: Vec::with_capacity(files.len() + 1),
        meta: Vec::new(),
        image_size: u64::from(total_blocks) * BS as u64,
        data_blocks: next_block - meta_blocks,
        meta_blocks,
        zero_blocks: 0,
    };
    push_extent(&mut described.extents, 0, meta.len() as u64, SOURCE_META, 0);
    for &(layer, offset, i) in &files {
        let inode = &inodes[i];
        push_extent(
            &mut described.extents,
            inode.start_block * BS as u64,
            inode.size,
            layer,
            offset,
        );
    }
    described.meta = meta;
    Ok(described)
}

/// Reachable nodes, root first, each directory's children together; and each one's parent
/// directory (the root is its own). A hard-linked file is listed once.
fn breadth_first(tree: &Tree) -> (Vec<NodeId>, Vec<NodeId>) {
    let mut seen = vec![false; tree.len()];
    let mut order = vec![ROOT];
    let mut parent = vec![ROOT];
    seen[ROOT] = true;
    let mut i = 0;
    while i < order.len() {
        let id = order[i];
        if let Kind::Dir(entries) = &tree.node(id).kind {
            for &child in entries.values() {
                if !std::mem::replace(&mut seen[child], true) {
                    order.push(child);
                    parent.push(id);
                }
            }
        }
        i += 1;
    }
    (order, parent)
}

/// Directory and symlink data: its tail packed behind the inode when that fits in the
/// inode's block, else whole blocks.
fn meta_layout(inode: &mut Inode, inline_room: usize) {
    let tail = (inode.size % BS as u64) as usize;
    if tail > 0 && tail <= inline_room {
        inode.tail = tail;
        inode.blocks = inode.size / BS as u64;
    } else {
        inode.blocks = inode.size.div_ceil(BS as u64);
    }
}

/// Sorted entries into directory blocks; returns the blocks and the bytes the last one uses.
fn pack_dir(all: Entries) -> (Vec<Entries>, usize) {
    let mut blocks = vec![Vec::new()];
    let mut used = 0;
    for (name, child) in all {
        let need = DIRENT_SIZE + name.len();
        if used + need > BS {
            blocks.push(Vec::new());
            used = 0;
        }
        used += need;
        if let Some(b) = blocks.last_mut() {
            b.push((name, child));
        }
    }
    (blocks, used)
}

/// One directory block: the dirent array, then the names, packed (the block's unused end
/// stays zero: the last name's length is found by its first zero byte).
fn render_dir_block(
    out: &mut Vec<u8>,
    entries: &[(Vec<u8>, NodeId)],
    nid: impl Fn(NodeId) -> u64,
    ftype: impl Fn(NodeId) -> u8,
) {
    let base = out.len();
    let mut nameoff = entries.len() * DIRENT_SIZE;
    out.resize(base + nameoff, 0);
    for (k, (name, child)) in entries.iter().enumerate() {
        let d = &mut out[base + k * DIRENT_SIZE..base + (k + 1) * DIRENT_SIZE];
        put64(d, 0, nid(*child));
        put16(d, 8, nameoff as u16);
        d[10] = ftype(*child);
        nameoff += name.len();
    }
    for (name, _) in entries {
        out.extend_from_slice(name);
    }
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File { .. } => 1,
        Kind::Dir(_) => 2,
        Kind::Char { .. } => 3,
        Kind::Block { .. } => 4,
        Kind::Fifo => 5,
        Kind::Symlink(_) => 7,
    }
}

/// The inline xattr area: a 12-byte header, then entries (4-byte aligned), each naming its
/// prefix by index. Names erofs has no index for are left out, with a warning.
fn xattr_area(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>, Error> {
    const PREFIXES: [(&[u8], u8); 3] = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];
    let mut out = Vec::new();
    for (name, value) in xattrs {
        if name.len() > 255 {
            // Past XATTR_NAME_MAX: no reader could ask for it.
            tracing::warn!(name = %String::from_utf8_lossy(name), "leaving out an xattr with a name over 255 bytes");
            continue;
        }
        let (index, suffix): (u8, &[u8]) = match name.as_slice() {
            b"system.posix_acl_access" => (2, b""),
            b"system.posix_acl_default" => (3, b""),
            n => match PREFIXES.iter().find_map(|(p, i)| {
                n.strip_prefix(*p)
                    .filter(|s| !s.is_empty())
                    .map(|s| (*i, s))
            }) {
                Some(found) => found,
                None => {
                    tracing::warn!(
                        name = %String::from_utf8_lossy(n),
                        "leaving out an xattr erofs has no prefix for"
                    );
                    continue;
                }
            },
        };
        let (Ok(name_len), Ok(value_len)) =
            (u8::try_from(suffix.len()), u16::try_from(value.len()))
        else {
            return Err(Error::Convert(format!(
                "xattr {} is too long for erofs",
                String::from_utf8_lossy(name)
            )));
        };
        if out.is_empty() {
            out.resize(XATTR_HEADER, 0);
        }
        out.push(name_len);
        out.push(index);
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(suffix);
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    if out.len() > XATTR_HEADER + 4 * usize::from(u16::MAX - 1) {
        return Err(Error::Convert(
            "an inode's xattrs are too large for erofs".into(),
        ));
    }
    Ok(out)
}

fn write_super(meta: &mut [u8], root_nid: u16, inodes: u64, blocks: u32) {
    let sb = &mut meta[SUPER_OFFSET..SUPER_OFFSET + SUPER_SIZE];
    put32(sb, 0, MAGIC);
    sb[12] = BLOCK_SIZE.trailing_zeros() as u8;
    put16(sb, 14, root_nid);
    put64(sb, 16, inodes);
    put32(sb, 36, blocks);
    // meta_blkaddr and xattr_blkaddr stay 0: nids count from the image's start.
    sb[48..64].copy_from_slice(&uuid_bytes(FS_UUID));
}

fn uuid_bytes(uuid: &str) -> [u8; 16] {
    let hex: Vec<u8> = uuid.bytes().filter(|b| *b != b'-').collect();
    let mut out = [0u8; 16];
    for (k, pair) in hex.chunks(2).take(16).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        out[k] = digit(pair[0]) << 4 | pair.get(1).map_or(0, |&c| digit(c));
    }
    out
}

/// The kernel's `new_encode_dev`: 12 bits of major, 20 of minor.
fn encode_dev(major: u32, minor: u32) -> Result<u32, Error> {
    if major > 0xfff || minor > 0xf_ffff {
        return Err(Error::Convert(format!(
            "device number {major}:{minor} does not fit erofs's 32-bit rdev"
        )));
    }
    Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
