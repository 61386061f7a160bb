//! Packs: compressed frames of up to [`FRAME_BLOCKS`] blocks, gathered into packs of about
//! 8 MiB. The [`Packer`] seals and uploads each full pack, then its index, with a bounded
//! number of uploads in flight; the [`FrameReader`] takes frames apart again, one frame
//! decompressed at a time and with a hard size limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::index::{encode_index, IndexEntry};
use super::{Hash, TRANSFER_CONCURRENCY};
use crate::snapshot::error::{join_error, Result, SnapshotError};
use crate::snapshot::manifest::BLOCK_SIZE;
use crate::storage::Storage;

/// Seal a pack once its compressed content reaches this size.
const PACK_TARGET: usize = 8 << 20;

/// New blocks compressed together into one zstd frame: neighbouring pages share structure,
/// so frames of several pages compress far better than single pages.
pub(super) const FRAME_BLOCKS: usize = 8;

/// Largest pack zenith writes is PACK_TARGET plus one frame; anything much larger is
/// refused before it is read into memory.
pub(crate) const MAX_PACK_BYTES: u64 = 2 * PACK_TARGET as u64;

pub(super) struct PackerStats {
    pub(super) bytes: u64,
    pub(super) blocks: u64,
    pub(super) packs: u64,
    /// Ids of the packs this packer wrote.
    pub(super) ids: Vec<String>,
}

/// Collects compressed frames into packs and uploads each sealed pack, then its index, with
/// at most TRANSFER_CONCURRENCY uploads in flight (the caller blocks while all are busy).
pub(super) struct Packer {
    pub(super) runtime: tokio::runtime::Handle,
    storage: Arc<dyn Storage>,
    current: Mutex<(Vec<u8>, Vec<IndexEntry>)>,
    permits: Arc<tokio::sync::Semaphore>,
    uploads: Mutex<Vec<tokio::task::JoinHandle<Result<()>>>>,
    bytes: AtomicU64,
    blocks: AtomicU64,
    packs: AtomicU64,
    ids: Mutex<Vec<String>>,
}

impl Packer {
    pub(super) fn new(runtime: tokio::runtime::Handle, storage: Arc<dyn Storage>) -> Self {
        Packer {
            runtime,
            storage,
            current: Mutex::new((Vec::with_capacity(PACK_TARGET + (64 << 10)), Vec::new())),
            permits: Arc::new(tokio::sync::Semaphore::new(TRANSFER_CONCURRENCY)),
            uploads: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            blocks: AtomicU64::new(0),
            packs: AtomicU64::new(0),
            ids: Mutex::new(Vec::new()),
        }
    }

    /// Adds one zstd frame holding `hashes.len()` blocks, in slot order.
    pub(super) fn add_frame(&self, hashes: &[Hash], compressed: Vec<u8>) -> Result<()> {
        let sealed = {
            let mut current = self.current.lock().expect("lock");
            let offset = current.0.len() as u64;
            current.0.extend_from_slice(&compressed);
            for (slot, hash) in hashes.iter().enumerate() {
                current.1.push(IndexEntry {
                    hash: *hash,
                    offset,
                    len: compressed.len() as u32,
                    slot: slot as u16,
                });
            }
            if current.0.len() >= PACK_TARGET {
                Some(std::mem::replace(
                    &mut *current,
                    (Vec::with_capacity(PACK_TARGET + (64 << 10)), Vec::new()),
                ))
            } else {
                None
            }
        };
        self.blocks
            .fetch_add(hashes.len() as u64, Ordering::Relaxed);
        if let Some((data, entries)) = sealed {
            self.seal(data, entries)?;
        }
        Ok(())
    }

    /// Uploads a finished pack, then its index.
    fn seal(&self, data: Vec<u8>, entries: Vec<IndexEntry>) -> Result<()> {
        let pack_id = hex::encode(Sha256::digest(&data));
        self.ids.lock().expect("lock").push(pack_id.clone());
        self.packs.fetch_add(1, Ordering::Relaxed);
        let index = encode_index(&entries);
        self.upload(vec![
            (format!("packs/{pack_id}"), data),
            (format!("index/{pack_id}.idx"), index),
        ])
    }

