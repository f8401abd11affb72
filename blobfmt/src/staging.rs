//! The merged tree of a layer stack, built in a staging directory by applying layer tars in
//! order with OCI whiteout semantics. Nothing is ever written outside the staging root.

use crate::{Error, IoContext};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::BufReader;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
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

pub struct Staging {
    root: PathBuf,
    dir_mtimes: HashMap<PathBuf, u64>,
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

impl Staging {
    /// `root` must be an empty directory.
    pub fn new(root: PathBuf) -> Staging {
        Staging {
            root,
            dir_mtimes: HashMap::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Apply one layer tar on top of the tree; returns where its files' contents are.
    pub fn apply_layer(&mut self, tar_path: &Path, layer: u32) -> Result<Vec<FileContent>, Error> {
        // Buffered: the tar crate reads headers 512 bytes at a time.
        let open = || {
            File::open(tar_path)
                .map(|f| BufReader::with_capacity(1 << 20, f))
                .ctx(|| format!("opening {}", tar_path.display()))
        };
        // Pass 1: whiteouts delete lower content only, so apply them before any entry of
        // this layer is written (a layer may list a file before its directory's opaque marker).
        // It reads headers only: file data is seeked over.
        let mut archive = tar::Archive::new(open()?);
        for entry in archive
            .entries_with_seek()
            .ctx(|| "reading layer tar".into())?
        {
            let entry = entry.ctx(|| format!("reading layer {layer} tar"))?;
            let rel = clean_path(&entry.path().ctx(|| "entry path".into())?)?;
            let Some(name) = rel.file_name() else {
                continue;
            };
            let parent = rel.parent().unwrap_or(Path::new(""));
            if name == OPAQUE {
                self.clear_dir(parent)?;
            } else if let Some(target) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                // `.wh.` names one entry beside it: `.wh..` and `.wh...` would name the
                // directory itself or its parent (the tree's root, or outside it).
                if matches!(target, b"" | b"." | b"..") {
                    return Err(Error::Convert(format!(
                        "layer {layer}: invalid whiteout {}",
                        rel.display()
                    )));
                }
                self.remove(&parent.join(OsStr::from_bytes(target)))?;
            }
        }
        // Pass 2: extract everything else, remembering file content offsets.
        let mut archive = tar::Archive::new(open()?);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(is_root());
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        let mut contents = Vec::new();
        for entry in archive.entries().ctx(|| "reading layer tar".into())? {
            let mut entry = entry.ctx(|| format!("reading layer {layer} tar"))?;
            let rel = clean_path(&entry.path().ctx(|| "entry path".into())?)?;
            let Some(name) = rel.file_name() else {
                continue;
            };
            if name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
                continue;
            }
            let kind = entry.header().entry_type();
            let dst = self.root.join(&rel);
            if !self.inside(&rel) {
                return Err(Error::Convert(format!(
                    "layer {layer}: entry {} goes through a symlink; refusing to write outside the tree",
                    rel.display()
                )));
            }
            // A new entry replaces whatever was there, except directory over directory.
            if let Ok(m) = fs::symlink_metadata(&dst)
                && !(m.is_dir() && kind == EntryType::Directory)
            {
                remove_any(&dst, m.is_dir())?;
            }
            match kind {
                EntryType::Directory => {
                    self.dir_mtimes
                        .insert(rel.clone(), entry.header().mtime().unwrap_or(0));
                }
                EntryType::Regular | EntryType::Continuous => contents.push(FileContent {
                    layer,
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                    path: rel.clone(),
                }),
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    make_node(&entry, &dst, kind)?;
                    continue;
                }
                _ => {}
            }
            let written = entry
                .unpack_in(&self.root)
                .ctx(|| format!("layer {layer}: unpacking {}", rel.display()))?;
            if !written {
                return Err(Error::Convert(format!(
                    "layer {layer}: entry {} escapes the root",
                    rel.display()
                )));
            }
            if kind == EntryType::Symlink {
                // tar leaves a symlink's own time at "now"; the image must not depend on it.
                let t = filetime::FileTime::from_unix_time(
                    entry.header().mtime().unwrap_or(0) as i64,
                    0,
                );
                filetime::set_symlink_file_times(&dst, t, t)
                    .ctx(|| format!("times of {}", dst.display()))?;
            }
        }
        Ok(contents)
    }

