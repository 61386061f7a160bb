//! Names in a repo: pgs (`main`, `feature-1`) and snapshots (`PG@TAG`, or a bare `TAG` in
//! a storage). One rule for pg names and tags alike, because both end up in directory
//! names, URLs, replication slot names and terminal output: 1 to 63 lowercase letters,
//! digits, `_` or `-`, not starting with `-`. `NAME@HEAD{n}` is zenith's own (the state a
//! checkout kept) and cannot be chosen.

use crate::models::{OpError, OpResult};

/// Whether `name` follows the rule for pg names and tags.
fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !name.starts_with('-')
}

const RULE: &str = "use 1 to 63 lowercase letters, digits, '_' or '-'";

/// Checks a pg name.
pub fn check_name(name: &str) -> OpResult<()> {
    if !valid(name) {
        return Err(OpError::BadRequest(format!(
            "{name:?} is not a pg name: {RULE}"
        )));
    }
    Ok(())
}

/// Checks a snapshot name chosen by a user: `PG@TAG` or a bare `TAG`, each part by the
/// rule of pg names (`NAME@HEAD{n}` is kept for checkouts).
pub fn check_tag(name: &str) -> OpResult<()> {
    let (pg, tag) = match name.split_once('@') {
        Some((pg, tag)) => (Some(pg), tag),
        None => (None, name),
    };
    if name.contains("@HEAD") {
        return Err(OpError::BadRequest(format!(
            "{name:?}: names with @HEAD are kept for checkouts; choose another"
        )));
    }
    if !pg.is_none_or(valid) || !valid(tag) {
        return Err(OpError::BadRequest(format!(
            "{name:?} is not a snapshot name: PG@TAG or TAG, each part {RULE}"
        )));
    }
    Ok(())
}

/// `PG@TAG` (or `PG`) into the pg and the snapshot name; `None`: the main pg.
pub fn split_reference(text: Option<&str>) -> (String, Option<String>) {
    match text {
        None => ("main".into(), None),
        Some(t) => match t.split_once('@') {
            Some((pg, _)) => (pg.to_string(), Some(t.to_string())),
            None => (t.to_string(), None),
        },
    }
}

/// The name a checkout keeps pg `pg`'s state under.
pub fn head_name(pg: &str, n: u64) -> String {
    format!("{pg}@HEAD{{{n}}}")
}

/// The number of a `PG@HEAD{n}` name of pg `pg`.
pub fn head_number(pg: &str, name: &str) -> Option<u64> {
    name.strip_prefix(pg)?
        .strip_prefix("@HEAD{")?
        .strip_suffix('}')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_pg_names_and_tags() {
        for ok in ["main", "a", "feature-1", "x_y", &"a".repeat(63)] {
            check_name(ok).unwrap();
            check_tag(ok).unwrap();
            check_tag(&format!("main@{ok}")).unwrap();
        }
        for bad in [
            "",
            "-x",
            "A",
            "a/b",
            "../x",
            "a b",
            "a\nb",
            "\u{1b}[31mred",
            &"a".repeat(64),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
            assert!(check_tag(bad).is_err(), "{bad:?}");
            assert!(check_tag(&format!("main@{bad}")).is_err(), "{bad:?}");
            assert!(check_tag(&format!("{bad}@t")).is_err(), "{bad:?}");
        }
        assert!(check_tag("main@HEAD{0}").is_err());
        assert!(check_tag("main@").is_err());
        assert!(check_tag("main@a@b").is_err());
        // The message shows a hostile name escaped, on one line.
        let e = check_tag("a\n\u{1b}[31m").unwrap_err().to_string();
        assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e}");
    }

    #[test]
    fn head_names_round_trip() {
        assert_eq!(head_name("main", 3), "main@HEAD{3}");
        assert_eq!(head_number("main", "main@HEAD{3}"), Some(3));
        assert_eq!(head_number("main", "mainx@HEAD{3}"), None);
        assert_eq!(head_number("main", "main@HEAD{x}"), None);
    }
}
