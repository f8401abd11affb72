//! Conversion end to end on hand-made layers with whiteouts, links and awkward sizes:
//! rebuild each stack image from the blobs alone, extract it with `fsck.erofs --extract`,
//! and compare with the tree the layers describe.

use blobfmt::convert::{Options, convert_layers};
use blobfmt::format::{FOOTER_FRAME, chunk_at, decode_chunk, read_trailer};
use blobfmt::{Piece, Stack, StreamId, Trailer};
use cora_testdata::pseudo_random;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

enum E<'a> {
    Dir(&'a str),
    File(&'a str, Vec<u8>, u32),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

fn layer_tar(path: &Path, entries: &[E<'_>]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            E::File(p, data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, data.as_slice()).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Hard(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.finish().unwrap();
}

/// Rebuild the stack image from blob files alone, the way a reader would.
fn rebuild(blobs: &[PathBuf], out: &Path) -> Trailer {
    let mut trailers = Vec::new();
    let mut digests = Vec::new();
    for b in blobs {
        let f = fs::File::open(b).unwrap();
        let size = f.metadata().unwrap().len();
        assert!(size > FOOTER_FRAME as u64);
        let (_, t) = read_trailer(size, &mut |off, len| {
            let mut v = vec![0; len as usize];
            f.read_exact_at(&mut v, off).map_err(blobfmt::Error::Io)?;
            Ok(v)
        })
        .unwrap();
        trailers.push(t);
        let mut d = [0u8; 32];
        hex::decode_to_slice(b.file_name().unwrap().to_str().unwrap(), &mut d).unwrap();
        digests.push(d);
    }
    let stack = Stack::new(trailers, &digests).unwrap();
    let mut image = Vec::new();
    for p in stack.plan(0, stack.image_size()).unwrap() {
        match p {
            Piece::Zero { len } => image.resize(image.len() + len as usize, 0),
            Piece::Chunk {
                stream,
                index,
                offset,
                len,
            } => {
                let c = stack.chunk(stream, index);
                let blob = match stream {
                    blobfmt::StreamId::Layer(n) => &blobs[n as usize],
                    blobfmt::StreamId::Meta => blobs.last().unwrap(),
                };
                let mut frame = vec![0; c.compressed_len as usize];
                fs::File::open(blob)
                    .unwrap()
                    .read_exact_at(&mut frame, c.frame_offset)
                    .unwrap();
                let data = decode_chunk(&frame, c).unwrap();
                image.extend_from_slice(&data[offset as usize..(offset + len) as usize]);
            }
        }
    }
    fs::write(out, &image).unwrap();
    stack.top().clone()
}

/// path -> (kind, content or link target, mode) for every entry under `root`.
fn snapshot(root: &Path) -> BTreeMap<String, (char, Vec<u8>, u32, u32)> {
    let mut m = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, m: &mut BTreeMap<String, (char, Vec<u8>, u32, u32)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let mode = md.permissions().mode() & 0o7777;
            if md.file_type().is_symlink() {
                m.insert(
                    rel,
                    (
                        'l',
                        fs::read_link(&p)
                            .unwrap()
                            .into_os_string()
                            .into_encoded_bytes(),
                        0,
                        md.uid(),
                    ),
                );
            } else if md.is_dir() {
                m.insert(rel, ('d', vec![], mode, md.uid()));
                walk(root, &p, m);
            } else {
                m.insert(rel, ('f', fs::read(&p).unwrap(), mode, md.uid()));
            }
        }
    }
    walk(root, root, &mut m);
    m
}

#[test]
fn two_layer_stack_round_trips_through_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    let big = pseudo_random(300_000, 7);
    let long = format!("d/{}", "n".repeat(150));
    let l0 = tmp.path().join("l0.tar");
    layer_tar(
        &l0,
        &[
            E::Dir("d"),
            E::File("d/a", b"hello".to_vec(), 0o644),
            E::File("d/big", big.clone(), 0o755),
            E::File("d/block", pseudo_random(4096, 3), 0o644),
            E::File("d/block1", pseudo_random(4097, 4), 0o644),
            E::File("d/zeros", vec![0; 10_000], 0o600),
            E::File("d/empty", vec![], 0o644),
            E::File(&long, b"long name".to_vec(), 0o644),
            E::File("d/suid", b"#!/bin/sh\n".to_vec(), 0o4755),
            E::Dir("gone"),
            E::File("gone/x", b"x".to_vec(), 0o644),
            E::Dir("opq"),
            E::File("opq/old", b"old".to_vec(), 0o644),
            E::Link("d/sym", "/etc/passwd"),
            E::Hard("d/hard", "d/a"),
        ],
    );
    let l1 = tmp.path().join("l1.tar");
    let mut big2 = big.clone();
    big2[150_000] ^= 0xff;
    layer_tar(
        &l1,
        &[
            E::File("opq/new", b"new".to_vec(), 0o644),
            E::File("opq/.wh..wh..opq", vec![], 0o644),
            E::File(".wh.gone", vec![], 0o644),
            E::File("d/.wh.a", vec![], 0o644),
            E::File("d/big", big2.clone(), 0o755),
            E::File("d/added", pseudo_random(50_000, 11), 0o644),
        ],
    );
    let out = tmp.path().join("blobs");
    fs::create_dir(&out).unwrap();
    let work = tmp.path().join("work");
    fs::create_dir(&work).unwrap();
    let blobs = convert_layers(
        &[l0.clone(), l1.clone()],
        &Options::default(),
        &work,
        &out,
        &|_, _| {},
    )
    .unwrap();
    assert_eq!(blobs.len(), 2);

    // Every blob is a zstd stream of its original tar.
    for (b, tar) in blobs.iter().zip([&l0, &l1]) {
        let dec = zstd::decode_all(fs::File::open(&b.path).unwrap()).unwrap();
        assert_eq!(
            dec,
            fs::read(tar).unwrap(),
            "blob must decompress to the source tar"
        );
    }
    // Most of the big file of layer 1 is served from layer 0's stream (dedup by content).
    let top = &blobs[1].trailer;
    assert!(
        top.extents.iter().any(|e| e.source == 0),
        "no extent reuses layer 0"
    );

    for (n, expect_root) in [(1usize, "stack1"), (2, "stack2")] {
        let img = tmp.path().join(format!("{expect_root}.img"));
        let paths: Vec<PathBuf> = blobs[..n].iter().map(|b| b.path.clone()).collect();
        rebuild(&paths, &img);
        let ex = tmp.path().join(expect_root);
        let st = Command::new("fsck.erofs")
            .arg(format!("--extract={}", ex.display()))
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success(), "fsck.erofs failed on stack {n}");
        let tree = snapshot(&ex);
        if n == 1 {
            assert_eq!(tree["d/a"].1, b"hello");
            assert_eq!(tree["d/big"].1, big);
            assert_eq!(tree["d/zeros"].1, vec![0; 10_000]);
            assert_eq!(tree[long.as_str()].1, b"long name");
            // fsck.erofs --extract drops set-id bits (it chowns after chmod); the mount-based
            // tests in the VM check those.
            assert_eq!(tree["d/suid"].2 & 0o777, 0o755);
            assert_eq!(tree["d/hard"].1, b"hello");
            assert_eq!(tree["d/sym"].1, b"/etc/passwd");
            assert!(tree.contains_key("gone/x"));
        } else {
            assert!(!tree.contains_key("d/a"), "whiteout must remove d/a");
            assert!(!tree.contains_key("gone"), "whiteout must remove gone/");
            assert!(
                !tree.contains_key("opq/old"),
                "opaque dir must hide lower entries"
            );
            assert_eq!(tree["opq/new"].1, b"new");
            assert_eq!(tree["d/big"].1, big2);
            assert_eq!(tree["d/hard"].1, b"hello", "hard link keeps the content");
            assert_eq!(tree["d/block1"].1.len(), 4097);
        }
        if unsafe_is_root() {
            assert_eq!(tree["d/big"].3, 1000, "ownership kept");
        }
    }
}

