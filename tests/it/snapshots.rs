//! Snapshots of real PostgreSQL 15 clusters (data checksums on) in the `zenith` format,
//! through the `zenith` binary, to a local directory, s3s-fs and a Garage cluster: the copy
//! starts, holds exactly the committed content, passes pg_checksums and pg_amcheck; a second
//! snapshot stores only changed pages; damaged or hostile snapshots are refused.

use std::path::Path;
use std::process::Command;

use zenith::storage::Storage;

use crate::support::pg::{pg_tempdir, PgCluster};
use crate::support::s3::S3Server;
use crate::support::{assert_clean_failure, run, text, zenith};

/// A fingerprint of everything the tests write.
fn content(pg: &PgCluster) -> String {
    pg.sql(
        "select (select md5(string_agg(id || ':' || encode(payload, 'hex'), ',' order by id)) from incompressible) \
         || '|' || (select sum(abalance) || '/' || count(*) from pgbench_accounts) \
         || '|' || (select count(*) from pgbench_history)",
    )
}

/// pgbench tables plus 8 MB of random bytes.
fn populate(pg: &PgCluster, scale: u32) {
    pg.client(
        "pgbench",
        &["-i", "-q", "-s", &scale.to_string(), "postgres"],
    );
    pg.sql(
        "create table incompressible (id int primary key, payload bytea); \
         insert into incompressible select i, decode(string_agg(md5(random()::text || i || j), ''), 'hex') \
         from generate_series(1, 8000) i, generate_series(1, 64) j group by i",
    );
    pg.client("pgbench", &["-n", "-t", "300", "-c", "2", "postgres"]);
}

fn zenith_with(env: &[(&'static str, String)]) -> Command {
    let mut cmd = zenith();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "zenith failed:\n{stdout}\n{stderr}");
    stdout
}

fn round_trip(url: &str, env: &[(&'static str, String)]) {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 2);
    let before = content(&pg);
    pg.stop();

    let out = ok(zenith_with(env)
        .args([
            "export",
            "--snapshot_path",
            url,
            "--name",
            "first",
            "--pgdata",
        ])
        .arg(&pg.data));
    assert!(
        out.contains("(first)") && out.contains("new blocks"),
        "{out}"
    );
    let listed = ok(zenith_with(env).args(["snapshot", "list", "--json", "--storage", url]));
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "first");
    assert_eq!(listed[0]["pg_version"], "15");
    ok(zenith_with(env).args(["snapshot", "verify", "first", "--storage", url]));

    let target = pg_tempdir();
    let data = target.path().join("restored");
    let out = ok(zenith_with(env)
        .args([
            "import",
            "--snapshot_path",
            url,
            "--snapshot",
            "first",
            "--pgdata",
        ])
        .arg(&data));
    assert!(out.contains("blocks checked"), "{out}");
    let mut copy = PgCluster::at(&pg.install, &data);
    copy.start();
    assert_eq!(content(&copy), before, "the restored cluster differs");
    copy.client(
        "pg_amcheck",
        &["--install-missing", "--heapallindexed", "-d", "postgres"],
    );
    copy.client("pgbench", &["-n", "-t", "50", "postgres"]);
    copy.stop();
    assert!(copy.checksums_ok().contains("Bad checksums:  0"));
}

#[test]
fn zenith_format_round_trip_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        &format!("file://{}", dir.path().join("snapshots").display()),
        &[],
    );
}

#[test]
fn zenith_format_round_trip_on_s3s_fs() {
    let Some(server) = S3Server::s3s_fs() else {
        return;
    };
    round_trip(&server.url("snapshots"), &server.env());
}

#[test]
fn zenith_format_round_trip_on_garage() {
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    round_trip(&server.url("snapshots"), &server.env());
}

