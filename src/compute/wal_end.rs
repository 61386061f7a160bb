//! Where the WAL of a server stopped without its shutdown checkpoint ends. Such a data
//! directory (the server was killed, or stopped in immediate mode) is consistent only once
//! its WAL is replayed to the end, so a snapshot of it stands for that end, not for its
//! last checkpoint: point-in-time restores pick their base by it, and a pg made from it
//! forks its WAL there.
//!
//! The end is found the way PostgreSQL's own reader finds it when it recovers: from the
//! last checkpoint record (the control file names it; it must be whole), record after
//! record, each page header naming its own position, each continued record announced by
//! the next page, each record pointing back at the one before it and passing its
//! CRC-32C. The first record that fails a check is where the WAL ends. Nothing is
//! written; segments are read a page at a time, so memory does not grow with the WAL.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::wal::format_lsn;

const PAGE: u64 = 8192;
const RECORD_HEADER: usize = 24;
/// `xl_crc` comes after the first 20 bytes of a record's header.
const CRC_AT: usize = 20;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
const RM_XLOG_ID: u8 = 0;
const XLOG_SWITCH: u8 = 0x40;
/// No record is larger (PostgreSQL's own bound is just under 1 GiB).
const MAX_RECORD: usize = 1 << 30;

/// Where the WAL ends: the position just past the last whole record (as PostgreSQL
/// reports the end of WAL), and the timeline that record is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalEnd {
    pub lsn: u64,
    pub timeline: u32,
}

/// Where the WAL in `pg_wal` ends, reading from the record at `from`. An error when that
/// first record cannot be read: then the WAL is damaged, and so is the data directory.
///
/// `after`, when known, is where a record begins that the server reported flushed just
/// before it stopped (the end of a record it inserted then): everything before it was
/// written and synced by the server moments ago, so the search for the end starts there
/// (tens of MiB less to read after a burst of writes). If no whole record begins there,
/// the search starts at `from` as without it.
pub fn wal_end(pg_wal: &Path, from: u64, after: Option<u64>) -> Result<WalEnd, String> {
    // A checkout reads a stopped server's WAL twice in a row (to check it can keep that
    // state, then to keep it): the last answer stands while the files are unchanged.
    static LAST: std::sync::Mutex<Option<(Vec<u8>, WalEnd)>> = std::sync::Mutex::new(None);
    let key = listing(pg_wal, from);
    if let (Some(key), Ok(last)) = (&key, LAST.lock()) {
        if let Some((k, end)) = last.as_ref() {
            if k == key {
                return Ok(*end);
            }
        }
    }
    let end = match after.filter(|a| *a > from) {
        Some(after) => {
            // The first record must be whole all the same.
            walk(pg_wal, from, from + 1, |_| {})?;
            walk(pg_wal, after, u64::MAX, |_| {})
                .or_else(|_| walk(pg_wal, from, u64::MAX, |_| {}))?
        }
        None => walk(pg_wal, from, u64::MAX, |_| {})?,
    };
    if let (Some(key), Ok(mut last)) = (key, LAST.lock()) {
        *last = Some((key, end));
    }
    Ok(end)
}

/// What identifies the WAL read from `from` in `pg_wal`: the directory, the position, and
/// every file's name, inode, length and change time (which, unlike the modification
/// time, nobody can set back).
fn listing(pg_wal: &Path, from: u64) -> Option<Vec<u8>> {
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<(String, u64, u64, u64, i64, i64)> = Vec::new();
    for e in std::fs::read_dir(pg_wal).ok()? {
        let e = e.ok()?;
        let m = e.metadata().ok()?;
        if m.is_file() {
            let name = e.file_name().to_string_lossy().to_string();
            files.push((name, m.dev(), m.ino(), m.len(), m.ctime(), m.ctime_nsec()));
        }
    }
    files.sort();
    let mut key = format!("{}\0{from}", std::fs::canonicalize(pg_wal).ok()?.display());
    for (name, dev, ino, len, s, ns) in files {
        key.push_str(&format!("\0{name} {dev}:{ino} {len} {s}.{ns}"));
    }
    Some(key.into_bytes())
}

