//! The CLI's side of zenith-local's REST API: while zenith-local runs, commands that act
//! on pgs and snapshots are requests to it, so the CLI and the API never disagree. A small
//! HTTP/1.1 client over loopback (one request per connection) is all that needs; it is the
//! API implementation of [`Control`].

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::local::Control;
use crate::models::{
    Action, ActionReply, CheckoutReport, ErrorReply, NewPg, NewSnapshot, OpError, OpResult, PgInfo,
    SnapshotSummary, StatusReport,
};
use crate::pageserver::Repo;
use crate::util::progress::ProgressHandle;

/// Largest response body accepted (a snapshot list of a big repo fits many times).
const MAX_RESPONSE: usize = 64 << 20;

pub struct Client {
    repo: Repo,
    port: u16,
    token: String,
}

impl Client {
    /// A client of the repo's zenith-local, if it runs.
    pub fn for_repo(repo: &Repo) -> OpResult<Option<Client>> {
        let Some(local) = crate::local::running(repo) else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(repo.token_path())
            .map_err(|e| OpError::io(repo.token_path().display(), e))?;
        Ok(Some(Client {
            repo: repo.clone(),
            port: local.api_port,
            token: token.trim().to_string(),
        }))
    }

    /// Sends one request and reads the reply as `T`; an error reply becomes the error of
    /// its kind (by HTTP status) with the API's message.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> OpResult<T> {
        let payload = body
            .map(|b| serde_json::to_string(b).expect("request bodies serialize"))
            .unwrap_or_default();
        let (status, body) = self.exchange(method, path, &payload).await?;
        if (200..300).contains(&status) {
            let body = if body.is_empty() {
                b"null".to_vec()
            } else {
                body
            };
            return serde_json::from_slice(&body).map_err(|e| {
                OpError::Failed(format!(
                    "zenith-local sent a reply this zenith does not understand ({e}); are both the same version?"
                ))
            });
        }
        let message = serde_json::from_slice::<ErrorReply>(&body)
            .map(|r| r.error)
            .unwrap_or_else(|_| format!("zenith-local answered HTTP {status}"));
        Err(match status {
            400 => OpError::BadRequest(message),
            404 => OpError::NotFound(message),
            409 => OpError::Conflict(message),
            503 => OpError::Unavailable(message),
            _ => OpError::Failed(message),
        })
    }

    /// One request and its reply's status and body.
    async fn exchange(&self, method: &str, path: &str, payload: &str) -> OpResult<(u16, Vec<u8>)> {
        let unreachable = |e: std::io::Error| {
            OpError::Failed(format!(
                "zenith-local does not answer on 127.0.0.1:{} ({e}); `zenith stop` then `zenith start` restarts it",
                self.port
            ))
        };
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .map_err(unreachable)?;
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
        let read = (&mut stream)
            .take(MAX_RESPONSE as u64 + 65536)
            .read_to_end(&mut reply)
            .await;
        match (read, parse_response(&reply)) {
            (Ok(_), Some(parsed)) => Ok(parsed),
            // The connection ended without a whole reply: zenith-local went away meanwhile
            // (killed, or stopped), or answered garbage.
            _ if self.went_away().await => Err(OpError::Failed(format!(
                "zenith-local stopped before it answered (see {}); `zenith start` starts it again, `zenith status` shows the state of the pgs",
                self.repo.log_path().display()
            ))),
            (Err(e), _) => Err(unreachable(e)),
            (Ok(_), None) => Err(OpError::Failed(format!(
                "zenith-local sent a reply that is not HTTP; see {}",
                self.repo.log_path().display()
            ))),
        }
    }

    /// Whether zenith-local stopped (its lock released, which the kernel does a moment
    /// after the connection of a killed process closes).
    async fn went_away(&self) -> bool {
        for _ in 0..40 {
            if crate::local::running(&self.repo).is_none() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        false
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> OpResult<T> {
        self.call("GET", path, None::<&()>).await
    }
}

#[async_trait(?Send)]
impl Control for Client {
    async fn create_pg(&self, new: NewPg, _progress: ProgressHandle) -> OpResult<PgInfo> {
        self.call("PUT", "/pgs", Some(&new)).await
    }

    async fn start_pg(
        &self,
        name: &str,
        replica: bool,
        primary: Option<String>,
        _progress: ProgressHandle,
    ) -> OpResult<PgInfo> {
        let action = Action::Start {
            is_replica: replica,
            primary,
        };
        self.act(name, &action).await
    }

    async fn stop_pg(&self, name: &str, immediate: bool) -> OpResult<PgInfo> {
        self.act(name, &Action::Stop { immediate }).await
    }

    async fn promote_pg(&self, name: &str) -> OpResult<PgInfo> {
        self.act(name, &Action::Promote).await
    }

    async fn checkout_pg(
        &self,
        name: &str,
        snapshot: Option<&str>,
        at: Option<&str>,
        _progress: ProgressHandle,
    ) -> OpResult<CheckoutReport> {
        let action = Action::Checkout {
            snapshot: snapshot.map(str::to_string),
            at: at.map(str::to_string),
        };
        match self.action(name, &action).await? {
            ActionReply::Checkout(done) => Ok(*done),
            ActionReply::Pg(_) => Err(unexpected()),
        }
    }

    async fn destroy_pg(&self, name: &str) -> OpResult<()> {
        let _: serde::de::IgnoredAny = self
            .call("DELETE", &format!("/pgs/{}", segment(name)), None::<&()>)
            .await?;
        Ok(())
    }

    async fn list_pgs(&self) -> OpResult<Vec<PgInfo>> {
        self.get("/pgs").await
    }

    async fn show_pg(&self, name: &str) -> OpResult<PgInfo> {
        self.get(&format!("/pgs/{}", segment(name))).await
    }

    async fn create_snapshot(
        &self,
        name: Option<String>,
        _progress: ProgressHandle,
    ) -> OpResult<SnapshotSummary> {
        self.call("POST", "/snapshots", Some(&NewSnapshot { name }))
            .await
    }

    async fn status(&self) -> OpResult<StatusReport> {
        self.get("/status").await
    }
}

impl Client {
    async fn action(&self, name: &str, action: &Action) -> OpResult<ActionReply> {
        self.call(
            "POST",
            &format!("/pgs/{}/actions", segment(name)),
            Some(action),
        )
        .await
    }

    /// An action that answers with the pg.
    async fn act(&self, name: &str, action: &Action) -> OpResult<PgInfo> {
        match self.action(name, action).await? {
            ActionReply::Pg(pg) => Ok(pg),
            ActionReply::Checkout(_) => Err(unexpected()),
        }
    }
}

fn unexpected() -> OpError {
    OpError::Failed("zenith-local answered with an unexpected kind of reply".into())
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
