//! zenith-local through the `zenith` binary: `start` on an empty repo gives a PostgreSQL
//! that psql reaches with the printed connection string, `stop` leaves no process behind,
//! a pg that dies is restarted once, and bad input ends in one clear line.

use std::path::{Path, PathBuf};
use std::process::Command;

use zenith::compute::find_postgres;

use crate::support::pg::pg_tempdir;
use crate::support::{assert_clean_failure, require, run, text, zenith};

/// `zenith --repo-dir REPO ...`. Each repo's pgs start from their own port range (a new
/// repo reads ZENITH_PG_PORT), so tests running side by side do not contend for ports.
pub(crate) fn z(repo: &Path) -> Command {
    let mut cmd = zenith();
    let base = 20_000 + (port_slot(repo) * 50);
    cmd.arg("--repo-dir")
        .arg(repo)
        .env("ZENITH_PG_PORT", base.to_string())
        .env("ZENITH_API_PORT", (base + 40).to_string());
    cmd
}

/// A slot in 0..800 derived from the repo path.
fn port_slot(repo: &Path) -> u16 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    repo.hash(&mut h);
    (h.finish() % 800) as u16
}

pub(crate) fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "zenith failed:\n{stdout}\n{stderr}");
    stdout
}

/// Runs SQL through psql with a connection string, as a user would.
pub(crate) fn psql(connstr: &str, sql: &str) -> String {
    let out = psql_output(connstr, sql);
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn psql_output(connstr: &str, sql: &str) -> std::process::Output {
    let install = find_postgres().unwrap();
    Command::new(install.bin("psql"))
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
        .unwrap()
}

/// The test table's rows, in order.
pub(crate) fn rows(connstr: &str) -> String {
    psql(connstr, "select array_agg(i order by i) from t")
}

pub(crate) fn status(repo: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(z(repo).args(["status", "--json"]))).unwrap()
}

