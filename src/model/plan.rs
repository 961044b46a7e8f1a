//! A device-memory plan for one frame, computed from shapes alone (no GPU): what a CUDA or
//! Metal device must hold to run a model at a given input size, so a board can be sized before
//! it is bought.
//!
//! ```text
//! drape inspect weights.safetensors --plan cuda --min-size 800 --max-size 1333 --json
//! ```
//!
//! The walk follows the forward pass op by op in the device's dtype (f16) and keeps a running
//! total of live tensors: weights (BatchNorm folded), the input, every stage's activations while
//! something still reads them, and each op's output beside its inputs; a conv adds its tile
//! working set ([`ConvGeometry::scratch_bytes`]). The frame is the worst case the sizes allow
//! (a `min × max` image, padded to 32), the RoI heads run on every proposal
//! (`rpn_post_nms_top_n`) and every detection (`detections_per_img`), and on CUDA each mask
//! pastes a full frame. candle frees a tensor when its last use drops it, and the stream-ordered
//! pool reuses freed blocks, so the pool's high-water mark stays at or below this figure.

use std::fmt;
use std::str::FromStr;

use candle_core::DType;
use serde::Serialize;

use super::backbone::BlockKind;
use super::gpu_conv::ConvGeometry;
use super::roi_heads::MASK_SIZE;
use super::transform::Transform;
use super::MaskRcnn;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// The device a plan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanTarget {
    Cuda,
    Metal,
}

impl FromStr for PlanTarget {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cuda" => Ok(PlanTarget::Cuda),
            "metal" => Ok(PlanTarget::Metal),
            _ => Err(Error::Config(format!(
                "plan target {s:?}: expected `cuda` or `metal`"
            ))),
        }
    }
}

impl fmt::Display for PlanTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlanTarget::Cuda => "cuda",
            PlanTarget::Metal => "metal",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    pub target: PlanTarget,
    /// The activations' dtype on the device.
    pub dtype: &'static str,
    /// [w, h] of the padded model input the plan assumes (the worst case of the sizes).
    pub input_size: [usize; 2],
    pub weights_bytes: u64,
    /// Weights plus live activations plus scratch at the frame's worst moment.
    pub peak_device_bytes: u64,
    /// The op at that moment.
    pub peak_at: String,
    /// The largest single conv working set (im2col tile or GEMM output before its bias).
    pub largest_scratch_bytes: u64,
    pub largest_scratch_at: String,
    /// Layers whose folded weights exceed f16's range, kept f32 on the device.
    pub f32_layers: Vec<String>,
}

/// Plans `model` (loaded from `w`, on any device) for `target` at `min_size`/`max_size`.
pub fn plan(
    w: &Weights,
    model: &MaskRcnn,
    target: PlanTarget,
    min_size: usize,
    max_size: usize,
) -> Result<DevicePlan> {
    let dtype = DType::F16;
    let f32_layers = model.beyond_f16().to_vec();
    let weights_bytes = weight_bytes(w, &f32_layers, dtype)?;
    let (ph, pw) = Transform::padded_size((min_size.min(max_size), max_size));
    let mut walk = Walk {
        elem: dtype.size_in_bytes() as u64,
        live: weights_bytes,
        peak: weights_bytes,
        peak_at: "weights".into(),
        scratch: 0,
        scratch_at: String::new(),
    };
    let features = walk.backbone_and_fpn(w, model, (ph, pw))?;
    walk.rpn(w, model, &features)?;
    walk.heads(w, model, &features, (ph, pw), target)?;
    Ok(DevicePlan {
        target,
        dtype: "f16",
        input_size: [pw, ph],
        weights_bytes,
        peak_device_bytes: walk.peak,
        peak_at: walk.peak_at,
        largest_scratch_bytes: walk.scratch,
        largest_scratch_at: walk.scratch_at,
        f32_layers,
    })
}

