//! `POST /v1/segment`'s parameters, from the query string and from a multipart upload's text fields alike (one
//! parser, so both accept the same names, values and ranges):
//!
//! - `queries=a,b` or repeated `query=a`: the queries; or `pipeline=<name>`: a running pipeline's.
//! - `bg_thresh=<0..1>`, `kp_weight=<0..1>`, `pamr=true|false`: the engine settings a pipeline's config sets.
//! - repeated `threshold=<query>:<0..1>`: a query's own threshold (its pixels scoring under it become
//!   background), as `threshold` in a `[[query]]` table. Named rather than listed in order, so it reads the same
//!   with `?pipeline=` and cannot slip onto the wrong query; the value follows the last `:`, so a query name may
//!   hold one.
//!
//! The ranges are `config check`'s (`config::validate::ranges`); a value outside is refused with the parameter
//! and the range named.

use crate::config::validate::{ranges, Range};
use crate::model::SettingsOverrides;

/// Every parameter name, as the refusal of an unknown one lists them.
pub(super) const NAMES: &str = "queries, query, pipeline, bg_thresh, kp_weight, pamr, threshold";

/// Where the queries come from.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum QuerySource {
    Names(Vec<String>),
    Pipeline(String),
}

/// What a request asked for, checked.
#[derive(Debug, Clone)]
pub(super) struct Asked {
    pub queries: QuerySource,
    /// `pamr`, `bg_thresh`, `kp_weight`; None keeps the default (the bundle's, or the pipeline's).
    pub overrides: SettingsOverrides,
    /// (query name, threshold), as given.
    pub thresholds: Vec<(String, f32)>,
}

/// The parameters as they arrive, before the whole is checked (`asked`).
#[derive(Debug, Default)]
pub(super) struct Params {
    names: Vec<String>,
    pipeline: Option<String>,
    overrides: SettingsOverrides,
    thresholds: Vec<(String, f32)>,
}

impl Params {
    /// The parameters of a query string (`a=b&c=d`, percent-encoded, `+` for a space).
    pub fn from_query(query: Option<&str>) -> Result<Params, String> {
        let mut params = Params::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = value.replace('+', " ");
            let value = percent_encoding::percent_decode_str(&value)
                .decode_utf8()
                .map_err(|_| format!("the query parameter '{key}' is not UTF-8"))?;
            params.add(key, &value)?;
        }
        Ok(params)
    }

    /// True when `name` is a parameter (a multipart text field may carry it).
    pub fn known(name: &str) -> bool {
        NAMES.split(", ").any(|n| n == name)
    }

    /// One parameter; refuses an unknown name, a value that is not one, a setting given twice.
    pub fn add(&mut self, key: &str, value: &str) -> Result<(), String> {
        let value = value.trim();
        match key {
            "queries" => self
                .names
                .extend(value.split(',').map(|q| q.trim().to_string())),
            "query" => self.names.push(value.to_string()),
            "pipeline" => once(key, &mut self.pipeline, value.to_string())?,
            "pamr" => {
                let on = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("pamr: '{value}' is not true or false")),
                };
                once(key, &mut self.overrides.pamr, on)?;
            }
            "bg_thresh" => once(key, &mut self.overrides.bg_thresh, number(key, value)?)?,
            "kp_weight" => once(key, &mut self.overrides.kp_weight, number(key, value)?)?,
            "threshold" => {
                let Some((name, t)) = value.rsplit_once(':') else {
                    return Err(format!(
                        "threshold: '{value}' is not <query>:<value> (as threshold=car:0.6)"
                    ));
                };
                let name = name.trim();
                let key = format!("threshold of '{name}'");
                let t = number(&key, t.trim())?;
                if self
                    .thresholds
                    .iter()
                    .any(|(n, _)| n.to_lowercase() == name.to_lowercase())
                {
                    return Err(format!("{key} is given twice"));
                }
                self.thresholds.push((name.to_string(), t));
            }
            other => return Err(format!("unknown parameter '{other}' ({NAMES})")),
        }
        Ok(())
    }

    /// The whole checked: queries or a pipeline, never both nor neither.
    pub fn asked(self) -> Result<Asked, String> {
        let mut names = self.names;
        names.retain(|q| !q.is_empty());
        let queries = match (self.pipeline, names.is_empty()) {
            (Some(_), false) => return Err("give either queries or a pipeline, not both".into()),
            (Some(name), true) => QuerySource::Pipeline(name),
            (None, false) => QuerySource::Names(names),
            (None, true) => return Err(
                "no queries: add queries=a,b (or query=a&query=b), or pipeline=<name> to use a \
                     running pipeline's queries"
                    .into(),
            ),
        };
        Ok(Asked {
            queries,
            overrides: self.overrides,
            thresholds: self.thresholds,
        })
    }
}

