//! Defects found by using zenith as a new user would, each reproduced here: leftovers of
//! killed runs, exports onto a full disk, spoofable snapshot names, unclear errors. Every
//! test failed before its fix.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::checkout_faults::{fill, SmallDisk};
use crate::local::{connstr_of, http, ok, psql, z, TestRepo};
use crate::support::{assert_clean_failure, in_ci, run, text};

/// Entries of `dir` (none when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Files under `dir` whose name contains `needle`, at any depth.
fn files_named(dir: &Path, needle: &str) -> Vec<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(needle))
        .map(|e| e.path().display().to_string())
        .collect()
}

/// Bytes of the files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Spawns `cmd` and kills it (SIGKILL) once `ready` holds; fails if it ends first.
fn kill_when(cmd: &mut Command, what: &str, mut ready: impl FnMut() -> bool) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the command ended before {what}"
        );
        assert!(Instant::now() < deadline, "no {what} after 120 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn what_killed_exports_and_pushes_leave_is_collected_by_the_next_run() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    fill(&main, "big", 120);
    ok(z(&repo.path).args(["snapshot", "create", "main@big"]));
    let out = repo.path.with_file_name("out");

    // An export killed while it restores into the repo's scratch space...
    let tmp = repo.path.join("tmp");
    kill_when(
        z(&repo.path)
            .args(["--no-progress", "export", "main@big", "--snapshot_format"])
            .args([
                "pgdata",
                "--snapshot_path",
                &out.join("killed").display().to_string(),
            ]),
        "the export's scratch data appeared",
        || bytes_under(&tmp) > 20 << 20,
    );
    assert!(!entries(&tmp).is_empty(), "the killed export left nothing?");
    // ... is cleaned up by the next export.
    ok(z(&repo.path)
        .args(["--no-progress", "export", "main@big", "--snapshot_format"])
        .args([
            "basebackup",
            "--snapshot_path",
            &out.join("bb").display().to_string(),
        ]));
    assert_eq!(entries(&tmp), Vec::<String>::new(), "leftovers in {tmp:?}");

    // A push killed while it writes a pack leaves a temporary file and its lock...
    let dest = out.join("pushed");
    let url = format!("file://{}", dest.display());
    kill_when(
        z(&repo.path).args(["--no-progress", "push", "main@big", &url]),
        "a pack being written",
        || !files_named(&dest.join("packs"), ".zenith-tmp-").is_empty(),
    );
    assert!(!files_named(&dest.join("locks"), "export-").is_empty());
    // ... the rerun sends the rest, and collects the temporary files of the dead push...
    ok(z(&repo.path).args(["--no-progress", "push", "main@big", &url]));
    assert_eq!(files_named(&dest, ".zenith-tmp-"), Vec::<String>::new());
    // ... and the dead push's lock does not keep a delete from freeing space.
    let deleted = ok(z(&repo.path).args([
        "snapshot",
        "delete",
        "main@big",
        "--storage",
        &url,
        "--grace",
        "0s",
    ]));
    assert!(deleted.contains("freed"), "{deleted}");
    assert!(!deleted.contains("kept its data"), "{deleted}");
    assert_eq!(
        files_named(&dest.join("locks"), "lock"),
        Vec::<String>::new()
    );
    ok(z(&repo.path).arg("stop"));
}

#[test]
fn an_export_onto_a_full_disk_says_so_and_leaves_nothing() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    let Some(disk) = SmallDisk::mount(&repo.path.with_file_name("disk"), 40) else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    fill(&main, "big", 60);
    ok(z(&repo.path).args(["snapshot", "create", "main@big"]));
    let free = disk.free_bytes();

    for (format, target) in [("pgdata", "plain"), ("basebackup", "tars")] {
        let target = disk.dir.join(target);
        let out = run(z(&repo.path)
            .args(["--no-progress", "export", "main@big", "--no-compress"])
            .args(["--snapshot_format", format, "--snapshot_path"])
            .arg(&target));
        let err = assert_clean_failure(&out, "free some space");
        eprintln!("{format} export onto a full disk: {err}");
        assert!(err.contains("disk is full"), "{err}");
        assert!(err.contains(&disk.dir.display().to_string()), "{err}");
        assert!(!err.contains("broken pipe"), "{err}");
        // Nothing of it stays, and the space is free again.
        assert!(
            !target.exists(),
            "{target:?} left behind: {:?}",
            entries(&target)
        );
        assert!(disk.free_bytes() >= free - 64 * 1024, "the disk stays full");
    }
    ok(z(&repo.path).arg("stop"));
}