/// Every block the records from `start` (a record's start) up to `to` refer to, of those
/// records whose start `keep` accepts: the pages a restore of a snapshot whose WAL spans
/// that range changes by replaying it, which its files may not show yet.
pub fn touched_blocks(
    pg_wal: &Path,
    start: u64,
    to: u64,
    keep: impl Fn(u64) -> bool,
) -> Result<std::collections::BTreeSet<BlockRef>, String> {
    let mut touched = std::collections::BTreeSet::new();
    if start < to {
        walk(pg_wal, start, to, |record| {
            if keep(record.start) {
                touched.extend(block_refs(&record.bytes, record.magic))
            }
        })?;
    }
    Ok(touched)
}

/// A block a WAL record refers to: tablespace, database and relation file numbers, the
/// fork (0 main, 1 free space map, 2 visibility map, 3 init) and the block number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockRef {
    pub tablespace: u32,
    pub database: u32,
    pub relation: u32,
    pub fork: u8,
    pub block: u32,
}

impl BlockRef {
    /// The file holding the block under a data directory, and the block's number there
    /// (relations are split into 1 GiB files); `None` in a tablespace of its own.
    pub fn file(&self) -> Option<(String, u64)> {
        const BLOCKS_PER_FILE: u64 = (1 << 30) / PAGE;
        let fork = match self.fork {
            0 => "",
            1 => "_fsm",
            2 => "_vm",
            3 => "_init",
            _ => return None,
        };
        let block = self.block as u64;
        let segment = block / BLOCKS_PER_FILE;
        let suffix = if segment == 0 {
            String::new()
        } else {
            format!(".{segment}")
        };
        let dir = match self.tablespace {
            1663 => format!("base/{}", self.database),
            1664 => "global".to_string(),
            _ => return None,
        };
        Some((
            format!("{dir}/{}{fork}{suffix}", self.relation),
            block % BLOCKS_PER_FILE,
        ))
    }
}

/// The block references of one record (PostgreSQL 15's layout, also 14's and 16's),
/// as far as they parse; `magic` tells the version (its image flags differ).
fn block_refs(bytes: &[u8], magic: u16) -> Vec<BlockRef> {
    const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
    const BKPBLOCK_SAME_REL: u8 = 0x80;
    const BKPIMAGE_HAS_HOLE: u8 = 0x01;
    // PostgreSQL 14 marks a compressed image with 0x02; 15 on with one bit per method.
    let compressed: u8 = if magic < 0xD110 {
        0x02
    } else {
        0x04 | 0x08 | 0x10
    };
    let mut out = Vec::new();
    let mut at = RECORD_HEADER;
    let mut rel: Option<(u32, u32, u32)> = None;
    let u8_at = |i: usize| bytes.get(i).copied();
    let u32_at = |i: usize| Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
    while let Some(id) = u8_at(at) {
        match id {
            // Main data (short, long): the last header.
            255 | 254 => break,
            // Replication origin, top-level transaction id.
            253 => at += 3,
            252 => at += 5,
            0..=32 => {
                let Some(flags) = u8_at(at + 1) else { break };
                at += 4;
                if flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let Some(info) = u8_at(at + 4) else { break };
                    at += 5;
                    if info & BKPIMAGE_HAS_HOLE != 0 && info & compressed != 0 {
                        at += 2;
                    }
                }
                if flags & BKPBLOCK_SAME_REL == 0 {
                    let (Some(spc), Some(db), Some(r)) =
                        (u32_at(at), u32_at(at + 4), u32_at(at + 8))
                    else {
                        break;
                    };
                    rel = Some((spc, db, r));
                    at += 12;
                }
                let (Some((tablespace, database, relation)), Some(block)) = (rel, u32_at(at))
                else {
                    break;
                };
                at += 4;
                out.push(BlockRef {
                    tablespace,
                    database,
                    relation,
                    fork: flags & 0x0f,
                    block,
                });
            }
            _ => break,
        }
    }
    out
}