/// Device bytes of the weights after BatchNorm folding: a BatchNorm's weight, running mean and
/// variance fold into the conv before it and only its bias stays (as the conv's bias).
fn weight_bytes(w: &Weights, f32_layers: &[String], dtype: DType) -> Result<u64> {
    let elem = dtype.size_in_bytes() as u64;
    let mut bytes = 0u64;
    for name in w.names() {
        let folded_away = ["running_mean", "running_var", "num_batches_tracked"]
            .iter()
            .any(|leaf| name.ends_with(leaf))
            || name
                .strip_suffix(".weight")
                .is_some_and(|bn| w.contains(&format!("{bn}.running_var")));
        if folded_away {
            continue;
        }
        let count = w.shape(name)?.iter().product::<usize>() as u64;
        let layer = name.rsplit_once('.').map_or(name, |(layer, _)| layer);
        let layer = match w.contains(&format!("{layer}.running_var")) {
            true => folded_into(layer),
            false => layer.to_string(),
        };
        let kept_f32 = f32_layers.contains(&layer);
        // The mask logits' bias is always f32 (added after the logits are widened).
        let f32_bias = name == "roi_heads.mask_predictor.mask_fcn_logits.bias";
        bytes += count * if kept_f32 || f32_bias { 4 } else { elem };
    }
    Ok(bytes)
}

/// The conv a BatchNorm at `bn` folds into, named as the loader names layers: `…bnN` follows
/// `…convN` (ResNet blocks), `….1` follows `….0` (`downsample` and `Conv2dNormActivation`).
fn folded_into(bn: &str) -> String {
    match bn.rsplit_once('.') {
        Some((parent, "1")) => format!("{parent}.0"),
        Some((parent, leaf)) if leaf.starts_with("bn") => {
            format!("{parent}.conv{}", &leaf[2..])
        }
        _ => bn.to_string(),
    }
}

/// One FPN level: (bytes, channels, h, w).
type Level = (u64, usize, usize, usize);

/// The running total of a frame's device memory.
struct Walk {
    elem: u64,
    live: u64,
    peak: u64,
    peak_at: String,
    scratch: u64,
    scratch_at: String,
}

impl Walk {
    fn act(&self, dims: &[usize]) -> u64 {
        dims.iter().product::<usize>() as u64 * self.elem
    }

    fn alloc(&mut self, bytes: u64) {
        self.live += bytes;
    }

    fn free(&mut self, bytes: u64) {
        self.live -= bytes;
    }

    /// `extra` bytes alive on top of the live set for a moment, at `at`.
    fn touch(&mut self, extra: u64, at: &str) {
        if self.live + extra > self.peak {
            self.peak = self.live + extra;
            self.peak_at = at.to_string();
        }
    }

    /// A conv whose input is live: its output and tile working set beside it, then `post`
    /// elementwise ops (residual add, ReLU) each writing a new tensor. Leaves the output live
    /// and returns (bytes, channels, h, w).
    fn conv(
        &mut self,
        g: ConvGeometry,
        name: &str,
        n: usize,
        hw: (usize, usize),
        post: usize,
    ) -> Level {
        let (oh, ow) = g.output_size(hw.0, hw.1);
        let out = self.act(&[n, g.out_channels, oh, ow]);
        let scratch = g.scratch_bytes(n, hw.0, hw.1, DType::F16) as u64;
        if scratch > self.scratch {
            self.scratch = scratch;
            self.scratch_at = name.to_string();
        }
        self.touch(out + scratch, name);
        self.alloc(out);
        for _ in 0..post {
            self.touch(out, name);
        }
        (out, g.out_channels, oh, ow)
    }

    /// A fully connected layer over `rows`: matmul, bias and ReLU each write a new tensor.
    fn linear(&mut self, name: &str, rows: usize, out_features: usize) -> u64 {
        let out = self.act(&[rows, out_features]);
        self.touch(2 * out, name);
        self.alloc(out);
        out
    }

