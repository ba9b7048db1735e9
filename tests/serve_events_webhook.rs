//! `tclseg serve` posting events to a webhook receiver run by the test, which answers 500 until the test lets it
//! answer 200: every event the frames call for arrives once accepted, in order per pipeline, each request signed
//! (HMAC-SHA256 over `<timestamp>.<body>`, checked here with the hmac crate); `/metrics` counts the retries and
//! `/status` shows the outbox filling, then draining to 0. Two pipelines read the same video file, one writing
//! JSON sidecars and one only label maps: the events of the one without sidecars (whose statistics skip the
//! sidecar's RLE) must say what the other's say.

mod common;
mod events_common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::config::{Config, Pipeline};
use common::daemon::Daemon;
use common::video::write_video;
use common::wait_until;
use events_common::expect::{
    assert_in_order, assert_same_events, dedup, expected, of_pipeline, sequences, sidecar_frames,
    ZERO_HYSTERESIS,
};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tclseg::events::Event;

const WAIT: Duration = Duration::from_secs(120);
const SECRET: &[u8] = b"s3cret-for-the-test";
const FRAMES: u64 = 10;
const DESTINATION: &str = "webhook:alerts";

/// One POST as the receiver saw it.
struct Seen {
    /// The signature header held for the timestamp header and the body, and the timestamp was recent.
    signed: bool,
    /// The event-id header named the body's event.
    id_matches: bool,
    event: Option<Event>,
    accepted: bool,
}

#[derive(Default)]
struct Hook {
    failing: AtomicBool,
    seen: Mutex<Vec<Seen>>,
}

