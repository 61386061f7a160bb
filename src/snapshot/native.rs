//! The `zenith` format: content-addressed, page-deduplicated, compressed and checksummed.
//!
//! Layout under the storage root:
//! - `packs/<sha256>`: zstd frames, one per 8 KiB block, concatenated (about 8 MiB each);
//! - `index/<sha256>.idx`: the pack's index, block hash → offset and length, with its own
//!   checksum;
//! - `snapshots/<id>.json`: the manifest, listing each file's block hashes.
//!
//! Write order makes a snapshot atomic: a pack, then its index, and the manifest only after
//! every pack and index is stored. A snapshot is visible exactly when its manifest exists;
//! a run killed midway leaves packs that the next run reuses (their index says what they
//! hold), never a half snapshot. A later snapshot stores only blocks the destination lacks.
//!
//! Reading is defensive: every block is decompressed with a hard 8 KiB limit (no
//! decompression bombs), checked against its SHA-256, and written only inside a temporary
//! directory that is renamed into place when everything checked out.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::datadir::{self, DirEntry};
use super::error::{join_error, Result, SnapshotError};
use super::manifest::{self, Entry, EntryKind, Format, Manifest, BLOCK_SIZE};
use crate::storage::Storage;

/// Seal a pack once its compressed content reaches this size.
const PACK_TARGET: usize = 8 << 20;
/// Largest pack zenith writes is PACK_TARGET plus one compressed block; anything much larger
/// is refused before it is read into memory.
const MAX_PACK_BYTES: u64 = 2 * PACK_TARGET as u64;
/// An index lists a pack's blocks, 44 bytes each; even 8 MiB of the smallest zstd frames
/// (about 9 bytes each) stays under this.
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Packs uploaded or downloaded at once.
const TRANSFER_CONCURRENCY: usize = 4;
const INDEX_MAGIC: &[u8; 8] = b"ZNIDX001";
const INDEX_ENTRY: usize = 32 + 8 + 4;

type Hash = [u8; 32];

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    pack: usize,
    offset: u64,
    len: u32,
}

/// Every block the destination holds, from its pack indexes.
#[derive(Debug, Default)]
struct BlockIndex {
    packs: Vec<String>,
    blocks: HashMap<Hash, Location>,
}

