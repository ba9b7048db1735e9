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
//! What the files hold is encoded by `sink::encode` (callers name its types from there: one path per item);
//! `OutputWriter::write_image` encodes and writes in one call.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};

use super::atomic::{sweep_stale_temps, temp_file_in};
use super::encode::{
    encode_image, ImagePaths, Keep, OutputFile, OutputKinds, SegmentedImage, SidecarInfo,
};

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
}
