//! torchvision's `MaskRCNNPredictor` (`models/detection/mask_rcnn.py`): `conv5_mask` (a 2×2
//! stride-2 transposed conv) and ReLU, then `mask_fcn_logits` (1×1); and, as
//! `maskrcnn_inference` does, the sigmoid of each detection's own class only.
//!
//! On the CPU the three run fused, one RoI at a time: `conv5_mask` is one GEMM of the RoI's
//! `[C, h·w]` features (read in place) by weights packed once at load, into a per-thread block
//! that stays in cache while the bias, ReLU and the class's 1×1 logits fold it into `4·h·w`
//! values. Composed from tensor ops instead, the full R50's 100 masks put three 80 MB tensors
//! through memory (GEMM output, +bias, ReLU, then a permuted copy) and took about 130 ms of a
//! 900 ms frame at 512. Other devices run the tensor-op composition, which the tests compare
//! with the fused CPU path.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{contiguous_f32, scratch};
use super::layers::{layer_dtype, upload};
use super::sgemm::PackedA;
use crate::error::{Error, Result};
use crate::weights::Weights;

const DECONV: &str = "roi_heads.mask_predictor.conv5_mask";
const LOGITS: &str = "roi_heads.mask_predictor.mask_fcn_logits";

thread_local! {
    /// The fused path's per-thread block: `conv5_mask`'s output for one RoI (`[out·4, h·w]`),
    /// then the class's logits (`[4, h·w]`). Sized by the first RoI a thread sees and reused.
    static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The predictor's weights as f32 on the host, in the checkpoint's layouts.
#[derive(Debug, Clone)]
pub(crate) struct HostWeights {
    /// `conv5_mask.weight`, `[in, out, 2, 2]`.
    pub deconv_weight: Vec<f32>,
    pub deconv_bias: Vec<f32>,
    /// `mask_fcn_logits.weight`, `[classes, out]` (its 1×1 dimensions dropped).
    pub logits_weight: Vec<f32>,
    pub logits_bias: Vec<f32>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub classes: usize,
}

#[derive(Debug, Clone)]
pub struct MaskRCNNPredictor {
    method: Method,
    classes: usize,
}

#[derive(Debug, Clone)]
enum Method {
    Fused(std::sync::Arc<Fused>),
    Composed(Composed),
}

impl MaskRCNNPredictor {
    /// Reads `conv5_mask` and `mask_fcn_logits` for `in_channels` mask-head channels.
    pub fn load(w: &Weights, in_channels: usize, classes: usize, device: &Device) -> Result<Self> {
        let deconv_name = format!("{DECONV}.weight");
        let out_channels = match w.shape(&deconv_name)? {
            [_, out, 2, 2] => *out,
            other => {
                return Err(Error::Shape {
                    path: w.path().to_path_buf(),
                    name: deconv_name,
                    expected: format!("[{in_channels}, out, 2, 2]"),
                    found: other.to_vec(),
                })
            }
        };
        let host = HostWeights {
            deconv_weight: w.tensor(&deconv_name, &[in_channels, out_channels, 2, 2])?,
            deconv_bias: w.tensor(&format!("{DECONV}.bias"), &[out_channels])?,
            logits_weight: w.tensor(&format!("{LOGITS}.weight"), &[classes, out_channels, 1, 1])?,
            logits_bias: w.tensor(&format!("{LOGITS}.bias"), &[classes])?,
            in_channels,
            out_channels,
            classes,
        };
        // Checked on every device, so a CPU load (`inspect --plan`) knows what a GPU would
        // keep in f32.
        let dtypes = (
            layer_dtype(w, DECONV, &[&host.deconv_weight, &host.deconv_bias], device),
            layer_dtype(w, LOGITS, &[&host.logits_weight], device),
        );
        Self::from_host(host, dtypes, device)
    }

    /// `dtypes`: what `conv5_mask` and `mask_fcn_logits` compute in off the CPU.
    pub(crate) fn from_host(
        host: HostWeights,
        dtypes: (DType, DType),
        device: &Device,
    ) -> Result<Self> {
        let classes = host.classes;
        let method = if device.is_cpu() {
            Method::Fused(std::sync::Arc::new(Fused::new(host)))
        } else {
            Method::Composed(Composed::new(host, dtypes, device)?)
        };
        Ok(Self { method, classes })
    }

    /// Mask-head features `[D, in, h, w]` and each detection's label → `[D, 2h, 2w]` f32
    /// probabilities on the features' device.
    pub fn forward(&self, x: &Tensor, labels: &[usize]) -> Result<Tensor> {
        let (d, _, h, w) = x.dims4()?;
        // Both are the caller's invariants; checked so a broken one is an error, not a panic.
        if let Some(&label) = labels.iter().find(|&&l| l >= self.classes) {
            let msg = format!(
                "mask label {label} is not below {LOGITS}'s {} classes",
                self.classes
            );
            return Err(candle_core::Error::Msg(msg).into());
        }
        if d != labels.len() {
            let msg = format!("{d} RoIs of mask features but {} labels", labels.len());
            return Err(candle_core::Error::Msg(msg).into());
        }
        if d == 0 {
            return Ok(Tensor::zeros((0, 2 * h, 2 * w), DType::F32, x.device())?);
        }
        match &self.method {
            Method::Fused(fused) => Ok(x
                .contiguous()?
                .apply_op1_no_bwd(&FusedOp { fused, labels })?),
            Method::Composed(composed) => composed.forward(x, labels),
        }
    }
}

/// The CPU path's weights.
#[derive(Debug)]
struct Fused {
    /// `conv5_mask` as `[out·4, in]`: row `o·4 + a·2 + b` makes output pixel `(2i + a, 2j + b)`
    /// of channel `o` from input pixel `(i, j)` (stride equals kernel, so no two overlap).
    weight: PackedA,
    bias: Vec<f32>,
    logits_weight: Vec<f32>,
    logits_bias: Vec<f32>,
    in_channels: usize,
    out_channels: usize,
}

impl Fused {
    fn new(host: HostWeights) -> Self {
        let (c, out) = (host.in_channels, host.out_channels);
        let mut weight = PackedA::zeroed(1, out * 4, c);
        let at = weight.packing();
        let dst = weight.as_mut_ptr();
        for (i, &v) in host.deconv_weight.iter().enumerate() {
            // [in, out, 2, 2]: i = (ci·out + o)·4 + ab.
            let (ci, row) = (i / (out * 4), i % (out * 4));
            // SAFETY: `offset` of a row below out·4 and a column below `c` lies inside the one
            // packed matrix `zeroed` made.
            unsafe { *dst.add(at.offset(0, row, ci)) = v };
        }
        Self {
            weight,
            bias: host.deconv_bias,
            logits_weight: host.logits_weight,
            logits_bias: host.logits_bias,
            in_channels: c,
            out_channels: out,
        }
    }

    /// One RoI: `x` is its `[in, n]` features (`n = h·w`), `probs` its `[2h, 2w]` output.
    fn roi(&self, x: &[f32], label: usize, (h, w): (usize, usize), probs: &mut [f32]) {
        let n = h * w;
        let rows = self.out_channels * 4;
        BLOCK.with_borrow_mut(|block| {
            let (y, logits) = scratch(block, (rows + 4) * n).split_at_mut(rows * n);
            // SAFETY: `x` holds `in` rows of `n` values, `y` `out·4` rows of `n`; both are this
            // thread's alone.
            unsafe {
                self.weight
                    .mul(0, x.as_ptr(), n, n, y.as_mut_ptr(), n, false)
            };
            logits.fill(self.logits_bias[label]);
            let class = &self.logits_weight[label * self.out_channels..][..self.out_channels];
            for ((y, &bias), &wc) in y.chunks_exact(4 * n).zip(&self.bias).zip(class) {
                for (sub, acc) in y.chunks_exact(n).zip(logits.chunks_exact_mut(n)) {
                    for (acc, &v) in acc.iter_mut().zip(sub) {
                        *acc += wc * (v + bias).max(0.0);
                    }
                }
            }
            for (p, ab) in (0..n).flat_map(|p| (0..4).map(move |ab| (p, ab))) {
                let (i, j, a, b) = (p / w, p % w, ab / 2, ab % 2);
                probs[(2 * i + a) * 2 * w + 2 * j + b] = 1.0 / (1.0 + (-logits[ab * n + p]).exp());
            }
        });
    }
}

/// [`Fused`] applied to `[D, in, h, w]` features with each RoI's label.
struct FusedOp<'a> {
    fused: &'a Fused,
    labels: &'a [usize],
}