impl Hook {
    fn requests(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    fn accepted(&self) -> Vec<Event> {
        let seen = self.seen.lock().expect("lock");
        seen.iter()
            .filter(|s| s.accepted)
            .filter_map(|s| s.event.clone())
            .collect()
    }
}

/// Checks a request the way a receiver following the usual webhook scheme does: the MAC over `<t>.<body>`,
/// compared in constant time, and a timestamp within five minutes.
fn verify(timestamp: &str, signature: &str, body: &[u8]) -> bool {
    let Some(hex_mac) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(tag) = hex::decode(hex_mac) else {
        return false;
    };
    let Ok(t) = timestamp.parse::<u64>() else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET).expect("key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    now.abs_diff(t) <= 300 && mac.verify_slice(&tag).is_ok()
}

async fn receive(
    hook: Arc<Hook>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (timestamp, signature, id) = (
        head("X-Tclseg-Timestamp"),
        head("X-Tclseg-Signature"),
        head("X-Tclseg-Event-Id"),
    );
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let event: Option<Event> = serde_json::from_slice(&body).ok();
    let accepted = !hook.failing.load(Ordering::SeqCst);
    hook.seen.lock().expect("lock").push(Seen {
        signed: verify(&timestamp, &signature, &body),
        id_matches: event.as_ref().is_some_and(|e| e.id == id),
        event,
        accepted,
    });
    let mut answer = Response::new(Full::new(Bytes::from_static(b"")));
    if !accepted {
        *answer.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    Ok(answer)
}

/// Serves `hook` on a free loopback port until the runtime ends.
fn listen(runtime: &tokio::runtime::Runtime, hook: Arc<Hook>) -> u16 {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the receiver");
    let port = listener.local_addr().expect("addr").port();
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let hook = hook.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| receive(hook.clone(), r));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[test]
fn a_receiver_failing_then_recovering_gets_every_event_signed_and_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let clip = dir.path().join("clip.mp4");
    write_video(&clip, FRAMES as u32);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let hook = Arc::new(Hook::default());
    hook.failing.store(true, Ordering::SeqCst);
    let port = listen(&runtime, hook.clone());
    let secret = dir.path().join("webhook.secret");
    std::fs::write(&secret, [SECRET, b"\n"].concat()).expect("secret");

    let source = format!("file://{}", clip.display());
    let (out_a, out_b) = (dir.path().join("a"), dir.path().join("b"));
    // No background, so every pixel belongs to a query and something is seen in every frame.
    let a = Pipeline::new("a", &source, &out_a).with("bg_thresh = 0.0");
    let b = Pipeline::new("b", &source, &out_b)
        .with("bg_thresh = 0.0")
        .output("json = false\nlabels = true");
    // One frame per inference run: both pipelines' frames go through the model alike.
    let config = Config::new()
        .inference("max_batch = 1")
        .pipeline(a)
        .pipeline(b)
        .tables(&format!(
            "[events]\n{ZERO_HYSTERESIS}[events.outbox]\npath = \"{}\"\n[[events.webhooks]]\nname = \"alerts\"\nurl = \"http://127.0.0.1:{port}/hooks/tclseg\"\nsecret_file = \"{}\"\ntimeout_s = 5\nmax_backoff_s = 0.5\n",
            dir.path().join("events.redb").display(),
            secret.display()
        ));
    let mut daemon = Daemon::start(dir.path(), &config);
    daemon.wait_ready();
    wait_until("every frame of both pipelines", WAIT, || {
        daemon.frames_out("a") >= FRAMES as f64 && daemon.frames_out("b") >= FRAMES as f64
    });
    wait_until("a few refused deliveries", WAIT, || hook.requests() >= 3);

    let frames = sidecar_frames(&out_a);
    assert_eq!(frames.len() as u64, FRAMES, "sidecars of pipeline a");
    assert!(
        sidecar_frames(&out_b).is_empty(),
        "pipeline b writes no sidecar"
    );
    let want_a = expected(&frames);
    assert!(!want_a.is_empty());
    let total = 2 * want_a.len() as u64;
    // Nothing accepted yet: every event of both pipelines waits in the outbox.
    assert_eq!(
        daemon.delivery(DESTINATION, "depth"),
        Some(total),
        "{}",
        daemon.get("/status").body
    );
    assert!(hook.accepted().is_empty());

    hook.failing.store(false, Ordering::SeqCst);
    wait_until("the outbox drained", WAIT, || {
        daemon.delivery(DESTINATION, "depth") == Some(0)
    });
    assert_eq!(daemon.delivery(DESTINATION, "delivered"), Some(total));
    let retried = daemon.metric(
        "tclseg_events_retried_total",
        &format!("destination=\"{DESTINATION}\""),
    );
    assert!(retried >= 3.0, "{}", daemon.metrics());
    assert_eq!(
        daemon.metric(
            "tclseg_events_dropped_total",
            &format!("destination=\"{DESTINATION}\"")
        ),
        0.0
    );

    {
        let seen = hook.seen.lock().expect("lock");
        assert!(
            seen.iter().all(|s| s.signed),
            "a request with a bad or missing signature"
        );
        assert!(
            seen.iter().all(|s| s.id_matches),
            "an event id header that is not the body's"
        );
        assert!(seen.iter().any(|s| !s.accepted) && seen.iter().any(|s| s.accepted));
    }
    let got = dedup(&hook.accepted());
    assert_eq!(got.len() as u64, total);
    let (got_a, got_b) = (of_pipeline(&got, "a"), of_pipeline(&got, "b"));
    assert_in_order(&got_a, &sequences(&frames));
    assert_in_order(&got_b, &sequences(&[]));
    assert_same_events(&got_a, &want_a);
    // The same frames through the same model: pipeline b (statistics without a sidecar) reports what a reports.
    let says = |e: &Event| (e.query.clone(), e.kind, e.area, e.bbox, e.mean_score);
    assert_eq!(
        got_b.iter().map(says).collect::<Vec<_>>(),
        got_a.iter().map(says).collect::<Vec<_>>()
    );
    assert!(got_b.iter().all(|e| e.outputs.is_none()));

    let exit = daemon.terminate(WAIT);
    assert!(exit.success(), "{exit:?}\n{}", daemon.log_text());
}
