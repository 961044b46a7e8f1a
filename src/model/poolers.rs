//! torchvision's `MultiScaleRoIAlign` (`ops/poolers.py`): each box is pooled from one FPN level
//! chosen by the FPN paper's eq. 1 (`LevelMapper`), with scales inferred from feature sizes.

use candle_core::{Device, Tensor};

use super::box_ops::{self, Box};
use super::roi_align::RoiAlign;
use crate::error::Result;

/// `LevelMapper` defaults: canonical box size 224 maps to level 4.
const CANONICAL_SCALE: f32 = 224.0;
const CANONICAL_LEVEL: f32 = 4.0;
const LEVEL_EPS: f32 = 1e-6;
/// Mask R-CNN's poolers use two sampling points per bin side.
pub const SAMPLING_RATIO: i32 = 2;

#[derive(Debug, Clone, Copy)]
pub struct MultiScaleRoIAlign {
    pub output_size: usize,
    pub sampling_ratio: i32,
}

impl MultiScaleRoIAlign {
    pub fn new(output_size: usize) -> Self {
        Self {
            output_size,
            sampling_ratio: SAMPLING_RATIO,
        }
    }

    /// Pools `boxes` (resized-image coordinates) from `features` (P2..P5) of an image whose
    /// resized size is `image_size`. Returns `[K, C, S, S]` in the order of `boxes`.
    pub fn forward(
        &self,
        features: &[Tensor],
        boxes: &[Box],
        image_size: (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        let (_, channels, _, _) = features[0].dims4()?;
        let s = self.output_size;
        if boxes.is_empty() {
            return Ok(Tensor::zeros(
                (0, channels, s, s),
                features[0].dtype(),
                device,
            )?);
        }
        // `_infer_scale`: 2^round(log2(feature height / image height)).
        let scale = |f: &Tensor| -> Result<f32> {
            let approx = f.dim(2)? as f32 / image_size.0 as f32;
            Ok(2f32.powf(approx.log2().round_ties_even()))
        };
        let k_min = -scale(&features[0])?.log2();
        let k_max = -scale(&features[features.len() - 1])?.log2();
        let level_of = |b: &Box| {
            let size = box_ops::area(b).sqrt();
            let level = (CANONICAL_LEVEL + (size / CANONICAL_SCALE).log2() + LEVEL_EPS).floor();
            (level.clamp(k_min, k_max) - k_min) as usize
        };
        // Rows are pooled level by level; `inverse[i]` is the row box `i` lands in. Each level
        // rereads the boxes rather than keeping per-level lists: one exact-size buffer per
        // level, the one its tensor is made from.
        let mut pooled = Vec::with_capacity(features.len());
        let mut inverse = vec![0u32; boxes.len()];
        let mut row = 0u32;
        for (level, feature) in features.iter().enumerate() {
            let members = boxes.iter().filter(|b| level_of(b) == level).count();
            if members == 0 {
                continue;
            }
            let mut rois = Vec::with_capacity(members * 5);
            for (i, b) in boxes
                .iter()
                .enumerate()
                .filter(|(_, b)| level_of(b) == level)
            {
                rois.extend_from_slice(&[0.0, b[0], b[1], b[2], b[3]]);
                inverse[i] = row;
                row += 1;
            }
            // Boxes stay f32 on every device: f16 would move a box edge at x = 1000 by up to
            // 0.25 px, a large part of a P5 bin.
            let rois = Tensor::from_vec(rois, (members, 5), device)?;
            let op = RoiAlign {
                output_size: (s, s),
                spatial_scale: scale(feature)?,
                sampling_ratio: self.sampling_ratio,
                aligned: false,
            };
            pooled.push(op.apply(&feature.contiguous()?, &rois)?);
        }
        let pooled = Tensor::cat(&pooled, 0)?;
        let inverse = Tensor::from_vec(inverse, boxes.len(), device)?;
        Ok(pooled.index_select(&inverse, 0)?)
    }
}