impl CustomOp1 for FusedOp<'_> {
    fn name(&self) -> &'static str {
        "mask-predictor"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (d, c, h, w) = layout.shape().dims4()?;
        // The GEMM reads `in` rows of each RoI's features; the label count was checked by
        // `forward`, the only place this op is built.
        if c != self.fused.in_channels {
            candle_core::bail!(
                "mask-predictor: features [{d}, {c}, {h}, {w}] for {} channels",
                self.fused.in_channels
            );
        }
        let mut probs = vec![0f32; d * 4 * h * w];
        probs
            .par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(c * h * w))
            .zip(self.labels)
            .for_each(|((probs, x), &label)| self.fused.roi(x, label, (h, w), probs));
        Ok((CpuStorage::F32(probs), Shape::from((d, 2 * h, 2 * w))))
    }
}

/// The predictor as tensor ops, for devices other than the CPU.
#[derive(Debug, Clone)]
struct Composed {
    /// `conv5_mask` as a matmul: `[in, out·2·2]`.
    deconv_weight: Tensor,
    /// `[1, out, 1]`, broadcast over `[N, out, 4]`.
    deconv_bias: Tensor,
    deconv_out: usize,
    /// `mask_fcn_logits` weight `[K, C]`, indexed by the predicted class so only that class's
    /// logits are computed.
    logits_weight: Tensor,
    /// f32 on every device: added after the logits are widened, before the sigmoid.
    logits_bias: Tensor,
}

