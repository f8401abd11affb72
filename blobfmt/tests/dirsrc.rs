//! `dir:` sources carry extended attributes (file capabilities, ACLs, labels) into the layer.
use blobfmt::{dirsrc, oci};
use std::io::Read;

#[test]
fn dir_layer_keeps_xattrs() {
    let work = tempfile::tempdir().expect("tempdir");
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("bin")).expect("mkdir");
    let file = tree.join("bin/ping");
    std::fs::write(&file, b"not really ping").expect("write");
    xattr::set(&file, "user.cora.b", b"second").expect("this test needs user xattrs in TMPDIR");
    xattr::set(&file, "user.cora.a", b"first").expect("set xattr");

    let layout = work.path().join("layout");
    dirsrc::layout_from_dir(&tree, &layout, "t").expect("layout");
    let image = oci::open_layout(&layout, Some("t")).expect("open");
    let blob = image
        .blob_path(&image.manifest.layers[0].digest)
        .expect("blob");

    // The PAX records are in the tar, in a fixed order.
    let mut archive = tar::Archive::new(std::fs::File::open(&blob).expect("open blob"));
    let mut found = Vec::new();
    for entry in archive.entries().expect("entries") {
        let mut entry = entry.expect("entry");
        if entry.path().expect("path").ends_with("bin/ping") {
            let pax = entry
                .pax_extensions()
                .expect("pax")
                .expect("has pax records");
            for ext in pax {
                let ext = ext.expect("pax record");
                found.push((
                    ext.key().expect("key").to_owned(),
                    ext.value_bytes().to_vec(),
                ));
            }
            let mut body = String::new();
            entry.read_to_string(&mut body).expect("body");
            assert_eq!(body, "not really ping");
        }
    }
    assert_eq!(
        found,
        vec![
            ("SCHILY.xattr.user.cora.a".to_owned(), b"first".to_vec()),
            ("SCHILY.xattr.user.cora.b".to_owned(), b"second".to_vec()),
        ]
    );

    // And an extraction that restores xattrs gets them back.
    let out = work.path().join("out");
    let mut archive = tar::Archive::new(std::fs::File::open(&blob).expect("open blob"));
    archive.set_unpack_xattrs(true);
    archive.unpack(&out).expect("unpack");
    assert_eq!(
        xattr::get(out.join("bin/ping"), "user.cora.a").expect("get"),
        Some(b"first".to_vec())
    );
}
