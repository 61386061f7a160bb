//! storage_dest, push and pull through the `zenith` binary: snapshots pushed to S3 (s3s-fs
//! and a Garage cluster) and pulled into another repo hold the same rows; a second push
//! sends a small fraction; a machine that lost everything but config.toml comes back from
//! storage_dest; background pushes follow writes and ride out a storage outage; a push
//! cut short resumes; bad input changes nothing.

use std::path::Path;
use std::process::Command;

use crate::local::{
    connstr_of, eventually, ok, postmaster_pid, processes_mentioning, psql, status, z, TestRepo,
};
use crate::support::s3::S3Server;
use crate::support::{assert_clean_failure, run};

/// `z(repo)` with a storage's environment.
fn ze(repo: &Path, env: &[(&'static str, String)]) -> Command {
    let mut cmd = z(repo);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Bytes in a "<n> <unit> sent" phrase of zenith's output.
fn sent(out: &str) -> f64 {
    let words: Vec<&str> = out.split_whitespace().collect();
    let at = words
        .iter()
        .rposition(|w| *w == "sent")
        .unwrap_or_else(|| panic!("no 'sent' in {out}"));
    let n: f64 = words[at - 2].parse().unwrap();
    n * match words[at - 1] {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1048576.0,
        "GiB" => 1073741824.0,
        other => panic!("unit {other} in {out}"),
    }
}

/// A count and a sum over table t, which the tests fill.
fn fingerprint(connstr: &str) -> String {
    psql(connstr, "select count(*) || '/' || sum(i) from t")
}

fn fill(connstr: &str, rows: u32) {
    psql(
        connstr,
        &format!(
            "create table t (i int, pad text); \
             insert into t select g, md5(g::text) from generate_series(1, {rows}) g"
        ),
    );
    // Settled hint bits: a later small change stays small on disk.
    psql(connstr, "vacuum freeze t");
}

fn push_and_pull_through(server: &S3Server) {
    let a = TestRepo::new().unwrap();
    let b = TestRepo::new().unwrap();
    let env = server.env();
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    fill(&main, 100_000);
    ok(z(&a.path).args(["snapshot", "create", "main@s1"]));
    let url = server.url(&format!("team/{}", fastrand::u32(..)));
    let first = ok(ze(&a.path, &env).args(["push", "main@s1", &url]));
    assert!(first.contains("pushed snapshot"), "{first}");

    // A small change: the second push (every snapshot not there yet) sends a fraction.
    psql(&main, "update t set pad = 'changed' where i < 50");
    ok(z(&a.path).args(["snapshot", "create", "main@s2"]));
    let second = ok(ze(&a.path, &env).args(["push", &url]));
    assert!(second.contains("(main@s2)"), "{second}");
    assert!(!second.contains("(main@s1)"), "{second}");
    assert!(
        sent(&second) < 0.05 * sent(&first),
        "the second push sent too much:\n{second}\nafter\n{first}"
    );
    let again = ok(ze(&a.path, &env).args(["push", &url]));
    assert!(again.contains("nothing pushed"), "{again}");

    // Another repo pulls through a named storage and makes a pg of it.
    ok(z(&b.path).arg("init"));
    ok(z(&b.path).args(["storage", "attach", "-n", "team", "--path", &url]));
    let listed = ok(z(&b.path).args(["storage", "list"]));
    assert!(listed.contains("team") && listed.contains(&url), "{listed}");
    let shown = ok(ze(&b.path, &env).args(["storage", "show", "-n", "team"]));
    assert!(shown.contains("main@s2"), "{shown}");
    let listed = ok(ze(&b.path, &env).args(["snapshot", "list", "--storage", "team"]));
    assert!(
        listed.contains("main@s1") && listed.contains("main@s2"),
        "{listed}"
    );
    let out = ok(ze(&b.path, &env).args(["pull", "team", "main@s2"]));
    assert!(out.contains("pulled snapshot"), "{out}");
    let out = ok(ze(&b.path, &env).args(["pull", "team", "main@s2"]));
    assert!(out.contains("in the repo already"), "{out}");
    ok(z(&b.path).args(["pg", "create", "copy", "--snapshot", "main@s2"]));
    assert_eq!(
        fingerprint(&connstr_of(&b.path, "copy")),
        fingerprint(&main)
    );

    // Storage to storage (S3 to S3), without the repo in between.
    let mirror = format!("{url}-mirror");
    let out = ok(ze(&b.path, &env).args(["push", "main@s2", &mirror, "--from", "team"]));
    assert!(out.contains("(main@s2)"), "{out}");
    let listed = ok(ze(&b.path, &env).args(["snapshot", "list", "--storage", &mirror]));
    assert!(
        listed.contains("main@s2") && !listed.contains("main@s1"),
        "{listed}"
    );
    let out = ok(ze(&b.path, &env).args(["snapshot", "verify", "main@s2", "--storage", &mirror]));
    assert!(out.contains("intact"), "{out}");

    // Without credentials: one line, nothing pulled.
    let mut bare = z(&b.path);
    bare.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_ENDPOINT_URL", &env[0].1)
        .env("AWS_REGION", &env[1].1);
    assert_clean_failure(&run(bare.args(["pull", "team", "main@s1"])), "credentials");
    ok(z(&a.path).arg("stop"));
    ok(z(&b.path).arg("stop"));
}

#[test]
fn push_to_s3s_fs_and_pull_into_another_repo() {
    let Some(server) = crate::support::require("s3s-fs", S3Server::s3s_fs()) else {
        return;
    };
    if TestRepo::new().is_none() {
        return;
    }
    push_and_pull_through(&server);
}

#[test]
fn push_to_garage_and_pull_into_another_repo() {
    let Some(server) = crate::support::require("Garage", S3Server::garage(3)) else {
        return;
    };
    if TestRepo::new().is_none() {
        return;
    }
    push_and_pull_through(&server);
}

#[test]
fn a_new_machine_with_only_the_old_config_comes_back_from_storage_dest() {
    let Some(a) = TestRepo::new() else {
        return;
    };
    let b = TestRepo::new().unwrap();
    let c = TestRepo::new().unwrap();
    let dest = a.path.with_file_name("dest");
    let url = format!("file://{}", dest.display());
    ok(z(&a.path).args(["init", "--storage_dest", &url]));
    // Without a safekeeper, the last push and the WAL archived whole are what a lost
    // machine has (the safekeeper's tests cover streamed WAL).
    crate::safekeeper::set_safekeeper(&a.path, "off", "10s");
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    fill(&main, 10_000);
    ok(z(&a.path).args(["snapshot", "create", "main@pushed"]));
    let out = ok(z(&a.path).arg("push"));
    assert!(out.contains("(main@pushed)"), "{out}");
    let pushed = fingerprint(&main);
    psql(&main, "insert into t values (-1, 'after the push')");

    // The machine dies: zenith-local and its postgres killed outright.
    let local: i32 = std::fs::read_to_string(a.path.join("zenith-local.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let postmaster = postmaster_pid(&a.path, "main");
    unsafe {
        libc::kill(local, libc::SIGKILL);
        libc::kill(postmaster, libc::SIGKILL);
    }
    eventually("the killed processes are still there", || {
        processes_mentioning(&a.path).is_empty()
    });

    // A new machine: a repo directory holding only the old config.toml.
    std::fs::create_dir_all(&b.path).unwrap();
    std::fs::copy(a.path.join("config.toml"), b.path.join("config.toml")).unwrap();
    let out = ok(z(&b.path).arg("start"));
    assert!(out.contains("restored pg main from snapshot"), "{out}");
    let back = connstr_of(&b.path, "main");
    assert_eq!(fingerprint(&back), pushed);
    assert_eq!(status(&b.path)["storage_dest"], url.as_str());
    // The same cluster: pushing from the new machine is welcome.
    ok(z(&b.path).args(["snapshot", "create", "main@from-b"]));
    let out = ok(z(&b.path).arg("push"));
    assert!(out.contains("(main@from-b)"), "{out}");

    // Retention: unnamed snapshots beyond the newest one go, named ones stay; a dry run
    // only lists.
    ok(z(&b.path).args(["snapshot", "create"]));
    ok(z(&b.path).args(["snapshot", "create"]));
    ok(z(&b.path).arg("push"));
    let before = std::fs::read_dir(dest.join("snapshots")).unwrap().count();
    let out = ok(z(&b.path).args(["snapshot", "prune", "--keep-last", "1", "--dry-run"]));
    assert!(out.contains("1 snapshot(s) would delete"), "{out}");
    assert_eq!(
        std::fs::read_dir(dest.join("snapshots")).unwrap().count(),
        before
    );
    let out = ok(z(&b.path).args([
        "snapshot",
        "prune",
        "--keep-within",
        "1d",
        "--keep-last",
        "0",
    ]));
    assert!(out.contains("0 snapshot(s) deleted"), "{out}");
    let out = ok(z(&b.path).args(["snapshot", "prune", "--keep-last", "1"]));
    assert!(out.contains("1 snapshot(s) deleted"), "{out}");
    let left = ok(z(&b.path).args(["snapshot", "list", "--storage", &url]));
    assert!(
        left.contains("main@pushed") && left.contains("main@from-b"),
        "{left}"
    );

    // Another cluster is never pushed into this storage_dest; unknown storages are named.
    let listed = std::fs::read_dir(dest.join("snapshots")).unwrap().count();
    ok(z(&c.path).arg("init"));
    ok(z(&c.path).args(["storage", "attach", "-n", "storage_dest", "--path", &url]));
    ok(z(&c.path).args(["snapshot", "create", "main@other"]));
    assert_clean_failure(
        &run(z(&c.path).arg("push")),
        "holds snapshots of another cluster",
    );
    assert_eq!(
        std::fs::read_dir(dest.join("snapshots")).unwrap().count(),
        listed
    );
    assert_clean_failure(
        &run(z(&c.path).args(["push", "main@other", "nope"])),
        "no storage named \"nope\"",
    );
    assert_clean_failure(
        &run(z(&c.path).args(["storage", "attach", "-n", "storage_dest", "--path", "/x"])),
        "attached already",
    );
    ok(z(&b.path).arg("stop"));
    ok(z(&a.path).arg("stop"));
}

#[test]
fn background_pushes_follow_writes_and_ride_out_a_storage_outage() {
    let Some(a) = TestRepo::new() else {
        return;
    };
    let b = TestRepo::new().unwrap();
    // storage_dest below a regular file: unusable until the file goes.
    let blocker = a.path.with_file_name("blocker");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "x").unwrap();
    let url = format!("file://{}/dest", blocker.display());
    ok(z(&a.path).args(["init", "--storage_dest", &url]));
    let config = a.path.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("interval = \"5m\""), "{text}");
    std::fs::write(
        &config,
        text.replace("interval = \"5m\"", "interval = \"1s\""),
    )
    .unwrap();
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    fill(&main, 1_000);

    // Down: reported, retried, and the database keeps taking writes.
    eventually("a failing push is not shown in status", || {
        status(&a.path)["push"]["failures"].as_u64().unwrap_or(0) >= 1
    });
    let shown = ok(z(&a.path).arg("status"));
    assert!(shown.contains("FAILING"), "{shown}");
    psql(
        &main,
        "insert into t values (-1, 'written while the storage was down')",
    );
    // Back: the next attempt succeeds.
    std::fs::remove_file(&blocker).unwrap();
    eventually("pushes did not recover", || {
        let s = status(&a.path);
        s["push"]["last_error"].is_null() && s["push"]["last_pushed"].is_string()
    });

    // Rows written while pushes run are in a later snapshot; the last push runs at stop.
    let first = status(&a.path)["push"]["last_pushed"].clone();
    for n in 0..20 {
        psql(
            &main,
            &format!("insert into t values ({}, 'during')", 100_000 + n),
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eventually("no new snapshot was pushed after writes", || {
        status(&a.path)["push"]["last_pushed"] != first
    });
    psql(&main, "insert into t values (-2, 'just before stop')");
    let expected = fingerprint(&main);
    ok(z(&a.path).arg("stop"));
    let log = std::fs::read_to_string(a.path.join("logs/zenith-local.log")).unwrap();
    assert!(log.contains("pushing to"), "{log}");

    std::fs::create_dir_all(&b.path).unwrap();
    std::fs::copy(&config, b.path.join("config.toml")).unwrap();
    let out = ok(z(&b.path).arg("start"));
    assert!(out.contains("restored pg main"), "{out}");
    assert_eq!(fingerprint(&connstr_of(&b.path, "main")), expected);
    ok(z(&b.path).arg("stop"));
}

#[test]
fn a_storage_dest_set_while_running_is_pushed_to_and_wal_volume_brings_pushes_forward() {
    let Some(a) = TestRepo::new() else {
        return;
    };
    ok(z(&a.path).arg("init"));
    // An hour between pushes: within the test, only WAL volume can bring one on.
    let config = a.path.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("wal = \"1GB\""), "{text}");
    let text = text
        .replace("interval = \"5m\"", "interval = \"1h\"")
        .replace("wal = \"1GB\"", "wal = \"48MB\"");
    std::fs::write(&config, text).unwrap();
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    fill(&main, 1_000);

    // storage_dest attached while zenith-local runs: no restart needed.
    let dest = a.path.with_file_name("dest");
    let url = format!("file://{}", dest.display());
    ok(z(&a.path).args(["storage", "attach", "-n", "storage_dest", "--path", &url]));
    eventually("pushes did not follow the new storage_dest", || {
        status(&a.path)["push"]["storage_dest"] == url.as_str()
    });
    // Some WAL, well under the volume: nothing is pushed.
    psql(
        &main,
        "insert into t select g, md5(g::text) from generate_series(1, 20000) g",
    );
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert!(status(&a.path)["push"]["last_pushed"].is_null());
    // Over 48 MB of WAL: a push comes long before the hour is over.
    psql(
        &main,
        "insert into t select g, repeat(md5(g::text), 8) from generate_series(1, 200000) g",
    );
    eventually("WAL volume did not bring a push forward", || {
        status(&a.path)["push"]["last_pushed"].is_string()
    });
    let log = std::fs::read_to_string(a.path.join("logs/zenith-local.log")).unwrap();
    assert!(log.contains("more WAL than [push] wal"), "{log}");
    let listed: serde_json::Value = serde_json::from_str(&ok(z(&a.path).args([
        "snapshot",
        "list",
        "--storage",
        "storage_dest",
        "--json",
    ])))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Detached, pushes stop (status no longer shows them), and `stop` pushes nothing.
    ok(z(&a.path).args(["storage", "detach", "-n", "storage_dest"]));
    eventually("pushes did not stop with storage_dest gone", || {
        status(&a.path)["push"].is_null()
    });
    ok(z(&a.path).arg("stop"));
    let listed: serde_json::Value = serde_json::from_str(&ok(z(&a.path).args([
        "snapshot",
        "list",
        "--storage",
        &url,
        "--json",
    ])))
    .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
}

/// How a push is cut short.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// zenith itself is killed.
    KillZenith,
    /// Two of the three Garage nodes die (no write quorum); they come back afterwards.
    StopGarageNodes,
}

#[test]
fn a_push_cut_short_lists_nothing_and_the_rerun_sends_only_the_rest() {
    cut_then_resume(Cut::KillZenith);
}

#[test]
fn a_push_that_loses_garage_nodes_fails_and_the_rerun_sends_only_the_rest() {
    cut_then_resume(Cut::StopGarageNodes);
}

fn cut_then_resume(how: Cut) {
    let Some(server) = crate::support::require("Garage", S3Server::garage(3)) else {
        return;
    };
    let Some(a) = TestRepo::new() else {
        return;
    };
    let mut env = server.env();
    // A dead cluster fails the push after a few quick attempts.
    env.push(("ZENITH_RETRY_ATTEMPTS", "3".into()));
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    // Incompressible rows: a push long enough to cut.
    psql(
        &main,
        "create table t (i int, pad bytea); \
         insert into t select g, decode(string_agg(md5(random()::text || g || j), ''), 'hex') \
         from generate_series(1, 40000) g, generate_series(1, 40) j group by g",
    );
    ok(z(&a.path).args(["snapshot", "create", "main@big"]));
    let prefix = format!("cut/{}", fastrand::u32(..));
    let url = server.url(&prefix);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let storage = runtime.block_on(server.storage(&prefix));
    use zenith::storage::Storage;
    // Listing waits for the cluster to be whole again after a node restart.
    let count = |prefix: &str| {
        for _ in 0..300 {
            if let Ok(listed) = runtime.block_on(storage.list(prefix)) {
                return listed.len();
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        panic!("the Garage cluster does not list {prefix} after 60 s");
    };

    // Killed as soon as the first pack has arrived; tried again if the push won the race.
    let mut caught = false;
    for _ in 0..5 {
        let mut child = ze(&a.path, &env)
            .args(["push", "main@big", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while child.try_wait().unwrap().is_none() && count("packs/") == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let finished = match how {
            Cut::KillZenith => {
                let _ = child.kill();
                child.wait().unwrap().success()
            }
            Cut::StopGarageNodes => {
                server.kill_garage_node(2);
                server.kill_garage_node(3);
                let finished = child.wait().unwrap().success();
                server.restart_garage_node(2);
                server.restart_garage_node(3);
                finished
            }
        };
        if !finished && count("snapshots/") == 0 {
            caught = true;
            break;
        }
        for o in runtime.block_on(storage.list("")).unwrap() {
            runtime.block_on(storage.delete(&o.key)).unwrap();
        }
    }
    assert!(caught, "no push was caught midway");
    // Nothing half-done is listed.
    let listed = ok(ze(&a.path, &env).args(["snapshot", "list", "--storage", &url]));
    assert!(listed.contains("no snapshots"), "{listed}");
    let packs_before = count("packs/");
    let out = ok(ze(&a.path, &env).args(["push", "main@big", &url]));
    let skipped: u64 = out
        .lines()
        .next()
        .unwrap_or("")
        .split(", ")
        .find_map(|p| p.strip_suffix(" objects already there"))
        .and_then(|n| n.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        skipped >= packs_before as u64,
        "the rerun re-sent objects that had arrived ({skipped} skipped, {packs_before} packs were there):\n{out}"
    );
    let listed = ok(ze(&a.path, &env).args(["snapshot", "list", "--storage", &url]));
    assert!(listed.contains("main@big"), "{listed}");
    let b = TestRepo::new().unwrap();
    ok(z(&b.path).arg("init"));
    ok(ze(&b.path, &env).args(["pull", &url, "main@big"]));
    ok(z(&b.path).args(["pg", "create", "copy", "--snapshot", "main@big"]));
    assert_eq!(
        psql(
            &connstr_of(&b.path, "copy"),
            "select md5(string_agg(pad::text, '' order by i)) from t"
        ),
        psql(
            &main,
            "select md5(string_agg(pad::text, '' order by i)) from t"
        )
    );
    ok(z(&a.path).arg("stop"));
    ok(z(&b.path).arg("stop"));
}

#[test]
fn init_starts_from_an_existing_pgdata_and_a_pg_basebackup() {
    let Some(source) = TestRepo::new() else {
        return;
    };
    ok(z(&source.path).arg("start"));
    let main = connstr_of(&source.path, "main");
    fill(&main, 5_000);
    let expected = fingerprint(&main);
    // pg_basebackup -Ft -Xs of the running server.
    let install = zenith::compute::find_postgres().unwrap();
    let tar_dir = source.path.with_file_name("basebackup");
    let out = Command::new(install.bin("pg_basebackup"))
        .args(["-d", &main, "-Ft", "-Xs", "-c", "fast", "-D"])
        .arg(&tar_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(z(&source.path).arg("stop"));
    let pgdata = source.path.join("pgs/main/data");

    for (format, path) in [("pgdata", pgdata.clone()), ("basebackup", tar_dir.clone())] {
        let repo = TestRepo::new().unwrap();
        let out = ok(z(&repo.path).args([
            "init",
            "--snapshot_path",
            path.to_str().unwrap(),
            "--snapshot_format",
            format,
        ]));
        assert!(out.contains("pg main starts from snapshot"), "{out}");
        ok(z(&repo.path).arg("start"));
        assert_eq!(
            fingerprint(&connstr_of(&repo.path, "main")),
            expected,
            "{format}"
        );
        ok(z(&repo.path).arg("stop"));
    }
    // A snapshot_path that holds nothing: one line, no repo left behind.
    let repo = TestRepo::new().unwrap();
    let empty = repo.path.with_file_name("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_failure(
        &run(z(&repo.path).args([
            "init",
            "--snapshot_path",
            empty.to_str().unwrap(),
            "--snapshot_format",
            "basebackup",
        ])),
        "holds no base.tar",
    );
    assert!(!repo.path.join("config.toml").exists());
}
