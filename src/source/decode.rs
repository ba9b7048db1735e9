//! Reading one input image: format by content, size checked from the header before any pixel is allocated,
//! EXIF orientation applied, converted to 8-bit RGB. Every failure names the file and says what is wrong.
//!
//! `segment`, `serve` (folder sources) and `eval` all read images through `decode`, so a file that one of them
//! refuses, all of them refuse.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Seek};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

/// Largest image accepted, in pixels (width × height). 100 MP covers any camera; a header that claims more is
/// either a very unusual file or a hostile one.
pub const DEFAULT_MAX_PIXELS: u64 = 100_000_000;

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{path}: cannot read the file: {error}")]
    Unreadable { path: String, error: std::io::Error },
    #[error("{path}: the file is empty (0 bytes)")]
    Empty { path: String },
    #[error("{path}: not an image in a supported format (JPEG, PNG, WebP, BMP, TIFF)")]
    UnknownFormat { path: String },
    #[error(
        "{path}: the header claims {width}x{height} pixels, over the limit of {limit} pixels; \
         refusing to decode (raise --max-pixels if the image is genuine)"
    )]
    TooLarge {
        path: String,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error("{path}: the image has a zero dimension ({width}x{height})")]
    ZeroSize {
        path: String,
        width: u32,
        height: u32,
    },
    #[error("{path}: the image data is corrupt or truncated: {error}")]
    Corrupt { path: String, error: String },
    #[error(
        "{path}: the JPEG data ends before its end-of-image marker: the file is truncated \
         (or was still being written when it was read)"
    )]
    Truncated { path: String },
}

/// Decodes `path` into RGB, refusing images over `max_pixels`.
pub fn decode(path: &Path, max_pixels: u64) -> Result<RgbImage, DecodeError> {
    let name = path.display().to_string();
    let unreadable = |error| DecodeError::Unreadable {
        path: name.clone(),
        error,
    };
    let file = File::open(path).map_err(unreadable)?;
    let len = file.metadata().map_err(unreadable)?.len();
    decode_from(name, len, BufReader::new(file), max_pixels)
}

/// Decodes an image held in memory (an upload to `POST /v1/segment`) by the same rules as a file; `name` says
/// what the errors call it.
pub fn decode_bytes(name: &str, bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_from(
        name.to_string(),
        bytes.len() as u64,
        Cursor::new(bytes),
        max_pixels,
    )
}

/// The one decoder behind `decode` and `decode_bytes`: `len` bytes readable (and rewindable) from `source`.
fn decode_from<R: BufRead + Seek>(
    name: String,
    len: u64,
    source: R,
    max_pixels: u64,
) -> Result<RgbImage, DecodeError> {
    let unreadable = |error| DecodeError::Unreadable {
        path: name.clone(),
        error,
    };
    if len == 0 {
        return Err(DecodeError::Empty { path: name });
    }
    let mut reader = ImageReader::new(source)
        .with_guessed_format()
        .map_err(unreadable)?;
    let Some(format) = reader.format() else {
        return Err(DecodeError::UnknownFormat { path: name });
    };
    // The JPEG decoder pads missing data with grey instead of failing, so a cut file would come out as a
    // plausible image. Walk the markers first: a whole JPEG reaches its end-of-image marker.
    if format == image::ImageFormat::Jpeg {
        let mut source = reader.into_inner();
        if !jpeg_reaches_end_marker(&mut source).map_err(unreadable)? {
            return Err(DecodeError::Truncated { path: name });
        }
        reader = ImageReader::with_format(source, format);
    }
    // Cap allocations too: a decoder must not be talked into more than the pixels we accept need.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(16).max(64 << 20));
    reader.limits(limits);
    let corrupt = |error: image::ImageError| match error {
        image::ImageError::Unsupported(_) => DecodeError::UnknownFormat { path: name.clone() },
        other => DecodeError::Corrupt {
            path: name.clone(),
            error: other.to_string(),
        },
    };
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(DecodeError::ZeroSize {
            path: name,
            width,
            height,
        });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooLarge {
            path: name,
            width,
            height,
            limit: max_pixels,
        });
    }
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// True when a JPEG stream reaches its EOI marker: segments are skipped by their lengths, entropy-coded data
/// is scanned for the next marker (a 0xFF there is followed by a stuffed 0x00 or a restart marker), and
/// progressive files' many scans are followed one after another. Bytes after EOI are allowed (some cameras append
/// data). Where the structure is not what the standard says, it settles for any EOI in the rest of the file.
/// The stream is read from its start and rewound to it afterwards.
fn jpeg_reaches_end_marker<R: BufRead + Seek>(source: &mut R) -> std::io::Result<bool> {
    source.rewind()?;
    let whole = jpeg_markers_reach_end(source);
    source.rewind()?;
    whole
}

