//! `zenith init`, `start`, `stop` and `status`: the repo and zenith-local.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{CliError, InitArgs};
use crate::local::repo::{Config, Repo, RepoLock};

/// How long `start` waits for zenith-local to be ready, and `stop` for it to be gone.
const WAIT: Duration = Duration::from_secs(180);

pub async fn init(args: InitArgs, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    if args.snapshot_path.is_some() || args.snapshot_format.is_some() {
        return Err(CliError::NotImplemented(
            "init --snapshot_path (starting a repo from a snapshot)".into(),
        ));
    }
    let repo = Repo::locate(repo_dir)?;
    if let Some(url) = &args.storage_dest {
        crate::storage::StorageUrl::parse(url).map_err(anyhow::Error::from)?;
    }
    let config = Config {
        storage_dest: args.storage_dest,
        ..Config::default()
    };
    create(&repo, &config)?;
    println!("initialized the zenith repo {}", repo.root.display());
    Ok(())
}

/// Creates the repo and its main pg; on failure nothing that looks like a repo is left.
fn create(repo: &Repo, config: &Config) -> anyhow::Result<()> {
    let install = crate::compute::find_postgres()?;
    let account = crate::compute::node::run_as()?;
    let existed = repo.root.exists();
    repo.create(config, account.as_ref())?;
    if let Err(e) = crate::local::init_main(repo, &install) {
        // Only what this call created goes.
        let _ = std::fs::remove_file(repo.config_path());
        if !existed {
            let _ = std::fs::remove_dir_all(&repo.root);
        }
        return Err(e);
    }
    Ok(())
}

pub async fn start(foreground: bool, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    let repo = Repo::locate(repo_dir)?;
    if !repo.exists() {
        create(&repo, &Config::default())?;
        println!("initialized the zenith repo {}", repo.root.display());
    }
    // Fails early, with the pid, when zenith-local already runs.
    drop(RepoLock::take(&repo)?);
    if foreground {
        return Ok(crate::local::run(repo).await?);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(repo.log_path())
        .map_err(|e| anyhow::anyhow!("{}: {e}", repo.log_path().display()))?;
    let exe =
        std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find zenith itself: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--repo-dir")
        .arg(&repo.root)
        .args(["start", "--foreground"])
        .env(
            "ZENITH_LOG",
            std::env::var("ZENITH_LOG").unwrap_or_else(|_| "zenith=info".into()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(anyhow::Error::from)?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches zenith-local from this terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot launch zenith-local: {e}"))?;
    let deadline = Instant::now() + WAIT;
    let state = loop {
        if let Some(state) = crate::local::running(&repo) {
            if state.pid == child.id() {
                break state;
            }
        }
        if let Some(status) = child.try_wait().map_err(anyhow::Error::from)? {
            return Err(anyhow::anyhow!(
                "zenith-local stopped at start ({status}): {}",
                last_error(&repo)
            )
            .into());
        }
        if Instant::now() > deadline {
            return Err(anyhow::anyhow!(
                "zenith-local was not ready after {} s; see {}",
                WAIT.as_secs(),
                repo.log_path().display()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "zenith-local is running (pid {}, repo {})",
        state.pid,
        repo.root.display()
    );
    for pg in &state.pgs {
        let node = repo.node(&pg.name);
        let node_state = node.state()?;
        println!("pg {}: {}", pg.name, node.connstr(&node_state));
    }
    Ok(())
}

/// The last error zenith-local logged, without its timestamp.
fn last_error(repo: &Repo) -> String {
    let text = std::fs::read_to_string(repo.log_path()).unwrap_or_default();
    text.lines()
        .rev()
        .find_map(|l| {
            l.split_once("ERROR")
                .map(|(_, rest)| rest.trim().to_string())
        })
        .unwrap_or_else(|| format!("see {}", repo.log_path().display()))
}

pub async fn stop(immediate: bool, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    let repo = Repo::locate(repo_dir)?;
    if !repo.exists() {
        return Err(anyhow::anyhow!(
            "there is no zenith repo at {}; nothing to stop",
            repo.root.display()
        )
        .into());
    }
    let mut stopped_local = false;
    if RepoLock::held(&repo) {
        let pid: i32 = std::fs::read_to_string(repo.pid_path())
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "zenith-local holds {} but left no pid file; stop it by hand",
                    repo.lock_path().display()
                )
            })?;
        let signal = if immediate {
            libc::SIGUSR1
        } else {
            libc::SIGTERM
        };
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + WAIT;
        while RepoLock::held(&repo) {
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!(
                    "zenith-local (pid {pid}) did not stop in {} s; see {}",
                    WAIT.as_secs(),
                    repo.log_path().display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stopped_local = true;
    }
    // Servers left behind by a zenith-local that was killed.
    let mut leftovers = Vec::new();
    for node in repo.nodes() {
        if node.running_pid().is_some() {
            node.stop(immediate).await?;
            leftovers.push(node.name.clone());
        }
    }
    match (stopped_local, leftovers.is_empty()) {
        (true, _) => println!("stopped zenith-local and every pg it ran"),
        (false, false) => println!(
            "stopped pg {} (zenith-local was not running)",
            leftovers.join(", ")
        ),
        (false, true) => println!("zenith-local is not running; nothing to stop"),
    }
    Ok(())
}

pub async fn status(json: bool, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    let repo = Repo::locate(repo_dir)?;
    if !repo.exists() {
        return Err(anyhow::anyhow!(
            "there is no zenith repo at {}; `zenith start` creates one",
            repo.root.display()
        )
        .into());
    }
    let out = super::pg::Backend::for_repo(&repo)?.status().await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serializes")
        );
        return Ok(());
    }
    let local = &out["zenith_local"];
    if local["running"] == true {
        println!(
            "zenith-local: running (pid {}), repo {}, API {}",
            local["pid"],
            repo.root.display(),
            local["api"].as_str().unwrap_or("")
        );
    } else {
        println!("zenith-local: stopped, repo {}", repo.root.display());
    }
    for pg in out["pgs"].as_array().into_iter().flatten() {
        print!(
            "pg {}: {}, port {}",
            pg["name"].as_str().unwrap_or(""),
            pg["status"].as_str().unwrap_or(""),
            pg["port"]
        );
        if let Some(p) = pg["primary"].as_str() {
            print!(", replica of {p}");
        }
        if pg["restarts"].as_u64().unwrap_or(0) > 0 {
            print!(", restarted {} time(s)", pg["restarts"]);
        }
        if let Some(why) = pg["failed"].as_str() {
            print!(" (failed: {why})");
        }
        println!();
    }
    match out["newest_snapshot"].as_object() {
        Some(m) => println!(
            "newest snapshot: {}{}, {}",
            m["id"].as_str().unwrap_or(""),
            m["name"]
                .as_str()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            m["created_at"].as_str().unwrap_or("")
        ),
        None => println!("newest snapshot: none"),
    }
    Ok(())
}
