//! `zenith wal-push`, `zenith wal-fetch` (PostgreSQL's `archive_command` and
//! `restore_command`, for zenith's pgs and any other PostgreSQL) and `zenith wal verify`.
//!
//! Exit codes follow what PostgreSQL does with them: wal-push exits 0 only once the file
//! is durable; wal-fetch exits 0 when the file is in place, 1 when the archive has no such
//! file (recovery ends there), and 255 for anything else (a gap, damage, an unreachable
//! storage), which makes recovery stop instead of ending early.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::CliError;
use crate::safekeeper::archive::{self, Archive, Branch, WalTarget, DEFAULT_HISTORY};
use crate::safekeeper::{fetch, push, verify};

/// The exit code that makes PostgreSQL stop recovery (above 125).
pub const EXIT_FATAL: u8 = 255;

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// The archive: a URL, or a storage name of the repo [env: ZENITH_STORAGE]
    #[arg(long, env = "ZENITH_STORAGE", value_name = "URL|NAME")]
    pub storage: Option<String>,
    /// The WAL history to archive into or restore from [default: default]
    #[arg(long, value_name = "HISTORY")]
    pub history: Option<String>,
    /// The data directory, whose control file names the cluster [default: the current
    /// directory, where PostgreSQL runs its archive and restore commands]
    #[arg(long, value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// For zenith's own pgs: the file (written by zenith) that names the storage, the
    /// history and the cluster
    #[arg(long, value_name = "FILE", hide = true)]
    pub target: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Check the WAL archive's continuity, history by history, and name every gap
    Verify {
        /// A storage name or URL [default: storage_dest]
        #[arg(long, value_name = "NAME|URL")]
        storage: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// Where a push or fetch goes: the archive, the history, and (for servers zenith does not
/// run, whose history zenith records nowhere else) how the history begins.
struct Resolved {
    archive: Archive,
    history: String,
    branch: Option<Branch>,
}

/// A storage name of the repo (when there is a repo) or a URL, as a URL.
fn storage_url(name_or_url: &str, repo_dir: Option<PathBuf>) -> Result<String, CliError> {
    if name_or_url.contains("://") || name_or_url.starts_with('/') {
        return Ok(name_or_url.to_string());
    }
    // A name needs a repo; without one (no HOME, say) it is taken as a path.
    let Ok(repo) = crate::pageserver::Repo::locate(repo_dir) else {
        return Ok(name_or_url.to_string());
    };
    if repo.exists() {
        let ps = crate::pageserver::Pageserver::new(repo);
        if ps.is_storage(name_or_url)? {
            return Ok(ps.storage_url(name_or_url)?);
        }
    }
    Ok(name_or_url.to_string())
}

async fn resolve(args: &ArchiveArgs, repo_dir: Option<PathBuf>) -> Result<Resolved, CliError> {
    if let Some(file) = &args.target {
        // A zenith pg: the target file says everything; without one, archiving is off.
        let target = match WalTarget::read(file) {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(anyhow::anyhow!(
                "{} is gone: this pg does not archive any more; its next start sets archiving anew",
                file.display()
            )
                .into())
            }
            Err(e) => return Err(anyhow::anyhow!(e).into()),
        };
        // The repo's storage_dest, as config.toml says now.
        let text = std::fs::read_to_string(&target.config)
            .map_err(|e| anyhow::anyhow!("{}: {e}", target.config.display()))?;
        let config: crate::pageserver::Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", target.config.display(), e.message()))?;
        // Detached while the pg runs: the WAL stays with PostgreSQL (it retries) rather
        // than being dropped, until a storage_dest is attached or the pg restarts
        // without archiving.
        let Some(url) = config.storage_dest.clone() else {
            return Err(anyhow::anyhow!(
                "{} names no storage_dest any more: the WAL stays here until one is attached again (`zenith storage attach -n storage_dest --path URL`), or the pg restarts without archiving",
                target.config.display()
            )
            .into());
        };
        let storage = crate::storage::open(&url).await?;
        config.refuse_unsealed(storage.as_ref())?;
        return Ok(Resolved {
            archive: Archive::new(storage, target.system_identifier),
            history: target.history,
            branch: None,
        });
    }
    let Some(name) = &args.storage else {
        return Err(anyhow::anyhow!(
            "no archive: pass --storage URL or set ZENITH_STORAGE (credentials come from the environment, see docs/storages.md)"
        )
        .into());
    };
    let url = storage_url(name, repo_dir)?;
    let pgdata = args.pgdata.clone().unwrap_or_else(|| PathBuf::from("."));
    let control = crate::snapshot::datadir::read_control(&pgdata).map_err(|e| {
        anyhow::anyhow!("{e}; run from the data directory (PostgreSQL does) or pass --pgdata DIR")
    })?;
    let history = args
        .history
        .clone()
        .unwrap_or_else(|| DEFAULT_HISTORY.into());
    archive::check_history(&history).map_err(|e| anyhow::anyhow!(e))?;
    let storage = crate::storage::open(&url).await?;
    Ok(Resolved {
        archive: Archive::new(storage, control.system_identifier),
        history,
        branch: Some(Branch {
            parent: None,
            pg: None,
            created_at: crate::snapshot::now_rfc3339(),
            segment_size: crate::compute::wal::DEFAULT_SEGMENT_SIZE,
        }),
    })
}

