//! torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool` (`ops/feature_pyramid_network.py`):
//! lateral 1×1 convs, nearest-neighbour top-down path, 3×3 output convs (each followed by a
//! BatchNorm in the v2 layout, folded at load), and P6 as a stride-2 subsample of P5.

use candle_core::{Device, Tensor};

use super::layers::{Conv2d, ConvSpec};
use crate::error::Result;
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct Fpn {
    inner_blocks: Vec<Conv2d>,
    layer_blocks: Vec<Conv2d>,
    channels: usize,
}

impl Fpn {
    /// `eps` is the BatchNorm epsilon of the v2 layout's normalised blocks.
    pub fn load(w: &Weights, in_channels: [usize; 4], eps: f32, device: &Device) -> Result<Self> {
        let mut inner_blocks = Vec::with_capacity(4);
        let mut layer_blocks = Vec::with_capacity(4);
        for (i, &c) in in_channels.iter().enumerate() {
            let inner = Conv2d::load_block(
                w,
                &format!("backbone.fpn.inner_blocks.{i}"),
                ConvSpec::new(c, 1, 1, 0),
                eps,
                device,
            )?;
            let layer = Conv2d::load_block(
                w,
                &format!("backbone.fpn.layer_blocks.{i}"),
                ConvSpec::new(inner.out_channels(), 3, 1, 1),
                eps,
                device,
            )?;
            inner_blocks.push(inner);
            layer_blocks.push(layer);
        }
        let channels = inner_blocks[0].out_channels();
        if let Some(odd) = inner_blocks
            .iter()
            .chain(&layer_blocks)
            .find(|c| c.out_channels() != channels)
        {
            return Err(w.architecture_error(format!(
                "FPN blocks disagree on width: {channels} and {}",
                odd.out_channels()
            )));
        }
        Ok(Self {
            inner_blocks,
            layer_blocks,
            channels,
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// C2..C5 → P2..P6 (torchvision's keys '0'..'3', 'pool').
    pub fn forward(&self, c: &[Tensor; 4]) -> Result<Vec<Tensor>> {
        let mut last_inner = self.inner_blocks[3].forward(&c[3])?;
        let mut results = vec![self.layer_blocks[3].forward(&last_inner)?];
        for i in (0..3).rev() {
            let lateral = self.inner_blocks[i].forward(&c[i])?;
            let (_, _, h, w) = lateral.dims4()?;
            let top_down = last_inner.upsample_nearest2d(h, w)?;
            last_inner = (lateral + top_down)?;
            results.insert(0, self.layer_blocks[i].forward(&last_inner)?);
        }
        // F.max_pool2d(P5, kernel 1, stride 2): a plain stride-2 subsample.
        let p6 = results[3].max_pool2d_with_stride(1, 2)?;
        results.push(p6);
        Ok(results)
    }
}
