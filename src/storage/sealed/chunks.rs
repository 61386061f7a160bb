//! The sealed object format: a header (`ZNSEAL01` and a random 19-byte nonce prefix), then
//! the plaintext in chunks of 64 KiB, each sealed with XChaCha20-Poly1305 under the nonce
//! prefix, the chunk's index and a final-chunk flag (the STREAM construction), with the
//! object's key as associated data. So a chunk cannot be altered, reordered, dropped or
//! moved to another object, and the object cannot be cut short or swapped for another
//! object of the same storage, without failing authentication (an older version of the
//! same object is not told apart). An empty object is one
//! empty final chunk.
//!
//! Sizes map both ways without reading (chunks have a fixed size), and a range of the
//! plaintext is read by fetching just the chunks it spans. Streams are sealed and opened
//! one chunk at a time, reading one chunk ahead to know which is the last: memory stays
//! at a few chunks whatever the object's size.

use std::io;
use std::ops::Range;

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::storage::ByteReader;

const MAGIC: &[u8; 8] = b"ZNSEAL01";
pub const PREFIX: usize = 19;
pub const HEADER: u64 = (MAGIC.len() + PREFIX) as u64;
pub const CHUNK: u64 = 64 << 10;
pub const TAG: u64 = 16;
const SEALED_CHUNK: u64 = CHUNK + TAG;

/// Seals and opens the objects of one storage.
#[derive(Clone)]
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

/// Why an object does not open (the caller names the object).
#[derive(Debug)]
pub struct Unsealed(pub String);

impl Sealer {
    pub fn new(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// The whole sealed object of `plain`, stored under `key`.
    pub fn seal(&self, key: &str, plain: &[u8]) -> Result<Vec<u8>, Unsealed> {
        let prefix = new_prefix()?;
        let mut out = Vec::with_capacity(sealed_size(plain.len() as u64) as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&prefix);
        let chunks: Vec<&[u8]> = if plain.is_empty() {
            vec![&[]]
        } else {
            plain.chunks(CHUNK as usize).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            out.extend_from_slice(&self.seal_chunk(key, &prefix, i as u64, last, chunk)?);
        }
        Ok(out)
    }

    fn seal_chunk(
        &self,
        key: &str,
        prefix: &[u8; PREFIX],
        index: u64,
        last: bool,
        chunk: &[u8],
    ) -> Result<Vec<u8>, Unsealed> {
        let nonce = nonce(prefix, index, last)?;
        self.cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: chunk,
                    aad: key.as_bytes(),
                },
            )
            .map_err(|_| Unsealed("cannot be sealed".into()))
    }

    /// Opens chunk `index` (`last` when it must be the final one).
    fn open_chunk(
        &self,
        key: &str,
        prefix: &[u8; PREFIX],
        index: u64,
        last: bool,
        sealed: &[u8],
    ) -> Option<Vec<u8>> {
        let nonce = nonce(prefix, index, last).ok()?;
        self.cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: key.as_bytes(),
                },
            )
            .ok()
    }

    /// The plaintext of the whole sealed object `data` stored under `key`.
    #[cfg(test)]
    pub fn open(&self, key: &str, data: &[u8]) -> Result<Vec<u8>, Unsealed> {
        let prefix = header(data)?;
        let body = &data[HEADER as usize..];
        let count = body.len().div_ceil(SEALED_CHUNK as usize).max(1);
        let mut out = Vec::with_capacity(body.len());
        for (i, chunk) in body.chunks(SEALED_CHUNK as usize).enumerate() {
            let last = i + 1 == count;
            let plain = self
                .open_chunk(key, &prefix, i as u64, last, chunk)
                .ok_or_else(|| failed(i as u64))?;
            out.extend_from_slice(&plain);
        }
        if body.is_empty() {
            return Err(Unsealed("is cut short: it has no chunk".into()));
        }
        Ok(out)
    }

    /// The sealed bytes that hold plaintext `range`: the whole chunks it spans.
    pub fn sealed_range(range: &Range<u64>) -> Range<u64> {
        let first = range.start / CHUNK;
        let end_chunk = range.end.max(range.start.saturating_add(1)).div_ceil(CHUNK);
        chunk_offset(first)..chunk_offset(end_chunk)
    }

    /// Opens `data`, the chunks fetched for plaintext `range` ([`Sealer::sealed_range`],
    /// cut short where the object ends) of an object with nonce `prefix`.
    pub fn open_range(
        &self,
        key: &str,
        prefix: &[u8; PREFIX],
        range: &Range<u64>,
        data: &[u8],
    ) -> Result<RangeRead, Unsealed> {
        let first = range.start / CHUNK;
        let wanted = Sealer::sealed_range(range);
        // Fewer bytes than asked for: the object ends here, and its last chunk must say so
        // (a full chunk that opens as not-last would be an object cut short).
        let ends = (data.len() as u64) < wanted.end - wanted.start;
        if data.is_empty() {
            return match first {
                0 => Err(Unsealed("is cut short: it has no chunk".into())),
                _ => Ok(RangeRead::PastChunks),
            };
        }
        let mut out = Vec::new();
        let chunks: Vec<&[u8]> = data.chunks(SEALED_CHUNK as usize).collect();
        for (n, chunk) in chunks.iter().enumerate() {
            let index = first + n as u64;
            let final_fetched = n + 1 == chunks.len();
            // A full chunk may be the object's last: only the flag tells, so both are
            // tried where the fetch does not settle it.
            let plain = if final_fetched && ends {
                self.open_chunk(key, prefix, index, true, chunk)
                    .ok_or_else(|| failed(index))?
            } else if let Some(plain) = self.open_chunk(key, prefix, index, false, chunk) {
                out.extend_from_slice(&plain);
                continue;
            } else {
                let plain = self
                    .open_chunk(key, prefix, index, true, chunk)
                    .ok_or_else(|| failed(index))?;
                if !final_fetched {
                    return Err(Unsealed(format!("has data after its final chunk {index}")));
                }
                plain
            };
            out.extend_from_slice(&plain);
            // The last chunk: the object's size is known.
            let size = first * CHUNK + out.len() as u64;
            if range.start > size {
                return Ok(RangeRead::Past { size });
            }
        }
        let from = ((range.start - first * CHUNK) as usize).min(out.len());
        let to = (range.end.saturating_sub(first * CHUNK) as usize).min(out.len());
        Ok(RangeRead::Data(Bytes::copy_from_slice(
            &out[from..to.max(from)],
        )))
    }

    /// The plaintext size of an object whose chunk `index` was fetched as `chunk` and must
    /// be its last (a range read found nothing after it).
    pub fn size_from_last(
        &self,
        key: &str,
        prefix: &[u8; PREFIX],
        index: u64,
        chunk: &[u8],
    ) -> Result<u64, Unsealed> {
        let plain = self
            .open_chunk(key, prefix, index, true, chunk)
            .ok_or_else(|| {
                Unsealed(format!(
                    "is cut short: chunk {index} is not its last, and nothing follows it"
                ))
            })?;
        Ok(index * CHUNK + plain.len() as u64)
    }
}

