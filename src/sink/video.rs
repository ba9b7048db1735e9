//! The optional overlay video of a pipeline: RGB frames → `appsrc` → `videoconvert` → x264 → Matroska (or
//! fragmented MP4) → file. Both containers stay readable up to the last written cluster or fragment if the
//! process dies; a clean stop sends EOS and waits for the muxer to finish the file. Frames keep the first frame's
//! size (a camera that changes resolution after a reconnect is scaled to it) and their capture-time spacing.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use image::RgbImage;

pub struct VideoWriter {
    path: PathBuf,
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    info: gst_video::VideoInfo,
    first_ms: Option<u64>,
    last_pts: Option<gst::ClockTime>,
    frames: u64,
}

impl VideoWriter {
    /// Opens `path` (.mkv or .mp4) for frames of `width`×`height`.
    pub fn create(path: &Path, width: u32, height: u32) -> Result<VideoWriter> {
        crate::gst::init()?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mp4 = path.extension().is_some_and(|e| e == "mp4");
        let make = |name: &str| {
            gst::ElementFactory::make(name)
                .build()
                .map_err(|_| anyhow!("GStreamer element '{name}' is missing; run scripts/setup"))
        };
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::Rgb, width, height)
            .fps(gst::Fraction::new(0, 1))
            .build()
            .map_err(|e| anyhow!("video info: {e}"))?;
        let caps = info.to_caps().map_err(|e| anyhow!("video caps: {e}"))?;
        let appsrc = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .is_live(false)
            .block(true)
            .max_bytes(u64::from(width) * u64::from(height) * 3 * 8)
            .build();
        let convert = make("videoconvert")?;
        let encode = make("x264enc")?;
        encode.set_property_from_str("speed-preset", "ultrafast");
        encode.set_property_from_str("tune", "zerolatency");
        encode.set_property("key-int-max", 30u32);
        let parse = make("h264parse")?;
        let mux = if mp4 {
            let m = make("mp4mux")?;
            m.set_property("fragment-duration", 1000u32);
            m
        } else {
            make("matroskamux")?
        };
        let file = make("filesink")?;
        file.set_property("location", path.to_string_lossy().as_ref());
        // Every muxed cluster goes straight to the file: a crash loses at most what the encoder holds.
        file.set_property_from_str("buffer-mode", "unbuffered");
        let pipeline = gst::Pipeline::new();
        let elements = [
            appsrc.upcast_ref::<gst::Element>(),
            &convert,
            &encode,
            &parse,
            &mux,
            &file,
        ];
        pipeline.add_many(elements)?;
        gst::Element::link_many(elements).context("cannot link the video writer")?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| anyhow!("cannot start the video writer for {}: {e}", path.display()))?;
        Ok(VideoWriter {
            path: path.to_path_buf(),
            pipeline,
            appsrc,
            info,
            first_ms: None,
            last_pts: None,
            frames: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a frame captured at `wall_ms`.
    pub fn push(&mut self, frame: &RgbImage, wall_ms: u64) -> Result<()> {
        let (w, h) = (self.info.width(), self.info.height());
        let resized;
        let frame = if frame.dimensions() == (w, h) {
            frame
        } else {
            resized = image::imageops::resize(frame, w, h, image::imageops::FilterType::Triangle);
            &resized
        };
        let first = *self.first_ms.get_or_insert(wall_ms);
        let mut pts = gst::ClockTime::from_mseconds(wall_ms.saturating_sub(first));
        if let Some(last) = self.last_pts {
            // Strictly increasing timestamps, whatever the wall clock did.
            pts = pts.max(last + gst::ClockTime::from_mseconds(1));
        }
        self.last_pts = Some(pts);
        let stride = self.info.stride()[0] as usize;
        let row = w as usize * 3;
        let mut buffer = gst::Buffer::with_size(self.info.size())
            .map_err(|e| anyhow!("cannot allocate a video buffer: {e}"))?;
        {
            let buf = buffer
                .get_mut()
                .ok_or_else(|| anyhow!("video buffer not writable"))?;
            buf.set_pts(pts);
            let mut map = buf
                .map_writable()
                .map_err(|_| anyhow!("cannot map a video buffer"))?;
            for (y, src) in frame.as_raw().chunks_exact(row).enumerate() {
                map[y * stride..y * stride + row].copy_from_slice(src);
            }
        }
        self.appsrc.push_buffer(buffer).map_err(|e| {
            anyhow!(
                "{}: the video writer refused a frame: {e:?}",
                self.path.display()
            )
        })?;
        self.frames += 1;
        if let Some(bus) = self.pipeline.bus() {
            if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
                if let gst::MessageView::Error(err) = msg.view() {
                    return Err(anyhow!(
                        "{}: video writer error: {}",
                        self.path.display(),
                        err.error()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Sends EOS and waits (bounded) for the muxer to finish the file.
    pub fn finish(self) -> Result<u64> {
        let _ = self.appsrc.end_of_stream();
        let mut result = Ok(self.frames);
        if let Some(bus) = self.pipeline.bus() {
            match bus.timed_pop_filtered(
                gst::ClockTime::from_seconds(10),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            ) {
                Some(msg) => {
                    if let gst::MessageView::Error(err) = msg.view() {
                        result = Err(anyhow!("{}: {}", self.path.display(), err.error()));
                    }
                }
                None => {
                    result = Err(anyhow!(
                        "{}: the muxer did not finish within 10 s; the file is readable up to its last cluster",
                        self.path.display()
                    ))
                }
            }
        }
        let _ = self.pipeline.set_state(gst::State::Null);
        result
    }
}

impl Drop for VideoWriter {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
