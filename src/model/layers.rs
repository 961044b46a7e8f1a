//! The two parametrised blocks every stage is made of, loaded from torchvision key paths.
//! BatchNorm never reaches the hot path: it is folded into the preceding conv at load time.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::{contiguous_f32, FusedConv};
pub use super::gpu_conv::ConvGeometry;
use super::gpu_conv::DeviceConv;

use crate::device::compute_dtype;
use crate::error::Result;
use crate::weights::Weights;

/// f16's largest finite value; a folded weight beyond it would become infinite in f16.
pub const F16_MAX: f32 = 65504.0;

/// The smallest magnitude the cast to f16 turns into infinity: halfway from 65504 to 65536,
/// and the cast rounds to nearest, ties to even (65536 is infinity).
const F16_OVERFLOW: f32 = 65520.0;

/// Whether every value survives the cast to f16 as a finite number (values up to 65519.99
/// round to 65504). A comparison the compiler vectorises, in blocks so a bad value stops the
/// scan early: casting each value took about a tenth of the model's load time.
pub fn fits_f16(values: &[f32]) -> bool {
    values.chunks(256).all(|block| {
        block
            .iter()
            .fold(true, |ok, v| ok & (v.abs() < F16_OVERFLOW))
    })
}

/// The dtype `layer`'s tensors are kept in on `device`: its compute dtype (f16 on GPUs), except
/// that a layer with a folded value beyond f16's range stays f32 there, with a log line naming
/// it. BatchNorm folding with a tiny running variance (COCO-initialised models use eps 0) can
/// give such weights; the layer's output is usually in range again, since the bias cancels the
/// large products, so the layer computes in f32 and its output is cast back to f16.
pub(crate) fn layer_dtype(w: &Weights, layer: &str, parts: &[&[f32]], device: &Device) -> DType {
    let dtype = compute_dtype(device.location());
    if parts.iter().all(|p| fits_f16(p)) {
        return dtype;
    }
    w.note_beyond_f16(layer);
    if dtype != DType::F16 {
        return dtype;
    }
    let max_abs = parts
        .iter()
        .flat_map(|p| p.iter())
        .fold(0f32, |m, v| m.max(v.abs()));
    tracing::warn!(
        layer,
        max_abs,
        f16_max = F16_MAX,
        "folded weights beyond f16's range: this layer stays f32 on the device"
    );
    DType::F32
}

/// Weight values on `device` in `dtype`. The values arrive as f32 whatever the file's dtype,
/// with BatchNorm already folded in f32, and are cast once on the device: an f16 file
/// round-trips exactly and a folded weight is rounded once, not per step.
pub(crate) fn upload(
    values: Vec<f32>,
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// A conv with bias (folded BatchNorm or its own). On CPU it runs through [`FusedConv`]; on
/// other devices through [`DeviceConv`] (bounded scratch, no im2col for 1×1), or with the
/// `cudnn` feature through cuDNN.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kernel: Kernel,
    out_channels: usize,
}

#[derive(Debug, Clone)]
enum Kernel {
    Cpu(FusedConv),
    Device(DeviceConv),
}

/// How a conv is laid out; the output width comes from the weights.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvSpec {
    pub const fn new(in_channels: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            in_channels,
            kernel,
            stride,
            padding,
        }
    }
}

fn out_channels(w: &Weights, name: &str) -> Result<usize> {
    let shape = w.shape(name)?;
    // A zero anywhere would leave a conv with no weights per output (and divide by zero when
    // BatchNorm is folded into it).
    shape
        .first()
        .copied()
        .filter(|_| shape.len() == 4 && shape.iter().all(|&d| d > 0))
        .ok_or_else(|| crate::error::Error::Shape {
            path: w.path().to_path_buf(),
            name: name.to_string(),
            expected: "a 4-d conv weight [out, in, k, k], every dimension positive".into(),
            found: shape.to_vec(),
        })
}

