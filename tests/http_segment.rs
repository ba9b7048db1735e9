//! `POST /v1/segment` against a real daemon on the tiny fixture bundle: the sidecar, label map and overlay
//! replies, multipart/form-data uploads, per-request settings and thresholds (and the direction they move the
//! result), every refusal (bad image, bad form, parameter out of range, too large, no queries, unknown pipeline,
//! token), the request queue's figures in `/status` and `/metrics`, and a burst of concurrent requests that gets
//! 429s beyond its queue while a folder pipeline keeps being served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::{request_with_body, Daemon, Reply};

const TOKEN: &str = "q6Yb1mZ0p3Hc9TfKx2Lw";

fn png(w: u32, h: u32) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("a.png");
    common::write_png(&path, w, h);
    std::fs::read(&path).expect("read")
}

/// A PNG of noise: it barely compresses, so its body spans many reads.
fn noisy_png(w: u32, h: u32) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let [r, g, b, _] = state.to_le_bytes();
        image::Rgb([r, g, b])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode");
    out.into_inner()
}

fn post(daemon: &Daemon, query: &str, headers: &str, body: &[u8]) -> Reply {
    request_with_body(
        daemon.port,
        "POST",
        &format!("/v1/segment{query}"),
        &format!("Content-Type: image/png\r\n{headers}"),
        body,
    )
}

/// One part of a multipart/form-data body: name, file name (a file part), Content-Type, bytes.
type Part<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

const BOUNDARY: &str = "tclseg-test-7c1e";

/// A multipart/form-data body of `parts`, framed as curl -F frames it.
fn form(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file, kind, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let file = file
            .map(|f| format!("; filename=\"{f}\""))
            .unwrap_or_default();
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n").as_bytes(),
        );
        if let Some(kind) = kind {
            body.extend_from_slice(format!("Content-Type: {kind}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn post_form(daemon: &Daemon, query: &str, parts: &[Part]) -> Reply {
    request_with_body(
        daemon.port,
        "POST",
        &format!("/v1/segment{query}"),
        &format!("Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"),
        &form(parts),
    )
}

/// The sidecar of a 200 reply.
fn sidecar(reply: &Reply) -> serde_json::Value {
    assert_eq!(reply.code, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).expect("sidecar json")
}

/// The pixel fraction of the class `name` in a sidecar (0 when it is not there).
fn fraction(sidecar: &serde_json::Value, name: &str) -> f64 {
    sidecar["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["pixel_fraction"].as_f64())
        .unwrap_or(0.0)
}

/// `/status`'s figures of the request queue.
fn queue_status(daemon: &Daemon) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&daemon.get("/status").body).expect("status json");
    status["segment_requests"].clone()
}

fn start(dir: &Path, config: Config) -> Daemon {
    let daemon = Daemon::start(dir, &config);
    daemon.wait_ready();
    daemon
}

fn folder(dir: &Path) -> Pipeline {
    Pipeline::folder("cam", &dir.join("inbox"), &dir.join("out")).with("queue = \"lossless\"")
}

#[test]
fn an_image_comes_back_as_the_sidecar_the_label_map_or_the_overlay() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = start(dir.path(), Config::new().pipeline(folder(dir.path())));
    let image = png(64, 48);

    let reply = post(&daemon, "?queries=red%20square,blue+circle", "", &image);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let sidecar: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    assert_eq!(
        (sidecar["width"].as_u64(), sidecar["height"].as_u64()),
        (Some(64), Some(48))
    );
    let names: Vec<&str> = sidecar["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        names.contains(&"red square") && names.contains(&"blue circle"),
        "{names:?}"
    );
    let total: f64 = sidecar["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .filter_map(|c| c["pixel_fraction"].as_f64())
        .sum();
    assert!(
        total > 0.0 && total <= 1.0 + 1e-6,
        "pixel fractions sum to {total}"
    );
    assert!(sidecar["model"]["manifest_sha256"].is_string(), "{sidecar}");
    assert_eq!(sidecar["model"]["head"], "tcl", "the bundle's only head");

    // Repeated `query=`, and a running pipeline's queries.
    let reply = post(&daemon, "?query=red%20square&query=sky", "", &image);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert!(reply.body.contains("\"sky\""), "{}", reply.body);
    let reply = post(&daemon, "?pipeline=cam", "", &image);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert!(reply.body.contains("\"blue circle\""), "{}", reply.body);

    let reply = post(&daemon, "?queries=red", "Accept: image/png\r\n", &image);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("image/png"));
    let labels =
        image::load_from_memory_with_format(&reply.bytes, image::ImageFormat::Png).expect("a PNG");
    assert_eq!((labels.width(), labels.height()), (64, 48));

    let reply = post(&daemon, "?queries=red", "Accept: image/jpeg\r\n", &image);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("image/jpeg"));
    let overlay = image::load_from_memory_with_format(&reply.bytes, image::ImageFormat::Jpeg)
        .expect("a JPEG");
    assert_eq!((overlay.width(), overlay.height()), (64, 48));

    // A body far over the request head's 16 KiB buffer.
    let big = noisy_png(640, 480);
    assert!(big.len() > 500_000, "{} bytes", big.len());
    let reply = post(&daemon, "?queries=red", "", &big);
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert!(reply.body.contains("\"width\": 640"), "{}", reply.body);

    let metrics = daemon.metrics();
    assert_eq!(
        common::daemon::metric(
            &metrics,
            "tclseg_http_segment_requests_total",
            "code=\"200\""
        ),
        6.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("tclseg_http_segment_latency_seconds_count 6"),
        "{metrics}"
    );
    // Every answer took at least one trunk run (the pipeline's frames take more).
    assert!(
        common::daemon::metric(&metrics, "tclseg_trunk_runs_total", "") >= 6.0,
        "{metrics}"
    );
    assert_eq!(
        common::daemon::metric(
            &metrics,
            "tclseg_segment_requests_total",
            "outcome=\"served\""
        ),
        6.0,
        "{metrics}"
    );
    assert_eq!(
        common::daemon::metric(&metrics, "tclseg_segment_queue_capacity", ""),
        4.0,
        "the default http.segment_queue: {metrics}"
    );
    assert_eq!(
        common::daemon::find_metric(&metrics, "tclseg_segment_queue_depth", ""),
        Some(0.0),
        "{metrics}"
    );
    let queue = queue_status(&daemon);
    assert_eq!(
        queue,
        serde_json::json!({
            "depth": 0, "capacity": 4, "served": 6, "rejected": 0, "invalid": 0, "failed": 0
        })
    );
}

