//! The one interface the CLI uses for pgs, snapshots and status: [`Control`]. While
//! zenith-local runs, the CLI's implementation sends each call to its REST API (so the
//! CLI and the API never disagree about pgs); when it is down, [`Ops`] carries the same
//! calls out in the command itself.

use async_trait::async_trait;

use super::pgs::Ops;
use crate::models::{CheckoutReport, NewPg, OpResult, PgInfo, SnapshotSummary, StatusReport};
use crate::util::progress::ProgressHandle;

/// What can be done with a repo's pgs and snapshots, wherever it is carried out.
/// `progress` is drawn where the work happens (in the command, not through the API).
/// The futures need not be `Send`: the CLI runs them on its own thread, and zenith-local
/// runs operations on blocking threads of their own (see the API).
#[async_trait(?Send)]
pub trait Control: Send + Sync {
    async fn create_pg(&self, new: NewPg, progress: ProgressHandle) -> OpResult<PgInfo>;
    async fn start_pg(
        &self,
        name: &str,
        replica: bool,
        primary: Option<String>,
        progress: ProgressHandle,
    ) -> OpResult<PgInfo>;
    async fn stop_pg(&self, name: &str, immediate: bool) -> OpResult<PgInfo>;
    async fn promote_pg(&self, name: &str) -> OpResult<PgInfo>;
    /// Rolls pg `name` back to `snapshot`, or to the point in time `at` of its history.
    async fn checkout_pg(
        &self,
        name: &str,
        snapshot: Option<&str>,
        at: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<CheckoutReport>;
    async fn destroy_pg(&self, name: &str) -> OpResult<()>;
    async fn list_pgs(&self) -> OpResult<Vec<PgInfo>>;
    async fn show_pg(&self, name: &str) -> OpResult<PgInfo>;
    /// Snapshots pg `PG` of `PG@TAG` (default main), online when it runs.
    async fn create_snapshot(
        &self,
        name: Option<String>,
        progress: ProgressHandle,
    ) -> OpResult<SnapshotSummary>;
    async fn status(&self) -> OpResult<StatusReport>;
}

#[async_trait(?Send)]
impl Control for Ops {
    async fn create_pg(&self, new: NewPg, progress: ProgressHandle) -> OpResult<PgInfo> {
        Ops::create_pg(self, &new, progress).await
    }

    async fn start_pg(
        &self,
        name: &str,
        replica: bool,
        primary: Option<String>,
        _progress: ProgressHandle,
    ) -> OpResult<PgInfo> {
        Ops::start_pg(self, name, replica, primary.as_deref()).await
    }

    async fn stop_pg(&self, name: &str, immediate: bool) -> OpResult<PgInfo> {
        Ops::stop_pg(self, name, immediate).await
    }

    async fn promote_pg(&self, name: &str) -> OpResult<PgInfo> {
        Ops::promote_pg(self, name).await
    }

    async fn checkout_pg(
        &self,
        name: &str,
        snapshot: Option<&str>,
        at: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<CheckoutReport> {
        Ops::checkout(self, name, snapshot, at, progress).await
    }

    async fn destroy_pg(&self, name: &str) -> OpResult<()> {
        Ops::destroy_pg(self, name).await
    }

    async fn list_pgs(&self) -> OpResult<Vec<PgInfo>> {
        Ops::list_pgs(self)
    }

    async fn show_pg(&self, name: &str) -> OpResult<PgInfo> {
        Ops::show_pg(self, name)
    }

    async fn create_snapshot(
        &self,
        name: Option<String>,
        progress: ProgressHandle,
    ) -> OpResult<SnapshotSummary> {
        let m = self
            .pageserver
            .create_snapshot(name.as_deref(), progress)
            .await?;
        Ok(self.pageserver.summary(&m))
    }

    async fn status(&self) -> OpResult<StatusReport> {
        Ops::status(self).await
    }
}
