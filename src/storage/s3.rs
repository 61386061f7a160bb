//! The `s3://bucket/prefix` backend, on aws-sdk-s3, for AWS and S3-compatible servers
//! (Garage, MinIO, Ceph RGW, s3s...).
//!
//! Settings come from the environment the way WAL-G users expect (see `docs/storages.md`
//! and [`S3Options::from_env`]). Request checksums are sent only when an operation requires
//! them: several S3-compatible servers (Garage among them) reject the SDK's default
//! streamed-upload checksum trailers. zenith checks its own content by SHA-256 at the
//! snapshot layer, so nothing is lost.
//!
//! The SDK's own retries are turned off; every call goes through the shared backoff helper
//! ([`crate::util::backoff`]) so the budget is the same as everywhere else and permanent
//! errors (403, missing bucket) are reported at once.
//!
//! Large objects move in parts of `part_size` bytes with at most `upload_concurrency` (or
//! `download_concurrency`) parts in flight, so memory stays below concurrency × part size.
//! Downloads of several parts use ranged GETs pinned to the object's ETag (`If-Match`): an
//! object replaced mid-download is reported, never spliced from two versions.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, StorageClass};
use aws_sdk_s3::Client;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::io::StreamReader;
use tokio_util::sync::CancellationToken;

use super::error::{Error, Result};
use super::{validate_key, validate_prefix, ByteReader, ObjectMeta, Storage};
use crate::util::backoff::{retry, RetryPolicy};
use crate::util::size::parse_size;

/// S3's smallest allowed part (all but the last).
const MIN_PART_SIZE: u64 = 5 << 20;
/// S3's largest part.
const MAX_PART_SIZE: u64 = 5 << 30;
/// S3's largest number of parts in one upload.
const MAX_PARTS: i32 = 10_000;

/// Explicit credentials, for callers that do not use the environment. `Debug` never prints
/// the secret.
#[derive(Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// How to reach and use an S3 endpoint.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Custom endpoint (`http(s)://host:port`); `None` means AWS.
    pub endpoint: Option<String>,
    /// Signing region; `None` lets the AWS profile decide, else `us-east-1`.
    pub region: Option<String>,
    /// `https://endpoint/bucket/key` instead of `https://bucket.endpoint/key`.
    pub force_path_style: bool,
    /// Bytes per multipart part and per ranged GET.
    pub part_size: u64,
    /// Parts uploaded at once by one streamed put.
    pub upload_concurrency: usize,
    /// Ranged GETs in flight for one streamed get.
    pub download_concurrency: usize,
    /// Storage class for new objects (`STANDARD`, `STANDARD_IA`, ...).
    pub storage_class: Option<String>,
    /// Retry budget for every request.
    pub retry: RetryPolicy,
    /// Credentials to use instead of the environment / profile chain.
    pub credentials: Option<StaticCredentials>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            force_path_style: false,
            part_size: 16 << 20,
            upload_concurrency: 4,
            download_concurrency: 4,
            storage_class: None,
            retry: RetryPolicy::default(),
            credentials: None,
        }
    }
}

