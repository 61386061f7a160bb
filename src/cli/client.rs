//! The CLI's side of zenith-local's REST API: while zenith-local runs, commands that act
//! on pgs and snapshots are requests to it, so the CLI and the API never disagree. A small
//! HTTP/1.1 client over loopback (one request per connection) is all that needs.

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::CliError;
use crate::local::repo::Repo;

/// Largest response body accepted (a snapshot list of a big repo fits many times).
const MAX_RESPONSE: usize = 64 << 20;

pub struct Client {
    port: u16,
    token: String,
}

impl Client {
    /// A client of the repo's zenith-local, if it runs.
    pub fn for_repo(repo: &Repo) -> anyhow::Result<Option<Client>> {
        let Some(local) = crate::local::running(repo) else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(repo.token_path())
            .map_err(|e| anyhow::anyhow!("{}: {e}", repo.token_path().display()))?;
        Ok(Some(Client {
            port: local.api_port,
            token: token.trim().to_string(),
        }))
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.call("GET", path, None).await
    }

    /// Sends one request; a JSON error reply becomes the command's error (exit 2 for
    /// 501, 1 otherwise).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let unreachable = |e: std::io::Error| {
            CliError::Other(anyhow::anyhow!(
                "zenith-local does not answer on 127.0.0.1:{} ({e}); `zenith stop` then `zenith start` restarts it",
                self.port
            ))
        };
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(unreachable)?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            self.port,
            self.token,
            payload.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(unreachable)?;
        let mut reply = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64 + 65536)
            .read_to_end(&mut reply)
            .await
            .map_err(unreachable)?;
        let (status, body) = parse_response(&reply).ok_or_else(|| {
            CliError::Other(anyhow::anyhow!(
                "zenith-local sent a reply that is not HTTP; see its log"
            ))
        })?;
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|e| {
                CliError::Other(anyhow::anyhow!(
                    "zenith-local sent a reply that is not JSON: {e}"
                ))
            })?
        };
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let message = value["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("zenith-local answered HTTP {status}"));
        if status == 501 {
            eprintln!("zenith: {message}");
            return Err(CliError::Exit(super::EXIT_NOT_IMPLEMENTED));
        }
        Err(CliError::Other(anyhow::anyhow!(message)))
    }
}

/// A path segment with everything but unreserved characters percent-encoded.
pub fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Status code and body of an HTTP/1.1 response (content-length, chunked or to the end).
fn parse_response(reply: &[u8]) -> Option<(u16, Vec<u8>)> {
    let split = reply.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&reply[..split]).ok()?;
    let mut rest = &reply[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (k, v) = line.split_once(':')?;
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    if chunked {
        let mut body = Vec::new();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n")?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..end]).ok()?.trim(), 16).ok()?;
            rest = &rest[end + 2..];
            if size == 0 {
                return Some((status, body));
            }
            body.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
    }
    let body = match length {
        Some(n) => rest.get(..n)?.to_vec(),
        None => rest.to_vec(),
    };
    (body.len() <= MAX_RESPONSE).then_some((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_length_chunks_or_neither() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(r), Some((200, b"{}".to_vec())));
        let r = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(r), Some((404, b"{\"a\":1}".to_vec())));
        let r = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_response(r), Some((204, Vec::new())));
        assert_eq!(parse_response(b"garbage"), None);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{}"),
            None
        );
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(segment("main@HEAD{0}"), "main%40HEAD%7B0%7D");
        assert_eq!(segment("a-b_c.1"), "a-b_c.1");
    }
}
