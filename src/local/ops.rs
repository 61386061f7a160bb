//! What the CLI and the REST API do with pgs and the repo's snapshots: one implementation,
//! returning JSON-ready values and errors that say what kind of failure they are.

use std::sync::Arc;

use serde_json::{json, Value};

use super::repo::Repo;
use crate::compute::node::{make_dir, run_as, Node, NodeState, Status};
use crate::compute::PgInstall;
use crate::snapshot::{native, Manifest};
use crate::storage::Storage;

/// A failed operation, by kind (the REST API maps kinds to HTTP statuses).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotImplemented(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl From<crate::snapshot::SnapshotError> for OpError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        match e {
            crate::snapshot::SnapshotError::NotFound { .. } => OpError::NotFound(e.to_string()),
            crate::snapshot::SnapshotError::Ambiguous { .. } => OpError::BadRequest(e.to_string()),
            other => OpError::Other(other.into()),
        }
    }
}

pub type OpResult<T> = std::result::Result<T, OpError>;

/// Names of pgs: what a directory, a snapshot name and a URL can all carry.
pub fn check_name(name: &str) -> OpResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with('-');
    if !ok {
        return Err(OpError::BadRequest(format!(
            "{name:?} is not a pg name: use 1 to 63 lowercase letters, digits, '_' or '-'"
        )));
    }
    Ok(())
}

async fn store(repo: &Repo) -> OpResult<Arc<dyn Storage>> {
    Ok(crate::storage::open(&repo.store_url())
        .await
        .map_err(anyhow::Error::from)?)
}

fn install() -> OpResult<PgInstall> {
    Ok(crate::compute::find_postgres().map_err(anyhow::Error::from)?)
}

/// An existing pg of the repo.
pub fn existing(repo: &Repo, name: &str) -> OpResult<(Node, NodeState)> {
    check_name(name)?;
    let node = repo.node(name);
    if !node.exists() {
        return Err(OpError::NotFound(format!(
            "there is no pg {name:?} in {}; `zenith pg list` shows them",
            repo.root.display()
        )));
    }
    let state = node.state()?;
    Ok((node, state))
}

/// A port for a new pg: free now, and promised to no other pg of the repo.
fn new_port(repo: &Repo) -> OpResult<u16> {
    let config = repo.config()?;
    let promised: Vec<u16> = repo
        .nodes()
        .iter()
        .filter_map(|n| n.state().ok().map(|s| s.port))
        .collect();
    Ok(super::free_port_except(config.pg_port, &promised)?)
}

/// Starts a pg outside zenith-local's supervision (which covers `main`) and gives its
/// superuser the pg's password. The server is reaped by a background task while this
/// process lives, and by init after.
pub async fn start_detached(install: &PgInstall, node: &Node, state: &NodeState) -> OpResult<()> {
    if node.status() == Status::Running {
        return Ok(());
    }
    let mut child = node.start(install, state).await?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(node.set_password(install, state).await?)
}

/// Waits until a supervisor has started `node` again.
async fn wait_running(node: &Node) -> OpResult<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if node.status() == Status::Running && node.ready() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "pg {} did not come back in 120 s; see {}",
                node.name,
                node.log().display()
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A pg as `pg show --json` and `GET /pgs/NAME` describe it.
pub fn describe(node: &Node, state: &NodeState) -> Value {
    json!({
        "name": node.name,
        "status": node.status(),
        "port": state.port,
        "connstr": node.connstr(state),
        "data_directory": node.data(),
        "log": node.log(),
    })
}

pub fn list_pgs(repo: &Repo) -> OpResult<Vec<Value>> {
    let mut rows = Vec::new();
    for node in repo.nodes().into_iter().filter(|n| n.exists()) {
        let state = node.state()?;
        rows.push(describe(&node, &state));
    }
    Ok(rows)
}

pub fn show_pg(repo: &Repo, name: &str) -> OpResult<Value> {
    let (node, state) = existing(repo, name)?;
    Ok(describe(&node, &state))
}

