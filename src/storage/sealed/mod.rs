//! Client-side encryption of a storage: a [`Storage`] wrapper that seals every object it
//! stores and opens every object it reads, so the storage (its operator, a leaked bucket,
//! a copied directory) sees neither data nor the digests that would reveal known content.
//!
//! A storage is encrypted when its root holds `zenith-key.json` (see [`key`]): zenith
//! makes one with `zenith storage encrypt`, in an empty storage only. [`open`](super::open)
//! wraps every storage that has one, whatever reads it (snapshots, lists, indexes,
//! manifests, locks, the WAL archive), so everything above the storage layer stays
//! unchanged and pushing or pulling between an encrypted and a plain storage just works:
//! blocks are decrypted on the way out of one and sealed on the way into the other.
//!
//! What it promises: each object is sealed in authenticated chunks bound to its name
//! ([`chunks`]); names that are content digests are sealed too ([`names`]); a flipped
//! byte, a truncated object, or one moved under another name fails with the object named;
//! a wrong or missing passphrase fails in one line before anything is read or written.
//! What it does not hide: how many objects there are, their approximate sizes, when they
//! were written, snapshot ids and WAL segment names. Nor does it stop someone with write
//! access from putting back an older version of an object under the same name (a
//! manifest, say): versions are not bound. A storage whose key file is deleted looks
//! plain to [`wrap_if_encrypted`]; a repo that used it remembers it as encrypted and
//! refuses it then (`Config::refuse_unsealed`).

mod chunks;
mod key;
mod names;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ByteReader, Error, ObjectMeta, Result, Storage};
use chunks::{RangeRead, Sealer, Unsealed, PREFIX};
use key::{StorageKeys, MAX_KEY_FILE};
pub use key::{KEY_OBJECT, PASSPHRASE_ENV, PASSPHRASE_FILE_ENV};

/// Nonce prefixes of objects read by range, so a range costs one request: objects are
/// rarely rewritten, and a stale prefix only costs a retry.
const PREFIX_CACHE: usize = 4096;

/// An encrypted storage: objects sealed on the way in and opened on the way out.
pub struct SealedStorage {
    inner: Arc<dyn Storage>,
    keys: Arc<StorageKeys>,
    sealer: Sealer,
    prefixes: Mutex<HashMap<String, [u8; PREFIX]>>,
}

impl std::fmt::Debug for SealedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealedStorage({})", self.inner.url())
    }
}

/// `storage` itself, or `storage` wrapped when it is encrypted (its passphrase from the
/// environment).
pub async fn wrap_if_encrypted(storage: Arc<dyn Storage>) -> Result<Arc<dyn Storage>> {
    let Some(bytes) = key_file(storage.as_ref()).await? else {
        return Ok(storage);
    };
    let url = storage.url();
    let Some(passphrase) = key::passphrase()? else {
        return Err(Error::Encrypted { url });
    };
    let keys = open_key(bytes, passphrase, url).await?;
    Ok(Arc::new(SealedStorage::new(storage, keys)))
}

/// The encrypted `storage` opened with `passphrase`.
pub async fn unlock(storage: Arc<dyn Storage>, passphrase: &str) -> Result<Arc<dyn Storage>> {
    let url = storage.url();
    let bytes = key_file(storage.as_ref())
        .await?
        .ok_or_else(|| Error::Config {
            reason: format!("{url} is not encrypted (it has no {KEY_OBJECT})"),
        })?;
    let passphrase = zeroize::Zeroizing::new(passphrase.to_string());
    let keys = open_key(bytes, passphrase, url).await?;
    Ok(Arc::new(SealedStorage::new(storage, keys)))
}

/// Keys derived in this process, by key file and passphrase: argon2 runs once per storage
/// and process, however often it opens the storage (zenith-local's pushes, a push that
/// opens its target twice).
type Derived = Mutex<HashMap<[u8; 32], Arc<StorageKeys>>>;

/// The working keys of key file `bytes` (of storage `url`) under `passphrase`.
async fn open_key(
    bytes: Bytes,
    passphrase: zeroize::Zeroizing<String>,
    url: String,
) -> Result<Arc<StorageKeys>> {
    static DERIVED: std::sync::OnceLock<Derived> = std::sync::OnceLock::new();
    let derived = DERIVED.get_or_init(Default::default);
    let id = key::hmac(&bytes, &[passphrase.as_bytes()]);
    if let Some(keys) = derived.lock().expect("lock").get(&id) {
        return Ok(Arc::clone(keys));
    }
    let keys = Arc::new(derive(move || key::open(&bytes, &passphrase, &url)).await?);
    let mut derived = derived.lock().expect("lock");
    if derived.len() >= 16 {
        derived.clear();
    }
    derived.insert(id, Arc::clone(&keys));
    Ok(keys)
}

