//! The `basebackup` format: what `pg_basebackup -Ft -Xs` writes. `base.tar` (the data
//! directory without its WAL), `pg_wal.tar` (the WAL segments), both zstd-compressed
//! (`.tar.zst`) unless asked otherwise, and a `backup_manifest` in PostgreSQL's own format
//! (SHA-256 file checksums, the WAL range), so that after extracting both tars
//! `pg_verifybackup` accepts the result and `postgres` starts on it. zenith adds its own
//! `zenith-manifest.json`, written last, which makes the snapshot visible to zenith.
//!
//! Importing accepts zenith's exports and backups made by `pg_basebackup -Ft -Xs`
//! (uncompressed or `--compress=...zstd`), checked against `zenith-manifest.json` or, for
//! PostgreSQL's own backups, against `backup_manifest` (CRC-32C or SHA-256). Every entry is
//! checked before it is written: no absolute paths, no `..`, no links, no devices, no file
//! larger than its manifest says.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::SyncIoBridge;

use super::datadir::DirEntry;
use super::error::join_error;
use super::error::{Result, SnapshotError};
use super::manifest::{self, Entry, EntryKind, Format, Manifest};
use super::paths::check_relative_path;
use super::pgdata::{refuse_non_empty, Written, MANIFEST_KEY};
use super::survey::{survey_for, CheckReport, PackOptions};
use super::tree::into_new_dir;
use crate::storage::{self, Storage};
use crate::util::crc32c::Crc32c;

/// Largest WAL segment PostgreSQL can be built with; bounds unlisted files in `pg_wal.tar`.
const MAX_WAL_FILE: u64 = 1 << 30;

fn is_wal_file(rel: &str) -> bool {
    rel.strip_prefix("pg_wal/")
        .is_some_and(|name| !name.contains('/'))
}

/// Makes a reader fail instead of ending when its producer did not finish cleanly, so a
/// failed tar never becomes a truncated but complete-looking object.
struct EndsOnlyWhenDone<R> {
    inner: R,
    done: Arc<AtomicBool>,
}

impl<R: AsyncRead + Unpin> AsyncRead for EndsOnlyWhenDone<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &poll {
            if buf.filled().len() == before
                && buf.remaining() > 0
                && !self.done.load(Ordering::SeqCst)
            {
                return std::task::Poll::Ready(Err(std::io::Error::other(
                    "the archive was not completed",
                )));
            }
        }
        poll
    }
}

/// Reads `inner` while hashing it.
struct HashRead<R> {
    inner: R,
    sha: Sha256,
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes `items` of `dir` as a tar (zstd-compressed if `compress`) to `key`, streaming.
/// Returns each file's SHA-256.
async fn write_tar(
    storage: &dyn Storage,
    key: &str,
    dir: &Path,
    items: Vec<DirEntry>,
    strip: &'static str,
    compress: bool,
    progress: crate::util::progress::ProgressHandle,
) -> Result<(HashMap<String, String>, u64)> {
    let (reader, writer) = tokio::io::duplex(1 << 20);
    let done = Arc::new(AtomicBool::new(false));
    let done_writer = Arc::clone(&done);
    let dir = dir.to_path_buf();
    let producer = tokio::task::spawn_blocking(move || -> Result<HashMap<String, String>> {
        let io = |e: std::io::Error| SnapshotError::io(&dir, "archive", e);
        let bridge = SyncIoBridge::new(writer);
        // Everything is flushed before `done` is set, and `done` is set before the writer
        // is dropped: the reader sees the end of the stream only after a complete archive.
        let (mut bridge, sums) = if compress {
            let encoder = zstd::Encoder::new(bridge, 1).map_err(io)?;
            let (encoder, sums) = archive(encoder, &items, strip, &*progress).map_err(io)?;
            (encoder.finish().map_err(io)?, sums)
        } else {
            archive(bridge, &items, strip, &*progress).map_err(io)?
        };
        bridge.flush().map_err(io)?;
        done_writer.store(true, Ordering::SeqCst);
        drop(bridge);
        Ok(sums)
    });
    let upload = storage.put_stream(
        key,
        Box::pin(EndsOnlyWhenDone {
            inner: reader,
            done,
        }),
    );
    let (produced, uploaded) = tokio::join!(producer, upload);
    let sums = produced.map_err(join_error)?;
    match (sums, uploaded) {
        // The archiver's pipe broke because the upload stopped reading: the upload's
        // error (a full disk at the destination, a dead server) is the cause.
        (Err(SnapshotError::Io { source, .. }), Err(e))
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Err(e.into())
        }
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.into()),
        (Ok(sums), Ok(stored)) => Ok((sums, stored)),
    }
}

