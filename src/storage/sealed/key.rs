//! An encrypted storage's key: 32 random bytes, kept in the storage itself
//! (`zenith-key.json`) wrapped by the passphrase, so anyone with the storage and the
//! passphrase can read it, including a new machine after the old one is lost. The
//! passphrase becomes a key-encryption key through argon2id; the wrapped key is sealed
//! with XChaCha20-Poly1305, its parameters bound as associated data, so a wrong passphrase
//! and an altered key file fail the same way: the key does not open.
//!
//! The key file is untrusted input: its size and argon2 parameters are bounded before
//! anything is derived (at most 256 MiB and 8 passes), so a hostile storage cannot make
//! zenith allocate gigabytes or spin for minutes.
//! The passphrase comes from the environment only (`ZENITH_PASSPHRASE`, or the file
//! `ZENITH_PASSPHRASE_FILE` names) and is never printed; keys are wiped when dropped.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::storage::{Error, Result};

/// The key file's name at the storage's root.
pub const KEY_OBJECT: &str = "zenith-key.json";

/// A key file is a few hundred bytes; anything past this is not one.
pub const MAX_KEY_FILE: u64 = 16 << 10;

pub const PASSPHRASE_ENV: &str = "ZENITH_PASSPHRASE";
pub const PASSPHRASE_FILE_ENV: &str = "ZENITH_PASSPHRASE_FILE";
pub const NEW_PASSPHRASE_ENV: &str = "ZENITH_NEW_PASSPHRASE";
pub const NEW_PASSPHRASE_FILE_ENV: &str = "ZENITH_NEW_PASSPHRASE_FILE";

const FORMAT: &str = "zenith storage key";

/// argon2id's cost for new keys: 64 MiB and three passes, 0.15-0.2 s (measured)
/// here; enough to make guessing slow, cheap enough for each `zenith` run that opens the
/// storage (PostgreSQL's archive command is one per WAL segment).
const MEMORY_KIB: u32 = 64 << 10;
const ITERATIONS: u32 = 3;
const PARALLELISM: u32 = 1;

/// The storage's working keys, derived from its key; wiped on drop, never printed.
pub struct StorageKeys {
    /// Encrypts objects.
    pub content: [u8; 32],
    /// Keys the synthetic IV of sealed names (see `names`).
    pub name_mac: [u8; 32],
    /// Keys the stream that hides sealed names.
    pub name_stream: [u8; 32],
}

impl std::fmt::Debug for StorageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageKeys(..)")
    }
}

impl Drop for StorageKeys {
    fn drop(&mut self) {
        self.content.zeroize();
        self.name_mac.zeroize();
        self.name_stream.zeroize();
    }
}

impl StorageKeys {
    fn derive(master: &[u8; 32]) -> StorageKeys {
        StorageKeys {
            content: hmac(master, &[b"zenith content key v1"]),
            name_mac: hmac(master, &[b"zenith name mac v1"]),
            name_stream: hmac(master, &[b"zenith name stream v1"]),
        }
    }
}

/// HMAC-SHA256 of the concatenated `parts` under `key`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: String,
    version: u32,
    kdf: Kdf,
    /// Always "xchacha20poly1305".
    cipher: String,
    /// Hex, 24 bytes.
    nonce: String,
    /// Hex: the 32-byte key and its 16-byte tag.
    wrapped: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kdf {
    /// Always "argon2id".
    algorithm: String,
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
    /// Hex, 16 to 64 bytes.
    salt: String,
}

/// The passphrase from the environment, if one is set. A file named by
/// `ZENITH_PASSPHRASE_FILE` loses one trailing newline.
pub fn passphrase() -> Result<Option<Zeroizing<String>>> {
    passphrase_from(PASSPHRASE_ENV, PASSPHRASE_FILE_ENV)
}

/// The new passphrase of `zenith storage passphrase`, if one is set.
pub fn new_passphrase() -> Result<Option<Zeroizing<String>>> {
    passphrase_from(NEW_PASSPHRASE_ENV, NEW_PASSPHRASE_FILE_ENV)
}

