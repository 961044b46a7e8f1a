//! Flag values chosen from a list: the library's enums carry no parsing of their own, so each
//! has its command-line spelling (and `--help` text) here.

use clap::ValueEnum;

/// `--rle`: how masks are written in JSON.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Rle {
    /// `{"size": [H, W], "counts": "<COCO compressed RLE>"}`, as `pycocotools.mask.encode`.
    Coco,
    /// `{"size": [H, W], "encoded_pixels": "start length ..."}`: iMaterialist/Kaggle runs of
    /// foreground, 1-indexed, column-major.
    Kaggle,
}

impl From<Rle> for drape::output::RleFormat {
    fn from(v: Rle) -> Self {
        match v {
            Rle::Coco => Self::Coco,
            Rle::Kaggle => Self::Kaggle,
        }
    }
}

/// `--mqtt-masks`: whether frame records on the broker carry masks.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MqttMasks {
    /// Boxes, classes, scores and tracks only: a few hundred bytes a frame.
    None,
    /// Masks as in the JSON lines (`--rle` picks the encoding).
    Rle,
}

impl From<MqttMasks> for drape::stream::mqtt::MqttMasks {
    fn from(v: MqttMasks) -> Self {
        match v {
            MqttMasks::None => Self::None,
            MqttMasks::Rle => Self::Rle,
        }
    }
}

/// `drape convert --dtype`: the element type of the written weights.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
}

impl From<Dtype> for drape::convert::OutDtype {
    fn from(v: Dtype) -> Self {
        match v {
            Dtype::F16 => Self::F16,
            Dtype::Bf16 => Self::Bf16,
            Dtype::F32 => Self::F32,
        }
    }
}