    /// Stem, max-pool, four stages, FPN: P2..P6 stay live, everything else is freed.
    fn backbone_and_fpn(
        &mut self,
        w: &Weights,
        model: &MaskRcnn,
        (ph, pw): (usize, usize),
    ) -> Result<Vec<Level>> {
        let arch = model.architecture();
        // The image is uploaded in f32 and cast on the device.
        let upload = 3 * (ph * pw) as u64 * 4;
        let input = self.act(&[3, ph, pw]);
        self.touch(upload + input, "preprocess");
        self.alloc(input);
        let b = "backbone.body";
        let stem = geometry(w, &format!("{b}.conv1"), 2, 3)?;
        let (s_bytes, c, h, wd) = self.conv(stem, "backbone.body.conv1", 1, (ph, pw), 1);
        self.free(input);
        // Max-pool 3×3/2 after zero padding on each side (two padded copies).
        let padded = self.act(&[c, h + 2, wd + 2]);
        let (h, wd) = ((h + 2 - 3) / 2 + 1, (wd + 2 - 3) / 2 + 1);
        let pooled = self.act(&[c, h, wd]);
        self.touch(2 * padded + pooled, "backbone.maxpool");
        self.alloc(pooled);
        self.free(s_bytes);

        let mut x: Level = (pooled, c, h, wd);
        let mut stage_outputs: Vec<Level> = Vec::with_capacity(4);
        for (s, &blocks) in arch.blocks_per_stage.iter().enumerate() {
            for i in 0..blocks {
                let p = format!("{b}.layer{}.{i}", s + 1);
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let hw = (x.2, x.3);
                let identity = match w.contains(&format!("{p}.downsample.0.weight")) {
                    true => {
                        let g = geometry(w, &format!("{p}.downsample.0"), stride, 0)?;
                        Some(self.conv(g, &format!("{p}.downsample"), 1, hw, 0).0)
                    }
                    false => None,
                };
                let out = match model.backbone.block_kind() {
                    BlockKind::Bottleneck => {
                        let g1 = geometry(w, &format!("{p}.conv1"), 1, 0)?;
                        let y1 = self.conv(g1, &format!("{p}.conv1"), 1, hw, 1);
                        let g2 = geometry(w, &format!("{p}.conv2"), stride, 1)?;
                        let y2 = self.conv(g2, &format!("{p}.conv2"), 1, (y1.2, y1.3), 1);
                        self.free(y1.0);
                        let g3 = geometry(w, &format!("{p}.conv3"), 1, 0)?;
                        let y3 = self.conv(g3, &format!("{p}.conv3"), 1, (y2.2, y2.3), 2);
                        self.free(y2.0);
                        y3
                    }
                    BlockKind::Basic => {
                        let g1 = geometry(w, &format!("{p}.conv1"), stride, 1)?;
                        let y1 = self.conv(g1, &format!("{p}.conv1"), 1, hw, 1);
                        let g2 = geometry(w, &format!("{p}.conv2"), 1, 1)?;
                        let y2 = self.conv(g2, &format!("{p}.conv2"), 1, (y1.2, y1.3), 2);
                        self.free(y1.0);
                        y2
                    }
                };
                if let Some(bytes) = identity {
                    self.free(bytes);
                }
                // A stage's last output is kept for the FPN; anything else dies here.
                let kept = i == 0 && s > 0;
                if !kept {
                    self.free(x.0);
                }
                x = out;
            }
            stage_outputs.push(x);
        }

        // FPN, top-down from C5; the C's die after it.
        let f = "backbone.fpn";
        let inner = |i: usize| geometry(w, &format!("{f}.inner_blocks.{i}.0"), 1, 0);
        let layer = |i: usize| geometry(w, &format!("{f}.layer_blocks.{i}.0"), 1, 1);
        let c5 = stage_outputs[3];
        let mut last_inner = self.conv(inner(3)?, "fpn.inner_blocks.3", 1, (c5.2, c5.3), 0);
        let mut results = vec![self.conv(
            layer(3)?,
            "fpn.layer_blocks.3",
            1,
            (last_inner.2, last_inner.3),
            0,
        )];
        for i in (0..3).rev() {
            let ci = stage_outputs[i];
            let lateral = self.conv(
                inner(i)?,
                &format!("fpn.inner_blocks.{i}"),
                1,
                (ci.2, ci.3),
                0,
            );
            // Upsampled top-down path, then the sum, beside the lateral.
            self.touch(2 * lateral.0, "fpn.top_down");
            self.alloc(lateral.0);
            self.free(lateral.0);
            self.free(last_inner.0);
            last_inner = lateral;
            let name = format!("fpn.layer_blocks.{i}");
            results.insert(0, self.conv(layer(i)?, &name, 1, (lateral.2, lateral.3), 0));
        }
        self.free(last_inner.0);
        let p5 = results[3];
        let p6 = self.act(&[p5.1, p5.2.div_ceil(2), p5.3.div_ceil(2)]);
        self.alloc(p6);
        results.push((p6, p5.1, p5.2.div_ceil(2), p5.3.div_ceil(2)));
        for c in stage_outputs {
            self.free(c.0);
        }
        Ok(results)
    }

