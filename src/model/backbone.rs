//! torchvision's ResNet body (`torchvision/models/resnet.py`) up to C5, as
//! `backbone.body` in the detection models: stem → layer1..layer4, returning C2..C5.
//!
//! The depth and block type come from the weights: a `conv3` in the first block means
//! Bottleneck (ResNet-50/101/152), otherwise BasicBlock (ResNet-18/34); the number of blocks per
//! stage is counted from the keys. Stride sits on the 3×3 conv (ResNet v1.5), as in torchvision.

use candle_core::{Device, Tensor};

use super::layers::{Conv2d, ConvSpec};
use crate::error::Result;
use crate::weights::Weights;

const PREFIX: &str = "backbone.body";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

#[derive(Debug, Clone)]
struct Block {
    conv1: Conv2d,
    conv2: Conv2d,
    /// Bottleneck only.
    conv3: Option<Conv2d>,
    downsample: Option<Conv2d>,
}

impl Block {
    fn load(
        w: &Weights,
        prefix: &str,
        kind: BlockKind,
        in_channels: usize,
        stride: usize,
        eps: f32,
        device: &Device,
    ) -> Result<Self> {
        let conv_bn = |i: usize, spec: ConvSpec| {
            Conv2d::load_bn(
                w,
                &format!("{prefix}.conv{i}"),
                &format!("{prefix}.bn{i}"),
                spec,
                eps,
                device,
            )
        };
        let (conv1, conv2, conv3) = match kind {
            BlockKind::Bottleneck => {
                let conv1 = conv_bn(1, ConvSpec::new(in_channels, 1, 1, 0))?;
                let conv2 = conv_bn(2, ConvSpec::new(conv1.out_channels(), 3, stride, 1))?;
                let conv3 = conv_bn(3, ConvSpec::new(conv2.out_channels(), 1, 1, 0))?;
                (conv1, conv2, Some(conv3))
            }
            BlockKind::Basic => {
                let conv1 = conv_bn(1, ConvSpec::new(in_channels, 3, stride, 1))?;
                let conv2 = conv_bn(2, ConvSpec::new(conv1.out_channels(), 3, 1, 1))?;
                (conv1, conv2, None)
            }
        };
        let downsample = if w.contains(&format!("{prefix}.downsample.0.weight")) {
            Some(Conv2d::load_bn(
                w,
                &format!("{prefix}.downsample.0"),
                &format!("{prefix}.downsample.1"),
                ConvSpec::new(in_channels, 1, stride, 0),
                eps,
                device,
            )?)
        } else {
            None
        };
        let block = Self {
            conv1,
            conv2,
            conv3,
            downsample,
        };
        let out = block.out_channels();
        let skip = block
            .downsample
            .as_ref()
            .map_or(in_channels, Conv2d::out_channels);
        if out != skip || (block.downsample.is_none() && stride != 1) {
            return Err(w.architecture_error(format!(
                "block `{prefix}` outputs {out} channels but its shortcut carries {skip} at \
                 stride {stride}: a `downsample` is missing or has the wrong shape"
            )));
        }
        Ok(block)
    }

    fn out_channels(&self) -> usize {
        self.conv3.as_ref().unwrap_or(&self.conv2).out_channels()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let identity = match &self.downsample {
            Some(ds) => ds.forward(x)?,
            None => x.clone(),
        };
        let y = self.conv1.forward_relu(x)?;
        match &self.conv3 {
            Some(conv3) => conv3.forward_add_relu(&self.conv2.forward_relu(&y)?, &identity),
            None => self.conv2.forward_add_relu(&y, &identity),
        }
    }
}

/// ResNet body: `conv1`/`bn1` stem, 3×3/2 max-pool, four stages.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: Conv2d,
    stages: [Vec<Block>; 4],
    kind: BlockKind,
}

