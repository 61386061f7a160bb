//! The client side of PostgreSQL's streaming replication protocol, as much as a WAL
//! receiver needs: a `replication=true` connection over the pg's Unix socket, the
//! replication commands (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `SHOW`,
//! `START_REPLICATION`), and in copy-both mode the WAL data and keepalive messages in, the
//! standby status updates out. Message framing and bodies come from `postgres-protocol`;
//! copy-both's start (`W`), which it does not know, is read here.

use bytes::{Buf, BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// A protocol error or a refusal from the server, as one line.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server's ErrorResponse: SQLSTATE and message.
    #[error("{message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("the server sent {0}")]
    Unexpected(String),
}

pub type Result<T> = std::result::Result<T, ProtocolError>;

/// What arrives once streaming runs.
#[derive(Debug)]
pub enum Streamed {
    /// WAL starting at `start`; `server_end` is where the server's WAL ends now.
    Wal {
        start: u64,
        server_end: u64,
        data: bytes::Bytes,
    },
    /// The server's end of WAL, and whether it wants a status update now.
    Keepalive { server_end: u64, reply: bool },
    /// The server ended the stream (its timeline ended).
    End,
}

pub struct Replication {
    stream: UnixStream,
    buf: BytesMut,
    out: BytesMut,
}

/// The result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct System {
    pub system_identifier: u64,
    pub timeline: u32,
    pub position: u64,
}

impl Replication {
    /// Connects to the server listening on `socket` (`…/.s.PGSQL.PORT`) as `user`, in
    /// physical replication mode, named `application_name` in `pg_stat_replication`.
    pub async fn connect(
        socket: &std::path::Path,
        user: &str,
        application_name: &str,
    ) -> Result<Replication> {
        let stream = UnixStream::connect(socket).await?;
        let mut conn = Replication {
            stream,
            buf: BytesMut::with_capacity(1 << 20),
            out: BytesMut::new(),
        };
        frontend::startup_message(
            [
                ("user", user),
                ("replication", "true"),
                ("application_name", application_name),
            ],
            &mut conn.out,
        )?;
        conn.flush().await?;
        loop {
            match conn.message().await? {
                backend::Message::AuthenticationOk
                | backend::Message::ParameterStatus(_)
                | backend::Message::BackendKeyData(_)
                | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(conn),
                backend::Message::ErrorResponse(e) => return Err(server_error(&e)),
                _ => {
                    return Err(ProtocolError::Unexpected(
                        "an authentication request; the safekeeper connects through the trusted local socket only".into(),
                    ))
                }
            }
        }
    }