/// The passphrase from the environment, for commands that need one.
pub fn required_passphrase(url: &str) -> Result<zeroize::Zeroizing<String>> {
    key::passphrase()?.ok_or_else(|| Error::Config {
        reason: format!(
            "encrypting {url} needs a passphrase: set {PASSPHRASE_ENV}, or {PASSPHRASE_FILE_ENV} to a file holding it"
        ),
    })
}

/// Makes the empty `storage` encrypted: a new key, wrapped by `passphrase`, stored at its
/// root.
pub async fn encrypt(storage: Arc<dyn Storage>, passphrase: &str) -> Result<()> {
    let url = storage.url();
    if key_file(storage.as_ref()).await?.is_some() {
        return Err(Error::Config {
            reason: format!("{url} is encrypted already"),
        });
    }
    let objects = storage.list("").await?;
    if !objects.is_empty() {
        return Err(Error::Config {
            reason: format!(
                "{url} holds {} object(s) already, which would stay readable to anyone; encrypt a new, empty storage (another path or prefix) and push there",
                objects.len()
            ),
        });
    }
    let passphrase = zeroize::Zeroizing::new(passphrase.to_string());
    let (file, _) = derive(move || key::create(&passphrase)).await?;
    storage.put(KEY_OBJECT, Bytes::from(file.clone())).await?;
    // Two `storage encrypt` at once: the last key written wins, and the other run says so
    // before anything is sealed with its key.
    if key_file(storage.as_ref()).await?.as_deref() != Some(&file[..]) {
        return Err(Error::Config {
            reason: format!("{url} was encrypted by another run at the same time; its key stands"),
        });
    }
    Ok(())
}

/// Wraps the key of the encrypted `storage` by `new` instead of `old`: everything stored
/// stays readable, with the new passphrase only. The key file is replaced atomically.
pub async fn change_passphrase(storage: &dyn Storage, old: &str, new: &str) -> Result<()> {
    let url = storage.url();
    let bytes = key_file(storage).await?.ok_or_else(|| Error::Config {
        reason: format!("{url} is not encrypted (it has no {KEY_OBJECT})"),
    })?;
    let (old, new) = (
        zeroize::Zeroizing::new(old.to_string()),
        zeroize::Zeroizing::new(new.to_string()),
    );
    let file = derive(move || key::rewrap(&bytes, &old, &new, &url)).await?;
    storage.put(KEY_OBJECT, Bytes::from(file)).await
}

/// The passphrases from the environment for `zenith storage passphrase`: the current one
/// and the new one.
pub fn passphrase_change(
    url: &str,
) -> Result<(zeroize::Zeroizing<String>, zeroize::Zeroizing<String>)> {
    let old = key::passphrase()?.ok_or(Error::Encrypted {
        url: url.to_string(),
    })?;
    let new = key::new_passphrase()?.ok_or_else(|| Error::Config {
        reason: format!(
            "set {} (or {}) to the new passphrase of {url}",
            key::NEW_PASSPHRASE_ENV,
            key::NEW_PASSPHRASE_FILE_ENV
        ),
    })?;
    Ok((old, new))
}

/// The storage's key file, if it has one.
async fn key_file(storage: &dyn Storage) -> Result<Option<Bytes>> {
    match storage.get_bytes_limited(KEY_OBJECT, MAX_KEY_FILE).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs argon2 on a blocking thread.
async fn derive<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Config {
            reason: format!("key derivation failed: {e}"),
        })?
}

impl SealedStorage {
    fn new(inner: Arc<dyn Storage>, keys: Arc<StorageKeys>) -> SealedStorage {
        SealedStorage {
            sealer: Sealer::new(&keys.content),
            keys,
            inner,
            prefixes: Mutex::new(HashMap::new()),
        }
    }

    fn stored(&self, key: &str) -> Result<String> {
        super::validate_key(key)?;
        if key == KEY_OBJECT {
            return Err(Error::InvalidKey {
                key: key.to_string(),
                reason: "it names the storage's key file",
            });
        }
        if names::looks_sealed(key) {
            return Err(Error::InvalidKey {
                key: key.to_string(),
                reason: "in an encrypted storage, names of 96 hex digits are sealed names",
            });
        }
        Ok(names::seal_key(&self.keys, key))
    }

    /// The error for object `key` that does not open.
    fn tampered(&self, key: &str, why: Unsealed) -> Error {
        Error::Tampered {
            url: self.object_name(key),
            detail: why.0,
        }
    }

    /// Object `key` as a user finds it in the storage: its URL, and its stored name when
    /// that is sealed.
    fn object_name(&self, key: &str) -> String {
        let stored = names::seal_key(&self.keys, key);
        if stored == key {
            format!("{}/{key}", self.inner.url())
        } else {
            format!("{}/{key} (stored as {stored})", self.inner.url())
        }
    }

