//! Test support: the built `zenith` binary in a controlled environment, and real servers
//! (s3s-fs, a Garage cluster) started on 127.0.0.1 with free ports for the test that needs
//! them and stopped when it ends.
//!
//! A test whose server cannot be found skips on a laptop, but fails when `CI` is set.

pub mod pg;
pub mod s3;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether we run under CI, where a missing dependency is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| !v.is_empty() && v != "false" && v != "0")
        .unwrap_or(false)
}

/// Returns `found`, or explains the skip; panics under CI.
pub fn require<T>(what: &str, found: Option<T>) -> Option<T> {
    if found.is_none() {
        if in_ci() {
            panic!("{what} is required under CI but was not found; run the tests through scripts/test.sh");
        }
        eprintln!("SKIP: {what} not found (scripts/test.sh installs it)");
    }
    found
}

/// A helper program: `$ZENITH_TEST_<NAME>_BIN`, ~/.cache/zenith/tools/bin/NAME, or PATH.
pub fn tool(name: &str) -> Option<PathBuf> {
    let var = format!("ZENITH_TEST_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&var) {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".cache/zenith/tools/bin").join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The repository root (for scripts).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `zenith` with an environment free of the developer's AWS and zenith settings, so that
/// a test sees only what it sets. The instance metadata service is never asked.
pub fn zenith() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zenith"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().to_string();
        if key.starts_with("AWS_") || key.starts_with("ZENITH_") || key.starts_with("WALG_") {
            cmd.env_remove(&key);
        }
    }
    // A test that forgets --repo-dir must never touch the machine's own repo.
    cmd.env("ZENITH_REPO_DIR", "/nonexistent/zenith-test/repo")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/zenith-test/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/zenith-test/credentials",
        )
        .env("NO_COLOR", "1");
    cmd
}

/// Runs a command to completion, capturing its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("failed to spawn")
}

/// Stdout and stderr as text.
pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts the user-facing shape of a failure: non-zero exit, one line on stderr that
/// contains `needle`, no panic.
pub fn assert_clean_failure(out: &Output, needle: &str) -> String {
    let (stdout, stderr) = text(out);
    assert!(
        !out.status.success(),
        "expected failure, got success\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "panic: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr does not mention {needle:?}: {stderr}"
    );
    stderr
}

/// Peak resident memory of this process so far (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
