//! Snapshots: the manifest model shared by every format, reading PostgreSQL data
//! directories, and the format codecs between a data directory and a storage destination.
//!
//! Built so far: the manifest, and the native `zenith` format for stopped data directories
//! ([`native`]): page-deduplicated, compressed, checksummed packs with the manifest written
//! last. Not built yet: online snapshots of a running server, and the `pgdata` and
//! `basebackup` codecs; the commands that need them say so.

pub mod datadir;
mod error;
mod manifest;
pub mod native;
mod paths;

pub use error::{Result, SnapshotError};
pub use manifest::{Entry, EntryKind, Format, Manifest, BLOCK_SIZE, FORMAT_VERSION};
pub use paths::check_relative_path;
