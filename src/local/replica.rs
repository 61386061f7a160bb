//! Streaming replicas: a pg whose data is a copy of its primary's, started with
//! `standby.signal` and following the primary through a physical replication slot the
//! primary keeps for it (`zr_<name>_<hash>`), over the primary's Unix socket.

use sha2::Digest;

use crate::compute::node::{as_postgres, run_as, Node, NodeState};
use crate::compute::PgInstall;
use crate::models::{OpError, OpResult};
use crate::pageserver::Repo;

/// The slot a primary keeps for replica `name`: readable, unique per name, ≤ 63 bytes.
pub fn slot_name(name: &str) -> String {
    let readable: String = name
        .chars()
        .take(40)
        .map(|c| if c == '-' { '_' } else { c })
        .collect();
    let hash = sha2::Sha256::digest(name.as_bytes());
    format!(
        "zr_{readable}_{:08x}",
        u32::from_be_bytes(hash[..4].try_into().expect("4 bytes"))
    )
}

/// Server settings a pg starts with: for a replica, where its primary is. Its
/// `standby.signal` is put back if missing (it goes only when the server is promoted).
pub fn settings(repo: &Repo, node: &Node, state: &NodeState) -> OpResult<Vec<String>> {
    let Some(primary) = &state.primary else {
        return Ok(Vec::new());
    };
    let signal = node.data().join("standby.signal");
    if !signal.exists() {
        write_owned(&signal)?;
    }
    let pnode = repo.node(primary);
    let pstate = pnode.state()?;
    Ok(vec![
        format!(
            "primary_conninfo=host='{}' port={} user=postgres application_name={}",
            pnode.dir.display(),
            pstate.port,
            node.name
        ),
        format!("primary_slot_name={}", slot_name(&node.name)),
        "hot_standby=on".into(),
    ])
}

/// An empty file owned by PostgreSQL's account.
fn write_owned(path: &std::path::Path) -> OpResult<()> {
    std::fs::write(path, b"").map_err(|e| OpError::io(path.display(), e))?;
    if let Some(a) = run_as()? {
        std::os::unix::fs::chown(path, Some(a.uid), Some(a.gid))
            .map_err(|e| OpError::io(path.display(), e))?;
    }
    Ok(())
}

/// The replicas of `primary` in the repo.
pub fn replicas_of(repo: &Repo, primary: &str) -> Vec<String> {
    repo.nodes()
        .into_iter()
        .filter(|n| {
            n.state()
                .is_ok_and(|s| s.primary.as_deref() == Some(primary))
        })
        .map(|n| n.name)
        .collect()
}

/// Drops the replica slots a running primary keeps for pgs that are no longer its
/// replicas (destroyed or promoted), which would hold its WAL forever. Failures are
/// logged: the server runs on.
pub async fn prune_slots(repo: &Repo, install: &PgInstall, node: &Node, state: &NodeState) {
    let mut wanted: Vec<String> = replicas_of(repo, &node.name)
        .iter()
        .map(|r| slot_name(r))
        .collect();
    // The safekeeper's slot, while the pg has a safekeeper: an unused slot would keep
    // every segment from then on.
    if super::keeper::wanted(repo, node, state)
        .ok()
        .flatten()
        .is_some()
    {
        wanted.push(crate::safekeeper::receiver::NAME.to_string());
    }
    let sql = "SELECT slot_name FROM pg_replication_slots \
               WHERE (slot_name LIKE 'zr\\_%' OR slot_name = 'zenith_safekeeper') \
               AND NOT temporary AND NOT active";
    let slots = match node.query(install, state, sql).await {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(
                "cannot list the replication slots of pg {}: {}",
                node.name,
                crate::util::message::full(&e)
            );
            return;
        }
    };
    for slot in slots.lines().filter(|s| !wanted.iter().any(|w| w == s)) {
        let drop = format!("SELECT pg_drop_replication_slot('{slot}')");
        match node.query(install, state, &drop).await {
            Ok(_) => tracing::info!(
                "dropped the unused replication slot {slot} of pg {}",
                node.name
            ),
            Err(e) => tracing::warn!("{}", crate::util::message::full(&e)),
        }
    }
}

/// Copies the running primary into `target` (a new directory) with `pg_basebackup`,
/// creating the replica's slot first so the primary keeps every WAL segment the replica
/// will need, and marks the copy a standby.
pub async fn copy_primary(
    install: &PgInstall,
    primary: &Node,
    pstate: &NodeState,
    replica: &str,
    target: &std::path::Path,
) -> OpResult<()> {
    let slot = slot_name(replica);
    // A slot left by an earlier replica of the same name: it starts anew.
    primary
        .query(
            install,
            pstate,
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{slot}' AND NOT active"
            ),
        )
        .await?;
    let out = tokio::process::Command::from(as_postgres(&install.bin("pg_basebackup"))?)
        .arg("--dbname")
        .arg(format!(
            "host='{}' port={} user=postgres",
            primary.dir.display(),
            pstate.port
        ))
        .arg("--pgdata")
        .arg(target)
        .args([
            "--format=plain",
            "--wal-method=stream",
            "--checkpoint=fast",
            "--create-slot",
            "--no-password",
        ])
        .arg(format!("--slot={slot}"))
        .env("PGAPPNAME", "zenith")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| OpError::io(install.bin("pg_basebackup").display(), e))?;
    if !out.status.success() {
        return Err(OpError::Failed(format!(
            "copying pg {} for its replica failed: {}",
            primary.name,
            crate::compute::node::last_line(&out.stderr)
        )));
    }
    write_owned(&target.join("standby.signal"))
}

/// Waits until the replica streams from its primary (a replica that cannot follow is an
/// error now, not a silent lag).
pub async fn wait_streaming(install: &PgInstall, node: &Node, state: &NodeState) -> OpResult<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = node
            .query(install, state, "SELECT status FROM pg_stat_wal_receiver")
            .await
            .unwrap_or_default();
        if status == "streaming" {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(OpError::Failed(format!(
                "pg {} does not stream from its primary after 60 s: {}; see {}",
                node.name,
                crate::compute::node::last_log_line(&node.log()),
                node.log().display()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_and_distinct() {
        let a = slot_name("a-b");
        let b = slot_name("a_b");
        assert_ne!(a, b);
        assert!(a.starts_with("zr_a_b_"));
        let long = slot_name(&"x".repeat(63));
        assert!(long.len() <= 63, "{}", long.len());
        assert!(long
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'));
    }
}
