//! zenith-local's side of the safekeeper: it runs `zenith safekeeper` for the main pg
//! (when config.toml's `[safekeeper] mode` is not `off` and a storage_dest is attached),
//! starts it again when it ends, and in `sync` mode decides whether commits wait for it.
//!
//! Commits wait for the safekeeper only through `synchronous_standby_names`, which zenith
//! sets in a configuration file of its own outside the data directory (the pg's own
//! `postgresql.conf` is included from it), so no snapshot or export of the pg ever waits
//! for a safekeeper that is not there. It names the safekeeper once it streams. When the
//! safekeeper stores nothing for `fallback_after` (killed, paused, storage unreachable),
//! zenith-local empties it again and reloads the pg: waiting commits return, later ones
//! do not wait, and `zenith status` shows the fallback until the safekeeper caught up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::compute::node::{Node, NodeState};
use crate::models::{OpError, OpResult, SafekeeperState};
use crate::pageserver::config::{SafekeeperConfig, SafekeeperMode};
use crate::pageserver::Repo;
use crate::safekeeper::receiver::{now_ms, Report, NAME};

/// In async mode the safekeeper stores what it received at most this often.
const ASYNC_BATCH_MS: u64 = 200;

/// The safekeeper settings of `node`, when it gets one.
pub fn wanted(repo: &Repo, node: &Node, state: &NodeState) -> OpResult<Option<SafekeeperConfig>> {
    let config = repo.config()?;
    let keeps = node.name == "main"
        && state.primary.is_none()
        && config.storage_dest.is_some()
        && config.safekeeper.mode != SafekeeperMode::Off
        && node.dir.join("wal.json").exists();
    Ok(keeps.then_some(config.safekeeper))
}

/// zenith's configuration file of `node` (see the module's text).
fn conf_path(node: &Node) -> PathBuf {
    node.dir.join("zenith.conf")
}

/// Writes zenith's configuration file of `node`: the pg's own, and whether commits wait
/// for the safekeeper.
fn write_conf(node: &Node, wait: bool) -> OpResult<()> {
    let own = node.data().join("postgresql.conf");
    let quoted = own.display().to_string().replace('\'', "''");
    let names = if wait { NAME } else { "" };
    let text = format!(
        "# Written by zenith: the pg's own settings, then whether commits wait for its safekeeper.\n\
         include '{quoted}'\n\
         synchronous_standby_names = '{names}'\n"
    );
    crate::compute::node::write_file(&conf_path(node), text.as_bytes(), 0o644)?;
    Ok(())
}

/// The server settings the safekeeper needs: in sync mode, zenith's configuration file
/// (commits do not wait until the safekeeper streams).
pub fn settings(repo: &Repo, node: &Node, state: &NodeState) -> OpResult<Vec<String>> {
    match wanted(repo, node, state)? {
        Some(c) if c.mode == SafekeeperMode::Sync => {
            write_conf(node, false)?;
            Ok(vec![format!("config_file={}", conf_path(node).display())])
        }
        _ => {
            let _ = std::fs::remove_file(conf_path(node));
            Ok(Vec::new())
        }
    }
}

/// Runs the safekeeper of `node` until told to stop; see [`Keeper::stop`].
pub struct Keeper {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Keeper {
    /// Runs the safekeeper of `node` of `repo`; `report` receives what status shows of it.
    pub fn spawn(repo: Repo, node: Node, report: Reporter) -> Keeper {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep(repo, node, report, stopped));
        Keeper { stop, task }
    }

