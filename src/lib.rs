//! zenith runs PostgreSQL locally with snapshots at its heart.
//!
//! The library is laid out by component, after the product brief, each layer using only
//! those below it:
//! - `util`: retries, sizes, temporary directories, messages; nothing about PostgreSQL;
//! - `storage`: where snapshots and WAL live (`file://` and `s3://` destinations);
//! - `compute`: PostgreSQL servers (finding the installation, one server's lifecycle,
//!   connection strings, WAL positions);
//! - `snapshot`: the snapshot model and its three formats;
//! - `models`: the requests and reports the REST API and the CLI share;
//! - `pageserver`: the owner of a repo's snapshots (the repo, the local store, online
//!   capture, push and pull, background pushes);
//! - `safekeeper`: WAL durability;
//! - `local`: zenith-local, the process that runs and supervises the pgs and serves the
//!   REST API;
//! - `cli`: the command line, the only place that knows about clap or terminals.

pub mod cli;
pub mod compute;
pub mod local;
pub mod models;
pub mod pageserver;
pub mod safekeeper;
pub mod snapshot;
pub mod storage;
pub mod util;
