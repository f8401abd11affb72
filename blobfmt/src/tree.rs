//! The merged tree of a layer stack, held in memory: layer tars applied in order with OCI
//! whiteout semantics. File contents stay in the tars; a node only says where they are, so
//! the tree of a multi-GB stack is a few bytes per entry.

use crate::{Error, IoContext};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use tar::EntryType;

/// Where a regular file's content sits in a layer's tar stream.
#[derive(Debug, Clone)]
pub struct FileContent {
    pub layer: u32,
    pub offset: u64,
    pub size: u64,
    /// Its path in the tree, relative to the root.
    pub path: PathBuf,
}

pub type NodeId = usize;

/// The root directory's id.
pub const ROOT: NodeId = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Entries by name; byte order is the order erofs wants.
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File {
        layer: u32,
        offset: u64,
        size: u64,
    },
    Symlink(Vec<u8>),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits (`0o7777`), without the file type.
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Full names (`user.x`, `security.capability`) and values, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Node {
    fn implicit_dir() -> Node {
        // What extraction gives a parent no entry names: root-owned, 0755, time 0.
        Node {
            kind: Kind::Dir(BTreeMap::new()),
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: Vec::new(),
        }
    }
}

/// Nodes live in an arena; a hard link is a second directory entry naming the same id.
/// Replaced nodes stay in the arena unreachable: a stack is built once, then dropped.
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";
const AUFS_META: &[u8] = b".wh..wh.";
/// erofs (and every Linux filesystem) caps a name at 255 bytes.
const NAME_MAX: usize = 255;

/// One tar entry's header, read before anything of its layer is applied.
struct Pending {
    path: Vec<Vec<u8>>,
    kind: EntryType,
    link: Option<Vec<Vec<u8>>>,
    symlink: Vec<u8>,
    node: Node,
}

