//! The repo directory: everything zenith-local keeps on one machine.
//!
//! ```text
//! config.toml          settings (ports, storage_dest); never credentials
//! api-token            bearer token of the REST API (mode 0600)
//! zenith-local.lock    held (flock) by the running zenith-local: one per repo
//! zenith-local.pid     its pid, while it runs
//! zenith-local.json    what it runs (written when ready)
//! logs/                zenith-local's log
//! pgs/<name>/          each pg: data/, node.json, postgres.log
//! ```

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::compute::node::{make_dir, write_private, Node};
use crate::compute::Account;

/// The port the main pg asks for first.
pub const DEFAULT_PG_PORT: u16 = 55432;
/// The REST API's port.
pub const DEFAULT_API_PORT: u16 = 3000;

/// `config.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where snapshots are pushed (a URL; credentials stay in the environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_dest: Option<String>,
    /// First port tried for the main pg (the next free one is used if it is taken); a new
    /// repo takes it from `$ZENITH_PG_PORT`, else 55432.
    #[serde(default = "default_pg_port")]
    pub pg_port: u16,
    /// Port of the REST API on 127.0.0.1 (the next free one is used if it is taken); a
    /// new repo takes it from `$ZENITH_API_PORT`, else 3000.
    #[serde(default = "default_api_port")]
    pub api_port: u16,
    /// Named storages, like git remotes: name → URL.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub storages: std::collections::BTreeMap<String, String>,
    /// Background pushes of the main pg to storage_dest.
    #[serde(default)]
    pub push: PushConfig,
}

/// `[push]` of config.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PushConfig {
    /// How often zenith-local snapshots the main pg and pushes it to storage_dest (when
    /// it changed), e.g. "5m"; "0" turns background pushes off. A push also runs at
    /// `zenith stop`.
    #[serde(default = "default_push_interval")]
    pub interval: String,
    /// After each background push, storage_dest keeps the newest `keep_last` unnamed
    /// snapshots, and every named one (0 with no keep_within: keep everything).
    #[serde(default = "default_keep_last")]
    pub keep_last: u32,
    /// Unnamed snapshots younger than this (e.g. "7d") stay too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
    /// A push also runs, before the interval is over, once the main pg has written this
    /// much WAL since the last background snapshot, e.g. "1GB"; "0" turns it off.
    #[serde(default = "default_push_wal")]
    pub wal: String,
}

/// Which unnamed snapshots of a storage stay: the newest `keep_last`, and those younger
/// than `keep_within`. Named snapshots always stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: u32,
    pub keep_within: Option<std::time::Duration>,
}

fn default_push_interval() -> String {
    "5m".into()
}

fn default_keep_last() -> u32 {
    48
}

fn default_push_wal() -> String {
    "1GB".into()
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            interval: default_push_interval(),
            keep_last: default_keep_last(),
            keep_within: None,
            wal: default_push_wal(),
        }
    }
}

impl PushConfig {
    /// The retention rule of config.toml; `None` when it keeps everything.
    pub fn retention(&self) -> anyhow::Result<Option<Retention>> {
        let keep_within = self
            .keep_within
            .as_deref()
            .map(crate::util::size::parse_duration)
            .transpose()
            .map_err(|e| anyhow::anyhow!("config.toml [push] keep_within: {e}"))?;
        Ok(
            (self.keep_last > 0 || keep_within.is_some()).then_some(Retention {
                keep_last: self.keep_last,
                keep_within,
            }),
        )
    }

    /// The push interval; `None` when background pushes are off.
    pub fn period(&self) -> anyhow::Result<Option<std::time::Duration>> {
        let d = crate::util::size::parse_duration(&self.interval)
            .map_err(|e| anyhow::anyhow!("config.toml [push] interval: {e}"))?;
        Ok((!d.is_zero()).then_some(d))
    }

