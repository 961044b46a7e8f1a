//! torchvision's Mask R-CNN (`models/detection/mask_rcnn.py`), one module per stage:
//! `transform → backbone → fpn → rpn → roi_heads`, then [`crate::postprocess`].
//! The architecture is read off the weights; see [`MaskRcnn::load`].

pub mod anchors;
pub mod backbone;
pub mod box_ops;
pub mod fpn;
pub mod layers;
pub mod poolers;
pub mod roi_align;
pub mod roi_heads;
pub mod rpn;
pub mod transform;

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::error::Result;
use crate::labels::default_labels;
use crate::postprocess::{Instance, Paster};
use crate::weights::Weights;
use backbone::{BlockKind, ResNet};
use fpn::Fpn;
use roi_heads::RoiHeads;
use rpn::Rpn;
use transform::{ImageBatch, Transform};

/// BatchNorm epsilon when the file does not say: `nn.BatchNorm2d`'s and `FrozenBatchNorm2d`'s
/// default. torchvision's own COCO-trained v1 weights were made with 0.0.
pub const DEFAULT_BN_EPS: f32 = 1e-5;

/// What the weights describe, for `inspect`-style summaries and checks.
#[derive(Debug, Clone, Serialize)]
pub struct Architecture {
    pub backbone: String,
    pub block: String,
    pub blocks_per_stage: [usize; 4],
    pub stage_channels: [usize; 4],
    pub fpn_channels: usize,
    pub representation_size: usize,
    pub mask_layers: Vec<usize>,
    pub num_classes: usize,
    pub bn_eps: f32,
}

/// Per-stage wall time of one `detect` call, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub preprocess: f64,
    pub backbone: f64,
    pub rpn: f64,
    pub roi_heads: f64,
    pub masks: f64,
    pub total: f64,
}

/// The result of one image.
#[derive(Debug, Clone)]
pub struct Detections {
    pub width: usize,
    pub height: usize,
    pub instances: Vec<Instance>,
    pub timings: Timings,
}

pub struct MaskRcnn {
    config: Config,
    architecture: Architecture,
    labels: Vec<String>,
    transform: Transform,
    pub backbone: ResNet,
    pub fpn: Fpn,
    pub rpn: Rpn,
    pub roi_heads: RoiHeads,
    device: Device,
}

/// Parses a JSON list of exactly `N` numbers.
fn parse_floats<const N: usize>(raw: &str) -> Option<[f32; N]> {
    serde_json::from_str::<Vec<f32>>(raw).ok()?.try_into().ok()
}

