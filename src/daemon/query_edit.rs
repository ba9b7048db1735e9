//! `PUT /v1/pipelines/{name}/queries`: the live page's query editor (issue 18). The new queries are written into
//! the config file itself, then applied by the same reload as SIGHUP and `POST /reload`.
//!
//! Why the config file and not an override file beside it: the file stays the one place that says what runs,
//! `tclseg config check` and a reload read the edit like any other, and an operator reading the file sees the
//! queries that run. The edit keeps the file's comments and layout (`toml_edit`): only the pipeline's `queries`
//! value is replaced (comments inside that array go with it), each query as a plain string when it is only a
//! name, else an inline table, one per line when the old array was laid out so.
//!
//! Order of work, so that a refused edit changes nothing: the body is checked; the pipeline must be in the
//! running config; the pipelines must not come from the environment (`TCLSEG_PIPELINE…`: the file would not be
//! what runs, so 409); the file on disk must still load to the pipelines that run (else it was edited since the
//! last load: 409, reload or fix it first, rather than apply someone's half-made edit); the edited text is
//! written to a temporary file beside the config (same mode), validated exactly as `config check` validates
//! (`config::load`, 400 with its errors), fsync'd and renamed over the config; then the reload runs and its
//! outcome is the reply. Edits run one at a time.

use std::io::Write;
use std::path::{Path, PathBuf};

use axum::extract::{Path as RoutePath, State as Extract};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use toml_edit::{Array, DocumentMut, InlineTable, Item, Value};

use super::http::{authorize, json_reply, run_reload, Ctx};
use super::session::page_off;
use crate::config::{self, PipelineConfig};
use crate::shard::Shard;
use crate::sink::atomic::temp_file_in;

/// Edits run one at a time: each reads, checks and replaces the whole file.
static EDITS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The environment variables that would override `[[pipeline]]` tables (`config::load`'s prefix and separator).
const PIPELINE_ENV_PREFIX: &str = "TCLSEG_PIPELINE";

/// The request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Edit {
    queries: Vec<EditEntry>,
}

/// A query as the config file takes it: a bare name, or a table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum EditEntry {
    Name(String),
    Query(EditQuery),
}

impl EditEntry {
    fn into_query(self) -> EditQuery {
        match self {
            EditEntry::Name(name) => EditQuery {
                name,
                colour: None,
                prompts: None,
                threshold: None,
                background: false,
            },
            EditEntry::Query(q) => q,
        }
    }
}

/// One query as the page sends it (what `[[pipeline]] queries` takes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EditQuery {
    name: String,
    #[serde(default)]
    colour: Option<String>,
    #[serde(default)]
    prompts: Option<Vec<String>>,
    #[serde(default)]
    threshold: Option<f64>,
    #[serde(default)]
    background: bool,
}

/// Why an edit was refused: the status and what to say.
#[derive(Debug)]
struct Refused {
    code: StatusCode,
    errors: Vec<String>,
}

impl Refused {
    fn new(code: StatusCode, error: impl Into<String>) -> Refused {
        Refused {
            code,
            errors: vec![error.into()],
        }
    }
}

/// `PUT /v1/pipelines/{name}/queries`.
pub async fn put(
    Extract(ctx): Extract<Ctx>,
    RoutePath(name): RoutePath<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !ctx.state.access.page {
        return page_off();
    }
    if let Some(refused) = authorize(&ctx.state, &headers, "PUT /v1/pipelines/{name}/queries") {
        return refused;
    }
    let edit = match serde_json::from_str::<Edit>(&body) {
        Ok(e) => e,
        Err(e) => {
            return refusal(Refused::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not {{\"queries\": [\"name\" or {{\"name\", \"colour\"?, \"prompts\"?, \"threshold\"?, \"background\"?}}]}}: {e}"
                ),
            ))
        }
    };
    let Some(running) = ctx.state.live.config_of(&name) else {
        return refusal(Refused::new(
            StatusCode::NOT_FOUND,
            format!(
                "no pipeline '{}' in the running config",
                name.chars().take(64).collect::<String>()
            ),
        ));
    };
    if let Some(var) = pipeline_override(std::env::vars_os().map(|(k, _)| k)) {
        return refusal(Refused::new(
            StatusCode::CONFLICT,
            format!(
                "the pipelines are overridden from the environment ({var}): the config file is not what runs, so \
                 the page does not edit it; change the queries where {var} is set"
            ),
        ));
    }
    let Some(path) = ctx.state.live.config_path() else {
        return refusal(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is still starting",
        ));
    };
    let _one_at_a_time = EDITS.lock().await;
    let configs = ctx.state.live.configs();
    let shard = ctx.state.shard();
    let queries: Vec<EditQuery> = edit
        .queries
        .into_iter()
        .map(EditEntry::into_query)
        .collect();
    let written =
        tokio::task::spawn_blocking(move || edit_file(&path, shard, &running, &configs, &queries))
            .await
            .unwrap_or_else(|e| {
                Err(Refused::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the edit panicked: {e}"),
                ))
            });
    match written {
        Ok(file) => {
            tracing::info!(pipeline = %name, "queries edited over HTTP and written to {}; reloading", file.display());
            run_reload(&ctx).await
        }
        Err(refused) => refusal(refused),
    }
}

