//! Snapshots: the manifest model shared by every format, reading PostgreSQL data
//! directories, and the format codecs between a data directory and a storage destination.
//!
//! The formats: [`zenith`] (the native one: page-deduplicated, compressed, checksummed
//! packs with the manifest written last), [`pgdata`] (plain files plus a manifest) and
//! [`basebackup`] (what `pg_basebackup -Ft -Xs` writes). This module's own functions are
//! the one place that decides which format a pack, unpack, verify, list or lookup uses.
//!
//! Not here: taking snapshots of running servers and everything about a repo's own
//! snapshots (the pageserver's), and where storages are (the storage layer's).

pub mod basebackup;
pub mod clone;
pub mod datadir;
mod error;
mod manifest;
mod paths;
pub mod pgdata;
pub mod relations;
mod survey;
mod tree;
pub mod zenith;

use std::path::Path;
use std::sync::Arc;

pub(crate) use error::join_error;
pub use error::{Result, SnapshotError};
pub use manifest::{
    now_rfc3339, CloneSpace, Entry, EntryKind, Format, Manifest, Origin, SnapshotSummary,
    BLOCK_SIZE, FORMAT_VERSION,
};
pub use paths::check_relative_path;
pub use survey::{CheckReport, PackOptions};

use crate::storage::{Storage, StorageUrl};
use crate::util::progress::ProgressHandle;

/// What packing a data directory stored.
#[derive(Debug, Clone)]
pub enum Packed {
    /// The zenith format, with what deduplication saved.
    Zenith(zenith::PackReport),
    /// The pgdata and basebackup formats: plain files or archives.
    Files(Manifest),
}

impl Packed {
    pub fn manifest(&self) -> &Manifest {
        match self {
            Packed::Zenith(r) => &r.manifest,
            Packed::Files(m) => m,
        }
    }

    pub fn into_manifest(self) -> Manifest {
        match self {
            Packed::Zenith(r) => r.manifest,
            Packed::Files(m) => m,
        }
    }
}

/// Snapshots the stopped data directory `dir` (or a consistent copy of one, with its WAL
/// range `lsns`) into `storage` in `format`; `compress` is the basebackup format's choice
/// between `.tar.zst` and `.tar`.
pub async fn pack_dir(
    format: Format,
    dir: &Path,
    storage: Arc<dyn Storage>,
    options: &PackOptions,
    lsns: Option<(String, String)>,
    compress: bool,
) -> Result<Packed> {
    Ok(match format {
        Format::Zenith => Packed::Zenith(zenith::pack_dir(dir, storage, options, lsns).await?),
        Format::Pgdata => Packed::Files(pgdata::pack_dir(dir, storage, options, lsns).await?),
        Format::Basebackup => {
            Packed::Files(basebackup::pack_dir(dir, storage, options, lsns, compress).await?)
        }
    })
}

/// What a restore wrote and checked.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// The snapshot restored; `None` for a `pg_basebackup` backup or a plain data
    /// directory, which carry no zenith manifest.
    pub manifest: Option<Manifest>,
    pub report: CheckReport,
    /// Bytes now in the target directory.
    pub size: u64,
}

/// Restores snapshot `reference` of `storage`, in `format`, into the new directory
/// `target` (which must not exist, or be empty), checking everything it writes. A
/// `pgdata` storage without a manifest that is a local directory is taken as a stopped
/// data directory and copied.
pub async fn unpack(
    format: Format,
    storage: &dyn Storage,
    reference: &str,
    target: &Path,
    progress: &ProgressHandle,
) -> Result<Unpacked> {
    match format {
        Format::Zenith => {
            let m = zenith::resolve(storage, reference).await?;
            let report = zenith::unpack(storage, &m, target, progress).await?;
            Ok(Unpacked {
                size: m.total_size,
                manifest: Some(m),
                report,
            })
        }
        Format::Basebackup => {
            let (m, report) = basebackup::unpack(storage, target).await?;
            let size = walkdir::WalkDir::new(target)
                .into_iter()
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum();
            Ok(Unpacked {
                manifest: m,
                report,
                size,
            })
        }
        Format::Pgdata => match pgdata::read_manifest(storage).await? {
            Some(m) => {
                check_reference(&m, reference, &storage.url())?;
                let report = pgdata::unpack(storage, &m, target).await?;
                Ok(Unpacked {
                    size: m.total_size,
                    manifest: Some(m),
                    report,
                })
            }
            None => match StorageUrl::parse(&storage.url())? {
                StorageUrl::Local(dir) => {
                    let copied = pgdata::copy_plain_dir(&dir, target).await?;
                    Ok(Unpacked {
                        manifest: None,
                        report: CheckReport::default(),
                        size: copied,
                    })
                }
                _ => Err(SnapshotError::Refused {
                    reason: format!(
                        "{} holds no {}: it is not a pgdata snapshot",
                        storage.url(),
                        pgdata::MANIFEST_KEY
                    ),
                }),
            },
        },
    }
}

/// Re-reads everything snapshot `m` of `storage` consists of and checks every checksum.
pub async fn verify(
    storage: &dyn Storage,
    m: &Manifest,
    progress: &ProgressHandle,
) -> Result<CheckReport> {
    match m.format {
        Format::Pgdata => pgdata::verify(storage, m).await,
        Format::Basebackup => basebackup::verify(storage).await,
        Format::Zenith => zenith::verify(storage, m, progress).await,
    }
}

/// The snapshots at a destination: its one pgdata or basebackup snapshot, or its
/// zenith-format ones, oldest first.
pub async fn list(storage: &dyn Storage) -> Result<Vec<Manifest>> {
    match pgdata::read_manifest(storage).await? {
        Some(m) => Ok(vec![m]),
        None => zenith::list(storage).await,
    }
}

/// One snapshot of a destination, by `LATEST`, name or id prefix, whatever its format.
pub async fn resolve(storage: &dyn Storage, reference: &str) -> Result<Manifest> {
    match pgdata::read_manifest(storage).await? {
        Some(m) => check_reference(&m, reference, &storage.url()).map(|()| m),
        None => zenith::resolve(storage, reference).await,
    }
}

/// Whether the one snapshot of a pgdata or basebackup destination is `reference`.
fn check_reference(m: &Manifest, reference: &str, url: &str) -> Result<()> {
    if reference == "LATEST" || m.id.starts_with(reference) || m.name.as_deref() == Some(reference)
    {
        Ok(())
    } else {
        Err(SnapshotError::NotFound {
            reference: reference.into(),
            url: url.into(),
        })
    }
}
