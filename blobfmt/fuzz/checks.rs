//! One check per fuzz target, shared by the cargo-fuzz targets (`fuzz_targets/*.rs`, nightly)
//! and the stable harness (`../tests/fuzz_parsers.rs`, part of the test command), so both
//! drive blobfmt the same way. Seeds live in `corpus/<target>/`.
//!
//! A check returns `Err` when blobfmt rejected the input (fine for any input) and `Ok` when
//! it accepted it. It panics when something is wrong: a panic inside blobfmt, an accepted
//! input that breaks an invariant readers rely on, or a write outside the directory a layer
//! is extracted into.

use blobfmt::format::{self, ChunkEntry, FOOTER_FRAME, Footer, MAX_CHUNK, Trailer};
use blobfmt::oci::{self, Compression};
use blobfmt::platform::{self, Platform};
use blobfmt::tree::Tree;
use blobfmt::{Error, Piece, Stack, StreamId, decode_chunk, oci_digest, parse_oci_digest, sha256};
use blobfmt::{erofs, staging};
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

pub type Check = fn(&[u8]) -> Result<(), String>;

/// Longest image range planned per call: plans are linear in the range's pieces.
const PLAN_WINDOW: u64 = 1 << 20;

/// A whole CORA blob: footer, trailer frame, every chunk against the trailer, and image plans
/// of the one-layer stack. `Ok` only for a blob a reader would serve.
pub fn blob(data: &[u8]) -> Result<(), String> {
    let size = data.len() as u64;
    let mut read = |off: u64, len: u64| {
        range(data, off, len)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| Error::Format("read past the end of the blob".into()))
    };
    match format::read_trailer(size, &mut read) {
        Ok((footer, trailer)) => serve(data, &footer, trailer),
        Err(e) => {
            // A corrupted trailer frame stops at the footer's digest. Parse it once more under
            // a footer that matches it, so corruption reaches decompression and the tables.
            if let Some((footer, trailer)) = resealed(data) {
                let _ = serve(data, &footer, trailer);
            }
            Err(e.to_string())
        }
    }
}

fn resealed(data: &[u8]) -> Option<(Footer, Trailer)> {
    let tail = data.get(data.len().checked_sub(FOOTER_FRAME)?..)?;
    let footer = Footer::decode(tail, data.len() as u64).ok()?;
    let frame = range(data, footer.trailer_offset, footer.trailer_length)?;
    let footer = Footer {
        trailer_digest: sha256(frame),
        ..footer
    };
    let trailer = Trailer::decode_frame(frame, &footer).ok()?;
    Some((footer, trailer))
}

fn serve(data: &[u8], footer: &Footer, trailer: Trailer) -> Result<(), String> {
    let size = data.len() as u64;
    assert_eq!(
        Footer::decode(&footer.encode(), size).ok().as_ref(),
        Some(footer),
        "footer round trip"
    );
    round_trip(&trailer);
    let mut tar = Sha256::new();
    for (i, c) in trailer.chunks.iter().enumerate() {
        tar.update(chunk(data, c).map_err(|e| format!("data chunk {i}: {e}"))?);
    }
    if <[u8; 32]>::from(tar.finalize()) != trailer.diff_id {
        return Err("the data chunks do not hash to the trailer's diff_id".into());
    }
    for (i, c) in trailer.meta_chunks.iter().enumerate() {
        chunk(data, c).map_err(|e| format!("metadata chunk {i}: {e}"))?;
    }
    // A top layer alone is no stack; the trailer target models its lowers.
    if trailer.lowers.is_empty() {
        let stack = Stack::new(vec![trailer], &[sha256(data)])
            .expect("a valid bottom trailer is a valid one-layer stack");
        check_plans(&stack);
    }
    Ok(())
}

fn chunk(data: &[u8], c: &ChunkEntry) -> Result<Vec<u8>, String> {
    let frame = range(data, c.frame_offset, u64::from(c.compressed_len))
        .ok_or("frame past the end of the blob")?;
    decode_chunk(frame, c).map_err(|e| e.to_string())
}

fn range(data: &[u8], off: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(off).ok()?;
    data.get(start..start.checked_add(usize::try_from(len).ok()?)?)
}

