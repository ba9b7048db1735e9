//! Where frames come from. Every source, live or not, is a URI; `SourceSpec` parses and classifies it and is the
//! only holder of the raw URI (everything that logs uses `redacted()`). The GStreamer sources (`stream`) and the
//! image-folder source (`folder`) hand `Frame`s to a `FrameIntake`; `supervisor` keeps a source running forever:
//! a fresh GStreamer pipeline per attempt, exponential backoff with jitter, a no-frame watchdog and, for RTSP, the
//! TCP → UDP fall-back (`rtsp`: the transports and a server's refusal of one).
//!
//! `inputs` (files, folders, globs → images) and `decode` (one image file → RGB, checked) serve `segment` too.

pub mod decode;
pub mod folder;
pub mod inputs;
pub mod probe;
pub mod rtsp;
pub mod sequence;
pub mod stream;
pub mod supervisor;

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use image::RgbImage;
use serde::Deserialize;

/// What a `folder://` source does once it has taken what is there (the `folder_mode` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FolderMode {
    /// Process what is there, then keep watching for new images.
    Watch,
    /// Process what is there, then the pipeline is finished.
    Once,
}

/// What kind of thing a source URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `rtsp://` or `rtsps://` (TCP interleaved by default).
    Rtsp,
    /// `http://` or `https://` (HLS, MJPEG or progressive video).
    Http,
    /// `file:///path/video.mp4`: a video file, segmented frame by frame.
    VideoFile(PathBuf),
    /// `v4l2:///dev/video0`.
    V4l2(PathBuf),
    /// `folder:///path`: images in a folder tree.
    Folder { dir: PathBuf, mode: FolderMode },
}

/// A parsed source URI. `Debug` and `Display` print the redacted form.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceSpec {
    uri: String,
    kind: SourceKind,
}

impl fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceSpec({})", self.redacted())
    }
}

impl fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl SourceSpec {
    pub fn parse(uri: &str, folder_mode: Option<FolderMode>) -> Result<SourceSpec> {
        let shown = redact_uri(uri);
        let Some((scheme, rest)) = uri.split_once("://") else {
            bail!("'{shown}' is not a URI; use rtsp://, rtsps://, http(s)://, file:///video, v4l2:///dev/videoN or folder:///dir");
        };
        let local_path = |what: &str| -> Result<PathBuf> {
            if !rest.starts_with('/') {
                bail!("'{shown}': a {what} URI takes an absolute path, e.g. {scheme}:///path");
            }
            Ok(PathBuf::from(rest))
        };
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "rtsp" | "rtsps" | "rtspt" => SourceKind::Rtsp,
            "http" | "https" => SourceKind::Http,
            "file" => SourceKind::VideoFile(local_path("file")?),
            "v4l2" => SourceKind::V4l2(local_path("v4l2")?),
            "folder" => SourceKind::Folder {
                dir: local_path("folder")?,
                mode: folder_mode.unwrap_or(FolderMode::Watch),
            },
            other => bail!(
                "'{shown}': unknown scheme '{other}' (known: rtsp, rtsps, http, https, file, v4l2, folder)"
            ),
        };
        if matches!(kind, SourceKind::Rtsp | SourceKind::Http) && rest.trim_matches('/').is_empty()
        {
            bail!("'{shown}' names no host");
        }
        if matches!(kind, SourceKind::Rtsp | SourceKind::Http) {
            check_userinfo(rest).map_err(|problem| {
                anyhow::anyhow!(
                    "'{shown}': {problem}; percent-encode the user name and password ('@' → %40, ':' → %3A, \
                     '/' → %2F, '?' → %3F, '#' → %23, '%' → %25), or put the password in password_file"
                )
            })?;
        }
        Ok(SourceSpec {
            uri: uri.to_string(),
            kind,
        })
    }

    /// The raw URI, credentials included: only for handing to GStreamer.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn kind(&self) -> &SourceKind {
        &self.kind
    }

    /// The URI with user, password and secret-looking query values replaced.
    pub fn redacted(&self) -> String {
        redact_uri(&self.uri)
    }

    /// Live sources run in real time whether or not we keep up; they get the freshest-frame policy by default.
    pub fn is_live(&self) -> bool {
        matches!(
            self.kind,
            SourceKind::Rtsp | SourceKind::Http | SourceKind::V4l2(_)
        )
    }

    pub fn is_folder(&self) -> bool {
        matches!(self.kind, SourceKind::Folder { .. })
    }
}