fn unsafe_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false)
}

#[test]
fn same_input_gives_same_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let l0 = tmp.path().join("l0.tar");
    layer_tar(
        &l0,
        &[
            E::Dir("a"),
            E::File("a/f", pseudo_random(70_000, 5), 0o644),
            E::Link("a/l", "f"),
        ],
    );
    let mut digests = Vec::new();
    for run in 0..2 {
        let out = tmp.path().join(format!("out{run}"));
        let work = tmp.path().join(format!("work{run}"));
        fs::create_dir(&out).unwrap();
        fs::create_dir(&work).unwrap();
        let b = convert_layers(
            std::slice::from_ref(&l0),
            &Options::default(),
            &work,
            &out,
            &|_, _| {},
        )
        .unwrap();
        digests.push(b[0].digest);
    }
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn hostile_tars_never_write_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    for (name, entries) in [
        (
            "dotdot",
            vec![E::File("../outside", b"evil".to_vec(), 0o644)],
        ),
        (
            "through-symlink",
            vec![
                E::Link("esc", "/tmp/.."),
                E::File("esc/outside-x", b"evil".to_vec(), 0o644),
            ],
        ),
        // `.wh...` in d/ would remove d/.. (the tree's root), `.wh..` d itself.
        (
            "whiteout-dotdot",
            vec![E::Dir("d"), E::File("d/.wh...", Vec::new(), 0o644)],
        ),
        (
            "whiteout-dot",
            vec![E::Dir("d"), E::File("d/.wh..", Vec::new(), 0o644)],
        ),
    ] {
        let tar = tmp.path().join(format!("{name}.tar"));
        // tar::Builder refuses '..' in paths, so write that header by hand.
        if name == "dotdot" {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../outside");
            h.set_size(4);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            let mut b = tar::Builder::new(fs::File::create(&tar).unwrap());
            b.append(&h, &b"evil"[..]).unwrap();
            b.finish().unwrap();
        } else {
            layer_tar(&tar, &entries);
        }
        let out = tmp.path().join(format!("out-{name}"));
        let work = tmp.path().join(format!("work-{name}"));
        fs::create_dir(&out).unwrap();
        fs::create_dir(&work).unwrap();
        let err = convert_layers(&[tar], &Options::default(), &work, &out, &|_, _| {}).unwrap_err();
        assert!(!outside.exists(), "{name}: wrote outside the staging tree");
        assert!(
            !Path::new("/tmp/outside-x").exists(),
            "{name}: followed a symlink out"
        );
        let msg = err.to_string();
        assert!(
            !name.starts_with("whiteout") || msg.contains("invalid whiteout"),
            "{name}: {msg}"
        );
        assert!(
            msg.contains("..")
                || msg.contains("symlink")
                || msg.contains("outside")
                || msg.contains("invalid whiteout"),
            "{name}: {msg}"
        );
        assert_eq!(
            fs::read_dir(&out).unwrap().count(),
            0,
            "{name}: a failed conversion left a blob"
        );
    }
}

