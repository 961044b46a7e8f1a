//! torchvision's `RegionProposalNetwork` at inference (`models/detection/rpn.py`): the shared
//! `RPNHead` over every FPN level, then `filter_proposals` — top-n per level on the objectness
//! logits, decode, clip, drop tiny boxes, NMS per level, keep the best overall.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::anchors::LevelAnchors;
use super::box_ops::{self, Box, BoxCoder, Candidates};
use super::conv::{host_f32, scratch, FusedConv, Method};
use super::layers::{Conv2d, ConvSpec};
use super::sgemm::{self, PackedA};
use super::sigmoid;
use super::topk::{top_n_levels, top_n_slices, TopNScratch};
use crate::config::{Config, RPN_MIN_SIZE};
use crate::error::Result;
use crate::weights::Weights;

/// `RegionProposalNetwork`'s box coder weights.
const RPN_BOX_WEIGHTS: [f32; 4] = [1.0, 1.0, 1.0, 1.0];

thread_local! {
    /// [`HeadOp`]'s per-thread product of a run of columns (`[5A, columns]`), sized by the
    /// first level a thread sees and reused.
    static PRODUCT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Buffers the RPN reuses from frame to frame (the model's `Workspace` holds one): the
/// top-n's, each level's head output and the maps inside the head on the CPU, the levels'
/// grids, and the winners' deltas. On the CPU a frame allocates none of them once they have
/// grown.
#[derive(Debug, Default)]
pub struct RpnScratch {
    top_n: TopNScratch,
    heads: Vec<Vec<f32>>,
    maps: [Vec<f32>; 2],
    /// Each level's `(H, W)`.
    grids: Vec<(usize, usize)>,
    /// The winners' box deltas, level after level, four values each.
    deltas: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct Rpn {
    convs: Vec<Conv2d>,
    cls_logits: Conv2d,
    bbox_pred: Conv2d,
    /// The whole head as one op, on the CPU.
    cpu_head: Option<HeadOp>,
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
        let cpu_head = HeadOp::new(&convs, &cls_logits, &bbox_pred);
        Ok(Self {
            convs,
            cls_logits,
            bbox_pred,
            cpu_head,
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
    /// `scratch` and `cand` are reused buffers; the proposals replace `out`'s contents.
    pub fn forward(
        &self,
        features: &[Tensor],
        image_size: (usize, usize),
        padded: (usize, usize),
        scratch: &mut RpnScratch,
        cand: &mut Candidates,
        out: &mut Vec<Box>,
    ) -> Result<()> {
        cand.clear();
        match &self.cpu_head {
            Some(op) => self.winners_on_host(op, features, scratch)?,
            None => self.winners_on_device(features, scratch)?,
        }
        let mut level_deltas = scratch.deltas.chunks_exact(4);
        let levels = scratch.top_n.tops().iter().zip(&scratch.grids);
        for (level, (top, &grid)) in levels.enumerate() {
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

    /// Every level's pre-NMS winners (top-n objectness logits), each level's `(H, W)`, and the
    /// winners' box deltas, into `scratch`, as GPUs compute them: every level's head is
    /// enqueued before anything is read back, so the device runs them back to back instead of
    /// idling while the host waits for each level's top-n.
    fn winners_on_device(&self, features: &[Tensor], scratch: &mut RpnScratch) -> Result<()> {
        let mut logits = Vec::with_capacity(features.len());
        let mut deltas = Vec::with_capacity(features.len());
        scratch.grids.clear();
        for feature in features {
            let (_, _, h, w) = feature.dims4()?;
            let (l, d) = self.tensor_head(feature)?;
            logits.push(l);
            deltas.push(d);
            scratch.grids.push((h, w));
        }
        // The top-n runs on the device for all levels at once (see `topk`); only the
        // winners' logits and box deltas come to the host, where decoding and NMS run in f32
        // (the deltas are f16 on GPUs until here).
        top_n_levels(&logits, self.pre_nms_top_n, &mut scratch.top_n)?;
        let tops = scratch.top_n.tops();
        // One gather and one read of every level's winners' deltas: indices into the levels'
        // deltas stacked as [sum of H*W*A, 4].
        let mut winners = Vec::with_capacity(tops.iter().map(|t| t.indices.len()).sum());
        let mut offset = 0u32;
        for (top, d) in tops.iter().zip(&deltas) {
            winners.extend(top.indices.iter().map(|&i| offset + i));
            offset += d.dim(0)? as u32;
        }
        scratch.deltas = if winners.is_empty() {
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
        Ok(())
    }

    /// [`Self::winners_on_device`] on the CPU: each level's head written into one host buffer
    /// ([`HeadOp`]), the top-n run on its logits in place, and the winners' deltas copied
    /// straight out of it, all into `scratch`. As tensors (the head's output, its logits and
    /// deltas as views, the gather) a frame made about a hundred allocations more.
    fn winners_on_host(
        &self,
        op: &HeadOp,
        features: &[Tensor],
        scratch: &mut RpnScratch,
    ) -> Result<()> {
        let RpnScratch {
            top_n,
            heads,
            maps,
            grids,
            deltas,
        } = scratch;
        heads.resize_with(features.len(), Vec::new);
        grids.clear();
        for (feature, head) in features.iter().zip(heads.iter_mut()) {
            let feature = feature.contiguous()?;
            let (storage, layout) = feature.storage_and_layout();
            let x = host_f32(&storage, layout, "rpn head")?;
            let dims = layout.shape().dims4()?;
            op.run(x, dims, maps, head)?;
            grids.push((dims.2, dims.3));
        }
        let anchors = |&(h, w): &(usize, usize)| h * w * self.num_anchors;
        let logits: Vec<&[f32]> = heads
            .iter()
            .zip(grids.iter())
            .map(|(head, grid)| &head[..anchors(grid)])
            .collect();
        top_n_slices(&logits, self.pre_nms_top_n, top_n)?;
        deltas.clear();
        for ((top, head), grid) in top_n.tops().iter().zip(heads.iter()).zip(grids.iter()) {
            let level = &head[anchors(grid)..];
            for &i in &top.indices {
                deltas.extend_from_slice(&level[4 * i as usize..][..4]);
            }
        }
        // Counted as the GPU's one read of the winners' deltas, so the CPU pins its count.
        if !deltas.is_empty() {
            crate::device::count_read();
        }
        Ok(())
    }

    /// One level's `[H·W·A]` logits and `[H·W·A, 4]` box deltas, in the anchors' order, as
    /// tensor ops: what GPUs run, and the reference for [`HeadOp`].
    fn tensor_head(&self, feature: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut t = feature.clone();
        for conv in &self.convs {
            t = conv.forward_relu(&t)?;
        }
        let (_, _, h, w) = t.dims4()?;
        // [1, A, H, W] -> [H, W, A].
        let logits = self
            .cls_logits
            .forward(&t)?
            .permute((0, 2, 3, 1))?
            .flatten_all()?;
        // [1, 4A, H, W] -> [1, A, 4, H, W] -> [H, W, A, 4].
        let deltas = self
            .bbox_pred
            .forward(&t)?
            .reshape((1, self.num_anchors, 4, h, w))?
            .permute((0, 3, 4, 1, 2))?
            .reshape((h * w * self.num_anchors, 4))?;
        Ok((logits, deltas))
    }
}

/// One level's head on the CPU, [`Rpn::tensor_head`] on host buffers: the 3×3 conv(s), then
/// `cls_logits` and `bbox_pred` as one product of their stacked weights, written straight into
/// the anchors' order. Out comes one `[5·H·W·A]` buffer, the logits then the deltas. As tensor
/// ops a level made two conv outputs and two permuted copies, about 40 allocations; this makes
/// two.
#[derive(Debug, Clone)]
struct HeadOp {
    /// Each followed by its ReLU.
    convs: Vec<FusedConv>,
    /// `cls_logits`' `A` rows, then `bbox_pred`'s `4A`, over the head's channels.
    predictors: Arc<PackedA>,
    bias: Arc<Vec<f32>>,
    num_anchors: usize,
}

impl HeadOp {
    /// `None` on devices other than the CPU.
    fn new(convs: &[Conv2d], cls_logits: &Conv2d, bbox_pred: &Conv2d) -> Option<Self> {
        let convs = convs
            .iter()
            .map(|c| c.cpu_op(true))
            .collect::<Option<Vec<_>>>()?;
        let (cls, bbox) = (cls_logits.cpu_op(false)?, bbox_pred.cpu_op(false)?);
        // 1×1 convs keep PyTorch's `[out, in]` layout (only 3×3 ones go to Winograd).
        let (Method::Im2col(cw), Method::Im2col(bw)) = (&cls.method, &bbox.method) else {
            return None;
        };
        let channels = cls.in_channels;
        let rows = cls.out_channels + bbox.out_channels;
        let mut predictors = PackedA::zeroed(1, rows, channels);
        let at = predictors.packing();
        let dst = predictors.as_mut_ptr();
        for (i, &v) in cw.iter().chain(bw.iter()).enumerate() {
            // SAFETY: `offset` of a row below `rows` and a column below `channels` lies inside
            // the one packed matrix `zeroed` made.
            unsafe { *dst.add(at.offset(0, i / channels, i % channels)) = v };
        }
        Some(Self {
            convs,
            predictors: Arc::new(predictors),
            bias: Arc::new(cls.bias.iter().chain(bbox.bias.iter()).copied().collect()),
            num_anchors: cls.out_channels,
        })
    }

    /// The head over one `[1, C, H, W]` map `x`, `dims` its shape, into `out`; `maps` hold
    /// the convs' outputs. Each buffer's memory is reused when large enough.
    fn run(
        &self,
        x: &[f32],
        dims: (usize, usize, usize, usize),
        [even, odd]: &mut [Vec<f32>; 2],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (n, c, h, w) = dims;
        let channels = self.convs.first().map_or(c, |conv| conv.in_channels);
        if n != 1 || c != channels || x.len() != c * h * w {
            let msg =
                format!("rpn head: input [{n}, {c}, {h}, {w}] is not one {channels}-channel map");
            return Err(candle_core::Error::Msg(msg).into());
        }
        // The convs are 3×3 with padding 1: every map keeps the level's size. Conv i writes
        // the even or odd map and reads the other (or `x`).
        for (i, conv) in self.convs.iter().enumerate() {
            let (src, dst) = if i % 2 == 0 {
                (&*odd, &mut *even)
            } else {
                (&*even, &mut *odd)
            };
            conv.run_into(if i == 0 { x } else { src }, (1, h, w), None, dst);
        }
        let last = match self.convs.len() {
            0 => x,
            n if n % 2 == 1 => even,
            _ => odd,
        };
        self.predict(last, h * w, out);
        Ok(())
    }

    /// Both predictors over the `[C, plane]` features `x`: `[plane·A]` logits then
    /// `[plane·A, 4]` deltas.
    fn predict(&self, x: &[f32], plane: usize, out: &mut Vec<f32>) {
        let a = self.num_anchors;
        let rows = 5 * a;
        out.clear();
        out.resize(rows * plane, 0.0);
        if plane == 0 {
            return;
        }
        let (logits, deltas) = out.split_at_mut(a * plane);
        // Runs of whole kernel panels, one per thread.
        let columns = plane
            .div_ceil(rayon::current_num_threads().max(1))
            .next_multiple_of(sgemm::panel_width());
        logits
            .par_chunks_mut(columns * a)
            .zip(deltas.par_chunks_mut(columns * 4 * a))
            .enumerate()
            .for_each(|(run, (logits, deltas))| {
                let (p0, n) = (run * columns, logits.len() / a);
                PRODUCT.with_borrow_mut(|product| {
                    let y = scratch(product, rows * n);
                    // SAFETY: `x` holds the matrix's `in_channels` rows of `plane` values, of
                    // which columns p0..p0 + n exist; `y` holds `rows` rows of `n`; both are
                    // this job's alone.
                    unsafe {
                        self.predictors.mul(
                            0,
                            x.as_ptr().add(p0),
                            plane,
                            n,
                            y.as_mut_ptr(),
                            n,
                            false,
                        )
                    };
                    for p in 0..n {
                        for k in 0..a {
                            logits[p * a + k] = y[k * n + p] + self.bias[k];
                            for j in 0..4 {
                                let row = a + 4 * k + j;
                                deltas[(p * a + k) * 4 + j] = y[row * n + p] + self.bias[row];
                            }
                        }
                    }
                });
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's winners (head into host buffers, top-n in place, deltas copied out) against
    /// the GPUs' composition (tensor head, top-n op, gather), both run on the CPU. The CPU's
    /// scratch first held a larger frame with six levels, as a stream's would.
    #[test]
    fn the_host_winners_match_the_device_composition() {
        let model = crate::model::fixture_model("tiny_r50");
        let mut rpn = model.rpn.clone();
        rpn.pre_nms_top_n = 40;
        let op = rpn.cpu_head.clone().expect("a CPU head on the CPU");
        let channels = model.fpn.channels();
        let levels = |grids: &[(usize, usize)], seed: u32| -> Vec<Tensor> {
            grids
                .iter()
                .enumerate()
                .map(|(i, &(h, w))| {
                    let mut rng = crate::test_rng::TestRng::new(seed + i as u32);
                    let values: Vec<f32> = (0..channels * h * w)
                        .map(|_| rng.unit() * 2.0 - 1.0)
                        .collect();
                    Tensor::from_vec(values, (1, channels, h, w), &Device::Cpu).unwrap()
                })
                .collect()
        };
        let mut host = RpnScratch::default();
        let larger = levels(&[(32, 24), (16, 12), (8, 6), (4, 3), (2, 2), (1, 1)], 7);
        rpn.winners_on_host(&op, &larger, &mut host).unwrap();
        let features = levels(&[(16, 20), (8, 10), (4, 5), (2, 3), (1, 1)], 50);
        rpn.winners_on_host(&op, &features, &mut host).unwrap();
        let mut device = RpnScratch::default();
        rpn.winners_on_device(&features, &mut device).unwrap();
        let (tops, want_tops) = (host.top_n.tops(), device.top_n.tops());
        let (deltas, want_deltas) = (&host.deltas, &device.deltas);
        assert_eq!(host.grids, device.grids);
        assert_eq!(tops.len(), want_tops.len());
        // Level 4 has 3 anchors, fewer than the top-n: all of them, best first.
        let counts: Vec<usize> = tops.iter().map(|t| t.indices.len()).collect();
        assert_eq!(counts, [40, 40, 40, 18, 3]);
        for (level, (got, want)) in tops.iter().zip(want_tops).enumerate() {
            assert_eq!(got.indices, want.indices, "level {level}");
            for (g, e) in got.values.iter().zip(&want.values) {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "level {level}: {g} vs {e}"
                );
            }
        }
        assert_eq!(deltas.len(), want_deltas.len());
        for (g, e) in deltas.iter().zip(want_deltas) {
            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{g} vs {e}");
        }
    }

    /// The CPU head against the tensor ops, for a v1 head (one conv) and a v2 one (two).
    #[test]
    fn the_cpu_head_matches_the_tensor_ops() {
        for fixture in ["tiny_r50", "tiny_v2"] {
            let model = crate::model::fixture_model(fixture);
            let rpn = &model.rpn;
            let mut op = rpn.cpu_head.clone().expect("a CPU head on the CPU");
            // The fixture's predictor biases are zero, as torchvision initialises them: give the op
            // others and add them to the tensor ops' output below, so each must land on its row.
            let a = rpn.num_anchors;
            let bias: Vec<f32> = (0..5 * a).map(|r| 0.25 * r as f32 - 1.0).collect();
            op.bias = Arc::new(bias.clone());
            let channels = model.fpn.channels();
            // Ragged sizes: columns that end mid-panel, a single pixel, more columns than one
            // thread's run. The buffers carry over from size to size, as from frame to frame.
            let (mut maps, mut got) = Default::default();
            for (i, &(h, w)) in [(13, 11), (1, 1), (7, 40), (64, 70), (5, 3)]
                .iter()
                .enumerate()
            {
                let mut rng = crate::test_rng::TestRng::new(i as u32);
                let values: Vec<f32> = (0..channels * h * w)
                    .map(|_| rng.unit() * 2.0 - 1.0)
                    .collect();
                op.run(&values, (1, channels, h, w), &mut maps, &mut got)
                    .unwrap();
                let x = Tensor::from_vec(values, (1, channels, h, w), &Device::Cpu).unwrap();
                let (logits, deltas) = rpn.tensor_head(&x).unwrap();
                let mut want: Vec<f32> = logits.to_vec1().unwrap();
                want.iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v += bias[i % a]);
                let deltas: Vec<f32> = deltas.flatten_all().unwrap().to_vec1().unwrap();
                want.extend(
                    deltas
                        .iter()
                        .enumerate()
                        .map(|(i, v)| v + bias[a + i % (4 * a)]),
                );
                assert_eq!(got.len(), want.len(), "{h}×{w}");
                for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{fixture} {h}×{w} value {j}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
