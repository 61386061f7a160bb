//! What every format shares at the start of an export and at the end of a restore: the
//! options a snapshot is taken with, the survey of the data directory (version, control
//! file, file list) that describes the snapshot-to-be, and the report of what a restore
//! or verify checked.

use std::path::Path;

use super::datadir::{self, DirEntry};
use super::error::Result;
use super::manifest::{self, Format};

/// Options for taking a snapshot.
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    pub name: Option<String>,
    /// The zenith pg being snapshotted, recorded in the manifest.
    pub pg: Option<String>,
    /// The WAL history the pg writes, recorded in the manifest.
    pub wal_history: Option<String>,
    pub parent: Option<String>,
    /// The id and creation time the snapshot keeps (a repo's thin clone being packed
    /// under the identity it already has); else a new id, created now.
    pub identity: Option<(String, String)>,
    /// Stamps (see `datadir::DirEntry::stamp`) to use instead of the packed files' own, by
    /// path: a thin clone packed under the stamps its originals had when it was cloned, so
    /// files unchanged since an earlier clone reuse its block lists.
    pub stamps: Option<std::sync::Arc<std::collections::HashMap<String, String>>>,
    /// Receives the bytes read from the data directory.
    pub progress: crate::util::progress::ProgressHandle,
}

/// The start of every export, whatever the format: read the data directory's version,
/// control file and file list, announce the total to the progress bar, and describe the
/// snapshot-to-be.
pub(crate) async fn survey_for(
    dir: &Path,
    format: Format,
    options: &PackOptions,
    lsns: Option<(String, String)>,
) -> Result<(manifest::Origin, Vec<DirEntry>)> {
    let mut survey = datadir::survey(dir).await?;
    if format == Format::Zenith && lsns.is_none() && survey.control.state == datadir::SHUT_DOWN {
        survey.entries = datadir::without_stale_wal(survey.entries, &survey.control);
    }
    // A directory left by a killed server stands for where its WAL ends.
    let lsns = match lsns {
        Some(l) => Some(l),
        None => {
            let (dir, mut control) = (dir.to_path_buf(), survey.control);
            let lsns = tokio::task::spawn_blocking(move || {
                datadir::crash_lsns(&dir, &mut control).map(|l| (l, control))
            })
            .await
            .map_err(super::error::join_error)??;
            survey.control = lsns.1;
            lsns.0
        }
    };
    options
        .progress
        .set_total(survey.entries.iter().map(|e| e.size).sum());
    let origin = manifest::Origin {
        format,
        name: options.name.clone(),
        parent: options.parent.clone(),
        pg: options.pg.clone(),
        wal_history: options.wal_history.clone(),
        pg_version: survey.pg_version,
        control: survey.control,
        lsns,
    };
    Ok((origin, survey.entries))
}

/// What verify or unpack checked.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub blocks_checked: u64,
    pub bytes_restored: u64,
    pub packs_read: u64,
}
