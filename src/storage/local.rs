//! The `file://` backend: a directory on this machine.
//!
//! Every write goes to a unique temporary file in the target's directory (opened with
//! `create_new`), is fsynced, renamed over the final name and followed by an fsync of the
//! directory, so a crash leaves either the old object or the new one, never a torn file.
//! The one exception is a file opened with [`Storage::open_in_place`], which its writer
//! grows and syncs in place (the safekeeper's segment being streamed).
//! Temporary files carry [`TEMP_MARKER`], this machine's name and the writer's pid in their
//! name and are invisible to `list`; a crash can leave one behind, which is never mistaken
//! for an object and which [`Storage::remove_abandoned`] removes once its writer is gone.
//!
//! Blocking file work runs on tokio's blocking pool, never on the async workers.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::io::SyncIoBridge;

use super::error::{Error, Result};
use super::{validate_key, validate_prefix, ByteReader, ObjectMeta, Storage, TEMP_MARKER};
use crate::util::tempdir::{abandoned, temp_name};

/// Copy buffer for streamed puts: large enough that syscalls are not the bottleneck.
const COPY_BUF: usize = 1 << 20;

/// A storage rooted at a local directory. The directory is created on first write.
#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// A storage at `root` (an absolute path). Refuses a path that exists and is not a
    /// directory.
    pub fn new(root: PathBuf) -> Result<Self> {
        match fs::metadata(&root) {
            Ok(meta) if !meta.is_dir() => Err(Error::local(
                &root,
                "use as a storage directory",
                io::Error::from(io::ErrorKind::NotADirectory),
            )),
            _ => Ok(LocalStorage { root }),
        }
    }

    /// The directory this storage writes into.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn not_found(&self, key: &str) -> Error {
        Error::NotFound {
            url: format!("{}/{key}", self.url()),
        }
    }
}

