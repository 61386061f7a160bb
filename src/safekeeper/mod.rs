//! The safekeeper: WAL durability. The WAL archive on `storage_dest` or any storage
//! ([`archive`]: its layout, object format and histories; [`stream`]: the pieces of
//! segments streamed before they are whole) with PostgreSQL's two archiving hooks:
//! [`push`] (`zenith wal-push`, the `archive_command`) and [`fetch`] (`zenith wal-fetch`,
//! the `restore_command`), which zenith's own pgs use and any other PostgreSQL can, and
//! [`verify`] (the archive's continuity). [`receiver`] is the safekeeper process itself:
//! a replication client ([`protocol`]) that stores the main pg's WAL as it is written and
//! reports it flushed once stored, which is what makes synchronous commits wait for the
//! storage.

pub mod archive;
pub mod fetch;
pub mod protocol;
pub mod push;
pub mod receiver;
pub mod stream;
pub mod verify;

pub use archive::{Archive, ArchiveError, Branch, Fork, DEFAULT_HISTORY};