    /// Every level's head enqueued before the top-n: logits and deltas of all levels live at
    /// once, then one gather of the winners' deltas.
    fn rpn(&mut self, w: &Weights, model: &MaskRcnn, features: &[Level]) -> Result<()> {
        let mut kept = 0;
        let mut all_deltas = 0;
        for (level, &(_, _, h, wd)) in features.iter().enumerate() {
            let mut t: Option<Level> = None;
            let mut j = 0;
            while w.contains(&format!("rpn.head.conv.{j}.0.weight")) {
                let g = geometry(w, &format!("rpn.head.conv.{j}.0"), 1, 1)?;
                let y = self.conv(g, &format!("rpn.head.conv level {level}"), 1, (h, wd), 1);
                if let Some(prev) = t.replace(y) {
                    self.free(prev.0);
                }
                j += 1;
            }
            let t = t.unwrap_or((0, model.fpn.channels(), h, wd));
            for head in ["cls_logits", "bbox_pred"] {
                let g = geometry(w, &format!("rpn.head.{head}"), 1, 0)?;
                let y = self.conv(g, &format!("rpn.head.{head}"), 1, (h, wd), 0);
                // Permuted to the anchors' order: a copy, then the conv's output dies.
                self.touch(y.0, "rpn.permute");
                kept += y.0;
                if head == "bbox_pred" {
                    all_deltas += y.0;
                }
            }
            self.free(t.0);
        }
        // The deltas stacked for the one gather (the winners themselves are small).
        self.touch(all_deltas, "rpn.deltas");
        self.free(kept);
        Ok(())
    }

    /// RoIAlign's `[rois, channels, size, size]` output, then a head's conv stack (`{prefix}.{i}.0`:
    /// v2's box head, the mask head). Returns the last output and how many convs there were.
    fn pooled_convs(
        &mut self,
        w: &Weights,
        prefix: &str,
        (rois, channels, size): (usize, usize, usize),
    ) -> Result<(Level, usize)> {
        let pooled = self.act(&[rois, channels, size, size]);
        self.alloc(pooled);
        let mut x: Level = (pooled, channels, size, size);
        let mut i = 0;
        while w.contains(&format!("{prefix}.{i}.0.weight")) {
            let g = geometry(w, &format!("{prefix}.{i}.0"), 1, 1)?;
            let y = self.conv(g, &format!("{prefix}.{i}"), rois, (x.2, x.3), 1);
            self.free(x.0);
            x = y;
            i += 1;
        }
        Ok((x, i))
    }

