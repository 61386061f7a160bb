//! The repo's own snapshot store (`snapshots/`, zenith format): taking snapshots of its
//! pgs (online when they run, from their directory when not), listing, showing and
//! deleting them, keeping a pg's state as `NAME@HEAD{n}`, and restoring a snapshot into a
//! new data directory for a pg.

use std::sync::Arc;

use super::names::{check_name, check_tag, head_name, head_number, split_reference};
use super::Pageserver;
use crate::compute::node::{make_dir, run_as, Node, NodeState, Status, WalLine};
use crate::compute::PgInstall;
use crate::models::{DeletedSnapshot, OpError, OpResult};
use crate::snapshot::{zenith, Manifest, PackOptions};
use crate::storage::Storage;
use crate::util::progress::ProgressHandle;

/// The PostgreSQL installation zenith drives.
pub fn install() -> OpResult<PgInstall> {
    Ok(crate::compute::find_postgres().map_err(crate::compute::Error::from)?)
}

/// Refuses a snapshot name `store` already has.
pub(super) async fn refuse_taken_name(store: &dyn Storage, name: &str) -> OpResult<()> {
    if zenith::list(store)
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

impl Pageserver {
    /// The repo's own snapshot store.
    pub async fn store(&self) -> OpResult<Arc<dyn Storage>> {
        Ok(crate::storage::open(&self.repo.store_url()).await?)
    }

    /// A storage by URL. One found encrypted is remembered in config.toml, and one
    /// remembered as encrypted that has lost its key file is refused (see
    /// [`super::Config::refuse_unsealed`]).
    pub async fn open_storage(&self, url: &str) -> OpResult<Arc<dyn Storage>> {
        let storage = crate::storage::open(url).await?;
        // A repo being made (`init` from a storage) has no config to remember in yet.
        if let Ok(config) = self.repo.config() {
            config.refuse_unsealed(storage.as_ref())?;
            if storage.encrypted() && !config.encrypted_storages.contains(&storage.url()) {
                self.remember_encrypted(&storage.url());
            }
        }
        Ok(storage)
    }

    /// Records the storage of canonical URL `url` as encrypted in config.toml (best
    /// effort: a failure is logged).
    pub fn remember_encrypted(&self, url: &str) {
        let saved = self.repo.config().and_then(|mut config| {
            if config.encrypted_storages.insert(url.to_string()) {
                self.repo.save_config(&config)?;
            }
            Ok(())
        });
        if let Err(e) = saved {
            tracing::warn!("cannot remember {url} as encrypted in config.toml: {e}");
        }
    }

    /// An existing pg of the repo.
    pub fn existing(&self, name: &str) -> OpResult<(Node, NodeState)> {
        check_name(name)?;
        let node = self.repo.node(name);
        if !node.exists() {
            return Err(OpError::NotFound(format!(
                "there is no pg {name:?} in {}; `zenith pg list` shows them",
                self.repo.root.display()
            )));
        }
        let state = node.state()?;
        Ok((node, state))
    }

    /// Ports of the repo's pgs other than `except`: promised to them even while stopped.
    pub fn promised_ports(&self, except: &str) -> Vec<u16> {
        self.repo
            .nodes()
            .iter()
            .filter(|n| n.name != except)
            .filter_map(|n| n.state().ok().map(|s| s.port))
            .collect()
    }

    /// A port for a new pg: free now, and promised to no other pg of the repo.
    pub fn new_port(&self) -> OpResult<u16> {
        let config = self.repo.config()?;
        crate::util::port::free_port_except(config.pg_port, &self.promised_ports(""))
            .map_err(OpError::Failed)
    }

    /// Snapshots pg `PG` (default main) of `PG@TAG` into the repo, named `PG@TAG` when a
    /// tag is given: online when it runs, from its directory when not.
    pub async fn create_snapshot(
        &self,
        reference: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<Manifest> {
        let (pg, name) = split_reference(reference);
        let _held = self.hold(&pg).await;
        let (node, state) = self.existing(&pg)?;
        if let Some(n) = &name {
            check_tag(n)?;
        }
        self.take(&node, &state, self.store().await?, name, progress)
            .await
    }

    pub async fn list_snapshots(&self) -> OpResult<Vec<Manifest>> {
        Ok(zenith::list(self.store().await?.as_ref()).await?)
    }

    pub async fn show_snapshot(&self, reference: &str) -> OpResult<Manifest> {
        Ok(zenith::resolve(self.store().await?.as_ref(), reference).await?)
    }

    pub async fn delete_snapshot(&self, reference: &str) -> OpResult<DeletedSnapshot> {
        let store = self.store().await?;
        let m = zenith::resolve(store.as_ref(), reference).await?;
        self.refuse_needed(&m.id)?;
        // The repo's own store: no other writer but this machine, so a short grace suffices.
        let r = zenith::delete(
            Arc::clone(&store),
            &m,
            std::time::Duration::from_secs(60),
            0.05,
        )
        .await?;
        self.drop_clone(&m.id)?;
        self.sweep_clones(store.as_ref()).await?;
        Ok(DeletedSnapshot {
            deleted: r.deleted,
            bytes_freed: r.gc.bytes_freed,
            collection_skipped: r.gc.skipped,
        })
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
    pub async fn keep_head(
        &self,
        node: &Node,
        state: &NodeState,
        progress: ProgressHandle,
    ) -> OpResult<Manifest> {
        let store = self.store().await?;
        // One more than the highest: deleted or pulled HEADs leave gaps, never collisions.
        let next = zenith::list(store.as_ref())
            .await?
            .iter()
            .filter_map(|m| head_number(&node.name, m.name.as_deref()?))
            .map(|n| n + 1)
            .max()
            .unwrap_or(0);
        let head = head_name(&node.name, next);
        self.take(node, state, store, Some(head), progress).await
    }

    /// Snapshots a pg into `store` under `name`, which must be new.
    async fn take(
        &self,
        node: &Node,
        state: &NodeState,
        store: Arc<dyn Storage>,
        name: Option<String>,
        progress: ProgressHandle,
    ) -> OpResult<Manifest> {
        super::markers::refuse_incomplete(node)?;
        if let Some(n) = &name {
            refuse_taken_name(store.as_ref(), n).await?;
        }
        let options = PackOptions {
            name,
            pg: Some(node.name.clone()),
            wal_history: state.wal.as_ref().map(|w| w.history.clone()),
            parent: None,
            identity: None,
            stamps: None,
            progress,
        };
        if let Some(m) = self
            .take_clone(node, state, store.as_ref(), &options)
            .await?
        {
            return Ok(m);
        }
        let report = if node.status() == Status::Running {
            super::capture::pack_online(&install()?, &node.local_connstr(state), store, &options)
                .await?
        } else {
            zenith::pack_dir(&node.data(), store, &options, None).await?
        };
        Ok(report.manifest)
    }

    /// Restores repo snapshot `m` into the new data directory `dir` of a pg.
    pub async fn materialize(
        &self,
        m: &Manifest,
        dir: &std::path::Path,
        progress: &ProgressHandle,
    ) -> OpResult<()> {
        self.restore(m, dir, progress).await?;
        prepare_for_postgres(dir)
    }

    /// Restores repo snapshot `m` into the new directory `dir` as it is (from its clone,
    /// or its packs).
    pub(super) async fn restore(
        &self,
        m: &Manifest,
        dir: &std::path::Path,
        progress: &ProgressHandle,
    ) -> OpResult<()> {
        if m.clone {
            self.restore_clone(m, dir).await
        } else {
            zenith::unpack(self.store().await?.as_ref(), m, dir, progress).await?;
            Ok(())
        }
    }

    /// A new pg's data from snapshot `reference` of the repo: its directory and state
    /// (not started; a replica copy may still replace it).
    pub async fn pg_from_snapshot(
        &self,
        node: &Node,
        port: u16,
        reference: &str,
        progress: ProgressHandle,
    ) -> OpResult<NodeState> {
        let m = self.show_snapshot(reference).await?;
        make_dir(&node.dir, run_as()?.as_ref())?;
        self.materialize(&m, &node.data(), &progress).await?;
        let state = NodeState {
            has_run: false,
            wal: Some(wal_line_from(&m)),
            ..NodeState::new(port)
        };
        node.save_state(&state)?;
        Ok(state)
    }

    /// Makes the main pg of a new repo (or one that lost it) from a snapshot of the repo.
    pub async fn main_from_snapshot(&self, m: &Manifest) -> OpResult<NodeState> {
        let node = self.repo.node("main");
        make_dir(&node.dir, run_as()?.as_ref())?;
        self.materialize(m, &node.data(), &ProgressHandle::default())
            .await?;
        let state = NodeState {
            wal: Some(wal_line_from(m)),
            ..NodeState::new(self.new_port()?)
        };
        node.save_state(&state)?;
        Ok(state)
    }
}

/// The line of WAL of a pg made from snapshot `m`: a new history that continues the one
/// the snapshot was taken in, from its end (or a new one, when it records none).
pub(super) fn wal_line_from(m: &Manifest) -> WalLine {
    match &m.wal_history {
        Some(h) => WalLine::branch(h, m.timeline, &m.stop_lsn),
        None => WalLine::new_root(),
    }
}

/// A restored directory made ready for a pg: owned by PostgreSQL's account, and without
/// the standby.signal a snapshot of a replica carries (a pg made from it is a primary).
pub(super) fn prepare_for_postgres(dir: &std::path::Path) -> OpResult<()> {
    for signal in ["standby.signal", "recovery.signal"] {
        let _ = std::fs::remove_file(dir.join(signal));
    }
    crate::compute::hand_to_postgres_user(dir).map_err(OpError::Failed)?;
    Ok(())
}
