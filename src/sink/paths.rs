//! Comparing folders the way the filesystem sees them (symlinks and `..` resolved, whole components compared),
//! so two spellings of one folder, or a folder inside another, are recognised before anything is written; and
//! preparing an output folder with an error that says what is wrong.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `path` made absolute, its longest existing prefix canonicalised (symlinks resolved) and the rest, which does
/// not exist yet, appended with `.` dropped and `..` applied.
pub fn resolve(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut existing = absolute.as_path();
    let mut rest: Vec<Component> = Vec::new();
    let base = loop {
        if let Ok(canonical) = std::fs::canonicalize(existing) {
            break canonical;
        }
        let Some(parent) = existing.parent() else {
            break PathBuf::from("/");
        };
        if let Some(last) = existing.components().next_back() {
            rest.push(last);
        }
        existing = parent;
    };
    let mut out = base;
    for component in rest.into_iter().rev() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// How two folders relate once resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    Same,
    /// The first is inside the second.
    Inside,
    /// The second is inside the first.
    Contains,
}

/// Whether `a` and `b` name the same folder or one lies inside the other (whole components: `same` and
/// `same-2` do not overlap).
pub fn overlap(a: &Path, b: &Path) -> Option<Overlap> {
    let (a, b) = (resolve(a), resolve(b));
    if a == b {
        Some(Overlap::Same)
    } else if a.starts_with(&b) {
        Some(Overlap::Inside)
    } else if b.starts_with(&a) {
        Some(Overlap::Contains)
    } else {
        None
    }
}

/// Creates the output folder `dir` (named by `what`, e.g. `--out`) if needed. A file in its place, or in place of
/// a folder above it, is named as such with what to do, instead of the OS's "File exists".
pub fn ensure_output_dir(dir: &Path, what: &str) -> Result<()> {
    if let Some(file) = file_in_the_way(dir) {
        if file == dir {
            bail!(
                "{what} {} is a file, not a folder; name a folder for the outputs (it is created if missing)",
                dir.display()
            );
        }
        bail!(
            "{what}: the output folder {} cannot be created: {} is a file, not a folder; choose another {what}",
            dir.display(),
            file.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{what}: cannot create the output folder {}", dir.display()))
}

/// What keeps `dir` from being (or becoming) a folder: the nearest part of its path that exists, when that is not
/// a folder (`dir` itself, or a file further up). None when `dir` is a folder or can be created.
pub fn file_in_the_way(dir: &Path) -> Option<&Path> {
    dir.ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| a.exists())
        .filter(|a| !a.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_folder_and_nesting_are_recognised() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("x/same")).expect("mkdir");
        std::os::unix::fs::symlink(root.join("x/same"), root.join("link")).expect("symlink");
        let same = root.join("x/same");
        assert_eq!(
            overlap(&root.join("x/../x/same"), &same),
            Some(Overlap::Same)
        );
        assert_eq!(overlap(&root.join("link"), &same), Some(Overlap::Same));
        assert_eq!(
            overlap(&root.join("link/not/yet/../made"), &same),
            Some(Overlap::Inside)
        );
        assert_eq!(
            overlap(&root.join("x"), &root.join("link/sub")),
            Some(Overlap::Contains)
        );
        assert_eq!(overlap(&same, &root.join("x/same-2")), None);
        assert_eq!(overlap(&root.join("new/a"), &root.join("new/b")), None);
    }

    #[test]
    fn a_file_in_the_way_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("f.txt");
        std::fs::write(&file, b"x").expect("write");
        let err = ensure_output_dir(&file, "--out").expect_err("a file");
        assert!(
            err.to_string().contains("is a file, not a folder")
                && err.to_string().contains("f.txt"),
            "{err}"
        );
        let err = ensure_output_dir(&file.join("sub"), "--out").expect_err("under a file");
        assert!(err.to_string().contains("f.txt is a file"), "{err}");
        ensure_output_dir(&tmp.path().join("a/b"), "--out").expect("created");
        assert!(tmp.path().join("a/b").is_dir());
    }
}
