//! The snapshot manifest: one versioned JSON model for every format. It is written last, so
//! a snapshot exists exactly when its manifest does, and it is untrusted input when read
//! back: [`Manifest::parse`] refuses unknown format versions, unsafe paths and inconsistent
//! block lists before anything is written to disk.

use serde::{Deserialize, Serialize};

use super::error::{Result, SnapshotError};
use super::paths::check_relative_path;

/// The manifest format this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 2;

/// Bytes per block of the `zenith` format: one PostgreSQL page.
pub const BLOCK_SIZE: u64 = 8192;

/// Largest manifest accepted (a hostile one could otherwise ask for unbounded memory).
pub const MAX_MANIFEST_BYTES: usize = 512 << 20;

/// A snapshot format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Pgdata,
    Basebackup,
    Zenith,
}

impl Format {
    pub fn parse(text: &str) -> std::result::Result<Format, String> {
        match text {
            "pgdata" => Ok(Format::Pgdata),
            "basebackup" => Ok(Format::Basebackup),
            "zenith" => Ok(Format::Zenith),
            other => Err(format!(
                "unknown snapshot format {other:?}; use pgdata, basebackup or zenith"
            )),
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Pgdata => "pgdata",
            Format::Basebackup => "basebackup",
            Format::Zenith => "zenith",
        }
    }
}

/// What a manifest entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
}

/// One file or directory of the data directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative, `/`-separated, checked by [`check_relative_path`].
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Permission bits (e.g. 0o600).
    pub mode: u32,
    #[serde(default)]
    pub size: u64,
    /// SHA-256 of the whole file, hex (`pgdata` and `basebackup` formats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `zenith` format, non-empty files: the file's checksum, which is the SHA-256 of its
    /// block list, the object `lists/<list>` holding the SHA-256 of each 8 KiB block in
    /// order (the last block may be short). Identical files share one list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// `zenith` format: the file's identity and change time when it was read (device,
    /// inode, size, ctime, mtime), so the next snapshot of the same directory can reuse the
    /// list of a file that has not changed since without reading it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<String>,
}

/// An immutable, consistent image of one PostgreSQL cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The zenith pg it was taken of, when zenith-local took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<String>,
    /// The WAL history the pg wrote when it was taken: the archive's WAL that continues
    /// this snapshot (point-in-time restore, crash restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_history: Option<String>,
    pub format: Format,
    /// Major version from `PG_VERSION`, e.g. "15".
    pub pg_version: String,
    /// From `global/pg_control`.
    pub system_identifier: u64,
    pub timeline: u32,
    /// WAL positions (`X/Y`): for a stopped directory both are its last checkpoint.
    pub start_lsn: String,
    pub stop_lsn: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub entries: Vec<Entry>,
    /// Sum of file sizes.
    pub total_size: u64,
    /// Bytes this snapshot added to its storage (compressed, deduplicated).
    pub stored_size: u64,
    /// A repo's thin clone: the files are kept as a clone (shared extents) in the repo
    /// beside its store, and the entries carry no block lists. It is packed into the
    /// zenith format (lists, packs) only when it leaves the repo.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clone: bool,
}

/// What listings, the REST API and `snapshot show` say of a snapshot: the manifest without
/// its file list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub id: String,
    pub name: Option<String>,
    pub pg: Option<String>,
    pub format: Format,
    pub created_at: String,
    pub pg_version: String,
    /// A string: JSON numbers lose precision past 2^53.
    pub system_identifier: String,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    pub files: u64,
    pub total_size: u64,
    pub stored_size: u64,
    /// A repo's thin clone, and its space: what it shares with other snapshots and pgs,
    /// and what it alone holds (what deleting it frees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneSpace>,
}

/// The disk space of a thin clone (a snapshot or a pg on a filesystem that shares extents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSpace {
    /// Bytes whose extents other files share too.
    pub shared: u64,
    /// Bytes only this one holds.
    pub owned: u64,
}

impl SnapshotSummary {
    /// `ID (NAME)`, for messages.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("{} ({n})", self.id),
            None => self.id.clone(),
        }
    }
}

/// Who a snapshot is and where it came from, as the packer knows it before the files.
#[derive(Debug, Clone)]
pub struct Origin {
    pub format: Format,
    pub name: Option<String>,
    pub parent: Option<String>,
    pub pg: Option<String>,
    pub wal_history: Option<String>,
    pub pg_version: String,
    pub control: super::datadir::ControlInfo,
    /// Start and stop LSN of an online copy; a stopped directory uses its checkpoint.
    pub lsns: Option<(String, String)>,
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry {
            path: path.to_string(),
            kind: EntryKind::Dir,
            mode,
            size: 0,
            sha256: None,
            list: None,
            stamp: None,
        }
    }

    /// Number of 8 KiB blocks in the file's `zenith` block list.
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(BLOCK_SIZE)
    }
}

