//! One image's outputs written as one unit, and the guard that no two inputs of a run share an output file.
//!
//! A unit is the label PNG, overlay, score maps and JSON sidecar of one image (or frame). Its last file is the
//! commit marker (the sidecar when there is one): every file is first written in full to a temporary beside its
//! target and fsynced; only when all of them are on disk is any renamed into place, the marker last. A failure
//! while writing (a full disk) therefore leaves nothing of the new unit visible and any earlier outputs as they
//! were; a failure while renaming removes the parts already renamed. An earlier marker is removed before the
//! first rename, so a crash part-way leaves no marker, and resume (which wants every file, marker included)
//! redoes the image.
//!
//! The writer remembers which input each output path was written for in this run; a second input that maps to
//! the same path is an error naming both, never an overwrite.
//!
//! `encode_image` is the one place an image's outputs are encoded (`OutputWriter::write_image` encodes and
//! writes): `segment`, `serve` and `models bench` call it with their own paths and threads, so a new output or
//! sidecar field is added once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use image::RgbImage;

use super::atomic::{sweep_stale_temps, temp_file_in};
use super::label_png::{self, Style};
use super::overlay::{self, OverlayFormat};
use super::sidecar::{self, FrameInfo, ModelInfo, SettingsInfo, Sidecar, Timings};
use crate::model::{SegmentSettings, Segmentation};
use crate::queries::QuerySet;

/// Overlay tint: half class colour, half image.
const OVERLAY_ALPHA: f32 = 0.5;

/// Which files to write per image.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputKinds {
    pub labels: bool,
    pub overlay: Option<OverlayFormat>,
    pub json: bool,
    /// One 16-bit PNG of soft scores per query (score × 65535).
    pub scores: bool,
}

/// Where one image's outputs go: `<base>.<suffix>` per kind.
#[derive(Debug, Clone)]
pub struct ImagePaths {
    pub base: PathBuf,
    /// The label map's suffix: `labels.png` (segment, serve), `png` (`models bench --save-labels`).
    pub labels_suffix: &'static str,
}

impl ImagePaths {
    /// `<base>.labels.png`, `<base>.overlay.jpg`, `<base>.score1.png`, `<base>.json`.
    pub fn new(base: PathBuf) -> ImagePaths {
        ImagePaths {
            base,
            labels_suffix: "labels.png",
        }
    }

    fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut name = self.base.as_os_str().to_os_string();
        name.push(".");
        name.push(suffix);
        PathBuf::from(name)
    }

    /// Every file `kinds` writes for an image segmented with `queries` queries, the sidecar (the unit's commit
    /// marker) last.
    pub fn all(&self, kinds: &OutputKinds, queries: usize) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if kinds.labels {
            paths.push(self.with_suffix(self.labels_suffix));
        }
        if let Some(fmt) = kinds.overlay {
            paths.push(self.with_suffix(&format!("overlay.{}", fmt.extension())));
        }
        if kinds.scores {
            for q in 0..queries {
                paths.push(self.with_suffix(&format!("score{}.png", q + 1)));
            }
        }
        if kinds.json {
            paths.push(self.with_suffix("json"));
        }
        paths
    }
}

/// One segmented image and what it was segmented with.
pub struct SegmentedImage<'a> {
    pub image: &'a RgbImage,
    pub segmentation: &'a Segmentation,
    pub queries: &'a QuerySet,
    pub settings: &'a SegmentSettings,
}

/// What the sidecar says beyond the segmentation.
pub struct SidecarInfo {
    /// The input's path, or the stream's redacted URI.
    pub image: String,
    /// Daemon frames; `latency_ms` is filled in from `captured` when the sidecar is built.
    pub frame: Option<FrameInfo>,
    pub captured: Option<Instant>,
    pub model: ModelInfo,
    pub decode_ms: f64,
    pub inference_ms: f64,
}

/// Products the caller wants back even when no file of that kind is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    /// The rendered overlay (the daemon's video).
    pub overlay: bool,
    /// The sidecar (the daemon's JSON lines).
    pub sidecar: bool,
}

/// One image's outputs, encoded: the unit's files, and the overlay and sidecar when written or kept.
pub struct Encoded {
    pub files: Vec<OutputFile>,
    pub overlay: Option<RgbImage>,
    pub sidecar: Option<Sidecar>,
}

