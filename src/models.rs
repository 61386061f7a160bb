//! What crosses zenith-local's REST API and the command line: requests, reports and the
//! kinds of failure, as typed structs both sides share (serde). The CLI prints them, the
//! API sends them as JSON, and neither reads a field back by a string key.
//!
//! Nothing here does anything: the pageserver and zenith-local fill these in.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::compute::node::Status;
pub use crate::snapshot::SnapshotSummary;

/// A failed operation, by kind; the REST API maps each kind to an HTTP status, the CLI
/// prints the message.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The request itself is wrong (a bad name, a bad reference): 400.
    #[error("{0}")]
    BadRequest(String),
    /// What the request names does not exist: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the state of things (a taken name, a busy pg): 409.
    #[error("{0}")]
    Conflict(String),
    /// zenith-local is stopping: 503.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error(transparent)]
    Snapshot(crate::snapshot::SnapshotError),
    #[error(transparent)]
    Compute(#[from] crate::compute::Error),
    /// Anything else, as one message that says what went wrong and what to do.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::snapshot::SnapshotError> for OpError {
    fn from(e: crate::snapshot::SnapshotError) -> Self {
        use crate::snapshot::SnapshotError;
        match e {
            SnapshotError::NotFound { .. } => OpError::NotFound(e.to_string()),
            SnapshotError::Ambiguous { .. } => OpError::BadRequest(e.to_string()),
            other => OpError::Snapshot(other),
        }
    }
}

impl OpError {
    /// A failure of `what` (a path, a program) with its I/O cause.
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> OpError {
        OpError::Failed(format!("{what}: {e}"))
    }

    /// The message with its causes, each said once.
    pub fn full_message(&self) -> String {
        crate::util::message::full(self)
    }
}

pub type OpResult<T> = std::result::Result<T, OpError>;

/// What the REST API answers when a request fails (with an HTTP status that fits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// A pg's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Replica,
}

/// A pg as `pg show --json` and `GET /pgs/NAME` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgInfo {
    pub name: String,
    pub status: Status,
    pub port: u16,
    /// A libpq URI that works as is (it carries the password).
    pub connstr: String,
    pub role: Role,
    /// The pg a replica follows.
    pub primary: Option<String>,
    pub data_directory: PathBuf,
    pub log: PathBuf,
}

/// A pg as `zenith status` shows it: with what supervision saw of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgStatus {
    #[serde(flatten)]
    pub pg: PgInfo,
    /// zenith-local runs it and it has not failed.
    pub supervised: bool,
    /// Times zenith-local restarted it after it died.
    pub restarts: u32,
    /// Why it is down, when it died and could not be restarted.
    pub failed: Option<String>,
    /// In clone mode: the space of its data, shared with snapshots and other pgs, and its
    /// own (what it changed since it was cloned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<crate::snapshot::CloneSpace>,
}

/// `PUT /pgs`: a new pg, empty or from a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPg {
    pub name: String,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// A point in time (or WAL position) of another pg's history to restore to, from the
    /// newest snapshot before it and the WAL archived in storage_dest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The pg whose history `at` is in [default: main].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default = "yes")]
    pub start: bool,
}

fn yes() -> bool {
    true
}

/// `POST /pgs/NAME/actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    /// Start the pg; with `is_replica`, as a streaming replica of `primary` (default main).
    Start {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        is_replica: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        primary: Option<String>,
    },
    /// Stop the pg; `immediate` does not wait for clients.
    Stop {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        immediate: bool,
    },
    /// Make a running replica a primary of its own.
    Promote,
    /// Roll the pg back to `snapshot`, or to the point in time `at` of its history,
    /// keeping its state as `NAME@HEAD{n}`.
    Checkout {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<String>,
    },
}

/// What an action answers: the pg, or for a checkout what it kept and where it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ActionReply {
    Checkout(Box<CheckoutReport>),
    Pg(PgInfo),
}

/// What a checkout did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckoutReport {
    /// The state the pg left, kept as `NAME@HEAD{n}`.
    pub kept: SnapshotSummary,
    /// The snapshot the pg now holds.
    pub target: SnapshotSummary,
    /// The pg, when it ran before and runs again.
    pub pg: Option<PgInfo>,
}