fn stored_sizes(url: &str) -> Vec<u64> {
    let listed: serde_json::Value = serde_json::from_str(&ok(zenith().args([
        "snapshot",
        "list",
        "--json",
        "--storage",
        url,
    ])))
    .unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["stored_size"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_second_snapshot_stores_only_changed_pages() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 10);
    pg.sql("checkpoint");
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("s").display());
    ok(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data));

    // About 1% of pgbench_accounts' pages: one row in every hundredth page (61 rows a page).
    pg.start();
    let pages: u64 = pg
        .sql("select relpages from pg_class where relname = 'pgbench_accounts'")
        .parse()
        .unwrap();
    pg.sql("update pgbench_accounts set abalance = abalance + 1 where aid % 6100 = 0");
    pg.stop();
    ok(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data));
    let sizes = stored_sizes(&url);
    assert_eq!(sizes.len(), 2);
    let ratio = sizes[1] as f64 / sizes[0] as f64;
    eprintln!(
        "{pages} pages; first snapshot stored {} bytes, second {} ({:.2}%)",
        sizes[0],
        sizes[1],
        ratio * 100.0
    );
    assert!(
        ratio <= 0.05,
        "the second snapshot stored {:.1}% of the first",
        ratio * 100.0
    );

    // Both restore, each to its own state.
    let target = pg_tempdir();
    let first_id = serde_json::from_str::<serde_json::Value>(&ok(zenith().args([
        "snapshot",
        "list",
        "--json",
        "--storage",
        &url,
    ])))
    .unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    ok(zenith()
        .args([
            "import",
            "--snapshot_path",
            &url,
            "--snapshot",
            &first_id[..10],
            "--pgdata",
        ])
        .arg(target.path().join("a")));
    let mut a = PgCluster::at(&pg.install, &target.path().join("a"));
    a.start();
    assert_eq!(a.sql("select count(*) from pgbench_accounts where aid % 6100 = 0 and abalance = 0 and aid <= 6100"), "1");
    a.stop();
    ok(zenith()
        .args([
            "import",
            "--snapshot_path",
            &url,
            "--snapshot",
            "LATEST",
            "--pgdata",
        ])
        .arg(target.path().join("b")));
    let mut b = PgCluster::at(&pg.install, &target.path().join("b"));
    b.start();
    pg.start();
    let latest = content(&pg);
    assert_eq!(content(&b), latest);
    b.stop();
    pg.stop();

    // Deleting the first snapshot with the default grace period keeps its (fresh) data...
    let stored = |d: &Path| {
        walkdir::WalkDir::new(d)
            .into_iter()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum::<u64>()
    };
    let before = stored(&dir.path().join("s"));
    let out = ok(zenith().args(["snapshot", "delete", &first_id, "--storage", &url]));
    assert!(
        out.contains("deleted snapshot") && out.contains("freed 0 B"),
        "{out}"
    );
    assert_eq!(stored_sizes(&url).len(), 1);
    // ...a third snapshot of the same data shares every block with the second; deleting it
    // with no grace period and no unused data allowed frees what only the first used, and
    // keeps everything the second needs.
    ok(zenith()
        .args([
            "export",
            "--snapshot_path",
            &url,
            "--name",
            "third",
            "--pgdata",
        ])
        .arg(&pg.data));
    let out = ok(zenith().args([
        "snapshot",
        "delete",
        "third",
        "--storage",
        &url,
        "--grace",
        "0s",
        "--max-unused",
        "0",
    ]));
    let words: Vec<&str> = out.split_whitespace().collect();
    let rewritten: u64 = words
        .iter()
        .position(|w| w.starts_with("rewritten)"))
        .and_then(|at| words[at - 1].parse().ok())
        .unwrap_or_else(|| panic!("no rewrite count in {out}"));
    assert!(rewritten > 0, "{out}");
    let after = stored(&dir.path().join("s"));
    eprintln!("store: {before} bytes before the deletes, {after} after");
    assert!(
        after < before,
        "deleting freed nothing: {before} -> {after}"
    );
    ok(zenith().args(["snapshot", "verify", "LATEST", "--storage", &url]));
    ok(zenith()
        .args([
            "import",
            "--snapshot_path",
            &url,
            "--snapshot",
            "LATEST",
            "--pgdata",
        ])
        .arg(target.path().join("c")));
    let mut c = PgCluster::at(&pg.install, &target.path().join("c"));
    c.start();
    assert_eq!(
        content(&c),
        latest,
        "the remaining snapshot changed after deletes"
    );
}

#[test]
fn a_running_cluster_is_refused() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("s").display());
    let out = run(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data));
    assert_clean_failure(&out, "belongs to a running PostgreSQL");
    assert!(!dir.path().join("s/snapshots").exists());
}