/// The authority of `rest` (what follows `scheme://`) and what comes after it.
fn split_authority(rest: &str) -> (&str, &str) {
    match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    }
}

/// True when an authority without userinfo has a port that is not a number: what a raw '/', '?' or '#' in a
/// password makes of `user:pa/ss@host` (the authority ends at the '/', leaving `user:pa`).
fn has_bad_port(authority: &str) -> bool {
    let host_port = authority
        .rsplit_once(']')
        .map_or(authority, |(_, after)| after);
    host_port
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.chars().all(|c| c.is_ascii_digit()))
}

/// Why the userinfo of an rtsp/http URI (`rest` follows `scheme://`) would be misread: GStreamer, like any URI
/// parser, splits at reserved characters, so a raw '@', ':', '/', '?' or '#' in a password connects with the
/// wrong credentials or to the wrong host. The reason never quotes the userinfo.
fn check_userinfo(rest: &str) -> std::result::Result<(), &'static str> {
    let (authority, _) = split_authority(rest);
    let Some(at) = authority.rfind('@') else {
        return if has_bad_port(authority) && rest.contains('@') {
            Err("the user name or password holds a raw '/', '?' or '#' (the host part ends early)")
        } else {
            Ok(())
        };
    };
    let userinfo = &authority[..at];
    if userinfo.contains('@') {
        return Err("the user name or password holds a raw '@'");
    }
    if userinfo.matches(':').count() > 1 {
        return Err("the password holds a raw ':'");
    }
    let bytes = userinfo.as_bytes();
    let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return Err("the user name or password holds a '%' that does not start a %XX escape");
    }
    if userinfo.contains([' ', '[', ']', '"', '<', '>', '\\']) {
        return Err("the user name or password holds a character a URI cannot carry raw");
    }
    Ok(())
}

/// Puts `password`, percent-encoded, into `uri` (rtsp/http, with a user name and no password): for
/// `password_file`. Errors quote the URI redacted, never the password.
pub fn insert_password(uri: &str, password: &str) -> Result<String> {
    let shown = redact_uri(uri);
    let Some((scheme, rest)) = uri.split_once("://") else {
        bail!("'{shown}' is not a URI");
    };
    if !["rtsp", "rtsps", "rtspt", "http", "https"].contains(&scheme.to_ascii_lowercase().as_str())
    {
        bail!("'{shown}': only rtsp:// and http(s):// sources take a password");
    }
    let (authority, tail) = split_authority(rest);
    let Some((user, host)) = authority.rsplit_once('@') else {
        bail!("'{shown}' names no user; write the source as {scheme}://USER@host/... and the password goes in password_file");
    };
    if user.contains(':') {
        bail!("'{shown}' already holds a password; remove it from the URI or drop password_file");
    }
    if password.is_empty() {
        bail!("the password file is empty");
    }
    let mut encoded = String::with_capacity(password.len() * 3);
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
}

/// Replaces credentials in a URI: the userinfo part and the values of query parameters whose names look secret.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let (authority, tail) = split_authority(rest);
    // `user:pa/ss@host/x`: a raw '/' in a password ends the authority early; hide everything up to the '@'.
    if !authority.contains('@') && has_bad_port(authority) {
        if let Some(at) = rest.rfind('@') {
            let (host, tail) = split_authority(&rest[at + 1..]);
            return format!("{scheme}://***@{host}{}", redact_query(tail));
        }
    }
    let authority = match authority.rfind('@') {
        Some(i) => format!("***@{}", &authority[i + 1..]),
        None => authority.to_string(),
    };
    format!("{scheme}://{authority}{}", redact_query(tail))
}

/// The path and query with the values of secret-looking query parameters replaced.
fn redact_query(tail: &str) -> String {
    match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_key(k) => format!("{k}=***"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    }
}

fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "token",
        "secret",
        "key",
        "auth",
        "sig",
        "credential",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// One decoded frame (or folder image) on its way to the inference worker.
#[derive(Debug)]
pub struct Frame {
    pub image: RgbImage,
    /// Per pipeline, counting from 0 at daemon start, never reused across reconnects.
    pub sequence: u64,
    /// Stream time of the frame (GStreamer PTS), when the source has one.
    pub pts_ns: Option<u64>,
    /// Best estimate of when the frame was captured: the pipeline clock minus its latency for live sources,
    /// else when it was decoded.
    pub captured: Instant,
    /// When it was handed to tclseg.
    pub received: Instant,
    /// Wall time it was received, ms since the Unix epoch.
    pub wall_ms: u64,
    /// Folder sources: the image's path relative to the folder, extension included (outputs mirror it); its
    /// source file.
    pub file: Option<(PathBuf, PathBuf)>,
}

