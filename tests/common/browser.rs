//! A real browser for the live page's tests: Debian's chromium, headless, driven through its chromedriver
//! (WebDriver) with fantoccini. Each `Browser` starts its own chromedriver on a free port, in a process group
//! of its own, with a profile folder inside the test's temporary folder; dropping it ends the session and then
//! that process group (chromedriver and the chromium it started), and nothing else.
//!
//! fantoccini is async; the tests are plain `#[test]`s like the rest of the suite, so `Browser` carries a small
//! tokio runtime and offers blocking calls.

use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

use super::{free_port, wait_until};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// What the page is shown on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// A 1280×800 viewport.
    Desktop,
    /// A phone: a 390×844 viewport, touch, mobile layout (chromium's device emulation; a real window cannot be
    /// made that narrow).
    Phone,
}

/// One headless chromium.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver and a desktop browser session; the profile and chromedriver's log go under `dir`.
    pub fn start(dir: &Path) -> Browser {
        Browser::on(dir, Screen::Desktop)
    }

    /// `start`, on the given screen.
    pub fn on(dir: &Path, screen: Screen) -> Browser {
        for program in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(program).exists(),
                "{program} is missing: install Debian's chromium and chromium-driver (scripts/setup does)"
            );
        }
        let port = free_port();
        let log = dir.join(format!("chromedriver-{port}.log"));
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so the drop can end chromedriver and every chromium process it started.
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut browser = Browser {
            runtime,
            client: None,
            driver,
        };
        wait_until("chromedriver listens", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let profile = dir.join(format!("chromium-profile-{port}"));
        std::fs::create_dir_all(&profile).expect("profile folder");
        let mut options = json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                // The tests run as root (CI does), where chromium's sandbox refuses to start; the browser only
                // ever loads the daemon's own page and the tests' own.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1280,800",
                format!("--user-data-dir={}", profile.display()),
            ],
        });
        if screen == Screen::Phone {
            options["mobileEmulation"] = json!({ "deviceMetrics": { "width": 390, "height": 844, "pixelRatio": 1, "touch": true } });
        }
        let capabilities = json!({ "browserName": "chrome", "goog:chromeOptions": options });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let client = browser.block(async {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities)
                .connect(&url)
                .await
        });
        match client {
            Ok(client) => browser.client = Some(client),
            Err(e) => panic!(
                "no chromium session through chromedriver: {e}\nchromedriver log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
        if screen == Screen::Desktop {
            browser.set_viewport(1280, 800);
        }
        browser
    }

    /// Sizes the window so that the page itself (the viewport) is `width`×`height`: headless chromium still
    /// counts room for a window frame in the window's size.
    pub fn set_viewport(&self, width: u32, height: u32) {
        let sizes = self.js(
            "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight];",
            vec![],
        );
        let frame = |i: usize| {
            sizes[i]
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0)
        };
        self.block(
            self.client()
                .set_window_size(width + frame(0), height + frame(1)),
        )
        .expect("window size");
    }

    fn block<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("a session")
    }

    pub fn goto(&self, url: &str) {
        self.block(self.client().goto(url))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// The element with this id (panics when there is none).
    pub fn id(&self, id: &str) -> Element {
        self.block(self.client().find(Locator::Id(id)))
            .unwrap_or_else(|e| panic!("no element #{id}: {e}"))
    }

    /// The elements matching a CSS selector.
    pub fn all(&self, css: &str) -> Vec<Element> {
        self.block(self.client().find_all(Locator::Css(css)))
            .unwrap_or_else(|e| panic!("find {css}: {e}"))
    }

    /// The form control a `<label>` with exactly this text names (through its `for`), as a user finds it.
    pub fn labelled(&self, label: &str) -> Element {
        let xpath = format!("//label[normalize-space()='{label}']");
        let element = self
            .block(self.client().find(Locator::XPath(&xpath)))
            .unwrap_or_else(|e| panic!("no label '{label}': {e}"));
        let target = self
            .block(element.attr("for"))
            .expect("label's for")
            .unwrap_or_else(|| panic!("label '{label}' names no control"));
        self.id(&target)
    }

    pub fn click(&self, element: &Element) {
        self.block(element.click()).expect("click");
    }

    /// Picks the option with this value in a `<select>`.
    pub fn select(&self, element: &Element, value: &str) {
        self.block(element.select_by_value(value))
            .unwrap_or_else(|e| panic!("select {value}: {e}"));
    }

    /// Replaces the text of an input with `text`.
    pub fn fill(&self, element: &Element, text: &str) {
        self.block(element.clear()).expect("clear");
        if !text.is_empty() {
            self.block(element.send_keys(text)).expect("type");
        }
    }

    /// Sets a file input to a file on this machine (chromedriver reads it).
    pub fn choose_file(&self, element: &Element, path: &Path) {
        let path = path.to_str().expect("utf-8 path");
        self.block(element.send_keys(path)).expect("choose file");
    }

    pub fn text(&self, element: &Element) -> String {
        self.block(element.text()).expect("text")
    }

    /// Whether the element is shown (not `hidden`, not inside something hidden).
    pub fn shown(&self, element: &Element) -> bool {
        self.block(element.is_displayed()).unwrap_or(false)
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page and returns what it returns.
    pub fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.block(self.client().execute(script, args))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs an async script: it must call `arguments[arguments.length - 1]` with its result.
    pub fn js_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.block(self.client().execute_async(script, args))
            .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// Polls `script` (as `js`) every 200 ms until it returns something truthy, and returns that; panics with
    /// the last value after `timeout`.
    pub fn wait_js(&self, what: &str, timeout: Duration, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let value = self.js(script, vec![]);
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(_) | Value::Object(_) => true,
            };
            if truthy {
                return value;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for: {what} (last: {value})");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The text of the element with this id, once `check` accepts it (panics with the last text after
    /// `timeout`).
    pub fn wait_text(&self, id: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let text = self
                .block(self.client().find(Locator::Id(id)))
                .ok()
                .and_then(|e| self.block(e.text()).ok())
                .unwrap_or_default();
            if check(&text) {
                return text;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting on #{id}; its text: {text:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG of the window at `path`; returns the path.
    pub fn screenshot(&self, path: &Path) -> PathBuf {
        let png = self.block(self.client().screenshot()).expect("screenshot");
        std::fs::write(path, png).expect("write screenshot");
        path.to_path_buf()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Ends the session: chromedriver quits chromium, and with it chromium's crash handler (which runs
            // detached, outside the process group).
            // (The timeout is made inside the runtime: its timer belongs to it.)
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        }
        // The process group chromedriver leads holds the chromium it started, if any is left.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.wait();
    }
}
