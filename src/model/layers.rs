//! The two parametrised blocks every stage is made of, loaded from torchvision key paths.
//! BatchNorm never reaches the hot path: it is folded into the preceding conv at load time.

use candle_core::{Device, Shape, Tensor};

use super::conv::FusedConv;

use crate::device::compute_dtype;
use crate::error::Result;
use crate::weights::Weights;

/// A weight on `device` in the device's compute dtype (f16 on GPUs). The values arrive as f32
/// whatever the file's dtype, with BatchNorm already folded in f32, and are cast once on the
/// device: an f16 file round-trips exactly and a folded weight is rounded once, not per step.
pub(crate) fn upload(values: Vec<f32>, shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(compute_dtype(device.location()))?)
}

/// A conv with bias (folded BatchNorm or its own). On CPU it runs through [`FusedConv`]; on
/// other devices through candle's `conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    kernel: Kernel,
    out_channels: usize,
}

#[derive(Debug, Clone)]
enum Kernel {
    Cpu(FusedConv),
    Device {
        weight: Tensor,
        /// `[1, out, 1, 1]`, ready to broadcast.
        bias: Tensor,
        stride: usize,
        padding: usize,
    },
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
        Self::from_host(weight, bias, out, spec, device)
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
        Self::from_host(weight, bias, out, spec, device)
    }

    fn from_host(
        weight: Vec<f32>,
        bias: Vec<f32>,
        out: usize,
        spec: ConvSpec,
        device: &Device,
    ) -> Result<Self> {
        let k = spec.kernel;
        let kernel = if device.is_cpu() {
            Kernel::Cpu(FusedConv::new(
                weight,
                bias,
                spec.in_channels,
                out,
                (k, spec.stride, spec.padding),
            ))
        } else {
            Kernel::Device {
                weight: upload(weight, (out, spec.in_channels, k, k), device)?,
                bias: upload(bias, (1, out, 1, 1), device)?,
                stride: spec.stride,
                padding: spec.padding,
            }
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
        match &self.kernel {
            Kernel::Cpu(op) => op.macs(h, w),
            Kernel::Device {
                weight,
                stride,
                padding,
                ..
            } => {
                let (o, c, k, _) = weight.dims4().unwrap_or((0, 0, 0, 0));
                let oh = (h + 2 * padding - k) / stride + 1;
                let ow = (w + 2 * padding - k) / stride + 1;
                (o * c * k * k * oh * ow) as u64
            }
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
            Kernel::Device {
                weight,
                bias,
                stride,
                padding,
            } => {
                let mut y = x
                    .conv2d(weight, *padding, *stride, 1, 1)?
                    .broadcast_add(bias)?;
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

/// A fully connected layer, weight kept transposed (`[in, out]`) so the forward is one matmul.
#[derive(Debug, Clone)]
pub struct Linear {
    weight_t: Tensor,
    bias: Tensor,
    out_features: usize,
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
        Ok(Self {
            weight_t: upload(weight, (out, in_features), device)?
                .t()?
                .contiguous()?,
            bias: upload(bias, (1, out), device)?,
            out_features: out,
        })
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `[N, in] -> [N, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight_t)?.broadcast_add(&self.bias)?)
    }
}
