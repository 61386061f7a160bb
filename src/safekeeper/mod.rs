//! The safekeeper: WAL durability. Today that is the WAL archive on `storage_dest` or any
//! storage ([`archive`]: its layout, object format and histories) with PostgreSQL's two
//! archiving hooks: [`push`] (`zenith wal-push`, the `archive_command`) and [`fetch`]
//! (`zenith wal-fetch`, the `restore_command`), which zenith's own pgs use and any other
//! PostgreSQL can, and [`verify`] (the archive's continuity). Receiving WAL over the
//! replication protocol, for synchronous commits, builds on these.

pub mod archive;
pub mod fetch;
pub mod push;
pub mod verify;

pub use archive::{Archive, ArchiveError, Branch, Fork, DEFAULT_HISTORY};
