//! `zenith export`, `zenith import` and `zenith snapshot ...`: snapshots of data
//! directories, running servers and the repo, to and from storage URLs, in all three
//! formats (`zenith`, `pgdata`, `basebackup`); listing, showing, verifying and deleting the
//! snapshots of a storage or of the repo.

use clap::{Args, Subcommand};

use super::CliError;
use crate::local::Ops;
use crate::pageserver::capture;
use crate::pageserver::{check_tag, Repo, Retention};
use crate::snapshot::{
    self, zenith, EntryKind, Format, Manifest, PackOptions, Packed, SnapshotSummary,
};
use crate::storage;
use crate::storage::Storage;
use crate::util::message::printable;
use crate::util::size::format_size;
use std::sync::Arc;

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
        /// Also restore it into a throwaway pg, start it and run pg_amcheck
        /// --heapallindexed over every database (the pg is removed afterwards)
        #[arg(long)]
        boot: bool,
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
    /// Which relations (tables, indexes, by database and schema) and how many pages
    /// differ between two snapshots of one cluster, without restoring them; files outside
    /// relations are listed apart
    Diff {
        /// The older snapshot
        from: String,
        /// The newer snapshot
        to: String,
        #[arg(long, value_name = "NAME|URL")]
        storage: Option<String>,
        #[arg(long)]
        json: bool,
    },
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
    if let Some(name) = &args.name {
        check_tag(name)?;
    }
    if args.pgdata.is_none() && args.connstr.is_none() {
        let reference = args.snapshot.as_deref().unwrap_or("LATEST");
        return export_from_repo(&args, format, reference, repo_dir, progress).await;
    }
    let storage = storage::open(&args.snapshot_path).await?;
    let options = PackOptions {
        pg: None,
        wal_history: None,
        progress: super::progress::bar("export", progress),
        name: args.name.clone(),
        parent: None,
        identity: None,
        stamps: None,
    };
    let compress = !args.no_compress;
    let packed = match (&args.pgdata, &args.connstr) {
        (Some(pgdata), _) => {
            snapshot::datadir::check_not_running(pgdata)?;
            snapshot::pack_dir(format, pgdata, storage.clone(), &options, None, compress).await?
        }
        // Online: the zenith format reads a local server in place; the other formats (and
        // remote servers) are copied consistently first with stock pg_basebackup.
        (None, Some(connstr)) => {
            let install = crate::pageserver::install()?;
            if format == Format::Zenith {
                Packed::Zenith(
                    capture::pack_online(&install, connstr, storage.clone(), &options).await?,
                )
            } else {
                let copy = capture::online_copy(&install, connstr).await?;
                let lsns = Some(copy.lsns.clone());
                snapshot::pack_dir(
                    format,
                    &copy.data,
                    storage.clone(),
                    &options,
                    lsns,
                    compress,
                )
                .await?
            }
        }
        (None, None) => unreachable!("repo exports return above"),
    };
    let source = match (&args.pgdata, &args.connstr) {
        (Some(pgdata), _) => pgdata.display().to_string(),
        (None, connstr) => {
            crate::compute::connstr::redact_password(connstr.as_deref().unwrap_or(""))
        }
    };
    let detail = match (&packed, compress) {
        (Packed::Zenith(report), _) => {
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
            detail
        }
        (Packed::Files(_), _) if format == Format::Pgdata => "plain files".to_string(),
        (Packed::Files(_), true) => "base.tar.zst, pg_wal.tar.zst, backup_manifest".to_string(),
        (Packed::Files(_), false) => "base.tar, pg_wal.tar, backup_manifest".to_string(),
    };
    let m = packed.manifest();
    println!(
        "snapshot {} of {}: {} files, {}; stored {} ({detail}) in {}",
        printable(&m.summary().label()),
        source,
        m.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
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
    let storage = storage::open(&args.snapshot_path).await?;
    let bar = super::progress::bar("import", progress);
    let done = snapshot::unpack(format, storage.as_ref(), &args.snapshot, &pgdata, &bar).await?;
    let id = match &done.manifest {
        Some(m) => m.id.clone(),
        None if format == Format::Basebackup => "(a pg_basebackup backup)".into(),
        None => format!("(data directory {})", args.snapshot_path),
    };
    let checked = match (&done.manifest, format) {
        (Some(_), Format::Zenith) => format!("{} blocks checked", done.report.blocks_checked),
        (None, Format::Pgdata) => "copied".to_string(),
        _ => format!("{} files checked", done.report.blocks_checked),
    };
    crate::compute::hand_to_postgres_user(&pgdata).map_err(anyhow::Error::msg)?;
    println!(
        "restored snapshot {id} into {}: {}, {checked}",
        pgdata.display(),
        format_size(done.size)
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
    let ops = Ops::direct(Repo::existing(repo_dir)?);
    let bar = super::progress::bar("export", progress);
    let done = ops
        .pageserver
        .export(
            reference,
            &args.snapshot_path,
            format,
            args.name.as_deref(),
            !args.no_compress,
            bar,
        )
        .await?;
    let what = if done.moved.already_there {
        "already there, nothing sent".to_string()
    } else if format == Format::Zenith {
        format!(
            "sent {} in {} objects, {} objects already there",
            format_size(done.moved.bytes_sent),
            done.moved.objects_sent,
            done.moved.objects_skipped
        )
    } else {
        format!("wrote {}", format_size(done.moved.bytes_sent))
    };
    println!(
        "exported snapshot {} as {} to {}: {what}",
        printable(&done.snapshot.label()),
        format.as_str(),
        done.url
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
    let ops = Ops::direct(Repo::existing(repo_dir)?);
    let bar = super::progress::bar("import", progress);
    let (m, already_there) = ops
        .pageserver
        .import(
            &args.snapshot_path,
            format,
            &args.snapshot,
            args.name.as_deref(),
            bar,
        )
        .await?;
    let label = printable(&m.summary().label()).into_owned();
    if already_there {
        println!("snapshot {label} is in the repo already; nothing imported");
        return Ok(());
    }
    println!(
        "imported snapshot {label}: {} ({} new in the repo)",
        format_size(m.total_size),
        format_size(m.stored_size)
    );
    Ok(())
}

pub async fn run(
    cmd: SnapshotCommand,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let words = |w: &str| CliError::NotImplemented(w.to_string());
    // A storage name of the repo (storage_dest, an attached one), a URL, or (without
    // --storage) the repo's own snapshots.
    let at = |storage: Option<String>| -> Result<String, CliError> {
        let repo = Repo::locate(repo_dir.clone())?;
        match storage {
            Some(name) if repo.exists() => {
                let ops = Ops::direct(repo);
                if ops.pageserver.is_storage(&name)? {
                    Ok(ops.pageserver.storage_url(&name)?)
                } else {
                    Ok(name)
                }
            }
            Some(url) => Ok(url),
            None => Ok(Repo::existing(repo_dir.clone())?.store_url()),
        }
    };
    match cmd {
        SnapshotCommand::List { storage, json } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await?;
            let all = snapshot::list(storage.as_ref()).await?;
            let repo = repo_of(&repo_dir, storage.as_ref()).await;
            let rows: Vec<_> = all.iter().map(|m| with_space(repo.as_ref(), m)).collect();
            if json {
                super::print_json(&rows);
            } else if all.is_empty() {
                println!("no snapshots in {}", storage.url());
            } else {
                let clones = rows.iter().any(|m| m.clone.is_some());
                let shared = |m: &SnapshotSummary| match (clones, &m.clone) {
                    (false, _) => String::new(),
                    (true, Some(c)) => format!("  {:>10}", format_size(c.shared)),
                    (true, None) => format!("  {:>10}", "-"),
                };
                println!(
                    "{:<20}  {:<20}  {:<16}  {:>10}  {:>10}{}",
                    "ID",
                    "CREATED",
                    "NAME",
                    "SIZE",
                    if clones { "OWNS" } else { "STORED" },
                    if clones { "      SHARED" } else { "" }
                );
                for m in &rows {
                    println!(
                        "{:<20}  {:<20}  {:<16}  {:>10}  {:>10}{}",
                        m.id,
                        printable(&m.created_at),
                        printable(m.name.as_deref().unwrap_or("-")),
                        format_size(m.total_size),
                        format_size(m.clone.map(|c| c.owned).unwrap_or(m.stored_size)),
                        shared(m)
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
            let storage = storage::open(&url).await?;
            let m = snapshot::resolve(storage.as_ref(), &snapshot).await?;
            if json {
                println!("{}", String::from_utf8_lossy(&m.to_json()));
            } else {
                let repo = repo_of(&repo_dir, storage.as_ref()).await;
                super::print_fields(&with_space(repo.as_ref(), &m));
            }
            Ok(())
        }
        SnapshotCommand::Verify {
            snapshot,
            storage,
            boot,
        } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await?;
            let m = snapshot::resolve(storage.as_ref(), &snapshot).await?;
            let repo = repo_of(&repo_dir, storage.as_ref()).await;
            match repo.as_ref().filter(|_| m.clone) {
                Some(ops) => {
                    let files = ops.pageserver.check_clone(&m)?;
                    println!(
                        "snapshot {} is a thin clone: its {files} files are in place at their sizes (a clone has no checksums until it is pushed or exported, which packs it and checks every block read)",
                        m.id
                    );
                }
                None => {
                    let bar = super::progress::bar("verify", progress);
                    let r = snapshot::verify(storage.as_ref(), &m, &bar).await?;
                    if m.format == Format::Zenith {
                        println!(
                            "snapshot {} is intact: {} blocks in {} packs checked",
                            m.id, r.blocks_checked, r.packs_read
                        );
                    } else {
                        println!(
                            "snapshot {} is intact: {} files checked",
                            m.id, r.blocks_checked
                        );
                    }
                }
            }
            if boot {
                super::inspect::boot_check(&m, storage.as_ref(), repo.as_ref()).await?;
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
            let storage = storage::open(&url).await?;
            let m = zenith::resolve(storage.as_ref(), &snapshot).await?;
            let repo = repo_of(&repo_dir, storage.as_ref()).await;
            if let Some(ops) = &repo {
                ops.pageserver.refuse_needed(&m.id)?;
            }
            let r = zenith::delete(Arc::clone(&storage), &m, grace, max_unused / 100.0).await?;
            if let Some(ops) = &repo {
                ops.pageserver.drop_clone(&m.id)?;
                ops.pageserver.sweep_clones(storage.as_ref()).await?;
            }
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
            let repo = Repo::existing(repo_dir)?;
            let push = repo.config()?.push;
            let configured = push.retention()?;
            let rule = Retention {
                keep_last: keep_last.unwrap_or(push.keep_last),
                keep_within: keep_within.or(configured.and_then(|r| r.keep_within)),
            };
            if rule.keep_last == 0 && rule.keep_within.is_none() {
                return Err(anyhow::anyhow!(
                    "no retention rule (keep_last 0, no keep_within): nothing to prune; pass --keep-last N or --keep-within 7d"
                )
                .into());
            }
            let ops = Ops::direct(repo);
            let gone = ops
                .pageserver
                .prune(&storage, rule, dry_run, |_| true)
                .await?;
            let verb = if dry_run { "would delete" } else { "deleted" };
            for m in &gone {
                println!("{verb} snapshot {} ({})", m.id, printable(&m.created_at));
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
        SnapshotCommand::Diff {
            from,
            to,
            storage,
            json,
        } => {
            let url = at(storage)?;
            let storage = storage::open(&url).await?;
            let a = zenith::resolve(storage.as_ref(), &from).await?;
            let b = zenith::resolve(storage.as_ref(), &to).await?;
            let repo = repo_of(&repo_dir, storage.as_ref()).await;
            let d = crate::pageserver::diff::diff(
                storage.as_ref(),
                &a,
                &b,
                repo.as_ref().map(|ops| &ops.pageserver),
            )
            .await?;
            if json {
                super::print_json(&d);
            } else {
                super::inspect::print_diff(&d);
            }
            Ok(())
        }
    }
}

/// The repo whose own snapshot store `storage` is, if it is one.
async fn repo_of(repo_dir: &Option<std::path::PathBuf>, storage: &dyn Storage) -> Option<Ops> {
    let repo = Repo::existing(repo_dir.clone()).ok()?;
    let store = storage::open(&repo.store_url()).await.ok()?;
    (store.url() == storage.url()).then(|| Ops::direct(repo))
}

/// What a listing says of snapshot `m`, with its clone's space when it is one of `repo`.
fn with_space(repo: Option<&Ops>, m: &Manifest) -> SnapshotSummary {
    match repo {
        Some(ops) => ops.pageserver.summary(m),
        None => m.summary(),
    }
}
