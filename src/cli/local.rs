//! `zenith init`, `start`, `stop` and `status`: the repo and zenith-local.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{CliError, InitArgs};
use crate::local::{Ops, RepoLock};
use crate::models::OpResult;
use crate::pageserver::{Config, Repo};
use crate::util::message::printable;
use crate::util::size::format_size;

/// How long `start` waits for zenith-local to be ready, and `stop` for it to be gone.
const WAIT: Duration = Duration::from_secs(180);

pub async fn init(args: InitArgs, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    if args.snapshot_format.is_some() && args.snapshot_path.is_none() {
        return Err(anyhow::anyhow!("--snapshot_format goes with --snapshot_path").into());
    }
    let repo = Repo::locate(repo_dir)?;
    if let Some(url) = &args.storage_dest {
        crate::storage::StorageUrl::parse(url)?;
    }
    let format =
        crate::snapshot::Format::parse(args.snapshot_format.as_deref().unwrap_or("zenith"))
            .map_err(anyhow::Error::msg)?;
    let config = Config {
        storage_dest: args.storage_dest,
        ..Config::default()
    };
    let source = args.snapshot_path.as_deref().map(|url| (url, format));
    create(&repo, &config, source).await?;
    println!("initialized the zenith repo {}", repo.root.display());
    Ok(())
}

/// Creates the repo and its main pg: from `source` when given, else from the newest
/// snapshot in storage_dest if it holds one, else initdb. On failure nothing that looks
/// like a repo is left.
async fn create(
    repo: &Repo,
    config: &Config,
    source: Option<(&str, crate::snapshot::Format)>,
) -> OpResult<()> {
    let install = crate::pageserver::install()?;
    let account = crate::compute::node::run_as()?;
    let existed = repo.root.exists();
    let pgs_existed = repo.pgs_dir().exists();
    let store_existed = repo.root.join("snapshots").exists();
    repo.create(config, account.as_ref())?;
    let made = async {
        let ops = Ops::direct(repo.clone());
        match source {
            Some((url, format)) => {
                let (m, _) = ops
                    .pageserver
                    .import(url, format, "LATEST", None, Default::default())
                    .await?;
                ops.pageserver.main_from_snapshot(&m).await?;
                println!(
                    "pg main starts from snapshot {} of {}",
                    m.id,
                    crate::compute::connstr::redact_password(url)
                );
            }
            None => main_from_storage_dest_or_initdb(repo, &install, &ops).await?,
        }
        OpResult::Ok(())
    }
    .await;
    if let Err(e) = made {
        // Only what this call created goes.
        let _ = std::fs::remove_file(repo.config_path());
        if !existed {
            let _ = std::fs::remove_dir_all(&repo.root);
        } else {
            if !pgs_existed {
                let _ = std::fs::remove_dir_all(repo.pgs_dir());
            }
            if !store_existed {
                let _ = std::fs::remove_dir_all(repo.root.join("snapshots"));
            }
        }
        return Err(e);
    }
    Ok(())
}

/// The main pg of a repo that has none: the newest snapshot in storage_dest if it holds
/// one (a crash, a new machine with the old config.toml), else a new cluster.
async fn main_from_storage_dest_or_initdb(
    repo: &Repo,
    install: &crate::compute::PgInstall,
    ops: &Ops,
) -> OpResult<()> {
    match ops.pageserver.restore_main(Default::default()).await? {
        Some(m) => {
            println!(
                "restored pg main from snapshot {} of {} in storage_dest {}",
                printable(&m.summary().label()),
                m.created_at,
                repo.config()?.storage_dest.unwrap_or_default()
            );
            if let Some(lsn) = ops.recover("main").await? {
                println!("replayed the WAL archived after it: pg main is at {lsn}");
            }
        }
        None => {
            crate::local::init_main(repo, install)?;
        }
    }
    Ok(())
}

