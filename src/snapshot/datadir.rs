//! Reading a PostgreSQL data directory: its control file (system identifier, timeline,
//! checkpoint), its major version, whether a live server owns it, and its file list.

use std::path::{Path, PathBuf};

use super::error::{Result, SnapshotError};

/// What `global/pg_control` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlInfo {
    pub system_identifier: u64,
    /// `DBState`: 1 = shut down, 2 = shut down in recovery, 4 = in production, ...
    pub state: u32,
    pub checkpoint_lsn: u64,
    pub redo_lsn: u64,
    pub timeline: u32,
}

/// `DBState` of a cluster shut down cleanly (not in recovery).
pub const SHUT_DOWN: u32 = 1;

/// A cleanly shut down cluster needs, of its WAL, only the segment holding its last
/// checkpoint (startup reads that record and finds nothing to replay); every other segment
/// is old or preallocated and would only cost space. Timeline history files stay.
pub fn without_stale_wal(entries: Vec<DirEntry>, control: &ControlInfo) -> Vec<DirEntry> {
    let is_segment = |name: &str| name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit());
    // All segments have the cluster's segment size; without one, keep everything.
    let Some(segment_size) = entries
        .iter()
        .find(|e| e.rel.strip_prefix("pg_wal/").is_some_and(is_segment))
        .map(|e| e.size)
        .filter(|s| s.is_power_of_two() && *s >= 1 << 20)
    else {
        return entries;
    };
    let per = 0x1_0000_0000 / segment_size;
    let segno = control.checkpoint_lsn / segment_size;
    let keep = format!(
        "{:08X}{:08X}{:08X}",
        control.timeline,
        segno / per,
        segno % per
    );
    entries
        .into_iter()
        .filter(|e| match e.rel.strip_prefix("pg_wal/") {
            Some(name) if is_segment(name) => name == keep,
            _ => true,
        })
        .collect()
}

/// Copies the WAL segment holding a clean cluster's last checkpoint into `work`, with
/// what follows the checkpoint record zeroed (a page past its end, to spare a record that
/// crosses a page): in a recycled segment that is stale WAL, which startup never reads and
/// which would only cost space. The entry then reads the copy.
pub fn zero_after_checkpoint(
    entries: &mut [DirEntry],
    control: &ControlInfo,
    work: &Path,
) -> Result<()> {
    const PAGE: u64 = 8192;
    for entry in entries
        .iter_mut()
        .filter(|e| e.rel.starts_with("pg_wal/") && e.size >= 1 << 20)
    {
        let name = entry.rel.trim_start_matches("pg_wal/");
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let mut bytes =
            std::fs::read(&entry.abs).map_err(|e| SnapshotError::io(&entry.abs, "read", e))?;
        let offset = (control.checkpoint_lsn % bytes.len() as u64) as usize;
        let Some(len) = bytes
            .get(offset..offset + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        else {
            continue;
        };
        let end = offset as u64 + len as u64;
        let zero_from = ((end / PAGE) + 2) * PAGE;
        if zero_from < bytes.len() as u64 {
            bytes[zero_from as usize..].fill(0);
        }
        let copy = work.join(name);
        std::fs::write(&copy, &bytes).map_err(|e| SnapshotError::io(&copy, "write", e))?;
        entry.abs = copy;
    }
    Ok(())
}

/// Start and stop LSN of a stopped data directory that was not shut down cleanly (killed,
/// or stopped in immediate mode) and carries no backup label: from its last checkpoint's
/// redo position to where its WAL ends, which a restore replays to before it is
/// consistent; `control`'s timeline becomes that of the WAL's end (a promotion since the
/// last checkpoint moved it on). `None` for a clean shutdown. Refused when the end cannot
/// be found: recording the checkpoint instead would let a point-in-time restore start
/// from this state for a target before its consistent point.
pub fn crash_lsns(dir: &Path, control: &mut ControlInfo) -> Result<Option<(String, String)>> {
    crash_lsns_after(dir, control, None)
}

/// As [`crash_lsns`], `after` being where a record begins that the server reported
/// flushed just before it stopped (see [`crate::compute::wal_end::wal_end`]).
pub fn crash_lsns_after(
    dir: &Path,
    control: &mut ControlInfo,
    after: Option<u64>,
) -> Result<Option<(String, String)>> {
    if control.is_shut_down() || dir.join("backup_label").exists() {
        return Ok(None);
    }
    let end = crate::compute::wal_end::wal_end(&dir.join("pg_wal"), control.checkpoint_lsn, after)
        .map_err(|e| SnapshotError::Refused {
            reason: format!(
                "{} was not shut down cleanly, and where its WAL ends cannot be told ({e}); start its server once and stop it cleanly, then take the snapshot",
                dir.display()
            ),
        })?;
    control.timeline = control.timeline.max(end.timeline);
    Ok(Some((
        crate::compute::wal::format_lsn(control.redo_lsn),
        crate::compute::wal::format_lsn(end.lsn),
    )))
}

/// Whether the data directory holds an unlogged relation (one with an `_init` fork),
/// whose contents survive only a clean shutdown; also when that cannot be told.
pub fn has_unlogged_relations(dir: &Path) -> bool {
    let places = [(dir.join("base"), 2), (dir.join("pg_tblspc"), 4)];
    places.into_iter().any(|(place, depth)| {
        place.exists()
            && walkdir::WalkDir::new(&place)
                .follow_links(true)
                .max_depth(depth)
                .into_iter()
                .any(|e| match e {
                    Ok(e) => e.file_name().to_string_lossy().ends_with("_init"),
                    Err(_) => true,
                })
    })
}

impl ControlInfo {
    /// Cleanly shut down (as a primary or as a standby).
    pub fn is_shut_down(&self) -> bool {
        matches!(self.state, 1 | 2)
    }
}

/// Reads the fields zenith needs from `global/pg_control` (layout of PostgreSQL 9.6 to 17:
/// system identifier at 0, state at 16, checkpoint at 32, redo at 40, timeline at 48;
/// little-endian on the platforms zenith supports).
pub fn read_control(dir: &Path) -> Result<ControlInfo> {
    let path = dir.join("global/pg_control");
    let bytes = std::fs::read(&path).map_err(|e| SnapshotError::io(&path, "read", e))?;
    if bytes.len() < 64 {
        return Err(SnapshotError::Refused {
            reason: format!(
                "{}: too short for a PostgreSQL control file; is {} a data directory?",
                path.display(),
                dir.display()
            ),
        });
    }
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    Ok(ControlInfo {
        system_identifier: u64_at(0),
        state: u32_at(16),
        checkpoint_lsn: u64_at(32),
        redo_lsn: u64_at(40),
        timeline: u32_at(48),
    })
}

/// The major version in `PG_VERSION`.
pub fn read_pg_version(dir: &Path) -> Result<String> {
    let path = dir.join("PG_VERSION");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Refused {
            reason: format!(
                "{} is not a PostgreSQL data directory (no PG_VERSION)",
                dir.display()
            ),
        },
        _ => SnapshotError::io(&path, "read", e),
    })?;
    let version = text.trim().to_string();
    if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(SnapshotError::Refused {
            reason: format!("{}: unexpected content {text:?}", path.display()),
        });
    }
    Ok(version)
}

