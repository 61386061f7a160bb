//! Data directories written whole or not at all: a restore fills a temporary sibling of
//! its target and renames it into place only when it succeeded; the tree of files a
//! manifest describes is created up front (sizes set, modes restricted) and made durable
//! with one `syncfs` before the rename.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::error::{Result, SnapshotError};
use super::manifest::{Entry, EntryKind, Manifest};
use crate::util::tempdir::TempDir;

/// Fills a temporary sibling of `target` with `fill` and renames it into place only when
/// `fill` succeeded: a failure never leaves something that looks like a data directory.
/// `target` must not exist, or be an empty directory.
pub(crate) async fn into_new_dir<T, F, Fut>(target: &Path, fill: F) -> Result<T>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    if target.exists()
        && std::fs::read_dir(target)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(SnapshotError::Refused {
            reason: format!(
                "{} already exists and is not empty; choose a new directory",
                target.display()
            ),
        });
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| SnapshotError::io(parent, "create", e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "pgdata".into());
    // What a killed restore to the same target left behind goes first.
    crate::util::tempdir::sweep_siblings(target);
    // Removed on every way out but a complete rename into place.
    let temp = TempDir::at(parent.join(crate::util::tempdir::temp_name(&name)));
    let value = fill(temp.path().to_path_buf()).await?;
    if target.exists() {
        std::fs::remove_dir(target).map_err(|e| SnapshotError::io(target, "replace", e))?;
    }
    std::fs::rename(temp.path(), target).map_err(|e| SnapshotError::io(target, "create", e))?;
    temp.keep();
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| SnapshotError::io(parent, "sync", e))?;
    Ok(value)
}

pub(crate) fn prepare_tree(manifest: &Manifest, root: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    build_tree(manifest, root, |entry, path, mode| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode | 0o600)
            .open(path)
            .map_err(|e| SnapshotError::io(path, "create", e))?;
        file.set_len(entry.size)
            .map_err(|e| SnapshotError::io(path, "size", e))
    })
}

/// Creates `root` (0700) and the directories of `manifest` below it, parents first, and
/// has `file` make each file at its path with its permission bits.
pub(crate) fn build_tree(
    manifest: &Manifest,
    root: &Path,
    mut file: impl FnMut(&Entry, &Path, u32) -> Result<()>,
) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(root)
        .map_err(|e| SnapshotError::io(root, "create", e))?;
    for entry in &manifest.entries {
        let path = root.join(&entry.path);
        let mode = entry.mode & 0o777;
        match entry.kind {
            EntryKind::Dir => std::fs::DirBuilder::new()
                .mode(mode | 0o700)
                .create(&path)
                .map_err(|e| SnapshotError::io(&path, "create", e))?,
            EntryKind::File => file(entry, &path, mode)?,
        }
    }
    Ok(())
}

/// Makes the restored tree durable before it is renamed into place: one `syncfs` of the
/// filesystem holding it (as PostgreSQL's `recovery_init_sync_method = syncfs` does), which
/// costs one device flush instead of one per file; where `syncfs` fails, each file is synced.
pub(crate) fn sync_tree(manifest: &Manifest, root: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(root).map_err(|e| SnapshotError::io(root, "sync", e))?;
    // SAFETY: syncfs takes a valid open descriptor and touches no memory.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        return Ok(());
    }
    for entry in manifest.entries.iter().rev() {
        let path = root.join(&entry.path);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| SnapshotError::io(&path, "sync", e))?;
    }
    dir.sync_all()
        .map_err(|e| SnapshotError::io(root, "sync", e))
}
