//! The one redaction every config error goes through before it leaves this module (`config check`, the
//! daemon's start-up error, a rejected reload's log lines and HTTP reply). Errors quote config text: a TOML
//! parser's snippet of the offending line, a value that has the wrong type, a URI that does not parse. Any of
//! them can hold an RTSP password, so every message is scrubbed, not just the ones known to quote.

use std::sync::OnceLock;

use regex::Regex;

/// Secrets read from `*_file` keys shorter than this are not searched for: replacing every `ab` in a message
/// would make it unreadable, and a secret that short protects nothing.
const MIN_FILE_SECRET_CHARS: usize = 4;

/// Scrubs one message: the contents of secret files, then every URI's userinfo, then secret-looking query
/// values (`source::stream::redact_text`).
pub fn redact(message: &str, file_secrets: &[String]) -> String {
    let mut text = message.to_string();
    for secret in file_secrets {
        let secret = secret.trim();
        if secret.chars().count() >= MIN_FILE_SECRET_CHARS {
            text = text.replace(secret, "<secret from a *_file>");
        }
    }
    crate::source::stream::redact_text(&redact_userinfo(&text))
}

/// `scheme://anything@` → `scheme://***@`, up to the last `@` before the URI ends (whitespace or an
/// unescaped `"`). `redact_uri` stops the authority at the first `/`, `?` or `#`, which is right for a valid
/// URI, but a password with a raw `/` or `#` (the config errors that matter most are about invalid values)
/// would then be shown; this pass errs towards hiding too much.
fn redact_userinfo(text: &str) -> String {
    static USERINFO: OnceLock<Option<Regex>> = OnceLock::new();
    let re = USERINFO.get_or_init(|| {
        Regex::new(r#"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?:\\.|[^\s"\\])*@"#).ok()
    });
    match re {
        Some(re) => re.replace_all(text, "${scheme}***@").into_owned(),
        // The pattern is a constant; should it ever fail to build, hide every URI's authority whole.
        None => text
            .split_inclusive(char::is_whitespace)
            .map(|w| if w.contains("://") { "<uri>" } else { w })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_hidden_wherever_the_uri_sits() {
        for (text, shown) in [
            (
                r#"3 | source = "rtsp://admin:hunter2@10.0.0.5/s1" x"#,
                r#"3 | source = "rtsp://***@10.0.0.5/s1" x"#,
            ),
            (
                "invalid type: string \"rtsp://u:hunter2@h/x\", expected f64",
                "invalid type: string \"rtsp://***@h/x\", expected f64",
            ),
            // Raw '/', '#', '?' and '@' in the password: hidden up to the last '@'.
            (
                "'rtsp://u:hun/ter#2?@x@cam/s1' is bad",
                "'rtsp://***@cam/s1' is bad",
            ),
            // An escaped quote inside a TOML string does not end the URI.
            (
                r#"source = "rtsp://u:hun\"ter2@cam/s1""#,
                r#"source = "rtsp://***@cam/s1""#,
            ),
            (
                "uri = http://h/x?password=hunter2&a=1",
                "uri = http://h/x?password=***&a=1",
            ),
        ] {
            let out = redact(text, &[]);
            assert_eq!(out, shown);
            assert!(!out.contains("hunter2") && !out.contains("ter2"), "{out}");
        }
    }

    #[test]
    fn secret_file_contents_are_hidden() {
        let out = redact(
            "table: 'admin:hunter2@cam' is not a URI",
            &["admin:hunter2@cam\n".to_string(), "ab".to_string()],
        );
        assert_eq!(
            out, "table: '<secret from a *_file>' is not a URI",
            "too short a secret is left alone"
        );
    }
}
