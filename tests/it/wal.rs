//! The WAL archive, for real: stock PostgreSQL archiving with `zenith wal-push` to s3s-fs
//! and Garage and recovering with `zenith wal-fetch` (every committed row back; a damaged
//! or missing segment stops recovery instead of ending it early), and zenith's own pgs:
//! point-in-time restore, a lost machine that comes back with every archived commit, and
//! branches, promotions and checkouts that archive side by side without colliding.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkout_faults::fill;
use crate::local::{connstr_of, eventually, ok, psql, rows, status, z, TestRepo};
use crate::support::pg::{as_pg, pg_tempdir, PgCluster};
use crate::support::s3::S3Server;
use crate::support::{assert_clean_failure, require, run};

/// The zenith binary where PostgreSQL's account can run it (not under root's home).
fn reachable_zenith(dir: &Path) -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_zenith"));
    let link = dir.join("zenith");
    if std::fs::hard_link(&exe, &link).is_err() {
        std::fs::copy(&exe, &link).unwrap();
    }
    link
}

/// A shell prefix that gives a command the server's credentials.
fn env_prefix(server: &S3Server) -> String {
    server
        .env()
        .iter()
        .map(|(k, v)| format!("{k}={v} "))
        .collect()
}

/// Appends settings to a cluster's postgresql.conf.
fn configure(pg: &PgCluster, lines: &[String]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(pg.data.join("postgresql.conf"))
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// Waits until the server has archived everything up to now (a segment switch).
fn archive_now(pg: &PgCluster) -> String {
    let segment = pg.sql("select pg_walfile_name(pg_switch_wal())");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = pg.sql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
        if last.as_str() >= segment.as_str() {
            return segment;
        }
        assert!(
            Instant::now() < deadline,
            "{segment} not archived: {}",
            pg.sql("select * from pg_stat_archiver")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A copy of `backup` (a base backup without WAL) set up to recover from the archive.
fn recovering_copy(backup: &Path, restore_command: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = pg_tempdir();
    let data = dir.path().join("data");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(backup)
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    conf.push_str(&format!(
        "\narchive_mode = off\nrestore_command = '{restore_command}'\nrecovery_target_action = 'promote'\n"
    ));
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    zenith::compute::hand_to_postgres_user(dir.path()).unwrap();
    (dir, data)
}

/// Starts a recovering cluster and waits for its recovery to end: `Ok` once it runs as a
/// primary, `Err(log)` when the server stopped instead.
fn recover(install: &zenith::compute::PgInstall, data: &Path) -> Result<PgCluster, String> {
    let mut pg = PgCluster::at(install, data);
    let log = pg.dir.path().join("log");
    let port = crate::support::free_port();
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1",
        pg.dir.path().display()
    );
    // pg_ctl -w returns once the server accepts connections or has stopped.
    let _ = as_pg(install, "pg_ctl")
        .args(["-w", "-t", "120", "-D"])
        .arg(data)
        .args(["-o", &opts, "-l"])
        .arg(&log)
        .arg("start")
        .output()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = data.join("postmaster.pid").exists();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if !running {
            return Err(text);
        }
        if text.contains("database system is ready to accept connections") {
            pg.port = port;
            pg.adopt_running();
            return Ok(pg);
        }
        assert!(Instant::now() < deadline, "recovery did not end: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stock PostgreSQL archives through `zenith wal-push` and recovers through `zenith
/// wal-fetch`: every committed row comes back; damage and gaps stop recovery.
fn stock_postgresql_round_trip(server: &S3Server, damage: bool) {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    let zenith = reachable_zenith(pg.dir.path());
    let url = server.url(&format!("stock-{:x}", fastrand::u64(..)));
    let creds = env_prefix(server);
    configure(
        &pg,
        &[
            "archive_mode = on".into(),
            format!(
                "archive_command = '{creds}{} wal-push --storage {url} %p'",
                zenith.display()
            ),
            "wal_level = replica".into(),
        ],
    );
    pg.start();
    pg.sql("create table t (i int)");
    pg.sql("insert into t select generate_series(1, 1000)");
    archive_now(&pg);
    // A base backup without WAL: recovery needs the archive for all of it.
    let backup = pg.dir.path().join("backup");
    pg.client(
        "pg_basebackup",
        &[
            "-D",
            &backup.display().to_string(),
            "-X",
            "none",
            "-c",
            "fast",
        ],
    );
    for batch in 0..4 {
        pg.sql(&format!(
            "insert into t select generate_series({}, {})",
            1001 + batch * 1000,
            2000 + batch * 1000
        ));
        archive_now(&pg);
    }
    let last = archive_now(&pg);
    let expected = pg.sql("select count(*), sum(i) from t");
    assert_eq!(pg.sql("select failed_count from pg_stat_archiver"), "0");
    pg.stop();

    let restore = format!(
        "{creds}{} wal-fetch --storage {url} %f %p",
        zenith.display()
    );
    let (_copy, data) = recovering_copy(&backup, &restore);
    let recovered =
        recover(&pg.install, &data).unwrap_or_else(|log| panic!("recovery failed:\n{log}"));
    assert_eq!(recovered.sql("select count(*), sum(i) from t"), expected);
    drop(recovered);

    if !damage {
        return;
    }
    // The segments of the base backup and after, as the archive holds them.
    let storage_prefix = url.trim_start_matches(&format!("s3://{}/", server.bucket));
    let sysid = pg_sysid(&pg.data);
    let object = |segment: &str| {
        server.s3s_fs_object(&format!(
            "{storage_prefix}/wal/{sysid}/default/{segment}.zst"
        ))
    };
    let middle = {
        // A segment after the base backup and before the last.
        let n = u64::from_str_radix(&last[16..], 16).unwrap() - 2;
        format!("{}{:08X}", &last[..16], n)
    };
    assert!(object(&middle).exists(), "{:?}", object(&middle));

    // A flipped byte: recovery stops and names the segment.
    let original = std::fs::read(object(&middle)).unwrap();
    let mut flipped = original.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x55;
    std::fs::write(object(&middle), &flipped).unwrap();
    let (_copy, data) = recovering_copy(&backup, &restore);
    let log = match recover(&pg.install, &data) {
        Ok(pg) => panic!(
            "recovery ended as if nothing were wrong, with {}",
            pg.sql("select count(*) from t")
        ),
        Err(log) => log,
    };
    assert!(
        log.contains(&middle),
        "the log does not name {middle}:\n{log}"
    );
    assert!(log.contains("corrupt"), "{log}");

    // A missing segment with later ones archived: a gap, not the end of the archive.
    std::fs::remove_file(object(&middle)).unwrap();
    let (_copy, data) = recovering_copy(&backup, &restore);
    let log = match recover(&pg.install, &data) {
        Ok(pg) => panic!(
            "recovery ended early, with {}",
            pg.sql("select count(*) from t")
        ),
        Err(log) => log,
    };
    assert!(log.contains(&middle) && log.contains("missing"), "{log}");
}

fn pg_sysid(data: &Path) -> u64 {
    zenith::snapshot::datadir::read_control(data)
        .unwrap()
        .system_identifier
}

#[test]
fn stock_postgresql_archives_to_s3s_fs_and_recovers_and_damage_stops_recovery() {
    let Some(server) = require("s3s-fs", S3Server::s3s_fs()) else {
        return;
    };
    stock_postgresql_round_trip(&server, true);
}

#[test]
fn stock_postgresql_archives_to_garage_and_recovers() {
    let Some(server) = require("Garage", S3Server::garage(3)) else {
        return;
    };
    stock_postgresql_round_trip(&server, false);
}

#[test]
fn wal_push_and_fetch_say_what_is_wrong() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    let segment = pg.sql("select pg_walfile_name(pg_current_wal_lsn())");
    pg.stop();
    let store = pg.dir.path().join("archive");
    let url = format!("file://{}", store.display());
    let zenith = || {
        let mut c = crate::support::zenith();
        c.current_dir(&pg.data);
        c
    };
    let wal = pg.data.join("pg_wal").join(&segment);
    ok(zenith().args(["wal-push", "--storage", &url]).arg(&wal));
    // Identical again: fine. Different content under the same name: refused.
    ok(zenith().args(["wal-push", "--storage", &url]).arg(&wal));
    let other = pg.dir.path().join(&segment);
    let mut bytes = std::fs::read(&wal).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 1;
    std::fs::write(&other, bytes).unwrap();
    let out = run(zenith().args(["wal-push", "--storage", &url]).arg(&other));
    assert_clean_failure(&out, "different content");
    // Not a WAL file; no storage.
    let junk = pg.dir.path().join("junk");
    std::fs::write(&junk, "x").unwrap();
    assert_clean_failure(
        &run(zenith().args(["wal-push", "--storage", &url]).arg(&junk)),
        "not a WAL file name",
    );
    assert_clean_failure(&run(zenith().arg("wal-push").arg(&wal)), "--storage");

    // wal-fetch: 0 with the file in place, 1 for what the archive does not have, 255 for
    // anything else.
    let dest = pg.dir.path().join("RECOVERYXLOG");
    let out = run(zenith()
        .args(["wal-fetch", "--prefetch", "0", "--storage", &url, &segment])
        .arg(&dest));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&wal).unwrap());
    let out = run(zenith()
        .args(["wal-fetch", "--storage", &url, "000000010000000000000099"])
        .arg(&dest));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = run(zenith()
        .args(["wal-fetch", "--storage", &url, "../etc/passwd"])
        .arg(&dest));
    assert_eq!(out.status.code(), Some(255), "{out:?}");
    let out = run(zenith()
        .args(["wal-fetch", "--storage", "s3://bucket/x", &segment])
        .arg(&dest)
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", crate::support::free_port()),
        )
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("AWS_REGION", "us-east-1")
        .env("ZENITH_RETRY_ATTEMPTS", "1"));
    assert_eq!(out.status.code(), Some(255), "{out:?}");
}