#[test]
fn snapshot_names_are_checked_and_names_from_storages_print_safely() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let long = format!("main@{}", "a".repeat(300));
    for bad in [
        "main@../x",
        "main@a/b",
        "main@",
        "main@line\nbreak",
        "main@\u{1b}[31mred",
        &long,
    ] {
        let out = run(z(&repo.path).args(["snapshot", "create", bad]));
        let err = assert_clean_failure(&out, "is not a snapshot name");
        assert!(!err.contains('\u{1b}'), "{err}");
    }
    // Through the API too.
    let api = crate::local::status(&repo.path)["zenith_local"]["api"]
        .as_str()
        .unwrap()
        .to_string();
    let port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    let token = std::fs::read_to_string(repo.path.join("api-token")).unwrap();
    let (code, reply) = http(
        port,
        "POST",
        "/snapshots",
        Some(token.trim()),
        Some(r#"{"name": "main@\u001b[2Jspoof\nrow"}"#),
    );
    assert_eq!(code, 400, "{reply}");
    assert!(
        !ok(z(&repo.path).args(["snapshot", "list"])).contains("spoof"),
        "a refused name was stored"
    );

    // `export --name` names the exported snapshot, and the id printed is the one stored.
    ok(z(&repo.path).args(["snapshot", "create", "main@mine"]));
    let out = repo.path.with_file_name("out");
    let plain = out.join("plain");
    let said = ok(z(&repo.path)
        .args([
            "export",
            "main@mine",
            "--snapshot_format",
            "pgdata",
            "--name",
            "shared",
        ])
        .arg("--snapshot_path")
        .arg(&plain));
    let id = said
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no id in {said}"))
        .to_string();
    let shown = ok(z(&repo.path)
        .args(["snapshot", "show", &id, "--json", "--storage"])
        .arg(&plain));
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["name"], "shared", "{said}");
    let store = format!("file://{}", out.join("zenith").display());
    ok(z(&repo.path).args([
        "export",
        "main@mine",
        "--name",
        "team-copy",
        "--snapshot_path",
        &store,
    ]));
    let listed = ok(z(&repo.path).args(["snapshot", "list", "--storage", &store]));
    assert!(listed.contains("team-copy"), "{listed}");

    // A storage whose manifest carries a hostile name: listed on one line, escaped.
    let manifest = walkdir::WalkDir::new(out.join("zenith/snapshots"))
        .into_iter()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .unwrap()
        .into_path();
    let text = std::fs::read_to_string(&manifest).unwrap();
    let evil = text.replace(
        "\"team-copy\"",
        "\"x\\n01234567890123456789  2026-01-01  fake-row\\u001b[2J\"",
    );
    assert_ne!(text, evil);
    std::fs::write(&manifest, evil).unwrap();
    let listed = ok(z(&repo.path).args(["snapshot", "list", "--storage", &store]));
    assert!(!listed.contains('\u{1b}'), "{listed:?}");
    assert_eq!(listed.lines().count(), 2, "{listed}");
    ok(z(&repo.path).arg("stop"));
}