/// Refuses a directory that a live postmaster owns: copying it file by file would not be
/// consistent. A stale `postmaster.pid` (its process gone) is fine.
pub fn check_not_running(dir: &Path) -> Result<()> {
    let pidfile = dir.join("postmaster.pid");
    let Ok(text) = std::fs::read_to_string(&pidfile) else {
        return Ok(());
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return Ok(());
    };
    // kill(pid, 0): 0 means the process exists (EPERM also means it exists, as another user).
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    if alive {
        return Err(SnapshotError::Refused {
            reason: format!(
                "{} belongs to a running PostgreSQL (pid {pid}); stop it first, or snapshot it online with --connstr",
                dir.display()
            ),
        });
    }
    Ok(())
}

/// One directory entry to snapshot.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub rel: String,
    pub abs: PathBuf,
    pub is_dir: bool,
    pub size: u64,
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u64,
    /// Identity and change time (device, inode, size, ctime, mtime) of a file whose last
    /// change is old enough that any later write is sure to change it; `None` otherwise.
    pub stamp: Option<String>,
}

/// A file changed this recently carries no stamp: timestamps are coarse, so a write in
/// the same tick as the one observed could leave them as they were.
const STAMP_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

fn stamp(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    if !meta.is_file() || meta.ctime() + (STAMP_SETTLE.as_secs() as i64) >= now {
        return None;
    }
    Some(format!(
        "{:x}:{:x}:{}:{}.{:09}:{}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

impl DirEntry {
    /// A file outside the walk (a WAL segment or a generated file), described from disk.
    pub fn file(rel: &str, abs: &Path, mode: u32) -> Result<DirEntry> {
        let meta = std::fs::metadata(abs).map_err(|e| SnapshotError::io(abs, "read", e))?;
        Ok(DirEntry {
            rel: rel.to_string(),
            abs: abs.to_path_buf(),
            is_dir: false,
            size: meta.len(),
            mode,
            mtime: mtime_secs(&meta),
            stamp: None,
        })
    }
}

fn mtime_secs(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Files never copied: they describe the running server, not the database.
/// zenith's own pgdata manifest is excluded too: it describes an earlier export.
const EXCLUDED: [&str; 3] = ["postmaster.pid", "postmaster.opts", "zenith-manifest.json"];

/// Every directory and file under `dir`, parents before children, sorted. Symbolic links are
/// refused with a message: tablespaces and a relocated `pg_wal` are not supported yet.
pub fn walk(dir: &Path) -> Result<Vec<DirEntry>> {
    walk_with(dir, false)
}

/// [`walk`] of a running server's directory: entries that vanish during the walk (the
/// server removed them) are left out instead of failing it.
pub fn walk_live(dir: &Path) -> Result<Vec<DirEntry>> {
    walk_with(dir, true)
}

fn walk_with(dir: &Path, live: bool) -> Result<Vec<DirEntry>> {
    use std::os::unix::fs::PermissionsExt;
    let vanished = |e: &walkdir::Error| {
        live && e
            .io_error()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    };
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let entry = match entry {
            Err(e) if vanished(&e) => continue,
            other => other,
        };
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_path_buf();
            SnapshotError::io(
                path,
                "read",
                e.into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("walk")),
            )
        })?;
        let rel_path = entry.path().strip_prefix(dir).expect("below dir");
        let Some(rel) = rel_path.to_str().map(str::to_string) else {
            return Err(SnapshotError::Refused {
                reason: format!("{}: the name is not UTF-8", entry.path().display()),
            });
        };
        // Segments prefetched for a recovery (zenith wal-fetch) are not the database's.
        if EXCLUDED.contains(&rel.as_str()) || rel.starts_with("pg_wal/.zenith-prefetch") {
            continue;
        }
        let ft = entry.file_type();
        if ft.is_symlink() {
            return Err(SnapshotError::Refused {
                reason: format!(
                    "{} is a symbolic link (a tablespace or a relocated pg_wal); zenith does not snapshot those yet",
                    entry.path().display()
                ),
            });
        }
        if !ft.is_dir() && !ft.is_file() {
            continue; // sockets or fifos: not database content
        }
        let meta = match entry.metadata() {
            Err(e) if vanished(&e) => continue,
            other => other,
        };
        let meta = meta.map_err(|e| {
            SnapshotError::io(
                entry.path(),
                "read",
                e.into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("metadata")),
            )
        })?;
        out.push(DirEntry {
            rel,
            abs: entry.path().to_path_buf(),
            is_dir: ft.is_dir(),
            size: if ft.is_dir() { 0 } else { meta.len() },
            mode: meta.permissions().mode() & 0o7777,
            mtime: mtime_secs(&meta),
            stamp: stamp(&meta),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_cluster_keeps_only_its_checkpoint_segment() {
        let entry = |rel: &str, size: u64| DirEntry {
            rel: rel.into(),
            abs: PathBuf::from("/x").join(rel),
            is_dir: false,
            size,
            mode: 0o600,
            mtime: 0,
            stamp: None,
        };
        let seg = 16 << 20;
        let entries = vec![
            entry("base/1/1", 8192),
            entry("pg_wal/000000020000000100000003", seg),
            entry("pg_wal/000000020000000100000004", seg),
            entry("pg_wal/000000020000000100000005", seg),
            entry("pg_wal/00000002.history", 42),
        ];
        let control = ControlInfo {
            system_identifier: 1,
            state: SHUT_DOWN,
            checkpoint_lsn: 0x1_0400_0028,
            redo_lsn: 0x1_0400_0028,
            timeline: 2,
        };
        let kept: Vec<String> = without_stale_wal(entries, &control)
            .into_iter()
            .map(|e| e.rel)
            .collect();
        assert_eq!(
            kept,
            [
                "base/1/1",
                "pg_wal/000000020000000100000004",
                "pg_wal/00000002.history"
            ]
        );
    }

    #[test]
    fn a_stale_pid_file_is_fine_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postmaster.pid"), "999999999\n/x\n").unwrap();
        check_not_running(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n/x\n", std::process::id()),
        )
        .unwrap();
        let e = check_not_running(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("running PostgreSQL") && e.contains("--connstr"),
            "{e}"
        );
    }

    #[test]
    fn control_fields_are_read_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("global")).unwrap();
        let mut bytes = vec![0u8; 8192];
        bytes[0..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        bytes[16..20].copy_from_slice(&1u32.to_le_bytes());
        bytes[32..40].copy_from_slice(&0x0100_0028u64.to_le_bytes());
        bytes[48..52].copy_from_slice(&3u32.to_le_bytes());
        std::fs::write(dir.path().join("global/pg_control"), bytes).unwrap();
        let c = read_control(dir.path()).unwrap();
        assert_eq!(
            (c.system_identifier, c.timeline, c.checkpoint_lsn),
            (0x1122_3344_5566_7788, 3, 0x0100_0028)
        );
        assert!(c.is_shut_down());
    }
}

/// What a snapshot source is: its version, its control file and its files.
#[derive(Debug, Clone)]
pub struct Survey {
    pub pg_version: String,
    pub control: ControlInfo,
    pub entries: Vec<DirEntry>,
}

/// Reads `PG_VERSION`, `global/pg_control` and the file list of `dir` (off the async workers).
pub async fn survey(dir: &Path) -> Result<Survey> {
    let dir = dir.to_path_buf();
    let result = tokio::task::spawn_blocking(move || {
        Ok(Survey {
            pg_version: read_pg_version(&dir)?,
            control: read_control(&dir)?,
            entries: walk(&dir)?,
        })
    })
    .await;
    result.map_err(super::error::join_error)?
}
