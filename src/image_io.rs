//! Still images in (PNG, JPEG) and out, with errors that name the file.

use std::path::Path;

use image::RgbImage;

use crate::error::{Error, Result};

/// Decodes a PNG or JPEG file to 8-bit RGB (alpha dropped, grey expanded).
pub fn load_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let decoded = reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(decoded.to_rgb8())
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
