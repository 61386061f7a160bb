//! Compute nodes: the PostgreSQL servers zenith runs. For now this is where zenith finds
//! the PostgreSQL installation it drives ([`find_postgres`]) and the unprivileged account
//! it runs PostgreSQL as when zenith itself is root ([`postgres_account`]); creating,
//! starting and stopping servers builds on it.

mod account;
mod install;
pub mod node;

pub use account::{hand_to_postgres_user, is_root, lookup, postgres_account, Account};
pub use install::{find_postgres, find_postgres_with, PgInstall, PgNotFound, SearchEnv};
