//! torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool` (`ops/feature_pyramid_network.py`):
//! lateral 1×1 convs, nearest-neighbour top-down path, 3×3 output convs (each followed by a
//! BatchNorm in the v2 layout, folded at load), and P6 as a stride-2 subsample of P5.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::contiguous_f32;
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
            last_inner = top_down(&lateral, &last_inner)?;
            results.insert(0, self.layer_blocks[i].forward(&last_inner)?);
        }
        // F.max_pool2d(P5, kernel 1, stride 2): a plain stride-2 subsample.
        let p6 = results[3].max_pool2d_with_stride(1, 2)?;
        results.push(p6);
        Ok(results)
    }
}

/// `lateral + F.interpolate(coarser, size=lateral's, mode="nearest")`. On the CPU one pass
/// ([`TopDown`]); elsewhere candle's upsample and an add.
fn top_down(lateral: &Tensor, coarser: &Tensor) -> Result<Tensor> {
    if lateral.device().is_cpu() {
        return Ok(lateral
            .contiguous()?
            .apply_op2_no_bwd(&coarser.contiguous()?, &TopDown)?);
    }
    let (_, _, h, w) = lateral.dims4()?;
    Ok((lateral + coarser.upsample_nearest2d(h, w)?)?)
}

/// The top-down sum in one pass over the output: as tensor ops the upsampled map was a tensor
/// of its own, a full-size copy written and then read again by the add.
struct TopDown;

/// candle's `upsample_nearest2d` source index for output index `dst` (and torch's nearest
/// mode for these sizes), so the op adds exactly what the tensor ops did.
fn nearest(dst: usize, from: usize, to: usize) -> usize {
    ((dst as f64 * (from as f64 / to as f64)) as usize).min(from - 1)
}

impl CustomOp2 for TopDown {
    fn name(&self) -> &'static str {
        "fpn-top-down"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let lateral = contiguous_f32(s1, l1, self.name())?;
        let coarser = contiguous_f32(s2, l2, self.name())?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (cn, cc, ch, cw) = l2.shape().dims4()?;
        if (cn, cc) != (n, c) || ch == 0 || cw == 0 {
            candle_core::bail!(
                "fpn-top-down: lateral [{n}, {c}, {h}, {w}] and coarser [{cn}, {cc}, {ch}, {cw}] \
                 do not pair"
            );
        }
        let columns: Vec<usize> = (0..w).map(|x| nearest(x, cw, w)).collect();
        let len = lateral.len();
        // Uninitialised: every row below writes all its values.
        let mut out = Vec::<f32>::with_capacity(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(w.max(1))
            .zip(lateral.par_chunks(w.max(1)))
            .enumerate()
            .for_each(
                |(row, (dst, lateral)): (usize, (&mut [MaybeUninit<f32>], &[f32]))| {
                    let (plane, y) = (row / h, row % h);
                    let src = &coarser[(plane * ch + nearest(y, ch, h)) * cw..][..cw];
                    for ((d, &l), &x) in dst.iter_mut().zip(lateral).zip(&columns) {
                        d.write(l + src[x]);
                    }
                },
            );
        // SAFETY: the rows above cover all `n * c * h` rows of `w` values, each written.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_top_down_matches_upsample_and_add() {
        // Even and odd sides (a coarser map of ceil(side / 2)), and a 1×1 coarser map.
        for (i, &((h, w), (ch, cw))) in [((8, 6), (4, 3)), ((13, 11), (7, 6)), ((5, 7), (1, 1))]
            .iter()
            .enumerate()
        {
            let mut rng = crate::test_rng::TestRng::new(i as u32);
            let mut map = |shape: (usize, usize, usize, usize)| {
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                let v: Vec<f32> = (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect();
                Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
            };
            let (lateral, coarser) = (map((2, 3, h, w)), map((2, 3, ch, cw)));
            let got = top_down(&lateral, &coarser).unwrap();
            let want = (&lateral + coarser.upsample_nearest2d(h, w).unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let bits = |t: &Tensor| -> Vec<u32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v.iter().map(|x| x.to_bits()).collect()
            };
            assert_eq!(bits(&got), bits(&want), "{h}×{w} from {ch}×{cw}");
        }
    }
}