fn jpeg_markers_reach_end(reader: &mut (impl BufRead + Seek)) -> std::io::Result<bool> {
    if next_byte(reader)? != Some(0xFF) || next_byte(reader)? != Some(0xD8) {
        return Ok(false);
    }
    let mut read_marker: Option<u8> = None;
    loop {
        let marker = match read_marker.take() {
            Some(marker) => marker,
            None => match next_byte(reader)? {
                Some(0xFF) => match marker_after_fill(reader)? {
                    Some(marker) => marker,
                    None => return Ok(false),
                },
                Some(_) => return any_end_marker(reader),
                None => return Ok(false),
            },
        };
        match marker {
            0xD9 => return Ok(true),
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let (Some(high), Some(low)) = (next_byte(reader)?, next_byte(reader)?) else {
                    return Ok(false);
                };
                let length = u16::from_be_bytes([high, low]);
                if length < 2 {
                    return any_end_marker(reader);
                }
                reader.seek_relative(i64::from(length) - 2)?;
                if marker == 0xDA {
                    match marker_after_entropy_data(reader)? {
                        Some(next) => read_marker = Some(next),
                        None => return Ok(false),
                    }
                }
            }
        }
    }
}

fn next_byte(reader: &mut impl BufRead) -> std::io::Result<Option<u8>> {
    let byte = reader.fill_buf()?.first().copied();
    if byte.is_some() {
        reader.consume(1);
    }
    Ok(byte)
}

/// After a 0xFF: skips fill bytes (more 0xFF) and returns the marker code; None at the end of the file.
fn marker_after_fill(reader: &mut impl BufRead) -> std::io::Result<Option<u8>> {
    loop {
        match next_byte(reader)? {
            Some(0xFF) => continue,
            other => return Ok(other),
        }
    }
}

/// Scans entropy-coded data up to the next real marker and returns its code; None at the end of the file.
fn marker_after_entropy_data(reader: &mut impl BufRead) -> std::io::Result<Option<u8>> {
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(None);
        }
        let Some(at) = buffer.iter().position(|&b| b == 0xFF) else {
            let all = buffer.len();
            reader.consume(all);
            continue;
        };
        reader.consume(at + 1);
        match marker_after_fill(reader)? {
            None => return Ok(None),
            Some(0x00 | 0xD0..=0xD7) => continue,
            Some(marker) => return Ok(Some(marker)),
        }
    }
}

