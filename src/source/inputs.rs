//! Turning `INPUT...` (files, folders searched recursively, glob patterns) into a sorted list of images, each
//! with the relative path its outputs mirror under `--out`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// File extensions read as images (lowercase).
pub const IMAGE_EXTENSIONS: [&str; 8] =
    ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "jfif"];

/// One image to segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputImage {
    pub path: PathBuf,
    /// Output location relative to `--out`, without extension: `sub/dir/name`.
    pub relative: PathBuf,
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Expands the inputs. A folder contributes its images (recursively) with paths relative to it; a file or a glob
/// match contributes itself by file name. A name that matches nothing is an error; two inputs mapping to the same
/// output are kept apart by their extension.
pub fn expand(inputs: &[String]) -> Result<Vec<InputImage>> {
    let mut found: BTreeMap<PathBuf, InputImage> = BTreeMap::new();
    for input in inputs {
        let path = PathBuf::from(input);
        let before = found.len();
        if path.is_dir() {
            walk(&path, &path, &mut found)?;
        } else if path.exists() {
            add(
                &path,
                Path::new(path.file_name().unwrap_or(path.as_os_str())),
                &mut found,
            );
        } else if input.contains(['*', '?', '[']) {
            let matches =
                glob::glob(input).with_context(|| format!("bad glob pattern '{input}'"))?;
            for entry in matches.flatten() {
                if entry.is_dir() {
                    walk(&entry, &entry, &mut found)?;
                } else if is_image(&entry) {
                    add(
                        &entry,
                        Path::new(entry.file_name().unwrap_or(entry.as_os_str())),
                        &mut found,
                    );
                }
            }
        } else {
            bail!("input '{input}' does not exist");
        }
        if found.len() == before {
            tracing::warn!(
                "input '{input}' holds no images ({})",
                IMAGE_EXTENSIONS.join(", ")
            );
        }
    }
    // Mirror paths without extension must be unique: `a.jpg` and `a.png` in one folder keep their extension.
    let mut by_relative: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for image in found.values() {
        *by_relative
            .entry(image.relative.with_extension(""))
            .or_default() += 1;
    }
    Ok(found
        .into_values()
        .map(|mut image| {
            let stem = image.relative.with_extension("");
            if by_relative.get(&stem).copied().unwrap_or(0) == 1 {
                image.relative = stem;
            }
            image
        })
        .collect())
}

fn add(path: &Path, relative: &Path, found: &mut BTreeMap<PathBuf, InputImage>) {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    found.entry(key).or_insert_with(|| InputImage {
        path: path.to_path_buf(),
        relative: relative.to_path_buf(),
    });
}

fn walk(root: &Path, dir: &Path, found: &mut BTreeMap<PathBuf, InputImage>) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(root, &path, found)?;
        } else if is_image(&path) {
            let relative = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            add(&path, &relative, found);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_files_and_globs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        for f in ["a/x.jpg", "a/b/y.PNG", "a/notes.txt", "z.webp", "a/b/x.png"] {
            std::fs::write(root.join(f), b"").expect("write");
        }
        let images = expand(&[root.join("a").display().to_string()]).expect("expand");
        let rel: Vec<String> = images
            .iter()
            .map(|i| i.relative.display().to_string())
            .collect();
        assert_eq!(rel, ["b/x", "b/y", "x"]);

        let pattern = format!("{}/*.webp", root.display());
        let images = expand(&[pattern]).expect("glob");
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].relative, PathBuf::from("z"));

        let err = expand(&[root.join("missing.jpg").display().to_string()]).expect_err("missing");
        assert!(err.to_string().contains("missing.jpg"));
    }

    #[test]
    fn same_stem_keeps_extensions() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("a.jpg"), b"").expect("write");
        std::fs::write(dir.path().join("a.png"), b"").expect("write");
        let images = expand(&[dir.path().display().to_string()]).expect("expand");
        let rel: Vec<String> = images
            .iter()
            .map(|i| i.relative.display().to_string())
            .collect();
        assert_eq!(rel, ["a.jpg", "a.png"]);
    }
}
