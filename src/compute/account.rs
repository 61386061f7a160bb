//! The account PostgreSQL runs as. PostgreSQL refuses to run as root, so when zenith runs
//! as root (as CI does) it hands data directories to an unprivileged account: `postgres`,
//! or the one named by `ZENITH_PG_USER`.

use std::ffi::CString;
use std::path::Path;

/// An unprivileged account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Looks up an account by name.
pub fn lookup(name: &str) -> Option<Account> {
    let cname = CString::new(name).ok()?;
    // getpwnam's result points into static storage; copy out before anything else runs.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Some(Account {
        name: name.to_string(),
        uid,
        gid,
    })
}

/// The account to run PostgreSQL as when zenith is root.
pub fn postgres_account() -> Result<Account, String> {
    let name = std::env::var("ZENITH_PG_USER")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres".into());
    lookup(&name).ok_or_else(|| {
        format!("zenith runs as root, and PostgreSQL refuses to; there is no account {name:?} to run it as: create it (useradd --system {name}) or set ZENITH_PG_USER")
    })
}

/// When running as root, gives `dir` and everything below it to the PostgreSQL account, so
/// that PostgreSQL can start on it. Does nothing otherwise.
pub fn hand_to_postgres_user(dir: &Path) -> Result<(), String> {
    if !is_root() {
        return Ok(());
    }
    let account = postgres_account()?;
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        std::os::unix::fs::lchown(entry.path(), Some(account.uid), Some(account.gid)).map_err(
            |e| {
                format!(
                    "{}: cannot give it to {}: {e}",
                    entry.path().display(),
                    account.name
                )
            },
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nonsense_does_not() {
        assert_eq!(lookup("root").map(|a| a.uid), Some(0));
        assert!(lookup("no-such-account-zenith").is_none());
        assert!(lookup("bad\0name").is_none());
    }
}