impl Conv2d {
    /// `{prefix}.weight` and `{prefix}.bias`.
    pub fn load(w: &Weights, prefix: &str, spec: ConvSpec, device: &Device) -> Result<Self> {
        let wname = format!("{prefix}.weight");
        let out = out_channels(w, &wname)?;
        let weight = w.tensor(&wname, &[out, spec.in_channels, spec.kernel, spec.kernel])?;
        let bias = w.tensor(&format!("{prefix}.bias"), &[out])?;
        Self::from_host(w, prefix, weight, bias, out, spec, device)
    }

    /// torchvision's `Conv2dNormActivation` at `prefix`: the conv at `{prefix}.0`, with a
    /// BatchNorm at `{prefix}.1` (folded) when the file has one — the v2 models' FPN and
    /// heads — or its own bias otherwise (v1).
    pub fn load_block(
        w: &Weights,
        prefix: &str,
        spec: ConvSpec,
        eps: f32,
        device: &Device,
    ) -> Result<Self> {
        if w.contains(&format!("{prefix}.1.running_var")) {
            Self::load_bn(
                w,
                &format!("{prefix}.0"),
                &format!("{prefix}.1"),
                spec,
                eps,
                device,
            )
        } else {
            Self::load(w, &format!("{prefix}.0"), spec, device)
        }
    }

    /// A bias-free conv `{conv}.weight` followed by BatchNorm `{bn}.*` in eval mode, folded:
    /// `w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`.
    pub fn load_bn(
        w: &Weights,
        conv: &str,
        bn: &str,
        spec: ConvSpec,
        eps: f32,
        device: &Device,
    ) -> Result<Self> {
        let wname = format!("{conv}.weight");
        let out = out_channels(w, &wname)?;
        let mut weight = w.tensor(&wname, &[out, spec.in_channels, spec.kernel, spec.kernel])?;
        let gamma = w.tensor(&format!("{bn}.weight"), &[out])?;
        let beta = w.tensor(&format!("{bn}.bias"), &[out])?;
        let mean = w.tensor(&format!("{bn}.running_mean"), &[out])?;
        let var = w.tensor(&format!("{bn}.running_var"), &[out])?;
        let per_out = weight.len() / out;
        let mut bias = Vec::with_capacity(out);
        for o in 0..out {
            let scale = gamma[o] / (var[o] + eps).sqrt();
            if !scale.is_finite() {
                return Err(w.architecture_error(format!(
                    "BatchNorm `{bn}` channel {o}: running_var {} with bn_eps {eps} gives an \
                     infinite scale (is the `bn_eps` metadata right?)",
                    var[o]
                )));
            }
            weight[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|v| *v *= scale);
            bias.push(beta[o] - mean[o] * scale);
        }
        Self::from_host(w, conv, weight, bias, out, spec, device)
    }

