//! Paths inside a snapshot are untrusted: a pulled or imported snapshot must never write
//! outside its target directory. Every path is checked here before it touches the disk.

/// Checks a snapshot-relative path: `/`-separated, no empty, `.` or `..` segments, not
/// absolute, no NUL or backslash, at most 4096 bytes.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.len() > 4096 {
        return Err("the path is longer than 4096 bytes");
    }
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    if path.contains('\0') || path.contains('\\') {
        return Err("the path contains a NUL or a backslash");
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err("the path has an empty segment"),
            "." | ".." => return Err("the path has a '.' or '..' segment"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_data_directory_paths() {
        for ok in ["PG_VERSION", "base/1/1259", "pg_wal/000000010000000000000001", "global/pg_control", ".hidden"] {
            check_relative_path(ok).unwrap();
        }
    }

    #[test]
    fn refuses_escapes() {
        for bad in ["", "/etc/passwd", "../x", "base/../../x", "a//b", "a/./b", "a\\b", "a\0b", "base/"] {
            assert!(check_relative_path(bad).is_err(), "{bad:?}");
        }
    }
}