fn encode_index(entries: &[(Hash, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * INDEX_ENTRY + 32);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (hash, offset, len) in entries {
        out.extend_from_slice(hash);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    out
}

fn decode_index(bytes: &[u8], source: &str) -> Result<Vec<(Hash, u64, u32)>> {
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
        .map(|c| {
            let hash: Hash = c[..32].try_into().expect("32 bytes");
            let offset = u64::from_le_bytes(c[32..40].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(c[40..44].try_into().expect("4 bytes"));
            (hash, offset, len)
        })
        .collect())
}

/// One pack as its index describes it.
struct PackInfo {
    id: String,
    entries: Vec<(Hash, u64, u32)>,
}

async fn load_packs(storage: &dyn Storage) -> Result<Vec<PackInfo>> {
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

async fn load_index(storage: &dyn Storage) -> Result<BlockIndex> {
    let mut index = BlockIndex::default();
    for pack in load_packs(storage).await? {
        let number = index.packs.len();
        for (hash, offset, len) in pack.entries {
            index.blocks.entry(hash).or_insert(Location {
                pack: number,
                offset,
                len,
            });
        }
        index.packs.push(pack.id);
    }
    Ok(index)
}

/// Options for taking a snapshot.
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    pub name: Option<String>,
    pub parent: Option<String>,
    /// Receives the bytes read from the data directory.
    pub progress: crate::util::progress::ProgressHandle,
}

/// What packing did.
#[derive(Debug, Clone)]
pub struct PackReport {
    pub manifest: Manifest,
    pub blocks_total: u64,
    pub blocks_new: u64,
    pub packs_written: u64,
}

/// The start of every export, whatever the format: read the data directory's version,
/// control file and file list, announce the total to the progress bar, and describe the
/// snapshot-to-be.
pub(crate) async fn survey_for(
    dir: &Path,
    format: Format,
    options: &PackOptions,
    lsns: Option<(String, String)>,
) -> Result<(manifest::Origin, Vec<DirEntry>)> {
    let survey = datadir::survey(dir).await?;
    options
        .progress
        .set_total(survey.entries.iter().map(|e| e.size).sum());
    let origin = manifest::Origin {
        format,
        name: options.name.clone(),
        parent: options.parent.clone(),
        pg_version: survey.pg_version,
        control: survey.control,
        lsns,
    };
    Ok((origin, survey.entries))
}

/// A consistent copy of a running server in a staging directory, removed when dropped.
pub struct OnlineCopy {
    staging: PathBuf,
    /// The copied data directory (with the WAL needed to make it consistent).
    pub data: PathBuf,
    /// Start and stop LSN of the copy.
    pub lsns: (String, String),
}

impl Drop for OnlineCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}

/// Copies a running server with stock `pg_basebackup` (plain format, WAL streamed) into a
/// staging directory under `ZENITH_STAGING_DIR`, else the system's temporary directory.
pub async fn online_copy(install: &crate::compute::PgInstall, connstr: &str) -> Result<OnlineCopy> {
    let base = std::env::var_os("ZENITH_STAGING_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let staging = base.join(format!("zenith-staging-{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&staging).map_err(|e| SnapshotError::io(&staging, "create", e))?;
    let mut copy = OnlineCopy {
        data: staging.join("data"),
        staging,
        lsns: (String::new(), String::new()),
    };
    let out = tokio::process::Command::new(install.bin("pg_basebackup"))
        .arg("--dbname")
        .arg(connstr)
        .arg("--pgdata")
        .arg(&copy.data)
        .args([
            "--format=plain",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--no-sync",
            "--no-password",
        ])
        .env("PGAPPNAME", "zenith")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| SnapshotError::io(install.bin("pg_basebackup"), "run", e))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim();
        return Err(SnapshotError::Refused {
            reason: format!(
                "the online snapshot of {} failed: {last}; check the connection string, and that the server accepts replication connections (pg_hba.conf, max_wal_senders)",
                redact_password(connstr)
            ),
        });
    }
    copy.lsns = backup_lsns(&copy.data)?;
    Ok(copy)
}

/// Start and stop LSN of a base backup, from its `backup_manifest` (WAL-Ranges).
fn backup_lsns(data: &Path) -> Result<(String, String)> {
    let path = data.join("backup_manifest");
    let text = std::fs::read_to_string(&path).map_err(|e| SnapshotError::io(&path, "read", e))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| SnapshotError::Corrupt {
            object: path.display().to_string(),
            what: e.to_string(),
        })?;
    let range = &manifest["WAL-Ranges"][0];
    match (range["Start-LSN"].as_str(), range["End-LSN"].as_str()) {
        (Some(start), Some(end)) => Ok((start.to_string(), end.to_string())),
        _ => Err(SnapshotError::Corrupt {
            object: path.display().to_string(),
            what: "no WAL-Ranges".into(),
        }),
    }
}

/// A libpq URI or key=value string with its password replaced, for messages.
pub fn redact_password(connstr: &str) -> String {
    if let Some((scheme, rest)) = connstr.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return connstr.to_string();
    }
    connstr
        .split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Snapshots the data directory `dir` (stopped, or an online copy with its WAL range).
pub async fn pack_dir(
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
) -> Result<PackReport> {
    let (origin, entries) = survey_for(dir, Format::Zenith, options, lsns).await?;
    // The lock tells a concurrent `snapshot delete` not to collect packs this run relies on;
    // a collection already under way makes this export wait for another day.
    let lock = HeldLock::take(Arc::clone(&storage), "export").await?;
    if let Some(gc) = live_locks(storage.as_ref(), "locks/gc-").await?.first() {
        lock.release().await;
        return Err(SnapshotError::Refused {
            reason: format!(
                "a `zenith snapshot delete` is collecting unused data in {} right now ({gc}); run the export again when it has finished",
                storage.url()
            ),
        });
    }
    let result = pack_dir_locked(
        Arc::clone(&storage),
        origin,
        entries,
        options.progress.clone(),
    )
    .await;
    options.progress.finish();
    lock.release().await;
    result
}

