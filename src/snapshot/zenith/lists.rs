//! Block lists: one file's block hashes in order, `lists/<sha256>` (zstd) named by the
//! SHA-256 of the uncompressed list, or `lists/<sha256>.patch`, the changes from another
//! full list when few blocks changed. Every list read back is checked against its name
//! and the file's size, with hard limits on what is read and decompressed.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::{Hash, TRANSFER_CONCURRENCY};
use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::manifest::{Entry, Manifest};
use crate::storage::Storage;

/// Largest block list object read: a 1 GiB file's list is 4 MiB.
pub(crate) const MAX_LIST_BYTES: u64 = 64 << 20;

pub(crate) fn list_key(hash: &str) -> String {
    format!("lists/{hash}")
}

/// A list stored as the changes from another (full) list: `lists/<list>.patch`.
const PATCH_MAGIC: &[u8; 8] = b"ZNPATCH1";

const PATCH_HEADER: usize = 8 + 32 + 8 + 8 + 4;

const PATCH_ENTRY: usize = 4 + 32;

pub(crate) fn patch_key(hash: &str) -> String {
    format!("lists/{hash}.patch")
}

/// A patch turning the full list `base` (named `base_name`) into `list`, or `None` when
/// the lists differ too much for a patch to pay off.
pub(super) fn encode_patch(base_name: &str, base: &[u8], list: &[u8]) -> Option<Vec<u8>> {
    let mut base_hash = [0u8; 32];
    hex::decode_to_slice(base_name, &mut base_hash).ok()?;
    let changed: Vec<(u32, &[u8])> = list
        .chunks_exact(32)
        .enumerate()
        .filter(|(i, h)| base.get(i * 32..i * 32 + 32) != Some(*h))
        .map(|(i, h)| (i as u32, h))
        .collect();
    if changed.len() * PATCH_ENTRY * 4 > list.len() {
        return None;
    }
    let mut out = Vec::with_capacity(PATCH_HEADER + changed.len() * PATCH_ENTRY);
    out.extend_from_slice(PATCH_MAGIC);
    out.extend_from_slice(&base_hash);
    out.extend_from_slice(&(base.len() as u64 / 32).to_le_bytes());
    out.extend_from_slice(&(list.len() as u64 / 32).to_le_bytes());
    out.extend_from_slice(&(changed.len() as u32).to_le_bytes());
    for (i, h) in changed {
        out.extend_from_slice(&i.to_le_bytes());
        out.extend_from_slice(h);
    }
    Some(out)
}