/// Processes whose command line mentions `needle`.
pub(crate) fn processes_mentioning(needle: &Path) -> Vec<String> {
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
pub(crate) struct TestRepo {
    _dir: Option<tempfile::TempDir>,
    pub(crate) path: PathBuf,
}

impl TestRepo {
    pub(crate) fn new() -> Option<TestRepo> {
        require("PostgreSQL", find_postgres().ok())?;
        let dir = pg_tempdir();
        let path = dir.path().join("repo");
        Some(TestRepo {
            _dir: Some(dir),
            path,
        })
    }

    /// A repo at `path`, in a directory the caller cleans up.
    pub(crate) fn at(path: PathBuf) -> TestRepo {
        TestRepo { _dir: None, path }
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
    // A storage_dest it cannot reach (no credentials): refused, no repo left behind.
    let mut bare = z(&repo.path);
    bare.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let out = run(bare.args(["init", "--storage_dest", "s3://bucket/team/app"]));
    assert_clean_failure(&out, "credentials");
    assert!(!repo.path.exists());

    let dest = format!("file://{}", repo.path.with_file_name("dest").display());
    ok(z(&repo.path).args(["init", "--storage_dest", &dest]));
    let config = std::fs::read_to_string(repo.path.join("config.toml")).unwrap();
    assert!(config.contains(&dest), "{config}");
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
    // No PostgreSQL: the message says how to get one, and no repo is left behind.
    let out = run(z(&repo.path)
        .arg("start")
        .env("ZENITH_PG_BIN", repo.path.with_file_name("no-postgres")));
    assert_clean_failure(&out, "ZENITH_PG_BIN");
    assert!(!repo.path.join("config.toml").exists());
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

pub(crate) fn connstr_of(repo: &Path, pg: &str) -> String {
    let shown: serde_json::Value =
        serde_json::from_str(&ok(z(repo).args(["pg", "show", pg, "--json"]))).unwrap();
    for key in ["name", "status", "port", "connstr"] {
        assert!(!shown[key].is_null(), "pg show --json lacks {key}: {shown}");
    }
    shown["connstr"].as_str().unwrap().to_string()
}

#[test]
fn snapshots_checkout_and_branches() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    psql(&main, "create table t (i int); insert into t values (1)");
    let out = ok(z(&repo.path).args(["snapshot", "create", "main@t1"]));
    assert!(out.contains("(main@t1)"), "{out}");
    psql(&main, "insert into t values (2)");

    // Unknown references and taken names change nothing.
    assert_clean_failure(
        &run(z(&repo.path).args(["pg", "checkout", "main", "main@nope"])),
        "main@nope",
    );
    assert_clean_failure(
        &run(z(&repo.path).args(["snapshot", "create", "main@t1"])),
        "already exists",
    );
    assert_eq!(rows(&main), "{1,2}");

    // Checkout rolls back, at the same address; the state it left is main@HEAD{0}.
    let out = ok(z(&repo.path).args(["pg", "checkout", "main", "main@t1"]));
    assert!(out.contains("main@HEAD{0}"), "{out}");
    assert_eq!(connstr_of(&repo.path, "main"), main);
    assert_eq!(rows(&main), "{1}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(z(&repo.path).args(["snapshot", "list", "--json"]))).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, ["main@t1", "main@HEAD{0}"]);

    // Two pgs from one snapshot diverge independently.
    ok(z(&repo.path).args(["pg", "create", "b1", "--snapshot", "main@HEAD{0}"]));
    ok(z(&repo.path).args(["pg", "create", "b2", "--snapshot", "main@HEAD{0}"]));
    let (b1, b2) = (connstr_of(&repo.path, "b1"), connstr_of(&repo.path, "b2"));
    assert_ne!(b1, b2);
    psql(&b1, "insert into t values (3)");
    psql(&b2, "insert into t values (4)");
    assert_eq!(rows(&b1), "{1,2,3}");
    assert_eq!(rows(&b2), "{1,2,4}");
    assert_eq!(rows(&main), "{1}");
    // A second checkout keeps HEAD{1}; main comes back to its later rows.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@HEAD{0}"]));
    assert_eq!(rows(&main), "{1,2}");
    assert!(ok(z(&repo.path).args(["snapshot", "list"])).contains("main@HEAD{1}"));
    // The data a checkout replaced is deleted behind it, not left.
    eventually("the replaced data deleted", || {
        std::fs::read_dir(repo.path.join("pgs/main"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("data.old"))
    });

    // Creating an existing pg: refused, nothing changed.
    assert_clean_failure(
        &run(z(&repo.path).args(["pg", "create", "b1"])),
        "already exists",
    );
    assert_eq!(rows(&b1), "{1,2,3}");
    let out = ok(z(&repo.path).args(["pg", "destroy", "b2"]));
    assert!(out.contains("destroyed"), "{out}");
    assert_clean_failure(&run(z(&repo.path).args(["pg", "show", "b2"])), "no pg");

    ok(z(&repo.path).arg("stop"));
    assert_eq!(processes_mentioning(&repo.path), Vec::<String>::new());
}

/// One HTTP/1.1 request to zenith-local's API; returns the status and the JSON body.
pub(crate) fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    try_http(port, method, path, token, body).unwrap()
}

/// [`http`], with the error of a connection that fails.
fn try_http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, serde_json::Value)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(t) = token {
        request.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, payload) = response.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = if payload.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(payload).unwrap_or_else(|e| panic!("{e}: {payload}"))
    };
    Ok((status, json))
}

