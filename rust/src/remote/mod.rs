//! Object-storage roots (`s3://bucket/prefix/`, `gs://`, `az://`): one client per bucket on a
//! runtime owned by the extension, phase 1 by listing, phase 2 by ranged reads of the first
//! bytes, and whole-object reads for phase 3 and the server.
//!
//! A root's URI is stored in `roots.path` like a folder (normalised, with a trailing `/`), and
//! a sample's `path` is its key relative to that prefix, so `root + path` is the object's URI.

pub mod client;
pub mod failure;
pub mod list;
pub mod probe;
pub mod profile;
pub mod read;

use std::path::Path;

use crate::error::{Error, Result};

/// The object stores a root can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    S3,
    Gs,
    Az,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::S3 => "s3",
            Scheme::Gs => "gs",
            Scheme::Az => "az",
        }
    }
}

/// `scheme://bucket/key`, the key without a leading `/` (empty for the whole bucket).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectUri {
    pub scheme: Scheme,
    pub bucket: String,
    pub key: String,
}

/// The scheme of `s` when it names an object store (`s3://`, `gs://`, `az://`, any case).
pub fn scheme_of(s: &str) -> Option<Scheme> {
    let (scheme, _) = s.split_once("://")?;
    match scheme.to_ascii_lowercase().as_str() {
        "s3" | "s3a" => Some(Scheme::S3),
        "gs" | "gcs" => Some(Scheme::Gs),
        "az" | "azure" | "abfs" => Some(Scheme::Az),
        _ => None,
    }
}

/// True when the path is an object URI rather than a file name.
pub fn is_object_path(p: &Path) -> bool {
    p.to_str().is_some_and(|s| scheme_of(s).is_some())
}

impl ObjectUri {
    /// Parse `s3://bucket/key`; `None` when `s` names no object store (a file path).
    pub fn parse(s: &str) -> Option<Result<ObjectUri>> {
        let scheme = scheme_of(s)?;
        let rest = &s[s.find("://")? + 3..];
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Some(Err(Error::InvalidArgument(format!(
                "{s}: no bucket name (expected {}://BUCKET/PREFIX/)",
                scheme.name()
            ))));
        }
        if bucket
            .bytes()
            .any(|b| !(b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'))
        {
            return Some(Err(Error::InvalidArgument(format!(
                "{s}: {bucket:?} is not a valid bucket name"
            ))));
        }
        let key = key.trim_start_matches('/');
        if key.split('/').any(|seg| seg == "." || seg == "..") {
            return Some(Err(Error::InvalidArgument(format!(
                "{s}: `.` and `..` are not allowed in an object key"
            ))));
        }
        Some(Ok(ObjectUri {
            scheme,
            bucket: bucket.to_string(),
            key: key.to_string(),
        }))
    }

    /// An object URI held in a path (a root joined with a sample's key).
    pub fn from_path(p: &Path) -> Option<Result<ObjectUri>> {
        ObjectUri::parse(p.to_str()?)
    }

    /// `scheme://bucket`, as messages name the bucket.
    pub fn bucket_uri(&self) -> String {
        format!("{}://{}", self.scheme.name(), self.bucket)
    }

    /// The key read as a folder: empty, or ending in one `/`.
    pub fn prefix(&self) -> String {
        let k = self.key.trim_end_matches('/');
        if k.is_empty() {
            String::new()
        } else {
            format!("{k}/")
        }
    }

    /// The URI of this key as a root: `scheme://bucket/prefix/` (the form stored in `roots`).
    pub fn root(&self) -> String {
        format!("{}/{}", self.bucket_uri(), self.prefix())
    }
}

impl std::fmt::Display for ObjectUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.bucket_uri(), self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> ObjectUri {
        ObjectUri::parse(s).unwrap().unwrap()
    }

    #[test]
    fn parses_and_normalises() {
        let u = ok("s3://bucket/photos");
        assert_eq!((u.scheme, u.bucket.as_str()), (Scheme::S3, "bucket"));
        assert_eq!(u.root(), "s3://bucket/photos/");
        assert_eq!(ok("s3://bucket/photos/").root(), "s3://bucket/photos/");
        assert_eq!(ok("S3://bucket//a/b//").root(), "s3://bucket/a/b/");
        assert_eq!(ok("s3://bucket").root(), "s3://bucket/");
        assert_eq!(ok("s3://bucket/").prefix(), "");
        assert_eq!(ok("gs://b/x").scheme, Scheme::Gs);
        assert_eq!(ok("az://c/x").scheme, Scheme::Az);
        assert_eq!(ok("s3://b/a b/ü.jpg").key, "a b/ü.jpg");
        assert_eq!(ok("s3://b/k.jpg").to_string(), "s3://b/k.jpg");
    }

    #[test]
    fn refuses_what_is_not_a_bucket() {
        assert!(ObjectUri::parse("/data/photos").is_none());
        assert!(ObjectUri::parse("http://x/y").is_none());
        assert!(ObjectUri::parse("relative/s3://x").is_none());
        assert!(ObjectUri::parse("s3://").unwrap().is_err());
        assert!(ObjectUri::parse("s3:///key").unwrap().is_err());
        assert!(ObjectUri::parse("s3://bad bucket/k").unwrap().is_err());
        assert!(ObjectUri::parse("s3://b/../k").unwrap().is_err());
        assert!(is_object_path(Path::new("s3://b/k.jpg")));
        assert!(!is_object_path(Path::new("/s3://b")));
    }
}