#[async_trait]
impl Storage for LocalStorage {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn open_in_place(&self, key: &str) -> Option<Result<File>> {
        let open = || {
            let path = self.path_of(key)?;
            let dir = parent_dir(&path).unwrap_or(&self.root);
            let attempt = || {
                create_dirs_durably(dir)
                    .and_then(|()| {
                        OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&path)
                    })
                    // Its name too, before anything written to it is called durable.
                    .and_then(|file| fsync_dir(dir).map(|()| file))
            };
            // A delete that emptied the directory removes it: once more then, as
            // `write_atomic` does.
            attempt()
                .or_else(|e| if is_missing(&e) { attempt() } else { Err(e) })
                .map_err(|e| Error::local(&path, "open for writing", e))
        };
        Some(open())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let path = self.path_of(key)?;
        blocking(move || write_atomic(&path, |file| file.write_all(&data))).await
    }

    async fn put_stream(&self, key: &str, reader: ByteReader) -> Result<u64> {
        let path = self.path_of(key)?;
        write_reader_atomic(path, reader, self.url(), key.to_string()).await
    }

    async fn put_file(&self, key: &str, source: &Path) -> Result<u64> {
        let path = self.path_of(key)?;
        let source = source.to_path_buf();
        blocking(move || copy_file_atomic(&source, &path)).await
    }

    async fn get_to_file(&self, key: &str, target: &Path) -> Result<u64> {
        let path = self.path_of(key)?;
        let not_found = self.not_found(key);
        let target = target.to_path_buf();
        blocking(move || {
            if !path.is_file() {
                return Err(not_found);
            }
            copy_file_atomic(&path, &target)
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<ByteReader> {
        let path = self.path_of(key)?;
        let not_found = self.not_found(key);
        let file = blocking(move || match File::open(&path) {
            Ok(file) => match file.metadata() {
                Ok(meta) if meta.is_file() => Ok(file),
                Ok(_) => Err(not_found),
                Err(e) => Err(Error::local(&path, "read", e)),
            },
            Err(e) if is_missing(&e) => Err(not_found),
            Err(e) => Err(Error::local(&path, "open", e)),
        })
        .await?;
        Ok(Box::pin(tokio::fs::File::from_std(file)))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path_of(key)?;
        let not_found = self.not_found(key);
        let url = format!("{}/{key}", self.url());
        blocking(move || {
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if is_missing(&e) => return Err(not_found),
                Err(e) => return Err(Error::local(&path, "open", e)),
            };
            let meta = file
                .metadata()
                .map_err(|e| Error::local(&path, "read", e))?;
            if !meta.is_file() {
                return Err(not_found);
            }
            let size = meta.len();
            if range.start > size {
                return Err(Error::InvalidRange {
                    url,
                    start: range.start,
                    end: range.end,
                    size,
                });
            }
            let end = range.end.clamp(range.start, size);
            let mut buf = vec![0u8; (end - range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| Error::local(&path, "read", e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let path = self.path_of(key)?;
        let not_found = self.not_found(key);
        let key = key.to_string();
        blocking(move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(ObjectMeta {
                key,
                size: meta.len(),
                last_modified: meta.modified().ok(),
            }),
            Ok(_) => Err(not_found),
            Err(e) if is_missing(&e) => Err(not_found),
            Err(e) => Err(Error::local(&path, "read", e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let prefix = prefix.to_string();
        blocking(move || list_dir(&root, &prefix)).await
    }

    async fn remove_abandoned(&self) {
        let root = self.root.clone();
        let removed = tokio::task::spawn_blocking(move || remove_abandoned_temps(&root)).await;
        if let Ok(n @ 1..) = removed {
            tracing::info!("removed {n} temporary files left by writers that were killed");
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        let root = self.root.clone();
        blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                // Not an object: missing, below a file, or a "directory" of other keys (S3
                // has no directories; deleting a prefix that is not a key is a no-op there).
                Err(e) if is_missing(&e) || e.kind() == io::ErrorKind::IsADirectory => {
                    return Ok(())
                }
                Err(_) if path.is_dir() => return Ok(()),
                Err(e) => return Err(Error::local(&path, "delete", e)),
            }
            fsync_dir(path.parent().unwrap_or(&root))
                .map_err(|e| Error::local(&path, "delete", e))?;
            // Tidy up directories the delete emptied. A concurrent put may recreate one right
            // after; write_atomic retries its create for exactly that race.
            let mut dir = path.parent();
            while let Some(d) = dir {
                if d == root || fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
    }
}

/// Removes the temporary files under `root` whose writers are gone; returns how many.
fn remove_abandoned_temps(root: &Path) -> usize {
    let mut removed = 0;
    for entry in walkdir::WalkDir::new(root)
        .min_depth(1)
        .into_iter()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy();
        if !entry.file_type().is_file() || !name.contains(TEMP_MARKER) {
            continue;
        }
        let modified = entry.metadata().ok().and_then(|m| m.modified().ok());
        if abandoned(&name, modified) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The directory a file at `path` goes into; a bare file name's is the current directory.
fn parent_dir(path: &Path) -> Option<&Path> {
    path.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    })
}

/// The key names no object: the path is absent, or a file stands where a directory would be.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(Error::Cancelled),
        },
    }
}

/// Streams `reader` into a new file at `path` (temporary sibling, fsync, rename). Errors of
/// the reader are reported as the source's, not as the disk's.
pub(crate) async fn write_reader_atomic(
    path: PathBuf,
    reader: ByteReader,
    url: String,
    key: String,
) -> Result<u64> {
    blocking(move || {
        let mut source = SyncIoBridge::new(reader);
        let mut written = 0u64;
        let mut source_error = None;
        let result = write_atomic(&path, |file| {
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                let n = match source.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        source_error = Some(e);
                        return Err(io::Error::other("source stream failed"));
                    }
                };
                file.write_all(&buf[..n])?;
                written += n as u64;
            }
        });
        match (result, source_error) {
            (_, Some(e)) => Err(Error::from_stream(url, &key, e)),
            (Err(e), None) => Err(e),
            (Ok(()), None) => Ok(written),
        }
    })
    .await
}

/// Copies `source` to a new file at `target` atomically; the copy itself happens in the
/// kernel (`io::copy` between files uses `copy_file_range` on Linux). A read error of the
/// source mid-copy is reported against the target, as io::copy cannot tell the sides apart.
fn copy_file_atomic(source: &Path, target: &Path) -> Result<u64> {
    let mut input = File::open(source).map_err(|e| Error::local(source, "open", e))?;
    let mut copied = 0;
    write_atomic(target, |file| {
        copied = io::copy(&mut input, file)?;
        Ok(())
    })?;
    Ok(copied)
}

/// Writes a new file at `path` through a temporary sibling, then renames it into place.
fn write_atomic(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let (Some(dir), Some(name)) = (parent_dir(path), path.file_name()) else {
        return Err(Error::local(
            path,
            "write",
            io::Error::from(io::ErrorKind::InvalidInput),
        ));
    };
    let name = name.to_string_lossy();
    let temp = dir.join(temp_name(&name));
    let mut file = create_temp(dir, &temp)?;
    let result = write(&mut file)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            fs::rename(&temp, path)
        })
        .and_then(|()| fsync_dir(dir));
    if let Err(e) = result {
        let _ = fs::remove_file(&temp);
        return Err(Error::local(path, "write", e));
    }
    Ok(())
}

fn create_temp(dir: &Path, temp: &Path) -> Result<File> {
    let mut attempts = 0;
    loop {
        // A concurrent delete may remove a directory it emptied between our creating it and
        // using it (in either step): create again, a few times.
        let result = create_dirs_durably(dir)
            .and_then(|()| OpenOptions::new().write(true).create_new(true).open(temp));
        match result {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => attempts += 1,
            Err(e) => return Err(Error::local(dir, "create a file in", e)),
        }
    }
}

/// `create_dir_all`, plus an fsync of each parent whose entry list changed, so the new
/// directories survive a crash together with the file about to be written into them.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(dir.parent().unwrap_or(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn list_dir(root: &Path, prefix: &str) -> Result<Vec<ObjectMeta>> {
    // Walk only the deepest directory the prefix names completely; its last segment may be
    // a partial name ("snap/ab" lists "snap/abc" and "snap/ab/x").
    let start = match prefix.rfind('/') {
        Some(i) => root.join(&prefix[..i]),
        None => root.to_path_buf(),
    };
    if !start.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&start).min_depth(1) {
        let entry = match entry {
            Ok(entry) => entry,
            // Removed while we walked (a concurrent delete): not an object any more.
            Err(e)
                if e.io_error()
                    .is_some_and(|io| io.kind() == io::ErrorKind::NotFound) =>
            {
                continue
            }
            Err(e) => {
                let path = e.path().unwrap_or(&start).to_path_buf();
                return Err(Error::local(
                    path,
                    "list",
                    e.into_io_error()
                        .unwrap_or_else(|| io::Error::other("loop")),
                ));
            }
        };
        if !entry.file_type().is_file() || entry.file_name().to_string_lossy().contains(TEMP_MARKER)
        {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        let Some(key) = rel
            .to_str()
            .map(|s| s.replace(std::path::MAIN_SEPARATOR, "/"))
        else {
            continue; // not UTF-8: never written by zenith
        };
        if !key.starts_with(prefix) {
            continue;
        }
        match entry.metadata() {
            Ok(meta) => out.push(ObjectMeta {
                key,
                size: meta.len(),
                last_modified: meta.modified().ok(),
            }),
            Err(e)
                if e.io_error()
                    .is_some_and(|io| io.kind() == io::ErrorKind::NotFound) => {}
            Err(e) => {
                return Err(Error::local(
                    entry.path(),
                    "list",
                    e.into_io_error()
                        .unwrap_or_else(|| io::Error::other("metadata")),
                ))
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, ReadBuf};

    /// Yields `good` bytes, then fails.
    struct Failing {
        good: usize,
    }

    impl AsyncRead for Failing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.good == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer went away",
                )));
            }
            let n = self.good.min(buf.remaining()).min(64 << 10);
            buf.put_slice(&vec![7u8; n]);
            self.good -= n;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failing_stream_leaves_neither_object_nor_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("s")).unwrap();
        storage.put("k", Bytes::from_static(b"old")).await.unwrap();
        let err = storage
            .put_stream("k", Box::pin(Failing { good: 3 << 20 }))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Stream { .. }) && err.to_string().contains("peer went away"),
            "{err:?}"
        );
        assert_eq!(
            &storage.get_bytes("k").await.unwrap()[..],
            b"old",
            "the old object must survive"
        );
        let names: Vec<_> = fs::read_dir(dir.path().join("s"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k")]);

        let target = dir.path().join("download");
        let err = write_reader_atomic(
            target.clone(),
            Box::pin(Failing { good: 1 << 20 }),
            "u".into(),
            "k".into(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Stream { .. }), "{err:?}");
        assert!(!target.exists());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temp file was left behind"
        );
    }

    #[tokio::test]
    async fn keys_below_a_file_are_missing_and_prefix_deletes_are_no_ops() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().to_path_buf()).unwrap();
        storage.put("a", Bytes::from_static(b"x")).await.unwrap();
        storage.put("d/e", Bytes::from_static(b"y")).await.unwrap();
        assert!(matches!(
            storage.get_bytes("a/b").await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            storage.get_range("a/b", 0..1).await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            storage.head("a/b").await,
            Err(Error::NotFound { .. })
        ));
        storage.delete("a/b").await.unwrap();
        storage.delete("d").await.unwrap();
        assert_eq!(&storage.get_bytes("d/e").await.unwrap()[..], b"y");
    }

    #[tokio::test]
    async fn temporary_files_of_dead_writers_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().to_path_buf()).unwrap();
        storage
            .put("packs/a", Bytes::from_static(b"a"))
            .await
            .unwrap();
        let packs = dir.path().join("packs");
        let mine = packs.join(temp_name("c"));
        let dead = packs
            .join(temp_name("b").replace(&format!(".{}.", std::process::id()), ".2147483646."));
        let elsewhere = packs.join(format!(
            ".d{TEMP_MARKER}other-host.2147483646.0000000000000001"
        ));
        for f in [&dead, &mine, &elsewhere] {
            fs::write(f, b"partial").unwrap();
        }
        storage.remove_abandoned().await;
        assert!(!dead.exists());
        assert!(mine.exists());
        assert!(elsewhere.exists(), "another machine's writer may still run");
        assert_eq!(storage.list("").await.unwrap().len(), 1);
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("bare")), Some(Path::new(".")));
        assert_eq!(parent_dir(Path::new("/x/y")), Some(Path::new("/x")));
        assert_eq!(parent_dir(Path::new("/")), None);
    }
}