    /// Listed or headed `meta` in plain terms: its plain name and size.
    fn plain_meta(&self, meta: ObjectMeta) -> Result<ObjectMeta> {
        let key = names::open_key(&self.keys, &meta.key).map_err(|why| Error::Tampered {
            url: format!("{}/{}", self.inner.url(), meta.key),
            detail: why.to_string(),
        })?;
        Ok(ObjectMeta {
            key,
            size: chunks::plain_size(meta.size),
            last_modified: meta.last_modified,
        })
    }

    async fn prefix_of(&self, key: &str, stored: &str, fresh: bool) -> Result<[u8; PREFIX]> {
        if !fresh {
            if let Some(prefix) = self.prefixes.lock().expect("lock").get(key) {
                return Ok(*prefix);
            }
        }
        let head = self
            .inner
            .get_range(stored, 0..chunks::HEADER)
            .await
            .map_err(|e| self.plain_range_error(e, key))?;
        let prefix = chunks::header(&head).map_err(|why| self.tampered(key, why))?;
        let mut cache = self.prefixes.lock().expect("lock");
        if cache.len() >= PREFIX_CACHE {
            cache.clear();
        }
        cache.insert(key.to_string(), prefix);
        Ok(prefix)
    }

    /// An error of the stored object, named by its plain key (sizes in plain bytes).
    fn plain_range_error(&self, e: Error, key: &str) -> Error {
        match e {
            Error::InvalidRange {
                start, end, size, ..
            } => Error::InvalidRange {
                url: format!("{}/{key}", self.inner.url()),
                start,
                end,
                size: chunks::plain_size(size),
            },
            Error::NotFound { .. } => Error::NotFound {
                url: format!("{}/{key}", self.inner.url()),
            },
            other => other,
        }
    }

    /// Reads plaintext `range` of `key` (stored as `stored`); `Ok(Err)` when it does not
    /// open, which may be a stale cached prefix (the caller tries once more, fresh).
    async fn try_range(
        &self,
        key: &str,
        stored: &str,
        range: &Range<u64>,
        fresh: bool,
    ) -> Result<std::result::Result<Bytes, Unsealed>> {
        let prefix = self.prefix_of(key, stored, fresh).await?;
        let data = match self
            .inner
            .get_range(stored, Sealer::sealed_range(range))
            .await
        {
            Ok(data) => data,
            Err(Error::InvalidRange { .. }) => Bytes::new(),
            Err(e) => return Err(self.plain_range_error(e, key)),
        };
        let read = match self.sealer.open_range(key, &prefix, range, &data) {
            Ok(read) => read,
            Err(why) => return Ok(Err(why)),
        };
        let size = match read {
            RangeRead::Data(bytes) => return Ok(Ok(bytes)),
            RangeRead::Past { size } => size,
            RangeRead::PastChunks => {
                // Nothing where the range starts: the object's last chunk must say it is
                // the last, or the object was cut short.
                let stored_size = self
                    .inner
                    .head(stored)
                    .await
                    .map_err(|e| self.plain_range_error(e, key))?
                    .size;
                let Some(body) = stored_size.checked_sub(chunks::HEADER + 1) else {
                    return Ok(Err(Unsealed("is cut short: it has no chunk".into())));
                };
                let last = body / (chunks::CHUNK + chunks::TAG);
                if last >= range.start / chunks::CHUNK {
                    return Ok(Err(Unsealed("changed while it was read".into())));
                }
                let chunk = self
                    .inner
                    .get_range(stored, chunks::chunk_offset(last)..stored_size)
                    .await
                    .map_err(|e| self.plain_range_error(e, key))?;
                match self.sealer.size_from_last(key, &prefix, last, &chunk) {
                    Ok(size) => size,
                    Err(why) => return Ok(Err(why)),
                }
            }
        };
        if range.start == size {
            return Ok(Ok(Bytes::new()));
        }
        Err(Error::InvalidRange {
            url: format!("{}/{key}", self.inner.url()),
            start: range.start,
            end: range.end,
            size,
        })
    }
}

#[async_trait]
impl Storage for SealedStorage {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn encrypted(&self) -> bool {
        true
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let stored = self.stored(key)?;
        let sealed = self
            .sealer
            .seal(key, &data)
            .map_err(|why| self.tampered(key, why))?;
        self.prefixes.lock().expect("lock").remove(key);
        self.inner.put(&stored, Bytes::from(sealed)).await
    }

    async fn put_stream(&self, key: &str, reader: ByteReader) -> Result<u64> {
        let stored = self.stored(key)?;
        self.prefixes.lock().expect("lock").remove(key);
        let sealed = chunks::seal_stream(&self.sealer, key, reader);
        let n = self.inner.put_stream(&stored, sealed).await?;
        Ok(chunks::plain_size(n))
    }