/// What a range read found.
#[derive(Debug)]
pub enum RangeRead {
    /// The range's bytes, cut at the object's end.
    Data(Bytes),
    /// The range starts past the end of an object of `size` bytes.
    Past { size: u64 },
    /// The object has no chunk where the range starts: the caller checks that the chunk
    /// before is its last ([`Sealer::size_from_last`]).
    PastChunks,
}

/// Where chunk `index` starts in the stored object.
pub fn chunk_offset(index: u64) -> u64 {
    HEADER.saturating_add(index.saturating_mul(SEALED_CHUNK))
}

fn failed(index: u64) -> Unsealed {
    Unsealed(format!(
        "fails authentication at chunk {index}: it was altered, damaged or cut short, or belongs to another object"
    ))
}

/// The nonce prefix in the header `data` starts with.
pub fn header(data: &[u8]) -> Result<[u8; PREFIX], Unsealed> {
    if data.len() < HEADER as usize || &data[..MAGIC.len()] != MAGIC {
        return Err(Unsealed(
            "is not sealed: it was written without the storage's key, or damaged".into(),
        ));
    }
    Ok(data[MAGIC.len()..HEADER as usize]
        .try_into()
        .expect("header length checked"))
}

fn new_prefix() -> Result<[u8; PREFIX], Unsealed> {
    let mut prefix = [0u8; PREFIX];
    super::key::random(&mut prefix).map_err(|e| Unsealed(e.to_string()))?;
    Ok(prefix)
}

fn nonce(prefix: &[u8; PREFIX], index: u64, last: bool) -> Result<XNonce, Unsealed> {
    let index = u32::try_from(index)
        .map_err(|_| Unsealed("is larger than a sealed object can be (256 TiB)".into()))?;
    let mut n = [0u8; 24];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&index.to_be_bytes());
    n[23] = last as u8;
    Ok(*XNonce::from_slice(&n))
}

/// The stored size of a plaintext of `plain` bytes.
pub fn sealed_size(plain: u64) -> u64 {
    HEADER + plain + plain.div_ceil(CHUNK).max(1) * TAG
}

/// The plaintext size of a stored object of `stored` bytes (0 for one too short to be
/// sealed: reading it fails anyway).
pub fn plain_size(stored: u64) -> u64 {
    let body = stored.saturating_sub(HEADER);
    let chunks = body.div_ceil(SEALED_CHUNK).max(1);
    body.saturating_sub(chunks * TAG)
}

