//! Inference settings. Every threshold and top-n is a named constant holding torchvision's
//! default for `maskrcnn_resnet50_fpn` at inference (`rpn.py`, `roi_heads.py`, `transform.py`),
//! and every one can be overridden through [`Config`].

use crate::error::{Error, Result};

/// `GeneralizedRCNNTransform(min_size=800, max_size=1333)`.
pub const MIN_SIZE: usize = 800;
pub const MAX_SIZE: usize = 1333;
/// Largest `min_size`/`max_size` accepted from flags or weights metadata. Three times
/// torchvision's default already needs gigabytes of activations; beyond this a typo would exhaust
/// memory (and invite the OOM killer onto the mirror's UI) before any error could be shown.
pub const MAX_INPUT_SIDE: usize = 4096;
/// torchvision pads the batch so both sides are multiples of this.
pub const SIZE_DIVISIBLE: usize = 32;
/// ImageNet statistics torchvision normalises with.
pub const IMAGE_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGE_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `rpn_pre_nms_top_n_test`, per FPN level.
pub const RPN_PRE_NMS_TOP_N: usize = 1000;
/// `rpn_post_nms_top_n_test`, per image.
pub const RPN_POST_NMS_TOP_N: usize = 1000;
pub const RPN_NMS_THRESH: f32 = 0.7;
pub const RPN_SCORE_THRESH: f32 = 0.0;
/// `RegionProposalNetwork.min_size`: proposals narrower or shorter than this are dropped.
pub const RPN_MIN_SIZE: f32 = 1e-3;

pub const BOX_SCORE_THRESH: f32 = 0.05;
pub const BOX_NMS_THRESH: f32 = 0.5;
pub const BOX_DETECTIONS_PER_IMG: usize = 100;
/// `postprocess_detections` drops boxes smaller than this.
pub const BOX_MIN_SIZE: f32 = 1e-2;

/// A pasted mask probability above this is foreground.
pub const MASK_THRESH: f32 = 0.5;

/// Settings one model runs with. `Default` is torchvision's inference configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub min_size: usize,
    pub max_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rpn_pre_nms_top_n: usize,
    pub rpn_post_nms_top_n: usize,
    pub rpn_nms_thresh: f32,
    pub rpn_score_thresh: f32,
    pub box_score_thresh: f32,
    pub box_nms_thresh: f32,
    pub detections_per_img: usize,
    pub mask_thresh: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            min_size: MIN_SIZE,
            max_size: MAX_SIZE,
            image_mean: IMAGE_MEAN,
            image_std: IMAGE_STD,
            rpn_pre_nms_top_n: RPN_PRE_NMS_TOP_N,
            rpn_post_nms_top_n: RPN_POST_NMS_TOP_N,
            rpn_nms_thresh: RPN_NMS_THRESH,
            rpn_score_thresh: RPN_SCORE_THRESH,
            box_score_thresh: BOX_SCORE_THRESH,
            box_nms_thresh: BOX_NMS_THRESH,
            detections_per_img: BOX_DETECTIONS_PER_IMG,
            mask_thresh: MASK_THRESH,
        }
    }
}

impl Config {
    /// Rejects settings that would make inference meaningless or panic later.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.min_size == 0 || self.max_size == 0 {
            return bad(format!(
                "min_size ({}) and max_size ({}) must be positive",
                self.min_size, self.max_size
            ));
        }
        if self.min_size > MAX_INPUT_SIDE || self.max_size > MAX_INPUT_SIDE {
            return bad(format!(
                "min_size ({}) and max_size ({}) must be at most {MAX_INPUT_SIDE}",
                self.min_size, self.max_size
            ));
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return bad(format!("image_std {:?} must be positive", self.image_std));
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return bad(format!("image_mean {:?} must be finite", self.image_mean));
        }
        for (name, v) in [
            ("rpn_nms_thresh", self.rpn_nms_thresh),
            ("box_nms_thresh", self.box_nms_thresh),
            ("box_score_thresh", self.box_score_thresh),
            ("rpn_score_thresh", self.rpn_score_thresh),
            ("mask_thresh", self.mask_thresh),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} = {v} must lie in [0, 1]"));
            }
        }
        if self.rpn_pre_nms_top_n == 0 || self.rpn_post_nms_top_n == 0 {
            return bad("RPN top-n values must be positive".into());
        }
        Ok(())
    }
}
