//! `drape eval` and `drape submit`: accuracy you can check against published references — the
//! iMaterialist (Fashion) 2019 Kaggle metric and COCO mask AP as pycocotools' `COCOeval`
//! computes it — what the edge settings (input size, mask cap) cost in accuracy, and Kaggle
//! submission files.
//!
//! ```text
//! drape eval --weights W --images train/ --annotations train.csv --limit 200
//! drape eval --weights W --images val/ --coco instances.json --label-offset 1 \
//!     --sweep --plot sweep.png
//! drape submit --weights W --images test/ --out submission.csv
//! ```
//!
//! Ground-truth readers ([`imaterialist`], [`coco`]) produce a [`Dataset`]; [`masks`] holds the
//! RLE geometry of pycocotools' `maskApi.c`; [`metric`] the two metrics (see its docs for their
//! exact definitions); [`submit`] the non-overlapping masks the competition required; [`run`]
//! the evaluation and submission loops the commands drive.

pub mod coco;
pub mod imaterialist;
pub mod kaggle_rle;
pub mod masks;
pub mod metric;
pub(crate) mod plot;
pub mod run;
pub mod submit;

use std::path::{Path, PathBuf};

use crate::rle::Rle;
pub use kaggle_rle::RleError;
pub use run::{
    sweep_plot, write_submission, Annotations, EvalOptions, EvalReport, Evaluation, RunReport,
    DEFAULT_MIN_SCORE,
};

/// Extensions tried, in order, after the name as given: iMaterialist's ImageIds may or may not
/// carry the file's extension.
const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Annotated images, in evaluation order.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub images: Vec<GtImage>,
    /// Torchvision labels COCO AP is computed over (COCOeval's `catIds`).
    pub categories: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct GtImage {
    /// iMaterialist ImageId or COCO `file_name`: the file under the images directory, perhaps
    /// without its extension.
    pub name: String,
    pub height: usize,
    pub width: usize,
    pub objects: Vec<GtObject>,
}

#[derive(Debug, Clone)]
pub struct GtObject {
    /// Torchvision label (1-based).
    pub class_id: usize,
    pub mask: Rle,
    /// A COCO crowd region: matching it is neither a hit nor a miss.
    pub iscrowd: bool,
}

/// Evaluation errors; each names the file, and the line where the format has lines.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    // The causes are part of the message and deliberately not `#[source]`: the binary prints
    // the whole chain, which would repeat them.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Csv {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}:{line}: EncodedPixels: {reason}")]
    Rle {
        path: PathBuf,
        line: usize,
        reason: RleError,
    },
    #[error(
        "{path}:{line}: ClassId {class_id} is not one of the model's {categories} categories \
         (0..{categories})"
    )]
    UnknownClass {
        path: PathBuf,
        line: usize,
        class_id: usize,
        categories: usize,
    },
    #[error("{path}: line {line}, column {column}: {reason}")]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("{path}: {item}: {reason}")]
    Coco {
        path: PathBuf,
        item: String,
        reason: String,
    },
    #[error("{dir}: no image file for `{name}` (tried {tried})")]
    ImageNotFound {
        dir: PathBuf,
        name: String,
        tried: String,
    },
    #[error(
        "{path}: the image is {found_width}x{found_height} but its annotations say \
         {width}x{height}"
    )]
    ImageSize {
        path: PathBuf,
        width: usize,
        height: usize,
        found_width: usize,
        found_height: usize,
    },
    #[error("no annotated images to evaluate")]
    NoImages,
    #[error("running the model on {path}")]
    Detect {
        path: PathBuf,
        // Boxed: a path beside a whole library error would make every `EvalError` as large.
        #[source]
        source: Box<crate::Error>,
    },
    #[error("{path}: file name is not UTF-8")]
    FileName { path: PathBuf },
    #[error(transparent)]
    Model(#[from] crate::Error),
}

/// The file of `image` under `dir`, checked to have the annotated size.
pub fn locate_image(dir: &Path, image: &GtImage) -> Result<PathBuf, EvalError> {
    let candidates: Vec<PathBuf> = std::iter::once(dir.join(&image.name))
        .chain(
            IMAGE_EXTENSIONS
                .iter()
                .map(|ext| dir.join(format!("{}.{ext}", image.name))),
        )
        .collect();
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or_else(|| EvalError::ImageNotFound {
            dir: dir.to_path_buf(),
            name: image.name.clone(),
            tried: candidates
                .iter()
                .filter_map(|p| p.file_name()?.to_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let (found_width, found_height) =
        image::image_dimensions(path).map_err(|e| crate::Error::Image {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let (found_width, found_height) = (found_width as usize, found_height as usize);
    if (found_width, found_height) != (image.width, image.height) {
        return Err(EvalError::ImageSize {
            path: path.clone(),
            width: image.width,
            height: image.height,
            found_width,
            found_height,
        });
    }
    Ok(path.clone())
}