/// `zenith wal-push PATH`.
pub async fn wal_push(
    path: PathBuf,
    args: ArchiveArgs,
    concurrency: usize,
    repo_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let r = resolve(&args, repo_dir).await?;
    if let Some(branch) = &r.branch {
        r.archive
            .ensure_branch(&r.history, branch)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    let done = push::push(&r.archive, &r.history, &path, concurrency.max(1))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(
        "{} {} ({} following segment(s) pushed alongside)",
        if done.stored {
            "archived"
        } else {
            "already archived:"
        },
        path.display(),
        done.ahead
    );
    Ok(())
}

/// `zenith safekeeper`: one run of the WAL receiver (zenith-local starts it again when it
/// ends).
pub async fn safekeeper(
    args: ArchiveArgs,
    socket: PathBuf,
    report: PathBuf,
    batch_ms: u64,
    repo_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let r = resolve(&args, repo_dir).await?;
    let batch = std::time::Duration::from_millis(batch_ms);
    let pgdata = args.pgdata.clone();
    crate::safekeeper::receiver::run(r.archive, r.history, socket, report, batch, pgdata)
        .await
        .map_err(|e| anyhow::anyhow!(e).into())
}

/// `zenith wal-fetch NAME DEST`: exit 0 (found), 1 (not in the archive), 255 (anything
/// else: recovery must stop).
pub async fn wal_fetch(
    name: String,
    dest: PathBuf,
    args: ArchiveArgs,
    prefetch: u64,
    prefetch_only: bool,
    repo_dir: Option<PathBuf>,
) -> Result<(), CliError> {
    let fatal = |e: String| {
        eprintln!("zenith: error: wal-fetch {name}: {e}");
        CliError::Exit(EXIT_FATAL)
    };
    let r = resolve(&args, repo_dir)
        .await
        .map_err(|e| fatal(cli_message(&e)))?;
    if prefetch_only {
        fetch::prefetch(&r.archive, &r.history, &name, &dest, prefetch)
            .await
            .map_err(|e| fatal(e.to_string()))?;
        return Ok(());
    }
    match fetch::fetch(&r.archive, &r.history, &name, &dest).await {
        Ok(fetch::Fetched::NotFound) => Err(CliError::Exit(1)),
        Ok(found) => {
            tracing::info!("restored {name} ({found:?})");
            if prefetch > 0 && name.len() == 24 {
                spawn_prefetch(&name, &dest, &args, prefetch);
            }
            Ok(())
        }
        Err(e) => Err(fatal(e.to_string())),
    }
}

fn cli_message(e: &CliError) -> String {
    match e {
        CliError::Other(e) => crate::util::message::full(e.as_ref()),
        other => other.to_string(),
    }
}

/// Starts `zenith wal-fetch --prefetch-only` for the segments after `name`, detached: it
/// outlives this call and ends by itself.
fn spawn_prefetch(name: &str, dest: &Path, args: &ArchiveArgs, count: u64) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "wal-fetch",
        "--prefetch-only",
        "--prefetch",
        &count.to_string(),
    ]);
    if let Some(t) = &args.target {
        cmd.arg("--target").arg(t);
    }
    if let Some(s) = &args.storage {
        cmd.arg("--storage").arg(s);
    }
    if let Some(h) = &args.history {
        cmd.arg("--history").arg(h);
    }
    if let Some(p) = &args.pgdata {
        cmd.arg("--pgdata").arg(p);
    }
    cmd.arg(name)
        .arg(dest)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; the prefetcher leaves PostgreSQL's process
    // group, so a signal meant for recovery's command does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        tracing::debug!("no prefetch: {e}");
    }
}