    fn from_host(
        w: &Weights,
        layer: &str,
        weight: Vec<f32>,
        bias: Vec<f32>,
        out: usize,
        spec: ConvSpec,
        device: &Device,
    ) -> Result<Self> {
        let k = spec.kernel;
        // Checked on every device, so a CPU load (`inspect --plan`) knows what a GPU would keep
        // in f32.
        let dtype = layer_dtype(w, layer, &[&weight, &bias], device);
        let kernel = if device.is_cpu() {
            Kernel::Cpu(FusedConv::new(
                weight,
                bias,
                spec.in_channels,
                out,
                (k, spec.stride, spec.padding),
            ))
        } else {
            Kernel::Device(DeviceConv::new(
                &upload(weight, (out, spec.in_channels, k, k), dtype, device)?,
                &upload(bias, out, dtype, device)?,
                spec.stride,
                spec.padding,
            )?)
        };
        Ok(Self {
            kernel,
            out_channels: out,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Multiply-accumulates of one forward over an `h × w` input.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let g = self.geometry();
        let (oh, ow) = g.output_size(h, w);
        (g.out_channels * g.in_channels * g.kernel * g.kernel * oh * ow) as u64
    }

    /// The conv's shape parameters, for shape walks such as the device-memory plan.
    pub fn geometry(&self) -> ConvGeometry {
        match &self.kernel {
            Kernel::Cpu(op) => ConvGeometry {
                in_channels: op.in_channels,
                out_channels: op.out_channels,
                kernel: op.kernel,
                stride: op.stride,
                padding: op.padding,
            },
            Kernel::Device(op) => op.geometry,
        }
    }

    /// The CPU op this conv runs as, `relu` after it; `None` on other devices.
    pub(super) fn cpu_op(&self, relu: bool) -> Option<FusedConv> {
        match &self.kernel {
            Kernel::Cpu(op) => Some(FusedConv { relu, ..op.clone() }),
            Kernel::Device(_) => None,
        }
    }

    fn run(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Cpu(op) => {
                let op = FusedConv { relu, ..op.clone() };
                let x = x.contiguous()?;
                Ok(match residual {
                    Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op)?,
                    None => x.apply_op1_no_bwd(&op)?,
                })
            }
            Kernel::Device(op) => {
                // A layer kept in f32 (beyond f16's range) takes and gives the activations'
                // dtype; the casts are no-ops otherwise.
                let mut y = op.forward(&x.to_dtype(op.dtype())?)?.to_dtype(x.dtype())?;
                if let Some(r) = residual {
                    y = (y + r)?;
                }
                Ok(if relu { y.relu()? } else { y })
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, false)
    }

    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, None, true)
    }

    /// `relu(conv(x) + residual)`, the end of a ResNet block.
    pub fn forward_add_relu(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.run(x, Some(residual), true)
    }
}

/// A fully connected layer. On the CPU it runs as [`LinearOp`]; elsewhere the weight is kept
/// transposed (`[in, out]`) so the forward is one matmul.
#[derive(Debug, Clone)]
pub struct Linear {
    kernel: LinearKernel,
    out_features: usize,
}

#[derive(Debug, Clone)]
enum LinearKernel {
    Cpu(LinearOp),
    Device { weight_t: Tensor, bias: Tensor },
}

