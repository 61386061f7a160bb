//! Streamed WAL: what the safekeeper offloads of segments PostgreSQL has not archived
//! whole yet, so that a commit it acknowledged is on the storage before the segment is
//! full.
//!
//! On a storage of objects (S3, an encrypted storage),
//! `wal/<sysid>/<history>/stream/<segment>-<from>-<to>.zst` holds bytes `from..to`
//! (offsets in the segment, 8 hex digits each) of the segment, in the archive's object
//! format (checksummed). Such objects are never overwritten: a longer piece with the same
//! start supersedes a shorter one, which is deleted after it, and a piece written again
//! after a restart only adds.
//!
//! On a storage of files (`file://`, unencrypted), the safekeeper writes
//! `wal/<sysid>/<history>/stream/<segment>-<from>.wal` in place instead, the way
//! `pg_receivewal` writes its partial segment: the segment's bytes from `from` on, raw,
//! appended and fdatasynced before they are acknowledged; the file's size says how far it
//! goes (unlike `pg_receivewal`, which pads its file to the segment's size first). Those
//! bytes carry no checksum of zenith's: each WAL page's header must name its own
//! position when the file is read ([`pages_in_place`]: a tail of pages that do not ends
//! the file, a bad page before a good one is an error), and PostgreSQL checks each
//! record's CRC at replay, where a damaged record ends the recovery as it would in
//! `pg_wal`. After a restart the safekeeper writes the file again from its start, over
//! the same bytes, so a tail a crash of the machine or a failed sync left unsynced is
//! overwritten before anything after it is acknowledged.
//!
//! A segment reads back as the contiguous run of pieces from its start, zero-filled to
//! the segment's size, the way PostgreSQL keeps a segment it is still writing: recovery
//! replays it to its last whole record, then finds nothing after. Once the segment itself
//! is archived, its pieces are deleted.

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
    /// Written in place (raw bytes, `to` from the file's size), not an object.
    pub in_place: bool,
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
            in_place: false,
        })
    }

    /// The key of the piece of `segment` of `history` written in place from `from`.
    pub fn in_place_key(&self, history: &str, segment: &str, from: u64) -> String {
        format!("{}{segment}-{from:08X}.wal", self.stream_prefix(history))
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
                let name = o.key.strip_prefix(&prefix)?;
                let (name, in_place) = match name.strip_suffix(".wal") {
                    Some(name) => (name, true),
                    None => (name.strip_suffix(".zst")?, false),
                };
                let (segment, range) = name.split_once('-')?;
                WalFile::parse(segment, crate::compute::wal::DEFAULT_SEGMENT_SIZE)?;
                let (from, to) = if in_place {
                    let from = u64::from_str_radix(range, 16).ok()?;
                    (from, from.checked_add(o.size)?)
                } else {
                    let (from, to) = range.split_once('-')?;
                    (
                        u64::from_str_radix(from, 16).ok()?,
                        u64::from_str_radix(to, 16).ok()?,
                    )
                };
                (from < to).then(|| Piece {
                    segment: segment.to_string(),
                    from,
                    to,
                    key: o.key.clone(),
                    in_place,
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
            if (out.len() as u64) < piece.from {
                // A file written in place ended before its listed size: the run ends there.
                break;
            }
            let bytes = self
                .storage()
                .get_bytes_limited(&piece.key, segment_size + (1 << 20))
                .await?;
            let corrupt = |what: String| ArchiveError::Corrupt {
                object: format!("{}/{}", self.storage().url(), piece.key),
                what,
            };
            let data = if piece.in_place {
                // Listed earlier, it may have grown since.
                let mut data = bytes.to_vec();
                if (data.len() as u64) < piece.to - piece.from
                    || piece.from + data.len() as u64 > segment_size
                {
                    return Err(corrupt(format!(
                        "it holds {} bytes from offset {:X} of a {segment_size}-byte segment, and was listed with {}",
                        data.len(),
                        piece.from,
                        piece.to - piece.from
                    )));
                }
                let start = match WalFile::parse(segment, segment_size) {
                    Some(WalFile::Segment { segno, .. }) => segno * segment_size,
                    _ => 0,
                };
                data.truncate(pages_in_place(&data, start + piece.from).map_err(corrupt)?);
                data
            } else {
                let (_, data) = decode(&bytes).map_err(corrupt)?;
                if data.len() as u64 != piece.to - piece.from || piece.to > segment_size {
                    return Err(corrupt(format!(
                        "it holds {} bytes, its name says {}",
                        data.len(),
                        piece.to - piece.from
                    )));
                }
                data
            };
            // (A piece written in place may reach past the next one's start by now.)
            let skip = (out.len() as u64).saturating_sub(piece.from) as usize;
            out.extend_from_slice(data.get(skip..).unwrap_or_default());
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

/// How much of `data`, WAL written in place from LSN `at`, is whole pages: up to the first
/// page whose header does not name its own position (a tail that a crash of the machine
/// left unsynced: zeros, or older bytes). Such a page with a good one after it is damage,
/// which would end a recovery early and silently: an error.
pub fn pages_in_place(data: &[u8], at: u64) -> std::result::Result<usize, String> {
    const PAGE: u64 = 8192;
    let good = |offset: usize| {
        let page = &data[offset..];
        page.len() >= 16
            && u16::from_le_bytes([page[0], page[1]]) != 0
            && u64::from_le_bytes(page[8..16].try_into().expect("8 bytes")) == at + offset as u64
    };
    let first = (at.div_ceil(PAGE) * PAGE - at) as usize;
    let mut pages = (first..data.len()).step_by(PAGE as usize);
    let Some(bad) = pages.by_ref().find(|o| !good(*o)) else {
        return Ok(data.len());
    };
    match pages.find(|o| good(*o)) {
        Some(after) => Err(format!(
            "its WAL page at {} is damaged (its header does not name it) while the one at {} is whole",
            crate::compute::wal::format_lsn(at + bad as u64),
            crate::compute::wal::format_lsn(at + after as u64)
        )),
        None => Ok(bad),
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
            in_place: false,
        }
    }

    #[tokio::test]
    async fn a_segment_reads_back_from_objects_and_a_file_written_in_place() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(
            crate::storage::LocalStorage::new(dir.path().to_path_buf()).unwrap(),
        );
        let archive = Archive::new(storage.clone(), 7);
        let segment = "000000010000000000000003";
        let size = 64;
        archive.put_piece("h", segment, 0, &[1; 10]).await.unwrap();
        // Written in place from 10 on, and grown after it was listed.
        let key = archive.in_place_key("h", segment, 10);
        let file = crate::storage::Storage::open_in_place(storage.as_ref(), &key)
            .unwrap()
            .unwrap();
        file.write_all_at(&[2; 20], 0).unwrap();
        let pieces = archive.pieces("h").await.unwrap();
        assert_eq!(
            pieces
                .iter()
                .map(|p| (p.from, p.to, p.in_place))
                .collect::<Vec<_>>(),
            [(0, 10, false), (10, 30, true)]
        );
        file.write_all_at(&[3; 4], 20).unwrap();
        let data = archive
            .streamed("h", segment, size, false)
            .await
            .unwrap()
            .unwrap();
        let mut want = [vec![1; 10], vec![2; 20], vec![3; 4]].concat();
        want.resize(size as usize, 0);
        assert_eq!(data, want);
        // Not the whole segment: a restore does not take it for one.
        assert!(archive
            .streamed("h", segment, size, true)
            .await
            .unwrap()
            .is_none());
        // Reopened, it is not truncated.
        drop(file);
        let again = crate::storage::Storage::open_in_place(storage.as_ref(), &key)
            .unwrap()
            .unwrap();
        assert_eq!(again.metadata().unwrap().len(), 24);
        // Longer than its segment: refused in one line, not read past.
        again.write_all_at(&[4; 60], 0).unwrap();
        let refused = archive
            .streamed("h", segment, size, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("it holds 60 bytes from offset A"),
            "{refused}"
        );
    }

    #[test]
    fn a_file_written_in_place_ends_at_its_first_page_that_is_not_whole() {
        const PAGE: usize = 8192;
        let at = 0x0300_0000u64 + 100;
        // Pages from the first boundary after `at`, each naming its position.
        let mut data = vec![7u8; 4 * PAGE];
        for i in 0..4 {
            let o = PAGE - 100 + i * PAGE;
            if o + 16 <= data.len() {
                data[o..o + 2].copy_from_slice(&0xD110u16.to_le_bytes());
                let addr = at + o as u64;
                data[o + 8..o + 16].copy_from_slice(&addr.to_le_bytes());
            }
        }
        assert_eq!(pages_in_place(&data, at), Ok(data.len()));
        // An unsynced tail (zeros): the file ends before it.
        let mut tail = data.clone();
        let third = 2 * PAGE - 100;
        tail[third..].fill(0);
        assert_eq!(pages_in_place(&tail, at), Ok(third));
        // A zeroed page with a whole one after it: damage.
        let mut hole = data.clone();
        hole[PAGE - 100..2 * PAGE - 100].fill(0);
        let refused = pages_in_place(&hole, at).unwrap_err();
        assert!(refused.contains("is damaged"), "{refused}");
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
