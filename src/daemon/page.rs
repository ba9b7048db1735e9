//! The live page: `/` (HTML), `/ui/app.js` and `/ui/style.css`, plain files from `page/` compiled into the
//! binary, so the daemon serves its page with no build step and no file to install beside it.
//!
//! The page loads nothing from anywhere else and runs no inline script: the Content-Security-Policy sent with
//! every file allows this origin only (images also from `blob:`, the overlay of "try an image", and `data:`),
//! and forbids framing. `Cache-Control: no-cache` makes a browser revalidate, so a new daemon's page replaces
//! the old one at the next load. The files hold no data: what the page shows comes from the JSON routes, which
//! do their own access checks (`http::guard`). So the files load without a session: `/` is also the login
//! form, drawn by `app.js`. They answer only what every route answers first: 404 while `[http] page = false`,
//! and the loopback Host guard (`session.rs`).

use axum::extract::State as Extract;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::http::{text, Ctx};
use super::session::page_off;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE_CSS: &str = include_str!("page/style.css");

/// Each file with its content type (with `nosniff`, a browser runs a script or applies a style sheet only when
/// the type says it is one).
const HTML: (&str, &str) = (INDEX_HTML, "text/html; charset=utf-8");
const JS: (&str, &str) = (APP_JS, "text/javascript; charset=utf-8");
const CSS: (&str, &str) = (STYLE_CSS, "text/css; charset=utf-8");

/// Self only; `connect-src` covers the page's fetches and the live streams are images.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
     frame-ancestors 'none'";

pub(super) async fn index(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    refusal(&ctx, &headers).unwrap_or_else(|| file(HTML))
}

pub(super) async fn app_js(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    refusal(&ctx, &headers).unwrap_or_else(|| file(JS))
}

pub(super) async fn style_css(Extract(ctx): Extract<Ctx>, headers: HeaderMap) -> Response {
    refusal(&ctx, &headers).unwrap_or_else(|| file(CSS))
}

/// The page switched off, or a Host that a loopback listener must not answer; None: serve the file.
fn refusal(ctx: &Ctx, headers: &HeaderMap) -> Option<Response> {
    let access = &ctx.state.access;
    if !access.page {
        return Some(page_off());
    }
    let why = access.host_refusal(headers)?;
    tracing::warn!("live page refused: {why}");
    Some(text(StatusCode::FORBIDDEN, format!("forbidden: {why}\n")))
}

fn file((body, content_type): (&'static str, &'static str)) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every URL the three files name: `src="…"` / `href="…"` attributes and `url(…)` in the CSS.
    fn references(text: &str) -> Vec<String> {
        let mut found = Vec::new();
        for marker in ["src=\"", "href=\"", "url("] {
            let mut rest = text;
            while let Some(at) = rest.find(marker) {
                rest = &rest[at + marker.len()..];
                let end = rest.find(['"', ')']).unwrap_or(rest.len());
                found.push(rest[..end].to_string());
            }
        }
        found
    }

    #[test]
    fn the_page_names_nothing_outside_the_daemon() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for reference in references(text) {
                let local = reference.starts_with('/') && !reference.starts_with("//")
                    || reference.starts_with('#')
                    || reference == "data:,";
                assert!(local, "{name} refers to {reference}");
            }
            assert!(!text.contains("https://"), "{name} names an https URL");
            // The SVG namespace is a name, not a fetch.
            let http: Vec<&str> = text
                .match_indices("http://")
                .map(|(i, _)| &text[i..(i + 30).min(text.len())])
                .filter(|s| !s.starts_with("http://www.w3.org/2000/svg"))
                .collect();
            assert!(http.is_empty(), "{name} names {http:?}");
        }
    }

    #[test]
    fn the_html_loads_its_script_and_style_from_the_ui_routes_and_has_no_inline_script() {
        assert!(INDEX_HTML.contains("<script src=\"/ui/app.js\" defer></script>"));
        assert!(INDEX_HTML.contains("href=\"/ui/style.css\""));
        assert_eq!(INDEX_HTML.matches("<script").count(), 1);
        assert!(!INDEX_HTML.contains("style=\""));
        let handlers = INDEX_HTML.match_indices(" on").filter(|(i, _)| {
            let word = &INDEX_HTML[i + 1..];
            let end = word
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(word.len());
            word[end..].starts_with('=')
        });
        assert_eq!(handlers.count(), 0, "no inline event handlers");
    }

    #[test]
    fn each_file_has_its_type_no_cache_and_the_strict_policy() {
        for (reply, kind) in [
            (file(HTML), "text/html"),
            (file(JS), "text/javascript"),
            (file(CSS), "text/css"),
        ] {
            assert_eq!(reply.status(), StatusCode::OK);
            let headers = reply.headers();
            let value = |name| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            };
            assert!(value(header::CONTENT_TYPE).starts_with(kind));
            assert_eq!(value(header::CACHE_CONTROL), "no-cache");
            let policy = value(header::CONTENT_SECURITY_POLICY);
            assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"));
            assert!(policy.contains("img-src 'self' blob: data:"));
            assert!(!policy.contains("unsafe"));
        }
    }
}
