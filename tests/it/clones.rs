//! Thin clones, for real: a repo on a loop-mounted XFS filesystem with reflink=1 (made by
//! scripts/test.sh, named by `ZENITH_TEST_XFS_DIR`) snapshots, branches and checks out by
//! cloning files. Rows are identical after create and checkout, branches are independent
//! after writes in each, deleting the snapshot leaves the branches intact, pg_amcheck finds
//! nothing, a clone pushed elsewhere is packed and restores in copy mode, and a damaged
//! clone is refused in one line. Copy mode elsewhere says why.

use std::path::PathBuf;

use zenith::compute::find_postgres;

use crate::local::{connstr_of, eventually, ok, psql, rows, status, z, TestRepo};
use crate::support::{assert_clean_failure, require, run};

/// A directory on the XFS filesystem scripts/test.sh mounted, that PostgreSQL's account can
/// enter; removed when dropped.
fn xfs_tempdir() -> Option<tempfile::TempDir> {
    let dir = require(
        "an XFS filesystem with reflink=1 (ZENITH_TEST_XFS_DIR, mounted by scripts/test.sh as root)",
        std::env::var_os("ZENITH_TEST_XFS_DIR").map(PathBuf::from),
    )?;
    let t = tempfile::tempdir_in(&dir).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(t)
}

/// Every table's content in one digest, and the test table's rows.
fn content(connstr: &str) -> (String, String) {
    (
        psql(
            connstr,
            "select md5(string_agg(g::text || v, ',' order by g)) from big",
        ),
        rows(connstr),
    )
}

fn amcheck_clean(connstr: &str) {
    let install = find_postgres().unwrap();
    let out = run(std::process::Command::new(install.bin("pg_amcheck"))
        .args(["--install-missing", "--heapallindexed", "--all"])
        .arg(format!("--maintenance-db={connstr}")));
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "pg_amcheck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn snapshot_json(repo: &std::path::Path, reference: &str) -> serde_json::Value {
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&ok(z(repo).args(["snapshot", "list", "--json"]))).unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&ok(
        z(repo).args(["snapshot", "show", reference, "--json"])
    ))
    .unwrap()["id"]
        .clone();
    all.into_iter().find(|m| m["id"] == id).unwrap()
}

