//! The live page's backend (issue 18) against a real daemon over TCP: the overlay stream delivers distinct JPEG
//! parts and ends when its pipeline is removed and when the daemon stops; the per-query history fills; a query
//! edit reaches `/status`, the next sidecars and the config file (comments kept), and bad edits change nothing;
//! sessions, the token, the Origin check, the loopback Host guard and `[http] page = false`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::config::{Config, Pipeline};
use common::daemon::{request, request_to_host, request_with_body, Daemon, Reply, RtspServer};
use common::wait_until;
use serde_json::{json, Value};

const TOKEN: &str = "Vb7xK2mQ9pLw4Rt8Zc1N";

/// A connection carrying `GET path` (with extra header lines), for a stream read part by part.
fn open_stream(port: u16, path: &str, headers: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").as_bytes())
        .expect("send");
    stream
}

/// What was read of an MJPEG reply: its head, the JPEG of each whole part, and whether the server ended it.
struct Parts {
    head: String,
    jpegs: Vec<Vec<u8>>,
    ended: bool,
}

/// Reads `stream` until `want` parts have come, the server closes it, or `limit` passes.
fn read_parts(stream: &mut TcpStream, want: usize, limit: Duration) -> Parts {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let mut parts = Parts {
        head: String::new(),
        jpegs: Vec::new(),
        ended: false,
    };
    let mut cursor = None;
    while parts.jpegs.len() < want && start.elapsed() < limit {
        match stream.read(&mut chunk) {
            Ok(0) => {
                parts.ended = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                parts.ended = true;
                break;
            }
        }
        if cursor.is_none() {
            if let Some(end) = find(&buf, b"\r\n\r\n", 0) {
                parts.head = String::from_utf8_lossy(&buf[..end]).into_owned();
                cursor = Some(end + 4);
            }
        }
        // Whole parts only: `--tclsegframe`, headers with Content-Length, a blank line, the JPEG.
        while let Some(at) = cursor {
            let Some(len_at) = find(&buf, b"Content-Length: ", at) else {
                break;
            };
            let Some(line_end) = find(&buf, b"\r\n", len_at) else {
                break;
            };
            let len: usize = String::from_utf8_lossy(&buf[len_at + 16..line_end])
                .trim()
                .parse()
                .expect("part length");
            let Some(body) = find(&buf, b"\r\n\r\n", len_at).map(|e| e + 4) else {
                break;
            };
            if buf.len() < body + len {
                break;
            }
            parts.jpegs.push(buf[body..body + len].to_vec());
            cursor = Some(body + len);
        }
    }
    parts
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn json_of(reply: &Reply) -> Value {
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", reply.code, reply.body))
}

fn put_queries(port: u16, pipeline: &str, headers: &str, queries: Value) -> Reply {
    request_with_body(
        port,
        "PUT",
        &format!("/v1/pipelines/{pipeline}/queries"),
        &format!("Content-Type: application/json\r\n{headers}"),
        json!({ "queries": queries }).to_string().as_bytes(),
    )
}

/// The query names in the newest sidecars of `out` (any that name `query`, after the edit).
fn sidecars_name(out: &Path, query: &str) -> bool {
    let Ok(entries) = glob::glob(&format!("{}/**/*.json", out.display())) else {
        return false;
    };
    entries.flatten().any(|path| {
        let Ok(text) = std::fs::read_to_string(&path) else {
            return false;
        };
        let Ok(sidecar) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        sidecar["classes"]
            .as_array()
            .is_some_and(|c| c.iter().any(|class| class["name"] == query))
    })
}

/// A ready daemon on `config` with one pipeline "p" watching an empty folder.
fn start_with_a_folder(dir: &Path, config: Config) -> Daemon {
    let daemon = Daemon::start(
        dir,
        &config.pipeline(Pipeline::folder("p", &dir.join("in"), &dir.join("out"))),
    );
    daemon.wait_ready();
    daemon
}

#[test]
fn the_stream_history_and_query_editor_work_on_a_live_camera() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut server = RtspServer::options().streams(2).start();
    let camera = |name: &str, stream: usize| {
        Pipeline::new(
            name,
            &server.url(stream),
            &dir.path().join(format!("out-{name}")),
        )
        .retrying(3.0)
        .with("max_fps = 5")
    };
    let cam = camera("cam", 0);
    let yard = camera("yard", 1);
    let config = Config::new()
        .inference("max_batch = 2\nmax_wait_ms = 20")
        .pipeline(cam.clone())
        .pipeline(yard);
    // The operator's comments, above and beside the keys the editor touches.
    let text = format!(
        "# front of the house: ask Sam before changing\n{}",
        config.text().replacen(
            "queries = [\"red square\", \"blue circle\"]",
            "queries = [\"red square\", \"blue circle\"]  # what we look for",
            1
        )
    );
    let mut daemon = Daemon::start_text(dir.path(), &text, config.port, &[]);
    daemon.wait_ready();
    let port = daemon.port;
    let config_file = dir.path().join("serve.toml");
    wait_until("both cameras segment", Duration::from_secs(90), || {
        daemon.frames_out("cam") >= 2.0 && daemon.frames_out("yard") >= 1.0
    });

    // The effective config, the password redacted.
    let listed = json_of(&daemon.get("/v1/pipelines"));
    let first = &listed["pipelines"][0];
    assert_eq!(first["name"], "cam", "{listed}");
    assert_eq!(first["running"], true);
    assert_eq!(first["queries"][0]["name"], "red square");
    assert!(first["queries"][0]["colour"]
        .as_str()
        .is_some_and(|c| c.starts_with('#') && c.len() == 7));
    assert!(!listed.to_string().contains("hunter2"), "{listed}");

    // The overlay stream: distinct JPEGs, one per processed frame.
    let mut stream = open_stream(port, "/v1/pipelines/cam/live.mjpeg", "");
    let parts = read_parts(&mut stream, 4, Duration::from_secs(90));
    assert!(
        parts
            .head
            .contains("multipart/x-mixed-replace; boundary=tclsegframe"),
        "{}",
        parts.head
    );
    assert_eq!(parts.jpegs.len(), 4, "{}", parts.head);
    for jpeg in &parts.jpegs {
        assert!(
            jpeg.starts_with(&[0xff, 0xd8]) && jpeg.ends_with(&[0xff, 0xd9]),
            "not a JPEG"
        );
        image::load_from_memory(jpeg).expect("a JPEG that decodes");
    }
    let mut distinct = parts.jpegs.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() >= 2, "the overlay never changed");
    drop(stream);
    let still = request(port, "GET", "/v1/pipelines/cam/live.jpg", "");
    assert_eq!(still.code, 200, "{}", still.body);
    assert!(still.bytes.starts_with(&[0xff, 0xd8]));
    assert_eq!(
        request(port, "GET", "/v1/pipelines/nope/live.jpg", "").code,
        404
    );

    // The history fills, one sample per second, for every query.
    wait_until("two seconds of history", Duration::from_secs(60), || {
        let h = json_of(&daemon.get("/v1/pipelines/cam/history?seconds=600"));
        h["queries"]["red square"]["t_ms"]
            .as_array()
            .is_some_and(|t| t.len() >= 2)
    });
    let history = json_of(&daemon.get("/v1/pipelines/cam/history"));
    assert_eq!(history["interval_s"], 1.0);
    assert_eq!(history["min_area"], 0.01);
    for query in ["red square", "blue circle"] {
        let q = &history["queries"][query];
        let t = q["t_ms"].as_array().expect("t_ms");
        assert_eq!(t.len(), q["area"].as_array().expect("area").len());
        assert_eq!(t.len(), q["present"].as_array().expect("present").len());
        assert!(t.windows(2).all(|w| w[0].as_u64() < w[1].as_u64()));
        assert!(q["area"]
            .as_array()
            .expect("area")
            .iter()
            .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap_or(-1.0))));
    }

    // Bad edits: 400 naming what is wrong, and the file stays byte for byte.
    let before = std::fs::read(&config_file).expect("read config");
    let long = "x".repeat(65);
    for (queries, says) in [
        (json!([{ "name": "" }]), "empty name"),
        (json!([]), "no queries"),
        (json!([42]), "queries"),
        (
            json!([{ "name": "car", "colour": "#00ff00", "size": 3 }]),
            "queries",
        ),
        (
            json!([{ "name": "red square" }, { "name": "Red square" }]),
            "twice",
        ),
        (json!([{ "name": long }]), "65 characters"),
        (json!([{ "name": "car", "colour": "orange" }]), "#rrggbb"),
        (json!([{ "name": "car", "threshold": 1.5 }]), "outside 0..1"),
    ] {
        let reply = put_queries(port, "cam", "", queries.clone());
        assert_eq!(reply.code, 400, "{queries}: {}", reply.body);
        assert!(reply.body.contains(says), "{queries}: {}", reply.body);
        assert_eq!(
            std::fs::read(&config_file).expect("read"),
            before,
            "{queries} changed the file"
        );
    }
    assert_eq!(
        put_queries(port, "garage", "", json!([{ "name": "car" }])).code,
        404
    );
    // A file edited by hand since its load is not overwritten.
    let hand_edited = String::from_utf8_lossy(&before).replace("max_fps = 5", "max_fps = 4");
    std::fs::write(&config_file, &hand_edited).expect("hand edit");
    let conflict = put_queries(port, "cam", "", json!([{ "name": "car" }]));
    assert_eq!(conflict.code, 409, "{}", conflict.body);
    assert!(
        conflict.body.contains("changed on disk"),
        "{}",
        conflict.body
    );
    assert_eq!(
        std::fs::read_to_string(&config_file).expect("read"),
        hand_edited
    );
    std::fs::write(&config_file, &before).expect("restore");

    // A good edit: written to the file (comments kept, mode kept), applied in place, seen everywhere.
    std::fs::set_permissions(&config_file, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let edited = put_queries(
        port,
        "cam",
        "",
        json!([
            "red square",
            { "name": "blue circle" },
            { "name": "green ball", "colour": "#00ff00", "threshold": 0.2 },
        ]),
    );
    assert_eq!(edited.code, 200, "{}", edited.body);
    let outcome = json_of(&edited);
    assert_eq!(
        outcome["changed"],
        json!([{ "pipeline": "cam", "change": "queries" }])
    );
    let on_disk = std::fs::read_to_string(&config_file).expect("read");
    assert!(
        on_disk.starts_with("# front of the house: ask Sam before changing\n"),
        "{on_disk}"
    );
    assert!(
        on_disk.contains(
            r##"queries = ["red square", "blue circle", { name = "green ball", colour = "#00ff00", threshold = 0.2 }]  # what we look for"##
        ),
        "{on_disk}"
    );
    assert_eq!(
        on_disk.replace(
            r##", { name = "green ball", colour = "#00ff00", threshold = 0.2 }"##,
            ""
        ),
        String::from_utf8_lossy(&before),
        "more than the queries changed"
    );
    let mode = std::fs::metadata(&config_file)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    let status = json_of(&daemon.get("/status"));
    assert_eq!(
        status["daemon"]["pipelines"]["cam"]["queries"],
        json!(["red square", "blue circle", "green ball"]),
        "{status}"
    );
    wait_until(
        "a sidecar with the new query",
        Duration::from_secs(60),
        || sidecars_name(&dir.path().join("out-cam"), "green ball"),
    );
    wait_until(
        "the history has the new query",
        Duration::from_secs(60),
        || json_of(&daemon.get("/v1/pipelines/cam/history"))["queries"]["green ball"].is_object(),
    );
    let listed = json_of(&daemon.get("/v1/pipelines"));
    assert_eq!(listed["pipelines"][0]["queries"][2]["colour"], "#00ff00");

    // A stream ends when its pipeline is removed by a reload...
    let mut yard_stream = open_stream(port, "/v1/pipelines/yard/live.mjpeg", "");
    assert_eq!(
        read_parts(&mut yard_stream, 1, Duration::from_secs(60))
            .jpegs
            .len(),
        1
    );
    let after_edit = std::fs::read_to_string(&config_file).expect("read");
    let without_yard = &after_edit[..after_edit.rfind("[[pipeline]]").expect("yard")];
    std::fs::write(&config_file, without_yard).expect("remove yard");
    let reload = daemon.post("/reload", None);
    assert_eq!(reload.code, 200, "{}", reload.body);
    assert_eq!(json_of(&reload)["removed"], json!(["yard"]));
    let rest = read_parts(&mut yard_stream, usize::MAX, Duration::from_secs(30));
    assert!(rest.ended, "the removed pipeline's stream is still open");

    // With the camera gone, /status says the source is reconnecting or stalled, and why (redacted).
    let mut cam_stream = open_stream(port, "/v1/pipelines/cam/live.mjpeg", "");
    assert_eq!(
        read_parts(&mut cam_stream, 1, Duration::from_secs(60))
            .jpegs
            .len(),
        1
    );
    let cam_state = || json_of(&daemon.get("/status"))["pipelines"]["cam"].clone();
    assert_eq!(cam_state()["source_state"], "connected");
    server.kill();
    wait_until("the source is seen gone", Duration::from_secs(60), || {
        let cam = cam_state();
        ["reconnecting", "stalled"].contains(&cam["source_state"].as_str().unwrap_or(""))
            && cam["source_error"].is_string()
    });
    assert!(!daemon.get("/status").body.contains("hunter2"));

    // ... and a stream ends when the daemon stops, which it does cleanly with a viewer attached.
    assert_eq!(daemon.terminate(Duration::from_secs(60)).code(), Some(0));
    let rest = read_parts(&mut cam_stream, usize::MAX, Duration::from_secs(10));
    assert!(rest.ended, "the stream outlived the daemon");
}

