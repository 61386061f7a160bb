//! `zenith pg ...` (compute nodes) and `zenith snapshot create`: requests to zenith-local
//! while it runs, the same operations in this process when not (one [`Control`] either
//! way).

use std::path::PathBuf;

use super::client::Client;
use super::{CliError, PgCommand};
use crate::local::{Control, Ops};
use crate::models::{NewPg, PgInfo};
use crate::pageserver::{split_reference, Repo};
use crate::util::message::printable;
use crate::util::progress::ProgressHandle;

/// Where a command is carried out: zenith-local's API while it runs, else here.
pub struct Backend {
    control: Box<dyn Control>,
    /// Carried out in this process: progress can be drawn.
    here: bool,
    progress: bool,
}

impl Backend {
    pub fn for_repo(repo: &Repo, progress: bool) -> Result<Backend, CliError> {
        Ok(match Client::for_repo(repo)? {
            Some(client) => Backend {
                control: Box::new(client),
                here: false,
                progress,
            },
            None => Backend {
                control: Box::new(Ops::direct(repo.clone())),
                here: true,
                progress,
            },
        })
    }

    /// A progress bar for work carried out here; through the API, none.
    pub fn bar(&self, what: &str) -> ProgressHandle {
        if self.here {
            super::progress::bar(what, self.progress)
        } else {
            ProgressHandle::default()
        }
    }
}

impl std::ops::Deref for Backend {
    type Target = dyn Control;
    fn deref(&self) -> &Self::Target {
        self.control.as_ref()
    }
}

pub async fn run(
    cmd: PgCommand,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = Repo::existing(repo_dir)?;
    let backend = Backend::for_repo(&repo, progress)?;
    match cmd {
        PgCommand::Create {
            name,
            snapshot,
            at,
            from,
            no_start,
        } => {
            let new = NewPg {
                name: name.clone(),
                snapshot: snapshot.clone(),
                at: at.clone(),
                from: from.clone(),
                start: !no_start,
            };
            let pg = backend.create_pg(new, backend.bar("restore")).await?;
            let origin = match (&snapshot, &at) {
                (Some(s), _) => format!(" from snapshot {s}"),
                (None, Some(at)) => {
                    format!(" as pg {} was at {at}", from.as_deref().unwrap_or("main"))
                }
                (None, None) => String::new(),
            };
            println!(
                "created pg {name}{origin}{}",
                if no_start && at.is_none() {
                    " (not started)"
                } else {
                    ""
                }
            );
            print_connstr(&pg);
        }
        PgCommand::Start {
            name,
            replica,
            primary,
        } => {
            let pg = backend
                .start_pg(&name, replica, primary, backend.bar("start"))
                .await?;
            if let Some(p) = &pg.primary {
                println!("pg {name} follows pg {p} (streaming replica, read-only)");
            }
            print_connstr(&pg);
        }
        PgCommand::Stop { name, immediate } => {
            backend.stop_pg(&name, immediate).await?;
            println!("stopped pg {name}");
        }
        PgCommand::Promote { name } => {
            let pg = backend.promote_pg(&name).await?;
            println!("promoted pg {name}: it is a primary of its own now");
            print_connstr(&pg);
        }
        PgCommand::Destroy { name } => {
            backend.destroy_pg(&name).await?;
            println!("destroyed pg {name} (its snapshots stay in the repo)");
        }
        PgCommand::List { json } => {
            let rows = backend.list_pgs().await?;
            if json {
                super::print_json(&rows);
            } else {
                println!(
                    "{:<16}  {:<8}  {:<12}  {:>5}  CONNSTR",
                    "NAME", "STATUS", "ROLE", "PORT"
                );
                for r in &rows {
                    let role = match &r.primary {
                        Some(p) => format!("replica:{p}"),
                        None => "primary".into(),
                    };
                    println!(
                        "{:<16}  {:<8}  {:<12}  {:>5}  {}",
                        r.name,
                        super::json_word(&r.status),
                        role,
                        r.port,
                        r.connstr
                    );
                }
            }
        }
        PgCommand::Show { name, json } => {
            let row = backend.show_pg(&name).await?;
            if json {
                super::print_json(&row);
            } else {
                super::print_fields(&row);
            }
        }
        PgCommand::Checkout { name, snapshot, at } => {
            let done = backend
                .checkout_pg(
                    &name,
                    snapshot.as_deref(),
                    at.as_deref(),
                    backend.bar("checkout"),
                )
                .await?;
            let now_at = match (&snapshot, &at) {
                (Some(s), _) => format!("{s} ({})", done.target.id),
                (None, Some(at)) => format!(
                    "{at} (snapshot {} and the WAL archived after it)",
                    done.target.id
                ),
                (None, None) => done.target.id.clone(),
            };
            println!(
                "pg {name}: kept its previous state as snapshot {} ({}); now at {now_at}",
                done.kept.id,
                printable(done.kept.name.as_deref().unwrap_or("")),
            );
            if let Some(pg) = &done.pg {
                print_connstr(pg);
            }
        }
    }
    Ok(())
}

fn print_connstr(pg: &PgInfo) {
    println!("pg {}: {}", pg.name, pg.connstr);
}

/// `zenith snapshot create [PG@TAG]`.
pub async fn snapshot_create(
    name: Option<String>,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = Repo::existing(repo_dir)?;
    let backend = Backend::for_repo(&repo, progress)?;
    let m = backend
        .create_snapshot(name.clone(), backend.bar("snapshot"))
        .await?;
    let (pg, _) = split_reference(name.as_deref());
    let size = crate::util::size::format_size;
    let how = match m.clone {
        Some(_) => "a thin clone: it shares every block with the pg".to_string(),
        None => format!("{} new", size(m.stored_size)),
    };
    println!(
        "snapshot {} of pg {pg}: {} ({how})",
        printable(&m.label()),
        size(m.total_size),
    );
    Ok(())
}
