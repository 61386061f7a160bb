//! Restoring a snapshot: every pack that holds a needed block is fetched, each block
//! checked against its hash and written at every position that uses it, into a temporary
//! directory renamed into place only when everything checked out. A restore over an older
//! state of the same data takes its files over and writes only the blocks that differ;
//! verify reads and checks everything and writes nothing.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::index::load_index;
use super::lists::load_lists;
use super::packer::{FrameReader, MAX_PACK_BYTES};
use super::{Hash, TRANSFER_CONCURRENCY};
use crate::snapshot::error::{join_error, Result, SnapshotError};
use crate::snapshot::manifest::{EntryKind, Manifest, BLOCK_SIZE};
use crate::snapshot::survey::CheckReport;
use crate::snapshot::tree::{into_new_dir, prepare_tree, sync_tree};
use crate::storage::Storage;
use crate::util::direct::{self, AlignedBuf};

/// Writes `manifest`'s data directory to the new directory `target` (which must not exist,
/// or be empty), checking every block. Nothing appears at `target` unless all checks pass.
pub async fn unpack(
    storage: &dyn Storage,
    manifest: &Manifest,
    target: &Path,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    restore_into(storage, manifest, target, None, progress).await
}

/// A directory whose files may be taken over by a restore: its content is exactly
/// snapshot `manifest` of the same storage (it was just taken of it, the server stopped).
pub struct Basis<'a> {
    pub dir: &'a Path,
    pub manifest: &'a Manifest,
}

/// Like [`unpack`], but files of `basis` are moved into the new directory and only the
/// blocks that differ from `manifest` are written: a rollback costs what changed, not
/// the size of the database. `basis.dir` loses those files, whether or not this succeeds.
pub async fn unpack_over(
    storage: &dyn Storage,
    manifest: &Manifest,
    target: &Path,
    basis: Basis<'_>,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    restore_into(storage, manifest, target, Some(basis), progress).await
}

async fn restore_into(
    storage: &dyn Storage,
    manifest: &Manifest,
    target: &Path,
    basis: Option<Basis<'_>>,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    manifest.refuse_clone(&storage.url())?;
    progress.set_total(manifest.total_size);
    into_new_dir(target, |temp| async move {
        let started = std::time::Instant::now();
        prepare_tree(manifest, &temp)?;
        tracing::debug!(
            "{} entries created in {:?}",
            manifest.entries.len(),
            started.elapsed()
        );
        let present = match basis {
            Some(b) => Some(take_over(storage, manifest, &temp, b).await?),
            None => None,
        };
        let report =
            restore_blocks(storage, manifest, Some(&temp), present.as_deref(), progress).await?;
        sync_tree(manifest, &temp)?;
        tracing::debug!("restored and synced in {:?}", started.elapsed());
        Ok(report)
    })
    .await
}

/// Moves the files of `basis` that `manifest` also has into the prepared tree `temp`,
/// sized for `manifest`; per entry, the block list of the file now in place, if any.
async fn take_over(
    storage: &dyn Storage,
    manifest: &Manifest,
    temp: &Path,
    basis: Basis<'_>,
) -> Result<Vec<Option<Arc<Vec<Hash>>>>> {
    let started = std::time::Instant::now();
    let old_lists = load_lists(storage, basis.manifest).await?;
    let old: HashMap<&str, Arc<Vec<Hash>>> = basis
        .manifest
        .entries
        .iter()
        .zip(old_lists)
        .filter(|(e, _)| e.kind == EntryKind::File)
        .map(|(e, l)| (e.path.as_str(), l))
        .collect();
    let mut kept = Vec::with_capacity(manifest.entries.len());
    let mut moved = 0u64;
    for entry in &manifest.entries {
        // WAL is left out: a snapshot may store a segment with its stale tail zeroed,
        // so the file on disk is not what its list says.
        let wal = entry.path.starts_with("pg_wal/");
        let taken = match (entry.kind, old.get(entry.path.as_str())) {
            (EntryKind::File, Some(list)) if !wal => {
                let (from, to) = (basis.dir.join(&entry.path), temp.join(&entry.path));
                std::fs::rename(&from, &to)
                    .and_then(|()| {
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&to)?
                            .set_len(entry.size)
                    })
                    .map(|()| Arc::clone(list))
                    .ok()
            }
            _ => None,
        };
        moved += u64::from(taken.is_some());
        kept.push(taken);
    }
    tracing::debug!(
        "{moved} files taken over from {} in {:?}",
        basis.dir.display(),
        started.elapsed()
    );
    Ok(kept)
}