impl Manifest {
    /// A new manifest (fresh id, creation time now) for `entries`.
    pub fn new(origin: Origin, entries: Vec<Entry>, stored_size: u64) -> Manifest {
        let checkpoint = crate::compute::wal::format_lsn(origin.control.checkpoint_lsn);
        let (start_lsn, stop_lsn) = origin
            .lsns
            .unwrap_or_else(|| (checkpoint.clone(), checkpoint));
        Manifest {
            format_version: FORMAT_VERSION,
            id: new_id(),
            name: origin.name,
            parent: origin.parent,
            pg: origin.pg,
            wal_history: origin.wal_history,
            format: origin.format,
            pg_version: origin.pg_version,
            system_identifier: origin.control.system_identifier,
            timeline: origin.control.timeline,
            start_lsn,
            stop_lsn,
            created_at: now_rfc3339(),
            total_size: entries.iter().map(|e| e.size).sum(),
            entries,
            stored_size,
            clone: false,
        }
    }

    /// Parses and validates an untrusted manifest.
    pub fn parse(bytes: &[u8], source: &str) -> Result<Manifest> {
        let corrupt = |what: String| SnapshotError::Corrupt {
            object: source.to_string(),
            what,
        };
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(corrupt(format!(
                "the manifest is {} bytes, more than any real one",
                bytes.len()
            )));
        }
        let probe: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| corrupt(format!("the manifest is not valid JSON: {e}")))?;
        match probe.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v as u32 == FORMAT_VERSION => {}
            Some(v) => {
                return Err(SnapshotError::Refused {
                    reason: format!(
                        "{source}: manifest format version {v} is not supported by this zenith (reads version {FORMAT_VERSION}); upgrade zenith"
                    ),
                })
            }
            None => return Err(corrupt("the manifest has no format_version".to_string())),
        }
        let manifest: Manifest = serde_json::from_value(probe)
            .map_err(|e| corrupt(format!("the manifest does not match the format: {e}")))?;
        manifest.validate().map_err(corrupt)?;
        Ok(manifest)
    }

    /// Internal consistency: safe unique paths, parents before children, sizes that match
    /// the block lists, well-formed hashes.
    fn validate(&self) -> std::result::Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!("the snapshot id {:?} is malformed", self.id));
        }
        let mut seen = std::collections::HashSet::new();
        let mut total = 0u64;
        for entry in &self.entries {
            check_relative_path(&entry.path)
                .map_err(|why| format!("entry {:?}: {why}", entry.path))?;
            if !seen.insert(entry.path.as_str()) {
                return Err(format!("entry {:?} appears twice", entry.path));
            }
            if let Some((parent, _)) = entry.path.rsplit_once('/') {
                if !seen.contains(parent) {
                    return Err(format!("entry {:?} comes before its directory", entry.path));
                }
            }
            for sha in [&entry.sha256, &entry.list].into_iter().flatten() {
                if !is_sha256_hex(sha) {
                    return Err(format!("entry {:?} has a malformed checksum", entry.path));
                }
            }
            match entry.kind {
                EntryKind::Dir => {
                    if entry.size != 0 || entry.list.is_some() {
                        return Err(format!("directory {:?} has content", entry.path));
                    }
                }
                EntryKind::File => {
                    total = total.checked_add(entry.size).ok_or("sizes overflow")?;
                    let wants_list = self.format == Format::Zenith && entry.size > 0 && !self.clone;
                    if entry.list.is_some() != wants_list {
                        return Err(format!(
                            "file {:?} of {} bytes {} a block list",
                            entry.path,
                            entry.size,
                            if wants_list { "lacks" } else { "has" }
                        ));
                    }
                }
            }
        }
        if total != self.total_size {
            return Err(format!(
                "total_size {} does not match the files' {total}",
                self.total_size
            ));
        }
        Ok(())
    }

    /// What listings show of a snapshot (everything but the file list).
    pub fn summary(&self) -> SnapshotSummary {
        SnapshotSummary {
            id: self.id.clone(),
            name: self.name.clone(),
            pg: self.pg.clone(),
            format: self.format,
            created_at: self.created_at.clone(),
            pg_version: self.pg_version.clone(),
            system_identifier: self.system_identifier.to_string(),
            timeline: self.timeline,
            start_lsn: self.start_lsn.clone(),
            stop_lsn: self.stop_lsn.clone(),
            files: self
                .entries
                .iter()
                .filter(|e| e.kind == EntryKind::File)
                .count() as u64,
            total_size: self.total_size,
            stored_size: self.stored_size,
            clone: None,
        }
    }

    /// Refuses to read this snapshot's data from `storage`'s packs when it is a thin clone,
    /// which has none (the repo packs it first when it leaves).
    pub fn refuse_clone(&self, storage: &str) -> Result<()> {
        if self.clone {
            return Err(SnapshotError::Refused {
                reason: format!(
                    "snapshot {} in {storage} is a thin clone kept in its repo, not packed into the zenith format; push or export it from that repo",
                    self.id
                ),
            });
        }
        Ok(())
    }

    /// When the manifest was made, milliseconds since the epoch (its id begins with them):
    /// after the snapshot was consistent.
    pub fn created_millis(&self) -> Option<u64> {
        u64::from_str_radix(self.id.get(..12)?, 16).ok()
    }

    /// The manifest as pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        out.push(b'\n');
        out
    }
}

