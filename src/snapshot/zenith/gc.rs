//! Deleting snapshots and collecting what no remaining snapshot needs: packs no snapshot
//! uses go, packs mostly unused are rewritten with only their used blocks, unused lists
//! go, all past a grace period and never while an export holds its lock.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::catalog::{list, manifest_key};
use super::index::{load_packs, IndexEntry};
use super::lists::fetch_lists;
use super::lock::HeldLock;
use super::packer::{FrameReader, Packer, MAX_PACK_BYTES};
use super::{older_than, BlockSet, Hash};
use crate::snapshot::error::{join_error, Result, SnapshotError};
use crate::snapshot::manifest::Manifest;
use crate::storage::Storage;

/// What deleting did.
#[derive(Debug, Clone, Default)]
pub struct DeleteReport {
    pub deleted: String,
    pub gc: GcReport,
}

/// What garbage collection did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Packs removed because no snapshot uses any of their blocks.
    pub packs_deleted: u64,
    /// Packs rewritten without their unused blocks.
    pub packs_repacked: u64,
    /// Stored bytes freed.
    pub bytes_freed: u64,
    /// Unused bytes left in place (younger than the grace period, or under the threshold).
    pub bytes_unused_left: u64,
    /// Why collection was skipped, if it was.
    pub skipped: Option<String>,
}

/// Deletes one snapshot (its manifest), then collects what no remaining snapshot needs.
///
/// Safety: blocks used by a remaining snapshot are never removed; packs younger than
/// `grace` are left alone (a concurrent export may be about to reference them), and while
/// any export holds a lock younger than `grace` nothing is collected at all. Packs whose
/// unused share exceeds `max_unused` (0.0–1.0 of all stored bytes) are rewritten with only
/// their used blocks, most-unused first.
pub async fn delete(
    storage: Arc<dyn Storage>,
    manifest: &Manifest,
    grace: std::time::Duration,
    max_unused: f64,
) -> Result<DeleteReport> {
    storage.delete(&manifest_key(&manifest.id)).await?;
    let gc = collect_garbage(storage, grace, max_unused).await.map_err(|e| SnapshotError::Refused {
        reason: format!(
            "snapshot {} is deleted, but collecting the data it alone used failed: {e}; the next delete collects it",
            manifest.id
        ),
    })?;
    Ok(DeleteReport {
        deleted: manifest.id.clone(),
        gc,
    })
}

/// Removes or rewrites packs that hold blocks no snapshot uses (see [`delete`]).
pub async fn collect_garbage(
    storage: Arc<dyn Storage>,
    grace: std::time::Duration,
    max_unused: f64,
) -> Result<GcReport> {
    let lock = match HeldLock::take_unless(&storage, "gc", "locks/export-").await? {
        Ok(lock) => lock,
        Err(export) => {
            return Ok(GcReport {
                skipped: Some(format!(
                    "an export is running ({export}); a later delete collects the unused data"
                )),
                ..GcReport::default()
            })
        }
    };
    let result = collect_locked(Arc::clone(&storage), grace, max_unused).await;
    lock.release().await;
    result
}

