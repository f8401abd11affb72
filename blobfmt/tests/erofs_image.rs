//! The erofs image `blobfmt::erofs` writes from a layer tar, mounted by the kernel: a source
//! tree with every entry kind, directories spanning blocks, names that sort before `.`,
//! symlinks short and long, hard links, device nodes, xattrs, ids past 16 bits and odd times
//! is packed by GNU tar, imaged, mounted, and must read back exactly as the source.

use blobfmt::erofs;
use blobfmt::format::SOURCE_META;
use blobfmt::tree::Tree;
use cora_testdata::pseudo_random;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mknod keeps no reference to it.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | 0o640, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn times(path: &Path, secs: i64) {
    let t = filetime::FileTime::from_unix_time(secs, 0);
    filetime::set_symlink_file_times(path, t, t).unwrap();
}

fn build_source(src: &Path) {
    let w = |p: &str, data: &[u8]| fs::write(src.join(p), data).unwrap();
    fs::create_dir_all(src.join("a/b/c/d/e")).unwrap();
    w("a/b/c/d/e/deep", b"deep\n");
    // Over 700 entries with long names: several directory blocks, binary-searched by lookup.
    fs::create_dir(src.join("big")).unwrap();
    for i in 0..700 {
        w(&format!("big/entry-{i:04}-{}", "x".repeat(60)), &[i as u8]);
    }
    // Names sorting before "." and "..": dirents must be in byte order, dots included.
    for n in ["!bang", "+plus", "-dash", ".hidden", "...", "~tilde"] {
        w(n, n.as_bytes());
    }
    w("empty", b"");
    w("block-exact", &pseudo_random(4096, 1));
    w("odd", &pseudo_random(10_000, 2));
    w("large", &pseudo_random((1 << 20) + 1, 3));
    w("setuid", b"#!/bin/sh\n");
    fs::set_permissions(src.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(src.join("sticky")).unwrap();
    fs::set_permissions(src.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    symlink("odd", src.join("short-link")).unwrap();
    symlink("a/".repeat(1500), src.join("inline-link")).unwrap();
    // 4090 bytes: too long to pack behind its inode, so it takes a block of its own.
    symlink(format!("{}z", "b/".repeat(2044)), src.join("block-link")).unwrap();
    w("linked", b"three names\n");
    fs::hard_link(src.join("linked"), src.join("linked-2")).unwrap();
    fs::hard_link(src.join("linked"), src.join("a/linked-3")).unwrap();
    fs::create_dir(src.join("dev")).unwrap();
    mknod(&src.join("dev/null"), libc::S_IFCHR, 1, 3);
    mknod(&src.join("dev/big-minor"), libc::S_IFCHR, 4095, 1 << 19);
    mknod(&src.join("dev/loop0"), libc::S_IFBLK, 7, 0);
    mknod(&src.join("dev/fifo"), libc::S_IFIFO, 0, 0);
    xattr::set(src.join("odd"), "user.note", b"hello").unwrap();
    xattr::set(src.join("odd"), "user.big", &pseudo_random(2000, 4)).unwrap();
    // cap_net_raw+ep as the kernel stores it (VFS_CAP_REVISION_2): it checks the format.
    let cap: Vec<u8> = [0x0200_0001u32, 1 << 13, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    xattr::set(src.join("setuid"), "security.capability", &cap).unwrap();
    xattr::set(src.join("sticky"), "trusted.mark", b"t").unwrap();
    std::os::unix::fs::lchown(src.join("odd"), Some(100_000), Some(100_001)).unwrap();
    std::os::unix::fs::lchown(src.join("short-link"), Some(70_000), Some(7)).unwrap();
    std::os::unix::fs::chown(src.join("big"), Some(65_534), Some(65_534)).unwrap();
    // Times last, directories deepest first, so creating entries does not move them.
    times(&src.join("odd"), 0);
    times(&src.join("large"), 4_102_444_800);
    times(&src.join("short-link"), 1_234_567_890);
    for d in [
        "a/b/c/d/e",
        "a/b/c/d",
        "a/b/c",
        "a/b",
        "a",
        "big",
        "dev",
        "sticky",
        ".",
    ] {
        times(&src.join(d), 1_700_000_000);
    }
}

/// Everything a reader sees of each entry; hard links by the first path sharing the inode.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(
        root: &Path,
        dir: &Path,
        inos: &mut BTreeMap<u64, PathBuf>,
        out: &mut BTreeMap<PathBuf, String>,
    ) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in std::iter::once(dir.to_path_buf()).chain(entries.iter().cloned()) {
            if p != dir && p.is_dir() && !p.is_symlink() {
                continue; // listed by its own walk
            }
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if out.contains_key(&rel) {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let mut what = format!(
                "mode {:o} uid {} gid {} nlink {}",
                m.mode(),
                m.uid(),
                m.gid(),
                if ft.is_dir() { 0 } else { m.nlink() }
            );
            if !ft.is_symlink() {
                // Symlink times are not what GNU tar restores everywhere; files' and dirs' are.
                what += &format!(" mtime {}", m.mtime());
            }
            if ft.is_file() {
                let first = inos.entry(m.ino()).or_insert_with(|| rel.clone());
                what += &format!(" size {} first-name {}", m.len(), first.display());
                what += &format!(
                    " sha256 {}",
                    hex::encode(Sha256::digest(fs::read(&p).unwrap()))
                );
            } else if ft.is_symlink() {
                what += &format!(" -> {}", fs::read_link(&p).unwrap().display());
            } else if !ft.is_dir() {
                what += &format!(" rdev {:x}", m.rdev());
            }
            let mut names: Vec<_> = xattr::list(&p).unwrap().collect();
            names.sort();
            for n in names {
                let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                what += &format!(" xattr {}={}", n.to_string_lossy(), hex::encode(v));
            }
            out.insert(rel, what);
        }
        for p in entries {
            if p.is_dir() && !p.is_symlink() {
                walk(root, &p, inos, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut BTreeMap::new(), &mut out);
    out
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn kernel_mounts_the_image_and_reads_the_source_tree() {
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    assert!(
        root,
        "this test mounts an image and makes device nodes: run it as root"
    );
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let src = work.path().join("src");
    fs::create_dir(&src).unwrap();
    build_source(&src);
    let tar_path = work.path().join("layer.tar");
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-cf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(&src)
        .arg("."));

    let mut tree = Tree::new();
    tree.apply_layer(&tar_path, 0).unwrap();
    let image = erofs::build(&tree).unwrap();
    assert_eq!(image.zero_blocks, 0);
    assert!(
        image.meta_blocks >= 3,
        "a multi-block directory and a block symlink: {}",
        image.meta_blocks
    );
    // The image from its extents, as a reader assembles it: metadata, then tar bytes.
    let tar = fs::File::open(&tar_path).unwrap();
    let img_path = work.path().join("stack.img");
    let img = fs::File::create(&img_path).unwrap();
    img.set_len(image.image_size).unwrap();
    for e in &image.extents {
        let mut buf = vec![0u8; e.length as usize];
        if e.source == SOURCE_META {
            buf.copy_from_slice(&image.meta[e.src_offset as usize..][..e.length as usize]);
        } else {
            assert_eq!(e.source, 0);
            tar.read_exact_at(&mut buf, e.src_offset).unwrap();
        }
        img.write_all_at(&buf, e.image_offset).unwrap();
    }
    drop(img);
    run(Command::new("fsck.erofs").arg(&img_path));

    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    run(Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(&img_path)
        .arg(&mnt));
    let _mounted = Mounted(mnt.clone());
    let want = snapshot(&src);
    let got = snapshot(&mnt);
    assert!(want.len() > 720, "{} entries", want.len());
    for (path, w) in &want {
        assert_eq!(got.get(path), Some(w), "{}", path.display());
    }
    assert_eq!(
        got.len(),
        want.len(),
        "entries only in the image: {:?}",
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .collect::<Vec<_>>()
    );
    // Lookup by name (not only readdir) through every block of the big directory.
    for i in [0, 349, 699] {
        let name = format!("big/entry-{i:04}-{}", "x".repeat(60));
        assert_eq!(fs::read(mnt.join(&name)).unwrap(), [i as u8], "{name}");
    }
    assert!(fs::metadata(mnt.join("big/entry-0700")).is_err());
}
