//! Wall-clock times as zenith reads and writes them: RFC 3339 in UTC, and the forms a
//! user types for a point in time (`2026-12-03 10:00:00`, with a fraction and a zone or
//! without: UTC).

/// Seconds since the epoch → (year, month, day, hour, minute, second), UTC.
pub fn civil(secs: u64) -> (i64, i64, i64, u64, u64, u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil`]'s date part).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Microseconds since the epoch of a time as users and PostgreSQL write it:
/// `YYYY-MM-DD[T| ]HH:MM[:SS[.fraction]]` then `Z`, `+HH`, `+HH:MM`, `-HHMM` or nothing
/// (UTC).
pub fn parse_time(text: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "{text:?} is not a time zenith reads: use e.g. 2026-12-03 10:00:00+00 or 2026-12-03T10:00:00.25Z (no zone: UTC)"
        )
    };
    let t = text.trim();
    let num = |s: &str| -> Result<i64, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    if t.len() < 16 || !t.is_char_boundary(10) || !t.is_char_boundary(11) {
        return Err(bad());
    }
    let (date, rest) = t.split_at(10);
    let mut parts = date.split('-');
    let (y, mo, d) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d), None) if y.len() == 4 => (num(y)?, num(m)?, num(d)?),
        _ => return Err(bad()),
    };
    let rest = rest.strip_prefix(['T', 't', ' ']).ok_or_else(bad)?;
    // The zone: from the first '+', '-' or 'Z' after the clock.
    let zone_at = rest.find(['+', '-', 'Z', 'z']).unwrap_or(rest.len());
    let (clock, zone) = rest.split_at(zone_at);
    let clock = clock.trim_end();
    let mut c = clock.split(':');
    let h = num(c.next().ok_or_else(bad)?)?;
    let mi = num(c.next().ok_or_else(bad)?)?;
    let (s, micros) = match c.next() {
        Some(sec) => match sec.split_once('.') {
            Some((s, frac)) => {
                if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                let padded = format!("{frac:0<6}");
                (num(s)?, padded[..6].parse::<i64>().map_err(|_| bad())?)
            }
            None => (num(sec)?, 0),
        },
        None => (0, 0),
    };
    if c.next().is_some()
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&d)
        || h > 23
        || mi > 59
        || s > 60
    {
        return Err(bad());
    }
    let offset_secs = match zone {
        "" | "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
            let (oh, om) = match digits.len() {
                2 => (num(&digits)?, 0),
                4 => (num(&digits[..2])?, num(&digits[2..])?),
                _ => return Err(bad()),
            };
            if oh > 15 || om > 59 {
                return Err(bad());
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    Ok(secs * 1_000_000 + micros)
}

/// A time as PostgreSQL reads it, in UTC with microseconds: `2026-12-03 10:00:00.250000+00`.
pub fn format_pg(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (y, mo, d, h, mi, s) = civil(secs.max(0) as u64);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{frac:06}+00")
}

/// Microseconds since the epoch, now.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_the_forms_people_write() {
        let base = parse_time("2026-12-03T10:00:00Z").unwrap();
        assert_eq!(base, 1_796_292_000 * 1_000_000);
        assert_eq!(parse_time("2026-12-03 10:00:00").unwrap(), base);
        assert_eq!(parse_time("2026-12-03 10:00:00+00").unwrap(), base);
        assert_eq!(parse_time("2026-12-03 11:00:00+01:00").unwrap(), base);
        assert_eq!(parse_time("2026-12-03 05:30:00-0430").unwrap(), base);
        assert_eq!(parse_time("2026-12-03 10:00").unwrap(), base);
        assert_eq!(
            parse_time("2026-12-03 10:00:00.25Z").unwrap(),
            base + 250_000
        );
        assert_eq!(
            parse_time("2026-12-03 10:00:00.123456789+00").unwrap(),
            base + 123_456
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-03 10:00:00",
            "2026-12-03",
            "2026-12-03 25:00:00",
            "2026-12-03 10:00:00 +5",
            "2026-12-03 10:00:00.Z",
            "12/03/2026 10:00",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(format_pg(base + 250_000), "2026-12-03 10:00:00.250000+00");
        assert_eq!(parse_time(&format_pg(base + 7)).unwrap(), base + 7);
    }
}
