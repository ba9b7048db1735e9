//! GStreamer sources: RTSP, HTTP, video files and V4L2 into an appsink, one attempt at a time.
//!
//! Each attempt builds a **fresh pipeline**: `uridecodebin` (or `v4l2src ! decodebin`) → [`videorate` when a rate
//! cap is set, dropping frames before the costly colour conversion] → `videoconvert` → RGB `appsink`. Reusing a
//! pipeline after an RTSP failure does not recover (the decodebins' dynamic links are one-shot), so the supervisor
//! calls `run_once` again instead. A hung server sends no bus message at all, so the pull loop has its own
//! no-frame watchdog; a live source's EOS means the server went away, not that the work is done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use image::RgbImage;

use super::rtsp::{is_transport_refusal, with_transport_hint, RtspTransport};
use super::sequence::FrameSequence;
use super::{Frame, FrameIntake, SourceKind, SourceSpec};
use crate::telemetry::{DropReason, PipelineMetrics, Stage};

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The pipeline is being stopped.
    Stopped,
    /// A file or one-shot folder reached its end: nothing to retry.
    Finished,
    /// No frame within the watchdog period.
    Stalled,
    /// An error, or a live source's end of stream.
    Failed(String),
    /// The RTSP server refused to send RTP over this transport (it answered 461 Unsupported transport).
    TransportRefused(RtspTransport),
}

#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub max_fps: Option<f64>,
    pub watchdog: Duration,
    /// For RTSP sources; the supervisor resolves `Auto` to the transport of each attempt.
    pub rtsp_transport: RtspTransport,
}

/// How long one pull waits before the loop checks for stop requests, bus errors and the watchdog.
const PULL_TIMEOUT: Duration = Duration::from_millis(200);
/// RTSP jitter-buffer latency in ms: small, since a late frame is worth less than a fresh one here.
const RTSP_LATENCY_MS: u32 = 200;

/// Runs one attempt: builds the pipeline, plays it and pushes frames to `intake` until it ends.
/// `delivered` is set once a frame got through (the supervisor then resets its backoff).
pub fn run_once(
    spec: &SourceSpec,
    settings: &StreamSettings,
    intake: &dyn FrameIntake,
    metrics: &PipelineMetrics,
    sequence: &FrameSequence,
    delivered: &mut bool,
) -> RunEnd {
    let built = match build(spec, settings) {
        Ok(b) => b,
        Err(e) => return RunEnd::Failed(redact_text(&format!("{e:#}"))),
    };
    let end = pull_loop(spec, settings, &built, intake, metrics, sequence, delivered);
    // Null always returns (a hung RTSP server's TEARDOWN times out inside GStreamer in about 100 ms).
    let _ = built.pipeline.set_state(gst::State::Null);
    end
}

struct Built {
    pipeline: gst::Pipeline,
    appsink: gst_app::AppSink,
    /// Decoded frames that reached the conversion chain, counted by a pad probe.
    arrived: Arc<AtomicU64>,
    /// The rate cap's `videorate`, when `max_fps` is set. Its `in` and `out` counters give the frames the cap
    /// dropped (in drop-only mode it leaves its `drop` counter at 0). Counting "arrived minus reached the appsink"
    /// instead would also count a frame that is inside `videoconvert` at that moment, and report a drop on a
    /// lossless file under load.
    rate: Option<gst::Element>,
}

pub(super) fn make(factory: &str) -> Result<gst::Element> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| anyhow!("GStreamer element '{factory}' is missing; run scripts/setup (it installs gstreamer1.0-plugins-base/good/bad/ugly and gstreamer1.0-libav)"))
}

fn build(spec: &SourceSpec, settings: &StreamSettings) -> Result<Built> {
    crate::gst::init()?;
    let pipeline = gst::Pipeline::new();
    let decoder = decoder(&pipeline, spec, settings.rtsp_transport)?;
    let rate = match settings.max_fps {
        Some(fps) => {
            let rate = make("videorate")?;
            rate.set_property("drop-only", true);
            rate.set_property("max-rate", fps.ceil().max(1.0) as i32);
            Some(rate)
        }
        None => None,
    };
    let convert = make("videoconvert")?;
    let caps = gst_video::VideoCapsBuilder::new()
        .format(gst_video::VideoFormat::Rgb)
        .build();
    let appsink = gst_app::AppSink::builder()
        .caps(&caps)
        .sync(false)
        .max_buffers(2)
        .drop(false)
        .build();
    let mut chain: Vec<gst::Element> = Vec::new();
    chain.extend(rate.clone());
    chain.push(convert);
    chain.push(appsink.clone().upcast());
    pipeline.add_many(chain.iter())?;
    gst::Element::link_many(chain.iter()).context("cannot link the conversion chain")?;
    let arrived = Arc::new(AtomicU64::new(0));
    if let Some(pad) = chain[0].static_pad("sink") {
        let counter = Arc::clone(&arrived);
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
            counter.fetch_add(1, Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        });
    }
    let first = chain[0].clone();
    let pipeline_weak = pipeline.downgrade();
    // Video goes to the chain; any other stream (audio, subtitles) to a fakesink, so it never stalls the source.
    decoder.connect_pad_added(move |_, pad| {
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let is_video = caps
            .structure(0)
            .is_some_and(|s| s.name().starts_with("video/"));
        if is_video {
            if let Some(sink_pad) = first.static_pad("sink") {
                if !sink_pad.is_linked() {
                    let _ = pad.link(&sink_pad);
                    return;
                }
            }
        }
        if let (Some(pipeline), Ok(fake)) = (pipeline_weak.upgrade(), make("fakesink")) {
            fake.set_property("sync", false);
            fake.set_property("async", false);
            if pipeline.add(&fake).is_ok() {
                let _ = fake.sync_state_with_parent();
                if let Some(fake_pad) = fake.static_pad("sink") {
                    let _ = pad.link(&fake_pad);
                }
            }
        }
    });
    Ok(Built {
        pipeline,
        appsink,
        arrived,
        rate,
    })
}

