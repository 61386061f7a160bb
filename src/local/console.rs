//! zenith console: the web UI zenith-local serves at `/console`, on its API address
//! (127.0.0.1 only). The page and its script are embedded in the binary and use the same
//! REST API as the CLI; nothing is built with Node.
//!
//! Logging in never puts the repo's API token in a browser: `zenith console` (holding the
//! token) asks for a one-time login code, valid for two minutes, and prints
//! `/console/login?code=...`; opening it trades the code for a session cookie
//! (`HttpOnly`, `SameSite=Strict`, random, held only in zenith-local's memory) and leads
//! to the console. A page of another site cannot use that cookie: it is never sent
//! cross-site, and API calls made with it must also carry the `X-Zenith-Console` header,
//! which a cross-site request cannot send without a CORS preflight that zenith-local never
//! answers. The `Host` header must name the loopback address (`127.0.0.1`, `localhost`,
//! `[::1]`), so a DNS-rebound name reaches nothing. Pages are served with a strict
//! Content-Security-Policy and may not be framed.
//!
//! Sessions end when zenith-local stops, or after 12 hours; `zenith console` again logs in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};

use super::api::same;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

const CODE_LIFETIME: Duration = Duration::from_secs(120);
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "zenith_console";
/// The header every API call of the console carries.
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
        let mut codes = self.codes.lock().expect("lock");
        codes.retain(|_, born| born.elapsed() < CODE_LIFETIME);
        codes.insert(code.clone(), Instant::now());
        Ok(code)
    }

    /// Trades a login code for a new session, once.
    fn redeem(&self, code: &str) -> Option<String> {
        let born = self.codes.lock().expect("lock").remove(code)?;
        if born.elapsed() >= CODE_LIFETIME {
            return None;
        }
        let session = random_hex().ok()?;
        let mut sessions = self.sessions.lock().expect("lock");
        sessions.retain(|_, born| born.elapsed() < SESSION_LIFETIME);
        sessions.insert(session.clone(), Instant::now());
        Some(session)
    }

    /// Whether `headers` carry a live session of the console, from the loopback address,
    /// with the console's own header (see the module's doc).
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        if !loopback_host(headers) || !same_origin(headers) || !headers.contains_key(CONSOLE_HEADER)
        {
            return false;
        }
        let Some(session) = cookie(headers) else {
            return false;
        };
        let sessions = self.sessions.lock().expect("lock");
        sessions.iter().any(|(s, born)| {
            same(s.as_bytes(), session.as_bytes()) && born.elapsed() < SESSION_LIFETIME
        })
    }
}

/// `GET /console/...`: the page, its script and style, and the login.
pub fn serve(sessions: &Sessions, request: &Request<Body>) -> Response {
    if !loopback_host(request.headers()) {
        return plain(
            StatusCode::MISDIRECTED_REQUEST,
            "zenith console answers on 127.0.0.1 (or localhost) only",
        );
    }
    let path = request.uri().path();
    match path {
        "/console" | "/console/" => asset(PAGE, "text/html; charset=utf-8"),
        "/console/console.js" => asset(SCRIPT, "text/javascript; charset=utf-8"),
        "/console/console.css" => asset(STYLE, "text/css; charset=utf-8"),
        "/console/login" => login(sessions, request.uri().query().unwrap_or("")),
        _ => plain(StatusCode::NOT_FOUND, "no such page of zenith console"),
    }
}

fn login(sessions: &Sessions, query: &str) -> Response {
    let code = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("code="))
        .unwrap_or("");
    let Some(session) = sessions.redeem(code) else {
        return plain(
            StatusCode::UNAUTHORIZED,
            "this login link is used or expired: run `zenith console` again for a new one",
        );
    };
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "/console")]).into_response();
    let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("hex is a valid header value"),
    );
    harden(response)
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

/// A request with an `Origin` must come from a loopback page (the console itself).
fn same_origin(headers: &HeaderMap) -> bool {
    match headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        None => true,
        Some(origin) => origin
            .strip_prefix("http://")
            .is_some_and(loopback_authority),
    }
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            pair.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_string)
        })
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
    fn a_code_logs_in_once_and_sessions_need_loopback_and_the_header() {
        let s = Sessions::default();
        let code = s.new_code().unwrap();
        let session = s.redeem(&code).unwrap();
        assert!(s.redeem(&code).is_none(), "a code works once");
        let cookie = format!("other=1; {COOKIE}={session}");
        let good = [
            ("host", "127.0.0.1:3000"),
            ("cookie", cookie.as_str()),
            (CONSOLE_HEADER, "1"),
        ];
        assert!(s.admits(&headers(&good)));
        assert!(
            !s.admits(&headers(&good[..2])),
            "without the console's header"
        );
        let mut rebound = good;
        rebound[0] = ("host", "evil.example:3000");
        assert!(!s.admits(&headers(&rebound)), "a rebound host");
        let mut with_origin = good.to_vec();
        with_origin.push(("origin", "http://evil.example"));
        assert!(!s.admits(&headers(&with_origin)), "another site");
        let wrong = format!("{COOKIE}={}", "0".repeat(64));
        let forged = [good[0], ("cookie", wrong.as_str()), good[2]];
        assert!(!s.admits(&headers(&forged)));
        assert!(loopback_authority("localhost:1") && loopback_authority("[::1]:80"));
        assert!(!loopback_authority("127.0.0.1.evil.example"));
    }
}
