//! torchvision's ResNet body (`torchvision/models/resnet.py`) up to C5, as
//! `backbone.body` in the detection models: stem → layer1..layer4, returning C2..C5.
//!
//! The depth and block type come from the weights: a `conv3` in the first block means
//! Bottleneck (ResNet-50/101/152), otherwise BasicBlock (ResNet-18/34); the number of blocks per
//! stage is counted from the keys. Stride sits on the 3×3 conv (ResNet v1.5), as in torchvision.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{contiguous_f32, FusedConv};
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

    /// The block as tensor ops, what GPUs run (the CPU runs [`StageOp`]).
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

    /// The whole block as one CPU op; `None` on other devices.
    fn cpu_op(&self) -> Option<BlockOp> {
        Some(BlockOp {
            conv1: self.conv1.cpu_op(true)?,
            conv2: self.conv2.cpu_op(true)?,
            conv3: match &self.conv3 {
                Some(c) => Some(c.cpu_op(true)?),
                None => None,
            },
            downsample: match &self.downsample {
                Some(d) => Some(d.cpu_op(false)?),
                None => None,
            },
        })
    }
}

/// A block on the CPU: its convs in turn on host buffers, the identity (or downsample) added
/// before the last ReLU. The maps between the convs are the stage's [`Maps`] (kept per thread
/// across frames instead, they raised peak RSS by 50–70 MB and slowed the backbone by about 5%).
#[derive(Debug, Clone)]
struct BlockOp {
    /// Each with the ReLU it is followed by.
    conv1: FusedConv,
    conv2: FusedConv,
    conv3: Option<FusedConv>,
    downsample: Option<FusedConv>,
}

/// The maps inside a block, reused by every block of a stage. One stage call's, freed when it
/// returns: the first block's are the stage's largest, so later blocks never reallocate.
#[derive(Default)]
struct Maps {
    y1: Vec<f32>,
    y2: Vec<f32>,
}

impl BlockOp {
    /// The block's output into `out` (its memory reused when large enough).
    fn run(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        Maps { y1, y2 }: &mut Maps,
        out: &mut Vec<f32>,
    ) {
        // Only a stage's first block downsamples, so its buffer is not worth keeping.
        let downsampled = self
            .downsample
            .as_ref()
            .map(|ds| ds.run_values(x, (n, h, w), None).0);
        let identity = downsampled.as_deref().unwrap_or(x);
        let (h1, w1) = self.conv1.run_into(x, (n, h, w), None, y1);
        match &self.conv3 {
            Some(conv3) => {
                let (h2, w2) = self.conv2.run_into(y1, (n, h1, w1), None, y2);
                conv3.run_into(y2, (n, h2, w2), Some(identity), out);
            }
            None => {
                self.conv2.run_into(y1, (n, h1, w1), Some(identity), out);
            }
        }
    }

    fn last(&self) -> &FusedConv {
        self.conv3.as_ref().unwrap_or(&self.conv2)
    }

    /// `(channels, height, width)` out of the block for `(c, h, w)` in, or why the block's
    /// convs and the residual add cannot take that input.
    fn output_shape(
        &self,
        (c, h, w): (usize, usize, usize),
    ) -> candle_core::Result<(usize, usize, usize)> {
        let (h1, w1) = self.conv1.output_size(h, w);
        let (oh, ow) = match &self.conv3 {
            Some(conv3) => {
                let (h2, w2) = self.conv2.output_size(h1, w1);
                conv3.output_size(h2, w2)
            }
            None => self.conv2.output_size(h1, w1),
        };
        // The identity must come out the size of the last conv's output.
        let identity = match &self.downsample {
            Some(ds) => (ds.out_channels, ds.output_size(h, w)),
            None => (c, (h, w)),
        };
        if c != self.conv1.in_channels || identity != (self.last().out_channels, (oh, ow)) {
            candle_core::bail!(
                "resnet-block: input [{c}, {h}, {w}] does not fit the block's convs"
            );
        }
        Ok((self.last().out_channels, oh, ow))
    }
}

/// A ResNet stage (`layer1`..`layer4`) on the CPU: its blocks in turn on host buffers, one
/// tensor out. As one op per block, a stage made a tensor per block, about five allocations
/// each; with a fresh buffer per map, three or four a block. Now blocks hand their outputs
/// back and forth between two buffers and share one [`Maps`]: five a stage.
#[derive(Debug, Clone)]
struct StageOp(Vec<BlockOp>);

impl CustomOp1 for StageOp {
    fn name(&self) -> &'static str {
        "resnet-stage"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (mut maps, mut y, mut next) = (Maps::default(), None::<Vec<f32>>, Vec::new());
        let mut shape = (c, h, w);
        for block in &self.0 {
            let out_shape = block.output_shape(shape)?;
            block.run(
                y.as_deref().unwrap_or(x),
                (n, shape.1, shape.2),
                &mut maps,
                &mut next,
            );
            // The output becomes the next block's input; the input's buffer its output's.
            next = y.replace(next).unwrap_or_default();
            shape = out_shape;
        }
        let out = y.unwrap_or_else(|| x.to_vec());
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, shape.0, shape.1, shape.2)),
        ))
    }
}