/// How often a held lock is rewritten, and after how long without a rewrite it counts as
/// abandoned (its process killed).
const LOCK_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);
const LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(600);

/// A lock object (`locks/<kind>-<random>.lock`), rewritten in the background while held.
///
/// Exports and garbage collection exclude each other: each writes its lock first and then
/// looks for the other's. Whichever looks second sees the first and backs off, so a
/// collection never removes a block an export decided not to upload because it was there.
struct HeldLock {
    storage: Arc<dyn Storage>,
    key: String,
    refresher: tokio::task::JoinHandle<()>,
}

impl HeldLock {
    async fn take(storage: Arc<dyn Storage>, kind: &str) -> Result<HeldLock> {
        let key = format!("locks/{kind}-{:016x}.lock", fastrand::u64(..));
        storage
            .put(&key, Bytes::from(manifest::now_rfc3339()))
            .await?;
        let (s, k) = (Arc::clone(&storage), key.clone());
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_REFRESH).await;
                if let Err(e) = s.put(&k, Bytes::from(manifest::now_rfc3339())).await {
                    tracing::warn!("could not refresh the lock {k}: {e}");
                }
            }
        });
        Ok(HeldLock {
            storage,
            key,
            refresher,
        })
    }

    async fn release(self) {
        self.refresher.abort();
        if let Err(e) = self.storage.delete(&self.key).await {
            tracing::warn!("could not remove the lock {}: {e}", self.key);
        }
    }
}

/// Locks under `prefix` refreshed recently enough to belong to a live process, described.
async fn live_locks(storage: &dyn Storage, prefix: &str) -> Result<Vec<String>> {
    Ok(storage
        .list(prefix)
        .await?
        .into_iter()
        .filter(|l| !older_than(l.last_modified, LOCK_STALE))
        .map(|l| {
            let age = l
                .last_modified
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            format!("{}, refreshed {age}s ago", l.key)
        })
        .collect())
}

async fn pack_dir_locked(
    storage: Arc<dyn Storage>,
    origin: manifest::Origin,
    walked: Vec<DirEntry>,
    progress: crate::util::progress::ProgressHandle,
) -> Result<PackReport> {
    let index = load_index(storage.as_ref()).await?;
    let known: HashSet<Hash> = index.blocks.keys().copied().collect();

    let runtime = tokio::runtime::Handle::current();
    let storage_for_packer = Arc::clone(&storage);
    let (entries, stats) = tokio::task::spawn_blocking(move || {
        let packer = Packer::new(runtime, storage_for_packer);
        let entries = hash_and_pack(&walked, known, &packer, &*progress)?;
        let stats = packer.finish()?;
        Ok::<_, SnapshotError>((entries, stats))
    })
    .await
    .map_err(join_error)??;

    let blocks_total = entries.iter().map(|e| e.blocks.len() as u64).sum();
    let manifest = Manifest::new(origin, entries, stats.bytes);
    // Last: the manifest makes the snapshot visible.
    storage
        .put(&manifest_key(&manifest.id), Bytes::from(manifest.to_json()))
        .await?;
    Ok(PackReport {
        blocks_total,
        blocks_new: stats.blocks,
        packs_written: stats.packs,
        manifest,
    })
}

pub(crate) fn manifest_key(id: &str) -> String {
    format!("snapshots/{id}.json")
}

