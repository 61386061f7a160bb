//! The `zenith` format: content-addressed, page-deduplicated, compressed and checksummed.
//!
//! Layout under the storage root:
//! - `packs/<sha256>`: zstd frames of up to 8 blocks of 8 KiB each, concatenated (about
//!   8 MiB a pack);
//! - `index/<sha256>.idx`: the pack's index, block hash → frame offset, length and slot,
//!   with its own checksum;
//! - `lists/<sha256>`: one file's block hashes in order (zstd), named by the SHA-256 of
//!   the uncompressed list; identical files share one list, and a file unchanged since the
//!   previous snapshot reuses its list without being read again;
//! - `snapshots/<id>.json`: the manifest, naming each file's list.
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
use crate::util::direct::{self, AlignedBuf};

/// Seal a pack once its compressed content reaches this size.
const PACK_TARGET: usize = 8 << 20;
/// New blocks compressed together into one zstd frame: neighbouring pages share structure,
/// so frames of several pages compress far better than single pages.
const FRAME_BLOCKS: usize = 8;
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
/// Largest pack zenith writes is PACK_TARGET plus one frame; anything much larger is
/// refused before it is read into memory.
pub(crate) const MAX_PACK_BYTES: u64 = 2 * PACK_TARGET as u64;
/// An index lists a pack's blocks, 46 bytes each; even 8 MiB of the smallest zstd frames
/// stays under this.
pub(crate) const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Packs and lists uploaded or downloaded at once.
pub(crate) const TRANSFER_CONCURRENCY: usize = 4;
const INDEX_MAGIC: &[u8; 8] = b"ZNIDX002";
const INDEX_ENTRY: usize = 32 + 8 + 4 + 2;

pub(crate) type Hash = [u8; 32];

/// Sets and maps keyed by block digests, of which a snapshot has hundreds of thousands:
/// foldhash (seeded per process, so a hostile snapshot's chosen digests cannot be made to
/// collide) hashes them several times faster than the standard SipHash.
pub(crate) type BlockSet = HashSet<Hash, foldhash::fast::RandomState>;
pub(crate) type BlockMap<V> = HashMap<Hash, V, foldhash::fast::RandomState>;

/// Where a block lives: a frame of a pack, and its position in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    pack: usize,
    offset: u64,
    len: u32,
    slot: u16,
}

/// One index entry: a block's hash, its frame's offset and length in the pack, its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexEntry {
    hash: Hash,
    offset: u64,
    len: u32,
    slot: u16,
}

/// Every block the destination holds, from its pack indexes.
#[derive(Debug, Default)]
struct BlockIndex {
    packs: Vec<String>,
    blocks: BlockMap<Location>,
}

