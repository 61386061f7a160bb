//! Online capture: snapshots of a running server, without stopping it.
//!
//! When the server runs on this machine and its data directory is readable, zenith does
//! what `pg_basebackup` does inside the server, without copying the data twice: in one
//! session it reserves WAL with a temporary physical replication slot, calls
//! `pg_backup_start` (fast checkpoint), reads the files while the server keeps serving,
//! calls `pg_backup_stop`, and then takes the WAL segments from the start to the stop
//! position plus the `backup_label` the server returns. Restoring the files with that WAL
//! and label recovers to a consistent database holding every transaction committed before
//! the backup started (full-page writes, forced during the backup, repair pages that were
//! read while being written).
//!
//! The session is a `psql` child process, so every way libpq authenticates (passwords in
//! the URI, `PGPASSFILE`, certificates, peer) works exactly as for `psql`.

//!
//! When the data directory is not readable here (another machine, a standby), and for the
//! `pgdata` and `basebackup` formats, stock `pg_basebackup` copies the server into a
//! staging directory first ([`online_copy`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::compute::connstr::{redact_password, split_password};
use crate::compute::wal::{parse_lsn, segment_range};
use crate::compute::PgInstall;
use crate::snapshot::datadir::{self, DirEntry};
use crate::snapshot::zenith::{self, with_export_lock, PackReport, PackRun};
use crate::snapshot::{join_error, Format, Origin, PackOptions, Result, SnapshotError};
use crate::storage::Storage;
use crate::util::tempdir::TempDir;

/// Separates fields in the session's output (a byte no path or LSN contains).
const FIELD_SEPARATOR: char = '\u{1f}';

/// What the server says about itself when the session opens.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub data_directory: PathBuf,
    pub in_recovery: bool,
    pub system_identifier: u64,
    pub wal_segment_size: u64,
}

/// The server's answer to `pg_backup_stop`.
#[derive(Debug, Clone)]
pub struct BackupEnd {
    pub start_lsn: String,
    pub stop_lsn: String,
    /// The `backup_label` file to place in the snapshot.
    pub label: String,
    /// WAL segments (file names under `pg_wal/`) from the start to the stop position.
    pub segments: Vec<String>,
}

/// One SQL session with a running server.
pub struct Session {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    what: String,
    start_lsn: Option<String>,
}

impl Session {
    /// Connects with `psql` to `connstr`.
    pub async fn open(install: &PgInstall, connstr: &str) -> Result<Session> {
        let what = redact_password(connstr);
        let (dbname, password) = split_password(connstr);
        let mut cmd = tokio::process::Command::new(install.bin("psql"));
        if let Some(pw) = password {
            cmd.env("PGPASSWORD", pw);
        }
        let mut child = cmd
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "--no-password",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .arg(format!("--field-separator={FIELD_SEPARATOR}"))
            .arg("--dbname")
            .arg(dbname)
            .env("PGAPPNAME", "zenith")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| SnapshotError::io(install.bin("psql"), "run", e))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        Ok(Session {
            child,
            stdin,
            stdout,
            what,
            start_lsn: None,
        })
    }

    /// Runs one statement that returns one row, and returns its fields.
    async fn row(&mut self, sql: &str) -> Result<Vec<String>> {
        let sent = async {
            self.stdin.write_all(sql.as_bytes()).await?;
            self.stdin.write_all(b"\n").await?;
            self.stdin.flush().await
        }
        .await;
        let line = match sent {
            Ok(()) => self.stdout.next_line().await.ok().flatten(),
            Err(_) => None,
        };
        match line {
            Some(line) => Ok(line.split(FIELD_SEPARATOR).map(str::to_string).collect()),
            None => Err(self.failure().await),
        }
    }

    /// The error of a session that ended: the last line psql printed.
    async fn failure(&mut self) -> SnapshotError {
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr).await;
        }
        let _ = self.child.wait().await;
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("the session ended without a message")
            .trim()
            .trim_start_matches("psql: ")
            .to_string();
        SnapshotError::Refused {
            reason: format!(
                "the online snapshot of {} failed: {last}; check the connection string and that the role may run backups (superuser, or REPLICATION with EXECUTE on pg_backup_start)",
                self.what
            ),
        }
    }

    /// Where the server keeps its data, and whether it is a primary.
    pub async fn server_info(&mut self) -> Result<ServerInfo> {
        let row = self
            .row(
                "SELECT current_setting('data_directory'), pg_is_in_recovery(), \
                 (SELECT system_identifier FROM pg_control_system()), \
                 (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size');",
            )
            .await?;
        let bad = || SnapshotError::Refused {
            reason: format!("{} answered an unexpected server description", self.what),
        };
        let [dir, recovery, sysid, segsize] = row.as_slice() else {
            return Err(bad());
        };
        Ok(ServerInfo {
            data_directory: PathBuf::from(dir),
            in_recovery: recovery == "t",
            system_identifier: sysid.parse().map_err(|_| bad())?,
            wal_segment_size: segsize.parse().map_err(|_| bad())?,
        })
    }

    /// Reserves WAL for the session (a temporary slot) and starts a backup.
    pub async fn backup_start(&mut self) -> Result<()> {
        let slot = format!("zenith_{:016x}", fastrand::u64(..));
        self.row(&format!(
            "SELECT 1 FROM pg_create_physical_replication_slot('{slot}', true, true);"
        ))
        .await?;
        let row = self
            .row("SELECT pg_backup_start('zenith', fast => true);")
            .await?;
        // Checked before it is ever placed in a statement.
        self.start_lsn = row.into_iter().next().filter(|l| parse_lsn(l).is_some());
        Ok(())
    }

    /// Ends the backup; the WAL it needs is complete once this returns.
    pub async fn backup_stop(&mut self, info: &ServerInfo) -> Result<BackupEnd> {
        let what = self.what.clone();
        let bad = move || SnapshotError::Refused {
            reason: format!("{what} answered pg_backup_stop unexpectedly"),
        };
        let start_lsn = self.start_lsn.clone().ok_or_else(bad.clone())?;
        let row = self
            .row(&format!(
                "SELECT lsn, encode(convert_to(labelfile, 'UTF8'), 'hex'), \
                 pg_walfile_name('{start_lsn}'), pg_walfile_name(lsn) \
                 FROM pg_backup_stop(wait_for_archive => false);"
            ))
            .await?;
        let [stop_lsn, label_hex, start_file, stop_file] = row.as_slice() else {
            return Err(bad());
        };
        let label =
            String::from_utf8(hex::decode(label_hex).map_err(|_| bad())?).map_err(|_| bad())?;
        let segments =
            segment_range(start_file, stop_file, info.wal_segment_size).ok_or_else(bad)?;
        Ok(BackupEnd {
            start_lsn,
            stop_lsn: stop_lsn.clone(),
            label,
            segments,
        })
    }

    /// Ends the session (dropping its temporary slot).
    pub async fn close(mut self) {
        let _ = self.stdin.write_all(b"\\q\n").await;
        let _ = self.stdin.shutdown().await;
        let _ = self.child.wait().await;
    }
}

