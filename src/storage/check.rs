//! `zenith storage check`: a probe a user runs before trusting a destination with data.
//!
//! It works under a fresh random prefix (`zenith-check-<random>/`), exercises every storage
//! operation zenith relies on (atomic put, overwrite, streamed multipart put, streamed get,
//! ranged get, head, list, delete, NotFound), checks every byte that comes back, measures
//! upload and download throughput, and removes what it wrote. It never touches keys outside
//! its prefix.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::{Error, Storage};
use crate::util::size::{format_size, mib_per_sec};
use crate::util::testdata::PseudoRandom;

/// What to probe with.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Size of the generated large object used for the multipart and throughput steps.
    pub size: u64,
    /// Use this file as the large object instead (uploaded with `put_file`, downloaded with
    /// `get_to_file` next to it, then compared), to measure file-to-storage copies.
    pub file: Option<PathBuf>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            size: 64 << 20,
            file: None,
        }
    }
}

/// Where the large object's bytes come from.
enum Payload {
    Generated { seed: u64, size: u64 },
    File { path: PathBuf, size: u64 },
}

impl Payload {
    fn size(&self) -> u64 {
        match self {
            Payload::Generated { size, .. } | Payload::File { size, .. } => *size,
        }
    }

    fn range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        match self {
            Payload::Generated { seed, .. } => Ok(PseudoRandom::range(*seed, range).to_vec()),
            Payload::File { path, .. } => {
                use std::os::unix::fs::FileExt;
                let mut buf = vec![0; (range.end - range.start) as usize];
                std::fs::File::open(path)?.read_exact_at(&mut buf, range.start)?;
                Ok(buf)
            }
        }
    }
}

/// The outcome of one step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    /// What was seen: a measurement when ok, the error (one line) when not.
    pub detail: String,
    pub millis: u128,
}

/// The whole probe.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    pub prefix: String,
    pub steps: Vec<Step>,
    pub upload_mib_per_sec: Option<f64>,
    pub download_mib_per_sec: Option<f64>,
    /// Whether everything the probe wrote was removed again.
    pub cleaned_up: bool,
}

impl Report {
    /// The destination is usable when every step passed.
    pub fn ok(&self) -> bool {
        self.steps.iter().all(|s| s.ok) && !self.steps.is_empty()
    }
}

struct Probe<'a> {
    storage: &'a dyn Storage,
    prefix: String,
    steps: Vec<Step>,
    on_step: &'a mut (dyn FnMut(&Step) + Send),
}

impl Probe<'_> {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn record(&mut self, name: &str, started: Instant, outcome: Result<String, String>) -> bool {
        let ok = outcome.is_ok();
        let step = Step {
            name: name.to_string(),
            ok,
            detail: outcome.unwrap_or_else(|e| e),
            millis: started.elapsed().as_millis(),
        };
        (self.on_step)(&step);
        self.steps.push(step);
        ok
    }
}

/// Runs the probe against `storage`, calling `on_step` as each step finishes.
pub async fn run(
    storage: &dyn Storage,
    options: &CheckOptions,
    on_step: &mut (dyn FnMut(&Step) + Send),
) -> Report {
    let prefix = format!("zenith-check-{:016x}/", fastrand::u64(..));
    let mut p = Probe {
        storage,
        prefix: prefix.clone(),
        steps: Vec::new(),
        on_step,
    };
    let (upload, download) = probe(&mut p, options).await;
    // When even the first put failed nothing was written (puts are atomic): no cleanup.
    let wrote = p.steps.first().is_some_and(|s| s.ok);
    let cleaned_up = !wrote || cleanup(&mut p).await;
    Report {
        url: storage.url(),
        prefix,
        steps: p.steps,
        upload_mib_per_sec: upload,
        download_mib_per_sec: download,
        cleaned_up,
    }
}

