//! Sharing snapshots: named storages, `push` and `pull` between the repo and any storage
//! (only missing objects move), storage_dest's guard against mixing clusters, retention,
//! and the main pg brought back from storage_dest on a machine that lost it.

use std::collections::HashSet;
use std::sync::Arc;

use super::config::Retention;
use super::names::check_name;
use super::Pageserver;
use crate::models::{
    Moved, OpError, OpResult, PullReport, PushReport, PushedSnapshot, StorageDetail, StorageInfo,
};
use crate::snapshot::{datadir, zenith, Manifest};
use crate::util::progress::ProgressHandle;

/// The name `storage_dest` goes by wherever a storage name is accepted.
pub const STORAGE_DEST: &str = "storage_dest";

pub fn looks_like_url(text: &str) -> bool {
    text.contains("://") || text.starts_with('/') || text.starts_with('.')
}

impl Pageserver {
    /// A storage name (`storage_dest` or one attached) or a URL, as a URL.
    pub fn storage_url(&self, name_or_url: &str) -> OpResult<String> {
        let config = self.repo.config()?;
        if name_or_url == STORAGE_DEST {
            return config.storage_dest.ok_or_else(|| {
                OpError::BadRequest(
                    "this repo has no storage_dest; `zenith storage attach -n storage_dest --path URL` sets one"
                        .into(),
                )
            });
        }
        if let Some(url) = config.storages.get(name_or_url) {
            return Ok(url.clone());
        }
        if looks_like_url(name_or_url) {
            crate::storage::StorageUrl::parse(name_or_url)
                .map_err(|e| OpError::BadRequest(e.to_string()))?;
            return Ok(name_or_url.to_string());
        }
        Err(OpError::NotFound(format!(
            "there is no storage named {name_or_url:?}; `zenith storage list` shows them, or give a URL"
        )))
    }

    /// Whether `text` names a storage (`storage_dest`, an attached name) or is a URL.
    pub fn is_storage(&self, text: &str) -> OpResult<bool> {
        Ok(text == STORAGE_DEST
            || looks_like_url(text)
            || self.repo.config()?.storages.contains_key(text))
    }

    /// The named storages, storage_dest first when set.
    pub fn list_storages(&self) -> OpResult<Vec<StorageInfo>> {
        let config = self.repo.config()?;
        let mut out: Vec<StorageInfo> = config
            .storage_dest
            .iter()
            .map(|url| StorageInfo {
                name: STORAGE_DEST.into(),
                url: url.clone(),
            })
            .collect();
        out.extend(config.storages.iter().map(|(name, url)| StorageInfo {
            name: name.clone(),
            url: url.clone(),
        }));
        Ok(out)
    }

    /// One storage: its URL, the snapshots there and the space they use.
    pub async fn show_storage(&self, name: &str) -> OpResult<StorageDetail> {
        if looks_like_url(name) {
            return Err(OpError::BadRequest(format!(
                "{name:?} is a URL; `zenith snapshot list --storage URL` lists its snapshots"
            )));
        }
        let url = self.storage_url(name)?;
        let storage = self.open_storage(&url).await?;
        let snapshots = zenith::list(storage.as_ref()).await?;
        let objects = storage.list("").await?;
        Ok(StorageDetail {
            name: name.to_string(),
            url,
            snapshots: snapshots.iter().map(Manifest::summary).collect(),
            objects: objects.len() as u64,
            bytes: objects.iter().map(|o| o.size).sum(),
            encrypted: storage.encrypted(),
        })
    }

    /// Names a storage URL, like a git remote (`storage_dest` sets the repo's
    /// destination). The URL is checked, not contacted.
    pub fn attach_storage(&self, name: &str, url: &str) -> OpResult<StorageInfo> {
        check_name(name)?;
        crate::storage::StorageUrl::parse(url).map_err(|e| OpError::BadRequest(e.to_string()))?;
        let mut config = self.repo.config()?;
        let taken = if name == STORAGE_DEST {
            config.storage_dest.clone()
        } else {
            config.storages.get(name).cloned()
        };
        if let Some(old) = taken {
            return Err(OpError::Conflict(format!(
                "storage {name} is attached already ({old}); `zenith storage detach -n {name}` first"
            )));
        }
        if name == STORAGE_DEST {
            config.storage_dest = Some(url.to_string());
        } else {
            config.storages.insert(name.to_string(), url.to_string());
        }
        self.repo.save_config(&config)?;
        Ok(StorageInfo {
            name: name.to_string(),
            url: url.to_string(),
        })
    }

    /// Forgets a named storage; what it holds is left alone.
    pub fn detach_storage(&self, name: &str) -> OpResult<()> {
        let mut config = self.repo.config()?;
        let found = if name == STORAGE_DEST {
            config.storage_dest.take().is_some()
        } else {
            config.storages.remove(name).is_some()
        };
        if !found {
            return Err(OpError::NotFound(format!(
                "there is no storage named {name:?}; `zenith storage list` shows them"
            )));
        }
        self.repo.save_config(&config)?;
        Ok(())
    }

