//! Thin clones: on a filesystem that shares extents between files (XFS with reflink=1,
//! btrfs), the repo keeps each of its snapshots as a clone of the pg's files in
//! `clones/<id>/` beside a manifest in its store that says so, and makes new pgs,
//! checkouts and `NAME@HEAD{n}` by cloning files instead of restoring blocks: each takes
//! about the same time whatever the database's size, and shares every block it did not
//! change.
//!
//! A snapshot of a running pg is cloned between `pg_backup_start` and `pg_backup_stop`, with
//! the WAL from start to stop and the backup label, exactly what an online snapshot in the
//! zenith format holds; a stopped pg's directory is cloned whole. The clone is complete and
//! durable before its manifest is written, so a snapshot is visible exactly when it can be
//! used. Clones are packed into the zenith format only when a snapshot leaves the repo
//! (push, export): straight into the destination, never twice on the repo's disk.
//!
//! Elsewhere (ext4, tmpfs) or with `[snapshots] clones = "off"`, snapshots are copies in
//! the zenith format, as without this module. What a clone holds is checked by size when
//! it is used; its checksums are computed when it is packed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::config::ClonesMode;
use super::Pageserver;
use crate::compute::node::{Node, NodeState, Status};
use crate::models::{OpError, OpResult};
use crate::snapshot::zenith::{self, TransferReport};
use crate::snapshot::{
    clone, datadir, join_error, CloneSpace, Format, Manifest, Origin, PackOptions,
};
use crate::storage::Storage;
use crate::util::progress::ProgressHandle;
use crate::util::reflink;
use crate::util::tempdir::{self, TempDir};

/// Names of clones under way in `clones/` (removed when their run was killed).
const CLONING: &str = "cloning";

/// Whether the repo keeps its snapshots as thin clones, and why (not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneMode {
    pub on: bool,
    pub reason: String,
}

impl Pageserver {
    /// Where the repo keeps its snapshots' clones.
    pub fn clones_dir(&self) -> PathBuf {
        self.repo.root.join("clones")
    }

    fn clone_path(&self, id: &str) -> PathBuf {
        self.clones_dir().join(id)
    }