/// `psql`'s clock right now, as the server sees it (microseconds, UTC).
fn server_now(connstr: &str) -> String {
    psql(
        connstr,
        "select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    )
}

/// A repo archiving to a storage_dest on this machine.
fn archiving_repo() -> Option<(TestRepo, String)> {
    let repo = TestRepo::new()?;
    let url = init_archiving(&repo.path);
    ok(z(&repo.path).arg("start"));
    Some((repo, url))
}

/// Makes a repo at `repo` (not started) whose storage_dest is a directory beside it, with
/// background pushes only when a test asks; the storage's URL.
pub(crate) fn init_archiving(repo: &Path) -> String {
    let dest = repo.with_file_name("dest");
    let url = format!("file://{}", dest.display());
    ok(z(repo).args(["init", "--storage_dest", &url]));
    let config = repo.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("interval = \"5m\""), "{text}");
    std::fs::write(
        &config,
        text.replace("interval = \"5m\"", "interval = \"0\""),
    )
    .unwrap();
    url
}

#[test]
fn point_in_time_restore_holds_exactly_what_was_committed_before() {
    let Some((repo, _url)) = archiving_repo() else {
        return;
    };
    let main = connstr_of(&repo.path, "main");
    psql(&main, "create table t (i int); insert into t values (1)");
    ok(z(&repo.path).args(["snapshot", "create", "main@base"]));
    // Batches with the time (and WAL position) recorded between them.
    psql(&main, "insert into t values (2)");
    std::thread::sleep(Duration::from_millis(50));
    let after_2 = server_now(&main);
    std::thread::sleep(Duration::from_millis(50));
    psql(&main, "insert into t values (3)");
    let after_3 = psql(&main, "select pg_current_wal_lsn()");
    psql(&main, "insert into t values (4)");

    let out = ok(z(&repo.path).args(["pg", "create", "at2", "--at", &after_2]));
    assert!(out.contains("as pg main was at"), "{out}");
    assert_eq!(rows(&connstr_of(&repo.path, "at2")), "{1,2}");
    ok(z(&repo.path).args(["pg", "create", "at3", "--at", &after_3]));
    assert_eq!(rows(&connstr_of(&repo.path, "at3")), "{1,2,3}");
    // The restored pgs are primaries that take writes and archive on their own.
    let at2 = connstr_of(&repo.path, "at2");
    psql(&at2, "insert into t values (20)");
    // A recovery PostgreSQL finished while nobody recorded it (zenith-local killed at
    // that moment): the next start records it and does not replay to the target again.
    ok(z(&repo.path).args(["pg", "stop", "at2"]));
    let node = repo.path.join("pgs/at2/node.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&node).unwrap()).unwrap();
    let history = state["wal"]["history"].clone();
    state["recovery"] =
        serde_json::json!({ "source": "0123456789abcdef", "target": { "time": after_2 } });
    state["wal"] = serde_json::json!({ "history": history });
    std::fs::write(&node, serde_json::to_vec(&state).unwrap()).unwrap();
    ok(z(&repo.path).args(["pg", "start", "at2"]));
    assert_eq!(rows(&at2), "{1,2,20}");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(&node).unwrap()).unwrap();
    assert!(state["recovery"].is_null(), "{state}");
    assert_eq!(state["wal"]["history"], history);

    // Before the first snapshot, or beyond what was archived: refused, with the range.
    let out = run(z(&repo.path).args(["pg", "create", "early", "--at", "2001-01-01 00:00:00"]));
    let err = assert_clean_failure(&out, "before the first snapshot");
    assert!(err.contains("the archive reaches from"), "{err}");
    let out = run(z(&repo.path).args(["pg", "create", "late", "--at", "2999-01-01 00:00:00"]));
    assert_clean_failure(&out, "beyond the WAL archived");
    assert!(!repo.path.join("pgs/early").exists() && !repo.path.join("pgs/late").exists());

    // main itself, there and back: nothing is lost.
    let out = ok(z(&repo.path).args(["pg", "checkout", "main", "--at", &after_2]));
    assert!(out.contains("kept its previous state"), "{out}");
    assert_eq!(rows(&main), "{1,2}");
    psql(&main, "insert into t values (5)");
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@HEAD{0}"]));
    assert_eq!(rows(&main), "{1,2,3,4}");

    // Every history archived so far is whole.
    let verified = ok(z(&repo.path).args(["wal", "verify"]));
    assert!(!verified.contains("GAP"), "{verified}");
    assert!(verified.matches("history ").count() >= 4, "{verified}");
    ok(z(&repo.path).arg("stop"));
}