/// A regular file's data is one extent, and `Stack::extent_last_chunk` from anywhere inside it
/// names the chunk holding its last byte (the lazy source's file window relies on both).
#[test]
fn extent_last_chunk_is_where_the_file_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let big = pseudo_random(300_000, 9);
    let l0 = tmp.path().join("l0.tar");
    layer_tar(
        &l0,
        &[
            E::Dir("d"),
            E::File("d/a", b"small".to_vec(), 0o644),
            E::File("d/big", big.clone(), 0o644),
            E::File("d/z", pseudo_random(5000, 2), 0o644),
        ],
    );
    let (out, work) = (tmp.path().join("blobs"), tmp.path().join("work"));
    fs::create_dir(&out).unwrap();
    fs::create_dir(&work).unwrap();
    let blobs = convert_layers(&[l0], &Options::default(), &work, &out, &|_, _| {}).unwrap();
    let stack = Stack::new(vec![blobs[0].trailer.clone()], &[blobs[0].digest]).unwrap();
    let e = *stack
        .top()
        .extents
        .iter()
        .find(|e| e.length == big.len() as u64)
        .expect("the big file is one extent");
    let chunks = stack.chunks(StreamId::Layer(0));
    let first = chunk_at(chunks, e.src_offset).unwrap();
    let last = chunk_at(chunks, e.src_offset + e.length - 1).unwrap();
    assert!(last > first, "300 kB in one chunk: the test proves nothing");
    for off in [e.image_offset, e.image_offset + 150_000, e.image_end() - 1] {
        assert_eq!(
            stack.extent_last_chunk(off),
            Some((StreamId::Layer(0), last))
        );
    }
    let blob = fs::read(&blobs[0].path).unwrap();
    let mut data = Vec::new();
    for p in stack.plan(e.image_offset, e.length).unwrap() {
        let Piece::Chunk {
            stream,
            index,
            offset,
            len,
        } = p
        else {
            panic!("a hole inside the file's extent");
        };
        let c = stack.chunk(stream, index);
        let at = c.frame_offset as usize;
        let plain = decode_chunk(&blob[at..at + c.compressed_len as usize], c).unwrap();
        data.extend_from_slice(&plain[offset as usize..(offset + len) as usize]);
    }
    assert_eq!(data, big, "the extent is the file's bytes");
    // The padding after the file's last byte (300 000 is not block-aligned) is a hole.
    let hole = e.image_end();
    assert!(
        !stack
            .top()
            .extents
            .iter()
            .any(|x| x.image_offset <= hole && hole < x.image_end())
    );
    assert_eq!(stack.extent_last_chunk(hole), None);
    assert_eq!(stack.extent_last_chunk(stack.image_size()), None);
}

