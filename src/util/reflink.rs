//! Files that share their extents (reflinks): on XFS with `reflink=1`, btrfs and other
//! filesystems that support `FICLONE`, a copy of a file costs a few metadata writes
//! whatever its size, and a block is duplicated only when one of the copies changes it.
//!
//! Here: whether a directory's filesystem can do it (and which filesystem it is, to say
//! why not), cloning one file, and how much of a file shares its extents with other files
//! (`FIEMAP`'s shared flag), for space accounting. Nothing here knows about snapshots.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_IOC_FIEMAP` from `linux/fs.h`: `_IOWR('f', 11, struct fiemap)`, whose fixed part
/// is 32 bytes (encoded the way this architecture encodes ioctls).
const FS_IOC_FIEMAP: libc::Ioctl = libc::_IOWR::<[u8; 32]>(b'f' as u32, 11);
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Extents asked for per `FIEMAP` call.
const EXTENTS_PER_CALL: usize = 256;

/// Makes `to` (which must not exist) a clone of `from`: same content, shared extents,
/// permission bits `mode`. Both must be on one filesystem that supports `FICLONE`.
pub fn clone_file(from: &Path, to: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let source = File::open(from)?;
    let target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(to)?;
    // SAFETY: both descriptors are open for the duration of the call; FICLONE takes the
    // source descriptor as its integer argument and touches no user memory.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        drop(target);
        let _ = std::fs::remove_file(to);
        return Err(err);
    }
    Ok(())
}

/// Starts writing back the dirty pages of every file under `dir`, without waiting: a
/// clone first writes its source's dirty pages (FICLONE flushes them), so starting early
/// lets that work overlap what comes before the clone.
pub fn start_writeback(dir: &Path) {
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        if let Ok(file) = File::open(entry.path()) {
            // SAFETY: a valid open descriptor; the call only starts I/O on its pages.
            unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
    }
}

/// The name of the filesystem `dir` is on, for messages.
pub fn filesystem_name(dir: &Path) -> String {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return "unknown".into();
    }
    // f_type's width and sign differ between architectures; the magic numbers are 32-bit.
    match st.f_type as u32 {
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0xEF53 => "ext4",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x2FC1_2FC1 => "zfs",
        0x6573_5546 => "fuse",
        0xF2F5_2010 => "f2fs",
        _ => "unknown",
    }
    .into()
}

/// Whether files in `dir` can be cloned: `Ok` when a probe file cloned, else why not
/// (naming the filesystem). The probe files are removed.
pub fn probe(dir: &Path) -> Result<(), String> {
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let from = dir.join(format!(".reflink-probe-{nonce}"));
    let to = dir.join(format!(".reflink-probe-{nonce}.clone"));
    let result = std::fs::write(&from, [0u8; 4096])
        .and_then(|()| clone_file(&from, &to, 0o600))
        .map_err(|e| {
            let fs = filesystem_name(dir);
            match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
                    format!("{} is on {fs}, which cannot share extents between files (XFS with reflink=1 and btrfs can)", dir.display())
                }
                Some(libc::EXDEV) => format!("{}: not one filesystem", dir.display()),
                _ => format!("{} ({fs}): {e}", dir.display()),
            }
        });
    let _ = std::fs::remove_file(&from);
    let _ = std::fs::remove_file(&to);
    result
}

/// How a file's allocated bytes divide: shared with another file, or its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub shared: u64,
    pub owned: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Usage) {
        self.shared += other.shared;
        self.owned += other.owned;
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// One extent of a file, as `FIEMAP` maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    pub shared: bool,
    /// Its physical place is not known (delayed allocation, inline or encoded data).
    pub unknown: bool,
}

/// Flags under which an extent's physical address says nothing about its content.
const FIEMAP_EXTENT_UNKNOWN: u32 = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x400 | 0x800;

