//! Storage destinations: where snapshots and WAL live.
//!
//! A destination is named by a URL (`file:///abs/path`, a plain path, or
//! `s3://bucket/prefix`, see [`StorageUrl`]) and opened with [`open`]. Every backend
//! implements the small [`Storage`] trait; everything above this module (snapshot formats,
//! push/pull, WAL archiving) is written against the trait only.
//!
//! What this module promises:
//! - **Atomic objects.** No reader, lister or `head` ever sees a partially written object:
//!   local files are written to a temporary name and renamed, S3 objects become visible when
//!   their single PUT or their multipart upload completes.
//! - **Bounded memory.** Streamed puts and gets hold at most `concurrency × part size` bytes.
//! - **Typed errors** ([`Error`]) that name the URL, say what to check, tell retryable from
//!   permanent, and never carry credentials.
//!
//! What it does not do: it knows nothing about snapshots, and it offers no rename or
//! compare-and-swap, and no append but the local backend's file written in place
//! ([`Storage::open_in_place`], for the safekeeper); commit order (data first, manifest
//! last) is the snapshot layer's job.

pub(crate) mod error;
mod local;
mod s3;
mod sealed;
mod url;

pub mod check;

use std::fmt::Debug;
use std::ops::Range;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

pub use error::{Error, Result};
pub use local::LocalStorage;
pub use s3::{S3Options, S3Storage, StaticCredentials, TransferCounts};
pub use sealed::{
    change_passphrase, encrypt, passphrase_change, required_passphrase, unlock, KEY_OBJECT,
    PASSPHRASE_ENV, PASSPHRASE_FILE_ENV,
};
pub use url::StorageUrl;

/// A byte stream read from or written to a storage.
pub type ByteReader = Pin<Box<dyn AsyncRead + Send>>;

/// What a listing or `head` says about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The key relative to the storage's root, `/`-separated.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification, when the backend reports one.
    pub last_modified: Option<SystemTime>,
}

/// An object store rooted at one URL.
///
/// Keys are relative, `/`-separated paths (see [`validate_key`]): no empty, `.` or `..`
/// segments, no leading or trailing `/`. Contract, for every implementation:
/// - `put` and `put_stream` are atomic: until they return `Ok`, readers see the previous
///   object (or none); afterwards they see the whole new one. An interrupted or failed put
///   leaves no partial object behind under the key.
/// - `get` of a missing key, `get_range` and `head` return [`Error::NotFound`].
/// - `list` returns every object whose key starts with the prefix, all pages, sorted by key.
/// - `delete` is idempotent: deleting a missing key succeeds.
/// - Transient failures are retried inside the backend with the shared backoff policy; an
///   `Err` that reaches the caller is final for that call.
#[async_trait]
pub trait Storage: Send + Sync + Debug {
    /// The destination's canonical URL, for messages. Never contains credentials.
    fn url(&self) -> String;

    /// Whether objects are sealed with the storage's key on their way in (see
    /// `sealed`).
    fn encrypted(&self) -> bool {
        false
    }

    /// For a writer that keeps `key` open and writes it in place, syncing as it goes (the
    /// safekeeper's segment being streamed, like `pg_receivewal`'s partial file): the
    /// object's file, created durably with its directories when missing and never
    /// truncated. `None` where objects are only written whole (S3, an encrypted storage).
    fn open_in_place(&self, _key: &str) -> Option<Result<std::fs::File>> {
        None
    }

    /// Stores `data` under `key`, replacing any previous object, atomically.
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    /// Streams `reader` to `key` (multipart for large objects), atomically, with bounded
    /// memory. Returns the number of bytes stored.
    async fn put_stream(&self, key: &str, reader: ByteReader) -> Result<u64>;

    /// Streams the object stored under `key`.
    async fn get(&self, key: &str) -> Result<ByteReader>;

    /// Reads bytes `range` of the object; a range reaching past the end is cut at the end,
    /// one starting past the end is [`Error::InvalidRange`].
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes>;

    /// Size and modification time of one object.
    async fn head(&self, key: &str) -> Result<ObjectMeta>;

