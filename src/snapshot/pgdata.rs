//! The `pgdata` format: a plain PostgreSQL data directory. Every file is one object under
//! the destination, at its own path, plus `zenith-manifest.json` (sizes and SHA-256 of every
//! file) written last. On `file://` the destination is itself a data directory that stock
//! `postgres -D` starts on (empty directories are created, and when zenith runs as root the
//! tree is handed to the PostgreSQL account).
//!
//! Importing accepts such a snapshot (every file checked against the manifest) or, from a
//! local path without a manifest, any stopped PostgreSQL data directory.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::datadir::{self, DirEntry};
use super::error::join_error;
use super::error::{Result, SnapshotError};
use super::manifest::{self, Entry, EntryKind, Format, Manifest};
use super::survey::{survey_for, CheckReport, PackOptions};
use super::tree::{into_new_dir, prepare_tree, sync_tree};
use crate::storage::{self, Storage, StorageUrl};

/// The manifest's key; PostgreSQL ignores unknown files in its data directory.
pub const MANIFEST_KEY: &str = "zenith-manifest.json";
/// Files in flight at once: most are small, so requests, not bandwidth, set the pace.
const CONCURRENCY: usize = 8;

/// Hashes what passes through.
struct Hashing<R> {
    inner: R,
    hasher: Arc<Mutex<Sha256>>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_ready() {
            self.hasher
                .lock()
                .expect("lock")
                .update(&buf.filled()[before..]);
        }
        poll
    }
}

/// Writes the stopped (or staged) data directory `dir` to `storage` as plain files.
pub async fn pack_dir(
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
) -> Result<Manifest> {
    refuse_non_empty(storage.as_ref()).await?;
    let (origin, walked) = survey_for(dir, Format::Pgdata, options, lsns).await?;
    let keys: Vec<String> = walked
        .iter()
        .filter(|e| !e.is_dir)
        .map(|e| e.rel.clone())
        .collect();
    let written = Written::begin(storage.as_ref(), keys);
    let result = write_files(Arc::clone(&storage), origin, &walked, options).await;
    written.settle(&result).await;
    result
}

