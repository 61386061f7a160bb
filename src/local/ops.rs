//! What the CLI and the REST API do with pgs and the repo's snapshots: one implementation,
//! returning JSON-ready values and errors that say what kind of failure they are.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::replica;
use super::repo::Repo;
use super::supervisor::Supervisor;
use crate::compute::node::{make_dir, run_as, Node, NodeState, Status};
use crate::compute::PgInstall;
use crate::snapshot::{native, Manifest};
use crate::storage::Storage;
use crate::util::progress::ProgressHandle;

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
    /// zenith-local is stopping.
    #[error("{0}")]
    Unavailable(String),
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

/// A storage by URL.
pub(super) async fn open(url: &str) -> OpResult<Arc<dyn Storage>> {
    Ok(crate::storage::open(url)
        .await
        .map_err(anyhow::Error::from)?)
}

/// The repo's own snapshot store.
pub(super) async fn store(repo: &Repo) -> OpResult<Arc<dyn Storage>> {
    open(&repo.store_url()).await
}

/// Refuses a name kept for checkouts (`PG@HEAD{n}`).
pub(super) fn refuse_head_name(name: &str) -> OpResult<()> {
    if name.contains("@HEAD") {
        return Err(OpError::BadRequest(format!(
            "{name:?}: names with @HEAD are kept for checkouts; choose another"
        )));
    }
    Ok(())
}