/// The data directory of the server, if zenith can read it directly: it exists here, it
/// belongs to that server (same system identifier in `global/pg_control`) and the server
/// is a primary.
pub fn local_data_directory(info: &ServerInfo) -> Option<&Path> {
    if info.in_recovery {
        return None;
    }
    let control = datadir::read_control(&info.data_directory).ok()?;
    (control.system_identifier == info.system_identifier).then_some(info.data_directory.as_path())
}

/// What an online read leaves out of the data directory, as PostgreSQL's own base backup
/// does: WAL (taken separately), runtime state recreated at start, temporary files, and
/// the main forks of unlogged relations (only their init fork is kept).
pub fn excluded(rel: &str, unlogged: &std::collections::HashSet<String>) -> bool {
    const FILES: [&str; 6] = [
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "tablespace_map",
        "backup_manifest",
        "current_logfiles",
    ];
    const CONTENT_OF: [&str; 8] = [
        "pg_wal/",
        "pg_replslot/",
        "pg_dynshmem/",
        "pg_notify/",
        "pg_serial/",
        "pg_snapshots/",
        "pg_stat_tmp/",
        "pg_subtrans/",
    ];
    if FILES.contains(&rel) {
        return true;
    }
    if CONTENT_OF.iter().any(|d| rel.starts_with(d)) {
        // Keep pg_wal/archive_status itself: PostgreSQL expects the directory.
        return rel != "pg_wal/archive_status";
    }
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.starts_with("pgsql_tmp") || name == "pg_internal.init" {
        return true;
    }
    // base/<db>/<relfilenode>[_fork][.segment] of an unlogged relation, except its init fork.
    if let Some((dir, file)) = rel.rsplit_once('/') {
        if !file.ends_with("_init") {
            let node = file.split(['_', '.']).next().unwrap_or(file);
            if unlogged.contains(&format!("{dir}/{node}")) {
                return true;
            }
        }
    }
    false
}

/// `<dir>/<relfilenode>` of every unlogged relation (those with an `_init` fork).
pub fn unlogged_relations(entries: &[datadir::DirEntry]) -> std::collections::HashSet<String> {
    entries
        .iter()
        .filter_map(|e| e.rel.strip_suffix("_init"))
        .filter(|r| r.starts_with("base/") || r.starts_with("pg_tblspc/"))
        .map(str::to_string)
        .collect()
}

/// A consistent copy of a running server in a staging directory, removed when dropped.
pub struct OnlineCopy {
    _staging: TempDir,
    /// The copied data directory (with the WAL needed to make it consistent).
    pub data: PathBuf,
    /// Start and stop LSN of the copy.
    pub lsns: (String, String),
}