fn first_file(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

#[test]
fn damaged_snapshots_are_detected_and_never_restored() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 1);
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let url = format!("file://{}", store.display());
    ok(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data));
    let manifest_path = first_file(&store.join("snapshots"));
    let id = manifest_path
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let target = pg_tempdir();
    let restore = |name: &str| {
        run(zenith()
            .args(["import", "--snapshot_path", &url, "--pgdata"])
            .arg(target.path().join(name)))
    };

    // One flipped byte in a pack.
    let pack = first_file(&store.join("packs"));
    let original = std::fs::read(&pack).unwrap();
    let mut damaged = original.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x40;
    std::fs::write(&pack, &damaged).unwrap();
    let out = run(zenith().args(["snapshot", "verify", &id, "--storage", &url]));
    let err = assert_clean_failure(&out, "is corrupt");
    assert!(
        err.contains(&id) && (err.contains("SHA-256") || err.contains("decompress")),
        "{err}"
    );
    assert!(
        err.contains("base/") || err.contains("global/") || err.contains("pg_"),
        "names no file: {err}"
    );
    assert_clean_failure(&restore("flipped"), "is corrupt");
    assert!(
        !target.path().join("flipped").exists(),
        "a damaged snapshot left a directory behind"
    );

    // A truncated pack.
    std::fs::write(&pack, &original[..original.len() / 3]).unwrap();
    assert_clean_failure(&restore("truncated"), "truncated");
    std::fs::write(&pack, &original).unwrap();

    // A damaged block list.
    let list = first_file(&store.join("lists"));
    let list_bytes = std::fs::read(&list).unwrap();
    let mut damaged = list_bytes.clone();
    let at = damaged.len() / 2;
    damaged[at] ^= 0x01;
    std::fs::write(&list, &damaged).unwrap();
    let out = run(zenith().args(["snapshot", "verify", &id, "--storage", &url]));
    let err = assert_clean_failure(&out, "is corrupt");
    assert!(err.contains("block list of") && err.contains(&id), "{err}");
    assert_clean_failure(&restore("list"), "block list of");
    assert!(!target.path().join("list").exists());
    std::fs::write(&list, &list_bytes).unwrap();

    // A missing index (the blocks it lists are nowhere).
    let index = first_file(&store.join("index"));
    let index_bytes = std::fs::read(&index).unwrap();
    std::fs::remove_file(&index).unwrap();
    assert_clean_failure(&restore("missing"), "which no pack in the storage holds");
    std::fs::write(&index, &index_bytes).unwrap();

    // A manifest whose paths escape the target.
    let manifest_bytes = std::fs::read(&manifest_path).unwrap();
    let mut hostile: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    hostile["entries"][0]["path"] = "../../escaped".into();
    std::fs::write(&manifest_path, serde_json::to_vec(&hostile).unwrap()).unwrap();
    assert_clean_failure(&restore("hostile"), "'..'");
    // "../../escaped" from target/.hostile.zenith-tmp-*/ would land in target's parent.
    assert!(
        !target.path().parent().unwrap().join("escaped").exists()
            && !target.path().join("escaped").exists()
    );
    std::fs::write(&manifest_path, &manifest_bytes).unwrap();

    // Restored intact, it works again.
    ok(zenith().args(["snapshot", "verify", &id, "--storage", &url]));
    let out = restore("good");
    assert!(out.status.success(), "{:?}", text(&out));
}

#[tokio::test]
async fn decompression_bombs_are_refused() {
    use bytes::Bytes;
    use sha2::{Digest, Sha256};
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let url = format!("file://{}", store.display());
    ok(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data));
    // Replace the only pack with one whose every block inflates to 64 MiB of zeros, with an
    // index that is internally consistent, so only the size limit can stop it.
    let storage = zenith::storage::LocalStorage::new(store.clone()).unwrap();
    let index_key = storage.list("index/").await.unwrap()[0].key.clone();
    let index = storage.get_bytes(&index_key).await.unwrap();
    let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    let count = u64::from_le_bytes(index[8..16].try_into().unwrap()) as usize;
    let mut pack = Vec::new();
    let mut body = index[..16].to_vec();
    for i in 0..count {
        let entry = &index[16 + i * 46..16 + (i + 1) * 46];
        body.extend_from_slice(&entry[..32]);
        body.extend_from_slice(&(pack.len() as u64).to_le_bytes());
        body.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        pack.extend_from_slice(&bomb);
    }
    let sum = Sha256::digest(&body);
    body.extend_from_slice(&sum);
    let pack_key = index_key.replace("index/", "packs/").replace(".idx", "");
    storage.put(&pack_key, Bytes::from(pack)).await.unwrap();
    storage.put(&index_key, Bytes::from(body)).await.unwrap();
    let target = tempfile::tempdir().unwrap();
    let out = run(zenith()
        .args(["import", "--snapshot_path", &url, "--pgdata"])
        .arg(target.path().join("x")));
    assert_clean_failure(&out, "does not decompress");

    // A manifest far larger than any real one is refused before it is read into memory.
    let huge = std::fs::File::create(store.join("snapshots/ffffffffffffffffffff.json")).unwrap();
    huge.set_len(600 << 20).unwrap();
    let out = run(zenith().args(["snapshot", "list", "--storage", &url]));
    assert_clean_failure(&out, "more than the");
}

