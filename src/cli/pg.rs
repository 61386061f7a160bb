//! `zenith pg ...` (compute nodes) and `zenith snapshot create`: printing what
//! [`crate::local::ops`] does.

use std::path::PathBuf;

use super::{CliError, PgCommand};
use crate::local::ops::{self, OpError};
use crate::local::repo::Repo;

impl From<OpError> for CliError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotImplemented(what) => CliError::NotImplemented(what),
            OpError::Other(e) => CliError::Other(e),
            other => CliError::Other(anyhow::anyhow!(other.to_string())),
        }
    }
}

pub async fn run(
    cmd: PgCommand,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    match &cmd {
        PgCommand::Promote { .. } => return Err(CliError::NotImplemented("pg promote".into())),
        PgCommand::Start { replica: true, .. } => {
            return Err(CliError::NotImplemented("pg start --replica".into()))
        }
        _ => {}
    }
    let repo = Repo::existing(repo_dir)?;
    match cmd {
        PgCommand::Create {
            name,
            snapshot,
            no_start,
        } => {
            let bar = super::progress::bar("restore", progress);
            let pg = ops::create_pg(&repo, &name, snapshot.as_deref(), no_start, bar).await?;
            println!(
                "created pg {name}{}{}",
                snapshot
                    .map(|s| format!(" from snapshot {s}"))
                    .unwrap_or_default(),
                if no_start { " (not started)" } else { "" }
            );
            println!("pg {name}: {}", pg["connstr"].as_str().unwrap_or(""));
        }
        PgCommand::Start { name, .. } => {
            let pg = ops::start_pg(&repo, &name).await?;
            println!("pg {name}: {}", pg["connstr"].as_str().unwrap_or(""));
        }
        PgCommand::Stop { name } => {
            ops::stop_pg(&repo, &name).await?;
            println!("stopped pg {name}");
        }
        PgCommand::Destroy { name } => {
            ops::destroy_pg(&repo, &name).await?;
            println!("destroyed pg {name} (its snapshots stay in the repo)");
        }
        PgCommand::List { json } => {
            let rows = ops::list_pgs(&repo)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).expect("serializes")
                );
            } else {
                println!("{:<16}  {:<8}  {:>5}  CONNSTR", "NAME", "STATUS", "PORT");
                for r in &rows {
                    println!(
                        "{:<16}  {:<8}  {:>5}  {}",
                        r["name"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        r["port"],
                        r["connstr"].as_str().unwrap_or("")
                    );
                }
            }
        }
        PgCommand::Show { name, json } => {
            let row = ops::show_pg(&repo, &name)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&row).expect("serializes")
                );
            } else {
                super::print_fields(&row);
            }
        }
        PgCommand::Checkout { name, snapshot } => {
            let bar = super::progress::bar("checkout", progress);
            let done = ops::checkout(&repo, &name, &snapshot, bar).await?;
            println!(
                "pg {name}: kept its previous state as snapshot {} ({}); now at {snapshot} ({})",
                done.kept.id,
                done.kept.name.as_deref().unwrap_or(""),
                done.target.id
            );
            if let Some(pg) = done.pg {
                println!("pg {name}: {}", pg["connstr"].as_str().unwrap_or(""));
            }
        }
        PgCommand::Promote { .. } => return Err(CliError::NotImplemented("pg promote".into())),
    }
    Ok(())
}

/// `zenith snapshot create [PG@TAG]`.
pub async fn snapshot_create(
    name: Option<String>,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = Repo::existing(repo_dir)?;
    let bar = super::progress::bar("snapshot", progress);
    let m = ops::create_snapshot(&repo, name.as_deref(), bar).await?;
    let (pg, _) = ops::split_reference(name.as_deref());
    println!(
        "snapshot {}{} of pg {pg}: {} ({} new)",
        m.id,
        m.name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        crate::util::size::format_size(m.total_size),
        crate::util::size::format_size(m.stored_size)
    );
    Ok(())
}
