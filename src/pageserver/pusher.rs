//! Background pushes: while zenith-local runs with a storage_dest, it snapshots the main
//! pg (online, when it changed) and pushes every snapshot storage_dest lacks, on the
//! `[push] interval` of config.toml, earlier once the main pg wrote `[push] wal` of WAL,
//! and at `zenith stop`. config.toml is read again every few seconds, so a storage_dest
//! set or changed while zenith-local runs takes effect. A failed push is retried with
//! backoff and reported in `zenith status`; it never stops a database.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::config::Retention;
use super::share::{doomed, of_main};
use super::Pageserver;
use crate::compute::node::Status;
use crate::compute::PgInstall;
use crate::models::{OpResult, PushState};
use crate::snapshot::zenith;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Waits after failed pushes: about 10 s after the first, doubling to at most 5 minutes
/// (never longer than the interval), with jitter (the shared backoff policy).
const BACKOFF: crate::util::backoff::RetryPolicy = crate::util::backoff::RetryPolicy {
    max_attempts: u32::MAX,
    base_delay: Duration::from_secs(10),
    max_delay: Duration::from_secs(300),
};

/// How often the pusher reads config.toml again and looks at the main pg's WAL.
const TICK: Duration = Duration::from_secs(5);

/// What config.toml says of background pushes, read again every [`TICK`]: storage_dest
/// can be set, changed or removed while zenith-local runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub storage_dest: String,
    pub period: Duration,
    pub retention: Option<Retention>,
    pub wal_bytes: Option<u64>,
}

/// Where the pusher reports its state (zenith-local's status file).
pub type Report = Box<dyn Fn(Option<PushState>) + Send + Sync>;

/// One zenith-local's pusher.
pub struct Pusher {
    pageserver: Pageserver,
    /// The installation the main pg runs with.
    install: PgInstall,
    report: Report,
    /// The state last reported.
    state: Mutex<Option<PushState>>,
    /// The main pg's row change counters after the last snapshot: unchanged means
    /// nothing to take.
    last_changes: tokio::sync::Mutex<Option<String>>,
    /// The main pg's WAL position at its last background snapshot (or when first seen).
    last_lsn: tokio::sync::Mutex<Option<u64>>,
}

impl Pusher {
    pub fn new(pageserver: Pageserver, install: PgInstall, report: Report) -> Arc<Pusher> {
        Arc::new(Pusher {
            pageserver,
            install,
            report,
            state: Mutex::new(None),
            last_changes: Default::default(),
            last_lsn: Default::default(),
        })
    }

    /// Background pushes as config.toml has them now: `None` without a storage_dest or
    /// with an interval of 0.
    pub fn settings(&self) -> OpResult<Option<Settings>> {
        let config = self.pageserver.repo.config()?;
        let (Some(storage_dest), Some(period)) = (config.storage_dest, config.push.period()?)
        else {
            return Ok(None);
        };
        Ok(Some(Settings {
            storage_dest,
            period,
            retention: config.push.retention()?,
            wal_bytes: config.push.wal_bytes()?,
        }))
    }

    /// The state last reported: what the last push at `zenith stop` continues from.
    pub fn state(&self) -> Option<PushState> {
        self.state.lock().expect("not poisoned").clone()
    }

    fn set_state(&self, state: Option<PushState>) {
        *self.state.lock().expect("not poisoned") = state.clone();
        (self.report)(state);
    }

