//! Snapshots: the manifest model shared by every format, reading PostgreSQL data
//! directories, and the format codecs between a data directory and a storage destination.
//!
//! Built so far: the manifest; the native `zenith` format ([`native`]): page-deduplicated,
//! compressed, checksummed packs with the manifest written last; the `pgdata` format
//! ([`pgdata`]): plain files plus a manifest; the `basebackup` format ([`basebackup`]):
//! what `pg_basebackup -Ft -Xs` writes; sources that are stopped data directories or
//! running servers (online, through stock `pg_basebackup`).

pub mod basebackup;
pub mod datadir;
mod error;
mod manifest;
pub mod native;
pub mod online;
mod paths;
pub mod pgdata;
pub mod transfer;

pub use error::{Result, SnapshotError};
pub use manifest::{now_rfc3339, Entry, EntryKind, Format, Manifest, BLOCK_SIZE, FORMAT_VERSION};
pub use paths::check_relative_path;
