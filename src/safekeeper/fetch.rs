//! `zenith wal-fetch %f %p`, PostgreSQL's `restore_command`: one WAL file out of the
//! archive, checked, and moved into place whole.
//!
//! What PostgreSQL relies on, and why the answers are strict: "not found" tells recovery
//! that the archive ends here, so it is said only when nothing later exists either. A
//! segment missing while later ones of its timeline are archived is a gap, and a file that
//! fails its checks is damage: both are errors that stop recovery (exit codes above 125),
//! never a quiet end of recovery with commits missing.
//!
//! A file is looked up in the history asked for, then in the ancestors it inherited it
//! from (see [`super::archive::inherited`]); a segment not archived whole is read from
//! the pieces the safekeeper streamed of it, when there are some. After a segment, the next few are fetched in
//! the background into `.zenith-prefetch/` beside the destination, each checked before it
//! is renamed into place there; the next call takes its file from there when present.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::archive::{inherited, Archive, ArchiveError, Result};
use crate::compute::wal::{segment_name, WalFile, DEFAULT_SEGMENT_SIZE};

/// Where the file came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// From the archive; the history it was found in.
    Archive(String),
    /// Prefetched in the background.
    Prefetched,
    /// The archive has no such file, and nothing after it: recovery ends here.
    NotFound,
}

/// The directory of what is prefetched beside `dest` (PostgreSQL's `pg_wal/RECOVERYXLOG`).
pub const PREFETCH_DIR: &str = ".zenith-prefetch";

/// Where segments of `history` and cluster `sysid` are prefetched beside `dest`: one
/// directory each, so a file of one is never served for another.
pub fn prefetch_dir(dest: &Path, sysid: u64, history: &str) -> PathBuf {
    dest.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(PREFETCH_DIR)
        .join(format!("{sysid}-{history}"))
}

/// Writes `data` to a new file at `dest` (a temporary sibling, fsynced, renamed).
fn write_whole(dest: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "wal".into());
    let temp = dest.with_file_name(crate::util::tempdir::temp_name(&name));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&temp, dest)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        ArchiveError::Refused(crate::storage::error::local_message(
            &dest.display().to_string(),
            "write",
            &e,
        ))
    })
}

/// A history and its ancestors, from the history up.
type Lineage = [(String, Option<super::archive::Branch>)];

/// File `file` as the first history of `lineage` sees it: from that history itself or the
/// ancestor it inherited it from; `None` if no history of the lineage has it.
async fn find(
    archive: &Archive,
    lineage: &Lineage,
    file: &WalFile,
    name: &str,
    streamed: bool,
) -> Result<Option<(String, Vec<u8>)>> {
    for (i, (h, _)) in lineage.iter().enumerate() {
        if i > 0 {
            // The child's fork decides whether this file is the parent's.
            let fork = lineage[i - 1].1.as_ref().and_then(|b| b.parent.as_ref());
            if !fork.is_some_and(|f| inherited(f, file)) {
                break;
            }
        }
        if let Some(data) = archive.get(h, name).await? {
            return Ok(Some((h.clone(), data)));
        }
        // Not archived whole (yet): what the safekeeper streamed of it; an ancestor's
        // segment before a fork is complete, or it is not there.
        if streamed && matches!(file, WalFile::Segment { .. }) {
            let size = lineage[i]
                .1
                .as_ref()
                .map(|b| b.segment_size)
                .unwrap_or(DEFAULT_SEGMENT_SIZE);
            if let Some(data) = archive.streamed(h, name, size, i > 0).await? {
                return Ok(Some((h.clone(), data)));
            }
            // Archived whole while the pieces were read.
            if let Some(data) = archive.get(h, name).await? {
                return Ok(Some((h.clone(), data)));
            }
        }
    }
    Ok(None)
}

