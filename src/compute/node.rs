//! One compute node ("pg"): a PostgreSQL data directory zenith created, the port it
//! listens on and its generated password, and the server process.
//!
//! Layout under the node's directory: `data/` (PGDATA), `node.json` (port and password,
//! mode 0600), `postgres.log`. The server listens on 127.0.0.1 only, with
//! scram-sha-256 authentication, its Unix socket in the node's directory.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use super::account::{is_root, postgres_account, Account};
use super::error::{Error, Result};
use super::install::PgInstall;

/// What zenith keeps about a pg besides its data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub port: u16,
    /// The superuser password its connection string carries.
    pub password: String,
    /// The pg this one follows as a streaming replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Whether the server has run as a primary on this data: false for a pg created from
    /// a snapshot and not started yet, whose data a replica copy may replace.
    #[serde(default = "yes")]
    pub has_run: bool,
    /// The line of WAL the pg writes (see the safekeeper's archive); a pg of an older
    /// zenith gets one at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalLine>,
    /// A recovery to run at the next start (a point-in-time restore, or replaying the
    /// archive after a crash restore), until the server has finished it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<Recovery>,
}

fn yes() -> bool {
    true
}

/// A pg's line of WAL: its history, and where that history left its parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalLine {
    pub history: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<WalFork>,
}

/// Where a history left its parent: the parent's timeline and the position the child
/// began at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalFork {
    pub history: String,
    pub timeline: u32,
    pub lsn: String,
}

/// A recovery from the WAL archive: replay history `source` (and what it inherits) up to
/// `target`, or to the end of the archive, then promote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RecoveryTarget>,
}

/// Where a point-in-time restore stops: just before the first commit after a time, or
/// after the record at a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryTarget {
    /// A time as PostgreSQL reads it (`2026-12-03 10:00:00.000000+00`).
    Time(String),
    /// A WAL position (`0/3000060`).
    Lsn(String),
}

impl WalLine {
    /// A new history that begins with its cluster.
    pub fn new_root() -> WalLine {
        WalLine {
            history: new_history(),
            parent: None,
        }
    }

    /// A new history that continues `parent` from `timeline`/`lsn`.
    pub fn branch(parent: &str, timeline: u32, lsn: &str) -> WalLine {
        WalLine {
            history: new_history(),
            parent: Some(WalFork {
                history: parent.to_string(),
                timeline,
                lsn: lsn.to_string(),
            }),
        }
    }
}

/// A new history id: 16 random hex digits.
pub fn new_history() -> String {
    format!("{:016x}", seed())
}

impl NodeState {
    /// A new pg's state: a fresh password, a primary, a history of its own.
    pub fn new(port: u16) -> NodeState {
        NodeState {
            port,
            password: generate_password(),
            primary: None,
            has_run: true,
            wal: Some(WalLine::new_root()),
            recovery: None,
        }
    }
}

/// A pg's files.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
}

/// Whether a pg's server is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Stopped,
}