impl S3Options {
    /// Reads the settings from the environment. Credentials are left to the SDK's chain
    /// (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE`, web
    /// identity, container and instance roles). Errors name the variable at fault.
    pub fn from_env() -> std::result::Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// [`S3Options::from_env`] with an injectable environment, for tests.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Self, String> {
        let mut o = S3Options::default();
        o.endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|name| get(name).map(|v| (name, v)))
            .map(|(name, v)| {
                let v = v.trim().trim_end_matches('/').to_string();
                if v.starts_with("http://") || v.starts_with("https://") {
                    Ok(v)
                } else {
                    Err(format!("{name}={v:?} must start with http:// or https://"))
                }
            })
            .transpose()?;
        o.region = get("AWS_REGION").or_else(|| get("AWS_DEFAULT_REGION"));
        o.force_path_style = match get("AWS_S3_FORCE_PATH_STYLE") {
            Some(v) => parse_bool("AWS_S3_FORCE_PATH_STYLE", &v)?,
            // S3-compatible servers on an address rarely have per-bucket DNS names.
            None => o.endpoint.is_some(),
        };
        if let Some(v) = get("ZENITH_S3_PART_SIZE") {
            o.part_size = parse_size(&v).map_err(|e| format!("ZENITH_S3_PART_SIZE: {e}"))?;
            if o.part_size < MIN_PART_SIZE {
                return Err(format!(
                    "ZENITH_S3_PART_SIZE={v} is below S3's minimum part size of 5MiB"
                ));
            }
            if o.part_size > 1 << 30 {
                return Err(format!(
                    "ZENITH_S3_PART_SIZE={v} is above 1GiB; parts are held in memory, so keep them small"
                ));
            }
        }
        if let Some(v) = get("ZENITH_S3_UPLOAD_CONCURRENCY") {
            o.upload_concurrency = parse_count("ZENITH_S3_UPLOAD_CONCURRENCY", &v)?;
        }
        if let Some(v) = get("ZENITH_S3_DOWNLOAD_CONCURRENCY") {
            o.download_concurrency = parse_count("ZENITH_S3_DOWNLOAD_CONCURRENCY", &v)?;
        }
        o.storage_class = get("ZENITH_S3_STORAGE_CLASS");
        if let Some(v) = get("ZENITH_RETRY_ATTEMPTS") {
            o.retry.max_attempts = parse_count("ZENITH_RETRY_ATTEMPTS", &v)? as u32;
        }
        Ok(o)
    }
}

fn parse_bool(name: &str, v: &str) -> std::result::Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{name}={v:?} must be true or false")),
    }
}

fn parse_count(name: &str, v: &str) -> std::result::Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!(
            "{name}={v:?} must be a whole number from 1 to 1024"
        )),
    }
}

/// What one [`S3Storage`] has sent so far: every request attempt, retries included, and the
/// object bytes that went up and came down.
#[derive(Debug, Default)]
pub struct TransferStats {
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

/// A reading of [`TransferStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferCounts {
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A bucket and prefix on an S3 endpoint. Cheap to clone.
#[derive(Clone)]
pub struct S3Storage {
    inner: Arc<Inner>,
}

struct Inner {
    stats: TransferStats,
    client: Client,
    bucket: String,
    prefix: String,
    options: S3Options,
    cancel: CancellationToken,
}

impl fmt::Debug for S3Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Storage")
            .field("url", &self.url())
            .field("options", &self.inner.options)
            .finish()
    }
}

impl S3Storage {
    /// Connects to `s3://bucket/prefix`. Resolves credentials now, so that missing ones are
    /// reported before any work starts; makes no request to the bucket.
    pub async fn new(bucket: &str, prefix: &str, options: S3Options) -> Result<Self> {
        let url = display_url(bucket, prefix);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(60))
                    .build(),
            )
            .stalled_stream_protection(StalledStreamProtectionConfig::enabled().build());
        let region = match (&options.region, &options.endpoint) {
            (Some(region), _) => Some(region.clone()),
            // A custom endpoint: do not ask the AWS profile or the instance metadata service.
            (None, Some(_)) => Some("us-east-1".to_string()),
            (None, None) => None,
        };
        if let Some(region) = region {
            loader = loader.region(Region::new(region));
        }
        if let Some(endpoint) = &options.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(c) = &options.credentials {
            loader = loader.credentials_provider(Credentials::new(
                &c.access_key_id,
                &c.secret_access_key,
                c.session_token.clone(),
                None,
                "zenith",
            ));
        }
        let sdk = loader.load().await;
        let provider = sdk
            .credentials_provider()
            .ok_or_else(|| Error::NoCredentials {
                url: url.clone(),
                detail: "no credentials provider".to_string(),
            })?;
        use aws_credential_types::provider::ProvideCredentials;
        if let Err(e) = provider.provide_credentials().await {
            use aws_credential_types::provider::error::CredentialsError;
            let detail = match &e {
                CredentialsError::CredentialsNotLoaded(_) => {
                    "none in the environment, the AWS profile or an instance role".to_string()
                }
                // A broken profile or credential process: its own message says what is wrong.
                other => one_line(&crate::util::message::full(other)),
            };
            return Err(Error::NoCredentials { url, detail });
        }
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(options.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if sdk.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        Ok(S3Storage {
            inner: Arc::new(Inner {
                stats: TransferStats::default(),
                client: Client::from_conf(config.build()),
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
                options,
                cancel: CancellationToken::new(),
            }),
        })
    }

    /// Requests and bytes moved so far by this storage (and its clones).
    pub fn transfer_counts(&self) -> TransferCounts {
        let s = &self.inner.stats;
        TransferCounts {
            requests: s.requests.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            bytes_received: s.bytes_received.load(Ordering::Relaxed),
        }
    }

    fn full_key(&self, key: &str) -> Result<String> {
        validate_key(key)?;
        Ok(self.inner.join(key))
    }
}

