//! One conformance suite, run unchanged against every storage backend: `file://`, s3s-fs
//! and a 3-node Garage cluster (replication factor 3), and encrypted `file://` and s3s-fs
//! storages (`zenith storage encrypt`). Every case asserts what a user of
//! the storage relies on: the bytes that come back are the bytes that went in.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use zenith::storage::{Error, LocalStorage, Storage};
use zenith::util::testdata::PseudoRandom;

use crate::support::peak_rss;
use crate::support::s3::S3Server;

/// A storage under test and whatever keeps its server alive.
pub struct Backend {
    pub storage: Arc<dyn Storage>,
    _dir: Option<tempfile::TempDir>,
    _server: Option<S3Server>,
}

impl Backend {
    pub async fn file() -> Option<Backend> {
        let dir = tempfile::tempdir().unwrap();
        let storage = LocalStorage::new(dir.path().join("store")).unwrap();
        Some(Backend {
            storage: Arc::new(storage),
            _dir: Some(dir),
            _server: None,
        })
    }

    pub async fn s3s() -> Option<Backend> {
        let server = S3Server::s3s_fs()?;
        let storage = server.storage("conformance/run").await;
        Some(Backend {
            storage: Arc::new(storage),
            _dir: None,
            _server: Some(server),
        })
    }

    /// `inner` encrypted, as `zenith storage encrypt` does, and opened with its passphrase.
    async fn sealed(inner: Backend) -> Option<Backend> {
        zenith::storage::encrypt(Arc::clone(&inner.storage), "conformance")
            .await
            .unwrap();
        let storage = zenith::storage::unlock(inner.storage, "conformance")
            .await
            .unwrap();
        assert!(storage.encrypted());
        Some(Backend {
            storage,
            _dir: inner._dir,
            _server: inner._server,
        })
    }

    pub async fn sealed_file() -> Option<Backend> {
        Self::sealed(Self::file().await?).await
    }

    pub async fn sealed_s3s() -> Option<Backend> {
        Self::sealed(Self::s3s().await?).await
    }

