//! Real S3 servers for tests: s3s-fs (one process, checks SigV4 signatures) and a 3-node
//! Garage cluster with replication factor 3 (started by `scripts/garage-cluster.sh`).

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zenith::storage::StaticCredentials;
use zenith::storage::{S3Options, S3Storage};

use super::{free_port, repo_root, require, tool};

/// An S3 endpoint with a bucket the test may use freely.
pub struct S3Server {
    pub kind: &'static str,
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
    garage_nodes: usize,
}

impl S3Server {
    /// Starts s3s-fs on a free port; `None` (skip) when it is not installed and not in CI.
    pub fn s3s_fs() -> Option<S3Server> {
        let bin = require("s3s-fs", tool("s3s-fs"))?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("zenith-test")).unwrap();
        let port = free_port();
        let (access_key, secret_key) = (
            "zenithtestkey".to_string(),
            "zenith-test-secret-0123456789".to_string(),
        );
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap());
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("cannot start s3s-fs");
        wait_for_port(port);
        Some(S3Server {
            kind: "s3s-fs",
            endpoint: format!("http://127.0.0.1:{port}"),
            region: "us-east-1".into(),
            bucket: "zenith-test".into(),
            access_key,
            secret_key,
            dir,
            child: Some(child),
            garage_nodes: 0,
        })
    }

    /// Starts a Garage cluster of `nodes` nodes (replication factor = nodes). S3 requests go
    /// to node 1; tests kill the others.
    pub fn garage(nodes: usize) -> Option<S3Server> {
        let bin = require("garage", tool("garage"))?;
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/garage-cluster.sh"))
            .arg("start")
            .arg(dir.path())
            .arg(nodes.to_string())
            .env("GARAGE_BIN", &bin)
            .output()
            .expect("cannot run garage-cluster.sh");
        assert!(
            out.status.success(),
            "garage-cluster.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env: HashMap<String, String> = std::fs::read_to_string(dir.path().join("env"))
            .unwrap()
            .lines()
            .filter_map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Some(S3Server {
            kind: "garage",
            endpoint: env["GARAGE_ENDPOINT"].clone(),
            region: env["GARAGE_REGION"].clone(),
            bucket: env["GARAGE_BUCKET"].clone(),
            access_key: env["GARAGE_ACCESS_KEY"].clone(),
            secret_key: env["GARAGE_SECRET_KEY"].clone(),
            dir,
            child: None,
            garage_nodes: nodes,
        })
    }

    /// Library options with explicit credentials, `part_size` 5 MiB and a quick retry budget.
    pub fn options(&self) -> S3Options {
        let mut o = S3Options::default();
        o.endpoint = Some(self.endpoint.clone());
        o.region = Some(self.region.clone());
        o.force_path_style = true;
        o.part_size = 5 << 20;
        o.retry.max_attempts = 4;
        o.retry.base_delay = Duration::from_millis(50);
        o.retry.max_delay = Duration::from_millis(500);
        o.credentials = Some(StaticCredentials {
            access_key_id: self.access_key.clone(),
            secret_access_key: self.secret_key.clone(),
            session_token: None,
        });
        o
    }

    /// A storage under `prefix` in the test bucket.
    pub async fn storage(&self, prefix: &str) -> S3Storage {
        S3Storage::new(&self.bucket, prefix, self.options())
            .await
            .unwrap()
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The environment a user would set for this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_S3_FORCE_PATH_STYLE", "true".into()),
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }

    /// Kills Garage node `n` (1-based) with SIGKILL.
    pub fn kill_garage_node(&self, n: usize) {
        assert!(n >= 1 && n <= self.garage_nodes, "no garage node {n}");
        let pidfile = self.dir.path().join(format!("node{n}/pid"));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        // Reap: the node is a child of the script's shell, already gone; wait until the
        // process has really exited so the test's timing is deterministic.
        let deadline = Instant::now() + Duration::from_secs(10);
        while PathBuf::from(format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(false)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.garage_nodes > 0 {
            let _ = Command::new("bash")
                .arg(repo_root().join("scripts/garage-cluster.sh"))
                .arg("stop")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// The child gets SIGKILL if the test process dies, so no server outlives its test.
fn die_with_parent(cmd: &mut Command) {
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "server on port {port} did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl S3Server {
    /// Starts Garage node `n` again after [`S3Server::kill_garage_node`].
    pub fn restart_garage_node(&self, n: usize) {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/garage-cluster.sh"))
            .arg("restart")
            .arg(self.dir.path())
            .arg(n.to_string())
            .env("GARAGE_BIN", tool("garage").unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl S3Server {
    /// The file s3s-fs keeps object `key` of the test bucket in (to damage it on purpose).
    pub fn s3s_fs_object(&self, key: &str) -> PathBuf {
        assert_eq!(self.kind, "s3s-fs", "only s3s-fs keeps objects as files");
        self.dir.path().join("root").join(&self.bucket).join(key)
    }
}