/// `POST /snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSnapshot {
    /// `PG` or `PG@TAG` [default: main].
    #[serde(default)]
    pub name: Option<String>,
}

/// `DELETE /snapshots/ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedSnapshot {
    pub deleted: String,
    pub bytes_freed: u64,
    /// Why unused data was left for a later delete, if it was.
    pub collection_skipped: Option<String>,
}

/// A named storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageInfo {
    pub name: String,
    pub url: String,
}

/// One storage with its snapshots and the space it uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDetail {
    pub name: String,
    pub url: String,
    pub snapshots: Vec<SnapshotSummary>,
    pub objects: u64,
    /// Plaintext bytes of its objects.
    pub bytes: u64,
    /// Whether its objects are sealed with its key (`zenith storage encrypt`).
    #[serde(default)]
    pub encrypted: bool,
}

/// What moving one snapshot between storages did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub bytes_sent: u64,
    pub objects_sent: u64,
    /// Objects the snapshot needs that the other side had.
    pub objects_skipped: u64,
    /// The other side had the snapshot already: nothing moved.
    pub already_there: bool,
}

impl From<&crate::snapshot::zenith::TransferReport> for Moved {
    fn from(r: &crate::snapshot::zenith::TransferReport) -> Moved {
        Moved {
            bytes_sent: r.bytes_sent,
            objects_sent: r.objects_sent,
            objects_skipped: r.objects_skipped,
            already_there: r.already_there,
        }
    }
}

/// One snapshot of a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedSnapshot {
    pub snapshot: SnapshotSummary,
    #[serde(flatten)]
    pub moved: Moved,
}

/// What `zenith push` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    /// The storage's name, or its URL when given as one.
    pub storage: String,
    pub url: String,
    pub pushed: Vec<PushedSnapshot>,
    pub bytes_sent: u64,
    pub objects_sent: u64,
}

/// What `zenith pull` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullReport {
    pub snapshot: SnapshotSummary,
    pub url: String,
    #[serde(flatten)]
    pub moved: Moved,
}

/// What exporting a repo snapshot did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub snapshot: SnapshotSummary,
    pub url: String,
    pub format: crate::snapshot::Format,
    /// The zenith format moves objects, store to store; the others write files.
    pub moved: Moved,
}

/// What `zenith status` and `GET /status` show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub repo: PathBuf,
    pub zenith_local: LocalSummary,
    pub pgs: Vec<PgStatus>,
    pub newest_snapshot: Option<NewestSnapshot>,
    pub storage_dest: Option<String>,
    pub push: Option<PushState>,
    /// The main pg's WAL archiving, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<ArchiveStatus>,
    /// The main pg's safekeeper, while zenith-local runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safekeeper: Option<SafekeeperState>,
    /// Whether the repo's snapshots, new pgs and checkouts are thin clones, and why (not).
    pub clones: ClonesStatus,
    /// The web console, while zenith-local runs (`zenith console` logs in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_url: Option<String>,
}

/// `GET /operations`: a long operation of zenith-local and how far it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationInfo {
    pub id: u64,
    /// What it does, e.g. `create pg feature`.
    pub what: String,
    pub started_unix: u64,
    pub done_bytes: u64,
    /// The amount of work, once known.
    pub total_bytes: Option<u64>,
    /// False for one finished (listed for a minute after).
    pub running: bool,
    /// Why it failed, for one that did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /console/codes`: a link that logs a browser into the console once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLogin {
    pub url: String,
    pub expires_in_secs: u64,
}

/// The repo's clone mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClonesStatus {
    pub on: bool,
    pub reason: String,
    /// Bytes the repo's snapshot clones hold alone (what deleting all of them would free).
    #[serde(default)]
    pub snapshots_owned: u64,
}

