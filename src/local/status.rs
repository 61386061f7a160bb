//! What `zenith status` and `GET /status` show: zenith-local, every pg with what
//! supervision saw of it, the newest snapshot and background pushes.

use super::pgs::{describe, Ops};
use crate::models::{LocalSummary, NewestSnapshot, OpResult, PgStatus, StatusReport};

impl Ops {
    pub async fn status(&self) -> OpResult<StatusReport> {
        let repo = self.repo();
        let local = super::running(repo);
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
            });
        }
        let newest = self
            .pageserver
            .newest_snapshot()
            .await?
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
            push: local.and_then(|l| l.push),
        })
    }
}