    /// Whether snapshots, new pgs and checkouts are thin clones here, and why (not).
    pub fn clone_mode(&self) -> CloneMode {
        let off = |reason: String| CloneMode { on: false, reason };
        match self.repo.config() {
            Ok(c) if c.snapshots.clones == ClonesMode::Off => {
                return off(
                    "`[snapshots] clones = \"off\"` in config.toml: snapshots are copies in the zenith format".into(),
                )
            }
            Ok(_) => {}
            Err(e) => return off(e.to_string()),
        }
        let dir = self.clones_dir();
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return off(format!("{}: {e}", dir.display()));
        }
        match reflink::probe(&dir) {
            Ok(()) => CloneMode {
                on: true,
                reason: format!(
                    "{} is on {}, which shares extents between files: snapshots, new pgs and checkouts are thin clones",
                    self.repo.root.display(),
                    reflink::filesystem_name(&dir)
                ),
            },
            Err(why) => off(format!("{why}: snapshots are copies in the zenith format")),
        }
    }

    /// Snapshots pg `node` as a thin clone under `options.name`, when the repo is in clone
    /// mode and the pg can be cloned (a running replica cannot: it is copied instead);
    /// `None` otherwise.
    pub(super) async fn take_clone(
        &self,
        node: &Node,
        state: &NodeState,
        store: &dyn Storage,
        options: &PackOptions,
    ) -> OpResult<Option<Manifest>> {
        if !self.clone_mode().on {
            return Ok(None);
        }
        // Clones that killed runs left half made go first.
        tempdir::sweep(&self.clones_dir(), CLONING);
        let work = TempDir::new_in(&self.clones_dir(), CLONING)
            .map_err(|e| OpError::io(self.clones_dir().display(), e))?;
        let root = work.path().join("data");
        let made = if node.status() == Status::Running {
            let connstr = node.local_connstr(state);
            match clone_running(&super::install()?, &connstr, &root, work.path()).await? {
                Some(made) => made,
                None => return Ok(None),
            }
        } else {
            clone_stopped(&node.data(), &root).await?
        };
        let (entries, pg_version, control, lsns) = made;
        let origin = Origin {
            format: Format::Zenith,
            name: options.name.clone(),
            parent: None,
            pg: options.pg.clone(),
            wal_history: options.wal_history.clone(),
            pg_version,
            control,
            lsns,
        };
        let mut m = Manifest::new(origin, entries, 0);
        m.clone = true;
        clone::sync(&root)?;
        let place = self.clone_path(&m.id);
        std::fs::rename(&root, &place).map_err(|e| OpError::io(place.display(), e))?;
        // Visible only now, complete and durable.
        let published = match sync_dir(&self.clones_dir()) {
            Ok(()) => zenith::publish(store, &m).await.map_err(OpError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = published {
            let _ = std::fs::remove_dir_all(&place);
            return Err(e);
        }
        options.progress.finish();
        Ok(Some(m))
    }

    /// Makes `dir` (new) a data directory holding repo snapshot `m`, from its clone.
    pub(super) async fn restore_clone(&self, m: &Manifest, dir: &Path) -> OpResult<()> {
        let source = self.clone_path(&m.id);
        if !source.is_dir() {
            return Err(OpError::Failed(format!(
                "snapshot {} is a thin clone, and its files are missing from {}; delete the snapshot (`zenith snapshot delete {}`) and take another",
                m.id,
                source.display(),
                m.id
            )));
        }
        Ok(clone::restore(&source, m, dir).await?)
    }

    /// Checks that repo snapshot `m`'s clone holds every file at its size; how many.
    pub fn check_clone(&self, m: &Manifest) -> OpResult<u64> {
        Ok(clone::check(&self.clone_path(&m.id), m)?)
    }

    /// Copies repo snapshot `m` from the repo's `store` to `target` (renamed `name` there
    /// when given): a thin clone is packed into the zenith format straight into `target`
    /// (only blocks `target` lacks are stored), any other is transferred.
    pub(super) async fn send(
        &self,
        store: &dyn Storage,
        m: &Manifest,
        target: &Arc<dyn Storage>,
        name: Option<&str>,
        progress: &ProgressHandle,
    ) -> OpResult<TransferReport> {
        // Only the repo's own store holds clones (elsewhere, transfer refuses one).
        let ours = store.url() == self.store().await?.url();
        if !m.clone || !ours || target.url() == store.url() {
            return Ok(zenith::transfer(store, target, m, name, progress).await?);
        }
        // Already there: transfer says so (one existence check, not a listing of every
        // manifest the target holds).
        if zenith::contains(target.as_ref(), &m.id).await? {
            return Ok(zenith::transfer(store, target, m, name, progress).await?);
        }
        let source = self.clone_path(&m.id);
        let checked = source.clone();
        let m2 = m.clone();
        tokio::task::spawn_blocking(move || clone::check(&checked, &m2))
            .await
            .map_err(join_error)??;
        let options = PackOptions {
            name: name.map(str::to_string).or_else(|| m.name.clone()),
            pg: m.pg.clone(),
            wal_history: m.wal_history.clone(),
            parent: None,
            identity: Some((m.id.clone(), m.created_at.clone())),
            stamps: Some(Arc::new(
                m.entries
                    .iter()
                    .filter_map(|e| Some((e.path.clone(), e.stamp.clone()?)))
                    .collect(),
            )),
            progress: progress.clone(),
        };
        // An online clone carries its backup label and WAL range.
        let lsns = source
            .join("backup_label")
            .exists()
            .then(|| (m.start_lsn.clone(), m.stop_lsn.clone()));
        let report = zenith::pack_dir(&source, Arc::clone(target), &options, lsns).await?;
        Ok(TransferReport {
            objects_sent: report.packs_written,
            bytes_sent: report.manifest.stored_size,
            manifest: Some(report.manifest),
            already_there: false,
            objects_skipped: 0,
        })
    }

    /// Removes the clone of repo snapshot `id`, whose manifest is gone (deleted).
    pub fn drop_clone(&self, id: &str) -> OpResult<()> {
        let path = self.clone_path(id);
        match std::fs::remove_dir_all(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(OpError::io(path.display(), e))
            }
            _ => Ok(()),
        }
    }

    /// Removes the clones no snapshot of the repo names and that are older than an hour:
    /// what a run killed between a clone and its manifest left. (A younger one may be a
    /// snapshot another process is about to publish.)
    pub async fn sweep_clones(&self, store: &dyn Storage) -> OpResult<()> {
        const GRACE: std::time::Duration = std::time::Duration::from_secs(3600);
        let dir = self.clones_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let listed: std::collections::HashSet<String> = zenith::list(store)
            .await?
            .into_iter()
            .filter(|m| m.clone)
            .map(|m| m.id)
            .collect();
        tempdir::sweep(&dir, CLONING);
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let is_snapshot = name.len() == 20
                && name
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > GRACE);
            if is_snapshot && old && !listed.contains(&name) {
                tracing::info!("removing clone {name}: no snapshot names it");
                self.drop_clone(&name)?;
            }
        }
        Ok(())
    }

    /// The space of repo snapshot `id`'s clone: shared with other snapshots and pgs, and its
    /// own (what deleting it frees). `None` when it is not a clone.
    pub fn clone_space(&self, id: &str) -> Option<CloneSpace> {
        let path = self.clone_path(id);
        path.is_dir().then(|| space(&path)).flatten()
    }

    /// What listings say of repo snapshot `m`: with its clone's space when it is one.
    pub fn summary(&self, m: &Manifest) -> crate::snapshot::SnapshotSummary {
        let mut summary = m.summary();
        if m.clone {
            summary.clone = self.clone_space(&m.id);
        }
        summary
    }

    /// The space of a pg's data directory, when the repo is in clone mode.
    pub fn pg_space(&self, node: &Node) -> Option<CloneSpace> {
        let dir = self.clones_dir();
        (dir.is_dir() && node.data().is_dir())
            .then(|| space(&node.data()))
            .flatten()
    }
}

