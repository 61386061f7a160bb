//! Writing a snapshot: every file of a data directory is read in ranges on every core,
//! each 8 KiB block hashed, blocks the destination lacks compressed into frames and
//! packed, each file's block list stored (or the previous snapshot's reused, unread, for a
//! file unchanged since), and the manifest written last.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::catalog::{list, manifest_key};
use super::index::load_block_hashes;
use super::lists::{encode_patch, list_key, load_list_named, patch_key};
use super::lock::with_export_lock;
use super::packer::{Packer, FRAME_BLOCKS};
use super::{BlockSet, Hash};
use crate::snapshot::datadir::{self, DirEntry};
use crate::snapshot::error::{join_error, Result, SnapshotError};
use crate::snapshot::manifest::{self, Entry, EntryKind, Format, Manifest, BLOCK_SIZE};
use crate::snapshot::survey::{survey_for, PackOptions};
use crate::storage::Storage;
use crate::util::direct::{self, AlignedBuf};
use crate::util::tempdir::TempDir;

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 1 << 20;

/// Files are read in ranges of this size, in parallel (a multiple of READ_CHUNK).
const RANGE: u64 = 64 << 20;

/// Part of a file to read.
struct Range {
    item: usize,
    start: u64,
    /// `u64::MAX`: to the end of the file.
    len: u64,
}

/// What reading a range found.
#[derive(Debug, Clone, Default)]
struct RangeRead {
    /// Block hashes, in order.
    list: Vec<u8>,
    bytes: u64,
    /// The file was gone (a running server removed it).
    vanished: bool,
}

/// What packing did.
#[derive(Debug, Clone)]
pub struct PackReport {
    pub manifest: Manifest,
    pub blocks_total: u64,
    pub blocks_new: u64,
    pub packs_written: u64,
    /// Files unchanged since the previous snapshot, reused without being read.
    pub files_reused: u64,
}

/// Snapshots the stopped data directory `dir` (or an online copy of one, with its WAL
/// range).
pub async fn pack_dir(
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
) -> Result<PackReport> {
    let (origin, mut entries) = survey_for(dir, Format::Zenith, options, lsns.clone()).await?;
    if let Some(stamps) = &options.stamps {
        for e in &mut entries {
            e.stamp = stamps.get(&e.rel).cloned();
        }
    }
    // A clean cluster keeps one WAL segment (see survey_for); its stale tail is zeroed in a
    // copy.
    let work = TempDir::new("zenith-label")
        .map_err(|e| SnapshotError::io(std::env::temp_dir(), "create", e))?;
    if lsns.is_none() && origin.control.state == datadir::SHUT_DOWN {
        datadir::zero_after_checkpoint(&mut entries, &origin.control, work.path())?;
    }
    let result = with_export_lock(&storage, async {
        let run = PackRun::prepare(
            Arc::clone(&storage),
            origin.control.system_identifier,
            options,
        )
        .await?;
        let (entries, run) = run.pack(entries, false).await?;
        run.finish(origin, entries).await
    })
    .await;
    options.progress.finish();
    result
}

/// One export in progress: what the destination already holds, the previous snapshot of
/// the same cluster (whose unchanged files are reused), and the packer. It runs under the
/// destination's export lock ([`with_export_lock`]).
pub struct PackRun {
    storage: Arc<dyn Storage>,
    packer: Packer,
    /// Blocks stored, or claimed by this run.
    claimed: Mutex<BlockSet>,
    /// Lists stored, or uploaded by this run.
    lists: Mutex<HashSet<String>>,
    /// Every file of the previous snapshot whose list is stored, by path: an unchanged
    /// file (same stamp) reuses its entry, a changed file's new list is stored as a patch
    /// of the old one when few blocks changed.
    previous_lists: HashMap<String, Entry>,
    previous_id: Option<String>,
    identity: Option<(String, String)>,
    progress: crate::util::progress::ProgressHandle,
    blocks_total: AtomicU64,
    files_reused: AtomicU64,
}

impl PackRun {
    pub async fn prepare(
        storage: Arc<dyn Storage>,
        system_identifier: u64,
        options: &PackOptions,
    ) -> Result<PackRun> {
        let claimed = load_block_hashes(storage.as_ref()).await?;
        let lists: HashSet<String> = storage
            .list("lists/")
            .await?
            .into_iter()
            .map(|o| {
                let file = o.key.trim_start_matches("lists/");
                file.strip_suffix(".patch").unwrap_or(file).to_string()
            })
            .collect();
        let previous = list(storage.as_ref())
            .await?
            .into_iter()
            .rev()
            .find(|m| m.system_identifier == system_identifier);
        let previous_id = previous.as_ref().map(|m| m.id.clone());
        let previous_lists: HashMap<String, Entry> = previous
            .map(|m| {
                m.entries
                    .into_iter()
                    .filter(|e| e.list.as_ref().is_some_and(|l| lists.contains(l)))
                    .map(|e| (e.path.clone(), e))
                    .collect()
            })
            .unwrap_or_default();
        let runtime = tokio::runtime::Handle::current();
        Ok(PackRun {
            packer: Packer::new(runtime, Arc::clone(&storage)),
            storage,
            claimed: Mutex::new(claimed),
            lists: Mutex::new(lists),
            previous_lists,
            previous_id,
            identity: options.identity.clone(),
            progress: options.progress.clone(),
            blocks_total: AtomicU64::new(0),
            files_reused: AtomicU64::new(0),
        })
    }

