//! The safekeeper's WAL receiver (`zenith safekeeper`, run by zenith-local for the main
//! pg): a physical replication client on the pg's own socket that offloads each batch of
//! WAL it receives to the storage ([`super::stream`]) and only then reports it flushed.
//! With the pg's `synchronous_standby_names` naming it, a commit returns once its WAL is
//! on the storage, which survives losing the machine.
//!
//! Batches form by themselves: while one is being stored, the next accumulates in the
//! socket, and is stored in one piece after it (group commit over the network). It
//! streams through a replication slot, so the pg keeps every segment it has not
//! reported yet, and resumes after a restart where the storage's pieces end. A failed
//! put is retried briefly, then the process exits and zenith-local starts it again.
//!
//! It writes what it does to a small JSON report (about every 200 ms and at least once a
//! second), which zenith-local reads to tell a healthy safekeeper from a stalled one.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::archive::Archive;
use super::protocol::{ProtocolError, Replication, Streamed};
use super::stream::{cover, Piece};
use crate::compute::wal::{format_lsn, segment_name};

/// The replication slot and the application name the safekeeper streams under.
pub const NAME: &str = "zenith_safekeeper";
/// A piece grows to this size, stored again whole after each batch, before the next
/// piece starts: few objects per segment, little written again per batch.
const PIECE: usize = 256 << 10;

/// What the safekeeper reports of itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub pid: u32,
    pub history: String,
    pub timeline: u32,
    /// Connected and streaming.
    pub streaming: bool,
    /// Stored on the storage (and reported flushed to the pg) up to here.
    pub flushed_lsn: Option<String>,
    /// Where the pg's WAL ended when it last said.
    pub server_end_lsn: Option<String>,
    /// Bytes of WAL the pg has that are not stored yet.
    pub lag_bytes: u64,
    /// Unix time (ms) the oldest WAL received and not stored yet arrived.
    pub pending_since_ms: Option<u64>,
    /// Unix time (ms) of this report.
    pub updated_ms: u64,
    pub error: Option<String>,
}