impl Composed {
    fn new(host: HostWeights, (deconv, logits): (DType, DType), device: &Device) -> Result<Self> {
        let (c, out, classes) = (host.in_channels, host.out_channels, host.classes);
        Ok(Self {
            deconv_weight: upload(host.deconv_weight, (c, out * 4), deconv, device)?,
            deconv_bias: upload(host.deconv_bias, (1, out, 1), deconv, device)?,
            deconv_out: out,
            logits_weight: upload(host.logits_weight, (classes, out), logits, device)?,
            logits_bias: Tensor::from_vec(host.logits_bias, classes, device)?,
        })
    }

    fn forward(&self, x: &Tensor, labels: &[usize]) -> Result<Tensor> {
        let (d, c, h, w) = x.dims4()?;
        let device = x.device();
        // [D, C, h, w] -> [D*h*w, C] x [C, out*4] -> [D*h*w, out, 4] (+bias, relu), in the
        // dtype the layer was kept in (f32 only beyond f16's range, see `layer_dtype`).
        let y = x
            .to_dtype(self.deconv_weight.dtype())?
            .permute((0, 2, 3, 1))?
            .reshape((d * h * w, c))?
            .matmul(&self.deconv_weight)?
            .reshape((d * h * w, self.deconv_out, 4))?
            .broadcast_add(&self.deconv_bias)?
            .relu()?;
        // Logits of each detection's class only: [D, h*w*4, out] x [D, out, 1] -> [D, h*w*4].
        let labels_t = Tensor::from_vec(
            labels.iter().map(|&l| l as u32).collect::<Vec<_>>(),
            d,
            device,
        )?;
        let selected = self
            .logits_weight
            .index_select(&labels_t, 0)?
            .unsqueeze(2)?;
        let bias = self
            .logits_bias
            .index_select(&labels_t, 0)?
            .reshape((d, 1, 1))?;
        let logits = y
            .to_dtype(self.logits_weight.dtype())?
            .reshape((d, h * w, self.deconv_out, 4))?
            .permute((0, 1, 3, 2))?
            .reshape((d, h * w * 4, self.deconv_out))?
            .matmul(&selected)?;
        // Index (i*w + j)*4 + a*2 + b holds output pixel (2i + a, 2j + b): [D, h, a, w, b].
        let logits = logits
            .reshape((d, h, w, 2, 2))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((d, 2 * h, 2 * w))?
            // f16 on GPUs; the bias and sigmoid are applied in f32.
            .to_dtype(DType::F32)?
            .broadcast_add(&bias)?;
        Ok(candle_nn::ops::sigmoid(&logits)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::TestRng;

    fn host(rng: &mut TestRng, c: usize, out: usize, classes: usize) -> HostWeights {
        let mut noise =
            |n: usize, scale: f32| (0..n).map(|_| (rng.unit() * 2.0 - 1.0) * scale).collect();
        HostWeights {
            deconv_weight: noise(c * out * 4, 0.2),
            deconv_bias: noise(out, 0.5),
            logits_weight: noise(classes * out, 0.3),
            logits_bias: noise(classes, 0.5),
            in_channels: c,
            out_channels: out,
            classes,
        }
    }

    #[test]
    fn fused_cpu_path_matches_the_tensor_op_composition_other_devices_run() {
        let mut rng = TestRng::new(7);
        // Ragged sizes: channel counts and widths that fill no kernel block exactly.
        for (d, c, out, classes, h, w) in [(5, 19, 13, 7, 14, 14), (3, 40, 33, 4, 5, 9)] {
            let weights = host(&mut rng, c, out, classes);
            let dtypes = (DType::F32, DType::F32);
            let fused =
                MaskRCNNPredictor::from_host(weights.clone(), dtypes, &Device::Cpu).unwrap();
            let composed = Composed::new(weights, dtypes, &Device::Cpu).unwrap();
            let x: Vec<f32> = (0..d * c * h * w).map(|_| rng.unit() * 2.0 - 1.0).collect();
            let x = Tensor::from_vec(x, (d, c, h, w), &Device::Cpu).unwrap();
            let labels: Vec<usize> = (0..d).map(|i| (i * 3 + 1) % classes).collect();
            let got = fused.forward(&x, &labels).unwrap();
            let want = composed.forward(&x, &labels).unwrap();
            assert_eq!(got.dims(), &[d, 2 * h, 2 * w]);
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "fused and composed differ by {diff}");
        }
    }

    #[test]
    fn no_rois_give_an_empty_mask_batch_and_a_bad_label_is_named() {
        let mut rng = TestRng::new(3);
        let weights = host(&mut rng, 8, 4, 3);
        let dtypes = (DType::F32, DType::F32);
        let p = MaskRCNNPredictor::from_host(weights, dtypes, &Device::Cpu).unwrap();
        let none = Tensor::zeros((0, 8, 14, 14), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(p.forward(&none, &[]).unwrap().dims(), &[0, 28, 28]);
        let one = Tensor::zeros((1, 8, 14, 14), DType::F32, &Device::Cpu).unwrap();
        let err = p.forward(&one, &[3]).unwrap_err().to_string();
        assert!(err.contains("mask label 3"), "{err}");
        let err = p.forward(&one, &[1, 2]).unwrap_err().to_string();
        assert!(
            err.contains("1 RoIs of mask features but 2 labels"),
            "{err}"
        );
    }
}
