//! Who may use the live page and its data (issue 18): the `[http] page` switch, the page's login sessions, and
//! the two header checks a browser needs beyond the bearer token (`http::authorize` applies all of it, for
//! every route that needs it, in one place).
//!
//! - Sessions: `POST /v1/session` with the token (`http.token_file`) sets a cookie holding a random 256-bit
//!   session id from the OS CSPRNG (`HttpOnly`, so page scripts never see it; `SameSite=Strict`, so no other
//!   site's request carries it). Sessions live in memory only: a restart logs everyone out, and nothing secret is
//!   written to disk. Only the id's SHA-256 is kept, so a lookup's timing says nothing about a stored id.
//! - Host guard: on a loopback listener the `Host` header must name loopback. A page on another site that
//!   rebinds its DNS name to 127.0.0.1 reaches the listener with its own name as Host, and is refused.
//! - Origin check: a state-changing request that carries `Origin` must come from this server's own origin
//!   (`http://<Host>`), and one authorised by the cookie must carry it. Browsers send `Origin` on every
//!   cross-site POST/PUT/DELETE, so no other site can change anything (no CSRF); `curl` with the bearer token,
//!   which sends no Origin, still works.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State as Extract;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http::{authorized, json_reply, same_token, Ctx, Need};

/// The session cookie's name.
pub const COOKIE: &str = "tclseg_session";
/// How long a login lasts: a working day, then the token again.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Logins kept at once; the oldest goes first. Bounds the memory a token holder can make the daemon spend.
const MAX_SESSIONS: usize = 256;

/// The access settings of the listener and the sessions the page logged in.
pub struct Access {
    /// `[http] page`: the live page and its routes; false answers them 404.
    pub page: bool,
    /// The listener is on a loopback address: the Host guard applies.
    pub loopback: bool,
    /// SHA-256 of each session id → when it expires.
    sessions: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Default for Access {
    /// The page on, on loopback: what `[http]`'s defaults give.
    fn default() -> Self {
        Access::new(true, true)
    }
}

impl Access {
    pub fn new(page: bool, loopback: bool) -> Access {
        Access {
            page,
            loopback,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A new session id (64 hex digits), or None when the OS has no randomness to give.
    fn open(&self) -> Option<String> {
        let mut id = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut id) {
            tracing::error!("no session: the OS random source failed: {e}");
            return None;
        }
        let id = hex::encode(id);
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, expires| *expires > now);
        while sessions.len() >= MAX_SESSIONS {
            let oldest = sessions.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k);
            match oldest {
                Some(k) => sessions.remove(&k),
                None => break,
            };
        }
        sessions.insert(digest(&id), now + SESSION_TTL);
        Some(id)
    }

    /// True when the request's session cookie names a live session.
    pub fn cookie_valid(&self, headers: &HeaderMap) -> bool {
        let Some(id) = session_cookie(headers) else {
            return false;
        };
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(&digest(id))
            .is_some_and(|expires| *expires > Instant::now())
    }

    fn close(&self, headers: &HeaderMap) {
        if let Some(id) = session_cookie(headers) {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            sessions.remove(&digest(id));
        }
    }

    /// The Host guard: None when the request may go on, else why not. A request without Host (not a browser's)
    /// cannot be a rebinding attack.
    pub fn host_refusal(&self, headers: &HeaderMap) -> Option<String> {
        if !self.loopback {
            return None;
        }
        let host = headers.get(header::HOST)?;
        let host = host.to_str().unwrap_or("");
        if is_loopback_host(host) {
            None
        } else {
            Some(format!(
                "Host '{}' is not a loopback name; this listener answers only to localhost, 127.0.0.1 or [::1] \
                 (a guard against DNS rebinding)",
                host.chars().take(100).collect::<String>()
            ))
        }
    }
}

impl super::State {
    /// The state with the listener's access settings (from `[http]`, at start-up).
    pub(super) fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The value of the `tclseg_session` cookie, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then_some(value.trim())
        })
}

/// `localhost` (and names under it), 127.0.0.0/8 and ::1, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The Origin check of a state-changing request: None when it may go on. `by_cookie`: the request is
/// authorised by the session cookie, so it must say where it comes from.
pub fn origin_refusal(headers: &HeaderMap, by_cookie: bool) -> Option<String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return by_cookie.then(|| {
            "a request authorised by the session cookie must carry Origin (send the bearer token instead)"
                .to_string()
        });
    };
    let origin = origin.to_str().unwrap_or("");
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host.is_empty() && origin.eq_ignore_ascii_case(&format!("http://{host}")) {
        None
    } else {
        Some(format!(
            "Origin '{}' is not this server (http://{}): state changes come only from the daemon's own page",
            origin.chars().take(100).collect::<String>(),
            host.chars().take(100).collect::<String>()
        ))
    }
}

