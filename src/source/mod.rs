//! Where frames come from. Every source, live or not, is a URI; `SourceSpec` parses and classifies it and is the
//! only holder of the raw URI (everything that logs uses `redacted()`). The GStreamer sources (`stream`) and the
//! image-folder source (`folder`) hand `Frame`s to a `FrameSink`; `supervisor` keeps a source running forever:
//! a fresh GStreamer pipeline per attempt, exponential backoff with jitter, and a no-frame watchdog.
//!
//! `inputs` (files, folders, globs → images) and `decode` (one image file → RGB, checked) serve `segment` too.

pub mod decode;
pub mod folder;
pub mod inputs;
pub mod probe;
pub mod stream;
pub mod supervisor;

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use image::RgbImage;

use crate::config::FolderMode;

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

/// Replaces credentials in a URI: the userinfo part and the values of query parameters whose names look secret.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rfind('@') {
        Some(i) => format!("***@{}", &authority[i + 1..]),
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
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
    };
    format!("{scheme}://{authority}{tail}")
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

/// Where a source delivers frames. `push` may block (lossless pipelines) and returns false when the pipeline is
/// stopping, so the source should end.
pub trait FrameSink: Send + Sync {
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
    fn credentials_never_survive_redaction() {
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
