//! What `zenith status` and `GET /status` show: zenith-local, every pg with what
//! supervision saw of it, the newest snapshot and background pushes.

use super::pgs::{describe, Ops};
use crate::compute::node::Status;
use crate::models::{
    ArchiveStatus, ClonesStatus, LocalSummary, NewestSnapshot, OpResult, PgStatus, StatusReport,
};

impl Ops {
    pub async fn status(&self) -> OpResult<StatusReport> {
        let repo = self.repo();
        let local = super::running(repo);
        let mode = self.pageserver.clone_mode();
        let mut pgs = Vec::new();
        for node in repo.nodes().into_iter().filter(|n| n.exists()) {
            let state = node.state()?;
            let watched = local
                .as_ref()
                .and_then(|l| l.pgs.iter().find(|p| p.name == node.name));
            pgs.push(PgStatus {
                pg: describe(&node, &state),
                supervised: watched.is_some_and(|p| p.failed.is_none()),
                restarts: watched.map(|p| p.restarts).unwrap_or(0),
                failed: watched.and_then(|p| p.failed.clone()),
                space: None,
            });
        }
        let snapshots = self.pageserver.list_snapshots().await?;
        // Counting extents walks every file of every pg and clone: off the async threads.
        let ps = self.pageserver.clone();
        let ids: Vec<String> = snapshots.iter().map(|m| m.id.clone()).collect();
        let names: Vec<String> = pgs.iter().map(|p| p.pg.name.clone()).collect();
        let on = mode.on;
        let (spaces, snapshots_owned) = tokio::task::spawn_blocking(move || {
            let spaces: Vec<_> = names
                .iter()
                .map(|n| on.then(|| ps.pg_space(&ps.repo.node(n))).flatten())
                .collect();
            let owned: u64 = ids
                .iter()
                .filter_map(|id| ps.clone_space(id))
                .map(|s| s.owned)
                .sum();
            (spaces, owned)
        })
        .await
        .map_err(|e| crate::models::OpError::Failed(format!("counting space: {e}")))?;
        for (pg, space) in pgs.iter_mut().zip(spaces) {
            pg.space = space;
        }
        let newest = snapshots
            .into_iter()
            .max_by(|a, b| a.id.cmp(&b.id))
            .map(|m| NewestSnapshot {
                id: m.id,
                name: m.name,
                created_at: m.created_at,
                total_size: m.total_size,
            });
        Ok(StatusReport {
            repo: repo.root.clone(),
            zenith_local: LocalSummary {
                running: local.is_some(),
                pid: local.as_ref().map(|l| l.pid),
                api: local
                    .as_ref()
                    .map(|l| format!("http://127.0.0.1:{}", l.api_port)),
            },
            pgs,
            newest_snapshot: newest,
            storage_dest: repo.config()?.storage_dest,
            safekeeper: local.as_ref().and_then(|l| l.safekeeper.clone()),
            console_url: local
                .as_ref()
                .map(|l| format!("http://127.0.0.1:{}/console", l.api_port)),
            push: local.and_then(|l| l.push),
            wal: self.archive_status("main").await,
            clones: ClonesStatus {
                on: mode.on,
                reason: mode.reason,
                snapshots_owned,
            },
        })
    }

    /// What `pg_stat_archiver` of pg `name` says, when it runs as a primary and archives.
    async fn archive_status(&self, name: &str) -> Option<ArchiveStatus> {
        let node = self.repo().node(name);
        let state = node.state().ok()?;
        if node.status() != Status::Running
            || state.primary.is_some()
            || !node.dir.join("wal.json").exists()
            || self.repo().config().ok()?.storage_dest.is_none()
        {
            return None;
        }
        let install = crate::pageserver::install().ok()?;
        let sql = "SELECT coalesce(last_archived_wal, ''), \
                   coalesce(extract(epoch from now() - last_archived_time)::bigint::text, ''), \
                   failed_count, coalesce(last_failed_wal, ''), \
                   coalesce(extract(epoch from now() - last_failed_time)::bigint::text, '') \
                   FROM pg_stat_archiver";
        let row = node.query(&install, &state, sql).await.ok()?;
        let f: Vec<&str> = row.split('|').collect();
        let [archived, archived_age, failed, failed_wal, failed_age] = f.as_slice() else {
            return None;
        };
        let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Some(ArchiveStatus {
            history: state.wal.map(|w| w.history),
            last_archived: text(archived),
            last_archived_age_secs: archived_age.parse().ok(),
            failed_count: failed.parse().unwrap_or(0),
            last_failed: text(failed_wal),
            last_failed_age_secs: failed_age.parse().ok(),
        })
    }
}