    /// The system identifier of the main pg's cluster.
    fn main_system_identifier(&self) -> OpResult<u64> {
        let data = self.repo.node("main").data();
        Ok(datadir::read_control(&data)?.system_identifier)
    }

    /// Pushes repo snapshots to a storage (default: storage_dest): `reference`, or every
    /// snapshot the storage lacks. storage_dest holds one cluster, the main pg's: a
    /// destination with another cluster's snapshots is refused, untouched.
    pub async fn push(
        &self,
        reference: Option<&str>,
        dest: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<PushReport> {
        self.push_from(None, reference, dest, progress).await
    }

    /// [`Pageserver::push`] from another storage (`from`, a name or URL) instead of the repo.
    pub async fn push_from(
        &self,
        from: Option<&str>,
        reference: Option<&str>,
        dest: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<PushReport> {
        self.push_except(from, reference, dest, &HashSet::new(), progress)
            .await
    }

    /// [`Pageserver::push_from`], leaving out the snapshots in `except` (retention's choice).
    pub async fn push_except(
        &self,
        from: Option<&str>,
        reference: Option<&str>,
        dest: Option<&str>,
        except: &HashSet<String>,
        progress: ProgressHandle,
    ) -> OpResult<PushReport> {
        let label = dest.unwrap_or(STORAGE_DEST);
        let url = self.storage_url(label)?;
        let source = match from {
            Some(f) => self.storage_url(f)?,
            None => self.repo.store_url(),
        };
        let store = self.open_storage(&source).await?;
        let target = self.open_storage(&url).await?;
        if store.url() == target.url() {
            return Err(OpError::BadRequest(format!(
                "{url} is both where the snapshots come from and where they go"
            )));
        }
        // Compared in canonical form, without opening storage_dest: `/x` and `file:///x`
        // are one place.
        let is_dest = match self.repo.config()?.storage_dest {
            Some(d) => crate::storage::StorageUrl::parse(&d)?.to_string() == target.url(),
            None => false,
        };
        let there = zenith::list(target.as_ref()).await?;
        let there_ids: HashSet<&str> = there.iter().map(|m| m.id.as_str()).collect();
        let mut picked = match reference {
            Some(r) => vec![zenith::resolve(store.as_ref(), r).await?],
            None => zenith::list(store.as_ref())
                .await?
                .into_iter()
                .filter(|m| !there_ids.contains(m.id.as_str()) && !except.contains(&m.id))
                // storage_dest is the main pg's: other pgs' snapshots go there by name.
                .filter(|m| !is_dest || of_main(m))
                .collect(),
        };
        if is_dest {
            let ours = self.main_system_identifier()?;
            if let Some(other) = there.iter().find(|m| m.system_identifier != ours) {
                return Err(OpError::Conflict(format!(
                    "storage_dest {url} holds snapshots of another cluster (system identifier {}, this repo's main pg is {ours}); zenith never mixes clusters there: choose another storage_dest",
                    other.system_identifier
                )));
            }
            if let Some(m) = picked.iter().find(|m| m.system_identifier != ours) {
                if reference.is_some() {
                    return Err(OpError::Conflict(format!(
                        "snapshot {} is of another cluster than the main pg; push it to a named storage or URL instead of storage_dest",
                        m.id
                    )));
                }
            }
            picked.retain(|m| m.system_identifier == ours);
        }
        let mut pushed = Vec::new();
        let (mut bytes, mut objects) = (0u64, 0u64);
        for m in &picked {
            let r = self
                .send(store.as_ref(), m, &target, None, &progress)
                .await?;
            bytes += r.bytes_sent;
            objects += r.objects_sent;
            pushed.push(PushedSnapshot {
                snapshot: m.summary(),
                moved: Moved::from(&r),
            });
        }
        Ok(PushReport {
            storage: label.to_string(),
            url: target.url(),
            pushed,
            bytes_sent: bytes,
            objects_sent: objects,
        })
    }

    /// Pulls one snapshot (default LATEST) of a storage into the repo; no pg changes.
    pub async fn pull(
        &self,
        source: &str,
        reference: Option<&str>,
        progress: ProgressHandle,
    ) -> OpResult<PullReport> {
        let url = self.storage_url(source)?;
        let from = self.open_storage(&url).await?;
        let m = zenith::resolve(from.as_ref(), reference.unwrap_or("LATEST")).await?;
        let store = self.store().await?;
        let r = zenith::transfer(from.as_ref(), &store, &m, None, &progress).await?;
        Ok(PullReport {
            snapshot: m.summary(),
            url: from.url(),
            moved: Moved::from(&r),
        })
    }

    /// Retention on a storage: unnamed snapshots `rule` does not keep go, named ones stay
    /// (with `dry_run`, they are only listed). `eligible` narrows what may go.
    pub async fn prune(
        &self,
        storage: &str,
        rule: Retention,
        dry_run: bool,
        eligible: impl Fn(&Manifest) -> bool,
    ) -> OpResult<Vec<Manifest>> {
        let url = self.storage_url(storage)?;
        let target = self.open_storage(&url).await?;
        let listed: Vec<Manifest> = zenith::list(target.as_ref())
            .await?
            .into_iter()
            .filter(|m| eligible(m))
            .collect();
        let gone = doomed(&listed, rule);
        let doomed: Vec<Manifest> = listed
            .into_iter()
            .filter(|m| gone.contains(&m.id))
            .collect();
        if !dry_run {
            for m in &doomed {
                zenith::delete(
                    Arc::clone(&target),
                    m,
                    std::time::Duration::from_secs(3600),
                    0.05,
                )
                .await?;
            }
            if target.url() == self.store().await?.url() {
                for m in &doomed {
                    self.drop_clone(&m.id)?;
                }
                self.sweep_clones(target.as_ref()).await?;
            }
            // The WAL no kept snapshot needs goes with them; a restore never starts
            // before the oldest snapshot.
            let kept = zenith::list(target.as_ref()).await?;
            let trimmed = crate::safekeeper::archive::trim(Arc::clone(&target), &kept)
                .await
                .map_err(|e| OpError::Failed(e.to_string()))?;
            if trimmed > 0 {
                tracing::info!(
                    "retention: deleted {trimmed} WAL files older than every kept snapshot of {url}"
                );
            }
        }
        Ok(doomed)
    }
}

impl Pageserver {
    /// Brings the main pg back from the newest snapshot in storage_dest (a crash, or a new
    /// machine given the old config.toml); `None` when storage_dest is unset or empty.
    pub async fn restore_main(&self, progress: ProgressHandle) -> OpResult<Option<Manifest>> {
        let Some(url) = self.repo.config()?.storage_dest else {
            return Ok(None);
        };
        let from = self.open_storage(&url).await?;
        let all = zenith::list(from.as_ref()).await?;
        // The newest of the main pg; a storage_dest filled only by hand: its newest.
        let Some(mut m) = all
            .iter()
            .rev()
            .find(|m| of_main(m))
            .or(all.last())
            .cloned()
        else {
            return Ok(None);
        };
        let archive = crate::safekeeper::Archive::new(from.clone(), m.system_identifier);
        let failed = |e: crate::safekeeper::ArchiveError| OpError::Failed(e.to_string());
        // The history main wrote last (after a checkout, not the one of its newest
        // snapshot, which is the state it left): the newest snapshot of its line, and
        // its WAL, are what the main pg was.
        let mut history = m.wal_history.clone();
        if let Some(current) = archive.current("main").await.map_err(failed)? {
            let lineage = archive.lineage(&current).await.map_err(failed)?;
            if let Some(newest) = all
                .iter()
                .rev()
                .find(|s| super::pitr::in_lineage(&lineage, s))
            {
                m = newest.clone();
                history = Some(current);
            }
        }
        let store = self.store().await?;
        zenith::transfer(from.as_ref(), &store, &m, None, &progress).await?;
        let mut state = self.main_from_snapshot(&m).await?;
        // The WAL archived after the snapshot is replayed at the first start: every
        // commit archived before the machine was lost comes back, not only the snapshot's.
        if let Some(history) = &history {
            let archived = archive
                .files(history, crate::compute::wal::DEFAULT_SEGMENT_SIZE)
                .await
                .map_err(failed)?;
            // Or only streamed by the safekeeper so far (a young history).
            let streamed = archive.pieces(history).await.map_err(failed)?;
            if !archived.is_empty() || !streamed.is_empty() {
                state.wal = Some(crate::compute::node::WalLine {
                    history: crate::compute::node::new_history(),
                    parent: None,
                });
                self.repo.node("main").begin_recovery(
                    &mut state,
                    crate::compute::node::Recovery {
                        source: history.clone(),
                        target: None,
                    },
                )?;
            }
        }
        Ok(Some(m))
    }
}

/// Whether a snapshot is of the main pg (taken by zenith of pg main, or named `main@...`).
pub fn of_main(m: &Manifest) -> bool {
    m.pg.as_deref() == Some("main") || m.name.as_deref().is_some_and(|n| n.starts_with("main@"))
}

/// The ids of the unnamed snapshots among `all` that `rule` does not keep.
pub fn doomed(all: &[Manifest], rule: Retention) -> HashSet<String> {
    let mut unnamed: Vec<&Manifest> = all.iter().filter(|m| m.name.is_none()).collect();
    unnamed.sort_by(|a, b| b.id.cmp(&a.id));
    unnamed.dedup_by(|a, b| a.id == b.id);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Ids start with their creation time, milliseconds since the epoch, in hex.
    let young = |m: &Manifest| match (
        rule.keep_within,
        u64::from_str_radix(m.id.get(..12).unwrap_or(""), 16),
    ) {
        (Some(within), Ok(created)) => now.saturating_sub(created) < within.as_millis() as u64,
        _ => false,
    };
    unnamed
        .into_iter()
        .skip(rule.keep_last as usize)
        .filter(|m| !young(m))
        .map(|m| m.id.clone())
        .collect()
}