    /// The WAL volume that brings a push forward; `None` when only the interval counts.
    pub fn wal_bytes(&self) -> anyhow::Result<Option<u64>> {
        let n = crate::util::size::parse_size(&self.wal)
            .map_err(|e| anyhow::anyhow!("config.toml [push] wal: {e}"))?;
        Ok((n > 0).then_some(n))
    }
}

/// `$ZENITH_PG_PORT` when it is a port number, else 55432.
fn default_pg_port() -> u16 {
    port_from_env("ZENITH_PG_PORT", DEFAULT_PG_PORT)
}

/// `$ZENITH_API_PORT` when it is a port number, else 3000.
fn default_api_port() -> u16 {
    port_from_env("ZENITH_API_PORT", DEFAULT_API_PORT)
}

fn port_from_env(var: &str, default: u16) -> u16 {
    std::env::var(var)
        .ok()
        .and_then(|p| p.parse().ok())
        .filter(|&p| p > 0)
        .unwrap_or(default)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            storage_dest: None,
            pg_port: default_pg_port(),
            api_port: default_api_port(),
            storages: Default::default(),
            push: PushConfig::default(),
        }
    }
}

/// One repo directory.
#[derive(Debug, Clone)]
pub struct Repo {
    pub root: PathBuf,
}

impl Repo {
    /// `--repo-dir` / `$ZENITH_REPO_DIR` when given, else `~/.zenith`; as root
    /// `/var/lib/zenith`, because PostgreSQL runs as the postgres account, which cannot
    /// enter root's home.
    pub fn locate(explicit: Option<PathBuf>) -> anyhow::Result<Repo> {
        let root = match explicit {
            Some(dir) => dir,
            None if crate::compute::is_root() => PathBuf::from("/var/lib/zenith"),
            None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
                Some(home) => PathBuf::from(home).join(".zenith"),
                None => {
                    anyhow::bail!("HOME is not set; pass --repo-dir DIR or set ZENITH_REPO_DIR")
                }
            },
        };
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()?.join(root)
        };
        Ok(Repo { root })
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn token_path(&self) -> PathBuf {
        self.root.join("api-token")
    }
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("zenith-local.lock")
    }
    pub fn pid_path(&self) -> PathBuf {
        self.root.join("zenith-local.pid")
    }
    pub fn state_path(&self) -> PathBuf {
        self.root.join("zenith-local.json")
    }
    pub fn log_path(&self) -> PathBuf {
        self.root.join("logs").join("zenith-local.log")
    }
    pub fn pgs_dir(&self) -> PathBuf {
        self.root.join("pgs")
    }

    /// The local snapshot store (zenith format).
    pub fn store_url(&self) -> String {
        format!("file://{}", self.root.join("snapshots").display())
    }

    /// The repo, which must exist.
    pub fn existing(explicit: Option<PathBuf>) -> anyhow::Result<Repo> {
        let repo = Repo::locate(explicit)?;
        if !repo.exists() {
            anyhow::bail!(
                "there is no zenith repo at {}; `zenith start` creates one (or pass --repo-dir)",
                repo.root.display()
            );
        }
        Ok(repo)
    }

    pub fn node(&self, name: &str) -> Node {
        Node::new(name, self.pgs_dir().join(name))
    }

    /// Every pg of the repo, by name.
    pub fn nodes(&self) -> Vec<Node> {
        let mut names: Vec<String> = std::fs::read_dir(self.pgs_dir())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.iter().map(|n| self.node(n)).collect()
    }

    /// Whether `zenith init` ran here.
    pub fn exists(&self) -> bool {
        self.config_path().exists()
    }

    pub fn config(&self) -> anyhow::Result<Config> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; run `zenith init` (or `zenith start`) to create the repo",
                path.display()
            )
        })?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not valid: {}",
                path.display(),
                e.message().replace('\n', " ")
            )
        })
    }

    /// Writes `config.toml` anew (atomically).
    pub fn save_config(&self, config: &Config) -> anyhow::Result<()> {
        let text = toml::to_string(config).expect("config serializes");
        write_private(&self.config_path(), text.as_bytes())
    }

    /// Puts back what a repo needs besides `config.toml` (a new machine given only the
    /// old config.toml): its directories and an API token.
    pub fn complete(&self, account: Option<&Account>) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.root.join("logs"))?;
        make_dir(&self.pgs_dir(), account)?;
        if !self.token_path().exists() {
            write_token(self)?;
        }
        Ok(())
    }

    /// Creates the repo's directories, `config.toml` and the API token. Refuses an
    /// existing repo.
    pub fn create(&self, config: &Config, account: Option<&Account>) -> anyhow::Result<()> {
        if self.exists() {
            anyhow::bail!(
                "{} is already a zenith repo; nothing was changed (use another --repo-dir to start a new one)",
                self.root.display()
            );
        }
        std::fs::create_dir_all(&self.root).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the repo {}: {e}; choose another with --repo-dir",
                self.root.display()
            )
        })?;
        if let Some(a) = account {
            check_reachable(&self.root, a)?;
        }
        std::fs::create_dir_all(self.root.join("logs"))?;
        make_dir(&self.pgs_dir(), account)?;
        write_token(self)?;
        // config.toml last: the repo exists once it does.
        self.save_config(config)
    }
}