#[test]
fn a_multipart_upload_carries_the_image_and_its_parameters_and_a_bad_form_gets_a_clear_4xx() {
    let dir = tempfile::tempdir().expect("tmp");
    let daemon = start(dir.path(), Config::new().pipeline(folder(dir.path())));
    let image = png(64, 48);

    // The image in a file part, the parameters in text fields.
    let reply = post_form(
        &daemon,
        "",
        &[
            ("queries", None, None, b"red square,sky"),
            ("image", Some("photo.png"), Some("image/png"), &image),
            ("bg_thresh", None, None, b"0.35"),
            ("pamr", None, None, b"false"),
        ],
    );
    let answer = sidecar(&reply);
    assert_eq!(
        (answer["width"].as_u64(), answer["height"].as_u64()),
        (Some(64), Some(48))
    );
    assert_eq!(answer["settings"]["pamr"], false, "{answer}");
    assert!(
        (answer["settings"]["background"].as_f64().expect("bg") - 0.35).abs() < 1e-6,
        "{answer}"
    );
    assert!(reply.body.contains("\"sky\""), "{}", reply.body);

    // Parameters in the query string, the image as a part of no stated type; and the label map back.
    let reply = request_with_body(
        daemon.port,
        "POST",
        "/v1/segment?pipeline=cam",
        &format!("Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nAccept: image/png\r\n"),
        &form(&[("image", Some("photo.png"), None, &image)]),
    );
    assert_eq!(reply.code, 200, "{}", reply.body);
    let labels =
        image::load_from_memory_with_format(&reply.bytes, image::ImageFormat::Png).expect("a PNG");
    assert_eq!((labels.width(), labels.height()), (64, 48));

    let text_part: &[Part] = &[("image", Some("a.txt"), Some("text/plain"), b"hello")];
    let two_images: &[Part] = &[
        ("image", Some("a.png"), Some("image/png"), &image),
        ("image", Some("b.png"), Some("image/png"), &image),
    ];
    let unknown: &[Part] = &[
        ("image", Some("a.png"), Some("image/png"), &image),
        ("colour", None, None, b"red"),
    ];
    let no_image: &[Part] = &[("file", Some("a.png"), Some("image/png"), &image)];
    let none_at_all: &[Part] = &[("queries", None, None, b"a")];
    let not_decodable: &[Part] = &[("image", Some("a.png"), Some("image/png"), b"not a png")];
    let file_parameter: &[Part] = &[
        ("image", Some("a.png"), Some("image/png"), &image),
        ("pamr", Some("pamr.txt"), Some("text/plain"), b"true"),
    ];
    let out_of_range: &[Part] = &[
        ("image", Some("a.png"), Some("image/png"), &image),
        ("kp_weight", None, None, b"1.5"),
    ];
    for (parts, code, says) in [
        (none_at_all, 400, "no part named 'image'"),
        (no_image, 400, "unknown multipart part 'file'"),
        (two_images, 400, "two parts named 'image'"),
        (unknown, 400, "unknown multipart part 'colour'"),
        (
            text_part,
            415,
            "the part 'image' is text/plain, not an image",
        ),
        (not_decodable, 400, "not an image in a supported format"),
        (out_of_range, 400, "kp_weight: 1.5 is outside [0, 1]"),
        (file_parameter, 400, "the part 'pamr' is a file"),
    ] {
        let reply = post_form(&daemon, "?queries=a", parts);
        assert_eq!(reply.code, code, "{says}: {}", reply.body);
        assert!(reply.body.contains(says), "{says}: {}", reply.body);
    }
    // A form whose boundary is not the one the head declares.
    let reply = request_with_body(
        daemon.port,
        "POST",
        "/v1/segment?queries=a",
        "Content-Type: multipart/form-data; boundary=another\r\n",
        &form(&[("image", Some("a.png"), Some("image/png"), &image)]),
    );
    assert_eq!(reply.code, 400, "{}", reply.body);
    assert!(reply.body.contains("multipart"), "{}", reply.body);

    let queue = queue_status(&daemon);
    assert_eq!(queue["served"], 2, "{queue}");
    assert_eq!(queue["invalid"], 9, "{queue}");
    assert_eq!(
        daemon.metric("tclseg_segment_requests_total", "outcome=\"invalid\""),
        9.0
    );
    // The daemon still serves.
    let reply = post_form(
        &daemon,
        "?queries=a",
        &[("image", Some("a.png"), Some("image/png"), &image)],
    );
    assert_eq!(reply.code, 200, "{}", reply.body);
}