/// A new snapshot id: milliseconds since the epoch then random bits, hex, so ids sort by
/// creation time and an id prefix is a natural short reference.
pub fn new_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{millis:012x}{:08x}", fastrand::u32(..))
}

/// Ids are 20 lowercase hex digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The current time as RFC 3339 UTC, without a date crate.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = crate::util::time::civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// A time as PostgreSQL's backup manifests write it: `2026-11-21 15:38:28 GMT`.
pub fn manifest_time(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = crate::util::time::civil(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} GMT")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            id: new_id(),
            name: Some("main@t1".into()),
            pg: Some("main".into()),
            wal_history: None,
            parent: None,
            format: Format::Zenith,
            pg_version: "15".into(),
            system_identifier: 7,
            timeline: 1,
            start_lsn: "0/1000028".into(),
            stop_lsn: "0/1000028".into(),
            created_at: now_rfc3339(),
            entries: vec![
                Entry {
                    path: "base".into(),
                    kind: EntryKind::Dir,
                    mode: 0o700,
                    size: 0,
                    sha256: None,
                    list: None,
                    stamp: None,
                },
                Entry {
                    path: "base/1".into(),
                    kind: EntryKind::File,
                    mode: 0o600,
                    size: 8193,
                    sha256: None,
                    list: Some("b".repeat(64)),
                    stamp: Some("1:2:8193:3.4:3.4".into()),
                },
            ],
            total_size: 8193,
            stored_size: 100,
            clone: false,
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_json(), "t").unwrap(), m);
    }

    #[test]
    fn a_clone_has_no_block_lists_and_is_refused_where_packs_are_read() {
        let mut m = sample();
        m.clone = true;
        m.entries[1].list = None;
        let parsed = Manifest::parse(&m.to_json(), "t").unwrap();
        assert!(parsed.clone);
        let err = parsed.refuse_clone("file:///r").unwrap_err().to_string();
        assert!(err.contains("thin clone"), "{err}");
        // A clone that claims lists is inconsistent.
        m.entries[1].list = Some("b".repeat(64));
        assert!(Manifest::parse(&m.to_json(), "t").is_err());
        assert!(sample().refuse_clone("file:///r").is_ok());
    }

    #[test]
    fn refuses_hostile_or_inconsistent_manifests() {
        let cases: Vec<(Box<dyn Fn(&mut Manifest)>, &str)> = vec![
            (
                Box::new(|m| m.entries[1].path = "../etc/passwd".into()),
                "'..'",
            ),
            (
                Box::new(|m| m.entries[1].path = "/etc/passwd".into()),
                "absolute",
            ),
            (Box::new(|m| m.entries[1].list = None), "lacks a block list"),
            (
                Box::new(|m| m.entries[1].list = Some("zz".into())),
                "malformed checksum",
            ),
            (Box::new(|m| m.total_size = 1), "total_size"),
            (Box::new(|m| m.entries.swap(0, 1)), "before its directory"),
            (Box::new(|m| m.id = "x".into()), "id"),
        ];
        for (mutate, needle) in cases {
            let mut m = sample();
            mutate(&mut m);
            let e = Manifest::parse(&m.to_json(), "snap")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut v: serde_json::Value = serde_json::from_slice(&sample().to_json()).unwrap();
        v["format_version"] = 99.into();
        let e = Manifest::parse(v.to_string().as_bytes(), "snap")
            .unwrap_err()
            .to_string();
        assert!(e.contains("upgrade zenith"), "{e}");
        assert!(Manifest::parse(b"{not json", "snap")
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn ids_sort_by_time_and_dates_format() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        assert!(valid_id(&a) && valid_id(&b) && a < b);
        assert_eq!(manifest_time(1_795_793_908), "2026-11-27 15:38:28 GMT");
        let now = now_rfc3339();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'));
    }
}