/// The shared and owned bytes under `dir`; `None` (not shown) when they cannot be read.
fn space(dir: &Path) -> Option<CloneSpace> {
    match reflink::tree_usage(dir) {
        Ok(u) => Some(CloneSpace {
            shared: u.shared,
            owned: u.owned,
        }),
        Err(e) => {
            tracing::warn!("cannot count the space of {}: {e}", dir.display());
            None
        }
    }
}

fn sync_dir(dir: &Path) -> OpResult<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| OpError::io(dir.display(), e))
}

/// What a clone made: its entries, the PostgreSQL version, the control data and the WAL
/// range of an online clone.
type Made = (
    Vec<crate::snapshot::Entry>,
    String,
    datadir::ControlInfo,
    Option<(String, String)>,
);

/// Clones a stopped pg's data directory whole into `root` (new).
async fn clone_stopped(data: &Path, root: &Path) -> OpResult<Made> {
    let (data, root) = (data.to_path_buf(), root.to_path_buf());
    let made = tokio::task::spawn_blocking(move || -> crate::snapshot::Result<Made> {
        datadir::check_not_running(&data)?;
        let pg_version = datadir::read_pg_version(&data)?;
        let mut control = datadir::read_control(&data)?;
        let lsns = datadir::crash_lsns(&data, &mut control)?;
        let mut walked = datadir::walk(&data)?;
        // As a packed snapshot of a stopped pg: of a clean shutdown's WAL, only the
        // segment of its last checkpoint is needed.
        if control.is_shut_down() {
            walked = datadir::without_stale_wal(walked, &control);
        }
        make_root(&root)?;
        let entries = clone::clone_entries(&walked, &root, false)?;
        Ok((entries, pg_version, control, lsns))
    })
    .await
    .map_err(join_error)??;
    Ok(made)
}

fn make_root(root: &Path) -> crate::snapshot::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(root)
        .map_err(|e| crate::snapshot::SnapshotError::io(root, "create", e))
}

/// Clones a running server's data directory into `root` (new) between `pg_backup_start`
/// and `pg_backup_stop`, then adds the WAL from start to stop and the backup label (made
/// in `work`). `None` when its directory is not readable here (a replica in recovery).
async fn clone_running(
    install: &crate::compute::PgInstall,
    connstr: &str,
    root: &Path,
    work: &Path,
) -> OpResult<Option<Made>> {
    use super::capture::{excluded, local_data_directory, unlogged_relations, wal_tail, Session};
    let mut session = Session::open(install, connstr).await?;
    let info = session.server_info().await?;
    let Some(dir) = local_data_directory(&info).map(Path::to_path_buf) else {
        session.close().await;
        return Ok(None);
    };
    // The backup is running from here on; ending the session (also by an error) aborts it.
    if let Err(e) = session.backup_start().await {
        tracing::info!("cloning the server is not possible ({e}): copying it instead");
        session.close().await;
        return Ok(None);
    }
    let (data, target) = (dir.clone(), root.to_path_buf());
    let cloned = tokio::task::spawn_blocking(move || -> crate::snapshot::Result<_> {
        let pg_version = datadir::read_pg_version(&data)?;
        let control = datadir::read_control(&data)?;
        let walked = datadir::walk_live(&data)?;
        let unlogged = unlogged_relations(&walked);
        let walked: Vec<_> = walked
            .into_iter()
            .filter(|e| !excluded(&e.rel, &unlogged))
            .collect();
        make_root(&target)?;
        let entries = clone::clone_entries(&walked, &target, true)?;
        Ok((entries, pg_version, control))
    })
    .await
    .map_err(join_error)?;
    let (mut entries, pg_version, control) = match cloned {
        Ok(c) => c,
        Err(e) => {
            session.close().await;
            return Err(e.into());
        }
    };
    let end = match session.backup_stop(&info).await {
        Ok(end) => end,
        Err(e) => {
            session.close().await;
            return Err(e.into());
        }
    };
    let (root, work, segment_size) = (
        root.to_path_buf(),
        work.to_path_buf(),
        info.wal_segment_size,
    );
    let tail = tokio::task::spawn_blocking(move || -> crate::snapshot::Result<_> {
        let tail = wal_tail(&dir, &end, segment_size, &work)?;
        let entries = clone::clone_entries(&tail, &root, false)?;
        Ok((entries, (end.start_lsn, end.stop_lsn)))
    })
    .await
    .map_err(join_error);
    // Only now: the session's replication slot keeps the WAL until it is cloned.
    session.close().await;
    let tail = tail??;
    entries.extend(tail.0);
    Ok(Some((entries, pg_version, control, Some(tail.1))))
}