/// The first environment variable that overrides `[[pipeline]]` tables, if any (names that are not UTF-8 are
/// compared as far as they are).
fn pipeline_override(names: impl Iterator<Item = std::ffi::OsString>) -> Option<String> {
    names
        .map(|k| k.to_string_lossy().into_owned())
        .find(|k| k.to_ascii_uppercase().starts_with(PIPELINE_ENV_PREFIX))
}

fn refusal(refused: Refused) -> Response {
    json_reply(refused.code, json!({ "errors": refused.errors }))
}

/// Checks that the file still holds what runs (this daemon's share of it under `serve --shard`), writes the new
/// queries of `pipeline` into it and validates the result before it replaces the file. Returns the file written
/// (the config's real path).
fn edit_file(
    path: &Path,
    shard: Option<Shard>,
    pipeline: &PipelineConfig,
    running: &[PipelineConfig],
    queries: &[EditQuery],
) -> Result<PathBuf, Refused> {
    let conflict = |why: String| Refused::new(StatusCode::CONFLICT, why);
    let real = std::fs::canonicalize(path).map_err(|e| {
        conflict(format!(
            "cannot find the config file {}: {e}",
            path.display()
        ))
    })?;
    let on_disk = config::load(&real).map(|(mut on_disk, mut plans)| {
        super::shard::keep_share(shard, &mut on_disk, &mut plans);
        on_disk
    });
    match on_disk {
        Ok(on_disk) if on_disk.pipelines == running => {}
        Ok(_) => {
            return Err(conflict(format!(
                "{} changed on disk since it was loaded: reload it first (SIGHUP or POST /reload), then edit",
                real.display()
            )))
        }
        Err(e) => {
            return Err(Refused {
                code: StatusCode::CONFLICT,
                errors: std::iter::once(format!(
                    "{} changed on disk since it was loaded and no longer loads; fix it first:",
                    real.display()
                ))
                .chain(e.errors)
                .collect(),
            })
        }
    }
    let text = std::fs::read_to_string(&real)
        .map_err(|e| conflict(format!("cannot read {}: {e}", real.display())))?;
    let edited = with_queries(&text, &pipeline.name, queries).map_err(conflict)?;
    let dir = real.parent().unwrap_or_else(|| Path::new("."));
    let cannot_write = |e: std::io::Error| {
        Refused::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "cannot write {} ({e}): the daemon needs write access to the config file's folder to save edits",
                real.display()
            ),
        )
    };
    let mut tmp = temp_file_in(dir).map_err(cannot_write)?;
    let permissions = std::fs::metadata(&real)
        .map_err(cannot_write)?
        .permissions();
    tmp.write_all(edited.as_bytes())
        .and_then(|()| std::fs::set_permissions(tmp.path(), permissions))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(cannot_write)?;
    // The whole file is validated as `config check` would: the new queries, and whatever else they touch.
    if let Err(e) = config::load(tmp.path()) {
        return Err(Refused {
            code: StatusCode::BAD_REQUEST,
            errors: e.errors,
        });
    }
    tmp.persist(&real).map_err(|e| cannot_write(e.error))?;
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!("the config folder {} was not synced: {e}", dir.display());
    }
    Ok(real)
}