/// Writes `items` as a tar into `sink`; returns the sink and each file's SHA-256.
fn archive<W: Write>(
    sink: W,
    items: &[DirEntry],
    strip: &str,
    progress: &dyn crate::util::progress::Progress,
) -> std::io::Result<(W, HashMap<String, String>)> {
    let mut builder = tar::Builder::new(sink);
    let mut sums = HashMap::new();
    for item in items {
        let name = item
            .rel
            .strip_prefix(strip)
            .unwrap_or(&item.rel)
            .to_string();
        let mut header = tar::Header::new_gnu();
        header.set_mode(item.mode);
        header.set_mtime(item.mtime);
        if item.is_dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, format!("{name}/"), std::io::empty())?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(item.size);
            let file = std::fs::File::open(&item.abs)?;
            let mut hashed = HashRead {
                inner: file.take(item.size),
                sha: Sha256::new(),
            };
            builder.append_data(&mut header, &name, &mut hashed)?;
            sums.insert(item.rel.clone(), hex::encode(hashed.sha.finalize()));
            progress.add(item.size);
        }
    }
    Ok((builder.into_inner()?, sums))
}

/// Names of the archives, by compression.
fn tar_key(base: &str, compress: bool) -> String {
    if compress {
        format!("{base}.tar.zst")
    } else {
        format!("{base}.tar")
    }
}

/// PostgreSQL's backup manifest for `files` (path, size, mtime, sha256).
fn backup_manifest(
    files: &[(String, u64, u64, String)],
    timeline: u32,
    lsns: &(String, String),
) -> String {
    let mut text = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    for (i, (path, size, mtime, sha)) in files.iter().enumerate() {
        let comma = if i + 1 < files.len() { "," } else { "" };
        text.push_str(&format!(
            "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": \"{}\", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{sha}\" }}{comma}\n",
            serde_json::to_string(path).expect("a string serializes"),
            manifest::manifest_time(*mtime)
        ));
    }
    text.push_str(&format!(
        "],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {timeline}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n],\n",
        lsns.0, lsns.1
    ));
    let sum = hex::encode(Sha256::digest(text.as_bytes()));
    text.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    text
}

/// Writes the data directory `dir` (stopped, or an online copy with its WAL range) as a
/// base backup.
pub async fn pack_dir(
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
    compress: bool,
) -> Result<Manifest> {
    refuse_non_empty(storage.as_ref()).await?;
    let keys = ["base", "pg_wal"]
        .into_iter()
        .map(|b| tar_key(b, compress))
        .chain(["backup_manifest".to_string()])
        .collect();
    let written = Written::begin(storage.as_ref(), keys);
    let result = write_backup(dir, Arc::clone(&storage), options, lsns, compress).await;
    written.settle(&result).await;
    result
}

/// The basebackup export proper, into an empty destination.
async fn write_backup(
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
    compress: bool,
) -> Result<Manifest> {
    let (mut origin, walked) = survey_for(dir, Format::Basebackup, options, lsns).await?;
    let walked: Vec<DirEntry> = walked
        .into_iter()
        .filter(|e| e.rel != "backup_manifest")
        .collect();
    let (wal, base): (Vec<DirEntry>, Vec<DirEntry>) = walked
        .iter()
        .cloned()
        .partition(|e| is_wal_file(&e.rel) && !e.is_dir);
    let progress = options.progress.clone();
    let (base_sums, base_bytes) = write_tar(
        storage.as_ref(),
        &tar_key("base", compress),
        dir,
        base.clone(),
        "",
        compress,
        progress.clone(),
    )
    .await?;
    let (wal_sums, wal_bytes) = write_tar(
        storage.as_ref(),
        &tar_key("pg_wal", compress),
        dir,
        wal,
        "pg_wal/",
        compress,
        progress,
    )
    .await?;
    options.progress.finish();
    // A stopped directory's WAL range is its last checkpoint.
    let range = origin.lsns.clone().unwrap_or_else(|| {
        (
            crate::compute::wal::format_lsn(origin.control.redo_lsn),
            crate::compute::wal::format_lsn(origin.control.checkpoint_lsn),
        )
    });
    origin.lsns = Some(range.clone());
    let listed: Vec<(String, u64, u64, String)> = base
        .iter()
        .filter(|e| !e.is_dir)
        .map(|e| (e.rel.clone(), e.size, e.mtime, base_sums[&e.rel].clone()))
        .collect();
    let text = backup_manifest(&listed, origin.control.timeline, &range);
    storage.put("backup_manifest", Bytes::from(text)).await?;
    let entries: Vec<Entry> = walked
        .iter()
        .map(|e| match e.is_dir {
            true => Entry::dir(&e.rel, e.mode),
            false => Entry {
                path: e.rel.clone(),
                kind: EntryKind::File,
                mode: e.mode,
                size: e.size,
                sha256: base_sums
                    .get(&e.rel)
                    .or_else(|| wal_sums.get(&e.rel))
                    .cloned(),
                list: None,
                stamp: None,
            },
        })
        .collect();
    let manifest = Manifest::new(origin, entries, base_bytes + wal_bytes);
    storage
        .put(MANIFEST_KEY, Bytes::from(manifest.to_json()))
        .await?;
    Ok(manifest)
}