impl Inner {
    fn join(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    fn object_url(&self, full_key: &str) -> String {
        format!("s3://{}/{full_key}", self.bucket)
    }

    /// Runs one request under the retry policy, mapping SDK errors for `full_key`.
    async fn call<T, E, F, Fut>(&self, full_key: &str, mut op: F) -> Result<T>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, SdkError<E>>>,
    {
        let url = self.object_url(full_key);
        retry(&self.options.retry, &self.cancel, || {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let fut = op();
            let url = &url;
            let bucket = &self.bucket;
            async move { fut.await.map_err(|e| classify(url, bucket, e)) }
        })
        .await
        .map_err(Error::from_retry)
    }

    async fn head(&self, full_key: &str) -> Result<(ObjectMeta, Option<String>)> {
        let result = self
            .call(full_key, || {
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(full_key)
                    .send()
            })
            .await;
        let out = match result {
            Ok(out) => out,
            // A HEAD answer has no body, so a missing bucket looks like a missing key: ask
            // the bucket itself, so a typo in the bucket name is reported as such.
            Err(e @ Error::NotFound { .. }) => {
                let bucket = self
                    .call("", || self.client.head_bucket().bucket(&self.bucket).send())
                    .await;
                return Err(match bucket {
                    Err(Error::NotFound { .. } | Error::NoSuchBucket { .. }) => {
                        Error::NoSuchBucket {
                            url: self.object_url(full_key),
                            bucket: self.bucket.clone(),
                        }
                    }
                    _ => e,
                });
            }
            Err(e) => return Err(e),
        };
        let meta = ObjectMeta {
            key: full_key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            last_modified: out
                .last_modified()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
        };
        Ok((meta, out.e_tag().map(str::to_string)))
    }

    /// Reads `range` of an object (non-empty, inside the object), pinned to `etag` if given.
    async fn fetch(&self, full_key: &str, range: Range<u64>, etag: Option<&str>) -> Result<Bytes> {
        let url = self.object_url(full_key);
        retry(&self.options.retry, &self.cancel, || async {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut req = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(full_key)
                .range(range_header(&range));
            if let Some(etag) = etag {
                req = req.if_match(etag);
            }
            let mut out = req
                .send()
                .await
                .map_err(|e| classify(&url, &self.bucket, e))?;
            // Read straight into one buffer of the range's size: no second copy, so memory
            // per request in flight is the range length.
            // A range reaching past the end is answered with fewer bytes: trust the length
            // the server announces, and check that exactly that much arrived.
            let expected = match out.content_length() {
                Some(n) if n >= 0 => (n as u64).min(range.end - range.start),
                _ => range.end - range.start,
            };
            let mut buf = BytesMut::with_capacity(expected as usize);
            while let Some(chunk) = out.body.next().await {
                let chunk = chunk.map_err(|e| Error::Unavailable {
                    url: url.clone(),
                    detail: format!(
                        "the response body broke off: {}",
                        one_line(&crate::util::message::full(&e))
                    ),
                    attempts: 1,
                })?;
                buf.extend_from_slice(&chunk);
            }
            if buf.len() as u64 != expected {
                return Err(Error::Unavailable {
                    url: url.clone(),
                    detail: format!(
                        "the response announced {expected} bytes but carried {}",
                        buf.len()
                    ),
                    attempts: 1,
                });
            }
            self.stats
                .bytes_received
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok::<_, Error>(buf.freeze())
        })
        .await
        .map_err(Error::from_retry)
    }

    async fn upload_part(
        &self,
        full_key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<CompletedPart> {
        let out = self
            .call(full_key, || {
                self.client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(full_key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(data.len() as i64)
                    .body(ByteStream::from(data.clone()))
                    .send()
            })
            .await?;
        self.stats
            .bytes_sent
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_string))
            .build())
    }