/// A decompressed trailer body, then the stack index it heads over lower layers made to
/// match it (their diff_ids, their own lowers, streams as long as its extents read).
pub fn trailer(data: &[u8]) -> Result<(), String> {
    let top = Trailer::decode_body(data).map_err(|e| e.to_string())?;
    round_trip(&top);
    let Some(mut layers) = lowers_for(&top) else {
        return Ok(());
    };
    let mut digests: Vec<_> = top.lowers.iter().map(|l| l.blob_digest).collect();
    digests.push(sha256(data));
    layers.push(top);
    if layers.len() > 1 {
        let mut wrong = digests.clone();
        wrong[0][0] ^= 1;
        assert!(
            Stack::new(layers.clone(), &wrong).is_err(),
            "a stack over a different bottom layer was accepted"
        );
    }
    let stack = Stack::new(layers, &digests).expect("a stack over matching lowers");
    check_plans(&stack);
    Ok(())
}

fn round_trip(t: &Trailer) {
    let again = Trailer::decode_body(&t.encode_body()).expect("a re-encoded trailer parses");
    assert_eq!(&again, t, "trailer round trip");
}

/// Lower trailers that fit what `top` says of them; None when a stream the extents read
/// would be too long to model cheaply.
fn lowers_for(top: &Trailer) -> Option<Vec<Trailer>> {
    let mut need = vec![0u64; top.lowers.len()];
    for e in &top.extents {
        // Sources past the lowers are the top layer or its metadata: checked by decode_body.
        if let Some(n) = need.get_mut(e.source as usize) {
            *n = (*n).max(e.src_offset + e.length);
        }
    }
    let mut out = Vec::with_capacity(need.len());
    for (j, (lower, &size)) in top.lowers.iter().zip(&need).enumerate() {
        if size > 1 << 30 {
            return None;
        }
        let unit = if size <= 1 << 20 {
            4096
        } else {
            u64::from(MAX_CHUNK)
        };
        const FRAME: u32 = 100;
        let chunks: Vec<ChunkEntry> = (0..size.div_ceil(unit))
            .map(|k| ChunkEntry {
                stream_offset: k * unit,
                frame_offset: k * u64::from(FRAME),
                compressed_len: FRAME,
                uncompressed_len: (size - k * unit).min(unit) as u32,
                digest: [j as u8; 32],
            })
            .collect();
        let t = Trailer {
            flags: top.flags,
            block_size: top.block_size,
            fs_type: top.fs_type,
            chunk_min: top.chunk_min,
            chunk_avg: top.chunk_avg,
            chunk_max: top.chunk_max,
            stream_size: size,
            data_size: chunks.len() as u64 * u64::from(FRAME),
            image_size: 0,
            meta_size: 0,
            diff_id: lower.diff_id,
            lowers: top.lowers[..j].to_vec(),
            chunks,
            meta_chunks: Vec::new(),
            extents: Vec::new(),
        };
        let parsed = Trailer::decode_body(&t.encode_body()).expect("modelled lower is valid");
        out.push(parsed);
    }
    Some(out)
}

/// Plans of a valid stack: pieces cover exactly the range, each inside an existing chunk.
fn check_plans(stack: &Stack) {
    let size = stack.image_size();
    let mut ranges = vec![
        (0, size.min(PLAN_WINDOW)),
        (size / 2, (size - size / 2).min(PLAN_WINDOW)),
        (size.saturating_sub(1), size.min(1)),
        (size, 0),
    ];
    for e in stack.top().extents.iter().take(16) {
        ranges.push((e.image_offset, e.length.min(PLAN_WINDOW)));
    }
    for (off, len) in ranges {
        let pieces = stack
            .plan(off, len)
            .unwrap_or_else(|e| panic!("plan({off}, {len}) of a valid stack: {e}"));
        let mut total = 0u64;
        for p in &pieces {
            assert!(!p.is_empty(), "empty piece in plan({off}, {len})");
            if let Piece::Chunk {
                stream,
                index,
                offset,
                len,
            } = *p
            {
                let c = stack.chunks(stream).get(index).unwrap_or_else(|| {
                    panic!("plan names chunk {index} of {stream:?}, which does not exist")
                });
                assert!(
                    u64::from(offset) + u64::from(len) <= u64::from(c.uncompressed_len),
                    "piece {p:?} runs past its chunk {c:?}"
                );
                if let StreamId::Layer(n) = stream {
                    assert!((n as usize) < stack.layers().len());
                }
            }
            total += p.len();
        }
        assert_eq!(total, len, "plan({off}, {len}) covers {total} bytes");
    }
    assert!(stack.plan(size, 1).is_err(), "read past the image end");
    assert!(stack.plan(u64::MAX, 2).is_err(), "read range overflows");
}

