//! The snapshot layer's errors: each names the snapshot or path at fault and what to do.

use crate::storage;

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Storage(#[from] storage::Error),

    #[error("{}", storage::error::local_message(path, op, source))]
    Io {
        path: String,
        op: &'static str,
        source: std::io::Error,
    },

    /// Content that fails its checks: a flipped byte, a truncated object, a manifest that
    /// contradicts itself. Never retried; the snapshot must be pushed again.
    #[error("{object} is corrupt: {what}")]
    Corrupt { object: String, what: String },

    /// Input zenith will not use (a running server's directory, a target that exists...).
    #[error("{reason}")]
    Refused { reason: String },

    #[error("no snapshot {reference:?} in {url}; `zenith snapshot list --storage {url}` shows what is there")]
    NotFound { reference: String, url: String },

    #[error("{reference:?} matches several snapshots in {url} ({matches}); use more of the id")]
    Ambiguous {
        reference: String,
        url: String,
        matches: String,
    },
}

impl SnapshotError {
    pub fn io(path: impl AsRef<std::path::Path>, op: &'static str, source: std::io::Error) -> Self {
        SnapshotError::Io {
            path: path.as_ref().display().to_string(),
            op,
            source,
        }
    }
}

/// The error of a blocking task that did not return: a panic is passed on, a cancellation
/// (runtime shutting down) becomes an error.
pub(crate) fn join_error(e: tokio::task::JoinError) -> SnapshotError {
    match e.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(_) => SnapshotError::Storage(storage::Error::Cancelled),
    }
}
