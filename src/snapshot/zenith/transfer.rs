//! Copying zenith-format snapshots between storages (push, pull, export and import of a
//! repo's snapshots): only the objects the target lacks move, each checked as it is read,
//! and the manifest goes last, so the target never lists a snapshot it cannot restore. A
//! transfer cut short leaves whole objects behind, which the next run does not send again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::catalog::{manifest_key, resolve};
use super::index::{load_block_hashes, pack_sizes, MAX_INDEX_BYTES};
use super::lists::{fetch_lists, list_key, patch_key, MAX_LIST_BYTES};
use super::lock::with_export_lock;
use super::packer::MAX_PACK_BYTES;
use super::{BlockSet, Hash, TRANSFER_CONCURRENCY};
use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::manifest::Manifest;
use crate::storage::Storage;
use crate::util::progress::ProgressHandle;

/// What a transfer moved.
#[derive(Debug, Clone, Default)]
pub struct TransferReport {
    /// The snapshot as the target now lists it.
    pub manifest: Option<Manifest>,
    /// The target had this snapshot already: nothing moved.
    pub already_there: bool,
    pub objects_sent: u64,
    pub bytes_sent: u64,
    /// Objects the snapshot needs that the target had.
    pub objects_skipped: u64,
}

/// Copies snapshot `m` from `source` to `target`, renamed to `name` when given.
pub async fn transfer(
    source: &dyn Storage,
    target: &Arc<dyn Storage>,
    m: &Manifest,
    name: Option<&str>,
    progress: &ProgressHandle,
) -> Result<TransferReport> {
    let mut m = m.clone();
    if let Some(n) = name {
        m.name = Some(n.to_string());
    }
    let key = manifest_key(&m.id);
    if target.exists(&key).await? {
        return Ok(TransferReport {
            manifest: Some(resolve(target.as_ref(), &m.id).await?),
            already_there: true,
            ..Default::default()
        });
    }
    m.refuse_clone(&source.url())?;
    // A concurrent `snapshot delete` on the target must not collect what this run
    // decides not to send because it is there. The manifest goes under the lock too: until
    // it is there, a collection on the target could take objects this run relied on.
    let mut report = with_export_lock(target, async {
        let report = send(source, target, &m, progress).await?;
        target.put(&key, Bytes::from(m.to_json())).await?;
        Ok(report)
    })
    .await?;
    report.manifest = Some(m);
    Ok(report)
}

async fn send(
    source: &dyn Storage,
    target: &Arc<dyn Storage>,
    m: &Manifest,
    progress: &ProgressHandle,
) -> Result<TransferReport> {
    let sent = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let mut skipped = 0u64;
    // The block lists (full, or patches with the full lists they are based on).
    let lists = fetch_lists(source, std::slice::from_ref(m)).await?;
    let there: HashSet<String> = target
        .list("lists/")
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut list_keys = Vec::new();
    for (name, (_, base)) in &lists {
        let mut wanted = vec![match base {
            Some(_) => patch_key(name),
            None => list_key(name),
        }];
        if let Some(b) = base {
            wanted.push(list_key(b));
        }
        for key in wanted {
            if there.contains(&key) || list_keys.contains(&key) {
                skipped += 1;
            } else {
                list_keys.push(key);
            }
        }
    }
    // The packs holding blocks the target has in none of its packs.
    let have = load_block_hashes(target.as_ref()).await?;
    let mut needed = BlockSet::default();
    for (list, _) in lists.values() {
        needed.extend(list.iter().filter(|h| !have.contains(*h)));
    }
    // A pack that arrived without its index (a transfer cut between the two): same name,
    // same content, so only the index goes.
    let arrived: HashMap<String, u64> = target
        .list("packs/")
        .await?
        .into_iter()
        .map(|o| (o.key.trim_start_matches("packs/").to_string(), o.size))
        .collect();
    let all_packs = pack_sizes(source).await?;
    // Every block the target lacks must be in a pack the source has: a snapshot that
    // cannot be restored is never sent.
    let available: HashSet<&Hash> = all_packs.iter().flat_map(|(_, e, _)| e.iter()).collect();
    if let Some(missing) = needed.iter().find(|h| !available.contains(h)) {
        return Err(SnapshotError::Corrupt {
            object: format!("snapshot {} in {}", m.id, source.url()),
            what: format!(
                "it needs block {}, which no pack there holds (a missing pack?)",
                hex::encode(missing)
            ),
        });
    }
    let packs: Vec<(String, u64, bool)> = all_packs
        .into_iter()
        .filter(|(_, entries, _)| {
            let hit = entries.iter().any(|h| needed.contains(h));
            if !hit {
                skipped += 1;
            }
            hit
        })
        .map(|(id, _, size)| {
            let there = arrived.get(&id) == Some(&size);
            (id, size, there)
        })
        .collect();
    skipped += packs.iter().filter(|p| p.2).count() as u64;
    progress.set_total(packs.iter().filter(|p| !p.2).map(|p| p.1).sum());
    let copy = |key: String, limit: u64, check_sha: Option<String>| {
        let (sent, bytes) = (&sent, &bytes);
        async move {
            let data = source.get_bytes_limited(&key, limit).await?;
            if let Some(want) = check_sha {
                if hex::encode(Sha256::digest(&data)) != want {
                    return Err(SnapshotError::Corrupt {
                        object: format!("{}/{key}", source.url()),
                        what: "the pack fails its SHA-256 check".into(),
                    });
                }
            }
            let n = data.len() as u64;
            target.put(&key, data).await?;
            sent.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(n, Ordering::Relaxed);
            Ok::<u64, SnapshotError>(n)
        }
    };
    // Packs first, each before its index: a target's index never names a missing pack.
    let results: Vec<Result<()>> = futures::stream::iter(packs)
        .map(|(id, _, there)| async move {
            if !there {
                let key = format!("packs/{id}");
                let n = copy(key, MAX_PACK_BYTES, Some(id.clone())).await?;
                progress.add(n);
            }
            copy(format!("index/{id}.idx"), MAX_INDEX_BYTES, None).await?;
            Ok(())
        })
        .buffer_unordered(TRANSFER_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let results: Vec<Result<u64>> = futures::stream::iter(list_keys)
        .map(|key| copy(key, MAX_LIST_BYTES, None))
        .buffer_unordered(TRANSFER_CONCURRENCY * 4)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<u64>>>()?;
    progress.finish();
    Ok(TransferReport {
        manifest: None,
        already_there: false,
        objects_sent: sent.into_inner(),
        bytes_sent: bytes.into_inner(),
        objects_skipped: skipped,
    })
}