/// Re-reads every pack a snapshot needs and checks every block against its hash.
pub async fn verify(
    storage: &dyn Storage,
    manifest: &Manifest,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    manifest.refuse_clone(&storage.url())?;
    restore_blocks(storage, manifest, None, None, progress).await
}

/// One use of a block: which file and block number, and where the block is stored.
#[derive(Debug, Clone, Copy)]
struct Use {
    entry: u32,
    number: u64,
    hash: Hash,
    offset: u64,
    len: u32,
    slot: u16,
}

/// Fetches every pack holding a block of `manifest`, checks each needed block, and (with a
/// root) writes it at every position that uses it. `present` gives, per entry, the block
/// list of a file already in place under root: blocks equal there are not written.
async fn restore_blocks(
    storage: &dyn Storage,
    manifest: &Manifest,
    root: Option<&Path>,
    present: Option<&[Option<Arc<Vec<Hash>>>]>,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    let started = std::time::Instant::now();
    let index = load_index(storage).await?;
    let lists = load_lists(storage, manifest).await?;
    tracing::debug!(
        "indexes ({} blocks) and block lists read in {:?}",
        index.blocks.len(),
        started.elapsed()
    );
    let snapshot = format!("snapshot {} in {}", manifest.id, storage.url());
    let mut by_pack: HashMap<usize, Vec<Use>> = HashMap::new();
    for (i, (entry, list)) in manifest.entries.iter().zip(&lists).enumerate() {
        if list.len() as u64 != entry.block_count() && entry.kind == EntryKind::File {
            return Err(SnapshotError::Corrupt {
                object: snapshot.clone(),
                what: format!(
                    "{} has {} bytes but its block list has {} blocks",
                    entry.path,
                    entry.size,
                    list.len()
                ),
            });
        }
        let there = present.and_then(|p| p[i].as_deref());
        for (n, hash) in list.iter().enumerate() {
            if there.and_then(|t| t.get(n)) == Some(hash) {
                progress.add(BLOCK_SIZE);
                continue;
            }
            let Some(location) = index.blocks.get(hash) else {
                return Err(SnapshotError::Corrupt {
                    object: snapshot.clone(),
                    what: format!(
                        "{} needs block {}, which no pack in the storage holds (a missing pack?)",
                        entry.path,
                        hex::encode(hash)
                    ),
                });
            };
            by_pack.entry(location.pack).or_default().push(Use {
                entry: i as u32,
                number: n as u64,
                hash: *hash,
                offset: location.offset,
                len: location.len,
                slot: location.slot,
            });
        }
    }
    drop(lists);
    tracing::debug!(
        "{} packs to read, planned in {:?}",
        by_pack.len(),
        started.elapsed()
    );
    let report = Mutex::new(CheckReport::default());
    let index = &index;
    let report_ref = &report;
    let snapshot_ref = &snapshot;
    // Paths and sizes only: the blocking workers need no copy of the manifest.
    let files: Arc<Vec<(String, u64)>> = Arc::new(
        manifest
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.size))
            .collect(),
    );
    let files_ref = &files;
    let results: Vec<Result<()>> = futures::stream::iter(by_pack)
        .map(|(pack, uses)| async move {
            let key = format!("packs/{}", index.packs[pack]);
            let data = storage.get_bytes_limited(&key, MAX_PACK_BYTES).await?;
            let source = format!("{}/{key}", storage.url());
            let files = Arc::clone(files_ref);
            let root = root.map(Path::to_path_buf);
            let snapshot = snapshot_ref.clone();
            let (checked, written) = tokio::task::spawn_blocking(move || {
                check_and_write(&data, &source, &snapshot, &files, root.as_deref(), uses)
            })
            .await
            .map_err(join_error)??;
            progress.add(if written > 0 {
                written
            } else {
                checked * BLOCK_SIZE
            });
            let mut r = report_ref.lock().expect("lock");
            r.blocks_checked += checked;
            r.bytes_restored += written;
            r.packs_read += 1;
            Ok(())
        })
        .buffer_unordered(TRANSFER_CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r?;
    }
    tracing::debug!("every pack read and checked after {:?}", started.elapsed());
    Ok(report.into_inner().expect("lock"))
}