/// A layer whose bytes are not what the config's diff_id says is refused, uncompressed (read in
/// place, checked by the chunker's digest) or gzip (checked while decompressing), and no
/// manifest names the blobs.
#[test]
fn a_layer_that_is_not_its_diff_id_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), b"cora\n").unwrap();
    for gzip in [false, true] {
        let layout = tmp.path().join(format!("src-{gzip}"));
        blobfmt::dirsrc::layout_from_dirs(&[&tree], &layout, "v1", gzip).unwrap();
        let mut img = blobfmt::oci::open_layout(&layout, Some("v1")).unwrap();
        img.config.rootfs.diff_ids[0] = format!("sha256:{}", "0".repeat(64));
        let out = tmp.path().join(format!("out-{gzip}"));
        let work = tmp.path().join(format!("work-{gzip}"));
        fs::create_dir_all(&work).unwrap();
        let e = blobfmt::convert::convert_image(&img, &out, &Options::default(), &work, &|_, _| {})
            .expect_err("converted a layer that is not its diff_id");
        assert!(e.to_string().contains("config's diff_id"), "{e}");
        assert!(
            blobfmt::oci::open_layout(&out, None).is_err(),
            "a manifest names the refused blobs"
        );
    }
}

/// Layers made one at a time (gzip ones decompressed while the layer below converts) give the
/// same blobs as layers read in place, and no scratch tar outlives its layer.
#[test]
fn decompressed_and_in_place_layers_give_the_same_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    for (i, name) in ["base", "middle", "top"].iter().enumerate() {
        let t = tmp.path().join(name);
        fs::create_dir_all(t.join("data")).unwrap();
        fs::write(
            t.join(format!("data/{name}")),
            pseudo_random(200_000 + i, i as u64),
        )
        .unwrap();
        trees.push(t);
    }
    let dirs: Vec<&Path> = trees.iter().map(|t| t.as_path()).collect();
    let mut digests = Vec::new();
    for gzip in [false, true] {
        let layout = tmp.path().join(format!("src-{gzip}"));
        blobfmt::dirsrc::layout_from_dirs(&dirs, &layout, "v1", gzip).unwrap();
        let img = blobfmt::oci::open_layout(&layout, Some("v1")).unwrap();
        let work = tmp.path().join(format!("work-{gzip}"));
        fs::create_dir_all(&work).unwrap();
        let out = tmp.path().join(format!("out-{gzip}"));
        let report =
            blobfmt::convert::convert_image(&img, &out, &Options::default(), &work, &|_, _| {})
                .unwrap();
        assert_eq!(
            fs::read_dir(&work).unwrap().count(),
            0,
            "scratch left in {work:?}"
        );
        digests.push(
            report
                .layers
                .iter()
                .map(|l| l.blob.digest)
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(digests[0].len(), 3);
    assert_eq!(digests[0], digests[1]);
}