impl Report {
    pub fn read(path: &Path) -> Option<Report> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One run of the safekeeper: connects, streams until the connection ends or a put
/// fails for good. Its error is one line.
pub async fn run(
    archive: Archive,
    history: String,
    socket: PathBuf,
    report: PathBuf,
    batch: Duration,
    pgdata: Option<PathBuf>,
) -> Result<(), String> {
    let mut r = Receiver {
        archive,
        history,
        pgdata,
        report_path: report,
        report: Report {
            pid: std::process::id(),
            ..Default::default()
        },
        reported_at: Instant::now() - Duration::from_secs(1),
        batch,
        stored_at: Instant::now(),
        segment_size: crate::compute::wal::DEFAULT_SEGMENT_SIZE,
        timeline: 0,
        segno: 0,
        base: 0,
        buf: Vec::new(),
        previous: None,
        flushed: 0,
        server_end: 0,
        pending: VecDeque::new(),
        cleanup: None,
    };
    let result = r.stream(&socket).await;
    r.report.streaming = false;
    r.report.error = result.as_ref().err().cloned();
    r.write_report(true);
    result
}

struct Receiver {
    archive: Archive,
    history: String,
    /// The pg's data directory, to see which segments it has not archived yet.
    pgdata: Option<PathBuf>,
    report_path: PathBuf,
    report: Report,
    reported_at: Instant,
    /// Stores at most this often (zero: every batch at once).
    batch: Duration,
    stored_at: Instant,
    segment_size: u64,
    timeline: u32,
    /// The segment being received, and the piece of it being grown: bytes `base..` of
    /// the segment, held in `buf`.
    segno: u64,
    base: u64,
    buf: Vec<u8>,
    /// The last piece stored of the growing one (deleted once a longer one is stored).
    previous: Option<Piece>,
    flushed: u64,
    server_end: u64,
    /// Ends of received batches not stored yet, and when they came.
    pending: VecDeque<(u64, u64)>,
    cleanup: Option<tokio::task::JoinHandle<()>>,
}

fn protocol(e: ProtocolError) -> String {
    format!("replication connection: {e}")
}

impl Receiver {
    async fn stream(&mut self, socket: &Path) -> Result<(), String> {
        let mut conn = Replication::connect(socket, "postgres", NAME)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
        let standby = conn
            .command("SHOW in_hot_standby")
            .await
            .map_err(protocol)?;
        if standby
            .first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .as_deref()
            == Some("on")
        {
            return Err(
                "the pg is in recovery; the safekeeper streams once it is a primary".into(),
            );
        }
        let size = conn
            .command("SHOW wal_segment_size")
            .await
            .map_err(protocol)?;
        if let Some(text) = size.first().and_then(|r| r.first()).cloned().flatten() {
            self.segment_size = crate::util::size::parse_size(&text)
                .map_err(|e| format!("wal_segment_size {text}: {e}"))?;
        }
        let system = conn.identify_system().await.map_err(protocol)?;
        if system.system_identifier != self.archive.system_identifier() {
            return Err(format!(
                "the pg is cluster {}, its WAL archive is of cluster {}",
                system.system_identifier,
                self.archive.system_identifier()
            ));
        }
        match conn
            .command(&format!(
                "CREATE_REPLICATION_SLOT {NAME} PHYSICAL RESERVE_WAL"
            ))
            .await
        {
            Ok(_) => tracing::info!("created the replication slot {NAME}"),
            Err(ProtocolError::Server { code, .. }) if code == "42710" => {}
            Err(e) => return Err(protocol(e)),
        }
        self.timeline = system.timeline;
        // The timeline's history file, before any of its WAL is reported stored: a
        // restore follows the timeline switch only with it (PostgreSQL's own archiving
        // of it may lag).
        if system.timeline > 1 {
            let rows = conn
                .command(&format!("TIMELINE_HISTORY {}", system.timeline))
                .await
                .map_err(protocol)?;
            let (Some(Some(name)), Some(Some(content))) = (
                rows.first().and_then(|r| r.first()).cloned(),
                rows.first().and_then(|r| r.get(1)).cloned(),
            ) else {
                return Err("TIMELINE_HISTORY sent no file".into());
            };
            self.archive
                .push(&self.history, &name, content.as_bytes())
                .await
                .map_err(|e| format!("storing {name}: {e}"))?;
        }
        let start = self.resume_at(&system).await?;
        if let Err(e) = conn.start(NAME, start, system.timeline).await {
            // The slot or the resume point is gone (the slot dropped, say): from the
            // segment the pg writes now; what came before it is archived whole by
            // PostgreSQL's archive_command.
            let now = system.position - system.position % self.segment_size;
            tracing::warn!(
                "cannot stream from {}: {e}; streaming from {} instead",
                format_lsn(start),
                format_lsn(now)
            );
            self.begin_at(now);
            conn.start(NAME, now, system.timeline)
                .await
                .map_err(protocol)?;
        }
        tracing::info!(
            "streaming history {} timeline {} from {}",
            self.history,
            self.timeline,
            format_lsn(self.position())
        );
        self.report.history = self.history.clone();
        self.report.timeline = self.timeline;
        self.report.streaming = true;
        self.report.error = None;
        let mut last_status = Instant::now();
        loop {
            let wait = if self.batch.is_zero() {
                Duration::from_secs(1)
            } else {
                self.batch
            };
            let next = tokio::time::timeout(wait, conn.next()).await;
            match next {
                Err(_) => {}
                Ok(Err(e)) => return Err(protocol(e)),
                Ok(Ok(Streamed::End)) => {
                    return Err("the pg ended the stream (its timeline ended)".into())
                }
                Ok(Ok(Streamed::Keepalive { server_end, reply })) => {
                    self.server_end = self.server_end.max(server_end);
                    if reply {
                        conn.status(self.flushed, self.flushed)
                            .await
                            .map_err(protocol)?;
                        last_status = Instant::now();
                    }
                }
                Ok(Ok(Streamed::Wal {
                    start,
                    server_end,
                    data,
                })) => {
                    self.server_end = self.server_end.max(server_end);
                    self.absorb(start, &data).await?;
                    // More already here: it joins this batch.
                    if conn.buffered() {
                        continue;
                    }
                }
            }
            let due = self.stored_at.elapsed() >= self.batch;
            if (due && self.store().await?) || last_status.elapsed() >= Duration::from_secs(10) {
                conn.status(self.flushed, self.flushed)
                    .await
                    .map_err(protocol)?;
                last_status = Instant::now();
            }
            self.write_report(false);
        }
    }

    /// Where to stream from: where the storage's pieces of this timeline end, else the
    /// oldest segment PostgreSQL has not archived yet (or the one it writes now).
    async fn resume_at(&mut self, system: &super::protocol::System) -> Result<u64, String> {
        let pieces = self
            .archive
            .pieces(&self.history)
            .await
            .map_err(|e| e.to_string())?;
        let newest = pieces
            .iter()
            .filter_map(|p| {
                match crate::compute::wal::WalFile::parse(&p.segment, self.segment_size)? {
                    crate::compute::wal::WalFile::Segment { tli, segno }
                        if tli == system.timeline =>
                    {
                        Some(segno)
                    }
                    _ => None,
                }
            })
            .max();
        let now = system.position - system.position % self.segment_size;
        let start = newest.and_then(|segno| {
            let name = segment_name(system.timeline, segno, self.segment_size);
            let of_it: Vec<Piece> = pieces
                .iter()
                .filter(|p| p.segment == name)
                .cloned()
                .collect();
            let end = cover(&of_it).last().map(|p| p.to)?;
            Some(segno * self.segment_size + end)
        });
        let start = match start {
            Some(s) if s > system.position => {
                return Err(format!(
                    "the storage holds WAL of history {} up to {}, beyond the pg's {}: this history's WAL diverged from the pg's",
                    self.history,
                    format_lsn(s),
                    format_lsn(system.position)
                ))
            }
            Some(s) => s,
            None => self
                .oldest_unarchived(system.timeline)
                .map(|segno| segno * self.segment_size)
                .filter(|s| *s < now)
                .unwrap_or(now),
        };
        self.begin_at(start);
        Ok(start)
    }

