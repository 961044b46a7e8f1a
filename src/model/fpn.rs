//! torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool` (`ops/feature_pyramid_network.py`):
//! lateral 1×1 convs, nearest-neighbour top-down path, 3×3 output convs (each followed by a
//! BatchNorm in the v2 layout, folded at load), and P6 as a stride-2 subsample of P5.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::conv::{host_f32, FusedConv};
use super::layers::{Conv2d, ConvSpec};
use crate::error::Result;
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct Fpn {
    inner_blocks: Vec<Conv2d>,
    layer_blocks: Vec<Conv2d>,
    /// The same convs as host ops, on the CPU: `(inner, layer)`.
    cpu: Option<(Vec<FusedConv>, Vec<FusedConv>)>,
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
        let host = |convs: &[Conv2d]| -> Option<Vec<FusedConv>> {
            convs.iter().map(|c| c.cpu_op(false)).collect()
        };
        let cpu = host(&inner_blocks).zip(host(&layer_blocks));
        Ok(Self {
            inner_blocks,
            layer_blocks,
            cpu,
            channels,
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// C2..C5 → P2..P6 (torchvision's keys '0'..'3', 'pool').
    pub fn forward(&self, c: &[Tensor; 4]) -> Result<Vec<Tensor>> {
        if let Some((inner, layer)) = &self.cpu {
            return forward_on_host(inner, layer, c);
        }
        let mut last_inner = self.inner_blocks[3].forward(&c[3])?;
        let mut results = vec![self.layer_blocks[3].forward(&last_inner)?];
        for i in (0..3).rev() {
            let lateral = self.inner_blocks[i].forward(&c[i])?;
            let (_, _, h, w) = lateral.dims4()?;
            last_inner = (&lateral + last_inner.upsample_nearest2d(h, w)?)?;
            results.insert(0, self.layer_blocks[i].forward(&last_inner)?);
        }
        // F.max_pool2d(P5, kernel 1, stride 2): a plain stride-2 subsample.
        let p6 = results[3].max_pool2d_with_stride(1, 2)?;
        results.push(p6);
        Ok(results)
    }
}

/// [`Fpn::forward`] on the CPU: the convs run on host buffers, the top-down sum is added into
/// the lateral map in place ([`add_nearest`]), and only P2..P6 become tensors. As an op per
/// conv and per sum, the FPN made twelve tensors a frame, about five allocations each.
fn forward_on_host(
    inner: &[FusedConv],
    layer: &[FusedConv],
    c: &[Tensor; 4],
) -> Result<Vec<Tensor>> {
    let device = c[0].device();
    let c: Vec<Tensor> = c
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = c.iter().map(|t| t.storage_and_layout()).collect();
    let maps = guards
        .iter()
        .map(|(storage, layout)| Ok((host_f32(storage, layout, "fpn")?, layout.shape().dims4()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let lateral = |i: usize| -> Result<HostMap> {
        let (x, (n, ch, h, w)) = maps[i];
        if ch != inner[i].in_channels {
            let msg = format!(
                "fpn: C{} has {ch} channels, the FPN takes {}",
                i + 2,
                inner[i].in_channels
            );
            return Err(candle_core::Error::Msg(msg).into());
        }
        let (y, (oh, ow)) = inner[i].run_values(x, (n, h, w), None);
        Ok((y, (n, inner[i].out_channels, oh, ow)))
    };
    let output = |i: usize, x: &[f32], (n, _, h, w): (usize, usize, usize, usize)| {
        let (y, (oh, ow)) = layer[i].run_values(x, (n, h, w), None);
        Tensor::from_vec(y, (n, layer[i].out_channels, oh, ow), device)
    };
    let (mut last_inner, mut last_dims) = lateral(3)?;
    let mut results = Vec::with_capacity(5);
    results.push(output(3, &last_inner, last_dims)?);
    for i in (0..3).rev() {
        let (mut sum, dims) = lateral(i)?;
        add_nearest(&mut sum, dims, &last_inner, last_dims)?;
        results.insert(0, output(i, &sum, dims)?);
        (last_inner, last_dims) = (sum, dims);
    }
    // F.max_pool2d(P5, kernel 1, stride 2): a plain stride-2 subsample.
    let p6 = results[3].max_pool2d_with_stride(1, 2)?;
    results.push(p6);
    Ok(results)
}

/// A map on the host and its `[N, C, H, W]` shape.
type HostMap = (Vec<f32>, (usize, usize, usize, usize));

/// candle's `upsample_nearest2d` source index for output index `dst` (and torch's nearest
/// mode for these sizes), so the sum is exactly what the tensor ops give.
fn nearest(dst: usize, from: usize, to: usize) -> usize {
    ((dst as f64 * (from as f64 / to as f64)) as usize).min(from - 1)
}

/// `lateral += F.interpolate(coarser, size=lateral's, mode="nearest")`, in place: as tensor ops
/// the upsampled map was a tensor of its own, a full-size copy written and read again by the
/// add.
fn add_nearest(
    lateral: &mut [f32],
    (n, c, h, w): (usize, usize, usize, usize),
    coarser: &[f32],
    (cn, cc, ch, cw): (usize, usize, usize, usize),
) -> Result<()> {
    if (cn, cc) != (n, c) || ch == 0 || cw == 0 || lateral.len() != n * c * h * w {
        let msg = format!(
            "fpn top-down: lateral [{n}, {c}, {h}, {w}] and coarser [{cn}, {cc}, {ch}, {cw}] \
             do not pair"
        );
        return Err(candle_core::Error::Msg(msg).into());
    }
    let columns: Vec<usize> = (0..w).map(|x| nearest(x, cw, w)).collect();
    lateral
        .par_chunks_mut(w.max(1))
        .enumerate()
        .for_each(|(row, dst)| {
            let (plane, y) = (row / h, row % h);
            let src = &coarser[(plane * ch + nearest(y, ch, h)) * cw..][..cw];
            for (d, &x) in dst.iter_mut().zip(&columns) {
                *d += src[x];
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_place_top_down_matches_upsample_and_add() {
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
            let mut got: Vec<f32> = lateral.flatten_all().unwrap().to_vec1().unwrap();
            let c: Vec<f32> = coarser.flatten_all().unwrap().to_vec1().unwrap();
            add_nearest(&mut got, (2, 3, h, w), &c, (2, 3, ch, cw)).unwrap();
            let want = (&lateral + coarser.upsample_nearest2d(h, w).unwrap()).unwrap();
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let bits = |v: &[f32]| -> Vec<u32> { v.iter().map(|x| x.to_bits()).collect() };
            assert_eq!(bits(&got), bits(&want), "{h}×{w} from {ch}×{cw}");
        }
        // Maps that do not pair are refused, not read out of bounds.
        let mut lateral = vec![0f32; 2 * 3 * 4 * 4];
        let err = add_nearest(&mut lateral, (2, 3, 4, 4), &[0.0; 4], (1, 3, 2, 2)).unwrap_err();
        assert!(err.to_string().contains("do not pair"), "{err}");
    }

    /// The CPU's host FPN against the tensor ops GPUs run, both on the CPU: the same convs and
    /// sums in the same order, so the same bits.
    #[test]
    fn the_host_fpn_matches_the_tensor_ops() {
        let model = crate::model::fixture_model("tiny_r50");
        assert!(model.fpn.cpu.is_some());
        let tensor_ops = Fpn {
            cpu: None,
            ..model.fpn.clone()
        };
        let mut rng = crate::test_rng::TestRng::new(5);
        let (h, w) = (75, 61);
        let values: Vec<f32> = (0..3 * h * w).map(|_| rng.unit() * 2.0 - 1.0).collect();
        let x = Tensor::from_vec(values, (1, 3, h, w), &Device::Cpu).unwrap();
        let c = model.backbone.forward(&x).unwrap();
        let got = model.fpn.forward(&c).unwrap();
        let want = tensor_ops.forward(&c).unwrap();
        assert_eq!(got.len(), 5);
        for (level, (g, e)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.dims(), e.dims(), "P{}", level + 2);
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let e: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(g, e, "P{}", level + 2);
        }
    }
}