/// What a file must be, from zenith's manifest or PostgreSQL's.
#[derive(Debug, Clone)]
struct Expected {
    size: u64,
    sha256: Option<String>,
    crc32c: Option<String>,
}

/// Expected files from `backup_manifest` (PostgreSQL's): sizes, and checksums it can check.
fn parse_backup_manifest(text: &str, source: &str) -> Result<HashMap<String, Expected>> {
    let corrupt = |what: String| SnapshotError::Corrupt {
        object: source.to_string(),
        what,
    };
    let at = text
        .rfind("\"Manifest-Checksum\"")
        .ok_or_else(|| corrupt("no Manifest-Checksum".into()))?;
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    let claimed = json["Manifest-Checksum"].as_str().unwrap_or_default();
    if hex::encode(Sha256::digest(&text.as_bytes()[..at])) != claimed {
        return Err(corrupt(
            "its Manifest-Checksum does not match its content".into(),
        ));
    }
    let mut out = HashMap::new();
    for file in json["Files"]
        .as_array()
        .ok_or_else(|| corrupt("no Files list".into()))?
    {
        let path = file["Path"]
            .as_str()
            .ok_or_else(|| corrupt("a file without a Path (or an encoded one)".into()))?;
        check_relative_path(path).map_err(|why| corrupt(format!("entry {path:?}: {why}")))?;
        let size = file["Size"]
            .as_u64()
            .ok_or_else(|| corrupt(format!("{path} has no Size")))?;
        let (mut sha256, mut crc32c) = (None, None);
        match (
            file["Checksum-Algorithm"].as_str(),
            file["Checksum"].as_str(),
        ) {
            (Some("SHA256"), Some(sum)) => sha256 = Some(sum.to_lowercase()),
            (Some("CRC32C"), Some(sum)) => crc32c = Some(sum.to_lowercase()),
            _ => {} // NONE or another SHA: the size is still checked
        }
        out.insert(
            path.to_string(),
            Expected {
                size,
                sha256,
                crc32c,
            },
        );
    }
    Ok(out)
}

/// Which archives a destination holds: base and WAL, each with whether it is compressed
/// (`pg_basebackup --compress=zstd` compresses base.tar but may leave pg_wal.tar plain).
async fn find_archives(storage: &dyn Storage) -> Result<((String, bool), (String, bool))> {
    let mut found = Vec::new();
    for name in ["base", "pg_wal"] {
        let mut hit = None;
        for compress in [true, false] {
            let key = tar_key(name, compress);
            if storage.exists(&key).await? {
                hit = Some((key, compress));
                break;
            }
        }
        match hit {
            Some(hit) => found.push(hit),
            None => {
                return Err(SnapshotError::Refused {
                    reason: format!(
                        "{} holds no {name}.tar or {name}.tar.zst: not a base backup with its WAL (pg_basebackup -Ft -Xs; gzip and lz4 archives are not supported yet)",
                        storage.url()
                    ),
                })
            }
        }
    }
    let wal = found.pop().expect("two archives");
    let base = found.pop().expect("two archives");
    Ok((base, wal))
}

