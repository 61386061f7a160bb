//! zenith-local: the process `zenith start` launches. It holds the repo's lock, runs the
//! main pg and every pg started through its REST API as child processes, restarts each
//! once if it dies, pushes to storage_dest in the background (the pageserver's pusher),
//! and stops them all on SIGTERM (fast shutdown), SIGINT (Ctrl-C in the foreground) or
//! SIGUSR1 (immediate shutdown, for `zenith stop --immediate`).
//!
//! The parts: [`supervisor`] (the pgs as child processes), [`pgs`] (what is done with
//! pgs: create, start, stop, promote, destroy, checkout), [`replica`] (streaming
//! replicas), [`api`] (the REST API), [`status`], [`lock`] (one zenith-local per repo)
//! and [`control`] (the one interface the CLI uses, through the API or in-process).

pub mod api;
mod archiving;
mod console;
pub mod control;
mod keeper;
pub mod lock;
mod operations;
pub mod pgs;
pub mod replica;
mod status;
pub mod supervisor;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::models::{OpError, OpResult, PushState};
use crate::pageserver::{Pageserver, Repo};
pub use control::Control;
pub use lock::RepoLock;
pub use pgs::{init_main, Ops};

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
    pub push: Option<PushState>,
    /// The main pg's safekeeper, when it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safekeeper: Option<crate::models::SafekeeperState>,
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

/// Runs zenith-local in this process until it is told to stop.
pub async fn run(repo: Repo) -> OpResult<()> {
    let _lock = RepoLock::take(&repo)?;
    crate::compute::node::write_private(
        &repo.pid_path(),
        std::process::id().to_string().as_bytes(),
    )?;
    let result = supervise(&repo).await;
    let _ = std::fs::remove_file(repo.state_path());
    let _ = std::fs::remove_file(repo.pid_path());
    if let Err(e) = &result {
        tracing::error!("zenith-local stops: {}", e.full_message());
    }
    result
}

async fn supervise(repo: &Repo) -> OpResult<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen = |kind| signal(kind).map_err(|e| OpError::io("signal handler", e));
    let mut term = listen(SignalKind::terminate())?;
    let mut int = listen(SignalKind::interrupt())?;
    let mut usr1 = listen(SignalKind::user_defined1())?;
    let install = crate::pageserver::install()?;
    let config = repo.config()?;
    // Settings zenith-local reads again later are checked before anything starts.
    config.check()?;
    let main = repo.node("main");
    if !main.exists() {
        init_main(repo, &install)?;
    }
    let mut state = main.state()?;
    // The REST API, on the configured port or the next free one.
    let api_port = crate::util::port::free_port(config.api_port).map_err(OpError::Failed)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", api_port))
        .await
        .map_err(|e| OpError::Failed(format!("cannot listen on 127.0.0.1:{api_port}: {e}")))?;
    let token = std::fs::read_to_string(repo.token_path())
        .map_err(|e| OpError::io(repo.token_path().display(), e))?;
    let pageserver = Pageserver::new(repo.clone());
    let supervisor = supervisor::Supervisor::new(pageserver.clone(), install.clone(), api_port);
    // A server left running by a zenith-local that was killed is restarted as a child.
    supervisor.start(&main, &mut state).await?;
    // A recovery under way (a restore started by a zenith-local that died): its end is
    // recorded when it comes.
    if state.recovery.is_some() {
        let (ps, install, node) = (
            pageserver.clone(),
            supervisor.install().clone(),
            main.clone(),
        );
        let mut recovering = state.clone();
        tokio::spawn(async move {
            if let Err(e) = archiving::finish_recovery(&ps, &install, &node, &mut recovering).await
            {
                tracing::error!("{}", e.full_message());
            }
        });
    }
    tracing::info!("pg main ready on port {}", state.port);
    let ops = Ops::supervised(pageserver.clone(), Arc::clone(&supervisor));
    let gate = Arc::new(api::Gate::default());
    let server = tokio::spawn(api::serve(
        listener,
        api::router(ops.clone(), token.trim().to_string(), Arc::clone(&gate)),
    ));
    let _server = AbortOnDrop(server);
    // Background pushes, on a blocking thread of their own like the API's operations
    // (see api::op); they follow config.toml as it changes.
    let reported = Arc::clone(&supervisor);
    let pusher = crate::pageserver::pusher::Pusher::new(
        pageserver,
        install,
        Box::new(move |state| reported.set_push(state)),
    );
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
        let mut state = pusher
            .state()
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