/// Platforms an index is searched for.
const PLATFORMS: &[&str] = &[
    "linux/amd64",
    "linux/arm64",
    "linux/arm/v7",
    "windows/amd64",
];

/// A JSON document as each of the OCI/Docker types blobfmt reads: image manifest
/// (`parse_manifest`), image index or manifest list, and image config (`parse_config`). `Ok` when it is usable as at least one of them.
pub fn oci(data: &[u8]) -> Result<(), String> {
    let mut why = Vec::new();
    let manifest = oci::parse_manifest(data)
        .map_err(|e| e.to_string())
        .and_then(|m| check_manifest(&m));
    let index = serde_json::from_slice::<oci::Index>(data)
        .map_err(|e| e.to_string())
        .and_then(|ix| check_index(&ix));
    let config = serde_json::from_slice::<oci::Config>(data)
        .map_err(|e| e.to_string())
        .and_then(|c| check_config(data, &c));
    for (kind, r) in [("manifest", manifest), ("index", index), ("config", config)] {
        match r {
            Ok(()) => return Ok(()),
            Err(e) => why.push(format!("as {kind}: {e}")),
        }
    }
    Err(why.join("; "))
}

fn check_manifest(m: &oci::Manifest) -> Result<(), String> {
    check_digest(&m.config.digest)?;
    for l in &m.layers {
        check_digest(&l.digest)?;
        oci::layer_compression(&l.media_type).map_err(|e| e.to_string())?;
    }
    // What we write back (a converted image's manifest) reads back the same.
    let bytes = serde_json::to_vec(m).expect("a manifest serializes");
    let again = oci::parse_manifest(&bytes).expect("a written manifest parses");
    assert_eq!(key(&again.config), key(&m.config));
    assert!(again.layers.iter().map(key).eq(m.layers.iter().map(key)));
    Ok(())
}

/// A descriptor without its free-form `platform` (JSON floats need not round-trip exactly).
fn key(d: &oci::Descriptor) -> impl PartialEq + std::fmt::Debug + '_ {
    (&d.media_type, &d.digest, d.size, &d.annotations)
}

fn check_index(ix: &oci::Index) -> Result<(), String> {
    if ix.manifests.is_empty() {
        return Err("index lists no manifests".into());
    }
    for d in &ix.manifests {
        check_digest(&d.digest)?;
    }
    for p in PLATFORMS {
        let want: Platform = p.parse().expect("a valid platform");
        if let Ok(d) = platform::select(&ix.manifests, &want) {
            let got = d.platform.as_ref().expect("a platform was matched");
            assert!(want.matches(got), "{want} selected {got}");
        }
    }
    let _ = oci::select_platform(&ix.manifests);
    Ok(())
}

/// The config through the readers' `parse_config`, against manifests with one layer per
/// diff_id (as an image's must have) and with one more.
fn check_config(data: &[u8], c: &oci::Config) -> Result<(), String> {
    let n = c.rootfs.diff_ids.len();
    assert!(
        oci::parse_config(data, &manifest_with_layers(n + 1)).is_err(),
        "a config was accepted for a manifest with more layers than diff_ids"
    );
    oci::parse_config(data, &manifest_with_layers(n)).map_err(|e| e.to_string())?;
    for d in &c.rootfs.diff_ids {
        check_digest(d).unwrap_or_else(|e| panic!("parse_config accepted diff_id {d:?}: {e}"));
    }
    Ok(())
}

fn manifest_with_layers(n: usize) -> oci::Manifest {
    let desc = |media_type: &str| oci::Descriptor {
        media_type: media_type.into(),
        digest: oci_digest(&[0; 32]),
        size: 0,
        annotations: None,
        platform: None,
    };
    oci::Manifest {
        schema_version: 2,
        media_type: Some(oci::MT_OCI_MANIFEST.into()),
        config: desc(oci::MT_OCI_CONFIG),
        layers: vec![desc(oci::MT_LAYER_ZSTD); n],
        annotations: None,
    }
}

