//! Image references accepted by the `cora` command line.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `oci:PATH[:TAG]` — an OCI image layout directory.
    Layout { path: PathBuf, tag: Option<String> },
    /// `dir:PATH` — a root filesystem directory (source only).
    Dir(PathBuf),
    /// `HOST[:PORT]/REPO[:TAG|@DIGEST]` — a registry reference.
    Registry(String),
}

impl std::str::FromStr for ImageRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag is what follows the last ':' when it has no '/' (paths may contain ':').
            let (path, tag) = match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') && !p.is_empty() && !t.is_empty() => {
                    (p, Some(t.to_string()))
                }
                _ => (rest, None),
            };
            if path.is_empty() {
                return Err(format!("{s:?}: oci: needs a path"));
            }
            return Ok(ImageRef::Layout {
                path: PathBuf::from(path),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("dir:") {
            if rest.is_empty() {
                return Err(format!("{s:?}: dir: needs a path"));
            }
            return Ok(ImageRef::Dir(PathBuf::from(rest)));
        }
        let host = s.split('/').next().unwrap_or("");
        if !s.contains('/') || !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(format!(
                "{s:?} is not oci:PATH[:TAG], dir:PATH or HOST[:PORT]/REPO[:TAG|@DIGEST]"
            ));
        }
        Ok(ImageRef::Registry(s.to_string()))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Layout { path, tag: Some(t) } => write!(f, "oci:{}:{t}", path.display()),
            ImageRef::Layout { path, tag: None } => write!(f, "oci:{}", path.display()),
            ImageRef::Dir(p) => write!(f, "dir:{}", p.display()),
            ImageRef::Registry(r) => f.write_str(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_form() {
        assert_eq!(
            "oci:/a/b:v1".parse::<ImageRef>(),
            Ok(ImageRef::Layout {
                path: "/a/b".into(),
                tag: Some("v1".into())
            })
        );
        assert_eq!(
            "oci:/a/b".parse::<ImageRef>(),
            Ok(ImageRef::Layout {
                path: "/a/b".into(),
                tag: None
            })
        );
        assert_eq!("dir:/x".parse::<ImageRef>(), Ok(ImageRef::Dir("/x".into())));
        assert_eq!(
            "127.0.0.1:5000/app:v2".parse::<ImageRef>(),
            Ok(ImageRef::Registry("127.0.0.1:5000/app:v2".into()))
        );
        assert!("ubuntu".parse::<ImageRef>().is_err());
        assert!("oci:".parse::<ImageRef>().is_err());
    }
}
