//! torchvision's `RoIHeads` at inference (`models/detection/roi_heads.py`) for Mask R-CNN v1 and
//! v2: 7×7 RoIAlign → `TwoMLPHead` (fc6, fc7; v1) or `FastRCNNConvFCHead` (convs + BatchNorm,
//! FC; v2) → `FastRCNNPredictor` → `postprocess_detections`;
//! then 14×14 RoIAlign on the kept boxes → `MaskRCNNHeads` (3×3 convs, BatchNorm in v2) →
//! `MaskRCNNPredictor` (2×2/2 transposed conv, 1×1 logits) → sigmoid of the predicted class.

use candle_core::{Device, Tensor};

use super::box_ops::{self, Box, BoxCoder, Candidates};
use super::layers::{Conv2d, ConvSpec, Linear};
use super::mask_predictor::MaskRCNNPredictor;
use super::poolers::MultiScaleRoIAlign;
use crate::config::{Config, BOX_MIN_SIZE};
use crate::error::{Error, Result};
use crate::weights::{HeadVariant, Weights};

/// `RoIHeads`' box coder weights.
const BOX_CODER_WEIGHTS: [f32; 4] = [10.0, 10.0, 5.0, 5.0];
const BOX_POOL_SIZE: usize = 7;
const MASK_POOL_SIZE: usize = 14;
/// Side of the predicted masks: the mask pool upsampled ×2 by `conv5_mask`.
pub const MASK_SIZE: usize = 2 * MASK_POOL_SIZE;
/// Class count bound (background included), so softmax runs in a stack buffer.
const MAX_CLASSES: usize = 1024;

/// A detection before masks, in resized-image coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub bbox: Box,
    pub score: f32,
    /// torchvision's label: 1..num_classes-1 (0 is background).
    pub label: usize,
}

#[derive(Debug, Clone)]
pub struct RoiHeads {
    box_roi_pool: MultiScaleRoIAlign,
    mask_roi_pool: MultiScaleRoIAlign,
    box_head: BoxHead,
    cls_score: Linear,
    bbox_pred: Linear,
    mask_convs: Vec<Conv2d>,
    mask_predictor: MaskRCNNPredictor,
    num_classes: usize,
    coder: BoxCoder,
    score_thresh: f32,
    nms_thresh: f32,
    detections_per_img: usize,
}

/// The box head: v1's `TwoMLPHead` (fc6, fc7) or v2's `FastRCNNConvFCHead` (3×3 convs with
/// BatchNorm, then fully connected layers), each layer followed by ReLU.
#[derive(Debug, Clone)]
struct BoxHead {
    variant: HeadVariant,
    convs: Vec<Conv2d>,
    fcs: Vec<Linear>,
}

impl BoxHead {
    fn load(w: &Weights, channels: usize, eps: f32, device: &Device) -> Result<Self> {
        let pool = BOX_POOL_SIZE * BOX_POOL_SIZE;
        if w.head_variant() == Some(HeadVariant::V1) {
            let fc6 = Linear::load(w, "roi_heads.box_head.fc6", channels * pool, device)?;
            let fc7 = Linear::load(w, "roi_heads.box_head.fc7", fc6.out_features(), device)?;
            return Ok(Self {
                variant: HeadVariant::V1,
                convs: Vec::new(),
                fcs: vec![fc6, fc7],
            });
        }
        // nn.Sequential(conv blocks..., Flatten, Linear, ReLU, Linear, ReLU...): the Linears
        // sit at every other index after the Flatten.
        let mut convs: Vec<Conv2d> = Vec::new();
        let mut c = channels;
        while w.contains(&format!("roi_heads.box_head.{}.0.weight", convs.len())) {
            let prefix = format!("roi_heads.box_head.{}", convs.len());
            let conv = Conv2d::load_block(w, &prefix, ConvSpec::new(c, 3, 1, 1), eps, device)?;
            c = conv.out_channels();
            convs.push(conv);
        }
        let mut fcs: Vec<Linear> = Vec::new();
        let mut inputs = c * pool;
        let mut index = convs.len() + 1;
        while fcs.is_empty() || w.contains(&format!("roi_heads.box_head.{index}.weight")) {
            let fc = Linear::load(w, &format!("roi_heads.box_head.{index}"), inputs, device)?;
            inputs = fc.out_features();
            fcs.push(fc);
            index += 2;
        }
        Ok(Self {
            variant: HeadVariant::V2,
            convs,
            fcs,
        })
    }

    fn out_features(&self) -> usize {
        self.fcs.last().map_or(0, Linear::out_features)
    }

    /// `[P, C, 7, 7]` → `[P, R]`.
    fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let mut x = pooled.clone();
        for conv in &self.convs {
            x = conv.forward_relu(&x)?;
        }
        let mut x = x.flatten_from(1)?;
        for fc in &self.fcs {
            x = fc.forward_relu(&x)?;
        }
        Ok(x)
    }
}

