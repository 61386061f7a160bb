//! The safekeeper, for real: zenith-local runs it beside the main pg, it streams the WAL
//! to storage_dest over the replication protocol, and in sync mode a commit returns only
//! once its WAL is stored: paused, it holds commits (until the fallback lets them go),
//! killed, it comes back where it left off, and on a lost machine every acknowledged
//! commit is back from Garage.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::local::{
    connstr_of, eventually, ok, postmaster_pid, processes_mentioning, psql, status, z, TestRepo,
};
use crate::support::s3::S3Server;

/// Sets `[safekeeper]` of a repo's config.toml.
pub(crate) fn set_safekeeper(repo: &Path, mode: &str, fallback_after: &str) {
    let config = repo.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let at = text
        .find("[safekeeper]")
        .expect("config.toml has [safekeeper]");
    let end = text[at + 1..]
        .find("\n[")
        .map(|i| at + 1 + i)
        .unwrap_or(text.len());
    let section =
        format!("[safekeeper]\nmode = \"{mode}\"\nfallback_after = \"{fallback_after}\"\n");
    std::fs::write(&config, format!("{}{section}{}", &text[..at], &text[end..])).unwrap();
}

/// What the safekeeper reports of itself (pid, history, flushed position).
fn report(repo: &Path) -> serde_json::Value {
    std::fs::read(repo.join("pgs/main/safekeeper.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn safekeeper_pid(repo: &Path) -> i32 {
    report(repo)["pid"].as_i64().expect("a safekeeper report") as i32
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: a signal to a process of this test's repo.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Waits until commits wait for the safekeeper.
fn until_commits_wait(repo: &Path) {
    eventually("commits waiting for the safekeeper", || {
        status(repo)["safekeeper"]["commits_wait"] == true
    });
}

/// An insert in its own psql process.
fn insert_in_background(connstr: &str, value: i64) -> std::process::Child {
    let install = zenith::compute::find_postgres().unwrap();
    std::process::Command::new(install.bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", connstr, "-c"])
        .arg(format!("insert into t values ({value})"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for a child that must end within a minute; whether it succeeded.
fn finishes(child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the insert did not return within a minute");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The segment (timeline 1) holding `lsn` as streamed to storage `url`: its name, and
/// its bytes as a restore reads them from the pieces (`None` without pieces).
fn streamed_segment(url: &str, sysid: u64, history: &str, lsn: u64) -> (String, Option<Vec<u8>>) {
    use zenith::compute::wal::{segment_name, DEFAULT_SEGMENT_SIZE as SIZE};
    let name = segment_name(1, lsn / SIZE, SIZE);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = rt.block_on(async {
        let storage = zenith::storage::open(url).await.unwrap();
        let archive = zenith::safekeeper::Archive::new(storage, sysid);
        archive.streamed(history, &name, SIZE, false).await.unwrap()
    });
    (name, data)
}

fn sysid(repo: &Path) -> u64 {
    zenith::snapshot::datadir::read_control(&repo.join("pgs/main/data"))
        .unwrap()
        .system_identifier
}

#[test]
fn sync_mode_holds_commits_until_stored_and_falls_back_when_the_safekeeper_stalls() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    let dest = repo.path.with_file_name("dest");
    let url = format!("file://{}", dest.display());
    ok(z(&repo.path).args(["init", "--storage_dest", &url]));

    // The default: async, streaming, commits do not wait.
    ok(z(&repo.path).arg("start"));
    eventually("the async safekeeper streaming", || {
        let s = status(&repo.path)["safekeeper"].clone();
        s["mode"] == "async" && s["streaming"] == true && s["commits_wait"] == false
    });
    let main = connstr_of(&repo.path, "main");
    let sql =
        "select sync_state from pg_stat_replication where application_name = 'zenith_safekeeper'";
    eventually("pg_stat_replication says async", || {
        psql(&main, sql) == "async"
    });
    ok(z(&repo.path).arg("stop"));

    // Sync mode: a commit waits for the safekeeper.
    set_safekeeper(&repo.path, "sync", "60s");
    ok(z(&repo.path).arg("start"));
    until_commits_wait(&repo.path);
    eventually("pg_stat_replication says sync", || {
        psql(&main, sql) == "sync"
    });
    psql(&main, "create table t (i int); insert into t values (1)");
    eventually(
        "status saying commits wait for the streaming safekeeper",
        || {
            ok(z(&repo.path).arg("status"))
                .contains("safekeeper: sync mode (commits wait for storage_dest), streaming")
        },
    );

    // Paused: the commit blocks, and returns once the safekeeper runs again.
    let pid = safekeeper_pid(&repo.path);
    signal(pid, libc::SIGSTOP);
    let mut insert = insert_in_background(&main, 2);
    std::thread::sleep(Duration::from_secs(2));
    let blocked = insert.try_wait().unwrap().is_none();
    signal(pid, libc::SIGCONT);
    assert!(
        blocked,
        "the commit returned while the safekeeper was paused"
    );
    assert!(finishes(&mut insert));
    assert_eq!(psql(&main, "select count(*) from t where i = 2"), "1");

    // Paused longer than fallback_after: commits go on without it, loudly, and wait
    // again once it caught up.
    set_safekeeper(&repo.path, "sync", "2s");
    signal(pid, libc::SIGSTOP);
    let mut insert = insert_in_background(&main, 3);
    let returned = finishes(&mut insert);
    let shown = ok(z(&repo.path).arg("status"));
    let s = status(&repo.path)["safekeeper"].clone();
    signal(pid, libc::SIGCONT);
    assert!(returned);
    assert!(
        shown.contains("safekeeper: FALLEN BACK TO ASYNC since"),
        "{shown}"
    );
    assert_eq!(s["commits_wait"], false, "{s}");
    eventually("sync mode back after the safekeeper caught up", || {
        let s = status(&repo.path)["safekeeper"].clone();
        s["commits_wait"] == true && s["fallen_back_since"].is_null()
    });
    eventually("pg_stat_replication says sync", || {
        psql(&main, sql) == "sync"
    });

    // The pg dies and zenith-local restarts it: commits wait again once it streams.
    let postmaster = postmaster_pid(&repo.path, "main");
    signal(postmaster, libc::SIGKILL);
    eventually("main restarted, commits waiting again", || {
        let s = status(&repo.path);
        s["pgs"][0]["restarts"] == 1 && s["safekeeper"]["commits_wait"] == true
    });
    eventually("pg_stat_replication says sync", || {
        psql(&main, sql) == "sync"
    });
    let pid = safekeeper_pid(&repo.path);

    // Killed: zenith-local starts it again, and it goes on where the storage's pieces
    // end: the current segment is contiguous from its start up to what it stored.
    let restarts = status(&repo.path)["safekeeper"]["restarts"]
        .as_u64()
        .unwrap();
    signal(pid, libc::SIGKILL);
    eventually("the safekeeper restarted", || {
        let s = status(&repo.path)["safekeeper"].clone();
        s["restarts"].as_u64() > Some(restarts)
            && s["streaming"] == true
            && s["commits_wait"] == true
            && report(&repo.path)["pid"].as_i64() != Some(pid as i64)
    });
    for i in 10..60 {
        psql(&main, &format!("insert into t values ({i})"));
    }
    let r = report(&repo.path);
    let history = r["history"].as_str().unwrap().to_string();
    let flushed = zenith::compute::wal::parse_lsn(r["flushed_lsn"].as_str().unwrap()).unwrap();
    let (segment, streamed) = streamed_segment(&url, sysid(&repo.path), &history, flushed);
    let own = std::fs::read(repo.path.join("pgs/main/data/pg_wal").join(&segment)).unwrap();
    let upto = (flushed % zenith::compute::wal::DEFAULT_SEGMENT_SIZE) as usize;
    match streamed {
        Some(data) => assert!(
            data[..upto] == own[..upto],
            "{segment} streamed differs from the pg's up to {r}"
        ),
        // Archived whole meanwhile (archive_timeout): its pieces are gone with reason.
        None => assert!(
            dest.join("wal")
                .join(sysid(&repo.path).to_string())
                .join(&history)
                .join(format!("{segment}.zst"))
                .exists(),
            "{segment}: no pieces, not archived"
        ),
    }
    // On a file:// storage the segment is a file written in place, as pg_receivewal's.
    let stream = dest
        .join("wal")
        .join(sysid(&repo.path).to_string())
        .join(&history)
        .join("stream");
    let names: Vec<String> = std::fs::read_dir(&stream)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        names.iter().any(|n| n.ends_with(".wal")),
        "no segment written in place in {}: {names:?}",
        stream.display()
    );
    let verified = ok(z(&repo.path).args(["wal", "verify"]));
    assert!(!verified.contains("GAP"), "{verified}");
    assert!(
        verified.contains("streamed by the safekeeper, up to"),
        "{verified}"
    );

    // A checkout gives main a new history: the safekeeper follows it.
    let snap = ok(z(&repo.path).args(["snapshot", "create", "main@here"]));
    assert!(snap.contains("snapshot"), "{snap}");
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@here"]));
    eventually("the safekeeper on main's new history", || {
        let now = status(&repo.path);
        let r = report(&repo.path);
        now["wal"]["history"].is_string()
            && r["history"] == now["wal"]["history"]
            && r["history"] != history.as_str()
            && now["safekeeper"]["commits_wait"] == true
    });
    psql(&main, "insert into t values (100)");
    eventually("pg_stat_replication says sync", || {
        psql(&main, sql) == "sync"
    });
    psql(&main, "insert into t values (101)");

    // The machine is lost right after: the young history has only streamed WAL, and a
    // new machine has the rows anyway.
    lose_the_machine(&repo.path);
    let other = TestRepo::at(repo.path.with_file_name("new-machine"));
    std::fs::create_dir_all(&other.path).unwrap();
    std::fs::copy(
        repo.path.join("config.toml"),
        other.path.join("config.toml"),
    )
    .unwrap();
    let out = ok(z(&other.path).arg("start"));
    assert!(out.contains("replayed the WAL archived after it"), "{out}");
    let back = connstr_of(&other.path, "main");
    assert_eq!(
        psql(&back, "select count(*) from t where i in (100, 101)"),
        "2"
    );
    ok(z(&other.path).arg("stop"));
    assert!(
        processes_mentioning(&other.path).is_empty(),
        "{:?}",
        processes_mentioning(&other.path)
    );
}

#[test]
fn zenith_stop_leaves_no_safekeeper_behind() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    let dest = repo.path.with_file_name("dest");
    ok(z(&repo.path).args([
        "init",
        "--storage_dest",
        &format!("file://{}", dest.display()),
    ]));
    ok(z(&repo.path).arg("start"));
    eventually("the safekeeper streaming", || {
        status(&repo.path)["safekeeper"]["streaming"] == true
    });
    ok(z(&repo.path).arg("stop"));
    assert!(
        processes_mentioning(&repo.path).is_empty(),
        "{:?}",
        processes_mentioning(&repo.path)
    );
}

/// Kills zenith-local, the main pg's postmaster and the safekeeper at once.
fn lose_the_machine(repo: &Path) {
    let local: i32 = std::fs::read_to_string(repo.join("zenith-local.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let postmaster = postmaster_pid(repo, "main");
    let keeper = safekeeper_pid(repo);
    for pid in [local, postmaster, keeper] {
        // SAFETY: processes of this test's repo.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    eventually("the killed processes gone", || {
        processes_mentioning(repo).is_empty()
    });
}

#[test]
fn every_acknowledged_commit_survives_losing_the_machine_with_garage() {
    let Some(server) = crate::support::require("Garage", S3Server::garage(1)) else {
        return;
    };
    let Some(first) = TestRepo::new() else {
        return;
    };
    every_acknowledged_commit_survives(first, &server.url("lost"), &server.env());
}

/// The same on a file:// storage, where the safekeeper writes the segment in place and
/// fdatasyncs it, as pg_receivewal does (the storage's directory stands for a disk the
/// machine's loss spares).
#[test]
fn every_acknowledged_commit_survives_losing_the_machine_with_a_file_storage() {
    let Some(first) = TestRepo::new() else {
        return;
    };
    let dest = first.path.with_file_name("dest");
    // (The repos hold the directory the storage is in.)
    let _repos =
        every_acknowledged_commit_survives(first, &format!("file://{}", dest.display()), &[]);
    let files: Vec<String> = walkdir::WalkDir::new(&dest)
        .into_iter()
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with(".wal")),
        "no segment written in place in {files:#?}"
    );
}

/// Three rounds of: a client commits rows one by one, the machine is lost at a random
/// moment, a new repo with only config.toml (storage_dest `url`) has every acknowledged
/// id. Returns the repos, stopped.
fn every_acknowledged_commit_survives(
    first: TestRepo,
    url: &str,
    env: &[(&str, String)],
) -> Vec<TestRepo> {
    let zz = |repo: &Path| {
        let mut cmd = z(repo);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    };
    ok(zz(&first.path).args(["init", "--storage_dest", url]));
    set_safekeeper(&first.path, "sync", "60s");
    ok(zz(&first.path).arg("start"));
    let main = connstr_of(&first.path, "main");
    psql(&main, "create table t (i bigint primary key)");
    ok(zz(&first.path).args(["snapshot", "create"]));
    ok(zz(&first.path).args(["--no-progress", "push"]));

    let mut repos: Vec<TestRepo> = vec![first];
    let mut acked_total: Vec<i64> = Vec::new();
    for round in 0..3i64 {
        let repo = repos.last().unwrap().path.clone();
        until_commits_wait(&repo);
        let connstr = connstr_of(&repo, "main");
        // A client commits rows one by one and records each acknowledged id.
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let acked = Arc::clone(&acked);
            let connstr = connstr.clone();
            std::thread::spawn(move || {
                let install = zenith::compute::find_postgres().unwrap();
                for i in round * 1_000_000.. {
                    let out = std::process::Command::new(install.bin("psql"))
                        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &connstr, "-c"])
                        .arg(format!("insert into t values ({i})"))
                        .output()
                        .unwrap();
                    if !out.status.success() {
                        return;
                    }
                    acked.lock().unwrap().push(i);
                }
            })
        };
        // At a random moment, the machine is lost.
        std::thread::sleep(Duration::from_millis(500 + fastrand::u64(..2500)));
        lose_the_machine(&repo);
        writer.join().unwrap();
        let acked = acked.lock().unwrap().clone();
        assert!(!acked.is_empty(), "round {round}: no commit acknowledged");
        acked_total.extend(&acked);

        // A new machine with only config.toml has every acknowledged id.
        let next = TestRepo::at(repo.with_file_name(format!("machine-{round}")));
        std::fs::create_dir_all(&next.path).unwrap();
        std::fs::copy(repo.join("config.toml"), next.path.join("config.toml")).unwrap();
        let out = ok(zz(&next.path).arg("start"));
        assert!(out.contains("replayed the WAL archived after it"), "{out}");
        let back = connstr_of(&next.path, "main");
        let list: Vec<String> = acked_total.iter().map(|i| i.to_string()).collect();
        let missing = psql(
            &back,
            &format!(
                "select count(*) from unnest(array[{}]::bigint[]) a(i) where not exists (select 1 from t where t.i = a.i)",
                list.join(",")
            ),
        );
        assert_eq!(
            missing,
            "0",
            "round {round}: acknowledged commits lost ({} acknowledged)",
            acked.len()
        );
        repos.push(next);
    }
    let last: PathBuf = repos.last().unwrap().path.clone();
    ok(zz(&last).arg("stop"));
    repos
}