#[test]
fn a_killed_export_leaves_no_snapshot_and_the_rerun_reuses_its_packs() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 20);
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let url = format!("file://{}", store.display());
    let mut child = zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let indexes = std::fs::read_dir(store.join("index"))
            .map(|d| d.count())
            .unwrap_or(0);
        if indexes >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the export finished before it could be killed; use a larger database"
        );
        assert!(std::time::Instant::now() < deadline, "no pack appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let listed = ok(zenith().args(["snapshot", "list", "--storage", &url]));
    assert!(
        listed.contains("no snapshots"),
        "a killed export left a visible snapshot: {listed}"
    );

    // Blocks the killed run stored, by its indexes (16-byte header, 46 bytes a block, 32-byte sum).
    // (Only finished indexes: the kill may have left a temporary file behind.)
    let reused: u64 = std::fs::read_dir(store.join("index"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            e.file_name().to_string_lossy().ends_with(".idx")
                && !e.file_name().to_string_lossy().starts_with('.')
        })
        .map(|e| (e.metadata().unwrap().len() - 48) / 46)
        .sum();
    assert!(reused > 0);
    let new_blocks = |out: &str| -> u64 {
        // "stored X (N new blocks of M)"
        let words: Vec<&str> = out.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "new").unwrap();
        words[at - 1].trim_start_matches('(').parse().unwrap()
    };
    let rerun = new_blocks(&ok(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data)));
    let cold_url = format!("file://{}", dir.path().join("cold").display());
    let cold = new_blocks(&ok(zenith()
        .args(["export", "--snapshot_path", &cold_url, "--pgdata"])
        .arg(&pg.data)));
    assert_eq!(
        rerun + reused,
        cold,
        "the rerun did not reuse exactly what the killed run stored"
    );
    ok(zenith().args(["snapshot", "verify", "LATEST", "--storage", &url]));
}

fn online_snapshot_while_pgbench_writes(url: &str, env: &[(&'static str, String)]) {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 2);
    pg.sql("create table marker (id int primary key)");
    let mut load = crate::support::pg::as_pg(&pg.install, "pgbench")
        .arg("-h")
        .arg(pg.dir.path())
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-n",
            "-T",
            "6",
            "-c",
            "2",
            "postgres",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Committed before the snapshot begins: must all be in the copy.
    pg.sql("insert into marker values (1)");
    let history_before: u64 = pg
        .sql("select count(*) from pgbench_history")
        .parse()
        .unwrap();
    let connstr = format!("postgresql://postgres@127.0.0.1:{}/postgres", pg.port);
    let out = ok(zenith_with(env).args([
        "export",
        "--snapshot_path",
        url,
        "--name",
        "online",
        "--connstr",
        &connstr,
    ]));
    assert!(out.contains("(online)"), "{out}");
    let writes_during: u64 = pg
        .sql("select count(*) from pgbench_history")
        .parse()
        .unwrap();
    assert!(
        load.wait().unwrap().success(),
        "pgbench failed while the snapshot ran"
    );
    assert!(
        writes_during > history_before,
        "pgbench was not writing during the snapshot"
    );

    let shown: serde_json::Value = serde_json::from_str(&ok(zenith_with(env).args([
        "snapshot",
        "show",
        "online",
        "--json",
        "--storage",
        url,
    ])))
    .unwrap();
    assert_ne!(
        shown["start_lsn"], shown["stop_lsn"],
        "an online snapshot spans WAL"
    );

    let target = pg_tempdir();
    let restore = |name: &str| {
        let data = target.path().join(name);
        ok(zenith_with(env)
            .args([
                "import",
                "--snapshot_path",
                url,
                "--snapshot",
                name,
                "--pgdata",
            ])
            .arg(&data));
        let mut copy = PgCluster::at(&pg.install, &data);
        copy.start();
        copy
    };
    let mut copy = restore("online");
    assert_eq!(copy.sql("select count(*) from marker"), "1");
    let history_copy: u64 = copy
        .sql("select count(*) from pgbench_history")
        .parse()
        .unwrap();
    assert!(
        history_copy >= history_before,
        "lost commits: {history_copy} < {history_before}"
    );
    // Consistent: pgbench keeps balances summed equal across its tables.
    assert_eq!(
        copy.sql("select sum(abalance) from pgbench_accounts"),
        copy.sql("select sum(bbalance) from pgbench_branches")
    );
    copy.client(
        "pg_amcheck",
        &["--install-missing", "--heapallindexed", "-d", "postgres"],
    );
    copy.stop();
    assert!(copy.checksums_ok().contains("Bad checksums:  0"));

    // A second online snapshot does not read again the files unchanged since the first,
    // and restores to exactly the server's content.
    pg.sql("insert into marker values (2)");
    let expected = content(&pg);
    let out = ok(zenith_with(env).args([
        "export",
        "--snapshot_path",
        url,
        "--name",
        "online2",
        "--connstr",
        &connstr,
    ]));
    assert!(out.contains("unchanged files not read again"), "{out}");
    let mut copy2 = restore("online2");
    assert_eq!(copy2.sql("select count(*) from marker"), "2");
    assert_eq!(content(&copy2), expected);
    copy2.client(
        "pg_amcheck",
        &["--install-missing", "--heapallindexed", "-d", "postgres"],
    );
    copy2.stop();
    assert!(copy2.checksums_ok().contains("Bad checksums:  0"));
}

#[test]
fn online_snapshot_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    online_snapshot_while_pgbench_writes(
        &format!("file://{}", dir.path().join("s").display()),
        &[],
    );
}

#[test]
fn online_snapshot_on_garage() {
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    online_snapshot_while_pgbench_writes(&server.url("online"), &server.env());
}

#[test]
fn an_unreachable_server_is_one_clear_line_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("s").display());
    let port = crate::support::free_port();
    let connstr = format!("postgresql://postgres:hunter2secret@127.0.0.1:{port}/postgres");
    let out = run(zenith().args(["export", "--snapshot_path", &url, "--connstr", &connstr]));
    if zenith::compute::find_postgres().is_err() && !crate::support::in_ci() {
        return;
    }
    let err = assert_clean_failure(&out, "online snapshot");
    assert!(
        !err.contains("hunter2secret") && err.contains("***"),
        "{err}"
    );
}

