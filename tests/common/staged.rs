//! Image files as real-world copies write them: photo-like content (noise, so a cut is never a plain colour),
//! written in stages with pauses between them.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// `w`×`h` pixels of noise, encoded as `format`.
pub fn noisy_image_bytes(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let mut state = 0x9e37_79b9_u32;
    let img = image::RgbImage::from_fn(w, h, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// Writes `bytes` to `path` in parts ending at `cuts`, pausing `pause` after each, as a copy that stalls
/// does (the file keeps its name while it grows).
pub fn write_in_stages(path: &Path, bytes: &[u8], cuts: &[usize], pause: Duration) {
    let mut file = std::fs::File::create(path).expect("create");
    let mut from = 0;
    for &cut in cuts {
        file.write_all(&bytes[from..cut]).expect("write");
        file.flush().expect("flush");
        from = cut;
        std::thread::sleep(pause);
    }
    file.write_all(&bytes[from..]).expect("write");
    file.flush().expect("flush");
}