/// One file of a unit.
pub struct OutputFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// Writes units and remembers, per output path, which input it was written for.
pub struct OutputWriter {
    claims: Mutex<Claims>,
    /// Folders already swept of stale temporaries in this run.
    swept: Mutex<HashSet<PathBuf>>,
}

/// Output path → the input it belongs to; the oldest claims are forgotten beyond `limit` (a daemon runs for
/// months; its names are unique by construction, so the memory is a guard, not the mechanism).
struct Claims {
    owners: HashMap<PathBuf, String>,
    order: VecDeque<PathBuf>,
    limit: Option<usize>,
}

impl OutputWriter {
    /// `remember`: how many output paths to remember for the collision check (None: all of them).
    pub fn new(remember: Option<usize>) -> OutputWriter {
        OutputWriter {
            claims: Mutex::new(Claims {
                owners: HashMap::new(),
                order: VecDeque::new(),
                limit: remember,
            }),
            swept: Mutex::new(HashSet::new()),
        }
    }

    /// Reserves `path` for `owner` (e.g. the run's report), as if a unit of `owner` had been written there.
    pub fn claim(&self, owner: &str, path: &Path) -> Result<()> {
        self.claim_all(owner, &[path])
    }

    fn claim_all(&self, owner: &str, paths: &[&Path]) -> Result<()> {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        for path in paths {
            if let Some(other) = claims.owners.get(*path).filter(|o| *o != owner) {
                bail!(
                    "{owner} and {other} both map to the output {}, which is {other}'s in this run; {owner} is not \
                     written (rename one of them)",
                    path.display()
                );
            }
        }
        for path in paths {
            if claims
                .owners
                .insert(path.to_path_buf(), owner.to_string())
                .is_none()
            {
                claims.order.push_back(path.to_path_buf());
            }
        }
        while claims.limit.is_some_and(|max| claims.order.len() > max) {
            if let Some(oldest) = claims.order.pop_front() {
                claims.owners.remove(&oldest);
            }
        }
        Ok(())
    }

    /// Sweeps stale temporaries from `dir` the first time this writer writes there.
    fn prepare(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
        let mut swept = self.swept.lock().unwrap_or_else(|e| e.into_inner());
        if swept.insert(dir.to_path_buf()) {
            sweep_stale_temps(dir, false);
        }
        Ok(())
    }

    /// Writes the outputs of `owner` (an input's name, e.g. its path) as one unit; the last file is the commit
    /// marker.
    pub fn write_unit(&self, owner: &str, files: Vec<OutputFile>) -> Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let paths: Vec<&Path> = files.iter().map(|f| f.path.as_path()).collect();
        self.claim_all(owner, &paths)?;
        let mut staged = Vec::with_capacity(files.len());
        for file in &files {
            let dir = parent(&file.path);
            if file.path.file_name().is_none() {
                bail!("output path {} has no file name", file.path.display());
            }
            self.prepare(dir)?;
            let mut tmp = temp_file_in(dir)
                .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
            tmp.write_all(&file.bytes)
                .and_then(|()| tmp.as_file().sync_all())
                .with_context(|| format!("cannot write {}", file.path.display()))?;
            // Dropped on any error below: the temporary is deleted with it.
            staged.push(tmp);
        }
        let marker = &files[files.len() - 1].path;
        match std::fs::remove_file(marker) {
            Ok(()) => sync_dir(parent(marker)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(anyhow!(
                    "cannot remove the earlier {}: {e}",
                    marker.display()
                ))
            }
        }
        let mut placed: Vec<&Path> = Vec::new();
        let last = files.len() - 1;
        for (i, (tmp, file)) in staged.into_iter().zip(&files).enumerate() {
            if i == last {
                // Every part is in place before the marker appears.
                for dir in placed.iter().map(|p| parent(p)).collect::<HashSet<_>>() {
                    sync_dir(dir);
                }
            }
            if let Err(e) = tmp.persist(&file.path) {
                for done in &placed {
                    let _ = std::fs::remove_file(done);
                }
                return Err(anyhow!(
                    "cannot move the new file into place at {}: {}",
                    file.path.display(),
                    e.error
                ));
            }
            placed.push(&file.path);
        }
        sync_dir(parent(marker));
        Ok(())
    }

    /// Encodes the outputs `kinds` asks for of one segmented image (`encode_image`) and writes them as one
    /// unit for `owner`.
    pub fn write_image(
        &self,
        owner: &str,
        paths: &ImagePaths,
        item: &SegmentedImage,
        kinds: &OutputKinds,
        info: SidecarInfo,
    ) -> Result<()> {
        let encoded = encode_image(paths, item, kinds, Keep::default(), info)?;
        self.write_unit(owner, encoded.files)
    }
}

