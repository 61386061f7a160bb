//! zenith-local: the process `zenith start` launches. It holds the repo's lock, runs the
//! main pg and every pg started through its REST API as child processes, restarts each
//! once if it dies, and stops them all on SIGTERM (fast shutdown), SIGINT (Ctrl-C in the
//! foreground) or SIGUSR1 (immediate shutdown, for `zenith stop --immediate`).

pub mod api;
mod exchange;
pub mod ops;
pub mod pusher;
pub mod replica;
pub mod repo;
pub mod share;
pub mod supervisor;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::compute::node::NodeState;
use repo::{Repo, RepoLock};

/// What zenith-local runs, written to `zenith-local.json` once everything is ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalState {
    pub pid: u32,
    /// Port of the REST API on 127.0.0.1.
    pub api_port: u16,
    pub started_at: String,
    pub pgs: Vec<PgState>,
    /// Background pushes to storage_dest, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<pusher::PushState>,
}

/// One supervised pg.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgState {
    pub name: String,
    pub port: u16,
    /// Times zenith-local restarted it after it died.
    pub restarts: u32,
    /// Why it is down, when it died and could not be restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// The first port from `first` on that nothing listens on at 127.0.0.1.
pub fn free_port(first: u16) -> anyhow::Result<u16> {
    free_port_except(first, &[])
}

/// The first port from `first` on that nothing listens on at 127.0.0.1 and that is not
/// in `promised` (ports of stopped pgs).
pub fn free_port_except(first: u16, promised: &[u16]) -> anyhow::Result<u16> {
    (first..=u16::MAX)
        .take(1000)
        .find(|p| !promised.contains(p) && std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .ok_or_else(|| {
            anyhow::anyhow!("no free port among the 1000 from {first}; set pg_port in config.toml")
        })
}
/// Creates the main pg of a new repo.
pub fn init_main(repo: &Repo, install: &crate::compute::PgInstall) -> anyhow::Result<NodeState> {
    let config = repo.config()?;
    // Settings zenith-local reads again later are checked before anything starts.
    config.push.period()?;
    config.push.retention()?;
    config.push.wal_bytes()?;
    let main = repo.node("main");
    main.init(install, free_port(config.pg_port)?)
}

/// Runs zenith-local in this process until it is told to stop.
pub async fn run(repo: Repo) -> anyhow::Result<()> {
    let _lock = RepoLock::take(&repo)?;
    crate::compute::node::write_private(
        &repo.pid_path(),
        std::process::id().to_string().as_bytes(),
    )?;
    let result = supervise(&repo).await;
    let _ = std::fs::remove_file(repo.state_path());
    let _ = std::fs::remove_file(repo.pid_path());
    if let Err(e) = &result {
        tracing::error!("zenith-local stops: {}", crate::util::message::full(e));
    }
    result
}

async fn supervise(repo: &Repo) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let install = crate::compute::find_postgres()?;
    let config = repo.config()?;
    // Settings zenith-local reads again later are checked before anything starts.
    config.push.period()?;
    config.push.retention()?;
    config.push.wal_bytes()?;
    let main = repo.node("main");
    if !main.exists() {
        init_main(repo, &install)?;
    }
    let mut state = main.state()?;
    // The REST API, on the configured port or the next free one.
    let api_port = free_port(config.api_port)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", api_port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{api_port}: {e}"))?;
    let token = std::fs::read_to_string(repo.token_path())
        .map_err(|e| anyhow::anyhow!("{}: {e}", repo.token_path().display()))?;
    let supervisor = supervisor::Supervisor::new(repo.clone(), install, api_port);
    // A server left running by a zenith-local that was killed is restarted as a child.
    supervisor.start(&main, &mut state).await?;
    tracing::info!("pg main ready on port {}", state.port);
    let ops = ops::Ops::supervised(repo.clone(), Arc::clone(&supervisor));
    let gate = Arc::new(api::Gate::default());
    let server = tokio::spawn(api::serve(
        listener,
        api::router(ops.clone(), token.trim().to_string(), Arc::clone(&gate)),
    ));
    let _server = AbortOnDrop(server);
    // Background pushes, on a blocking thread of their own like the API's operations
    // (see api::op); they follow config.toml as it changes.
    let pusher = pusher::Pusher::new(ops, Arc::clone(&supervisor));
    let (stop_pushes, stopped) = tokio::sync::watch::channel(false);
    let pushes = {
        let (runner, handle) = (Arc::clone(&pusher), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || handle.block_on(runner.run(stopped)))
    };
    let immediate = tokio::select! {
        _ = term.recv() => false,
        _ = int.recv() => false,
        _ = usr1.recv() => true,
    };
    // Changes under way through the API (a checkout, a snapshot) finish first; new ones
    // are refused.
    let wait = if immediate {
        std::time::Duration::ZERO
    } else {
        OPS_WAIT
    };
    if !gate.close(wait).await && !immediate {
        tracing::warn!("an operation through the API is still running; stopping anyway");
    }
    // A last push before the servers stop (not for an immediate stop, which is in a hurry).
    let _ = stop_pushes.send(true);
    // A push under way finishes first (a snapshot is written whole or not at all).
    if !immediate && tokio::time::timeout(FINAL_PUSH, pushes).await.is_err() {
        tracing::warn!("a background push is still running");
    }
    if let (false, Ok(Some(settings))) = (immediate, pusher.settings()) {
        let dest = &settings.storage_dest;
        tracing::info!("pushing to {dest} before stopping");
        let mut state = supervisor
            .push_state()
            .filter(|s| &s.storage_dest == dest)
            .unwrap_or_default();
        state.storage_dest = dest.clone();
        let last =
            tokio::time::timeout(FINAL_PUSH, pusher.attempt(&mut state, &settings, true)).await;
        if last.is_err() || state.last_error.is_some() {
            tracing::error!(
                "the last push to {dest} did not complete ({}); the snapshots stay in the repo and go with the next push",
                state.last_error.as_deref().unwrap_or("timed out")
            );
        }
    }
    tracing::info!(
        "stopping every pg ({})",
        if immediate { "immediate" } else { "fast" }
    );
    supervisor.stop_all(immediate).await;
    Ok(())
}

/// How long `zenith stop` waits for the API's operations under way, then for a push under
/// way, and then lets the last push run (together within the 180 s `zenith stop` waits).
const OPS_WAIT: std::time::Duration = std::time::Duration::from_secs(40);
const FINAL_PUSH: std::time::Duration = std::time::Duration::from_secs(50);

/// Stops a background task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// zenith-local's state, if it runs.
pub fn running(repo: &Repo) -> Option<LocalState> {
    if !RepoLock::held(repo) {
        return None;
    }
    let text = std::fs::read_to_string(repo.state_path()).ok()?;
    serde_json::from_str(&text).ok()
}
