//! zenith's pgs and the WAL archive: every pg of the main pg's cluster archives its WAL
//! into storage_dest, continuously, under its own history (see the safekeeper's archive),
//! and a pg restored to a point in time (or after a crash) replays the archive first.
//!
//! PostgreSQL runs `archive_command` and `restore_command` itself, as its own account:
//! zenith passes them on the server's command line at each start, pointing at
//! `pgs/NAME/wal.json` and `restore.json` (the history, the cluster, the repo's
//! `config.toml`, which names storage_dest). So a storage_dest changed or detached takes
//! effect at the next archived file, without a restart; one attached to a repo that had
//! none, at each pg's next start (archiving is a server setting PostgreSQL reads when it
//! starts). Without a storage_dest zenith sets nothing, and a server's own archive
//! settings (another tool's) stay in force. As root, the PostgreSQL
//! account cannot run zenith from root's home: the repo keeps a link to the executable
//! (`bin/zenith`) it can reach.

use std::path::{Path, PathBuf};

use crate::compute::node::{run_as, Node, NodeState, RecoveryTarget, Status, WalFork, WalLine};
use crate::compute::wal::WalFile;
use crate::compute::PgInstall;
use crate::models::{OpError, OpResult};
use crate::pageserver::{Pageserver, Repo};
use crate::safekeeper::archive::{Archive, Branch, Fork, WalTarget};

/// The zenith executable as PostgreSQL's account can run it: itself when it can (zenith
/// installed in /usr/local/bin), else a hard link in the repo (`bin/zenith`), or in the
/// temporary directory when the repo is on another filesystem, else a copy in the repo.
pub(super) fn executable(repo: &Repo) -> OpResult<PathBuf> {
    let exe = std::env::current_exe()
        .map_err(|e| OpError::Failed(format!("cannot find zenith itself: {e}")))?;
    let Some(account) = run_as()? else {
        return Ok(exe);
    };
    if reachable(&exe, &account) {
        return Ok(exe);
    }
    let bin = repo.root.join("bin");
    let link = bin.join("zenith");
    if same_file(&exe, &link) {
        return Ok(link);
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // A link costs nothing, a copy the executable's size: with the repo on another
    // filesystem than zenith, a link in the temporary directory (on zenith's, usually).
    let exe_dev = std::fs::metadata(&exe).map(|m| (m.dev(), m.ino())).ok();
    let repo_dev = std::fs::metadata(&repo.root).map(|m| m.dev()).ok();
    if let (Some((dev, ino)), Some(repo_dev)) = (exe_dev, repo_dev) {
        if dev != repo_dev {
            if let Some(at) = shared_link(&exe, dev, ino) {
                if reachable(&at, &account) {
                    return Ok(at);
                }
            }
        }
    }
    std::fs::create_dir_all(&bin).map_err(|e| OpError::io(bin.display(), e))?;
    let _ = std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755));
    // A new name, then a rename over the old link: a running archive command keeps
    // whichever it started.
    let temp = bin.join(crate::util::tempdir::temp_name("zenith"));
    if std::fs::hard_link(&exe, &temp).is_err() {
        // Another filesystem, or a zenith replaced on disk while this process runs: a
        // copy of the running executable itself.
        let copied = std::fs::copy("/proc/self/exe", &temp)
            .and_then(|_| std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755)));
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&temp);
            if link.exists() {
                tracing::warn!("cannot update {}: {e}; using it as it is", link.display());
                return Ok(link);
            }
            return Err(OpError::io(temp.display(), e));
        }
    }
    std::fs::rename(&temp, &link).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        OpError::io(link.display(), e)
    })?;
    Ok(link)
}

/// A hard link to `exe` in `$TMPDIR/zenith-bin` (on zenith's filesystem, usually), in a
/// directory only root may write: one another user made, or made writable, is not used,
/// and a file there that is not `exe` itself is replaced.
fn shared_link(exe: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::env::temp_dir().join("zenith-bin");
    match std::fs::create_dir(&dir) {
        Ok(()) => std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).ok()?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        tracing::warn!(
            "{} is not a directory only root may write: not used",
            dir.display()
        );
        return None;
    }
    let at = dir.join(format!("zenith-{dev}-{ino}"));
    if !same_file(exe, &at) {
        let _ = std::fs::remove_file(&at);
        std::fs::hard_link(exe, &at).ok()?;
    }
    Some(at)
}

