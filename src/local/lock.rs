//! zenith-local's lock on its repo: one zenith-local per repo, held with `flock` for the
//! whole life of the process, so the kernel releases it however the process ends.

use std::os::fd::AsRawFd;

use crate::models::{OpError, OpResult};
use crate::pageserver::Repo;

/// An exclusive, advisory lock on the repo, held while zenith-local runs; the kernel
/// releases it when the process dies, however it dies.
pub struct RepoLock {
    _file: std::fs::File,
}

impl RepoLock {
    /// Takes the lock, or says which zenith-local holds it.
    pub fn take(repo: &Repo) -> OpResult<RepoLock> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(repo.lock_path())
            .map_err(|e| OpError::Failed(format!("{}: {e}", repo.lock_path().display())))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(repo.pid_path()).unwrap_or_default();
            return Err(OpError::Failed(format!(
                "zenith-local already runs on {} (pid {}); `zenith status` shows it, `zenith stop` stops it",
                repo.root.display(),
                pid.trim()
            )));
        }
        Ok(RepoLock { _file: file })
    }

    /// Whether some process holds the lock now.
    pub fn held(repo: &Repo) -> bool {
        let Ok(file) = std::fs::OpenOptions::new()
            .write(true)
            .open(repo.lock_path())
        else {
            return false;
        };
        // SAFETY: as above; a successful probe is released at once.
        let got = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if got {
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
        }
        !got
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_lock_per_repo() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        assert!(!RepoLock::held(&repo));
        let lock = RepoLock::take(&repo).unwrap();
        assert!(RepoLock::held(&repo));
        let e = RepoLock::take(&repo).err().unwrap().to_string();
        assert!(e.contains("already runs"), "{e}");
        drop(lock);
        assert!(!RepoLock::held(&repo));
    }
}