fn passphrase_from(var: &str, file_var: &str) -> Result<Option<Zeroizing<String>>> {
    let config = |reason: String| Error::Config { reason };
    let text = if let Some(value) = std::env::var_os(var) {
        Zeroizing::new(
            value
                .into_string()
                .map_err(|_| config(format!("{var} is not valid UTF-8")))?,
        )
    } else if let Some(path) = std::env::var_os(file_var) {
        let mut text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
            config(format!(
                "{file_var}: cannot read {}: {e}",
                std::path::Path::new(&path).display()
            ))
        })?);
        if text.ends_with('\n') {
            text.pop();
            if text.ends_with('\r') {
                text.pop();
            }
        }
        text
    } else {
        return Ok(None);
    };
    if text.is_empty() {
        return Err(config(format!(
            "the passphrase ({var} or {file_var}) is empty"
        )));
    }
    Ok(Some(text))
}

/// A new random key wrapped by `passphrase`: the key file's bytes and the working keys.
pub fn create(passphrase: &str) -> Result<(Vec<u8>, StorageKeys)> {
    let mut master = Zeroizing::new([0u8; 32]);
    random(&mut master[..])?;
    let file = wrap(&master, passphrase)?;
    Ok((file, StorageKeys::derive(&master)))
}

/// The key file `bytes` of storage `url`, wrapped by `new` instead of `old`: the same key,
/// so everything stored stays readable.
pub fn rewrap(bytes: &[u8], old: &str, new: &str, url: &str) -> Result<Vec<u8>> {
    let master = unwrap(bytes, old, url)?;
    wrap(&master, new)
}

/// The key file of `master` wrapped by `passphrase` (a fresh salt and nonce).
fn wrap(master: &[u8; 32], passphrase: &str) -> Result<Vec<u8>> {
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 24];
    random(&mut salt)?;
    random(&mut nonce)?;
    let kdf = Kdf {
        algorithm: "argon2id".into(),
        memory_kib: MEMORY_KIB,
        iterations: ITERATIONS,
        parallelism: PARALLELISM,
        salt: hex::encode(salt),
    };
    let kek = derive_kek(passphrase, &kdf, &salt)?;
    let wrapped = XChaCha20Poly1305::new((&*kek).into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &master[..],
                aad: &associated_data(&kdf),
            },
        )
        .map_err(|_| Error::Config {
            reason: "cannot wrap the key".into(),
        })?;
    let file = KeyFile {
        format: FORMAT.into(),
        version: 1,
        kdf,
        cipher: "xchacha20poly1305".into(),
        nonce: hex::encode(nonce),
        wrapped: hex::encode(wrapped),
    };
    Ok(serde_json::to_vec_pretty(&file).expect("a key file serializes"))
}

/// Opens the key file `bytes` of storage `url` with `passphrase`.
pub fn open(bytes: &[u8], passphrase: &str, url: &str) -> Result<StorageKeys> {
    Ok(StorageKeys::derive(&*unwrap(bytes, passphrase, url)?))
}