/// The stem's `max_pool2d(3, stride 2, padding 1)`. Its inputs are post-ReLU (>= 0), so zero
/// padding selects exactly what torch's -inf padding does. On the CPU one op reads the map once
/// and skips the padding; elsewhere it is two pads and candle's pool, each a copy of the map.
fn max_pool(x: &Tensor) -> Result<Tensor> {
    Ok(if x.device().is_cpu() {
        x.contiguous()?.apply_op1_no_bwd(&StemPool)?
    } else {
        x.pad_with_zeros(2, 1, 1)?
            .pad_with_zeros(3, 1, 1)?
            .max_pool2d_with_stride(3, 2)?
    })
}

/// [`max_pool`] on the CPU: each output the largest of its 3×3 window's values inside the map,
/// or 0 when the window reaches the padding (the zero torch's padding loses to).
struct StemPool;

impl CustomOp1 for StemPool {
    fn name(&self) -> &'static str {
        "stem-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut((oh * ow).max(1))
            .zip(x.par_chunks((h * w).max(1)))
            .for_each(|(dst, src)| {
                for (oy, row) in dst.chunks_exact_mut(ow.max(1)).enumerate() {
                    let ys = (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h);
                    let pad_y = 2 * oy == 0 || 2 * oy + 1 >= h;
                    for (ox, d) in row.iter_mut().enumerate() {
                        let xs = (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w);
                        let pad = pad_y || 2 * ox == 0 || 2 * ox + 1 >= w;
                        let mut m = if pad { 0.0 } else { f32::NEG_INFINITY };
                        for y in ys.clone() {
                            for v in &src[y * w + xs.start..y * w + xs.end] {
                                m = m.max(*v);
                            }
                        }
                        *d = m;
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }
}

/// ResNet body: `conv1`/`bn1` stem, 3×3/2 max-pool, four stages.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: Conv2d,
    stages: [Vec<Block>; 4],
    /// The stages as one op each, on the CPU.
    cpu_stages: Option<Vec<StageOp>>,
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
        let cpu_stages = stages
            .iter()
            .map(|stage| {
                stage
                    .iter()
                    .map(Block::cpu_op)
                    .collect::<Option<_>>()
                    .map(StageOp)
            })
            .collect();
        Ok(Self {
            stem,
            stages,
            cpu_stages,
            kind,
        })
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
        let mut x = max_pool(&x)?;
        let mut out = Vec::with_capacity(4);
        for (s, stage) in self.stages.iter().enumerate() {
            match &self.cpu_stages {
                Some(ops) => x = x.contiguous()?.apply_op1_no_bwd(&ops[s])?,
                None => {
                    for block in stage {
                        x = block.forward(&x)?;
                    }
                }
            }
            out.push(x.clone());
        }
        Ok(out.try_into().expect("four stages"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's stage ops against the blocks as tensor ops (what GPUs run), on the CPU, for
    /// Bottleneck and BasicBlock bodies: the same convs in the same order, so the same bits.
    /// The R101's and R18's stages have several blocks, which pass their buffers along.
    #[test]
    fn the_cpu_stages_match_the_blocks_as_tensor_ops() {
        for fixture in ["tiny_r50", "tiny_r101", "tiny_r18"] {
            let model = crate::model::fixture_model(fixture);
            let body = &model.backbone;
            assert!(body.cpu_stages.is_some());
            let tensor_ops = ResNet {
                cpu_stages: None,
                ..body.clone()
            };
            // Odd sides, so the strided blocks round down.
            let mut rng = crate::test_rng::TestRng::new(9);
            let (h, w) = (75, 61);
            let values: Vec<f32> = (0..3 * h * w).map(|_| rng.unit() * 2.0 - 1.0).collect();
            let x = Tensor::from_vec(values, (1, 3, h, w), &Device::Cpu).unwrap();
            let got = body.forward(&x).unwrap();
            let want = tensor_ops.forward(&x).unwrap();
            for (level, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.dims(), e.dims(), "{fixture} C{}", level + 2);
                let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                let e: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(g, e, "{fixture} C{}", level + 2);
            }
        }
    }

    #[test]
    fn the_cpu_stem_pool_matches_padding_and_candles_pool() {
        // Odd and even sides, a 1×1 map, zeros and ties: what a ReLU's output holds.
        for (i, &(h, w)) in [(7, 9), (8, 6), (1, 1), (2, 3), (5, 4)].iter().enumerate() {
            let mut rng = crate::test_rng::TestRng::new(i as u32);
            let values: Vec<f32> = (0..2 * 3 * h * w)
                .map(|_| (rng.unit() * 4.0 - 1.0).max(0.0).round())
                .collect();
            let x = Tensor::from_vec(values, (2, 3, h, w), &Device::Cpu).unwrap();
            let want = x
                .pad_with_zeros(2, 1, 1)
                .and_then(|x| x.pad_with_zeros(3, 1, 1))
                .and_then(|x| x.max_pool2d_with_stride(3, 2))
                .unwrap();
            let got = x.apply_op1_no_bwd(&StemPool).unwrap();
            assert_eq!(got.dims(), want.dims(), "{h}x{w}");
            let (got, want): (Vec<f32>, Vec<f32>) = (
                got.flatten_all().unwrap().to_vec1().unwrap(),
                want.flatten_all().unwrap().to_vec1().unwrap(),
            );
            assert_eq!(got, want, "{h}x{w}");
        }
    }
}
