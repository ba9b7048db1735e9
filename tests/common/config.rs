//! A `tclseg serve` config built key by key, so a test says which keys it sets instead of patching config text.
//! Values are TOML as written (`"max_fps = 5"`, `"overlay = \"jpg\""`); setting a key again replaces it.

use std::path::Path;

use super::{fixture_bundle, free_port};

/// The keys of one TOML table, in the order first set.
#[derive(Clone, Debug, Default)]
struct Table(Vec<(String, String)>);

impl Table {
    /// Sets every `key = value` line of `lines` (one or several lines).
    fn set(&mut self, lines: &str) {
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not a `key = value` line: {line}"));
            let (key, value) = (key.trim().to_string(), value.trim().to_string());
            match self.0.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => self.0.push((key, value)),
            }
        }
    }

    fn unset(&mut self, key: &str) {
        self.0.retain(|(k, _)| k != key);
    }

    fn render(&self, header: &str, out: &mut String) {
        out.push_str(header);
        out.push('\n');
        for (key, value) in &self.0 {
            out.push_str(&format!("{key} = {value}\n"));
        }
    }
}

/// A TOML string literal.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One `[[pipeline]]` table and its `[pipeline.output]`.
#[derive(Clone, Debug)]
pub struct Pipeline {
    name: String,
    keys: Table,
    output: Table,
}

impl Pipeline {
    /// A pipeline reading `source`, writing into `out`, asking for "red square" and "blue circle".
    pub fn new(name: &str, source: &str, out: &Path) -> Pipeline {
        let mut keys = Table::default();
        keys.set(&format!("name = {}", quoted(name)));
        keys.set(&format!("source = {}", quoted(source)));
        keys.set("queries = [\"red square\", \"blue circle\"]");
        let mut output = Table::default();
        output.set(&format!("dir = {}", quoted(&out.display().to_string())));
        Pipeline {
            name: name.to_string(),
            keys,
            output,
        }
    }

    /// A pipeline watching the folder `inbox` (created here).
    pub fn folder(name: &str, inbox: &Path, out: &Path) -> Pipeline {
        std::fs::create_dir_all(inbox).expect("inbox");
        Pipeline::new(name, &format!("folder://{}", inbox.display()), out)
    }

    /// Sets pipeline keys (`"max_fps = 5"`, several lines allowed).
    pub fn with(mut self, lines: &str) -> Pipeline {
        self.keys.set(lines);
        self
    }

    /// Sets `[pipeline.output]` keys.
    pub fn output(mut self, lines: &str) -> Pipeline {
        self.output.set(lines);
        self
    }

    /// A camera that is noticed quickly when it stops (`watchdog_s`) and retried quickly (0.2 s up to 1 s).
    pub fn retrying(self, watchdog_s: f64) -> Pipeline {
        self.with(&format!(
            "watchdog_s = {watchdog_s}\nbackoff_initial_s = 0.2\nbackoff_max_s = 1"
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        self.keys.render("[[pipeline]]", &mut out);
        self.output.render("[pipeline.output]", &mut out);
        out
    }
}

/// A whole config: `[model]` on the tiny fixture bundle (CPU, one thread), `[inference]`, `[http]` on a free
/// loopback port, and the pipelines.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the daemon's HTTP listens on 127.0.0.1; 0 when HTTP is off or elsewhere.
    pub port: u16,
    model: Table,
    inference: Table,
    http: Table,
    pipelines: Vec<Pipeline>,
    /// TOML written after the pipelines as it is (the `[events]` tables).
    tail: String,
}

impl Default for Config {
    fn default() -> Self {
        Config::new()
    }
}

impl Config {
    pub fn new() -> Config {
        let port = free_port();
        let mut config = Config::bare();
        config.port = port;
        config.model.set(&format!(
            "path = {}\ndevice = \"cpu\"\nthreads = 1",
            quoted(&fixture_bundle().display().to_string())
        ));
        config.http.set(&format!("listen = \"127.0.0.1:{port}\""));
        config
    }

    /// No key at all: only what a test sets.
    pub fn bare() -> Config {
        Config {
            port: 0,
            model: Table::default(),
            inference: Table::default(),
            http: Table::default(),
            pipelines: Vec::new(),
            tail: String::new(),
        }
    }

    /// Sets `[model]` keys.
    pub fn model(mut self, lines: &str) -> Config {
        self.model.set(lines);
        self
    }

    pub fn model_unset(mut self, key: &str) -> Config {
        self.model.unset(key);
        self
    }

    /// Sets `[inference]` keys.
    pub fn inference(mut self, lines: &str) -> Config {
        self.inference.set(lines);
        self
    }

    /// Sets `[http]` keys.
    pub fn http(mut self, lines: &str) -> Config {
        self.http.set(lines);
        self
    }

    /// HTTP on `host` at this config's port (`0.0.0.0` to listen off loopback).
    pub fn listen_on(self, host: &str) -> Config {
        let port = self.port;
        self.http(&format!("listen = \"{host}:{port}\""))
    }

    /// `[http] token_file`: `token` written to `dir/http.token`, `chmod 600` as the daemon asks.
    pub fn token_file(self, dir: &Path, token: &str) -> Config {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.join("http.token");
        std::fs::write(&file, format!("{token}\n")).expect("write the token file");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        self.http(&format!(
            "token_file = {}",
            quoted(&file.display().to_string())
        ))
    }

    /// HTTP off (`listen = ""`).
    pub fn no_http(mut self) -> Config {
        self.port = 0;
        self.http("listen = \"\"")
    }

    pub fn pipeline(mut self, pipeline: Pipeline) -> Config {
        self.pipelines.push(pipeline);
        self
    }

    /// Appends TOML tables as written (`[events]`, `[events.mqtt]`, ...) after the pipelines.
    pub fn tables(mut self, toml: &str) -> Config {
        self.tail.push_str(toml);
        if !self.tail.ends_with('\n') {
            self.tail.push('\n');
        }
        self
    }

    /// The same config with `pipelines` in place of its own (for a reload).
    pub fn with_pipelines(mut self, pipelines: &[Pipeline]) -> Config {
        self.pipelines = pipelines.to_vec();
        self
    }

    /// The TOML text; the global tables come first, an empty one left out.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for (header, table) in [
            ("[model]", &self.model),
            ("[inference]", &self.inference),
            ("[http]", &self.http),
        ] {
            if !table.0.is_empty() {
                table.render(header, &mut out);
            }
        }
        for pipeline in &self.pipelines {
            out.push_str(&pipeline.text());
        }
        out.push_str(&self.tail);
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.text()).expect("write config");
    }
}