impl Linear {
    pub fn load(w: &Weights, prefix: &str, in_features: usize, device: &Device) -> Result<Self> {
        let wname = format!("{prefix}.weight");
        let out = match w.shape(&wname)? {
            [out, _] => *out,
            other => {
                return Err(crate::error::Error::Shape {
                    path: w.path().to_path_buf(),
                    name: wname,
                    expected: format!("[out, {in_features}]"),
                    found: other.to_vec(),
                })
            }
        };
        let weight = w.tensor(&wname, &[out, in_features])?;
        let bias = w.tensor(&format!("{prefix}.bias"), &[out])?;
        let dtype = layer_dtype(w, prefix, &[&weight, &bias], device);
        let kernel = if device.is_cpu() {
            LinearKernel::Cpu(LinearOp {
                weight_t: Arc::new(transposed(&weight, out, in_features)),
                bias: Arc::new(bias),
                in_features,
                relu: false,
            })
        } else {
            LinearKernel::Device {
                weight_t: upload(weight, (out, in_features), dtype, device)?
                    .t()?
                    .contiguous()?,
                bias: upload(bias, (1, out), dtype, device)?,
            }
        };
        Ok(Self {
            kernel,
            out_features: out,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    fn run(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        match &self.kernel {
            LinearKernel::Cpu(op) => {
                let op = LinearOp { relu, ..op.clone() };
                Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
            }
            LinearKernel::Device { weight_t, bias } => {
                // Casts are no-ops unless the layer was kept in f32 (see `layer_dtype`).
                let y = x
                    .to_dtype(weight_t.dtype())?
                    .matmul(weight_t)?
                    .broadcast_add(bias)?
                    .to_dtype(x.dtype())?;
                Ok(if relu { y.relu()? } else { y })
            }
        }
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `relu(forward(x))`.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }
}

/// `[cols, rows]` from a row-major `[rows, cols]` matrix. In bands of `BAND` rows of the result,
/// one job each: a band reads a short contiguous run of every source row and writes its rows
/// whole, so neither side strides through memory value by value (fc6's 51 MB, read one value
/// per 50 KB row at a time, took about a tenth of the model's load), and the result's fresh
/// pages are faulted in on every thread.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BAND: usize = 64;
    let mut t = Vec::with_capacity(rows * cols);
    if rows > 0 {
        t.spare_capacity_mut()[..rows * cols]
            .par_chunks_mut(BAND * rows)
            .enumerate()
            .for_each(|(band, dst)| {
                let c0 = band * BAND;
                for (r, row) in m.chunks_exact(cols).enumerate() {
                    for (k, &v) in row[c0..].iter().take(dst.len() / rows).enumerate() {
                        dst[k * rows + r].write(v);
                    }
                }
            });
    }
    // SAFETY: the bands cover all `cols` result rows, and each wrote every one of its rows'
    // `rows` values (one per source row).
    unsafe { t.set_len(rows * cols) };
    t
}

/// A fully connected layer on the CPU in one op: the output starts as the bias rows, one
/// `gemm` call adds the product to it, and the ReLU (if any) runs in place. As tensor ops the
/// product, the bias sum and the ReLU were three tensors, each a pass over the output.
#[derive(Debug, Clone)]
struct LinearOp {
    /// `[in, out]`, row-major: the layout the matmul it replaces read.
    weight_t: Arc<Vec<f32>>,
    bias: Arc<Vec<f32>>,
    in_features: usize,
    relu: bool,
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let (rows, inputs) = l.shape().dims2()?;
        if inputs != self.in_features {
            candle_core::bail!(
                "linear: input [{rows}, {inputs}], the layer takes {}",
                self.in_features
            );
        }
        let outputs = self.bias.len();
        let mut out = Vec::with_capacity(rows * outputs);
        for _ in 0..rows {
            out.extend_from_slice(&self.bias);
        }
        let threads = rayon::current_num_threads();
        // SAFETY: `x` holds `rows × in` values, `weight_t` `in × out` and `out` `rows × out`,
        // each row-major as the strides say; `out` is this call's own.
        unsafe {
            gemm::gemm(
                rows,
                outputs,
                inputs,
                out.as_mut_ptr(),
                1,
                outputs as isize,
                true,
                x.as_ptr(),
                1,
                inputs as isize,
                self.weight_t.as_ptr(),
                1,
                outputs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                },
            )
        };
        if self.relu {
            out.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, outputs))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_moves_every_value() {
        // Bands that end short, a single row or column, and an empty matrix.
        for (rows, cols) in [(3, 130), (129, 64), (1, 5), (7, 1), (0, 4), (4, 0)] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transposed(&m, rows, cols);
            assert_eq!(t.len(), m.len());
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "{rows}x{cols} at {r},{c}");
                }
            }
        }
    }

    #[test]
    fn the_cpu_linear_matches_matmul_plus_bias() {
        // Ragged sizes, one row, and more rows than a thread's share.
        for (i, &(rows, inputs, outputs)) in
            [(1, 3, 5), (37, 19, 11), (300, 64, 33)].iter().enumerate()
        {
            let mut rng = crate::test_rng::TestRng::new(i as u32);
            let mut values =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect() };
            let (x, weight_t, bias) = (
                values(rows * inputs),
                values(inputs * outputs),
                values(outputs),
            );
            let cpu = Device::Cpu;
            let x = Tensor::from_vec(x, (rows, inputs), &cpu).unwrap();
            let want = x
                .matmul(&Tensor::from_slice(&weight_t, (inputs, outputs), &cpu).unwrap())
                .unwrap()
                .broadcast_add(&Tensor::from_slice(&bias, (1, outputs), &cpu).unwrap())
                .unwrap();
            for relu in [false, true] {
                let op = LinearOp {
                    weight_t: Arc::new(weight_t.clone()),
                    bias: Arc::new(bias.clone()),
                    in_features: inputs,
                    relu,
                };
                let got: Vec<f32> = x
                    .apply_op1_no_bwd(&op)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = if relu {
                    want.relu().unwrap()
                } else {
                    want.clone()
                };
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got.len(), want.len());
                for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{rows}×{inputs}×{outputs} relu {relu} value {j}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