fn pgdata_round_trip(url: &str, env: &[(&'static str, String)], local_root: Option<&Path>) {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 1);
    let connstr = format!("postgresql://postgres@127.0.0.1:{}/postgres", pg.port);
    ok(zenith_with(env).args([
        "export",
        "--snapshot_format",
        "pgdata",
        "--snapshot_path",
        url,
        "--name",
        "plain",
        "--connstr",
        &connstr,
    ]));
    let before = content(&pg);
    pg.stop();
    let shown: serde_json::Value = serde_json::from_str(&ok(zenith_with(env).args([
        "snapshot",
        "show",
        "plain",
        "--json",
        "--storage",
        url,
    ])))
    .unwrap();
    assert_eq!(shown["format"], "pgdata");
    ok(zenith_with(env).args(["snapshot", "verify", "LATEST", "--storage", url]));

    let target = pg_tempdir();
    let data = target.path().join("restored");
    let out = ok(zenith_with(env)
        .args([
            "import",
            "--snapshot_format",
            "pgdata",
            "--snapshot_path",
            url,
            "--pgdata",
        ])
        .arg(&data));
    assert!(out.contains("files checked"), "{out}");
    let mut copy = PgCluster::at(&pg.install, &data);
    copy.start();
    assert_eq!(content(&copy), before);
    copy.stop();
    assert!(copy.checksums_ok().contains("Bad checksums:  0"));

    // On a local destination, the export itself is a data directory stock PostgreSQL starts
    // on (which changes it, so this comes last).
    if let Some(root) = local_root {
        let mut direct = PgCluster::at(&pg.install, root);
        direct.start();
        assert_eq!(content(&direct), before);
        direct.stop();
    }
}

#[test]
fn pgdata_format_on_a_local_directory_is_a_startable_data_directory() {
    let dir = pg_tempdir();
    let root = dir.path().join("plain");
    pgdata_round_trip(&format!("file://{}", root.display()), &[], Some(&root));
}

#[test]
fn pgdata_format_on_s3s_fs() {
    let Some(server) = S3Server::s3s_fs() else {
        return;
    };
    pgdata_round_trip(&server.url("plain"), &server.env(), None);
}

#[test]
fn an_existing_pgdata_imports_and_a_damaged_pgdata_snapshot_is_refused() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 1);
    pg.stop();
    let target = pg_tempdir();
    // A plain, stopped $PGDATA without any zenith manifest.
    let out = ok(zenith()
        .args(["import", "--snapshot_format", "pgdata", "--snapshot_path"])
        .arg(&pg.data)
        .arg("--pgdata")
        .arg(target.path().join("copy")));
    assert!(out.contains("copied"), "{out}");
    let mut copy = PgCluster::at(&pg.install, &target.path().join("copy"));
    copy.start();
    pg.start();
    assert_eq!(content(&copy), content(&pg));
    copy.stop();
    // A running one is refused.
    let out = run(zenith()
        .args(["import", "--snapshot_format", "pgdata", "--snapshot_path"])
        .arg(&pg.data)
        .arg("--pgdata")
        .arg(target.path().join("running")));
    assert_clean_failure(&out, "running PostgreSQL");
    pg.stop();

    // A pgdata snapshot with one flipped byte is refused, and nothing is left behind.
    let dir = pg_tempdir();
    let url = format!("file://{}", dir.path().join("plain").display());
    ok(zenith()
        .args([
            "export",
            "--snapshot_format",
            "pgdata",
            "--snapshot_path",
            &url,
            "--pgdata",
        ])
        .arg(&pg.data));
    let victim = dir.path().join("plain/global/pg_control");
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let out = run(zenith().args(["snapshot", "verify", "LATEST", "--storage", &url]));
    let err = assert_clean_failure(&out, "SHA-256");
    assert!(err.contains("global/pg_control"), "{err}");
    let out = run(zenith()
        .args([
            "import",
            "--snapshot_format",
            "pgdata",
            "--snapshot_path",
            &url,
            "--pgdata",
        ])
        .arg(target.path().join("bad")));
    assert_clean_failure(&out, "global/pg_control");
    assert!(!target.path().join("bad").exists());
}