    /// The oldest segment of `timeline` PostgreSQL has ready for its archive_command
    /// (not archived yet), from `pg_wal/archive_status`.
    fn oldest_unarchived(&self, timeline: u32) -> Option<u64> {
        let status = self.pgdata.as_ref()?.join("pg_wal").join("archive_status");
        std::fs::read_dir(status)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let segment = name.strip_suffix(".ready")?;
                match crate::compute::wal::WalFile::parse(segment, self.segment_size)? {
                    crate::compute::wal::WalFile::Segment { tli, segno } if tli == timeline => {
                        Some(segno)
                    }
                    _ => None,
                }
            })
            .min()
    }

    fn begin_at(&mut self, lsn: u64) {
        self.segno = lsn / self.segment_size;
        self.base = lsn % self.segment_size;
        self.buf.clear();
        self.previous = None;
        self.flushed = lsn;
        self.pending.clear();
    }

    /// The end of what was received.
    fn position(&self) -> u64 {
        self.segno * self.segment_size + self.base + self.buf.len() as u64
    }

    /// Takes WAL from `start` into the growing piece; a segment that fills is stored at
    /// once and the next begins.
    async fn absorb(&mut self, start: u64, mut data: &[u8]) -> Result<(), String> {
        let at = self.position();
        if start > at {
            return Err(format!(
                "the pg sent WAL from {} while the safekeeper is at {}",
                format_lsn(start),
                format_lsn(at)
            ));
        }
        let skip = (at - start) as usize;
        if skip >= data.len() {
            return Ok(());
        }
        data = &data[skip..];
        while !data.is_empty() {
            let room = (self.segment_size - self.base) as usize - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take == room {
                self.pending.push_back((self.position(), now_ms()));
                self.store().await?;
                self.segno += 1;
                self.base = 0;
                self.buf.clear();
                self.previous = None;
                self.collect_archived();
            }
        }
        if self.position() > self.flushed {
            self.pending.push_back((self.position(), now_ms()));
        }
        Ok(())
    }

    /// Stores the growing piece if it holds anything new; whether the flushed position
    /// moved.
    async fn store(&mut self) -> Result<bool, String> {
        let end = self.position();
        if end <= self.flushed || self.buf.is_empty() {
            self.pending.retain(|(e, _)| *e > self.flushed);
            return Ok(false);
        }
        let segment = segment_name(self.timeline, self.segno, self.segment_size);
        let mut attempt = 0;
        let piece = loop {
            match self
                .archive
                .put_piece(&self.history, &segment, self.base, &self.buf)
                .await
            {
                Ok(p) => break p,
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    self.report.error = Some(e.to_string());
                    self.write_report(true);
                    tracing::warn!("storing WAL up to {}: {e}; retrying", format_lsn(end));
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
                Err(e) => return Err(format!("storing WAL up to {}: {e}", format_lsn(end))),
            }
        };
        self.report.error = None;
        self.stored_at = Instant::now();
        if let Some(old) = self.previous.replace(piece) {
            let storage = std::sync::Arc::clone(self.archive.storage());
            tokio::spawn(async move {
                if let Err(e) = storage.delete(&old.key).await {
                    tracing::warn!("cannot delete the superseded {}: {e}", old.key);
                }
            });
        }
        self.flushed = end;
        self.pending.retain(|(e, _)| *e > end);
        if self.buf.len() >= PIECE {
            self.base += self.buf.len() as u64;
            self.buf.clear();
            self.previous = None;
        }
        Ok(true)
    }

    /// Deletes, in the background, the pieces of segments PostgreSQL has archived whole.
    fn collect_archived(&mut self) {
        if self.cleanup.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let archive = self.archive.clone();
        let history = self.history.clone();
        self.cleanup = Some(tokio::spawn(async move {
            if let Err(e) = archive.drop_archived_pieces(&history).await {
                tracing::warn!("cannot delete streamed pieces of archived segments: {e}");
            }
        }));
    }

    /// Writes the report, at most every 200 ms unless `now`.
    fn write_report(&mut self, now: bool) {
        if !now && self.reported_at.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.reported_at = Instant::now();
        let r = &mut self.report;
        r.flushed_lsn = (self.flushed > 0).then(|| format_lsn(self.flushed));
        r.server_end_lsn = (self.server_end > 0).then(|| format_lsn(self.server_end));
        r.lag_bytes = self.server_end.saturating_sub(self.flushed);
        r.pending_since_ms = self.pending.front().map(|(_, t)| *t);
        r.updated_ms = now_ms();
        let json = serde_json::to_vec_pretty(r).expect("serializes");
        let temp = self.report_path.with_extension("json.tmp");
        if let Err(e) =
            std::fs::write(&temp, json).and_then(|_| std::fs::rename(&temp, &self.report_path))
        {
            tracing::warn!("cannot write {}: {e}", self.report_path.display());
        }
    }
}