/// `zenith wal verify`.
pub async fn run(cmd: WalCommand, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    let WalCommand::Verify { storage, json } = cmd;
    let url = match storage {
        Some(s) => storage_url(&s, repo_dir)?,
        None => {
            let repo = crate::pageserver::Repo::existing(repo_dir)?;
            repo.config()?.storage_dest.ok_or_else(|| {
                anyhow::anyhow!("this repo has no storage_dest; pass --storage NAME|URL")
            })?
        }
    };
    let storage = crate::storage::open(&url).await?;
    // Where each history's oldest snapshot begins: the archive must be whole from there.
    let mut starts: BTreeMap<String, (u32, u64)> = BTreeMap::new();
    for m in crate::snapshot::zenith::list(storage.as_ref()).await? {
        let (Some(h), Some(lsn)) = (
            m.wal_history.clone(),
            crate::compute::wal::parse_lsn(&m.start_lsn),
        ) else {
            continue;
        };
        let start = (
            m.timeline,
            crate::compute::wal::segno_of(lsn, crate::compute::wal::DEFAULT_SEGMENT_SIZE),
        );
        let e = starts.entry(h).or_insert(start);
        *e = (*e).min(start);
    }
    let mut reports = Vec::new();
    for sysid in archive::clusters(storage.as_ref())
        .await
        .map_err(|e| anyhow::anyhow!(e))?
    {
        let archive = Archive::new(storage.clone(), sysid);
        for h in verify::verify(&archive, &starts)
            .await
            .map_err(|e| anyhow::anyhow!(e))?
        {
            reports.push((sysid, h));
        }
    }
    let gaps: usize = reports.iter().map(|(_, h)| h.gaps()).sum();
    if json {
        let rows: Vec<_> = reports
            .iter()
            .map(|(sysid, h)| serde_json::json!({ "system_identifier": sysid.to_string(), "report": h }))
            .collect();
        super::print_json(&rows);
    } else if reports.is_empty() {
        println!("no WAL archived in {}", storage.url());
    } else {
        for (sysid, h) in &reports {
            println!(
                "history {}{}{} (cluster {sysid})",
                h.history,
                h.pg.as_deref()
                    .map(|p| format!(" of pg {p}"))
                    .unwrap_or_default(),
                h.parent
                    .as_deref()
                    .map(|p| format!(", branched from {p}"))
                    .unwrap_or_default()
            );
            for t in &h.timelines {
                print!(
                    "  timeline {}: {} .. {}, {} segments",
                    t.timeline, t.first, t.last, t.segments
                );
                if let Some(lsn) = &t.streamed_to {
                    print!(" (the newest streamed by the safekeeper, up to {lsn})");
                }
                if t.gaps.is_empty() {
                    println!(", continuous");
                } else {
                    println!();
                    for (a, b) in &t.gaps {
                        println!("    GAP: {a} .. {b} missing");
                    }
                }
            }
        }
    }
    if gaps > 0 {
        eprintln!(
            "zenith: error: the WAL archive in {} has {gaps} gap(s); recovery stops at the first",
            storage.url()
        );
        return Err(CliError::Exit(1));
    }
    Ok(())
}
