//! Compute nodes: the PostgreSQL servers zenith runs. Finding the PostgreSQL installation
//! zenith drives ([`find_postgres`]), the unprivileged account it runs PostgreSQL as when
//! zenith itself is root ([`postgres_account`]), one server on its data directory
//! ([`node`]: initdb, start, stop, query, passwords), libpq connection strings
//! ([`connstr`]) and WAL positions and segment names ([`wal`]).
//!
//! What a node's data becomes (snapshots, restores) is the pageserver's; which nodes run
//! and their supervision is zenith-local's.

mod account;
pub mod connstr;
mod error;
mod install;
pub mod node;
pub mod wal;
pub mod wal_end;

pub use account::{hand_to_postgres_user, is_root, lookup, postgres_account, Account};
pub use error::{Error, Result};
pub use install::{find_postgres, find_postgres_with, PgInstall, PgNotFound, SearchEnv};
