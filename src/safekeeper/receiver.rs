//! The safekeeper's WAL receiver (`zenith safekeeper`, run by zenith-local for the main
//! pg): a physical replication client on the pg's own socket that stores the WAL it
//! receives on the storage ([`super::stream`]) and only then reports it flushed. With
//! the pg's `synchronous_standby_names` naming it, a commit returns once its WAL is on
//! the storage, which survives losing the machine.
//!
//! On a storage of files (`file://`, unencrypted) it writes the segment in place, the way
//! `pg_receivewal` does: what arrived since the last write is appended to the segment's
//! file and fdatasynced, then reported flushed; WAL that arrives meanwhile waits in the
//! socket and goes out with the next write (group commit). A write or sync that fails
//! ends the process (after a failed fsync the kernel may have dropped the pages), and the
//! next run writes the segment again from the start of its file.
//!
//! On a storage of objects, what arrived since the last store goes out as one new piece;
//! up to [`IN_FLIGHT`] stores run at once, and the flushed position moves over those that
//! completed in order (group commit over the network, with the storage's latency
//! overlapped). Every [`WINDOW`] bytes, and when a segment is full, the small pieces of
//! that stretch are stored again as one and deleted, so a segment is a few pieces when it
//! is read back. A store that keeps failing ends the process; zenith-local starts it
//! again.
//!
//! It streams through a replication slot, so the pg keeps every segment it has not
//! reported yet, and resumes after a restart where the storage's pieces end (objects) or
//! at the start of the segment's file it was writing (in place).
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
/// Stores running at once.
const IN_FLIGHT: usize = 16;
/// The stretch of a segment whose small pieces are stored again as one.
const WINDOW: u64 = 1 << 20;

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
        origin: 0,
        data: Vec::new(),
        window: 0,
        sent: 0,
        small: Vec::new(),
        in_flight: VecDeque::new(),
        flushed: 0,
        server_end: 0,
        pending: VecDeque::new(),
        cleanup: None,
        in_place: None,
        file: None,
        then_at: None,
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
    /// The segment being received: its bytes from offset `origin` on.
    segno: u64,
    origin: u64,
    data: Vec<u8>,
    /// Where in the segment the stretch begins whose small pieces are stored again as one.
    window: u64,
    /// The small pieces stored in that stretch so far.
    small: Vec<Piece>,
    /// Stores were started up to here (an LSN), and these are running, in order.
    sent: u64,
    in_flight: VecDeque<Store>,
    flushed: u64,
    server_end: u64,
    /// Ends of received batches not stored yet, and when they came.
    pending: VecDeque<(u64, u64)>,
    cleanup: Option<tokio::task::JoinHandle<()>>,
    /// Whether the storage takes segments written in place (known at the first write).
    in_place: Option<bool>,
    /// The file the current segment is written to, in place.
    file: Option<InPlace>,
    /// Where to stream from if the pg no longer has the resume point's segment.
    then_at: Option<u64>,
}

/// A segment's file written in place: the bytes of segment `segno` from the receiver's
/// `origin` on.
struct InPlace {
    segno: u64,
    file: std::fs::File,
    key: String,
}

/// A store running: the piece it stores ends at `end` (an LSN).
struct Store {
    end: u64,
    task: tokio::task::JoinHandle<Result<Piece, String>>,
}

