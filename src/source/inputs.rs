//! Turning `INPUT...` (files, folders searched recursively, glob patterns) into a sorted list of images, each
//! with the relative path its outputs mirror under `--out`.
//!
//! Output names are unique by construction. Every image belongs to a root: a folder given (or matched by a glob)
//! is the root of the images under it; a file given (or matched) has its own folder as root. With one root the
//! outputs mirror the tree under it (`in/sub/a.jpg` → `sub/a`); with several, each root gets a sub-folder named
//! after it (`c1/same.jpg`, `c2/same.jpg` → `c1/same`, `c2/same`), `-2`, `-3`... added in command-line order when
//! two roots have the same name (`a/imgs`, `b/imgs` → `imgs`, `imgs-2`). Two images whose mirrored paths differ
//! only by extension keep their extensions (`a.jpg`, `a.png`).

use std::collections::{BTreeMap, BTreeSet};
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
    /// The image's path under its root, full file name: `sub/dir/name.jpg`.
    pub name: PathBuf,
    /// The folder input (given or matched by a glob) this image was found under; None for a file named directly.
    pub folder_root: Option<PathBuf>,
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// An image found, before output names are assigned.
struct Found {
    path: PathBuf,
    name: PathBuf,
    /// The canonical root folder (for files: their folder).
    root: PathBuf,
    folder_root: Option<PathBuf>,
}

/// Expands the inputs (see the module doc for the output names). A name that matches nothing is an error; the
/// same file reached twice is segmented once.
pub fn expand(inputs: &[String]) -> Result<Vec<InputImage>> {
    let mut found: BTreeMap<PathBuf, Found> = BTreeMap::new();
    // Roots in order of first appearance.
    let mut roots: Vec<PathBuf> = Vec::new();
    for input in inputs {
        let path = PathBuf::from(input);
        let before = found.len();
        if path.is_dir() {
            walk(&path, &path, &mut found, &mut roots)?;
        } else if path.exists() {
            add_file(&path, &mut found, &mut roots);
        } else if input.contains(['*', '?', '[']) {
            let matches =
                glob::glob(input).with_context(|| format!("bad glob pattern '{input}'"))?;
            for entry in matches.flatten() {
                if entry.is_dir() {
                    walk(&entry, &entry, &mut found, &mut roots)?;
                } else if is_image(&entry) {
                    add_file(&entry, &mut found, &mut roots);
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
    let labels = root_labels(&roots);
    let mirrored = |f: &Found| -> PathBuf {
        match labels.get(&f.root) {
            Some(label) if roots.len() > 1 => Path::new(label).join(&f.name),
            _ => f.name.clone(),
        }
    };
    // Mirror paths without extension must be unique: `a.jpg` and `a.png` in one folder keep their extension.
    let mut by_stem: BTreeMap<PathBuf, usize> = BTreeMap::new();
    for f in found.values() {
        *by_stem.entry(mirrored(f).with_extension("")).or_default() += 1;
    }
    Ok(found
        .values()
        .map(|f| {
            let full = mirrored(f);
            let stem = full.with_extension("");
            InputImage {
                path: f.path.clone(),
                relative: if by_stem.get(&stem).copied().unwrap_or(0) == 1 {
                    stem
                } else {
                    full
                },
                name: f.name.clone(),
                folder_root: f.folder_root.clone(),
            }
        })
        .collect())
}

/// A sub-folder name per root: its folder name, `-2`, `-3`... when taken.
fn root_labels(roots: &[PathBuf]) -> BTreeMap<PathBuf, String> {
    let mut taken = BTreeSet::new();
    let mut labels = BTreeMap::new();
    for root in roots {
        let base = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        let mut label = base.clone();
        let mut n = 2;
        while !taken.insert(label.clone()) {
            label = format!("{base}-{n}");
            n += 1;
        }
        labels.insert(root.clone(), label);
    }
    labels
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn add_file(path: &Path, found: &mut BTreeMap<PathBuf, Found>, roots: &mut Vec<PathBuf>) {
    let name = PathBuf::from(path.file_name().unwrap_or(path.as_os_str()));
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    add(path, name, canonical(folder), None, found, roots);
}

fn add(
    path: &Path,
    name: PathBuf,
    root: PathBuf,
    folder_root: Option<PathBuf>,
    found: &mut BTreeMap<PathBuf, Found>,
    roots: &mut Vec<PathBuf>,
) {
    let key = canonical(path);
    if found.contains_key(&key) {
        return;
    }
    if !roots.contains(&root) {
        roots.push(root.clone());
    }
    found.insert(
        key,
        Found {
            path: path.to_path_buf(),
            name,
            root,
            folder_root,
        },
    );
}

fn walk(
    root: &Path,
    dir: &Path,
    found: &mut BTreeMap<PathBuf, Found>,
    roots: &mut Vec<PathBuf>,
) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list folder {}", dir.display()))?;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            walk(root, &path, found, roots)?;
        } else if is_image(&path) {
            let name = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            add(
                &path,
                name,
                canonical(root),
                Some(root.to_path_buf()),
                found,
                roots,
            );
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

    fn relatives(images: &[InputImage]) -> Vec<String> {
        images
            .iter()
            .map(|i| i.relative.display().to_string())
            .collect()
    }

    #[test]
    fn several_roots_get_a_sub_folder_each() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        for f in ["c1/same.jpg", "c2/same.jpg", "a/imgs/x.png", "b/imgs/x.png"] {
            std::fs::create_dir_all(root.join(f).parent().expect("parent")).expect("mkdir");
            std::fs::write(root.join(f), b"").expect("write");
        }
        let arg = |p: &str| root.join(p).display().to_string();
        let files = expand(&[arg("c2/same.jpg"), arg("c1/same.jpg")]).expect("files");
        let mut rel = relatives(&files);
        rel.sort();
        assert_eq!(rel, ["c1/same", "c2/same"]);
        let folders = expand(&[arg("a/imgs"), arg("b/imgs"), arg("c1")]).expect("folders");
        let by_path: BTreeMap<PathBuf, String> = folders
            .iter()
            .map(|i| (i.path.clone(), i.relative.display().to_string()))
            .collect();
        assert_eq!(by_path[&root.join("a/imgs/x.png")], "imgs/x");
        assert_eq!(by_path[&root.join("b/imgs/x.png")], "imgs-2/x");
        assert_eq!(by_path[&root.join("c1/same.jpg")], "c1/same");
        assert!(folders.iter().all(|i| i.folder_root.is_some()));
        // Files of one folder are one root: no sub-folder.
        let one = expand(&[arg("a/imgs/x.png"), arg("a/imgs")]).expect("one root");
        assert_eq!(relatives(&one), ["x"]);
        assert_eq!(one[0].name, PathBuf::from("x.png"));
    }
}