/// Extracts a basebackup export the way a user would with tar, and runs pg_verifybackup.
fn verify_with_postgres_tools(pg: &PgCluster, dir: &Path, compressed: bool) {
    let target = pg_tempdir();
    let root = target.path().join("x");
    std::fs::create_dir_all(root.join("pg_wal")).unwrap();
    let (ext, flag) = if compressed {
        (".tar.zst", "--zstd")
    } else {
        (".tar", "-v")
    };
    for (archive, into) in [("base", root.clone()), ("pg_wal", root.join("pg_wal"))] {
        let out = Command::new("tar")
            .arg("-C")
            .arg(&into)
            .arg(flag)
            .arg("-xf")
            .arg(dir.join(format!("{archive}{ext}")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::copy(dir.join("backup_manifest"), root.join("backup_manifest")).unwrap();
    let out = Command::new(pg.install.bin("pg_verifybackup"))
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_verifybackup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn basebackup_format_is_what_pg_basebackup_writes() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 1);
    let connstr = format!("postgresql://postgres@127.0.0.1:{}/postgres", pg.port);
    let dir = pg_tempdir();
    for compressed in [true, false] {
        let store = dir.path().join(if compressed { "zst" } else { "plain" });
        let url = format!("file://{}", store.display());
        let mut cmd = zenith();
        cmd.args([
            "export",
            "--snapshot_format",
            "basebackup",
            "--snapshot_path",
            &url,
            "--connstr",
            &connstr,
        ]);
        if !compressed {
            cmd.arg("--no-compress");
        }
        ok(&mut cmd);
        verify_with_postgres_tools(&pg, &store, compressed);
    }
    let before = content(&pg);
    pg.stop();

    // zenith's own export, restored by zenith, starts and holds the data.
    let target = pg_tempdir();
    let url = format!("file://{}", dir.path().join("zst").display());
    ok(zenith().args(["snapshot", "verify", "LATEST", "--storage", &url]));
    ok(zenith()
        .args([
            "import",
            "--snapshot_format",
            "basebackup",
            "--snapshot_path",
            &url,
            "--pgdata",
        ])
        .arg(target.path().join("a")));
    let mut a = PgCluster::at(&pg.install, &target.path().join("a"));
    a.start();
    assert_eq!(content(&a), before);
    a.stop();
    assert!(a.checksums_ok().contains("Bad checksums:  0"));
}

#[test]
fn backups_made_by_pg_basebackup_import() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 1);
    let before = content(&pg);
    let connstr = format!("postgresql://postgres@127.0.0.1:{}/postgres", pg.port);
    let dir = pg_tempdir();
    let target = pg_tempdir();
    for (name, extra) in [("plain", None), ("zstd", Some("--compress=zstd"))] {
        let backup = dir.path().join(name);
        let mut cmd = Command::new(pg.install.bin("pg_basebackup"));
        cmd.args([
            "-d",
            &connstr,
            "-Ft",
            "-Xs",
            "-c",
            "fast",
            "--no-sync",
            "-D",
        ])
        .arg(&backup);
        if let Some(extra) = extra {
            cmd.arg(extra);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let data = target.path().join(name);
        let out = ok(zenith()
            .args([
                "import",
                "--snapshot_format",
                "basebackup",
                "--snapshot_path",
            ])
            .arg(&backup)
            .arg("--pgdata")
            .arg(&data));
        assert!(out.contains("files checked"), "{out}");
        let mut copy = PgCluster::at(&pg.install, &data);
        copy.start();
        assert_eq!(content(&copy), before, "{name}");
        copy.stop();
    }

    // The same backup with one flipped byte in base.tar is refused, and leaves nothing.
    let backup = dir.path().join("plain");
    let tar = backup.join("base.tar");
    let mut bytes = std::fs::read(&tar).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&tar, bytes).unwrap();
    let out = run(zenith()
        .args([
            "import",
            "--snapshot_format",
            "basebackup",
            "--snapshot_path",
        ])
        .arg(&backup)
        .arg("--pgdata")
        .arg(target.path().join("bad")));
    assert_clean_failure(&out, "is corrupt");
    assert!(!target.path().join("bad").exists());
}