/// Reads the records from `from` on, handing each whole one to `visit`, until the WAL
/// ends or a record would begin at or past `to`; returns where the last one ends.
fn walk(
    pg_wal: &Path,
    from: u64,
    to: u64,
    mut visit: impl FnMut(&Record),
) -> Result<WalEnd, String> {
    let mut reader = Reader::open(pg_wal)?;
    let mut pos = from;
    let mut prev: Option<u64> = None;
    let mut end = None;
    while pos < to {
        let Some(record) = reader.record(pos) else {
            break;
        };
        let xl_prev = u64::from_le_bytes(record.bytes[8..16].try_into().expect("8 bytes"));
        if prev.is_some_and(|p| p != xl_prev) || !crc_matches(&record.bytes) {
            break;
        }
        visit(&record);
        prev = Some(record.start);
        // After a segment switch (pg_switch_wal, archive_timeout) the segment's rest is
        // unused: the next record begins the next segment.
        let (rmid, info) = (record.bytes[17], record.bytes[16]);
        pos = if rmid == RM_XLOG_ID && info & 0xf0 == XLOG_SWITCH {
            record.end.div_ceil(reader.segment_size) * reader.segment_size
        } else {
            maxalign(record.end)
        };
        end = Some(WalEnd {
            lsn: pos,
            timeline: record.timeline,
        });
    }
    end.ok_or_else(|| {
        format!(
            "{} does not hold a whole WAL record at {}: the WAL is damaged",
            pg_wal.display(),
            format_lsn(from)
        )
    })
}

fn maxalign(pos: u64) -> u64 {
    pos.div_ceil(8) * 8
}

