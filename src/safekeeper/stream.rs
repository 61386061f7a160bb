//! Streamed WAL: what the safekeeper offloads of segments PostgreSQL has not archived
//! whole yet, so that a commit it acknowledged is on the storage before the segment is
//! full.
//!
//! `wal/<sysid>/<history>/stream/<segment>-<from>-<to>.zst` holds bytes `from..to`
//! (offsets in the segment, 8 hex digits each) of the segment, in the archive's object
//! format (checksummed). Objects are never overwritten: a longer piece with the same start
//! supersedes a shorter one, which is deleted after it, and a piece written again after a
//! restart only adds. A segment reads back as the contiguous run of pieces from its
//! start, zero-filled to the segment's size, the way PostgreSQL keeps a segment it is
//! still writing: recovery replays it to its last whole record, then finds nothing after.
//! Once the segment itself is archived, its pieces are deleted.

use bytes::Bytes;

use super::archive::{decode, encode, Archive, ArchiveError, Result};
use crate::compute::wal::WalFile;

/// A piece of a streamed segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub segment: String,
    pub from: u64,
    pub to: u64,
    pub key: String,
}

impl Archive {
    fn stream_prefix(&self, history: &str) -> String {
        format!("wal/{}/{history}/stream/", self.system_identifier())
    }

    /// Stores bytes `from..from + data.len()` of segment `segment` of `history`.
    pub async fn put_piece(
        &self,
        history: &str,
        segment: &str,
        from: u64,
        data: &[u8],
    ) -> Result<Piece> {
        let to = from + data.len() as u64;
        let key = format!(
            "{}{segment}-{from:08X}-{to:08X}.zst",
            self.stream_prefix(history)
        );
        self.storage().put(&key, Bytes::from(encode(data)?)).await?;
        Ok(Piece {
            segment: segment.to_string(),
            from,
            to,
            key,
        })
    }

    /// Every piece of `history`, by segment and start.
    pub async fn pieces(&self, history: &str) -> Result<Vec<Piece>> {
        let prefix = self.stream_prefix(history);
        let mut out: Vec<Piece> = self
            .storage()
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|o| {
                let name = o.key.strip_prefix(&prefix)?.strip_suffix(".zst")?;
                let (segment, range) = name.split_once('-')?;
                let (from, to) = range.split_once('-')?;
                WalFile::parse(segment, crate::compute::wal::DEFAULT_SEGMENT_SIZE)?;
                let from = u64::from_str_radix(from, 16).ok()?;
                let to = u64::from_str_radix(to, 16).ok()?;
                (from < to).then(|| Piece {
                    segment: segment.to_string(),
                    from,
                    to,
                    key: o.key.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.segment, a.from, b.to).cmp(&(&b.segment, b.from, a.to)));
        Ok(out)
    }

    /// Segment `segment` of `history` as streamed: the contiguous pieces from its start,
    /// zero-filled to `segment_size` (unless `whole`: then `None` unless they cover it
    /// all); `None` without a piece at its start. A piece deleted while it is read (a
    /// longer one stored, or the segment archived whole) makes it read the list again.
    pub async fn streamed(
        &self,
        history: &str,
        segment: &str,
        segment_size: u64,
        whole: bool,
    ) -> Result<Option<Vec<u8>>> {
        let mut attempt = 0;
        loop {
            match self
                .read_streamed(history, segment, segment_size, whole)
                .await
            {
                Err(ArchiveError::Storage(crate::storage::Error::NotFound { .. }))
                    if attempt < 3 =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn read_streamed(
        &self,
        history: &str,
        segment: &str,
        segment_size: u64,
        whole: bool,
    ) -> Result<Option<Vec<u8>>> {
        let pieces: Vec<Piece> = self
            .pieces(history)
            .await?
            .into_iter()
            .filter(|p| p.segment == segment)
            .collect();
        let mut out: Vec<u8> = Vec::new();
        for piece in cover(&pieces) {
            let bytes = self
                .storage()
                .get_bytes_limited(&piece.key, segment_size + (1 << 20))
                .await?;
            let corrupt = |what: String| ArchiveError::Corrupt {
                object: format!("{}/{}", self.storage().url(), piece.key),
                what,
            };
            let (_, data) = decode(&bytes).map_err(corrupt)?;
            if data.len() as u64 != piece.to - piece.from || piece.to > segment_size {
                return Err(corrupt(format!(
                    "it holds {} bytes, its name says {}",
                    data.len(),
                    piece.to - piece.from
                )));
            }
            let skip = (out.len() as u64 - piece.from) as usize;
            out.extend_from_slice(&data[skip..]);
        }
        if out.is_empty() || (whole && (out.len() as u64) < segment_size) {
            return Ok(None);
        }
        out.resize(segment_size as usize, 0);
        Ok(Some(out))
    }

    /// Deletes the pieces of segments of `history` that are archived whole now; how many
    /// went.
    pub async fn drop_archived_pieces(&self, history: &str) -> Result<usize> {
        let pieces = self.pieces(history).await?;
        let mut removed = 0;
        let mut segments: Vec<&str> = pieces.iter().map(|p| p.segment.as_str()).collect();
        segments.dedup();
        for segment in segments {
            if self.header(&self.key(history, segment)).await?.is_none() {
                continue;
            }
            for p in pieces.iter().filter(|p| p.segment == segment) {
                self.storage().delete(&p.key).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The pieces that make up a segment's contiguous run from offset 0, in order: at each
/// point the one reaching furthest. `pieces` are of one segment.
pub fn cover(pieces: &[Piece]) -> Vec<&Piece> {
    let mut out = Vec::new();
    let mut end = 0;
    loop {
        let best = pieces
            .iter()
            .filter(|p| p.from <= end && p.to > end)
            .max_by_key(|p| p.to);
        match best {
            Some(p) => {
                end = p.to;
                out.push(p);
            }
            None => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(from: u64, to: u64) -> Piece {
        Piece {
            segment: "000000010000000000000001".into(),
            from,
            to,
            key: format!("{from}-{to}"),
        }
    }

    #[test]
    fn a_segment_is_the_longest_contiguous_run_from_its_start() {
        let pieces = [
            piece(0, 10),
            piece(0, 30),
            piece(30, 40),
            piece(35, 60),
            piece(70, 80),
        ];
        let keys: Vec<&str> = cover(&pieces).iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["0-30", "30-40", "35-60"]);
        // Nothing from the start: nothing at all.
        assert!(cover(&[piece(5, 10)]).is_empty());
    }
}