impl Tree {
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node::implicit_dir()],
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    /// Nodes in the arena, reachable or not (ids are below this).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Apply one layer tar on top of the tree; returns where its files' contents are.
    /// Reads headers only: file data is seeked over.
    pub fn apply_layer(&mut self, tar_path: &Path, layer: u32) -> Result<Vec<FileContent>, Error> {
        let file = File::open(tar_path).ctx(|| format!("opening {}", tar_path.display()))?;
        let tar_len = file
            .metadata()
            .ctx(|| format!("stat {}", tar_path.display()))?
            .len();
        // Buffered: the tar crate reads headers 512 bytes at a time.
        let archive_file = &file
            .try_clone()
            .ctx(|| format!("opening {}", tar_path.display()))?;
        let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
        // Where the headers before the next entry start (PAX, GNU long names).
        let mut extensions_from = 0u64;
        let mut pending = Vec::new();
        let mut contents = Vec::new();
        let what = || format!("reading layer {layer} tar");
        for entry in archive.entries_with_seek().ctx(what)? {
            let entry = entry.ctx(what)?;
            let header_at = entry.raw_header_position();
            let pax = pax_records(archive_file, extensions_from, header_at)
                .ctx(|| format!("reading layer {layer} tar (PAX records)"))?;
            extensions_from = entry
                .raw_file_position()
                .saturating_add(entry.size().next_multiple_of(512));
            let kind = entry.header().entry_type();
            if !matches!(
                kind,
                EntryType::Regular
                    | EntryType::Continuous
                    | EntryType::Directory
                    | EntryType::Symlink
                    | EntryType::Link
                    | EntryType::Char
                    | EntryType::Block
                    | EntryType::Fifo
                    | EntryType::GNUSparse
            ) {
                // PAX global headers and the like describe no file.
                tracing::debug!(layer, ?kind, "skipping a tar entry that is no file");
                continue;
            }
            let path = components(&entry.path_bytes())?;
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            agree_with_pax(&pax, &entry, link.as_deref(), layer)?;
            if path
                .iter()
                .any(|c| c.starts_with(AUFS_META) && c.as_slice() != OPAQUE)
            {
                // AUFS bookkeeping (`.wh..wh.plnk/...`), never part of the tree.
                continue;
            }
            if link.as_deref().is_some_and(|l| l.contains(&0)) {
                return Err(Error::Convert(format!(
                    "layer {layer}: the link target of {} holds a NUL byte",
                    path_of(&path).display()
                )));
            }
            let node = header_node(&entry, &pax.records, layer)?;
            if matches!(kind, EntryType::Regular | EntryType::Continuous) {
                // Headers are all that is read here: a file the tar cuts short must be caught
                // now, not when its blocks are served.
                let end = entry.raw_file_position().checked_add(entry.size());
                if end.is_none_or(|end| end > tar_len) {
                    return Err(Error::Convert(format!(
                        "layer {layer}: {} is cut short by the end of the tar",
                        path_of(&path).display()
                    )));
                }
                contents.push(FileContent {
                    layer,
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                    path: path_of(&path),
                });
            }
            let hard = kind == EntryType::Link;
            pending.push(Pending {
                link: match (&link, hard) {
                    (Some(l), true) => Some(components(l)?),
                    _ => None,
                },
                symlink: if hard {
                    Vec::new()
                } else {
                    link.unwrap_or_default()
                },
                path,
                kind,
                node,
            });
        }
        // Whiteouts delete lower content only, so they go before any entry of this layer (a
        // layer may list a file before its directory's opaque marker).
        for p in &pending {
            let Some((name, parent)) = p.path.split_last() else {
                continue;
            };
            if name.as_slice() == OPAQUE {
                if let Some(Kind::Dir(entries)) =
                    self.lookup(parent).map(|id| &mut self.nodes[id].kind)
                {
                    entries.clear();
                }
            } else if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
                // `.wh.` names one entry beside it: `.wh..` and `.wh...` would name the
                // directory itself or its parent.
                if matches!(target, b"" | b"." | b"..") {
                    return Err(Error::Convert(format!(
                        "layer {layer}: invalid whiteout {}",
                        path_of(&p.path).display()
                    )));
                }
                if let Some(Kind::Dir(entries)) =
                    self.lookup(parent).map(|id| &mut self.nodes[id].kind)
                {
                    entries.remove(target);
                }
            }
        }
        for p in pending {
            if p.path
                .last()
                .is_some_and(|n| n.starts_with(WHITEOUT_PREFIX))
            {
                continue;
            }
            self.insert(p, layer)?;
        }
        Ok(contents)
    }

    /// The node at `path`, when every component on the way is a directory.
    fn lookup(&self, path: &[Vec<u8>]) -> Option<NodeId> {
        let mut id = ROOT;
        for c in path {
            match &self.nodes[id].kind {
                Kind::Dir(entries) => id = *entries.get(c)?,
                _ => return None,
            }
        }
        Some(id)
    }

    fn insert(&mut self, p: Pending, layer: u32) -> Result<(), Error> {
        let shown = || path_of(&p.path).display().to_string();
        let Some((name, parents)) = p.path.split_last() else {
            // The root itself ("./"): only its metadata can change.
            if p.kind == EntryType::Directory {
                let keep = std::mem::replace(&mut self.nodes[ROOT].kind, Kind::Fifo);
                self.nodes[ROOT] = Node {
                    kind: keep,
                    ..p.node
                };
            }
            return Ok(());
        };
        if name.len() > NAME_MAX {
            return Err(Error::Convert(format!(
                "layer {layer}: a name in {} is longer than {NAME_MAX} bytes",
                shown()
            )));
        }
        let dir = self.make_parents(parents, layer, &shown)?;
        let kind = match p.kind {
            EntryType::Directory => {
                let existing = self.dir_entries(dir).get(name).copied();
                if let Some(id) = existing.filter(|&id| matches!(self.nodes[id].kind, Kind::Dir(_)))
                {
                    // Directory over directory: new metadata, entries kept.
                    let keep = std::mem::replace(&mut self.nodes[id].kind, Kind::Fifo);
                    self.nodes[id] = Node {
                        kind: keep,
                        ..p.node
                    };
                    return Ok(());
                }
                Kind::Dir(BTreeMap::new())
            }
            EntryType::Link => {
                let target = p.link.as_deref().unwrap_or_default();
                let id = self
                    .lookup(target)
                    .filter(|&id| {
                        !matches!(self.nodes[id].kind, Kind::Dir(_)) && !target.is_empty()
                    })
                    .ok_or_else(|| {
                        Error::Convert(format!(
                            "layer {layer}: hard link {} to {}, which is not a file in the tree",
                            shown(),
                            path_of(target).display()
                        ))
                    })?;
                self.dir_entries(dir).insert(name.clone(), id);
                return Ok(());
            }
            EntryType::GNUSparse => {
                return Err(Error::Convert(format!(
                    "layer {layer}: {} is a sparse file, which CORA does not convert",
                    shown()
                )));
            }
            _ => p.node.kind,
        };
        let kind = match kind {
            Kind::Symlink(_) => Kind::Symlink(p.symlink),
            k => k,
        };
        let id = self.nodes.len();
        self.nodes.push(Node { kind, ..p.node });
        self.dir_entries(dir).insert(name.clone(), id);
        Ok(())
    }

    /// The directory `parents` names, created (as extraction would) where missing. A path
    /// through a symlink or a file is refused: it would write outside the tree, or nowhere.
    fn make_parents(
        &mut self,
        parents: &[Vec<u8>],
        layer: u32,
        shown: &dyn Fn() -> String,
    ) -> Result<NodeId, Error> {
        let mut id = ROOT;
        for c in parents {
            if c.len() > NAME_MAX {
                return Err(Error::Convert(format!(
                    "layer {layer}: a name in {} is longer than {NAME_MAX} bytes",
                    shown()
                )));
            }
            let next = match self.dir_entries(id).get(c).copied() {
                Some(next) => next,
                None => {
                    let next = self.nodes.len();
                    self.nodes.push(Node::implicit_dir());
                    self.dir_entries(id).insert(c.clone(), next);
                    next
                }
            };
            match self.nodes[next].kind {
                Kind::Dir(_) => id = next,
                Kind::Symlink(_) => {
                    return Err(Error::Convert(format!(
                        "layer {layer}: entry {} goes through a symlink; refusing to write outside the tree",
                        shown()
                    )));
                }
                _ => {
                    return Err(Error::Convert(format!(
                        "layer {layer}: entry {} is below a file",
                        shown()
                    )));
                }
            }
        }
        Ok(id)
    }

    /// Entries of a node known to be a directory.
    fn dir_entries(&mut self, dir: NodeId) -> &mut BTreeMap<Vec<u8>, NodeId> {
        match &mut self.nodes[dir].kind {
            Kind::Dir(entries) => entries,
            // make_parents and the root only ever hand out directories.
            _ => unreachable!("node {dir} is not a directory"),
        }
    }
}

