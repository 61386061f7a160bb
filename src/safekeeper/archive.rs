//! The WAL archive: where zenith keeps PostgreSQL's WAL files on a storage, beside the
//! snapshots.
//!
//! Layout under the storage root:
//! - `wal/<system identifier>/<history>/<file>.zst`: one object per WAL file PostgreSQL
//!   archived (segments, `.partial` segments, timeline and backup history files);
//! - `wal/<system identifier>/<history>/branch.json`: where the history begins: the
//!   history it continues, and from which segment on it is its own;
//! - `wal/<system identifier>/<history>/stream/`: what the safekeeper streamed of segments
//!   not archived whole yet (see [`super::stream`]).
//!
//! A *history* is one line of WAL that never goes back in time. PostgreSQL's timelines
//! are not enough for that: a pg rolled back to a snapshot, or two pgs branched from one,
//! go on writing the same timeline's segment names with different content (pgBackRest's
//! "already exists with a different checksum" after a failover is that collision). So
//! every pg zenith runs writes into a history of its own, new whenever its data goes back
//! in time or forks: created, checked out, promoted, restored to a point in time. Its
//! `branch.json` names the parent history and the fork: segments of the fork's timeline
//! before the fork's segment, and of older timelines, are read from the parent.
//! PostgreSQL servers zenith does not run archive into the history `default`.
//!
//! An object is a zstd skippable frame carrying zenith's header (the file's SHA-256 and
//! size, when it was archived), then the file as one zstd frame, so `zstd -d` reads it as
//! it is. Every read checks the size and the checksum; a file archived twice must be the
//! same, byte for byte.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::compute::wal::WalFile;
use crate::storage::Storage;

/// The history of servers zenith does not run.
pub const DEFAULT_HISTORY: &str = "default";

/// Largest WAL file zenith archives: PostgreSQL's largest segment size.
pub const MAX_WAL_FILE: u64 = 1 << 30;

/// The skippable-frame magic zstd ignores, and zenith's own header in it.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const HEADER_MAGIC: &[u8; 8] = b"ZNWAL001";
const HEADER_LEN: usize = 8 + 32 + 8 + 8;
const PREFIX_LEN: usize = 8 + HEADER_LEN;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    /// An archived object that fails its checks.
    #[error("{object} is corrupt: {what}; the archive cannot be trusted past it")]
    Corrupt { object: String, what: String },
    /// The same file archived before with different content.
    #[error("{object} is archived already with different content (SHA-256 {theirs}, this file {ours}): this server's WAL diverged from what was archived; give it a history of its own (zenith does for its pgs) or another storage")]
    Diverged {
        object: String,
        theirs: String,
        ours: String,
    },
    /// Bad input: a file name or history zenith does not archive.
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;

impl crate::util::backoff::Retryable for ArchiveError {
    fn is_permanent(&self) -> bool {
        match self {
            ArchiveError::Storage(e) => e.is_permanent(),
            _ => true,
        }
    }
}

/// Where a history begins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    /// The history continued; `None` for a history that begins with its cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Fork>,
    /// The pg of the repo that writes it, for messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<String>,
    pub created_at: String,
    /// The WAL segment size of its cluster.
    pub segment_size: u64,
}

/// Where a history leaves its parent: segments of timeline `tli` numbered below `segno`,
/// and of older timelines, are the parent's; from `segno` on they are the child's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    pub history: String,
    pub tli: u32,
    pub segno: u64,
    /// The position the child began at, as PostgreSQL prints it.
    pub lsn: String,
}

/// What a pg zenith runs archives into or restores from: written by zenith beside the pg
/// (`wal.json`, `restore.json`), read by `zenith wal-push --target FILE` and `zenith
/// wal-fetch --target FILE`. The storage is the repo's storage_dest, read from its
/// `config.toml` at each call, so a storage_dest set or changed takes effect at once. No
/// credentials: those come from the environment PostgreSQL inherits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalTarget {
    /// The repo's `config.toml`.
    pub config: std::path::PathBuf,
    pub system_identifier: u64,
    pub history: String,
}

impl WalTarget {
    /// The target in `path`; `None` when there is none (archiving is off).
    pub fn read(path: &std::path::Path) -> std::result::Result<Option<WalTarget>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }
}

/// The clusters (system identifiers) whose WAL `storage` holds.
pub async fn clusters(storage: &dyn Storage) -> Result<Vec<u64>> {
    let mut out: Vec<u64> = storage
        .list("wal/")
        .await?
        .iter()
        .filter_map(|o| o.key.strip_prefix("wal/")?.split('/').next()?.parse().ok())
        .collect();
    out.dedup();
    Ok(out)
}

/// An archived file as its object's header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archived {
    pub sha256: [u8; 32],
    pub size: u64,
    /// Seconds since the epoch.
    pub archived_at: u64,
}

