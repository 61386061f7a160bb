//! Relative `/`-separated paths, as storage keys and snapshot entries use them. One check
//! for both, because both are how untrusted names reach the file system.

/// Checks `path`: not empty, at most `max_len` bytes, not absolute, no trailing `/`, no NUL
/// or backslash, no empty, `.` or `..` segment. The error says which rule was broken.
pub fn check(path: &str, max_len: usize) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.len() > max_len {
        return Err("the path is too long");
    }
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("the path contains a NUL or a backslash");
    }
    if path.split('/').any(|segment| segment.is_empty()) {
        return Err("the path has an empty segment");
    }
    if path
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err("the path has a '.' or '..' segment");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn accepts_relative_paths() {
        for ok in [
            "a",
            "base/1/1259",
            ".hidden",
            "pg_wal/000000010000000000000001",
        ] {
            check(ok, 4096).unwrap();
        }
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "base/../../x",
            "a//b",
            "a/./b",
            "a\\b",
            "a\0b",
            "base/",
        ] {
            assert!(check(bad, 4096).is_err(), "{bad:?}");
        }
        assert_eq!(check("abcd", 3), Err("the path is too long"));
    }
}
