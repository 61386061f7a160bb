//! Direct I/O (`O_DIRECT`) for bulk file reads and writes.
//!
//! Snapshots read and restore gigabytes once; going through the page cache costs a kernel
//! copy per byte (on virtual machines often the bottleneck) and evicts what the database
//! itself keeps cached. What the cache already holds is cheaper to read from it, though:
//! [`CachedOrDirect`] does that and reads only the rest directly. Direct I/O needs aligned
//! buffers, offsets and lengths, and not every filesystem supports it (tmpfs does not):
//! callers fall back to ordinary I/O.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment that satisfies direct I/O on every common Linux filesystem and device.
pub const ALIGN: usize = 4096;

/// A zeroed heap buffer aligned to [`ALIGN`], with a length (like a fixed-capacity Vec).
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

// The buffer owns its allocation outright.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `cap` bytes (rounded up to [`ALIGN`]), length 0.
    pub fn new(cap: usize) -> AlignedBuf {
        let cap = cap.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(cap, ALIGN).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, cap, len: 0 }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends `data`; panics past the capacity (a caller bug, never input-driven).
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(self.len + data.len() <= self.cap, "AlignedBuf overflow");
        let at = self.len;
        self.spare()[at..at + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    /// The whole capacity, for reading into.
    pub fn spare(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap bytes, initialized (zeroed at allocation).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.cap) }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap ≥ len initialized bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, layout) }
    }
}

/// Opens an existing file for reading with `O_DIRECT`, or `None` if the filesystem refuses.
pub fn open_read_direct(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Opens an existing file for writing with `O_DIRECT`, or `None` if the filesystem refuses.
pub fn open_write_direct(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Fills `buf` from `offset` until it is full or the file ends; returns the bytes read.
/// In direct mode a short, unaligned read marks the end of the file.
pub fn read_full_at(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    direct: bool,
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => {
                filled += n;
                if direct && n % ALIGN != 0 {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A file read both ways: what the page cache holds comes from it (`preadv2` with
/// `RWF_NOWAIT`, which never waits for the disk; a running database's recent writes are
/// usually there), the rest with direct I/O, so a read neither goes to the disk for what
/// is cached nor fills the cache with what is not.
pub struct CachedOrDirect {
    buffered: File,
    direct: Option<File>,
}

impl CachedOrDirect {
    /// Opens `path`; without `direct`, or where the filesystem refuses direct I/O, every
    /// read is an ordinary one.
    pub fn open(path: &Path, direct: bool) -> std::io::Result<CachedOrDirect> {
        let buffered = File::open(path)?;
        let direct = direct.then(|| open_read_direct(path)).flatten();
        Ok(CachedOrDirect { buffered, direct })
    }

    /// Fills `buf` (aligned to [`ALIGN`]) from `offset` until it is full or the file
    /// ends; returns the bytes read.
    pub fn read_full_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let Some(direct) = &self.direct else {
            return read_full_at(&self.buffered, buf, offset, false);
        };
        let mut filled = 0;
        while filled < buf.len() {
            let at = offset + filled as u64;
            match read_cached(&self.buffered, &mut buf[filled..], at) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                // A kernel without RWF_NOWAIT for this file: direct I/O alone, as before.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                    ) =>
                {
                    let aligned = filled % ALIGN == 0;
                    let file = if aligned { direct } else { &self.buffered };
                    return Ok(filled + read_full_at(file, &mut buf[filled..], at, aligned)?);
                }
                Err(e) => return Err(e),
            }
            // Not cached: from the disk, directly while offsets and lengths allow it.
            let rest = &mut buf[filled..];
            let aligned = filled % ALIGN == 0 && rest.len() % ALIGN == 0;
            let file = if aligned { direct } else { &self.buffered };
            let n = match file.read_at(rest, at) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            filled += n;
            if aligned && n % ALIGN != 0 {
                // A short, unaligned direct read marks the end of the file.
                break;
            }
        }
        Ok(filled)
    }
}

/// One `preadv2(RWF_NOWAIT)`: what the page cache holds from `offset`, or EAGAIN.
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iov,
            1,
            offset as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_bounded() {
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.capacity(), 12_288);
        assert_eq!(b.spare().as_ptr() as usize % ALIGN, 0);
        b.extend_from_slice(&[7; 100]);
        b.extend_from_slice(&[8; 50]);
        assert_eq!(&b.as_slice()[..100], &[7; 100][..]);
        assert_eq!(&b.as_slice()[100..], &[8; 50][..]);
        b.clear();
        assert!(b.is_empty());
    }

    /// Reads a whole file 256 KiB at a time through `read`, which fills its buffer from an
    /// offset and returns the bytes read.
    fn read_whole(mut read: impl FnMut(&mut [u8], u64) -> std::io::Result<usize>) -> Vec<u8> {
        let mut buf = AlignedBuf::new(1 << 20);
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let n = read(&mut buf.spare()[..256 << 10], offset).unwrap();
            out.extend_from_slice(&buf.spare()[..n]);
            offset += n as u64;
            if n < 256 << 10 {
                return out;
            }
        }
    }

    #[test]
    fn direct_reads_return_what_buffered_reads_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let buffered = File::open(&path).unwrap();
        assert!(read_whole(|buf, at| read_full_at(&buffered, buf, at, false)) == data);
        // Where the filesystem allows direct I/O (tmpfs does not).
        if let Some(direct) = open_read_direct(&path) {
            assert!(read_whole(|buf, at| read_full_at(&direct, buf, at, true)) == data);
        }
    }

    #[test]
    fn cached_or_direct_reads_return_the_file_whether_cached_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_017u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        for round in 0..2 {
            if round == 1 {
                // Out of the page cache (best effort): the reads go to the disk.
                use std::os::fd::AsRawFd;
                file.sync_all().unwrap();
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
            for direct in [false, true] {
                let reader = CachedOrDirect::open(&path, direct).unwrap();
                let out = read_whole(|buf, at| reader.read_full_at(buf, at));
                assert_eq!(out.len(), data.len(), "round {round}, direct {direct}");
                assert!(out == data, "round {round}, direct {direct}");
            }
        }
    }
}