/// Extracts one archive into `dest`, checking every entry against `expected` as it goes.
async fn extract(
    storage: &dyn Storage,
    key: &str,
    compress: bool,
    dest: &Path,
    prefix: &'static str,
    expected: Arc<HashMap<String, Expected>>,
) -> Result<Vec<String>> {
    let source = format!("{}/{key}", storage.url());
    let reader = storage.get(key).await?;
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let corrupt = |what: String| SnapshotError::Corrupt { object: source.clone(), what };
        let bridge = SyncIoBridge::new(reader);
        let input: Box<dyn Read> = if compress {
            Box::new(zstd::Decoder::new(bridge).map_err(|e| corrupt(format!("not zstd: {e}")))?)
        } else {
            Box::new(bridge)
        };
        let mut archive = tar::Archive::new(input);
        let mut written = Vec::new();
        for entry in archive.entries().map_err(|e| corrupt(e.to_string()))? {
            let mut entry = entry.map_err(|e| corrupt(format!("unreadable archive: {e}")))?;
            let raw = entry.path().map_err(|e| corrupt(e.to_string()))?.to_string_lossy().to_string();
            let name = raw.trim_start_matches("./").trim_end_matches('/').to_string();
            if name.is_empty() {
                continue;
            }
            let rel = format!("{prefix}{name}");
            check_relative_path(&rel).map_err(|why| corrupt(format!("entry {raw:?}: {why}")))?;
            let path = dest.join(&rel);
            match entry.header().entry_type() {
                tar::EntryType::Directory => {
                    std::fs::create_dir_all(&path).map_err(|e| SnapshotError::io(&path, "create", e))?;
                    let mode = entry.header().mode().unwrap_or(0o700) & 0o777 | 0o700;
                    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
                        .map_err(|e| SnapshotError::io(&path, "chmod", e))?;
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let size = entry.header().size().map_err(|e| corrupt(e.to_string()))?;
                    let limit = match expected.get(&rel) {
                        Some(want) => want.size,
                        None if is_wal_file(&rel) => MAX_WAL_FILE,
                        // pg_basebackup marks segments it finished streaming: empty files.
                        None if rel.starts_with("pg_wal/archive_status/") => 4096,
                        None => return Err(corrupt(format!("{rel} is not in the backup's manifest"))),
                    };
                    if size > limit {
                        return Err(corrupt(format!("{rel} claims {size} bytes, more than its manifest allows ({limit})")));
                    }
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| SnapshotError::io(parent, "create", e))?;
                    }
                    let mode = entry.header().mode().unwrap_or(0o600) & 0o777 | 0o600;
                    let mut out = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&path)
                        .map_err(|e| match e.kind() {
                            // Also across the two archives: pg_wal.tar cannot bring a file
                            // base.tar had.
                            std::io::ErrorKind::AlreadyExists => {
                                corrupt(format!("it has a duplicate entry {rel}"))
                            }
                            _ => SnapshotError::io(&path, "create", e),
                        })?;
                    let (mut sha, mut crc) = (Sha256::new(), Crc32c::default());
                    let mut buf = vec![0u8; 1 << 20];
                    let mut total = 0u64;
                    loop {
                        let n = entry.read(&mut buf).map_err(|e| corrupt(format!("{rel}: {e}")))?;
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                        sha.update(&buf[..n]);
                        crc.update(&buf[..n]);
                        out.write_all(&buf[..n]).map_err(|e| SnapshotError::io(&path, "write", e))?;
                    }
                    out.sync_all().map_err(|e| SnapshotError::io(&path, "sync", e))?;
                    if let Some(want) = expected.get(&rel) {
                        let sha = hex::encode(sha.finalize());
                        if total != want.size
                            || want.sha256.as_ref().is_some_and(|s| *s != sha)
                            || want.crc32c.as_ref().is_some_and(|c| *c != crc.manifest_hex())
                        {
                            return Err(corrupt(format!("{rel} does not match its checksum in the manifest")));
                        }
                    }
                    written.push(rel);
                }
                tar::EntryType::Symlink if rel.starts_with("pg_tblspc/") => {
                    return Err(SnapshotError::Refused {
                        reason: format!("{source} has a tablespace ({rel}); zenith does not restore tablespaces yet"),
                    })
                }
                other => return Err(corrupt(format!("{rel} is a {other:?} entry; only files and directories are accepted"))),
            }
        }
        Ok(written)
    })
    .await
    .map_err(join_error)?
}

