//! Point-in-time restore: the newest snapshot before a target (a time or a WAL position)
//! in a pg's line of history, and the recovery that replays the WAL archive from it to
//! the target. Targets the archive cannot reach are refused before anything changes,
//! naming the range it can: from the oldest usable snapshot to the newest archived WAL.

use std::collections::HashSet;

use super::Pageserver;
use crate::compute::node::{Recovery, RecoveryTarget};
use crate::compute::wal::{parse_lsn, segno_of, WalFile, DEFAULT_SEGMENT_SIZE};
use crate::models::{OpError, OpResult};
use crate::safekeeper::archive::{inherited, Archive, Branch};
use crate::snapshot::{zenith, Manifest};
use crate::util::time::{format_pg, parse_time};

/// A point to restore to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// Microseconds since the epoch: every commit up to it, none after.
    Time(i64),
    /// A WAL position: replay through the record there.
    Lsn(u64),
}

impl At {
    /// `X/Y` is a WAL position; anything else a time.
    pub fn parse(text: &str) -> OpResult<At> {
        if let Some(lsn) = parse_lsn(text.trim()) {
            return Ok(At::Lsn(lsn));
        }
        parse_time(text)
            .map(At::Time)
            .map_err(|e| OpError::BadRequest(format!("{e}, or a WAL position such as 0/3000060")))
    }

    pub fn describe(&self) -> String {
        match *self {
            At::Time(t) => format_pg(t),
            At::Lsn(l) => crate::compute::wal::format_lsn(l),
        }
    }

    fn target(&self) -> RecoveryTarget {
        match *self {
            At::Time(t) => RecoveryTarget::Time(format_pg(t)),
            At::Lsn(l) => RecoveryTarget::Lsn(crate::compute::wal::format_lsn(l)),
        }
    }
}

/// Microseconds since the epoch by which a snapshot was consistent: its manifest is made
/// after the backup stopped, and its id records the millisecond.
fn consistent_by(m: &Manifest) -> Option<i64> {
    m.created_millis().map(|ms| (ms as i64 + 1) * 1000)
}

/// A history and its ancestors, from the history up.
type Lineage = Vec<(String, Option<Branch>)>;

/// Whether snapshot `m` belongs to `lineage`'s WAL: taken in its first history, or in an
/// ancestor at or before the point each descendant forked away (by position: a snapshot
/// in the fork's segment but after the fork is of the WAL the child did not inherit).
pub(super) fn in_lineage(lineage: &Lineage, m: &Manifest) -> bool {
    let Some(h) = &m.wal_history else {
        return false;
    };
    let Some(i) = lineage.iter().position(|(name, _)| name == h) else {
        return false;
    };
    let Some(stop) = parse_lsn(&m.stop_lsn) else {
        return false;
    };
    lineage[..i].iter().all(|(_, branch)| {
        branch
            .as_ref()
            .and_then(|b| b.parent.as_ref())
            .is_some_and(|f| {
                m.timeline < f.tli
                    || (m.timeline == f.tli && parse_lsn(&f.lsn).is_some_and(|fork| stop <= fork))
            })
    })
}