#[test]
fn stop_lets_a_change_under_way_finish_and_refuses_new_ones() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    crate::checkout_faults::fill(&main, "big", 250);
    let token = std::fs::read_to_string(repo.path.join("api-token")).unwrap();
    let port = status(&repo.path)["zenith_local"]["api"]
        .as_str()
        .and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok())
        .unwrap();

    // A snapshot through the API, then `zenith stop` while it reads the data.
    let snapshot = z(&repo.path)
        .args(["--no-progress", "snapshot", "create", "main@big"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually("the snapshot did not start", || {
        psql(
            &main,
            "select count(*) from pg_stat_activity where query like '%pg_backup_start%' \
             and pid <> pg_backend_pid()",
        ) == "1"
    });
    let mut stop = z(&repo.path).arg("stop").spawn().unwrap();
    // While it waits for the snapshot, zenith-local refuses new changes with a 503.
    eventually_ok(
        || match try_http(port, "DELETE", "/pgs/nobody", Some(token.trim()), None) {
            Ok((503, body)) => {
                let e = body["error"].as_str().unwrap_or_default();
                assert!(e.contains("stopping"), "{body}");
                Ok(())
            }
            Ok((404, _)) => Err("not stopping yet".into()),
            other => panic!("zenith-local went away without refusing a change: {other:?}"),
        },
    );
    let snapshot = snapshot.wait_with_output().unwrap();
    assert!(
        snapshot.status.success(),
        "the snapshot under way failed: {}",
        text(&snapshot).1
    );
    let stopped = stop.wait().unwrap();
    assert!(stopped.success());
    assert_eq!(processes_mentioning(&repo.path), Vec::<String>::new());

    // The snapshot is whole.
    ok(z(&repo.path).args(["snapshot", "verify", "main@big"]));
}

#[test]
fn the_rest_api_serves_every_resource_behind_its_token() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let token = std::fs::read_to_string(repo.path.join("api-token")).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.path.join("zenith-local.json")).unwrap())
            .unwrap();
    let port = state["api_port"].as_u64().unwrap() as u16;
    let call =
        |method: &str, path: &str, body: Option<&str>| http(port, method, path, Some(&token), body);

    // No token, a wrong one: 401 with a JSON error, for every resource.
    for path in ["/pgs", "/snapshots", "/status", "/openapi.json"] {
        let (status, body) = http(port, "GET", path, None, None);
        assert_eq!(status, 401, "{path}");
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
        assert_eq!(
            http(port, "GET", path, Some("wrong"), None).0,
            401,
            "{path}"
        );
    }
    let (status, doc) = call("GET", "/openapi.json", None);
    assert_eq!(status, 200);
    let committed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::support::repo_root().join("docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(doc, committed);

    let (status, s) = call("GET", "/status", None);
    assert_eq!(
        (status, &s["pgs"][0]["name"]),
        (200, &serde_json::json!("main"))
    );
    let (status, pgs) = call("GET", "/pgs", None);
    assert_eq!(status, 200);
    let main = pgs[0]["connstr"].as_str().unwrap().to_string();
    assert_eq!(call("GET", "/pgs/main", None).1["connstr"], main.as_str());
    let (status, body) = call("GET", "/pgs/nope", None);
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");

    // Snapshots.
    psql(&main, "create table t (i int); insert into t values (7)");
    let (status, snap) = call("POST", "/snapshots", Some(r#"{"name": "main@api"}"#));
    assert_eq!(status, 201, "{snap}");
    assert_eq!(snap["name"], "main@api");
    let id = snap["id"].as_str().unwrap().to_string();
    let (status, listed) = call("GET", "/snapshots", None);
    assert_eq!((status, listed[0]["id"].as_str()), (200, Some(id.as_str())));
    assert_eq!(
        call("GET", &format!("/snapshots/{id}"), None).1["name"],
        "main@api"
    );
    assert_eq!(call("GET", "/snapshots/main@nope", None).0, 404);
    assert_eq!(
        call("POST", "/snapshots", Some(r#"{"name": "main@api"}"#)).0,
        409
    );

    // Pgs: create from the snapshot, refuse a second one of that name, act, delete.
    let (status, b1) = call(
        "PUT",
        "/pgs",
        Some(&format!(r#"{{"name": "b1", "snapshot": "{id}"}}"#)),
    );
    assert_eq!(status, 201, "{b1}");
    let b1_connstr = b1["connstr"].as_str().unwrap().to_string();
    assert_eq!(psql(&b1_connstr, "select i from t"), "7");
    let (status, body) = call("PUT", "/pgs", Some(r#"{"name": "b1"}"#));
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        psql(&b1_connstr, "select i from t"),
        "7",
        "a refused create changed b1"
    );
    assert_eq!(call("PUT", "/pgs", Some("{not json")).0, 400);
    assert_eq!(call("PUT", "/pgs", Some(r#"{"name": "Bad Name"}"#)).0, 400);
    let (status, stopped) = call("POST", "/pgs/b1/actions", Some(r#"{"action": "stop"}"#));
    assert_eq!(
        (status, &stopped["status"]),
        (200, &serde_json::json!("stopped"))
    );
    let (status, started) = call("POST", "/pgs/b1/actions", Some(r#"{"action": "start"}"#));
    assert_eq!(
        (status, &started["status"]),
        (200, &serde_json::json!("running"))
    );
    assert_eq!(psql(&b1_connstr, "select i from t"), "7");
    assert_eq!(
        call("POST", "/pgs/b1/actions", Some(r#"{"action": "dance"}"#)).0,
        400
    );
    let (status, body) = call("POST", "/pgs/b1/actions", Some(r#"{"action": "promote"}"#));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not a replica"),
        "{body}"
    );
    let (status, body) = call(
        "POST",
        "/pgs/b1/actions",
        Some(r#"{"action": "checkout", "snapshot": "main@nope"}"#),
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(psql(&b1_connstr, "select i from t"), "7");
    // The main pg stops on request and is not restarted behind the user's back.
    let (status, body) = call("POST", "/pgs/main/actions", Some(r#"{"action": "stop"}"#));
    assert_eq!(
        (status, &body["status"]),
        (200, &serde_json::json!("stopped"))
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(call("GET", "/pgs/main", None).1["status"], "stopped");
    let (status, body) = call("POST", "/pgs/main/actions", Some(r#"{"action": "start"}"#));
    assert_eq!(
        (status, &body["status"]),
        (200, &serde_json::json!("running"))
    );
    assert_eq!(psql(&main, "select i from t"), "7");
    assert_eq!(call("DELETE", "/pgs/b1", None).0, 204);
    assert_eq!(call("GET", "/pgs/b1", None).0, 404);
    assert_eq!(call("DELETE", "/pgs/main", None).0, 409);

    // Storages: attached, shown with what they hold, refused twice, detached.
    assert_eq!(call("GET", "/storages", None), (200, serde_json::json!([])));
    assert_eq!(call("GET", "/storages/team", None).0, 404);
    let team = format!("file://{}", repo.path.with_file_name("team").display());
    let body = format!(r#"{{"name": "team", "url": "{team}"}}"#);
    assert_eq!(call("PUT", "/storages", Some(&body)).0, 201);
    assert_eq!(call("PUT", "/storages", Some(&body)).0, 409);
    assert_eq!(
        call(
            "PUT",
            "/storages",
            Some(r#"{"name": "x", "url": "ftp://x"}"#)
        )
        .0,
        400
    );
    assert_eq!(
        call("GET", "/storages", None).1,
        serde_json::json!([{ "name": "team", "url": team }])
    );
    let (status, shown) = call("GET", "/storages/team", None);
    assert_eq!((status, &shown["snapshots"]), (200, &serde_json::json!([])));
    assert_eq!(call("DELETE", "/storages/team", None).0, 204);
    assert_eq!(call("DELETE", "/storages/team", None).0, 404);

    let (status, deleted) = call("DELETE", &format!("/snapshots/{id}"), None);
    assert_eq!(
        (status, deleted["deleted"].as_str()),
        (200, Some(id.as_str()))
    );
    assert_eq!(call("GET", &format!("/snapshots/{id}"), None).0, 404);
    ok(z(&repo.path).arg("stop"));
    assert_eq!(processes_mentioning(&repo.path), Vec::<String>::new());
}

/// Waits up to a minute for `check` to hold.
pub(crate) fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    eventually_ok(|| check().then_some(()).ok_or_else(|| what.to_string()))
}

/// Waits up to a minute for `check` to succeed; fails with its last error.
pub(crate) fn eventually_ok(mut check: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// Kills its child when dropped, so a failed test leaves no client behind.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn postmaster_pid(repo: &Path, pg: &str) -> i32 {
    std::fs::read_to_string(repo.join(format!("pgs/{pg}/data/postmaster.pid")))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs SQL that must fail; returns psql's error.
pub(crate) fn psql_error(connstr: &str, sql: &str) -> String {
    let out = psql_output(connstr, sql);
    assert!(!out.status.success(), "{sql} succeeded on {connstr}");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn replicas_follow_and_promote_and_every_pg_is_supervised() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    psql(&main, "create table t (i int); insert into t values (1)");

    // A replica of main: a copy of its data that follows its writes, read-only.
    ok(z(&repo.path).args(["pg", "create", "r1", "--no-start"]));
    let out = ok(z(&repo.path).args(["pg", "start", "r1", "--replica"]));
    assert!(out.contains("follows pg main"), "{out}");
    let r1 = connstr_of(&repo.path, "r1");
    psql(&main, "insert into t values (2)");
    eventually("the replica did not receive the primary's write", || {
        rows(&r1) == "{1,2}"
    });
    assert!(psql_error(&r1, "insert into t values (9)").contains("read-only"));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(z(&repo.path).args(["pg", "show", "r1", "--json"]))).unwrap();
    assert_eq!(
        (&shown["role"], &shown["primary"]),
        (&"replica".into(), &"main".into())
    );
    assert_eq!(
        psql(
            &main,
            "select count(*) from pg_replication_slots where active"
        ),
        "1"
    );

    // A primary with a replica is not rolled back or destroyed under it.
    assert_clean_failure(
        &run(z(&repo.path).args(["pg", "checkout", "main", "LATEST"])),
        "has replicas (r1)",
    );
    assert_clean_failure(
        &run(z(&repo.path).args(["pg", "promote", "main"])),
        "not a replica",
    );

    // Promoted, the replica takes writes of its own; main keeps its rows and drops the slot.
    let out = ok(z(&repo.path).args(["pg", "promote", "r1"]));
    assert!(out.contains("promoted pg r1"), "{out}");
    psql(&r1, "insert into t values (3)");
    assert_eq!(rows(&r1), "{1,2,3}");
    assert_eq!(rows(&main), "{1,2}");
    assert_eq!(
        psql(&main, "select count(*) from pg_replication_slots"),
        "0"
    );

    // Every pg started through zenith-local is supervised: killed, r1 comes back once,
    // as the primary it now is, even while a backend of the killed server still runs a
    // long query (it holds the old shared memory until zenith-local ends it).
    let busy = Command::new(find_postgres().unwrap().bin("psql"))
        .args(["-X", "-d", &r1, "-c"])
        .arg("select count(*) from generate_series(1, 10000000000)")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let busy = ChildGuard(busy);
    eventually("the long query did not start", || {
        psql(
            &r1,
            "select count(*) from pg_stat_activity where query like '%generate_series(1, 1%'",
        ) == "2"
    });
    let first = postmaster_pid(&repo.path, "r1");
    unsafe { libc::kill(first, libc::SIGKILL) };
    eventually_ok(|| {
        let s = status(&repo.path);
        let r1 = s["pgs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "r1");
        match r1 {
            Some(r) if r["restarts"] == 1 && r["status"] == "running" => Ok(()),
            _ => Err(format!("the killed pg r1 was not restarted: {s}")),
        }
    });
    drop(busy);
    assert_ne!(postmaster_pid(&repo.path, "r1"), first);
    psql(&r1, "insert into t values (4)");
    assert_eq!(rows(&r1), "{1,2,3,4}");

    // A snapshot of r1 makes a primary, and status names the newest snapshot.
    let out = ok(z(&repo.path).args(["snapshot", "create", "r1@after"]));
    assert!(out.contains("(r1@after)"), "{out}");
    assert_eq!(status(&repo.path)["newest_snapshot"]["name"], "r1@after");
    ok(z(&repo.path).args(["pg", "create", "b", "--snapshot", "r1@after"]));
    let b = connstr_of(&repo.path, "b");
    psql(&b, "insert into t values (5)");
    assert_eq!(rows(&b), "{1,2,3,4,5}");

    ok(z(&repo.path).arg("stop"));
    assert_eq!(processes_mentioning(&repo.path), Vec::<String>::new());
}

#[test]
fn repo_snapshots_export_and_import_in_every_format() {
    let Some(a) = TestRepo::new() else {
        return;
    };
    let b = TestRepo::new().unwrap();
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    psql(
        &main,
        "create table t (i int, pad text); \
         insert into t select g, md5(g::text) from generate_series(1, 100000) g",
    );
    // Settled hint bits: the later small change stays small on disk.
    psql(&main, "vacuum freeze t");
    ok(z(&a.path).args(["snapshot", "create", "main@s1"]));
    let sum = |connstr: &str| psql(connstr, "select count(*), sum(i) from t");
    let expected = sum(&main);
    let out_dir = a.path.with_file_name("exports");

    // b's repo, with zenith-local stopped: the commands act on it directly.
    ok(z(&b.path).arg("init"));
    let mut first_export = String::new();
    for format in ["zenith", "pgdata", "basebackup"] {
        let url = format!("file://{}/{format}", out_dir.display());
        let out = ok(z(&a.path).args([
            "export",
            "main@s1",
            "--snapshot_path",
            &url,
            "--snapshot_format",
            format,
        ]));
        assert!(out.contains("exported snapshot"), "{out}");
        if format == "zenith" {
            first_export = out;
        }
        let name = format!("main@{format}");
        let out = ok(z(&b.path).args([
            "import",
            "--snapshot_path",
            &url,
            "--snapshot_format",
            format,
            "--name",
            &name,
        ]));
        assert!(out.contains(&format!("({name})")), "{out}");
        let pg = format!("from-{format}");
        ok(z(&b.path).args(["pg", "create", &pg, "--snapshot", &name]));
        assert_eq!(sum(&connstr_of(&b.path, &pg)), expected, "{format}");
    }
    assert!(out_dir.join("basebackup/base.tar.zst").exists());
    assert!(out_dir.join("pgdata/PG_VERSION").exists());

    // The zenith format sends only what the target lacks: a second snapshot after a
    // small change sends a small fraction, and one already there sends nothing.
    let url = format!("file://{}/zenith", out_dir.display());
    let sent = |out: &str| -> f64 {
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "sent").unwrap();
        let (n, unit) = (words[at + 1].parse::<f64>().unwrap(), words[at + 2]);
        n * match unit {
            "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1048576.0,
            other => panic!("{other}"),
        }
    };
    psql(&main, "update t set pad = 'changed' where i < 50");
    ok(z(&a.path).args(["snapshot", "create", "main@s2"]));
    let out = ok(z(&a.path).args(["export", "main@s2", "--snapshot_path", &url]));
    assert!(
        sent(&out) < 0.05 * sent(&first_export),
        "{out}\nafter\n{first_export}"
    );
    let out = ok(z(&a.path).args(["export", "main@s2", "--snapshot_path", &url]));
    assert!(out.contains("already there"), "{out}");
    let out = ok(z(&b.path).args(["import", "--snapshot_path", &url, "--snapshot", "main@s2"]));
    assert!(out.contains("imported"), "{out}");
    let out = ok(z(&b.path).args(["import", "--snapshot_path", &url, "--snapshot", "main@s2"]));
    assert!(out.contains("in the repo already"), "{out}");

    // A running server, online; and names that are taken are refused, nothing changed.
    ok(z(&b.path).args(["import", "--snapshot_path", &main, "--name", "main@online"]));
    ok(z(&b.path).args(["pg", "create", "online", "--snapshot", "main@online"]));
    assert_eq!(sum(&connstr_of(&b.path, "online")), expected);
    let before = ok(z(&b.path).args(["snapshot", "list"]));
    assert_clean_failure(
        &run(z(&b.path).args(["import", "--snapshot_path", &main, "--name", "main@online"])),
        "already",
    );
    assert_clean_failure(
        &run(z(&a.path).args(["export", "main@nope", "--snapshot_path", &url])),
        "main@nope",
    );
    assert_eq!(ok(z(&b.path).args(["snapshot", "list"])), before);
    ok(z(&a.path).arg("stop"));
    ok(z(&b.path).arg("stop"));
}