    /// Stops the safekeeper (after the pg, so it received the pg's last WAL).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

struct Keeping {
    repo: Repo,
    reporter: Reporter,
    node: Node,
    report: PathBuf,
    child: Option<tokio::process::Child>,
    restarts: u32,
    next_start: Instant,
    /// Since when it has not been storing, and since when sync mode is given up.
    unhealthy_since: Option<Instant>,
    fallen_back: Option<(String, String)>,
    /// Why it could not be started, for status.
    start_error: Option<String>,
}

/// Sync mode waits again only once the backlog is this small: commits would otherwise
/// wait for all of it.
const CAUGHT_UP_BYTES: u64 = 16 << 20;

/// Where the keeper reports the safekeeper's state (`None`: it runs none now).
pub type Reporter = Arc<dyn Fn(Option<SafekeeperState>) + Send + Sync>;

async fn keep(repo: Repo, node: Node, reporter: Reporter, mut stop: oneshot::Receiver<()>) {
    let mut k = Keeping {
        report: node.dir.join("safekeeper.json"),
        repo,
        reporter,
        node,
        child: None,
        restarts: 0,
        next_start: Instant::now(),
        unhealthy_since: None,
        fallen_back: None,
        start_error: None,
    };
    let _ = std::fs::remove_file(&k.report);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = k.step().await {
            // Whatever went wrong, commits must not hang on it.
            tracing::warn!("safekeeper of pg {}: {}", k.node.name, e.full_message());
            if let Err(e) = k.set_waiting(false) {
                tracing::error!("pg {}: {}", k.node.name, e.full_message());
            }
        }
    }
    k.end_child().await;
    (k.reporter)(None);
}

/// Whether zenith's configuration file of `node` names the safekeeper now.
fn names_safekeeper(node: &Node) -> bool {
    std::fs::read_to_string(conf_path(node))
        .is_ok_and(|t| t.contains(&format!("synchronous_standby_names = '{NAME}'")))
}

