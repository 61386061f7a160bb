//! The storage layer's error type. Every variant names the destination (a URL or a path,
//! never credentials) and its message says what to check next; [`Error::is_permanent`]
//! drives the retry helper.

use std::io;

use crate::util::backoff::{RetryError, Retryable};

/// Storage result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

const ACCEPTED: &str = "accepted forms: file:///absolute/path, a plain path, s3://bucket/prefix";

/// What went wrong talking to a storage destination.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid storage URL {url:?}: {reason} ({ACCEPTED})")]
    InvalidUrl { url: String, reason: String },

    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    #[error("storage settings: {reason}")]
    Config { reason: String },

    #[error("{url}: not found")]
    NotFound { url: String },

    #[error("{url}: range {start}..{end} starts past the end of the {size}-byte object")]
    InvalidRange {
        url: String,
        start: u64,
        end: u64,
        size: u64,
    },

    #[error("{url}: no credentials found ({detail}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (see docs/storages.md)")]
    NoCredentials { url: String, detail: String },

    #[error("{url}: access denied ({detail}); check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the key's permissions on the bucket")]
    AccessDenied { url: String, detail: String },

    #[error("{url}: bucket {bucket:?} does not exist; create it or correct the URL")]
    NoSuchBucket { url: String, bucket: String },

    #[error("{url}: the server refused the request ({detail}); {hint}")]
    Rejected {
        url: String,
        detail: String,
        hint: &'static str,
    },

    #[error("{url}: storage unavailable after {attempts} attempt(s): {detail}; check that the endpoint is up and reachable (AWS_ENDPOINT_URL), or raise ZENITH_RETRY_ATTEMPTS")]
    Unavailable {
        url: String,
        detail: String,
        attempts: u32,
    },

    #[error("{}", local_message(path, op, source))]
    Local {
        path: String,
        op: &'static str,
        source: io::Error,
    },

    #[error("{url}: reading the stream failed: {detail}")]
    Stream { url: String, detail: String },

    #[error("{url}: the object has at least {size} bytes, more than the {limit} expected of it; the storage is damaged or not zenith's")]
    TooLarge { url: String, size: u64, limit: u64 },

    #[error("{url} is encrypted: set ZENITH_PASSPHRASE to its passphrase, or ZENITH_PASSPHRASE_FILE to a file holding it")]
    Encrypted { url: String },

    #[error("{url}: the passphrase does not open this storage's key; check ZENITH_PASSPHRASE or ZENITH_PASSPHRASE_FILE")]
    WrongPassphrase { url: String },

    #[error("{url} {detail}; zenith does not use it: restore the object from a copy, or delete the snapshots that need it")]
    Tampered { url: String, detail: String },

    #[error("operation cancelled")]
    Cancelled,
}

/// `path: cannot OP: why`, with what to do about the commonest local failures.
pub(crate) fn local_message(path: &str, op: &str, source: &io::Error) -> String {
    let hint = match source.kind() {
        io::ErrorKind::PermissionDenied => "; check the directory's owner and permissions",
        io::ErrorKind::StorageFull => "; the disk is full: free some space and try again",
        io::ErrorKind::NotADirectory => {
            "; a file stands where a directory is expected: choose another path"
        }
        io::ErrorKind::ReadOnlyFilesystem => {
            "; the file system is read-only: choose a writable path"
        }
        _ => "",
    };
    format!("{path}: cannot {op}: {source}{hint}")
}

impl Error {
    /// Whether trying the same call again cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Unavailable { .. } | Error::Stream { .. } => false,
            Error::Local { source, .. } => !matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            _ => true,
        }
    }

    /// A local I/O error on `path` while trying to `op` (a verb: "create", "read", ...).
    pub fn local(path: impl AsRef<std::path::Path>, op: &'static str, source: io::Error) -> Self {
        Error::Local {
            path: path.as_ref().display().to_string(),
            op,
            source,
        }
    }

    /// An error raised by a byte stream of `url`/`key`. Storage errors that travelled
    /// through an `io::Error` (as they do inside streamed gets) come back out unchanged.
    pub fn from_stream(url: String, key: &str, e: io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<Error>()) {
            let inner = e.into_inner().expect("checked by get_ref above");
            return *inner
                .downcast::<Error>()
                .expect("checked by is::<Error>() above");
        }
        Error::Stream {
            url: format!("{url}/{key}"),
            detail: e.to_string(),
        }
    }

    /// Wraps this error for transport through an `io::Error`-typed stream.
    pub fn into_io(self) -> io::Error {
        let kind = match &self {
            Error::NotFound { .. } => io::ErrorKind::NotFound,
            Error::AccessDenied { .. } => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// The final error of a retried call.
    pub fn from_retry(e: RetryError<Error>) -> Self {
        match e {
            RetryError::Cancelled => Error::Cancelled,
            RetryError::Failed {
                error: Error::Unavailable { url, detail, .. },
                attempts,
            } => Error::Unavailable {
                url,
                detail,
                attempts,
            },
            RetryError::Failed { error, .. } => error,
        }
    }
}

impl Retryable for Error {
    fn is_permanent(&self) -> bool {
        Error::is_permanent(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let e = Error::local(
            "/x",
            "create",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(e.to_string().contains("permissions"), "{e}");
        assert!(e.is_permanent());
        let e = Error::Unavailable {
            url: "s3://b".into(),
            detail: "connection refused".into(),
            attempts: 3,
        };
        assert!(e.to_string().contains("after 3 attempt"), "{e}");
        assert!(!e.is_permanent());
    }

    #[test]
    fn storage_errors_survive_an_io_round_trip() {
        let e = Error::NotFound {
            url: "file:///x/k".into(),
        };
        let back = Error::from_stream("file:///x".into(), "k", e.into_io());
        assert!(matches!(back, Error::NotFound { .. }), "{back:?}");
    }
}
