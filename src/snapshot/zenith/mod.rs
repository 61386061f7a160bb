//! The `zenith` format: content-addressed, page-deduplicated, compressed and checksummed.
//!
//! Layout under the storage root:
//! - `packs/<sha256>`: zstd frames of up to 8 blocks of 8 KiB each, concatenated (about
//!   8 MiB a pack);
//! - `index/<sha256>.idx`: the pack's index, block hash → frame offset, length and slot,
//!   with its own checksum;
//! - `lists/<sha256>`: one file's block hashes in order (zstd), named by the SHA-256 of
//!   the uncompressed list; identical files share one list, and a file unchanged since the
//!   previous snapshot reuses its list without being read again (`lists/<sha256>.patch`:
//!   a list stored as the changes from a full list);
//! - `snapshots/<id>.json`: the manifest, naming each file's list;
//! - `locks/<kind>-<random>.lock`: exports and collections under way.
//!
//! Write order makes a snapshot atomic: a pack, then its index, lists, and the manifest
//! only after every pack, index and list is stored. A snapshot is visible exactly when its
//! manifest exists; a run killed midway leaves packs that the next run reuses (their index
//! says what they hold), never a half snapshot. A later snapshot stores only blocks the
//! destination lacks.
//!
//! Reading is defensive: lists and frames are decompressed with hard size limits (no
//! decompression bombs), every list and block is checked against its SHA-256, and data is
//! written only inside a temporary directory that is renamed into place when everything
//! checked out.
//!
//! The parts, one concern each: [`index`] (pack indexes: which pack holds a block),
//! [`lists`] (per-file block lists and their patches), [`packer`] (frames into packs and
//! back), [`writer`] (reading a data directory into packs and lists), [`lock`] (export and
//! collection locks), [`gc`] (deleting snapshots, collecting unused data), [`catalog`]
//! (listing and resolving manifests), [`restore`] (unpack, verify, restore over an older
//! state) and [`transfer`] (copying snapshots between storages).

mod catalog;
mod gc;
mod index;
mod lists;
mod lock;
mod packer;
mod restore;
mod transfer;
mod writer;

use std::collections::{HashMap, HashSet};

pub use catalog::{contains, list, publish, resolve};
pub use gc::{collect_garbage, delete, DeleteReport, GcReport};
pub(crate) use lock::with_export_lock;
pub use restore::{unpack, unpack_over, verify, Basis};
pub use transfer::{transfer, TransferReport};
pub use writer::{pack_dir, PackReport, PackRun};

/// The SHA-256 of each 8 KiB block of every file of `manifest`, in entry order (empty for
/// directories), each list checked as it is read. Pass a manifest narrowed to the files
/// wanted: lists of a large snapshot are large.
pub async fn block_lists(
    storage: &dyn crate::storage::Storage,
    manifest: &crate::snapshot::Manifest,
) -> crate::snapshot::Result<Vec<std::sync::Arc<Vec<[u8; 32]>>>> {
    manifest.refuse_clone(&storage.url())?;
    lists::load_lists(storage, manifest).await
}

/// Packs and lists uploaded or downloaded at once.
pub(crate) const TRANSFER_CONCURRENCY: usize = 4;

pub(crate) type Hash = [u8; 32];

/// Sets and maps keyed by block digests, of which a snapshot has hundreds of thousands:
/// foldhash (seeded per process, so a hostile snapshot's chosen digests cannot be made to
/// collide) hashes them several times faster than the standard SipHash.
pub(crate) type BlockSet = HashSet<Hash, foldhash::fast::RandomState>;

pub(crate) type BlockMap<V> = HashMap<Hash, V, foldhash::fast::RandomState>;

fn older_than(modified: Option<std::time::SystemTime>, grace: std::time::Duration) -> bool {
    match modified {
        Some(t) => t.elapsed().map(|age| age >= grace).unwrap_or(false),
        // A store that reports no time: only collect with a zero grace period.
        None => grace.is_zero(),
    }
}