/// What woke the receiver.
enum Event {
    Stored(Result<Piece, String>),
    Message(Result<Result<Streamed, ProtocolError>, tokio::time::error::Elapsed>),
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
        let mut started = conn.start(NAME, start, system.timeline).await;
        if let (Err(e), Some(next)) = (&started, self.then_at) {
            tracing::info!(
                "cannot stream from {}: {e}; its segment is complete, streaming from {}",
                format_lsn(start),
                format_lsn(next)
            );
            self.begin_at(next);
            started = conn.start(NAME, next, system.timeline).await;
        }
        if let Err(e) = started {
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
        // What the pg was last told is flushed: a write in place (at a segment's end,
        // say) moves the position without a store completing.
        let mut told = self.flushed;
        loop {
            let wait = if self.batch.is_zero() {
                Duration::from_secs(1)
            } else {
                self.batch
            };
            let event = {
                let front = self.in_flight.front_mut().map(|s| &mut s.task);
                tokio::select! {
                    biased;
                    done = async move {
                        match front {
                            Some(task) => task.await,
                            None => std::future::pending().await,
                        }
                    } => Event::Stored(done.unwrap_or_else(|e| Err(format!("a store failed: {e}")))),
                    message = tokio::time::timeout(wait, conn.next()) => Event::Message(message),
                }
            };
            let mut flushed = false;
            match event {
                Event::Stored(result) => {
                    self.stored(result)?;
                    flushed = true;
                    // Those done meanwhile, in order.
                    while self.in_flight.front().is_some_and(|s| s.task.is_finished()) {
                        let task = self
                            .in_flight
                            .front_mut()
                            .map(|s| &mut s.task)
                            .expect("front");
                        let result = task
                            .await
                            .unwrap_or_else(|e| Err(format!("a store failed: {e}")));
                        self.stored(result)?;
                    }
                }
                Event::Message(Err(_)) => {}
                Event::Message(Ok(Err(e))) => return Err(protocol(e)),
                Event::Message(Ok(Ok(Streamed::End))) => {
                    return Err("the pg ended the stream (its timeline ended)".into())
                }
                Event::Message(Ok(Ok(Streamed::Keepalive { server_end, reply }))) => {
                    self.server_end = self.server_end.max(server_end);
                    flushed |= reply;
                }
                Event::Message(Ok(Ok(Streamed::Wal {
                    start,
                    server_end,
                    data,
                }))) => {
                    self.server_end = self.server_end.max(server_end);
                    self.absorb(start, &data)?;
                    // More already here: it joins this batch.
                    if conn.buffered() {
                        continue;
                    }
                }
            }
            if self.in_flight.len() < IN_FLIGHT && self.stored_at.elapsed() >= self.batch {
                flushed |= self.send(self.position())?;
            }
            if flushed || self.flushed > told || last_status.elapsed() >= Duration::from_secs(10) {
                conn.status(self.flushed, self.flushed)
                    .await
                    .map_err(protocol)?;
                last_status = Instant::now();
                told = self.flushed;
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
            Some((
                segno * self.segment_size,
                cover(&of_it).last().map(|p| Piece::clone(p))?,
            ))
        });
        let start = match start {
            Some((_, last)) if last.to > self.segment_size => {
                return Err(format!(
                    "the storage holds a streamed piece of history {} longer than a segment ({} bytes): it is damaged; delete the history's stream/ pieces of that segment",
                    self.history, last.to
                ))
            }
            // A file written in place is written again from its start: its tail may not
            // have been synced, even when it reaches the segment's end (a sync that
            // failed there ended the last run). The pg released that segment if its end
            // was reported synced: then the next segment follows.
            Some((segment, last)) if last.in_place => {
                self.then_at =
                    (last.to == self.segment_size).then_some(segment + self.segment_size);
                Some(segment + last.from)
            }
            Some((segment, last)) => Some(segment + last.to),
            None => None,
        };
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
        self.origin = lsn % self.segment_size;
        self.window = self.origin;
        self.data.clear();
        self.small.clear();
        self.sent = lsn;
        self.flushed = lsn;
        self.pending.clear();
    }

    fn segment_start(&self) -> u64 {
        self.segno * self.segment_size
    }

    /// The end of what was received.
    fn position(&self) -> u64 {
        self.segment_start() + self.origin + self.data.len() as u64
    }