/// Refuses a snapshot name `store` already has.
pub(super) async fn refuse_taken_name(store: &dyn Storage, name: &str) -> OpResult<()> {
    if native::list(store)
        .await?
        .iter()
        .any(|m| m.name.as_deref() == Some(name))
    {
        return Err(OpError::Conflict(format!(
            "a snapshot named {name:?} already exists; choose another name"
        )));
    }
    Ok(())
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

/// Ports of the repo's pgs other than `except`: promised to them even while stopped.
pub fn promised_ports(repo: &Repo, except: &str) -> Vec<u16> {
    repo.nodes()
        .iter()
        .filter(|n| n.name != except)
        .filter_map(|n| n.state().ok().map(|s| s.port))
        .collect()
}

/// A port for a new pg: free now, and promised to no other pg of the repo.
fn new_port(repo: &Repo) -> OpResult<u16> {
    let config = repo.config()?;
    Ok(super::free_port_except(
        config.pg_port,
        &promised_ports(repo, ""),
    )?)
}

/// How the operations run: in zenith-local, which supervises the pgs it starts, or in a
/// command run while zenith-local is down, whose pgs run on unsupervised.
#[derive(Clone)]
pub struct Ops {
    pub repo: Repo,
    supervisor: Option<Arc<Supervisor>>,
    /// One lock per pg: a start never runs in the middle of a checkout of the same pg.
    busy: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// What `POST /pgs/NAME/actions` (and the CLI's pg commands) ask for.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// start, stop, promote or checkout.
    pub action: String,
    /// start: as a streaming replica.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_replica: bool,
    /// start with is_replica: the pg to follow [default: main].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// stop: without waiting for clients.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub immediate: bool,
    /// checkout: the snapshot to roll back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A pg as `pg show --json` and `GET /pgs/NAME` describe it.
pub fn describe(node: &Node, state: &NodeState) -> Value {
    json!({
        "name": node.name,
        "status": node.status(),
        "port": state.port,
        "connstr": node.connstr(state),
        "role": if state.primary.is_some() { "replica" } else { "primary" },
        "primary": state.primary,
        "data_directory": node.data(),
        "log": node.log(),
    })
}

impl Ops {
    /// Operations in zenith-local, which supervises every pg they start.
    pub fn supervised(repo: Repo, supervisor: Arc<Supervisor>) -> Ops {
        Ops {
            repo,
            supervisor: Some(supervisor),
            busy: Default::default(),
        }
    }

    /// Operations in a command while zenith-local is down.
    pub fn direct(repo: Repo) -> Ops {
        Ops {
            repo,
            supervisor: None,
            busy: Default::default(),
        }
    }

    /// Holds pg `name` for one operation (start, stop, checkout, snapshot, destroy ...).
    async fn hold(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = Arc::clone(
            self.busy
                .lock()
                .expect("not poisoned")
                .entry(name.to_string())
                .or_default(),
        );
        lock.lock_owned().await
    }

    /// Starts a pg: under zenith-local's supervision, or left running on its own, reaped
    /// by a background task while this process lives and by init after.
    async fn run_node(&self, node: &Node, state: &mut NodeState) -> OpResult<()> {
        refuse_incomplete(node)?;
        match &self.supervisor {
            Some(s) => Ok(s.start(node, state).await?),
            None => {
                if node.status() == Status::Running {
                    return Ok(());
                }
                let mut child =
                    super::supervisor::launch(&self.repo, &install()?, node, state).await?;
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                Ok(())
            }
        }
    }

    async fn halt_node(&self, node: &Node, immediate: bool) -> OpResult<()> {
        if let Some(s) = &self.supervisor {
            if s.stop(&node.name, immediate).await {
                return Ok(());
            }
        }
        Ok(node.stop(immediate).await?)
    }

    pub fn list_pgs(&self) -> OpResult<Vec<Value>> {
        let mut rows = Vec::new();
        for node in self.repo.nodes().into_iter().filter(|n| n.exists()) {
            let state = node.state()?;
            rows.push(describe(&node, &state));
        }
        Ok(rows)
    }

    pub fn show_pg(&self, name: &str) -> OpResult<Value> {
        let (node, state) = existing(&self.repo, name)?;
        Ok(describe(&node, &state))
    }

    /// Creates a pg, empty or from a snapshot of the repo; started unless `no_start`.
    pub async fn create_pg(
        &self,
        name: &str,
        snapshot: Option<&str>,
        no_start: bool,
        progress: ProgressHandle,
    ) -> OpResult<Value> {
        check_name(name)?;
        let _held = self.hold(name).await;
        let node = self.repo.node(name);
        if node.dir.exists() {
            return Err(OpError::Conflict(format!(
                "pg {name:?} already exists; nothing was changed (`zenith pg destroy {name}` removes it)"
            )));
        }
        let install = install()?;
        let port = new_port(&self.repo)?;
        let mut state = match self.fill(&install, &node, port, snapshot, progress).await {
            Ok(state) => state,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&node.dir);
                return Err(e);
            }
        };
        if !no_start {
            self.run_node(&node, &mut state).await?;
        }
        Ok(describe(&node, &state))
    }

    /// A new pg's data: from a snapshot of the repo, or a fresh initdb.
    async fn fill(
        &self,
        install: &PgInstall,
        node: &Node,
        port: u16,
        snapshot: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<NodeState> {
        let Some(reference) = snapshot else {
            return Ok(node.init(install, port)?);
        };
        let store = store(&self.repo).await?;
        let m = native::resolve(store.as_ref(), reference).await?;
        let account = run_as()?;
        make_dir(&node.dir, account.as_ref())?;
        materialize(store.as_ref(), &m, &node.data(), &progress).await?;
        let state = NodeState {
            has_run: false,
            ..NodeState::new(port)
        };
        node.save_state(&state)?;
        Ok(state)
    }

    /// `pg start`, `stop`, `promote` and `checkout`.
    pub async fn act(
        &self,
        name: &str,
        action: &Action,
        progress: ProgressHandle,
    ) -> OpResult<Value> {
        let _held = self.hold(name).await;
        match action.action.as_str() {
            "start" if action.is_replica => {
                self.start_replica(name, action.primary.as_deref().unwrap_or("main"))
                    .await
            }
            "start" => {
                let (node, mut state) = existing(&self.repo, name)?;
                if state.primary.is_some() {
                    return Err(OpError::Conflict(format!(
                        "pg {name} is a replica; `zenith pg start {name} --replica` starts it, `zenith pg promote {name}` makes it a primary"
                    )));
                }
                self.run_node(&node, &mut state).await?;
                Ok(describe(&node, &state))
            }
            "stop" => {
                let (node, state) = existing(&self.repo, name)?;
                self.halt_node(&node, action.immediate).await?;
                Ok(describe(&node, &state))
            }
            "promote" => self.promote(name).await,
            "checkout" => {
                let reference = action.snapshot.as_deref().ok_or_else(|| {
                    OpError::BadRequest(
                        "checkout needs \"snapshot\": the reference to roll back to".into(),
                    )
                })?;
                let done = self.checkout(name, reference, progress).await?;
                Ok(json!({
                    "kept": done.kept.summary(),
                    "target": done.target.summary(),
                    "pg": done.pg,
                }))
            }
            other => Err(OpError::BadRequest(format!(
                "unknown action {other:?}; use start, stop, promote or checkout"
            ))),
        }
    }

    /// Starts `name` as a streaming replica of `primary`. A pg that is not its replica
    /// yet gets a fresh copy of the primary's data; what it held is kept first as
    /// snapshot `NAME@HEAD{n}`, unless it never ran (its data is then still the snapshot
    /// it was created from).
    async fn start_replica(&self, name: &str, primary: &str) -> OpResult<Value> {
        let (node, mut state) = existing(&self.repo, name)?;
        if name == primary {
            return Err(OpError::BadRequest(format!(
                "pg {name} cannot follow itself"
            )));
        }
        let (pnode, pstate) = existing(&self.repo, primary)?;
        if state.primary.as_deref() == Some(primary) {
            self.run_node(&node, &mut state).await?;
            return Ok(describe(&node, &state));
        }
        if let Some(other) = &state.primary {
            return Err(OpError::Conflict(format!(
                "pg {name} follows pg {other}; `zenith pg promote {name}` first"
            )));
        }
        if pstate.primary.is_some() {
            return Err(OpError::BadRequest(format!(
                "pg {primary} is itself a replica; follow a primary instead"
            )));
        }
        refuse_followers(&self.repo, name, "")?;
        if pnode.status() != Status::Running {
            return Err(OpError::Conflict(format!(
                "pg {primary} is not running; `zenith pg start {primary}` first"
            )));
        }
        if name == "main" {
            return Err(OpError::BadRequest(
                "pg main is the repo's own pg and stays a primary; create a new pg for the replica"
                    .into(),
            ));
        }
        let install = install()?;
        self.halt_node(&node, false).await?;
        if state.has_run {
            let kept = self.keep_head(&node, &state, Default::default()).await?;
            tracing::info!("pg {name}: kept its data as snapshot {}", kept.id);
        }
        let fresh = node.dir.join("data.replica");
        let _ = std::fs::remove_dir_all(&fresh);
        if let Err(e) = replica::copy_primary(&install, &pnode, &pstate, name, &fresh).await {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e.into());
        }
        swap_data(&node, &fresh)?;
        state.primary = Some(primary.to_string());
        // The copy carries the primary's roles and passwords; a replica is read-only.
        state.password = pstate.password.clone();
        state.has_run = false;
        node.save_state(&state)?;
        self.run_node(&node, &mut state).await?;
        replica::wait_streaming(&install, &node, &state).await?;
        Ok(describe(&node, &state))
    }

    /// Makes a running replica a primary of its own (a new timeline); its primary drops
    /// the slot it kept for it.
    async fn promote(&self, name: &str) -> OpResult<Value> {
        let (node, mut state) = existing(&self.repo, name)?;
        let Some(primary) = state.primary.clone() else {
            return Err(OpError::BadRequest(format!(
                "pg {name} is not a replica; there is nothing to promote"
            )));
        };
        if node.status() != Status::Running {
            return Err(OpError::Conflict(format!(
                "pg {name} is not running; `zenith pg start {name} --replica` first"
            )));
        }
        let install = install()?;
        let done = node
            .query(&install, &state, "SELECT pg_promote(true, 120)")
            .await?;
        if done != "t" {
            return Err(anyhow::anyhow!(
                "pg {name} did not finish its promotion in 120 s; see {}",
                node.log().display()
            )
            .into());
        }
        state.primary = None;
        state.has_run = true;
        node.save_state(&state)?;
        node.set_password(&install, &state).await?;
        let pnode = self.repo.node(&primary);
        if let Ok(pstate) = pnode.state() {
            if pnode.status() == Status::Running {
                replica::prune_slots(&self.repo, &install, &pnode, &pstate).await;
            }
        }
        Ok(describe(&node, &state))
    }

    pub async fn destroy_pg(&self, name: &str) -> OpResult<()> {
        let _held = self.hold(name).await;
        let (node, state) = existing(&self.repo, name)?;
        if name == "main" {
            return Err(OpError::Conflict(
                "pg main is the repo's own pg and is not destroyed; its snapshots stay in the repo"
                    .into(),
            ));
        }
        refuse_followers(&self.repo, name, "")?;
        self.halt_node(&node, true).await?;
        std::fs::remove_dir_all(&node.dir)
            .map_err(|e| anyhow::anyhow!("{}: {e}", node.dir.display()))?;
        if let Some(primary) = &state.primary {
            let pnode = self.repo.node(primary);
            if let (Ok(pstate), Status::Running) = (pnode.state(), pnode.status()) {
                replica::prune_slots(&self.repo, &install()?, &pnode, &pstate).await;
            }
        }
        Ok(())
    }

    /// Snapshots a pg into the repo: online when it runs, from its directory when not.
    pub async fn create_snapshot(
        &self,
        reference: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<Manifest> {
        let (pg, name) = split_reference(reference);
        let _held = self.hold(&pg).await;
        let (node, state) = existing(&self.repo, &pg)?;
        if let Some(n) = &name {
            refuse_head_name(n)?;
        }
        take(&node, &state, store(&self.repo).await?, name, progress).await
    }

    pub async fn list_snapshots(&self) -> OpResult<Vec<Manifest>> {
        Ok(native::list(store(&self.repo).await?.as_ref()).await?)
    }

    pub async fn show_snapshot(&self, reference: &str) -> OpResult<Manifest> {
        Ok(native::resolve(store(&self.repo).await?.as_ref(), reference).await?)
    }

    pub async fn delete_snapshot(&self, reference: &str) -> OpResult<native::DeleteReport> {
        let store = store(&self.repo).await?;
        let m = native::resolve(store.as_ref(), reference).await?;
        refuse_needed(&self.repo, &m.id)?;
        // The repo's own store: no other writer but this machine, so a short grace suffices.
        Ok(native::delete(store, &m, std::time::Duration::from_secs(60), 0.05).await?)
    }

    /// The newest snapshot of the repo, if any.
    pub async fn newest_snapshot(&self) -> OpResult<Option<Manifest>> {
        Ok(self
            .list_snapshots()
            .await?
            .into_iter()
            .max_by(|a, b| a.id.cmp(&b.id)))
    }

    /// Keeps a stopped pg's data as snapshot `NAME@HEAD{n}`, n one more than the last.
    async fn keep_head(
        &self,
        node: &Node,
        state: &NodeState,
        progress: ProgressHandle,
    ) -> OpResult<Manifest> {
        let store = store(&self.repo).await?;
        let prefix = format!("{}@HEAD{{", node.name);
        // One more than the highest: deleted or pulled HEADs leave gaps, never collisions.
        let next = native::list(store.as_ref())
            .await?
            .iter()
            .filter_map(|m| m.name.as_deref()?.strip_prefix(&prefix)?.strip_suffix('}'))
            .filter_map(|n| n.parse::<u64>().ok())
            .map(|n| n + 1)
            .max()
            .unwrap_or(0);
        let head = format!("{}@HEAD{{{next}}}", node.name);
        take(node, state, store, Some(head), progress).await
    }

    /// `pg checkout NAME REF`: keeps NAME's state as `NAME@HEAD{n}`, then replaces its
    /// data with REF and starts it again if it ran. Nothing is lost: the old state is a
    /// snapshot before anything is replaced, and an unknown REF changes nothing.
    pub async fn checkout(
        &self,
        name: &str,
        reference: &str,
        progress: ProgressHandle,
    ) -> OpResult<Checkout> {
        let (node, mut state) = existing(&self.repo, name)?;
        if state.primary.is_some() {
            return Err(OpError::Conflict(format!(
                "pg {name} is a replica and follows its primary; `zenith pg promote {name}` first"
            )));
        }
        refuse_followers(&self.repo, name, ", which cannot follow a rollback")?;
        let store = store(&self.repo).await?;
        let target = native::resolve(store.as_ref(), reference).await?;
        let was_running = node.status() == Status::Running;
        self.halt_node(&node, false).await?;
        let result = async {
            // After a checkout that failed halfway, the state it kept is all there is.
            let interrupted = incomplete(&node);
            let kept = match &interrupted {
                Some(id) => native::resolve(store.as_ref(), id).await.map_err(|e| {
                    OpError::Conflict(format!(
                        "pg {name}'s data is incomplete and the snapshot that held its state is unreadable ({e}); to give that state up, delete {} and run the checkout again",
                        node.incomplete_marker().display()
                    ))
                })?,
                None => self.keep_head(&node, &state, progress.clone()).await?,
            };
            let fresh = node.dir.join("data.checkout");
            let _ = std::fs::remove_dir_all(&fresh);
            let restored = if interrupted.is_some() {
                materialize(store.as_ref(), &target, &fresh, &progress).await
            } else {
                // The new data next to the old, swapped only when complete. Files move
                // over from the old data, which the kept snapshot holds, and only the
                // blocks that differ are written. Until the swap, the old data is marked
                // incomplete: it may have lost files to the new.
                mark_incomplete(&node, Some(&kept))?;
                let basis = native::Basis {
                    dir: &node.data(),
                    manifest: &kept,
                };
                native::unpack_over(store.as_ref(), &target, &fresh, basis, &progress)
                    .await
                    .map(|_| ())
                    .map_err(OpError::from)
            };
            if let Err(e) = restored {
                // The old data lost files to the attempt: it comes back from the kept snapshot.
                tracing::error!("checkout of pg {name} failed: {e}; restoring {}", kept.id);
                let _ = std::fs::remove_dir_all(&fresh);
                let back = materialize(store.as_ref(), &kept, &fresh, &ProgressHandle::default())
                    .await
                    .and_then(|()| swap_data(&node, &fresh));
                if let Err(again) = back {
                    let _ = std::fs::remove_dir_all(&fresh);
                    return Err(anyhow::anyhow!(
                        "{e}; putting the previous data back failed too ({again}); once that is fixed, `zenith pg checkout {name} {}` restores it",
                        kept.id
                    )
                    .into());
                }
                return Err(e);
            }
            prepare_for_postgres(&fresh)?;
            swap_data(&node, &fresh)?;
            OpResult::Ok(kept)
        }
        .await;
        // Failed or not, a pg that ran runs again (on its old data if nothing changed); a
        // failure to restart does not hide why the checkout failed.
        if was_running {
            let restarted = self.run_node(&node, &mut state).await;
            if let (Err(e), Err(again)) = (&result, &restarted) {
                tracing::error!("pg {name} did not start again after a failed checkout: {again}");
                return Err(anyhow::anyhow!("{e}; pg {name} did not start again: {again}").into());
            }
            restarted?;
        }
        let kept = result?;
        Ok(Checkout {
            kept,
            target,
            pg: was_running.then(|| describe(&node, &state)),
        })
    }
}

/// Refuses to act on a pg that replicas follow (`why` says what they could not follow).
fn refuse_followers(repo: &Repo, name: &str, why: &str) -> OpResult<()> {
    let followers = replica::replicas_of(repo, name);
    if followers.is_empty() {
        return Ok(());
    }
    Err(OpError::Conflict(format!(
        "pg {name} has replicas ({}){why}; promote or destroy them first",
        followers.join(", ")
    )))
}

/// Replaces a stopped pg's data directory by the complete directory `fresh`.
fn swap_data(node: &Node, fresh: &std::path::Path) -> OpResult<()> {
    let old = node.dir.join("data.old");
    let _ = std::fs::remove_dir_all(&old);
    if node.data().exists() {
        std::fs::rename(node.data(), &old).map_err(anyhow::Error::from)?;
    }
    std::fs::rename(fresh, node.data()).map_err(anyhow::Error::from)?;
    mark_incomplete(node, None)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The snapshot that holds the state of a pg whose data a failed checkout left incomplete.
pub fn incomplete(node: &Node) -> Option<String> {
    Some(incomplete_kept(node)?.0)
}

/// The id and the name (or id) of the snapshot a failed checkout kept.
fn incomplete_kept(node: &Node) -> Option<(String, String)> {
    let text = std::fs::read_to_string(node.incomplete_marker()).ok()?;
    let mut lines = text.lines().map(str::trim);
    let id = lines.next().filter(|id| !id.is_empty())?.to_string();
    let name = lines.next().unwrap_or(&id).to_string();
    Some((id, name))
}

/// Marks a pg's data incomplete, its state held by snapshot `kept`; `None` clears the mark.
fn mark_incomplete(node: &Node, kept: Option<&Manifest>) -> OpResult<()> {
    let marker = node.incomplete_marker();
    match kept {
        Some(m) => {
            let text = format!("{}\n{}\n", m.id, m.name.as_deref().unwrap_or(&m.id));
            crate::compute::node::write_private(&marker, text.as_bytes())?
        }
        None => match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(anyhow::anyhow!("{}: {e}", marker.display()).into())
            }
            _ => {}
        },
    }
    Ok(())
}