#[test]
fn hostile_archives_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("evil");
    std::fs::create_dir_all(&store).unwrap();
    // A tar whose entry climbs out of the target, with a backup_manifest that lists it.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(4);
    header.set_mode(0o600);
    header.set_entry_type(tar::EntryType::Regular);
    // set_path refuses "..", so write the raw name the way a hostile tool would.
    header.as_gnu_mut().unwrap().name[..11].copy_from_slice(b"../escaped\0");
    header.set_cksum();
    builder.append(&header, &b"evil"[..]).unwrap();
    std::fs::write(store.join("base.tar"), builder.into_inner().unwrap()).unwrap();
    std::fs::write(
        store.join("pg_wal.tar"),
        tar::Builder::new(Vec::new()).into_inner().unwrap(),
    )
    .unwrap();
    let text = "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/1\", \"End-LSN\": \"0/2\" }\n],\n";
    use sha2::Digest;
    let manifest = format!(
        "{text}\"Manifest-Checksum\": \"{}\"}}\n",
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    );
    std::fs::write(store.join("backup_manifest"), manifest).unwrap();
    let out = run(zenith()
        .args([
            "import",
            "--snapshot_format",
            "basebackup",
            "--snapshot_path",
        ])
        .arg(&store)
        .arg("--pgdata")
        .arg(dir.path().join("t/restored")));
    assert_clean_failure(&out, "'..'");
    assert!(!dir.path().join("t/escaped").exists() && !dir.path().join("escaped").exists());
    assert!(!dir.path().join("t/restored").exists());
}

#[test]
fn exports_and_deletes_exclude_each_other() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s");
    let url = format!("file://{}", store.display());
    ok(zenith()
        .args(["export", "--snapshot_path", &url, "--name", "a", "--pgdata"])
        .arg(&pg.data));
    ok(zenith()
        .args(["export", "--snapshot_path", &url, "--name", "b", "--pgdata"])
        .arg(&pg.data));
    // A live export (its lock freshly written): a delete removes the snapshot but collects nothing.
    std::fs::create_dir_all(store.join("locks")).unwrap();
    std::fs::write(store.join("locks/export-feedfacefeedface.lock"), "now").unwrap();
    let out = ok(zenith().args([
        "snapshot",
        "delete",
        "a",
        "--storage",
        &url,
        "--grace",
        "0s",
    ]));
    assert!(
        out.contains("deleted snapshot") && out.contains("an export is running"),
        "{out}"
    );
    std::fs::remove_file(store.join("locks/export-feedfacefeedface.lock")).unwrap();
    // A live collection: an export is refused, and says why.
    std::fs::write(store.join("locks/gc-feedfacefeedface.lock"), "now").unwrap();
    let out = run(zenith()
        .args(["export", "--snapshot_path", &url, "--pgdata"])
        .arg(&pg.data));
    assert_clean_failure(&out, "collecting unused data");
    assert_eq!(stored_sizes(&url).len(), 1);
    // A pgdata export refuses a destination that is not empty.
    let out = run(zenith()
        .args([
            "export",
            "--snapshot_format",
            "pgdata",
            "--snapshot_path",
            &url,
            "--pgdata",
        ])
        .arg(&pg.data));
    assert_clean_failure(&out, "is not empty");
}

#[test]
fn wal_archives_with_archive_status_markers_import() {
    use sha2::Digest;
    // What pg_basebackup -Xs writes when it finished streaming a segment: a .done marker.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("bb");
    std::fs::create_dir_all(&store).unwrap();
    let tar_of = |files: &[(&str, &[u8])]| {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o600);
            header.set_entry_type(tar::EntryType::Regular);
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    };
    std::fs::write(store.join("base.tar"), tar_of(&[("PG_VERSION", b"15\n")])).unwrap();
    std::fs::write(
        store.join("pg_wal.tar"),
        tar_of(&[
            ("000000010000000000000001", b"wal"),
            ("archive_status/000000010000000000000001.done", b""),
        ]),
    )
    .unwrap();
    let text = format!(
        "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{{ \"Path\": \"PG_VERSION\", \"Size\": 3, \"Last-Modified\": \"2026-11-21 15:38:28 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"8a744722\" }}\n],\n\"WAL-Ranges\": [\n{{ \"Timeline\": 1, \"Start-LSN\": \"0/1\", \"End-LSN\": \"0/2\" }}\n],\n"
    );
    let manifest = format!(
        "{text}\"Manifest-Checksum\": \"{}\"}}\n",
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    );
    std::fs::write(store.join("backup_manifest"), manifest).unwrap();
    let target = dir.path().join("restored");
    ok(zenith()
        .args([
            "import",
            "--snapshot_format",
            "basebackup",
            "--snapshot_path",
        ])
        .arg(&store)
        .arg("--pgdata")
        .arg(&target));
    assert_eq!(std::fs::read(target.join("PG_VERSION")).unwrap(), b"15\n");
    assert!(target
        .join("pg_wal/archive_status/000000010000000000000001.done")
        .exists());
    assert_eq!(
        std::fs::read(target.join("pg_wal/000000010000000000000001")).unwrap(),
        b"wal"
    );
}

