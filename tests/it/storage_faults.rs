//! Failures a user will meet: a wrong secret, a server that is down, Garage nodes dying in
//! the middle of a multipart upload. Each must end in a clear, correctly classified error (or
//! in success, when the cluster can still serve), and never in a partial object.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use zenith::storage::{Error, S3Storage, Storage};
use zenith::util::testdata::PseudoRandom;

use crate::support::free_port;
use crate::support::s3::S3Server;

/// Yields `inner`, calling `trigger` once the first `at` bytes have been handed out.
struct TriggerAt<F: FnOnce() + Send + Unpin> {
    inner: PseudoRandom,
    at: u64,
    read: u64,
    trigger: Option<F>,
}

impl<F: FnOnce() + Send + Unpin> AsyncRead for TriggerAt<F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.read >= self.at {
            if let Some(trigger) = self.trigger.take() {
                trigger();
            }
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

async fn wrong_secret_is_permanent(server: S3Server) {
    let mut options = server.options();
    let secret = "definitely-not-the-secret-7f3a9";
    options.credentials.as_mut().unwrap().secret_access_key = secret.into();
    let storage = S3Storage::new(&server.bucket, "faults", options)
        .await
        .unwrap();
    let err = storage
        .put("k", Bytes::from_static(b"v"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::AccessDenied { .. }),
        "{}: {err:?}",
        server.kind
    );
    assert_eq!(
        storage.transfer_counts().requests,
        1,
        "a wrong secret must not be retried"
    );
    let text = err.to_string();
    assert!(text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
    assert!(
        !text.contains(secret) && !format!("{err:?}").contains(secret),
        "secret leaked: {text}"
    );
    let err = storage.list("").await.unwrap_err();
    assert!(matches!(err, Error::AccessDenied { .. }), "{err:?}");
    assert_eq!(storage.transfer_counts().requests, 2);
}

#[tokio::test]
async fn s3s_wrong_secret_is_a_permanent_error() {
    let Some(server) = S3Server::s3s_fs() else {
        return;
    };
    wrong_secret_is_permanent(server).await;
}

#[tokio::test]
async fn garage_wrong_secret_is_a_permanent_error() {
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    wrong_secret_is_permanent(server).await;
}

#[tokio::test]
async fn server_down_gives_bounded_retries_then_a_clear_error() {
    // s3s-fs is only used for its settings; the endpoint points at a port nobody listens on.
    let Some(server) = S3Server::s3s_fs() else {
        return;
    };
    let mut options = server.options();
    let port = free_port();
    options.endpoint = Some(format!("http://127.0.0.1:{port}"));
    options.retry.max_attempts = 3;
    let storage = S3Storage::new(&server.bucket, "down", options)
        .await
        .unwrap();
    let errors = [
        storage
            .put("k", Bytes::from_static(b"v"))
            .await
            .unwrap_err(),
        storage.get_bytes("k").await.unwrap_err(),
        storage.list("").await.unwrap_err(),
    ];
    assert_eq!(
        storage.transfer_counts().requests,
        9,
        "three calls, three attempts each"
    );
    for err in errors {
        match &err {
            Error::Unavailable { attempts, .. } => assert_eq!(*attempts, 3, "{err}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("after 3 attempt") && text.contains("reachable"),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garage_one_node_killed_during_multipart_upload_completes() {
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    let storage = server.storage("faults").await;
    const SIZE: u64 = 60 << 20;
    let server = std::sync::Arc::new(server);
    let killer = server.clone();
    let reader = TriggerAt {
        inner: PseudoRandom::new(11, SIZE),
        at: 22 << 20,
        read: 0,
        trigger: Some(move || killer.kill_garage_node(3)),
    };
    let n = storage
        .put_stream("survivor", Box::pin(reader))
        .await
        .expect("upload with one node down must succeed");
    assert_eq!(n, SIZE);
    let got = storage.get_bytes("survivor").await.unwrap();
    assert_eq!(
        Sha256::digest(&got).to_vec(),
        Sha256::digest(PseudoRandom::new(11, SIZE).to_vec()).to_vec(),
        "the object read back differs"
    );
    let listed = storage.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garage_two_nodes_down_fails_clearly_and_lists_no_partial_object() {
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    let storage = server.storage("faults").await;
    let old = Bytes::from(PseudoRandom::new(1, 4096).to_vec());
    storage.put("obj", old.clone()).await.unwrap();

    const SIZE: u64 = 60 << 20;
    let server = std::sync::Arc::new(server);
    let killer = server.clone();
    let reader = TriggerAt {
        inner: PseudoRandom::new(12, SIZE),
        at: 22 << 20,
        read: 0,
        trigger: Some(move || {
            killer.kill_garage_node(2);
            killer.kill_garage_node(3);
        }),
    };
    let started = std::time::Instant::now();
    let err = storage
        .put_stream("obj", Box::pin(reader))
        .await
        .unwrap_err();
    eprintln!("failed after {:?}: {err}", started.elapsed());
    assert!(
        matches!(err, Error::Unavailable { attempts: 4, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("storage unavailable"), "{err}");

    // Bring the cluster back: the interrupted upload must not have replaced the old object.
    server.restart_garage_node(2);
    server.restart_garage_node(3);
    let mut listed = None;
    for _ in 0..100 {
        match storage.list("").await {
            Ok(l) => {
                listed = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let listed = listed.expect("the cluster did not come back");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0].size, 4096,
        "a partial or new object is visible: {listed:?}"
    );
    assert_eq!(storage.get_bytes("obj").await.unwrap(), old);
}

#[tokio::test]
async fn a_missing_bucket_is_named_as_such_even_by_head() {
    // Garage, not s3s-fs: s3s-fs creates buckets on first write.
    let Some(server) = S3Server::garage(3) else {
        return;
    };
    let storage = S3Storage::new("no-such-bucket", "x", server.options())
        .await
        .unwrap();
    for err in [
        storage
            .put("k", Bytes::from_static(b"v"))
            .await
            .unwrap_err(),
        storage.head("k").await.unwrap_err(),
        storage.exists("k").await.unwrap_err(),
        storage.get_bytes("k").await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::NoSuchBucket { .. }), "{err:?}");
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
    let present = server.storage("x").await;
    assert!(matches!(
        present.head("k").await,
        Err(Error::NotFound { .. })
    ));
}
