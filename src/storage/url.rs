//! Parsing of storage URLs: `file:///abs/path`, a plain path, and `s3://bucket/prefix`.
//! Pure string work, no I/O, so every accepted and refused form is unit-tested here.

use std::fmt;
use std::path::{Path, PathBuf};

use super::error::{Error, Result};

/// A parsed storage destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// A directory on this machine (absolute).
    Local(PathBuf),
    /// An S3 bucket and a key prefix inside it (no leading or trailing `/`, maybe empty).
    S3 { bucket: String, prefix: String },
}

impl StorageUrl {
    /// Parses `url`. Relative plain paths are made absolute against the current directory.
    pub fn parse(url: &str) -> Result<StorageUrl> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(invalid("it is empty"));
        }
        if let Some(rest) = strip_scheme(trimmed, "s3") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(invalid("it names no bucket; write s3://BUCKET/prefix"));
            }
            if !valid_bucket(bucket) {
                return Err(invalid(
                    "the bucket name must be 3 to 63 characters of letters, digits, '.', '-' or '_'",
                ));
            }
            let prefix = prefix.trim_end_matches('/');
            if !prefix.is_empty()
                && prefix
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..")
            {
                return Err(invalid("the prefix has an empty, '.' or '..' path segment"));
            }
            return Ok(StorageUrl::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some(rest) = strip_scheme(trimmed, "file") {
            if !rest.starts_with('/') {
                return Err(invalid(
                    "a file URL needs an absolute path, as in file:///var/backups/zenith",
                ));
            }
            let decoded = percent_decode(rest).ok_or_else(|| invalid("it has a bad %-escape"))?;
            return Ok(StorageUrl::Local(normalize(Path::new(&decoded))));
        }
        if let Some((scheme, _)) = trimmed.split_once("://") {
            return Err(invalid(&format!("the scheme {scheme:?} is not supported")));
        }
        if let Some(scheme) = scheme_like(trimmed) {
            // `s3:/bucket` or `file:/x` is a typo, not a directory named "s3:" to fill quietly.
            return Err(invalid(&format!(
                "it starts like a {scheme:?} URL without '//'; write {scheme}://... (or ./{trimmed} for a local directory of that name)"
            )));
        }
        let path = Path::new(trimmed);
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| invalid(&format!("the current directory is unknown: {e}")))?
                .join(path)
        };
        Ok(StorageUrl::Local(normalize(&absolute)))
    }
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::Local(path) => write!(f, "file://{}", path.display()),
            StorageUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StorageUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

fn strip_scheme<'a>(url: &'a str, scheme: &str) -> Option<&'a str> {
    let (head, rest) = url.split_once("://")?;
    head.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// `Some("s3")` for `s3:bucket/x`: a first segment that is a URL scheme followed by ':'.
fn scheme_like(path: &str) -> Option<&str> {
    let (head, _) = path.split_once(':')?;
    let mut chars = head.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && !head.contains('/')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-')))
    .then_some(head)
}

fn valid_bucket(bucket: &str) -> bool {
    (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Removes `.` segments and resolves `..` lexically, so the URL printed back is canonical.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str) -> StorageUrl {
        StorageUrl::S3 {
            bucket: bucket.into(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn s3_forms() {
        assert_eq!(StorageUrl::parse("s3://bucket").unwrap(), s3("bucket", ""));
        assert_eq!(StorageUrl::parse("s3://bucket/").unwrap(), s3("bucket", ""));
        assert_eq!(
            StorageUrl::parse("s3://bucket/team/app/").unwrap(),
            s3("bucket", "team/app")
        );
        assert_eq!(
            StorageUrl::parse("S3://my.bucket-1/x").unwrap(),
            s3("my.bucket-1", "x")
        );
        assert_eq!(
            StorageUrl::parse("s3://bucket/team/app")
                .unwrap()
                .to_string(),
            "s3://bucket/team/app"
        );
    }

    #[test]
    fn s3_refusals_say_why() {
        for (url, why) in [
            ("s3://", "no bucket"),
            ("s3:///prefix", "no bucket"),
            ("s3://b/x", "3 to 63"),
            ("s3://bucket//x", "empty"),
            ("s3://bucket/a/../b", "'..'"),
        ] {
            let e = StorageUrl::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(e.contains("accepted forms"), "{url}: {e}");
        }
    }

    #[test]
    fn file_forms() {
        assert_eq!(
            StorageUrl::parse("file:///var/x").unwrap(),
            StorageUrl::Local("/var/x".into())
        );
        assert_eq!(
            StorageUrl::parse("file:///var/a%20b/").unwrap(),
            StorageUrl::Local("/var/a b".into())
        );
        assert_eq!(
            StorageUrl::parse("/var/./y/../x").unwrap(),
            StorageUrl::Local("/var/x".into())
        );
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            StorageUrl::parse("rel/dir").unwrap(),
            StorageUrl::Local(cwd.join("rel/dir"))
        );
        assert_eq!(
            StorageUrl::parse("/var/x").unwrap().to_string(),
            "file:///var/x"
        );
    }

    #[test]
    fn other_refusals() {
        assert!(StorageUrl::parse("")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(StorageUrl::parse("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("\"ftp\" is not supported"));
        assert!(StorageUrl::parse("file://relative")
            .unwrap_err()
            .to_string()
            .contains("absolute"));
        assert!(StorageUrl::parse("file:///bad%zz")
            .unwrap_err()
            .to_string()
            .contains("%-escape"));
        for typo in ["s3:/bucket/app", "s3:bucket", "file:/var/backups", "S3:x"] {
            let e = StorageUrl::parse(typo).unwrap_err().to_string();
            assert!(e.contains("without '//'"), "{typo}: {e}");
        }
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            StorageUrl::parse("./s3:x").unwrap(),
            StorageUrl::Local(cwd.join("s3:x"))
        );
        assert_eq!(
            StorageUrl::parse("dir/a:b").unwrap(),
            StorageUrl::Local(cwd.join("dir/a:b"))
        );
    }
}