async fn probe(p: &mut Probe<'_>, options: &CheckOptions) -> (Option<f64>, Option<f64>) {
    let small_key = p.key("small");
    let small = Bytes::from(PseudoRandom::new(1, 1024).to_vec());

    let t = Instant::now();
    let r = p
        .storage
        .put(&small_key, small.clone())
        .await
        .map(|()| "1 KiB".to_string());
    if !p.record("put", t, r.map_err(|e| e.to_string())) {
        return (None, None); // nothing else can work; cleanup still runs
    }

    let t = Instant::now();
    let r = match p.storage.get_bytes(&small_key).await {
        Ok(b) if b == small => Ok("content matches".to_string()),
        Ok(b) => Err(format!(
            "read back {} bytes that differ from what was written",
            b.len()
        )),
        Err(e) => Err(e.to_string()),
    };
    p.record("get", t, r);

    let t = Instant::now();
    let r = match p.storage.head(&small_key).await {
        Ok(m) if m.size == 1024 => Ok("size matches".to_string()),
        Ok(m) => Err(format!("reports {} bytes, wrote 1024", m.size)),
        Err(e) => Err(e.to_string()),
    };
    p.record("head", t, r);

    let t = Instant::now();
    let replacement = Bytes::from(PseudoRandom::new(2, 2048).to_vec());
    let r = match p.storage.put(&small_key, replacement.clone()).await {
        Ok(()) => match p.storage.get_bytes(&small_key).await {
            Ok(b) if b == replacement => Ok("new content visible".to_string()),
            Ok(_) => Err("the old content is still returned after an overwrite".to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    p.record("overwrite", t, r);

    let big_key = p.key("large");
    let payload = match &options.file {
        Some(path) => match std::fs::metadata(path) {
            Ok(meta) => Payload::File {
                path: path.clone(),
                size: meta.len(),
            },
            Err(e) => {
                let r = Err(format!("{}: cannot read: {e}", path.display()));
                p.record("streamed put", Instant::now(), r);
                return (None, None);
            }
        },
        None => Payload::Generated {
            seed: 3,
            size: options.size,
        },
    };
    let size = payload.size();
    let t = Instant::now();
    let r = match &payload {
        Payload::Generated { seed, size } => {
            p.storage
                .put_stream(&big_key, Box::pin(PseudoRandom::new(*seed, *size)))
                .await
        }
        Payload::File { path, .. } => p.storage.put_file(&big_key, path).await,
    };
    let upload = match r {
        Ok(n) if n == size => {
            let rate = mib_per_sec(n, t.elapsed());
            p.record(
                "streamed put",
                t,
                Ok(format!("{} at {rate:.1} MiB/s", format_size(n))),
            );
            Some(rate)
        }
        Ok(n) => {
            p.record(
                "streamed put",
                t,
                Err(format!("stored {n} bytes of {size}")),
            );
            None
        }
        Err(e) => {
            p.record("streamed put", t, Err(e.to_string()));
            None
        }
    };

    let mut download = None;
    if upload.is_some() {
        let t = Instant::now();
        let r = match &payload {
            Payload::Generated { seed, size } => {
                read_and_compare(p.storage, &big_key, *seed, *size)
                    .await
                    .map(|()| t.elapsed())
            }
            Payload::File { path, .. } => download_and_compare(p.storage, &big_key, path).await,
        };
        let r = r.map(|elapsed| {
            let rate = mib_per_sec(size, elapsed);
            download = Some(rate);
            format!(
                "{} at {rate:.1} MiB/s, every byte matches",
                format_size(size)
            )
        });
        p.record("streamed get", t, r);

        let t = Instant::now();
        let start = size / 3;
        let end = (start + 100_000).min(size);
        let r = match (
            p.storage.get_range(&big_key, start..end).await,
            payload.range(start..end),
        ) {
            (Ok(b), Ok(want)) if b[..] == want[..] => {
                Ok(format!("{} bytes at offset {start} match", b.len()))
            }
            (Ok(b), Ok(_)) => Err(format!(
                "{} bytes at offset {start} differ from what was written",
                b.len()
            )),
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(format!("cannot read the source file: {e}")),
        };
        p.record("ranged get", t, r);
    }

    let t = Instant::now();
    let r = match p.storage.list(&p.prefix).await {
        Ok(list) => {
            let keys: Vec<&str> = list.iter().map(|m| m.key.as_str()).collect();
            let want_big = upload.is_some();
            let mut expected = Vec::new();
            if want_big {
                expected.push(big_key.as_str());
            }
            expected.push(small_key.as_str());
            if keys == expected {
                Ok(format!("{} objects listed", keys.len()))
            } else {
                Err(format!("listed {keys:?}, expected {expected:?}"))
            }
        }
        Err(e) => Err(e.to_string()),
    };
    p.record("list", t, r);

    let t = Instant::now();
    let r = match p.storage.delete(&small_key).await {
        Ok(()) => match p.storage.head(&small_key).await {
            Err(Error::NotFound { .. }) => Ok("deleted object is gone".to_string()),
            Ok(_) => Err("the object is still there after delete".to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    p.record("delete", t, r);

    let t = Instant::now();
    let r = match p.storage.get_bytes(&p.key("missing")).await {
        Err(Error::NotFound { .. }) => Ok("reported as not found".to_string()),
        Ok(_) => Err("a key never written returned data".to_string()),
        Err(e) => Err(format!("expected not-found, got: {e}")),
    };
    p.record("missing key", t, r);

    (upload, download)
}

/// Streams `key` and compares it byte for byte with the generator that wrote it (cheaper
/// than hashing, so the measured rate is the storage's, not SHA-256's).
async fn read_and_compare(
    storage: &dyn Storage,
    key: &str,
    seed: u64,
    size: u64,
) -> Result<(), String> {
    let mut reader = storage.get(key).await.map_err(|e| e.to_string())?;
    let mut expected = PseudoRandom::new(seed, size);
    let mut buf = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|e| Error::from_stream(storage.url(), key, e).to_string())?;
        if n == 0 {
            break;
        }
        if expected.fill(&mut want[..n]) != n || buf[..n] != want[..n] {
            return Err(format!(
                "the bytes read back differ from those written, from offset {total} on"
            ));
        }
        total += n as u64;
    }
    if total != size {
        return Err(format!("read back {total} bytes, wrote {size}"));
    }
    Ok(())
}

/// Downloads `key` next to `source` (timed), then compares the two files (not timed) and
/// removes the download.
async fn download_and_compare(
    storage: &dyn Storage,
    key: &str,
    source: &Path,
) -> Result<std::time::Duration, String> {
    let mut name = source.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".zenith-check-{:016x}", fastrand::u64(..)));
    let target = source.with_file_name(name);
    let t = Instant::now();
    let result = storage.get_to_file(key, &target).await;
    let elapsed = t.elapsed();
    let compared = match result {
        Ok(_) => {
            let (a, b) = (source.to_path_buf(), target.clone());
            tokio::task::spawn_blocking(move || files_equal(&a, &b))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
        }
        Err(e) => Err(e.to_string()),
    };
    let _ = std::fs::remove_file(&target);
    match compared {
        Ok(true) => Ok(elapsed),
        Ok(false) => Err("the downloaded file differs from the source".to_string()),
        Err(e) => Err(e),
    }
}

fn files_equal(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

async fn cleanup(p: &mut Probe<'_>) -> bool {
    let t = Instant::now();
    let mut outcome = Err(String::new());
    // Some stores show a just-deleted key in listings for a moment: look again a few times
    // before calling the cleanup failed, and say so when it took more than one pass.
    for pass in 1..=5 {
        let r: Result<Vec<String>, Error> = async {
            for object in p.storage.list(&p.prefix).await? {
                p.storage.delete(&object.key).await?;
            }
            Ok(p.storage
                .list(&p.prefix)
                .await?
                .into_iter()
                .map(|o| o.key)
                .collect())
        }
        .await;
        outcome = match r {
            Ok(left) if left.is_empty() && pass == 1 => Ok("nothing left behind".to_string()),
            Ok(left) if left.is_empty() => Ok(format!(
                "nothing left behind (deleted keys stayed listed for {pass} passes)"
            )),
            Ok(left) => Err(format!("still listed after delete: {}", left.join(", "))),
            Err(e) => Err(format!("{e} (remove {} by hand)", p.prefix)),
        };
        if outcome.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200 * pass)).await;
    }
    p.record("cleanup", t, outcome)
}
