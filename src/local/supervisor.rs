//! zenith-local's supervision of the pgs it runs: each server is a child process watched
//! by its own task, started again once if it dies, and stopped on request or when
//! zenith-local stops. What it runs is written to `zenith-local.json` at every change.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{LocalState, PgState};
use crate::compute::node::{last_log_line, Node, NodeState};
use crate::compute::PgInstall;
use crate::models::{OpError, OpResult, PushState};
use crate::pageserver::Pageserver;

/// The pgs one zenith-local runs.
pub struct Supervisor {
    pageserver: Pageserver,
    install: PgInstall,
    api_port: u16,
    started_at: String,
    /// One watcher task per running pg; the lock also keeps two starts of one pg apart.
    watched: tokio::sync::Mutex<BTreeMap<String, Watch>>,
    /// What `zenith status` shows of each supervised pg.
    report: Mutex<BTreeMap<String, PgState>>,
    /// And of background pushes.
    push: Mutex<Option<PushState>>,
    /// And of the main pg's safekeeper.
    safekeeper: Mutex<Option<crate::models::SafekeeperState>>,
    /// Set by [`Supervisor::stop_all`]: no pg starts after it.
    stopping: std::sync::atomic::AtomicBool,
}

struct Watch {
    /// Tells the watcher to stop its server (true: immediately).
    stop: oneshot::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervisor {
    pub fn new(pageserver: Pageserver, install: PgInstall, api_port: u16) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            pageserver,
            install,
            api_port,
            started_at: crate::snapshot::now_rfc3339(),
            watched: Default::default(),
            report: Default::default(),
            push: Default::default(),
            safekeeper: Default::default(),
            stopping: Default::default(),
        })
    }

    /// Starts `node` under supervision (nothing happens if it already runs under it); its
    /// port moves to a free one if another program took it, saved in `state`.
    pub async fn start(self: &Arc<Self>, node: &Node, state: &mut NodeState) -> OpResult<()> {
        let mut watched = self.watched.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(OpError::Failed(format!(
                "zenith-local is stopping; pg {} is not started",
                node.name
            )));
        }
        if let Some(w) = watched.get(&node.name) {
            if !w.task.is_finished() {
                return Ok(());
            }
        }
        // A server this zenith-local does not own (started without it): restarted as a child.
        if node.running_pid().is_some() {
            tracing::warn!("pg {} runs without zenith-local; restarting it", node.name);
            node.stop(false).await?;
        }
        let child = launch(&self.pageserver, &self.install, node, state).await?;
        self.record(PgState {
            name: node.name.clone(),
            port: state.port,
            restarts: 0,
            failed: None,
        });
        let (stop, stopped) = oneshot::channel();
        let task =
            tokio::spawn(Arc::clone(self).watch(node.clone(), state.clone(), child, stopped));
        watched.insert(node.name.clone(), Watch { stop, task });
        Ok(())
    }

    /// The PostgreSQL installation the pgs run with, found once at start.
    pub fn install(&self) -> &PgInstall {
        &self.install
    }

    /// Stops a supervised pg and waits until it is down; false if it was not supervised.
    pub async fn stop(&self, name: &str, immediate: bool) -> bool {
        let watch = self.watched.lock().await.remove(name);
        let Some(watch) = watch else {
            return false;
        };
        let _ = watch.stop.send(immediate);
        let _ = watch.task.await;
        self.forget(name);
        true
    }

    /// Stops every supervised pg, all at once.
    pub async fn stop_all(&self, immediate: bool) {
        let all = {
            let mut watched = self.watched.lock().await;
            self.stopping
                .store(true, std::sync::atomic::Ordering::SeqCst);
            std::mem::take(&mut *watched)
        };
        let mut tasks = Vec::new();
        for (name, watch) in all {
            let _ = watch.stop.send(immediate);
            tasks.push((name, watch.task));
        }
        for (name, task) in tasks {
            let _ = task.await;
            self.forget(&name);
        }
    }

    /// Watches a pg (see [`Supervisor::watch_pg`]) and runs its safekeeper beside it,
    /// stopped after the pg.
    async fn watch(
        self: Arc<Self>,
        node: Node,
        state: NodeState,
        child: tokio::process::Child,
        stop: oneshot::Receiver<bool>,
    ) {
        let keeper = super::keeper::wanted(&self.pageserver.repo, &node, &state)
            .ok()
            .flatten()
            .map(|_| {
                let sup = Arc::clone(&self);
                super::keeper::Keeper::spawn(
                    self.pageserver.repo.clone(),
                    node.clone(),
                    Arc::new(move |state| sup.set_safekeeper(state)),
                )
            });
        Arc::clone(&self).watch_pg(node, state, child, stop).await;
        if let Some(k) = keeper {
            k.stop().await;
        }
    }

    /// Restarts once, then gives up and reports why; stops when told to.
    async fn watch_pg(
        self: Arc<Self>,
        node: Node,
        mut state: NodeState,
        mut child: tokio::process::Child,
        mut stop: oneshot::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                immediate = &mut stop => {
                    tracing::info!("stopping pg {}", node.name);
                    if let Err(e) = node.stop_child(&mut child, immediate.unwrap_or(false)).await {
                        tracing::error!("{}", crate::util::message::full(&e));
                    }
                    return;
                }
                exit = child.wait() => {
                    let exit = exit.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    let why = format!("exited ({exit}): {}", last_log_line(&node.log()));
                    let mut pg = self.reported(&node.name);
                    // A recovery that stopped (its target out of reach) ends the same way
                    // again: it is not restarted.
                    let recovering = node.state().is_ok_and(|s| s.recovery.is_some());
                    if pg.restarts > 0 || recovering {
                        tracing::error!("pg {} {why} again; not restarting it", node.name);
                        pg.failed = Some(why);
                        self.record(pg);
                        return;
                    }
                    tracing::warn!("pg {} {why}; restarting it", node.name);
                    pg.restarts += 1;
                    node.end_orphans(std::time::Duration::from_secs(5)).await;
                    // node.json is the truth: a promotion or a port move changed it.
                    if let Ok(saved) = node.state() {
                        state = saved;
                    }
                    match launch(&self.pageserver, &self.install, &node, &mut state).await {
                        Ok(c) => {
                            child = c;
                            pg.port = state.port;
                            self.record(pg);
                        }
                        Err(e) => {
                            tracing::error!("pg {} could not be restarted: {}", node.name, crate::util::message::full(&e));
                            pg.failed = Some(crate::util::message::full(&e));
                            self.record(pg);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Records the state of background pushes.
    pub fn set_push(&self, state: Option<PushState>) {
        *self.push.lock().expect("not poisoned") = state;
        let report = self.report.lock().expect("not poisoned");
        self.save(&report);
    }

    pub fn push_state(&self) -> Option<PushState> {
        self.push.lock().expect("not poisoned").clone()
    }

    /// Records the state of the main pg's safekeeper.
    pub fn set_safekeeper(&self, state: Option<crate::models::SafekeeperState>) {
        let mut current = self.safekeeper.lock().expect("not poisoned");
        if *current == state {
            return;
        }
        *current = state;
        drop(current);
        let report = self.report.lock().expect("not poisoned");
        self.save(&report);
    }

    fn reported(&self, name: &str) -> PgState {
        let report = self.report.lock().expect("not poisoned");
        report.get(name).cloned().unwrap_or(PgState {
            name: name.to_string(),
            port: 0,
            restarts: 0,
            failed: None,
        })
    }

    fn record(&self, pg: PgState) {
        let mut report = self.report.lock().expect("not poisoned");
        report.insert(pg.name.clone(), pg);
        self.save(&report);
    }

    fn forget(&self, name: &str) {
        let mut report = self.report.lock().expect("not poisoned");
        report.remove(name);
        self.save(&report);
    }

    /// Writes `zenith-local.json`; a failure is logged (the servers keep running).
    fn save(&self, report: &BTreeMap<String, PgState>) {
        let state = LocalState {
            pid: std::process::id(),
            api_port: self.api_port,
            started_at: self.started_at.clone(),
            pgs: report.values().cloned().collect(),
            push: self.push_state(),
            safekeeper: self.safekeeper.lock().expect("not poisoned").clone(),
        };
        if let Err(e) = crate::compute::node::write_private(
            &self.pageserver.repo.state_path(),
            &serde_json::to_vec_pretty(&state).expect("serializes"),
        ) {
            tracing::error!("{}", crate::util::message::full(&e));
        }
    }
}

/// Starts a pg and gives its superuser the pg's password (its data may come from another
/// pg's snapshot). Its port may be taken before or, in a race, while PostgreSQL binds it
/// (another program, another repo): it then moves to the next free port, saved.
pub async fn launch(
    pageserver: &Pageserver,
    install: &PgInstall,
    node: &Node,
    state: &mut NodeState,
) -> OpResult<tokio::process::Child> {
    crate::pageserver::refuse_incomplete(node)?;
    let repo = &pageserver.repo;
    let first_port = repo.config()?.pg_port;
    // A pg of an older zenith gets a line of WAL of its own.
    if state.wal.is_none() {
        state.wal = Some(crate::compute::node::WalLine::new_root());
        node.save_state(state)?;
    }
    // A recovery PostgreSQL finished while no one watched (zenith-local killed, a
    // checkout that gave up waiting): its bookkeeping now, and no second recovery.
    if node.recovery_ended(state) {
        super::archiving::complete_recovery(pageserver, node, state).await?;
    }
    let mut settings = super::replica::settings(repo, node, state)?;
    settings.extend(super::archiving::settings(repo, node, state)?);
    settings.extend(super::keeper::settings(repo, node, state)?);
    if state.primary.is_none() && !state.has_run {
        state.has_run = true;
        node.save_state(state)?;
    }
    let mut attempts = 0;
    let child = loop {
        if std::net::TcpListener::bind(("127.0.0.1", state.port)).is_err() {
            let promised = pageserver.promised_ports(&node.name);
            let port = crate::util::port::free_port_except(
                first_port.max(state.port.saturating_add(1)),
                &promised,
            )
            .map_err(OpError::Failed)?;
            tracing::warn!(
                "port {} is taken; pg {} moves to {port}",
                state.port,
                node.name
            );
            state.port = port;
            node.save_state(state)?;
        }
        match node.start(install, state, &settings).await {
            Ok(child) => break child,
            Err(e) => {
                attempts += 1;
                let taken = std::net::TcpListener::bind(("127.0.0.1", state.port)).is_err();
                if !taken || attempts >= 3 {
                    return Err(e.into());
                }
            }
        }
    };
    if state.primary.is_none() && state.recovery.is_none() {
        // A replica has its primary's password, and is read-only; a pg in recovery gets
        // its own when the recovery ends.
        if let Err(e) = node.set_password(install, state).await {
            tracing::warn!("{}", crate::util::message::full(&e));
        }
        super::replica::prune_slots(repo, install, node, state).await;
        if let Some(line) = &state.wal {
            if let Err(e) = super::archiving::record_branch(pageserver, node, line).await {
                tracing::warn!(
                    "pg {}: cannot record where its WAL history begins: {}",
                    node.name,
                    e.full_message()
                );
            }
        }
    }
    Ok(child)
}
