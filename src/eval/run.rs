//! Scoring a dataset on the deployment code path: decoder threads read image and label pairs (in parallel with
//! inference), the engine segments each image exactly as `segment` and `serve` do, and the accumulator adds up
//! per-class intersections and unions over the split. Predictions can also be read from (or written to) a
//! folder of label PNGs, so a score can be recomputed independently.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use crossbeam::channel::bounded;
use image::RgbImage;
use serde::Serialize;

use super::datasets::{Background, Dataset, Sample};
use super::metrics::{IouAccumulator, IGNORE};
use crate::model::{Engine, Query, SegmentSettings, SettingsOverrides};
use crate::shard::Shard;
use crate::sink::encode::OutputFile;
use crate::sink::files::OutputWriter;
use crate::sink::label_png::{self, Style};
use crate::source::decode::{decode, DEFAULT_MAX_PIXELS};

/// Where predictions come from.
pub enum Predictor<'a> {
    /// Run the model.
    Engine {
        engine: &'a Engine,
        /// PAMR on or off (None: the head's default; TCL: on).
        pamr: Option<bool>,
        /// Background threshold (None: the bundle's, for PAMR on or off).
        bg_thresh: Option<f32>,
        /// The bundle head to score with (None: the bundle's default head).
        head: Option<String>,
    },
    /// Read `<dir>/<id>.png` label maps (class indices in the dataset's evaluation space).
    Files(PathBuf),
}

pub struct EvalJob<'a> {
    pub dataset: &'a Dataset,
    pub predictor: Predictor<'a>,
    pub limit: Option<usize>,
    /// Write each prediction as `<dir>/<id>.png` (8-bit class indices).
    pub save_predictions: Option<PathBuf>,
    /// Decoder threads.
    pub jobs: usize,
    /// Score only this shard's share of the samples (after `limit`), by a hash of each sample's id.
    pub shard: Option<Shard>,
}

