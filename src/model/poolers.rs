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
        let scales: Vec<f32> = features
            .iter()
            .map(|f| {
                let approx = f.dim(2)? as f32 / image_size.0 as f32;
                Ok(2f32.powf(approx.log2().round_ties_even()))
            })
            .collect::<Result<_>>()?;
        let k_min = -scales[0].log2();
        let k_max = -scales[scales.len() - 1].log2();
        let mut per_level: Vec<Vec<usize>> = vec![Vec::new(); features.len()];
        for (i, b) in boxes.iter().enumerate() {
            let size = box_ops::area(b).sqrt();
            let level = (CANONICAL_LEVEL + (size / CANONICAL_SCALE).log2() + LEVEL_EPS).floor();
            let level = level.clamp(k_min, k_max) - k_min;
            per_level[level as usize].push(i);
        }
        let mut pooled = Vec::new();
        let mut order = Vec::with_capacity(boxes.len());
        for (level, members) in per_level.iter().enumerate() {
            if members.is_empty() {
                continue;
            }
            let rois: Vec<f32> = members
                .iter()
                .flat_map(|&i| {
                    let b = boxes[i];
                    [0.0, b[0], b[1], b[2], b[3]]
                })
                .collect();
            // Boxes stay f32 on every device: f16 would move a box edge at x = 1000 by up to
            // 0.25 px, a large part of a P5 bin.
            let rois = Tensor::from_vec(rois, (members.len(), 5), device)?;
            let op = RoiAlign {
                output_size: (s, s),
                spatial_scale: scales[level],
                sampling_ratio: self.sampling_ratio,
                aligned: false,
            };
            pooled.push(op.apply(&features[level].contiguous()?, &rois)?);
            order.extend_from_slice(members);
        }
        let pooled = Tensor::cat(&pooled, 0)?;
        // `order[j]` is the box pooled at row j; invert it to restore the input order.
        let mut inverse = vec![0u32; order.len()];
        for (row, &i) in order.iter().enumerate() {
            inverse[i] = row as u32;
        }
        let inverse = Tensor::from_vec(inverse, boxes.len(), device)?;
        Ok(pooled.index_select(&inverse, 0)?)
    }
}
