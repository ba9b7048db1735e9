//! Label maps as PNG: 8-bit palette images (0 = background, k = k-th query) that any viewer shows in colour
//! and any tool reads back as class indices; 16-bit greyscale when there are more than 256 classes.

use anyhow::{anyhow, Result};

use crate::queries::Rgb;

/// How class indices become pixels.
#[derive(Debug, Clone, Copy)]
pub enum Style<'a> {
    /// 8-bit palette coloured by `palette[k]` when every index has a colour (at most 256), else 16-bit grey:
    /// what `segment`, `serve` and `models bench` write, so a viewer shows colours and a tool reads indices.
    Palette(&'a [Rgb]),
    /// 8-bit grey, indices above 255 clamped: `eval`'s predictions, read back as dataset class indices.
    Grey8,
}

/// Encodes `labels` (row-major, `width`×`height`) as PNG bytes. Every label map tclseg writes goes through here.
pub fn encode(labels: &[u16], width: usize, height: usize, style: Style) -> Result<Vec<u8>> {
    match style {
        Style::Palette(palette)
            if palette.len() <= 256 && labels.iter().all(|&l| (l as usize) < palette.len()) =>
        {
            let data: Vec<u8> = labels.iter().map(|&l| l as u8).collect();
            let colours: Vec<u8> = palette.iter().flatten().copied().collect();
            let bits = Bits::Eight(Some(colours));
            write_png(width, height, bits, Some(png::Compression::Fast), &data)
        }
        Style::Palette(_) => {
            let data: Vec<u8> = labels.iter().flat_map(|l| l.to_be_bytes()).collect();
            write_png(
                width,
                height,
                Bits::Sixteen,
                Some(png::Compression::Fast),
                &data,
            )
        }
        Style::Grey8 => {
            let data: Vec<u8> = labels.iter().map(|&l| l.min(255) as u8).collect();
            write_png(width, height, Bits::Eight(None), None, &data)
        }
    }
}

/// Encodes one plane of soft scores (0..1, row-major) as a 16-bit grey PNG of score × 65535.
pub fn encode_scores(plane: &[f32], width: usize, height: usize) -> Result<Vec<u8>> {
    let data: Vec<u8> = plane
        .iter()
        .flat_map(|v| ((v.clamp(0.0, 1.0) * 65535.0).round() as u16).to_be_bytes())
        .collect();
    write_png(width, height, Bits::Sixteen, None, &data)
}

/// Pixel layout: 8-bit (with a palette, or grey) or 16-bit grey.
enum Bits {
    Eight(Option<Vec<u8>>),
    Sixteen,
}

/// `compression` None keeps the encoder's default (the files written before the encoders were merged used
/// it for grey maps, and the bytes stay the same).
fn write_png(
    width: usize,
    height: usize,
    bits: Bits,
    compression: Option<png::Compression>,
    data: &[u8],
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    match bits {
        Bits::Eight(Some(palette)) => {
            encoder.set_color(png::ColorType::Indexed);
            encoder.set_depth(png::BitDepth::Eight);
            encoder.set_palette(palette);
        }
        Bits::Eight(None) => {
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Eight);
        }
        Bits::Sixteen => {
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Sixteen);
        }
    }
    if let Some(c) = compression {
        encoder.set_compression(c);
    }
    let mut writer = encoder
        .write_header()
        .map_err(|e| anyhow!("PNG header: {e}"))?;
    writer
        .write_image_data(data)
        .map_err(|e| anyhow!("PNG data: {e}"))?;
    writer.finish().map_err(|e| anyhow!("PNG end: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queries::default_colour;

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
        let bytes = encode(&labels, 3, 2, Style::Palette(&palette)).expect("encode");
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("info");
        assert_eq!(reader.info().color_type, png::ColorType::Indexed);
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        reader.next_frame(&mut buf).expect("frame");
        assert_eq!(&buf[..6], &[0, 1, 2, 1, 0, 2]);
    }

    #[test]
    fn grey8_clamps_and_too_many_classes_fall_back_to_16_bit() {
        let read = |bytes: Vec<u8>| {
            let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
                .read_info()
                .expect("info");
            let info = (reader.info().color_type, reader.info().bit_depth);
            let mut buf = vec![0; reader.output_buffer_size().expect("size")];
            reader.next_frame(&mut buf).expect("frame");
            (info, buf)
        };
        let (info, buf) = read(encode(&[0, 7, 300], 3, 1, Style::Grey8).expect("encode"));
        assert_eq!(info, (png::ColorType::Grayscale, png::BitDepth::Eight));
        assert_eq!(&buf[..3], &[0, 7, 255]);
        let palette: Vec<Rgb> = (0..3).map(default_colour).collect();
        let (info, buf) = read(encode(&[0, 5], 2, 1, Style::Palette(&palette)).expect("encode"));
        assert_eq!(info, (png::ColorType::Grayscale, png::BitDepth::Sixteen));
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
    }
}
