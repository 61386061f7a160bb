//! Snapshots: the manifest model shared by every format and the `pgdata`, `basebackup` and
//! `zenith` codecs between a data directory and a storage destination.
//!
//! Not built yet: this module holds no code so far. The commands that need it
//! (`zenith export`, `import`, `snapshot ...`) answer "not implemented yet" with exit code 2.
