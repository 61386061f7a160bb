//! Real PostgreSQL clusters for tests, created with data checksums on. When the tests run as
//! root (as CI does), PostgreSQL runs as the `postgres` account, as zenith itself does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zenith::compute::{find_postgres, is_root, postgres_account, PgInstall};

use super::{free_port, require};

/// A data directory and, while started, its server on a Unix socket and 127.0.0.1.
pub struct PgCluster {
    pub install: PgInstall,
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    running: bool,
}

/// Runs a PostgreSQL program as the account PostgreSQL runs as.
pub fn as_pg(install: &PgInstall, program: &str) -> Command {
    if is_root() {
        let account = postgres_account().expect("a postgres account");
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", account.uid))
            .arg(format!("--regid={}", account.gid))
            .arg("--init-groups")
            .arg(install.bin(program));
        cmd
    } else {
        Command::new(install.bin(program))
    }
}

fn check(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A temporary directory PostgreSQL's account may use.
pub fn pg_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    zenith::compute::hand_to_postgres_user(dir.path()).unwrap();
    dir
}

impl PgCluster {
    /// `initdb --data-checksums` in a fresh directory; `None` (skip) without PostgreSQL
    /// outside CI.
    pub fn init() -> Option<PgCluster> {
        let install = require("PostgreSQL", find_postgres().ok())?;
        let dir = pg_tempdir();
        let data = dir.path().join("data");
        check(
            as_pg(&install, "initdb")
                .args([
                    "--data-checksums",
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data)
                .output()
                .unwrap(),
            "initdb",
        );
        Some(PgCluster {
            install,
            dir,
            data,
            port: 0,
            running: false,
        })
    }

    /// A cluster object for an existing data directory (e.g. one zenith restored).
    pub fn at(install: &PgInstall, data: &Path) -> PgCluster {
        let dir = pg_tempdir();
        PgCluster {
            install: install.clone(),
            dir,
            data: data.to_path_buf(),
            port: 0,
            running: false,
        }
    }

    /// Takes charge of a server started on this data directory by other means (stopped
    /// when the cluster is dropped).
    pub fn adopt_running(&mut self) {
        self.running = true;
    }

    pub fn start(&mut self) {
        self.port = free_port();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let out = as_pg(&self.install, "pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("log"))
            .arg("start")
            .output()
            .unwrap();
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}\nserver log:\n{log}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            check(
                as_pg(&self.install, "pg_ctl")
                    .args(["-w", "-m", "fast", "-D"])
                    .arg(&self.data)
                    .arg("stop")
                    .output()
                    .unwrap(),
                "pg_ctl stop",
            );
            self.running = false;
        }
    }

    /// Runs SQL, returns the unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        check(
            as_pg(&self.install, "psql")
                .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(self.dir.path())
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-c",
                    sql,
                ])
                .output()
                .unwrap(),
            sql,
        )
        .trim()
        .to_string()
    }

    /// Runs a client program (pgbench, pg_amcheck...) against the server.
    pub fn client(&self, program: &str, args: &[&str]) -> String {
        check(
            as_pg(&self.install, program)
                .arg("-h")
                .arg(self.dir.path())
                .args(["-p", &self.port.to_string(), "-U", "postgres"])
                .args(args)
                .output()
                .unwrap(),
            program,
        )
    }

    /// `pg_checksums --check` on the (stopped) data directory.
    pub fn checksums_ok(&self) -> String {
        check(
            as_pg(&self.install, "pg_checksums")
                .arg("--check")
                .arg("-D")
                .arg(&self.data)
                .output()
                .unwrap(),
            "pg_checksums",
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_pg(&self.install, "pg_ctl")
                .args(["-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop")
                .output();
        }
    }
}
