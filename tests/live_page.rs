//! The live page in a real browser: Debian's chromium, headless, driven through chromedriver (WebDriver,
//! `common::browser`), against the real daemon with two pipelines, "cam" on the project's RTSP test server
//! (examples/rtsp_server.rs) and "inbox" on a folder. What a user sees and does: the overview and its live
//! overlay, the query editor (a good change reaches /status, the sidecars and the config file; a bad one shows
//! the daemon's error and changes nothing), the source going down and coming back, "try an image", and with a
//! token the login form and a cross-origin request that is refused.
//!
//! Screenshots of the overview (1280×800 and a phone's 390×844) go to `target/tmp/live_page/`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use common::browser::{Browser, Screen};
use common::config::{Config, Pipeline};
use common::daemon::{request, Daemon, RtspServer};
use common::{files_with_suffix, wait_until, write_png};
use serde_json::{json, Value};

/// How long the page may take to show a change: it polls /status every 2 s, and this machine is shared.
const SHOWN: Duration = Duration::from_secs(60);
const TOKEN: &str = "page-test-token-5f2c";
/// A comment the operator wrote in the config file, which an edit from the page must keep.
const OPERATOR_NOTE: &str = "# operator: cam is the yard camera, keep its queries short";

/// The tests here run one at a time: each runs a daemon, an RTSP server and chromium, and side by side on a
/// small machine they would measure its load rather than the page.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The daemon, the RTSP server feeding "cam", and where "cam" writes; the turn of the test that holds it.
struct Setup {
    daemon: Daemon,
    server: RtspServer,
    cam_out: PathBuf,
    _turn: MutexGuard<'static, ()>,
}

/// "cam" (5 fps from the RTSP server, retried quickly) and "inbox" (a folder holding one picture), in a config
/// that `adjust` may change further (its `[http]`). Returns once both have written a frame.
fn two_pipelines(dir: &Path, adjust: impl FnOnce(Config) -> Config) -> Setup {
    // A test that failed while holding the turn poisons the lock; the next one still runs.
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = RtspServer::start();
    let cam_out = dir.join("out-cam");
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox).expect("inbox");
    write_png(&inbox.join("first.png"), 96, 64);
    let config = Config::new()
        .inference("max_batch = 4\nmax_wait_ms = 20")
        .pipeline(
            Pipeline::new("cam", &server.url(0), &cam_out)
                .retrying(3.0)
                .with("max_fps = 5"),
        )
        .pipeline(Pipeline::folder("inbox", &inbox, &dir.join("out-inbox")));
    let config = adjust(config);
    let text = format!("{OPERATOR_NOTE}\n{}", config.text());
    let daemon = Daemon::start_text(dir, &text, config.port, &[]);
    daemon.wait_ready();
    wait_until("a frame from each pipeline", SHOWN, || {
        daemon.frames_out("cam") >= 1.0 && daemon.frames_out("inbox") >= 1.0
    });
    Setup {
        daemon,
        server,
        cam_out,
        _turn: turn,
    }
}

/// `two_pipelines` on loopback, and a desktop browser on its page once the page shows "cam".
fn page_open(dir: &Path) -> (Setup, Browser) {
    let setup = two_pipelines(dir, |c| c);
    let browser = Browser::start(dir);
    browser.goto(&page_url(&setup.daemon));
    browser.wait_text("title-cam", SHOWN, |t| t == "cam");
    (setup, browser)
}

fn page_url(daemon: &Daemon) -> String {
    format!("http://127.0.0.1:{}/", daemon.port)
}

/// Where the screenshots go: kept after the run, unlike the test's temporary folder.
fn shots_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("live_page");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// A hash of the pixels the `<img id=…>` shows now (drawn into a canvas), or null before its first frame.
const IMAGE_HASH: &str = r#"
    const img = document.getElementById(arguments[0]);
    if (!img || !img.naturalWidth) return null;
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const g = canvas.getContext('2d');
    g.drawImage(img, 0, 0);
    const data = g.getImageData(0, 0, canvas.width, canvas.height).data;
    let h = 2166136261;
    for (let i = 0; i < data.length; i += 3) { h ^= data[i]; h = Math.imul(h, 16777619); }
    return `${canvas.width}x${canvas.height}:${h >>> 0}`;