#[test]
fn a_zenith_local_killed_during_a_checkout_is_named_with_what_to_do() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let main = connstr_of(&repo.path, "main");
    fill(&main, "big", 150);
    ok(z(&repo.path).args(["snapshot", "create", "main@big"]));
    psql(&main, "drop table big");
    let pid: i32 = std::fs::read_to_string(repo.path.join("zenith-local.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let checkout = z(&repo.path)
        .args(["--no-progress", "pg", "checkout", "main", "main@big"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once the checkout is under way (main's state kept, the restore begun).
    let marker = repo.path.join("pgs/main/incomplete");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the checkout did not begin");
        std::thread::sleep(Duration::from_millis(2));
    }
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let out = checkout.wait_with_output().unwrap();
    let err = assert_clean_failure(&out, "zenith-local stopped");
    assert!(err.contains("zenith start"), "{err}");
    assert!(!err.contains("not HTTP"), "{err}");
}

#[test]
fn a_base_backup_with_a_duplicate_entry_is_called_corrupt() {
    let Some(mut pg) = crate::support::pg::PgCluster::init() else {
        return;
    };
    pg.stop();
    let dir = crate::support::pg::pg_tempdir();
    let backup = dir.path().join("backup");
    ok(crate::support::zenith()
        .args([
            "export",
            "--snapshot_format",
            "basebackup",
            "--no-compress",
            "--pgdata",
        ])
        .arg(&pg.data)
        .arg("--snapshot_path")
        .arg(&backup));
    // The same member twice, same content: a damaged or hostile archive.
    let tar_path = backup.join("base.tar");
    let mut input = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    let rewritten = dir.path().join("base.tar.new");
    let mut out = tar::Builder::new(std::fs::File::create(&rewritten).unwrap());
    let mut copied = 0;
    for entry in input.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        let times = if entry.path().unwrap().ends_with("PG_VERSION") {
            2
        } else {
            1
        };
        for _ in 0..times {
            out.append(&header, data.as_slice()).unwrap();
            copied += 1;
        }
    }
    out.into_inner().unwrap();
    assert!(copied > 2);
    std::fs::rename(&rewritten, &tar_path).unwrap();

    let target = dir.path().join("restored");
    let out = run(crate::support::zenith()
        .args([
            "import",
            "--snapshot_format",
            "basebackup",
            "--snapshot_path",
        ])
        .arg(&backup)
        .arg("--pgdata")
        .arg(&target));
    let err = assert_clean_failure(&out, "duplicate entry PG_VERSION");
    assert!(err.contains("corrupt"), "{err}");
    assert!(!target.exists());
}

#[test]
fn a_repo_the_postgres_account_cannot_enter_is_refused_up_front() {
    if !zenith::compute::is_root() {
        // Only root hands PostgreSQL to another account; CI runs as root.
        assert!(!in_ci(), "CI runs as root");
        eprintln!("SKIP: not root");
        return;
    }
    // What `mktemp -d` makes: mode 0700, owned by root.
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run(z(dir.path()).arg("start"));
    let err = assert_clean_failure(&out, "chmod o+x");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    assert_eq!(
        entries(dir.path()),
        Vec::<String>::new(),
        "the directory was changed"
    );
}

#[test]
fn the_bearer_scheme_is_case_insensitive_and_unreachable_storages_say_so_briefly() {
    let Some(repo) = TestRepo::new() else {
        return;
    };
    ok(z(&repo.path).arg("start"));
    let status = crate::local::status(&repo.path);
    let port: u16 = status["zenith_local"]["api"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let token = std::fs::read_to_string(repo.path.join("api-token")).unwrap();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(
            stream,
            "GET /pgs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {scheme} {}\r\nConnection: close\r\n\r\n",
            token.trim()
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{scheme}: {reply}");
    }
    ok(z(&repo.path).arg("stop"));

    // An endpoint nobody listens on: the hint, not the SDK's debug dump.
    let out = run(crate::support::zenith()
        .args(["storage", "check", "s3://bucket/prefix"])
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", crate::support::free_port()),
        )
        .env("AWS_ACCESS_KEY_ID", "key")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_REGION", "us-east-1")
        .env("ZENITH_RETRY_ATTEMPTS", "1"));
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    let all = format!("{stdout}{stderr}");
    eprintln!("unreachable endpoint: {all}");
    for line in all.lines() {
        assert!(line.len() < 400, "a {}-character line: {line}", line.len());
        assert!(!line.contains("DispatchFailure {"), "{line}");
        assert!(!line.contains("ConnectorError {"), "{line}");
    }
    assert!(all.contains("AWS_ENDPOINT_URL"), "{all}");
}