/// The pgdata export proper, into an empty destination.
async fn write_files(
    storage: Arc<dyn Storage>,
    origin: manifest::Origin,
    walked: &[DirEntry],
    options: &PackOptions,
) -> Result<Manifest> {
    let progress = &options.progress;
    let uploads: Vec<Result<Entry>> = futures::stream::iter(walked.iter())
        .map(|item| {
            let storage = Arc::clone(&storage);
            async move {
                let entry = upload_one(storage.as_ref(), item).await;
                progress.add(item.size);
                entry
            }
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    options.progress.finish();
    let entries = uploads.into_iter().collect::<Result<Vec<Entry>>>()?;
    let stored: u64 = entries.iter().map(|e| e.size).sum();
    let manifest = Manifest::new(origin, entries, stored);
    if let Ok(StorageUrl::Local(root)) = StorageUrl::parse(&storage.url()) {
        make_startable(&root, &manifest)?;
    }
    storage
        .put(MANIFEST_KEY, Bytes::from(manifest.to_json()))
        .await?;
    Ok(manifest)
}

/// What a pgdata or basebackup export writes into its (empty) destination, so that a
/// failed one (a full disk, a dead server) is taken back and leaves the destination as it
/// was, its space free again.
pub(crate) struct Written<'a> {
    storage: &'a dyn Storage,
    keys: Vec<String>,
    /// A local destination, and whether its directory existed before.
    local: Option<(PathBuf, bool)>,
}

impl<'a> Written<'a> {
    /// Before writing `keys` (the manifest's key is added) to `storage`.
    pub(crate) fn begin(storage: &'a dyn Storage, mut keys: Vec<String>) -> Written<'a> {
        keys.push(MANIFEST_KEY.to_string());
        let local = match StorageUrl::parse(&storage.url()) {
            Ok(StorageUrl::Local(root)) => {
                let existed = root.exists();
                Some((root, existed))
            }
            _ => None,
        };
        Written {
            storage,
            keys,
            local,
        }
    }

    /// After the export: on failure, removes what it wrote (best effort, logged).
    pub(crate) async fn settle<T>(self, result: &Result<T>) {
        if result.is_ok() {
            return;
        }
        for key in &self.keys {
            if let Err(e) = self.storage.delete(key).await {
                tracing::warn!("could not remove {key} of a failed export: {e}");
            }
        }
        match self.local {
            Some((root, false)) => {
                let _ = std::fs::remove_dir_all(&root);
            }
            // Directories the export created, now empty (deepest first; a directory
            // with anything in it stays).
            Some((root, true)) => {
                let mut dirs: Vec<PathBuf> = walkdir::WalkDir::new(&root)
                    .min_depth(1)
                    .into_iter()
                    .flatten()
                    .filter(|e| e.file_type().is_dir())
                    .map(|e| e.into_path())
                    .collect();
                dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
                for d in dirs {
                    let _ = std::fs::remove_dir(d);
                }
            }
            None => {}
        }
    }
}

/// A pgdata or basebackup destination holds one snapshot: writing into one that holds
/// anything would mix two (and a stale backup_label would make PostgreSQL recover from the
/// wrong checkpoint).
pub(crate) async fn refuse_non_empty(storage: &dyn Storage) -> Result<()> {
    if let Some(first) = storage.list("").await?.first() {
        return Err(SnapshotError::Refused {
            reason: format!(
                "{} is not empty (it holds {}); export a pgdata or basebackup snapshot into an empty location",
                storage.url(),
                first.key
            ),
        });
    }
    Ok(())
}

async fn upload_one(storage: &dyn Storage, item: &DirEntry) -> Result<Entry> {
    if item.is_dir {
        return Ok(Entry::dir(&item.rel, item.mode));
    }
    let file = tokio::fs::File::open(&item.abs)
        .await
        .map_err(|e| SnapshotError::io(&item.abs, "open", e))?;
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let size = storage
        .put_stream(
            &item.rel,
            Box::pin(Hashing {
                inner: file,
                hasher: Arc::clone(&hasher),
            }),
        )
        .await?;
    let digest = hasher.lock().expect("lock").clone().finalize();
    Ok(Entry {
        path: item.rel.clone(),
        kind: EntryKind::File,
        mode: item.mode,
        size,
        sha256: Some(hex::encode(digest)),
        list: None,
        stamp: None,
    })
}

/// On a local destination: the directories PostgreSQL needs (even empty ones), its modes,
/// and, as root, the PostgreSQL account as owner, so that `postgres -D` starts on it.
fn make_startable(root: &Path, manifest: &Manifest) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in manifest.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
        let path = root.join(&entry.path);
        std::fs::create_dir_all(&path).map_err(|e| SnapshotError::io(&path, "create", e))?;
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| SnapshotError::io(root, "chmod", e))?;
    crate::compute::hand_to_postgres_user(root).map_err(|reason| SnapshotError::Refused { reason })
}

