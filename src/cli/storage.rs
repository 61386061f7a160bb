//! `zenith storage ...`: named storages (like git remotes; `storage_dest` is one name),
//! `storage check`, the probe a user runs before trusting a destination, and `push` and
//! `pull`, which move snapshots between the repo and a storage.

use std::io::Write;

use clap::Subcommand;

use super::CliError;
use crate::local::Ops;
use crate::pageserver::{Repo, STORAGE_DEST};
use crate::storage::{self, check};
use crate::util::message::printable;
use crate::util::size::{format_size, parse_size};

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Give a storage URL a name, like a git remote
    Attach {
        #[arg(short, long)]
        name: String,
        #[arg(long, value_name = "URL")]
        path: String,
    },
    /// Forget a named storage (its content is left alone)
    Detach {
        #[arg(short, long)]
        name: String,
    },
    /// List named storages
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a named storage: snapshots there, space used
    Show {
        #[arg(short, long)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Encrypt a new, empty storage: from then on every object zenith stores there is
    /// sealed (XChaCha20-Poly1305) with a random key kept in the storage, wrapped by the
    /// passphrase in ZENITH_PASSPHRASE or the file ZENITH_PASSPHRASE_FILE names (argon2id).
    /// Anyone who reads or writes it needs that passphrase; keep it somewhere safe.
    Encrypt {
        /// A storage name or URL (file:///path, a plain path, s3://bucket/prefix)
        #[arg(value_name = "NAME|URL")]
        storage: String,
    },
    /// Change an encrypted storage's passphrase: the current one from ZENITH_PASSPHRASE
    /// (or ZENITH_PASSPHRASE_FILE), the new one from ZENITH_NEW_PASSPHRASE (or
    /// ZENITH_NEW_PASSPHRASE_FILE). The key stays the same, so everything stored stays
    /// readable, with the new passphrase only.
    Passphrase {
        /// A storage name or URL
        #[arg(value_name = "NAME|URL")]
        storage: String,
    },
    /// Probe a destination: write, read, list and delete under a temporary prefix,
    /// measure throughput, clean up; exit 1 if it is not usable
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The destination: file:///path, a plain path, or s3://bucket/prefix
    #[arg(value_name = "URL")]
    pub url: String,
    /// Size of the large object used for the multipart and throughput steps
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub size: u64,
    /// Upload this file as the large object (and download it back beside it) instead of
    /// generated data
    #[arg(long, value_name = "PATH", conflicts_with = "size")]
    pub file: Option<std::path::PathBuf>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

pub async fn run(
    cmd: StorageCommand,
    repo_dir: Option<std::path::PathBuf>,
) -> Result<(), CliError> {
    if let StorageCommand::Check(args) = cmd {
        return check_cmd(args).await;
    }
    if let StorageCommand::Encrypt { storage: target }
    | StorageCommand::Passphrase { storage: target } = &cmd
    {
        let url = if crate::pageserver::looks_like_url(target) {
            target.clone()
        } else {
            Ops::direct(Repo::existing(repo_dir.clone())?)
                .pageserver
                .storage_url(target)?
        };
        let raw = storage::open_raw(&url).await?;
        if let StorageCommand::Passphrase { .. } = cmd {
            let (old, new) = storage::passphrase_change(&url)?;
            storage::change_passphrase(raw.as_ref(), &old, &new).await?;
            println!(
                "{url}: the new passphrase opens its key from now on; the old one no longer does"
            );
            return Ok(());
        }
        let passphrase = storage::required_passphrase(&url)?;
        let canonical = raw.url();
        storage::encrypt(raw, &passphrase).await?;
        // The repo remembers it: should its key file ever go, nothing is written there in
        // the clear.
        if let Ok(repo) = Repo::existing(repo_dir) {
            Ops::direct(repo).pageserver.remember_encrypted(&canonical);
        }
        println!(
            "{url} is encrypted: what zenith stores there from now on is sealed with its key, which only the passphrase opens; without the passphrase nothing there can be read"
        );
        return Ok(());
    }
    let repo = Repo::existing(repo_dir)?;
    let running = crate::local::running(&repo).is_some();
    let ps = Ops::direct(repo).pageserver;
    match cmd {
        StorageCommand::Check(_)
        | StorageCommand::Encrypt { .. }
        | StorageCommand::Passphrase { .. } => {
            unreachable!("handled above")
        }
        StorageCommand::Attach { name, path } => {
            ps.attach_storage(&name, &path)?;
            println!("attached storage {name}: {path}");
            if running && name == STORAGE_DEST {
                println!("zenith-local pushes there from now on (it reads config.toml again within seconds)");
            }
        }
        StorageCommand::Detach { name } => {
            ps.detach_storage(&name)?;
            println!("detached storage {name} (what it holds is left alone)");
        }
        StorageCommand::List { json } => {
            let rows = ps.list_storages()?;
            if json {
                super::print_json(&rows);
            } else if rows.is_empty() {
                println!("no storages; `zenith storage attach -n NAME --path URL` adds one");
            } else {
                for r in &rows {
                    println!("{:<16}  {}", r.name, r.url);
                }
            }
        }
        StorageCommand::Show { name, json } => {
            let shown = ps.show_storage(&name).await?;
            if json {
                super::print_json(&shown);
            } else {
                let sealed = if shown.encrypted { " (encrypted)" } else { "" };
                println!("{name}: {}{sealed}", shown.url);
                println!("{} objects, {}", shown.objects, format_size(shown.bytes));
                for m in &shown.snapshots {
                    println!(
                        "  {}  {}  {}",
                        m.id,
                        printable(&m.created_at),
                        printable(m.name.as_deref().unwrap_or("-"))
                    );
                }
            }
        }
    }
    Ok(())
}

/// `zenith push [SNAPSHOT] [STORAGE|URL]`.
pub async fn push(
    snapshot: Option<String>,
    storage: Option<String>,
    from: Option<String>,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let ps = Ops::direct(Repo::existing(repo_dir)?).pageserver;
    // One argument that names a storage (or is a URL) is the storage: `zenith push team`.
    let (snapshot, storage) = match (snapshot, storage) {
        (Some(one), None) if ps.is_storage(&one)? => (None, Some(one)),
        other => other,
    };
    let bar = super::progress::bar("push", progress);
    let done = ps
        .push_from(
            from.as_deref(),
            snapshot.as_deref(),
            storage.as_deref(),
            bar,
        )
        .await?;
    let url = &done.url;
    if done.pushed.is_empty() {
        println!("{url} has every snapshot already; nothing pushed");
        return Ok(());
    }
    for p in &done.pushed {
        let label = printable(&p.snapshot.label()).into_owned();
        if p.moved.already_there {
            println!("snapshot {label}: already in {url}");
        } else {
            println!(
                "pushed snapshot {label}: {} in {} objects, {} objects already there",
                format_size(p.moved.bytes_sent),
                p.moved.objects_sent,
                p.moved.objects_skipped
            );
        }
    }
    println!(
        "{url}: {} sent in {} objects",
        format_size(done.bytes_sent),
        done.objects_sent
    );
    Ok(())
}

/// `zenith pull STORAGE|URL [SNAPSHOT]`.
pub async fn pull(
    source: String,
    snapshot: Option<String>,
    repo_dir: Option<std::path::PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let ps = Ops::direct(Repo::existing(repo_dir)?).pageserver;
    let bar = super::progress::bar("pull", progress);
    let done = ps.pull(&source, snapshot.as_deref(), bar).await?;
    let label = printable(&done.snapshot.label()).into_owned();
    if done.moved.already_there {
        println!("snapshot {label} is in the repo already; nothing pulled");
    } else {
        println!(
            "pulled snapshot {label} from {}: {} in {} objects, {} objects already here",
            done.url,
            format_size(done.moved.bytes_sent),
            done.moved.objects_sent,
            done.moved.objects_skipped
        );
    }
    println!(
        "`zenith pg create NAME --snapshot {}` makes a pg of it",
        done.snapshot.id
    );
    Ok(())
}

async fn check_cmd(args: CheckArgs) -> Result<(), CliError> {
    // A probe of the destination itself: no key file is read, encrypted or not.
    let storage = storage::open_raw(&args.url)
        .await
        .map_err(anyhow::Error::from)?;
    let json = args.json;
    if !json {
        match &args.file {
            Some(file) => println!("checking {} with {}", storage.url(), file.display()),
            None => println!(
                "checking {} with a {} object",
                storage.url(),
                format_size(args.size)
            ),
        }
    }
    let mut print = |step: &check::Step| {
        if !json {
            let status = if step.ok { "ok  " } else { "FAIL" };
            println!(
                "  {status}  {:<13} {:>7} ms  {}",
                step.name, step.millis, step.detail
            );
            let _ = std::io::stdout().flush();
        }
    };
    let report = check::run(
        storage.as_ref(),
        &check::CheckOptions {
            size: args.size,
            file: args.file,
        },
        &mut print,
    )
    .await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("reports serialize")
        );
    } else {
        match (report.upload_mib_per_sec, report.download_mib_per_sec) {
            (Some(up), Some(down)) => {
                println!("throughput: upload {up:.1} MiB/s, download {down:.1} MiB/s")
            }
            (Some(up), None) => println!("throughput: upload {up:.1} MiB/s"),
            _ => {}
        }
        if report.ok() {
            println!("{} is usable", report.url);
        } else {
            let failed: Vec<&str> = report
                .steps
                .iter()
                .filter(|s| !s.ok)
                .map(|s| s.name.as_str())
                .collect();
            println!("{} is NOT usable: {} failed", report.url, failed.join(", "));
        }
    }
    if report.ok() {
        Ok(())
    } else {
        Err(CliError::Exit(1))
    }
}