/// Frames `videorate` has taken in but not let out. `in` is read before `out`: a frame counts in `in` before
/// it counts in `out`, so this order can only undercount for a moment (the caller keeps the running maximum),
/// never report a frame that is still on its way through as dropped.
fn rate_capped(rate: &gst::Element) -> u64 {
    let taken = rate.property::<u64>("in");
    let passed = rate.property::<u64>("out");
    taken.saturating_sub(passed)
}

/// The pipeline's source and decoder, added to `pipeline`: `uridecodebin` (RTSP over `transport` with a short
/// jitter buffer) or `v4l2src ! decodebin`. Returns the element whose pads carry the decoded streams.
pub(super) fn decoder(
    pipeline: &gst::Pipeline,
    spec: &SourceSpec,
    transport: RtspTransport,
) -> Result<gst::Element> {
    let decode = match spec.kind() {
        SourceKind::V4l2(device) => {
            let src = make("v4l2src")?;
            src.set_property("device", device.to_string_lossy().as_ref());
            let decode = make("decodebin")?;
            pipeline.add_many([&src, &decode])?;
            src.link(&decode)
                .context("cannot link v4l2src to decodebin")?;
            decode
        }
        SourceKind::VideoFile(path) => {
            if !path.is_file() {
                return Err(anyhow!(
                    "{} does not exist or is not a file",
                    path.display()
                ));
            }
            let uri = gst::glib::filename_to_uri(path, None)
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            let decode = make("uridecodebin")?;
            decode.set_property("uri", uri.as_str());
            pipeline.add(&decode)?;
            decode
        }
        SourceKind::Rtsp | SourceKind::Http => {
            let decode = make("uridecodebin")?;
            decode.set_property("uri", spec.uri());
            // RTSP over the transport asked for (TCP by default: no lost UDP packets, passes NAT and firewalls)
            // with a short jitter buffer.
            let protocols = transport.protocols();
            decode.connect("source-setup", false, move |values| {
                if let Some(Ok(source)) = values.get(1).map(|v| v.get::<gst::Element>()) {
                    if source.has_property("protocols") {
                        source.set_property_from_str("protocols", protocols);
                    }
                    if source.has_property("latency") {
                        source.set_property("latency", RTSP_LATENCY_MS);
                    }
                }
                None
            });
            pipeline.add(&decode)?;
            decode
        }
        SourceKind::Folder { .. } => {
            return Err(anyhow!(
                "folder sources are read by the folder source, not GStreamer"
            ))
        }
    };
    Ok(decode)
}

