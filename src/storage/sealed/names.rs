//! Sealed names. The zenith format names packs, indexes and block lists by the SHA-256 of
//! their content, so whoever can list a plain storage can test whether it holds a file they
//! know. In an encrypted storage every name segment that is such a digest (64 lowercase hex
//! digits, perhaps with an extension such as `.idx`) is stored sealed instead: a
//! deterministic authenticated encryption (SIV) built from HMAC-SHA256, 16 bytes of
//! synthetic IV then the digest XOR a keyed stream, 96 hex digits in all. Deterministic,
//! so the same block is stored once however many snapshots hold it; keyed, so the name
//! says nothing to anyone without the storage's key; authenticated, so a name made up or
//! altered is refused rather than misread. Other segments (snapshot ids, WAL segment
//! names, `snapshots/`) stay as they are.

use super::key::{hmac, StorageKeys};

const DIGEST_HEX: usize = 64;
const SEALED_HEX: usize = 96;

/// The stored form of `key`.
pub fn seal_key(keys: &StorageKeys, key: &str) -> String {
    map_segments(key, |segment| {
        let (stem, ext) = split(segment, DIGEST_HEX)?;
        let digest: [u8; 32] = hex::decode(stem).ok()?.try_into().ok()?;
        let iv = &hmac(&keys.name_mac, &[&digest])[..16];
        let stream = hmac(&keys.name_stream, &[iv]);
        let hidden: Vec<u8> = digest.iter().zip(stream).map(|(d, s)| d ^ s).collect();
        Some(format!("{}{}{ext}", hex::encode(iv), hex::encode(hidden)))
    })
}

/// The plain form of a stored key; `Err` names what is wrong with it.
pub fn open_key(keys: &StorageKeys, stored: &str) -> Result<String, &'static str> {
    let mut failure = None;
    let plain = map_segments(stored, |segment| {
        if split(segment, DIGEST_HEX).is_some() {
            failure = Some("its name is a plain digest, written without the storage's key");
            return None;
        }
        let (stem, ext) = split(segment, SEALED_HEX)?;
        let bytes = hex::decode(stem).expect("split checks hex digits");
        let (iv, hidden) = bytes.split_at(16);
        let stream = hmac(&keys.name_stream, &[iv]);
        let digest: Vec<u8> = hidden.iter().zip(stream).map(|(h, s)| h ^ s).collect();
        if hmac(&keys.name_mac, &[&digest])[..16] != *iv {
            failure = Some("its sealed name does not authenticate");
            return None;
        }
        Some(format!("{}{ext}", hex::encode(digest)))
    });
    match failure {
        Some(why) => Err(why),
        None => Ok(plain),
    }
}

/// Whether a plain `key` has a segment that would read as a sealed name.
pub fn looks_sealed(key: &str) -> bool {
    key.split('/')
        .any(|segment| split(segment, SEALED_HEX).is_some())
}

/// A listing prefix's stored form: whole segments sealed, and the part after the last `/`
/// left out (a partial name cannot be sealed); the caller filters the listing by the
/// plain prefix.
pub fn seal_prefix(keys: &StorageKeys, prefix: &str) -> String {
    match prefix.rfind('/') {
        Some(at) => format!("{}/", seal_key(keys, &prefix[..at])),
        None => String::new(),
    }
}

/// `segment` as `len` lowercase hex digits and an extension (empty, or starting with '.').
fn split(segment: &str, len: usize) -> Option<(&str, &str)> {
    let stem = segment.get(..len)?;
    let ext = &segment[len..];
    let hex = stem
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && (ext.is_empty() || ext.starts_with('.'))).then_some((stem, ext))
}

fn map_segments(key: &str, mut f: impl FnMut(&str) -> Option<String>) -> String {
    key.split('/')
        .map(|segment| f(segment).unwrap_or_else(|| segment.to_string()))
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> StorageKeys {
        super::super::key::create("test").unwrap().1
    }

    #[test]
    fn digests_are_sealed_and_nothing_else() {
        let k = keys();
        let digest = "ab".repeat(32);
        for plain in [
            format!("packs/{digest}"),
            format!("index/{digest}.idx"),
            format!("lists/{digest}.patch"),
        ] {
            let stored = seal_key(&k, &plain);
            assert!(!stored.contains(&digest), "{stored}");
            assert_eq!(stored.len(), plain.len() + 32);
            assert_eq!(seal_key(&k, &plain), stored, "deterministic");
            assert_eq!(open_key(&k, &stored).unwrap(), plain);
        }
        for plain in [
            "snapshots/20261207T101010Z-ab12.json",
            "wal/1/000000010000000000000003",
        ] {
            assert_eq!(seal_key(&k, plain), plain);
            assert_eq!(open_key(&k, plain).unwrap(), plain);
        }
        // Another key, a flipped digit, a plain digest: refused.
        let stored = seal_key(&k, &format!("packs/{digest}"));
        assert!(open_key(&keys(), &stored).is_err());
        let mut flipped = stored.into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert!(open_key(&k, std::str::from_utf8(&flipped).unwrap()).is_err());
        assert!(open_key(&k, &format!("packs/{digest}")).is_err());
        assert_eq!(seal_prefix(&k, "packs/"), "packs/");
        assert_eq!(seal_prefix(&k, "snapshots/2026"), "snapshots/");
        assert_eq!(seal_prefix(&k, "snap"), "");
    }
}