/// Creates a pg, empty or from a snapshot of the repo; started unless `no_start`.
pub async fn create_pg(
    repo: &Repo,
    name: &str,
    snapshot: Option<&str>,
    no_start: bool,
    progress: crate::util::progress::ProgressHandle,
) -> OpResult<Value> {
    check_name(name)?;
    let node = repo.node(name);
    if node.dir.exists() {
        return Err(OpError::Conflict(format!(
            "pg {name:?} already exists; nothing was changed (`zenith pg destroy {name}` removes it)"
        )));
    }
    let install = install()?;
    let port = new_port(repo)?;
    let state = match fill(repo, &install, &node, port, snapshot, progress).await {
        Ok(state) => state,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&node.dir);
            return Err(e);
        }
    };
    if !no_start {
        start_detached(&install, &node, &state).await?;
    }
    Ok(describe(&node, &state))
}

/// A new pg's data: from a snapshot of the repo, or a fresh initdb.
async fn fill(
    repo: &Repo,
    install: &PgInstall,
    node: &Node,
    port: u16,
    snapshot: Option<&str>,
    progress: crate::util::progress::ProgressHandle,
) -> OpResult<NodeState> {
    let Some(reference) = snapshot else {
        return Ok(node.init(install, port)?);
    };
    let store = store(repo).await?;
    let m = native::resolve(store.as_ref(), reference).await?;
    let account = run_as()?;
    make_dir(&node.dir, account.as_ref())?;
    materialize(store.as_ref(), &m, &node.data(), &progress).await?;
    let state = NodeState {
        port,
        password: crate::compute::node::generate_password(),
    };
    node.save_state(&state)?;
    Ok(state)
}

/// Restores a snapshot into the new data directory `dir`, owned by PostgreSQL's account.
async fn materialize(
    store: &dyn Storage,
    m: &Manifest,
    dir: &std::path::Path,
    progress: &crate::util::progress::ProgressHandle,
) -> OpResult<()> {
    native::unpack(store, m, dir, progress).await?;
    crate::compute::hand_to_postgres_user(dir).map_err(anyhow::Error::msg)?;
    Ok(())
}

pub async fn start_pg(repo: &Repo, name: &str) -> OpResult<Value> {
    let (node, state) = existing(repo, name)?;
    start_detached(&install()?, &node, &state).await?;
    Ok(describe(&node, &state))
}

pub async fn stop_pg(repo: &Repo, name: &str) -> OpResult<Value> {
    let (node, state) = existing(repo, name)?;
    if name == "main" && super::running(repo).is_some() {
        return Err(OpError::Conflict(
            "pg main runs under zenith-local, which would start it again; `zenith stop` stops both"
                .into(),
        ));
    }
    node.stop(false).await?;
    Ok(describe(&node, &state))
}