/// Digests name blob files: a parsed digest's path is a file directly in the layout's blobs.
fn check_digest(d: &str) -> Result<(), String> {
    let parsed = parse_oci_digest(d).map_err(|e| e.to_string())?;
    assert!(oci_digest(&parsed).eq_ignore_ascii_case(d), "{d:?}");
    let root = Path::new("/layout");
    let p = oci::blob_path(root, d).expect("a parsed digest has a path");
    assert_eq!(
        p.parent(),
        Some(root.join("blobs/sha256").as_path()),
        "{d:?}"
    );
    assert!(
        p.components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_))),
        "{}",
        p.display()
    );
    Ok(())
}

/// Where the tar check extracts, inside a fresh temporary directory `case/`:
/// `case/layer.tar` (the input), `case/sentinel/file` (must stay untouched) and `case/root/`,
/// where the merged tree is written. Below the input lies a lower layer (`case/lower.tar`)
/// with `dir/a`, `dir/sub/b`, `file`, and symlinks `link -> dir`, `up -> ../sentinel` and
/// `abs -> <case>/sentinel`. Seeds aim at these names.
const SENTINEL_TEXT: &[u8] = b"outside the tree: must not change\n";

/// A canary name seeds use for absolute escapes: must never appear in /tmp or the scratch
/// directory.
pub const CANARY: &str = "cora-fuzz-escape";

/// A layer tar applied on the lower layer above with OCI whiteouts, the merged tree built
/// into an erofs image and written out: `Ok` when all of it succeeded. Panics when anything
/// outside `case/root/` changed, or a file's content lies outside the tar.
pub fn tar(data: &[u8]) -> Result<(), String> {
    let case = scratch("cora-fuzz-tar-");
    let tar_path = case.path().join("layer.tar");
    fs::write(&tar_path, data).expect("writing the tar");
    let r = extract(case.path(), &tar_path, data.len() as u64);
    make_removable(&case.path().join("root"));
    r
}

fn lower_layer(path: &Path, sentinel: &Path) {
    let mut b = tar::Builder::new(fs::File::create(path).expect("creating the lower tar"));
    let mut add = |name: &str, kind: tar::EntryType, body: &[u8], link: Option<&Path>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(body.len() as u64);
        match link {
            Some(target) => b.append_link(&mut h, name, target),
            None => b.append_data(&mut h, name, body),
        }
        .expect("writing the lower tar");
    };
    use tar::EntryType::{Directory, Regular, Symlink};
    add("dir/", Directory, b"", None);
    add("dir/a", Regular, b"a\n", None);
    add("dir/sub/", Directory, b"", None);
    add("dir/sub/b", Regular, b"b\n", None);
    add("file", Regular, b"file\n", None);
    add("link", Symlink, b"", Some(Path::new("dir")));
    add("up", Symlink, b"", Some(Path::new("../sentinel")));
    add("abs", Symlink, b"", Some(sentinel));
    b.finish().expect("writing the lower tar");
}

fn extract(case: &Path, tar_path: &Path, tar_len: u64) -> Result<(), String> {
    let sentinel = case.join("sentinel");
    let root = case.join("root");
    fs::create_dir(&sentinel).expect("mkdir");
    fs::write(sentinel.join("file"), SENTINEL_TEXT).expect("write");
    fs::create_dir(&root).expect("mkdir");
    let lower = case.join("lower.tar");
    lower_layer(&lower, &sentinel);

    let before = outside(case, &root);
    let mut tree = Tree::new();
    tree.apply_layer(&lower, 0)
        .expect("the lower layer applies");
    let r = tree.apply_layer(tar_path, 1).and_then(|files| {
        erofs::build(&tree)?;
        let open = |p: &Path| fs::File::open(p).map_err(Error::Io);
        staging::materialize(&tree, &[open(&lower)?, open(tar_path)?], &root)?;
        Ok(files)
    });
    assert_eq!(
        before,
        outside(case, &root),
        "extraction changed something outside its root"
    );
    for dir in [Path::new("/tmp"), &std::env::temp_dir(), scratch_base()] {
        let canary = dir.join(CANARY);
        assert!(
            fs::symlink_metadata(&canary).is_err(),
            "{} exists: written through an absolute path (remove it after fixing)",
            canary.display()
        );
    }
    let files = r.map_err(|e| e.to_string())?;
    for f in &files {
        assert!(
            f.offset
                .checked_add(f.size)
                .is_some_and(|end| end <= tar_len),
            "content of {} at {}+{} is outside the {tar_len}-byte tar",
            f.path.display(),
            f.offset,
            f.size
        );
        assert!(
            f.path
                .components()
                .all(|c| matches!(c, Component::Normal(_))),
            "{}",
            f.path.display()
        );
    }
    Ok(())
}

