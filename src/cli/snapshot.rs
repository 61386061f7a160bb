//! `zenith export`, `zenith import` and `zenith snapshot ...`: snapshots of data
//! directories, running servers and the repo, to and from storage URLs, in all three
//! formats (`zenith`, `pgdata`, `basebackup`); listing, showing, verifying and deleting the
//! snapshots of a storage or of the repo.

use anyhow::Context;
use clap::{Args, Subcommand};

use super::CliError;
use crate::snapshot::{basebackup, native, pgdata, Format, Manifest};
use crate::storage;
use crate::util::size::format_size;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A snapshot of the repo to export (name, id prefix, pg@tag or LATEST)
    pub snapshot: Option<String>,
    /// Where to write the snapshot: file:///path, a plain path, or s3://bucket/prefix
    #[arg(long, alias = "snapshot_path", value_name = "URL")]
    pub snapshot_path: String,
    /// pgdata, basebackup or zenith
    #[arg(
        long,
        alias = "snapshot_format",
        value_name = "FORMAT",
        default_value = "zenith"
    )]
    pub snapshot_format: String,
    /// A stopped PostgreSQL data directory to snapshot
    #[arg(long, value_name = "DIR", conflicts_with_all = ["connstr", "snapshot"])]
    pub pgdata: Option<std::path::PathBuf>,
    /// A running server to snapshot online, as a libpq URI
    #[arg(long, value_name = "URI", conflicts_with = "snapshot")]
    pub connstr: Option<String>,
    /// A name for the snapshot
    #[arg(long)]
    pub name: Option<String>,
    /// basebackup format: write base.tar and pg_wal.tar instead of .tar.zst
    #[arg(long)]
    pub no_compress: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Where the snapshot is: file:///path, a plain path, s3://bucket/prefix, or (into
    /// the repo) a running server as postgres://...
    #[arg(long, alias = "snapshot_path", value_name = "URL")]
    pub snapshot_path: String,
    /// pgdata, basebackup or zenith
    #[arg(
        long,
        alias = "snapshot_format",
        value_name = "FORMAT",
        default_value = "zenith"
    )]
    pub snapshot_format: String,
    /// Which snapshot: an id or id prefix, a name, or LATEST
    #[arg(long, default_value = "LATEST")]
    pub snapshot: String,
    /// The new data directory to create (must not exist, or be empty)
    #[arg(long, value_name = "DIR")]
    pub pgdata: Option<std::path::PathBuf>,
    /// Name for the imported snapshot in the repo (pg@tag)
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a running pg, online
    Create { name: Option<String> },
    /// List snapshots
    List {
        /// A storage name or URL [default: the repo]
        #[arg(long, value_name = "NAME|URL")]
        storage: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot's manifest
    Show {
        snapshot: String,
        #[arg(long, value_name = "NAME|URL")]
        storage: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot and whatever no other snapshot needs
    Delete {
        snapshot: String,
        #[arg(long, value_name = "NAME|URL")]
        storage: Option<String>,
        /// Leave data younger than this alone (a concurrent export may still need it)
        #[arg(long, default_value = "1h", value_parser = crate::util::size::parse_duration)]
        grace: std::time::Duration,
        /// Rewrite packs until at most this percentage of stored bytes is unused
        #[arg(long, default_value_t = 5.0, value_name = "PERCENT")]
        max_unused: f64,
    },
    /// Re-read every object of a snapshot and check every checksum
    Verify {
        snapshot: String,
        #[arg(long, value_name = "NAME|URL")]
        storage: Option<String>,
    },
    /// Retention: keep the newest unnamed snapshots of a storage and every named one,
    /// delete the rest
    Prune {
        /// Storage name or URL
        #[arg(long, value_name = "NAME|URL", default_value = "storage_dest")]
        storage: String,
        /// Unnamed snapshots to keep, newest first [default: keep_last of [push] in
        /// config.toml]
        #[arg(long)]
        keep_last: Option<u32>,
        /// Unnamed snapshots younger than this stay too, e.g. 7d [default: keep_within of
        /// [push] in config.toml]
        #[arg(long, value_parser = crate::util::size::parse_duration)]
        keep_within: Option<std::time::Duration>,
        /// List what would go; delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Show what changed between two snapshots
    Diff { from: String, to: String },
}

fn parse_format(format: &str) -> Result<Format, CliError> {
    Ok(Format::parse(format).map_err(anyhow::Error::msg)?)
}

pub async fn export(
    args: ExportArgs,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let format = parse_format(&args.snapshot_format)?;
    if args.pgdata.is_none() && args.connstr.is_none() {
        let reference = args.snapshot.as_deref().unwrap_or("LATEST");
        return export_from_repo(&args, format, reference, repo_dir, progress).await;
    }
    let storage = storage::open(&args.snapshot_path)
        .await
        .map_err(anyhow::Error::from)?;
    let options = native::PackOptions {
        pg: None,
        progress: super::progress::bar("export", progress),
        name: args.name,
        parent: None,
    };
    // Online sources: the zenith format reads a local server in place; the other formats
    // (and remote servers) are copied consistently first with stock pg_basebackup.
    let mut staged = None;
    let (dir, lsns, source) = match (args.pgdata, &args.connstr) {
        (Some(pgdata), _) => {
            crate::snapshot::datadir::check_not_running(&pgdata).map_err(anyhow::Error::from)?;
            let source = pgdata.display().to_string();
            (Some(pgdata), None, source)
        }
        (None, Some(connstr)) => {
            let source = native::redact_password(connstr);
            if format == Format::Zenith {
                (None, None, source)
            } else {
                let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
                let copy = native::online_copy(&install, connstr)
                    .await
                    .map_err(anyhow::Error::from)?;
                let found = (Some(copy.data.clone()), Some(copy.lsns.clone()), source);
                staged = Some(copy);
                found
            }
        }
        (None, None) => unreachable!("repo exports return above"),
    };
    let (m, detail) = match (format, dir) {
        (Format::Zenith, dir) => {
            let report = match dir {
                Some(dir) => native::pack_dir(&dir, storage.clone(), &options, lsns).await,
                None => {
                    let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
                    let connstr = args.connstr.as_deref().expect("online source");
                    native::pack_online(&install, connstr, storage.clone(), &options).await
                }
            }
            .map_err(anyhow::Error::from)?;
            let mut detail = format!(
                "{} new blocks of {}",
                report.blocks_new, report.blocks_total
            );
            if report.files_reused > 0 {
                detail.push_str(&format!(
                    ", {} unchanged files not read again",
                    report.files_reused
                ));
            }
            (report.manifest, detail)
        }
        (Format::Pgdata, Some(dir)) => {
            let m = pgdata::pack_dir(&dir, storage.clone(), &options, lsns)
                .await
                .map_err(anyhow::Error::from)?;
            (m, "plain files".to_string())
        }
        (Format::Basebackup, Some(dir)) => {
            let m = basebackup::pack_dir(&dir, storage.clone(), &options, lsns, !args.no_compress)
                .await
                .map_err(anyhow::Error::from)?;
            let detail = if args.no_compress {
                "base.tar, pg_wal.tar"
            } else {
                "base.tar.zst, pg_wal.tar.zst"
            };
            (m, format!("{detail}, backup_manifest"))
        }
        (other, None) => {
            return Err(anyhow::anyhow!(
                "an online {} export found no copy of the server to pack",
                other.as_str()
            )
            .into())
        }
    };
    drop(staged);
    println!(
        "snapshot {}{} of {}: {} files, {}; stored {} ({detail}) in {}",
        m.id,
        m.name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        source,
        m.entries
            .iter()
            .filter(|e| e.kind == crate::snapshot::EntryKind::File)
            .count(),
        format_size(m.total_size),
        format_size(m.stored_size),
        storage.url()
    );
    Ok(())
}

pub async fn import(
    args: ImportArgs,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let format = parse_format(&args.snapshot_format)?;
    let Some(pgdata) = args.pgdata else {
        return import_into_repo(&args, format, repo_dir, progress).await;
    };
    let storage = storage::open(&args.snapshot_path)
        .await
        .map_err(anyhow::Error::from)?;
    let (id, size, checked) = match format {
        Format::Zenith => {
            let m = native::resolve(storage.as_ref(), &args.snapshot)
                .await
                .map_err(anyhow::Error::from)?;
            let bar = super::progress::bar("import", progress);
            let r = native::unpack(storage.as_ref(), &m, &pgdata, &bar)
                .await
                .map_err(anyhow::Error::from)?;
            (
                m.id,
                m.total_size,
                format!("{} blocks checked", r.blocks_checked),
            )
        }
        Format::Basebackup => {
            let (m, r) = basebackup::unpack(storage.as_ref(), &pgdata)
                .await
                .map_err(anyhow::Error::from)?;
            let id = m
                .as_ref()
                .map(|m| m.id.clone())
                .unwrap_or_else(|| "(a pg_basebackup backup)".into());
            let size = walkdir::WalkDir::new(&pgdata)
                .into_iter()
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum();
            (id, size, format!("{} files checked", r.blocks_checked))
        }
        Format::Pgdata => match pgdata::read_manifest(storage.as_ref())
            .await
            .map_err(anyhow::Error::from)?
        {
            Some(m) => {
                check_reference(&m, &args.snapshot, &storage.url())?;
                let r = pgdata::unpack(storage.as_ref(), &m, &pgdata)
                    .await
                    .map_err(anyhow::Error::from)?;
                (
                    m.id,
                    m.total_size,
                    format!("{} files checked", r.blocks_checked),
                )
            }
            None => match storage::StorageUrl::parse(&args.snapshot_path)
                .map_err(anyhow::Error::from)?
            {
                storage::StorageUrl::Local(dir) => {
                    let copied = pgdata::copy_plain_dir(&dir, &pgdata)
                        .await
                        .map_err(anyhow::Error::from)?;
                    (
                        format!("(data directory {})", dir.display()),
                        copied,
                        "copied".to_string(),
                    )
                }
                _ => {
                    return Err(anyhow::anyhow!(
                        "{} holds no {}: it is not a pgdata snapshot",
                        storage.url(),
                        pgdata::MANIFEST_KEY
                    )
                    .into())
                }
            },
        },
    };
    crate::compute::hand_to_postgres_user(&pgdata).map_err(anyhow::Error::msg)?;
    println!(
        "restored snapshot {id} into {}: {}, {checked}",
        pgdata.display(),
        format_size(size)
    );
    Ok(())
}

/// `zenith export REF --snapshot_path=URL`: a snapshot of the repo, elsewhere.
async fn export_from_repo(
    args: &ExportArgs,
    format: Format,
    reference: &str,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = crate::local::repo::Repo::existing(repo_dir)?;
    let ops = crate::local::ops::Ops::direct(repo);
    let bar = super::progress::bar("export", progress);
    let done = ops
        .export(
            reference,
            &args.snapshot_path,
            format,
            !args.no_compress,
            bar,
        )
        .await?;
    let m = &done["snapshot"];
    let what = if done["already_there"] == true {
        "already there, nothing sent".to_string()
    } else if format == Format::Zenith {
        format!(
            "sent {} in {} objects, {} objects already there",
            format_size(done["bytes_sent"].as_u64().unwrap_or(0)),
            done["objects_sent"],
            done["objects_skipped"]
        )
    } else {
        format!(
            "wrote {}",
            format_size(done["bytes_sent"].as_u64().unwrap_or(0))
        )
    };
    println!(
        "exported snapshot {} as {} to {}: {what}",
        super::snapshot_label(m),
        format.as_str(),
        done["url"].as_str().unwrap_or("")
    );
    Ok(())
}

/// `zenith import --snapshot_path=URL [--name PG@TAG]`: a new snapshot in the repo.
async fn import_into_repo(
    args: &ImportArgs,
    format: Format,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = crate::local::repo::Repo::existing(repo_dir)?;
    let ops = crate::local::ops::Ops::direct(repo);
    let bar = super::progress::bar("import", progress);
    let (m, already_there) = ops
        .import(
            &args.snapshot_path,
            format,
            &args.snapshot,
            args.name.as_deref(),
            bar,
        )
        .await?;
    if already_there {
        println!(
            "snapshot {}{} is in the repo already; nothing imported",
            m.id,
            m.name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        );
        return Ok(());
    }
    println!(
        "imported snapshot {}{}: {} ({} new in the repo)",
        m.id,
        m.name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        format_size(m.total_size),
        format_size(m.stored_size)
    );
    Ok(())
}

fn check_reference(m: &Manifest, reference: &str, url: &str) -> Result<(), CliError> {
    if reference == "LATEST" || m.id.starts_with(reference) || m.name.as_deref() == Some(reference)
    {
        Ok(())
    } else {
        Err(
            anyhow::Error::from(crate::snapshot::SnapshotError::NotFound {
                reference: reference.into(),
                url: url.into(),
            })
            .into(),
        )
    }
}

/// The snapshots at a destination: its pgdata snapshot, or its zenith-format ones.
async fn snapshots_at(storage: &dyn storage::Storage) -> Result<Vec<Manifest>, CliError> {
    match pgdata::read_manifest(storage)
        .await
        .map_err(anyhow::Error::from)?
    {
        Some(m) => Ok(vec![m]),
        None => Ok(native::list(storage).await.map_err(anyhow::Error::from)?),
    }
}

async fn resolve_any(
    storage: &dyn storage::Storage,
    reference: &str,
) -> Result<Manifest, CliError> {
    match pgdata::read_manifest(storage)
        .await
        .map_err(anyhow::Error::from)?
    {
        Some(m) => check_reference(&m, reference, &storage.url()).map(|()| m),
        None => Ok(native::resolve(storage, reference)
            .await
            .map_err(anyhow::Error::from)?),
    }
}

pub async fn run(
    cmd: SnapshotCommand,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let words = |w: &str| CliError::NotImplemented(w.to_string());
    // Without --storage, the repo's own snapshots.
    // A storage name of the repo (storage_dest, an attached one), a URL, or the repo.
    let at = |storage: Option<String>| -> Result<String, CliError> {
        let repo = crate::local::repo::Repo::locate(repo_dir.clone())?;
        match storage {
            Some(name) if repo.exists() => {
                let ops = crate::local::ops::Ops::direct(repo);
                if ops.is_storage(&name)? {
                    Ok(ops.storage_url(&name)?)
                } else {
                    Ok(name)
                }
            }
            Some(url) => Ok(url),
            None => Ok(crate::local::repo::Repo::existing(repo_dir.clone())?.store_url()),
        }
    };
    match cmd {
        SnapshotCommand::List { storage, json } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await.map_err(anyhow::Error::from)?;
            let all = snapshots_at(storage.as_ref()).await?;
            if json {
                let rows: Vec<_> = all.iter().map(summary).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).context("formatting")?
                );
            } else if all.is_empty() {
                println!("no snapshots in {}", storage.url());
            } else {
                println!(
                    "{:<20}  {:<20}  {:<16}  {:>10}  {:>10}",
                    "ID", "CREATED", "NAME", "SIZE", "STORED"
                );
                for m in &all {
                    println!(
                        "{:<20}  {:<20}  {:<16}  {:>10}  {:>10}",
                        m.id,
                        m.created_at,
                        m.name.as_deref().unwrap_or("-"),
                        format_size(m.total_size),
                        format_size(m.stored_size)
                    );
                }
            }
            Ok(())
        }
        SnapshotCommand::Show {
            snapshot,
            storage,
            json,
        } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await.map_err(anyhow::Error::from)?;
            let m = resolve_any(storage.as_ref(), &snapshot).await?;
            if json {
                println!("{}", String::from_utf8_lossy(&m.to_json()));
            } else {
                super::print_fields(&summary(&m));
            }
            Ok(())
        }
        SnapshotCommand::Verify { snapshot, storage } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await.map_err(anyhow::Error::from)?;
            let m = resolve_any(storage.as_ref(), &snapshot).await?;
            if m.format == Format::Pgdata {
                let r = pgdata::verify(storage.as_ref(), &m)
                    .await
                    .map_err(anyhow::Error::from)?;
                println!(
                    "snapshot {} is intact: {} files checked",
                    m.id, r.blocks_checked
                );
            } else if m.format == Format::Basebackup {
                let r = basebackup::verify(storage.as_ref())
                    .await
                    .map_err(anyhow::Error::from)?;
                println!(
                    "snapshot {} is intact: {} files checked",
                    m.id, r.blocks_checked
                );
            } else {
                let bar = super::progress::bar("verify", progress);
                let r = native::verify(storage.as_ref(), &m, &bar)
                    .await
                    .map_err(anyhow::Error::from)?;
                println!(
                    "snapshot {} is intact: {} blocks in {} packs checked",
                    m.id, r.blocks_checked, r.packs_read
                );
            }
            Ok(())
        }
        SnapshotCommand::Create { .. } => Err(words("snapshot create")),
        SnapshotCommand::Delete {
            snapshot,
            storage,
            grace,
            max_unused,
        } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await.map_err(anyhow::Error::from)?;
            let m = native::resolve(storage.as_ref(), &snapshot)
                .await
                .map_err(anyhow::Error::from)?;
            if let Ok(repo) = crate::local::repo::Repo::existing(repo_dir.clone()) {
                let store = storage::open(&repo.store_url()).await;
                if store.is_ok_and(|s| s.url() == storage.url()) {
                    crate::local::ops::refuse_needed(&repo, &m.id).map_err(anyhow::Error::from)?;
                }
            }
            let r = native::delete(storage, &m, grace, max_unused / 100.0)
                .await
                .map_err(anyhow::Error::from)?;
            println!("deleted snapshot {}", r.deleted);
            match &r.gc.skipped {
                Some(why) => println!("kept its data for now: {why}"),
                None => println!(
                    "freed {} ({} packs removed, {} rewritten); {} unused left",
                    format_size(r.gc.bytes_freed),
                    r.gc.packs_deleted,
                    r.gc.packs_repacked,
                    format_size(r.gc.bytes_unused_left)
                ),
            }
            Ok(())
        }
        SnapshotCommand::Prune {
            storage,
            keep_last,
            keep_within,
            dry_run,
        } => {
            let repo = crate::local::repo::Repo::existing(repo_dir)?;
            let push = repo.config()?.push;
            let configured = push.retention()?;
            let rule = crate::local::repo::Retention {
                keep_last: keep_last.unwrap_or(push.keep_last),
                keep_within: keep_within.or(configured.and_then(|r| r.keep_within)),
            };
            if rule.keep_last == 0 && rule.keep_within.is_none() {
                return Err(anyhow::anyhow!(
                    "no retention rule (keep_last 0, no keep_within): nothing to prune; pass --keep-last N or --keep-within 7d"
                )
                .into());
            }
            let ops = crate::local::ops::Ops::direct(repo);
            let gone = ops.prune(&storage, rule, dry_run, |_| true).await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for m in &gone {
                println!("{verb} snapshot {} ({})", m.id, m.created_at);
            }
            println!(
                "{} snapshot(s) {verb}; the newest {} unnamed{}, and every named one, stay",
                gone.len(),
                rule.keep_last,
                rule.keep_within
                    .map(|d| format!(", those younger than {} s", d.as_secs()))
                    .unwrap_or_default()
            );
            Ok(())
        }
        SnapshotCommand::Diff { .. } => Err(words("snapshot diff")),
    }
}

fn summary(m: &Manifest) -> serde_json::Value {
    m.summary()
}
