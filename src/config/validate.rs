//! Checks that no value accepted here can wreck the daemon later: every numeric key has a range (one table,
//! `ranges`), config seconds become `Duration`s through one function that cannot panic (`duration`), the
//! paths that must exist do, and an HTTP port reachable from other machines has a token for its mutating
//! endpoints. Errors name the key and what is accepted.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::ServeConfig;

/// The values a numeric key accepts: `min` (excluded when `min_open`) to `max` (included). NaN is never inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    pub min: f64,
    pub min_open: bool,
    pub max: f64,
}

impl Range {
    const fn closed(min: f64, max: f64) -> Range {
        Range {
            min,
            min_open: false,
            max,
        }
    }

    /// Above `min` (excluded), at most `max`.
    const fn above(min: f64, max: f64) -> Range {
        Range {
            min,
            min_open: true,
            max,
        }
    }

    pub fn contains(&self, v: f64) -> bool {
        let above_min = if self.min_open {
            v > self.min
        } else {
            v >= self.min
        };
        above_min && v <= self.max
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let open = if self.min_open { '(' } else { '[' };
        write!(f, "{open}{}, {}]", self.min, self.max)
    }
}

/// Every numeric key's range. The upper bounds are far above any sane setting and far below what would make
/// the daemon misbehave (threads that never finish spawning, `Instant` overflow, a drain that never ends).
pub mod ranges {
    use super::Range;

    /// `model.threads` (0: one per core). More than 256 intra-op threads per session buys nothing on any
    /// machine and, times five sessions, exhausts memory.
    pub const THREADS: Range = Range::closed(0.0, 256.0);
    /// `model.crop_batch` (0: per device).
    pub const CROP_BATCH: Range = Range::closed(0.0, 1024.0);
    /// `inference.max_batch`.
    pub const MAX_BATCH: Range = Range::closed(1.0, 64.0);
    /// `inference.max_wait_ms`: a partial batch waiting longer than 10 s is a mistake, not a tuning.
    pub const MAX_WAIT_MS: Range = Range::closed(0.0, 10_000.0);
    /// `http.segment_max_mb`: an upload is held in memory whole.
    pub const SEGMENT_MAX_MB: Range = Range::closed(1.0, 1024.0);
    /// `http.segment_max_pixels`: at most what any decoder here accepts.
    pub const SEGMENT_MAX_PIXELS: Range =
        Range::closed(1.0, crate::source::decode::DEFAULT_MAX_PIXELS as f64);
    /// `http.segment_queue`: each waiting image is held decoded in memory.
    pub const SEGMENT_QUEUE: Range = Range::closed(1.0, 256.0);
    /// `inference.drain_timeout_s`: systemd's own stop timeout is far shorter than an hour.
    pub const DRAIN_TIMEOUT_S: Range = Range::above(0.0, 3600.0);
    /// `bg_thresh`, `kp_weight`.
    pub const UNIT: Range = Range::closed(0.0, 1.0);
    /// `max_fps`.
    pub const MAX_FPS: Range = Range::above(0.0, 1000.0);
    /// `watchdog_s`: shorter than 0.1 s restarts a healthy 10 fps source between frames.
    pub const WATCHDOG_S: Range = Range::closed(0.1, 86_400.0);
    /// `backoff_initial_s`, `backoff_max_s`.
    pub const BACKOFF_S: Range = Range::closed(0.01, 86_400.0);
    /// `output.retention_hours`: up to ten years.
    pub const RETENTION_HOURS: Range = Range::above(0.0, 87_600.0);
    /// `folder_settle_s`: how long a watched folder's file must hold still; 0 takes files at once.
    pub const FOLDER_SETTLE_S: Range = Range::closed(0.0, 3600.0);
    /// `output.retention_mb`: up to 1 PB.
    pub const RETENTION_MB: Range = Range::above(0.0, 1e9);
}