impl Node {
    pub fn new(name: &str, dir: PathBuf) -> Node {
        Node {
            name: name.to_string(),
            dir,
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    /// Whether the pg has data, complete or (after a failed checkout) not.
    pub fn exists(&self) -> bool {
        self.data().join("PG_VERSION").exists() || self.incomplete_marker().exists()
    }

    /// Present while the pg's data is incomplete: names the snapshot holding its state.
    pub fn incomplete_marker(&self) -> PathBuf {
        self.dir.join("incomplete")
    }

    pub fn state(&self) -> Result<NodeState> {
        let path = self.state_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Failed(format!(
                "{}: {e}; is pg {} damaged?",
                path.display(),
                self.name
            ))
        })?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Failed(format!(
                "{}: {e}; is pg {} damaged?",
                path.display(),
                self.name
            ))
        })
    }

    pub fn save_state(&self, state: &NodeState) -> Result<()> {
        write_private(
            &self.state_path(),
            &serde_json::to_vec_pretty(state).expect("serializes"),
        )
    }

    /// zenith's own connection: the Unix socket in the pg's private directory.
    pub fn local_connstr(&self, state: &NodeState) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            state.port
        )
    }

    /// Sets the superuser's password to the pg's own (after a snapshot from another pg
    /// brought a different one), through the local socket; the password travels on stdin,
    /// never in a command line.
    pub async fn set_password(&self, install: &PgInstall, state: &NodeState) -> Result<()> {
        // Two setters at once (a supervisor and a command) may collide; it is idempotent.
        let mut attempt = 0;
        loop {
            match self.try_set_password(install, state).await {
                Err(e) if attempt < 5 => {
                    tracing::debug!("{}; trying again", crate::util::message::full(&e));
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_set_password(&self, install: &PgInstall, state: &NodeState) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(install.bin("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.local_connstr(state))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(install.bin("psql").display(), e))?;
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(
                format!(
                    "SET log_statement = 'none';\nALTER ROLE postgres PASSWORD '{}';\n",
                    state.password
                )
                .as_bytes(),
            )
            .await
            .map_err(|e| Error::io("psql", e))?;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::io("psql", e))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "cannot set the password of pg {}: {}",
                self.name,
                last_line(&out.stderr)
            )));
        }
        Ok(())
    }

    /// A libpq URI that works as is (it carries the password).
    pub fn connstr(&self, state: &NodeState) -> String {
        format!(
            "postgresql://postgres:{}@127.0.0.1:{}/postgres",
            state.password, state.port
        )
    }

    /// Creates the data directory with `initdb` (data checksums on, scram-sha-256) and a
    /// fresh password.
    pub fn init(&self, install: &PgInstall, port: u16) -> Result<NodeState> {
        let data = self.data();
        if std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_some()) {
            return Err(Error::Failed(format!(
                "{} exists and is not a PostgreSQL data directory zenith can use; move it away first, nothing was changed",
                data.display()
            )));
        }
        let account = run_as()?;
        make_dir(&self.dir, account.as_ref())?;
        // An empty cluster that never ran: a replica copy may replace it.
        let state = NodeState {
            has_run: false,
            ..NodeState::new(port)
        };
        let pwfile = self.dir.join(".pwfile");
        write_private(&pwfile, state.password.as_bytes())?;
        if let Some(a) = &account {
            std::os::unix::fs::chown(&pwfile, Some(a.uid), Some(a.gid))
                .map_err(|e| Error::io(pwfile.display(), e))?;
        }
        let out = as_account(
            std::process::Command::new(install.bin("initdb")),
            account.as_ref(),
        )
        .arg("-D")
        .arg(self.data())
        .args([
            "--data-checksums",
            "--username=postgres",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-instructions",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .output();
        let _ = std::fs::remove_file(&pwfile);
        let out = out.map_err(|e| Error::io(install.bin("initdb").display(), e))?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(self.data());
            return Err(Error::Failed(format!(
                "initdb failed for pg {}: {}",
                self.name,
                last_line(&out.stderr)
            )));
        }
        self.save_state(&state)?;
        Ok(state)
    }

    /// Plans `recovery` for the next start: recorded in node.json, and `recovery.signal`
    /// placed in the data directory (PostgreSQL removes it when the recovery ends, which
    /// is how a later start tells a finished recovery from one still due).
    pub fn begin_recovery(&self, state: &mut NodeState, recovery: Recovery) -> Result<()> {
        let signal = self.data().join("recovery.signal");
        std::fs::write(&signal, b"").map_err(|e| Error::io(signal.display(), e))?;
        if let Some(a) = run_as()? {
            std::os::unix::fs::chown(&signal, Some(a.uid), Some(a.gid))
                .map_err(|e| Error::io(signal.display(), e))?;
        }
        state.recovery = Some(recovery);
        self.save_state(state)
    }

    /// Whether the recovery node.json records has ended: PostgreSQL removed its
    /// `recovery.signal` when it promoted.
    pub fn recovery_ended(&self, state: &NodeState) -> bool {
        state.recovery.is_some() && !self.data().join("recovery.signal").exists()
    }

    /// Where the pg's newest timeline began: the timeline before it and the position it
    /// switched at, from the newest timeline history file in `pg_wal` (`None` on the
    /// first timeline).
    pub fn timeline_switch(&self) -> Option<(u32, String)> {
        let wal = self.data().join("pg_wal");
        let newest = std::fs::read_dir(&wal)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let tli = name.strip_suffix(".history")?;
                (tli.len() == 8)
                    .then(|| u32::from_str_radix(tli, 16).ok())
                    .flatten()
                    .map(|t| (t, e.path()))
            })
            .max_by_key(|(t, _)| *t)?;
        parse_timeline_history(&std::fs::read_to_string(newest.1).ok()?)
    }

    /// The postmaster's pid, if a server is running on the data directory.
    pub fn running_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    pub fn status(&self) -> Status {
        if self.running_pid().is_some() {
            Status::Running
        } else {
            Status::Stopped
        }
    }

    /// Runs SQL texts through the local socket as the superuser, each in its own
    /// transaction, and returns psql's unaligned, tuples-only output; an error past
    /// `limit` (if any), when psql is ended.
    pub async fn query_steps(
        &self,
        install: &PgInstall,
        state: &NodeState,
        steps: &[&str],
        limit: Option<std::time::Duration>,
    ) -> Result<String> {
        let mut cmd = tokio::process::Command::new(install.bin("psql"));
        cmd.args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.local_connstr(state));
        for step in steps {
            cmd.arg("-c").arg(step);
        }
        let run = cmd.stdin(Stdio::null()).kill_on_drop(true).output();
        let out = match limit {
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| Error::Failed(format!("pg {}: no answer in {limit:?}", self.name)))?,
            None => run.await,
        }
        .map_err(|e| Error::io(install.bin("psql").display(), e))?;
        if !out.status.success() {
            return Err(Error::Failed(format!(
                "pg {}: {}",
                self.name,
                last_line(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs one SQL text through the local socket as the superuser and returns psql's
    /// unaligned, tuples-only output.
    pub async fn query(&self, install: &PgInstall, state: &NodeState, sql: &str) -> Result<String> {
        self.query_steps(install, state, &[sql], None).await
    }

    /// Starts the server as a child process (its output appended to the log) and waits
    /// until it accepts connections. `settings` are extra `name=value` server settings.
    pub async fn start(
        &self,
        install: &PgInstall,
        state: &NodeState,
        settings: &[String],
    ) -> Result<tokio::process::Child> {
        let account = run_as()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.log())
            .map_err(|e| Error::io(self.log().display(), e))?;
        if let Some(a) = &account {
            std::os::unix::fs::chown(self.log(), Some(a.uid), Some(a.gid))
                .map_err(|e| Error::io(self.log().display(), e))?;
        }
        // zenith's own access rules, outside the data directory (a snapshot from elsewhere
        // brings its own): the Unix socket, in the pg's private directory, trusts its
        // account; TCP on 127.0.0.1 needs the password.
        let hba = self.dir.join("pg_hba.conf");
        std::fs::write(&hba, HBA).map_err(|e| Error::io(hba.display(), e))?;
        if let Some(a) = &account {
            std::os::unix::fs::chown(&hba, Some(a.uid), Some(a.gid))
                .map_err(|e| Error::io(hba.display(), e))?;
        }
        let mut cmd = as_account(
            std::process::Command::new(install.bin("postgres")),
            account.as_ref(),
        );
        cmd.arg("-D")
            .arg(self.data())
            .arg("-c")
            .arg(format!("hba_file={}", hba.display()))
            .arg("-p")
            .arg(state.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()));
        if install.major >= 14 {
            // Starting after a crash, or from a state kept without a shutdown checkpoint,
            // PostgreSQL first makes the whole data directory durable: by default with an
            // fsync per file (0.1 s for the thousand files of a 2.5 GB database on XFS),
            // with syncfs in one call per filesystem.
            cmd.args(["-c", "recovery_init_sync_method=syncfs"]);
        }
        for setting in settings {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| Error::io(self.log().display(), e))?,
            )
            .stderr(log);
        // Its own process group: a Ctrl-C meant for zenith does not reach PostgreSQL,
        // which zenith stops itself.
        cmd.process_group(0);
        let mut child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(|e| Error::io(install.bin("postgres").display(), e))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| Error::io(format!("pg {}", self.name), e))?
            {
                return Err(Error::Failed(format!(
                    "pg {} did not start ({status}): {}; see {}",
                    self.name,
                    last_failure(&self.log()),
                    self.log().display()
                )));
            }
            if child.id().is_some_and(|pid| self.ready(pid as i32)) {
                return Ok(child);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(Error::Failed(format!(
                    "pg {} did not become ready in 120 s; see {}",
                    self.name,
                    self.log().display()
                )));
            }
            // A read of a small file: often enough that a checkout or a new pg is not
            // kept waiting (pgs start in about 0.1 s).
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Whether the postmaster `pid` says it is ready (line 8 of postmaster.pid); the file a
    /// killed server left behind names another pid and does not count.
    pub fn ready(&self, pid: i32) -> bool {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .map(|t| {
                let mut lines = t.lines().map(str::trim);
                lines.next() == Some(pid.to_string().as_str()) && lines.nth(6) == Some("ready")
            })
            .unwrap_or(false)
    }

    /// Ends what is left of a server whose postmaster was killed: its backends live on
    /// until they next wait (a long query runs to its end), keep its shared memory in use
    /// and so keep a new postmaster from starting. They are the `postgres` processes
    /// working in the data directory; they get SIGQUIT, as the postmaster would send them,
    /// then SIGKILL after `grace`.
    pub async fn end_orphans(&self, grace: std::time::Duration) {
        let data = std::fs::canonicalize(self.data()).unwrap_or_else(|_| self.data());
        let orphans = || -> Vec<i32> {
            let Ok(entries) = std::fs::read_dir("/proc") else {
                return Vec::new();
            };
            let link = |pid: i32, what: &str| std::fs::read_link(format!("/proc/{pid}/{what}"));
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&pid| {
                    link(pid, "cwd").is_ok_and(|cwd| cwd == data)
                        && link(pid, "exe").is_ok_and(|exe| exe.ends_with("postgres"))
                })
                .collect()
        };
        let mut signal = 0;
        let mut deadline = std::time::Instant::now();
        loop {
            let left = orphans();
            if left.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                (signal, deadline) = match signal {
                    0 => (libc::SIGQUIT, std::time::Instant::now() + grace),
                    libc::SIGQUIT => (libc::SIGKILL, std::time::Instant::now() + grace),
                    _ => {
                        tracing::error!("pg {}: processes {left:?} outlive SIGKILL", self.name);
                        return;
                    }
                };
                tracing::warn!(
                    "pg {}: ending processes {left:?} its killed server left behind",
                    self.name
                );
            }
            for pid in left {
                unsafe { libc::kill(pid, signal) };
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Stops the server (fast: rolls back open transactions; immediate: no shutdown
    /// checkpoint, recovery at next start) and waits until it is gone.
    pub async fn stop(&self, immediate: bool) -> Result<()> {
        let Some(pid) = self.signal_stop(immediate) else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while alive(pid) {
            if std::time::Instant::now() > deadline {
                return Err(Error::Failed(format!(
                    "pg {} (pid {pid}) did not stop in 120 s",
                    self.name
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

impl Node {
    /// Asks the server to stop (fast or immediate) and returns its pid, if it runs.
    pub fn signal_stop(&self, immediate: bool) -> Option<i32> {
        let pid = self.running_pid()?;
        let signal = if immediate {
            libc::SIGQUIT
        } else {
            libc::SIGINT
        };
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(pid, signal) };
        Some(pid)
    }

    /// Stops a server that is this process's child, reaping it.
    pub async fn stop_child(
        &self,
        child: &mut tokio::process::Child,
        immediate: bool,
    ) -> Result<()> {
        if child
            .try_wait()
            .map_err(|e| Error::io(format!("pg {}", self.name), e))?
            .is_some()
        {
            return Ok(());
        }
        self.signal_stop(immediate);
        match tokio::time::timeout(std::time::Duration::from_secs(120), child.wait()).await {
            Ok(status) => status
                .map(|_| ())
                .map_err(|e| Error::io(format!("pg {}", self.name), e)),
            Err(_) => Err(Error::Failed(format!(
                "pg {} did not stop in 120 s",
                self.name
            ))),
        }
    }
}

/// Access rules of every pg zenith runs.
const HBA: &str = "# Written by zenith at each start.\n\
local all all trust\n\
local replication all trust\n\
host all all 127.0.0.1/32 scram-sha-256\n\
host replication all 127.0.0.1/32 scram-sha-256\n";

/// Whether a process exists (a zombie child counts until it is reaped).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Whether a process exists and has not exited: unlike [`alive`], a zombie waiting for a
/// parent that is not us to reap it does not count.
pub fn running(pid: i32) -> bool {
    if !alive(pid) {
        return false;
    }
    // /proc/PID/stat: "pid (comm) state ..."; comm may hold spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// The account to run PostgreSQL as: the postgres account when zenith is root, else the
/// current user (`None`).
pub fn run_as() -> Result<Option<Account>> {
    if is_root() {
        Ok(Some(postgres_account().map_err(Error::Failed)?))
    } else {
        Ok(None)
    }
}

/// A command that runs as PostgreSQL's account (see [`run_as`]).
pub fn as_postgres(program: &Path) -> Result<std::process::Command> {
    Ok(as_account(
        std::process::Command::new(program),
        run_as()?.as_ref(),
    ))
}

fn as_account(mut cmd: std::process::Command, account: Option<&Account>) -> std::process::Command {
    if let Some(a) = account {
        // std drops root's supplementary groups along with the uid.
        cmd.uid(a.uid).gid(a.gid);
    }
    cmd
}

/// Creates `dir` (mode 0700) owned by `account` when given.
pub fn make_dir(dir: &Path, account: Option<&Account>) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))?;
    if let Some(a) = account {
        std::os::unix::fs::chown(dir, Some(a.uid), Some(a.gid))
            .map_err(|e| Error::io(dir.display(), e))?;
    }
    Ok(())
}

/// Writes a file readable by its owner only, atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    write_file(path, data, 0o600)
}

/// Writes a file of mode `mode`, atomically.
pub fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let temp = path.with_extension(format!("tmp-{:08x}", fastrand::u32(..)));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        std::io::Write::write_all(&mut f, data)?;
        f.sync_all()?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))
}

/// The last switch of a timeline history file: `parentTLI<TAB>switchpoint<TAB>reason`
/// lines, comments starting with `#`.
pub fn parse_timeline_history(text: &str) -> Option<(u32, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let tli = fields.next()?.parse().ok()?;
            let lsn = fields.next()?;
            crate::compute::wal::parse_lsn(lsn).map(|_| (tli, lsn.to_string()))
        })
        .next_back()
}

/// 24 random letters and digits (about 143 bits).
pub fn generate_password() -> String {
    let mut rng = fastrand::Rng::with_seed(seed());
    (0..24).map(|_| rng.alphanumeric()).collect()
}

/// A seed from the kernel's random source, falling back to fastrand's own seeding.
fn seed() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_le_bytes(buf)
    } else {
        fastrand::u64(..)
    }
}