/// Reads until `buf` is full or the reader ends; returns how much was read.
async fn read_full(reader: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = reader.read(&mut buf[done..]).await?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

async fn read_chunk(reader: &mut ByteReader, size: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    let n = read_full(reader, &mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

struct StreamState {
    reader: ByteReader,
    sealer: Sealer,
    key: String,
    prefix: Option<[u8; PREFIX]>,
    index: u64,
    /// The chunk read ahead, if any.
    ahead: Option<Vec<u8>>,
    done: bool,
}

impl StreamState {
    fn new(reader: ByteReader, sealer: &Sealer, key: &str) -> StreamState {
        StreamState {
            reader,
            sealer: sealer.clone(),
            key: key.to_string(),
            prefix: None,
            index: 0,
            ahead: None,
            done: false,
        }
    }

    /// The next chunk of `size` bytes and whether it is the last (read ahead to know).
    async fn next(&mut self, size: u64) -> io::Result<(Vec<u8>, bool)> {
        let current = match self.ahead.take() {
            Some(chunk) => chunk,
            None => read_chunk(&mut self.reader, size).await?,
        };
        if (current.len() as u64) < size {
            return Ok((current, true));
        }
        let next = read_chunk(&mut self.reader, size).await?;
        let last = next.is_empty();
        self.ahead = (!last).then_some(next);
        Ok((current, last))
    }
}

/// The sealed stream of `reader`'s plaintext, to be stored under `key`.
pub fn seal_stream(sealer: &Sealer, key: &str, reader: ByteReader) -> ByteReader {
    let state = StreamState::new(reader, sealer, key);
    let stream = futures::stream::try_unfold(state, |mut s| async move {
        if s.done {
            return io::Result::Ok(None);
        }
        let Some(prefix) = s.prefix else {
            let prefix = new_prefix().map_err(to_io)?;
            s.prefix = Some(prefix);
            let mut head = MAGIC.to_vec();
            head.extend_from_slice(&prefix);
            return Ok(Some((Bytes::from(head), s)));
        };
        let (chunk, last) = s.next(CHUNK).await?;
        let sealed = s
            .sealer
            .seal_chunk(&s.key, &prefix, s.index, last, &chunk)
            .map_err(to_io)?;
        s.index += 1;
        s.done = last;
        Ok(Some((Bytes::from(sealed), s)))
    });
    Box::pin(tokio_util::io::StreamReader::new(stream))
}

/// The plaintext stream of the sealed object `reader` stored under `key`; `unsealed`
/// turns a failure into the error the reader returns (naming the object).
pub fn open_stream(
    sealer: &Sealer,
    key: &str,
    reader: ByteReader,
    unsealed: impl Fn(Unsealed) -> io::Error + Send + Sync + 'static,
) -> ByteReader {
    let state = StreamState::new(reader, sealer, key);
    let stream = futures::stream::try_unfold((state, unsealed), |(mut s, unsealed)| async move {
        if s.done {
            return io::Result::Ok(None);
        }
        let prefix = match s.prefix {
            Some(prefix) => prefix,
            None => {
                let head = read_chunk(&mut s.reader, HEADER).await?;
                let prefix = header(&head).map_err(&unsealed)?;
                s.prefix = Some(prefix);
                prefix
            }
        };
        let (chunk, last) = s.next(SEALED_CHUNK).await?;
        let plain = s
            .sealer
            .open_chunk(&s.key, &prefix, s.index, last, &chunk)
            .ok_or_else(|| unsealed(failed(s.index)))?;
        s.index += 1;
        s.done = last;
        Ok(Some((Bytes::from(plain), (s, unsealed))))
    });
    Box::pin(tokio_util::io::StreamReader::new(stream))
}

fn to_io(e: Unsealed) -> io::Error {
    io::Error::other(e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(&[7u8; 32])
    }

    async fn collect(mut r: ByteReader) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn reader(data: Vec<u8>) -> ByteReader {
        Box::pin(std::io::Cursor::new(data))
    }

    #[tokio::test]
    async fn whole_streamed_and_ranged_reads_agree() {
        let s = sealer();
        for len in [
            0usize,
            1,
            100,
            CHUNK as usize,
            CHUNK as usize + 1,
            3 * CHUNK as usize + 77,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let whole = s.seal("packs/a", &plain).unwrap();
            assert_eq!(whole.len() as u64, sealed_size(len as u64), "len {len}");
            assert_eq!(plain_size(whole.len() as u64), len as u64);
            assert_eq!(s.open("packs/a", &whole).unwrap(), plain);
            let streamed = collect(seal_stream(&s, "packs/a", reader(plain.clone())))
                .await
                .unwrap();
            assert_eq!(streamed.len(), whole.len());
            let opened = collect(open_stream(&s, "packs/a", reader(streamed), to_io))
                .await
                .unwrap();
            assert_eq!(opened, plain);
            let ranges = [
                0..1u64,
                5..(len as u64).max(5),
                CHUNK - 3..CHUNK + 9,
                0..u64::MAX,
                u64::MAX - 1..u64::MAX,
            ];
            for range in ranges {
                let got = read_range(&s, "packs/a", &whole, &range).unwrap();
                let start = range.start as usize;
                if range.start > len as u64 {
                    assert!(
                        matches!(got, RangeRead::Past { .. } | RangeRead::PastChunks),
                        "len {len} range {range:?}: {got:?}"
                    );
                    continue;
                }
                let RangeRead::Data(got) = got else {
                    panic!("len {len} range {range:?}: {got:?}");
                };
                let want = &plain[start..(range.end.min(len as u64)) as usize];
                assert_eq!(got.as_ref(), want, "len {len} range {range:?}");
            }
        }
    }

    /// A range read of the stored object `whole`, as the storage would serve it.
    fn read_range(
        s: &Sealer,
        key: &str,
        whole: &[u8],
        range: &Range<u64>,
    ) -> Result<RangeRead, Unsealed> {
        let fetch = Sealer::sealed_range(range);
        let end = (fetch.end.min(whole.len() as u64)) as usize;
        let start = (fetch.start as usize).min(end);
        s.open_range(key, &header(whole).unwrap(), range, &whole[start..end])
    }

    #[test]
    fn range_reads_catch_an_object_cut_short() {
        let s = sealer();
        let plain = vec![3u8; 4 * CHUNK as usize];
        let whole = s.seal("packs/b", &plain).unwrap();
        let prefix = header(&whole).unwrap();
        // Cut after two whole chunks: a range reaching past the cut must not pass.
        let cut = &whole[..chunk_offset(2) as usize];
        assert!(read_range(&s, "packs/b", cut, &(CHUNK..10 * CHUNK)).is_err());
        assert!(read_range(&s, "packs/b", cut, &(0..3 * CHUNK)).is_err());
        // Inside what is left, whole chunks still read (nothing there says otherwise).
        assert!(matches!(
            read_range(&s, "packs/b", cut, &(0..10)).unwrap(),
            RangeRead::Data(_)
        ));
        // Past the cut: the caller must check the chunk before, and it is not the last.
        assert!(matches!(
            read_range(&s, "packs/b", cut, &(2 * CHUNK..3 * CHUNK)).unwrap(),
            RangeRead::PastChunks
        ));
        let before = &cut[chunk_offset(1) as usize..];
        assert!(s.size_from_last("packs/b", &prefix, 1, before).is_err());
        let last = &whole[chunk_offset(3) as usize..];
        assert_eq!(
            s.size_from_last("packs/b", &prefix, 3, last).unwrap(),
            4 * CHUNK
        );
        // Nothing at all after the header.
        assert!(read_range(&s, "packs/b", &whole[..HEADER as usize], &(0..1)).is_err());
        // A chunk of another object, or flipped, in a range read.
        let other = s.seal("packs/c", &plain).unwrap();
        assert!(read_range(&s, "packs/b", &other, &(0..10)).is_err());
        let mut flipped = whole.clone();
        flipped[chunk_offset(2) as usize + 5] ^= 1;
        assert!(read_range(&s, "packs/b", &flipped, &(2 * CHUNK..2 * CHUNK + 1)).is_err());
    }

    #[tokio::test]
    async fn tampering_is_caught() {
        let s = sealer();
        let plain = vec![1u8; 3 * CHUNK as usize];
        let whole = s.seal("lists/x", &plain).unwrap();
        // Another key (a swapped object), a flipped byte, a chunk cut off.
        assert!(s.open("lists/y", &whole).is_err());
        let mut flipped = whole.clone();
        flipped[HEADER as usize + 10] ^= 1;
        assert!(s.open("lists/x", &flipped).is_err());
        let e = collect(open_stream(&s, "lists/x", reader(flipped), to_io))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("authentication"), "{e}");
        let cut = &whole[..whole.len() - SEALED_CHUNK as usize];
        assert!(s.open("lists/x", cut).is_err());
        assert!(
            collect(open_stream(&s, "lists/x", reader(cut.to_vec()), to_io))
                .await
                .is_err()
        );
        assert!(s.open("lists/x", &whole[..HEADER as usize]).is_err());
        assert!(s.open("lists/x", b"plain text").is_err());
        // Another storage's key opens nothing.
        assert!(Sealer::new(&[8u8; 32]).open("lists/x", &whole).is_err());
    }
}
