//! Atomic file writes: temp file in the target's folder, fsync, rename; and the sweep that removes the
//! temporaries a killed process left behind.
//!
//! Every temporary tclseg creates next to an output is named `.tclseg-h<host>-<pid>-<8 random>.tmp`: the length
//! does not depend on the target's name (a 250-byte file name still gets a temporary under the 255-byte limit),
//! the fixed prefix makes the sweep touch nothing but ours, and the host and pid say whether its writer can still
//! be running. The host matters once shards on several machines write into one shared folder (`--shard`): a pid
//! says nothing about a process on another machine, so another host's temporary is left to the age rule.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context, Result};
use tempfile::NamedTempFile;

/// Every temporary file tclseg writes beside its outputs starts with this.
pub const TEMP_PREFIX: &str = ".tclseg-";
/// ... and ends with this.
pub const TEMP_SUFFIX: &str = ".tmp";

/// A temporary this old is stale even when a process with its pid is running: a writer keeps its temporary
/// only for the time one file takes to write (milliseconds), so an hour-old one belongs to a process that died,
/// and the pid now names another process (pid reuse, a reboot, another pid namespace).
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

/// A new temporary file in `dir` (`.tclseg-h<host>-<pid>-<random>.tmp`, at most 39 bytes); deleted when dropped.
pub fn temp_file_in(dir: &Path) -> std::io::Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(
            "{TEMP_PREFIX}{}-{}-",
            host_tag(),
            std::process::id()
        ))
        .suffix(TEMP_SUFFIX)
        .rand_bytes(8)
        .tempfile_in(dir)
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    if path.file_name().is_none() {
        return Err(anyhow!("output path {} has no file name", path.display()));
    }
    let mut tmp = temp_file_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).map_err(|e| {
        anyhow!(
            "cannot move the new file into place at {}: {}",
            path.display(),
            e.error
        )
    })?;
    Ok(())
}

/// This machine's tag in temporary names: `h` and 6 hex digits of the SHA-256 of the kernel's host name (a
/// Kubernetes pod's name, a Slurm node's), short so that names stay short.
fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!(
            "h{}",
            &hex::encode(Sha256::digest(host.trim().as_bytes()))[..6]
        )
    })
}

/// Who wrote a temporary of ours: the host tag (None in names from before it was added, taken as this host's)
/// and the pid; None for any other name.
fn temp_owner(name: &str) -> Option<(Option<&str>, u32)> {
    let inner = name.strip_prefix(TEMP_PREFIX)?.strip_suffix(TEMP_SUFFIX)?;
    let (host, rest) = match inner.split_once('-') {
        Some((tag, rest)) if tag.starts_with('h') => (Some(tag), rest),
        _ => (None, inner),
    };
    let (pid, random) = rest.split_once('-')?;
    if random.is_empty() || !random.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    Some((host, pid.parse().ok()?))
}

fn process_running(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes our stale temporaries from `dir` (and its sub-folders when `recursive`): names of our pattern whose
/// writer is not running, or that are older than `STALE_AFTER`. Temporaries of this process and of other running
/// tclseg processes are left alone, and so is every other file. Returns how many were removed.
pub fn sweep_stale_temps(dir: &Path, recursive: bool) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let me = std::process::id();
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            if recursive {
                removed += sweep_stale_temps(&path, true);
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some((host, pid)) = name.to_str().and_then(temp_owner) else {
            continue;
        };
        let here = host.is_none_or(|h| h == host_tag());
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .unwrap_or_default();
        let stale = age > STALE_AFTER || (here && pid != me && !process_running(pid));
        if !stale {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove the stale temporary {}: {e}", path.display()),
        }
    }
    if removed > 0 {
        tracing::info!(
            "removed {removed} temporary files left by an earlier run in {}",
            dir.display()
        );
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.json");
        write_atomic(&path, b"first").expect("write");
        write_atomic(&path, b"second").expect("overwrite");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn unwritable_folder_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let err = write_atomic(&blocker.join("out.png"), b"data").expect_err("parent is a file");
        assert!(format!("{err:#}").contains("file"), "{err:#}");
    }

    #[test]
    fn a_name_at_the_length_limit_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(format!("{}.json", "n".repeat(250)));
        write_atomic(&path, b"{}").expect("a 255-byte name");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}");
        let tmp = temp_file_in(dir.path()).expect("temp");
        let name = tmp.path().file_name().expect("name").to_string_lossy();
        assert!(name.len() <= 39, "{name}");
        assert_eq!(
            temp_owner(&name),
            Some((Some(host_tag()), std::process::id()))
        );
    }

    /// A pid that no running process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!process_running(pid));
        pid
    }

    #[test]
    fn sweep_removes_only_our_temporaries_of_dead_writers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join("sub");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let dead = dead_pid();
        let ours_dead = format!(".tclseg-{}-{dead}-abcdEF12.tmp", host_tag());
        let ours_live = format!(".tclseg-{}-{}-abcdEF12.tmp", host_tag(), std::process::id());
        // Another machine's writer (a shard on a shared volume): its pid means nothing here.
        let other_host = format!(".tclseg-h000000-{dead}-abcdEF12.tmp");
        let keep = [
            ours_live.as_str(),
            other_host.as_str(),
            ".frame.png.x1y2z3.tmp",
            ".tclseg-notapid-abc.tmp",
            "tclseg-1-abc.tmp",
            "a.labels.png",
        ];
        for name in keep.iter().chain([&ours_dead.as_str()]) {
            std::fs::write(dir.path().join(name), b"x").expect("write");
            std::fs::write(sub.join(name), b"x").expect("write");
        }
        assert_eq!(sweep_stale_temps(dir.path(), false), 1);
        assert!(!dir.path().join(&ours_dead).exists());
        assert!(sub.join(&ours_dead).exists(), "not recursive");
        assert_eq!(sweep_stale_temps(dir.path(), true), 1);
        assert!(!sub.join(&ours_dead).exists());
        for name in keep {
            assert!(dir.path().join(name).exists(), "{name} kept");
            assert!(sub.join(name).exists(), "{name} kept");
        }
    }
}