    pub async fn garage() -> Option<Backend> {
        let server = S3Server::garage(3)?;
        let storage = server.storage("conformance/run").await;
        Some(Backend {
            storage: Arc::new(storage),
            _dir: None,
            _server: Some(server),
        })
    }
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

async fn read_all(storage: &dyn Storage, key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    storage
        .get(key)
        .await
        .unwrap()
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

/// 0 B, 1 B and 5 MiB + 1, each through `put` and through `put_stream`.
pub async fn round_trips(s: &dyn Storage) {
    for (i, size) in [0u64, 1, (5 << 20) + 1].into_iter().enumerate() {
        let data = PseudoRandom::new(i as u64, size).to_vec();
        let key = format!("sizes/put-{size}");
        s.put(&key, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(
            sha(&read_all(s, &key).await),
            sha(&data),
            "put/get {size} bytes"
        );
        assert_eq!(s.head(&key).await.unwrap().size, size);

        let key = format!("sizes/stream-{size}");
        let n = s
            .put_stream(&key, Box::pin(PseudoRandom::new(i as u64, size)))
            .await
            .unwrap();
        assert_eq!(n, size);
        assert_eq!(
            sha(&s.get_bytes(&key).await.unwrap()),
            sha(&data),
            "put_stream/get {size} bytes"
        );
    }
}

/// A 200 MiB object streamed up and down (multipart on S3) with SHA-256 equality, while
/// this process's peak memory grows by far less than the object.
pub async fn streamed_large_object(s: &dyn Storage) {
    const SIZE: u64 = 200 << 20;
    let expected = {
        let mut h = Sha256::new();
        let mut g = PseudoRandom::new(42, SIZE);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = g.fill(&mut buf);
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        h.finalize().to_vec()
    };
    let before = peak_rss();
    let n = s
        .put_stream("large/object", Box::pin(PseudoRandom::new(42, SIZE)))
        .await
        .unwrap();
    assert_eq!(n, SIZE);
    assert_eq!(s.head("large/object").await.unwrap().size, SIZE);

    let mut reader = s.get("large/object").await.unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    assert_eq!(total, SIZE);
    assert_eq!(
        h.finalize().to_vec(),
        expected,
        "200 MiB object came back different"
    );
    let grown = peak_rss().saturating_sub(before);
    // Parts are 5 MiB with 4 in flight each way in these tests: ~40 MiB at most, plus
    // allocator slack. Buffering the object would need 200 MiB or more. The peak is
    // per process, so the bound is only meaningful when this test has the process to
    // itself, as under nextest (scripts/test.sh); `cargo test` runs tests side by side.
    if std::env::var_os("NEXTEST_RUN_ID").is_some() {
        assert!(
            grown < 120 << 20,
            "peak memory grew by {} MiB while streaming 200 MiB",
            grown >> 20
        );
    } else {
        eprintln!(
            "memory bound not checked outside nextest (grew by {} MiB)",
            grown >> 20
        );
    }
}

/// Ranged gets: inside, at the end, cut at the end, empty, and past the end.
pub async fn ranged_gets(s: &dyn Storage) {
    let size = (5 << 20) + 1234;
    let data = PseudoRandom::new(9, size).to_vec();
    s.put("ranges/obj", Bytes::from(data.clone()))
        .await
        .unwrap();
    for range in [
        0..1,
        100..5000,
        (5 << 20) - 10..(5 << 20) + 10,
        size - 1..size,
    ] {
        let got = s.get_range("ranges/obj", range.clone()).await.unwrap();
        assert_eq!(
            &got[..],
            &data[range.start as usize..range.end as usize],
            "range {range:?}"
        );
    }
    let cut = s
        .get_range("ranges/obj", size - 5..size + 100)
        .await
        .unwrap();
    assert_eq!(
        &cut[..],
        &data[(size - 5) as usize..],
        "range reaching past the end is cut"
    );
    assert!(s
        .get_range("ranges/obj", size..size + 10)
        .await
        .unwrap()
        .is_empty());
    assert!(s.get_range("ranges/obj", 7..7).await.unwrap().is_empty());
    let err = s
        .get_range("ranges/obj", size + 1..size + 10)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRange { .. }), "{err:?}");
    let err = s.get_range("ranges/missing", 0..10).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");

    // An object of exactly 128 KiB (two whole chunks of an encrypted storage): its end
    // and past it, and an empty object.
    let even = PseudoRandom::new(10, 128 << 10).to_vec();
    s.put("ranges/even", Bytes::from(even.clone()))
        .await
        .unwrap();
    let size = even.len() as u64;
    assert_eq!(s.head("ranges/even").await.unwrap().size, size);
    let tail = s
        .get_range("ranges/even", size - 3..u64::MAX)
        .await
        .unwrap();
    assert_eq!(&tail[..], &even[(size - 3) as usize..]);
    assert!(s
        .get_range("ranges/even", size..size + 10)
        .await
        .unwrap()
        .is_empty());
    let err = s
        .get_range("ranges/even", size + 1..size + 10)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidRange { .. }), "{err:?}");
    s.put("ranges/empty", Bytes::new()).await.unwrap();
    assert!(s.get_range("ranges/empty", 0..10).await.unwrap().is_empty());
}

