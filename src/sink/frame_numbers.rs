//! Where a pipeline's frame numbers continue after a restart: `<output dir>/.tclseg-next-frame` holds the first
//! number no run has reserved yet (see `source::sequence` for why). Written by temp file + rename, so a crash
//! leaves the old reservation or the new one.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// The reservation file's name inside a pipeline's output folder.
pub const FILE_NAME: &str = ".tclseg-next-frame";

/// The reservation file of the output folder `dir`.
pub fn file_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The first frame number no earlier run reserved: the file's number, or 0 when there is no file. A file that
/// cannot be read or holds no number also gives 0 (numbering as before reservations existed), with a warning.
pub fn read(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(
                "{} does not hold a frame number; frame numbers start at 0 again",
                path.display()
            );
            0
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::warn!(
                "cannot read {}: {e}; frame numbers start at 0 again",
                path.display()
            );
            0
        }
    }
}

/// Records that numbers below `end` may have been handed out.
pub fn write(path: &Path, end: u64) -> Result<()> {
    super::atomic::write_atomic(path, format!("{end}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reservation_reads_back_and_garbage_reads_as_zero() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = file_in(dir.path());
        assert_eq!(read(&path), 0);
        write(&path, 4000).expect("write");
        assert_eq!(read(&path), 4000);
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(read(&path), 0);
    }
}