/// Whether a record's CRC-32C (over its data, then its header up to the CRC) matches.
fn crc_matches(bytes: &[u8]) -> bool {
    let stored = u32::from_le_bytes(bytes[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    digest.update(&bytes[RECORD_HEADER..]);
    digest.update(&bytes[..CRC_AT]);
    digest.finalize() as u32 == stored
}

struct Record {
    /// The page magic (it names the PostgreSQL version).
    magic: u16,
    /// The timeline of the segment file it begins in.
    timeline: u32,
    /// Where the record begins (past a page header, if it begins a page).
    start: u64,
    /// Where its last byte ends (not aligned).
    end: u64,
    bytes: Vec<u8>,
}

/// Pages of the segments in one `pg_wal`, by position: of a segment present on several
/// timelines, the newest timeline's (it carries the older one's WAL up to the switch).
struct Reader {
    dir: PathBuf,
    segment_size: u64,
    segments: BTreeMap<u64, String>,
    /// The segment read from: its number, file and timeline.
    open: Option<(u64, File, u32)>,
    /// The page magic of this PostgreSQL version, from the first page read.
    magic: Option<u16>,
}

impl Reader {
    fn open(dir: &Path) -> Result<Reader, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        names.sort();
        // Every segment file has the segment size (PostgreSQL makes them whole): the
        // most common length, so one damaged file does not mislead.
        let mut lengths: BTreeMap<u64, usize> = BTreeMap::new();
        for name in &names {
            if let Ok(m) = std::fs::metadata(dir.join(name)) {
                *lengths.entry(m.len()).or_default() += 1;
            }
        }
        let segment_size = lengths
            .into_iter()
            .filter(|(size, _)| size.is_power_of_two() && *size >= 1 << 20 && *size <= 1 << 30)
            .max_by_key(|(_, count)| *count)
            .map(|(size, _)| size)
            .ok_or_else(|| format!("{} holds no WAL segment", dir.display()))?;
        let per = 0x1_0000_0000 / segment_size;
        let mut segments = BTreeMap::new();
        for name in names {
            let (Ok(log), Ok(seg)) = (
                u64::from_str_radix(&name[8..16], 16),
                u64::from_str_radix(&name[16..], 16),
            ) else {
                continue;
            };
            // Sorted by name, so by timeline first: a newer timeline's file wins.
            segments.insert(log * per + seg, name);
        }
        Ok(Reader {
            dir: dir.to_path_buf(),
            segment_size,
            segments,
            open: None,
            magic: None,
        })
    }

    /// The page at `at` (a multiple of the page size), its header's length and its file's
    /// timeline, if its header is one PostgreSQL wrote there; `None` past the WAL written.
    fn page(&mut self, at: u64) -> Option<(Vec<u8>, u64, u32)> {
        let segno = at / self.segment_size;
        if self.open.as_ref().map(|(s, _, _)| *s) != Some(segno) {
            let name = self.segments.get(&segno)?;
            let timeline = u32::from_str_radix(&name[..8], 16).ok()?;
            let file = File::open(self.dir.join(name)).ok()?;
            self.open = Some((segno, file, timeline));
        }
        let (_, file, timeline) = self.open.as_ref()?;
        let timeline = *timeline;
        let mut page = vec![0u8; PAGE as usize];
        file.read_exact_at(&mut page, at % self.segment_size).ok()?;
        let magic = u16::from_le_bytes([page[0], page[1]]);
        let info = u16::from_le_bytes([page[2], page[3]]);
        let pageaddr = u64::from_le_bytes(page[8..16].try_into().ok()?);
        if pageaddr != at || *self.magic.get_or_insert(magic) != magic {
            return None;
        }
        let long = at % self.segment_size == 0;
        if long != (info & XLP_LONG_HEADER != 0) {
            return None;
        }
        Some((page, if long { 40 } else { 24 }, timeline))
    }

    /// The record at `pos` (aligned; at a page boundary it begins past the header), if it
    /// is whole: its length sane and every page it continues on announcing it.
    fn record(&mut self, pos: u64) -> Option<Record> {
        let mut pos = pos;
        let mut start = pos;
        let mut bytes: Vec<u8> = Vec::new();
        let mut total: Option<usize> = None;
        let mut timeline = 0;
        loop {
            let page_at = pos - pos % PAGE;
            let (page, header, page_timeline) = self.page(page_at)?;
            if pos == page_at {
                let info = u16::from_le_bytes([page[2], page[3]]);
                let rem_len = u32::from_le_bytes(page[16..20].try_into().ok()?) as usize;
                let continued = info & XLP_FIRST_IS_CONTRECORD != 0;
                if total.is_some() && info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0 {
                    // A recovery ended inside this record and wrote on over its missing
                    // part: as PostgreSQL does, read on from this page's first record.
                    (bytes, total) = (Vec::new(), None);
                }
                match total {
                    // A record begins here: the page must not continue another.
                    None if continued => return None,
                    None => start = pos + header,
                    Some(t) if !continued || rem_len != t - bytes.len() => return None,
                    Some(_) => {}
                }
                pos += header;
            }
            if bytes.is_empty() {
                timeline = page_timeline;
            }
            let want = total.unwrap_or(RECORD_HEADER) - bytes.len();
            let take = want.min((page_at + PAGE - pos) as usize);
            let at = (pos - page_at) as usize;
            bytes.extend_from_slice(&page[at..at + take]);
            pos += take as u64;
            if total.is_none() && bytes.len() >= 4 {
                // xl_tot_len is always on the record's first page (records are 8-aligned).
                let t = u32::from_le_bytes(bytes[..4].try_into().ok()?) as usize;
                if !(RECORD_HEADER..=MAX_RECORD).contains(&t) {
                    return None;
                }
                total = Some(t);
            }
            if total == Some(bytes.len()) {
                return Some(Record {
                    magic: self.magic.unwrap_or(0),
                    timeline,
                    start,
                    end: pos,
                    bytes,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT: u64 = 1 << 20;
    /// Segment 1 of timeline 1, at LSN 0/100000 with 1 MiB segments.
    const BASE: u64 = SEGMENT;

    /// Lays records of the given data lengths out as PostgreSQL would, from the start of
    /// a segment; returns two segments and each record's start and aligned end.
    fn layout(lengths: &[usize]) -> (Vec<u8>, Vec<(u64, u64)>) {
        layout_switching(lengths, None)
    }

    /// As [`layout`], record `switch` being a segment switch (the next one begins the
    /// next segment).
    fn layout_switching(lengths: &[usize], switch: Option<usize>) -> (Vec<u8>, Vec<(u64, u64)>) {
        let mut seg = vec![0u8; 2 * SEGMENT as usize];
        let mut pos = BASE;
        let mut prev = 0u64;
        let mut spans = Vec::new();
        let page_header = |seg: &mut Vec<u8>, at: u64, rem: usize| {
            let o = (at - BASE) as usize;
            let long = at % SEGMENT == 0;
            let info = if long { XLP_LONG_HEADER } else { 0 }
                | if rem > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 };
            seg[o..o + 2].copy_from_slice(&0xD110u16.to_le_bytes());
            seg[o + 2..o + 4].copy_from_slice(&info.to_le_bytes());
            seg[o + 4..o + 8].copy_from_slice(&1u32.to_le_bytes());
            seg[o + 8..o + 16].copy_from_slice(&at.to_le_bytes());
            seg[o + 16..o + 20].copy_from_slice(&(rem as u32).to_le_bytes());
            if long {
                seg[o + 24..o + 32].copy_from_slice(&7u64.to_le_bytes());
                seg[o + 32..o + 36].copy_from_slice(&(SEGMENT as u32).to_le_bytes());
                seg[o + 36..o + 40].copy_from_slice(&(PAGE as u32).to_le_bytes());
            }
            if long {
                40
            } else {
                24
            }
        };
        for (i, len) in lengths.iter().enumerate() {
            let rec = record_bytes(i, *len, prev, switch == Some(i));
            let total = rec.len();
            if pos % PAGE == 0 {
                pos += page_header(&mut seg, pos, 0);
            }
            let start = pos;
            let mut written = 0;
            while written < total {
                if pos % PAGE == 0 {
                    pos += page_header(&mut seg, pos, total - written);
                }
                let take = (total - written).min((PAGE - pos % PAGE) as usize);
                let o = (pos - BASE) as usize;
                seg[o..o + take].copy_from_slice(&rec[written..written + take]);
                written += take;
                pos += take as u64;
            }
            pos = if switch == Some(i) {
                pos.div_ceil(SEGMENT) * SEGMENT
            } else {
                maxalign(pos)
            };
            spans.push((start, pos));
            prev = start;
        }
        (seg, spans)
    }

    /// Record number `i` with `len` bytes of data after the one at `prev`.
    fn record_bytes(i: usize, len: usize, prev: u64, switch: bool) -> Vec<u8> {
        let total = RECORD_HEADER + len;
        let mut rec = vec![0u8; total];
        rec[..4].copy_from_slice(&(total as u32).to_le_bytes());
        rec[8..16].copy_from_slice(&prev.to_le_bytes());
        if switch {
            (rec[16], rec[17]) = (XLOG_SWITCH, RM_XLOG_ID);
        } else {
            rec[17] = 10;
        }
        for (j, b) in rec[RECORD_HEADER..].iter_mut().enumerate() {
            *b = (i * 31 + j * 7) as u8;
        }
        let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
        digest.update(&rec[RECORD_HEADER..]);
        digest.update(&rec[..CRC_AT]);
        let crc = digest.finalize() as u32;
        rec[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        rec
    }

    fn end_of(seg: &[u8]) -> Result<u64, String> {
        end_after(seg, None)
    }

    fn end_after(seg: &[u8], after: Option<u64>) -> Result<u64, String> {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = seg.split_at(SEGMENT as usize);
        std::fs::write(dir.path().join("000000010000000000000001"), one).unwrap();
        std::fs::write(dir.path().join("000000010000000000000002"), two).unwrap();
        wal_end(dir.path(), BASE + 40, after).map(|e| e.lsn)
    }

    /// Records small and large, some crossing pages, one ending right at a page end.
    fn lengths() -> Vec<usize> {
        let mut l = vec![30, 8000, 100, 20000, 5];
        // Fill to exactly the end of a page with the next record.
        let (_, spans) = layout(&l);
        let end = spans.last().unwrap().1;
        let to_page_end = (PAGE - end % PAGE) as usize;
        l.push(to_page_end - RECORD_HEADER);
        l.extend([64, 9000]);
        l
    }

    #[test]
    fn the_end_is_past_the_last_whole_record() {
        let (seg, spans) = layout(&lengths());
        assert!(
            spans.iter().any(|(_, e)| e % PAGE == 0),
            "a record ends a page"
        );
        assert_eq!(end_of(&seg).unwrap(), spans.last().unwrap().1);
    }

    #[test]
    fn the_search_may_start_at_a_record_the_server_flushed() {
        let (seg, spans) = layout(&lengths());
        let end = spans.last().unwrap().1;
        // At a record's start, at a page boundary a record ends on, and where no record
        // begins (then from the first record): the same end.
        let on_page_end = spans.iter().find(|(_, e)| e % PAGE == 0).unwrap().1;
        for after in [spans[4].0, on_page_end, spans[3].0 + 8, end + 4096] {
            assert_eq!(end_after(&seg, Some(after)), Ok(end), "after {after:X}");
        }
        // The first record damaged: an error all the same.
        let mut bad = seg.clone();
        bad[(spans[0].0 - BASE) as usize + 30] ^= 1;
        assert!(end_after(&bad, Some(spans[4].0)).is_err());
    }

    #[test]
    fn a_damaged_or_missing_record_ends_the_wal_before_it() {
        let (seg, spans) = layout(&lengths());
        // A flipped byte in record 3 (it spans pages): the end is record 2's.
        let mut bad = seg.clone();
        bad[(spans[3].0 - BASE) as usize + 30] ^= 1;
        assert_eq!(end_of(&bad).unwrap(), spans[2].1);
        // The last record's second page never written: the end is the one before.
        let mut cut = seg.clone();
        let last = spans.last().unwrap();
        let second_page = (last.1 - 1) / PAGE * PAGE;
        assert!(second_page > last.0, "the last record crosses a page");
        cut[(second_page - BASE) as usize..].fill(0);
        assert_eq!(end_of(&cut).unwrap(), spans[spans.len() - 2].1);
        // A record that points back at another record than the one before it (left from
        // another stream of WAL), with a CRC of its own that matches: the end is before it.
        let mut stale = seg.clone();
        let (s4, e4) = spans[4];
        assert_eq!(s4 / PAGE, (e4 - 1) / PAGE, "record 4 lies in one page");
        let rec = &mut stale[(s4 - BASE) as usize..(s4 - BASE) as usize + RECORD_HEADER + 5];
        rec[8..16].copy_from_slice(&spans[2].0.to_le_bytes());
        let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
        digest.update(&rec[RECORD_HEADER..]);
        digest.update(&rec[..CRC_AT]);
        let crc = digest.finalize() as u32;
        rec[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        assert!(crc_matches(rec));
        assert_eq!(end_of(&stale).unwrap(), spans[3].1);
    }

    #[test]
    fn after_a_segment_switch_the_wal_goes_on_in_the_next_segment() {
        let (seg, spans) = layout_switching(&[30, 20000, 0, 100, 9000], Some(2));
        assert_eq!(spans[3].0, BASE + SEGMENT + 40);
        assert_eq!(end_of(&seg).unwrap(), spans[4].1);
        // Nothing written after the switch: the WAL ends where the next segment begins.
        let (seg, spans) = layout_switching(&[30, 0], Some(1));
        assert_eq!(end_of(&seg).unwrap(), spans[1].1);
        assert_eq!(spans[1].1, BASE + SEGMENT);
    }

    #[test]
    fn a_record_overwritten_by_a_recovery_is_skipped_as_postgresql_does() {
        // Record 1 lost its second page in a crash; recovery wrote on from that page,
        // marked so, with a record that points back at record 0.
        let (mut seg, spans) = layout(&[30, 9000]);
        let page = spans[1].0 / PAGE * PAGE + PAGE;
        let o = (page - BASE) as usize;
        seg[o..].fill(0);
        seg[o..o + 2].copy_from_slice(&0xD110u16.to_le_bytes());
        seg[o + 2..o + 4].copy_from_slice(&XLP_FIRST_IS_OVERWRITE_CONTRECORD.to_le_bytes());
        seg[o + 4..o + 8].copy_from_slice(&1u32.to_le_bytes());
        seg[o + 8..o + 16].copy_from_slice(&page.to_le_bytes());
        let rec = record_bytes(7, 100, spans[0].0, false);
        seg[o + 24..o + 24 + rec.len()].copy_from_slice(&rec);
        assert_eq!(
            end_of(&seg).unwrap(),
            maxalign(page + 24 + rec.len() as u64)
        );
        // Without the mark, the WAL ends after record 0.
        seg[o + 2] = 0;
        assert_eq!(end_of(&seg).unwrap(), spans[0].1);
    }

    #[test]
    fn an_unreadable_checkpoint_record_is_an_error() {
        let (mut seg, _) = layout(&[30, 40]);
        seg[40 + CRC_AT] ^= 0xff;
        let e = end_of(&seg).unwrap_err();
        assert!(
            e.contains("does not hold a whole WAL record at 0/100028"),
            "{e}"
        );
    }
}
