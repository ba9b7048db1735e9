//! Videos made and read with GStreamer, as any player would.

use std::path::Path;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

/// Frames a video file decodes to (GStreamer, as any player would read it).
pub fn count_video_frames(path: &Path) -> usize {
    gst::init().expect("gst init");
    let uri = gst::glib::filename_to_uri(path, None).expect("uri");
    let pipeline = gst::parse::launch(&format!(
        "uridecodebin uri={uri} ! videoconvert ! video/x-raw,format=RGB ! appsink name=sink sync=false"
    ))
    .expect("decode pipeline")
    .downcast::<gst::Pipeline>()
    .expect("pipeline");
    let sink = pipeline
        .by_name("sink")
        .expect("sink")
        .downcast::<gst_app::AppSink>()
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("play");
    let mut frames = 0;
    while sink
        .try_pull_sample(gst::ClockTime::from_seconds(5))
        .is_some()
    {
        frames += 1;
    }
    let _ = pipeline.set_state(gst::State::Null);
    frames
}

/// A small H.264 video made with GStreamer: `frames` frames of a moving ball, in MP4 or (`.mkv`) Matroska.
pub fn write_video(path: &Path, frames: u32) {
    gst::init().expect("gst init");
    let mux = if path.extension().is_some_and(|e| e == "mkv") {
        "matroskamux"
    } else {
        "mp4mux"
    };
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=160,height=120,framerate=10/1 ! videoconvert ! x264enc speed-preset=ultrafast ! {mux} ! filesink location={}",
        path.display()
    ))
    .expect("encode pipeline");
    pipeline.set_state(gst::State::Playing).expect("play");
    let bus = pipeline.bus().expect("bus");
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("encode finished");
    assert!(
        matches!(msg.view(), gst::MessageView::Eos(_)),
        "encode failed"
    );
    let _ = pipeline.set_state(gst::State::Null);
}
