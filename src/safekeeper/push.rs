//! `zenith wal-push %p`, PostgreSQL's `archive_command`: one WAL file into the archive,
//! and the next ones PostgreSQL has ready in parallel with it.
//!
//! The contract PostgreSQL relies on: exit 0 only once the file is durable in the archive
//! (a put returns once the object is whole and stored); a file archived before with the
//! same content is fine (0), with other content an error, so diverged WAL is never
//! silently overwritten nor silently dropped. Segments of another cluster (their first
//! page names its system identifier) are refused.
//!
//! While PostgreSQL archives one segment at a time, zenith pushes up to `concurrency - 1`
//! of the following `.ready` segments alongside it; when PostgreSQL asks for those, they
//! are in the archive already and the call is a header read. Their failures are left for
//! PostgreSQL's own call to report.

use std::path::{Path, PathBuf};

use futures::StreamExt;

use super::archive::{Archive, ArchiveError, Pushed, Result};
use crate::compute::wal::{segment_header, WalFile, DEFAULT_SEGMENT_SIZE};

/// What one `wal-push` did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    pub stored: bool,
    /// Following segments pushed alongside.
    pub ahead: usize,
}

/// Reads a WAL file PostgreSQL handed over, checking its name and, for a segment, that it
/// belongs to the archive's cluster; returns the file's kind and content.
async fn read_wal(archive: &Archive, path: &Path) -> Result<(WalFile, Vec<u8>)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let data = tokio::fs::read(path).await.map_err(|e| {
        ArchiveError::Refused(format!(
            "{}: {}",
            path.display(),
            crate::storage::error::local_message(&path.display().to_string(), "read", &e)
        ))
    })?;
    let segment_size = match segment_header(&data) {
        Some((sysid, size)) if data.len() as u64 == size => {
            if sysid != archive.system_identifier() {
                return Err(ArchiveError::Refused(format!(
                    "{} belongs to the cluster with system identifier {sysid}, not {}: one archive holds one cluster",
                    path.display(),
                    archive.system_identifier()
                )));
            }
            size
        }
        _ => DEFAULT_SEGMENT_SIZE,
    };
    let file = WalFile::parse(&name, segment_size).ok_or_else(|| {
        ArchiveError::Refused(format!(
            "{name:?} is not a WAL file name (segment, .partial, .history or .backup); archive_command passes %p"
        ))
    })?;
    if matches!(file, WalFile::Segment { .. }) && data.len() as u64 != segment_size {
        return Err(ArchiveError::Refused(format!(
            "{} has {} bytes, not a whole WAL segment",
            path.display(),
            data.len()
        )));
    }
    Ok((file, data))
}

/// Archives the WAL file at `path` into `history`, with up to `concurrency - 1` of the
/// following ready segments alongside.
pub async fn push(
    archive: &Archive,
    history: &str,
    path: &Path,
    concurrency: usize,
) -> Result<PushReport> {
    let (file, data) = read_wal(archive, path).await?;
    // The server archives: its recovery is over, and what wal-fetch prefetched for it
    // is of no more use.
    if let Some(dir) = path.parent().map(|p| p.join(super::fetch::PREFETCH_DIR)) {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            // Not while a prefetcher still runs there (it ends by itself).
            if crate::util::tempdir::try_lock(&entry.path().join(".lock")).is_some() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let ahead = match file {
        WalFile::Segment { .. } => ready_after(path, &name, concurrency.saturating_sub(1)),
        _ => Vec::new(),
    };
    let main = archive.push(history, &name, &data);
    let others = futures::stream::iter(ahead)
        .map(|next| async move {
            let outcome = match read_wal(archive, &next).await {
                Ok((_, data)) => {
                    let name = next.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    archive.push(history, name, &data).await.map(|_| ())
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &outcome {
                tracing::debug!("pushing {} ahead: {e}", next.display());
            }
            outcome.is_ok()
        })
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<bool>>();
    let (pushed, others) = tokio::join!(main, others);
    Ok(PushReport {
        stored: pushed? == Pushed::Stored,
        ahead: others.into_iter().filter(|ok| *ok).count(),
    })
}

/// The next `count` segments after `name` that PostgreSQL marked ready to archive
/// (`archive_status/<segment>.ready` beside the file), in order.
fn ready_after(path: &Path, name: &str, count: usize) -> Vec<PathBuf> {
    if count == 0 {
        return Vec::new();
    }
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir.join("archive_status")) else {
        return Vec::new();
    };
    let mut ready: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            let segment = n.strip_suffix(".ready")?.to_string();
            (segment.len() == 24
                && segment.as_str() > name
                && WalFile::parse(&segment, DEFAULT_SEGMENT_SIZE).is_some())
            .then_some(segment)
        })
        .collect();
    ready.sort();
    ready.truncate(count);
    ready.into_iter().map(|s| dir.join(s)).collect()
}