fn encode_index(entries: &[IndexEntry]) -> Vec<u8> {
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
struct PackInfo {
    id: String,
    entries: Vec<IndexEntry>,
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

/// Largest block list object read: a 1 GiB file's list is 4 MiB.
pub(crate) const MAX_LIST_BYTES: u64 = 64 << 20;

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

async fn load_index(storage: &dyn Storage) -> Result<BlockIndex> {
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
fn encode_patch(base_name: &str, base: &[u8], list: &[u8]) -> Option<Vec<u8>> {
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
async fn load_list_named(
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
async fn load_lists(storage: &dyn Storage, manifest: &Manifest) -> Result<Vec<Arc<Vec<Hash>>>> {
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

/// Options for taking a snapshot.
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    pub name: Option<String>,
    /// The zenith pg being snapshotted, recorded in the manifest.
    pub pg: Option<String>,
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
    /// Files unchanged since the previous snapshot, reused without being read.
    pub files_reused: u64,
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
    let mut survey = datadir::survey(dir).await?;
    if format == Format::Zenith && lsns.is_none() && survey.control.state == datadir::SHUT_DOWN {
        survey.entries = datadir::without_stale_wal(survey.entries, &survey.control);
    }
    options
        .progress
        .set_total(survey.entries.iter().map(|e| e.size).sum());
    let origin = manifest::Origin {
        format,
        name: options.name.clone(),
        parent: options.parent.clone(),
        pg: options.pg.clone(),
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
    let (dbname, password) = split_password(connstr);
    let mut cmd = tokio::process::Command::new(install.bin("pg_basebackup"));
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    let out = cmd
        .arg("--dbname")
        .arg(dbname)
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
        let last = crate::compute::node::last_line(&out.stderr);
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
pub(crate) fn backup_lsns(data: &Path) -> Result<(String, String)> {
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

/// A libpq URI or key=value string without its password, and the password: programs get
/// it through `PGPASSWORD`, never on a command line other users can read.
pub fn split_password(connstr: &str) -> (String, Option<String>) {
    if let Some((scheme, rest)) = connstr.split_once("://") {
        let (mut rest, mut password) = (rest.to_string(), None);
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, pw)) = userinfo.split_once(':') {
                password = Some(percent_decode(pw));
                rest = format!("{user}@{host}");
            }
        }
        if let Some((base, query)) = rest.split_once('?') {
            let mut kept = Vec::new();
            for pair in query.split('&') {
                match pair.strip_prefix("password=") {
                    Some(pw) => password = Some(percent_decode(pw)),
                    None => kept.push(pair),
                }
            }
            rest = if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            };
        }
        return (format!("{scheme}://{rest}"), password);
    }
    let mut password = None;
    let kept: Vec<&str> = connstr
        .split_whitespace()
        .filter(|kv| match kv.strip_prefix("password=") {
            Some(pw) if !pw.starts_with('\'') => {
                password = Some(pw.to_string());
                false
            }
            _ => true,
        })
        .collect();
    (kept.join(" "), password)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// Snapshots the stopped data directory `dir` (or an online copy of one, with its WAL
/// range).
pub async fn pack_dir(
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
) -> Result<PackReport> {
    let (origin, mut entries) = survey_for(dir, Format::Zenith, options, lsns.clone()).await?;
    // A clean cluster keeps one WAL segment (see survey_for); its stale tail is zeroed in a
    // copy.
    let work = tempdir_for_label()?;
    if lsns.is_none() && origin.control.state == datadir::SHUT_DOWN {
        if let Err(e) = datadir::zero_after_checkpoint(&mut entries, &origin.control, &work) {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    }
    let lock = match take_export_lock(&storage).await {
        Ok(lock) => lock,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    let result = async {
        let run = PackRun::prepare(
            Arc::clone(&storage),
            origin.control.system_identifier,
            options,
        )
        .await?;
        let (entries, run) = run.pack(entries, false).await?;
        run.finish(origin, entries).await
    }
    .await;
    options.progress.finish();
    lock.release().await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Snapshots a running server without stopping it. When the server's data directory is on
/// this machine, files are read in place between `pg_backup_start` and `pg_backup_stop`
/// (see [`super::online`]); otherwise stock `pg_basebackup` copies the server to a staging
/// directory first.
pub async fn pack_online(
    install: &crate::compute::PgInstall,
    connstr: &str,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
) -> Result<PackReport> {
    let mut session = super::online::Session::open(install, connstr).await?;
    let info = session.server_info().await?;
    let local = super::online::local_data_directory(&info).map(Path::to_path_buf);
    let why_not = match local {
        None => Some("its data directory is not readable here".to_string()),
        Some(_) => session.backup_start().await.err().map(|e| e.to_string()),
    };
    let (Some(dir), None) = (local, &why_not) else {
        session.close().await;
        tracing::info!(
            "reading the server in place is not possible ({}): copying it with pg_basebackup",
            why_not.unwrap_or_default()
        );
        let copy = online_copy(install, connstr).await?;
        return pack_dir(&copy.data, storage, options, Some(copy.lsns.clone())).await;
    };
    // The backup is running from here on; ending the session (also by an error) aborts it.
    let lock = take_export_lock(&storage).await?;
    let result = async {
        let started = std::time::Instant::now();
        let run = PackRun::prepare(Arc::clone(&storage), info.system_identifier, options).await?;
        tracing::debug!("destination surveyed in {:?}", started.elapsed());
        let pg_version = datadir::read_pg_version(&dir)?;
        let control = datadir::read_control(&dir)?;
        let walk_dir = dir.clone();
        let walked = tokio::task::spawn_blocking(move || datadir::walk_live(&walk_dir))
            .await
            .map_err(join_error)??;
        let unlogged = super::online::unlogged_relations(&walked);
        let walked: Vec<DirEntry> = walked
            .into_iter()
            .filter(|e| !super::online::excluded(&e.rel, &unlogged))
            .collect();
        let walked_size: u64 = walked.iter().map(|e| e.size).sum();
        options.progress.set_total(walked_size);
        let (mut entries, run) = run.pack(walked, true).await?;
        tracing::debug!("data files packed after {:?}", started.elapsed());
        let end = session.backup_stop(&info).await?;
        session.close().await;
        tracing::debug!(
            "backup stopped after {:?}: {} WAL segments",
            started.elapsed(),
            end.segments.len()
        );
        // The WAL from start to stop, and the label that tells recovery where to begin.
        let work = tempdir_for_label()?;
        let packed = match wal_tail(&dir, &end, info.wal_segment_size, &work) {
            Ok(tail) => {
                let tail_size: u64 = tail.iter().map(|e| e.size).sum();
                options.progress.set_total(walked_size + tail_size);
                run.pack(tail, false).await
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_dir_all(&work);
        let (more, run) = packed?;
        entries.extend(more);
        let origin = manifest::Origin {
            format: Format::Zenith,
            name: options.name.clone(),
            parent: options.parent.clone(),
            pg: options.pg.clone(),
            pg_version,
            control,
            lsns: Some((end.start_lsn, end.stop_lsn)),
        };
        let report = run.finish(origin, entries).await;
        tracing::debug!("snapshot stored after {:?}", started.elapsed());
        report
    }
    .await;
    options.progress.finish();
    lock.release().await;
    result
}

/// PostgreSQL's WAL page size.
const WAL_PAGE: u64 = 8192;

/// The files an online snapshot adds after `pg_backup_stop`: `backup_label`, and the WAL
/// segments from start to stop. The first and last segments are copied into `work` with
/// what recovery never reads zeroed (the pages before the start position, everything after
/// the stop position): it is stale WAL that would only cost space.
fn wal_tail(
    dir: &Path,
    end: &super::online::BackupEnd,
    segment_size: u64,
    work: &Path,
) -> Result<Vec<DirEntry>> {
    let label_path = work.join("backup_label");
    std::fs::write(&label_path, &end.label)
        .map_err(|e| SnapshotError::io(&label_path, "write", e))?;
    let mut tail = vec![DirEntry::file("backup_label", &label_path, 0o600)?];
    let start = super::online::parse_lsn(&end.start_lsn);
    let stop = super::online::parse_lsn(&end.stop_lsn);
    for (i, segment) in end.segments.iter().enumerate() {
        let mut abs = dir.join("pg_wal").join(segment);
        let (first, last) = (i == 0, i + 1 == end.segments.len());
        if let (true, Some(start), Some(stop)) = (first || last, start, stop) {
            let mut bytes = std::fs::read(&abs).map_err(|e| SnapshotError::io(&abs, "read", e))?;
            if last {
                let keep = (stop % segment_size) as usize;
                if keep > 0 && keep < bytes.len() {
                    bytes[keep..].fill(0);
                }
            }
            if first {
                // Pages before the one holding the start position are never read; the
                // segment's first page stays (recovery checks its header).
                let page = ((start % segment_size) / WAL_PAGE) as usize * WAL_PAGE as usize;
                if page > WAL_PAGE as usize && page <= bytes.len() {
                    bytes[WAL_PAGE as usize..page].fill(0);
                }
            }
            let copy = work.join(segment);
            std::fs::write(&copy, &bytes).map_err(|e| SnapshotError::io(&copy, "write", e))?;
            abs = copy;
        }
        tail.push(DirEntry::file(&format!("pg_wal/{segment}"), &abs, 0o600)?);
    }
    Ok(tail)
}

/// A private directory for files an export writes itself (`backup_label`, WAL copies).
fn tempdir_for_label() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("zenith-label-{:016x}", fastrand::u64(..)));
    std::fs::create_dir(&dir).map_err(|e| SnapshotError::io(&dir, "create", e))?;
    Ok(dir)
}

/// Takes the export lock. The lock tells a concurrent `snapshot delete` not to collect
/// packs this run relies on; a collection already under way makes this export wait for
/// another day.
pub(crate) async fn take_export_lock(storage: &Arc<dyn Storage>) -> Result<HeldLock> {
    HeldLock::take_unless(storage, "export", "locks/gc-")
        .await?
        .map_err(|gc| SnapshotError::Refused {
            reason: format!(
                "a `zenith snapshot delete` is collecting unused data in {} right now ({gc}); run the export again when it has finished",
                storage.url()
            ),
        })
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
pub(crate) struct HeldLock {
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

    /// Takes a `kind` lock unless a live lock under `other` exists: then the lock is
    /// released again and the other one's description returned.
    async fn take_unless(
        storage: &Arc<dyn Storage>,
        kind: &str,
        other: &str,
    ) -> Result<std::result::Result<HeldLock, String>> {
        let lock = HeldLock::take(Arc::clone(storage), kind).await?;
        match live_locks(storage.as_ref(), other).await {
            Ok(found) => match found.into_iter().next() {
                Some(holder) => {
                    lock.release().await;
                    Ok(Err(holder))
                }
                None => Ok(Ok(lock)),
            },
            Err(e) => {
                lock.release().await;
                Err(e)
            }
        }
    }

    pub(crate) async fn release(self) {
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

/// One export in progress: what the destination already holds, the previous snapshot of
/// the same cluster (whose unchanged files are reused), and the packer.
struct PackRun {
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
    progress: crate::util::progress::ProgressHandle,
    blocks_total: AtomicU64,
    files_reused: AtomicU64,
}

impl PackRun {
    async fn prepare(
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
            progress: options.progress.clone(),
            blocks_total: AtomicU64::new(0),
            files_reused: AtomicU64::new(0),
        })
    }

    /// Packs `items` on every core (on a blocking thread); with `live`, files that vanish
    /// meanwhile (a running server dropped them) are left out.
    async fn pack(self, items: Vec<DirEntry>, live: bool) -> Result<(Vec<Entry>, PackRun)> {
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
    async fn finish(self, mut origin: manifest::Origin, entries: Vec<Entry>) -> Result<PackReport> {
        let PackRun {
            storage,
            packer,
            previous_id,
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
        let manifest = Manifest::new(origin, entries, stats.bytes);
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

pub(crate) fn manifest_key(id: &str) -> String {
    format!("snapshots/{id}.json")
}

struct PackerStats {
    bytes: u64,
    blocks: u64,
    packs: u64,
    /// Ids of the packs this packer wrote.
    ids: Vec<String>,
}

/// Collects compressed frames into packs and uploads each sealed pack, then its index, with
/// at most TRANSFER_CONCURRENCY uploads in flight (the caller blocks while all are busy).
struct Packer {
    runtime: tokio::runtime::Handle,
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

    /// Adds one zstd frame holding `hashes.len()` blocks, in slot order.
    fn add_frame(&self, hashes: &[Hash], compressed: Vec<u8>) -> Result<()> {
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
    fn put_object(&self, key: String, data: Vec<u8>) -> Result<()> {
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

    fn finish(self) -> Result<PackerStats> {
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
    restore_blocks(storage, manifest, None, None, progress).await
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

/// Makes the restored tree durable before it is renamed into place: one `syncfs` of the
/// filesystem holding it (as PostgreSQL's `recovery_init_sync_method = syncfs` does), which
/// costs one device flush instead of one per file; where `syncfs` fails, each file is synced.
pub(crate) fn sync_tree(manifest: &Manifest, root: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let dir = File::open(root).map_err(|e| SnapshotError::io(root, "sync", e))?;
    // SAFETY: syncfs takes a valid open descriptor and touches no memory.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        return Ok(());
    }
    for entry in manifest.entries.iter().rev() {
        let path = root.join(&entry.path);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| SnapshotError::io(&path, "sync", e))?;
    }
    dir.sync_all()
        .map_err(|e| SnapshotError::io(root, "sync", e))
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

/// Decompresses frames of one pack, keeping the last one (blocks of a frame are usually
/// used one after another).
struct FrameReader<'a> {
    pack: &'a [u8],
    decompressor: zstd::bulk::Decompressor<'static>,
    cached: Option<(u64, Vec<u8>)>,
}

impl<'a> FrameReader<'a> {
    fn new(pack: &'a [u8]) -> Result<Self> {
        Ok(FrameReader {
            pack,
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| SnapshotError::io("zstd", "initialize", e))?,
            cached: None,
        })
    }

    /// The block at `slot` of the frame at `offset`/`len`, or a description of the damage.
    fn block(&mut self, offset: u64, len: u32, slot: u16) -> std::result::Result<&[u8], String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_leave_connection_strings_for_the_environment() {
        assert_eq!(
            split_password("postgres://u:s%40cret@h:5432/db?sslmode=disable"),
            (
                "postgres://u@h:5432/db?sslmode=disable".into(),
                Some("s@cret".into())
            )
        );
        assert_eq!(
            split_password("postgresql://u@h/db?password=pw&application_name=x"),
            (
                "postgresql://u@h/db?application_name=x".into(),
                Some("pw".into())
            )
        );
        assert_eq!(
            split_password("host=h password=pw user=u"),
            ("host=h user=u".into(), Some("pw".into()))
        );
        assert_eq!(
            split_password("host=/tmp port=5"),
            ("host=/tmp port=5".into(), None)
        );
    }

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
