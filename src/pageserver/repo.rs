//! The repo directory: everything zenith keeps on one machine, and its pgs.
//!
//! ```text
//! config.toml          settings (ports, storage_dest); never credentials
//! api-token            bearer token of the REST API (mode 0600)
//! zenith-local.lock    held (flock) by the running zenith-local: one per repo
//! zenith-local.pid     its pid, while it runs
//! zenith-local.json    what it runs (written when ready)
//! logs/                zenith-local's log
//! pgs/<name>/          each pg: data/, node.json, postgres.log
//! snapshots/           the repo's own snapshot store (zenith format)
//! tmp/                 scratch space of exports and imports
//! ```

use std::path::{Path, PathBuf};

use super::config::Config;
use crate::compute::node::{make_dir, write_private, Node};
use crate::compute::Account;
use crate::models::{OpError, OpResult};

/// One repo directory.
#[derive(Debug, Clone)]
pub struct Repo {
    pub root: PathBuf,
}

impl Repo {
    /// `--repo-dir` / `$ZENITH_REPO_DIR` when given, else `~/.zenith`; as root
    /// `/var/lib/zenith`, because PostgreSQL runs as the postgres account, which cannot
    /// enter root's home.
    pub fn locate(explicit: Option<PathBuf>) -> OpResult<Repo> {
        let root = match explicit {
            Some(dir) => dir,
            None if crate::compute::is_root() => PathBuf::from("/var/lib/zenith"),
            None => match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
                Some(home) => PathBuf::from(home).join(".zenith"),
                None => {
                    return Err(OpError::Failed(
                        "HOME is not set; pass --repo-dir DIR or set ZENITH_REPO_DIR".into(),
                    ))
                }
            },
        };
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .map_err(|e| OpError::io("the current directory", e))?
                .join(root)
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

    /// Scratch space of exports and imports.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The local snapshot store (zenith format).
    pub fn store_url(&self) -> String {
        format!("file://{}", self.root.join("snapshots").display())
    }

    /// The repo, which must exist.
    pub fn existing(explicit: Option<PathBuf>) -> OpResult<Repo> {
        let repo = Repo::locate(explicit)?;
        if !repo.exists() {
            return Err(OpError::Failed(format!(
                "there is no zenith repo at {}; `zenith start` creates one (or pass --repo-dir)",
                repo.root.display()
            )));
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

    pub fn config(&self) -> OpResult<Config> {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            OpError::Failed(format!(
                "{}: {e}; run `zenith init` (or `zenith start`) to create the repo",
                path.display()
            ))
        })?;
        toml::from_str(&text).map_err(|e| {
            OpError::Failed(format!(
                "{} is not valid: {}",
                path.display(),
                e.message().replace('\n', " ")
            ))
        })
    }

    /// Writes `config.toml` anew (atomically). It holds no secrets, and PostgreSQL's
    /// archive command reads storage_dest from it: readable by all (mode 0644).
    pub fn save_config(&self, config: &Config) -> OpResult<()> {
        let text = toml::to_string(config).expect("config serializes");
        Ok(crate::compute::node::write_file(
            &self.config_path(),
            text.as_bytes(),
            0o644,
        )?)
    }

    /// Puts back what a repo needs besides `config.toml` (a new machine given only the
    /// old config.toml): its directories and an API token.
    pub fn complete(&self, account: Option<&Account>) -> OpResult<()> {
        let logs = self.root.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| OpError::io(logs.display(), e))?;
        make_dir(&self.pgs_dir(), account)?;
        if !self.token_path().exists() {
            write_token(self)?;
        }
        Ok(())
    }

    /// Creates the repo's directories, `config.toml` and the API token. Refuses an
    /// existing repo.
    pub fn create(&self, config: &Config, account: Option<&Account>) -> OpResult<()> {
        if self.exists() {
            return Err(OpError::Failed(format!(
                "{} is already a zenith repo; nothing was changed (use another --repo-dir to start a new one)",
                self.root.display()
            )));
        }
        // The PostgreSQL account must be able to enter the repo: checked before anything
        // is created, so a refusal leaves the directory as it was.
        if let Some(a) = account {
            check_reachable(&self.root, a)?;
        }
        std::fs::create_dir_all(&self.root).map_err(|e| {
            OpError::Failed(format!(
                "cannot create the repo {}: {e}; choose another with --repo-dir",
                self.root.display()
            ))
        })?;
        let logs = self.root.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| OpError::io(logs.display(), e))?;
        make_dir(&self.pgs_dir(), account)?;
        write_token(self)?;
        // config.toml last: the repo exists once it does.
        self.save_config(config)
    }
}

fn write_token(repo: &Repo) -> OpResult<()> {
    let token: String = {
        let mut rng = fastrand::Rng::new();
        (0..40).map(|_| rng.alphanumeric()).collect()
    };
    Ok(write_private(&repo.token_path(), token.as_bytes())?)
}

/// Refuses a repo the PostgreSQL account cannot reach: the directory (if it exists) or a
/// parent without search permission for it, such as root's home or what `mktemp -d` makes.
fn check_reachable(dir: &Path, account: &Account) -> OpResult<()> {
    use std::os::unix::fs::MetadataExt;
    for ancestor in dir.ancestors() {
        // What does not exist is created; what is not a directory cannot be (and says so).
        let Some(meta) = std::fs::metadata(ancestor).ok().filter(|m| m.is_dir()) else {
            continue;
        };
        let searchable = meta.mode() & 0o001 != 0
            || (meta.uid() == account.uid && meta.mode() & 0o100 != 0)
            || (meta.gid() == account.gid && meta.mode() & 0o010 != 0);
        if !searchable {
            return Err(OpError::Failed(format!(
                "PostgreSQL runs as the account {}, which cannot enter {} (mode {:o}); `chmod o+x {}` lets it in, or choose a repo it can reach with --repo-dir, e.g. /var/lib/zenith",
                account.name,
                ancestor.display(),
                meta.mode() & 0o7777,
                ancestor.display()
            )));
        }
    }
    Ok(())
}