#[test]
fn a_lost_machine_comes_back_with_every_archived_commit() {
    let Some((repo, url)) = archiving_repo() else {
        return;
    };
    let main = connstr_of(&repo.path, "main");
    let sysid = pg_sysid(&repo.path.join("pgs/main/data")).to_string();
    fill(&main, "big", 20);
    psql(&main, "create table t (i int); insert into t values (1)");
    ok(z(&repo.path).args(["snapshot", "create"]));
    ok(z(&repo.path).args(["--no-progress", "push"]));
    // Written after the last snapshot, archived (a segment switch), never snapshotted.
    psql(&main, "insert into t values (2), (3)");
    let segment = psql(&main, "select pg_walfile_name(pg_switch_wal())");
    eventually("the segment archived", || {
        psql(
            &main,
            &format!("select last_archived_wal >= '{segment}' from pg_stat_archiver"),
        ) == "t"
    });
    assert_eq!(status(&repo.path)["wal"]["failed_count"], 0);
    let s = status(&repo.path);
    assert!(s["wal"]["last_archived"].is_string(), "{s}");
    // The machine is lost: zenith-local and every postgres die at once.
    let pid: i32 = std::fs::read_to_string(repo.path.join("zenith-local.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let postmaster = crate::local::postmaster_pid(&repo.path, "main");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::kill(postmaster, libc::SIGKILL);
    }
    let config = std::fs::read_to_string(repo.path.join("config.toml")).unwrap();
    let other = TestRepo::at(repo.path.with_file_name("new-machine"));
    std::fs::create_dir_all(&other.path).unwrap();
    std::fs::write(other.path.join("config.toml"), config).unwrap();
    let out = ok(z(&other.path).arg("start"));
    assert!(out.contains("replayed the WAL archived after it"), "{out}");
    let back = connstr_of(&other.path, "main");
    assert_eq!(rows(&back), "{1,2,3}");
    assert_eq!(psql(&back, "select count(*) > 0 from big"), "t");

    // Retention: the WAL older than every kept snapshot of a history goes with them.
    let segments = |history: &str| {
        std::fs::read_dir(url_path(&url).join("wal").join(&sysid).join(history))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let history = status(&other.path)["wal"]["history"]
        .as_str()
        .unwrap()
        .to_string();
    ok(z(&other.path).args(["snapshot", "create"]));
    for _ in 0..3 {
        psql(&back, "insert into big select * from big limit 20000");
        psql(&back, "select pg_switch_wal()");
    }
    ok(z(&other.path).args(["snapshot", "create"]));
    ok(z(&other.path).args(["--no-progress", "push"]));
    eventually("the new history's segments archived", || {
        segments(&history) > 3
    });
    let before = segments(&history);
    let pruned = ok(z(&other.path).args(["snapshot", "prune", "--keep-last", "1"]));
    assert!(pruned.contains("deleted"), "{pruned}");
    assert!(
        segments(&history) < before,
        "{before} files before, as many after"
    );
    let verified = ok(z(&other.path).args(["wal", "verify"]));
    assert!(!verified.contains("GAP"), "{verified}");
    ok(z(&other.path).arg("stop"));
}

fn url_path(url: &str) -> PathBuf {
    PathBuf::from(url.trim_start_matches("file://"))
}

#[test]
fn branches_promotions_and_checkouts_archive_side_by_side() {
    let Some((repo, url)) = archiving_repo() else {
        return;
    };
    let main = connstr_of(&repo.path, "main");
    psql(&main, "create table t (i int); insert into t values (1)");
    ok(z(&repo.path).args(["snapshot", "create", "main@one"]));
    psql(&main, "insert into t values (2)");
    // A branch and a promoted replica write their own WAL...
    ok(z(&repo.path).args(["pg", "create", "b1", "--snapshot", "main@one"]));
    ok(z(&repo.path).args(["pg", "create", "r1", "--no-start"]));
    ok(z(&repo.path).args(["pg", "start", "r1", "--replica"]));
    eventually("r1 caught up", || {
        rows(&connstr_of(&repo.path, "r1")) == "{1,2}"
    });
    ok(z(&repo.path).args(["pg", "promote", "r1"]));
    // ... and main, rolled back, writes the same timeline's segment names again.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@one"]));
    for (pg, value) in [("main", 10), ("b1", 11), ("r1", 12)] {
        let c = connstr_of(&repo.path, pg);
        psql(&c, &format!("insert into t values ({value})"));
        psql(&c, "select pg_switch_wal()");
    }
    for pg in ["main", "b1", "r1"] {
        let c = connstr_of(&repo.path, pg);
        eventually(&format!("{pg} archived its segment"), || {
            psql(
                &c,
                "select last_archived_wal is not null from pg_stat_archiver",
            ) == "t"
        });
        assert_eq!(
            psql(&c, "select failed_count from pg_stat_archiver"),
            "0",
            "{pg}: {}",
            psql(&c, "select * from pg_stat_archiver")
        );
    }
    let verified = ok(z(&repo.path).args(["wal", "verify", "--storage", &url]));
    assert!(!verified.contains("GAP"), "{verified}");
    for pg in ["main", "b1", "r1"] {
        assert!(verified.contains(&format!("of pg {pg}")), "{verified}");
    }
    // Each restores to its own rows.
    let r1_at = server_now(&connstr_of(&repo.path, "r1"));
    ok(z(&repo.path).args(["pg", "create", "r1-again", "--from", "r1", "--at", &r1_at]));
    assert_eq!(rows(&connstr_of(&repo.path, "r1-again")), "{1,2,12}");
    ok(z(&repo.path).arg("stop"));
}

#[test]
fn a_lost_machine_after_a_checkout_comes_back_as_main_was_last() {
    let Some((repo, _url)) = archiving_repo() else {
        return;
    };
    let main = connstr_of(&repo.path, "main");
    psql(&main, "create table t (i int); insert into t values (1)");
    ok(z(&repo.path).args(["snapshot", "create", "main@one"]));
    psql(&main, "insert into t values (2)");
    ok(z(&repo.path).args(["snapshot", "create"]));
    // Rolled back: the state it left (main@HEAD{0}, rows 1 and 2) is the newest snapshot
    // of main, but not what main is now.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@one"]));
    psql(&main, "insert into t values (3)");
    ok(z(&repo.path).args(["--no-progress", "push"]));
    let segment = psql(&main, "select pg_walfile_name(pg_switch_wal())");
    eventually("the segment archived", || {
        psql(
            &main,
            &format!("select last_archived_wal >= '{segment}' from pg_stat_archiver"),
        ) == "t"
    });
    let pid: i32 = std::fs::read_to_string(repo.path.join("zenith-local.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let postmaster = crate::local::postmaster_pid(&repo.path, "main");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::kill(postmaster, libc::SIGKILL);
    }
    let config = std::fs::read_to_string(repo.path.join("config.toml")).unwrap();
    let other = TestRepo::at(repo.path.with_file_name("new-machine"));
    std::fs::create_dir_all(&other.path).unwrap();
    std::fs::write(other.path.join("config.toml"), config).unwrap();
    let out = ok(z(&other.path).arg("start"));
    assert!(out.contains("replayed the WAL archived after it"), "{out}");
    assert_eq!(rows(&connstr_of(&other.path, "main")), "{1,3}");
    ok(z(&other.path).arg("stop"));
}
