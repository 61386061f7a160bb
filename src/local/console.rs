//! zenith console: the web UI zenith-local serves at `/console`, on its API address
//! (127.0.0.1 only). The page and its script are embedded in the binary and use the same
//! REST API as the CLI; nothing is built with Node.
//!
//! Logging in never puts the repo's API token in a browser: `zenith console` (holding the
//! token) asks for a one-time login code, valid for a minute, and prints
//! `/console#code=...`. The fragment never reaches a server; the page's script trades the
//! code for a session secret (`POST /console/session`), keeps it in the page origin's
//! local storage and sends it with every API call in the `X-Zenith-Console` header. No
//! cookie is involved, because cookies are shared by every port of 127.0.0.1, so a server
//! another local user runs on another port could read one. Local storage is per origin
//! (port included), and a page of another site or port can neither read it nor send the
//! header without a CORS preflight, which zenith-local never answers. The `Host` header
//! must name the loopback address (`127.0.0.1`, `localhost`, `[::1]`), so a DNS-rebound
//! name reaches nothing, and an `Origin`, when sent, must be this very server. Pages are
//! served with a strict Content-Security-Policy and may not be framed.
//!
//! Sessions end when zenith-local stops, or after 12 hours; `zenith console` again logs in.
//! At most 64 codes and 64 sessions are kept (the oldest go first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};

use super::api::same;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// How long a login code from `zenith console` works.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60);
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Codes and sessions kept at most.
const KEPT: usize = 64;
/// The header every API call of the console carries its session in.
pub const CONSOLE_HEADER: &str = "x-zenith-console";

/// Login codes and sessions, in memory only.
#[derive(Default)]
pub struct Sessions {
    codes: Mutex<HashMap<String, Instant>>,
    sessions: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    /// A new one-time login code.
    pub fn new_code(&self) -> Result<String, String> {
        let code = random_hex()?;
        insert(&self.codes, code.clone(), CODE_LIFETIME);
        Ok(code)
    }

    /// Trades a login code for a new session, once.
    fn redeem(&self, code: &str) -> Option<String> {
        let born = self.codes.lock().expect("lock").remove(code)?;
        if born.elapsed() >= CODE_LIFETIME {
            return None;
        }
        let session = random_hex().ok()?;
        insert(&self.sessions, session.clone(), SESSION_LIFETIME);
        Some(session)
    }

    /// Whether `headers` carry a live session of the console, from the loopback address
    /// and this server's own pages (see the module's doc).
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        if !loopback_host(headers) || !same_origin(headers) {
            return false;
        }
        let Some(session) = headers.get(CONSOLE_HEADER).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let sessions = self.sessions.lock().expect("lock");
        sessions.iter().any(|(s, born)| {
            same(s.as_bytes(), session.as_bytes()) && born.elapsed() < SESSION_LIFETIME
        })
    }
}

/// Keeps `key` in `map` for `lifetime`, dropping expired entries and, past [`KEPT`], the
/// oldest.
fn insert(map: &Mutex<HashMap<String, Instant>>, key: String, lifetime: Duration) {
    let mut map = map.lock().expect("lock");
    map.retain(|_, born| born.elapsed() < lifetime);
    while map.len() >= KEPT {
        let oldest = map
            .iter()
            .min_by_key(|(_, born)| **born)
            .map(|(k, _)| k.clone())
            .expect("not empty");
        map.remove(&oldest);
    }
    map.insert(key, Instant::now());
}

/// `GET /console/...`: the page, its script and style; `POST /console/session`: a login
/// code traded for a session.
pub async fn serve(sessions: &Sessions, request: Request<Body>) -> Response {
    if !loopback_host(request.headers()) {
        return plain(
            StatusCode::MISDIRECTED_REQUEST,
            "zenith console answers on 127.0.0.1 (or localhost) only",
        );
    }
    if !same_origin(request.headers()) {
        return plain(
            StatusCode::FORBIDDEN,
            "zenith console answers its own pages only",
        );
    }
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    match (path.as_str(), method) {
        ("/console" | "/console/", Method::GET) => asset(PAGE, "text/html; charset=utf-8"),
        ("/console/console.js", Method::GET) => asset(SCRIPT, "text/javascript; charset=utf-8"),
        ("/console/console.css", Method::GET) => asset(STYLE, "text/css; charset=utf-8"),
        ("/console/session", Method::POST) => login(sessions, request).await,
        _ => plain(StatusCode::NOT_FOUND, "no such page of zenith console"),
    }
}

/// `POST /console/session` with `{"code": "..."}`: `{"session": "..."}`, once per code.
async fn login(sessions: &Sessions, request: Request<Body>) -> Response {
    #[derive(serde::Deserialize)]
    struct Code {
        code: String,
    }
    let bytes = axum::body::to_bytes(request.into_body(), 4096)
        .await
        .unwrap_or_default();
    let session = serde_json::from_slice::<Code>(&bytes)
        .ok()
        .and_then(|c| sessions.redeem(&c.code));
    let Some(session) = session else {
        return plain(
            StatusCode::UNAUTHORIZED,
            "this login link is used or expired: run `zenith console` again for a new one",
        );
    };
    harden(axum::Json(serde_json::json!({ "session": session })).into_response())
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    harden(([(header::CONTENT_TYPE, kind)], body).into_response())
}

fn plain(status: StatusCode, message: &str) -> Response {
    harden(
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{message}\n"),
        )
            .into_response(),
    )
}

/// Headers that keep the console's pages to themselves.
fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
        ("x-content-type-options", "nosniff"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether the request is addressed to the loopback address by name or number.
fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    loopback_authority(host)
}

fn loopback_authority(authority: &str) -> bool {
    let name = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    matches!(name, "127.0.0.1" | "localhost" | "::1")
}

/// A request with an `Origin` must come from this very server (scheme, host and port).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin.to_str().ok(), host) {
        (Some(origin), Some(host)) => origin.strip_prefix("http://") == Some(host),
        _ => false,
    }
}

fn random_hex() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| format!("no randomness for a session: {e}"))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_code_logs_in_once_and_sessions_need_loopback_and_their_origin() {
        let s = Sessions::default();
        let code = s.new_code().unwrap();
        let session = s.redeem(&code).unwrap();
        assert!(s.redeem(&code).is_none(), "a code works once");
        let good = [
            ("host", "127.0.0.1:3000"),
            (CONSOLE_HEADER, session.as_str()),
        ];
        assert!(s.admits(&headers(&good)));
        assert!(!s.admits(&headers(&good[..1])), "without the session");
        let mut rebound = good;
        rebound[0] = ("host", "evil.example:3000");
        assert!(!s.admits(&headers(&rebound)), "a rebound host");
        for origin in ["http://evil.example", "http://127.0.0.1:4000", "null"] {
            let mut with_origin = good.to_vec();
            with_origin.push(("origin", origin));
            assert!(!s.admits(&headers(&with_origin)), "{origin}");
        }
        let mut own = good.to_vec();
        own.push(("origin", "http://127.0.0.1:3000"));
        assert!(s.admits(&headers(&own)));
        let forged = "0".repeat(64);
        assert!(!s.admits(&headers(&[good[0], (CONSOLE_HEADER, forged.as_str())])));
        assert!(loopback_authority("localhost:1") && loopback_authority("[::1]:80"));
        assert!(!loopback_authority("127.0.0.1.evil.example"));
        // Bounded: the oldest session goes once 64 more are made.
        for _ in 0..KEPT {
            let code = s.new_code().unwrap();
            s.redeem(&code).unwrap();
        }
        assert!(!s.admits(&headers(&good)));
    }
}