/// The last non-empty line of a program's output, for messages.
pub fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

/// The last 16 KiB of a log.
fn log_tail(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 16 * 1024;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Why a server that stopped did: the last FATAL or PANIC message since it last started
/// (a failed recovery, a bad setting), else what its log says last.
pub fn last_failure(path: &Path) -> String {
    if let Ok(tail) = log_tail(path) {
        let text = String::from_utf8_lossy(&tail);
        let since = text.rfind("starting PostgreSQL").unwrap_or(0);
        if let Some(line) = text[since..]
            .lines()
            .rev()
            .find(|l| l.contains("FATAL:") || l.contains("PANIC:"))
        {
            return line.trim().to_string();
        }
    }
    last_log_line(path)
}

/// What a server's log says last, for messages: the last message itself, not the HINT,
/// DETAIL or CONTEXT lines that may follow it. Only the log's tail is read.
pub fn last_log_line(path: &Path) -> String {
    let Ok(tail) = log_tail(path) else {
        return "no log".into();
    };
    let text = String::from_utf8_lossy(&tail);
    let detail = ["HINT:", "DETAIL:", "CONTEXT:", "STATEMENT:"];
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !detail.iter().any(|d| l.contains(d)))
        .map(str::to_string)
        .unwrap_or_else(|| last_line(&tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_history_files_give_the_last_switch() {
        let text = "1\t0/3000060\tno recovery target specified\n\n# comment\n2\t0/5000000\tat restore point\n";
        assert_eq!(parse_timeline_history(text), Some((2, "0/5000000".into())));
        assert_eq!(parse_timeline_history("# nothing\n"), None);
        assert_eq!(parse_timeline_history("1\tgarbage\n"), None);
    }

    #[test]
    fn a_log_is_summed_up_by_its_last_fatal_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("postgres.log");
        std::fs::write(
            &log,
            "LOG:  starting\nFATAL:  lock file exists\nHINT:  Is another\n",
        )
        .unwrap();
        assert_eq!(last_log_line(&log), "FATAL:  lock file exists");
        std::fs::write(
            &log,
            "FATAL:  password authentication failed\nLOG:  shutting down\n",
        )
        .unwrap();
        assert_eq!(last_log_line(&log), "LOG:  shutting down");
        std::fs::write(&log, format!("{}LOG:  ready\n", "x\n".repeat(100_000))).unwrap();
        assert_eq!(last_log_line(&log), "LOG:  ready");
        assert_eq!(last_log_line(&dir.path().join("none")), "no log");
    }

    #[test]
    fn running_processes_are_told_from_exited_ones() {
        assert!(running(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Exited but not yet reaped: a zombie, which `alive` still counts.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while running(pid) {
            assert!(std::time::Instant::now() < deadline, "{pid} never exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(alive(pid));
        child.wait().unwrap();
        assert!(!running(pid) && !alive(pid));
    }

    #[test]
    fn passwords_are_long_and_differ() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }
}