pub async fn start(foreground: bool, repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    let repo = Repo::locate(repo_dir)?;
    if !repo.exists() {
        create(&repo, &Config::default(), None).await?;
        println!("initialized the zenith repo {}", repo.root.display());
    }
    // Fails early, with the pid, when zenith-local already runs.
    let lock = RepoLock::take(&repo)?;
    if !repo.node("main").exists() {
        let install = crate::pageserver::install()?;
        repo.complete(
            crate::compute::node::run_as()
                .map_err(crate::models::OpError::from)?
                .as_ref(),
        )?;
        main_from_storage_dest_or_initdb(&repo, &install, &Ops::direct(repo.clone())).await?;
    }
    drop(lock);
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
        // The lock goes first, then the process itself: stopped means nothing is left.
        while RepoLock::held(&repo) || crate::compute::node::running(pid) {
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

/// `zenith console`: a one-time login link for the web console.
pub async fn console(repo_dir: Option<PathBuf>) -> Result<(), CliError> {
    let repo = Repo::locate(repo_dir)?;
    let Some(client) = super::client::Client::for_repo(&repo)? else {
        return Err(anyhow::anyhow!(
            "zenith-local is not running in {}; `zenith start` first, then `zenith console`",
            repo.root.display()
        )
        .into());
    };
    let login: crate::models::ConsoleLogin =
        client.call("POST", "/console/codes", None::<&()>).await?;
    println!("{}", login.url);
    println!(
        "(opens zenith console once, within {} s; `zenith console` again gives another link)",
        login.expires_in_secs
    );
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
    let out = super::pg::Backend::for_repo(&repo, false)?.status().await?;
    if json {
        super::print_json(&out);
        return Ok(());
    }
    let local = &out.zenith_local;
    match (local.running, local.pid) {
        (true, Some(pid)) => println!(
            "zenith-local: running (pid {pid}), repo {}, API {}",
            repo.root.display(),
            local.api.as_deref().unwrap_or("")
        ),
        _ => println!("zenith-local: stopped, repo {}", repo.root.display()),
    }
    if let Some(url) = &out.console_url {
        println!("console: {url} (`zenith console` prints a link that logs in)");
    }
    for pg in &out.pgs {
        print!(
            "pg {}: {}, port {}",
            pg.pg.name,
            super::json_word(&pg.pg.status),
            pg.pg.port
        );
        if let Some(p) = &pg.pg.primary {
            print!(", replica of {p}");
        }
        if pg.restarts > 0 {
            print!(", restarted {} time(s)", pg.restarts);
        }
        if let Some(why) = &pg.failed {
            print!(" (failed: {why})");
        }
        if let Some(space) = &pg.space {
            print!(
                ", {} shared, {} its own",
                format_size(space.shared),
                format_size(space.owned)
            );
        }
        println!();
    }
    if out.clones.on {
        println!(
            "snapshots: thin clones ({}); their clones hold {} alone",
            out.clones.reason,
            format_size(out.clones.snapshots_owned)
        );
    } else {
        println!("snapshots: copies ({})", out.clones.reason);
    }
    if let Some(push) = &out.push {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        print!(
            "pushes: to {} every {} s",
            push.storage_dest, push.interval_secs
        );
        if let Some(wal) = push.wal_bytes {
            print!(" or after {} of WAL", crate::util::size::format_size(wal));
        }
        match (&push.last_pushed, push.last_pushed_unix) {
            (Some(id), Some(at)) => print!(
                "; last pushed snapshot {id}, {} s ago",
                now.saturating_sub(at)
            ),
            _ => print!("; nothing pushed yet"),
        }
        if let Some(e) = &push.last_error {
            print!(
                "; FAILING ({} attempts in a row): {e}; next attempt in {} s",
                push.failures,
                push.next_unix.saturating_sub(now)
            );
        }
        println!();
    } else if let Some(dest) = &out.storage_dest {
        println!(
            "storage_dest: {dest} (pushed by zenith-local while it runs, and by `zenith push`)"
        );
    }
    if let Some(wal) = &out.wal {
        print!(
            "WAL archiving: history {}",
            wal.history.as_deref().unwrap_or("-")
        );
        match (&wal.last_archived, wal.last_archived_age_secs) {
            (Some(seg), Some(age)) => print!("; last archived {seg}, {age} s ago"),
            _ => print!("; nothing archived since the server started"),
        }
        if let (Some(seg), true) = (&wal.last_failed, wal.failed_count > 0) {
            print!(
                "; {} failure(s), the last for {seg}{}",
                wal.failed_count,
                wal.last_failed_age_secs
                    .map(|a| format!(", {a} s ago"))
                    .unwrap_or_default()
            );
        }
        println!();
    }
    if let Some(sk) = &out.safekeeper {
        print_safekeeper(sk);
    }
    match &out.newest_snapshot {
        Some(m) => println!(
            "newest snapshot: {}{}, {}",
            m.id,
            m.name
                .as_deref()
                .map(|n| format!(" ({})", printable(n)))
                .unwrap_or_default(),
            m.created_at
        ),
        None => println!("newest snapshot: none"),
    }
    Ok(())
}

/// The safekeeper's line of `zenith status`; a fallback from sync mode is loud.
fn print_safekeeper(sk: &crate::models::SafekeeperState) {
    if let Some(since) = &sk.fallen_back_since {
        println!(
            "safekeeper: FALLEN BACK TO ASYNC since {since}: {}; commits do not wait for storage_dest until it catches up",
            printable(sk.fallen_back_why.as_deref().unwrap_or("-"))
        );
    }
    print!(
        "safekeeper: {} mode{}, {}",
        sk.mode,
        if sk.commits_wait {
            " (commits wait for storage_dest)"
        } else {
            ""
        },
        if sk.streaming {
            "streaming"
        } else {
            "NOT STREAMING"
        }
    );
    if let Some(lsn) = &sk.flushed_lsn {
        print!("; stored up to {lsn}");
    }
    print!("; lag {}", crate::util::size::format_size(sk.lag_bytes));
    if let Some(secs) = sk.lag_secs.filter(|s| *s > 0) {
        print!(" ({secs} s)");
    }
    if sk.restarts > 0 {
        print!("; restarted {} time(s)", sk.restarts);
    }
    if let Some(e) = &sk.last_error {
        print!("; last error: {}", printable(e));
    }
    println!();
}
