//! The pageserver: the owner of a repo's snapshots. It knows the repo's layout and names
//! ([`Repo`], [`config`]), keeps the local snapshot store (create, list, show, delete,
//! `NAME@HEAD{n}`, restoring a pg's data from a snapshot, the checkout swap and the
//! markers of a checkout cut short), takes snapshots of running servers online
//! ([`capture`]), moves snapshots between the repo and storages (push, pull, retention,
//! export and import in every format) and pushes the main pg to `storage_dest` in the
//! background ([`pusher`]).
//!
//! It does not run servers: starting, stopping and supervising pgs is zenith-local's, and
//! a pg's data is only replaced here while the pg is stopped.

pub mod boot;
pub mod capture;
mod checkout;
mod clones;
pub mod config;
pub mod diff;
mod exchange;
mod markers;
mod names;
mod pitr;
pub mod pusher;
mod repo;
mod share;
mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use clones::CloneMode;
pub use config::{Config, Retention};
pub use markers::{incomplete, refuse_incomplete, swap_data};
pub use names::{check_name, check_tag, split_reference};
pub use pitr::At;
pub use repo::Repo;
pub use share::{looks_like_url, STORAGE_DEST};
pub use store::install;

/// The pageserver of one repo. Clones share its per-pg locks.
#[derive(Clone)]
pub struct Pageserver {
    pub repo: Repo,
    /// One lock per pg: a snapshot never runs in the middle of a checkout of the same pg,
    /// nor a start (zenith-local holds the same locks).
    busy: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Pageserver {
    pub fn new(repo: Repo) -> Pageserver {
        Pageserver {
            repo,
            busy: Default::default(),
        }
    }

    /// Holds pg `name` for one operation (start, stop, checkout, snapshot, destroy ...).
    pub async fn hold(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = Arc::clone(
            self.busy
                .lock()
                .expect("not poisoned")
                .entry(name.to_string())
                .or_default(),
        );
        lock.lock_owned().await
    }
}