    /// Uploads one object besides the packs (a block list).
    pub(super) fn put_object(&self, key: String, data: Vec<u8>) -> Result<()> {
        self.upload(vec![(key, data)])
    }

    /// Uploads `objects` in order, in the background, once a transfer slot is free.
    fn upload(&self, objects: Vec<(String, Vec<u8>)>) -> Result<()> {
        // Fail early if an earlier upload failed, rather than packing the whole directory.
        self.reap(false)?;
        let permit = self
            .runtime
            .block_on(Arc::clone(&self.permits).acquire_owned())
            .expect("semaphore never closed");
        self.bytes.fetch_add(
            objects.iter().map(|(_, d)| d.len() as u64).sum(),
            Ordering::Relaxed,
        );
        let storage = Arc::clone(&self.storage);
        let handle = self.runtime.spawn(async move {
            let _permit = permit;
            for (key, data) in objects {
                storage.put(&key, Bytes::from(data)).await?;
            }
            Ok(())
        });
        self.uploads.lock().expect("lock").push(handle);
        Ok(())
    }

    /// Collects finished uploads (all of them when `wait`), returning the first error.
    fn reap(&self, wait: bool) -> Result<()> {
        let handles: Vec<_> = {
            let mut uploads = self.uploads.lock().expect("lock");
            if wait {
                std::mem::take(&mut *uploads)
            } else {
                let (done, pending) = std::mem::take(&mut *uploads)
                    .into_iter()
                    .partition(|h| h.is_finished());
                *uploads = pending;
                done
            }
        };
        for handle in handles {
            self.runtime.block_on(handle).map_err(join_error)??;
        }
        Ok(())
    }

    pub(super) fn finish(self) -> Result<PackerStats> {
        let (data, entries) = std::mem::take(&mut *self.current.lock().expect("lock"));
        if !entries.is_empty() {
            self.seal(data, entries)?;
        }
        self.reap(true)?;
        Ok(PackerStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            blocks: self.blocks.load(Ordering::Relaxed),
            packs: self.packs.load(Ordering::Relaxed),
            ids: std::mem::take(&mut *self.ids.lock().expect("lock")),
        })
    }
}

/// Decompresses frames of one pack, keeping the last one (blocks of a frame are usually
/// used one after another).
pub(super) struct FrameReader<'a> {
    pack: &'a [u8],
    decompressor: zstd::bulk::Decompressor<'static>,
    cached: Option<(u64, Vec<u8>)>,
}

impl<'a> FrameReader<'a> {
    pub(super) fn new(pack: &'a [u8]) -> Result<Self> {
        Ok(FrameReader {
            pack,
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| SnapshotError::io("zstd", "initialize", e))?,
            cached: None,
        })
    }

    /// The block at `slot` of the frame at `offset`/`len`, or a description of the damage.
    pub(super) fn block(
        &mut self,
        offset: u64,
        len: u32,
        slot: u16,
    ) -> std::result::Result<&[u8], String> {
        if self.cached.as_ref().map(|(o, _)| *o) != Some(offset) {
            let start = offset as usize;
            let end = start
                .checked_add(len as usize)
                .filter(|&e| e <= self.pack.len())
                .ok_or_else(|| {
                    format!(
                        "a frame at {offset} lies outside the {}-byte pack (truncated?)",
                        self.pack.len()
                    )
                })?;
            let frame = self
                .decompressor
                .decompress(&self.pack[start..end], FRAME_BLOCKS * BLOCK_SIZE as usize)
                .map_err(|e| format!("does not decompress: {e}"))?;
            self.cached = Some((offset, frame));
        }
        let frame = &self.cached.as_ref().expect("just filled").1;
        let start = slot as usize * BLOCK_SIZE as usize;
        if start >= frame.len() {
            return Err(format!("slot {slot} lies outside its frame"));
        }
        Ok(&frame[start..(start + BLOCK_SIZE as usize).min(frame.len())])
    }
}
