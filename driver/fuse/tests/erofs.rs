//! An erofs image served through the FUSE file and mounted on top of it, file-backed and
//! through a loop device: every file reads back byte for byte, and unmounting leaves nothing.
mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{LoopGuard, MountGuard, assert_gone, mountinfo_line, pattern, run};
use cora_fuse::{FuseOptions, mount};
use cora_read::FileSource;

/// A small tree: empty, small and > 1 MiB files, nested directories, symlinks.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("empty", b"");
    w("hello.txt", b"hello, erofs over fuse\n");
    w("big.bin", &pattern(3 * 1024 * 1024 + 4321, 1));
    w("a/b/c/deep.bin", &pattern(70_000, 2));
    w("a/odd", &pattern(4097, 3));
    w("a/b/page", &pattern(4096, 4));
    symlink("../hello.txt", root.join("a/link")).unwrap();
    symlink("b/c/deep.bin", root.join("a/deeplink")).unwrap();
    std::fs::set_permissions(root.join("a/odd"), PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::create_dir(root.join("emptydir")).unwrap();
}

fn mkfs(tree: &Path, image: &Path) {
    run(Command::new("mkfs.erofs").arg(image).arg(tree));
}

/// Walks `want` and checks `got` has the same entries, kinds, modes, contents and targets.
fn compare_trees(want: &Path, got: &Path) -> usize {
    let mut checked = 0;
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let (w, g) = (names(want), names(got));
    assert_eq!(w, g, "entries of {}", got.display());
    for name in w {
        let (wp, gp): (PathBuf, PathBuf) = (want.join(&name), got.join(&name));
        let (wm, gm) = (
            std::fs::symlink_metadata(&wp).unwrap(),
            std::fs::symlink_metadata(&gp).unwrap(),
        );
        assert_eq!(wm.file_type(), gm.file_type(), "{}", gp.display());
        assert_eq!(wm.mode(), gm.mode(), "mode of {}", gp.display());
        if wm.is_dir() {
            checked += compare_trees(&wp, &gp);
        } else if wm.is_symlink() {
            assert_eq!(
                std::fs::read_link(&wp).unwrap(),
                std::fs::read_link(&gp).unwrap()
            );
        } else {
            assert!(
                std::fs::read(&wp).unwrap() == std::fs::read(&gp).unwrap(),
                "contents of {}",
                gp.display()
            );
        }
        checked += 1;
    }
    checked
}

struct Setup {
    _tmp: tempfile::TempDir,
    tree: PathBuf,
    image: PathBuf,
    fuse_dir: PathBuf,
    erofs_dir: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n);
    let (tree, image, fuse_dir, erofs_dir) = (p("tree"), p("image.erofs"), p("fuse"), p("erofs"));
    for d in [&tree, &fuse_dir, &erofs_dir] {
        std::fs::create_dir(d).unwrap();
    }
    make_tree(&tree);
    mkfs(&tree, &image);
    Setup {
        _tmp: tmp,
        tree,
        image,
        fuse_dir,
        erofs_dir,
    }
}

#[test]
fn erofs_mounts_on_the_fuse_file_and_reads_back_every_file() {
    let _serial = common::serial();
    let s = setup();
    let size = std::fs::metadata(&s.image).unwrap().len();
    let source = Arc::new(FileSource::open(&s.image).unwrap());
    let mut fuse = mount(source, &s.fuse_dir, &FuseOptions::default()).unwrap();
    let connection = fuse.connection();
    assert!(common::connection_exists(connection));

    let line = mountinfo_line(&s.fuse_dir).expect("FUSE mount in mountinfo");
    assert!(line.contains(" - fuse.cora cora "), "{line}");
    for opt in [
        "ro",
        "allow_other",
        "default_permissions",
        "max_read=1048576",
    ] {
        assert!(line.split([' ', ',']).any(|o| o == opt), "{opt}: {line}");
    }
    // Raised past the kernel defaults (16 background requests, 128 KiB readahead).
    let sys = |p: String| std::fs::read_to_string(p).unwrap().trim().to_owned();
    let conn_dir = format!("/sys/fs/fuse/connections/{connection}");
    assert_eq!(sys(format!("{conn_dir}/max_background")), "256");
    let dev = std::fs::metadata(&s.fuse_dir).unwrap().dev();
    let bdi = format!("/sys/class/bdi/{}:{}", libc::major(dev), libc::minor(dev));
    assert_eq!(sys(format!("{bdi}/read_ahead_kb")), "1024");
    let listing: Vec<_> = std::fs::read_dir(&s.fuse_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(listing, ["image"]);
    let meta = std::fs::metadata(fuse.image_path()).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.mode() & 0o7777, 0o444);
    assert_eq!(meta.len(), size);
    assert!(std::fs::read(fuse.image_path()).unwrap() == std::fs::read(&s.image).unwrap());

    let mut erofs = MountGuard::erofs_file(fuse.image_path(), &s.erofs_dir);
    let line = mountinfo_line(&s.erofs_dir).expect("erofs mount in mountinfo");
    let image = fuse.image_path().to_str().unwrap();
    // File-backed: the source is the FUSE file itself, no loop device.
    assert!(line.contains(&format!(" - erofs {image} ro")), "{line}");
    let checked = compare_trees(&s.tree, &s.erofs_dir);
    assert_eq!(checked, 12);

    // Busy while erofs uses the file; nothing changes then.
    assert!(matches!(
        fuse.unmount(),
        Err(cora_fuse::FuseError::Busy { .. })
    ));
    assert!(mountinfo_line(&s.fuse_dir).is_some());
    erofs.unmount();
    fuse.unmount().unwrap();
    assert_gone(&s.fuse_dir, connection);
    assert_eq!(mountinfo_line(&s.erofs_dir), None);
}

#[test]
fn erofs_mounts_through_a_loop_device_on_the_fuse_file() {
    let _serial = common::serial();
    let s = setup();
    let source = Arc::new(FileSource::open(&s.image).unwrap());
    let fuse = mount(source, &s.fuse_dir, &FuseOptions::default()).unwrap();
    let connection = fuse.connection();
    let Some(dev) = LoopGuard::attach(fuse.image_path()) else {
        eprintln!("skipped: no loop device");
        return;
    };
    {
        let _erofs = MountGuard::mount(&s.erofs_dir, &["-t", "erofs", "-o", "ro", &dev.0]);
        assert_eq!(compare_trees(&s.tree, &s.erofs_dir), 12);
    }
    drop(dev);
    let mut fuse = fuse;
    fuse.unmount().unwrap();
    assert_gone(&s.fuse_dir, connection);
}