/// A config key's time value (`unit_s` seconds each: 1 for `*_s`, 3600 for `*_hours`, 0.001 for `*_ms`) →
/// `Duration`, for every place config times become durations. The value is clamped into the key's range
/// first: validation has refused anything outside it, and clamping here means a value that skipped validation
/// (NaN, `inf`, `1e300`) still cannot panic (`Duration::from_secs_f64` does) or overflow an `Instant` later.
pub fn duration(value: f64, range: Range, unit_s: f64) -> Duration {
    let clamped = if value.is_nan() {
        range.min
    } else {
        value.clamp(range.min, range.max)
    };
    Duration::try_from_secs_f64(clamped * unit_s).unwrap_or(Duration::ZERO)
}

/// `key: value is outside range` when it is.
fn check(errors: &mut Vec<String>, key: &str, value: f64, range: Range) {
    if !range.contains(value) {
        errors.push(format!("{key}: {value} is outside {range}"));
    }
}

/// Every numeric key against its range.
pub fn check_ranges(cfg: &ServeConfig) -> Vec<String> {
    let mut errors = Vec::new();
    let m = &cfg.model;
    check(
        &mut errors,
        "model.threads",
        m.threads as f64,
        ranges::THREADS,
    );
    check(
        &mut errors,
        "model.crop_batch",
        m.crop_batch as f64,
        ranges::CROP_BATCH,
    );
    let inf = &cfg.inference;
    check(
        &mut errors,
        "inference.max_batch",
        inf.max_batch as f64,
        ranges::MAX_BATCH,
    );
    check(
        &mut errors,
        "inference.max_wait_ms",
        inf.max_wait_ms as f64,
        ranges::MAX_WAIT_MS,
    );
    check(
        &mut errors,
        "inference.drain_timeout_s",
        inf.drain_timeout_s,
        ranges::DRAIN_TIMEOUT_S,
    );
    let http = &cfg.http;
    for (key, value, range) in [
        (
            "http.segment_max_mb",
            http.segment_max_mb as f64,
            ranges::SEGMENT_MAX_MB,
        ),
        (
            "http.segment_max_pixels",
            http.segment_max_pixels as f64,
            ranges::SEGMENT_MAX_PIXELS,
        ),
        (
            "http.segment_queue",
            http.segment_queue as f64,
            ranges::SEGMENT_QUEUE,
        ),
    ] {
        check(&mut errors, key, value, range);
    }
    for (i, p) in cfg.pipelines.iter().enumerate() {
        let at = format!("pipeline[{i}] '{}'", p.name);
        let optional = [
            ("bg_thresh", p.bg_thresh.map(f64::from), ranges::UNIT),
            ("kp_weight", p.kp_weight.map(f64::from), ranges::UNIT),
            ("max_fps", p.max_fps, ranges::MAX_FPS),
            (
                "folder_settle_s",
                p.folder_settle_s,
                ranges::FOLDER_SETTLE_S,
            ),
            (
                "output.retention_hours",
                p.output.retention_hours,
                ranges::RETENTION_HOURS,
            ),
            (
                "output.retention_mb",
                p.output.retention_mb,
                ranges::RETENTION_MB,
            ),
        ];
        let required = [
            ("watchdog_s", Some(p.watchdog_s), ranges::WATCHDOG_S),
            (
                "backoff_initial_s",
                Some(p.backoff_initial_s),
                ranges::BACKOFF_S,
            ),
            ("backoff_max_s", Some(p.backoff_max_s), ranges::BACKOFF_S),
        ];
        for (key, value, range) in optional.into_iter().chain(required) {
            if let Some(v) = value {
                check(&mut errors, &format!("{at}.{key}"), v, range);
            }
        }
    }
    errors
}

/// The range of a numeric key, by its name (the last part of a dotted key).
fn range_of(key: &str) -> Option<Range> {
    Some(match key.rsplit('.').next().unwrap_or(key) {
        "threads" => ranges::THREADS,
        "crop_batch" => ranges::CROP_BATCH,
        "max_batch" => ranges::MAX_BATCH,
        "max_wait_ms" => ranges::MAX_WAIT_MS,
        "drain_timeout_s" => ranges::DRAIN_TIMEOUT_S,
        "bg_thresh" | "kp_weight" => ranges::UNIT,
        "max_fps" => ranges::MAX_FPS,
        "watchdog_s" => ranges::WATCHDOG_S,
        "backoff_initial_s" | "backoff_max_s" => ranges::BACKOFF_S,
        "retention_hours" => ranges::RETENTION_HOURS,
        "retention_mb" => ranges::RETENTION_MB,
        "folder_settle_s" => ranges::FOLDER_SETTLE_S,
        "segment_max_mb" => ranges::SEGMENT_MAX_MB,
        "segment_max_pixels" => ranges::SEGMENT_MAX_PIXELS,
        "segment_queue" => ranges::SEGMENT_QUEUE,
        _ => return None,
    })
}

