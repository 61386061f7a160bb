//! Background pushes: while zenith-local runs with a storage_dest, it snapshots the main
//! pg (online, when it changed) and pushes every snapshot storage_dest lacks, on the
//! `[push] interval` of config.toml and at `zenith stop`. A failed push is retried with
//! backoff and reported in `zenith status`; it never stops a database.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::ops::{OpResult, Ops};
use super::repo::Retention;
use super::share::{doomed, of_main, STORAGE_DEST};
use super::supervisor::Supervisor;
use crate::compute::node::Status;

/// What `zenith status` shows of background pushes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PushState {
    pub storage_dest: String,
    pub interval_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pushed: Option<String>,
    /// When the last push succeeded, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pushed_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    #[serde(default)]
    pub failures: u32,
    /// When the next attempt is due, seconds since the epoch.
    #[serde(default)]
    pub next_unix: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Longest wait after a failure before the next attempt (never longer than the interval).
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One zenith-local's pusher.
pub struct Pusher {
    ops: Ops,
    supervisor: Arc<Supervisor>,
    period: Duration,
    retention: Option<Retention>,
    /// The main pg's row change counters after the last snapshot: unchanged means
    /// nothing to take.
    last_changes: tokio::sync::Mutex<Option<String>>,
}

impl Pusher {
    pub fn new(
        ops: Ops,
        supervisor: Arc<Supervisor>,
        period: Duration,
        retention: Option<Retention>,
    ) -> Arc<Pusher> {
        Arc::new(Pusher {
            ops,
            supervisor,
            period,
            retention,
            last_changes: Default::default(),
        })
    }

    /// Pushes on schedule until `stop` turns true (between pushes).
    pub async fn run(
        self: Arc<Self>,
        storage_dest: String,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut state = PushState {
            storage_dest,
            interval_secs: self.period.as_secs(),
            next_unix: unix_now() + self.period.as_secs(),
            ..Default::default()
        };
        self.supervisor.set_push(Some(state.clone()));
        let mut wait = self.period;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            wait = self.attempt(&mut state, false).await;
        }
    }

    /// One push, its outcome recorded in `state`; returns how long to wait for the next.
    /// `force` takes a snapshot even if no rows seem to have changed (statistics reach
    /// the counters up to seconds late): the last push at `zenith stop` misses nothing.
    pub async fn attempt(&self, state: &mut PushState, force: bool) -> Duration {
        let wait = match self.push_once(force).await {
            Ok(pushed) => {
                if let Some(id) = pushed {
                    state.last_pushed = Some(id);
                    state.last_pushed_unix = Some(unix_now());
                }
                state.last_error = None;
                state.failures = 0;
                self.period
            }
            Err(e) => {
                let message = match &e {
                    super::ops::OpError::Other(e) => crate::util::message::full(e),
                    other => other.to_string(),
                };
                tracing::warn!(
                    "background push to {} failed: {message}",
                    state.storage_dest
                );
                state.last_error = Some(message);
                state.failures += 1;
                let backoff = Duration::from_secs(5u64.saturating_mul(1 << state.failures.min(10)));
                backoff.min(MAX_BACKOFF).min(self.period)
            }
        };
        state.next_unix = unix_now() + wait.as_secs();
        self.supervisor.set_push(Some(state.clone()));
        wait
    }

    /// Snapshots the main pg if its WAL moved since the last one, pushes whatever
    /// storage_dest lacks, applies retention; the newest snapshot storage_dest now holds.
    async fn push_once(&self, force: bool) -> OpResult<Option<String>> {
        use crate::snapshot::native;
        let main = self.ops.repo.node("main");
        if main.status() == Status::Running {
            let state = main.state()?;
            let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
            // Rows written, updated or deleted anywhere: a snapshot's own WAL (its
            // checkpoint, the backup records) changes none of these.
            let changes_sql = "SELECT sum(tup_inserted + tup_updated + tup_deleted)::text \
                               || '/' || pg_is_in_recovery() FROM pg_stat_database";
            let now = main.query(&install, &state, changes_sql).await.ok();
            let mut last = self.last_changes.lock().await;
            if force || now.is_none() || *last != now {
                let m = self.ops.create_snapshot(None, Default::default()).await?;
                tracing::info!("background snapshot {} of pg main", m.id);
                *last = main.query(&install, &state, changes_sql).await.ok();
            }
        }
        let url = self.ops.storage_url(STORAGE_DEST)?;
        let dest = crate::storage::open(&url)
            .await
            .map_err(anyhow::Error::from)?;
        let store = crate::storage::open(&self.ops.repo.store_url())
            .await
            .map_err(anyhow::Error::from)?;
        // Retention decides over the repo's and storage_dest's snapshots of main together,
        // so a snapshot it drops is neither pushed nor kept on either side.
        let mut both: Vec<_> = native::list(store.as_ref()).await?;
        both.extend(native::list(dest.as_ref()).await?);
        both.retain(of_main);
        let doomed = match self.retention {
            Some(rule) => doomed(&both, rule),
            None => Default::default(),
        };
        let pushed = self
            .ops
            .push_except(None, None, None, &doomed, Default::default())
            .await?;
        let sent = pushed["pushed"].as_array().map(Vec::len).unwrap_or(0);
        if sent > 0 {
            tracing::info!(
                "pushed {sent} snapshot(s) to storage_dest: {} bytes in {} objects",
                pushed["bytes_sent"],
                pushed["objects_sent"]
            );
        }
        if let Some(rule) = self.retention {
            for (storage, label) in [
                (url.as_str(), "storage_dest"),
                (&self.ops.repo.store_url(), "the repo"),
            ] {
                let gone = self
                    .ops
                    .prune(storage, rule, false, |m| doomed.contains(&m.id))
                    .await?;
                for m in gone {
                    tracing::info!("retention: deleted snapshot {} from {label}", m.id);
                }
            }
        }
        // After the push and retention, storage_dest holds every snapshot of main listed
        // above that retention kept: the newest of those is the newest there.
        Ok(both
            .into_iter()
            .filter(|m| !doomed.contains(&m.id))
            .map(|m| m.id)
            .max())
    }
}
