//! Writes torchvision-layout Mask R-CNN weights with random values, so benchmarks and
//! pipeline tests run a full-size model without downloading anything. The values are
//! He-initialised convs with identity BatchNorm, except that each residual branch's last
//! BatchNorm scales by `RESIDUAL_GAMMA` and the RPN head starts as torchvision initialises it
//! (std 0.01): otherwise 16 residual additions grow the FPN features into the thousands, every
//! proposal decodes off the image, and a benchmark would time an empty second half. The
//! detections are meaningless but there are plenty of them.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};

/// The shapes of a model to synthesise.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub bottleneck: bool,
    pub blocks: [usize; 4],
    /// Stem width; stage widths are `stem * 2^i` (×4 output for Bottleneck).
    pub stem: usize,
    pub fpn: usize,
    pub representation: usize,
    pub mask_layers: usize,
    pub num_classes: usize,
}

impl SyntheticSpec {
    /// torchvision's `maskrcnn_resnet50_fpn(num_classes=47)`.
    pub fn resnet50_fpn() -> Self {
        Self {
            bottleneck: true,
            blocks: [3, 4, 6, 3],
            stem: 64,
            fpn: 256,
            representation: 1024,
            mask_layers: 4,
            num_classes: 47,
        }
    }
}

/// Scale of each residual branch's last BatchNorm: the variance then grows by about
/// (1 + 0.2²)^16 ≈ 1.9 over ResNet-50's 16 blocks instead of 2^16.
const RESIDUAL_GAMMA: f32 = 0.2;

/// torchvision's `RPNHead` initialisation: normal weights with this std, zero bias.
const RPN_HEAD_STD: f32 = 0.01;

/// xorshift64*: deterministic, dependency-free; quality is irrelevant for weights like these.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

struct Writer {
    rng: Rng,
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
}

impl Writer {
    fn put(&mut self, name: String, shape: Vec<usize>, values: impl Iterator<Item = f32>) {
        let bytes = values
            .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        self.tensors.push((name, shape, bytes));
    }

    fn random(&mut self, name: String, shape: Vec<usize>, bound: f32) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| self.rng.uniform() * bound).collect();
        self.put(name, shape, values.into_iter());
    }

    fn constant(&mut self, name: String, len: usize, v: f32) {
        self.put(name, vec![len], std::iter::repeat_n(v, len));
    }

    /// A conv with He-uniform weights; bias-free convs get a BatchNorm `bn` that scales by
    /// `gamma` and is otherwise the identity.
    fn conv(&mut self, prefix: &str, out: usize, inp: usize, k: usize, bn: Option<(&str, f32)>) {
        let bound = (6.0 / (inp * k * k) as f32).sqrt();
        self.random(format!("{prefix}.weight"), vec![out, inp, k, k], bound);
        match bn {
            Some((bn, gamma)) => {
                self.constant(format!("{bn}.weight"), out, gamma);
                self.constant(format!("{bn}.bias"), out, 0.0);
                self.constant(format!("{bn}.running_mean"), out, 0.0);
                self.constant(format!("{bn}.running_var"), out, 1.0);
            }
            None => self.constant(format!("{prefix}.bias"), out, 0.0),
        }
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize) {
        let bound = (6.0 / inp as f32).sqrt();
        self.random(format!("{prefix}.weight"), vec![out, inp], bound);
        self.constant(format!("{prefix}.bias"), out, 0.0);
    }
}

/// Writes random f16 weights of `spec` to `path`.
pub fn write_random_weights(path: &Path, spec: &SyntheticSpec, seed: u64) -> Result<()> {
    let mut w = Writer {
        rng: Rng(seed | 1),
        tensors: Vec::new(),
    };
    let b = "backbone.body";
    w.conv(
        &format!("{b}.conv1"),
        spec.stem,
        3,
        7,
        Some((&format!("{b}.bn1"), 1.0)),
    );
    let expansion = if spec.bottleneck { 4 } else { 1 };
    let mut inp = spec.stem;
    let mut stage_out = [0; 4];
    for (s, &n) in spec.blocks.iter().enumerate() {
        let planes = spec.stem << s;
        for i in 0..n {
            let p = format!("{b}.layer{}.{i}", s + 1);
            let c = |j: usize| (format!("{p}.conv{j}"), format!("{p}.bn{j}"));
            if spec.bottleneck {
                let ((c1, b1), (c2, b2), (c3, b3)) = (c(1), c(2), c(3));
                w.conv(&c1, planes, inp, 1, Some((&b1, 1.0)));
                w.conv(&c2, planes, planes, 3, Some((&b2, 1.0)));
                w.conv(&c3, planes * 4, planes, 1, Some((&b3, RESIDUAL_GAMMA)));
            } else {
                let ((c1, b1), (c2, b2)) = (c(1), c(2));
                w.conv(&c1, planes, inp, 3, Some((&b1, 1.0)));
                w.conv(&c2, planes, planes, 3, Some((&b2, RESIDUAL_GAMMA)));
            }
            let out = planes * expansion;
            if i == 0 && (s > 0 || inp != out) {
                w.conv(
                    &format!("{p}.downsample.0"),
                    out,
                    inp,
                    1,
                    Some((&format!("{p}.downsample.1"), 1.0)),
                );
            }
            inp = out;
        }
        stage_out[s] = inp;
    }
    for (i, &c) in stage_out.iter().enumerate() {
        w.conv(
            &format!("backbone.fpn.inner_blocks.{i}.0"),
            spec.fpn,
            c,
            1,
            None,
        );
        w.conv(
            &format!("backbone.fpn.layer_blocks.{i}.0"),
            spec.fpn,
            spec.fpn,
            3,
            None,
        );
    }
    w.conv("rpn.head.conv.0.0", spec.fpn, spec.fpn, 3, None);
    // Uniform with the normal's std.
    let bound = RPN_HEAD_STD * 3f32.sqrt();
    for (name, out) in [("cls_logits", 3), ("bbox_pred", 12)] {
        w.random(
            format!("rpn.head.{name}.weight"),
            vec![out, spec.fpn, 1, 1],
            bound,
        );
        w.constant(format!("rpn.head.{name}.bias"), out, 0.0);
    }
    w.linear("roi_heads.box_head.fc6", spec.representation, spec.fpn * 49);
    w.linear(
        "roi_heads.box_head.fc7",
        spec.representation,
        spec.representation,
    );
    w.linear(
        "roi_heads.box_predictor.cls_score",
        spec.num_classes,
        spec.representation,
    );
    w.linear(
        "roi_heads.box_predictor.bbox_pred",
        spec.num_classes * 4,
        spec.representation,
    );
    for i in 0..spec.mask_layers {
        w.conv(
            &format!("roi_heads.mask_head.{i}.0"),
            spec.fpn,
            spec.fpn,
            3,
            None,
        );
    }
    let bound = (6.0 / (spec.fpn * 4) as f32).sqrt();
    w.random(
        "roi_heads.mask_predictor.conv5_mask.weight".into(),
        vec![spec.fpn, spec.fpn, 2, 2],
        bound,
    );
    w.constant(
        "roi_heads.mask_predictor.conv5_mask.bias".into(),
        spec.fpn,
        0.0,
    );
    w.conv(
        "roi_heads.mask_predictor.mask_fcn_logits",
        spec.num_classes,
        spec.fpn,
        1,
        None,
    );

    let views = w
        .tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, shape.clone(), data)
                .map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("synthetic weights: {e}")))?;
    let metadata = HashMap::from([("bn_eps".to_string(), "1e-05".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}
