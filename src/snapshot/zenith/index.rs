//! Pack indexes: `index/<pack>.idx` lists every block a pack holds (its hash, its frame's
//! offset and length in the pack, its slot in the frame), sealed by its own SHA-256. The
//! indexes together say which blocks a storage holds and where; a pack without an index
//! holds nothing anyone can reach.

use std::collections::HashMap;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::catalog::refuse_listed_size;
use super::{BlockMap, BlockSet, Hash, TRANSFER_CONCURRENCY};
use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::manifest;
use crate::storage::Storage;

/// An index lists a pack's blocks, 46 bytes each; even 8 MiB of the smallest zstd frames
/// stays under this.
pub(crate) const MAX_INDEX_BYTES: u64 = 64 << 20;

const INDEX_MAGIC: &[u8; 8] = b"ZNIDX002";

const INDEX_ENTRY: usize = 32 + 8 + 4 + 2;

/// Where a block lives: a frame of a pack, and its position in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub(super) pack: usize,
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) slot: u16,
}

/// One index entry: a block's hash, its frame's offset and length in the pack, its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct IndexEntry {
    pub(super) hash: Hash,
    pub(super) offset: u64,
    pub(super) len: u32,
    pub(super) slot: u16,
}

/// Every block the destination holds, from its pack indexes.
#[derive(Debug, Default)]
pub(super) struct BlockIndex {
    pub(super) packs: Vec<String>,
    pub(super) blocks: BlockMap<Location>,
}

pub(super) fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * INDEX_ENTRY + 32);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.hash);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.slot.to_le_bytes());
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn decode_index(bytes: &[u8], source: &str) -> Result<Vec<IndexEntry>> {
    let corrupt = |what: &str| SnapshotError::Corrupt {
        object: source.to_string(),
        what: what.to_string(),
    };
    if bytes.len() < 16 + 32 || &bytes[..8] != INDEX_MAGIC {
        return Err(corrupt("not a zenith pack index"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body)[..] != *sum {
        return Err(corrupt("the pack index fails its checksum"));
    }
    let count = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")) as usize;
    if count.checked_mul(INDEX_ENTRY) != Some(body.len() - 16) {
        return Err(corrupt("the pack index has the wrong length"));
    }
    Ok(body[16..]
        .chunks_exact(INDEX_ENTRY)
        .map(|c| IndexEntry {
            hash: c[..32].try_into().expect("32 bytes"),
            offset: u64::from_le_bytes(c[32..40].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(c[40..44].try_into().expect("4 bytes")),
            slot: u16::from_le_bytes(c[44..46].try_into().expect("2 bytes")),
        })
        .collect())
}

/// One pack as its index describes it.
pub(super) struct PackInfo {
    pub(super) id: String,
    pub(super) entries: Vec<IndexEntry>,
}

pub(super) async fn load_packs(storage: &dyn Storage) -> Result<Vec<PackInfo>> {
    let objects = storage.list("index/").await?;
    let fetched: Vec<_> =
        futures::stream::iter(objects.into_iter().filter(|o| o.key.ends_with(".idx")))
            .map(|o| async move {
                refuse_listed_size(storage, &o, MAX_INDEX_BYTES)?;
                let bytes = storage.get_bytes_limited(&o.key, MAX_INDEX_BYTES).await?;
                Ok::<_, SnapshotError>((o.key, bytes))
            })
            .buffered(TRANSFER_CONCURRENCY * 2)
            .collect()
            .await;
    let mut packs = Vec::new();
    for item in fetched {
        let (key, bytes) = item?;
        let id = key
            .trim_start_matches("index/")
            .trim_end_matches(".idx")
            .to_string();
        if !manifest::is_sha256_hex(&id) {
            continue;
        }
        let entries = decode_index(&bytes, &format!("{}/{key}", storage.url()))?;
        packs.push(PackInfo { id, entries });
    }
    Ok(packs)
}

/// Every block any indexed pack of `storage` holds.
pub(crate) async fn load_block_hashes(storage: &dyn Storage) -> Result<BlockSet> {
    let packs = load_packs(storage).await?;
    let mut hashes = BlockSet::with_capacity_and_hasher(
        packs.iter().map(|p| p.entries.len()).sum(),
        Default::default(),
    );
    for pack in packs {
        hashes.extend(pack.entries.into_iter().map(|e| e.hash));
    }
    Ok(hashes)
}

/// Each indexed pack of `storage` that exists: its id, blocks and size in bytes.
pub(crate) async fn pack_sizes(storage: &dyn Storage) -> Result<Vec<(String, Vec<Hash>, u64)>> {
    let sizes: HashMap<String, u64> = storage
        .list("packs/")
        .await?
        .into_iter()
        .map(|o| (o.key.trim_start_matches("packs/").to_string(), o.size))
        .collect();
    Ok(load_packs(storage)
        .await?
        .into_iter()
        .filter_map(|p| {
            let size = *sizes.get(&p.id)?;
            Some((p.id, p.entries.into_iter().map(|e| e.hash).collect(), size))
        })
        .collect())
}

pub(super) async fn load_index(storage: &dyn Storage) -> Result<BlockIndex> {
    let mut index = BlockIndex::default();
    for pack in load_packs(storage).await? {
        let number = index.packs.len();
        for e in pack.entries {
            index.blocks.entry(e.hash).or_insert(Location {
                pack: number,
                offset: e.offset,
                len: e.len,
                slot: e.slot,
            });
        }
        index.packs.push(pack.id);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_detects_damage() {
        let entry = |b: u8, offset, len, slot| IndexEntry {
            hash: [b; 32],
            offset,
            len,
            slot,
        };
        let entries = vec![entry(1, 0, 10, 0), entry(2, 0, 10, 1), entry(3, 10, 20, 0)];
        let bytes = encode_index(&entries);
        assert_eq!(decode_index(&bytes, "x").unwrap(), entries);
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(decode_index(&bad, "x")
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        assert!(decode_index(&bytes[..bytes.len() - 1], "x").is_err());
        assert!(decode_index(b"garbage", "x").is_err());
    }
}