#[test]
fn settings_and_thresholds_move_the_result_the_way_they_say_and_bad_ranges_name_the_parameter() {
    let dir = tempfile::tempdir().expect("tmp");
    let cam = Pipeline::folder("cam", &dir.path().join("inbox"), &dir.path().join("out"))
        .with("queries = [\"red square\", \"sky\"]\nbg_thresh = 0.2\nkp_weight = 0.25");
    let daemon = start(dir.path(), Config::new().pipeline(cam));
    let image = png(64, 48);
    let ask = |query: &str| sidecar(&post(&daemon, query, "", &image));

    // The background threshold: at 0 no pixel is background, at 1 every pixel is, in between in order.
    let none = ask("?queries=red%20square,sky&bg_thresh=0");
    let some = ask("?queries=red%20square,sky&bg_thresh=0.5");
    let all = ask("?queries=red%20square,sky&bg_thresh=1");
    let (b0, b5, b1) = (
        fraction(&none, "background"),
        fraction(&some, "background"),
        fraction(&all, "background"),
    );
    assert!(b0 <= b5 && b5 <= b1 && b0 < b1, "background {b0} {b5} {b1}");
    assert!(
        (b1 - 1.0).abs() < 1e-9,
        "bg_thresh=1 leaves {b1} background"
    );
    assert_eq!(all["settings"]["background"], 1.0);

    // A query's own threshold sends its low-scoring pixels to the background and touches no other query.
    let red = fraction(&none, "red square");
    let sky = fraction(&none, "sky");
    assert!(red > 0.0, "{none}");
    let cut = ask("?queries=red%20square,sky&bg_thresh=0&threshold=red%20square:1");
    assert_eq!(fraction(&cut, "red square"), 0.0, "{cut}");
    assert!(
        (fraction(&cut, "background") - (b0 + red)).abs() < 1e-9,
        "{cut}"
    );
    assert!((fraction(&cut, "sky") - sky).abs() < 1e-9, "{cut}");
    let kept = ask("?queries=red%20square,sky&bg_thresh=0&threshold=red%20square:0");
    assert!((fraction(&kept, "red square") - red).abs() < 1e-9, "{kept}");

    // The engine settings are the ones asked for.
    let tuned = ask("?queries=sky&pamr=false&kp_weight=0.1");
    assert_eq!(tuned["settings"]["pamr"], false, "{tuned}");
    assert!((tuned["settings"]["kp_weight"].as_f64().expect("kp") - 0.1).abs() < 1e-6);

    // With a pipeline, its settings are the defaults and parameters override them.
    let defaults = ask("?pipeline=cam");
    assert!((defaults["settings"]["background"].as_f64().expect("bg") - 0.2).abs() < 1e-6);
    assert!((defaults["settings"]["kp_weight"].as_f64().expect("kp") - 0.25).abs() < 1e-6);
    let over = ask("?pipeline=cam&bg_thresh=1&threshold=sky:0.9");
    assert_eq!(over["settings"]["background"], 1.0, "{over}");
    assert!((over["settings"]["kp_weight"].as_f64().expect("kp") - 0.25).abs() < 1e-6);
    assert!((fraction(&over, "background") - 1.0).abs() < 1e-9, "{over}");

    for (query, says) in [
        (
            "?queries=a&bg_thresh=1.5",
            "bg_thresh: 1.5 is outside [0, 1]",
        ),
        (
            "?queries=a&kp_weight=-0.2",
            "kp_weight: -0.2 is outside [0, 1]",
        ),
        (
            "?queries=a&bg_thresh=lots",
            "bg_thresh: 'lots' is not a number in [0, 1]",
        ),
        (
            "?queries=a&pamr=maybe",
            "pamr: 'maybe' is not true or false",
        ),
        (
            "?queries=a&threshold=a:7",
            "threshold of 'a': 7 is outside [0, 1]",
        ),
        (
            "?queries=a&threshold=b:0.5",
            "threshold: no query is named 'b'",
        ),
        ("?pipeline=cam&threshold=car:0.5", "no query is named 'car'"),
        (
            "?pipeline=cam&bg_thresh=2",
            "bg_thresh: 2 is outside [0, 1]",
        ),
    ] {
        let reply = post(&daemon, query, "", &image);
        assert_eq!(reply.code, 400, "{query}: {}", reply.body);
        assert!(reply.body.contains(says), "{query}: {}", reply.body);
    }
}

