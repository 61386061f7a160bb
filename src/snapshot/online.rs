//! Online snapshots read straight from a running server's data directory.
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

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::datadir;
use super::error::{Result, SnapshotError};

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
    pub async fn open(install: &crate::compute::PgInstall, connstr: &str) -> Result<Session> {
        let what = super::native::redact_password(connstr);
        let (dbname, password) = super::native::split_password(connstr);
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

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
        return None;
    }
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// WAL file names from `first` to `last` inclusive (same timeline).
fn segment_range(first: &str, last: &str, segment_size: u64) -> Option<Vec<String>> {
    let per = (segment_size > 0).then(|| 0x1_0000_0000 / segment_size)?;
    let parse = |name: &str| -> Option<(u32, u64)> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..], 16).ok()?;
        Some((tli, log * per + seg))
    };
    let (tli, from) = parse(first)?;
    let (tli2, to) = parse(last)?;
    if tli != tli2 || to < from || to - from > 1_000_000 {
        return None;
    }
    Some(
        (from..=to)
            .map(|n| format!("{tli:08X}{:08X}{:08X}", n / per, n % per))
            .collect(),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_like_postgresql_prints_them() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        for bad in [
            "",
            "1",
            "/1",
            "1/",
            "x/1",
            "1/2/3",
            "123456789/0",
            "1'; drop/1",
        ] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn wal_segments_between_two_positions() {
        let size = 16 << 20;
        assert_eq!(
            segment_range("0000000100000000000000FE", "000000010000000100000001", size).unwrap(),
            vec![
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert!(
            segment_range("000000010000000000000002", "000000020000000000000003", size).is_none()
        );
        assert!(segment_range("../etc", "000000010000000000000003", size).is_none());
    }

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