/// The node a tar header describes (its kind's payload filled in by the caller for links).
fn header_node<R: std::io::Read>(
    entry: &tar::Entry<'_, R>,
    pax: &[(Vec<u8>, Vec<u8>)],
    layer: u32,
) -> Result<Node, Error> {
    let h = entry.header();
    let mut uid = h.uid().unwrap_or(0);
    let mut gid = h.gid().unwrap_or(0);
    let mut mtime = h.mtime().unwrap_or(0);
    let perm = h.mode().unwrap_or(0o644) & 0o7777;
    let dev = || {
        (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        )
    };
    let kind = match h.entry_type() {
        EntryType::Directory => Kind::Dir(BTreeMap::new()),
        EntryType::Symlink => Kind::Symlink(Vec::new()),
        EntryType::Char => {
            let (major, minor) = dev();
            Kind::Char { major, minor }
        }
        EntryType::Block => {
            let (major, minor) = dev();
            Kind::Block { major, minor }
        }
        EntryType::Fifo => Kind::Fifo,
        _ => Kind::File {
            layer,
            offset: entry.raw_file_position(),
            size: entry.size(),
        },
    };
    let mut xattrs = Vec::new();
    // PAX records override the header's numbers (ids and times past its octal fields).
    for (key, value) in pax {
        let number = || {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        match key.as_slice() {
            b"uid" => uid = number().unwrap_or(uid),
            b"gid" => gid = number().unwrap_or(gid),
            b"mtime" => mtime = number().unwrap_or(mtime),
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), value.clone()));
                }
            }
        }
    }
    // A name given twice keeps its last value, as extraction would.
    xattrs.reverse();
    xattrs.sort_by(|a, b| a.0.cmp(&b.0));
    xattrs.dedup_by(|a, b| a.0 == b.0);
    let id = |v: u64, what: &str| {
        u32::try_from(v)
            .map_err(|_| Error::Convert(format!("layer {layer}: {what} {v} does not fit 32 bits")))
    };
    Ok(Node {
        kind,
        perm,
        uid: id(uid, "uid")?,
        gid: id(gid, "gid")?,
        mtime,
        xattrs,
    })
}