    /// Box head on every proposal, mask head on every detection, and the paste.
    fn heads(
        &mut self,
        w: &Weights,
        model: &MaskRcnn,
        features: &[Level],
        (ph, pw): (usize, usize),
        target: PlanTarget,
    ) -> Result<()> {
        let cfg = model.config();
        let arch = model.architecture();
        let c = arch.fpn_channels;
        let r = cfg.rpn_post_nms_top_n;
        let (x, i) = self.pooled_convs(w, "roi_heads.box_head", (r, c, 7))?;
        // v1's fc6/fc7, or v2's Linears at every other index after its convs and Flatten.
        let mut fcs = Vec::new();
        if w.contains("roi_heads.box_head.fc6.weight") {
            fcs.extend(["fc6", "fc7"].map(|n| format!("roi_heads.box_head.{n}")));
        } else {
            let mut index = i + 1;
            while w.contains(&format!("roi_heads.box_head.{index}.weight")) {
                fcs.push(format!("roi_heads.box_head.{index}"));
                index += 2;
            }
        }
        let mut fc_in = x.0;
        for name in &fcs {
            let out_features = w.shape(&format!("{name}.weight"))?[0];
            let out = self.linear(name, r, out_features);
            self.free(fc_in);
            fc_in = out;
        }
        let k = arch.num_classes;
        // Class logits and regression, then both widened to f32 and concatenated for the read.
        let predicted = self.act(&[r, 5 * k]);
        self.touch(
            predicted + 2 * (r * 5 * k * 4) as u64,
            "roi_heads.box_predictor",
        );
        self.free(fc_in);

        let d = cfg.detections_per_img;
        let (x, _) = self.pooled_convs(w, "roi_heads.mask_head", (d, c, 14))?;
        // conv5_mask as a GEMM: permuted input, output, +bias, ReLU; then the class's logits
        // on a permuted copy, the widened f32 probabilities.
        let deconv_out = w.shape("roi_heads.mask_predictor.conv5_mask.weight")?[1];
        let deconv = self.act(&[d, deconv_out, MASK_SIZE, MASK_SIZE]);
        self.touch(x.0 + 2 * deconv, "roi_heads.mask_predictor.conv5_mask");
        self.alloc(deconv);
        self.free(x.0);
        let probs = (d * MASK_SIZE * MASK_SIZE * 4) as u64;
        self.touch(
            deconv + 3 * probs,
            "roi_heads.mask_predictor.mask_fcn_logits",
        );
        self.free(deconv);
        self.alloc(probs);
        if target == PlanTarget::Cuda {
            // Worst case: every mask covers the whole frame at model size.
            self.touch((d * ph * pw) as u64, "paste");
        }
        self.free(probs);
        let features_bytes: u64 = features.iter().map(|l| l.0).sum();
        self.free(features_bytes);
        Ok(())
    }
}

/// The conv `{prefix}.weight` (`[O, C, k, k]`) at `stride` and `padding`.
fn geometry(w: &Weights, prefix: &str, stride: usize, padding: usize) -> Result<ConvGeometry> {
    let name = format!("{prefix}.weight");
    match *w.shape(&name)? {
        [o, c, k, _] => Ok(ConvGeometry {
            in_channels: c,
            out_channels: o,
            kernel: k,
            stride,
            padding,
        }),
        ref other => Err(Error::Shape {
            path: w.path().to_path_buf(),
            name,
            expected: "[out, in, k, k]".into(),
            found: other.to_vec(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batchnorms_fold_into_the_conv_the_loader_names() {
        let cases = [
            ("backbone.body.bn1", "backbone.body.conv1"),
            ("backbone.body.layer2.0.bn3", "backbone.body.layer2.0.conv3"),
            (
                "backbone.body.layer2.0.downsample.1",
                "backbone.body.layer2.0.downsample.0",
            ),
            ("roi_heads.mask_head.2.1", "roi_heads.mask_head.2.0"),
        ];
        for (bn, conv) in cases {
            assert_eq!(folded_into(bn), conv);
        }
    }

    #[test]
    fn targets_parse_and_print_alike() {
        for t in [PlanTarget::Cuda, PlanTarget::Metal] {
            assert_eq!(t.to_string().parse::<PlanTarget>().unwrap(), t);
        }
        let e = "cpu".parse::<PlanTarget>().unwrap_err().to_string();
        assert!(e.contains("\"cpu\"") && e.contains("metal"), "{e}");
    }
}
