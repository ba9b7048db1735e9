//! Query sets, shared by `segment`, the daemon's pipelines and `eval`: names from `-q`, or `[[query]]` tables (a
//! file, or a pipeline's config) with prompts, colours, per-query thresholds and explicit background prompts; and
//! what a set makes of a segmentation: output labels and per-label statistics.
//!
//! ```toml
//! [[query]]
//! name = "cat"
//! [[query]]
//! name = "road"
//! prompts = ["a photo of a road.", "asphalt"]   # default: the bundle's templates around the name
//! colour = "#ff8800"                             # default: the VOC colour of its label
//! threshold = 0.6                                # pixels scoring under it become background
//! [[query]]
//! name = "sky"
//! background = true                              # an explicit background prompt: its pixels are label 0
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::model::{Query, Segmentation};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    pub name: String,
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default)]
    pub colour: Option<String>,
    #[serde(default)]
    pub threshold: Option<f32>,
    #[serde(default)]
    pub background: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryFile {
    query: Vec<QuerySpec>,
}

/// The longest query name, in characters: names label files, sidecars, metrics and MQTT topics, and the live
/// page shows them; a longer description belongs in `prompts`.
pub const MAX_NAME_CHARS: usize = 64;

/// A palette colour. The palette belongs to the query set: label k is painted in query k's colour.
pub type Rgb = [u8; 3];

/// The PASCAL VOC colour map: distinct, stable colours for class indices (0 is black).
pub fn default_colour(index: usize) -> Rgb {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = index;
    for j in 0..8 {
        r |= ((c & 1) as u8) << (7 - j);
        g |= (((c >> 1) & 1) as u8) << (7 - j);
        b |= (((c >> 2) & 1) as u8) << (7 - j);
        c >>= 3;
    }
    [r, g, b]
}

/// A checked query set: the engine's queries in order, and what each becomes in the label map.
#[derive(Debug, Clone)]
pub struct QuerySet {
    pub specs: Vec<QuerySpec>,
    /// Output label of each spec: 0 for background prompts, else 1, 2, ... in order.
    pub labels: Vec<u16>,
    /// Colour of each output label (index 0: background, black).
    pub palette: Vec<Rgb>,
}

impl QuerySet {
    pub fn from_names(names: &[String]) -> Result<QuerySet> {
        QuerySet::new(
            names
                .iter()
                .map(|n| QuerySpec {
                    name: n.clone(),
                    prompts: Vec::new(),
                    colour: None,
                    threshold: None,
                    background: false,
                })
                .collect(),
        )
    }