/// More than 1000 keys (S3's page size), listed completely and in order; prefixes are
/// plain string prefixes.
pub async fn listing(s: &dyn Storage) {
    let keys: Vec<String> = (0..1100).map(|i| format!("many/k{i:05}")).collect();
    futures::future::join_all(keys.chunks(100).map(|chunk| async move {
        for key in chunk {
            s.put(key, Bytes::from(key.clone().into_bytes()))
                .await
                .unwrap();
        }
    }))
    .await;
    s.put("many-other/x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    let listed = s.list("many/").await.unwrap();
    let names: Vec<&str> = listed.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(names.len(), 1100);
    assert_eq!(names, keys.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        listed.iter().all(|m| m.size as usize == m.key.len()),
        "sizes are reported"
    );
    assert_eq!(
        s.list("many/k010").await.unwrap().len(),
        100,
        "partial-name prefix"
    );
    assert_eq!(
        s.list("many").await.unwrap().len(),
        1101,
        "string prefix spans siblings"
    );
    assert!(s.list("nothing-here/").await.unwrap().is_empty());
    assert!(s.list("").await.unwrap().len() >= 1101);
}

/// Overwrite replaces, delete removes and is idempotent, a missing key is NotFound.
pub async fn overwrite_delete_missing(s: &dyn Storage) {
    s.put("ow/key", Bytes::from_static(b"first version"))
        .await
        .unwrap();
    s.put("ow/key", Bytes::from_static(b"second"))
        .await
        .unwrap();
    assert_eq!(&s.get_bytes("ow/key").await.unwrap()[..], b"second");
    assert_eq!(s.head("ow/key").await.unwrap().size, 6);
    s.put_stream("ow/key", Box::pin(&b"third via stream"[..]))
        .await
        .unwrap();
    assert_eq!(
        &s.get_bytes("ow/key").await.unwrap()[..],
        b"third via stream"
    );

    s.delete("ow/key").await.unwrap();
    assert!(matches!(
        s.head("ow/key").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        s.get_bytes("ow/key").await,
        Err(Error::NotFound { .. })
    ));
    assert!(!s.exists("ow/key").await.unwrap());
    s.delete("ow/key").await.unwrap();
    assert!(s.list("ow/").await.unwrap().is_empty());
    for bad in ["../escape", "/abs", "a//b"] {
        assert!(
            matches!(
                s.put(bad, Bytes::new()).await,
                Err(Error::InvalidKey { .. })
            ),
            "{bad}"
        );
    }
}

/// Files in and out: `put_file` stores a file's bytes, `get_to_file` writes them to a new
/// file through a temporary sibling, and a failed download leaves nothing behind.
pub async fn file_round_trip(s: &dyn Storage) {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let data = PseudoRandom::new(77, (6 << 20) + 3).to_vec();
    std::fs::write(&source, &data).unwrap();
    assert_eq!(
        s.put_file("files/one", &source).await.unwrap(),
        data.len() as u64
    );
    let target = dir.path().join("out/target");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    assert_eq!(
        s.get_to_file("files/one", &target).await.unwrap(),
        data.len() as u64
    );
    assert_eq!(sha(&std::fs::read(&target).unwrap()), sha(&data));

    // (A download failing mid-stream is covered by the local backend's unit tests.)
    let missing = dir.path().join("out/missing");
    assert!(matches!(
        s.get_to_file("files/none", &missing).await,
        Err(Error::NotFound { .. })
    ));
    let names: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("target")],
        "a missing key created a file"
    );
    let err = s
        .put_file("files/two", &dir.path().join("no-such-file"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such-file"), "{err}");
    assert!(!s.exists("files/two").await.unwrap());
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn round_trips_0_1_and_5mib_plus_1() {
                let Some(b) = Backend::$backend().await else {
                    return;
                };
                round_trips(&*b.storage).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn streams_200mib_with_bounded_memory() {
                let Some(b) = Backend::$backend().await else {
                    return;
                };
                streamed_large_object(&*b.storage).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn ranged_gets() {
                let Some(b) = Backend::$backend().await else {
                    return;
                };
                super::ranged_gets(&*b.storage).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn lists_more_than_1000_keys() {
                let Some(b) = Backend::$backend().await else {
                    return;
                };
                listing(&*b.storage).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn files_in_and_out() {
                let Some(b) = Backend::$backend().await else {
                    return;
                };
                file_round_trip(&*b.storage).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn overwrite_delete_and_missing_keys() {
                let Some(b) = Backend::$backend().await else {
                    return;
                };
                overwrite_delete_missing(&*b.storage).await;
            }
        }
    };
}

conformance!(file);
conformance!(s3s);
conformance!(garage);
conformance!(sealed_file);
conformance!(sealed_s3s);
