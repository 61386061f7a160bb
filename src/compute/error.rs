//! Errors of running PostgreSQL: each names the pg, program or path at fault and, where
//! there is one, what to do.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on `what` (a path, a program) failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// No usable PostgreSQL installation.
    #[error(transparent)]
    NotFound(#[from] super::install::PgNotFound),
    /// Anything else, as one message (a server that did not start, initdb's complaint).
    #[error("{0}")]
    Failed(String),
}

impl Error {
    /// An I/O failure on `what`.
    pub fn io(what: impl std::fmt::Display, source: std::io::Error) -> Error {
        Error::Io {
            what: what.to_string(),
            source,
        }
    }
}
