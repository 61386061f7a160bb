//! PostgreSQL's write-ahead log as zenith names it: positions (LSNs) as PostgreSQL prints
//! them, the names of WAL files (segments, partial segments, timeline and backup history
//! files) and what a segment's first page says of its cluster.

/// Formats an LSN the way PostgreSQL prints it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// An LSN as PostgreSQL prints it (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
        return None;
    }
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// WAL file names from `first` to `last` inclusive (same timeline).
pub fn segment_range(first: &str, last: &str, segment_size: u64) -> Option<Vec<String>> {
    let per = (segment_size > 0).then(|| 0x1_0000_0000 / segment_size)?;
    let parse = |name: &str| -> Option<(u32, u64)> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..], 16).ok()?;
        Some((tli, log * per + seg))
    };
    let (tli, from) = parse(first)?;
    let (tli2, to) = parse(last)?;
    if tli != tli2 || to < from || to - from > 1_000_000 {
        return None;
    }
    Some(
        (from..=to)
            .map(|n| format!("{tli:08X}{:08X}{:08X}", n / per, n % per))
            .collect(),
    )
}

/// PostgreSQL's default WAL segment size.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 << 20;

/// A file PostgreSQL hands its `archive_command` or asks its `restore_command` for,
/// checked by name: nothing else (no path, nothing zenith did not expect) passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFile {
    /// A segment: timeline and segment number (`000000010000000A000000FF`).
    Segment { tli: u32, segno: u64 },
    /// The last, partial segment of a timeline a promotion ended (`<segment>.partial`).
    Partial { tli: u32, segno: u64 },
    /// A timeline history file (`00000002.history`).
    History { tli: u32 },
    /// A backup history file (`<segment>.<offset>.backup`).
    Backup { tli: u32, segno: u64, offset: u32 },
}

/// Segments per 4 GiB "log" of a segment size (the middle 8 hex digits of a name).
fn per_log(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

fn hex32(text: &str) -> Option<u32> {
    (text.len() == 8 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(text, 16).ok())
        .flatten()
}

/// Timeline and segment number of a 24-digit segment name.
fn parse_segment(name: &str, segment_size: u64) -> Option<(u32, u64)> {
    if name.len() != 24
        || !name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
    {
        return None;
    }
    let tli = hex32(&name[..8])?;
    let log = hex32(&name[8..16])? as u64;
    let seg = hex32(&name[16..])? as u64;
    let per = per_log(segment_size);
    (seg < per).then_some((tli, log * per + seg))
}

/// The name of segment `segno` of timeline `tli`.
pub fn segment_name(tli: u32, segno: u64, segment_size: u64) -> String {
    let per = per_log(segment_size);
    format!("{tli:08X}{:08X}{:08X}", segno / per, segno % per)
}

/// The segment holding `lsn`.
pub fn segno_of(lsn: u64, segment_size: u64) -> u64 {
    lsn / segment_size
}

impl WalFile {
    /// Parses a WAL file name as PostgreSQL writes it; `None` for anything else.
    pub fn parse(name: &str, segment_size: u64) -> Option<WalFile> {
        if let Some(tli) = name.strip_suffix(".history") {
            return hex32(tli)
                .filter(|t| *t >= 1 && tli.bytes().all(|b| !b.is_ascii_lowercase()))
                .map(|tli| WalFile::History { tli });
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            let (tli, segno) = parse_segment(seg, segment_size)?;
            return Some(WalFile::Partial { tli, segno });
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, offset) = rest.split_once('.')?;
            let (tli, segno) = parse_segment(seg, segment_size)?;
            let offset = hex32(offset)?;
            return Some(WalFile::Backup { tli, segno, offset });
        }
        let (tli, segno) = parse_segment(name, segment_size)?;
        Some(WalFile::Segment { tli, segno })
    }

    /// The file's name.
    pub fn name(&self, segment_size: u64) -> String {
        match *self {
            WalFile::Segment { tli, segno } => segment_name(tli, segno, segment_size),
            WalFile::Partial { tli, segno } => {
                format!("{}.partial", segment_name(tli, segno, segment_size))
            }
            WalFile::History { tli } => format!("{tli:08X}.history"),
            WalFile::Backup { tli, segno, offset } => {
                format!(
                    "{}.{offset:08X}.backup",
                    segment_name(tli, segno, segment_size)
                )
            }
        }
    }

    /// The timeline the file belongs to.
    pub fn tli(&self) -> u32 {
        match *self {
            WalFile::Segment { tli, .. }
            | WalFile::Partial { tli, .. }
            | WalFile::History { tli }
            | WalFile::Backup { tli, .. } => tli,
        }
    }
}

/// The system identifier in the long header of a WAL segment's first page, and the
/// segment size it was written with; `None` when `bytes` does not start like a segment.
pub fn segment_header(bytes: &[u8]) -> Option<(u64, u64)> {
    // XLogLongPageHeaderData: magic u16, info u16, tli u32, pageaddr u64, rem_len u32,
    // 4 bytes of padding, sysid u64, seg_size u32, blcksz u32.
    const XLP_LONG_HEADER: u16 = 0x0002;
    if bytes.len() < 40 {
        return None;
    }
    let info = u16::from_le_bytes([bytes[2], bytes[3]]);
    if info & XLP_LONG_HEADER == 0 {
        return None;
    }
    let sysid = u64::from_le_bytes(bytes[24..32].try_into().ok()?);
    let seg_size = u32::from_le_bytes(bytes[32..36].try_into().ok()?) as u64;
    Some((sysid, seg_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_print_like_postgresql() {
        assert_eq!(format_lsn(0x0000_0001_0000_0028), "1/28");
        assert_eq!(format_lsn(0x16B_3748), "0/16B3748");
    }

    #[test]
    fn lsns_parse_like_postgresql_prints_them() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        for bad in [
            "",
            "1",
            "/1",
            "1/",
            "x/1",
            "1/2/3",
            "123456789/0",
            "1'; drop/1",
        ] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    #[test]
    fn wal_segments_between_two_positions() {
        let size = 16 << 20;
        assert_eq!(
            segment_range("0000000100000000000000FE", "000000010000000100000001", size).unwrap(),
            vec![
                "0000000100000000000000FE",
                "0000000100000000000000FF",
                "000000010000000100000000",
                "000000010000000100000001"
            ]
        );
        assert!(
            segment_range("000000010000000000000002", "000000020000000000000003", size).is_none()
        );
        assert!(segment_range("../etc", "000000010000000000000003", size).is_none());
    }

    #[test]
    fn wal_file_names_parse_and_print_back() {
        let size = DEFAULT_SEGMENT_SIZE;
        for name in [
            "000000010000000A000000FF",
            "00000002000000000000001F.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            let f = WalFile::parse(name, size).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(f.name(size), name);
        }
        assert_eq!(
            WalFile::parse("000000010000000A000000FF", size),
            Some(WalFile::Segment {
                tli: 1,
                segno: 0xA * 256 + 0xFF
            })
        );
        for bad in [
            "",
            "RECOVERYXLOG",
            "00000001000000000000001",
            "000000010000000000000100",
            "0000000100000000000000ff",
            "../00000002.history",
            "00000000.history",
            "00000002.history.zst",
            "000000010000000000000002.backup",
        ] {
            assert_eq!(WalFile::parse(bad, size), None, "{bad}");
        }
        assert_eq!(segment_name(1, 0x1FF, size), "0000000100000001000000FF");
        assert_eq!(segno_of(0x1_0000_0000, size), 256);
    }
}
