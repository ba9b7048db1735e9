//! RTSP transports: the `rtsp_transport` values, rtspsrc's `protocols` flag for each, and recognising (and
//! explaining to an operator) a server that refuses one. Kept apart from `stream` (which builds and runs any
//! GStreamer source) because the supervisor's TCP → UDP fall-back, the probe and the config check all need it
//! without the pipeline code.

use gstreamer as gst;

/// How RTP travels from an RTSP server (per pipeline: `rtsp_transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtspTransport {
    /// TCP first (no lost packets, passes NAT and firewalls); UDP when the server refuses TCP.
    #[default]
    Auto,
    /// RTP interleaved in the RTSP TCP connection.
    Tcp,
    /// RTP over UDP unicast.
    Udp,
    /// RTP over UDP multicast.
    UdpMcast,
}

impl RtspTransport {
    /// The config values, in the order error messages list them.
    pub const NAMES: [&'static str; 4] = ["auto", "tcp", "udp", "udp-mcast"];

    pub fn parse(text: &str) -> Option<RtspTransport> {
        match text {
            "auto" => Some(RtspTransport::Auto),
            "tcp" => Some(RtspTransport::Tcp),
            "udp" => Some(RtspTransport::Udp),
            "udp-mcast" => Some(RtspTransport::UdpMcast),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RtspTransport::Auto => "auto",
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
            RtspTransport::UdpMcast => "udp-mcast",
        }
    }

    /// rtspsrc's `protocols` flags for one attempt. Auto is resolved by the supervisor before an attempt
    /// (rtspsrc's own fall-back order is UDP first, the opposite of what auto promises); here it means TCP.
    pub(super) fn protocols(self) -> &'static str {
        match self {
            RtspTransport::Auto | RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
            RtspTransport::UdpMcast => "udp-mcast",
        }
    }

    /// What to tell an operator whose server refused this transport: the cause and the key to set.
    pub fn refusal_advice(self, pipeline: &str) -> String {
        let (what, instead) = match self {
            RtspTransport::Auto => ("both RTP over TCP and over UDP", "\"udp-mcast\""),
            RtspTransport::Tcp => ("RTP over TCP", "\"auto\" or \"udp\""),
            RtspTransport::Udp => ("RTP over UDP", "\"auto\" or \"tcp\""),
            RtspTransport::UdpMcast => ("RTP over UDP multicast", "\"auto\""),
        };
        format!(
            "the RTSP server refused {what} (461 Unsupported transport): set rtsp_transport = {instead} for pipeline '{pipeline}'"
        )
    }
}

/// Whether an error is rtspsrc saying that no stream could be set up over the transports it was allowed: what
/// it reports when the server answers SETUP with 461 Unsupported transport. It words that as a missing plug-in
/// (STREAM / CODEC_NOT_FOUND, "No supported stream was found. You might need to allow more transport
/// protocols..."), and uridecodebin passes it on as "Your GStreamer installation is missing a plug-in" with
/// rtspsrc's `gst_rtspsrc_setup_streams_start` in the debug text: the step that sends SETUP.
pub(super) fn is_transport_refusal(err: &gst::message::Error) -> bool {
    let debug = err.debug().map(|d| d.to_string()).unwrap_or_default();
    let text = format!("{} {debug}", err.error());
    let missing_plugin = err.error().matches(gst::CoreError::MissingPlugin)
        || err.error().matches(gst::StreamError::CodecNotFound);
    (missing_plugin && debug.contains("rtspsrc_setup_streams_start"))
        || text.contains("allow more transport protocols")
        || text.contains("Unsupported transport")
}

/// Adds the cause and the key to set to a transport error that does not name them: rtspsrc gives up on UDP
/// when no packet arrives (a firewall or NAT in the way) with only a hint at the cause.
pub(super) fn with_transport_hint(text: &str) -> String {
    if text.contains("Could not receive any UDP packets") {
        format!(
            "no RTP packets arrived over UDP (a firewall or NAT drops them): set rtsp_transport = \"tcp\" or \"auto\" for this pipeline ({text})"
        )
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gstreamer::prelude::*;

    #[test]
    fn every_transport_is_a_valid_rtspsrc_protocols_value() {
        // set_property_from_str panics on a value the flags type does not know: check each one we set.
        crate::gst::init().expect("gstreamer");
        let src = super::super::stream::make("rtspsrc").expect("rtspsrc (gst-plugins-good)");
        for name in RtspTransport::NAMES {
            let transport = RtspTransport::parse(name).expect(name);
            assert_eq!(transport.name(), name);
            src.set_property_from_str("protocols", transport.protocols());
        }
        assert_eq!(RtspTransport::parse("TCP"), None);
    }

    #[test]
    fn a_udp_timeout_names_the_key() {
        let text = with_transport_hint("source: Could not read. (Could not receive any UDP packets for 5.0000 seconds, maybe your firewall is blocking it. No other protocols to try.)");
        assert!(text.contains("rtsp_transport = \"tcp\""), "{text}");
        assert_eq!(with_transport_hint("other"), "other");
    }
}