/// Callback per scored image (progress display).
pub trait EvalProgress: Sync {
    fn start(&self, total: usize);
    fn image_done(&self);
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassScore {
    pub name: String,
    /// IoU ×100; null when the class is absent from both predictions and labels.
    pub iou: Option<f64>,
    /// Accuracy ×100; null when the class is absent from the labels.
    pub accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub dataset: String,
    /// The share scored (None: the whole split); its mIoU is of that share only.
    pub shard: Option<Shard>,
    pub images: usize,
    pub miou: f64,
    pub pixel_accuracy: f64,
    pub classes: Vec<ClassScore>,
    /// Model name, version and manifest hash; null when scoring saved predictions.
    pub model: Option<serde_json::Value>,
    pub pamr: Option<bool>,
    pub background_threshold: Option<f32>,
    pub seconds: f64,
}

struct Loaded {
    sample: Sample,
    image: Option<RgbImage>,
    label: Result<(Vec<u8>, u32, u32)>,
}

pub fn evaluate(job: &EvalJob, progress: &dyn EvalProgress) -> Result<EvalReport> {
    let start = Instant::now();
    let ds = job.dataset;
    let samples: Vec<Sample> = ds
        .samples
        .iter()
        .take(job.limit.unwrap_or(usize::MAX))
        .filter(|sample| job.shard.is_none_or(|shard| shard.owns(&sample.id)))
        .cloned()
        .collect();
    if let Some(shard) = job.shard {
        tracing::info!(
            dataset = %ds.key,
            "shard {shard}: {} of the split's images are this shard's; its scores are of them only",
            samples.len()
        );
    }
    if let Some(dir) = &job.save_predictions {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the predictions folder {}", dir.display()))?;
    }
    let mut acc = IouAccumulator::new(ds.classes.len());
    let (settings, text, model) = match &job.predictor {
        Predictor::Engine {
            engine,
            pamr,
            bg_thresh,
            head,
        } => {
            if let Some(pipeline) = &ds.pipeline {
                let differences = pipeline.differences(&engine.bundle().manifest().input);
                if !differences.is_empty() {
                    tracing::warn!(
                        dataset = %ds.key,
                        "the model bundle's input settings are not the official test pipeline, so scores are \
                         not comparable with the paper's: {}",
                        differences.join("; ")
                    );
                }
            }
            let with_bg = ds.background == Background::Threshold;
            let queried = if with_bg {
                &ds.classes[1..]
            } else {
                &ds.classes[..]
            };
            let queries: Vec<Query> = queried
                .iter()
                .map(|c| Query {
                    name: c.name.clone(),
                    prompts: c.prompts.clone(),
                })
                .collect();
            let text = engine.embed_queries(&queries)?;
            // Datasets without a background class take no threshold: a --bg-thresh is not used there.
            let overrides = SettingsOverrides {
                pamr: *pamr,
                bg_thresh: *bg_thresh,
                kp_weight: None,
            };
            let m = engine.bundle().manifest();
            let settings = SegmentSettings::resolve_head(m, head.as_deref(), overrides, !with_bg)
                .map_err(|e| anyhow!("--head: {e}"))?;
            let model = serde_json::json!({
                "name": m.name, "version": m.version, "manifest_sha256": engine.manifest_sha256(),
                "head": engine.head_name(&settings),
            });
            (Some(settings), Some(text), Some(model))
        }
        Predictor::Files(_) => (None, None, None),
    };
    let files = OutputWriter::new(None);
    let needs_image = matches!(job.predictor, Predictor::Engine { .. });
    progress.start(samples.len());
    let (work_tx, work_rx) = bounded::<Sample>(samples.len().max(1));
    for s in &samples {
        let _ = work_tx.send(s.clone());
    }
    drop(work_tx);
    let (loaded_tx, loaded_rx) = bounded::<Loaded>(4);
    std::thread::scope(|scope| -> Result<()> {
        for _ in 0..job.jobs.max(1) {
            let (work_rx, loaded_tx) = (work_rx.clone(), loaded_tx.clone());
            scope.spawn(move || {
                for sample in work_rx.iter() {
                    let image = if needs_image {
                        match decode(&sample.image, DEFAULT_MAX_PIXELS) {
                            Ok(img) => Some(img),
                            Err(e) => {
                                let label = Err(anyhow!("{e}"));
                                if loaded_tx
                                    .send(Loaded {
                                        sample,
                                        image: None,
                                        label,
                                    })
                                    .is_err()
                                {
                                    return;
                                }
                                continue;
                            }
                        }
                    } else {
                        None
                    };
                    let label = read_label(&sample.label, ds.reduce_zero_label);
                    if loaded_tx
                        .send(Loaded {
                            sample,
                            image,
                            label,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        drop(loaded_tx);
        // Any error ends the run: a split with an unreadable or mismatched file cannot be scored honestly.
        let result = (|| -> Result<()> {
            for item in loaded_rx.iter() {
                let (label, lw, lh) = item.label?;
                let pred = match (&job.predictor, &item.image) {
                    (Predictor::Engine { engine, .. }, Some(image)) => {
                        if (image.width(), image.height()) != (lw, lh) {
                            bail!(
                                "{} is {}x{} but its label {} is {lw}x{lh}; they must be the same size",
                                item.sample.image.display(),
                                image.width(),
                                image.height(),
                                item.sample.label.display()
                            );
                        }
                        let (Some(settings), Some(text)) = (&settings, &text) else {
                            bail!("engine settings missing");
                        };
                        let seg = engine
                            .segment_batch(&[image], text, settings)?
                            .pop()
                            .ok_or_else(|| anyhow!("the engine returned no result"))?;
                        seg.labels
                    }
                    (Predictor::Files(dir), _) => {
                        let path = dir.join(format!("{}.png", item.sample.id));
                        let (pred, pw, ph) = read_label(&path, false)
                            .with_context(|| format!("prediction for '{}'", item.sample.id))?;
                        if (pw, ph) != (lw, lh) {
                            bail!(
                                "the prediction {} is {pw}x{ph} but the label {} is {lw}x{lh}",
                                path.display(),
                                item.sample.label.display()
                            );
                        }
                        pred.into_iter().map(u16::from).collect()
                    }
                    (Predictor::Engine { .. }, None) => bail!("image missing"),
                };
                acc.add(&pred, &label)
                    .map_err(|e| anyhow!("{}: {e}", item.sample.label.display()))?;
                if let Some(dir) = &job.save_predictions {
                    save_prediction(
                        &files,
                        &item.sample.id,
                        &dir.join(format!("{}.png", item.sample.id)),
                        &pred,
                        lw,
                        lh,
                    )?;
                }
                progress.image_done();
            }
            Ok(())
        })();
        // Stop the decoders early on error.
        drop(loaded_rx);
        result
    })?;
    let scores = acc.scores();
    let pct = |v: f64| (!v.is_nan()).then_some(v * 100.0);
    Ok(EvalReport {
        dataset: ds.key.clone(),
        shard: job.shard,
        images: samples.len(),
        miou: scores.miou,
        pixel_accuracy: scores.pixel_accuracy,
        classes: ds
            .classes
            .iter()
            .enumerate()
            .map(|(i, c)| ClassScore {
                name: c.name.clone(),
                iou: pct(scores.iou[i]),
                accuracy: pct(scores.accuracy[i]),
            })
            .collect(),
        model,
        pamr: settings.map(|s| s.pamr),
        background_threshold: settings.and_then(|s| s.background),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Reads an 8-bit label PNG (grayscale or palette indices, never expanded to colours) and applies
/// reduce_zero_label (0 → ignore, k → k−1, 255 stays ignore).
pub fn read_label(path: &Path, reduce_zero_label: bool) -> Result<(Vec<u8>, u32, u32)> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the label map {}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let info = reader.info();
    let (w, h, colour, depth) = (info.width, info.height, info.color_type, info.bit_depth);
    if depth != png::BitDepth::Eight
        || !matches!(colour, png::ColorType::Grayscale | png::ColorType::Indexed)
    {
        bail!(
            "{}: a label map must be an 8-bit grayscale or palette PNG of class indices, not {colour:?} at {depth:?}",
            path.display()
        );
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("{}: image too large", path.display()))?;
    let mut buf = vec![0u8; size];
    let frame = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: the PNG data is corrupt or truncated", path.display()))?;
    let stride = frame.line_size;
    let mut label = Vec::with_capacity((w * h) as usize);
    for y in 0..h as usize {
        label.extend_from_slice(&buf[y * stride..y * stride + w as usize]);
    }
    if reduce_zero_label {
        for v in &mut label {
            *v = match *v {
                0 | IGNORE => IGNORE,
                k => k - 1,
            };
        }
    }
    Ok((label, w, h))
}

/// One prediction as an 8-bit grey map of dataset class indices (`read_label` reads it back).
fn save_prediction(
    files: &OutputWriter,
    id: &str,
    path: &Path,
    pred: &[u16],
    w: u32,
    h: u32,
) -> Result<()> {
    let bytes = label_png::encode(pred, w as usize, h as usize, Style::Grey8)?;
    files.write_unit(
        id,
        vec![OutputFile {
            path: path.to_path_buf(),
            bytes,
        }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, data: &[u8], w: u32, h: u32) {
        let pred: Vec<u16> = data.iter().map(|&v| u16::from(v)).collect();
        save_prediction(&OutputWriter::new(None), "l", path, &pred, w, h).expect("write png");
    }

    #[test]
    fn labels_read_raw_and_reduce_zero() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("l.png");
        write_png(&path, &[0, 1, 2, 255], 2, 2);
        assert_eq!(read_label(&path, false).expect("read").0, [0, 1, 2, 255]);
        assert_eq!(read_label(&path, true).expect("read").0, [255, 0, 1, 255]);
        std::fs::write(&path, b"not a png").expect("write");
        let err = format!("{:#}", read_label(&path, false).expect_err("bad"));
        assert!(err.contains("l.png"), "{err}");
        image::RgbImage::new(2, 2).save(&path).expect("rgb png");
        let err = format!("{:#}", read_label(&path, false).expect_err("rgb"));
        assert!(err.contains("8-bit grayscale or palette"), "{err}");
    }
}
