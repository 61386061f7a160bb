//! Temporary directories that remove themselves: a [`TempDir`] is deleted with everything
//! in it when dropped, on success and on every error path alike. Its name carries the pid
//! of the process that made it, so the leftovers of a process that was killed (and never
//! dropped anything) are recognised and removed by the next run: [`sweep`].
//!
//! Temporary files beside their final name ([`temp_name`]: a storage's objects, a data
//! directory about to be renamed into place) carry the machine's name and the writer's pid
//! the same way, so [`abandoned`] tells whether the writer is gone.

use std::path::{Path, PathBuf};

/// A private (0700) directory, removed with its content when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new directory `<parent>/<prefix>-<pid>-<random>`; `parent` is created if missing.
    pub fn new_in(parent: &Path, prefix: &str) -> std::io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::create_dir_all(parent)?;
        let path = parent.join(name(prefix));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(TempDir { path })
    }

    /// A new directory in the system's temporary directory.
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// A guard for `path`, which need not exist yet: whatever is created there is removed
    /// on drop, unless [`TempDir::keep`] is called.
    pub fn at(path: PathBuf) -> TempDir {
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (it was renamed away, or is wanted after all).
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn name(prefix: &str) -> String {
    format!("{prefix}-{}-{:016x}", std::process::id(), fastrand::u64(..))
}

/// The pid in the name of a temporary entry of `prefix` (`<prefix>-<pid>-<random>`).
fn owner(file_name: &str, prefix: &str) -> Option<i32> {
    let rest = file_name.strip_prefix(prefix)?.strip_prefix('-')?;
    let (pid, random) = rest.split_once('-')?;
    (random.len() == 16 && random.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| pid.parse().ok())
        .flatten()
}

/// Removes the entries of `parent` named by [`TempDir`] with `prefix` whose process no
/// longer runs (on this machine): what killed runs left behind. Returns how many went.
pub fn sweep(parent: &Path, prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| owner(n, prefix)) else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            tracing::info!("removed {}, left by a run that was killed", path.display());
            removed += 1;
        }
    }
    removed
}

/// The marker in the names of temporary files beside their final name.
pub const TEMP_MARKER: &str = ".zenith-tmp-";

/// The PID namespace this process runs in (`/proc/self/ns/pid`): two containers with
/// one host name and boot can still not see each other's processes.
pub fn pid_namespace() -> Option<String> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let text = link.to_string_lossy();
    let inode = text.strip_prefix("pid:[")?.strip_suffix(']')?;
    inode
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| inode.to_string())
}

/// This machine's name and PID namespace as temporary names carry them: letters, digits
/// and `-` only.
fn host_tag() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let tag: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(32)
        .collect();
    let tag = if tag.is_empty() { "host".into() } else { tag };
    match pid_namespace() {
        Some(ns) => format!("{tag}-{ns}"),
        None => tag,
    }
}

/// A temporary name beside `name`: `.<name>.zenith-tmp-<host>.<pid>.<random>`.
pub fn temp_name(name: &str) -> String {
    format!(
        ".{name}{TEMP_MARKER}{}.{}.{:016x}",
        host_tag(),
        std::process::id(),
        fastrand::u64(..)
    )
}

/// Temporary files older than this are removed whoever wrote them (a writer on another
/// machine sharing the directory, or a name without a pid).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Whether the temporary file `name` (modified `modified`) was left by a writer that is
/// gone: one of this machine whose process no longer runs, or any older than a day.
pub fn abandoned(name: &str, modified: Option<std::time::SystemTime>) -> bool {
    let old = modified
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= ABANDONED_AFTER);
    let Some((_, suffix)) = name.split_once(TEMP_MARKER) else {
        return false;
    };
    let mut parts = suffix.split('.');
    match (
        parts.next(),
        parts.next().and_then(|p| p.parse::<i32>().ok()),
    ) {
        (Some(h), Some(pid)) if h == host_tag() => {
            (pid != std::process::id() as i32 && !pid_alive(pid)) || old
        }
        _ => old,
    }
}

/// Removes the temporary siblings of `path` ([`temp_name`]) whose writers are gone.
pub fn sweep_siblings(path: &Path) {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}{TEMP_MARKER}", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    }) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with(&prefix) {
            continue;
        }
        let modified = entry.metadata().ok().and_then(|m| m.modified().ok());
        if abandoned(&name, modified) {
            let p = entry.path();
            let gone = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            if gone.is_ok() {
                tracing::info!("removed {}, left by a run that was killed", p.display());
            }
        }
    }
}

/// An exclusive lock on the file at `path` (created if missing), held until the returned
/// file is dropped; `None` when another process holds it.
pub fn try_lock(path: &Path) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    // SAFETY: flock on a descriptor this function owns.
    (unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(file)
}

/// Whether process `pid` exists on this machine.
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_when_dropped_kept_when_asked() {
        let parent = tempfile::tempdir().unwrap();
        let t = TempDir::new_in(parent.path(), "x").unwrap();
        std::fs::write(t.path().join("f"), b"1").unwrap();
        let path = t.path().to_path_buf();
        drop(t);
        assert!(!path.exists());
        let kept = TempDir::new_in(parent.path(), "x").unwrap().keep();
        assert!(kept.exists());
    }

    #[test]
    fn sweep_removes_only_what_dead_processes_left() {
        let parent = tempfile::tempdir().unwrap();
        let mine = TempDir::new_in(parent.path(), "export").unwrap();
        // A pid that cannot exist (above the kernel's pid_max).
        let dead = parent.path().join("export-2147483646-00000000000000ff");
        std::fs::create_dir(&dead).unwrap();
        let other = parent.path().join("import-2147483646-00000000000000ff");
        std::fs::create_dir(&other).unwrap();
        assert_eq!(sweep(parent.path(), "export"), 1);
        assert!(!dead.exists());
        assert!(mine.path().exists());
        assert!(other.exists());
    }
}
