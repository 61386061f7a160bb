//! The safekeeper: receives WAL over PostgreSQL's streaming replication protocol, makes it
//! durable and offloads it to `storage_dest`.
//!
//! Not built yet: this module holds no code so far, and the commands that need it
//! (`zenith wal-push`, `wal-fetch`) answer "not implemented yet" with exit code 2.
