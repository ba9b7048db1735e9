//! A local RTSP server streaming synthetic H.264 video, for tests and benchmarks (gstreamer-rtsp-server).
//!
//! `rtsp_server [--port N] [--streams K] [--size WxH] [--fps F] [--protocols all|tcp|udp]` serves `/stream0` …
//! `/stream{K-1}` on 127.0.0.1 (port 0 picks a free one) and prints `PORT <n>` on stdout once it listens. Each
//! stream is a moving ball (`videotestsrc pattern=ball`), x264 with a key frame every second. It runs until
//! killed. `--protocols tcp` or `udp` makes it refuse the other RTP transport (461 Unsupported transport), as
//! many cameras and VLC's server do.

use std::io::Write;

use gstreamer as gst;
use gstreamer_rtsp_server as rtsp;
use gstreamer_rtsp_server::gst_rtsp::RTSPLowerTrans;
use gstreamer_rtsp_server::prelude::*;

fn main() {
    let mut port = 0u32;
    let mut streams = 1usize;
    let (mut width, mut height, mut fps) = (640u32, 480u32, 15u32);
    let mut protocols = RTSPLowerTrans::UDP | RTSPLowerTrans::UDP_MCAST | RTSPLowerTrans::TCP;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--port" => port = value.parse().unwrap_or(0),
            "--streams" => streams = value.parse().unwrap_or(1),
            "--fps" => fps = value.parse().unwrap_or(15),
            "--protocols" => {
                protocols = match value.as_str() {
                    "tcp" => RTSPLowerTrans::TCP,
                    "udp" => RTSPLowerTrans::UDP,
                    "all" => protocols,
                    other => {
                        eprintln!("rtsp_server: --protocols takes all, tcp or udp, not {other}");
                        std::process::exit(2);
                    }
                }
            }
            "--size" => {
                if let Some((w, h)) = value.split_once('x') {
                    width = w.parse().unwrap_or(640);
                    height = h.parse().unwrap_or(480);
                }
            }
            other => {
                eprintln!("rtsp_server: unknown argument {other}");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    if let Err(e) = gst::init() {
        eprintln!("rtsp_server: cannot initialize GStreamer: {e}");
        std::process::exit(1);
    }
    let server = rtsp::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&port.to_string());
    let Some(mounts) = server.mount_points() else {
        eprintln!("rtsp_server: no mount points");
        std::process::exit(1);
    };
    for k in 0..streams {
        let factory = rtsp::RTSPMediaFactory::new();
        factory.set_launch(&format!(
            "( videotestsrc is-live=true pattern=ball ! video/x-raw,width={width},height={height},framerate={fps}/1 \
             ! videoconvert ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} \
             ! rtph264pay name=pay0 pt=96 config-interval=1 )"
        ));
        factory.set_shared(true);
        factory.set_protocols(protocols);
        mounts.add_factory(&format!("/stream{k}"), factory);
    }
    let main_loop = gst::glib::MainLoop::new(None, false);
    if server.attach(None).is_err() {
        eprintln!("rtsp_server: cannot listen on 127.0.0.1:{port}");
        std::process::exit(1);
    }
    println!("PORT {}", server.bound_port());
    let _ = std::io::stdout().flush();
    main_loop.run();
}
