//! Thin clones of data directories: on a filesystem that shares extents between files
//! (XFS with reflink=1, btrfs), a file is copied with `FICLONE` in a few metadata writes
//! whatever its size, and the two copies share every block until one of them changes it.
//!
//! [`clone_entries`] copies the entries of a walk into a directory (a repo's snapshot, or
//! a new pg's data) and describes what it copied as manifest entries without block lists;
//! [`restore`] makes a new data directory from such a copy, whole or not at all, checking
//! that every file is there with the size the manifest says. A clone carries no
//! checksums: they are computed when it is packed into the zenith format.
//!
//! Nothing here decides whether clones are used, nor where they live: that is the repo's.

use std::path::Path;

use super::datadir::DirEntry;
use super::error::{join_error, Result, SnapshotError};
use super::manifest::{Entry, EntryKind, Manifest};
use super::tree::{build_tree, into_new_dir, sync_tree};
use crate::util::reflink;

/// Clones `items` (parents before children) into the existing directory `root`. With
/// `live`, files that vanish meanwhile (a running server dropped them) are left out.
/// Returns the entries, each file with the size of its clone.
pub fn clone_entries(items: &[DirEntry], root: &Path, live: bool) -> Result<Vec<Entry>> {
    use std::os::unix::fs::DirBuilderExt;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let path = root.join(&item.rel);
        let mode = item.mode & 0o777;
        if item.is_dir {
            std::fs::DirBuilder::new()
                .mode(mode | 0o700)
                .create(&path)
                .map_err(|e| SnapshotError::io(&path, "create", e))?;
            out.push(Entry::dir(&item.rel, mode));
            continue;
        }
        match reflink::clone_file(&item.abs, &path, mode | 0o600) {
            Ok(()) => {}
            Err(e) if live && e.kind() == std::io::ErrorKind::NotFound && !path.exists() => {
                continue
            }
            Err(e) => return Err(clone_error(&item.abs, &path, e)),
        }
        let size = std::fs::metadata(&path)
            .map_err(|e| SnapshotError::io(&path, "read", e))?
            .len();
        out.push(Entry {
            path: item.rel.clone(),
            kind: EntryKind::File,
            mode,
            size,
            sha256: None,
            list: None,
            // The original's: a file unchanged since an earlier clone was packed reuses
            // that block list when this clone is packed (see PackOptions::stamps).
            stamp: item.stamp.clone(),
        });
    }
    Ok(out)
}

fn clone_error(from: &Path, to: &Path, e: std::io::Error) -> SnapshotError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => SnapshotError::Refused {
            reason: format!(
                "the disk holding {} is full; free some space and try again",
                to.display()
            ),
        },
        Some(libc::EXDEV) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => SnapshotError::Refused {
            reason: format!(
                "{} cannot be cloned to {} ({e}): both must be on one filesystem that shares extents; set `[snapshots] clones = \"off\"` in config.toml to copy instead",
                from.display(),
                to.display()
            ),
        },
        _ => SnapshotError::io(from, "clone", e),
    }
}

/// Makes `target` (new, or an empty directory) a data directory holding snapshot `m`, from
/// its clone in `source`: every file cloned with the manifest's mode, the tree made durable
/// and renamed into place only when complete. A file missing from `source` or of another
/// size than the manifest says fails the restore, naming it.
pub async fn restore(source: &Path, m: &Manifest, target: &Path) -> Result<()> {
    into_new_dir(target, |temp| {
        let source = source.to_path_buf();
        let m = m.clone();
        async move {
            tokio::task::spawn_blocking(move || restore_tree(&source, &m, &temp))
                .await
                .map_err(join_error)?
        }
    })
    .await
}

fn restore_tree(source: &Path, m: &Manifest, root: &Path) -> Result<()> {
    build_tree(m, root, |entry, path, mode| {
        let from = check_file(source, m, entry)?;
        reflink::clone_file(&from, path, mode | 0o600).map_err(|e| clone_error(&from, path, e))
    })?;
    sync_tree(m, root)
}

/// The clone of `entry` in `source`, which must be there at the manifest's size.
fn check_file(source: &Path, m: &Manifest, entry: &Entry) -> Result<std::path::PathBuf> {
    let from = source.join(&entry.path);
    let damaged = |what: String| {
        SnapshotError::Corrupt {
        object: source.display().to_string(),
        what: format!(
            "snapshot {}'s clone {what}; delete the snapshot (`zenith snapshot delete {}`) and take another",
            m.id, m.id
        ),
    }
    };
    match std::fs::metadata(&from) {
        Ok(meta) if meta.len() == entry.size => Ok(from),
        Ok(meta) => Err(damaged(format!(
            "has {} of {} bytes, not {}",
            entry.path,
            meta.len(),
            entry.size
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(damaged(format!("lacks {}", entry.path)))
        }
        Err(e) => Err(SnapshotError::io(&from, "read", e)),
    }
}

/// Makes a directory of clones durable: one `syncfs` of its filesystem (clones are
/// metadata, so this is cheap unless other writes are pending there).
pub fn sync(root: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(root).map_err(|e| SnapshotError::io(root, "sync", e))?;
    // SAFETY: syncfs takes a valid open descriptor and touches no memory.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(SnapshotError::io(
            root,
            "sync",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Checks that the clone in `source` still holds every file of `m` at its size; returns
/// how many files it checked.
pub fn check(source: &Path, m: &Manifest) -> Result<u64> {
    let mut files = 0;
    for entry in m.entries.iter().filter(|e| e.kind == EntryKind::File) {
        check_file(source, m, entry)?;
        files += 1;
    }
    Ok(files)
}
