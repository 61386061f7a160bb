//! `zenith pg ...` (compute nodes) and `zenith snapshot create`: branching and rolling
//! back pgs through the repo's local snapshot store.

use std::path::PathBuf;
use std::sync::Arc;

use super::{CliError, PgCommand};
use crate::compute::node::{make_dir, run_as, Node, NodeState, Status};
use crate::compute::PgInstall;
use crate::local::repo::Repo;
use crate::snapshot::native;
use crate::storage::Storage;

/// Names of pgs: what a directory, a snapshot name and a URL can all carry.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with('-');
    if !ok {
        anyhow::bail!(
            "{name:?} is not a pg name: use 1 to 63 lowercase letters, digits, '_' or '-'"
        );
    }
    Ok(())
}

async fn store(repo: &Repo) -> anyhow::Result<Arc<dyn Storage>> {
    Ok(crate::storage::open(&repo.store_url()).await?)
}

/// An existing pg of the repo.
fn existing(repo: &Repo, name: &str) -> anyhow::Result<(Node, NodeState)> {
    check_name(name)?;
    let node = repo.node(name);
    if !node.exists() {
        anyhow::bail!(
            "there is no pg {name:?} in {}; `zenith pg list` shows them",
            repo.root.display()
        );
    }
    let state = node.state()?;
    Ok((node, state))
}

/// A port for a new pg: free now, and promised to no other pg of the repo.
fn new_port(repo: &Repo) -> anyhow::Result<u16> {
    let config = repo.config()?;
    let promised: Vec<u16> = repo
        .nodes()
        .iter()
        .filter_map(|n| n.state().ok().map(|s| s.port))
        .collect();
    (config.pg_port..=u16::MAX)
        .take(1000)
        .find(|p| !promised.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .ok_or_else(|| anyhow::anyhow!("no free port near {}", config.pg_port))
}

/// Starts a pg this command runs on its own (zenith-local supervises only `main`), and
/// gives its superuser the pg's password.
async fn start_detached(install: &PgInstall, node: &Node, state: &NodeState) -> anyhow::Result<()> {
    if node.status() == Status::Running {
        return Ok(());
    }
    // The child keeps running after zenith exits; it is in its own process group.
    let child = node.start(install, state).await?;
    drop(child);
    node.set_password(install, state).await
}

/// Waits until a supervisor has started `node` again.
async fn wait_running(node: &Node) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if node.status() == Status::Running && node.ready() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "pg {} did not come back in 120 s; see {}",
                node.name,
                node.log().display()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn show(node: &Node, state: &NodeState) -> serde_json::Value {
    serde_json::json!({
        "name": node.name,
        "status": node.status(),
        "port": state.port,
        "connstr": node.connstr(state),
        "data_directory": node.data(),
        "log": node.log(),
    })
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
            check_name(&name)?;
            let node = repo.node(&name);
            if node.dir.exists() {
                return Err(anyhow::anyhow!(
                    "pg {name:?} already exists; nothing was changed (`zenith pg destroy {name}` removes it)"
                )
                .into());
            }
            let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
            let port = new_port(&repo)?;
            let created = create(&repo, &install, &node, port, snapshot.as_deref(), progress).await;
            let state = match created {
                Ok(state) => state,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&node.dir);
                    return Err(e.into());
                }
            };
            if !no_start {
                start_detached(&install, &node, &state).await?;
            }
            println!(
                "created pg {name}{}{}",
                snapshot
                    .map(|s| format!(" from snapshot {s}"))
                    .unwrap_or_default(),
                if no_start { " (not started)" } else { "" }
            );
            println!("pg {name}: {}", node.connstr(&state));
            Ok(())
        }
        PgCommand::Start { name, .. } => {
            let (node, state) = existing(&repo, &name)?;
            let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
            start_detached(&install, &node, &state).await?;
            println!("pg {name}: {}", node.connstr(&state));
            Ok(())
        }
        PgCommand::Stop { name } => {
            let (node, _) = existing(&repo, &name)?;
            if name == "main" && crate::local::running(&repo).is_some() {
                return Err(anyhow::anyhow!(
                    "pg main runs under zenith-local, which would start it again; `zenith stop` stops both"
                )
                .into());
            }
            node.stop(false).await?;
            println!("stopped pg {name}");
            Ok(())
        }
        PgCommand::Destroy { name } => {
            let (node, _) = existing(&repo, &name)?;
            if name == "main" {
                return Err(anyhow::anyhow!(
                    "pg main is the repo's own pg and is not destroyed; its snapshots stay in the repo"
                )
                .into());
            }
            node.stop(true).await?;
            std::fs::remove_dir_all(&node.dir)
                .map_err(|e| anyhow::anyhow!("{}: {e}", node.dir.display()))?;
            println!("destroyed pg {name} (its snapshots stay in the repo)");
            Ok(())
        }
        PgCommand::List { json } => {
            let mut rows = Vec::new();
            for node in repo.nodes().into_iter().filter(|n| n.exists()) {
                let state = node.state()?;
                rows.push(show(&node, &state));
            }
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
            Ok(())
        }
        PgCommand::Show { name, json } => {
            let (node, state) = existing(&repo, &name)?;
            let row = show(&node, &state);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&row).expect("serializes")
                );
            } else {
                for (k, v) in row.as_object().expect("object") {
                    println!(
                        "{k:<16} {}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    );
                }
            }
            Ok(())
        }
        PgCommand::Checkout { name, snapshot } => checkout(&repo, &name, &snapshot, progress).await,
        PgCommand::Promote { .. } => Err(CliError::NotImplemented("pg promote".into())),
    }
}

