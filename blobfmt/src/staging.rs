//! A stack's [`Tree`] written out as a directory, for the image builders that need one
//! (mke2fs for ext4 stacks). Names come from the tree, never from a path lookup, and nothing
//! is created through a symlink, so nothing is written outside `root`.

use crate::tree::{Kind, NodeId, ROOT, Tree};
use crate::{Error, IoContext};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Path, PathBuf};

/// Write `tree` under `root` (an empty directory), file contents copied from `tars`.
pub fn materialize(tree: &Tree, tars: &[File], root: &Path) -> Result<(), Error> {
    let mut linked: HashMap<NodeId, PathBuf> = HashMap::new();
    write_dir(tree, tars, ROOT, root, &mut linked)?;
    set_meta(tree, ROOT, root)
}

fn write_dir(
    tree: &Tree,
    tars: &[File],
    dir: NodeId,
    path: &Path,
    linked: &mut HashMap<NodeId, PathBuf>,
) -> Result<(), Error> {
    let Kind::Dir(entries) = &tree.node(dir).kind else {
        return Ok(());
    };
    for (name, &id) in entries {
        let dst = path.join(OsStr::from_bytes(name));
        if let Some(first) = linked.get(&id) {
            fs::hard_link(first, &dst).ctx(|| format!("linking {}", dst.display()))?;
            continue;
        }
        let node = tree.node(id);
        match &node.kind {
            Kind::Dir(_) => {
                fs::create_dir(&dst).ctx(|| format!("creating {}", dst.display()))?;
                write_dir(tree, tars, id, &dst, linked)?;
            }
            Kind::File {
                layer,
                offset,
                size,
            } => {
                let tar = tars.get(*layer as usize).ok_or_else(|| {
                    Error::Convert(format!(
                        "{} names layer {layer}, not converted yet",
                        dst.display()
                    ))
                })?;
                let mut out = File::create(&dst).ctx(|| format!("creating {}", dst.display()))?;
                copy_range(tar, *offset, *size, &mut out)
                    .ctx(|| format!("writing {}", dst.display()))?;
                linked.insert(id, dst.clone());
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &dst)
                    .ctx(|| format!("creating symlink {}", dst.display()))?;
                linked.insert(id, dst.clone());
            }
            Kind::Char { major, minor } => {
                mknod(&dst, libc::S_IFCHR, libc::makedev(*major, *minor))?;
                linked.insert(id, dst.clone());
            }
            Kind::Block { major, minor } => {
                mknod(&dst, libc::S_IFBLK, libc::makedev(*major, *minor))?;
                linked.insert(id, dst.clone());
            }
            Kind::Fifo => {
                mknod(&dst, libc::S_IFIFO, 0)?;
                linked.insert(id, dst.clone());
            }
        }
        set_meta(tree, id, &dst)?;
    }
    Ok(())
}

/// Owner, mode, xattrs and time of one node; a directory's after its entries are written.
fn set_meta(tree: &Tree, id: NodeId, path: &Path) -> Result<(), Error> {
    let node = tree.node(id);
    let is_link = matches!(node.kind, Kind::Symlink(_));
    if is_root() {
        lchown(path, Some(node.uid), Some(node.gid)).ctx(|| format!("chown {}", path.display()))?;
    }
    if !is_link {
        fs::set_permissions(path, fs::Permissions::from_mode(node.perm))
            .ctx(|| format!("chmod {}", path.display()))?;
        for (name, value) in &node.xattrs {
            // Best effort, as extraction does: the staging filesystem may not take every name.
            if let Err(e) = xattr::set(path, OsStr::from_bytes(name), value) {
                tracing::warn!(path = %path.display(), "setting an xattr: {e}");
            }
        }
    }
    let t = filetime::FileTime::from_unix_time(node.mtime as i64, 0);
    filetime::set_symlink_file_times(path, t, t).ctx(|| format!("times of {}", path.display()))
}

fn copy_range(tar: &File, offset: u64, size: u64, out: &mut File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut src = tar.try_clone()?;
    src.seek(SeekFrom::Start(offset))?;
    let copied = std::io::copy(&mut src.take(size), out)?;
    if copied != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the tar ends {} bytes into a {size}-byte file", copied),
        ));
    }
    Ok(())
}

fn mknod(dst: &Path, fmt: libc::mode_t, dev: libc::dev_t) -> Result<(), Error> {
    let c = CString::new(dst.as_os_str().as_bytes())
        .map_err(|_| Error::Convert(format!("path {} has a NUL byte", dst.display())))?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod does not retain it.
    let rc = unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, dev) };
    if rc != 0 {
        return Err(Error::IoAt {
            context: format!("creating device node {} (needs root)", dst.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
