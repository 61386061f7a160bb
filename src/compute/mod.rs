//! Compute nodes: the PostgreSQL servers zenith runs. For now this is where zenith finds
//! the PostgreSQL installation it drives ([`find_postgres`]); creating, starting and
//! stopping servers builds on it.

mod install;

pub use install::{find_postgres, find_postgres_with, PgInstall, PgNotFound, SearchEnv};