/// The extents of `file`; `None` where the filesystem does not map extents.
pub fn extents(file: &File) -> std::io::Result<Option<Vec<Extent>>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    loop {
        let mut map = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            // No FIEMAP_FLAG_SYNC: flushing a running server's files to count them would
            // cost writes; extents not allocated yet are reported (delalloc) as unknown.
            flags: 0,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: `map` is a properly laid out `struct fiemap` with room for
        // `extent_count` extents, owned by us for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => Ok(None),
                _ => Err(err),
            };
        }
        let mapped = (map.mapped_extents as usize).min(EXTENTS_PER_CALL);
        if mapped == 0 {
            return Ok(Some(out));
        }
        let mut last = false;
        let from = start;
        for e in &map.extents[..mapped] {
            out.push(Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                shared: e.flags & FIEMAP_EXTENT_SHARED != 0,
                unknown: e.flags & FIEMAP_EXTENT_UNKNOWN != 0,
            });
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            start = e.logical + e.length;
        }
        // A filesystem that maps nothing further (or repeats itself) ends the map.
        if last || start <= from {
            return Ok(Some(out));
        }
    }
}

/// The shared and owned bytes of the file at `path` (its extents as the filesystem maps
/// them; a filesystem without `FIEMAP` reports the whole file as owned).
pub fn usage(path: &Path) -> std::io::Result<Usage> {
    let file = File::open(path)?;
    let Some(map) = extents(&file)? else {
        return Ok(Usage {
            shared: 0,
            owned: file.metadata()?.len(),
        });
    };
    let mut out = Usage::default();
    for e in map {
        if e.shared {
            out.shared += e.length;
        } else {
            out.owned += e.length;
        }
    }
    Ok(out)
}

/// Where the bytes `[offset, offset + len)` of a file lie on disk, when one known extent
/// holds them all.
pub fn physical(map: &[Extent], offset: u64, len: u64) -> Option<u64> {
    let i = map.partition_point(|e| e.logical + e.length <= offset);
    let e = map.get(i)?;
    (!e.unknown && e.logical <= offset && offset + len <= e.logical + e.length)
        .then(|| e.physical + (offset - e.logical))
}

/// Which `block`-sized blocks differ between two files (their numbers), reading only
/// blocks that do not share one place on disk: clones of one original that neither
/// changed are equal without a read. A block beyond one file's end differs.
pub fn differing_blocks(a: &Path, b: &Path, block: u64) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    let (sa, sb) = (fa.metadata()?.len(), fb.metadata()?.len());
    let (ma, mb) = (
        extents(&fa)?.unwrap_or_default(),
        extents(&fb)?.unwrap_or_default(),
    );
    let (mut xa, mut xb) = (vec![0u8; block as usize], vec![0u8; block as usize]);
    let mut differing = Vec::new();
    for i in 0..sa.max(sb).div_ceil(block) {
        let offset = i * block;
        let (la, lb) = (
            sa.saturating_sub(offset).min(block),
            sb.saturating_sub(offset).min(block),
        );
        if la != lb {
            differing.push(i);
            continue;
        }
        let here = physical(&ma, offset, la);
        if here.is_some() && here == physical(&mb, offset, la) {
            continue;
        }
        fa.read_exact_at(&mut xa[..la as usize], offset)?;
        fb.read_exact_at(&mut xb[..la as usize], offset)?;
        if xa[..la as usize] != xb[..la as usize] {
            differing.push(i);
        }
    }
    Ok(differing)
}

/// [`usage`] summed over every file under `dir`.
pub fn tree_usage(dir: &Path) -> std::io::Result<Usage> {
    let mut total = Usage::default();
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|e| {
            e.into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk"))
        })?;
        if entry.file_type().is_file() {
            match usage(entry.path()) {
                Ok(u) => total += u,
                // Removed meanwhile (a running server's file): nothing to count.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_filesystem_and_probes_without_leaving_files() {
        let dir = tempfile::tempdir().unwrap();
        // Whatever the answer, the probe leaves nothing behind, and a refusal names the
        // filesystem.
        if let Err(why) = probe(dir.path()) {
            assert!(why.contains(&filesystem_name(dir.path())), "{why}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn blocks_are_compared_where_they_do_not_share_a_place() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut bytes = vec![1u8; 8192 * 4];
        std::fs::write(&a, &bytes).unwrap();
        bytes[8192 * 2] = 9;
        bytes.extend([5u8; 100]);
        std::fs::write(&b, &bytes).unwrap();
        // Block 2 differs, and b's short fifth block is beyond a's end.
        assert_eq!(differing_blocks(&a, &b, 8192).unwrap().len(), 2);
        assert!(differing_blocks(&a, &a, 8192).unwrap().is_empty());
    }

    #[test]
    fn a_plain_file_owns_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let u = usage(&path).unwrap();
        assert_eq!(u.shared, 0);
        assert!(u.owned >= 1 << 20, "{u:?}");
    }
}