/// The pgdata manifest at `storage`, if there is one.
pub async fn read_manifest(storage: &dyn Storage) -> Result<Option<Manifest>> {
    match storage
        .get_bytes_limited(MANIFEST_KEY, manifest::MAX_MANIFEST_BYTES as u64)
        .await
    {
        Ok(bytes) => Ok(Some(Manifest::parse(
            &bytes,
            &format!("{}/{MANIFEST_KEY}", storage.url()),
        )?)),
        Err(storage::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Restores a pgdata snapshot into the new directory `target`, checking every file.
pub async fn unpack(
    storage: &dyn Storage,
    manifest: &Manifest,
    target: &Path,
) -> Result<CheckReport> {
    into_new_dir(target, |temp| async move {
        prepare_tree(manifest, &temp)?;
        let report = check_files(storage, manifest, Some(&temp)).await?;
        sync_tree(manifest, &temp)?;
        Ok(report)
    })
    .await
}

/// Re-reads every file of a pgdata snapshot and checks its size and SHA-256.
pub async fn verify(storage: &dyn Storage, manifest: &Manifest) -> Result<CheckReport> {
    check_files(storage, manifest, None).await
}

/// Fetches and checks every file, writing each below `root` when one is given.
async fn check_files(
    storage: &dyn Storage,
    manifest: &Manifest,
    root: Option<&Path>,
) -> Result<CheckReport> {
    let files = manifest
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::File);
    let results: Vec<Result<u64>> = futures::stream::iter(files)
        .map(|entry| {
            let path = root.map(|r| r.join(&entry.path));
            async move { fetch_checked(storage, manifest, entry, path.as_deref()).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut report = CheckReport::default();
    for r in results {
        report.bytes_restored += r?;
        report.blocks_checked += 1;
    }
    Ok(report)
}

/// Streams one file, hashing it, optionally writing it to `target`; checks size and hash.
async fn fetch_checked(
    storage: &dyn Storage,
    manifest: &Manifest,
    entry: &Entry,
    target: Option<&Path>,
) -> Result<u64> {
    let mut reader = storage.get(&entry.path).await?;
    let mut hasher = Sha256::new();
    let mut out = match target {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| SnapshotError::io(path, "open", e))?,
        ),
        None => None,
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| storage::Error::from_stream(storage.url(), &entry.path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > entry.size {
            break;
        }
        hasher.update(&buf[..n]);
        if let (Some(file), Some(path)) = (out.as_mut(), target) {
            use std::io::Write;
            file.write_all(&buf[..n])
                .map_err(|e| SnapshotError::io(path, "write", e))?;
        }
    }
    let corrupt = |what: String| SnapshotError::Corrupt {
        object: format!(
            "{}/{} (snapshot {})",
            storage.url(),
            entry.path,
            manifest.id
        ),
        what,
    };
    if size != entry.size {
        return Err(corrupt(format!(
            "it has {}{size} bytes, the manifest says {}",
            if size > entry.size { "more than " } else { "" },
            entry.size
        )));
    }
    if entry.sha256.as_deref() != Some(hex::encode(hasher.finalize()).as_str()) {
        return Err(corrupt("it fails its SHA-256 check".into()));
    }
    Ok(size)
}

/// Copies a stopped local data directory without a manifest (an existing `$PGDATA`) into
/// the new directory `target`.
pub async fn copy_plain_dir(source: &Path, target: &Path) -> Result<u64> {
    datadir::check_not_running(source)?;
    datadir::read_pg_version(source)?;
    datadir::read_control(source)?;
    let source: PathBuf = source.to_path_buf();
    into_new_dir(target, |temp| async move {
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&temp)
                .map_err(|e| SnapshotError::io(&temp, "create", e))?;
            let mut copied = 0;
            for item in datadir::walk(&source)? {
                let path = temp.join(&item.rel);
                if item.is_dir {
                    std::fs::DirBuilder::new()
                        .mode(item.mode | 0o700)
                        .create(&path)
                        .map_err(|e| SnapshotError::io(&path, "create", e))?;
                } else {
                    copied += std::fs::copy(&item.abs, &path)
                        .map_err(|e| SnapshotError::io(&path, "copy to", e))?;
                    std::fs::set_permissions(
                        &path,
                        std::fs::Permissions::from_mode(item.mode | 0o600),
                    )
                    .map_err(|e| SnapshotError::io(&path, "chmod", e))?;
                    std::fs::File::open(&path)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| SnapshotError::io(&path, "sync", e))?;
                }
            }
            std::fs::File::open(&temp)
                .and_then(|f| f.sync_all())
                .map_err(|e| SnapshotError::io(&temp, "sync", e))?;
            Ok(copied)
        })
        .await
        .map_err(join_error)?
    })
    .await
}
