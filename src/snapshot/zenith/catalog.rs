//! The snapshots a storage holds: `snapshots/<id>.json` manifests, listed oldest first and
//! found by `LATEST`, name or id prefix. Manifests are untrusted: each is size-limited
//! before it is read and validated when parsed.

use crate::snapshot::error::{Result, SnapshotError};
use crate::snapshot::manifest::{self, Format, Manifest};
use crate::storage::Storage;

pub(crate) fn manifest_key(id: &str) -> String {
    format!("snapshots/{id}.json")
}

/// Whether `storage` holds snapshot `id` (its manifest).
pub async fn contains(storage: &dyn Storage, id: &str) -> Result<bool> {
    Ok(storage.exists(&manifest_key(id)).await?)
}

/// Makes snapshot `m` visible in `storage` by writing its manifest (everything it names
/// must be stored already; for a repo's thin clone, its clone must be complete).
pub async fn publish(storage: &dyn Storage, m: &Manifest) -> Result<()> {
    storage
        .put(&manifest_key(&m.id), bytes::Bytes::from(m.to_json()))
        .await?;
    Ok(())
}

/// Refuses a listed object larger than `limit` without reading it.
pub(super) fn refuse_listed_size(
    storage: &dyn Storage,
    object: &crate::storage::ObjectMeta,
    limit: u64,
) -> Result<()> {
    if object.size > limit {
        return Err(crate::storage::Error::TooLarge {
            url: format!("{}/{}", storage.url(), object.key),
            size: object.size,
            limit,
        }
        .into());
    }
    Ok(())
}

/// Every snapshot manifest in `storage`, oldest first.
pub async fn list(storage: &dyn Storage) -> Result<Vec<Manifest>> {
    let objects = storage.list("snapshots/").await?;
    let mut out = Vec::new();
    for object in objects.into_iter().filter(|o| o.key.ends_with(".json")) {
        refuse_listed_size(storage, &object, manifest::MAX_MANIFEST_BYTES as u64)?;
        let bytes = storage
            .get_bytes_limited(&object.key, manifest::MAX_MANIFEST_BYTES as u64)
            .await?;
        let source = format!("{}/{}", storage.url(), object.key);
        let manifest = Manifest::parse(&bytes, &source)?;
        if manifest.format != Format::Zenith {
            return Err(SnapshotError::Corrupt {
                object: source,
                what: format!(
                    "a {} manifest among zenith-format snapshots",
                    manifest.format.as_str()
                ),
            });
        }
        out.push(manifest);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Finds one snapshot by `LATEST`, name, or id prefix.
pub async fn resolve(storage: &dyn Storage, reference: &str) -> Result<Manifest> {
    let all = list(storage).await?;
    let url = storage.url();
    let not_found = || SnapshotError::NotFound {
        reference: reference.to_string(),
        url: url.clone(),
    };
    if reference == "LATEST" {
        return all.into_iter().next_back().ok_or_else(not_found);
    }
    if let Some(found) = all
        .iter()
        .rev()
        .find(|m| m.name.as_deref() == Some(reference))
    {
        return Ok(found.clone());
    }
    let matches: Vec<&Manifest> = all.iter().filter(|m| m.id.starts_with(reference)).collect();
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(not_found()),
        many => Err(SnapshotError::Ambiguous {
            reference: reference.to_string(),
            url,
            matches: many
                .iter()
                .map(|m| m.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