/// The PAX records (`x` headers) among the extension headers in `[from, to)` of the tar,
/// parsed here because the tar crate splits records at newlines, and xattr values are binary
/// (a capability set often holds a 0x0a byte).
fn pax_records(tar: &File, from: u64, to: u64) -> std::io::Result<Extensions> {
    use std::os::unix::fs::FileExt;
    let mut ext = Extensions::default();
    let out = &mut ext.records;
    let mut pos = from;
    let mut header = [0u8; 512];
    while pos.saturating_add(512) <= to {
        tar.read_exact_at(&mut header, pos)?;
        let size = octal(&header[124..136]);
        if header[156] == b'x' {
            // The header before the entry: its data ends where the entry's header starts.
            let end = pos.checked_add(512).and_then(|p| p.checked_add(size));
            let len = usize::try_from(size)
                .ok()
                .filter(|_| end.is_some_and(|e| e <= to));
            let mut data = vec![0u8; len.ok_or_else(|| std::io::Error::other("PAX header size"))?];
            tar.read_exact_at(&mut data, pos + 512)?;
            parse_pax(&data, out)?;
        }
        ext.long_name |= header[156] == b'L';
        ext.long_link |= header[156] == b'K';
        pos = pos
            .saturating_add(512)
            .saturating_add(size.next_multiple_of(512));
    }
    Ok(ext)
}

/// The extension headers of one entry.
#[derive(Default)]
struct Extensions {
    /// PAX records, in order.
    records: Vec<(Vec<u8>, Vec<u8>)>,
    /// A GNU long name (`L`) or long link target (`K`) header is among them.
    long_name: bool,
    long_link: bool,
}

/// `"<len> <key>=<value>\n"` records, the length counting the whole record; values are bytes.
/// A malformed record is an error (as in Go's archive/tar): a reader that guessed past it
/// could see another file than containerd does.
fn parse_pax(mut data: &[u8], out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> std::io::Result<()> {
    let bad = || std::io::Error::other("malformed PAX record");
    // Writers pad the header's data with NULs.
    while data.first().is_some_and(|&b| b != 0) {
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|l| l.parse::<usize>().ok());
        let record = len
            .filter(|&l| l > space + 1 && l <= data.len())
            .map(|l| &data[..l])
            .ok_or_else(bad)?;
        let body = record[space + 1..].strip_suffix(b"\n").ok_or_else(bad)?;
        let eq = body.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        out.push((body[..eq].to_vec(), body[eq + 1..].to_vec()));
        data = &data[record.len()..];
    }
    Ok(())
}

/// The tar crate reads PAX records by lines, which a binary value can fool; the path, link
/// target and size it reports must be the ones the records (read whole) give, last one winning.
fn agree_with_pax<R: std::io::Read>(
    ext: &Extensions,
    entry: &tar::Entry<'_, R>,
    link: Option<&[u8]>,
    layer: u32,
) -> Result<(), Error> {
    let last = |key: &[u8]| {
        ext.records
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    };
    let h = entry.header();
    let path = entry.path_bytes();
    let path_ok = match last(b"path") {
        Some(p) => p == &path[..],
        None => ext.long_name || path == h.path_bytes(),
    };
    let link_ok = match last(b"linkpath") {
        Some(l) => Some(l) == link,
        None => ext.long_link || link == h.link_name_bytes().as_deref(),
    };
    let size_ok = match last(b"size") {
        Some(v) => {
            std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                == Some(entry.size())
        }
        None => h.entry_size().ok() == Some(entry.size()),
    };
    let agrees = path_ok && link_ok && size_ok;
    if agrees && !path.contains(&0) {
        return Ok(());
    }
    Err(Error::Convert(format!(
        "layer {layer}: the PAX records of {} are ambiguous (path, link target or size)",
        String::from_utf8_lossy(&path)
    )))
}

