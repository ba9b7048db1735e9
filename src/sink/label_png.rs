//! Label maps as PNG: 8-bit palette images (0 = background, k = k-th query) that any viewer shows in colour
//! and any tool reads back as class indices; 16-bit greyscale when there are more than 256 classes.

use anyhow::{anyhow, Result};

pub type Rgb = [u8; 3];

/// The PASCAL VOC colour map: distinct, stable colours for class indices (0 is black).
pub fn default_colour(index: usize) -> Rgb {
    let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
    let mut c = index;
    for j in 0..8 {
        r |= ((c & 1) as u8) << (7 - j);
        g |= (((c >> 1) & 1) as u8) << (7 - j);
        b |= (((c >> 2) & 1) as u8) << (7 - j);
        c >>= 3;
    }
    [r, g, b]
}

/// Encodes `labels` (row-major, `width`×`height`) as PNG bytes. `palette[k]` colours class k.
pub fn encode(labels: &[u16], width: usize, height: usize, palette: &[Rgb]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    let data: Vec<u8> =
        if palette.len() <= 256 && labels.iter().all(|&l| (l as usize) < palette.len()) {
            encoder.set_color(png::ColorType::Indexed);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_palette(palette.iter().flatten().copied().collect::<Vec<u8>>());
            labels.iter().map(|&l| l as u8).collect()
        } else {
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Sixteen);
            labels.iter().flat_map(|l| l.to_be_bytes()).collect()
        };
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder
        .write_header()
        .map_err(|e| anyhow!("PNG header: {e}"))?;
    writer
        .write_image_data(&data)
        .map_err(|e| anyhow!("PNG data: {e}"))?;
    writer.finish().map_err(|e| anyhow!("PNG end: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_colours() {
        assert_eq!(default_colour(0), [0, 0, 0]);
        assert_eq!(default_colour(1), [128, 0, 0]);
        assert_eq!(default_colour(2), [0, 128, 0]);
        assert_eq!(default_colour(15), [192, 128, 128]);
    }

    #[test]
    fn palette_png_round_trips_indices() {
        let labels = vec![0u16, 1, 2, 1, 0, 2];
        let palette: Vec<Rgb> = (0..3).map(default_colour).collect();
        let bytes = encode(&labels, 3, 2, &palette).expect("encode");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("info");
        assert_eq!(reader.info().color_type, png::ColorType::Indexed);
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        reader.next_frame(&mut buf).expect("frame");
        assert_eq!(&buf[..6], &[0, 1, 2, 1, 0, 2]);
    }
}