/// The pipeline's intake: where a source delivers its frames (called an intake, not a sink, because `sink` names
/// the output writers). `push` may block (lossless pipelines) and returns false when the pipeline is
/// stopping, so the source should end.
pub trait FrameIntake: Send + Sync {
    fn push(&self, frame: Frame) -> bool;
    /// True once the pipeline is being stopped.
    fn stopping(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_classified() {
        let s = SourceSpec::parse("rtsp://cam/s1", None).expect("rtsp");
        assert!(s.is_live() && *s.kind() == SourceKind::Rtsp);
        let s = SourceSpec::parse("file:///v/a.mp4", None).expect("file");
        assert!(!s.is_live());
        let s = SourceSpec::parse("folder:///in", Some(FolderMode::Once)).expect("folder");
        assert_eq!(
            *s.kind(),
            SourceKind::Folder {
                dir: "/in".into(),
                mode: FolderMode::Once
            }
        );
        assert!(SourceSpec::parse("v4l2:///dev/video0", None)
            .expect("v4l2")
            .is_live());
        for bad in ["gopher://x", "cam.local", "file://relative.mp4", "rtsp://"] {
            assert!(SourceSpec::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn unencoded_userinfo_is_refused_without_quoting_the_password() {
        for (password, says) in [
            ("p@ss", "raw '@'"),
            ("pa:ss", "raw ':'"),
            ("pa/ss", "raw '/'"),
            ("pa?ss", "raw '/'"),
            ("pa%zzss", "'%'"),
            ("pa ss", "cannot carry"),
        ] {
            let uri = &format!("rtsp://admin:{password}@10.0.0.5/s1");
            let err = format!("{:#}", SourceSpec::parse(uri, None).expect_err(uri));
            assert!(
                err.contains(says) && err.contains("percent-encode"),
                "{uri}: {err}"
            );
            assert!(
                !err.contains(password) && !err.contains("ss@"),
                "{uri}: {err}"
            );
        }
        for good in [
            "rtsp://admin:p%40ss%3A1@10.0.0.5:554/s1",
            "rtsp://admin@cam/s1",
            "rtsp://[::1]:8554/s1",
            "rtsp://cam:554/s1?user=a@b",
            "http://cam/mjpeg",
        ] {
            SourceSpec::parse(good, None).expect(good);
        }
    }

    #[test]
    fn a_password_from_a_file_is_percent_encoded_into_the_uri() {
        let uri = insert_password("rtsp://admin@10.0.0.5:554/s1?ch=1", "p@ss:w/rd%").expect("ok");
        assert_eq!(uri, "rtsp://admin:p%40ss%3Aw%2Frd%25@10.0.0.5:554/s1?ch=1");
        SourceSpec::parse(&uri, None).expect("valid once encoded");
        for (uri, says) in [
            ("rtsp://10.0.0.5/s1", "names no user"),
            ("rtsp://admin:old@10.0.0.5/s1", "already holds a password"),
            ("folder:///in", "only rtsp"),
        ] {
            let err = insert_password(uri, "secret!").expect_err(uri).to_string();
            assert!(err.contains(says), "{uri}: {err}");
            assert!(!err.contains("secret!") && !err.contains("old@"), "{err}");
        }
    }

    #[test]
    fn credentials_never_survive_redaction() {
        assert_eq!(
            redact_uri("rtsp://admin:pa/ss@10.0.0.5/s1"),
            "rtsp://***@10.0.0.5/s1"
        );
        assert_eq!(
            redact_uri("rtsp://admin:p@ss@10.0.0.5/s1"),
            "rtsp://***@10.0.0.5/s1"
        );
        assert_eq!(
            redact_uri("rtsp://admin:hunter2@10.0.0.5:554/s1?token=abc&ch=1"),
            "rtsp://***@10.0.0.5:554/s1?token=***&ch=1"
        );
        assert_eq!(redact_uri("rtsp://cam/s1"), "rtsp://cam/s1");
        let err = SourceSpec::parse("gopher://u:hunter2@h/", None)
            .expect_err("bad scheme")
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        let spec = SourceSpec::parse("rtsp://u:hunter2@h/", None).expect("ok");
        assert!(!format!("{spec:?} {spec}").contains("hunter2"));
    }
}