/// The lenient fall-back: is there an EOI marker anywhere in the rest of the stream?
fn any_end_marker(reader: &mut impl BufRead) -> std::io::Result<bool> {
    let mut after_ff = false;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            return Ok(false);
        }
        for &b in buffer {
            if after_ff && b == 0xD9 {
                return Ok(true);
            }
            after_ff = b == 0xFF;
        }
        let all = buffer.len();
        reader.consume(all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn png_bytes(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode");
        out.into_inner()
    }

    #[test]
    fn good_png_decodes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = decode(
            &write(dir.path(), "a.png", &png_bytes(5, 3)),
            DEFAULT_MAX_PIXELS,
        )
        .expect("decode");
        assert_eq!(img.dimensions(), (5, 3));
        assert_eq!(img.get_pixel(0, 0).0, [10, 20, 30]);
    }

    #[test]
    fn bad_inputs_get_named_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let e = decode(&write(d, "empty.jpg", b""), DEFAULT_MAX_PIXELS).expect_err("empty");
        assert!(matches!(e, DecodeError::Empty { .. }) && e.to_string().contains("empty.jpg"));
        let e = decode(
            &write(d, "text.png", b"hello, not an image"),
            DEFAULT_MAX_PIXELS,
        )
        .expect_err("text");
        assert!(matches!(e, DecodeError::UnknownFormat { .. }), "{e}");
        let good = png_bytes(64, 64);
        let e = decode(
            &write(d, "cut.png", &good[..good.len() / 2]),
            DEFAULT_MAX_PIXELS,
        )
        .expect_err("cut");
        assert!(
            matches!(e, DecodeError::Corrupt { .. }) && e.to_string().contains("cut.png"),
            "{e}"
        );
        let e = decode(&d.join("absent.png"), DEFAULT_MAX_PIXELS).expect_err("absent");
        assert!(matches!(e, DecodeError::Unreadable { .. }), "{e}");
        let e = decode(&write(d, "big.png", &png_bytes(20, 20)), 100).expect_err("over limit");
        assert!(
            matches!(
                e,
                DecodeError::TooLarge {
                    width: 20,
                    height: 20,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn every_supported_format_decodes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = RgbImage::from_fn(6, 4, |x, y| {
            image::Rgb([(x * 40) as u8, (y * 60) as u8, 90])
        });
        for ext in ["png", "jpg", "webp", "bmp", "tiff"] {
            let path = dir.path().join(format!("a.{ext}"));
            img.save(&path).expect("encode");
            // Extensions lie: the format comes from the content.
            let renamed = dir.path().join(format!("{ext}.bin"));
            std::fs::rename(&path, &renamed).expect("rename");
            let back = decode(&renamed, DEFAULT_MAX_PIXELS).expect(ext);
            assert_eq!(back.dimensions(), (6, 4), "{ext}");
        }
    }

    /// A photo-like JPEG (noise, so the entropy-coded data is long and holds stuffed 0xFF bytes).
    fn noisy_jpeg(w: u32, h: u32) -> Vec<u8> {
        let mut state = 0x2545_f491_u32;
        let img = RgbImage::from_fn(w, h, |_, _| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            image::Rgb([state as u8, (state >> 8) as u8, (state >> 16) as u8])
        });
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .encode_image(&img)
            .expect("encode");
        jpeg.into_inner()
    }

    #[test]
    fn bytes_in_memory_decode_by_the_same_rules_as_a_file() {
        let img = decode_bytes("upload", &png_bytes(5, 3), DEFAULT_MAX_PIXELS).expect("png");
        assert_eq!(img.dimensions(), (5, 3));
        let whole = noisy_jpeg(96, 64);
        let img = decode_bytes("upload", &whole, DEFAULT_MAX_PIXELS).expect("jpeg");
        assert_eq!(img.dimensions(), (96, 64));
        let e =
            decode_bytes("upload", &whole[..whole.len() / 3], DEFAULT_MAX_PIXELS).expect_err("cut");
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e}");
        let e = decode_bytes("upload", b"", DEFAULT_MAX_PIXELS).expect_err("empty");
        assert!(matches!(e, DecodeError::Empty { .. }), "{e}");
        let e = decode_bytes("upload", b"not an image", DEFAULT_MAX_PIXELS).expect_err("text");
        assert!(
            matches!(e, DecodeError::UnknownFormat { .. }) && e.to_string().starts_with("upload:"),
            "{e}"
        );
        let e = decode_bytes("upload", &png_bytes(20, 20), 100).expect_err("too large");
        assert!(matches!(e, DecodeError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn a_truncated_jpeg_is_refused_and_a_whole_one_with_trailing_bytes_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let whole = noisy_jpeg(96, 64);
        assert!(whole.len() > 3000, "{} bytes", whole.len());
        for cut in [whole.len() / 3, whole.len() / 2, whole.len() - 2, 200] {
            let e = decode(&write(d, "cut.jpg", &whole[..cut]), DEFAULT_MAX_PIXELS)
                .expect_err("a cut JPEG must fail");
            assert!(
                matches!(
                    e,
                    DecodeError::Truncated { .. } | DecodeError::Corrupt { .. }
                ) && e.to_string().contains("cut.jpg"),
                "cut at {cut}: {e}"
            );
        }
        let e = decode(
            &write(d, "third.jpg", &whole[..whole.len() / 3]),
            DEFAULT_MAX_PIXELS,
        )
        .expect_err("a third");
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut trailing = whole.clone();
        trailing.extend_from_slice(b"\0\0camera maker notes\xFF");
        let img = decode(&write(d, "trailing.jpg", &trailing), DEFAULT_MAX_PIXELS)
            .expect("bytes after EOI are allowed");
        assert_eq!(img.dimensions(), (96, 64));
        decode(&write(d, "whole.jpg", &whole), DEFAULT_MAX_PIXELS).expect("whole");
    }

    #[test]
    fn every_format_cut_to_a_third_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = 7u32;
        let img = RgbImage::from_fn(64, 48, |_, _| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            image::Rgb([(state >> 16) as u8, (state >> 8) as u8, state as u8])
        });
        for ext in ["png", "jpg", "webp", "bmp", "tiff"] {
            let path = dir.path().join(format!("whole.{ext}"));
            img.save(&path).expect("encode");
            let bytes = std::fs::read(&path).expect("read");
            let cut = write(dir.path(), &format!("cut.{ext}"), &bytes[..bytes.len() / 3]);
            let e = decode(&cut, DEFAULT_MAX_PIXELS).expect_err(ext);
            assert!(e.to_string().contains("cut."), "{ext}: {e}");
        }
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG tagged "rotate 90 clockwise" (orientation 6) must come out 2x4, its left column on top.
        let img = RgbImage::from_fn(4, 2, |x, _| {
            if x == 0 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
            .encode_image(&img)
            .expect("encode");
        let jpeg = jpeg.into_inner();
        let mut tiff = b"Exif\0\0II*\0\x08\0\0\0\x01\0".to_vec();
        tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0]);
        let mut bytes = jpeg[..2].to_vec();
        bytes.extend_from_slice(&[0xFF, 0xE1]);
        bytes.extend_from_slice(&((tiff.len() + 2) as u16).to_be_bytes());
        bytes.extend_from_slice(&tiff);
        bytes.extend_from_slice(&jpeg[2..]);
        let dir = tempfile::tempdir().expect("temp dir");
        let out =
            decode(&write(dir.path(), "rot.jpg", &bytes), DEFAULT_MAX_PIXELS).expect("decode");
        assert_eq!(out.dimensions(), (2, 4));
        let top = out.get_pixel(1, 0).0;
        assert!(
            top[0] > 200 && top[2] < 60,
            "the red column is on top after rotating: {top:?}"
        );
    }
}
