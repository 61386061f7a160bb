//! `config.toml`: a repo's settings (ports, storage_dest, named storages, background
//! pushes and retention). TOML, unknown keys refused, defaults for everything; credentials
//! never live here (they come from the environment).

use serde::{Deserialize, Serialize};

use crate::models::{OpError, OpResult};

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
    /// Continuous WAL archiving to storage_dest.
    #[serde(default)]
    pub wal: WalConfig,
    /// The main pg's safekeeper, which streams its WAL to storage_dest.
    #[serde(default)]
    pub safekeeper: SafekeeperConfig,
    /// How the repo keeps its own snapshots.
    #[serde(default)]
    pub snapshots: SnapshotsConfig,
    /// Storages this repo found encrypted (`zenith storage encrypt`), by canonical URL: one
    /// without its key file is refused rather than written to in the clear.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub encrypted_storages: std::collections::BTreeSet<String>,
}

/// `[snapshots]` of config.toml.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotsConfig {
    /// `auto` (the default): on a filesystem that shares extents between files (XFS with
    /// reflink=1, btrfs), snapshots, new pgs and checkouts are thin clones, made in
    /// constant time and sharing every unchanged block; elsewhere, copies in the zenith
    /// format. `off`: always copies.
    #[serde(default)]
    pub clones: ClonesMode,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClonesMode {
    #[default]
    Auto,
    Off,
}

/// `[safekeeper]` of config.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SafekeeperConfig {
    /// `async` (the default): the main pg's WAL streams to storage_dest as it is
    /// written (within about 200 ms), commits do not wait for it; `sync`: a commit
    /// returns only once its WAL is on storage_dest; `off`: only whole segments are
    /// archived (at the latest after `[wal] archive_timeout`). Only with a storage_dest.
    #[serde(default)]
    pub mode: SafekeeperMode,
    /// In `sync` mode, a safekeeper that stored nothing for this long (down, paused,
    /// storage unreachable) no longer holds commits: they go on without it, `zenith
    /// status` says so, and sync mode returns once it caught up.
    #[serde(default = "default_fallback_after")]
    pub fallback_after: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SafekeeperMode {
    Off,
    #[default]
    Async,
    Sync,
}

fn default_fallback_after() -> String {
    "10s".into()
}

impl Default for SafekeeperConfig {
    fn default() -> Self {
        SafekeeperConfig {
            mode: SafekeeperMode::default(),
            fallback_after: default_fallback_after(),
        }
    }
}

impl SafekeeperConfig {
    pub fn fallback(&self) -> OpResult<std::time::Duration> {
        crate::util::size::parse_duration(&self.fallback_after)
            .map_err(|e| OpError::Failed(format!("config.toml [safekeeper] fallback_after: {e}")))
    }
}

/// `[wal]` of config.toml.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WalConfig {
    /// A segment that is not full is archived anyway after this long (PostgreSQL's
    /// `archive_timeout`), so a quiet database loses at most this much on a lost
    /// machine; "0" waits for full segments.
    #[serde(default = "default_archive_timeout")]
    pub archive_timeout: String,
}

fn default_archive_timeout() -> String {
    "60s".into()
}

impl Default for WalConfig {
    fn default() -> Self {
        WalConfig {
            archive_timeout: default_archive_timeout(),
        }
    }
}

impl WalConfig {
    /// `archive_timeout` in seconds (0: off).
    pub fn archive_timeout_secs(&self) -> OpResult<u64> {
        crate::util::size::parse_duration(&self.archive_timeout)
            .map(|d| d.as_secs())
            .map_err(|e| OpError::Failed(format!("config.toml [wal] archive_timeout: {e}")))
    }
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
    pub fn retention(&self) -> OpResult<Option<Retention>> {
        let keep_within = self
            .keep_within
            .as_deref()
            .map(crate::util::size::parse_duration)
            .transpose()
            .map_err(|e| OpError::Failed(format!("config.toml [push] keep_within: {e}")))?;
        Ok(
            (self.keep_last > 0 || keep_within.is_some()).then_some(Retention {
                keep_last: self.keep_last,
                keep_within,
            }),
        )
    }

    /// The push interval; `None` when background pushes are off.
    pub fn period(&self) -> OpResult<Option<std::time::Duration>> {
        let d = crate::util::size::parse_duration(&self.interval)
            .map_err(|e| OpError::Failed(format!("config.toml [push] interval: {e}")))?;
        Ok((!d.is_zero()).then_some(d))
    }

    /// Checks every setting zenith-local reads again while it runs, before anything starts.
    pub fn check(&self) -> OpResult<()> {
        self.period()?;
        self.retention()?;
        self.wal_bytes()?;
        Ok(())
    }

    /// The WAL volume that brings a push forward; `None` when only the interval counts.
    pub fn wal_bytes(&self) -> OpResult<Option<u64>> {
        let n = crate::util::size::parse_size(&self.wal)
            .map_err(|e| OpError::Failed(format!("config.toml [push] wal: {e}")))?;
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

impl Config {
    /// Refuses `storage` when this repo knows it as encrypted and it no longer is: its key
    /// file was deleted, and whatever zenith wrote there would be in the clear. Storages
    /// are known by their canonical URL (`/x` and `file:///x` are one).
    pub fn refuse_unsealed(&self, storage: &dyn crate::storage::Storage) -> OpResult<()> {
        let url = storage.url();
        if storage.encrypted() || !self.encrypted_storages.contains(&url) {
            return Ok(());
        }
        Err(OpError::Conflict(format!(
            "{url} was encrypted when this repo last used it, but its key file ({}) is gone; zenith writes nothing there in the clear: put the key file back from a copy, or, if the storage is meant to be plain now, remove it from encrypted_storages in config.toml",
            crate::storage::KEY_OBJECT
        )))
    }

    /// Checks the settings zenith-local reads again while it runs.
    pub fn check(&self) -> OpResult<()> {
        self.push.check()?;
        self.wal.archive_timeout_secs()?;
        self.safekeeper.fallback()?;
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            storage_dest: None,
            pg_port: default_pg_port(),
            api_port: default_api_port(),
            storages: Default::default(),
            push: PushConfig::default(),
            wal: WalConfig::default(),
            safekeeper: SafekeeperConfig::default(),
            snapshots: SnapshotsConfig::default(),
            encrypted_storages: Default::default(),
        }
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
}