impl Keeping {
    async fn step(&mut self) -> OpResult<()> {
        let state = self.node.state()?;
        let Some(config) = wanted(&self.repo, &self.node, &state)? else {
            // Detached or turned off while running: commits stop waiting for it.
            self.end_child().await;
            self.set_waiting(false)?;
            (self.reporter)(None);
            return Ok(());
        };
        let sync = config.mode == SafekeeperMode::Sync;
        let fallback = config.fallback()?;
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                let report = Report::read(&self.report).unwrap_or_default();
                tracing::warn!(
                    "the safekeeper of pg {} ended ({status}): {}; starting it again",
                    self.node.name,
                    report.error.as_deref().unwrap_or("see its log")
                );
                self.child = None;
                self.restarts += 1;
                self.next_start = Instant::now() + Duration::from_secs(1);
            }
        }
        // A pg in recovery has no WAL of its own to stream yet.
        let recovering = ["recovery.signal", "standby.signal"]
            .iter()
            .any(|f| self.node.data().join(f).exists());
        if self.child.is_none()
            && Instant::now() >= self.next_start
            && !recovering
            && self.node.running_pid().is_some()
        {
            match self.start_child(&state, sync) {
                Ok(c) => {
                    self.child = Some(c);
                    self.start_error = None;
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot start the safekeeper of pg {}: {}",
                        self.node.name,
                        e.full_message()
                    );
                    self.start_error = Some(e.full_message());
                    self.next_start = Instant::now() + Duration::from_secs(5);
                }
            }
        }
        // Healthy: streaming, reporting, and nothing received waits long to be stored.
        let pid = self.child.as_ref().and_then(|c| c.id());
        // Read once a tick: the live child's report, and the last error of any.
        let written = Report::read(&self.report);
        let last_error = written.as_ref().and_then(|r| r.error.clone());
        let report = written.filter(|r| Some(r.pid) == pid);
        let now = now_ms();
        let fresh = |r: &Report| r.streaming && now.saturating_sub(r.updated_ms) < 2_000;
        let waited = |r: &Report| {
            r.pending_since_ms
                .map(|t| now.saturating_sub(t))
                .unwrap_or(0)
        };
        let healthy = report
            .as_ref()
            .is_some_and(|r| fresh(r) && waited(r) < 2_000);
        if healthy {
            self.unhealthy_since = None;
        } else if self.unhealthy_since.is_none() {
            self.unhealthy_since = Some(Instant::now());
        }
        // What the pg does now (a restarted pg starts with commits not waiting).
        let waiting = names_safekeeper(&self.node);
        if sync {
            let caught_up = report
                .as_ref()
                .is_some_and(|r| fresh(r) && waited(r) < 1_000 && r.lag_bytes < CAUGHT_UP_BYTES);
            if !waiting && caught_up {
                self.set_waiting(true)?;
                if self.fallen_back.take().is_some() {
                    tracing::info!(
                        "the safekeeper of pg {} caught up: commits wait for it again",
                        self.node.name
                    );
                }
            } else if self
                .unhealthy_since
                .is_some_and(|t| t.elapsed() >= fallback)
                && (waiting || self.fallen_back.is_none())
            {
                let why = match &report {
                    None => match &self.start_error {
                        Some(e) => format!("it cannot start: {e}"),
                        None => "it is not running".to_string(),
                    },
                    Some(r) if !fresh(r) => match &r.error {
                        Some(e) => e.clone(),
                        None => "it does not respond".to_string(),
                    },
                    Some(r) => match &r.error {
                        Some(e) => format!("storing WAL fails: {e}"),
                        None => "storing WAL is too slow".to_string(),
                    },
                };
                self.set_waiting(false)?;
                tracing::error!(
                    "the safekeeper of pg {} stored nothing for {}: {why}; commits no longer wait for it",
                    self.node.name,
                    config.fallback_after
                );
                self.fallen_back = Some((crate::snapshot::now_rfc3339(), why));
            }
        } else if waiting {
            self.set_waiting(false)?;
        }
        (self.reporter)(Some(SafekeeperState {
            pg: self.node.name.clone(),
            mode: if sync { "sync" } else { "async" }.into(),
            commits_wait: names_safekeeper(&self.node),
            streaming: report.as_ref().is_some_and(fresh),
            flushed_lsn: report.as_ref().and_then(|r| r.flushed_lsn.clone()),
            lag_bytes: report.as_ref().map(|r| r.lag_bytes).unwrap_or(0),
            lag_secs: report.as_ref().map(|r| waited(r) / 1000),
            restarts: self.restarts,
            fallen_back_since: self.fallen_back.as_ref().map(|f| f.0.clone()),
            fallen_back_why: self.fallen_back.as_ref().map(|f| f.1.clone()),
            last_error: last_error.or_else(|| self.start_error.clone()),
        }));
        Ok(())
    }

    /// Names the safekeeper in `synchronous_standby_names` or not, and has the pg read it
    /// (SIGHUP to the postmaster: no connection needed, so it works while every
    /// connection slot holds a waiting commit).
    fn set_waiting(&mut self, wait: bool) -> OpResult<()> {
        if !conf_path(&self.node).exists() || names_safekeeper(&self.node) == wait {
            return Ok(());
        }
        write_conf(&self.node, wait)?;
        if let Some(pid) = self.node.running_pid() {
            // SAFETY: a signal to the pg's postmaster, which reloads its settings.
            unsafe { libc::kill(pid, libc::SIGHUP) };
        }
        Ok(())
    }

    fn start_child(&self, state: &NodeState, sync: bool) -> OpResult<tokio::process::Child> {
        let exe = super::archiving::executable(&self.repo)?;
        let log_path = self
            .repo
            .root
            .join("logs")
            .join(format!("safekeeper-{}.log", self.node.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| OpError::io(log_path.display(), e))?;
        let err = log
            .try_clone()
            .map_err(|e| OpError::io(log_path.display(), e))?;
        let socket = self.node.dir.join(format!(".s.PGSQL.{}", state.port));
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("safekeeper")
            .arg("--target")
            .arg(self.node.dir.join("wal.json"))
            .arg("--pgdata")
            .arg(self.node.data())
            .arg("--socket")
            .arg(&socket)
            .arg("--report")
            .arg(&self.report)
            .arg("--batch-ms")
            .arg(if sync {
                "0".to_string()
            } else {
                ASYNC_BATCH_MS.to_string()
            })
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            // Not ended with zenith-local: if zenith-local dies, the safekeeper serves the
            // pg on (commits that wait for it keep returning) and ends with the pg's
            // connection; the next zenith-local restarts the pg and a safekeeper with it.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| OpError::io("zenith safekeeper", e))?;
        tracing::info!(
            "started the safekeeper of pg {} (pid {}), log {}",
            self.node.name,
            child.id().unwrap_or(0),
            log_path.display()
        );
        Ok(child)
    }

    /// Stops the safekeeper: SIGTERM, then SIGKILL after 5 s.
    async fn end_child(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}
