//! `zenith snapshot verify REF --boot`: beyond the checksums of what was stored, whether the
//! database itself is sound. The snapshot is restored into a throwaway pg (in the repo's
//! scratch space, or the system's temporary directory without a repo), started on a free
//! port with archiving off (recovery replays the WAL the snapshot carries), and
//! `pg_amcheck --heapallindexed` checks every table and index of every database; then
//! the pg is stopped and its directory removed, on every way out.
//!
//! This finds what checksums of stored blocks cannot: a page that was already damaged
//! when the snapshot was taken (with data checksums off, nothing else notices), an index
//! that disagrees with its table, a snapshot whose WAL does not bring it to consistency.

use std::path::Path;

use crate::compute::node::{make_dir, run_as, Node, NodeState};
use crate::compute::PgInstall;
use crate::models::{OpError, OpResult};
use crate::snapshot::{self, Manifest};
use crate::storage::Storage;
use crate::util::progress::ProgressHandle;
use crate::util::tempdir::{self, TempDir};

/// What booting a snapshot found.
#[derive(Debug, Clone)]
pub struct BootReport {
    /// The databases pg_amcheck checked.
    pub databases: Vec<String>,
    /// What pg_amcheck reported, line by line: empty when it found nothing.
    pub problems: Vec<String>,
}

const SCRATCH: &str = "verify-boot";

/// Restores snapshot `m` of `storage` into a throwaway pg under `parent`, starts it and runs
/// `pg_amcheck --heapallindexed --all` on it. `restore` writes the data directory (a repo
/// restores its own snapshots, thin clones included); `None` unpacks from `storage`.
pub async fn boot_check(
    install: &PgInstall,
    storage: &dyn Storage,
    m: &Manifest,
    parent: &Path,
    repo: Option<&super::Pageserver>,
) -> OpResult<BootReport> {
    tempdir::sweep(parent, SCRATCH);
    let scratch = TempDir::new_in(parent, SCRATCH).map_err(|e| OpError::io(parent.display(), e))?;
    // PostgreSQL's account enters it to reach its own directory below.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|e| OpError::io(scratch.path().display(), e))?;
    }
    let node = Node::new("verify-boot", scratch.path().join("pg"));
    make_dir(&node.dir, run_as()?.as_ref())?;
    match repo {
        Some(ps) => {
            ps.restore(m, &node.data(), &ProgressHandle::default())
                .await?
        }
        None => {
            snapshot::unpack(
                m.format,
                storage,
                &m.id,
                &node.data(),
                &ProgressHandle::default(),
            )
            .await?;
        }
    }
    super::store::prepare_for_postgres(&node.data())?;
    let port = crate::util::port::free_port_except(20_000 + fastrand::u16(..20_000), &[])
        .map_err(OpError::Failed)?;
    let state = NodeState::new(port);
    // Nothing of the snapshot's own duties: no archiving, no replication, little memory.
    let settings: Vec<String> = [
        "archive_mode=off",
        "max_wal_senders=0",
        "wal_level=minimal",
        "shared_buffers=32MB",
        "synchronous_standby_names=",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut child = node
        .start(install, &state, &settings)
        .await
        .map_err(|e| OpError::Failed(format!("snapshot {} does not start: {e}", m.id)))?;
    let checked = amcheck(install, &node, port).await;
    let _ = node.stop_child(&mut child, true).await;
    drop(scratch);
    checked
}

async fn amcheck(install: &PgInstall, node: &Node, port: u16) -> OpResult<BootReport> {
    let host = node.dir.display().to_string();
    let port = port.to_string();
    let common = ["-h", host.as_str(), "-p", port.as_str(), "-U", "postgres"];
    let listed = tokio::process::Command::new(install.bin("psql"))
        .args(common)
        .args(["-X", "-A", "-t", "-d", "postgres", "-c"])
        .arg("select datname from pg_database where datallowconn order by 1")
        .output()
        .await
        .map_err(|e| OpError::io(install.bin("psql").display(), e))?;
    if !listed.status.success() {
        return Err(OpError::Failed(format!(
            "the restored snapshot started, but listing its databases failed: {}",
            crate::compute::node::last_line(&listed.stderr)
        )));
    }
    let databases: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect();
    let out = tokio::process::Command::new(install.bin("pg_amcheck"))
        .args(common)
        .args(["--install-missing", "--heapallindexed", "--all"])
        .arg("--maintenance-db=postgres")
        .output()
        .await
        .map_err(|e| OpError::io(install.bin("pg_amcheck").display(), e))?;
    let mut problems: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.starts_with("NOTICE:")),
        )
        .map(str::to_string)
        .filter(|l| !l.trim().is_empty())
        .collect();
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("pg_amcheck exited with {}", out.status));
    }
    Ok(BootReport {
        databases,
        problems,
    })
}