    /// Every object whose key starts with `prefix` (a plain string prefix, not only whole
    /// path segments), sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Removes one object; a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// The whole object in memory; meant for small objects such as manifests.
    async fn get_bytes(&self, key: &str) -> Result<Bytes> {
        let mut reader = self.get(key).await?;
        let mut buf = Vec::new();
        reader
            .read_to_end(&mut buf)
            .await
            .map_err(|e| Error::from_stream(self.url(), key, e))?;
        Ok(Bytes::from(buf))
    }

    /// Stores the file at `path` under `key`, atomically like `put_stream`. The local
    /// backend copies inside the kernel (`copy_file_range`).
    async fn put_file(&self, key: &str, path: &Path) -> Result<u64> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::local(path, "open", e))?;
        self.put_stream(key, Box::pin(file)).await
    }

    /// Writes the object under `key` to a new file at `path` through a temporary sibling
    /// that is fsynced and renamed into place: a failed download never leaves a partial file
    /// under `path`. Returns the number of bytes written.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64> {
        let reader = self.get(key).await?;
        local::write_reader_atomic(path.to_path_buf(), reader, self.url(), key.to_string()).await
    }

    /// Like [`Storage::get_bytes`], but stops reading past `limit` bytes and refuses the
    /// object, so a hostile or damaged store cannot make the caller allocate without bound.
    /// (Callers that listed the object already can refuse it by its listed size, unread.)
    async fn get_bytes_limited(&self, key: &str, limit: u64) -> Result<Bytes> {
        let reader = self.get(key).await?;
        let mut buf = Vec::new();
        reader
            .take(limit + 1)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| Error::from_stream(self.url(), key, e))?;
        if buf.len() as u64 > limit {
            return Err(Error::TooLarge {
                url: format!("{}/{key}", self.url()),
                size: buf.len() as u64,
                limit,
            });
        }
        Ok(Bytes::from(buf))
    }

    /// Removes what writers killed mid-way left behind (the local backend's temporary
    /// files), best effort: failures are logged, never returned. A backend with nothing
    /// to collect (S3 shows no partial object) does nothing.
    async fn remove_abandoned(&self) {}

    /// Whether `key` exists.
    async fn exists(&self, key: &str) -> Result<bool> {
        match self.head(key).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Opens the destination named by `url`, reading S3 settings and credentials from the
/// environment (see `docs/storages.md`). An encrypted destination is opened with the
/// passphrase from the environment, and fails in one line without it.
pub async fn open(url: &str) -> Result<Arc<dyn Storage>> {
    sealed::wrap_if_encrypted(open_raw(url).await?).await
}

/// Opens the destination named by `url` as it is stored, encrypted or not.
pub async fn open_raw(url: &str) -> Result<Arc<dyn Storage>> {
    match StorageUrl::parse(url)? {
        StorageUrl::Local(path) => Ok(Arc::new(LocalStorage::new(path)?)),
        StorageUrl::S3 { bucket, prefix } => {
            let options = S3Options::from_env().map_err(|reason| Error::Config { reason })?;
            Ok(Arc::new(S3Storage::new(&bucket, &prefix, options).await?))
        }
    }
}

/// The marker in the names of the local backend's temporary files; keys may not contain it.
pub(crate) use crate::util::tempdir::TEMP_MARKER;

/// Checks that `key` is a valid object key (see [`Storage`]).
pub fn validate_key(key: &str) -> Result<()> {
    let reason = crate::util::relpath::check(key, 1024).err().or_else(|| {
        key.split('/')
            .any(|segment| segment.contains(TEMP_MARKER))
            .then_some("it contains zenith's temporary-file marker")
    });
    match reason {
        Some(reason) => Err(Error::InvalidKey {
            key: key.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a listing prefix: like a key, but may be empty or end with `/`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.is_empty() {
        if prefix.is_empty() {
            return Ok(());
        }
        return Err(Error::InvalidKey {
            key: prefix.to_string(),
            reason: "a listing prefix cannot be only '/'",
        });
    }
    validate_key(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "a",
            "a/b",
            "snapshots/0123/manifest.json",
            "pg_wal/000000010000000000000001",
            ".hidden",
        ] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "../a",
            "a/../b",
            "a/./b",
            "a\\b",
            "a\0b",
            "x/.zenith-tmp-1",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_key(&"a".repeat(1025)).is_err());
    }

    #[test]
    fn prefixes() {
        for ok in ["", "a", "a/", "a/b", "a/b/"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["/", "..", "../", "a//"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }
}
