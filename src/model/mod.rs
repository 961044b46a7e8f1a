//! torchvision's Mask R-CNN (`models/detection/mask_rcnn.py`), one module per stage:
//! `transform → backbone → fpn → rpn → roi_heads`. What it returns is still in the resized
//! image's coordinates; [`crate::postprocess`] is the next stage.
//! The architecture is read off the weights; see [`MaskRcnn::load`].

pub mod anchors;
pub mod backbone;
pub mod box_ops;
pub mod conv;
pub mod fpn;
pub mod gpu_conv;
#[cfg(test)]
pub(crate) mod kernel_emu;
pub mod layers;
pub mod mask_predictor;
pub mod plan;
pub mod poolers;
pub mod roi_align;
pub mod roi_heads;
pub mod rpn;
pub mod sgemm;
pub mod topk;
pub mod transform;
pub mod winograd;

/// `kernels/*.cu` as PTX, compiled by build.rs.
#[cfg(feature = "cuda")]
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::error::Result;
use crate::labels::Labels;
use crate::weights::Weights;
use backbone::{BlockKind, ResNet};
use box_ops::{Box, Candidates};
use fpn::Fpn;
use roi_heads::Detection;
use roi_heads::RoiHeads;
use rpn::{Rpn, RpnScratch};
use transform::{ImageBatch, ResizeScratch, Transform};

/// BatchNorm epsilon when the file does not say: `nn.BatchNorm2d`'s and `FrozenBatchNorm2d`'s
/// default. torchvision's own COCO-trained v1 weights were made with 0.0.
pub const DEFAULT_BN_EPS: f32 = 1e-5;

/// What the weights describe, for `inspect`-style summaries and checks.
#[derive(Debug, Clone, Serialize)]
pub struct Architecture {
    /// torchvision's Mask R-CNN layout: `v1` (`maskrcnn_resnet50_fpn`) or `v2`
    /// (`maskrcnn_resnet50_fpn_v2`: BatchNorm in FPN and heads, conv box head).
    pub variant: String,
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
    pub fpn: f64,
    pub rpn: f64,
    /// Both poolers: 7×7 for the box head, 14×14 for the mask head.
    pub roi_align: f64,
    /// Box head, predictor and `postprocess_detections`.
    pub box_head: f64,
    pub mask_head: f64,
    pub paste: f64,
    pub rle: f64,
    /// Track association (set by the pipeline; 0 for a lone `detect`).
    pub track: f64,
    pub total: f64,
}

impl Timings {
    /// Names and values in pipeline order, for tables and JSON.
    pub fn stages(&self) -> [(&'static str, f64); 11] {
        [
            ("preprocess", self.preprocess),
            ("backbone", self.backbone),
            ("fpn", self.fpn),
            ("rpn", self.rpn),
            ("roi_align", self.roi_align),
            ("box_head", self.box_head),
            ("mask_head", self.mask_head),
            ("paste", self.paste),
            ("rle", self.rle),
            ("track", self.track),
            ("total", self.total),
        ]
    }
}

/// What the model makes of one image, before postprocessing: detections in the coordinates of
/// the resized image it ran on, and the mask probabilities of the first `masked` of them.
#[derive(Debug, Default)]
pub struct ModelOutput {
    /// By descending score.
    pub detections: Vec<Detection>,
    /// `[masked, 28, 28]` on the model's device; `None` when no detection got a mask.
    pub mask_probs: Option<Tensor>,
    /// How many detections got a mask (the rest were beyond the frame's mask cap).
    pub masked: usize,
    /// (height, width) of the resized image the model ran on.
    pub image_size: (usize, usize),
    /// (height, width) of the image as given.
    pub original: (usize, usize),
    /// The model's stages; postprocessing adds its own.
    pub timings: Timings,
}

/// Per-frame knobs a latency budget turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSettings {
    pub min_size: usize,
    pub max_size: usize,
    /// Detections beyond this many (by score) get no mask.
    pub max_masks: usize,
}

/// Buffers one caller reuses across frames: the host side of a frame allocates nothing once
/// they have grown to the stream's size.
#[derive(Default)]
pub struct Workspace {
    resize: ResizeScratch,
    input: Vec<f32>,
    rpn: RpnScratch,
    candidates: Candidates,
    proposals: Vec<Box>,
    /// Boxes and labels of the detections that get a mask this frame.
    mask_boxes: Vec<Box>,
    mask_labels: Vec<usize>,
}

pub struct MaskRcnn {
    config: Config,
    architecture: Architecture,
    labels: Labels,
    transform: Transform,
    pub backbone: ResNet,
    pub fpn: Fpn,
    pub rpn: Rpn,
    pub roi_heads: RoiHeads,
    device: Device,
    /// [`crate::device::compute_dtype`] of `device`: what the input is cast to.
    dtype: DType,
    /// Synchronise the device at every stage boundary so per-stage times are exact.
    sync_stages: bool,
    /// Layers whose folded weights do not fit f16: kept f32 on GPUs.
    beyond_f16: Vec<String>,
}

