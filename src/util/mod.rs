//! Small helpers shared by every component: retries with backoff, sizes and durations,
//! temporary directories that remove themselves, free ports, messages for people, direct
//! I/O, and a deterministic data generator used by probes and benchmarks. Nothing here
//! knows about PostgreSQL, storage formats or the command line.

pub mod backoff;
pub mod crc32c;
pub mod direct;
pub mod message;
pub mod port;
pub mod progress;
pub mod reflink;
pub mod relpath;
pub mod size;
pub mod tempdir;
pub mod testdata;
pub mod time;
