//! torchvision's `MultiScaleRoIAlign` (`ops/poolers.py`): each box is pooled from one FPN level
//! chosen by the FPN paper's eq. 1 (`LevelMapper`), with scales inferred from feature sizes.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::box_ops::{self, Box};
use super::conv::host_f32;
use super::roi_align::{ChannelsLast, RoiAlign};
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
        let (levels, ops) = self.plan(features, boxes, image_size)?;
        if device.is_cpu() {
            self.pool_on_host(features, boxes, &levels, &ops)
        } else {
            pool_per_level(features, boxes, &levels, &ops)
        }
    }

    /// Each box's level (`LevelMapper`) and each level's RoIAlign.
    fn plan(
        &self,
        features: &[Tensor],
        boxes: &[Box],
        image_size: (usize, usize),
    ) -> Result<(Vec<usize>, Vec<RoiAlign>)> {
        let s = self.output_size;
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
        let levels: Vec<usize> = boxes.iter().map(level_of).collect();
        if levels.iter().any(|&l| l >= features.len()) {
            let msg = format!(
                "roi pooling: feature sizes give levels beyond the {} maps",
                features.len()
            );
            return Err(candle_core::Error::Msg(msg).into());
        }
        let ops = features
            .iter()
            .map(|feature| {
                Ok(RoiAlign {
                    output_size: (s, s),
                    spatial_scale: scale(feature)?,
                    sampling_ratio: self.sampling_ratio,
                    aligned: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((levels, ops))
    }

    /// [`Self::forward`] on the CPU: each level copied channels last once, its boxes pooled
    /// straight into their own rows of one output, so neither the per-level outputs nor their
    /// concatenation and reordering (each a copy of the whole `[K, C, S, S]`) exist.
    fn pool_on_host(
        &self,
        features: &[Tensor],
        boxes: &[Box],
        levels: &[usize],
        ops: &[RoiAlign],
    ) -> Result<Tensor> {
        let (batch, channels, _, _) = features[0].dims4()?;
        let s = self.output_size;
        let per_roi = channels * s * s;
        let len = boxes.len() * per_roi;
        let mut out = Vec::<f32>::with_capacity(len);
        for (level, (feature, op)) in features.iter().zip(ops).enumerate() {
            if !levels.contains(&level) {
                continue;
            }
            let (n, c, h, w) = feature.dims4()?;
            if (n, c) != (batch, channels) {
                let msg = format!(
                    "roi pooling: level {level} is [{n}, {c}, {h}, {w}], level 0 has {batch} \
                     maps of {channels} channels"
                );
                return Err(candle_core::Error::Msg(msg).into());
            }
            let map = {
                let feature = feature.contiguous()?;
                let (storage, layout) = feature.storage_and_layout();
                let values = host_f32(&storage, layout, "roi pooling")?;
                ChannelsLast::new(values, (n, c), (h, w))
            };
            out.spare_capacity_mut()[..len]
                .par_chunks_mut(per_roi.max(1))
                .zip(boxes.par_iter().zip(levels))
                .filter(|(_, (_, &l))| l == level)
                .try_for_each(|(row, (b, _))| op.pool(&map, &[0.0, b[0], b[1], b[2], b[3]], row))?;
        }
        // SAFETY: every box's level is below `features.len()` (checked by the caller), so the
        // pass over its level pooled it, writing all `per_roi` values of its row.
        unsafe { out.set_len(len) };
        let shape = (boxes.len(), channels, s, s);
        Ok(Tensor::from_vec(out, shape, features[0].device())?)
    }
}

/// [`MultiScaleRoIAlign::forward`] as tensor ops, on every other device: the RoIAlign op per
/// level, the levels' outputs concatenated, then rows put back in the order of `boxes`.
fn pool_per_level(
    features: &[Tensor],
    boxes: &[Box],
    levels: &[usize],
    ops: &[RoiAlign],
) -> Result<Tensor> {
    let device = features[0].device();
    // Rows are pooled level by level; `inverse[i]` is the row box `i` lands in. Each level
    // rereads the boxes rather than keeping per-level lists: one exact-size buffer per
    // level, the one its tensor is made from.
    let mut pooled = Vec::with_capacity(features.len());
    let mut inverse = vec![0u32; boxes.len()];
    let mut row = 0u32;
    for (level, feature) in features.iter().enumerate() {
        let members = levels.iter().filter(|&&l| l == level).count();
        if members == 0 {
            continue;
        }
        let mut rois = Vec::with_capacity(members * 5);
        for (i, b) in boxes
            .iter()
            .enumerate()
            .filter(|&(i, _)| levels[i] == level)
        {
            rois.extend_from_slice(&[0.0, b[0], b[1], b[2], b[3]]);
            inverse[i] = row;
            row += 1;
        }
        // Boxes stay f32 on every device: f16 would move a box edge at x = 1000 by up to
        // 0.25 px, a large part of a P5 bin.
        let rois = Tensor::from_vec(rois, (members, 5), device)?;
        pooled.push(ops[level].apply(&feature.contiguous()?, &rois)?);
    }
    let pooled = Tensor::cat(&pooled, 0)?;
    let inverse = Tensor::from_vec(inverse, boxes.len(), device)?;
    Ok(pooled.index_select(&inverse, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_pooler_matches_the_per_level_ops() {
        // Four levels of an odd-sized 2-channel map, boxes of every size (so every level gets
        // some, and rows come back from levels out of order), edges beyond the image.
        let image = (61, 83);
        let sizes = [(16, 21), (8, 11), (4, 6), (2, 3)];
        let mut rng = crate::test_rng::TestRng::new(5);
        let features: Vec<Tensor> = sizes
            .iter()
            .map(|&(h, w)| {
                let values: Vec<f32> = (0..2 * h * w).map(|_| rng.unit() * 2.0 - 1.0).collect();
                Tensor::from_vec(values, (1, 2, h, w), &Device::Cpu).unwrap()
            })
            .collect();
        let boxes: Vec<Box> = (0..40)
            .map(|i| {
                let (x, y) = (rng.unit() * 90.0 - 5.0, rng.unit() * 70.0 - 5.0);
                let side = [1.0, 10.0, 120.0, 300.0, 900.0][i % 5] * (0.5 + rng.unit());
                [x, y, x + side, y + side * (0.5 + rng.unit())]
            })
            .collect();
        let pooler = MultiScaleRoIAlign::new(7);
        let got = pooler
            .forward(&features, &boxes, image, &Device::Cpu)
            .unwrap();
        assert_eq!(got.dims(), [40, 2, 7, 7]);
        let want = {
            let (levels, ops) = pooler.plan(&features, &boxes, image).unwrap();
            assert!((0..4).all(|l| levels.contains(&l)), "{levels:?}");
            pool_per_level(&features, &boxes, &levels, &ops).unwrap()
        };
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&got), bits(&want));
    }
}