fn write_token(repo: &Repo) -> anyhow::Result<()> {
    let token: String = {
        let mut rng = fastrand::Rng::new();
        (0..40).map(|_| rng.alphanumeric()).collect()
    };
    write_private(&repo.token_path(), token.as_bytes())
}

/// Refuses a repo the PostgreSQL account cannot reach (a parent without search permission
/// for others, such as root's home).
fn check_reachable(dir: &Path, account: &Account) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let searchable = meta.mode() & 0o001 != 0
            || (meta.uid() == account.uid && meta.mode() & 0o100 != 0)
            || (meta.gid() == account.gid && meta.mode() & 0o010 != 0);
        if !searchable {
            anyhow::bail!(
                "PostgreSQL runs as the account {}, which cannot enter {} (mode {:o}); choose a repo it can reach with --repo-dir, e.g. /var/lib/zenith",
                account.name,
                ancestor.display(),
                meta.mode() & 0o7777
            );
        }
    }
    Ok(())
}

/// An exclusive, advisory lock on the repo, held while zenith-local runs; the kernel
/// releases it when the process dies, however it dies.
pub struct RepoLock {
    _file: std::fs::File,
}

impl RepoLock {
    /// Takes the lock, or says which zenith-local holds it.
    pub fn take(repo: &Repo) -> anyhow::Result<RepoLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(repo.lock_path())
            .map_err(|e| anyhow::anyhow!("{}: {e}", repo.lock_path().display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(repo.pid_path()).unwrap_or_default();
            anyhow::bail!(
                "zenith-local already runs on {} (pid {}); `zenith status` shows it, `zenith stop` stops it",
                repo.root.display(),
                pid.trim()
            );
        }
        Ok(RepoLock { _file: file })
    }

    /// Whether some process holds the lock now.
    pub fn held(repo: &Repo) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .open(repo.lock_path())
        else {
            return false;
        };
        // SAFETY: as above; a successful probe is released at once.
        let got = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if got {
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
        !got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_refuses_unknown_keys() {
        let mut c = Config {
            storage_dest: Some("s3://b/p".into()),
            ..Config::default()
        };
        c.storages.insert("team".into(), "s3://b/team".into());
        c.push.interval = "10m".into();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), c);
        assert_eq!(toml::from_str::<Config>("").unwrap(), Config::default());
        assert!(toml::from_str::<Config>("secret_key = 'x'").is_err());
    }

    #[test]
    fn one_lock_per_repo() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        assert!(!RepoLock::held(&repo));
        let lock = RepoLock::take(&repo).unwrap();
        assert!(RepoLock::held(&repo));
        let e = RepoLock::take(&repo).err().unwrap().to_string();
        assert!(e.contains("already runs"), "{e}");
        drop(lock);
        assert!(!RepoLock::held(&repo));
    }
}