/// Every regular file under `root`, by relative path, with its content's hash.
fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::Digest;
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let sum = sha2::Sha256::digest(std::fs::read(e.path()).unwrap());
            (rel, hex::encode(sum))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_over_a_newer_state_writes_the_same_tree_as_a_fresh_one() {
    use zenith::snapshot::zenith as native;
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    pg.start();
    populate(&pg, 2);
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("s").display());
    let store = zenith::storage::open(&url).await.unwrap();
    let first = native::pack_dir(&pg.data, store.clone(), &Default::default(), None)
        .await
        .unwrap()
        .manifest;
    pg.start();
    pg.sql("update pgbench_accounts set abalance = abalance + 7 where aid % 3000 = 0");
    pg.sql("create table later as select generate_series(1, 5000) i");
    pg.stop();
    let second = native::pack_dir(&pg.data, store.clone(), &Default::default(), None)
        .await
        .unwrap()
        .manifest;

    let out = pg_tempdir();
    let fresh = out.path().join("fresh");
    let over = out.path().join("over");
    native::unpack(store.as_ref(), &first, &fresh, &Default::default())
        .await
        .unwrap();
    let basis = native::Basis {
        dir: &pg.data,
        manifest: &second,
    };
    let report = native::unpack_over(store.as_ref(), &first, &over, basis, &Default::default())
        .await
        .unwrap();
    // Only the blocks that differ were written (and the WAL, which is never taken over).
    eprintln!(
        "{} of {} bytes written",
        report.bytes_restored, first.total_size
    );
    assert!(
        report.bytes_restored < first.total_size / 2,
        "{} of {} bytes written",
        report.bytes_restored,
        first.total_size
    );
    assert_eq!(tree(&over), tree(&fresh));
    // The files were taken over, not copied.
    assert!(!pg.data.join("global/pg_control").exists());
}

/// A page damaged before the snapshot was taken, in a cluster without data checksums:
/// every stored block matches its checksum, so plain verification passes; `verify --boot`
/// starts the snapshot and pg_amcheck finds the damage. A sound snapshot boots clean, and
/// the throwaway pg leaves nothing behind.
#[test]
fn verify_boot_finds_a_page_damaged_before_the_snapshot() {
    let Some(mut pg) = PgCluster::init() else {
        return;
    };
    as_pg_ok(&pg, &["--disable"]);
    pg.start();
    pg.sql(
        "create table t (i int primary key, v text); \
         insert into t select g, md5(g::text) from generate_series(1, 2000) g; checkpoint",
    );
    let file = pg.sql("select pg_relation_filepath('t')");
    pg.stop();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("s").display());
    ok(zenith()
        .args([
            "export",
            "--snapshot_path",
            &url,
            "--name",
            "sound",
            "--pgdata",
        ])
        .arg(&pg.data));
    let booted = ok(zenith().args(["snapshot", "verify", "sound", "--storage", &url, "--boot"]));
    assert!(booted.contains("found nothing"), "{booted}");

    // The first line pointer of the table's first page now points past the page's end.
    let path = pg.data.join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[24..28].copy_from_slice(&[0xff, 0x7f, 0xff, 0x7f]);
    std::fs::write(&path, &bytes).unwrap();
    ok(zenith()
        .args([
            "export",
            "--snapshot_path",
            &url,
            "--name",
            "damaged",
            "--pgdata",
        ])
        .arg(&pg.data));
    let plain = ok(zenith().args(["snapshot", "verify", "damaged", "--storage", &url]));
    assert!(plain.contains("is intact"), "{plain}");
    let out = run(zenith().args(["snapshot", "verify", "damaged", "--storage", &url, "--boot"]));
    let stderr = assert_clean_failure(&out, "is damaged: pg_amcheck reported");
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains("\"postgres.public.t\""),
        "{stdout}\n{stderr}"
    );
    // The throwaway pgs are gone, directories and processes alike.
    let tmp = std::env::temp_dir();
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("verify-boot-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn as_pg_ok(pg: &PgCluster, args: &[&str]) {
    let install = zenith::compute::find_postgres().unwrap();
    let out = crate::support::pg::as_pg(&install, "pg_checksums")
        .args(args)
        .arg("-D")
        .arg(&pg.data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