/// A header's octal number field (sizes of extension headers never need base-256).
fn octal(field: &[u8]) -> u64 {
    field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| (b'0'..=b'7').contains(&b))
        .fold(0u64, |n, &b| {
            n.saturating_mul(8).saturating_add(u64::from(b - b'0'))
        })
}

/// A tar path as components; `..` is refused outright rather than clamped.
fn components(p: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let mut out = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::Convert(format!(
                    "tar entry {} contains '..'",
                    String::from_utf8_lossy(p)
                )));
            }
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

fn path_of(components: &[Vec<u8>]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    components
        .iter()
        .map(|c| std::ffi::OsStr::from_bytes(c))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<File>)) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut b = tar::Builder::new(f.reopen().unwrap());
        build(&mut b);
        b.finish().unwrap();
        f
    }

    fn file(b: &mut tar::Builder<File>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
    }

    fn pax_header(b: &mut tar::Builder<File>, kind: EntryType, records: &[(&str, &[u8])]) {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = [k.as_bytes(), b"=", v, b"\n"].concat();
            // The length counts its own digits too.
            let mut len = body.len() + 2;
            while format!("{len} ").len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(&body);
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, "pax", data.as_slice()).unwrap();
    }

    fn node_at<'t>(tree: &'t Tree, name: &str) -> &'t Node {
        tree.node(tree.lookup(&components(name.as_bytes()).unwrap()).unwrap())
    }

    #[test]
    fn binary_xattrs_keep_their_last_value_and_their_own_file() {
        let tar = tar_of(|b| {
            // A global header's records describe no file: its xattr must not reach `a`.
            pax_header(
                b,
                EntryType::XGlobalHeader,
                &[("SCHILY.xattr.user.g", b"1")],
            );
            pax_header(
                b,
                EntryType::XHeader,
                &[
                    ("SCHILY.xattr.user.k", b"first"),
                    ("SCHILY.xattr.user.k", b"\x0a\x00last\n"),
                ],
            );
            file(b, "a", b"a");
            file(b, "b", b"b");
        });
        let mut tree = Tree::new();
        tree.apply_layer(tar.path(), 0).unwrap();
        assert_eq!(
            node_at(&tree, "a").xattrs,
            vec![(b"user.k".to_vec(), b"\x0a\x00last\n".to_vec())]
        );
        assert!(node_at(&tree, "b").xattrs.is_empty());
    }

    #[test]
    fn a_path_hidden_in_a_binary_value_is_refused() {
        // Split at newlines (as the tar crate does), this value holds a valid "path" record.
        let tar = tar_of(|b| {
            pax_header(
                b,
                EntryType::XHeader,
                &[("SCHILY.xattr.user.v", b"x\n13 path=evil")],
            );
            file(b, "innocent", b"data");
        });
        let e = Tree::new().apply_layer(tar.path(), 0).unwrap_err();
        assert!(e.to_string().contains("ambiguous"), "{e}");
    }

    #[test]
    fn aufs_metadata_is_no_part_of_the_tree() {
        let tar = tar_of(|b| {
            file(b, ".wh..wh.plnk/123.456", b"x");
            file(b, "kept", b"y");
        });
        let mut tree = Tree::new();
        tree.apply_layer(tar.path(), 0).unwrap();
        let Kind::Dir(root) = &tree.node(ROOT).kind else {
            panic!("root is no directory");
        };
        assert_eq!(root.keys().collect::<Vec<_>>(), [b"kept"]);
    }
}