/// Whether `account` can run the file at `path`: every directory above it searchable, the
/// file readable and executable, by others or by the account's user or group.
fn reachable(path: &Path, account: &crate::compute::Account) -> bool {
    use std::os::unix::fs::MetadataExt;
    let allowed = |meta: &std::fs::Metadata, bits: u32| {
        meta.mode() & bits != 0
            || (meta.uid() == account.uid && meta.mode() & (bits << 6) != 0)
            || (meta.gid() == account.gid && meta.mode() & (bits << 3) != 0)
    };
    let Ok(file) = std::fs::metadata(path) else {
        return false;
    };
    allowed(&file, 0o001)
        && allowed(&file, 0o004)
        && path
            .ancestors()
            .skip(1)
            .all(|dir| std::fs::metadata(dir).is_ok_and(|m| allowed(&m, 0o001)))
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// As root, with a storage_dest on this machine: gives the directories of the cluster's
/// WAL archive to PostgreSQL's account, which writes into them from its archive command
/// (zenith itself, as root, writes anywhere).
fn open_wal_dir(storage_dest: &str, system_identifier: u64) -> OpResult<()> {
    let Some(account) = run_as()? else {
        return Ok(());
    };
    let Ok(crate::storage::StorageUrl::Local(root)) =
        crate::storage::StorageUrl::parse(storage_dest)
    else {
        return Ok(());
    };
    let dir = root.join("wal").join(system_identifier.to_string());
    std::fs::create_dir_all(&dir).map_err(|e| OpError::io(dir.display(), e))?;
    use std::os::unix::fs::MetadataExt;
    for entry in walkdir::WalkDir::new(&dir).into_iter().flatten() {
        let owned = entry.metadata().is_ok_and(|m| m.uid() == account.uid);
        if entry.file_type().is_dir() && !owned {
            std::os::unix::fs::lchown(entry.path(), Some(account.uid), Some(account.gid))
                .map_err(|e| OpError::io(entry.path().display(), e))?;
        }
    }
    Ok(())
}

/// A word for `/bin/sh`, quoted.
fn sh(word: &Path) -> String {
    format!("'{}'", word.display().to_string().replace('\'', r"'\''"))
}

/// Writes `target` to `path`, readable by PostgreSQL's account (it holds no secret).
fn write_json(path: &Path, target: &WalTarget) -> OpResult<()> {
    let json = serde_json::to_vec_pretty(target).expect("a target serializes");
    Ok(crate::compute::node::write_file(path, &json, 0o644)?)
}

/// Writes `pgs/NAME/wal.json`, what `node`'s archive command archives into (its history,
/// for the main pg's cluster; other clusters do not archive into storage_dest).
pub fn write_target(repo: &Repo, node: &Node, state: &NodeState) -> OpResult<()> {
    let target = node.dir.join("wal.json");
    let control = crate::snapshot::datadir::read_control(&node.data())?;
    // storage_dest holds the main pg's cluster: other clusters' pgs do not archive there.
    let main = repo.node("main");
    let same_cluster = main.dir == node.dir
        || crate::snapshot::datadir::read_control(&main.data())
            .is_ok_and(|m| m.system_identifier == control.system_identifier);
    // config.toml names storage_dest for the archive command (repos of older zeniths
    // wrote it readable by its owner only).
    use std::os::unix::fs::PermissionsExt;
    if let (Some(url), true) = (&repo.config()?.storage_dest, same_cluster) {
        let _ =
            std::fs::set_permissions(repo.config_path(), std::fs::Permissions::from_mode(0o644));
        // An unusable storage_dest fails the archive command (and shows in status); the
        // pg runs anyway.
        if let Err(e) = open_wal_dir(url, control.system_identifier) {
            tracing::warn!("pg {}: {}", node.name, e.full_message());
        }
    }
    match (&state.wal, same_cluster) {
        (Some(line), true) => write_json(
            &target,
            &WalTarget {
                config: repo.config_path(),
                system_identifier: control.system_identifier,
                history: line.history.clone(),
            },
        ),
        _ => {
            let _ = std::fs::remove_file(&target);
            Ok(())
        }
    }
}

/// The server settings of `node`'s WAL: archiving into its own history, and a recovery
/// from the archive when one is due. Writes the files they point at.
pub fn settings(repo: &Repo, node: &Node, state: &NodeState) -> OpResult<Vec<String>> {
    let target = node.dir.join("wal.json");
    let restore = node.dir.join("restore.json");
    let config = repo.config()?;
    write_target(repo, node, state)?;
    // Archiving: with a storage_dest, for the main pg's cluster (write_target wrote the
    // target only then).
    let archiving = config.storage_dest.is_some() && target.exists();
    if !archiving && state.recovery.is_none() {
        // Nothing to archive into: the server's own settings (an archive_command of
        // another tool, say) stay as they are.
        return Ok(Vec::new());
    }
    let exe = executable(repo)?;
    let mut out = Vec::new();
    if archiving {
        out.extend([
            "archive_mode=on".to_string(),
            format!(
                "archive_command={} wal-push --target {} %p",
                sh(&exe),
                sh(&target)
            ),
            format!("archive_timeout={}", config.wal.archive_timeout_secs()?),
        ]);
    }
    // Only while the recovery is due: once PostgreSQL finished it (and removed
    // recovery.signal), starting it with the same target again would replay to that
    // target and drop everything written since.
    match state
        .recovery
        .as_ref()
        .filter(|_| !node.recovery_ended(state))
    {
        Some(r) => {
            let control = crate::snapshot::datadir::read_control(&node.data())?;
            write_json(
                &restore,
                &WalTarget {
                    config: repo.config_path(),
                    system_identifier: control.system_identifier,
                    history: r.source.clone(),
                },
            )?;
            out.push(format!(
                "restore_command={} wal-fetch --target {} %f %p",
                sh(&exe),
                sh(&restore)
            ));
            match &r.target {
                Some(RecoveryTarget::Time(t)) => out.push(format!("recovery_target_time={t}")),
                Some(RecoveryTarget::Lsn(l)) => out.push(format!("recovery_target_lsn={l}")),
                None => {}
            }
            out.push("recovery_target_action=promote".into());
        }
        None => {
            let _ = std::fs::remove_file(&restore);
        }
    }
    Ok(out)
}

/// Records in storage_dest where `line` begins, if it branches and is not recorded yet.
pub async fn record_branch(ps: &Pageserver, node: &Node, line: &WalLine) -> OpResult<()> {
    let Some(url) = ps.repo.config()?.storage_dest else {
        return Ok(());
    };
    if !node.dir.join("wal.json").exists() {
        return Ok(());
    }
    let control = crate::snapshot::datadir::read_control(&node.data())?;
    let archive = Archive::new(ps.open_storage(&url).await?, control.system_identifier);
    let size = crate::compute::wal::DEFAULT_SEGMENT_SIZE;
    let parent = line.parent.as_ref().map(|f: &WalFork| Fork {
        history: f.history.clone(),
        tli: f.timeline,
        segno: crate::compute::wal::parse_lsn(&f.lsn)
            .map(|l| crate::compute::wal::segno_of(l, size))
            .unwrap_or(0),
        lsn: f.lsn.clone(),
    });
    archive
        .ensure_branch(
            &line.history,
            &Branch {
                parent,
                pg: Some(node.name.clone()),
                created_at: crate::snapshot::now_rfc3339(),
                segment_size: size,
            },
        )
        .await
        .map_err(|e| OpError::Failed(e.to_string()))?;
    if node.name == "main" {
        archive
            .set_current("main", &line.history)
            .await
            .map_err(|e| OpError::Failed(e.to_string()))?;
    }
    open_wal_dir(&url, control.system_identifier)
}

/// Waits until a pg started with a recovery has finished it (promoted), then makes its
/// new history's beginning known: the timeline it left and where (PostgreSQL's new
/// timeline history file), in node.json and storage_dest. A server that stops instead
/// (its target not reached) is an error that quotes its log.
pub async fn finish_recovery(
    ps: &Pageserver,
    install: &PgInstall,
    node: &Node,
    state: &mut NodeState,
) -> OpResult<()> {
    if state.recovery.is_none() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    loop {
        if node.status() != Status::Running {
            return Err(OpError::Failed(format!(
                "pg {}'s recovery from the WAL archive failed: {}; see {}",
                node.name,
                crate::compute::node::last_failure(&node.log()),
                node.log().display()
            )));
        }
        let promoted = node
            .query(install, state, "SELECT NOT pg_is_in_recovery()")
            .await
            .unwrap_or_default();
        if promoted == "t" {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(OpError::Failed(format!(
                "pg {} still recovers after an hour; see {}",
                node.name,
                node.log().display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    complete_recovery(ps, node, state).await?;
    node.set_password(install, state).await?;
    Ok(())
}

/// The bookkeeping of a recovery PostgreSQL has finished (promoted): its history's
/// beginning (the timeline it left and where, from the new timeline history file) in
/// node.json and storage_dest, and no recovery due any more.
pub async fn complete_recovery(
    ps: &Pageserver,
    node: &Node,
    state: &mut NodeState,
) -> OpResult<()> {
    let Some(recovery) = state.recovery.clone() else {
        return Ok(());
    };
    let (timeline, lsn) = node.timeline_switch().ok_or_else(|| {
        OpError::Failed(format!(
            "pg {} finished its recovery without a new timeline history file",
            node.name
        ))
    })?;
    let history = state
        .wal
        .as_ref()
        .map(|w| w.history.clone())
        .unwrap_or_else(crate::compute::node::new_history);
    let line = WalLine {
        history,
        parent: Some(WalFork {
            history: recovery.source,
            timeline,
            lsn,
        }),
    };
    state.recovery = None;
    state.wal = Some(line.clone());
    node.save_state(state)?;
    // The restore file is not needed any more; the server keeps its settings until it
    // restarts, and never reads them outside recovery.
    let _ = std::fs::remove_file(node.dir.join("restore.json"));
    record_branch(ps, node, &line).await
}

/// Archives the WAL files a pg stopped in immediate mode left ready to archive (its
/// archiver had no last round), in order, marking each done as PostgreSQL would: its
/// history then has no gap. A failure is logged and leaves the rest ready, as a failed
/// last round of a clean stop would.
pub async fn archive_leftovers(ps: &Pageserver, node: &Node) {
    if let Err(e) = push_leftovers(ps, node).await {
        tracing::warn!(
            "pg {}: archiving the WAL it left ready: {}",
            node.name,
            e.full_message()
        );
    }
}

async fn push_leftovers(ps: &Pageserver, node: &Node) -> OpResult<()> {
    let Some(target) = WalTarget::read(&node.dir.join("wal.json")).map_err(OpError::Failed)? else {
        return Ok(());
    };
    let Some(url) = ps.repo.config()?.storage_dest else {
        return Ok(());
    };
    let pg_wal = node.data().join("pg_wal");
    let status = pg_wal.join("archive_status");
    let mut ready: Vec<String> = std::fs::read_dir(&status)
        .map_err(|e| OpError::io(status.display(), e))?
        .flatten()
        .filter_map(|e| {
            let name = e
                .file_name()
                .to_string_lossy()
                .strip_suffix(".ready")?
                .to_string();
            WalFile::parse(&name, crate::compute::wal::DEFAULT_SEGMENT_SIZE).map(|_| name)
        })
        .collect();
    if ready.is_empty() {
        return Ok(());
    }
    ready.sort();
    let archive = Archive::new(ps.open_storage(&url).await?, target.system_identifier);
    for name in ready {
        crate::safekeeper::push::push(&archive, &target.history, &pg_wal.join(&name), 1)
            .await
            .map_err(|e| OpError::Failed(e.to_string()))?;
        let done = status.join(format!("{name}.done"));
        std::fs::rename(status.join(format!("{name}.ready")), &done)
            .map_err(|e| OpError::io(done.display(), e))?;
        tracing::info!("pg {}: archived {name}, left ready by its stop", node.name);
    }
    Ok(())
}

/// Makes what `node` wrote up to now archived: a commit (so a target just before now has
/// one after it to stop at), a switch to a new segment, and a wait (at most a minute)
/// until the archiver has sent the finished one. Nothing when the pg does not archive.
pub async fn flush(install: &PgInstall, node: &Node, state: &NodeState) -> OpResult<()> {
    if !node.dir.join("wal.json").exists() {
        return Ok(());
    }
    node.query(install, state, "SELECT txid_current()").await?;
    let segment = node
        .query(install, state, "SELECT pg_walfile_name(pg_switch_wal())")
        .await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let row = node
            .query(
                install,
                state,
                "SELECT coalesce(last_archived_wal, '') || ' ' || coalesce(last_failed_wal, '') FROM pg_stat_archiver",
            )
            .await?;
        let mut fields = row.split(' ');
        let (archived, failed) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        if archived.len() == 24 && archived >= segment.as_str() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(OpError::Failed(format!(
                "pg {} has not archived {segment} after a minute{}; see {}",
                node.name,
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" (archiving {failed} failed)")
                },
                node.log().display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