    /// Pushes on schedule, or early after `[push] wal` of WAL, until `stop` turns true
    /// (between pushes).
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut state: Option<PushState> = None;
        let mut bad_config = None;
        let mut tick = TICK;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let settings = match self.settings() {
                Ok(s) => s,
                Err(e) => {
                    let e = e.full_message();
                    if bad_config.as_ref() != Some(&e) {
                        tracing::error!("background pushes: {e}");
                        bad_config = Some(e);
                    }
                    continue;
                }
            };
            bad_config = None;
            let Some(settings) = settings else {
                if state.take().is_some() {
                    tracing::info!("background pushes are off");
                    self.set_state(None);
                }
                continue;
            };
            let st = match &mut state {
                Some(st) if st.storage_dest == settings.storage_dest => st,
                _ => {
                    tracing::info!(
                        "pushing to {} every {} s",
                        settings.storage_dest,
                        settings.period.as_secs()
                    );
                    state.insert(PushState {
                        storage_dest: settings.storage_dest.clone(),
                        next_unix: unix_now() + settings.period.as_secs(),
                        ..Default::default()
                    })
                }
            };
            tick = TICK.min(settings.period);
            if st.interval_secs != settings.period.as_secs() {
                // A shorter interval counts from now, not from the end of the old one.
                st.next_unix = st.next_unix.min(unix_now() + settings.period.as_secs());
            }
            st.interval_secs = settings.period.as_secs();
            st.wal_bytes = settings.wal_bytes;
            self.set_state(Some(st.clone()));
            let due = unix_now() >= st.next_unix;
            // WAL brings a push forward, not a retry after a failure.
            let early = !due && st.failures == 0 && self.wal_due(settings.wal_bytes).await;
            if due || early {
                if early {
                    tracing::info!("the main pg wrote more WAL than [push] wal: pushing now");
                }
                // WAL without row changes (an index build, a table rewrite) is a change
                // too: an early push always snapshots, which also moves the WAL baseline.
                self.attempt(st, &settings, early).await;
            }
        }
    }

    /// Whether the main pg wrote at least `volume` bytes of WAL since its last
    /// background snapshot.
    async fn wal_due(&self, volume: Option<u64>) -> bool {
        let Some(volume) = volume else {
            return false;
        };
        let Some(now) = self.main_lsn().await else {
            return false;
        };
        let mut last = self.last_lsn.lock().await;
        let base = *last.get_or_insert(now);
        if now < base {
            // The main pg went back to an older snapshot: its WAL counts from here.
            *last = Some(now);
            return false;
        }
        now - base >= volume
    }

    /// The main pg's WAL position in bytes, when it runs as a primary.
    async fn main_lsn(&self) -> Option<u64> {
        let main = self.pageserver.repo.node("main");
        if main.status() != Status::Running {
            return None;
        }
        let state = main.state().ok()?;
        let sql = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint";
        let out = main.query(&self.install, &state, sql).await.ok()?;
        out.trim().parse().ok()
    }

    /// One push, its outcome recorded in `state`, which also says when the next is due.
    /// `force` takes a snapshot even if no rows seem to have changed (statistics reach
    /// the counters up to seconds late): the last push at `zenith stop` misses nothing.
    pub async fn attempt(&self, state: &mut PushState, settings: &Settings, force: bool) {
        let wait = match self.push_once(settings, force).await {
            Ok(pushed) => {
                if let Some(id) = pushed {
                    state.last_pushed = Some(id);
                    state.last_pushed_unix = Some(unix_now());
                }
                state.last_error = None;
                state.failures = 0;
                settings.period
            }
            Err(e) => {
                let message = e.full_message();
                tracing::warn!(
                    "background push to {} failed: {message}",
                    state.storage_dest
                );
                state.last_error = Some(message);
                state.failures += 1;
                BACKOFF.delay(state.failures).min(settings.period)
            }
        };
        state.next_unix = unix_now() + wait.as_secs();
        self.set_state(Some(state.clone()));
    }

    /// Snapshots the main pg if its WAL moved since the last one, pushes whatever
    /// storage_dest lacks, applies retention; the newest snapshot storage_dest now holds.
    async fn push_once(&self, settings: &Settings, force: bool) -> OpResult<Option<String>> {
        let main = self.pageserver.repo.node("main");
        if main.status() == Status::Running {
            let state = main.state()?;
            let install = &self.install;
            // Rows written, updated or deleted anywhere: a snapshot's own WAL (its
            // checkpoint, the backup records) changes none of these.
            let changes_sql = "SELECT sum(tup_inserted + tup_updated + tup_deleted)::text \
                               || '/' || pg_is_in_recovery() FROM pg_stat_database";
            let now = main.query(install, &state, changes_sql).await.ok();
            let mut last = self.last_changes.lock().await;
            if force || now.is_none() || *last != now {
                let lsn = self.main_lsn().await;
                let m = self
                    .pageserver
                    .create_snapshot(None, Default::default())
                    .await?;
                tracing::info!("background snapshot {} of pg main", m.id);
                *last = main.query(install, &state, changes_sql).await.ok();
                *self.last_lsn.lock().await = lsn;
            }
        }
        let url = &settings.storage_dest;
        let dest = self.pageserver.open_storage(url).await?;
        let store = self.pageserver.store().await?;
        // Retention decides over the repo's and storage_dest's snapshots of main together,
        // so a snapshot it drops is neither pushed nor kept on either side.
        let mut both: Vec<_> = zenith::list(store.as_ref()).await?;
        both.extend(zenith::list(dest.as_ref()).await?);
        both.retain(of_main);
        let doomed = match settings.retention {
            Some(rule) => doomed(&both, rule),
            None => Default::default(),
        };
        let pushed = self
            .pageserver
            .push_except(None, None, Some(url), &doomed, Default::default())
            .await?;
        let sent = pushed.pushed.len();
        if sent > 0 {
            tracing::info!(
                "pushed {sent} snapshot(s) to storage_dest: {} bytes in {} objects",
                pushed.bytes_sent,
                pushed.objects_sent
            );
        }
        if let Some(rule) = settings.retention {
            for (storage, label) in [
                (url.as_str(), "storage_dest"),
                (&self.pageserver.repo.store_url(), "the repo"),
            ] {
                let gone = self
                    .pageserver
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