#[test]
fn clones_on_xfs_branch_check_out_and_outlive_their_snapshot() {
    let Some(dir) = xfs_tempdir() else {
        return;
    };
    let repo = TestRepo::at(dir.path().join("repo"));
    ok(z(&repo.path).arg("start"));
    let s = status(&repo.path);
    assert_eq!(s["clones"]["on"], true, "{s}");
    assert!(
        s["clones"]["reason"].as_str().unwrap().contains("xfs"),
        "{s}"
    );
    let main = connstr_of(&repo.path, "main");
    psql(
        &main,
        "create table t (i int primary key); insert into t values (1), (2), (3);
         create table big (g int primary key, v text);
         insert into big select g, repeat(md5(g::text), 8) from generate_series(1, 60000) g",
    );
    let before = content(&main);

    ok(z(&repo.path).args(["snapshot", "create", "main@a"]));
    let a = snapshot_json(&repo.path, "main@a");
    assert!(a["clone"].is_object(), "not a clone: {a}");
    let a_id = a["id"].as_str().unwrap().to_string();
    assert!(repo.path.join("clones").join(&a_id).is_dir());
    let verified = ok(z(&repo.path).args(["snapshot", "verify", "main@a"]));
    assert!(verified.contains("thin clone"), "{verified}");

    // Branches hold exactly the snapshot, and go their own ways.
    ok(z(&repo.path).args(["pg", "create", "b1", "--snapshot", "main@a"]));
    ok(z(&repo.path).args(["pg", "create", "b2", "--snapshot", "main@a"]));
    let (b1, b2) = (connstr_of(&repo.path, "b1"), connstr_of(&repo.path, "b2"));
    assert_eq!(content(&b1), before);
    assert_eq!(content(&b2), before);
    psql(&main, "insert into t values (4)");
    psql(
        &b1,
        "insert into t values (10); update big set v = 'b1' where g <= 100",
    );
    psql(&b2, "delete from t where i = 1");
    assert_eq!(rows(&main), "{1,2,3,4}");
    assert_eq!(rows(&b1), "{1,2,3,10}");
    assert_eq!(rows(&b2), "{2,3}");
    assert_eq!(content(&b2).0, before.0);
    assert_ne!(content(&b1).0, before.0);
    // A branch shares what it did not change.
    let s = status(&repo.path);
    let b1_space = s["pgs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "b1")
        .unwrap()["space"]
        .clone();
    assert!(
        b1_space["shared"].as_u64().unwrap() > b1_space["owned"].as_u64().unwrap(),
        "{b1_space}"
    );

    // Checkout there and back: the state main left is kept as a clone too.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@a"]));
    assert_eq!(content(&main), before);
    let head = snapshot_json(&repo.path, "main@HEAD{0}");
    assert!(head["clone"].is_object(), "{head}");
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@HEAD{0}"]));
    assert_eq!(rows(&main), "{1,2,3,4}");

    // Deleting the snapshot frees its clone and leaves the branches whole, also after a
    // restart; pg_amcheck reads every page and index of each.
    ok(z(&repo.path).args(["snapshot", "delete", "main@a"]));
    assert!(!repo.path.join("clones").join(&a_id).exists());
    ok(z(&repo.path).args(["pg", "stop", "b1"]));
    ok(z(&repo.path).args(["pg", "start", "b1"]));
    assert_eq!(rows(&b1), "{1,2,3,10}");
    assert_eq!(rows(&b2), "{2,3}");
    amcheck_clean(&b1);
    amcheck_clean(&b2);
    amcheck_clean(&main);

    // A clone leaves the repo packed: pushed to a storage, it verifies block by block, and
    // restores in another repo (outside the XFS image) from its packs.
    ok(z(&repo.path).args(["snapshot", "create", "b1@out"]));
    let share = tempfile::tempdir().unwrap();
    let url = share.path().join("s").display().to_string();
    ok(z(&repo.path).args(["push", "b1@out", &url]));
    let verified = ok(z(&repo.path).args(["snapshot", "verify", "b1@out", "--storage", &url]));
    assert!(verified.contains("is intact"), "{verified}");
    let Some(other) = TestRepo::new() else {
        return;
    };
    ok(z(&other.path).arg("start"));
    ok(z(&other.path).args(["pull", &url, "b1@out"]));
    ok(z(&other.path).args(["pg", "create", "copy", "--snapshot", "b1@out"]));
    let copy = connstr_of(&other.path, "copy");
    assert_eq!(content(&copy), content(&b1));
    let listed = ok(z(&other.path).args(["snapshot", "list", "--json"]));
    assert!(!listed.contains("\"clone\""), "{listed}");
    ok(z(&other.path).args(["stop"]));

    // A damaged clone is refused in one line, and nothing is created.
    let out_id = snapshot_json(&repo.path, "b1@out")["id"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(repo.path.join("clones").join(&out_id).join("PG_VERSION")).unwrap();
    let out = run(z(&repo.path).args(["pg", "create", "bad", "--snapshot", "b1@out"]));
    assert_clean_failure(&out, "lacks PG_VERSION");
    assert!(!repo.path.join("pgs/bad/data").exists());
    ok(z(&repo.path).args(["stop"]));
}

/// The `.ready` files PostgreSQL left in `data`'s archive status.
fn ready_files(data: &std::path::Path) -> usize {
    std::fs::read_dir(data.join("pg_wal/archive_status"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
        .count()
}

fn lsn(text: &str) -> u64 {
    zenith::compute::wal::parse_lsn(text).unwrap_or_else(|| panic!("not an LSN: {text}"))
}

/// In clone mode a checkout stops the pg at once (no shutdown checkpoint): the state it
/// keeps has every commit, records where its WAL ends (exactly where PostgreSQL's own
/// recovery ends when that state is checked out), and what the archiver had not sent is
/// archived by zenith. A pg with an unlogged table stops cleanly and keeps its rows.
#[test]
fn a_checkout_stops_at_once_and_keeps_every_commit() {
    let Some(dir) = xfs_tempdir() else {
        return;
    };
    let repo = TestRepo::at(dir.path().join("repo"));
    let url = crate::wal::init_archiving(&repo.path);
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    psql(
        &main,
        "create table t (i int primary key); insert into t values (1), (2), (3);
         create table big (g int primary key, v text)",
    );
    ok(z(&repo.path).args(["snapshot", "create", "main@a"]));

    // With storage_dest away for a while, the segments written meanwhile wait as .ready.
    ok(z(&repo.path).args(["storage", "detach", "-n", "storage_dest"]));
    psql(
        &main,
        "insert into big select g, repeat(md5(g::text), 8) from generate_series(1, 200000) g",
    );
    psql(&main, "insert into t values (4)");
    let committed = lsn(&psql(&main, "select pg_current_wal_insert_lsn()"));
    // The archiver's retries (a second apart) are over: it waits for a new segment.
    eventually("the archiver stopped retrying", || {
        psql(
            &main,
            "select coalesce(now() - last_failed_time > interval '3.5 s', false) from pg_stat_archiver",
        ) == "t"
    });
    let data = repo.path.join("pgs/main/data");
    let waiting = ready_files(&data);
    assert!(waiting >= 2, "only {waiting} segments wait to be archived");
    ok(z(&repo.path).args(["storage", "attach", "-n", "storage_dest", "--path", &url]));
    // A commit that did not wait for its WAL to reach the disk is kept all the same.
    psql(
        &main,
        "set synchronous_commit = off; insert into t values (5)",
    );

    let stops = |how: &str| {
        std::fs::read_to_string(repo.path.join("pgs/main/postgres.log"))
            .unwrap()
            .matches(&format!("received {how} shutdown request"))
            .count()
    };
    let (immediate, fast) = (stops("immediate"), stops("fast"));
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@a"]));
    assert_eq!(rows(&main), "{1,2,3}");
    assert_eq!((stops("immediate"), stops("fast")), (immediate + 1, fast));
    let zlog = std::fs::read_to_string(repo.path.join("logs/zenith-local.log")).unwrap();
    assert_eq!(
        zlog.matches("left ready by its stop").count(),
        waiting,
        "{zlog}"
    );
    let head = snapshot_json(&repo.path, "main@HEAD{0}");
    let (start, end) = (
        lsn(head["start_lsn"].as_str().unwrap()),
        lsn(head["stop_lsn"].as_str().unwrap()),
    );
    assert!(end >= committed && start < end, "{head}");
    let verified = ok(z(&repo.path).args(["wal", "verify"]));
    assert!(!verified.contains("GAP"), "{verified}");
    // A diff counts what the kept state's WAL replays, not only what its files hold.
    let diff: serde_json::Value = serde_json::from_str(&ok(z(&repo.path).args([
        "snapshot",
        "diff",
        "main@a",
        "main@HEAD{0}",
        "--json",
    ])))
    .unwrap();
    let changed = |name: &str| {
        diff["relations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["pages_changed"].as_u64().unwrap())
    };
    assert_eq!(changed("t"), Some(1), "{diff}");
    // Against itself, the WAL both replay cancels out.
    let same: serde_json::Value = serde_json::from_str(&ok(z(&repo.path).args([
        "snapshot",
        "diff",
        "main@HEAD{0}",
        "main@HEAD{0}",
        "--json",
    ])))
    .unwrap();
    assert_eq!(same["relations"], serde_json::json!([]), "{same}");
    assert!(changed("big").unwrap() > 1000, "{diff}");

    // Checked out, the kept state replays its WAL: PostgreSQL's end-of-recovery
    // checkpoint is exactly where the snapshot says the WAL ends.
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@HEAD{0}"]));
    assert_eq!(rows(&main), "{1,2,3,4,5}");
    assert_eq!(psql(&main, "select count(*) from big"), "200000");
    assert_eq!(
        lsn(&psql(&main, "select redo_lsn from pg_control_checkpoint()")),
        end
    );
    amcheck_clean(&main);

    // A pg promoted a moment ago writes on a new timeline that no checkpoint may name
    // yet: the state a checkout keeps is on the timeline its WAL ends on.
    ok(z(&repo.path).args(["pg", "create", "r1", "--no-start"]));
    ok(z(&repo.path).args(["pg", "start", "r1", "--replica"]));
    let r1 = connstr_of(&repo.path, "r1");
    eventually("r1 caught up with main", || rows(&r1) == rows(&main));
    ok(z(&repo.path).args(["pg", "promote", "r1"]));
    psql(&r1, "insert into t values (100)");
    let timeline = u64::from_str_radix(
        &psql(
            &r1,
            "select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
        ),
        16,
    )
    .unwrap();
    assert!(timeline >= 2, "{timeline}");
    ok(z(&repo.path).args(["pg", "checkout", "r1", "main@a"]));
    let kept = snapshot_json(&repo.path, "r1@HEAD{0}");
    assert_eq!(kept["timeline"].as_u64(), Some(timeline), "{kept}");
    ok(z(&repo.path).args(["pg", "checkout", "r1", "r1@HEAD{0}"]));
    assert_eq!(rows(&r1), "{1,2,3,4,5,100}");
    ok(z(&repo.path).args(["pg", "destroy", "r1"]));

    // An unlogged table would be emptied by that replay: the pg stops cleanly instead.
    psql(
        &main,
        "create unlogged table u (i int); insert into u values (7)",
    );
    let (immediate, fast) = (stops("immediate"), stops("fast"));
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@a"]));
    assert_eq!((stops("immediate"), stops("fast")), (immediate, fast + 1));
    ok(z(&repo.path).args(["pg", "checkout", "main", "main@HEAD{2}"]));
    assert_eq!(psql(&main, "select i from u"), "7");
    assert_eq!(rows(&main), "{1,2,3,4,5}");
    ok(z(&repo.path).args(["stop"]));
}

#[test]
fn copies_where_files_cannot_share_extents_and_when_told_to() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).args(["init"]));
    // Where the test's temporary directory cannot share extents (ext4, tmpfs), status
    // says so; on a filesystem that can (an XFS or btrfs root), it says that instead.
    let s = status(&repo.path);
    let reason = s["clones"]["reason"].as_str().unwrap().to_string();
    match zenith::util::reflink::probe(&repo.path) {
        Err(_) => {
            assert_eq!(s["clones"]["on"], false);
            assert!(reason.contains("cannot share extents"), "{reason}");
            let printed = ok(z(&repo.path).arg("status"));
            assert!(printed.contains("snapshots: copies"), "{printed}");
        }
        Ok(()) => assert_eq!(s["clones"]["on"], true, "{reason}"),
    }

    // On XFS, `clones = "off"` keeps copies.
    let Some(dir) = xfs_tempdir() else {
        return;
    };
    let repo = TestRepo::at(dir.path().join("repo"));
    ok(z(&repo.path).args(["init"]));
    let config = repo.path.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("clones = \"auto\""), "{text}");
    std::fs::write(
        &config,
        text.replace("clones = \"auto\"", "clones = \"off\""),
    )
    .unwrap();
    let s = status(&repo.path);
    assert_eq!(s["clones"]["on"], false);
    assert!(
        s["clones"]["reason"]
            .as_str()
            .unwrap()
            .contains("clones = \"off\""),
        "{s}"
    );
    ok(z(&repo.path).args(["snapshot", "create", "main@copy"]));
    assert!(snapshot_json(&repo.path, "main@copy")["clone"].is_null());
}

/// `snapshot diff` names the relations that changed, from the snapshots' own catalogs,
/// and not the others: in a copy-mode repo (block lists) and in a clone-mode one (clones).
#[test]
fn snapshot_diff_names_what_changed_in_either_mode() {
    let Some(copies) = TestRepo::new() else {
        return;
    };
    diff_names_what_changed(&copies.path);
    let Some(dir) = xfs_tempdir() else {
        return;
    };
    let clones = TestRepo::at(dir.path().join("repo"));
    diff_names_what_changed(&clones.path);
}

fn diff_names_what_changed(repo: &std::path::Path) {
    ok(z(repo).arg("start"));
    let main = connstr_of(repo, "main");
    psql(
        &main,
        "create table orders (id int primary key, note text);
         create table customers (id int primary key, name text);
         insert into orders select g, 'n' || g from generate_series(1, 20000) g;
         insert into customers select g, 'c' || g from generate_series(1, 20000) g",
    );
    ok(z(repo).args(["snapshot", "create", "main@one"]));
    psql(
        &main,
        "update orders set note = 'changed' where id % 50 = 0",
    );
    ok(z(repo).args(["snapshot", "create", "main@two"]));
    psql(&main, "create index orders_note on orders (note)");
    ok(z(repo).args(["snapshot", "create", "main@three"]));

    let diff = |a: &str, b: &str| -> serde_json::Value {
        serde_json::from_str(&ok(z(repo).args(["snapshot", "diff", a, b, "--json"]))).unwrap()
    };
    let named = |d: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        d["relations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name && r["database"] == "postgres")
            .cloned()
    };
    let d = diff("main@one", "main@two");
    let orders = named(&d, "orders").unwrap_or_else(|| panic!("orders not named: {d}"));
    assert_eq!(orders["schema"], "public");
    assert_eq!(orders["kind"], "table");
    assert_eq!(orders["change"], "changed");
    assert!(orders["pages_changed"].as_u64().unwrap() > 0, "{orders}");
    assert!(named(&d, "customers").is_none(), "{d}");
    assert!(named(&d, "customers_pkey").is_none(), "{d}");

    let d = diff("main@two", "main@three");
    let index = named(&d, "orders_note").unwrap_or_else(|| panic!("index not named: {d}"));
    assert_eq!(index["kind"], "index");
    assert_eq!(index["change"], "added");
    assert!(named(&d, "customers").is_none(), "{d}");
    let printed = ok(z(repo).args(["snapshot", "diff", "main@two", "main@three"]));
    assert!(printed.contains("postgres.public.orders_note"), "{printed}");
    ok(z(repo).arg("stop"));
}
