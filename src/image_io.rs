//! Still images in (PNG, JPEG) and out, with errors that name the file.
//!
//! Decoding is bounded: an image may not exceed [`MAX_IMAGE_SIDE`] on either side (checked from
//! the header, before the pixels are allocated: a 500 KB PNG can claim 23000 x 23000), and a
//! JPEG must end with its end-of-image marker, because the decoder fills a cut-off JPEG's
//! missing half with grey rather than failing.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Longest side of an image or frame drape decodes: 8K, 200 MB as RGB8.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Cap on what the decoder may allocate at once (the RGB8 image included).
const MAX_DECODE_BYTES: u64 = 3 * (MAX_IMAGE_SIDE as u64) * (MAX_IMAGE_SIDE as u64);
/// JPEG end-of-image marker.
const JPEG_EOI: [u8; 2] = [0xFF, 0xD9];

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

fn reader(bytes: &[u8]) -> std::result::Result<ImageReader<Cursor<&[u8]>>, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    reader.limits(limits());
    Ok(reader)
}

/// Width and height from the image's header, without decoding its pixels.
pub fn dimensions(bytes: &[u8]) -> std::result::Result<(u32, u32), String> {
    reader(bytes)?.into_dimensions().map_err(|e| e.to_string())
}

/// Decodes PNG or JPEG bytes to 8-bit RGB (alpha dropped, grey expanded); the error says why
/// the image is unusable.
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let reader = reader(bytes)?;
    if reader.format() == Some(ImageFormat::Jpeg) && !ends_with_eoi(bytes) {
        return Err("truncated JPEG: no end-of-image marker".into());
    }
    let decoded = reader.decode().map_err(|e| e.to_string())?;
    Ok(decoded.into_rgb8())
}

/// Whether a JPEG ends with its EOI marker, allowing the zero padding some encoders append.
fn ends_with_eoi(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    bytes[..end].ends_with(&JPEG_EOI)
}

/// Decodes a PNG or JPEG file to 8-bit RGB (alpha dropped, grey expanded).
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb(&bytes).map_err(|reason| Error::Image {
        path: path.to_path_buf(),
        reason,
    })
}

/// Writes `image` as PNG; a file that cannot be created is an I/O error naming it (not an
/// "image" error, which would read as if the picture were at fault).
pub fn save_png(image: &RgbImage, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| match e {
            image::ImageError::IoError(source) => Error::Io {
                path: path.to_path_buf(),
                source,
            },
            e => Error::Image {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_end_marker_with_and_without_padding() {
        assert!(ends_with_eoi(&[0xFF, 0xD8, 0x01, 0xFF, 0xD9]));
        assert!(ends_with_eoi(&[0xFF, 0xD8, 0x01, 0xFF, 0xD9, 0, 0]));
        assert!(!ends_with_eoi(&[0xFF, 0xD8, 0x01, 0x02]));
        assert!(!ends_with_eoi(&[0, 0]));
    }
}