/// Reads a full list object (zstd) of `blocks` hashes, checked against its name;
/// `None` when there is no such object.
async fn fetch_full_list(
    storage: &dyn Storage,
    name: &str,
    blocks: u64,
    corrupt: &(dyn Fn(String) -> SnapshotError + Sync),
) -> Result<Option<Vec<u8>>> {
    let raw_len = usize::try_from(blocks.saturating_mul(32))
        .map_err(|_| corrupt("a block list is impossibly long".into()))?;
    let bytes = match storage
        .get_bytes_limited(
            &list_key(name),
            zstd::zstd_safe::compress_bound(raw_len) as u64 + 64,
        )
        .await
    {
        Ok(bytes) => bytes,
        Err(crate::storage::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let list = zstd::bulk::decompress(&bytes, raw_len)
        .map_err(|e| corrupt(format!("does not decompress: {e}")))?;
    if list.len() != raw_len || hex::encode(Sha256::digest(&list)) != name {
        return Err(corrupt("fails its SHA-256 check".into()));
    }
    Ok(Some(list))
}

/// Reads one file's block list, full or as a patch of a full list, checked against its
/// name (the SHA-256 of the whole list) and the file's size. Also returns the full list a
/// patch is based on.
pub(super) async fn load_list_named(
    storage: &dyn Storage,
    entry: &Entry,
    snapshot: &str,
) -> Result<(Vec<Hash>, Option<(String, Vec<u8>)>)> {
    let Some(name) = &entry.list else {
        return Ok((Vec::new(), None));
    };
    let blocks = entry.block_count();
    let corrupt = |what: String| SnapshotError::Corrupt {
        object: format!("{}/{} (used by {snapshot})", storage.url(), list_key(name)),
        what: format!("the block list of {} {what}", entry.path),
    };
    let (list, base) = match fetch_full_list(storage, name, blocks, &corrupt).await? {
        Some(list) => (list, None),
        None => {
            let cap =
                (PATCH_HEADER as u64).saturating_add(blocks.saturating_mul(PATCH_ENTRY as u64));
            let patch = match storage.get_bytes_limited(&patch_key(name), cap).await {
                Ok(bytes) => bytes,
                Err(crate::storage::Error::NotFound { .. }) => {
                    return Err(corrupt("is missing".into()))
                }
                Err(e) => return Err(e.into()),
            };
            if patch.len() < PATCH_HEADER || &patch[..8] != PATCH_MAGIC {
                return Err(corrupt("is not a zenith list patch".into()));
            }
            let base_name = hex::encode(&patch[8..40]);
            let base_blocks = u64::from_le_bytes(patch[40..48].try_into().expect("8 bytes"));
            let count = u64::from_le_bytes(patch[48..56].try_into().expect("8 bytes"));
            let n = u32::from_le_bytes(patch[56..60].try_into().expect("4 bytes")) as usize;
            if count != blocks || patch.len() != PATCH_HEADER + n * PATCH_ENTRY {
                return Err(corrupt("has a patch of the wrong length".into()));
            }
            let base = fetch_full_list(storage, &base_name, base_blocks, &corrupt)
                .await?
                .ok_or_else(|| {
                    corrupt(format!("is based on list {base_name}, which is missing"))
                })?;
            let mut list = base.clone();
            list.resize(count as usize * 32, 0);
            for change in patch[PATCH_HEADER..].chunks_exact(PATCH_ENTRY) {
                let i = u32::from_le_bytes(change[..4].try_into().expect("4 bytes")) as usize;
                let slot = list
                    .get_mut(i * 32..i * 32 + 32)
                    .ok_or_else(|| corrupt("has a patch beyond its end".into()))?;
                slot.copy_from_slice(&change[4..]);
            }
            if hex::encode(Sha256::digest(&list)) != *name {
                return Err(corrupt("fails its SHA-256 check".into()));
            }
            (list, Some((base_name, base)))
        }
    };
    Ok((
        list.chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect(),
        base,
    ))
}

/// The block lists of every file of `manifest`, in entry order (empty for directories).
pub(super) async fn load_lists(
    storage: &dyn Storage,
    manifest: &Manifest,
) -> Result<Vec<Arc<Vec<Hash>>>> {
    let by_name = fetch_lists(storage, std::slice::from_ref(manifest)).await?;
    let empty = Arc::new(Vec::new());
    Ok(manifest
        .entries
        .iter()
        .map(|e| match &e.list {
            Some(name) => Arc::clone(&by_name[name].0),
            None => Arc::clone(&empty),
        })
        .collect())
}

/// Each distinct block list the manifests name, fetched concurrently and checked, by
/// name, with the name of the full list it is a patch of, if it is one.
pub(crate) async fn fetch_lists(
    storage: &dyn Storage,
    manifests: &[Manifest],
) -> Result<HashMap<String, (Arc<Vec<Hash>>, Option<String>)>> {
    let mut unique: HashMap<&str, (&Entry, &str)> = HashMap::new();
    for m in manifests {
        for e in &m.entries {
            if let Some(name) = &e.list {
                unique.entry(name.as_str()).or_insert((e, m.id.as_str()));
            }
        }
    }
    let fetched: Vec<Result<(String, (Arc<Vec<Hash>>, Option<String>))>> =
        futures::stream::iter(unique)
            .map(|(name, (e, id))| async move {
                let (list, base) = load_list_named(storage, e, &format!("snapshot {id}")).await?;
                Ok((
                    name.to_string(),
                    (Arc::new(list), base.map(|(base_name, _)| base_name)),
                ))
            })
            .buffer_unordered(TRANSFER_CONCURRENCY * 4)
            .collect()
            .await;
    fetched.into_iter().collect()
}
