//! Reads at and past the end of the file: short reads and 0 bytes, never an error.
mod common;

use std::sync::Arc;

use common::{assert_gone, open_image, pattern, pread};
use cora_fuse::{FuseOptions, mount};
use cora_read::FileSource;

#[test]
fn reads_at_and_past_the_end_are_short_or_empty() {
    let _serial = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("img");
    let data = pattern(10_000, 5);
    std::fs::write(&path, &data).unwrap();
    // A space: mountinfo escapes it, and unmounting must still find the mount.
    let dir = tmp.path().join("mnt dir");
    std::fs::create_dir(&dir).unwrap();
    let mut fuse = mount(
        Arc::new(FileSource::open(&path).unwrap()),
        &dir,
        &FuseOptions::default(),
    )
    .unwrap();
    for direct in [true, false] {
        let f = open_image(&fuse, direct);
        // The last page, partly past the end.
        assert_eq!(pread(&f, 8192, 4096).unwrap(), &data[8192..]);
        // Spanning the end: only the bytes inside.
        assert_eq!(pread(&f, 4096, 8192).unwrap(), &data[4096..]);
        // At and past the end: nothing.
        assert_eq!(pread(&f, 10_000, 4096).unwrap(), b"");
        assert_eq!(pread(&f, 12_288, 4096).unwrap(), b"");
        assert_eq!(pread(&f, 1 << 40, 4096).unwrap(), b"");
        assert_eq!(pread(&f, 0, 1 << 20).unwrap(), data);
    }
    assert_eq!(std::fs::read(fuse.image_path()).unwrap(), data);
    let connection = fuse.connection();
    fuse.unmount().unwrap();
    assert_gone(&dir, connection);
}

#[test]
fn an_empty_image_reads_as_an_empty_file() {
    let _serial = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("img");
    std::fs::write(&path, b"").unwrap();
    let dir = tmp.path().join("mnt");
    std::fs::create_dir(&dir).unwrap();
    let fuse = mount(
        Arc::new(FileSource::open(&path).unwrap()),
        &dir,
        &FuseOptions {
            file_name: "disk.img".into(),
            ..FuseOptions::default()
        },
    )
    .unwrap();
    assert!(fuse.image_path().ends_with("disk.img"));
    assert_eq!(std::fs::metadata(fuse.image_path()).unwrap().len(), 0);
    for direct in [true, false] {
        assert_eq!(pread(&open_image(&fuse, direct), 0, 4096).unwrap(), b"");
    }
    assert_eq!(
        std::fs::metadata(dir.join("image")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}