impl Pageserver {
    /// The snapshot and the recovery that restore the line of history `history` to `at`.
    /// The WAL comes from storage_dest; the snapshot from the repo, or storage_dest.
    pub async fn plan_pitr(
        &self,
        history: &str,
        system_identifier: u64,
        at: At,
    ) -> OpResult<(Manifest, Recovery)> {
        let Some(url) = self.repo.config()?.storage_dest else {
            return Err(OpError::BadRequest(
                "a point-in-time restore replays the WAL archived in storage_dest, and this repo has none; `zenith storage attach -n storage_dest --path URL` sets one (WAL is archived from then on)".into(),
            ));
        };
        let dest = self.open_storage(&url).await?;
        let archive = Archive::new(dest.clone(), system_identifier);
        let lineage: Lineage = archive.lineage(history).await.map_err(archive_error)?;
        // Every snapshot of the lineage, in the repo or storage_dest, oldest first.
        let mut seen = HashSet::new();
        let mut usable: Vec<Manifest> = Vec::new();
        for store in [self.store().await?, dest.clone()] {
            for m in zenith::list(store.as_ref()).await? {
                if m.system_identifier == system_identifier
                    && in_lineage(&lineage, &m)
                    && seen.insert(m.id.clone())
                {
                    usable.push(m);
                }
            }
        }
        usable.sort_by(|a, b| a.id.cmp(&b.id));
        let segments = visible_segments(&archive, &lineage).await?;
        let newest = segments
            .iter()
            .fold(None, |acc: Option<(i64, u64)>, (_, at, end)| {
                Some(match acc {
                    Some((t, e)) => (t.max(*at), e.max(*end)),
                    None => (*at, *end),
                })
            });
        // A snapshot whose WAL after it is no longer archived (retention trimmed it) can
        // start no restore.
        let archived: HashSet<WalFile> = segments.iter().map(|(f, _, _)| *f).collect();
        usable.retain(|m| {
            parse_lsn(&m.stop_lsn).is_some_and(|l| {
                archived.contains(&WalFile::Segment {
                    tli: m.timeline,
                    segno: segno_of(l, DEFAULT_SEGMENT_SIZE),
                })
            })
        });
        let Some(oldest) = usable.first() else {
            return Err(OpError::BadRequest(format!(
                "no snapshot of this pg's line of history (WAL history {history}) can start a point-in-time restore: snapshots taken from now on can"
            )));
        };
        let before = |m: &Manifest| match at {
            At::Time(t) => consistent_by(m).is_some_and(|c| c <= t),
            At::Lsn(l) => parse_lsn(&m.stop_lsn).is_some_and(|s| s <= l),
        };
        let range = format!(
            "from {} (snapshot {}) to {}",
            match at {
                At::Time(_) => consistent_by(oldest).map(format_pg).unwrap_or_default(),
                At::Lsn(_) => oldest.stop_lsn.clone(),
            },
            oldest.id,
            match (at, &newest) {
                (_, None) => "nothing archived yet".to_string(),
                (At::Time(_), Some((t, _))) => format_pg(*t),
                (At::Lsn(_), Some((_, l))) => crate::compute::wal::format_lsn(*l),
            }
        );
        let Some(snapshot) = usable.iter().rev().find(|m| before(m)).cloned() else {
            return Err(OpError::BadRequest(format!(
                "{} is before the first snapshot this pg can be restored from; the archive reaches {range}",
                at.describe()
            )));
        };
        let beyond = match (at, &newest) {
            (_, None) => true,
            (At::Time(t), Some((newest_t, _))) => t > *newest_t,
            (At::Lsn(l), Some((_, end))) => l >= *end,
        };
        if beyond {
            return Err(OpError::BadRequest(format!(
                "{} is beyond the WAL archived so far; the archive reaches {range}",
                at.describe()
            )));
        }
        Ok((
            snapshot,
            Recovery {
                source: history.to_string(),
                target: Some(at.target()),
            },
        ))
    }
}

/// The segments the lineage's first history sees (its own, and its ancestors' from before
/// each fork), with when each was archived (microseconds since the epoch) and the position
/// it ends at.
async fn visible_segments(
    archive: &Archive,
    lineage: &Lineage,
) -> OpResult<Vec<(WalFile, i64, u64)>> {
    let mut out = Vec::new();
    for (i, (h, branch)) in lineage.iter().enumerate() {
        let size = branch
            .as_ref()
            .map(|b| b.segment_size)
            .unwrap_or(DEFAULT_SEGMENT_SIZE);
        for (file, meta) in archive.files(h, size).await.map_err(archive_error)? {
            let WalFile::Segment { segno, .. } = file else {
                continue;
            };
            let visible = lineage[..i].iter().all(|(_, child)| {
                child
                    .as_ref()
                    .and_then(|b| b.parent.as_ref())
                    .is_some_and(|fork| inherited(fork, &file))
            });
            if !visible {
                continue;
            }
            let at = meta
                .last_modified
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            out.push((file, at, (segno + 1) * size));
        }
    }
    Ok(out)
}

fn archive_error(e: crate::safekeeper::ArchiveError) -> OpError {
    match e {
        crate::safekeeper::ArchiveError::Storage(s) => OpError::Storage(s),
        other => OpError::Failed(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_times_or_positions() {
        assert_eq!(At::parse("0/3000060").unwrap(), At::Lsn(0x300_0060));
        assert!(matches!(
            At::parse("2026-12-03 10:00:00").unwrap(),
            At::Time(_)
        ));
        let e = At::parse("tomorrow").unwrap_err().to_string();
        assert!(e.contains("WAL position"), "{e}");
    }
}
