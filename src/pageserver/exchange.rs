//! Export and import of the repo's snapshots: `zenith export REF --snapshot_path=URL` and
//! `zenith import --snapshot_path=URL --name PG@TAG`, in all three formats. The zenith
//! format moves objects store to store (only what the other side lacks); pgdata and
//! basebackup go through a verified data directory in the repo's scratch space
//! (`tmp/export-*`, `tmp/import-*`), removed afterwards, and by the next export or import
//! when a killed run left one behind.

use std::path::Path;
use std::sync::Arc;

use super::names::check_tag;
use super::store::{install, refuse_taken_name};
use super::Pageserver;
use crate::models::{ExportReport, Moved, OpError, OpResult};
use crate::snapshot::{self, datadir, zenith, Format, Manifest, PackOptions};
use crate::storage::StorageUrl;
use crate::util::progress::ProgressHandle;
use crate::util::tempdir::{self, TempDir};

/// Start and stop LSN to record for a restored directory that carries a backup label.
fn label_lsns(dir: &Path, m: Option<&Manifest>) -> Option<(String, String)> {
    let m = m?;
    dir.join("backup_label")
        .exists()
        .then(|| (m.start_lsn.clone(), m.stop_lsn.clone()))
}

fn is_server(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Pageserver {
    /// A scratch directory in the repo for one export or import (`what`), removed when
    /// dropped; what killed runs left there goes first.
    fn scratch(&self, what: &str) -> OpResult<TempDir> {
        let tmp = self.repo.tmp_dir();
        for prefix in ["export", "import"] {
            tempdir::sweep(&tmp, prefix);
        }
        TempDir::new_in(&tmp, what).map_err(|e| OpError::io(tmp.display(), e))
    }

    /// Writes repo snapshot `reference` to `url` in `format`, named `name` there when
    /// given (else as it is named in the repo).
    pub async fn export(
        &self,
        reference: &str,
        url: &str,
        format: Format,
        name: Option<&str>,
        compress: bool,
        progress: ProgressHandle,
    ) -> OpResult<ExportReport> {
        if let Some(n) = name {
            check_tag(n)?;
        }
        let store = self.store().await?;
        let m = zenith::resolve(store.as_ref(), reference).await?;
        let target = self.open_storage(url).await?;
        if format == Format::Zenith {
            let r = self
                .send(store.as_ref(), &m, &target, name, &progress)
                .await?;
            let stored = r.manifest.as_ref().unwrap_or(&m);
            return Ok(ExportReport {
                snapshot: stored.summary(),
                url: target.url(),
                format,
                moved: Moved::from(&r),
            });
        }
        let scratch = self.scratch("export")?;
        let data = scratch.path().join("data");
        self.restore(&m, &data, &ProgressHandle::default()).await?;
        let options = PackOptions {
            pg: None,
            wal_history: None,
            name: name.map(str::to_string).or_else(|| m.name.clone()),
            parent: None,
            identity: None,
            stamps: None,
            progress,
        };
        let lsns = label_lsns(&data, Some(&m));
        let written =
            snapshot::pack_dir(format, &data, Arc::clone(&target), &options, lsns, compress)
                .await?
                .into_manifest();
        Ok(ExportReport {
            snapshot: written.summary(),
            url: target.url(),
            format,
            moved: Moved {
                bytes_sent: written.stored_size,
                ..Moved::default()
            },
        })
    }

    /// Adds a snapshot to the repo from `url` (a storage in `format`, or a running server
    /// as a `postgres://` URI), named `name` when given; also whether the repo had it.
    pub async fn import(
        &self,
        url: &str,
        format: Format,
        reference: &str,
        name: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<(Manifest, bool)> {
        let store = self.store().await?;
        if let Some(n) = name {
            check_tag(n)?;
            refuse_taken_name(store.as_ref(), n).await?;
        }
        let options = PackOptions {
            pg: None,
            wal_history: None,
            name: name.map(str::to_string),
            parent: None,
            identity: None,
            stamps: None,
            progress: progress.clone(),
        };
        if is_server(url) {
            let report = super::capture::pack_online(&install()?, url, store, &options).await?;
            return Ok((report.manifest, false));
        }
        let source = self.open_storage(url).await?;
        if format == Format::Zenith {
            let m = zenith::resolve(source.as_ref(), reference).await?;
            let r = zenith::transfer(source.as_ref(), &store, &m, name, &progress).await?;
            let m = r.manifest.clone().unwrap_or(m);
            return Ok((m, r.already_there));
        }
        if format == Format::Pgdata
            && snapshot::pgdata::read_manifest(source.as_ref())
                .await?
                .is_none()
        {
            // A stopped data directory, read in place.
            if let StorageUrl::Local(dir) = StorageUrl::parse(url)? {
                datadir::check_not_running(&dir)?;
                let report = zenith::pack_dir(&dir, store, &options, None).await?;
                return Ok((report.manifest, false));
            }
        }
        let scratch = self.scratch("import")?;
        let data = scratch.path().join("data");
        let unpacked = snapshot::unpack(
            format,
            source.as_ref(),
            reference,
            &data,
            &ProgressHandle::default(),
        )
        .await?;
        let lsns = match (&unpacked.manifest, format) {
            (None, Format::Basebackup) => Some(super::capture::backup_lsns(&data)?),
            (m, _) => label_lsns(&data, m.as_ref()),
        };
        // PostgreSQL's manifest describes the backup, not the data directory.
        let _ = std::fs::remove_file(data.join("backup_manifest"));
        let report = zenith::pack_dir(&data, store, &options, lsns).await?;
        Ok((report.manifest, false))
    }
}