/// `text` with the `queries` of the `[[pipeline]]` named `name` replaced, everything else as it was.
fn with_queries(text: &str, name: &str, queries: &[EditQuery]) -> Result<String, String> {
    let mut doc: DocumentMut = text
        .parse()
        .map_err(|e| format!("the config file does not parse as TOML: {e}"))?;
    let tables = doc
        .get_mut("pipeline")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or("the config file has no [[pipeline]] tables the page can edit")?;
    let table = tables
        .iter_mut()
        .find(|t| t.get("name").and_then(Item::as_str) == Some(name))
        .ok_or_else(|| format!("no [[pipeline]] named '{name}' in the config file"))?;
    let old = table.get("queries").and_then(Item::as_array);
    // One query per line when the operator wrote them so (the first element starts on a new line).
    let indent = old
        .and_then(|a| a.get(0))
        .and_then(|v| v.decor().prefix())
        .and_then(|p| p.as_str())
        .filter(|p| p.contains('\n'))
        .map(str::to_string);
    let mut array = Array::new();
    for (i, q) in queries.iter().enumerate() {
        let mut value = query_value(q);
        let prefix = match (&indent, i) {
            (Some(indent), _) => indent.as_str(),
            (None, 0) => "",
            (None, _) => " ",
        };
        value.decor_mut().set_prefix(prefix);
        value.decor_mut().set_suffix("");
        array.push_formatted(value);
    }
    if let Some(old) = old {
        *array.decor_mut() = old.decor().clone();
        if indent.is_some() {
            array.set_trailing_comma(true);
            array.set_trailing(old.trailing().as_str().unwrap_or("\n"));
        }
    } else {
        array.decor_mut().set_prefix(" ");
    }
    table.insert("queries", Item::Value(Value::Array(array)));
    Ok(doc.to_string())
}

/// A query as the config writes it: a plain string when it is only a name, else an inline table.
fn query_value(q: &EditQuery) -> Value {
    let name = q.name.trim();
    let prompts = q.prompts.as_ref().filter(|p| !p.is_empty());
    if q.colour.is_none() && prompts.is_none() && q.threshold.is_none() && !q.background {
        return Value::from(name);
    }
    let mut table = InlineTable::new();
    table.insert("name", Value::from(name));
    if let Some(colour) = &q.colour {
        table.insert("colour", Value::from(colour.trim()));
    }
    if let Some(prompts) = prompts {
        table.insert(
            "prompts",
            Value::Array(prompts.iter().map(String::as_str).collect()),
        );
    }
    if let Some(t) = q.threshold {
        table.insert("threshold", Value::from(t));
    }
    if q.background {
        table.insert("background", Value::from(true));
    }
    table.fmt();
    Value::InlineTable(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> EditQuery {
        EditQuery {
            name: name.into(),
            colour: None,
            prompts: None,
            threshold: None,
            background: false,
        }
    }

    const FILE: &str = r##"# cameras at home
[http]
listen = "127.0.0.1:9480"   # loopback only

[[pipeline]]
name = "door"
source = "rtsp://cam/1"
queries = ["person", { name = "car", colour = "#ff8800" }]  # what matters at the door
[pipeline.output]
dir = "/tmp/door"   # keep

[[pipeline]]
name = "yard"
source = "rtsp://cam/2"
queries = [
    "dog",
    "cat",
]
[pipeline.output]
dir = "/tmp/yard"
"##;

    #[test]
    fn only_the_pipelines_queries_change_and_comments_stay() {
        let mut car = q("car");
        car.threshold = Some(0.6);
        car.prompts = Some(vec!["a car".into()]);
        let edited = with_queries(FILE, "door", &[q("person"), car, q("bike")]).expect("edit");
        assert_eq!(
            edited,
            FILE.replace(
                r##"queries = ["person", { name = "car", colour = "#ff8800" }]"##,
                r##"queries = ["person", { name = "car", prompts = ["a car"], threshold = 0.6 }, "bike"]"##
            )
        );
    }

    #[test]
    fn a_multi_line_array_stays_one_query_per_line() {
        let mut fox = q("fox");
        fox.colour = Some("#00ff00".into());
        let edited = with_queries(FILE, "yard", &[q("dog"), fox]).expect("edit");
        assert!(
            edited.contains(
                "queries = [\n    \"dog\",\n    { name = \"fox\", colour = \"#00ff00\" },\n]\n"
            ),
            "{edited}"
        );
        assert!(edited.starts_with("# cameras at home\n"));
    }

    #[test]
    fn only_pipeline_overrides_in_the_environment_stop_an_edit() {
        let names = |list: &[&str]| {
            list.iter()
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(
            pipeline_override(names(&[
                "TCLSEG_LOG",
                "TCLSEG_INFERENCE__MAX_BATCH",
                "PATH"
            ])),
            None
        );
        assert_eq!(
            pipeline_override(names(&["HOME", "TCLSEG_PIPELINE__0__QUERIES"])),
            Some("TCLSEG_PIPELINE__0__QUERIES".into())
        );
    }

    #[test]
    fn a_pipeline_not_in_the_file_is_refused() {
        let err = with_queries(FILE, "garage", &[q("x")]).expect_err("missing");
        assert!(err.contains("garage"), "{err}");
    }
}
