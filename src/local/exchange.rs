//! Export and import of the repo's snapshots: `zenith export REF --snapshot_path=URL` and
//! `zenith import --snapshot_path=URL --name PG@TAG`, in all three formats. The zenith
//! format moves objects store to store (only what the other side lacks); pgdata and
//! basebackup go through a verified data directory in the repo's scratch space.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use super::ops::{open, refuse_head_name, refuse_taken_name, store, OpError, OpResult, Ops};
use crate::snapshot::{basebackup, datadir, native, pgdata, transfer, Format, Manifest};
use crate::storage::StorageUrl;
use crate::util::progress::ProgressHandle;

/// A scratch directory in the repo, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(ops: &Ops, what: &str) -> OpResult<Scratch> {
        let dir = ops
            .repo
            .root
            .join("tmp")
            .join(format!("{what}-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(dir.parent().expect("has a parent"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

impl Ops {
    /// Writes repo snapshot `reference` to `url` in `format`.
    pub async fn export(
        &self,
        reference: &str,
        url: &str,
        format: Format,
        compress: bool,
        progress: ProgressHandle,
    ) -> OpResult<Value> {
        let store = store(&self.repo).await?;
        let m = native::resolve(store.as_ref(), reference).await?;
        let target = open(url).await?;
        if format == Format::Zenith {
            let r = transfer::transfer(store.as_ref(), &target, &m, None, &progress).await?;
            return Ok(json!({
                "snapshot": m.summary(),
                "url": target.url(),
                "format": "zenith",
                "objects_sent": r.objects_sent,
                "bytes_sent": r.bytes_sent,
                "objects_skipped": r.objects_skipped,
                "already_there": r.already_there,
            }));
        }
        let scratch = Scratch::new(self, "export")?;
        native::unpack(store.as_ref(), &m, &scratch.0, &ProgressHandle::default()).await?;
        let options = native::PackOptions {
            pg: None,
            name: m.name.clone(),
            parent: None,
            progress,
        };
        let lsns = label_lsns(&scratch.0, Some(&m));
        let written = match format {
            Format::Pgdata => {
                pgdata::pack_dir(&scratch.0, Arc::clone(&target), &options, lsns).await?
            }
            _ => {
                basebackup::pack_dir(&scratch.0, Arc::clone(&target), &options, lsns, compress)
                    .await?
            }
        };
        Ok(json!({
            "snapshot": m.summary(),
            "url": target.url(),
            "format": format.as_str(),
            "bytes_sent": written.stored_size,
        }))
    }

    /// Adds a snapshot to the repo from `url` (a storage in `format`, or a running server
    /// as a `postgres://` URI), named `name` when given.
    pub async fn import(
        &self,
        url: &str,
        format: Format,
        reference: &str,
        name: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<(Manifest, bool)> {
        let store = store(&self.repo).await?;
        if let Some(n) = name {
            refuse_head_name(n)?;
            refuse_taken_name(store.as_ref(), n).await?;
        }
        let options = native::PackOptions {
            pg: None,
            name: name.map(str::to_string),
            parent: None,
            progress: progress.clone(),
        };
        if is_server(url) {
            let install = crate::compute::find_postgres().map_err(anyhow::Error::from)?;
            let report = native::pack_online(&install, url, store, &options).await?;
            return Ok((report.manifest, false));
        }
        let source = open(url).await?;
        match format {
            Format::Zenith => {
                let m = native::resolve(source.as_ref(), reference).await?;
                let r = transfer::transfer(source.as_ref(), &store, &m, name, &progress).await?;
                let m = r.manifest.expect("a transfer names its snapshot");
                Ok((m, r.already_there))
            }
            Format::Pgdata => match pgdata::read_manifest(source.as_ref()).await? {
                Some(m) => {
                    let scratch = Scratch::new(self, "import")?;
                    pgdata::unpack(source.as_ref(), &m, &scratch.0).await?;
                    let lsns = label_lsns(&scratch.0, Some(&m));
                    let report = native::pack_dir(&scratch.0, store, &options, lsns).await?;
                    Ok((report.manifest, false))
                }
                None => match StorageUrl::parse(url).map_err(anyhow::Error::from)? {
                    // A stopped data directory, read in place.
                    StorageUrl::Local(dir) => {
                        datadir::check_not_running(&dir)?;
                        Ok((
                            native::pack_dir(&dir, store, &options, None)
                                .await?
                                .manifest,
                            false,
                        ))
                    }
                    _ => Err(OpError::BadRequest(format!(
                        "{} holds no {}: it is not a pgdata snapshot",
                        source.url(),
                        pgdata::MANIFEST_KEY
                    ))),
                },
            },
            Format::Basebackup => {
                let scratch = Scratch::new(self, "import")?;
                let (m, _) = basebackup::unpack(source.as_ref(), &scratch.0).await?;
                let lsns = match &m {
                    Some(m) => label_lsns(&scratch.0, Some(m)),
                    None => Some(native::backup_lsns(&scratch.0)?),
                };
                // PostgreSQL's manifest describes the backup, not the data directory.
                let _ = std::fs::remove_file(scratch.0.join("backup_manifest"));
                let report = native::pack_dir(&scratch.0, store, &options, lsns).await?;
                Ok((report.manifest, false))
            }
        }
    }
}