    /// Give every directory its tar mtime (or 0), so the image does not depend on when or in
    /// which order we extracted.
    pub fn finalize_times(&self) -> Result<(), Error> {
        fn walk(root: &Path, rel: &Path, mtimes: &HashMap<PathBuf, u64>) -> Result<(), Error> {
            let dir = root.join(rel);
            for e in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
                let e = e.ctx(|| format!("listing {}", dir.display()))?;
                if e.file_type().ctx(|| "file type".into())?.is_dir() {
                    walk(root, &rel.join(e.file_name()), mtimes)?;
                }
            }
            let t =
                filetime::FileTime::from_unix_time(mtimes.get(rel).copied().unwrap_or(0) as i64, 0);
            filetime::set_file_times(&dir, t, t)
                .ctx(|| format!("setting times of {}", dir.display()))
        }
        walk(&self.root, Path::new(""), &self.dir_mtimes)
    }

    /// True when no existing ancestor of `rel` is a symlink (so writing there stays inside).
    fn inside(&self, rel: &Path) -> bool {
        let mut p = self.root.clone();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => return false,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        true
    }

    fn remove(&self, rel: &Path) -> Result<(), Error> {
        if rel.as_os_str().is_empty() || !self.inside(rel) {
            return Ok(());
        }
        let p = self.root.join(rel);
        match fs::symlink_metadata(&p) {
            Ok(m) => remove_any(&p, m.is_dir()),
            Err(_) => Ok(()),
        }
    }

    fn clear_dir(&self, rel: &Path) -> Result<(), Error> {
        if !self.inside(&rel.join("x")) {
            return Ok(());
        }
        let p = self.root.join(rel);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {
                for e in fs::read_dir(&p).ctx(|| format!("listing {}", p.display()))? {
                    let e = e.ctx(|| format!("listing {}", p.display()))?;
                    let is_dir = e.file_type().ctx(|| "file type".into())?.is_dir();
                    remove_any(&e.path(), is_dir)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

fn remove_any(p: &Path, is_dir: bool) -> Result<(), Error> {
    let r = if is_dir {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
    r.ctx(|| format!("removing {}", p.display()))
}

/// A tar path made relative; `..` is refused outright rather than clamped.
fn clean_path(p: &Path) -> Result<PathBuf, Error> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(Error::Convert(format!(
                    "tar entry {} contains '..'",
                    p.display()
                )));
            }
        }
    }
    Ok(out)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn make_node<R: std::io::Read>(
    entry: &tar::Entry<'_, R>,
    dst: &Path,
    kind: EntryType,
) -> Result<(), Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let h = entry.header();
    let mode = h.mode().unwrap_or(0o644) & 0o7777;
    let (major, minor) = (
        h.device_major().ok().flatten().unwrap_or(0),
        h.device_minor().ok().flatten().unwrap_or(0),
    );
    let fmt = match kind {
        EntryType::Char => libc::S_IFCHR,
        EntryType::Block => libc::S_IFBLK,
        _ => libc::S_IFIFO,
    };
    let c = std::ffi::CString::new(dst.as_os_str().as_bytes())
        .map_err(|_| Error::Convert(format!("path {} has a NUL byte", dst.display())))?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod does not retain it.
    let rc = unsafe { libc::mknod(c.as_ptr(), fmt | mode, libc::makedev(major, minor)) };
    if rc != 0 {
        return Err(Error::IoAt {
            context: format!("creating device node {} (needs root)", dst.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    if is_root() {
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid))
            .ctx(|| format!("chown {}", dst.display()))?;
    }
    let t = filetime::FileTime::from_unix_time(h.mtime().unwrap_or(0) as i64, 0);
    filetime::set_symlink_file_times(dst, t, t).ctx(|| format!("times of {}", dst.display()))
}
