//! `dir:PATH` sources: a root filesystem directory as a one-layer OCI image, reproducibly.

use crate::format::oci_digest;
use crate::oci;
use crate::writer::HashingWriter;
use crate::{Error, IoContext};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Write `dir` as one uncompressed layer into an OCI layout at `layout` tagged `tag`.
pub fn layout_from_dir(dir: &Path, layout: &Path, tag: &str) -> Result<(), Error> {
    layout_from_dirs(&[dir], layout, tag, false)
}

/// Write each of `dirs` as one layer (bottom first; sorted tar, numeric owners, file mtimes,
/// no atime/ctime) into an OCI layout at `layout` tagged `tag`, gzip-compressed like a
/// registry would hold them when `gzip` is set. The same trees always give the same bytes.
pub fn layout_from_dirs(dirs: &[&Path], layout: &Path, tag: &str, gzip: bool) -> Result<(), Error> {
    fs::create_dir_all(layout).ctx(|| format!("creating {}", layout.display()))?;
    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    for dir in dirs {
        let (diff_id, desc) = layer_from_dir(dir, layout, gzip)?;
        diff_ids.push(diff_id);
        layers.push(desc);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_bytes = serde_json::to_vec(&config).map_err(|e| Error::Convert(e.to_string()))?;
    let config_digest = oci::put_blob(layout, &config_bytes)?;
    let manifest = oci::Manifest {
        schema_version: 2,
        media_type: Some(oci::MT_OCI_MANIFEST.into()),
        config: oci::Descriptor {
            media_type: oci::MT_OCI_CONFIG.into(),
            digest: config_digest,
            size: config_bytes.len() as u64,
            annotations: None,
            platform: None,
        },
        layers,
        annotations: None,
    };
    let mbytes = serde_json::to_vec(&manifest).map_err(|e| Error::Convert(e.to_string()))?;
    oci::put_blob(layout, &mbytes)?;
    oci::tag_manifest(layout, tag, &mbytes)
}

fn layer_from_dir(
    dir: &Path,
    layout: &Path,
    gzip: bool,
) -> Result<(String, oci::Descriptor), Error> {
    // Streamed to disk and hashed on the way: a layer is never held in memory.
    let blob_dir = layout.join("blobs/sha256");
    fs::create_dir_all(&blob_dir).ctx(|| format!("creating {}", blob_dir.display()))?;
    let tar_tmp = tempfile::NamedTempFile::new_in(&blob_dir).ctx(|| "creating layer tar".into())?;
    let (diff_id, tar_size) = {
        let hashing = HashingWriter::new(std::io::BufWriter::with_capacity(
            1 << 20,
            tar_tmp.as_file(),
        ));
        let mut b = tar::Builder::new(hashing);
        b.follow_symlinks(false);
        let mut entries = Vec::new();
        collect(dir, Path::new(""), &mut entries)?;
        for rel in entries {
            let p = dir.join(&rel);
            let m = fs::symlink_metadata(&p).ctx(|| format!("stat {}", p.display()))?;
            let mut h = tar::Header::new_ustar();
            h.set_metadata_in_mode(&m, tar::HeaderMode::Complete);
            h.set_mtime(m.mtime().max(0) as u64);
            h.set_uid(u64::from(m.uid()));
            h.set_gid(u64::from(m.gid()));
            // File capabilities (ping, …), ACLs and SELinux labels live in xattrs; tar carries
            // them as PAX records, which the converter and runtimes restore.
            let xattrs = read_xattrs(&p)?;
            if !xattrs.is_empty() {
                b.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .ctx(|| format!("adding xattrs of {}", rel.display()))?;
            }
            if m.file_type().is_symlink() {
                let target = fs::read_link(&p).ctx(|| format!("readlink {}", p.display()))?;
                b.append_link(&mut h, &rel, &target)
                    .ctx(|| format!("adding {}", rel.display()))?;
            } else if m.is_file() {
                let f = fs::File::open(&p).ctx(|| format!("opening {}", p.display()))?;
                b.append_data(&mut h, &rel, f)
                    .ctx(|| format!("adding {}", rel.display()))?;
            } else {
                b.append_data(&mut h, &rel, std::io::empty())
                    .ctx(|| format!("adding {}", rel.display()))?;
            }
        }
        let mut hashing = b.into_inner().ctx(|| "finishing layer tar".into())?;
        hashing.flush().ctx(|| "writing layer tar".into())?;
        let (_, digest, size) = hashing.finish();
        (digest, size)
    };
    let (stored, size, media_type) = if gzip {
        let gz_tmp =
            tempfile::NamedTempFile::new_in(&blob_dir).ctx(|| "creating layer blob".into())?;
        let hashing =
            HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, gz_tmp.as_file()));
        let mut e = flate2::write::GzEncoder::new(hashing, flate2::Compression::default());
        let mut tar = fs::File::open(tar_tmp.path()).ctx(|| "reading layer tar".into())?;
        std::io::copy(&mut tar, &mut e).ctx(|| "compressing layer".into())?;
        let mut hashing = e.finish().ctx(|| "compressing layer".into())?;
        hashing.flush().ctx(|| "writing layer blob".into())?;
        let (_, digest, size) = hashing.finish();
        (
            oci::persist_blob(layout, gz_tmp, &digest)?,
            size,
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )
    } else {
        (
            oci::persist_blob(layout, tar_tmp, &diff_id)?,
            tar_size,
            "application/vnd.oci.image.layer.v1.tar",
        )
    };
    Ok((
        oci_digest(&diff_id),
        oci::Descriptor {
            media_type: media_type.into(),
            digest: stored,
            size,
            annotations: None,
            platform: None,
        },
    ))
}

/// `p`'s extended attributes (not following symlinks) as PAX keys, sorted so the tar is
/// reproducible.
fn read_xattrs(p: &Path) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let names = match xattr::list(p) {
        Ok(names) => names,
        // Filesystems without xattr support have none to carry.
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx(|| format!("listing xattrs of {}", p.display())),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(value) = xattr::get(p, &name).ctx(|| format!("xattr of {}", p.display()))? else {
            continue;
        };
        let key = format!("SCHILY.xattr.{}", name.to_string_lossy());
        out.push((key, value));
    }
    out.sort();
    Ok(out)
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .ctx(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .ctx(|| format!("listing {}", dir.display()))?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let is_dir = fs::symlink_metadata(root.join(&r))
            .ctx(|| format!("stat {}", r.display()))?
            .is_dir();
        out.push(r.clone());
        if is_dir {
            collect(root, &r, out)?;
        }
    }
    Ok(())
}