impl MaskRcnn {
    /// Loads a torchvision-layout Mask R-CNN from a safetensors file. Settings the file's
    /// metadata gives (`min_size`, `max_size`, `image_mean`, `image_std`) replace the defaults
    /// in `config`; `overrides` is applied last, so explicit user choices win.
    pub fn load(
        path: impl AsRef<Path>,
        overrides: impl FnOnce(&mut Config),
        device: &Device,
    ) -> Result<Self> {
        let _span = tracing::info_span!("load").entered();
        let w = Weights::open(path)?;
        let mut config = Config::default();
        if let Some(v) = w.parse_metadata("min_size", |s| s.trim().parse().ok())? {
            config.min_size = v;
        }
        if let Some(v) = w.parse_metadata("max_size", |s| s.trim().parse().ok())? {
            config.max_size = v;
        }
        if let Some(v) = w.parse_metadata("image_mean", parse_floats::<3>)? {
            config.image_mean = v;
        }
        if let Some(v) = w.parse_metadata("image_std", parse_floats::<3>)? {
            config.image_std = v;
        }
        overrides(&mut config);
        config.validate()?;
        let bn_eps = w
            .parse_metadata("bn_eps", |s| {
                s.trim().parse::<f32>().ok().filter(|e| *e >= 0.0)
            })?
            .unwrap_or(DEFAULT_BN_EPS);

        let backbone = ResNet::load(&w, bn_eps, device)?;
        let fpn = Fpn::load(&w, backbone.out_channels(), device)?;
        let rpn = Rpn::load(&w, fpn.channels(), &config, device)?;
        let roi_heads = RoiHeads::load(&w, fpn.channels(), &config, device)?;
        w.check_all_used()?;

        let num_classes = roi_heads.num_classes();
        let labels = match w
            .parse_metadata("labels", |s| serde_json::from_str::<Vec<String>>(s).ok())?
        {
            Some(l) if l.len() == num_classes - 1 => l,
            Some(l) => return Err(w.metadata_error(
                "labels",
                format!(
                    "{} names for {} foreground classes (index 0 is the first foreground class)",
                    l.len(),
                    num_classes - 1
                ),
            )),
            None => default_labels(num_classes),
        };
        let architecture = Architecture {
            backbone: backbone.depth_name(),
            block: match backbone.block_kind() {
                BlockKind::Basic => "BasicBlock",
                BlockKind::Bottleneck => "Bottleneck",
            }
            .into(),
            blocks_per_stage: backbone.blocks_per_stage(),
            stage_channels: backbone.out_channels(),
            fpn_channels: fpn.channels(),
            representation_size: roi_heads.representation_size(),
            mask_layers: roi_heads.mask_layers(),
            num_classes,
            bn_eps,
        };
        tracing::info!(?architecture, "model loaded");
        Ok(Self {
            transform: Transform::new(&config),
            config,
            architecture,
            labels,
            backbone,
            fpn,
            rpn,
            roi_heads,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The name of torchvision label `class_id` (1-based; 0 is background).
    pub fn label(&self, class_id: usize) -> &str {
        class_id
            .checked_sub(1)
            .and_then(|i| self.labels.get(i))
            .map_or("background", String::as_str)
    }

    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// `GeneralizedRCNNTransform` on an interleaved RGB image of `(height, width)`.
    pub fn preprocess(&self, rgb: &[u8], size: (usize, usize)) -> Result<ImageBatch> {
        let _span = tracing::debug_span!("preprocess").entered();
        self.transform.apply(rgb, size, &self.device)
    }

    /// Backbone body and FPN: P2..P6.
    pub fn features(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        let _span = tracing::debug_span!("backbone").entered();
        let c = self.backbone.forward(images)?;
        let _span = tracing::debug_span!("fpn").entered();
        self.fpn.forward(&c)
    }

    /// Runs the whole model on one interleaved 8-bit RGB image of `(height, width)`.
    pub fn detect(&self, rgb: &[u8], size: (usize, usize)) -> Result<Detections> {
        let mut paster = Paster::new();
        self.detect_with(rgb, size, &mut paster)
    }

    /// [`Self::detect`] with a caller-owned paste buffer, reused across frames.
    pub fn detect_with(
        &self,
        rgb: &[u8],
        size: (usize, usize),
        paster: &mut Paster,
    ) -> Result<Detections> {
        let mut timings = Timings::default();
        let start = Instant::now();
        let mut lap = start;
        let mut tick = |slot: &mut f64| {
            let now = Instant::now();
            *slot = (now - lap).as_secs_f64() * 1e3;
            lap = now;
        };
        let batch = self.preprocess(rgb, size)?;
        tick(&mut timings.preprocess);
        let features = self.features(&batch.tensor)?;
        tick(&mut timings.backbone);
        let proposals = {
            let _span = tracing::debug_span!("rpn").entered();
            self.rpn
                .forward(&features, batch.image_size, batch.padded)?
        };
        tick(&mut timings.rpn);
        // MultiScaleRoIAlign pools from P2..P5 only.
        let pyramid = &features[..4];
        let detections = {
            let _span = tracing::debug_span!("roi_heads").entered();
            self.roi_heads
                .detect(pyramid, &proposals, batch.image_size)?
        };
        tick(&mut timings.roi_heads);
        let instances = {
            let _span = tracing::debug_span!("masks").entered();
            let probs = self
                .roi_heads
                .mask_probs(pyramid, &detections, batch.image_size)?;
            paster.paste(
                &detections,
                &probs,
                batch.image_size,
                batch.original,
                self.config.mask_thresh,
            )
        };
        tick(&mut timings.masks);
        timings.total = start.elapsed().as_secs_f64() * 1e3;
        Ok(Detections {
            width: size.1,
            height: size.0,
            instances,
            timings,
        })
    }
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