/// Keys whose field is an unsigned integer: a negative literal fails to load before validation can see it.
const UNSIGNED_KEYS: [&str; 4] = ["threads", "crop_batch", "max_batch", "max_wait_ms"];

/// Number literals the loader cannot take, named by their key (with the key's range where it has one): an
/// integer beyond 64 bits, a negative count, a float literal that overflows. The `config` crate reports those
/// as "number too large to fit in target type" with neither key nor line. A file that does not parse yields
/// nothing here: the loader reports the syntax error with its line.
pub fn check_number_literals(toml_text: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if let Ok(table) = toml::de::DeTable::parse(toml_text) {
        for (key, value) in table.get_ref() {
            walk_literals(value.get_ref(), key.get_ref(), &mut errors);
        }
    }
    errors
}

fn walk_literals(value: &toml::de::DeValue<'_>, key: &str, errors: &mut Vec<String>) {
    use toml::de::DeValue;
    let range = range_of(key);
    let outside = |shown: &dyn fmt::Display, why: &str| match range {
        Some(r) => format!("{key}: {shown} is outside {r}"),
        None => format!("{key}: {shown} {why}"),
    };
    match value {
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Err(_) => errors.push(outside(i, "does not fit in a 64-bit integer")),
            Ok(v) if v < 0 && UNSIGNED_KEYS.contains(&key.rsplit('.').next().unwrap_or(key)) => {
                errors.push(outside(i, "must not be negative"))
            }
            Ok(_) => {}
        },
        DeValue::Float(f) => {
            let overflows = f
                .as_str()
                .parse::<f64>()
                .map_or(true, |v| v.is_infinite() && !f.as_str().contains("inf"));
            if overflows {
                errors.push(outside(f, "is too large for a number"));
            }
        }
        DeValue::Table(table) => {
            for (k, v) in table {
                walk_literals(v.get_ref(), &format!("{key}.{}", k.get_ref()), errors);
            }
        }
        DeValue::Array(items) => {
            let items: &[toml::Spanned<toml::de::DeValue<'_>>] = items.as_ref();
            for (i, v) in items.iter().enumerate() {
                walk_literals(v.get_ref(), &format!("{key}[{i}]"), errors);
            }
        }
        DeValue::String(_) | DeValue::Boolean(_) | DeValue::Datetime(_) => {}
    }
}

/// Paths that must already be there: the model folder, and no output folder that names something else.
pub fn check_paths(cfg: &ServeConfig) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(dir) = &cfg.model.path {
        if !dir.is_dir() {
            errors.push(format!(
                "model.path: {} {}; give a model bundle folder (tclseg models list), or remove the key for the default model",
                dir.display(),
                if dir.exists() { "is not a folder" } else { "does not exist" }
            ));
        } else if !dir.join("model.toml").is_file() {
            errors.push(format!(
                "model.path: {} holds no model.toml, so it is not a model bundle",
                dir.display()
            ));
        }
    }
    for (i, p) in cfg.pipelines.iter().enumerate() {
        let dir = &p.output.dir;
        if dir.as_os_str().is_empty() {
            continue;
        }
        if let Some(blocker) = crate::sink::paths::file_in_the_way(dir) {
            errors.push(format!(
                "pipeline[{i}] '{}'.output.dir: {} is not a folder{}",
                p.name,
                blocker.display(),
                if blocker == dir.as_path() {
                    String::new()
                } else {
                    format!(" (so {} cannot be one)", dir.display())
                }
            ));
        }
    }
    errors
}

/// The shortest bearer token accepted: 16 characters, e.g. 12 random bytes in base64.
const MIN_TOKEN_CHARS: usize = 16;

