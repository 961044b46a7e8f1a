//! drape: torchvision-compatible Mask R-CNN garment segmentation on candle.
//!
//! ```no_run
//! # fn main() -> drape::Result<()> {
//! let model = drape::MaskRcnn::load("weights/drape-tiny-r50.safetensors", |_| {}, &candle_core::Device::Cpu)?;
//! let image = drape::image_io::load_rgb("tests/fixtures/images/landscape.png")?;
//! let result = model.detect(image.as_raw(), (image.height() as usize, image.width() as usize))?;
//! println!("{}", drape::output::to_json(model.labels(), &result, Default::default()));
//! # Ok(()) }
//! ```

pub mod alloc;
pub mod assets;
pub mod bench;
pub mod calibrate;
pub mod capture;
pub mod clock;
pub mod config;
pub mod convert;
pub mod device;
pub mod error;
pub mod eval;
pub mod health;
pub mod image_io;
pub mod inspect;
pub mod interp;
pub mod labels;
mod mmap;
pub mod model;
pub mod output;
pub mod overlay;
pub mod pipeline;
pub mod postprocess;
pub mod rle;
pub mod service;
pub mod stream;
pub mod synthetic;
#[cfg(test)]
mod test_rng;
pub mod track;
pub mod weights;

pub use config::Config;
pub use error::{Error, Result};
pub use model::MaskRcnn;
pub use postprocess::Detections;