/// Largest run of adjacent blocks gathered into one write.
const WRITE_RUN: usize = 1 << 20;

/// Smallest run written with direct I/O.
const DIRECT_MIN: usize = 256 << 10;

/// A restored file being written: direct I/O for aligned runs where the filesystem allows.
struct OutFile {
    entry: u32,
    direct: Option<File>,
    buffered: Option<File>,
}

fn check_and_write(
    pack: &[u8],
    source: &str,
    snapshot: &str,
    files: &[(String, u64)],
    root: Option<&Path>,
    mut uses: Vec<Use>,
) -> Result<(u64, u64)> {
    let corrupt = |what: String| SnapshotError::Corrupt {
        object: format!("{source} (used by {snapshot})"),
        what,
    };
    let mut frames = FrameReader::new(pack)?;
    // In file order, so adjacent blocks gather into runs of up to WRITE_RUN bytes: a few
    // large writes instead of one per 8 KiB block.
    uses.sort_unstable_by_key(|u| (u.entry, u.number));
    // Every stored block is checked once; decompressing the same bytes again gives the
    // same block.
    let mut verified: HashSet<(u64, u16)> = HashSet::new();
    let mut checked = 0u64;
    let mut written = 0u64;
    let mut run = AlignedBuf::new(WRITE_RUN);
    let mut run_at: Option<(u32, u64)> = None;
    let mut out: Option<OutFile> = None;
    let flush =
        |run: &mut AlignedBuf, at: Option<(u32, u64)>, out: &mut Option<OutFile>| -> Result<u64> {
            let (Some(root), Some((entry, offset))) = (root, at) else {
                return Ok(0);
            };
            if run.is_empty() {
                return Ok(0);
            }
            let full = root.join(&files[entry as usize].0);
            if out.as_ref().map(|o| o.entry) != Some(entry) {
                *out = Some(OutFile {
                    entry,
                    direct: direct::open_write_direct(&full),
                    buffered: None,
                });
            }
            let o = out.as_mut().expect("opened above");
            // Large aligned runs bypass the page cache; small ones (an incremental's
            // scattered changed pages) would each wait for the device, so they are cached.
            let large = run.len() % direct::ALIGN == 0 && run.len() >= DIRECT_MIN;
            let file = match (&o.direct, large) {
                (Some(f), true) => f,
                _ => {
                    if o.buffered.is_none() {
                        o.buffered = Some(
                            std::fs::OpenOptions::new()
                                .write(true)
                                .open(&full)
                                .map_err(|e| SnapshotError::io(&full, "open", e))?,
                        );
                    }
                    o.buffered.as_ref().expect("opened above")
                }
            };
            file.write_all_at(run.as_slice(), offset)
                .map_err(|e| SnapshotError::io(&full, "write", e))?;
            let n = run.len() as u64;
            run.clear();
            Ok(n)
        };
    for u in &uses {
        let (path, size) = &files[u.entry as usize];
        let block = frames
            .block(u.offset, u.len, u.slot)
            .map_err(|what| corrupt(format!("a block of {path} {what}")))?;
        if verified.insert((u.offset, u.slot)) {
            if Sha256::digest(block)[..] != u.hash[..] {
                return Err(corrupt(format!(
                    "a block of {path} fails its SHA-256 check"
                )));
            }
            checked += 1;
        }
        if root.is_none() {
            continue;
        }
        let offset = u.number * BLOCK_SIZE;
        let expected = size.saturating_sub(offset).min(BLOCK_SIZE) as usize;
        if block.len() != expected {
            return Err(corrupt(format!(
                "block {} of {path} has {} bytes, expected {expected}",
                u.number,
                block.len()
            )));
        }
        let adjacent = matches!(run_at, Some((e, start)) if e == u.entry && start + run.len() as u64 == offset);
        if !adjacent || run.len() + block.len() > WRITE_RUN {
            written += flush(&mut run, run_at, &mut out)?;
            run_at = Some((u.entry, offset));
        }
        run.extend_from_slice(block);
    }
    written += flush(&mut run, run_at, &mut out)?;
    Ok((checked, written))
}
