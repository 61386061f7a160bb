//! zenith-local through the `zenith` binary: `start` on an empty repo gives a PostgreSQL
//! that psql reaches with the printed connection string, `stop` leaves no process behind,
//! a pg that dies is restarted once, and bad input ends in one clear line.

use std::path::{Path, PathBuf};
use std::process::Command;

use zenith::compute::find_postgres;

use crate::support::pg::pg_tempdir;
use crate::support::{assert_clean_failure, require, run, text, zenith};

/// `zenith --repo-dir REPO ...`.
fn z(repo: &Path) -> Command {
    let mut cmd = zenith();
    cmd.arg("--repo-dir").arg(repo);
    cmd
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "zenith failed:\n{stdout}\n{stderr}");
    stdout
}

/// Runs SQL through psql with a connection string, as a user would.
fn psql(connstr: &str, sql: &str) -> String {
    let install = find_postgres().unwrap();
    let out = Command::new(install.bin("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            connstr,
            "-c",
            sql,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn status(repo: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(z(repo).args(["status", "--json"]))).unwrap()
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect()
}

/// A repo path in a directory PostgreSQL's account can reach; stops whatever runs there
/// when dropped, so a failing test leaves nothing behind.
struct TestRepo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestRepo {
    fn new() -> Option<TestRepo> {
        require("PostgreSQL", find_postgres().ok())?;
        let dir = pg_tempdir();
        let path = dir.path().join("repo");
        Some(TestRepo { _dir: dir, path })
    }
}

impl Drop for TestRepo {
    fn drop(&mut self) {
        let _ = z(&self.path).args(["stop", "--immediate"]).output();
    }
}

#[test]
fn start_gives_a_postgres_and_stop_leaves_nothing_running() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    let out = ok(z(&repo.path).arg("start"));
    assert!(out.contains("initialized the zenith repo"), "{out}");
    let connstr = out
        .lines()
        .find_map(|l| l.strip_prefix("pg main: "))
        .unwrap_or_else(|| panic!("no connection string in {out}"))
        .to_string();
    assert!(connstr.starts_with("postgresql://postgres:"), "{connstr}");
    psql(
        &connstr,
        "create table t (id int); insert into t values (1), (2)",
    );
    assert_eq!(psql(&connstr, "select sum(id) from t"), "3");
    // Data checksums on, scram-sha-256 passwords.
    assert_eq!(psql(&connstr, "show data_checksums"), "on");
    assert_eq!(psql(&connstr, "show password_encryption"), "scram-sha-256");

    let s = status(&repo.path);
    assert_eq!(s["zenith_local"]["running"], true);
    assert_eq!(s["pgs"][0]["name"], "main");
    assert_eq!(s["pgs"][0]["status"], "running");
    assert_eq!(s["pgs"][0]["connstr"], connstr.as_str());
    let token = repo.path.join("api-token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The password is in no file but the pg's own state (mode 0600), and not in config.toml.
    let password = connstr
        .trim_start_matches("postgresql://postgres:")
        .split('@')
        .next()
        .unwrap();
    let config = std::fs::read_to_string(repo.path.join("config.toml")).unwrap();
    assert!(!config.contains(password));
    let log = std::fs::read_to_string(repo.path.join("logs/zenith-local.log")).unwrap();
    assert!(!log.contains(password), "the password reached the log");

    // A second start on the running repo: one line, non-zero, nothing disturbed.
    let out = run(z(&repo.path).arg("start"));
    assert_clean_failure(&out, "already runs");
    assert_eq!(psql(&connstr, "select sum(id) from t"), "3");

    let out = ok(z(&repo.path).arg("stop"));
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(
        processes_mentioning(&repo.path),
        Vec::<String>::new(),
        "processes left after stop"
    );
    let s = status(&repo.path);
    assert_eq!(s["zenith_local"]["running"], false);
    assert_eq!(s["pgs"][0]["status"], "stopped");

    // Started again, the data is still there, at the same address.
    let out = ok(z(&repo.path).arg("start"));
    assert!(!out.contains("initialized"), "{out}");
    assert!(out.contains(&connstr), "{out}");
    assert_eq!(psql(&connstr, "select sum(id) from t"), "3");
    ok(z(&repo.path).args(["stop", "--immediate"]));
    assert_eq!(processes_mentioning(&repo.path), Vec::<String>::new());
}

#[test]
fn a_pg_that_dies_is_restarted_once_and_a_killed_zenith_local_is_cleaned_up() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    let out = ok(z(&repo.path).arg("start"));
    let connstr = out
        .lines()
        .find_map(|l| l.strip_prefix("pg main: "))
        .unwrap()
        .to_string();
    let postmaster = |repo: &Path| -> i32 {
        std::fs::read_to_string(repo.join("pgs/main/data/postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let first = postmaster(&repo.path);
    unsafe { libc::kill(first, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let s = status(&repo.path);
        if s["pgs"][0]["restarts"] == 1 && s["pgs"][0]["status"] == "running" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the killed pg was not restarted: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_ne!(postmaster(&repo.path), first);
    assert_eq!(psql(&connstr, "select 1"), "1");

    // zenith-local killed outright: its pg keeps running, and stop still stops it.
    let pid: i32 = std::fs::read_to_string(repo.path.join("zenith-local.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let s = status(&repo.path);
    assert_eq!(s["zenith_local"]["running"], false, "{s}");
    let out = ok(z(&repo.path).arg("stop"));
    assert!(out.contains("stopped pg main"), "{out}");
    assert_eq!(processes_mentioning(&repo.path), Vec::<String>::new());
}

#[test]
fn init_refuses_an_existing_repo_and_changes_nothing() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).args(["init", "--storage_dest", "s3://bucket/team/app"]));
    let config = std::fs::read_to_string(repo.path.join("config.toml")).unwrap();
    assert!(config.contains("s3://bucket/team/app"), "{config}");
    let node = std::fs::read(repo.path.join("pgs/main/node.json")).unwrap();
    let out = run(z(&repo.path).arg("init"));
    assert_clean_failure(&out, "already a zenith repo");
    assert_eq!(
        std::fs::read_to_string(repo.path.join("config.toml")).unwrap(),
        config
    );
    assert_eq!(
        std::fs::read(repo.path.join("pgs/main/node.json")).unwrap(),
        node
    );
    // A storage_dest that is not a storage URL is refused before anything is created.
    let other = repo.path.with_file_name("other");
    let out = run(z(&other).args(["init", "--storage_dest", "s3:/typo"]));
    assert_clean_failure(&out, "s3:");
    assert!(!other.exists());
}

#[test]
fn bad_repos_and_busy_ports_are_clear() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    // A repo that is a file.
    std::fs::create_dir_all(repo.path.parent().unwrap()).unwrap();
    let file = repo.path.with_file_name("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = run(z(&file.join("repo")).arg("start"));
    assert_clean_failure(&out, "cannot create the repo");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
    // stop and status on a directory that is no repo.
    let out = run(z(&repo.path).arg("stop"));
    assert_clean_failure(&out, "no zenith repo");
    let out = run(z(&repo.path).arg("status"));
    assert_clean_failure(&out, "no zenith repo");

    // The main pg's port taken by someone else: it moves to a free one and says where.
    ok(z(&repo.path).arg("init"));
    let node: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.path.join("pgs/main/node.json")).unwrap())
            .unwrap();
    let port = node["port"].as_u64().unwrap() as u16;
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port));
    let out = ok(z(&repo.path).arg("start"));
    let connstr = out
        .lines()
        .find_map(|l| l.strip_prefix("pg main: "))
        .unwrap()
        .to_string();
    assert!(!connstr.contains(&format!(":{port}/")), "{connstr}");
    assert_eq!(psql(&connstr, "select 1"), "1");
    ok(z(&repo.path).arg("stop"));
}