/// A new pg's data: from a snapshot of the repo, or a fresh initdb.
async fn create(
    repo: &Repo,
    install: &PgInstall,
    node: &Node,
    port: u16,
    snapshot: Option<&str>,
    progress: bool,
) -> anyhow::Result<NodeState> {
    let Some(reference) = snapshot else {
        return node.init(install, port);
    };
    let store = store(repo).await?;
    let m = native::resolve(store.as_ref(), reference).await?;
    let account = run_as()?;
    make_dir(&node.dir, account.as_ref())?;
    let bar = super::progress::bar("restore", progress);
    native::unpack(store.as_ref(), &m, &node.data(), &bar).await?;
    crate::compute::hand_to_postgres_user(&node.dir).map_err(anyhow::Error::msg)?;
    let state = NodeState {
        port,
        password: crate::compute::node::generate_password(),
    };
    node.save_state(&state)?;
    Ok(state)
}

/// `PG@TAG` (or `PG`) into the pg and the snapshot name.
fn split_reference(text: Option<&str>) -> (String, Option<String>) {
    match text {
        None => ("main".into(), None),
        Some(t) => match t.split_once('@') {
            Some((pg, _)) => (pg.to_string(), Some(t.to_string())),
            None => (t.to_string(), None),
        },
    }
}

/// `zenith snapshot create [PG@TAG]`: online when the pg runs, from its directory when not.
pub async fn snapshot_create(
    name: Option<String>,
    repo_dir: Option<PathBuf>,
    progress: bool,
) -> Result<(), CliError> {
    let repo = Repo::existing(repo_dir)?;
    let (pg, snapshot_name) = split_reference(name.as_deref());
    let (node, state) = existing(&repo, &pg)?;
    if let Some(n) = &snapshot_name {
        if n.contains("@HEAD") {
            return Err(anyhow::anyhow!(
                "{n:?}: names with @HEAD are kept for checkouts; choose another tag"
            )
            .into());
        }
    }
    let store = store(&repo).await?;
    let m = take(&repo, &node, &state, store, snapshot_name, progress).await?;
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

/// Snapshots a pg into the repo's store under `name`, which must be new.
async fn take(
    _repo: &Repo,
    node: &Node,
    state: &NodeState,
    store: Arc<dyn Storage>,
    name: Option<String>,
    progress: bool,
) -> anyhow::Result<crate::snapshot::Manifest> {
    if let Some(n) = &name {
        if native::list(store.as_ref())
            .await?
            .iter()
            .any(|m| m.name.as_deref() == Some(n))
        {
            anyhow::bail!("a snapshot named {n:?} already exists; choose another tag");
        }
    }
    let options = native::PackOptions {
        name,
        parent: None,
        progress: super::progress::bar("snapshot", progress),
    };
    let report = if node.status() == Status::Running {
        let install = crate::compute::find_postgres()?;
        native::pack_online(&install, &node.local_connstr(state), store, &options).await?
    } else {
        native::pack_dir(&node.data(), store, &options, None).await?
    };
    Ok(report.manifest)
}

/// `zenith pg checkout NAME REF`: keeps NAME's state as `NAME@HEAD{n}`, then replaces its
/// data with REF and starts it again. Nothing is lost: the old state is a snapshot before
/// anything is replaced.
async fn checkout(
    repo: &Repo,
    name: &str,
    reference: &str,
    progress: bool,
) -> Result<(), CliError> {
    let (node, state) = existing(repo, name)?;
    let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
    let store = store(repo).await?;
    // The target first: an unknown reference changes nothing.
    let target = native::resolve(store.as_ref(), reference)
        .await
        .map_err(anyhow::Error::from)?;
    let supervised = name == "main" && crate::local::running(repo).is_some();
    let was_running = node.status() == Status::Running;
    std::fs::write(node.hold_path(), b"checkout").map_err(anyhow::Error::from)?;
    let result = async {
        node.stop(false).await?;
        let heads = native::list(store.as_ref())
            .await?
            .iter()
            .filter(|m| {
                m.name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&format!("{name}@HEAD{{")))
            })
            .count();
        let head = format!("{name}@HEAD{{{heads}}}");
        let kept = take(
            repo,
            &node,
            &state,
            Arc::clone(&store),
            Some(head.clone()),
            progress,
        )
        .await?;
        // The new data next to the old, swapped only when complete.
        let fresh = node.dir.join("data.checkout");
        let _ = std::fs::remove_dir_all(&fresh);
        let bar = super::progress::bar("checkout", progress);
        native::unpack(store.as_ref(), &target, &fresh, &bar).await?;
        crate::compute::hand_to_postgres_user(&fresh).map_err(anyhow::Error::msg)?;
        let old = node.dir.join("data.old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(node.data(), &old)?;
        std::fs::rename(&fresh, node.data())?;
        std::fs::remove_dir_all(&old)?;
        anyhow::Ok((head, kept.id))
    }
    .await;
    let _ = std::fs::remove_file(node.hold_path());
    let (head, kept_id) = result?;
    if supervised {
        wait_running(&node).await?;
        node.set_password(&install, &state).await?;
    } else if was_running {
        start_detached(&install, &node, &state).await?;
    }
    println!("pg {name}: kept its previous state as snapshot {kept_id} ({head}); now at {reference} ({})", target.id);
    if supervised || was_running {
        println!("pg {name}: {}", node.connstr(&state));
    }
    Ok(())
}
