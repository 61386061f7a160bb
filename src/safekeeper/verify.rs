//! `zenith wal verify`: whether the archive is continuous, history by history. For each
//! history and timeline, the segments from where the history's own WAL must begin (its
//! fork, or its oldest snapshot's start) to the newest archived one, and every gap among
//! them named: a gap is where recovery would stop. Segments not archived whole count
//! as present when the safekeeper's streamed pieces cover them, or, for the newest one,
//! cover a run from its start (the tail, which a restore replays as far as it goes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::archive::{Archive, Result};
use crate::compute::wal::{segment_name, WalFile, DEFAULT_SEGMENT_SIZE};

/// One timeline of one history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineReport {
    pub timeline: u32,
    /// The first segment the history must hold, and the newest it holds.
    pub first: String,
    pub last: String,
    pub segments: u64,
    /// Missing segments, as first..=last ranges.
    pub gaps: Vec<(String, String)>,
    /// Where the WAL streamed by the safekeeper ends, when its newest segment is not
    /// archived whole yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streamed_to: Option<String>,
}

/// One history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryReport {
    pub history: String,
    pub parent: Option<String>,
    pub pg: Option<String>,
    pub timelines: Vec<TimelineReport>,
    /// Seconds since the epoch of the newest archived file, when known.
    pub newest_unix: Option<u64>,
}

impl HistoryReport {
    pub fn gaps(&self) -> usize {
        self.timelines.iter().map(|t| t.gaps.len()).sum()
    }
}

/// Checks every history of the archive. `starts` gives, per history, the segment its
/// oldest snapshot needs first (timeline and segment number), where one is known.
pub async fn verify(
    archive: &Archive,
    starts: &BTreeMap<String, (u32, u64)>,
) -> Result<Vec<HistoryReport>> {
    let mut out = Vec::new();
    let mut histories = archive.histories().await?;
    histories.sort();
    for history in histories {
        let branch = archive.branch(&history).await?;
        let size = branch
            .as_ref()
            .map(|b| b.segment_size)
            .unwrap_or(DEFAULT_SEGMENT_SIZE);
        let files = archive.files(&history, size).await?;
        let newest_unix = files
            .iter()
            .filter_map(|(_, o)| o.last_modified)
            .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .max();
        let mut by_tli: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (f, _) in &files {
            if let WalFile::Segment { tli, segno } = f {
                by_tli.entry(*tli).or_default().push(*segno);
            }
        }
        let streamed = streamed_segments(archive, &history, size, &by_tli).await?;
        let mut streamed_to: BTreeMap<u32, u64> = BTreeMap::new();
        // Stored WAL past a hole: a restore cannot reach it.
        let mut holes: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (&(tli, segno), &(end, hole)) in &streamed {
            let newest = streamed
                .keys()
                .filter(|(t, _)| *t == tli)
                .map(|(_, s)| *s)
                .max();
            // A segment streamed whole counts as archived; the newest one also when it is
            // a run from its start with nothing stored past a hole.
            // (Pieces past a hole in the newest segment may be stores still completing out
            // of order: its run from the start is what counts there.)
            if hole && Some(segno) != newest {
                holes.entry(tli).or_default().push(segno);
                by_tli.entry(tli).or_default().push(segno);
            } else if end == size || (Some(segno) == newest && end > 0) {
                by_tli.entry(tli).or_default().push(segno);
                if end < size {
                    streamed_to.insert(tli, segno * size + end);
                }
            }
        }
        let fork = branch.as_ref().and_then(|b| b.parent.as_ref());
        let mut timelines = Vec::new();
        for (tli, mut segnos) in by_tli {
            segnos.sort_unstable();
            let last = *segnos.last().expect("a timeline with segments");
            // Where this history's own WAL of the timeline must begin.
            let first = match (fork, starts.get(&history)) {
                (Some(f), _) if f.tli == tli => f.segno,
                (_, Some(&(t, s))) if t == tli => s,
                _ => segnos[0],
            }
            .min(last);
            segnos.dedup();
            let mut gaps = Vec::new();
            let mut expected = first;
            for &s in segnos.iter().filter(|&&s| s >= first) {
                if s > expected {
                    gaps.push((
                        segment_name(tli, expected, size),
                        segment_name(tli, s - 1, size),
                    ));
                }
                expected = s + 1;
            }
            for &s in holes.get(&tli).into_iter().flatten() {
                let name = segment_name(tli, s, size);
                gaps.push((name.clone(), name));
            }
            timelines.push(TimelineReport {
                timeline: tli,
                first: segment_name(tli, first, size),
                last: segment_name(tli, last, size),
                segments: segnos.iter().filter(|&&s| s >= first).count() as u64,
                gaps,
                streamed_to: streamed_to
                    .get(&tli)
                    .map(|&l| crate::compute::wal::format_lsn(l)),
            });
        }
        out.push(HistoryReport {
            history,
            parent: fork.map(|f| f.history.clone()),
            pg: branch.as_ref().and_then(|b| b.pg.clone()),
            timelines,
            newest_unix,
        });
    }
    Ok(out)
}

/// The segments of `history` that only the safekeeper's pieces hold (not archived whole):
/// per (timeline, segment), where the contiguous run from its start ends, and whether
/// pieces lie past a hole after it.
async fn streamed_segments(
    archive: &Archive,
    history: &str,
    size: u64,
    archived: &BTreeMap<u32, Vec<u64>>,
) -> Result<BTreeMap<(u32, u64), (u64, bool)>> {
    let mut by_segment: BTreeMap<(u32, u64), Vec<super::stream::Piece>> = BTreeMap::new();
    for p in archive.pieces(history).await? {
        if let Some(WalFile::Segment { tli, segno }) = WalFile::parse(&p.segment, size) {
            if !archived.get(&tli).is_some_and(|s| s.contains(&segno)) {
                by_segment.entry((tli, segno)).or_default().push(p);
            }
        }
    }
    Ok(by_segment
        .into_iter()
        .map(|(k, pieces)| {
            let end = super::stream::cover(&pieces)
                .last()
                .map(|p| p.to)
                .unwrap_or(0);
            let hole = pieces.iter().any(|p| p.to > end);
            (k, (end, hole))
        })
        .collect())
}
