//! zenith's integration tests: one test binary, one module per area. Servers (s3s-fs, a
//! Garage cluster) are started by the test that needs them, on 127.0.0.1 with free ports.
//! Run them through `bash scripts/test.sh`, which installs what is missing.

mod support;

mod checkout_faults;
mod cli;
mod clones;
mod console;
mod defects;
mod local;
mod postgres;
mod safekeeper;
mod sealed;
mod share;
mod snapshots;
mod storage_conformance;
mod storage_faults;
mod wal;
