//! The pageserver: owner of a repo's snapshots (taking them online, the local snapshot
//! store, materializing data directories, background pushes to `storage_dest`).
//!
//! Not built yet: this module holds no code so far, and the commands that need it answer
//! "not implemented yet" with exit code 2.