    pub fn from_file(path: &Path) -> Result<QuerySet> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the query file {}", path.display()))?;
        let file: QueryFile = toml::from_str(&text).map_err(|e| {
            anyhow!(
                "query file {}: {} (expected [[query]] tables with name, and optionally prompts, colour, \
                 threshold, background)",
                path.display(),
                e.message()
            )
        })?;
        QuerySet::new(file.query).with_context(|| format!("query file {}", path.display()))
    }

    /// Checks a list of specs (names unique and non-empty, thresholds in 0..1, colours well-formed).
    pub fn new(specs: Vec<QuerySpec>) -> Result<QuerySet> {
        if specs.iter().all(|s| s.background) {
            bail!("no queries: name at least one thing to segment (-q NAME or --queries FILE)");
        }
        let mut seen = BTreeSet::new();
        let mut labels = Vec::with_capacity(specs.len());
        let mut palette = vec![[0u8, 0, 0]];
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.name.trim();
            if name.is_empty() {
                bail!("query {} has an empty name", i + 1);
            }
            if name.chars().count() > MAX_NAME_CHARS {
                let start: String = name.chars().take(20).collect();
                bail!(
                    "query '{start}…' has a name of {} characters; keep names to {MAX_NAME_CHARS} and put longer \
                     descriptions in its prompts",
                    name.chars().count()
                );
            }
            if !seen.insert(name.to_lowercase()) {
                bail!("query '{name}' is given twice; each query must be unique");
            }
            if spec.prompts.iter().any(|p| p.trim().is_empty()) {
                bail!("query '{name}' has an empty prompt");
            }
            if let Some(t) = spec.threshold {
                if !(0.0..=1.0).contains(&t) {
                    bail!("query '{name}': threshold {t} is outside 0..1");
                }
            }
            if spec.background {
                labels.push(0);
                continue;
            }
            let label = palette.len() as u16;
            let colour = match &spec.colour {
                Some(text) => parse_colour(text).with_context(|| format!("query '{name}'"))?,
                None => default_colour(label as usize),
            };
            labels.push(label);
            palette.push(colour);
        }
        Ok(QuerySet {
            specs,
            labels,
            palette,
        })
    }

    /// True when background comes from explicit prompts rather than a threshold.
    pub fn has_background_prompts(&self) -> bool {
        self.specs.iter().any(|s| s.background)
    }

    /// Engine queries, in spec order.
    pub fn engine_queries(&self) -> Vec<Query> {
        self.specs
            .iter()
            .map(|s| Query {
                name: s.name.trim().to_string(),
                prompts: s.prompts.clone(),
            })
            .collect()
    }

    /// Number of output labels, background included.
    pub fn label_count(&self) -> usize {
        self.palette.len()
    }

    /// Maps engine classes to output labels (background prompts → 0) and applies per-query thresholds.
    /// `background_class`: the engine prepended a threshold background as class 0.
    pub fn output_labels(&self, seg: &Segmentation, background_class: bool) -> Vec<u16> {
        let offset = usize::from(background_class);
        seg.labels
            .iter()
            .zip(&seg.best)
            .map(|(&class, &score)| {
                let class = class as usize;
                if class < offset {
                    return 0;
                }
                let q = class - offset;
                match self.specs[q].threshold {
                    Some(t) if score < t => 0,
                    _ => self.labels[q],
                }
            })
            .collect()
    }
}

/// `#rrggbb` or `rrggbb`.
fn parse_colour(text: &str) -> Result<Rgb> {
    let hex = text.trim().trim_start_matches('#');
    if hex.len() != 6 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("colour '{text}' is not of the form #rrggbb");
    }
    let byte = |i: usize| {
        u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| anyhow!("colour '{text}': {e}"))
    };
    Ok([byte(0)?, byte(2)?, byte(4)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_labels_and_colours() {
        let set = QuerySet::from_names(&["cat".into(), "dog".into()]).expect("valid");
        assert_eq!(set.labels, [1, 2]);
        assert_eq!(set.palette, [[0, 0, 0], [128, 0, 0], [0, 128, 0]]);
    }

    #[test]
    fn bad_lists_are_refused_with_reasons() {
        let err = QuerySet::from_names(&[]).expect_err("empty");
        assert!(err.to_string().contains("no queries"));
        let err = QuerySet::from_names(&["cat".into(), "Cat ".into()]).expect_err("dup");
        assert!(err.to_string().contains("twice"));
        let err = QuerySet::from_names(&["  ".into()]).expect_err("blank");
        assert!(err.to_string().contains("empty name"));
        let err = QuerySet::from_names(&["x".repeat(MAX_NAME_CHARS + 1)]).expect_err("long");
        assert!(err.to_string().contains("65 characters"), "{err}");
        assert!(QuerySet::from_names(&["é".repeat(MAX_NAME_CHARS)]).is_ok());
    }

    #[test]
    fn file_with_prompts_colours_and_background() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("q.toml");
        std::fs::write(
            &path,
            "[[query]]\nname = \"sky\"\nbackground = true\n[[query]]\nname = \"road\"\nprompts = [\"asphalt\"]\ncolour = \"#ff8800\"\nthreshold = 0.6\n",
        )
        .expect("write");
        let set = QuerySet::from_file(&path).expect("valid");
        assert_eq!(set.labels, [0, 1]);
        assert_eq!(set.palette[1], [255, 136, 0]);
        assert!(set.has_background_prompts());

        std::fs::write(&path, "[[query]]\nname = \"x\"\ncolor = \"#fff\"\n").expect("write");
        let err = format!("{:#}", QuerySet::from_file(&path).expect_err("unknown key"));
        assert!(err.contains("q.toml") && err.contains("color"), "{err}");
    }
}