/// The 404 of every page route while `[http] page = false`.
pub fn page_off() -> Response {
    json_reply(
        StatusCode::NOT_FOUND,
        json!({ "error": "the live page is off ([http] page = false in the config)" }),
    )
}

/// `GET /v1/session`: whether the page must ask for the token, and whether this request is authorised.
pub async fn status(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    let access = &ctx.state.access;
    if !access.page {
        return page_off();
    }
    if let Some(why) = access.host_refusal(&headers) {
        return json_reply(StatusCode::FORBIDDEN, json!({ "error": why }));
    }
    json_reply(
        StatusCode::OK,
        json!({
            "token_required": ctx.state.token.is_some(),
            "authorized": authorized(&ctx.state, &headers),
        }),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// `POST /v1/session` with `{"token": "..."}`: 204 and the session cookie, or 401.
pub async fn login(Extract(ctx): Extract<Ctx>, headers: HeaderMap, body: String) -> Response {
    let access = &ctx.state.access;
    if !access.page {
        return page_off();
    }
    if let Some(refused) = super::http::guard(&ctx.state, &headers, Need::Login, "POST /v1/session")
    {
        return refused;
    }
    let Some(expected) = &ctx.state.token else {
        // Nothing to log in to: every request is authorised already.
        return StatusCode::NO_CONTENT.into_response();
    };
    let given = match serde_json::from_str::<Login>(&body) {
        Ok(login) => login.token,
        Err(e) => {
            return json_reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("expected {{\"token\": \"...\"}}: {e}") }),
            )
        }
    };
    if !same_token(given.trim(), expected) {
        tracing::warn!("POST /v1/session refused: wrong token");
        return json_reply(
            StatusCode::UNAUTHORIZED,
            json!({ "error": "wrong token: give the one in http.token_file" }),
        );
    }
    let Some(id) = access.open() else {
        return json_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "no randomness for a session id; use the bearer token" }),
        );
    };
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    let mut reply = StatusCode::NO_CONTENT.into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        reply.headers_mut().insert(header::SET_COOKIE, value);
    }
    reply
}

/// `DELETE /v1/session`: logs out (the session ends here, and the browser drops the cookie).
pub async fn logout(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    let access = &ctx.state.access;
    if !access.page {
        return page_off();
    }
    if let Some(refused) =
        super::http::guard(&ctx.state, &headers, Need::Login, "DELETE /v1/session")
    {
        return refused;
    }
    access.close(&headers);
    let mut reply = StatusCode::NO_CONTENT.into_response();
    reply.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tclseg_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).expect("value"));
        }
        h
    }

    #[test]
    fn loopback_hosts_pass_the_guard_and_other_names_do_not() {
        for ok in [
            "localhost",
            "localhost:9480",
            "127.0.0.1:9480",
            "127.1.2.3",
            "[::1]:9480",
            "app.localhost",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9480",
            "10.0.0.5:9480",
            "localhost.evil.example",
            "[::2]",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
        let access = Access::new(true, true);
        assert!(access
            .host_refusal(&headers(&[("host", "evil.example")]))
            .is_some());
        assert!(Access::new(true, false)
            .host_refusal(&headers(&[("host", "evil.example")]))
            .is_none());
    }

    #[test]
    fn origin_must_be_this_server_and_the_cookie_needs_one() {
        let same = headers(&[("host", "cam.lan:9480"), ("origin", "http://cam.lan:9480")]);
        assert_eq!(origin_refusal(&same, true), None);
        let foreign = headers(&[("host", "cam.lan:9480"), ("origin", "http://evil.example")]);
        assert!(origin_refusal(&foreign, false).is_some());
        let none = headers(&[("host", "cam.lan:9480")]);
        assert_eq!(origin_refusal(&none, false), None, "curl with a bearer");
        assert!(
            origin_refusal(&none, true).is_some(),
            "cookie without Origin"
        );
        let null = headers(&[("host", "cam.lan:9480"), ("origin", "null")]);
        assert!(origin_refusal(&null, false).is_some());
    }

    #[test]
    fn a_session_is_valid_until_closed_and_ids_are_random() {
        let access = Access::default();
        let a = access.open().expect("id");
        let b = access.open().expect("id");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let with = headers(&[("cookie", &format!("theme=dark; {COOKIE}={a}"))]);
        assert!(access.cookie_valid(&with));
        assert!(!access.cookie_valid(&headers(&[("cookie", &format!("{COOKIE}=nope"))])));
        access.close(&with);
        assert!(!access.cookie_valid(&with));
        for _ in 0..MAX_SESSIONS + 10 {
            access.open();
        }
        assert!(access.sessions.lock().expect("lock").len() <= MAX_SESSIONS);
    }
}
