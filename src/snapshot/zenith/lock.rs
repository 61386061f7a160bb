//! Locks between exports and collections: `locks/<kind>-<random>.lock` objects, rewritten
//! in the background while held. An export must not have a collection remove a block it
//! decided not to upload because it was there; each side writes its lock first and then
//! looks for the other's, so whichever looks second backs off.
//!
//! A lock names its process (host and pid): a lock of a process on this machine that no
//! longer runs is recognised as dead at once; one of another machine counts as abandoned
//! once it has not been rewritten for [`LOCK_STALE`].

use std::sync::Arc;

use bytes::Bytes;

use super::older_than;
use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::manifest;
use crate::storage::Storage;

/// Runs `work` under the export lock of `storage`. The lock tells a concurrent
/// `snapshot delete` not to collect packs this run relies on; a collection already under
/// way makes this export wait for another day. The lock is released however `work` ends;
/// a process killed while holding it leaves a lock the next run recognises as dead.
pub(crate) async fn with_export_lock<T>(
    storage: &Arc<dyn Storage>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let lock = HeldLock::take_unless(storage, "export", "locks/gc-")
        .await?
        .map_err(|gc| SnapshotError::Refused {
            reason: format!(
                "a `zenith snapshot delete` is collecting unused data in {} right now ({gc}); run the export again when it has finished",
                storage.url()
            ),
        })?;
    // What killed runs left behind (temporary files of a local storage) goes first.
    storage.remove_abandoned().await;
    let result = work.await;
    lock.release().await;
    result
}

/// How often a held lock is rewritten.
const LOCK_REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// After how long without a rewrite a lock counts as abandoned (its process killed), when
/// its owner cannot be checked (another machine).
const LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(600);

/// Who holds a lock: written into the lock object, read by whoever finds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Owner {
    written_at: String,
    host: String,
    /// Tells a reboot of the same host apart: a lock of an earlier boot is dead.
    boot_id: String,
    /// Its PID namespace: a pid means something only in the same one.
    #[serde(default)]
    pid_ns: Option<String>,
    pid: i32,
}

impl Owner {
    fn me() -> Owner {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .unwrap_or_default()
        };
        Owner {
            written_at: manifest::now_rfc3339(),
            host: read("/proc/sys/kernel/hostname"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            pid_ns: crate::util::tempdir::pid_namespace(),
            pid: std::process::id() as i32,
        }
    }

    /// Whether the owner is known to be gone: a process of this machine that no longer
    /// runs, or one of an earlier boot of it.
    fn is_dead(&self) -> bool {
        let me = Owner::me();
        if self.host.is_empty() || self.host != me.host || me.boot_id.is_empty() {
            return false;
        }
        if self.boot_id != me.boot_id {
            return true;
        }
        // Same boot: the pid says something only in the same PID namespace.
        self.pid_ns.is_some()
            && self.pid_ns == me.pid_ns
            && self.pid != me.pid
            && !crate::util::tempdir::pid_alive(self.pid)
    }

    fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("serializes"))
    }
}

/// A lock object (`locks/<kind>-<random>.lock`), rewritten in the background while held.
///
/// Exports and garbage collection exclude each other: each writes its lock first and then
/// looks for the other's. Whichever looks second sees the first and backs off, so a
/// collection never removes a block an export decided not to upload because it was there.
pub(crate) struct HeldLock {
    storage: Arc<dyn Storage>,
    key: String,
    refresher: tokio::task::JoinHandle<()>,
}

impl HeldLock {
    async fn take(storage: Arc<dyn Storage>, kind: &str) -> Result<HeldLock> {
        let key = format!("locks/{kind}-{:016x}.lock", fastrand::u64(..));
        storage.put(&key, Owner::me().to_bytes()).await?;
        let (s, k) = (Arc::clone(&storage), key.clone());
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_REFRESH).await;
                if let Err(e) = s.put(&k, Owner::me().to_bytes()).await {
                    tracing::warn!("could not refresh the lock {k}: {e}");
                }
            }
        });
        Ok(HeldLock {
            storage,
            key,
            refresher,
        })
    }

    /// Takes a `kind` lock unless a live lock under `other` exists: then the lock is
    /// released again and the other one's description returned.
    pub(super) async fn take_unless(
        storage: &Arc<dyn Storage>,
        kind: &str,
        other: &str,
    ) -> Result<std::result::Result<HeldLock, String>> {
        let lock = HeldLock::take(Arc::clone(storage), kind).await?;
        match live_locks(storage.as_ref(), other).await {
            Ok(found) => match found.into_iter().next() {
                Some(holder) => {
                    lock.release().await;
                    Ok(Err(holder))
                }
                None => Ok(Ok(lock)),
            },
            Err(e) => {
                lock.release().await;
                Err(e)
            }
        }
    }

    pub(super) async fn release(self) {
        self.refresher.abort();
        if let Err(e) = self.storage.delete(&self.key).await {
            tracing::warn!("could not remove the lock {}: {e}", self.key);
        }
    }
}

/// Locks under `prefix` that belong to a live process, described. A lock whose owner is
/// known to be dead is removed; one whose owner cannot be checked counts as live until it
/// has not been rewritten for [`LOCK_STALE`].
async fn live_locks(storage: &dyn Storage, prefix: &str) -> Result<Vec<String>> {
    let mut live = Vec::new();
    for l in storage.list(prefix).await? {
        if older_than(l.last_modified, LOCK_STALE) {
            continue;
        }
        let owner = match storage.get_bytes_limited(&l.key, 4096).await {
            Ok(bytes) => serde_json::from_slice::<Owner>(&bytes).ok(),
            // Released meanwhile.
            Err(crate::storage::Error::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(owner) = owner.as_ref().filter(|o| o.is_dead()) {
            tracing::info!(
                "removing the lock {} of process {} on {}, which no longer runs",
                l.key,
                owner.pid,
                owner.host
            );
            storage.delete(&l.key).await?;
            continue;
        }
        let age = l
            .last_modified
            .and_then(|t| t.elapsed().ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        live.push(match owner {
            Some(o) => format!(
                "{}, process {} on {}, refreshed {age}s ago",
                l.key, o.pid, o.host
            ),
            None => format!("{}, refreshed {age}s ago", l.key),
        });
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_of_this_machine_are_checked_others_are_not() {
        let me = Owner::me();
        assert!(!me.is_dead());
        let dead = Owner {
            pid: 2_147_483_646,
            ..me.clone()
        };
        assert!(dead.is_dead());
        let rebooted = Owner {
            boot_id: "another-boot".into(),
            ..me.clone()
        };
        assert!(rebooted.is_dead());
        let elsewhere = Owner {
            host: "another-host".into(),
            pid: 2_147_483_646,
            ..me.clone()
        };
        assert!(!elsewhere.is_dead());
        let other_container = Owner {
            pid_ns: Some("1".into()),
            pid: 2_147_483_646,
            ..me
        };
        assert!(!other_container.is_dead());
    }
}
