//! Retention per pipeline: frame outputs older than a maximum age are deleted, then the oldest ones until the
//! folder is under its size quota. Files being appended to (the overlay video, the JSON-lines log) are kept;
//! emptied sub-folders are removed, the root never.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub files: usize,
    pub bytes: u64,
}

/// Applies the policy to `root`, sparing `keep` (paths relative to root).
pub fn sweep(root: &Path, policy: Retention, keep: &[PathBuf], now: SystemTime) -> Swept {
    let mut files = Vec::new();
    collect(root, &mut files);
    // The quota counts every file; only frame outputs can be deleted.
    let mut total: u64 = files.iter().map(|(_, _, size)| size).sum();
    files.retain(|(p, _, _)| !keep.iter().any(|k| root.join(k) == *p));
    // Oldest first.
    files.sort_by_key(|(_, modified, _)| *modified);
    let mut swept = Swept::default();
    for (path, modified, size) in &files {
        let too_old = policy
            .max_age
            .is_some_and(|age| now.duration_since(*modified).unwrap_or_default() > age);
        let over_quota = policy.max_bytes.is_some_and(|max| total > max);
        if !(too_old || over_quota) {
            continue;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {
                swept.files += 1;
                swept.bytes += size;
                total -= size;
            }
            Err(e) => tracing::warn!("retention: cannot delete {}: {e}", path.display()),
        }
    }
    remove_empty_dirs(root, root);
    swept
}

fn collect(dir: &Path, out: &mut Vec<(PathBuf, SystemTime, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            collect(&path, out);
        } else if meta.is_file() {
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((path, modified, meta.len()));
        }
    }
}

fn remove_empty_dirs(root: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(root, &entry.path());
        }
    }
    if dir != root {
        // Fails (and is meant to) when the folder is not empty.
        let _ = std::fs::remove_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(root: &Path, rel: &str, bytes: usize, age_s: u64) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, vec![0u8; bytes]).expect("write");
        let when = SystemTime::now() - Duration::from_secs(age_s);
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_modified(when).expect("set mtime");
    }

    #[test]
    fn age_then_size_oldest_first_sparing_live_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        file(root, "old/a.png", 100, 7200);
        file(root, "mid/b.png", 100, 600);
        file(root, "mid/c.png", 100, 300);
        file(root, "new/d.png", 100, 10);
        file(root, "video.mkv", 1000, 9000);
        let policy = Retention {
            max_age: Some(Duration::from_secs(3600)),
            max_bytes: Some(1250),
        };
        let swept = sweep(
            root,
            policy,
            &[PathBuf::from("video.mkv")],
            SystemTime::now(),
        );
        assert_eq!(
            swept,
            Swept {
                files: 2,
                bytes: 200
            }
        );
        assert!(!root.join("old").exists(), "emptied folder removed");
        assert!(!root.join("mid/b.png").exists());
        assert!(root.join("mid/c.png").exists() && root.join("new/d.png").exists());
        assert!(root.join("video.mkv").exists());
    }
}