    /// Packs `items` on every core (on a blocking thread); with `live`, files that vanish
    /// meanwhile (a running server dropped them) are left out.
    pub async fn pack(self, items: Vec<DirEntry>, live: bool) -> Result<(Vec<Entry>, PackRun)> {
        tokio::task::spawn_blocking(move || {
            let entries = self.pack_all(&items, live)?;
            Ok((entries, self))
        })
        .await
        .map_err(join_error)?
    }

    fn pack_all(&self, items: &[DirEntry], live: bool) -> Result<Vec<Entry>> {
        // Directories and unchanged files are described at once; the rest is read in
        // ranges of at most RANGE bytes, so a large file keeps every core busy.
        let mut done: Vec<Option<Entry>> = vec![None; items.len()];
        let mut work: Vec<Range> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if item.is_dir {
                done[i] = Some(Entry::dir(&item.rel, item.mode));
            } else if let Some(entry) = self.reuse(item) {
                done[i] = Some(entry);
            } else {
                let ranges = item.size.div_ceil(RANGE).max(1);
                for r in 0..ranges {
                    work.push(Range {
                        item: i,
                        start: r * RANGE,
                        // The last range reads to the end, wherever it is by then.
                        len: if r + 1 == ranges { u64::MAX } else { RANGE },
                    });
                }
            }
        }
        let next = AtomicUsize::new(0);
        let results: Mutex<Vec<Option<RangeRead>>> = Mutex::new(vec![None; work.len()]);
        // Two workers a core: while one waits for a (direct, uncached) read, the other
        // hashes and compresses.
        let workers = 3 * std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let failure: Mutex<Option<SnapshotError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    // One compression context and read buffer per worker.
                    let mut compressor = match zstd::bulk::Compressor::new(1) {
                        Ok(c) => c,
                        Err(e) => {
                            failure
                                .lock()
                                .expect("lock")
                                .get_or_insert(SnapshotError::io("zstd", "initialize", e));
                            return;
                        }
                    };
                    let mut buf = AlignedBuf::new(READ_CHUNK);
                    loop {
                        let w = next.fetch_add(1, Ordering::Relaxed);
                        if w >= work.len() || failure.lock().expect("lock").is_some() {
                            return;
                        }
                        let range = &work[w];
                        match self.read_range(
                            &items[range.item],
                            range,
                            live,
                            &mut compressor,
                            &mut buf,
                        ) {
                            Ok(read) => results.lock().expect("lock")[w] = Some(read),
                            Err(e) => {
                                failure.lock().expect("lock").get_or_insert(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().expect("lock") {
            return Err(e);
        }
        // Each file's ranges, in order, make its block list.
        let reads = results.into_inner().expect("lock");
        let mut compressor = zstd::bulk::Compressor::new(1)
            .map_err(|e| SnapshotError::io("zstd", "initialize", e))?;
        let mut w = 0;
        while w < work.len() {
            let i = work[w].item;
            let item = &items[i];
            let mut list = Vec::new();
            let mut size = 0u64;
            let mut vanished = false;
            let mut ended = false;
            while w < work.len() && work[w].item == i {
                let read = reads[w].as_ref().expect("every range read");
                w += 1;
                if ended {
                    continue;
                }
                vanished |= read.vanished;
                list.extend_from_slice(&read.list);
                size += read.bytes;
                // A range that ended early is the end of the file (it shrank meanwhile).
                ended = read.bytes < work[w - 1].len;
            }
            if vanished {
                continue;
            }
            self.blocks_total
                .fetch_add(size.div_ceil(BLOCK_SIZE), Ordering::Relaxed);
            let name = (size > 0).then(|| hex::encode(Sha256::digest(&list)));
            if let Some(name) = &name {
                if self.lists.lock().expect("lock").insert(name.clone()) {
                    match self.patch_from_previous(&item.rel, &list) {
                        Some(patch) => self.packer.put_object(patch_key(name), patch)?,
                        None => {
                            let compressed = compressor
                                .compress(&list)
                                .map_err(|e| SnapshotError::io(&item.abs, "compress", e))?;
                            self.packer.put_object(list_key(name), compressed)?;
                        }
                    }
                }
            }
            // The size is what was read: a file that grew or shrank since the walk is taken
            // as read, and then carries no stamp (it is read again next time).
            done[i] = Some(Entry {
                path: item.rel.clone(),
                kind: EntryKind::File,
                mode: item.mode,
                size,
                sha256: None,
                list: name,
                stamp: item.stamp.clone().filter(|_| size == item.size),
            });
        }
        Ok(done.into_iter().flatten().collect())
    }

    /// The new list of a file that changed since the previous snapshot, as a patch of the
    /// full list the previous one is (or is based on), when few blocks changed. Any trouble
    /// reading the previous list just means a full list is stored.
    fn patch_from_previous(&self, path: &str, list: &[u8]) -> Option<Vec<u8>> {
        let prev = self.previous_lists.get(path)?;
        let loaded = self.packer.runtime.block_on(load_list_named(
            self.storage.as_ref(),
            prev,
            "the previous snapshot",
        ));
        let (prev_list, base) = match loaded {
            Ok(found) => found,
            Err(e) => {
                tracing::debug!("{e}; storing a full list for {path}");
                return None;
            }
        };
        match base {
            Some((base_name, base)) => encode_patch(&base_name, &base, list),
            None => {
                let bytes: Vec<u8> = prev_list.iter().flatten().copied().collect();
                encode_patch(prev.list.as_deref()?, &bytes, list)
            }
        }
    }

    /// The previous snapshot's entry for a file unchanged since (same file, size and change
    /// time), if there is one.
    fn reuse(&self, item: &DirEntry) -> Option<Entry> {
        let stamp = item.stamp.as_ref()?;
        let prev = self.previous_lists.get(&item.rel)?;
        if prev.stamp.as_ref() != Some(stamp) || prev.size != item.size {
            return None;
        }
        self.progress.add(item.size);
        self.blocks_total
            .fetch_add(prev.block_count(), Ordering::Relaxed);
        self.files_reused.fetch_add(1, Ordering::Relaxed);
        Some(Entry {
            mode: item.mode,
            ..prev.clone()
        })
    }

    /// Reads one range of a file: hashes every block, compresses new ones into frames.
    fn read_range(
        &self,
        item: &DirEntry,
        range: &Range,
        live: bool,
        compressor: &mut zstd::bulk::Compressor<'_>,
        buf: &mut AlignedBuf,
    ) -> Result<RangeRead> {
        let want_direct = item.size >= READ_CHUNK as u64 && !item.rel.starts_with("pg_wal/");
        let file = match direct::CachedOrDirect::open(&item.abs, want_direct) {
            Ok(opened) => opened,
            Err(e) if live && e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RangeRead {
                    vanished: true,
                    ..RangeRead::default()
                })
            }
            Err(e) => return Err(SnapshotError::io(&item.abs, "open", e)),
        };
        let mut list: Vec<u8> =
            Vec::with_capacity(range.len.min(item.size).div_ceil(BLOCK_SIZE) as usize * 32);
        let mut raw: Vec<u8> = Vec::with_capacity(FRAME_BLOCKS * BLOCK_SIZE as usize);
        let mut done = 0u64;
        while done < range.len {
            let want = (range.len - done).min(buf.capacity() as u64) as usize;
            let n = file
                .read_full_at(&mut buf.spare()[..want], range.start + done)
                .map_err(|e| SnapshotError::io(&item.abs, "read", e))?;
            let data = &buf.spare()[..n];
            self.progress.add(n as u64);
            let mut fresh: Vec<(Hash, &[u8])> = Vec::new();
            for block in data.chunks(BLOCK_SIZE as usize) {
                let hash: Hash = Sha256::digest(block).into();
                list.extend_from_slice(&hash);
                if self.claimed.lock().expect("lock").insert(hash) {
                    fresh.push((hash, block));
                }
            }
            for frame in fresh.chunks(FRAME_BLOCKS) {
                raw.clear();
                for (_, block) in frame {
                    raw.extend_from_slice(block);
                }
                let compressed = compressor
                    .compress(&raw)
                    .map_err(|e| SnapshotError::io(&item.abs, "compress", e))?;
                let hashes: Vec<Hash> = frame.iter().map(|(h, _)| *h).collect();
                self.packer.add_frame(&hashes, compressed)?;
            }
            done += n as u64;
            if n < want {
                break;
            }
        }
        Ok(RangeRead {
            list,
            bytes: done,
            vanished: false,
        })
    }

    /// Waits for every upload, then writes the manifest: the snapshot becomes visible.
    pub async fn finish(
        self,
        mut origin: manifest::Origin,
        entries: Vec<Entry>,
    ) -> Result<PackReport> {
        let PackRun {
            storage,
            packer,
            previous_id,
            identity,
            blocks_total,
            files_reused,
            ..
        } = self;
        let stats = tokio::task::spawn_blocking(move || packer.finish())
            .await
            .map_err(join_error)??;
        if origin.parent.is_none() {
            origin.parent = previous_id;
        }
        let mut manifest = Manifest::new(origin, entries, stats.bytes);
        if let Some((id, created_at)) = identity {
            if manifest.parent.as_deref() == Some(id.as_str()) {
                manifest.parent = None;
            }
            (manifest.id, manifest.created_at) = (id, created_at);
        }
        storage
            .put(&manifest_key(&manifest.id), Bytes::from(manifest.to_json()))
            .await?;
        Ok(PackReport {
            blocks_total: blocks_total.into_inner(),
            blocks_new: stats.blocks,
            packs_written: stats.packs,
            files_reused: files_reused.into_inner(),
            manifest,
        })
    }
}