/// Restores a base backup (zenith's, or `pg_basebackup -Ft -Xs` output) into the new
/// directory `target`, checking every file.
pub async fn unpack(
    storage: &dyn Storage,
    target: &Path,
) -> Result<(Option<Manifest>, CheckReport)> {
    let ((base_key, base_zst), (wal_key, wal_zst)) = find_archives(storage).await?;
    let zenith = super::pgdata::read_manifest(storage).await?;
    let backup_manifest = match storage
        .get_bytes_limited("backup_manifest", manifest::MAX_MANIFEST_BYTES as u64)
        .await
    {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).to_string()),
        Err(storage::Error::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let expected: HashMap<String, Expected> = match (&zenith, &backup_manifest) {
        (Some(m), _) => m
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| {
                (
                    e.path.clone(),
                    Expected {
                        size: e.size,
                        sha256: e.sha256.clone(),
                        crc32c: None,
                    },
                )
            })
            .collect(),
        (None, Some(text)) => {
            parse_backup_manifest(text, &format!("{}/backup_manifest", storage.url()))?
        }
        (None, None) => {
            return Err(SnapshotError::Refused {
                reason: format!(
                    "{} has no backup_manifest; zenith only restores base backups it can check",
                    storage.url()
                ),
            })
        }
    };
    let expected = Arc::new(expected);
    let report = into_new_dir(target, |temp| {
        let expected = Arc::clone(&expected);
        let backup_manifest = backup_manifest.clone();
        async move {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&temp)
                .map_err(|e| SnapshotError::io(&temp, "create", e))?;
            let mut written = extract(
                storage,
                &base_key,
                base_zst,
                &temp,
                "",
                Arc::clone(&expected),
            )
            .await?;
            written.extend(
                extract(
                    storage,
                    &wal_key,
                    wal_zst,
                    &temp,
                    "pg_wal/",
                    Arc::clone(&expected),
                )
                .await?,
            );
            let present: std::collections::HashSet<&String> = written.iter().collect();
            if let Some(missing) = expected.keys().find(|k| !present.contains(k)) {
                return Err(SnapshotError::Corrupt {
                    object: storage.url(),
                    what: format!("{missing} is in the manifest but not in the archives"),
                });
            }
            if let Some(text) = backup_manifest {
                let path = temp.join("backup_manifest");
                std::fs::write(&path, text).map_err(|e| SnapshotError::io(&path, "write", e))?;
            }
            std::fs::File::open(&temp)
                .and_then(|d| d.sync_all())
                .map_err(|e| SnapshotError::io(&temp, "sync", e))?;
            Ok(CheckReport {
                blocks_checked: written.len() as u64,
                ..CheckReport::default()
            })
        }
    })
    .await?;
    Ok((zenith, report))
}

/// Checks a base backup by restoring it into a scratch directory that is removed after.
pub async fn verify(storage: &dyn Storage) -> Result<CheckReport> {
    let base = std::env::var_os("ZENITH_STAGING_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    crate::util::tempdir::sweep(&base, "zenith-verify");
    let scratch = crate::util::tempdir::TempDir::new_in(&base, "zenith-verify")
        .map_err(|e| SnapshotError::io(&base, "create", e))?;
    let (_, report) = unpack(storage, &scratch.path().join("data")).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_carry_a_checksum_postgresql_accepts_and_we_check() {
        let files = vec![(
            "PG_VERSION".to_string(),
            3,
            1_795_793_908,
            hex::encode(Sha256::digest(b"15\n")),
        )];
        let text = backup_manifest(&files, 1, &("0/2000028".into(), "0/2000100".into()));
        let parsed = parse_backup_manifest(&text, "t").unwrap();
        assert_eq!(parsed["PG_VERSION"].size, 3);
        let tampered = text.replace("\"Size\": 3", "\"Size\": 4");
        assert!(parse_backup_manifest(&tampered, "t")
            .unwrap_err()
            .to_string()
            .contains("Manifest-Checksum"));
        let hostile = backup_manifest(
            &[("../x".into(), 1, 0, "00".repeat(32))],
            1,
            &("0/1".into(), "0/2".into()),
        );
        assert!(parse_backup_manifest(&hostile, "t").is_err());
    }

    #[test]
    fn wal_files_are_those_directly_in_pg_wal() {
        assert!(is_wal_file("pg_wal/000000010000000000000001"));
        assert!(!is_wal_file("pg_wal/archive_status/x.done"));
        assert!(!is_wal_file("base/1/2"));
    }
}
