//! Paths inside a snapshot are untrusted: a pulled or imported snapshot must never write
//! outside its target directory. Every path is checked here before it touches the disk.

/// Checks a snapshot-relative path (see [`crate::util::relpath::check`]); at most 4096 bytes.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    crate::util::relpath::check(path, 4096)
}