/// What pushing one file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Stored,
    /// The same file was archived already.
    AlreadyThere,
}

/// One cluster's WAL archive on a storage.
#[derive(Debug, Clone)]
pub struct Archive {
    storage: Arc<dyn Storage>,
    system_identifier: u64,
}

/// Checks a history id: what a path segment can carry safely.
pub fn check_history(history: &str) -> Result<()> {
    let ok = !history.is_empty()
        && history.len() <= 64
        && history
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && history != "branch.json";
    if !ok {
        return Err(ArchiveError::Refused(format!(
            "{history:?} is not a WAL history: use lowercase letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The object for `data`: zenith's header in a skippable frame, then the data compressed.
pub fn encode(data: &[u8]) -> Result<Vec<u8>> {
    let compressed = zstd::bulk::compress(data, 1)
        .map_err(|e| ArchiveError::Refused(format!("cannot compress: {e}")))?;
    let mut out = Vec::with_capacity(PREFIX_LEN + compressed.len());
    out.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(HEADER_MAGIC);
    out.extend_from_slice(&Sha256::digest(data));
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&now_unix().to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// The header at the start of an object; `what` describes what is wrong otherwise.
pub fn decode_header(bytes: &[u8]) -> std::result::Result<Archived, String> {
    if bytes.len() < PREFIX_LEN {
        return Err("it is too short for a zenith WAL object".into());
    }
    if u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) != SKIPPABLE_MAGIC
        || u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) != HEADER_LEN as u32
        || &bytes[8..16] != HEADER_MAGIC
    {
        return Err("it is not a zenith WAL object".into());
    }
    let h = &bytes[16..PREFIX_LEN];
    Ok(Archived {
        sha256: h[..32].try_into().expect("32 bytes"),
        size: u64::from_le_bytes(h[32..40].try_into().expect("8 bytes")),
        archived_at: u64::from_le_bytes(h[40..48].try_into().expect("8 bytes")),
    })
}

/// The file in an object, checked against its header.
pub fn decode(bytes: &[u8]) -> std::result::Result<(Archived, Vec<u8>), String> {
    let header = decode_header(bytes)?;
    if header.size > MAX_WAL_FILE {
        return Err(format!("it claims {} bytes", header.size));
    }
    let data = zstd::bulk::decompress(&bytes[PREFIX_LEN..], header.size as usize)
        .map_err(|e| format!("it does not decompress: {e}"))?;
    if data.len() as u64 != header.size {
        return Err(format!(
            "it holds {} bytes, its header says {}",
            data.len(),
            header.size
        ));
    }
    if Sha256::digest(&data)[..] != header.sha256 {
        return Err("it fails its SHA-256 check".into());
    }
    Ok((header, data))
}

impl Archive {
    pub fn new(storage: Arc<dyn Storage>, system_identifier: u64) -> Archive {
        Archive {
            storage,
            system_identifier,
        }
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub fn system_identifier(&self) -> u64 {
        self.system_identifier
    }

    /// `wal/<sysid>/<history>/`.
    fn prefix(&self, history: &str) -> String {
        format!("wal/{}/{history}/", self.system_identifier)
    }

    /// The object of file `name` of `history`.
    pub fn key(&self, history: &str, name: &str) -> String {
        format!("{}{name}.zst", self.prefix(history))
    }

    fn url_of(&self, key: &str) -> String {
        format!("{}/{key}", self.storage.url())
    }

    /// Archives `data` as file `name` of `history`. An object there already is fine when
    /// it holds the same file, and an error when it holds another.
    pub async fn push(&self, history: &str, name: &str, data: &[u8]) -> Result<Pushed> {
        check_history(history)?;
        let key = self.key(history, name);
        let ours: [u8; 32] = Sha256::digest(data).into();
        if let Some(theirs) = self.header(&key).await? {
            if theirs.sha256 == ours && theirs.size == data.len() as u64 {
                return Ok(Pushed::AlreadyThere);
            }
            return Err(ArchiveError::Diverged {
                object: self.url_of(&key),
                theirs: hex::encode(theirs.sha256),
                ours: hex::encode(ours),
            });
        }
        self.storage.put(&key, Bytes::from(encode(data)?)).await?;
        Ok(Pushed::Stored)
    }

    /// The header of the object under `key`, if there is one.
    pub async fn header(&self, key: &str) -> Result<Option<Archived>> {
        match self.storage.get_range(key, 0..PREFIX_LEN as u64).await {
            Ok(bytes) => decode_header(&bytes)
                .map(Some)
                .map_err(|what| ArchiveError::Corrupt {
                    object: self.url_of(key),
                    what,
                }),
            Err(crate::storage::Error::NotFound { .. }) => Ok(None),
            // A zero-length object has no range to read.
            Err(crate::storage::Error::InvalidRange { .. }) => Err(ArchiveError::Corrupt {
                object: self.url_of(key),
                what: "it is empty".into(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// File `name` of `history` itself (not its parents'), checked; `None` if absent.
    pub async fn get(&self, history: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let key = self.key(history, name);
        let bytes = match self
            .storage
            .get_bytes_limited(&key, MAX_WAL_FILE + PREFIX_LEN as u64 + (1 << 20))
            .await
        {
            Ok(bytes) => bytes,
            Err(crate::storage::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (_, data) = decode(&bytes).map_err(|what| ArchiveError::Corrupt {
            object: self.url_of(&key),
            what,
        })?;
        Ok(Some(data))
    }

    /// Where `history` begins, if its `branch.json` is there.
    pub async fn branch(&self, history: &str) -> Result<Option<Branch>> {
        check_history(history)?;
        let key = format!("{}branch.json", self.prefix(history));
        match self.storage.get_bytes_limited(&key, 64 << 10).await {
            Ok(bytes) => {
                let corrupt = |what: String| ArchiveError::Corrupt {
                    object: self.url_of(&key),
                    what,
                };
                let branch: Branch =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                // Names and positions are computed from it: PostgreSQL's segment sizes only.
                let size = branch.segment_size;
                if !size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&size) {
                    return Err(corrupt(format!("a segment size of {size} bytes")));
                }
                if let Some(fork) = &branch.parent {
                    check_history(&fork.history)?;
                }
                Ok(Some(branch))
            }
            Err(crate::storage::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Records where `history` begins (once: an existing record stays).
    pub async fn ensure_branch(&self, history: &str, branch: &Branch) -> Result<()> {
        if self.branch(history).await?.is_some() {
            return Ok(());
        }
        let key = format!("{}branch.json", self.prefix(history));
        let json = serde_json::to_vec_pretty(branch).expect("a branch serializes");
        self.storage.put(&key, Bytes::from(json)).await?;
        Ok(())
    }

    /// Records that pg `pg` (of the repo whose storage this is) writes `history` now:
    /// what a machine that lost the repo restores (`wal/<sysid>/pg-<pg>.json`).
    pub async fn set_current(&self, pg: &str, history: &str) -> Result<()> {
        check_history(history)?;
        let key = format!("wal/{}/pg-{pg}.json", self.system_identifier);
        let json = serde_json::json!({ "history": history }).to_string();
        self.storage.put(&key, Bytes::from(json)).await?;
        Ok(())
    }

    /// The history pg `pg` wrote last, as [`Archive::set_current`] recorded it.
    pub async fn current(&self, pg: &str) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct Current {
            history: String,
        }
        let key = format!("wal/{}/pg-{pg}.json", self.system_identifier);
        match self.storage.get_bytes_limited(&key, 4096).await {
            Ok(bytes) => {
                let c: Current =
                    serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Corrupt {
                        object: self.url_of(&key),
                        what: e.to_string(),
                    })?;
                check_history(&c.history)?;
                Ok(Some(c.history))
            }
            Err(crate::storage::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The histories of the cluster, in no particular order.
    pub async fn histories(&self) -> Result<Vec<String>> {
        let prefix = format!("wal/{}/", self.system_identifier);
        let mut out: Vec<String> = Vec::new();
        for o in self.storage.list(&prefix).await? {
            let Some((history, _)) = o.key.strip_prefix(&prefix).and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            // What zenith did not write there is not a history.
            if check_history(history).is_ok() && out.last().map(String::as_str) != Some(history) {
                out.push(history.to_string());
            }
        }
        out.dedup();
        Ok(out)
    }

    /// Every archived file of `history` itself, with its object's size and time.
    pub async fn files(
        &self,
        history: &str,
        segment_size: u64,
    ) -> Result<Vec<(WalFile, crate::storage::ObjectMeta)>> {
        let prefix = self.prefix(history);
        let mut out = Vec::new();
        for o in self.storage.list(&prefix).await? {
            let Some(name) = o.key.strip_prefix(&prefix) else {
                continue;
            };
            if let Some(file) = name
                .strip_suffix(".zst")
                .and_then(|n| WalFile::parse(n, segment_size))
            {
                out.push((file, o));
            }
        }
        out.sort_by_key(|(file, _)| *file);
        Ok(out)
    }

    /// The history that holds `file` as `history` sees it: `history` itself, or the
    /// ancestor it inherited the file from. The chain of branches, from `history` up.
    pub async fn lineage(&self, history: &str) -> Result<Vec<(String, Option<Branch>)>> {
        let mut chain = Vec::new();
        let mut current = Some(history.to_string());
        while let Some(h) = current.take() {
            if chain.iter().any(|(seen, _)| *seen == h) || chain.len() > 1000 {
                return Err(ArchiveError::Corrupt {
                    object: format!("{}{}", self.storage.url(), self.prefix(&h)),
                    what: "its branches form a loop".into(),
                });
            }
            let branch = self.branch(&h).await?;
            current = branch
                .as_ref()
                .and_then(|b| b.parent.as_ref())
                .map(|f| f.history.clone());
            chain.push((h, branch));
        }
        Ok(chain)
    }
}

/// Retention of the archive: in each history that kept snapshots were taken in, the WAL
/// files (segments, partial segments, backup files) older than the oldest of them go;
/// a restore never starts before it. Histories with no kept snapshot stay whole (their
/// pgs may run on, or their children need them). Returns how many files went.
pub async fn trim(storage: Arc<dyn Storage>, kept: &[crate::snapshot::Manifest]) -> Result<usize> {
    use crate::compute::wal::{parse_lsn, segno_of, DEFAULT_SEGMENT_SIZE};
    let mut oldest: std::collections::BTreeMap<(u64, String), (u32, u64)> = Default::default();
    for m in kept {
        let (Some(h), Some(lsn)) = (&m.wal_history, parse_lsn(&m.start_lsn)) else {
            continue;
        };
        let start = (m.timeline, segno_of(lsn, DEFAULT_SEGMENT_SIZE));
        let e = oldest
            .entry((m.system_identifier, h.clone()))
            .or_insert(start);
        *e = (*e).min(start);
    }
    let mut removed = 0;
    for ((sysid, history), (tli, segno)) in oldest {
        let archive = Archive::new(Arc::clone(&storage), sysid);
        for (file, meta) in archive.files(&history, DEFAULT_SEGMENT_SIZE).await? {
            let position = match file {
                WalFile::Segment { tli, segno }
                | WalFile::Partial { tli, segno }
                | WalFile::Backup { tli, segno, .. } => (tli, segno),
                WalFile::History { .. } => continue,
            };
            if position < (tli, segno) {
                storage.delete(&meta.key).await?;
                removed += 1;
            }
        }
        for piece in archive.pieces(&history).await? {
            let Some(WalFile::Segment { tli: t, segno: s }) =
                WalFile::parse(&piece.segment, DEFAULT_SEGMENT_SIZE)
            else {
                continue;
            };
            if (t, s) < (tli, segno) {
                storage.delete(&piece.key).await?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Whether a child whose branch begins at `fork` inherits `file` from its parent.
pub fn inherited(fork: &Fork, file: &WalFile) -> bool {
    match *file {
        WalFile::Segment { tli, segno } | WalFile::Partial { tli, segno } => {
            tli < fork.tli || (tli == fork.tli && segno < fork.segno)
        }
        WalFile::Backup { tli, segno, .. } => {
            tli < fork.tli || (tli == fork.tli && segno < fork.segno)
        }
        // The child's own timelines are newer than any it inherits.
        WalFile::History { tli } => tli <= fork.tli,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_refuse_damage() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let object = encode(&data).unwrap();
        let (header, back) = decode(&object).unwrap();
        assert_eq!(back, data);
        assert_eq!(header.size, data.len() as u64);
        // Stock zstd skips zenith's header.
        assert_eq!(zstd::stream::decode_all(object.as_slice()).unwrap(), data);
        let mut flipped = object.clone();
        let last = flipped.len() - 10;
        flipped[last] ^= 1;
        assert!(decode(&flipped).is_err());
        let mut lying = object.clone();
        lying[16 + 32] ^= 1; // the size
        assert!(decode(&lying).is_err());
        assert!(decode(b"garbage").is_err());
        assert!(decode(&object[..20]).is_err());
    }

    #[test]
    fn histories_are_safe_path_segments() {
        for ok in ["default", "0123456789abcdef", "a-b_c"] {
            check_history(ok).unwrap();
        }
        for bad in ["", "..", "a/b", "A", "branch.json", &"a".repeat(65)] {
            assert!(check_history(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_child_inherits_what_precedes_its_fork() {
        let fork = Fork {
            history: "p".into(),
            tli: 2,
            segno: 10,
            lsn: "0/A000028".into(),
        };
        let seg = |tli, segno| WalFile::Segment { tli, segno };
        assert!(inherited(&fork, &seg(2, 9)));
        assert!(inherited(&fork, &seg(1, 50)));
        assert!(!inherited(&fork, &seg(2, 10)));
        assert!(!inherited(&fork, &seg(3, 1)));
        assert!(inherited(&fork, &WalFile::History { tli: 2 }));
        assert!(!inherited(&fork, &WalFile::History { tli: 3 }));
    }
}
