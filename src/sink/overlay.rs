//! Colour overlays: each labelled pixel tinted with its class colour, background left as it is.

use std::io::Cursor;

use anyhow::{anyhow, Result};
use image::{ImageFormat, RgbImage};

use crate::queries::Rgb;

/// Overlay image format: one type for the daemon's `output.overlay` and `--overlay-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
pub enum OverlayFormat {
    #[default]
    #[serde(rename = "jpg")]
    #[value(name = "jpg")]
    Jpeg,
    #[serde(rename = "png")]
    #[value(name = "png")]
    Png,
}

impl OverlayFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OverlayFormat::Jpeg => "jpg",
            OverlayFormat::Png => "png",
        }
    }
}

/// Blends `palette[label]` over `image` with weight `alpha` where the label is not 0 (background).
pub fn render(image: &RgbImage, labels: &[u16], palette: &[Rgb], alpha: f32) -> RgbImage {
    let mut out = image.clone();
    for (px, &label) in out.pixels_mut().zip(labels) {
        if label == 0 {
            continue;
        }
        let colour = palette
            .get(label as usize)
            .copied()
            .unwrap_or([255, 255, 255]);
        for c in 0..3 {
            let v = (1.0 - alpha) * f32::from(px[c]) + alpha * f32::from(colour[c]);
            px[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

pub fn encode(image: &RgbImage, format: OverlayFormat) -> Result<Vec<u8>> {
    let mut bytes = Cursor::new(Vec::new());
    let fmt = match format {
        OverlayFormat::Jpeg => ImageFormat::Jpeg,
        OverlayFormat::Png => ImageFormat::Png,
    };
    image
        .write_to(&mut bytes, fmt)
        .map_err(|e| anyhow!("cannot encode the overlay: {e}"))?;
    Ok(bytes.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_untouched_and_labels_tinted() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([100, 100, 100]));
        let out = render(&img, &[0, 1], &[[0, 0, 0], [255, 0, 0]], 0.5);
        assert_eq!(out.get_pixel(0, 0).0, [100, 100, 100]);
        assert_eq!(out.get_pixel(1, 0).0, [178, 50, 50]);
    }
}