/// Parses a JSON list of exactly `N` numbers.
/// An input side from metadata: positive and within [`crate::config::MAX_INPUT_SIDE`], checked
/// here so the error names the metadata key rather than a setting.
fn parse_side(raw: &str) -> Option<usize> {
    raw.trim()
        .parse()
        .ok()
        .filter(|v| (1..=crate::config::MAX_INPUT_SIDE).contains(v))
}

fn parse_floats<const N: usize>(raw: &str) -> Option<[f32; N]> {
    serde_json::from_str::<Vec<f32>>(raw).ok()?.try_into().ok()
}

/// The committed tiny model `tests/fixtures/{name}/model.safetensors`, on the CPU: what the
/// stages' unit tests compare their CPU and GPU compositions on.
#[cfg(test)]
pub(crate) fn fixture_model(name: &str) -> MaskRcnn {
    let path = format!(
        "{}/tests/fixtures/{name}/model.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    MaskRcnn::load(&path, |_| {}, &Device::Cpu).unwrap()
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
        if let Some(v) = w.parse_metadata("min_size", parse_side)? {
            config.min_size = v;
        }
        if let Some(v) = w.parse_metadata("max_size", parse_side)? {
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
        let fpn = Fpn::load(&w, backbone.out_channels(), bn_eps, device)?;
        let rpn = Rpn::load(&w, fpn.channels(), &config, device)?;
        let roi_heads = RoiHeads::load(&w, fpn.channels(), &config, bn_eps, device)?;
        w.check_all_used()?;
        let beyond_f16 = w.beyond_f16();

        let num_classes = roi_heads.num_classes();
        let labels =
            match w.parse_metadata("labels", |s| serde_json::from_str::<Vec<String>>(s).ok())? {
                Some(l) if l.len() == num_classes - 1 => Labels::new(l),
                Some(l) => {
                    return Err(w.metadata_error(
                        "labels",
                        format!(
                    "{} names for {} foreground classes (index 0 is the first foreground class)",
                    l.len(),
                    num_classes - 1
                ),
                    ))
                }
                None => Labels::default_for(num_classes),
            };
        let architecture = Architecture {
            variant: roi_heads.variant().into(),
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
            dtype: crate::device::compute_dtype(device.location()),
            sync_stages: false,
            beyond_f16,
        })
    }

    /// Whether [`Timings`] are exact per stage on a GPU: each stage boundary then waits for
    /// the device (one counted synchronisation each). Off, a GPU's stage times are mostly
    /// enqueue times and the wait lands where the results are read; `total` is right either
    /// way. The CPU runs synchronously, so its times are the same both ways.
    pub fn set_sync_stages(&mut self, on: bool) {
        self.sync_stages = on;
    }

    pub fn sync_stages(&self) -> bool {
        self.sync_stages
    }

    /// Layers whose folded weights lie beyond f16's range, which GPUs keep in f32 (see
    /// `layers::layer_dtype`); recorded on every device.
    pub fn beyond_f16(&self) -> &[String] {
        &self.beyond_f16
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

    /// The class names, from the file's `labels` metadata or the defaults for its class count.
    pub fn labels(&self) -> &Labels {
        &self.labels
    }

    /// The name of torchvision label `class_id` (1-based; 0 is background).
    pub fn label(&self, class_id: usize) -> &str {
        self.labels.get(class_id)
    }

    /// The configured input size, every mask: torchvision's behaviour.
    pub fn default_settings(&self) -> FrameSettings {
        FrameSettings {
            min_size: self.config.min_size,
            max_size: self.config.max_size,
            max_masks: self.config.detections_per_img,
        }
    }

    /// `GeneralizedRCNNTransform` on an interleaved RGB image of `(height, width)`.
    pub fn preprocess(&self, rgb: &[u8], size: (usize, usize)) -> Result<ImageBatch> {
        let _span = tracing::debug_span!("preprocess").entered();
        let sizes = (self.config.min_size, self.config.max_size);
        let mut batch = self.transform.apply(rgb, size, sizes, &self.device)?;
        batch.tensor = batch.tensor.to_dtype(self.dtype)?;
        Ok(batch)
    }

    /// Runs the model on one interleaved 8-bit RGB image of `(height, width)` with per-frame
    /// settings, into caller-owned buffers reused across frames. [`Self::detect`] adds
    /// postprocessing for a single image.
    pub fn detect_into(
        &self,
        rgb: &[u8],
        size: (usize, usize),
        settings: FrameSettings,
        ws: &mut Workspace,
        out: &mut ModelOutput,
    ) -> Result<()> {
        let mut t = Timings::default();
        let start = Instant::now();
        let mut clock = Lap {
            last: start,
            device: self.sync_stages.then_some(&self.device),
        };

        // The last frame's probabilities are not kept alive through this frame's forward.
        out.mask_probs = None;
        let g = {
            let _span = tracing::debug_span!("preprocess").entered();
            let sizes = (settings.min_size, settings.max_size);
            self.transform
                .apply_into(rgb, size, sizes, &mut ws.resize, &mut ws.input)?
        };
        // From here on candle allocates per tensor op; the allocation counter books that to
        // the model.
        let _model = crate::alloc::Scope::enter(crate::alloc::Account::Model);
        // Normalised on the host in f32, cast on the device (f16 on GPUs).
        let batch = ImageBatch {
            tensor: Tensor::from_slice(&ws.input, (1, 3, g.padded.0, g.padded.1), &self.device)?
                .to_dtype(self.dtype)?,
            image_size: g.image_size,
            padded: g.padded,
            original: g.original,
        };
        t.preprocess = clock.lap()?;
        let c = {
            let _span = tracing::debug_span!("backbone").entered();
            self.backbone.forward(&batch.tensor)?
        };
        t.backbone = clock.lap()?;
        let features = {
            let _span = tracing::debug_span!("fpn").entered();
            self.fpn.forward(&c)?
        };
        drop(c);
        t.fpn = clock.lap()?;
        {
            let _span = tracing::debug_span!("rpn").entered();
            self.rpn.forward(
                &features,
                batch.image_size,
                batch.padded,
                &mut ws.rpn,
                &mut ws.candidates,
                &mut ws.proposals,
            )?;
        }
        let proposals = &ws.proposals;
        t.rpn = clock.lap()?;

        // MultiScaleRoIAlign pools from P2..P5 only.
        let pyramid = &features[..4];
        let heads = &self.roi_heads;
        out.detections.clear();
        if !proposals.is_empty() {
            let pooled = {
                let _span = tracing::debug_span!("roi_align", rois = proposals.len()).entered();
                heads.box_roi_pool(pyramid, proposals, batch.image_size)?
            };
            t.roi_align = clock.lap()?;
            let _span = tracing::debug_span!("box_head").entered();
            let (logits, regression) = heads.box_predictor(&heads.box_head(&pooled)?)?;
            // Softmax, box decoding and NMS run on the host in f32, whatever the device computed.
            // Both outputs come back in one read: [P*K] logits then [P*4K] regression.
            let both = Tensor::cat(&[logits.flatten_all()?, regression.flatten_all()?], 0)?;
            let both: Vec<f32> = crate::device::read_vec1(&both.to_dtype(DType::F32)?)?;
            let (logits, regression) = both.split_at(logits.elem_count());
            heads.postprocess_detections(
                logits,
                regression,
                proposals,
                batch.image_size,
                &mut ws.candidates,
                &mut out.detections,
            );
            t.box_head = clock.lap()?;
        }
        let detections = &out.detections;

        let masked = detections.len().min(settings.max_masks);
        let probs = if masked == 0 {
            None
        } else {
            ws.mask_boxes.clear();
            ws.mask_boxes
                .extend(detections[..masked].iter().map(|d| d.bbox));
            ws.mask_labels.clear();
            ws.mask_labels
                .extend(detections[..masked].iter().map(|d| d.label));
            let pooled = {
                let _span = tracing::debug_span!("roi_align", rois = masked).entered();
                heads.mask_roi_pool(pyramid, &ws.mask_boxes, batch.image_size)?
            };
            t.roi_align += clock.lap()?;
            let _span = tracing::debug_span!("mask_head").entered();
            let probs = heads.mask_probs_from_pooled(&pooled, &ws.mask_labels)?;
            t.mask_head = clock.lap()?;
            Some(probs)
        };
        t.total = start.elapsed().as_secs_f64() * 1e3;
        out.mask_probs = probs;
        out.masked = masked;
        out.image_size = batch.image_size;
        out.original = batch.original;
        out.timings = t;
        Ok(())
    }
}

/// Milliseconds since the previous lap.
struct Lap<'a> {
    last: Instant,
    /// Waited for before reading the clock when stages are profiled: GPU work is queued
    /// asynchronously, so without it a stage's time lands in whichever later stage first reads
    /// back. Off by default, since each wait idles the GPU while the host catches up.
    device: Option<&'a Device>,
}

impl Lap<'_> {
    fn lap(&mut self) -> Result<f64> {
        if let Some(device) = self.device {
            crate::device::synchronize(device)?;
        }
        let now = Instant::now();
        let ms = (now - self.last).as_secs_f64() * 1e3;
        self.last = now;
        Ok(ms)
    }
}

pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}
