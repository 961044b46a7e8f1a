//! torchvision's `RegionProposalNetwork` at inference (`models/detection/rpn.py`): the shared
//! `RPNHead` over every FPN level, then `filter_proposals` — top-n per level on the objectness
//! logits, decode, clip, drop tiny boxes, NMS per level, keep the best overall.

use candle_core::{DType, Device, Tensor};

use super::anchors::LevelAnchors;
use super::box_ops::{self, Box, BoxCoder, Candidates};
use super::layers::{Conv2d, ConvSpec};
use super::sigmoid;
use super::topk::top_n_levels;
use crate::config::{Config, RPN_MIN_SIZE};
use crate::error::Result;
use crate::weights::Weights;

/// `RegionProposalNetwork`'s box coder weights.
const RPN_BOX_WEIGHTS: [f32; 4] = [1.0, 1.0, 1.0, 1.0];

#[derive(Debug, Clone)]
pub struct Rpn {
    convs: Vec<Conv2d>,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    num_anchors: usize,
    coder: BoxCoder,
    pre_nms_top_n: usize,
    post_nms_top_n: usize,
    nms_thresh: f32,
    score_thresh: f32,
}

impl Rpn {
    pub fn load(w: &Weights, channels: usize, cfg: &Config, device: &Device) -> Result<Self> {
        // `RPNHead(conv_depth=N)`: one 3×3 conv + ReLU in v1, two in v2.
        let mut convs: Vec<Conv2d> = Vec::new();
        while convs.is_empty() || w.contains(&format!("rpn.head.conv.{}.0.weight", convs.len())) {
            let spec = ConvSpec::new(channels, 3, 1, 1);
            let prefix = format!("rpn.head.conv.{}.0", convs.len());
            convs.push(Conv2d::load(w, &prefix, spec, device)?);
        }
        let width = convs.last().expect("at least one conv").out_channels();
        let cls_logits = Conv2d::load(
            w,
            "rpn.head.cls_logits",
            ConvSpec::new(width, 1, 1, 0),
            device,
        )?;
        let num_anchors = cls_logits.out_channels();
        if num_anchors != super::anchors::ASPECT_RATIOS.len() {
            return Err(w.architecture_error(format!(
                "rpn.head.cls_logits predicts {num_anchors} anchors per location; the anchor \
                 generator has {} aspect ratios",
                super::anchors::ASPECT_RATIOS.len()
            )));
        }
        let bbox_pred = Conv2d::load(
            w,
            "rpn.head.bbox_pred",
            ConvSpec::new(width, 1, 1, 0),
            device,
        )?;
        if bbox_pred.out_channels() != 4 * num_anchors {
            return Err(w.architecture_error(format!(
                "rpn.head.bbox_pred has {} outputs, expected {}",
                bbox_pred.out_channels(),
                4 * num_anchors
            )));
        }
        Ok(Self {
            convs,
            cls_logits,
            bbox_pred,
            num_anchors,
            coder: BoxCoder::new(RPN_BOX_WEIGHTS),
            pre_nms_top_n: cfg.rpn_pre_nms_top_n,
            post_nms_top_n: cfg.rpn_post_nms_top_n,
            nms_thresh: cfg.rpn_nms_thresh,
            score_thresh: cfg.rpn_score_thresh,
        })
    }

    /// Proposals in resized-image coordinates, best first. `image_size` is the resized image
    /// (height, width) that boxes are clipped to; `padded` the batch tensor's size, which sets
    /// the anchor strides.
    /// `cand` is reused scratch; the proposals replace `out`'s contents.
    pub fn forward(
        &self,
        features: &[Tensor],
        image_size: (usize, usize),
        padded: (usize, usize),
        cand: &mut Candidates,
        out: &mut Vec<Box>,
    ) -> Result<()> {
        cand.clear();
        // Every level's head is enqueued before anything is read back, so the device runs
        // them back to back instead of idling while the host waits for each level's top-n.
        let mut logits = Vec::with_capacity(features.len());
        let mut deltas = Vec::with_capacity(features.len());
        let mut grids = Vec::with_capacity(features.len());
        for feature in features {
            let mut t = feature.clone();
            for conv in &self.convs {
                t = conv.forward_relu(&t)?;
            }
            let (_, _, h, w) = t.dims4()?;
            // [1, A, H, W] -> [H, W, A], the anchors' order.
            logits.push(
                self.cls_logits
                    .forward(&t)?
                    .permute((0, 2, 3, 1))?
                    .flatten_all()?,
            );
            // [1, 4A, H, W] -> [1, A, 4, H, W] -> [H, W, A, 4].
            deltas.push(
                self.bbox_pred
                    .forward(&t)?
                    .reshape((1, self.num_anchors, 4, h, w))?
                    .permute((0, 3, 4, 1, 2))?
                    .reshape((h * w * self.num_anchors, 4))?,
            );
            grids.push((h, w));
        }
        // The top-n runs on the device for all levels at once (see `topk`); only the
        // winners' logits and box deltas come to the host, where decoding and NMS run in f32
        // (the deltas are f16 on GPUs until here).
        let tops = top_n_levels(&logits, self.pre_nms_top_n)?;
        // One gather and one read of every level's winners' deltas: indices into the levels'
        // deltas stacked as [sum of H*W*A, 4].
        let mut winners = Vec::with_capacity(tops.iter().map(|t| t.indices.len()).sum());
        let mut offset = 0u32;
        for (top, d) in tops.iter().zip(&deltas) {
            winners.extend(top.indices.iter().map(|&i| offset + i));
            offset += d.dim(0)? as u32;
        }
        let winner_deltas: Vec<f32> = if winners.is_empty() {
            Vec::new()
        } else {
            let device = features[0].device();
            let n = winners.len();
            let winners = Tensor::from_vec(winners, n, device)?;
            crate::device::read_vec1(
                &Tensor::cat(&deltas, 0)?
                    .index_select(&winners, 0)?
                    .flatten_all()?
                    .to_dtype(DType::F32)?,
            )?
        };
        let mut level_deltas = winner_deltas.chunks_exact(4);
        for (level, (top, &grid)) in tops.iter().zip(&grids).enumerate() {
            let anchors = LevelAnchors::new(level, grid, padded);
            for ((&i, &logit), deltas) in top
                .indices
                .iter()
                .zip(&top.values)
                .zip(level_deltas.by_ref())
            {
                let b = self.coder.decode(&anchors.get(i as usize), deltas);
                let b = box_ops::clip_to_image(&b, image_size);
                let score = sigmoid(logit);
                if box_ops::is_large_enough(&b, RPN_MIN_SIZE) && score >= self.score_thresh {
                    cand.push(b, score, level);
                }
            }
        }
        cand.batched_nms(self.nms_thresh);
        out.clear();
        out.extend(
            cand.keep
                .iter()
                .take(self.post_nms_top_n)
                .map(|&i| cand.boxes[i]),
        );
        Ok(())
    }
}