/// Sets a parameter that may be given once.
fn once<T>(key: &str, slot: &mut Option<T>, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{key} is given twice"));
    }
    *slot = Some(value);
    Ok(())
}

/// A value in `ranges::UNIT` (`bg_thresh`, `kp_weight` and query thresholds share it with the config).
fn number(key: &str, text: &str) -> Result<f32, String> {
    let range: Range = ranges::UNIT;
    let value: f32 = text
        .parse()
        .map_err(|_| format!("{key}: '{text}' is not a number in {range}"))?;
    if !range.contains(f64::from(value)) {
        return Err(format!("{key}: {value} is outside {range}"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(query: &str) -> Result<Asked, String> {
        Params::from_query(Some(query))?.asked()
    }

    #[test]
    fn queries_come_from_names_or_a_pipeline_never_both() {
        let names = |query: &str| asked(query).map(|a| a.queries);
        assert_eq!(
            names("queries=red%20square,blue+circle"),
            Ok(QuerySource::Names(vec![
                "red square".into(),
                "blue circle".into()
            ]))
        );
        assert_eq!(
            names("query=a&query=b"),
            Ok(QuerySource::Names(vec!["a".into(), "b".into()]))
        );
        assert_eq!(
            names("pipeline=cam"),
            Ok(QuerySource::Pipeline("cam".into()))
        );
        assert!(Params::from_query(None)
            .and_then(Params::asked)
            .expect_err("none")
            .contains("no queries"));
        assert!(names("queries=").is_err());
        assert!(names("pipeline=cam&query=a").is_err());
        assert!(names("pipeline=a&pipeline=b")
            .expect_err("twice")
            .contains("pipeline is given twice"));
        let unknown = names("colour=red").expect_err("unknown");
        assert!(unknown.contains("'colour'") && unknown.contains("bg_thresh"));
    }

    #[test]
    fn settings_and_thresholds_are_read_in_config_ranges() {
        let a = asked("queries=car,road&bg_thresh=0.7&kp_weight=0&pamr=false&threshold=car:0.6")
            .expect("valid");
        assert_eq!(a.overrides.bg_thresh, Some(0.7));
        assert_eq!(a.overrides.kp_weight, Some(0.0));
        assert_eq!(a.overrides.pamr, Some(false));
        assert_eq!(a.thresholds, vec![("car".to_string(), 0.6)]);
        // A name holding a colon: the value follows the last one.
        let a = asked("query=time:%20noon&threshold=time:%20noon:1").expect("valid");
        assert_eq!(a.thresholds, vec![("time: noon".to_string(), 1.0)]);

        for (query, says) in [
            (
                "queries=a&bg_thresh=1.5",
                "bg_thresh: 1.5 is outside [0, 1]",
            ),
            (
                "queries=a&kp_weight=-0.1",
                "kp_weight: -0.1 is outside [0, 1]",
            ),
            (
                "queries=a&bg_thresh=NaN",
                "bg_thresh: NaN is outside [0, 1]",
            ),
            (
                "queries=a&bg_thresh=high",
                "bg_thresh: 'high' is not a number in [0, 1]",
            ),
            ("queries=a&pamr=yes", "pamr: 'yes' is not true or false"),
            (
                "queries=a&threshold=a:2",
                "threshold of 'a': 2 is outside [0, 1]",
            ),
            ("queries=a&threshold=0.5", "is not <query>:<value>"),
            ("queries=a&threshold=a:0.1&threshold=A:0.2", "given twice"),
            (
                "queries=a&bg_thresh=0.1&bg_thresh=0.2",
                "bg_thresh is given twice",
            ),
        ] {
            let why = asked(query).expect_err(query);
            assert!(why.contains(says), "{query}: {why}");
        }
    }
}