/// Refuses to delete the snapshot that holds the state of a pg a checkout left incomplete.
pub fn refuse_needed(repo: &Repo, id: &str) -> OpResult<()> {
    for node in repo.nodes() {
        if incomplete(&node).as_deref() == Some(id) {
            return Err(OpError::Conflict(format!(
                "snapshot {id} holds the state of pg {name}, whose data a checkout left incomplete; `zenith pg checkout {name} {id}` puts it back first",
                name = node.name
            )));
        }
    }
    Ok(())
}

/// Refuses to start or snapshot a pg whose data a failed checkout left incomplete.
pub fn refuse_incomplete(node: &Node) -> OpResult<()> {
    match incomplete_kept(node) {
        Some((_, kept)) => Err(OpError::Conflict(format!(
            "pg {name}'s data is incomplete: a checkout was interrupted or could not put it back; `zenith pg checkout {name} {kept}` restores it (or `zenith pg checkout {name} REF`, another snapshot)",
            name = node.name
        ))),
        None => Ok(()),
    }
}

/// Restores a snapshot into the new data directory `dir`, owned by PostgreSQL's account.
async fn materialize(
    store: &dyn Storage,
    m: &Manifest,
    dir: &std::path::Path,
    progress: &ProgressHandle,
) -> OpResult<()> {
    native::unpack(store, m, dir, progress).await?;
    prepare_for_postgres(dir)
}