/// The safekeeper of a pg, as zenith-local sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafekeeperState {
    pub pg: String,
    /// `sync` or `async`, as config.toml asks.
    pub mode: String,
    /// Whether commits wait for it now (sync mode, not fallen back).
    pub commits_wait: bool,
    /// Connected and storing what it receives.
    pub streaming: bool,
    /// Stored on storage_dest up to here.
    pub flushed_lsn: Option<String>,
    /// Bytes of the pg's WAL not stored yet.
    pub lag_bytes: u64,
    /// Seconds the oldest WAL not stored yet has waited.
    pub lag_secs: Option<u64>,
    /// Times zenith-local started it again.
    pub restarts: u32,
    /// Sync mode given up for now: since when (RFC 3339) and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallen_back_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallen_back_why: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How a pg's WAL archiving goes (PostgreSQL's `pg_stat_archiver`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveStatus {
    /// The WAL history it archives into.
    pub history: Option<String>,
    pub last_archived: Option<String>,
    /// Seconds since the last file was archived.
    pub last_archived_age_secs: Option<u64>,
    /// Failed attempts since the server started.
    pub failed_count: u64,
    pub last_failed: Option<String>,
    /// Seconds since the last failure.
    pub last_failed_age_secs: Option<u64>,
}

/// Whether zenith-local runs, and where its API is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalSummary {
    pub running: bool,
    pub pid: Option<u32>,
    /// `http://127.0.0.1:PORT`.
    pub api: Option<String>,
}

/// The repo's newest snapshot, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewestSnapshot {
    pub id: String,
    pub name: Option<String>,
    pub created_at: String,
    pub total_size: u64,
}

/// What `zenith status` shows of background pushes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushState {
    pub storage_dest: String,
    pub interval_secs: u64,
    /// WAL written by the main pg that brings a push forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pushed: Option<String>,
    /// When the last push succeeded, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_pushed_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Failed attempts in a row.
    #[serde(default)]
    pub failures: u32,
    /// When the next attempt is due, seconds since the epoch.
    #[serde(default)]
    pub next_unix: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_from_the_api_shape() {
        let parse = |text: &str| serde_json::from_str::<Action>(text);
        assert_eq!(
            parse(r#"{"action":"start","is_replica":true,"primary":"main"}"#).unwrap(),
            Action::Start {
                is_replica: true,
                primary: Some("main".into())
            }
        );
        assert_eq!(
            parse(r#"{"action":"start"}"#).unwrap(),
            Action::Start {
                is_replica: false,
                primary: None
            }
        );
        assert_eq!(parse(r#"{"action":"promote"}"#).unwrap(), Action::Promote);
        assert_eq!(
            parse(r#"{"action":"checkout","snapshot":"x"}"#).unwrap(),
            Action::Checkout {
                snapshot: Some("x".into()),
                at: None
            }
        );
        for bad in [
            r#"{"action":"explode"}"#,
            r#"{"action":"checkout","snapshot":"x","when":"now"}"#,
            r#"{"action":"stop","snapshot":"x"}"#,
            r#"{}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        // What the CLI sends is what the API reads.
        let a = Action::Stop { immediate: true };
        assert_eq!(parse(&serde_json::to_string(&a).unwrap()).unwrap(), a);
    }
}

/// `zenith snapshot diff A B`: what differs between two snapshots of one cluster, by
/// relation (named from the snapshots' own catalogs) and, apart, the files outside
/// relations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDiff {
    pub from: String,
    pub to: String,
    /// Most changed pages first.
    pub relations: Vec<RelationChange>,
    pub other_files: Vec<FileChange>,
}

/// One relation (a table, an index, a TOAST table ...) that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationChange {
    /// Its database's name, or `global` for shared catalogs.
    pub database: String,
    pub schema: Option<String>,
    /// Its name, or `file N` when no catalog row names it.
    pub name: String,
    pub kind: String,
    /// `changed`, `added` or `removed`.
    pub change: String,
    /// 8 KiB pages that differ (all its forks and segments).
    pub pages_changed: u64,
    /// Its pages in the newer snapshot (the older one, when removed).
    pub pages: u64,
    pub bytes_changed: u64,
}

/// A file outside relations that differs (configuration, WAL, control data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    /// `changed`, `added` or `removed`.
    pub change: String,
    pub pages_changed: u64,
}