/// Whether the lineage holds WAL after `file` (a later segment of its timeline or of a
/// newer one, or a partial segment), as its first history sees the lineage (an ancestor's
/// segments from after a fork are not its own): then `file` missing is a gap in the
/// archive, not its end.
async fn later_exists(
    archive: &Archive,
    lineage: &Lineage,
    file: &WalFile,
) -> Result<Option<String>> {
    let WalFile::Segment { tli, segno } = *file else {
        return Ok(None);
    };
    for (i, (h, branch)) in lineage.iter().enumerate() {
        let size = branch
            .as_ref()
            .map(|b| b.segment_size)
            .unwrap_or(DEFAULT_SEGMENT_SIZE);
        let streamed = archive
            .pieces(h)
            .await?
            .into_iter()
            .filter_map(|p| WalFile::parse(&p.segment, size));
        let archived = archive.files(h, size).await?.into_iter().map(|(f, _)| f);
        for f in archived.chain(streamed) {
            let (WalFile::Segment { tli: t, segno: s } | WalFile::Partial { tli: t, segno: s }) = f
            else {
                continue;
            };
            // Visible through every fork between the first history and this one.
            let visible = lineage[..i].iter().all(|(_, child)| {
                child
                    .as_ref()
                    .and_then(|b| b.parent.as_ref())
                    .is_some_and(|fork| inherited(fork, &f))
            });
            // WAL after the missing segment, on its timeline or a later one (a timeline
            // switch after it, even just the last partial segment of its timeline).
            if visible && t >= tli && s > segno {
                return Ok(Some(f.name(size)));
            }
        }
    }
    Ok(None)
}

/// Restores WAL file `name` of `history` to `dest`.
pub async fn fetch(archive: &Archive, history: &str, name: &str, dest: &Path) -> Result<Fetched> {
    let file = WalFile::parse(name, DEFAULT_SEGMENT_SIZE).ok_or_else(|| {
        ArchiveError::Refused(format!(
            "{name:?} is not a WAL file name; restore_command passes %f"
        ))
    })?;
    let prefetched = prefetch_dir(dest, archive.system_identifier(), history);
    if matches!(file, WalFile::Segment { .. }) {
        forget_older(&prefetched, name);
        let ready = prefetched.join(name);
        // Checked when it was fetched; its first page still names the cluster.
        let ours = first_page(&ready).and_then(|b| crate::compute::wal::segment_header(&b));
        if ours.is_some_and(|(sysid, _)| sysid == archive.system_identifier())
            && std::fs::rename(&ready, dest).is_ok()
        {
            return Ok(Fetched::Prefetched);
        }
    }
    let lineage = archive.lineage(history).await?;
    match find(archive, &lineage, &file, name, true).await? {
        Some((h, data)) => {
            write_whole(dest, &data)?;
            Ok(Fetched::Archive(h))
        }
        None => match later_exists(archive, &lineage, &file).await? {
            Some(later) => Err(ArchiveError::Corrupt {
                object: format!(
                    "the WAL archive of history {history} in {}",
                    archive.storage().url()
                ),
                what: format!(
                    "segment {name} is missing though later segments ({later}) are archived: recovery would end early and lose every commit after it"
                ),
            }),
            None => Ok(Fetched::NotFound),
        },
    }
}

/// The first bytes of the file at `path` (enough for a segment's page header).
fn first_page(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut head = vec![0u8; 64];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    Some(head)
}

/// Removes prefetched segments older than `name`: recovery is past them.
fn forget_older(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.len() == 24 && n.as_str() < name {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Fetches the `count` segments after `name` (same timeline) into the prefetch directory
/// beside `dest`, each checked before it appears there. One prefetcher at a time (a lock
/// file); one that finds another running leaves.
pub async fn prefetch(
    archive: &Archive,
    history: &str,
    name: &str,
    dest: &Path,
    count: u64,
) -> Result<usize> {
    let Some(WalFile::Segment { tli, segno }) = WalFile::parse(name, DEFAULT_SEGMENT_SIZE) else {
        return Ok(0);
    };
    let dir = prefetch_dir(dest, archive.system_identifier(), history);
    std::fs::create_dir_all(&dir)
        .map_err(|e| ArchiveError::Refused(format!("{}: {e}", dir.display())))?;
    let Some(_lock) = crate::util::tempdir::try_lock(&dir.join(".lock")) else {
        return Ok(0);
    };
    let lineage = archive.lineage(history).await?;
    let mut fetched = 0;
    for next in segno + 1..=segno + count {
        let next_name = segment_name(tli, next, DEFAULT_SEGMENT_SIZE);
        let target = dir.join(&next_name);
        if target.exists() {
            continue;
        }
        let file = WalFile::Segment { tli, segno: next };
        // Whole segments only: a streamed one may still grow.
        match find(archive, &lineage, &file, &next_name, false).await? {
            Some((_, data)) => {
                write_whole(&target, &data)?;
                fetched += 1;
            }
            // The end of the archive (for now).
            None => break,
        }
    }
    Ok(fetched)
}