fn pull_loop(
    spec: &SourceSpec,
    settings: &StreamSettings,
    built: &Built,
    intake: &dyn FrameIntake,
    metrics: &PipelineMetrics,
    sequence: &FrameSequence,
    delivered: &mut bool,
) -> RunEnd {
    if let Err(e) = built.pipeline.set_state(gst::State::Playing) {
        return RunEnd::Failed(format!("cannot start the pipeline: {e}"));
    }
    let Some(bus) = built.pipeline.bus() else {
        return RunEnd::Failed("the pipeline has no bus".into());
    };
    let live = spec.is_live();
    let mut last_frame = Instant::now();
    let (mut arrived_seen, mut capped_seen) = (0u64, 0u64);
    loop {
        if intake.stopping() {
            return RunEnd::Stopped;
        }
        while let Some(msg) = bus.pop_filtered(&[
            gst::MessageType::Error,
            gst::MessageType::Warning,
            gst::MessageType::Eos,
        ]) {
            match msg.view() {
                gst::MessageView::Error(err) => {
                    if spec.kind() == &SourceKind::Rtsp && is_transport_refusal(err) {
                        return RunEnd::TransportRefused(settings.rtsp_transport);
                    }
                    let from = msg.src().map(|s| s.name().to_string()).unwrap_or_default();
                    let debug = err
                        .debug()
                        .map(|d| d.replace('\n', " "))
                        .unwrap_or_default();
                    let text = format!("{from}: {} ({debug})", err.error());
                    return RunEnd::Failed(redact_text(&with_transport_hint(&text)));
                }
                gst::MessageView::Warning(w) => {
                    tracing::debug!(source = %spec, "GStreamer warning: {}", redact_text(&w.error().to_string()));
                }
                _ => {}
            }
        }
        match built
            .appsink
            .try_pull_sample(gst::ClockTime::from_nseconds(PULL_TIMEOUT.as_nanos() as u64))
        {
            Some(sample) => {
                let received = Instant::now();
                let arrived = built.arrived.load(Ordering::Relaxed);
                let capped = built.rate.as_ref().map_or(0, rate_capped);
                metrics.frames_in_n(arrived.saturating_sub(arrived_seen));
                if capped > capped_seen {
                    metrics.drop_frames(DropReason::RateCap, capped - capped_seen);
                }
                (arrived_seen, capped_seen) = (arrived, capped.max(capped_seen));
                let image = match sample_to_rgb(&sample) {
                    Ok(img) => img,
                    Err(e) => {
                        tracing::warn!(source = %spec, "undecodable frame: {e:#}");
                        metrics.drop_frames(DropReason::DecodeError, 1);
                        continue;
                    }
                };
                let pts = sample.buffer().and_then(|b| b.pts());
                let latency = if live {
                    pipeline_latency(&built.pipeline, pts)
                } else {
                    None
                };
                let latency = latency.unwrap_or(Duration::ZERO);
                metrics.observe(Stage::Decode, latency);
                metrics.connected.store(true, Ordering::Relaxed);
                let frame = Frame {
                    image,
                    sequence: sequence.next(),
                    pts_ns: pts.map(|p| p.nseconds()),
                    captured: received.checked_sub(latency).unwrap_or(received),
                    received,
                    wall_ms: crate::telemetry::unix_ms(),
                    file: None,
                };
                *delivered = true;
                if !intake.push(frame) {
                    return RunEnd::Stopped;
                }
                last_frame = Instant::now();
            }
            None => {
                if built.appsink.is_eos() {
                    return if live {
                        RunEnd::Failed("end of stream: the server closed the connection".into())
                    } else {
                        RunEnd::Finished
                    };
                }
                if last_frame.elapsed() >= settings.watchdog {
                    return RunEnd::Stalled;
                }
            }
        }
    }
}

/// How long ago, on the pipeline clock, the buffer was captured (live sources only).
fn pipeline_latency(pipeline: &gst::Pipeline, pts: Option<gst::ClockTime>) -> Option<Duration> {
    let clock = pipeline.clock()?;
    let base = pipeline.base_time()?;
    let now = clock.time().checked_sub(base)?;
    let lag = now.checked_sub(pts?)?;
    let lag = Duration::from_nanos(lag.nseconds());
    (lag < Duration::from_secs(60)).then_some(lag)
}

/// Copies an RGB sample into a tightly packed image (GStreamer pads RGB rows to 4 bytes).
fn sample_to_rgb(sample: &gst::Sample) -> Result<RgbImage> {
    let caps = sample
        .caps()
        .ok_or_else(|| anyhow!("sample without caps"))?;
    let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| anyhow!("bad caps: {e}"))?;
    let buffer = sample
        .buffer()
        .ok_or_else(|| anyhow!("sample without buffer"))?;
    let map = buffer
        .map_readable()
        .map_err(|_| anyhow!("cannot map the buffer"))?;
    let (w, h) = (info.width() as usize, info.height() as usize);
    let stride = info.stride().first().copied().unwrap_or(0).max(0) as usize;
    let row = w * 3;
    if w == 0 || h == 0 || stride < row || map.len() < (h - 1) * stride + row {
        return Err(anyhow!(
            "buffer of {} bytes does not hold {w}x{h} RGB at stride {stride}",
            map.len()
        ));
    }
    let mut data = Vec::with_capacity(row * h);
    for y in 0..h {
        data.extend_from_slice(&map[y * stride..y * stride + row]);
    }
    RgbImage::from_raw(w as u32, h as u32, data).ok_or_else(|| anyhow!("bad frame size"))
}

/// Redacts every URI inside a free-form text (GStreamer errors quote the URI they failed on).
pub fn redact_text(text: &str) -> String {
    static URI: std::sync::OnceLock<Option<regex::Regex>> = std::sync::OnceLock::new();
    let re =
        URI.get_or_init(|| regex::Regex::new(r#"[A-Za-z][A-Za-z0-9+.-]*://[^\s'"()<>]+"#).ok());
    match re {
        Some(re) => re
            .replace_all(text, |c: &regex::Captures| super::redact_uri(&c[0]))
            .into_owned(),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_inside_messages_are_redacted() {
        let text = "Could not open resource (rtsp://admin:pw@10.0.0.1/x): refused";
        assert_eq!(
            redact_text(text),
            "Could not open resource (rtsp://***@10.0.0.1/x): refused"
        );
    }
}
