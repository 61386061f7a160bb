//! The `zenith` binary as a user runs it: the command surface, `storage check` against every
//! backend, and bad input, which must end in one clear line, a non-zero exit and no panic.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use zenith::storage::Storage;

use crate::support::s3::S3Server;
use crate::support::{assert_clean_failure, run, text, zenith};

#[test]
fn help_shows_the_whole_command_surface() {
    let out = run(zenith().arg("--help"));
    assert!(out.status.success());
    let (stdout, _) = text(&out);
    for cmd in [
        "init",
        "start",
        "stop",
        "status",
        "import",
        "export",
        "push",
        "pull",
        "snapshot",
        "pg",
        "storage",
        "wal-push",
        "wal-fetch",
    ] {
        assert!(
            stdout.contains(&format!("\n  {cmd} ")),
            "--help lacks {cmd}:\n{stdout}"
        );
    }
    let (pg_help, _) = text(&run(zenith().args(["pg", "--help"])));
    for sub in [
        "create", "start", "stop", "promote", "destroy", "list", "show", "checkout",
    ] {
        assert!(
            pg_help.contains(&format!("\n  {sub} ")),
            "pg --help lacks {sub}"
        );
    }
    let (storage_help, _) = text(&run(zenith().args(["storage", "--help"])));
    for sub in ["attach", "detach", "list", "show", "check"] {
        assert!(
            storage_help.contains(&format!("\n  {sub} ")),
            "storage --help lacks {sub}"
        );
    }
}

#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    // `zenith … | head`: stdout is a pipe whose reader is already gone, so every write
    // fails with EPIPE, deterministically.
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let stdout = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let dir = tempfile::tempdir().unwrap();
    let out = zenith()
        .args(["storage", "check", "--size", "1MiB"])
        .arg(dir.path())
        .stdout(stdout)
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

#[test]
fn snapshot_diff_of_unknown_snapshots_says_so_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("s").display().to_string();
    std::fs::create_dir_all(&url).unwrap();
    let out = run(zenith().args(["snapshot", "diff", "a", "b", "--storage", &url]));
    assert_clean_failure(&out, "\"a\"");
}

#[test]
fn bad_urls_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regular-file");
    std::fs::write(&file, b"x").unwrap();
    for (url, needle) in [
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("ftp://x", "\"ftp\" is not supported"),
        ("file://relative/path", "absolute path"),
        (file.to_str().unwrap(), "not a directory"),
    ] {
        let out = run(zenith().args(["storage", "check", url]));
        let stderr = assert_clean_failure(&out, needle);
        if url.starts_with("s3") || url.starts_with("ftp") {
            assert!(stderr.contains("accepted forms"), "{stderr}");
        }
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file was touched");
}

#[test]
fn missing_credentials_are_one_clear_line() {
    let out = run(zenith()
        .args(["storage", "check", "s3://some-bucket/prefix"])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("AWS_REGION", "us-east-1"));
    let stderr = assert_clean_failure(&out, "no credentials found");
    assert!(stderr.contains("AWS_ACCESS_KEY_ID"), "{stderr}");
}

#[test]
fn bad_settings_name_the_variable() {
    let out = run(zenith()
        .args(["storage", "check", "s3://some-bucket/prefix"])
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .env("ZENITH_S3_PART_SIZE", "1MiB"));
    assert_clean_failure(&out, "ZENITH_S3_PART_SIZE");
    let out = run(zenith()
        .args(["storage", "check", "s3://some-bucket/prefix"])
        .env("AWS_ENDPOINT", "localhost:9000"));
    assert_clean_failure(&out, "must start with http:// or https://");
}

#[test]
fn storage_check_on_an_unwritable_directory_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = dir.path().join("readonly");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root ignores directory permissions (and CI runs as root): run zenith as `nobody` then,
    // from a copy of the binary that `nobody` can execute.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let bin = dir.path().join("zenith");
        std::fs::copy(env!("CARGO_BIN_EXE_zenith"), &bin).unwrap();
        let mut c = zenith();
        let mut wrapped = Command::new("setpriv");
        wrapped
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        for (k, v) in c.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        c = wrapped;
        c
    } else {
        zenith()
    };
    let out = run(cmd
        .args(["storage", "check", "--size", "6MiB"])
        .arg(&target));
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("FAIL  put") && stdout.contains("Permission denied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("permissions") && stdout.contains("NOT usable"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
}

fn check_json(cmd: &mut Command) -> serde_json::Value {
    let out = run(cmd.arg("--json"));
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "storage check failed:\n{stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let steps = report["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "put",
            "get",
            "head",
            "overwrite",
            "streamed put",
            "streamed get",
            "ranged get",
            "list",
            "delete",
            "missing key",
            "cleanup"
        ]
    );
    assert!(steps.iter().all(|s| s["ok"] == true), "{report:#}");
    assert!(report["upload_mib_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["download_mib_per_sec"].as_f64().unwrap() > 0.0);
    assert_eq!(report["cleaned_up"], true);
    report
}

#[test]
fn storage_check_passes_on_a_local_directory_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("dest").display());
    check_json(zenith().args(["storage", "check", "--size", "12MiB", &url]));
    let leftovers: Vec<_> = walkdir::WalkDir::new(dir.path())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");

    // --file: the user's own file goes up and comes back beside it, then is removed.
    let source = dir.path().join("mine.bin");
    std::fs::write(
        &source,
        zenith::util::testdata::PseudoRandom::new(5, 7 << 20).to_vec(),
    )
    .unwrap();
    let report =
        check_json(zenith().args(["storage", "check", "--file", source.to_str().unwrap(), &url]));
    assert!(
        report["steps"][4]["detail"]
            .as_str()
            .unwrap()
            .contains("7.0 MiB"),
        "{report:#}"
    );
    let files: Vec<_> = walkdir::WalkDir::new(dir.path())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .collect();
    assert_eq!(files.len(), 1, "only the source may remain: {files:?}");
}

async fn check_s3(server: S3Server) {
    let prefix = format!("check-{}", server.kind);
    let mut cmd = zenith();
    cmd.args(["storage", "check", "--size", "12MiB", &server.url(&prefix)]);
    for (k, v) in server.env() {
        cmd.env(k, v);
    }
    // Small parts, so the 12 MiB object really goes up in three parts.
    cmd.env("ZENITH_S3_PART_SIZE", "5MiB");
    check_json(&mut cmd);
    let left = server.storage(&prefix).await.list("").await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A wrong secret: exit 1, the report says access denied, the secret appears nowhere.
    let mut cmd = zenith();
    cmd.args(["storage", "check", "--size", "6MiB", &server.url(&prefix)]);
    for (k, v) in server.env() {
        cmd.env(k, v);
    }
    let secret = "wrong-secret-that-must-not-leak";
    cmd.env("AWS_SECRET_ACCESS_KEY", secret);
    let out = run(&mut cmd);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("access denied"), "{stdout}");
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "secret leaked"
    );
}

#[tokio::test]
async fn storage_check_passes_on_s3s_fs() {
    let Some(server) = S3Server::s3s_fs() else {
        return;
    };
    check_s3(server).await;
}

#[tokio::test]
async fn storage_check_passes_on_garage() {
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    check_s3(server).await;
}
