//! `zenith pg ...` (compute nodes) and `zenith snapshot create`: requests to zenith-local
//! while it runs, the same operations ([`crate::local::ops`]) in this process when not.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::client::{segment, Client};
use super::{CliError, PgCommand};
use crate::local::ops::{self, Action, OpError, Ops};
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

/// Where a command is carried out.
pub enum Backend {
    /// zenith-local runs: through its REST API.
    Api(Client),
    /// zenith-local is down: here.
    Direct(Ops),
}

impl Backend {
    pub fn for_repo(repo: &Repo) -> Result<Backend, CliError> {
        Ok(match Client::for_repo(repo)? {
            Some(client) => Backend::Api(client),
            None => Backend::Direct(Ops::direct(repo.clone())),
        })
    }

    async fn action(&self, name: &str, action: Action, progress: bool) -> Result<Value, CliError> {
        match self {
            Backend::Api(c) => {
                let body = serde_json::to_value(&action).expect("serializes");
                c.call(
                    "POST",
                    &format!("/pgs/{}/actions", segment(name)),
                    Some(&body),
                )
                .await
            }
            Backend::Direct(ops) => {
                let bar = super::progress::bar(&action.action, progress);
                Ok(ops.act(name, &action, bar).await?)
            }
        }
    }

    pub async fn status(&self) -> Result<Value, CliError> {
        match self {
            Backend::Api(c) => c.get("/status").await,
            Backend::Direct(ops) => Ok(ops.status().await?),
        }
    }
}

pub async fn run(
    cmd: PgCommand,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = Repo::existing(repo_dir)?;
    let backend = Backend::for_repo(&repo)?;
    match cmd {
        PgCommand::Create {
            name,
            snapshot,
            no_start,
        } => {
            let pg = match &backend {
                Backend::Api(c) => {
                    let body = json!({ "name": name, "snapshot": snapshot, "start": !no_start });
                    c.call("PUT", "/pgs", Some(&body)).await?
                }
                Backend::Direct(ops) => {
                    let bar = super::progress::bar("restore", progress);
                    ops.create_pg(&name, snapshot.as_deref(), no_start, bar)
                        .await?
                }
            };
            println!(
                "created pg {name}{}{}",
                snapshot
                    .map(|s| format!(" from snapshot {s}"))
                    .unwrap_or_default(),
                if no_start { " (not started)" } else { "" }
            );
            print_connstr(&pg);
        }
        PgCommand::Start {
            name,
            replica,
            primary,
        } => {
            let action = Action {
                action: "start".into(),
                is_replica: replica,
                primary,
                ..Action::default()
            };
            let pg = backend.action(&name, action, progress).await?;
            if let Some(p) = pg["primary"].as_str() {
                println!("pg {name} follows pg {p} (streaming replica, read-only)");
            }
            print_connstr(&pg);
        }
        PgCommand::Stop { name, immediate } => {
            let action = Action {
                action: "stop".into(),
                immediate,
                ..Action::default()
            };
            backend.action(&name, action, progress).await?;
            println!("stopped pg {name}");
        }
        PgCommand::Promote { name } => {
            let action = Action {
                action: "promote".into(),
                ..Action::default()
            };
            let pg = backend.action(&name, action, progress).await?;
            println!("promoted pg {name}: it is a primary of its own now");
            print_connstr(&pg);
        }
        PgCommand::Destroy { name } => {
            match &backend {
                Backend::Api(c) => {
                    c.call("DELETE", &format!("/pgs/{}", segment(&name)), None)
                        .await?;
                }
                Backend::Direct(ops) => ops.destroy_pg(&name).await?,
            }
            println!("destroyed pg {name} (its snapshots stay in the repo)");
        }
        PgCommand::List { json } => {
            let rows = match &backend {
                Backend::Api(c) => c.get("/pgs").await?,
                Backend::Direct(ops) => Value::Array(ops.list_pgs()?),
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).expect("serializes")
                );
            } else {
                println!(
                    "{:<16}  {:<8}  {:<12}  {:>5}  CONNSTR",
                    "NAME", "STATUS", "ROLE", "PORT"
                );
                for r in rows.as_array().into_iter().flatten() {
                    let role = match r["primary"].as_str() {
                        Some(p) => format!("replica:{p}"),
                        None => "primary".into(),
                    };
                    println!(
                        "{:<16}  {:<8}  {:<12}  {:>5}  {}",
                        r["name"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        role,
                        r["port"],
                        r["connstr"].as_str().unwrap_or("")
                    );
                }
            }
        }
        PgCommand::Show { name, json } => {
            let row = match &backend {
                Backend::Api(c) => c.get(&format!("/pgs/{}", segment(&name))).await?,
                Backend::Direct(ops) => ops.show_pg(&name)?,
            };
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
            let action = Action {
                action: "checkout".into(),
                snapshot: Some(snapshot.clone()),
                ..Action::default()
            };
            let done = backend.action(&name, action, progress).await?;
            println!(
                "pg {name}: kept its previous state as snapshot {} ({}); now at {snapshot} ({})",
                done["kept"]["id"].as_str().unwrap_or(""),
                done["kept"]["name"].as_str().unwrap_or(""),
                done["target"]["id"].as_str().unwrap_or("")
            );
            if !done["pg"].is_null() {
                print_connstr(&done["pg"]);
            }
        }
    }
    Ok(())
}

fn print_connstr(pg: &Value) {
    println!(
        "pg {}: {}",
        pg["name"].as_str().unwrap_or(""),
        pg["connstr"].as_str().unwrap_or("")
    );
}

/// `zenith snapshot create [PG@TAG]`.
pub async fn snapshot_create(
    name: Option<String>,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = Repo::existing(repo_dir)?;
    let m = match Backend::for_repo(&repo)? {
        Backend::Api(c) => {
            c.call("POST", "/snapshots", Some(&json!({ "name": name })))
                .await?
        }
        Backend::Direct(ops) => {
            let bar = super::progress::bar("snapshot", progress);
            ops.create_snapshot(name.as_deref(), bar).await?.summary()
        }
    };
    let (pg, _) = ops::split_reference(name.as_deref());
    let size = |k: &str| crate::util::size::format_size(m[k].as_u64().unwrap_or(0));
    println!(
        "snapshot {} of pg {pg}: {} ({} new)",
        super::snapshot_label(&m),
        size("total_size"),
        size("stored_size")
    );
    Ok(())
}
