//! `POST /v1/segment` against a real daemon on the tiny fixture bundle: the sidecar, label map and overlay
//! replies, every refusal (bad image, too large, no queries, unknown pipeline, token), and a burst of concurrent
//! requests that gets 429s beyond its queue while a folder pipeline keeps being served.

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
    let before = answers.lock().expect("lock").len();
    let inbox = dir.path().join("inbox");
    for i in 0..4 {
        common::write_png(&inbox.join(format!("f{i}.png")), 96, 64);
    }
    common::wait_until("the folder's frames", Duration::from_secs(120), || {
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
}
