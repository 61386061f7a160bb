//! zenith-local: the process `zenith start` launches. It holds the repo's lock, runs the
//! main pg as a child process, restarts it once if it dies, and stops it on SIGTERM
//! (fast shutdown), SIGINT (Ctrl-C in the foreground) or SIGUSR1 (immediate shutdown, for
//! `zenith stop --immediate`).

pub mod api;
pub mod ops;
pub mod repo;

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
        tracing::error!("zenith-local stops: {e:#}");
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
    let main = repo.node("main");
    if !main.exists() {
        init_main(repo, &install)?;
    }
    let mut state = main.state()?;
    // A server left running by a zenith-local that was killed: stop it, then supervise anew.
    if main.running_pid().is_some() {
        tracing::warn!("pg main was still running without zenith-local; restarting it");
        main.stop(false).await?;
    }
    // The REST API, on the configured port or the next free one.
    let api_port = free_port(config.api_port)?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", api_port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{api_port}: {e}"))?;
    let token = std::fs::read_to_string(repo.token_path())
        .map_err(|e| anyhow::anyhow!("{}: {e}", repo.token_path().display()))?;
    let server = tokio::spawn(api::serve(
        listener,
        api::router(repo.clone(), token.trim().to_string()),
    ));
    let _server = AbortOnDrop(server);
    let mut child = start_main(&main, &install, &mut state, config.pg_port).await?;
    let mut pg = PgState {
        name: "main".into(),
        port: state.port,
        restarts: 0,
        failed: None,
    };
    set_password(&main, &install, &state).await;
    let started_at = crate::snapshot::now_rfc3339();
    let write_state = |pg: &PgState| write_state(repo, pg, &started_at, api_port);
    write_state(&pg)?;
    tracing::info!("pg main ready on port {}", state.port);
    // While `hold` exists (a checkout swaps the data directory), a stopped pg is expected
    // and started again only once the file is gone.
    let hold = main.hold_path();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let mut up = true;
    let immediate = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = int.recv() => break false,
            _ = usr1.recv() => break true,
            exit = child.wait(), if up => {
                up = false;
                if hold.exists() {
                    tracing::info!("pg main stopped for a checkout");
                    continue;
                }
                let exit = exit.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                let why = format!("exited ({exit}): {}", crate::compute::node::last_log_line(&main.log()));
                if pg.restarts == 0 {
                    tracing::warn!("pg main {why}; restarting it");
                    pg.restarts += 1;
                    if let Some(c) = restart(&main, &install, &mut state, config.pg_port, &mut pg).await {
                        child = c;
                        up = true;
                    }
                } else {
                    tracing::error!("pg main {why} again; not restarting it");
                    pg.failed = Some(why);
                }
                write_state(&pg)?;
            }
            _ = tick.tick(), if !up && pg.failed.is_none() => {
                if hold.exists() {
                    continue;
                }
                tracing::info!("starting pg main again after a checkout");
                if let Some(c) = restart(&main, &install, &mut state, config.pg_port, &mut pg).await {
                    child = c;
                    up = true;
                }
                write_state(&pg)?;
            }
        }
    };
    tracing::info!(
        "stopping pg main ({})",
        if immediate { "immediate" } else { "fast" }
    );
    if up {
        main.stop_child(&mut child, immediate).await?;
    }
    Ok(())
}

/// Starts the main pg. Its port may be taken before or, in a race, while PostgreSQL binds
/// it (another program, another repo): it then moves to the next free port, saved.
async fn start_main(
    main: &crate::compute::node::Node,
    install: &crate::compute::PgInstall,
    state: &mut NodeState,
    first_port: u16,
) -> anyhow::Result<tokio::process::Child> {
    let mut attempts = 0;
    loop {
        if std::net::TcpListener::bind(("127.0.0.1", state.port)).is_err() {
            let port = free_port(first_port.max(state.port.saturating_add(1)))?;
            tracing::warn!("port {} is taken; pg main moves to {port}", state.port);
            state.port = port;
            main.save_state(state)?;
        }
        match main.start(install, state).await {
            Ok(child) => return Ok(child),
            Err(e) => {
                attempts += 1;
                let taken = std::net::TcpListener::bind(("127.0.0.1", state.port)).is_err();
                if !taken || attempts >= 3 {
                    return Err(e);
                }
            }
        }
    }
}

/// Starts the main pg again and gives it its password; a failure is recorded in `pg`.
async fn restart(
    main: &crate::compute::node::Node,
    install: &crate::compute::PgInstall,
    state: &mut NodeState,
    first_port: u16,
    pg: &mut PgState,
) -> Option<tokio::process::Child> {
    let started = start_main(main, install, state, first_port).await;
    pg.port = state.port;
    match started {
        Ok(child) => {
            set_password(main, install, state).await;
            Some(child)
        }
        Err(e) => {
            pg.failed = Some(format!("{e:#}"));
            None
        }
    }
}

/// The pg's superuser gets the pg's password (its data may come from another pg's
/// snapshot); a failure is logged, the server keeps running.
async fn set_password(
    node: &crate::compute::node::Node,
    install: &crate::compute::PgInstall,
    state: &NodeState,
) {
    if let Err(e) = node.set_password(install, state).await {
        tracing::warn!("{e:#}");
    }
}

/// Stops a background task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn write_state(repo: &Repo, pg: &PgState, started_at: &str, api_port: u16) -> anyhow::Result<()> {
    let state = LocalState {
        pid: std::process::id(),
        api_port,
        started_at: started_at.to_string(),
        pgs: vec![pg.clone()],
    };
    crate::compute::node::write_private(
        &repo.state_path(),
        &serde_json::to_vec_pretty(&state).expect("serializes"),
    )
}

/// zenith-local's state, if it runs.
pub fn running(repo: &Repo) -> Option<LocalState> {
    if !RepoLock::held(repo) {
        return None;
    }
    let text = std::fs::read_to_string(repo.state_path()).ok()?;
    serde_json::from_str(&text).ok()
}