    async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Reads until `buf` holds a whole message; its tag.
    async fn fill(&mut self) -> Result<u8> {
        loop {
            if let Some(h) = backend::Header::parse(&self.buf)? {
                if self.buf.len() > h.len() as usize {
                    return Ok(h.tag());
                }
            }
            if self.buf.capacity() - self.buf.len() < 64 << 10 {
                self.buf.reserve(1 << 20);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
        }
    }

    /// Whether a whole message is read already (the next [`Replication::next`] does not
    /// wait).
    pub fn buffered(&self) -> bool {
        matches!(backend::Header::parse(&self.buf), Ok(Some(h)) if self.buf.len() > h.len() as usize)
    }

    /// The next message (copy-both's start excluded, see [`Replication::start`]).
    async fn message(&mut self) -> Result<backend::Message> {
        self.fill().await?;
        backend::Message::parse(&mut self.buf)?
            .ok_or_else(|| ProtocolError::Unexpected("a truncated message".into()))
    }

    /// Runs one replication command; the rows of its (text) result.
    pub async fn command(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.message().await? {
                backend::Message::DataRow(row) => {
                    let buf = row.buffer();
                    let cols: Vec<Option<String>> = row
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                        .collect()?;
                    rows.push(cols);
                }
                backend::Message::ErrorResponse(e) => error = Some(server_error(&e)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    pub async fn identify_system(&mut self) -> Result<System> {
        let rows = self.command("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ProtocolError::Unexpected("no IDENTIFY_SYSTEM row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let bad = |what: &str| ProtocolError::Unexpected(format!("IDENTIFY_SYSTEM {what}"));
        Ok(System {
            system_identifier: col(0).parse().map_err(|_| bad("systemid"))?,
            timeline: col(1).parse().map_err(|_| bad("timeline"))?,
            position: crate::compute::wal::parse_lsn(&col(2)).ok_or_else(|| bad("xlogpos"))?,
        })
    }

    /// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE tli`; copy-both mode follows.
    pub async fn start(&mut self, slot: &str, start: u64, timeline: u32) -> Result<()> {
        let sql = format!(
            "START_REPLICATION SLOT {slot} PHYSICAL {} TIMELINE {timeline}",
            crate::compute::wal::format_lsn(start)
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush().await?;
        loop {
            if self.fill().await? == b'W' {
                let h = backend::Header::parse(&self.buf)?.expect("filled");
                self.buf.advance(h.len() as usize + 1);
                return Ok(());
            }
            match self.message().await? {
                backend::Message::ErrorResponse(e) => {
                    let err = server_error(&e);
                    // The server waits for nothing more: drain to ReadyForQuery.
                    while !matches!(self.message().await?, backend::Message::ReadyForQuery(_)) {}
                    return Err(err);
                }
                backend::Message::NoticeResponse(_) => {}
                _ => return Err(ProtocolError::Unexpected("no CopyBothResponse".into())),
            }
        }
    }

    /// The next WAL data or keepalive of the stream.
    pub async fn next(&mut self) -> Result<Streamed> {
        match self.message().await? {
            backend::Message::CopyData(body) => {
                let mut data = body.into_bytes();
                match data.first() {
                    Some(b'w') if data.len() >= 25 => {
                        data.advance(1);
                        let start = data.get_u64();
                        let server_end = data.get_u64();
                        let _send_time = data.get_i64();
                        Ok(Streamed::Wal {
                            start,
                            server_end,
                            data,
                        })
                    }
                    Some(b'k') if data.len() >= 18 => {
                        data.advance(1);
                        let server_end = data.get_u64();
                        let _send_time = data.get_i64();
                        Ok(Streamed::Keepalive {
                            server_end,
                            reply: data.get_u8() == 1,
                        })
                    }
                    _ => Err(ProtocolError::Unexpected(
                        "a replication message zenith does not know".into(),
                    )),
                }
            }
            backend::Message::CopyDone => Ok(Streamed::End),
            backend::Message::ErrorResponse(e) => Err(server_error(&e)),
            backend::Message::NoticeResponse(_) => Box::pin(self.next()).await,
            _ => Err(ProtocolError::Unexpected(
                "a message out of place in copy-both mode".into(),
            )),
        }
    }

    /// A standby status update: written, flushed and (a receiver that replays nothing,
    /// so `remote_apply` commits do not wait forever) applied up to `flushed`.
    pub async fn status(&mut self, written: u64, flushed: u64) -> Result<()> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(written);
        body.put_u64(flushed);
        body.put_u64(flushed);
        body.put_i64(now_pg_us());
        body.put_u8(0);
        frontend::CopyData::new(body.freeze())?.write(&mut self.out);
        self.flush().await
    }
}

fn now_pg_us() -> i64 {
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    since_unix - PG_EPOCH_OFFSET_US
}

fn server_error(e: &backend::ErrorResponseBody) -> ProtocolError {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = e.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    ProtocolError::Server { code, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_times_count_from_2000() {
        // 2026 is some 26 years after PostgreSQL's epoch.
        let years = now_pg_us() / 1_000_000 / 86_400 / 365;
        assert!((25..40).contains(&years), "{years}");
    }
}