async fn collect_locked(
    storage: Arc<dyn Storage>,
    grace: std::time::Duration,
    max_unused: f64,
) -> Result<GcReport> {
    let mut report = GcReport::default();
    // Temporary files of writers that were killed hold nothing anyone can reach.
    storage.remove_abandoned().await;
    let manifests = list(storage.as_ref()).await?;
    // Every block a remaining snapshot uses, through each distinct list it names (and the
    // full lists that patches rely on).
    let lists = fetch_lists(storage.as_ref(), &manifests).await?;
    let live: BlockSet = lists
        .values()
        .flat_map(|(list, _)| list.iter().copied())
        .collect();
    let bases: HashSet<&str> = lists
        .values()
        .filter_map(|(_, base)| base.as_deref())
        .collect();
    let live_lists: HashSet<&str> = lists.keys().map(String::as_str).collect();
    let ages: HashMap<String, Option<std::time::SystemTime>> = storage
        .list("packs/")
        .await?
        .into_iter()
        .map(|o| {
            (
                o.key.trim_start_matches("packs/").to_string(),
                o.last_modified,
            )
        })
        .collect();
    let mut packs = load_packs(storage.as_ref()).await?;
    let all_ids: Vec<String> = packs.iter().map(|p| p.id.clone()).collect();
    // A block stored twice (two exports racing) is kept in the first pack only.
    let mut kept = BlockSet::default();
    let mut candidates = Vec::new();
    let mut total_bytes = 0u64;
    let mut unused_bytes = 0u64;
    for pack in packs.drain(..) {
        // Frame sizes, once per frame; a frame's bytes count as used if any block is.
        let frames: HashMap<u64, u32> = pack.entries.iter().map(|e| (e.offset, e.len)).collect();
        let size: u64 = frames.values().map(|&l| l as u64).sum();
        total_bytes += size;
        let used: Vec<IndexEntry> = pack
            .entries
            .iter()
            .copied()
            .filter(|e| live.contains(&e.hash) && kept.insert(e.hash))
            .collect();
        let used_frames: HashSet<u64> = used.iter().map(|e| e.offset).collect();
        let used_bytes: u64 = used_frames.iter().map(|o| frames[o] as u64).sum();
        let unused = size - used_bytes;
        unused_bytes += unused;
        let old_enough = older_than(ages.get(&pack.id).copied().flatten(), grace);
        if unused > 0 && old_enough {
            candidates.push((unused, size, pack, used));
        }
    }
    // Empty packs always go; partly used ones, most unused first, until what is left
    // unused is within the threshold.
    candidates.sort_by(|a, b| (b.0 as f64 / b.1 as f64).total_cmp(&(a.0 as f64 / a.1 as f64)));
    let allowed = (total_bytes as f64 * max_unused.clamp(0.0, 1.0)) as u64;
    let mut to_delete = Vec::new();
    let mut to_repack = Vec::new();
    let mut remaining_unused = unused_bytes;
    for (unused, _size, pack, used) in candidates {
        if used.is_empty() {
            remaining_unused -= unused;
            to_delete.push(pack.id);
        } else if remaining_unused > allowed {
            remaining_unused -= unused;
            to_repack.push((pack.id, pack.entries, used));
        }
    }
    // Rewrite first (new packs and indexes), then remove the old indexes, then old packs:
    // at every moment each used block is reachable through some index.
    let mut written = 0u64;
    let mut rewritten: HashSet<String> = HashSet::new();
    if !to_repack.is_empty() {
        let runtime = tokio::runtime::Handle::current();
        let url = storage.url();
        let jobs = to_repack.clone();
        let storage = Arc::clone(&storage);
        let stats = tokio::task::spawn_blocking(move || {
            let packer = Packer::new(runtime.clone(), Arc::clone(&storage));
            let mut compressor = zstd::bulk::Compressor::new(1)
                .map_err(|e| SnapshotError::io("zstd", "initialize", e))?;
            for (pack_id, all, used) in &jobs {
                let key = format!("packs/{pack_id}");
                let data = runtime.block_on(storage.get_bytes_limited(&key, MAX_PACK_BYTES))?;
                repack_frames(
                    &data,
                    &format!("{url}/{key}"),
                    all,
                    used,
                    &packer,
                    &mut compressor,
                )?;
            }
            packer.finish()
        })
        .await
        .map_err(join_error)??;
        report.packs_repacked = to_repack.len() as u64;
        written = stats.bytes;
        rewritten = stats.ids.into_iter().collect();
    }
    // A rewrite can produce a pack identical to one scheduled for removal (its id is its
    // content's hash, e.g. after an interrupted collection): never remove what was just
    // written.
    let doomed: Vec<String> = to_delete
        .iter()
        .cloned()
        .chain(to_repack.iter().map(|(id, _, _)| id.clone()))
        .filter(|id| !rewritten.contains(id))
        .collect();
    for pack_id in &doomed {
        storage.delete(&format!("index/{pack_id}.idx")).await?;
    }
    let mut freed = 0u64;
    // Packs without an index (an export killed between a pack and its index, or a
    // collection killed between the two deletes) hold nothing reachable: remove them once
    // they are older than the grace period.
    let indexed: HashSet<&String> = all_ids.iter().collect();
    let orphans: Vec<String> = ages
        .iter()
        .filter(|(id, modified)| {
            !indexed.contains(id) && !rewritten.contains(*id) && older_than(**modified, grace)
        })
        .map(|(id, _)| id.clone())
        .collect();
    for pack_id in doomed.iter().chain(orphans.iter()) {
        let key = format!("packs/{pack_id}");
        if let Ok(meta) = storage.head(&key).await {
            freed += meta.size;
        }
        storage.delete(&key).await?;
    }
    // Lists no snapshot names, once past the grace period (an export may be about to).
    for object in storage.list("lists/").await? {
        let file = object.key.trim_start_matches("lists/");
        let used = match file.strip_suffix(".patch") {
            Some(name) => live_lists.contains(name),
            None => live_lists.contains(file) || bases.contains(file),
        };
        if !used && older_than(object.last_modified, grace) {
            freed += object.size;
            storage.delete(&object.key).await?;
        }
    }
    report.packs_deleted = (to_delete
        .iter()
        .filter(|id| !rewritten.contains(*id))
        .count()
        + orphans.len()) as u64;
    report.bytes_freed = freed.saturating_sub(written);
    report.bytes_unused_left = remaining_unused;
    Ok(report)
}

/// Moves the `used` blocks of one pack into `packer`: whole frames as they are when all
/// their blocks are used, otherwise the used blocks checked and compressed into a new frame.
fn repack_frames(
    data: &[u8],
    source: &str,
    all: &[IndexEntry],
    used: &[IndexEntry],
    packer: &Packer,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Result<()> {
    let corrupt = |what: String| SnapshotError::Corrupt {
        object: source.to_string(),
        what,
    };
    let mut slots_per_frame: HashMap<u64, usize> = HashMap::new();
    for e in all {
        *slots_per_frame.entry(e.offset).or_default() += 1;
    }
    let mut by_frame: std::collections::BTreeMap<u64, Vec<IndexEntry>> = Default::default();
    for e in used {
        by_frame.entry(e.offset).or_default().push(*e);
    }
    let mut frames = FrameReader::new(data)?;
    for (offset, mut entries) in by_frame {
        entries.sort_by_key(|e| e.slot);
        let mut raw = Vec::new();
        for e in &entries {
            let block = frames
                .block(e.offset, e.len, e.slot)
                .map_err(|what| corrupt(format!("a block {what}")))?;
            if Sha256::digest(block)[..] != e.hash[..] {
                return Err(corrupt("a block fails its SHA-256 check".into()));
            }
            raw.extend_from_slice(block);
        }
        let hashes: Vec<Hash> = entries.iter().map(|e| e.hash).collect();
        if entries.len() == slots_per_frame[&offset] {
            let (start, len) = (offset as usize, entries[0].len as usize);
            packer.add_frame(&hashes, data[start..start + len].to_vec())?;
        } else {
            let compressed = compressor
                .compress(&raw)
                .map_err(|e| SnapshotError::io("zstd", "compress", e))?;
            packer.add_frame(&hashes, compressed)?;
        }
    }
    Ok(())
}