/// Reads, hashes and compresses files on every core; new blocks go to the packer.
fn hash_and_pack(
    walked: &[DirEntry],
    known: HashSet<Hash>,
    packer: &Packer,
    progress: &dyn crate::util::progress::Progress,
) -> Result<Vec<Entry>> {
    let claimed = Mutex::new(known);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Entry>>> = Mutex::new(vec![None; walked.len()]);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let failure: Mutex<Option<SnapshotError>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                // One compression context per worker: creating one per block costs more
                // than compressing the block.
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
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= walked.len() || failure.lock().expect("lock").is_some() {
                        return;
                    }
                    match hash_one(&walked[i], &claimed, packer, &mut compressor, progress) {
                        Ok(entry) => results.lock().expect("lock")[i] = Some(entry),
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
    Ok(results
        .into_inner()
        .expect("lock")
        .into_iter()
        .map(|e| e.expect("every entry processed"))
        .collect())
}

fn hash_one(
    item: &DirEntry,
    claimed: &Mutex<HashSet<Hash>>,
    packer: &Packer,
    compressor: &mut zstd::bulk::Compressor<'_>,
    progress: &dyn crate::util::progress::Progress,
) -> Result<Entry> {
    if item.is_dir {
        return Ok(Entry::dir(&item.rel, item.mode));
    }
    let file = File::open(&item.abs).map_err(|e| SnapshotError::io(&item.abs, "open", e))?;
    let mut whole = Sha256::new();
    let mut blocks = Vec::new();
    let mut buf = vec![0u8; 128 * BLOCK_SIZE as usize];
    let mut offset = 0u64;
    loop {
        let n = read_full_at(&file, &mut buf, offset)
            .map_err(|e| SnapshotError::io(&item.abs, "read", e))?;
        if n == 0 {
            break;
        }
        whole.update(&buf[..n]);
        progress.add(n as u64);
        for block in buf[..n].chunks(BLOCK_SIZE as usize) {
            let hash: Hash = Sha256::digest(block).into();
            blocks.push(hex::encode(hash));
            if claimed.lock().expect("lock").insert(hash) {
                let compressed = compressor
                    .compress(block)
                    .map_err(|e| SnapshotError::io(&item.abs, "compress", e))?;
                packer.add(hash, compressed)?;
            }
        }
        offset += n as u64;
    }
    // The size is what was read: a file that grew or shrank since the walk is taken as read.
    Ok(Entry {
        path: item.rel.clone(),
        kind: EntryKind::File,
        mode: item.mode,
        size: offset,
        sha256: Some(hex::encode(whole.finalize())),
        blocks,
    })
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

struct PackerStats {
    bytes: u64,
    blocks: u64,
    packs: u64,
    /// Ids of the packs this packer wrote.
    ids: Vec<String>,
}

/// Collects compressed blocks into packs and uploads each sealed pack, then its index, with
/// at most TRANSFER_CONCURRENCY uploads in flight (the caller blocks while all are busy).
struct Packer {
    runtime: tokio::runtime::Handle,
    storage: Arc<dyn Storage>,
    current: Mutex<(Vec<u8>, Vec<(Hash, u64, u32)>)>,
    permits: Arc<tokio::sync::Semaphore>,
    uploads: Mutex<Vec<tokio::task::JoinHandle<Result<()>>>>,
    bytes: AtomicU64,
    blocks: AtomicU64,
    packs: AtomicU64,
    ids: Mutex<Vec<String>>,
}

impl Packer {
    fn new(runtime: tokio::runtime::Handle, storage: Arc<dyn Storage>) -> Self {
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

    fn add(&self, hash: Hash, compressed: Vec<u8>) -> Result<()> {
        let sealed = {
            let mut current = self.current.lock().expect("lock");
            let offset = current.0.len() as u64;
            current.0.extend_from_slice(&compressed);
            current.1.push((hash, offset, compressed.len() as u32));
            if current.0.len() >= PACK_TARGET {
                Some(std::mem::replace(
                    &mut *current,
                    (Vec::with_capacity(PACK_TARGET + (64 << 10)), Vec::new()),
                ))
            } else {
                None
            }
        };
        self.blocks.fetch_add(1, Ordering::Relaxed);
        if let Some((data, entries)) = sealed {
            self.upload(data, entries)?;
        }
        Ok(())
    }

    fn upload(&self, data: Vec<u8>, entries: Vec<(Hash, u64, u32)>) -> Result<()> {
        // Fail early if an earlier upload failed, rather than packing the whole directory.
        self.reap(false)?;
        let permit = self
            .runtime
            .block_on(Arc::clone(&self.permits).acquire_owned())
            .expect("semaphore never closed");
        let pack_id = hex::encode(Sha256::digest(&data));
        self.ids.lock().expect("lock").push(pack_id.clone());
        let index = encode_index(&entries);
        self.bytes
            .fetch_add((data.len() + index.len()) as u64, Ordering::Relaxed);
        self.packs.fetch_add(1, Ordering::Relaxed);
        let storage = Arc::clone(&self.storage);
        let handle = self.runtime.spawn(async move {
            let _permit = permit;
            storage
                .put(&format!("packs/{pack_id}"), Bytes::from(data))
                .await?;
            storage
                .put(&format!("index/{pack_id}.idx"), Bytes::from(index))
                .await?;
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

    fn finish(self) -> Result<PackerStats> {
        let (data, entries) = std::mem::take(&mut *self.current.lock().expect("lock"));
        if !entries.is_empty() {
            self.upload(data, entries)?;
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

fn older_than(modified: Option<std::time::SystemTime>, grace: std::time::Duration) -> bool {
    match modified {
        Some(t) => t.elapsed().map(|age| age >= grace).unwrap_or(false),
        // A store that reports no time: only collect with a zero grace period.
        None => grace.is_zero(),
    }
}

/// Removes or rewrites packs that hold blocks no snapshot uses (see [`delete`]).
pub async fn collect_garbage(
    storage: Arc<dyn Storage>,
    grace: std::time::Duration,
    max_unused: f64,
) -> Result<GcReport> {
    let lock = HeldLock::take(Arc::clone(&storage), "gc").await?;
    let exports = match live_locks(storage.as_ref(), "locks/export-").await {
        Ok(exports) => exports,
        Err(e) => {
            lock.release().await;
            return Err(e);
        }
    };
    if let Some(export) = exports.first() {
        lock.release().await;
        let report = GcReport {
            skipped: Some(format!(
                "an export is running ({export}); a later delete collects the unused data"
            )),
            ..GcReport::default()
        };
        return Ok(report);
    }
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
    let manifests = list(storage.as_ref()).await?;
    let live: HashSet<Hash> = manifests
        .iter()
        .flat_map(|m| m.entries.iter().flat_map(|e| e.blocks.iter()))
        .filter_map(|h| {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(h, &mut hash).ok().map(|()| hash)
        })
        .collect();
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
    let mut kept: HashSet<Hash> = HashSet::new();
    let mut candidates = Vec::new();
    let mut total_bytes = 0u64;
    let mut unused_bytes = 0u64;
    for pack in packs.drain(..) {
        let size: u64 = pack.entries.iter().map(|e| e.2 as u64).sum();
        total_bytes += size;
        let used: Vec<(Hash, u64, u32)> = pack
            .entries
            .iter()
            .copied()
            .filter(|e| live.contains(&e.0) && kept.insert(e.0))
            .collect();
        let used_bytes: u64 = used.iter().map(|e| e.2 as u64).sum();
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
            to_repack.push((pack.id, used));
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
            for (pack_id, used) in &jobs {
                let key = format!("packs/{pack_id}");
                let data = runtime.block_on(storage.get_bytes_limited(&key, MAX_PACK_BYTES))?;
                for (hash, offset, len) in used {
                    let (start, end) = (*offset as usize, *offset as usize + *len as usize);
                    let source = format!("{url}/{key}");
                    let bytes = data.get(start..end).ok_or_else(|| SnapshotError::Corrupt {
                        object: source.clone(),
                        what: "a block lies outside the pack (truncated?)".into(),
                    })?;
                    let block =
                        zstd::bulk::decompress(bytes, BLOCK_SIZE as usize).map_err(|e| {
                            SnapshotError::Corrupt {
                                object: source.clone(),
                                what: format!("a block does not decompress: {e}"),
                            }
                        })?;
                    if Sha256::digest(&block)[..] != hash[..] {
                        return Err(SnapshotError::Corrupt {
                            object: source,
                            what: "a block fails its SHA-256 check".into(),
                        });
                    }
                    packer.add(*hash, bytes.to_vec())?;
                }
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
        .chain(to_repack.iter().map(|(id, _)| id.clone()))
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
    report.packs_deleted = (to_delete
        .iter()
        .filter(|id| !rewritten.contains(*id))
        .count()
        + orphans.len()) as u64;
    report.bytes_freed = freed.saturating_sub(written);
    report.bytes_unused_left = remaining_unused;
    Ok(report)
}

/// Refuses a listed object larger than `limit` without reading it.
fn refuse_listed_size(
    storage: &dyn Storage,
    object: &crate::storage::ObjectMeta,
    limit: u64,
) -> Result<()> {
    if object.size > limit {
        return Err(crate::storage::Error::TooLarge {
            url: format!("{}/{}", storage.url(), object.key),
            size: object.size,
            limit,
        }
        .into());
    }
    Ok(())
}

/// Every snapshot manifest in `storage`, oldest first.
pub async fn list(storage: &dyn Storage) -> Result<Vec<Manifest>> {
    let objects = storage.list("snapshots/").await?;
    let mut out = Vec::new();
    for object in objects.into_iter().filter(|o| o.key.ends_with(".json")) {
        refuse_listed_size(storage, &object, manifest::MAX_MANIFEST_BYTES as u64)?;
        let bytes = storage
            .get_bytes_limited(&object.key, manifest::MAX_MANIFEST_BYTES as u64)
            .await?;
        let source = format!("{}/{}", storage.url(), object.key);
        let manifest = Manifest::parse(&bytes, &source)?;
        if manifest.format != Format::Zenith {
            return Err(SnapshotError::Corrupt {
                object: source,
                what: format!(
                    "a {} manifest among zenith-format snapshots",
                    manifest.format.as_str()
                ),
            });
        }
        out.push(manifest);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Finds one snapshot by `LATEST`, name, or id prefix.
pub async fn resolve(storage: &dyn Storage, reference: &str) -> Result<Manifest> {
    let all = list(storage).await?;
    let url = storage.url();
    let not_found = || SnapshotError::NotFound {
        reference: reference.to_string(),
        url: url.clone(),
    };
    if reference == "LATEST" {
        return all.into_iter().next_back().ok_or_else(not_found);
    }
    if let Some(found) = all
        .iter()
        .rev()
        .find(|m| m.name.as_deref() == Some(reference))
    {
        return Ok(found.clone());
    }
    let matches: Vec<&Manifest> = all.iter().filter(|m| m.id.starts_with(reference)).collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(not_found()),
        many => Err(SnapshotError::Ambiguous {
            reference: reference.to_string(),
            url,
            matches: many
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// What verify or unpack checked.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub blocks_checked: u64,
    pub bytes_restored: u64,
    pub packs_read: u64,
}

/// Writes `manifest`'s data directory to the new directory `target` (which must not exist,
/// or be empty), checking every block. Nothing appears at `target` unless all checks pass.
pub async fn unpack(
    storage: &dyn Storage,
    manifest: &Manifest,
    target: &Path,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    progress.set_total(manifest.total_size);
    into_new_dir(target, |temp| async move {
        prepare_tree(manifest, &temp)?;
        let report = restore_blocks(storage, manifest, Some(&temp), progress).await?;
        sync_tree(manifest, &temp)?;
        Ok(report)
    })
    .await
}

/// Fills a temporary sibling of `target` with `fill` and renames it into place only when
/// `fill` succeeded: a failure never leaves something that looks like a data directory.
/// `target` must not exist, or be an empty directory.
pub(crate) async fn into_new_dir<T, F, Fut>(target: &Path, fill: F) -> Result<T>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    if target.exists()
        && std::fs::read_dir(target)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(SnapshotError::Refused {
            reason: format!(
                "{} already exists and is not empty; choose a new directory",
                target.display()
            ),
        });
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| SnapshotError::io(parent, "create", e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "pgdata".into());
    let temp = parent.join(format!(".{name}.zenith-tmp-{:016x}", fastrand::u64(..)));
    match fill(temp.clone()).await {
        Ok(value) => {
            if target.exists() {
                std::fs::remove_dir(target).map_err(|e| SnapshotError::io(target, "replace", e))?;
            }
            std::fs::rename(&temp, target).map_err(|e| SnapshotError::io(target, "create", e))?;
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| SnapshotError::io(parent, "sync", e))?;
            Ok(value)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&temp);
            Err(e)
        }
    }
}

/// Re-reads every pack a snapshot needs and checks every block against its hash.
pub async fn verify(
    storage: &dyn Storage,
    manifest: &Manifest,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    restore_blocks(storage, manifest, None, progress).await
}

pub(crate) fn prepare_tree(manifest: &Manifest, root: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(root)
        .map_err(|e| SnapshotError::io(root, "create", e))?;
    for entry in &manifest.entries {
        let path = root.join(&entry.path);
        let mode = entry.mode & 0o777;
        match entry.kind {
            EntryKind::Dir => std::fs::DirBuilder::new()
                .mode(mode | 0o700)
                .create(&path)
                .map_err(|e| SnapshotError::io(&path, "create", e))?,
            EntryKind::File => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode | 0o600)
                    .open(&path)
                    .map_err(|e| SnapshotError::io(&path, "create", e))?;
                file.set_len(entry.size)
                    .map_err(|e| SnapshotError::io(&path, "size", e))?;
            }
        }
    }
    Ok(())
}

pub(crate) fn sync_tree(manifest: &Manifest, root: &Path) -> Result<()> {
    for entry in manifest.entries.iter().rev() {
        let path = root.join(&entry.path);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| SnapshotError::io(&path, "sync", e))?;
    }
    File::open(root)
        .and_then(|f| f.sync_all())
        .map_err(|e| SnapshotError::io(root, "sync", e))
}

/// Fetches every pack holding a block of `manifest`, checks each needed block, and (with a
/// root) writes it at every position that uses it.
async fn restore_blocks(
    storage: &dyn Storage,
    manifest: &Manifest,
    root: Option<&Path>,
    progress: &crate::util::progress::ProgressHandle,
) -> Result<CheckReport> {
    let index = load_index(storage).await?;
    let snapshot = format!("snapshot {} in {}", manifest.id, storage.url());
    // block → every (entry, block number) that uses it, grouped by pack.
    let mut by_pack: HashMap<usize, HashMap<Hash, Vec<(usize, u64)>>> = HashMap::new();
    for (i, entry) in manifest.entries.iter().enumerate() {
        for (n, hex_hash) in entry.blocks.iter().enumerate() {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex_hash, &mut hash).map_err(|_| SnapshotError::Corrupt {
                object: snapshot.clone(),
                what: format!("{} lists a malformed block hash", entry.path),
            })?;
            let Some(location) = index.blocks.get(&hash) else {
                return Err(SnapshotError::Corrupt {
                    object: snapshot.clone(),
                    what: format!("{} needs block {hex_hash}, which no pack in the storage holds (a missing pack?)", entry.path),
                });
            };
            by_pack
                .entry(location.pack)
                .or_default()
                .entry(hash)
                .or_default()
                .push((i, n as u64));
        }
    }
    let report = Mutex::new(CheckReport::default());
    let index = &index;
    let report_ref = &report;
    let snapshot_ref = &snapshot;
    // Paths and sizes only: the blocking workers need no copy of the block lists.
    let files: Arc<Vec<(String, u64)>> = Arc::new(
        manifest
            .entries
            .iter()
            .map(|e| (e.path.clone(), e.size))
            .collect(),
    );
    let files_ref = &files;
    let results: Vec<Result<()>> = futures::stream::iter(by_pack)
        .map(|(pack, blocks)| async move {
            let key = format!("packs/{}", index.packs[pack]);
            let data = storage.get_bytes_limited(&key, MAX_PACK_BYTES).await?;
            let source = format!("{}/{key}", storage.url());
            let files = Arc::clone(files_ref);
            let root = root.map(Path::to_path_buf);
            let snapshot = snapshot_ref.clone();
            let locations: Vec<(Hash, Location, Vec<(usize, u64)>)> = blocks
                .into_iter()
                .map(|(h, uses)| (h, index.blocks[&h], uses))
                .collect();
            let (checked, written) = tokio::task::spawn_blocking(move || {
                check_and_write(
                    &data,
                    &source,
                    &snapshot,
                    &files,
                    root.as_deref(),
                    &locations,
                )
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
    Ok(report.into_inner().expect("lock"))
}

fn check_and_write(
    pack: &[u8],
    source: &str,
    snapshot: &str,
    files: &[(String, u64)],
    root: Option<&Path>,
    locations: &[(Hash, Location, Vec<(usize, u64)>)],
) -> Result<(u64, u64)> {
    let corrupt = |what: String| SnapshotError::Corrupt {
        object: format!("{source} (used by {snapshot})"),
        what,
    };
    let mut open: HashMap<usize, File> = HashMap::new();
    let (mut checked, mut written) = (0u64, 0u64);
    let mut decompressor =
        zstd::bulk::Decompressor::new().map_err(|e| SnapshotError::io("zstd", "initialize", e))?;
    for (hash, location, uses) in locations {
        let start = location.offset as usize;
        let end = start
            .checked_add(location.len as usize)
            .filter(|&e| e <= pack.len())
            .ok_or_else(|| {
                corrupt(format!(
                    "block {} lies outside the {}-byte pack (truncated?)",
                    hex::encode(hash),
                    pack.len()
                ))
            })?;
        let first_user = &files[uses[0].0].0;
        let block = decompressor
            .decompress(&pack[start..end], BLOCK_SIZE as usize)
            .map_err(|e| corrupt(format!("a block of {first_user} does not decompress: {e}")))?;
        if Sha256::digest(&block)[..] != hash[..] {
            return Err(corrupt(format!(
                "a block of {first_user} fails its SHA-256 check"
            )));
        }
        checked += 1;
        let Some(root) = root else { continue };
        for &(entry_index, number) in uses {
            let (path, size) = &files[entry_index];
            let offset = number * BLOCK_SIZE;
            let expected = (size - offset).min(BLOCK_SIZE) as usize;
            if block.len() != expected {
                return Err(corrupt(format!(
                    "block {number} of {path} has {} bytes, expected {expected}",
                    block.len()
                )));
            }
            let file = match open.entry(entry_index) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let full: PathBuf = root.join(path);
                    v.insert(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&full)
                            .map_err(|e| SnapshotError::io(&full, "open", e))?,
                    )
                }
            };
            file.write_all_at(&block, offset)
                .map_err(|e| SnapshotError::io(root.join(path), "write", e))?;
            written += block.len() as u64;
        }
    }
    Ok((checked, written))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_password("postgres://u:s3cret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_password("postgresql://u@h/db"),
            "postgresql://u@h/db"
        );
        assert_eq!(
            redact_password("host=h password=s3cret user=u"),
            "host=h password=*** user=u"
        );
    }

    #[test]
    fn index_round_trips_and_detects_damage() {
        let entries = vec![([1u8; 32], 0u64, 10u32), ([2u8; 32], 10, 20)];
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