pub async fn destroy_pg(repo: &Repo, name: &str) -> OpResult<()> {
    let (node, _) = existing(repo, name)?;
    if name == "main" {
        return Err(OpError::Conflict(
            "pg main is the repo's own pg and is not destroyed; its snapshots stay in the repo"
                .into(),
        ));
    }
    node.stop(true).await?;
    std::fs::remove_dir_all(&node.dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", node.dir.display()))?;
    Ok(())
}

/// `PG@TAG` (or `PG`) into the pg and the snapshot name.
pub fn split_reference(text: Option<&str>) -> (String, Option<String>) {
    match text {
        None => ("main".into(), None),
        Some(t) => match t.split_once('@') {
            Some((pg, _)) => (pg.to_string(), Some(t.to_string())),
            None => (t.to_string(), None),
        },
    }
}

/// Snapshots a pg into the repo: online when it runs, from its directory when not.
pub async fn create_snapshot(
    repo: &Repo,
    reference: Option<&str>,
    progress: crate::util::progress::ProgressHandle,
) -> OpResult<Manifest> {
    let (pg, name) = split_reference(reference);
    let (node, state) = existing(repo, &pg)?;
    if let Some(n) = &name {
        if n.contains("@HEAD") {
            return Err(OpError::BadRequest(format!(
                "{n:?}: names with @HEAD are kept for checkouts; choose another tag"
            )));
        }
    }
    take(&node, &state, store(repo).await?, name, progress).await
}

/// Snapshots a pg into `store` under `name`, which must be new.
async fn take(
    node: &Node,
    state: &NodeState,
    store: Arc<dyn Storage>,
    name: Option<String>,
    progress: crate::util::progress::ProgressHandle,
) -> OpResult<Manifest> {
    if let Some(n) = &name {
        if native::list(store.as_ref())
            .await?
            .iter()
            .any(|m| m.name.as_deref() == Some(n))
        {
            return Err(OpError::Conflict(format!(
                "a snapshot named {n:?} already exists; choose another tag"
            )));
        }
    }
    let options = native::PackOptions {
        name,
        parent: None,
        progress,
    };
    let report = if node.status() == Status::Running {
        native::pack_online(&install()?, &node.local_connstr(state), store, &options).await?
    } else {
        native::pack_dir(&node.data(), store, &options, None).await?
    };
    Ok(report.manifest)
}

pub async fn list_snapshots(repo: &Repo) -> OpResult<Vec<Manifest>> {
    Ok(native::list(store(repo).await?.as_ref()).await?)
}

pub async fn show_snapshot(repo: &Repo, reference: &str) -> OpResult<Manifest> {
    Ok(native::resolve(store(repo).await?.as_ref(), reference).await?)
}

pub async fn delete_snapshot(repo: &Repo, reference: &str) -> OpResult<native::DeleteReport> {
    let store = store(repo).await?;
    let m = native::resolve(store.as_ref(), reference).await?;
    // The repo's own store: no other writer but this machine, so a short grace suffices.
    Ok(native::delete(store, &m, std::time::Duration::from_secs(60), 0.05).await?)
}

/// What a checkout did.
pub struct Checkout {
    pub kept: Manifest,
    pub target: Manifest,
    pub pg: Option<Value>,
}

/// `pg checkout NAME REF`: keeps NAME's state as `NAME@HEAD{n}`, then replaces its data
/// with REF and starts it again if it ran. Nothing is lost: the old state is a snapshot
/// before anything is replaced, and an unknown REF changes nothing.
pub async fn checkout(
    repo: &Repo,
    name: &str,
    reference: &str,
    progress: crate::util::progress::ProgressHandle,
) -> OpResult<Checkout> {
    let (node, state) = existing(repo, name)?;
    let install = install()?;
    let store = store(repo).await?;
    let target = native::resolve(store.as_ref(), reference).await?;
    let supervised = name == "main" && super::running(repo).is_some();
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
            &node,
            &state,
            Arc::clone(&store),
            Some(head),
            progress.clone(),
        )
        .await?;
        // The new data next to the old, swapped only when complete.
        let fresh = node.dir.join("data.checkout");
        let _ = std::fs::remove_dir_all(&fresh);
        materialize(store.as_ref(), &target, &fresh, &progress).await?;
        let old = node.dir.join("data.old");
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(node.data(), &old).map_err(anyhow::Error::from)?;
        std::fs::rename(&fresh, node.data()).map_err(anyhow::Error::from)?;
        std::fs::remove_dir_all(&old).map_err(anyhow::Error::from)?;
        OpResult::Ok(kept)
    }
    .await;
    let _ = std::fs::remove_file(node.hold_path());
    let kept = result?;
    if supervised {
        wait_running(&node).await?;
        node.set_password(&install, &state).await?;
    } else if was_running {
        start_detached(&install, &node, &state).await?;
    }
    Ok(Checkout {
        kept,
        target,
        pg: (supervised || was_running).then(|| describe(&node, &state)),
    })
}