    async fn get(&self, key: &str) -> Result<ByteReader> {
        let stored = self.stored(key)?;
        let reader = self
            .inner
            .get(&stored)
            .await
            .map_err(|e| self.plain_range_error(e, key))?;
        let url = self.object_name(key);
        Ok(chunks::open_stream(&self.sealer, key, reader, move |why| {
            Error::Tampered {
                url: url.clone(),
                detail: why.0,
            }
            .into_io()
        }))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let stored = self.stored(key)?;
        let mut opened = self.try_range(key, &stored, &range, false).await?;
        if opened.is_err() {
            // The object may have been replaced since its prefix was cached.
            opened = self.try_range(key, &stored, &range, true).await?;
        }
        opened.map_err(|why| self.tampered(key, why))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let stored = self.stored(key)?;
        let meta = self
            .inner
            .head(&stored)
            .await
            .map_err(|e| self.plain_range_error(e, key))?;
        self.plain_meta(meta)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        super::validate_prefix(prefix)?;
        let listed = self
            .inner
            .list(&names::seal_prefix(&self.keys, prefix))
            .await?;
        let mut out = Vec::with_capacity(listed.len());
        for meta in listed {
            if meta.key == KEY_OBJECT {
                continue;
            }
            let meta = self.plain_meta(meta)?;
            if meta.key.starts_with(prefix) {
                out.push(meta);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let stored = self.stored(key)?;
        self.prefixes.lock().expect("lock").remove(key);
        self.inner.delete(&stored).await
    }

    async fn remove_abandoned(&self) {
        self.inner.remove_abandoned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalStorage;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn round_trips_through_a_local_storage() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Storage> =
            Arc::new(LocalStorage::new(dir.path().to_path_buf()).unwrap());
        let keys = Arc::new(key::create("pw").unwrap().1);
        let sealed = SealedStorage::new(Arc::clone(&inner), keys);
        let digest = "cd".repeat(32);
        let pack = format!("packs/{digest}");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        sealed.put(&pack, Bytes::from(data.clone())).await.unwrap();
        sealed
            .put("snapshots/a.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let n = sealed
            .put_stream("big", Box::pin(std::io::Cursor::new(data.clone())))
            .await
            .unwrap();
        assert_eq!(n, data.len() as u64);
        // Plain names and sizes above, sealed ones below.
        let listed = sealed.list("").await.unwrap();
        let keys: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, vec!["big", pack.as_str(), "snapshots/a.json"]);
        assert_eq!(listed[1].size, data.len() as u64);
        assert!(inner
            .list("")
            .await
            .unwrap()
            .iter()
            .all(|m| !m.key.contains(&digest)));
        assert_eq!(sealed.list("packs/").await.unwrap().len(), 1);
        assert_eq!(sealed.list("snapshots/a").await.unwrap().len(), 1);
        assert_eq!(sealed.head(&pack).await.unwrap().size, data.len() as u64);
        let mut back = Vec::new();
        sealed
            .get("big")
            .await
            .unwrap()
            .read_to_end(&mut back)
            .await
            .unwrap();
        assert_eq!(back, data);
        let range = sealed.get_range(&pack, 70_000..140_001).await.unwrap();
        assert_eq!(range.as_ref(), &data[70_000..140_001]);
        let tail = sealed.get_range(&pack, 199_990..300_000).await.unwrap();
        assert_eq!(tail.as_ref(), &data[199_990..]);
        let past = sealed.get_range(&pack, 300_000..300_001).await.unwrap_err();
        assert!(
            matches!(past, Error::InvalidRange { size: 200_000, .. }),
            "{past}"
        );
        assert!(matches!(
            sealed.get_range("missing", 0..1).await.unwrap_err(),
            Error::NotFound { .. }
        ));
        // An object replaced after its prefix was cached still reads by range.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x55).collect();
        inner
            .put(
                &names::seal_key(&sealed.keys, &pack),
                Bytes::from(sealed.sealer.seal(&pack, &other).unwrap()),
            )
            .await
            .unwrap();
        let range = sealed.get_range(&pack, 10..20).await.unwrap();
        assert_eq!(range.as_ref(), &other[10..20]);
        // A plain name that would read as a sealed one, and the key file, are refused.
        for bad in [
            "ab".repeat(48),
            format!("x/{}.idx", "0".repeat(96)),
            KEY_OBJECT.into(),
        ] {
            let e = sealed.put(&bad, Bytes::new()).await.unwrap_err();
            assert!(matches!(e, Error::InvalidKey { .. }), "{e}");
        }
        sealed.delete(&pack).await.unwrap();
        assert!(!sealed.exists(&pack).await.unwrap());
    }
}