/// The key in the key file `bytes` of storage `url`, unwrapped with `passphrase`.
fn unwrap(bytes: &[u8], passphrase: &str, url: &str) -> Result<Zeroizing<[u8; 32]>> {
    let damaged = |what: &str| {
        Error::Config {
        reason: format!(
            "{url}/{KEY_OBJECT} is not a usable key file ({what}); restore it from a copy, or the storage cannot be read"
        ),
    }
    };
    let file: KeyFile = serde_json::from_slice(bytes).map_err(|e| damaged(&e.to_string()))?;
    if file.format != FORMAT || file.version != 1 {
        return Err(damaged(&format!(
            "format {:?} version {}; this zenith reads version 1",
            file.format, file.version
        )));
    }
    if file.cipher != "xchacha20poly1305" || file.kdf.algorithm != "argon2id" {
        return Err(damaged("an unknown cipher or key derivation"));
    }
    let k = &file.kdf;
    if !(8 << 10..=256 << 10).contains(&k.memory_kib)
        || !(1..=8).contains(&k.iterations)
        || !(1..=8).contains(&k.parallelism)
    {
        return Err(damaged("argon2 parameters out of bounds"));
    }
    let salt = hex::decode(&k.salt).map_err(|_| damaged("a salt that is not hex"))?;
    let nonce = hex::decode(&file.nonce).map_err(|_| damaged("a nonce that is not hex"))?;
    let wrapped = hex::decode(&file.wrapped).map_err(|_| damaged("a key that is not hex"))?;
    if !(16..=64).contains(&salt.len()) || nonce.len() != 24 || wrapped.len() != 48 {
        return Err(damaged("a salt, nonce or key of the wrong length"));
    }
    let kek = derive_kek(passphrase, k, &salt)?;
    let master = XChaCha20Poly1305::new((&*kek).into())
        .decrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &wrapped,
                aad: &associated_data(k),
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Error::WrongPassphrase {
            url: url.to_string(),
        })?;
    let master =
        <[u8; 32]>::try_from(&master[..]).map_err(|_| damaged("a key of the wrong length"))?;
    Ok(Zeroizing::new(master))
}

/// The wrapped key is bound to its derivation: altered parameters do not open it.
fn associated_data(kdf: &Kdf) -> Vec<u8> {
    format!(
        "{FORMAT} v1 argon2id m={} t={} p={} salt={}",
        kdf.memory_kib, kdf.iterations, kdf.parallelism, kdf.salt
    )
    .into_bytes()
}

fn derive_kek(passphrase: &str, kdf: &Kdf, salt: &[u8]) -> Result<Zeroizing<[u8; 32]>> {
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| Error::Config {
            reason: format!("argon2 parameters: {e}"),
        })?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), salt, &mut kek[..])
        .map_err(|e| Error::Config {
            reason: format!("argon2: {e}"),
        })?;
    Ok(kek)
}

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::getrandom(buf).map_err(|e| Error::Config {
        reason: format!("the operating system's random source failed: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_opens_with_its_passphrase_only() {
        let (file, keys) = create("correct horse").unwrap();
        let again = open(&file, "correct horse", "file:///s").unwrap();
        assert_eq!(keys.content, again.content);
        assert_eq!(keys.name_mac, again.name_mac);
        assert_ne!(keys.content, keys.name_mac);
        let wrong = open(&file, "battery staple", "file:///s").unwrap_err();
        assert!(matches!(wrong, Error::WrongPassphrase { .. }), "{wrong}");
        // Altered parameters (a lower cost) do not open it.
        let text = String::from_utf8(file).unwrap();
        let cheaper = text.replace("\"iterations\": 3", "\"iterations\": 1");
        assert_ne!(cheaper, text);
        let e = open(cheaper.as_bytes(), "correct horse", "file:///s").unwrap_err();
        assert!(matches!(e, Error::WrongPassphrase { .. }), "{e}");
        // A hostile cost is refused before anything is derived.
        let huge = text.replace("\"memory_kib\": 65536", "\"memory_kib\": 4000000000");
        let e = open(huge.as_bytes(), "correct horse", "file:///s").unwrap_err();
        assert!(e.to_string().contains("out of bounds"), "{e}");
        assert!(format!("{keys:?}").contains(".."));
    }

    #[test]
    fn a_new_passphrase_keeps_the_key() {
        let (file, keys) = create("old").unwrap();
        let rewrapped = rewrap(&file, "old", "new", "file:///s").unwrap();
        assert_eq!(
            open(&rewrapped, "new", "file:///s").unwrap().content,
            keys.content
        );
        assert!(open(&rewrapped, "old", "file:///s").is_err());
        assert!(matches!(
            rewrap(&file, "wrong", "new", "file:///s").unwrap_err(),
            Error::WrongPassphrase { .. }
        ));
    }
}