/// Where staging copies go: `ZENITH_STAGING_DIR`, else the system's temporary directory.
/// Copies that killed runs left there are removed first.
fn staging_dir() -> PathBuf {
    let base = std::env::var_os("ZENITH_STAGING_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    crate::util::tempdir::sweep(&base, STAGING);
    base
}

const STAGING: &str = "zenith-staging";

/// Copies a running server with stock `pg_basebackup` (plain format, WAL streamed) into a
/// staging directory under `ZENITH_STAGING_DIR`, else the system's temporary directory.
pub async fn online_copy(install: &PgInstall, connstr: &str) -> Result<OnlineCopy> {
    let base = staging_dir();
    let staging =
        TempDir::new_in(&base, STAGING).map_err(|e| SnapshotError::io(&base, "create", e))?;
    let mut copy = OnlineCopy {
        data: staging.path().join("data"),
        _staging: staging,
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

/// Snapshots a running server without stopping it. When the server's data directory is on
/// this machine, files are read in place between `pg_backup_start` and `pg_backup_stop`
/// (see the module's description); otherwise stock `pg_basebackup` copies the server to a staging
/// directory first.
pub async fn pack_online(
    install: &PgInstall,
    connstr: &str,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
) -> Result<PackReport> {
    let mut session = Session::open(install, connstr).await?;
    let info = session.server_info().await?;
    let local = local_data_directory(&info).map(Path::to_path_buf);
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
        return zenith::pack_dir(&copy.data, storage, options, Some(copy.lsns.clone())).await;
    };
    // The backup is running from here on; ending the session (also by an error) aborts it.
    let result = with_export_lock(&storage, async {
        let started = std::time::Instant::now();
        let run = PackRun::prepare(Arc::clone(&storage), info.system_identifier, options).await?;
        tracing::debug!("destination surveyed in {:?}", started.elapsed());
        let pg_version = datadir::read_pg_version(&dir)?;
        let control = datadir::read_control(&dir)?;
        let walk_dir = dir.clone();
        let walked = tokio::task::spawn_blocking(move || datadir::walk_live(&walk_dir))
            .await
            .map_err(join_error)??;
        let unlogged = unlogged_relations(&walked);
        let walked: Vec<DirEntry> = walked
            .into_iter()
            .filter(|e| !excluded(&e.rel, &unlogged))
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
        let work = TempDir::new("zenith-label")
            .map_err(|e| SnapshotError::io(std::env::temp_dir(), "create", e))?;
        let tail = wal_tail(&dir, &end, info.wal_segment_size, work.path())?;
        let tail_size: u64 = tail.iter().map(|e| e.size).sum();
        options.progress.set_total(walked_size + tail_size);
        let (more, run) = run.pack(tail, false).await?;
        entries.extend(more);
        let origin = Origin {
            format: Format::Zenith,
            name: options.name.clone(),
            parent: options.parent.clone(),
            pg: options.pg.clone(),
            wal_history: options.wal_history.clone(),
            pg_version,
            control,
            lsns: Some((end.start_lsn, end.stop_lsn)),
        };
        let report = run.finish(origin, entries).await;
        tracing::debug!("snapshot stored after {:?}", started.elapsed());
        report
    })
    .await;
    options.progress.finish();
    result
}

/// PostgreSQL's WAL page size.
const WAL_PAGE: u64 = 8192;

/// The files an online snapshot adds after `pg_backup_stop`: `backup_label`, and the WAL
/// segments from start to stop. The first and last segments are copied into `work` with
/// what recovery never reads zeroed (the pages before the start position, everything after
/// the stop position): it is stale WAL that would only cost space.
pub(super) fn wal_tail(
    dir: &Path,
    end: &BackupEnd,
    segment_size: u64,
    work: &Path,
) -> Result<Vec<DirEntry>> {
    let label_path = work.join("backup_label");
    std::fs::write(&label_path, &end.label)
        .map_err(|e| SnapshotError::io(&label_path, "write", e))?;
    let mut tail = vec![DirEntry::file("backup_label", &label_path, 0o600)?];
    let start = parse_lsn(&end.start_lsn);
    let stop = parse_lsn(&end.stop_lsn);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_state_and_unlogged_relations_are_left_out() {
        let unlogged: std::collections::HashSet<String> = ["base/5/123".to_string()].into();
        for rel in [
            "postmaster.pid",
            "pg_wal/000000010000000000000001",
            "pg_stat_tmp/global.stat",
            "base/5/pgsql_tmp",
            "base/5/pgsql_tmp/pgsql_tmp1.0",
            "base/5/123",
            "base/5/123.1",
            "base/5/123_fsm",
            "global/pg_internal.init",
        ] {
            assert!(excluded(rel, &unlogged), "{rel}");
        }
        for rel in [
            "pg_wal",
            "pg_wal/archive_status",
            "base/5/123_init",
            "base/5/1234",
            "global/pg_control",
            "pg_stat_tmp",
        ] {
            assert!(!excluded(rel, &unlogged), "{rel}");
        }
    }
}