    /// Takes WAL from `start`; a segment that fills is sent at once (and its last stretch
    /// stored again as one), and the next begins.
    fn absorb(&mut self, start: u64, mut data: &[u8]) -> Result<(), String> {
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
            let room = (self.segment_size - self.origin) as usize - self.data.len();
            let take = room.min(data.len());
            self.data.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take == room {
                self.pending.push_back((self.position(), now_ms()));
                self.send(self.position())?;
                self.compact(self.segment_size);
                self.segno += 1;
                self.origin = 0;
                self.window = 0;
                self.data.clear();
                self.small.clear();
                self.collect_archived();
            }
        }
        if self.position() > self.sent {
            self.pending.push_back((self.position(), now_ms()));
        }
        Ok(())
    }

    /// Writes what was received up to `end` (an LSN in the current segment) and not sent
    /// yet: in place and synced (then true: the flushed position moved), or as a new
    /// piece whose store starts now.
    fn send(&mut self, end: u64) -> Result<bool, String> {
        if end <= self.sent {
            return Ok(false);
        }
        if self.in_place != Some(false) && self.write_in_place(end)? {
            return Ok(true);
        }
        let from = self.sent - self.segment_start();
        let to = end - self.segment_start();
        let bytes = self.data[(from - self.origin) as usize..(to - self.origin) as usize].to_vec();
        let archive = self.archive.clone();
        let history = self.history.clone();
        let segment = segment_name(self.timeline, self.segno, self.segment_size);
        let task = tokio::spawn(async move {
            let policy = crate::util::backoff::RetryPolicy {
                max_attempts: 4,
                base_delay: Duration::from_millis(250),
                max_delay: Duration::from_secs(2),
            };
            let never = tokio_util::sync::CancellationToken::new();
            crate::util::backoff::retry(&policy, &never, || {
                archive.put_piece(&history, &segment, from, &bytes)
            })
            .await
            .map_err(|e| match e {
                crate::util::backoff::RetryError::Failed { error, attempts } => {
                    format!("storing WAL of {segment} ({attempts} attempts): {error}")
                }
                crate::util::backoff::RetryError::Cancelled => "cancelled".to_string(),
            })
        });
        self.in_flight.push_back(Store { end, task });
        self.sent = end;
        self.stored_at = Instant::now();
        if to - self.window >= WINDOW {
            self.compact(to);
        }
        Ok(false)
    }

    /// Appends what was received up to `end` to the current segment's file and syncs it;
    /// false if the storage keeps objects only.
    fn write_in_place(&mut self, end: u64) -> Result<bool, String> {
        use std::os::unix::fs::FileExt;
        let segment = segment_name(self.timeline, self.segno, self.segment_size);
        if self.file.as_ref().map(|f| f.segno) != Some(self.segno) {
            // This segment's file begins where this run's bytes of it do.
            let key = self
                .archive
                .in_place_key(&self.history, &segment, self.origin);
            match self.archive.storage().open_in_place(&key) {
                None => {
                    self.in_place = Some(false);
                    return Ok(false);
                }
                Some(Err(e)) => return Err(format!("writing WAL of {segment}: {e}")),
                Some(Ok(file)) => {
                    self.in_place = Some(true);
                    self.file = Some(InPlace {
                        segno: self.segno,
                        file,
                        key,
                    });
                }
            }
        }
        let file = self.file.as_ref().expect("opened above");
        let from = self.sent - self.segment_start();
        let to = end - self.segment_start();
        let bytes = &self.data[(from - self.origin) as usize..(to - self.origin) as usize];
        file.file
            .write_all_at(bytes, from - self.origin)
            .and_then(|()| file.file.sync_data())
            .map_err(|e| {
                format!(
                    "writing WAL of {segment} to {}/{}: {e}",
                    self.archive.storage().url(),
                    file.key
                )
            })?;
        self.sent = end;
        self.stored_at = Instant::now();
        self.flushed_to(end);
        Ok(true)
    }

    /// A store completed (the first in flight): the flushed position moves to its end.
    fn stored(&mut self, result: Result<Piece, String>) -> Result<(), String> {
        let store = self.in_flight.pop_front().expect("a store in flight");
        let piece = result?;
        if piece.segment == segment_name(self.timeline, self.segno, self.segment_size)
            && piece.from >= self.window
        {
            self.small.push(piece);
        }
        self.flushed_to(store.end);
        Ok(())
    }

    fn flushed_to(&mut self, end: u64) {
        self.flushed = self.flushed.max(end);
        self.report.error = None;
        let flushed = self.flushed;
        self.pending.retain(|(e, _)| *e > flushed);
    }

    /// Stores bytes `window..to` of the current segment again as one piece, in the
    /// background, then deletes the small pieces stored of that stretch; the next
    /// stretch begins at `to`.
    fn compact(&mut self, to: u64) {
        let from = self.window;
        self.window = to;
        if self.in_place == Some(true) {
            return;
        }
        let small: Vec<Piece> = std::mem::take(&mut self.small)
            .into_iter()
            .filter(|p| p.to <= to)
            .collect();
        if from >= to || (small.len() == 1 && small[0].from == from && small[0].to == to) {
            return;
        }
        let bytes = self.data[(from - self.origin) as usize..(to - self.origin) as usize].to_vec();
        let archive = self.archive.clone();
        let history = self.history.clone();
        let segment = segment_name(self.timeline, self.segno, self.segment_size);
        tokio::spawn(async move {
            if let Err(e) = archive.put_piece(&history, &segment, from, &bytes).await {
                // The small pieces stay, which is as good.
                tracing::warn!("cannot store {segment} {from:X}..{to:X} as one piece: {e}");
                return;
            }
            for p in small {
                if let Err(e) = archive.storage().delete(&p.key).await {
                    tracing::warn!("cannot delete the stored-again {}: {e}", p.key);
                }
            }
        });
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
