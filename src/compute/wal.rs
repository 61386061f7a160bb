//! PostgreSQL's write-ahead log as zenith names it: positions (LSNs) as PostgreSQL prints
//! them, and the names of the WAL segment files between two positions.

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
}
