//! Output path templates, e.g. `{date}/{pipeline}-{frame}`: parsed once at config load (unknown names,
//! escaping paths and templates that would give two frames one name are config errors), rendered per frame into
//! a relative path whose every component is sanitized, so no value, however odd, can name a file outside the
//! output root. Sanitizing is one-to-one (percent-encoding, not replacement), so two distinct image names never
//! render to the same output name.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Pipeline,
    /// UTC date, YYYY-MM-DD.
    Date,
    /// UTC time, HHMMSS.
    Time,
    /// Frame sequence number, zero-padded to 8 digits.
    Frame,
    /// Folder sources: the image's path relative to the folder, extension included (`x.png` and `x.jpg` are
    /// two images); streams: `frame-<sequence>`.
    Name,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    parts: Vec<Part>,
}

/// Values for one frame.
pub struct TemplateValues<'a> {
    pub pipeline: &'a str,
    pub wall_ms: u64,
    pub sequence: u64,
    pub name: Option<&'a Path>,
}

impl PathTemplate {
    pub fn parse(text: &str) -> Result<PathTemplate> {
        if text.trim().is_empty() {
            bail!("empty template; e.g. \"{{date}}/{{frame}}\"");
        }
        if text.starts_with('/') {
            bail!("'{text}' is absolute; templates are relative to output.dir");
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                bail!("'{text}': unclosed '{{'");
            };
            let var = &rest[open + 1..open + close];
            parts.push(match var {
                "pipeline" => Part::Pipeline,
                "date" => Part::Date,
                "time" => Part::Time,
                "frame" => Part::Frame,
                "name" => Part::Name,
                other => bail!(
                    "'{text}': unknown field '{{{other}}}' (known: {{pipeline}}, {{date}}, {{time}}, {{frame}}, {{name}})"
                ),
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        if !parts.iter().any(|p| matches!(p, Part::Frame | Part::Name)) {
            bail!(
                "'{text}' gives every frame the same name, so each would replace the last; include {{frame}} or {{name}}"
            );
        }
        for part in &parts {
            if let Part::Text(t) = part {
                if t.contains('}') {
                    bail!("'{text}': stray '}}'");
                }
                if Path::new(t)
                    .components()
                    .any(|c| matches!(c, Component::ParentDir))
                {
                    bail!("'{text}' contains '..'; outputs must stay inside output.dir");
                }
            }
        }
        Ok(PathTemplate { parts })
    }

    /// The relative output path (no extension) for one frame; every component sanitized.
    pub fn render(&self, v: &TemplateValues) -> PathBuf {
        let (date, time) = utc_date_time(v.wall_ms);
        let mut text = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => text.push_str(t),
                Part::Pipeline => text.push_str(v.pipeline),
                Part::Date => text.push_str(&date),
                Part::Time => text.push_str(&time),
                Part::Frame => text.push_str(&format!("{:08}", v.sequence)),
                Part::Name => match v.name {
                    Some(name) => text.push_str(&name.to_string_lossy()),
                    None => text.push_str(&format!("frame-{:08}", v.sequence)),
                },
            }
        }
        let mut out = PathBuf::new();
        for component in text.split('/') {
            let clean = sanitize(component);
            if !clean.is_empty() {
                out.push(clean);
            }
        }
        if out.as_os_str().is_empty() {
            out.push(format!("frame-{:08}", v.sequence));
        }
        out
    }
}

/// Keeps letters, digits, '-', '_', '.' (not leading); every other character (and a leading '.') becomes
/// `%XX` per UTF-8 byte, '%' included, so distinct components stay distinct (`a b` → `a%20b`, `a_b` stays).
/// "." and ".." vanish.
fn sanitize(component: &str) -> String {
    if component == "." || component == ".." {
        return String::new();
    }
    let mut s = String::with_capacity(component.len());
    for (i, c) in component.chars().enumerate() {
        let keep = c.is_alphanumeric() || c == '-' || c == '_' || (c == '.' && i > 0);
        if keep {
            s.push(c);
        } else {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                s.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    s
}

/// (YYYY-MM-DD, HHMMSS) in UTC (Howard Hinnant's days-to-civil algorithm).
pub fn utc_date_time(unix_ms: u64) -> (String, String) {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(name: Option<&Path>) -> TemplateValues<'_> {
        TemplateValues {
            pipeline: "cam",
            wall_ms: 1_795_000_000_000, // 2026-11-18 11:06:40 UTC
            sequence: 42,
            name,
        }
    }

    #[test]
    fn renders_fields() {
        let t = PathTemplate::parse("{pipeline}/{date}/{time}-{frame}").expect("valid");
        assert_eq!(
            t.render(&values(None)),
            PathBuf::from("cam/2026-11-18/110640-00000042")
        );
        let t = PathTemplate::parse("{name}").expect("valid");
        assert_eq!(
            t.render(&values(Some(Path::new("sub/dir/img.jpg")))),
            PathBuf::from("sub/dir/img.jpg")
        );
        assert_eq!(utc_date_time(0), ("1970-01-01".into(), "000000".into()));
        assert_eq!(utc_date_time(951_782_400_000).0, "2000-02-29");
    }

    #[test]
    fn nothing_escapes_the_root() {
        for bad in [
            "/abs/{frame}",
            "../{frame}",
            "a/../../{frame}",
            "{nope}",
            "{frame",
            "x}",
            "{pipeline}/{date}",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
        let t = PathTemplate::parse("{name}").expect("valid");
        let rendered = t.render(&values(Some(Path::new("../../etc/pass wd"))));
        assert_eq!(rendered, PathBuf::from("etc/pass%20wd"));
        assert!(rendered
            .components()
            .all(|c| matches!(c, Component::Normal(_))));
        let hidden = t.render(&values(Some(Path::new(".hidden"))));
        assert_eq!(hidden, PathBuf::from("%2Ehidden"));
    }

    #[test]
    fn distinct_names_render_distinct_paths() {
        let t = PathTemplate::parse("{date}/{name}").expect("valid");
        let names = [
            "shot.2026.01.png",
            "shot.2026.02.png",
            "x.png",
            "x.jpg",
            "a b.png",
            "a_b.png",
            "a%20b.png",
            "_x.png",
            ".x.png",
            "sub/x.png",
            "sub_x.png",
            "é.png",
        ];
        let rendered: std::collections::BTreeSet<PathBuf> = names
            .iter()
            .map(|n| t.render(&values(Some(Path::new(n)))))
            .collect();
        assert_eq!(rendered.len(), names.len(), "{rendered:?}");
        assert!(rendered.contains(&PathBuf::from("2026-11-18/shot.2026.01.png")));
        assert!(rendered.contains(&PathBuf::from("2026-11-18/é.png")));
    }
}