    /// Uploads what `reader` yields after `first` as parts and completes the upload.
    async fn multipart(
        self: &Arc<Self>,
        full_key: &str,
        first: Bytes,
        reader: &mut ByteReader,
    ) -> Result<u64> {
        let upload = self
            .call(full_key, || {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full_key)
                    .set_storage_class(
                        self.options
                            .storage_class
                            .as_deref()
                            .map(StorageClass::from),
                    )
                    .send()
            })
            .await?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        // If this future is dropped (cancelled) before the upload completes, abort it in the
        // background so the parts do not hold space.
        let mut guard = AbortOnDrop {
            inner: Some(Arc::clone(self)),
            key: full_key.to_string(),
            upload_id: upload_id.clone(),
        };
        let result = self.upload_parts(full_key, &upload_id, first, reader).await;
        guard.inner = None;
        if result.is_err() {
            self.abort(full_key, &upload_id).await;
        }
        result
    }

    async fn upload_parts(
        self: &Arc<Self>,
        full_key: &str,
        upload_id: &str,
        first: Bytes,
        reader: &mut ByteReader,
    ) -> Result<u64> {
        // A permit is taken before a part is read, so at most `upload_concurrency` parts are
        // in memory at once.
        let permits = Arc::new(Semaphore::new(self.options.upload_concurrency));
        let mut tasks = JoinSet::new();
        let mut parts = Vec::new();
        let mut next = Some(first);
        let mut number = 0;
        let mut total = 0u64;
        loop {
            let permit = permits.clone().acquire_owned().await.expect("never closed");
            while let Some(done) = tasks.try_join_next() {
                parts.push(joined(done)?);
            }
            let size = part_size_for(self.options.part_size, number + 1);
            let data = match next.take() {
                Some(data) => data,
                None => read_part(reader, size, &self.object_url(full_key)).await?,
            };
            if data.is_empty() {
                break;
            }
            number += 1;
            if number > MAX_PARTS {
                return Err(Error::Rejected {
                    url: self.object_url(full_key),
                    detail: format!("more than {MAX_PARTS} parts"),
                    hint: "raise ZENITH_S3_PART_SIZE for objects this large",
                });
            }
            total += data.len() as u64;
            let last = (data.len() as u64) < size;
            let this = Arc::clone(self);
            let (key, id) = (full_key.to_string(), upload_id.to_string());
            tasks.spawn(async move {
                let _permit = permit;
                this.upload_part(&key, &id, number, data).await
            });
            if last {
                break;
            }
        }
        while let Some(done) = tasks.join_next().await {
            parts.push(joined(done)?);
        }
        parts.sort_by_key(|p| p.part_number());
        let completed = self
            .call(full_key, || {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full_key)
                    .upload_id(upload_id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts.clone()))
                            .build(),
                    )
                    .send()
            })
            .await;
        match completed {
            Ok(_) => Ok(total),
            // The complete may have succeeded with its response lost; the retry then finds
            // no such upload. The object, at its full size, says it did. (A concurrent
            // writer of the same key and size would fool this check; the snapshot layer
            // verifies content by hash regardless.)
            Err(e @ Error::NotFound { .. }) => match self.head(full_key).await {
                Ok((meta, _)) if meta.size == total => Ok(total),
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Aborts a multipart upload, with retries; failure is logged, not returned: the upload
    /// is invisible either way and a bucket lifecycle rule can remove it later.
    async fn abort(&self, full_key: &str, upload_id: &str) {
        let result = self
            .call(full_key, || {
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full_key)
                    .upload_id(upload_id)
                    .send()
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(
                upload_id,
                "could not abort an unfinished multipart upload: {e}"
            );
        }
    }
}

/// Aborts a multipart upload in the background when dropped while still armed.
struct AbortOnDrop {
    inner: Option<Arc<Inner>>,
    key: String,
    upload_id: String,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let (Some(inner), Ok(runtime)) =
            (self.inner.take(), tokio::runtime::Handle::try_current())
        {
            let (key, id) = (
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.upload_id),
            );
            runtime.spawn(async move { inner.abort(&key, &id).await });
        }
    }
}