"#;

/// Waits until the live overlay of `pipeline` shows a picture, then until it shows a different one.
fn live_overlay_changes(browser: &Browser, pipeline: &str) {
    let id = format!("live-{pipeline}");
    let hash = |b: &Browser| b.js(IMAGE_HASH, vec![json!(id)]);
    let mut first = Value::Null;
    wait_until("the live overlay's first frame", SHOWN, || {
        first = hash(browser);
        !first.is_null()
    });
    assert!(
        first.as_str().is_some_and(|h| h.starts_with("320x240:")),
        "the overlay has the camera's size: {first}"
    );
    wait_until("the live overlay to change", SHOWN, || {
        let now = hash(browser);
        !now.is_null() && now != first
    });
}

/// The queries /status says `pipeline` runs with.
fn running_queries(daemon: &Daemon, pipeline: &str) -> Vec<String> {
    let status: Value = serde_json::from_str(&daemon.get("/status").body).unwrap_or_default();
    status["daemon"]["pipelines"][pipeline]["queries"]
        .as_array()
        .map(|qs| {
            qs.iter()
                .filter_map(|q| q.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_overview_shows_both_pipelines_and_a_live_overlay_that_changes() {
    let dir = tempfile::tempdir().expect("tmp");
    let (setup, browser) = page_open(dir.path());
    for name in ["cam", "inbox"] {
        let title = browser.wait_text(&format!("title-{name}"), SHOWN, |t| t == name);
        assert_eq!(title, name);
        browser.wait_text(&format!("state-{name}"), SHOWN, |t| t == "connected");
    }
    // The rate and the latency come from /status polls: figures once two polls are in.
    browser.wait_text("fps-cam", SHOWN, |t| t.ends_with(" fps") && t != "0.0 fps");
    let latency = browser.wait_text("latency-cam", SHOWN, |t| t.contains(" ms"));
    assert!(latency.contains(" / "), "p50 / p95: {latency}");
    // 10 fps from the server, capped at 5: the cap's drops are shown by reason.
    browser.wait_text("drops-cam", SHOWN, |t| t.contains("rate cap"));
    // The source is shown redacted; the password is nowhere in the page.
    let source = browser.text(&browser.all("#pipeline-cam .source")[0]);
    assert!(
        source.starts_with("rtsp://") && !source.contains("hunter2"),
        "{source}"
    );
    let html = browser.js("return document.documentElement.outerHTML;", vec![]);
    assert!(
        !html.to_string().contains("hunter2"),
        "credential in the page"
    );

    live_overlay_changes(&browser, "cam");

    // Per query: present/absent and the area chart, once the page has read the history.
    browser.wait_js(
        "a chart for each of cam's queries",
        SHOWN,
        "return document.querySelectorAll('#queries-cam tbody tr svg.spark polyline').length === 2;",
    );
    let presence = browser.wait_js(
        "present/absent for cam's queries",
        SHOWN,
        "const cells = [...document.querySelectorAll('#queries-cam tbody .presence')].map(c => c.textContent); \
         return cells.every(t => t.startsWith('present') || t === 'absent') ? cells : null;",
    );
    assert_eq!(presence.as_array().map(Vec::len), Some(2), "{presence}");

    let shots = shots_dir();
    let size = browser.js("return [window.innerWidth, window.innerHeight];", vec![]);
    assert_eq!(size, json!([1280, 800]));
    let wide = browser.screenshot(&shots.join("overview-1280x800.png"));
    // On a phone: one card under the other, nothing wider than the screen.
    let phone = Browser::on(dir.path(), Screen::Phone);
    phone.goto(&page_url(&setup.daemon));
    let layout = phone.wait_js(
        "both cards at phone width",
        SHOWN,
        "const cards = [...document.querySelectorAll('.card')]; \
         if (cards.length !== 2 || !document.getElementById('live-cam').naturalWidth) return null; \
         const [a, b] = cards.map(c => c.getBoundingClientRect()); \
         return { width: window.innerWidth, page: document.documentElement.scrollWidth, \
                  stacked: b.top >= a.bottom, inside: a.right <= window.innerWidth };",
    );
    assert_eq!(layout["width"], 390, "{layout}");
    assert_eq!(layout["page"], 390, "nothing overflows sideways: {layout}");
    assert_eq!(layout["stacked"], true, "{layout}");
    assert_eq!(layout["inside"], true, "{layout}");
    let narrow = phone.screenshot(&shots.join("overview-390x844.png"));
    for shot in [wide, narrow] {
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} holds {size} bytes", shot.display());
    }
}

/// Clicks "Add query" in cam's editor and types `name` into the new row.
fn add_query_row(browser: &Browser, name: &str) {
    browser.click(&browser.id("editor-add-cam"));
    let rows = browser.all("#editor-rows-cam .qrow .qname");
    let last = rows.last().expect("a new row");
    browser.fill(last, name);
}

fn save_cam(browser: &Browser) {
    browser.click(&browser.id("editor-save-cam"));
}

#[test]
fn a_query_added_in_the_editor_reaches_status_the_sidecars_and_the_config_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let (setup, browser) = page_open(dir.path());
    let rows = browser.all("#editor-rows-cam .qrow");
    assert_eq!(rows.len(), 2, "cam's two queries are in the editor");

    add_query_row(&browser, "green tree");
    let saved_at = SystemTime::now();
    save_cam(&browser);
    let outcome = browser.wait_text("editor-status-cam", SHOWN, |t| t.starts_with("Saved"));
    assert_eq!(outcome, "Saved and applied.");
    let errors = browser.text(&browser.id("editor-errors-cam"));
    assert!(errors.is_empty(), "{errors}");

    assert_eq!(
        running_queries(&setup.daemon, "cam"),
        ["red square", "blue circle", "green tree"]
    );
    let config = std::fs::read_to_string(&setup.daemon.config).expect("config");
    assert!(config.contains("green tree"), "{config}");
    assert!(
        config.contains(OPERATOR_NOTE),
        "the operator's comment is kept:\n{config}"
    );
    // The daemon still runs both, and the next frames of cam carry the new query.
    wait_until("a sidecar with the new query", SHOWN, || {
        files_with_suffix(&setup.cam_out, ".json")
            .iter()
            .filter(|p| {
                std::fs::metadata(p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t > saved_at)
            })
            .any(|p| {
                std::fs::read_to_string(p).is_ok_and(|text| {
                    serde_json::from_str::<Value>(&text).is_ok_and(|s| {
                        s["classes"]
                            .as_array()
                            .is_some_and(|cs| cs.iter().any(|c| c["name"] == "green tree"))
                    })
                })
            })
    });
    // The overview picks up the new query too.
    browser.wait_js(
        "the new query's row in cam's card",
        SHOWN,
        "return [...document.querySelectorAll('#queries-cam tbody tr')].some(r => r.dataset.query === 'green tree');",
    );
}

#[test]
fn a_bad_query_shows_the_daemons_error_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let (setup, browser) = page_open(dir.path());
    let before = std::fs::read(&setup.daemon.config).expect("config");
    let long = "x".repeat(300);

    // Each case with what its message must say (the daemon's, as `config check` gives it).
    for (case, name, says) in [
        ("empty", "", "empty name"),
        ("duplicate", "Red Square", "given twice"),
        ("over-long", long.as_str(), "keep names to 64"),
    ] {
        add_query_row(&browser, name);
        save_cam(&browser);
        let errors = browser.wait_text("editor-errors-cam", SHOWN, |t| !t.is_empty());
        assert!(errors.contains(says), "{case}: {errors}");
        let status = browser.text(&browser.id("editor-status-cam"));
        assert!(status.starts_with("Not saved"), "{case}: {status}");
        assert_eq!(
            std::fs::read(&setup.daemon.config).expect("config"),
            before,
            "{case}: the config file is unchanged"
        );
        assert_eq!(
            running_queries(&setup.daemon, "cam"),
            ["red square", "blue circle"],
            "{case}"
        );
        // Back to what runs, for the next case.
        browser.click(&browser.id("editor-discard-cam"));
        browser.wait_js(
            "the editor back to cam's two queries",
            SHOWN,
            "return document.querySelectorAll('#editor-rows-cam .qrow').length === 2 \
                && document.getElementById('editor-errors-cam').children.length === 0;",
        );
    }
}

#[test]
fn the_page_shows_the_source_reconnecting_and_recovers_when_it_returns() {
    let dir = tempfile::tempdir().expect("tmp");
    let (mut setup, browser) = page_open(dir.path());
    browser.wait_text("state-cam", SHOWN, |t| t == "connected");

    let port = setup.server.port;
    setup.server.kill();
    let down = browser.wait_text("state-cam", SHOWN, |t| t != "connected" && t != "…");
    assert!(
        down.starts_with("reconnecting") || down.starts_with("stalled"),
        "{down}"
    );
    // The rest of the page keeps working meanwhile.
    browser.wait_text("state-inbox", SHOWN, |t| t == "connected");

    setup.server = RtspServer::options().port(port).start();
    browser.wait_text("state-cam", SHOWN, |t| t == "connected");
    live_overlay_changes(&browser, "cam");
}

#[test]
fn try_an_image_shows_the_overlay_and_the_area_of_each_query() {
    let dir = tempfile::tempdir().expect("tmp");
    let (_running, browser) = page_open(dir.path());
    let picture = dir.path().join("try.png");
    write_png(&picture, 80, 60);

    browser.choose_file(&browser.labelled("Image"), &picture);
    let pipeline = browser.labelled("Queries of pipeline");
    browser.select(&pipeline, "cam");
    browser.fill(&browser.labelled("Other queries (comma-separated)"), "sky");
    browser.click(&browser.id("try-submit"));

    browser.wait_js(
        "the overlay",
        SHOWN,
        "const img = document.getElementById('try-overlay'); \
         return !document.getElementById('try-result').hidden && img.naturalWidth > 0;",
    );
    let size = browser.js(
        "const img = document.getElementById('try-overlay'); return [img.naturalWidth, img.naturalHeight];",
        vec![],
    );
    assert_eq!(size, json!([80, 60]), "the overlay has the image's size");
    let rows = browser.js(
        "return [...document.querySelectorAll('#try-areas tbody tr')].map(r => [r.dataset.query, r.querySelector('.area').textContent]);",
        vec![],
    );
    let rows = rows.as_array().expect("rows");
    let names: Vec<&str> = rows.iter().filter_map(|r| r[0].as_str()).collect();
    for query in ["red square", "blue circle", "sky"] {
        assert!(names.contains(&query), "{query} in {names:?}");
    }
    assert!(
        rows.iter()
            .all(|r| r[1].as_str().is_some_and(|a| a.ends_with('%'))),
        "{rows:?}"
    );
    let error = browser.text(&browser.id("try-error"));
    assert!(error.is_empty(), "{error}");
}

/// A page on another port of this machine (another origin, the same site) whose script sends the daemon a
/// state-changing request as a cross-site form or script could: `POST /reload` (no preflight) and
/// `PUT …/queries` (preflighted). It sets its title to `done` once both have been answered or refused.
struct OtherOrigin {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl OtherOrigin {
    fn serve(daemon_port: u16) -> OtherOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let page = format!(
            r#"<!doctype html><title>waiting</title><script>
const daemon = 'http://127.0.0.1:{daemon_port}';
Promise.allSettled([
  fetch(daemon + '/reload', {{ method: 'POST', mode: 'no-cors', credentials: 'include',
    headers: {{ 'Content-Type': 'text/plain' }}, body: 'reload' }}),
  fetch(daemon + '/v1/pipelines/cam/queries', {{ method: 'PUT', credentials: 'include',
    headers: {{ 'Content-Type': 'application/json' }},
    body: JSON.stringify({{ queries: [{{ name: 'intruder' }}] }}) }}),
]).then(() => {{ document.title = 'done'; }});
</script>"#
        );
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let mut head = [0u8; 4096];
                        let _ = stream.read(&mut head);
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                            page.len()
                        );
                        let _ = stream.write_all(reply.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        OtherOrigin { port, stop }
    }
}

impl Drop for OtherOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn with_a_token_the_page_asks_for_it_and_a_cross_origin_request_changes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let setup = two_pipelines(dir.path(), |config| {
        config.listen_on("0.0.0.0").token_file(dir.path(), TOKEN)
    });
    let daemon = &setup.daemon;

    // Without the token the data routes refuse; the page itself loads, as the login form.
    let refused = request(daemon.port, "GET", "/v1/pipelines", "");
    assert_eq!(refused.code, 401, "{}", refused.body);
    let browser = Browser::start(dir.path());
    browser.goto(&page_url(daemon));
    let login = browser.id("login");
    wait_until("the login form", SHOWN, || browser.shown(&login));
    assert!(
        !browser.shown(&browser.id("app")),
        "no pipeline data before login"
    );
    assert!(browser.all("#pipelines .card").is_empty());

    let token = browser.labelled("Token");
    browser.fill(&token, "not-the-token");
    browser.click(&browser.id("login-submit"));
    browser.wait_text("login-error", SHOWN, |t| t == "Wrong token.");
    assert!(!browser.shown(&browser.id("app")));

    browser.fill(&token, TOKEN);
    browser.click(&browser.id("login-submit"));
    for name in ["cam", "inbox"] {
        browser.wait_text(&format!("title-{name}"), SHOWN, |t| t == name);
    }
    assert!(!browser.shown(&login));
    let cookies = browser.js("return document.cookie;", vec![]);
    assert!(
        !cookies.to_string().contains("tclseg_session"),
        "the session cookie is HttpOnly: {cookies}"
    );
    let html = browser
        .js("return document.documentElement.outerHTML;", vec![])
        .to_string();
    assert!(
        !html.contains(TOKEN) && !html.contains("hunter2"),
        "a credential in the page"
    );

    // A change waits on disk; a page of another origin, in the same browser (so with the session cookie: the
    // site is the same, only the port differs), asks the daemon to reload and to replace cam's queries.
    let config_before = std::fs::read_to_string(&daemon.config).expect("config");
    let pending = config_before.replacen(
        "queries = [\"red square\", \"blue circle\"]",
        "queries = [\"red square\", \"blue circle\", \"pending\"]",
        1,
    );
    assert_ne!(pending, config_before);
    std::fs::write(&daemon.config, &pending).expect("write config");
    let other = OtherOrigin::serve(daemon.port);
    browser.goto(&format!("http://127.0.0.1:{}/", other.port));
    browser.wait_js(
        "both requests settled",
        SHOWN,
        "return document.title === 'done';",
    );
    assert_eq!(
        running_queries(daemon, "cam"),
        ["red square", "blue circle"],
        "the cross-origin reload did not run"
    );
    let other_origin = format!("Origin 'http://127.0.0.1:{}'", other.port);
    let refusals = daemon.log_text();
    assert!(
        common::lines_with(&refusals, &["POST /reload refused", &other_origin]).len() == 1,
        "refused for its Origin:\n{refusals}"
    );
    assert_eq!(
        std::fs::read_to_string(&daemon.config).expect("config"),
        pending,
        "the cross-origin PUT wrote nothing"
    );
    // The same reload with the token and no foreign Origin does run: the refusal above was the Origin's.
    let reload = daemon.post("/reload", Some(TOKEN));
    assert_eq!(reload.code, 200, "{}", reload.body);
    assert_eq!(
        running_queries(daemon, "cam"),
        ["red square", "blue circle", "pending"]
    );
}