#[test]
fn off_loopback_the_page_needs_the_token_or_a_session_and_state_changes_their_origin() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::new()
        .listen_on("0.0.0.0")
        .token_file(dir.path(), TOKEN);
    let mut daemon = start_with_a_folder(dir.path(), config);
    let port = daemon.port;
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");

    // Viewing needs the token or a session.
    for path in [
        "/v1/pipelines",
        "/v1/pipelines/p/history",
        "/v1/pipelines/p/live.jpg",
        "/v1/pipelines/p/live.mjpeg",
    ] {
        assert_eq!(request(port, "GET", path, "").code, 401, "{path}");
    }
    assert_eq!(request(port, "GET", "/v1/pipelines", &bearer).code, 200);
    let session = json_of(&request(port, "GET", "/v1/session", ""));
    assert_eq!(
        session,
        json!({ "token_required": true, "authorized": false })
    );

    // Logging in: a wrong token is refused, the right one gets an HttpOnly SameSite=Strict cookie.
    let login = |token: &str, headers: &str| {
        request_with_body(
            port,
            "POST",
            "/v1/session",
            &format!("Content-Type: application/json\r\n{headers}"),
            json!({ "token": token }).to_string().as_bytes(),
        )
    };
    let wrong = login("not-the-token", "");
    assert_eq!(wrong.code, 401, "{}", wrong.body);
    assert!(json_of(&wrong)["error"].is_string());
    assert_eq!(
        login(TOKEN, "Origin: http://evil.example\r\n").code,
        403,
        "a login from another site"
    );
    let ok = login(TOKEN, "Origin: http://localhost\r\n");
    assert_eq!(ok.code, 204, "{}", ok.body);
    let set_cookie = ok.header("set-cookie").expect("a cookie").to_string();
    assert!(
        set_cookie.starts_with("tclseg_session=")
            && set_cookie.contains("HttpOnly")
            && set_cookie.contains("SameSite=Strict")
            && set_cookie.contains("Path=/"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(TOKEN));
    let cookie = format!(
        "Cookie: {}\r\n",
        set_cookie.split(';').next().expect("pair")
    );
    assert_eq!(request(port, "GET", "/v1/pipelines", &cookie).code, 200);
    assert_eq!(
        json_of(&request(port, "GET", "/v1/session", &cookie))["authorized"],
        true
    );

    // State changes: the cookie needs Origin, a foreign Origin is refused even with the bearer token.
    let edit = json!([{ "name": "red square" }, { "name": "cat" }]);
    let no_origin = put_queries(port, "p", &cookie, edit.clone());
    assert_eq!(no_origin.code, 403, "{}", no_origin.body);
    let foreign = format!("{cookie}Origin: http://evil.example\r\n");
    assert_eq!(put_queries(port, "p", &foreign, edit.clone()).code, 403);
    let foreign_bearer = format!("{bearer}Origin: http://evil.example\r\n");
    assert_eq!(
        put_queries(port, "p", &foreign_bearer, edit.clone()).code,
        403
    );
    assert_eq!(request(port, "POST", "/reload", &foreign_bearer).code, 403);
    assert_eq!(put_queries(port, "p", "", edit.clone()).code, 401);
    let config_file = dir.path().join("serve.toml");
    assert!(!std::fs::read_to_string(&config_file)
        .expect("read")
        .contains("cat"));
    // curl with the bearer token and no Origin, and the page with its cookie and its own Origin, pass.
    assert_eq!(request(port, "POST", "/reload", &bearer).code, 200);
    let same_site = format!("{cookie}Origin: http://localhost\r\n");
    let applied = put_queries(port, "p", &same_site, edit);
    assert_eq!(applied.code, 200, "{}", applied.body);
    assert!(std::fs::read_to_string(&config_file)
        .expect("read")
        .contains(r#"queries = ["red square", "cat"]"#));

    // Logging out ends the session.
    let out = request(port, "DELETE", "/v1/session", &same_site);
    assert_eq!(out.code, 204, "{}", out.body);
    assert_eq!(request(port, "GET", "/v1/pipelines", &cookie).code, 401);
    assert!(
        !daemon.log_text().contains(TOKEN),
        "the token is in the log"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_loopback_listener_answers_only_to_loopback_names_and_page_false_turns_the_page_off() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut daemon = start_with_a_folder(dir.path(), Config::new().http("page = false"));
    let port = daemon.port;

    // DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends its own name as Host.
    for (method, path) in [("POST", "/reload"), ("POST", "/v1/segment")] {
        let reply = request_to_host(port, "evil.example", method, path, "", b"");
        assert_eq!(reply.code, 403, "{method} {path}: {}", reply.body);
        assert!(reply.body.contains("DNS rebinding"), "{}", reply.body);
    }
    let reply = request_to_host(port, "127.0.0.1:1", "POST", "/reload", "", b"");
    assert_eq!(reply.code, 200, "{}", reply.body);
    // Without a token, the Origin check still keeps other sites out.
    let reply = request(port, "POST", "/reload", "Origin: http://evil.example\r\n");
    assert_eq!(reply.code, 403, "{}", reply.body);

    // `page = false`: every page route answers 404 naming the key; the probes stay.
    for (method, path) in [
        ("GET", "/v1/session"),
        ("GET", "/v1/pipelines"),
        ("GET", "/v1/pipelines/p/history"),
        ("GET", "/v1/pipelines/p/live.mjpeg"),
        ("PUT", "/v1/pipelines/p/queries"),
    ] {
        let reply = request(port, method, path, "");
        assert_eq!(reply.code, 404, "{method} {path}");
        assert!(reply.body.contains("page = false"), "{}", reply.body);
    }
    assert_eq!(daemon.get("/status").code, 200);
    assert_eq!(daemon.terminate(Duration::from_secs(60)).code(), Some(0));
}
