//! A deterministic, incompressible byte stream: the same seed always yields the same bytes,
//! so a probe can upload data of any size without holding it in memory and check what comes
//! back by hash alone. Used by `zenith storage check` and by the tests.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Counter-based (splitmix64) bytes: byte `i` depends only on the seed and `i`, so any
/// read pattern, and any sub-range, yields the same bytes. Not cryptographic, and not
/// compressible by zstd or gzip.
#[derive(Debug, Clone)]
pub struct PseudoRandom {
    seed: u64,
    offset: u64,
    end: u64,
}

impl PseudoRandom {
    /// `len` bytes derived from `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        PseudoRandom {
            seed,
            offset: 0,
            end: len,
        }
    }

    /// The bytes `range` of the stream `new(seed, _)`.
    pub fn range(seed: u64, range: std::ops::Range<u64>) -> Self {
        PseudoRandom {
            seed,
            offset: range.start,
            end: range.end.max(range.start),
        }
    }

    fn word(&self, index: u64) -> [u8; 8] {
        let mut z = self
            .seed
            .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fills `buf` with the next bytes (at most what remains); returns how many were written.
    pub fn fill(&mut self, buf: &mut [u8]) -> usize {
        let n = (buf.len() as u64).min(self.end - self.offset) as usize;
        let out = &mut buf[..n];
        // An unaligned head (at most one partial word), then whole words, then the tail:
        // word-at-a-time is what makes multi-GiB probes cheap.
        let head = (((8 - self.offset % 8) % 8) as usize).min(n);
        if head > 0 {
            let skip = (self.offset % 8) as usize;
            out[..head].copy_from_slice(&self.word(self.offset / 8)[skip..skip + head]);
        }
        let mut index = (self.offset + head as u64) / 8;
        let mut body = out[head..].chunks_exact_mut(8);
        for chunk in &mut body {
            chunk.copy_from_slice(&self.word(index));
            index += 1;
        }
        let tail = body.into_remainder();
        let len = tail.len();
        tail.copy_from_slice(&self.word(index)[..len]);
        self.offset += n as u64;
        n
    }

    /// The whole remaining stream in memory; for small sizes only.
    pub fn to_vec(mut self) -> Vec<u8> {
        let mut v = vec![0; (self.end - self.offset) as usize];
        self.fill(&mut v);
        v
    }
}

impl AsyncRead for PseudoRandom {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.fill(buf.initialize_unfilled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bytes_and_exact_length() {
        let a = PseudoRandom::new(7, 1001).to_vec();
        let b = PseudoRandom::new(7, 1001).to_vec();
        let c = PseudoRandom::new(8, 1001).to_vec();
        assert_eq!(a.len(), 1001);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn chunked_reads_match_one_read() {
        let whole = PseudoRandom::new(3, 100).to_vec();
        let mut g = PseudoRandom::new(3, 100);
        let mut parts = Vec::new();
        let mut buf = [0u8; 13];
        loop {
            let n = g.fill(&mut buf);
            if n == 0 {
                break;
            }
            parts.extend_from_slice(&buf[..n]);
        }
        assert_eq!(whole, parts);
    }

    #[test]
    fn ranges_match_the_whole() {
        let whole = PseudoRandom::new(5, 100).to_vec();
        for start in 0..20 {
            for end in start..40 {
                assert_eq!(
                    PseudoRandom::range(5, start..end).to_vec(),
                    &whole[start as usize..end as usize]
                );
            }
        }
    }
}