/// Encodes the outputs `kinds` asks for of one segmented image: label map, overlay, score maps and sidecar, in
/// unit order (sidecar last, for `OutputWriter::write_unit`), plus what `keep` asks for.
pub fn encode_image(
    paths: &ImagePaths,
    item: &SegmentedImage,
    kinds: &OutputKinds,
    keep: Keep,
    info: SidecarInfo,
) -> Result<Encoded> {
    let start = Instant::now();
    let seg = item.segmentation;
    let (w, h) = (seg.width, seg.height);
    let background = item.settings.background.is_some();
    let labels = item.queries.output_labels(seg, background);
    let palette = &item.queries.palette;
    let mut unit = Vec::new();
    if kinds.labels {
        unit.push(OutputFile {
            path: paths.with_suffix(paths.labels_suffix),
            bytes: label_png::encode(&labels, w, h, Style::Palette(palette))?,
        });
    }
    let overlay = (kinds.overlay.is_some() || keep.overlay)
        .then(|| overlay::render(item.image, &labels, palette, OVERLAY_ALPHA));
    if let (Some(fmt), Some(img)) = (kinds.overlay, &overlay) {
        unit.push(OutputFile {
            path: paths.with_suffix(&format!("overlay.{}", fmt.extension())),
            bytes: overlay::encode(img, fmt)?,
        });
    }
    if let (true, Some(scores)) = (kinds.scores, &seg.scores) {
        let offset = usize::from(background);
        for q in 0..item.queries.specs.len() {
            let plane = &scores[(q + offset) * w * h..(q + offset + 1) * w * h];
            unit.push(OutputFile {
                path: paths.with_suffix(&format!("score{}.png", q + 1)),
                bytes: label_png::encode_scores(plane, w, h)?,
            });
        }
    }
    let sidecar = (kinds.json || keep.sidecar).then(|| {
        let mut frame = info.frame;
        if let (Some(f), Some(captured)) = (frame.as_mut(), info.captured) {
            f.latency_ms = captured.elapsed().as_secs_f64() * 1e3;
        }
        Sidecar {
            image: info.image,
            frame,
            width: w,
            height: h,
            model: info.model,
            settings: SettingsInfo {
                pamr: item.settings.pamr,
                kp_weight: item.settings.kp_weight,
                background: item.settings.background,
            },
            classes: sidecar::class_results(item.queries, &labels, &seg.best, w, h),
            timings_ms: Timings {
                decode: info.decode_ms,
                inference: info.inference_ms,
                write: start.elapsed().as_secs_f64() * 1e3,
            },
        }
    });
    if let (true, Some(sidecar)) = (kinds.json, &sidecar) {
        unit.push(OutputFile {
            path: paths.with_suffix("json"),
            bytes: serde_json::to_vec_pretty(sidecar)?,
        });
    }
    Ok(Encoded {
        files: unit,
        overlay,
        sidecar,
    })
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."))
}