/// The bearer token in `http.token_file`, trimmed. Errors never quote the file's contents.
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("http.token_file: cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.chars().count() < MIN_TOKEN_CHARS || token.chars().any(char::is_whitespace) {
        return Err(format!(
            "http.token_file: {} must hold one token of at least {MIN_TOKEN_CHARS} characters without spaces \
             (e.g. `head -c 24 /dev/urandom | base64 > {}`)",
            path.display(),
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// True for an address only this machine can reach.
pub fn is_loopback(listen: &SocketAddr) -> bool {
    listen.ip().is_loopback()
}

/// `http.listen` off loopback needs a token for the mutating endpoints; a token file must be readable.
pub fn check_http(cfg: &ServeConfig) -> Vec<String> {
    let mut errors = Vec::new();
    let http = &cfg.http;
    if let Some(file) = &http.token_file {
        if let Err(e) = read_token(file) {
            errors.push(e);
        }
    }
    if let Ok(addr) = http.listen.parse::<SocketAddr>() {
        if !is_loopback(&addr) && http.token_file.is_none() {
            errors.push(format!(
                "http.listen: {addr} is reachable from other machines, so POST /reload needs a bearer token: \
                 set http.token_file to a file holding one, or listen on 127.0.0.1"
            ));
        }
    }
    errors
}

/// What a valid config may still get wrong, for `config check` and the daemon's start-up log.
pub fn warnings(cfg: &ServeConfig) -> Vec<String> {
    let mut out = Vec::new();
    let http = &cfg.http;
    if let Ok(addr) = http.listen.parse::<SocketAddr>() {
        if !is_loopback(&addr) {
            out.push(format!(
                "http.listen: {addr} accepts connections from other machines: /livez, /readyz, /metrics and /status \
                 answer anyone who can reach it; POST /reload needs the bearer token"
            ));
        }
    }
    if let Some(file) = &http.token_file {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(file) {
            let mode = meta.permissions().mode();
            if mode & 0o004 != 0 {
                out.push(format!(
                    "http.token_file: {} is readable by every user (mode {:o}); chmod 600 it",
                    file.display(),
                    mode & 0o777
                ));
            }
        }
    }
    out.extend(super::events::warnings(cfg));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_never_panic_and_stay_in_range() {
        let r = ranges::DRAIN_TIMEOUT_S;
        for v in [
            f64::INFINITY,
            1e300,
            f64::MAX,
            f64::NAN,
            -1.0,
            f64::NEG_INFINITY,
        ] {
            let d = duration(v, r, 1.0);
            assert!(d <= Duration::from_secs(3600), "{v}: {d:?}");
        }
        assert_eq!(duration(2.5, r, 1.0), Duration::from_millis(2500));
        assert_eq!(
            duration(f64::INFINITY, ranges::RETENTION_HOURS, 3600.0),
            Duration::from_secs(87_600 * 3600)
        );
    }

    #[test]
    fn literals_the_loader_cannot_take_are_named_with_their_range() {
        let errors = check_number_literals(
            "[model]\nthreads = 99999999999999999999999\ncrop_batch = -1\n[[pipeline]]\nname = \"a\"\nmax_fps = 1e400\nother = 0x7fffffffffffffffff\n",
        );
        let mut errors = errors;
        errors.sort();
        assert_eq!(
            errors,
            [
                "model.crop_batch: -1 is outside [0, 1024]",
                "model.threads: 99999999999999999999999 is outside [0, 256]",
                "pipeline[0].max_fps: 1e400 is outside (0, 1000]",
                "pipeline[0].other: 0x7fffffffffffffffff does not fit in a 64-bit integer",
            ]
        );
        assert!(check_number_literals("threads = 2\nx = = 1").is_empty());
    }

    #[test]
    fn ranges_refuse_nan_and_infinity_and_print_their_bounds() {
        assert!(!ranges::MAX_FPS.contains(f64::NAN));
        assert!(!ranges::MAX_FPS.contains(0.0));
        assert!(ranges::MAX_FPS.contains(1000.0));
        assert!(!ranges::RETENTION_HOURS.contains(f64::INFINITY));
        assert_eq!(ranges::DRAIN_TIMEOUT_S.to_string(), "(0, 3600]");
        assert_eq!(ranges::THREADS.to_string(), "[0, 256]");
    }
}
