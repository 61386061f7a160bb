//! `zenith wal verify`: whether the archive is continuous, history by history. For each
//! history and timeline, the segments from where the history's own WAL must begin (its
//! fork, or its oldest snapshot's start) to the newest archived one, and every gap among
//! them named: a gap is where recovery would stop.

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
            timelines.push(TimelineReport {
                timeline: tli,
                first: segment_name(tli, first, size),
                last: segment_name(tli, last, size),
                segments: segnos.iter().filter(|&&s| s >= first).count() as u64,
                gaps,
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