/// Everything under `case` but `root`: type, owner, mode, times, links, inode and content.
fn outside(case: &Path, root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).expect("listing the case directory") {
            let p = e.expect("listing").path();
            if p == root {
                continue;
            }
            let m = fs::symlink_metadata(&p).expect("stat");
            let t = m.file_type();
            // Only files this check wrote are read: never open what extraction may have made.
            let what = if t.is_symlink() {
                format!("-> {:?}", fs::read_link(&p).ok())
            } else if t.is_file() && m.len() <= 1 << 20 {
                hex(&sha256(&fs::read(&p).expect("read")))
            } else {
                String::new()
            };
            out.insert(
                p.clone(),
                format!(
                    "{:o} {}:{} ino {} nlink {} size {} mtime {}.{} {what}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.ino(),
                    m.nlink(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
            if t.is_dir() {
                walk(&p, root, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(case, root, &mut out);
    out
}

/// Where cases are extracted: /dev/shm when there is one, as extraction is mostly metadata
/// operations, which are ~20x slower on a disk-backed /tmp (measured on a VM disk).
fn scratch_base() -> &'static Path {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let usable = tempfile::tempdir_in(shm).is_ok();
        if usable {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
}

fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_base())
        .expect("temporary directory")
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tars set modes like 000 on directories; without root that would leave the case
/// directory behind in the temp directory.
fn make_removable(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700));
            make_removable(&e.path());
        }
    }
}

/// A source layer blob: decompressed as plain, gzip and zstd (the ones its magic bytes do not
/// name must fail cleanly too), then the tar of the named compression applied as by `tar`.
pub fn layer(data: &[u8]) -> Result<(), String> {
    let named = match data {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        _ => Compression::None,
    };
    let case = scratch("cora-fuzz-layer-");
    let src = case.path().join("layer");
    fs::write(&src, data).expect("writing the layer");
    let mut result = Err(String::new());
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let dst = case.path().join(format!("{c:?}.tar"));
        let r = oci::decompress_layer(&src, c, &dst);
        let r = r.map(|diff_id| {
            let tar = fs::read(&dst).expect("reading the decompressed tar");
            assert_eq!(sha256(&tar), diff_id, "diff_id of a {c:?} layer");
            tar
        });
        if c == named {
            result = r.map_err(|e| e.to_string());
        }
    }
    let tar_bytes = result?;
    // Mutated compressed seeds can expand a lot; extraction itself is the tar target's job.
    if tar_bytes.len() > 1 << 20 {
        return Ok(());
    }
    tar(&tar_bytes)
}

/// Rewrites the checksum of each header block found by walking entry sizes, so mutations of a
/// header reach the parser instead of stopping at its checksum.
pub fn fix_tar_checksums(data: &mut [u8]) {
    let mut pos = 0usize;
    while let Some(block) = pos.checked_add(512).and_then(|end| data.get_mut(pos..end)) {
        pos += 512;
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let Some(size) = tar_size(&block[124..136]) else {
            return;
        };
        match size
            .div_ceil(512)
            .checked_mul(512)
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| pos.checked_add(n))
        {
            Some(next) => pos = next,
            None => return,
        }
    }
}

/// A header's size field: octal, or base-256 when the high bit is set.
fn tar_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let tail = &field[field.len() - 8..];
        return Some(u64::from_be_bytes(tail.try_into().ok()?) & !(1 << 63));
    }
    field
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| (b'0'..=b'7').contains(&b))
        .try_fold(0u64, |acc, &b| {
            acc.checked_mul(8)?.checked_add(u64::from(b - b'0'))
        })
}
