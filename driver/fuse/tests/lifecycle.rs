//! A mount's life: served until unmounted from outside, detached when dropped busy, and
//! unmounted even after its connection was aborted.
mod common;

use std::process::Command;
use std::sync::Arc;

use common::{assert_gone, open_image, pattern, pread, run};
use cora_fuse::{FuseOptions, mount};
use cora_read::FileSource;

/// `serve` blocks until the mount is unmounted from outside.
#[test]
fn serve_returns_when_unmounted_from_outside() {
    let _serial = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("img");
    std::fs::write(&file, pattern(10_000, 9)).unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let source = Arc::new(FileSource::open(&file).unwrap());
    let fuse = mount(source, &dir, &FuseOptions::default()).unwrap();
    let (connection, image) = (fuse.connection(), fuse.image_path().to_owned());
    let served = std::thread::spawn(move || fuse.join());
    assert_eq!(std::fs::read(&image).unwrap(), pattern(10_000, 9));
    run(Command::new("umount").arg(&dir));
    served.join().unwrap().unwrap();
    assert_gone(&dir, connection);
}

/// Dropped while a reader holds the file open: detached, still served to that reader, gone
/// once it closes.
#[test]
fn a_busy_mount_dropped_is_detached_and_served_until_closed() {
    let _serial = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("img");
    let data = pattern(100_000, 8);
    std::fs::write(&path, &data).unwrap();
    let src = Arc::new(FileSource::open(&path).unwrap());
    let fuse = mount(src, tmp.path(), &FuseOptions::default()).unwrap();
    let (dir, connection) = (fuse.mountpoint().to_owned(), fuse.connection());
    let f = open_image(&fuse, true);
    drop(fuse);
    assert_eq!(common::mountinfo_line(&dir), None);
    assert!(common::connection_exists(connection));
    assert_eq!(pread(&f, 4096, 8192).unwrap(), &data[4096..12_288]);
    drop(f);
    assert!(!common::connection_exists(connection));
}

/// A connection aborted through fusectl: reads fail, and unmounting still takes the dead
/// mount away.
#[test]
fn an_aborted_connection_is_still_unmounted() {
    let _serial = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("img");
    std::fs::write(&path, pattern(10_000, 6)).unwrap();
    let src = Arc::new(FileSource::open(&path).unwrap());
    let mut fuse = mount(src, tmp.path(), &FuseOptions::default()).unwrap();
    let connection = fuse.connection();
    std::fs::write(format!("/sys/fs/fuse/connections/{connection}/abort"), "1").unwrap();
    let err = std::fs::read(fuse.image_path()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    let dir = fuse.mountpoint().to_owned();
    assert!(
        common::mountinfo_line(&dir).is_some(),
        "the dead mount stays"
    );
    // The session ends (ENODEV on the aborted connection); unmount takes the dead mount.
    let _ = fuse.unmount();
    assert_gone(&dir, connection);
}