/// Makes renames in `dir` durable (power loss); best effort: some filesystems cannot sync a folder.
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &Path, bytes: &[u8]) -> OutputFile {
        OutputFile {
            path: path.to_path_buf(),
            bytes: bytes.to_vec(),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_unit_is_written_whole_and_rewritten_by_its_owner() {
        let dir = tempfile::tempdir().expect("tmp");
        let writer = OutputWriter::new(None);
        let (a, b) = (dir.path().join("x.labels.png"), dir.path().join("x.json"));
        writer
            .write_unit("in/x.png", vec![file(&a, b"L1"), file(&b, b"J1")])
            .expect("write");
        writer
            .write_unit("in/x.png", vec![file(&a, b"L2"), file(&b, b"J2")])
            .expect("the same input again");
        assert_eq!(std::fs::read(&a).expect("read"), b"L2");
        assert_eq!(names(dir.path()), ["x.json", "x.labels.png"]);
    }

    #[test]
    fn a_second_input_on_the_same_path_is_an_error_naming_both() {
        let dir = tempfile::tempdir().expect("tmp");
        let writer = OutputWriter::new(None);
        let path = dir.path().join("same.json");
        writer
            .write_unit("c1/same.jpg", vec![file(&path, b"first")])
            .expect("write");
        let err = writer
            .write_unit("c2/same.jpg", vec![file(&path, b"second")])
            .expect_err("collision");
        let text = format!("{err:#}");
        assert!(
            text.contains("c1/same.jpg") && text.contains("c2/same.jpg"),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"first");
    }

    #[test]
    fn claims_beyond_the_limit_are_forgotten() {
        let dir = tempfile::tempdir().expect("tmp");
        let writer = OutputWriter::new(Some(1));
        let (p, q) = (dir.path().join("p"), dir.path().join("q"));
        writer.write_unit("a", vec![file(&p, b"a")]).expect("a");
        writer.write_unit("b", vec![file(&q, b"b")]).expect("b");
        writer
            .write_unit("c", vec![file(&p, b"c")])
            .expect("p's claim was forgotten");
        assert!(writer.write_unit("d", vec![file(&p, b"d")]).is_err());
    }

    #[test]
    fn a_failed_part_leaves_nothing_new_and_the_earlier_unit_whole() {
        let dir = tempfile::tempdir().expect("tmp");
        let writer = OutputWriter::new(None);
        let (a, b) = (dir.path().join("x.labels.png"), dir.path().join("x.json"));
        writer
            .write_unit("x", vec![file(&a, b"L1"), file(&b, b"J1")])
            .expect("write");
        // A folder where a file should go: the second part cannot be placed.
        let blocked = dir.path().join("blocked.png");
        std::fs::create_dir_all(blocked.join("inside")).expect("mkdir");
        let (c, m) = (dir.path().join("y.labels.png"), dir.path().join("y.json"));
        let err = writer
            .write_unit(
                "y",
                vec![file(&c, b"L"), file(&blocked, b"O"), file(&m, b"J")],
            )
            .expect_err("cannot replace a folder");
        assert!(format!("{err:#}").contains("blocked.png"), "{err:#}");
        assert!(
            !c.exists(),
            "the part renamed before the failure is removed"
        );
        assert!(!m.exists(), "no marker");
        assert_eq!(names(dir.path()), ["blocked.png", "x.json", "x.labels.png"]);
    }

    #[test]
    fn an_image_encodes_every_kind_asked_for_with_the_sidecar_last() {
        let queries = QuerySet::from_names(&["a".to_string(), "b".to_string()]).expect("queries");
        let segmentation = Segmentation {
            width: 2,
            height: 1,
            classes: 3,
            labels: vec![0, 2],
            best: vec![0.9, 0.8],
            scores: Some(vec![0.9, 0.1, 0.05, 0.1, 0.05, 0.8]),
        };
        let settings = SegmentSettings {
            pamr: false,
            kp_weight: 0.3,
            background: Some(0.5),
            keep_scores: true,
        };
        let image = RgbImage::new(2, 1);
        let item = SegmentedImage {
            image: &image,
            segmentation: &segmentation,
            queries: &queries,
            settings: &settings,
        };
        let kinds = OutputKinds {
            labels: true,
            overlay: Some(OverlayFormat::Png),
            json: true,
            scores: true,
        };
        let info = SidecarInfo {
            image: "x.png".into(),
            frame: None,
            captured: None,
            model: ModelInfo {
                name: "m".into(),
                version: "1".into(),
                manifest_sha256: String::new(),
                device: "cpu".into(),
                precision: "fp32".into(),
            },
            decode_ms: 0.0,
            inference_ms: 0.0,
        };
        let paths = ImagePaths::new(PathBuf::from("out/x"));
        let encoded = encode_image(&paths, &item, &kinds, Keep::default(), info).expect("encode");
        let names: Vec<PathBuf> = encoded.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(names, paths.all(&kinds, queries.specs.len()));
        assert_eq!(
            names.last().map(|p| p.display().to_string()),
            Some("out/x.json".to_string())
        );
        assert!(encoded.overlay.is_some() && encoded.sidecar.is_some());
    }
}
