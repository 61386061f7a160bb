//! zenith console in a real browser: headless Chromium, driven by Playwright
//! (`tests/console/drive.py`), logs in with the link `zenith console` prints, sees main
//! running, takes a snapshot with the button, branches a pg from it, checks it out and
//! destroys the branch, each step checked through the CLI and psql as well; requests
//! without a session or the token are refused. The screenshots land in `docs/console/`.

use std::path::PathBuf;
use std::process::Command;

use crate::local::{connstr_of, ok, psql, status, z, TestRepo};

/// The Python with Playwright and the Chromium it drives (scripts/browser.sh installs
/// both; the test script exports where).
fn browser() -> Option<(PathBuf, PathBuf)> {
    let python = PathBuf::from(std::env::var_os("ZENITH_TEST_PYTHON")?);
    let chromium = PathBuf::from(std::env::var_os("ZENITH_TEST_CHROMIUM")?);
    (python.exists() && chromium.exists()).then_some((python, chromium))
}

#[test]
fn the_console_drives_pgs_and_snapshots_in_a_real_browser() {
    let Some((python, chromium)) = crate::support::require("Playwright and Chromium", browser())
    else {
        return;
    };
    let Some(a) = TestRepo::new() else {
        return;
    };
    ok(z(&a.path).arg("start"));
    let main = connstr_of(&a.path, "main");
    psql(
        &main,
        "create table t (i int); insert into t select generate_series(1, 1000)",
    );
    let team = a.path.with_file_name("team");
    ok(z(&a.path).args([
        "storage",
        "attach",
        "-n",
        "team",
        "--path",
        &format!("file://{}", team.display()),
    ]));
    let shown = status(&a.path);
    let console = shown["console_url"].as_str().unwrap().to_string();
    assert!(console.starts_with("http://127.0.0.1:"), "{console}");
    let printed = ok(z(&a.path).arg("status"));
    assert!(printed.contains(&console), "{printed}");

    let login = ok(z(&a.path).arg("console"));
    let login = login.lines().next().unwrap().to_string();
    assert!(login.starts_with(&format!("{console}#code=")), "{login}");
    let token = std::fs::read_to_string(a.path.join("api-token")).unwrap();
    assert!(!login.contains(token.trim()), "the token is in the link");

    let zenith = serde_json::json!([
        env!("CARGO_BIN_EXE_zenith"),
        "--repo-dir",
        a.path.display().to_string()
    ]);
    let install = zenith::compute::find_postgres().unwrap();
    let out = Command::new(python)
        .arg(crate::support::repo_root().join("tests/console/drive.py"))
        .arg(&login)
        .arg(crate::support::repo_root().join("docs/console"))
        .env("ZENITH_CMD", zenith.to_string())
        .env("CHROMIUM", chromium)
        .env("PSQL", install.bin("psql"))
        .output()
        .unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser run failed:\n{said}");
    assert!(said.contains("STEP done"), "{said}");

    // What the clicks did, seen through the CLI once more.
    let pgs = ok(z(&a.path).args(["pg", "list"]));
    assert!(!pgs.contains("feature"), "{pgs}");
    let snapshots = ok(z(&a.path).args(["snapshot", "list"]));
    assert!(
        snapshots.contains("main@console") && snapshots.contains("main@HEAD{0}"),
        "{snapshots}"
    );
    assert_eq!(
        psql(&connstr_of(&a.path, "main"), "select count(*) from t"),
        "1000"
    );
    ok(z(&a.path).arg("stop"));
}