impl RoiHeads {
    /// `eps` is the BatchNorm epsilon of the v2 layout's normalised head convs.
    pub fn load(
        w: &Weights,
        channels: usize,
        cfg: &Config,
        eps: f32,
        device: &Device,
    ) -> Result<Self> {
        let box_head = BoxHead::load(w, channels, eps, device)?;
        let representation = box_head.out_features();
        let cls_score = Linear::load(
            w,
            "roi_heads.box_predictor.cls_score",
            representation,
            device,
        )?;
        let num_classes = cls_score.out_features();
        if !(2..=MAX_CLASSES).contains(&num_classes) {
            return Err(w.architecture_error(format!(
                "roi_heads.box_predictor.cls_score has {num_classes} classes; drape supports \
                 background plus 1 to {} classes",
                MAX_CLASSES - 1
            )));
        }
        let bbox_pred = Linear::load(
            w,
            "roi_heads.box_predictor.bbox_pred",
            representation,
            device,
        )?;
        if bbox_pred.out_features() != 4 * num_classes {
            return Err(Error::Shape {
                path: w.path().to_path_buf(),
                name: "roi_heads.box_predictor.bbox_pred.weight".into(),
                expected: format!("[{}, {representation}]", 4 * num_classes),
                found: w
                    .shape("roi_heads.box_predictor.bbox_pred.weight")?
                    .to_vec(),
            });
        }

        let mut mask_convs = Vec::new();
        let mut c = channels;
        while w.contains(&format!(
            "roi_heads.mask_head.{}.0.weight",
            mask_convs.len()
        )) {
            let conv = Conv2d::load_block(
                w,
                &format!("roi_heads.mask_head.{}", mask_convs.len()),
                ConvSpec::new(c, 3, 1, 1),
                eps,
                device,
            )?;
            c = conv.out_channels();
            mask_convs.push(conv);
        }
        if mask_convs.is_empty() {
            w.shape("roi_heads.mask_head.0.0.weight")?;
        }

        let mask_predictor = MaskRCNNPredictor::load(w, c, num_classes, device)?;
        Ok(Self {
            box_roi_pool: MultiScaleRoIAlign::new(BOX_POOL_SIZE),
            mask_roi_pool: MultiScaleRoIAlign::new(MASK_POOL_SIZE),
            box_head,
            cls_score,
            bbox_pred,
            mask_convs,
            mask_predictor,
            num_classes,
            coder: BoxCoder::new(BOX_CODER_WEIGHTS),
            score_thresh: cfg.box_score_thresh,
            nms_thresh: cfg.box_nms_thresh,
            detections_per_img: cfg.detections_per_img,
        })
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn representation_size(&self) -> usize {
        self.box_head.out_features()
    }

    /// `v2` for torchvision's `FastRCNNConvFCHead` box head, `v1` for `TwoMLPHead`.
    pub fn variant(&self) -> &'static str {
        self.box_head.variant.name()
    }

    pub fn mask_layers(&self) -> Vec<usize> {
        self.mask_convs.iter().map(Conv2d::out_channels).collect()
    }

    /// `box_roi_pool`: `[P, C, 7, 7]`.
    pub fn box_roi_pool(
        &self,
        features: &[Tensor],
        proposals: &[Box],
        image_size: (usize, usize),
    ) -> Result<Tensor> {
        self.box_roi_pool
            .forward(features, proposals, image_size, features[0].device())
    }

    /// `TwoMLPHead`: `[P, C, 7, 7]` → `[P, R]`.
    pub fn box_head(&self, pooled: &Tensor) -> Result<Tensor> {
        self.box_head.forward(pooled)
    }

    /// `FastRCNNPredictor`: class logits `[P, K]` and box regression `[P, 4K]`.
    pub fn box_predictor(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.cls_score.forward(x)?, self.bbox_pred.forward(x)?))
    }

    /// `postprocess_detections` for one image: softmax, per-class decode and clip, drop
    /// background, score threshold, tiny boxes, per-class NMS, keep the best. `cand` is reused
    /// scratch; the detections replace `out`'s contents.
    pub fn postprocess_detections(
        &self,
        class_logits: &[f32],
        box_regression: &[f32],
        proposals: &[Box],
        image_size: (usize, usize),
        cand: &mut Candidates,
        out: &mut Vec<Detection>,
    ) {
        let k = self.num_classes;
        cand.clear();
        let mut probs = [0f32; MAX_CLASSES];
        for (p, proposal) in proposals.iter().enumerate() {
            let logits = &class_logits[p * k..(p + 1) * k];
            let probs = &mut probs[..k];
            softmax(logits, probs);
            for (label, &score) in probs.iter().enumerate().skip(1) {
                if score <= self.score_thresh {
                    continue;
                }
                let deltas = &box_regression[(p * k + label) * 4..][..4];
                let b = box_ops::clip_to_image(&self.coder.decode(proposal, deltas), image_size);
                if box_ops::is_large_enough(&b, BOX_MIN_SIZE) {
                    cand.push(b, score, label);
                }
            }
        }
        cand.batched_nms(self.nms_thresh);
        out.clear();
        out.extend(
            cand.keep
                .iter()
                .take(self.detections_per_img)
                .map(|&i| Detection {
                    bbox: cand.boxes[i],
                    score: cand.scores[i],
                    label: cand.groups[i],
                }),
        );
    }

    /// `mask_roi_pool`: `[D, C, 14, 14]`.
    pub fn mask_roi_pool(
        &self,
        features: &[Tensor],
        boxes: &[Box],
        image_size: (usize, usize),
    ) -> Result<Tensor> {
        self.mask_roi_pool
            .forward(features, boxes, image_size, features[0].device())
    }

    /// Mask head and predictor on pooled features, then `maskrcnn_inference`: the sigmoid of
    /// each detection's own class. Returns `[D, 28, 28]` f32 probabilities on the device, which
    /// [`crate::postprocess::Postprocessor`] pastes there.
    pub fn mask_probs_from_pooled(&self, pooled: &Tensor, labels: &[usize]) -> Result<Tensor> {
        let mut x = pooled.clone();
        for conv in &self.mask_convs {
            x = conv.forward_relu(&x)?;
        }
        self.mask_predictor.forward(&x, labels)
    }
}

/// `F.softmax` over one row.
fn softmax(logits: &[f32], out: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = (l - max).exp();
        sum += *o;
    }
    out.iter_mut().for_each(|o| *o /= sum);
}