impl ResNet {
    pub fn load(w: &Weights, eps: f32, device: &Device) -> Result<Self> {
        let stem = Conv2d::load_bn(
            w,
            &format!("{PREFIX}.conv1"),
            &format!("{PREFIX}.bn1"),
            ConvSpec::new(3, 7, 2, 3),
            eps,
            device,
        )?;
        let kind = if w.contains(&format!("{PREFIX}.layer1.0.conv3.weight")) {
            BlockKind::Bottleneck
        } else {
            BlockKind::Basic
        };
        let mut channels = stem.out_channels();
        let mut stages: [Vec<Block>; 4] = Default::default();
        for (s, stage) in stages.iter_mut().enumerate() {
            let stride = if s == 0 { 1 } else { 2 };
            let mut b = 0;
            while w.contains(&format!("{PREFIX}.layer{}.{b}.conv1.weight", s + 1)) {
                let prefix = format!("{PREFIX}.layer{}.{b}", s + 1);
                let block_stride = if b == 0 { stride } else { 1 };
                let block = Block::load(w, &prefix, kind, channels, block_stride, eps, device)?;
                channels = block.out_channels();
                stage.push(block);
                b += 1;
            }
            if stage.is_empty() {
                // Names the first tensor the stage needs, so the error reads as a missing tensor.
                w.shape(&format!("{PREFIX}.layer{}.0.conv1.weight", s + 1))?;
            }
        }
        Ok(Self { stem, stages, kind })
    }

    pub fn block_kind(&self) -> BlockKind {
        self.kind
    }

    pub fn blocks_per_stage(&self) -> [usize; 4] {
        self.stages.each_ref().map(Vec::len)
    }

    /// Output channels of C2..C5.
    pub fn out_channels(&self) -> [usize; 4] {
        self.stages
            .each_ref()
            .map(|s| s.last().map_or(0, Block::out_channels))
    }

    /// torchvision's name for this depth, when the block counts are a standard one.
    pub fn depth_name(&self) -> String {
        let depth = match (self.kind, self.blocks_per_stage()) {
            (BlockKind::Basic, [2, 2, 2, 2]) => Some(18),
            (BlockKind::Basic, [3, 4, 6, 3]) => Some(34),
            (BlockKind::Bottleneck, [3, 4, 6, 3]) => Some(50),
            (BlockKind::Bottleneck, [3, 4, 23, 3]) => Some(101),
            (BlockKind::Bottleneck, [3, 8, 36, 3]) => Some(152),
            _ => None,
        };
        match depth {
            Some(d) => format!("ResNet-{d}"),
            None => format!(
                "ResNet ({:?}, blocks {:?})",
                self.kind,
                self.blocks_per_stage()
            ),
        }
    }

    /// Multiply-accumulates of one forward over an `h × w` input, for throughput reports.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let mut total = self.stem.macs(h, w);
        let (mut h, mut w) = (h.div_ceil(2).div_ceil(2), w.div_ceil(2).div_ceil(2));
        for (s, stage) in self.stages.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let (oh, ow) = (h.div_ceil(stride), w.div_ceil(stride));
                // conv1 of a Bottleneck runs before the stride, every other conv after it.
                total += match block.conv3 {
                    Some(ref c3) => {
                        block.conv1.macs(h, w) + block.conv2.macs(h, w) + c3.macs(oh, ow)
                    }
                    None => block.conv1.macs(h, w) + block.conv2.macs(oh, ow),
                };
                total += block.downsample.as_ref().map_or(0, |d| d.macs(h, w));
                (h, w) = (oh, ow);
            }
        }
        total
    }

    /// `[1, 3, H, W]` → C2..C5 at strides 4, 8, 16, 32.
    pub fn forward(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let x = self.stem.forward_relu(x)?;
        // max_pool2d(3, stride 2, padding 1). Inputs are post-ReLU (>= 0), so zero padding
        // selects exactly what torch's -inf padding does.
        let mut x = x
            .pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?;
        let mut out = Vec::with_capacity(4);
        for stage in &self.stages {
            for block in stage {
                x = block.forward(&x)?;
            }
            out.push(x.clone());
        }
        Ok(out.try_into().expect("four stages"))
    }
}