/// A restored directory made ready for a pg: owned by PostgreSQL's account, and without
/// the standby.signal a snapshot of a replica carries (a pg made from it is a primary).
fn prepare_for_postgres(dir: &std::path::Path) -> OpResult<()> {
    for signal in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(dir.join(signal));
    }
    crate::compute::hand_to_postgres_user(dir).map_err(anyhow::Error::msg)?;
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

/// Snapshots a pg into `store` under `name`, which must be new.
async fn take(
    node: &Node,
    state: &NodeState,
    store: Arc<dyn Storage>,
    name: Option<String>,
    progress: ProgressHandle,
) -> OpResult<Manifest> {
    refuse_incomplete(node)?;
    if let Some(n) = &name {
        refuse_taken_name(store.as_ref(), n).await?;
    }
    let options = native::PackOptions {
        name,
        pg: Some(node.name.clone()),
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

/// What a checkout did.
pub struct Checkout {
    pub kept: Manifest,
    pub target: Manifest,
    pub pg: Option<Value>,
}

impl Ops {
    /// What `zenith status` and `GET /status` show: zenith-local, every pg (with what
    /// supervision saw of it) and the newest snapshot.
    pub async fn status(&self) -> OpResult<Value> {
        let local = super::running(&self.repo);
        let mut pgs = Vec::new();
        for node in self.repo.nodes().into_iter().filter(|n| n.exists()) {
            let state = node.state()?;
            let watched = local
                .as_ref()
                .and_then(|l| l.pgs.iter().find(|p| p.name == node.name));
            let mut row = describe(&node, &state);
            row["supervised"] = json!(watched.is_some_and(|p| p.failed.is_none()));
            row["restarts"] = json!(watched.map(|p| p.restarts).unwrap_or(0));
            row["failed"] = json!(watched.and_then(|p| p.failed.clone()));
            pgs.push(row);
        }
        let newest = self.newest_snapshot().await?.map(|m| {
            json!({
                "id": m.id,
                "name": m.name,
                "created_at": m.created_at,
                "total_size": m.total_size,
            })
        });
        Ok(json!({
            "repo": self.repo.root,
            "zenith_local": {
                "running": local.is_some(),
                "pid": local.as_ref().map(|l| l.pid),
                "api": local.as_ref().map(|l| format!("http://127.0.0.1:{}", l.api_port)),
            },
            "pgs": pgs,
            "newest_snapshot": newest,
            "storage_dest": self.repo.config()?.storage_dest,
            "push": local.as_ref().and_then(|l| l.push.clone()),
        }))
    }
}

impl Ops {
    /// Makes the main pg of a new repo (or one that lost it) from a snapshot of the repo.
    pub async fn main_from_snapshot(&self, m: &Manifest) -> OpResult<NodeState> {
        let node = self.repo.node("main");
        let store = store(&self.repo).await?;
        make_dir(&node.dir, run_as()?.as_ref())?;
        materialize(store.as_ref(), m, &node.data(), &ProgressHandle::default()).await?;
        let state = NodeState::new(new_port(&self.repo)?);
        node.save_state(&state)?;
        Ok(state)
    }
}