/// Part `number`'s size (1-based): the configured size for the first 2000 parts, then
/// doubling every 2000 parts (at most 8×, and never above S3's 5 GiB), so a stream of
/// unknown length can reach 10,000 parts × 3.9 × part size (about 600 GiB with 16 MiB
/// parts) before S3's part limit, while memory stays bounded for ordinary objects.
fn part_size_for(base: u64, number: i32) -> u64 {
    let doublings = ((number.max(1) - 1) / 2000).min(3) as u32;
    (base << doublings).min(MAX_PART_SIZE)
}

fn joined(
    done: std::result::Result<Result<CompletedPart>, tokio::task::JoinError>,
) -> Result<CompletedPart> {
    match done {
        Ok(part) => part,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(Error::Cancelled),
        },
    }
}

/// Reads up to `size` bytes; fewer only at the end of the stream.
async fn read_part(reader: &mut ByteReader, size: u64, url: &str) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(size as usize);
    while (buf.len() as u64) < size {
        let n = reader.read_buf(&mut buf).await.map_err(|e| Error::Stream {
            url: url.to_string(),
            detail: format!("reading the data to upload failed: {e}"),
        })?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

#[async_trait]
impl Storage for S3Storage {
    fn url(&self) -> String {
        display_url(&self.inner.bucket, &self.inner.prefix)
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key)?;
        let inner = &self.inner;
        inner
            .call(&full, || {
                inner
                    .client
                    .put_object()
                    .bucket(&inner.bucket)
                    .key(&full)
                    .content_length(data.len() as i64)
                    .set_storage_class(
                        inner
                            .options
                            .storage_class
                            .as_deref()
                            .map(StorageClass::from),
                    )
                    .body(ByteStream::from(data.clone()))
                    .send()
            })
            .await?;
        Ok(())
    }

    async fn put_stream(&self, key: &str, mut reader: ByteReader) -> Result<u64> {
        let full = self.full_key(key)?;
        let first = read_part(
            &mut reader,
            self.inner.options.part_size,
            &self.inner.object_url(&full),
        )
        .await?;
        if (first.len() as u64) < self.inner.options.part_size {
            let len = first.len() as u64;
            self.put(key, first).await?;
            return Ok(len);
        }
        self.inner.multipart(&full, first, &mut reader).await
    }

    async fn get(&self, key: &str) -> Result<ByteReader> {
        let full = self.full_key(key)?;
        let (meta, etag) = self.inner.head(&full).await?;
        let part = self.inner.options.part_size;
        let ranges: Vec<Range<u64>> = (0..meta.size.div_ceil(part))
            .map(|i| i * part..((i + 1) * part).min(meta.size))
            .collect();
        let inner = Arc::clone(&self.inner);
        let chunks = futures::stream::iter(ranges)
            .map(move |range| {
                let inner = Arc::clone(&inner);
                let full = full.clone();
                let etag = etag.clone();
                async move {
                    inner
                        .fetch(&full, range, etag.as_deref())
                        .await
                        .map_err(Error::into_io)
                }
            })
            .buffered(self.inner.options.download_concurrency);
        Ok(Box::pin(StreamReader::new(chunks)))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let full = self.full_key(key)?;
        if range.end <= range.start {
            let (meta, _) = self.inner.head(&full).await?;
            return check_empty_range(&self.inner.object_url(&full), range, meta.size);
        }
        match self.inner.fetch(&full, range.clone(), None).await {
            Err(Error::InvalidRange { .. }) => {
                let (meta, _) = self.inner.head(&full).await?;
                check_empty_range(&self.inner.object_url(&full), range, meta.size)
            }
            other => other,
        }
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta> {
        let full = self.full_key(key)?;
        let (mut meta, _) = self.inner.head(&full).await?;
        meta.key = key.to_string();
        Ok(meta)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        validate_prefix(prefix)?;
        let inner = &self.inner;
        let root = if inner.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", inner.prefix)
        };
        let full_prefix = format!("{root}{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = inner
                .call(&full_prefix, || {
                    inner
                        .client
                        .list_objects_v2()
                        .bucket(&inner.bucket)
                        .prefix(&full_prefix)
                        .set_continuation_token(token.clone())
                        .send()
                })
                .await?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&root)) else {
                    continue;
                };
                out.push(ObjectMeta {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                    last_modified: object
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        let inner = &self.inner;
        match inner
            .call(&full, || {
                inner
                    .client
                    .delete_object()
                    .bucket(&inner.bucket)
                    .key(&full)
                    .send()
            })
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn check_empty_range(url: &str, range: Range<u64>, size: u64) -> Result<Bytes> {
    if range.start > size {
        return Err(Error::InvalidRange {
            url: url.to_string(),
            start: range.start,
            end: range.end,
            size,
        });
    }
    Ok(Bytes::new())
}

fn display_url(bucket: &str, prefix: &str) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Maps an SDK error to zenith's error, deciding retryable versus permanent.
fn classify<E>(url: &str, bucket: &str, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let url = url.to_string();
    // The error and its causes, each said once; not the SDK's debug dump of the error.
    let detail = || one_line(&crate::util::message::full(&err));
    match &err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Error::Unavailable {
            url,
            detail: detail(),
            attempts: 1,
        },
        SdkError::DispatchFailure(d) if d.is_user() => Error::Rejected {
            url,
            detail: detail(),
            hint: "check the endpoint URL (AWS_ENDPOINT_URL) and the credentials",
        },
        SdkError::DispatchFailure(_) => Error::Unavailable {
            url,
            detail: detail(),
            attempts: 1,
        },
        SdkError::ConstructionFailure(_) => {
            let detail = detail();
            if detail.to_ascii_lowercase().contains("credential") {
                Error::NoCredentials { url, detail }
            } else {
                Error::Rejected {
                    url,
                    detail,
                    hint: "check the storage settings in docs/storages.md",
                }
            }
        }
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = err.code().unwrap_or("");
            let message = err.message().unwrap_or("");
            let what = if message.is_empty() {
                format!("HTTP {status} {code}")
            } else {
                format!("HTTP {status} {code}: {}", one_line(message))
            };
            match (status, code) {
                (_, "NoSuchBucket") => Error::NoSuchBucket { url, bucket: bucket.to_string() },
                (404, _) | (_, "NoSuchKey") => Error::NotFound { url },
                (416, _) | (_, "InvalidRange") => Error::InvalidRange { url, start: 0, end: 0, size: 0 },
                (401 | 403, _) | (_, "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied") => {
                    Error::AccessDenied { url, detail: what }
                }
                (301 | 307, _) | (_, "PermanentRedirect" | "AuthorizationHeaderMalformed") => Error::Rejected {
                    url,
                    detail: what,
                    hint: "the bucket is probably in another region: set AWS_REGION to the bucket's region",
                },
                (412, _) => Error::Rejected {
                    url,
                    detail: what,
                    hint: "the object was replaced while it was being read; run the command again",
                },
                (501 | 505, _) | (_, "NotImplemented") => Error::Rejected {
                    url,
                    detail: what,
                    hint: "the server does not support an operation zenith needs; run `zenith storage check` against it",
                },
                (408 | 429 | 500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable") => {
                    Error::Unavailable { url, detail: what, attempts: 1 }
                }
                _ => Error::Rejected { url, detail: what, hint: "check the URL, the bucket's settings and the endpoint" },
            }
        }
        _ => Error::Unavailable {
            url,
            detail: detail(),
            attempts: 1,
        },
    }
}

/// The HTTP range of `range`; one reaching past any object's possible size is left
/// open-ended, since servers refuse a last byte beyond 2^63.
fn range_header(range: &Range<u64>) -> String {
    if range.end > i64::MAX as u64 {
        format!("bytes={}-", range.start)
    } else {
        format!("bytes={}-{}", range.start, range.end - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn opts(vars: &[(&str, &str)]) -> std::result::Result<S3Options, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Options::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn endpoint_precedence_and_path_style_default() {
        let o = opts(&[
            ("AWS_ENDPOINT", "http://a:1"),
            ("AWS_ENDPOINT_URL", "http://b:2/"),
        ])
        .unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://b:2"));
        assert!(o.force_path_style);
        let o = opts(&[
            ("AWS_ENDPOINT", "http://a:1"),
            ("AWS_S3_FORCE_PATH_STYLE", "false"),
        ])
        .unwrap();
        assert_eq!(o.endpoint.as_deref(), Some("http://a:1"));
        assert!(!o.force_path_style);
        let o = opts(&[]).unwrap();
        assert!(o.endpoint.is_none() && !o.force_path_style && o.region.is_none());
    }

    #[test]
    fn region_falls_back_to_default_region() {
        assert_eq!(
            opts(&[("AWS_DEFAULT_REGION", "eu-west-3")])
                .unwrap()
                .region
                .as_deref(),
            Some("eu-west-3")
        );
        let o = opts(&[
            ("AWS_DEFAULT_REGION", "eu-west-3"),
            ("AWS_REGION", "garage"),
        ])
        .unwrap();
        assert_eq!(o.region.as_deref(), Some("garage"));
    }

    #[test]
    fn knobs_are_parsed_and_checked() {
        let o = opts(&[
            ("ZENITH_S3_PART_SIZE", "64MiB"),
            ("ZENITH_S3_UPLOAD_CONCURRENCY", "8"),
            ("ZENITH_S3_DOWNLOAD_CONCURRENCY", "2"),
            ("ZENITH_S3_STORAGE_CLASS", "STANDARD_IA"),
        ])
        .unwrap();
        assert_eq!(
            (o.part_size, o.upload_concurrency, o.download_concurrency),
            (64 << 20, 8, 2)
        );
        assert_eq!(o.storage_class.as_deref(), Some("STANDARD_IA"));
        assert!(opts(&[("ZENITH_S3_PART_SIZE", "1MiB")])
            .unwrap_err()
            .contains("5MiB"));
        assert!(opts(&[("ZENITH_S3_PART_SIZE", "1TiB")])
            .unwrap_err()
            .contains("1GiB"));
        assert!(opts(&[("ZENITH_S3_UPLOAD_CONCURRENCY", "0")])
            .unwrap_err()
            .contains("ZENITH_S3_UPLOAD_CONCURRENCY"));
        assert!(opts(&[("AWS_ENDPOINT_URL", "localhost:9000")])
            .unwrap_err()
            .contains("http://"));
        assert!(opts(&[("AWS_S3_FORCE_PATH_STYLE", "maybe")])
            .unwrap_err()
            .contains("true or false"));
    }

    #[test]
    fn part_sizes_grow_to_reach_large_objects() {
        let base = 16 << 20;
        assert_eq!(part_size_for(base, 1), base);
        assert_eq!(part_size_for(base, 2000), base);
        assert_eq!(part_size_for(base, 2001), base * 2);
        assert_eq!(part_size_for(base, 10_000), base * 8);
        let reach: u64 = (1..=MAX_PARTS).map(|n| part_size_for(base, n)).sum();
        assert!(reach > 500 << 30, "{reach}");
        assert_eq!(part_size_for(1 << 30, 9000), MAX_PART_SIZE);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let mut o = S3Options::default();
        o.credentials = Some(StaticCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "very-secret-value".into(),
            session_token: Some("token-value".into()),
        });
        let text = format!("{o:?}");
        assert!(
            !text.contains("very-secret-value") && !text.contains("token-value"),
            "{text}"
        );
    }
}