/// A request head that declares `length` bytes of body and sends none: the answer must come from the head.
fn declared_only(port: u16, length: usize) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "POST /v1/segment?queries=a HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n\
         Content-Length: {length}\r\n\r\n"
    )
    .expect("write");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

#[test]
fn bad_huge_and_unasked_requests_get_a_clear_4xx() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::new()
        .pipeline(folder(dir.path()))
        .http("segment_max_mb = 1\nsegment_max_pixels = 10000");
    let daemon = start(dir.path(), config);
    let small = png(40, 30);

    let reply = post(&daemon, "?queries=a", "", b"hello, not an image");
    assert_eq!(reply.code, 400, "{}", reply.body);
    assert!(
        reply.body.contains("not an image in a supported format"),
        "{}",
        reply.body
    );
    let cut = &small[..small.len() / 2];
    let reply = post(&daemon, "?queries=a", "", cut);
    assert_eq!(reply.code, 400, "{}", reply.body);
    assert!(
        reply.body.contains("corrupt or truncated"),
        "{}",
        reply.body
    );

    let reply = post(&daemon, "", "", &small);
    assert_eq!(reply.code, 400, "{}", reply.body);
    assert!(reply.body.contains("no queries"), "{}", reply.body);
    let reply = post(&daemon, "?pipeline=nope", "", &small);
    assert_eq!(reply.code, 404, "{}", reply.body);
    assert!(reply.body.contains("'nope'"), "{}", reply.body);
    let reply = request_with_body(
        daemon.port,
        "POST",
        "/v1/segment?queries=a",
        "Content-Type: text/plain\r\n",
        &small,
    );
    assert_eq!(reply.code, 415, "{}", reply.body);

    // Over the pixel limit (from the header), and a body declared over the byte limit.
    let reply = post(&daemon, "?queries=a", "", &png(200, 100));
    assert_eq!(reply.code, 413, "{}", reply.body);
    assert!(reply.body.contains("over the limit"), "{}", reply.body);
    let answer = declared_only(daemon.port, 2 << 20);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("http.segment_max_mb"), "{answer}");

    // The daemon still serves.
    let reply = post(&daemon, "?queries=a", "", &small);
    assert_eq!(reply.code, 200, "{}", reply.body);
}

