//! zenith runs PostgreSQL locally with snapshots at its heart.
//!
//! The library is laid out by component, after the product brief: `storage` (where snapshots
//! and WAL live: `file://` and `s3://` destinations), `snapshot` (the snapshot model and its
//! formats), `pageserver` (owner of a repo's snapshots), `safekeeper` (WAL durability),
//! `compute` (PostgreSQL servers, starting with finding the PostgreSQL installation), and
//! `cli` (the command line, the only place that knows about clap or terminals).

pub mod cli;
pub mod compute;
pub mod local;
pub mod pageserver;
pub mod safekeeper;
pub mod snapshot;
pub mod storage;
pub mod util;
