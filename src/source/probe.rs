//! `tclseg probe`: what a source offers, before a pipeline is configured for it: per stream, the decoded format
//! (resolution, frame rate) and the encoded caps its decoder was given (codec, profile, level).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use gstreamer as gst;
use gstreamer::prelude::*;

use super::rtsp::RtspTransport;
use super::{SourceKind, SourceSpec};

/// One stream of the source: decoded caps, and the encoded caps of each decoder, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub caps: String,
}

/// The encoded side of a decoder: its factory name and the caps on its sink pad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderInfo {
    pub decoder: String,
    pub caps: String,
}

/// The RTSP server refused the transport asked for (461 Unsupported transport).
#[derive(Debug, thiserror::Error)]
#[error("the RTSP server refused RTP over {0}")]
struct TransportRefused(&'static str);

/// Opens the source and reports each stream's caps; fails after `timeout` without any. RTSP goes as
/// `rtsp_transport = "auto"` does: TCP, then UDP if the server refuses TCP.
pub fn probe(spec: &SourceSpec, timeout: Duration) -> Result<(Vec<StreamInfo>, Vec<DecoderInfo>)> {
    let refused = |e: &anyhow::Error| e.is::<TransportRefused>();
    match probe_over(spec, timeout, RtspTransport::Tcp) {
        Err(e) if refused(&e) => match probe_udp_after_refusal(spec, timeout) {
            Err(e) if refused(&e) => bail!(
                "{spec}: the RTSP server refused RTP over both TCP and UDP (461 Unsupported transport); \
                 it may offer only multicast (rtsp_transport = \"udp-mcast\")"
            ),
            other => other,
        },
        other => other,
    }
}

/// UDP right after the server refused TCP. A server may still be tearing down the session it just refused and
/// answer the next one "503 Service Unavailable" (gst-rtsp-server does, for a fraction of a second, with shared
/// media): that answer is retried a few times before it counts. The daemon's supervisor retries by itself.
fn probe_udp_after_refusal(
    spec: &SourceSpec,
    timeout: Duration,
) -> Result<(Vec<StreamInfo>, Vec<DecoderInfo>)> {
    const TRIES: u32 = 4;
    let mut tries = 1;
    loop {
        match probe_over(spec, timeout, RtspTransport::Udp) {
            Err(e) if tries < TRIES && format!("{e:#}").contains("Service Unavailable (503)") => {
                tracing::debug!(
                    "{spec}: 503 right after the refused TCP session; trying UDP again"
                );
                tries += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            other => return other,
        }
    }
}

fn probe_over(
    spec: &SourceSpec,
    timeout: Duration,
    transport: RtspTransport,
) -> Result<(Vec<StreamInfo>, Vec<DecoderInfo>)> {
    crate::gst::init()?;
    let pipeline = gst::Pipeline::new();
    if spec.is_folder() {
        bail!("{spec}: a folder has no streams to probe");
    }
    let decode = super::stream::decoder(&pipeline, spec, transport)?;
    let pads: Arc<Mutex<Vec<gst::Pad>>> = Arc::default();
    let decoders: Arc<Mutex<Vec<gst::Element>>> = Arc::default();
    {
        let decoders = Arc::clone(&decoders);
        decode.connect("deep-element-added", false, move |values| {
            if let Some(Ok(element)) = values.get(2).map(|v| v.get::<gst::Element>()) {
                let is_decoder = !element.is::<gst::Bin>()
                    && element.factory().is_some_and(|f| {
                        f.metadata("klass").is_some_and(|k| k.contains("Decoder"))
                    });
                if is_decoder {
                    if let Ok(mut d) = decoders.lock() {
                        d.push(element);
                    }
                }
            }
            None
        });
    }
    {
        let pads = Arc::clone(&pads);
        let weak = pipeline.downgrade();
        decode.connect_pad_added(move |_, pad| {
            if let (Some(pipeline), Ok(sink)) = (
                weak.upgrade(),
                gst::ElementFactory::make("fakesink").build(),
            ) {
                sink.set_property("sync", false);
                if pipeline.add(&sink).is_ok() && sink.sync_state_with_parent().is_ok() {
                    if let Some(sink_pad) = sink.static_pad("sink") {
                        let _ = pad.link(&sink_pad);
                    }
                }
            }
            if let Ok(mut p) = pads.lock() {
                p.push(pad.clone());
            }
        });
    }
    let result = run(&pipeline, &pads, spec, transport, timeout).map(|streams| {
        let decoders = decoders
            .lock()
            .map(|d| {
                d.iter()
                    .filter_map(|e| {
                        let caps = e.static_pad("sink")?.current_caps()?;
                        Some(DecoderInfo {
                            decoder: e
                                .factory()
                                .map(|f| f.name().to_string())
                                .unwrap_or_default(),
                            caps: caps.to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        (streams, decoders)
    });
    let _ = pipeline.set_state(gst::State::Null);
    result
}

fn run(
    pipeline: &gst::Pipeline,
    pads: &Mutex<Vec<gst::Pad>>,
    spec: &SourceSpec,
    transport: RtspTransport,
    timeout: Duration,
) -> Result<Vec<StreamInfo>> {
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| anyhow!("{spec}: cannot start: {e}"))?;
    let bus = pipeline
        .bus()
        .ok_or_else(|| anyhow!("pipeline without bus"))?;
    let start = Instant::now();
    let mut settled_since: Option<Instant> = None;
    while start.elapsed() < timeout {
        if let Some(msg) = bus.timed_pop_filtered(
            gst::ClockTime::from_mseconds(100),
            &[gst::MessageType::Error],
        ) {
            if let gst::MessageView::Error(err) = msg.view() {
                if *spec.kind() == SourceKind::Rtsp && super::rtsp::is_transport_refusal(err) {
                    return Err(TransportRefused(transport.name()).into());
                }
                let debug = err
                    .debug()
                    .map(|d| d.replace('\n', " "))
                    .unwrap_or_default();
                bail!(
                    "{}",
                    super::stream::redact_text(&format!("{spec}: {} ({debug})", err.error()))
                );
            }
        }
        let infos: Vec<StreamInfo> = pads
            .lock()
            .map(|p| {
                p.iter()
                    .filter_map(|pad| pad.current_caps())
                    .map(|c| StreamInfo {
                        caps: c.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let total = pads.lock().map(|p| p.len()).unwrap_or(0);
        if total > 0 && infos.len() == total {
            // Every exposed stream has negotiated caps; give late streams (audio after video) a moment.
            let since = *settled_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_millis(500) {
                return Ok(infos);
            }
        } else {
            settled_since = None;
        }
    }
    bail!(
        "{spec}: no stream within {:.0} s (is the URI right and the source up?)",
        timeout.as_secs_f64()
    )
}