#[test]
fn with_a_token_file_the_route_needs_the_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let token = dir.path().join("http.token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write");
    let config = Config::new()
        .pipeline(folder(dir.path()))
        .http(&format!("token_file = \"{}\"", token.display()));
    let daemon = start(dir.path(), config);
    let image = png(32, 32);
    let reply = post(&daemon, "?queries=a", "", &image);
    assert_eq!(reply.code, 401, "{}", reply.body);
    assert!(reply.header("www-authenticate").is_some(), "{}", reply.head);
    let reply = post(
        &daemon,
        "?queries=a",
        "Authorization: Bearer wrong-token-123456\r\n",
        &image,
    );
    assert_eq!(reply.code, 403, "{}", reply.body);
    let reply = post(
        &daemon,
        "?queries=a",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
        &image,
    );
    assert_eq!(reply.code, 200, "{}", reply.body);
}

#[test]
fn a_burst_beyond_the_queue_gets_429s_while_a_pipeline_keeps_being_served() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::new()
        .pipeline(folder(dir.path()))
        .http("segment_queue = 1");
    let daemon = start(dir.path(), config);
    let port = daemon.port;
    let image = Arc::new(png(320, 240));
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<(u16, Option<String>)>::new()));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (image, stop, answers) =
                (Arc::clone(&image), Arc::clone(&stop), Arc::clone(&answers));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let reply = request_with_body(
                        port,
                        "POST",
                        "/v1/segment?queries=red%20square",
                        "Content-Type: image/png\r\n",
                        &image,
                    );
                    let retry = reply.header("retry-after").map(str::to_string);
                    answers.lock().expect("lock").push((reply.code, retry));
                }
            })
        })
        .collect();

    // Under that load, images dropped into the pipeline's folder are still segmented.
    common::wait_until("the first answers", Duration::from_secs(60), || {
        answers.lock().expect("lock").len() >= 8
    });
    // The queue shows the request waiting, never more than it holds.
    common::wait_until(
        "a request waiting in /status",
        Duration::from_secs(60),
        || {
            let queue = queue_status(&daemon);
            assert!(queue["depth"].as_u64() <= Some(1), "{queue}");
            queue["depth"] == 1
        },
    );
    let before = answers.lock().expect("lock").len();
    let inbox = dir.path().join("inbox");
    for i in 0..4 {
        common::write_png(&inbox.join(format!("f{i}.png")), 96, 64);
    }
    common::wait_until("the folder's frames", Duration::from_secs(300), || {
        daemon.frames_out("cam") >= 4.0
    });
    let during = answers.lock().expect("lock").len();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("client");
    }
    let answers = answers.lock().expect("lock");
    assert!(
        during > before,
        "the endpoint answered nothing while the folder was served"
    );
    let ok = answers.iter().filter(|(code, _)| *code == 200).count();
    let busy: Vec<_> = answers.iter().filter(|(code, _)| *code != 200).collect();
    assert!(ok >= 1, "no request was served: {answers:?}");
    assert!(
        !busy.is_empty(),
        "8 clients on a queue of 1 were never refused ({ok} served)"
    );
    for (code, retry) in &busy {
        assert_eq!(*code, 429, "{answers:?}");
        assert_eq!(retry.as_deref(), Some("1"), "429 without Retry-After");
    }
    let metrics = daemon.metrics();
    assert!(
        common::daemon::metric(
            &metrics,
            "tclseg_http_segment_requests_total",
            "code=\"429\""
        ) >= busy.len() as f64,
        "{metrics}"
    );
    // Every answer the clients got is counted by its outcome; nothing waits once they stopped.
    let queue = queue_status(&daemon);
    assert_eq!(
        queue["rejected"].as_u64(),
        Some(busy.len() as u64),
        "{queue}"
    );
    assert_eq!(queue["served"].as_u64(), Some(ok as u64), "{queue}");
    assert_eq!(
        (queue["depth"].as_u64(), queue["capacity"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(
        common::daemon::metric(
            &metrics,
            "tclseg_segment_requests_total",
            "outcome=\"rejected\""
        ),
        busy.len() as f64,
        "{metrics}"
    );
}
