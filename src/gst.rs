//! GStreamer's one-time initialisation, for every module that builds a pipeline: the sources (decoding) and the
//! video sink (encoding) both need it, and neither should import the other to get it.

use anyhow::{anyhow, Result};

/// Initializes GStreamer (a no-op after the first call); the error says what to install.
pub fn init() -> Result<()> {
    gstreamer::init().map_err(|e| {
        anyhow!("cannot initialize GStreamer ({e}); install it with scripts/setup (Debian: gstreamer1.0-plugins-*)")
    })
}
