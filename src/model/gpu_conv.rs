//! Convolution on GPUs (CUDA without `cudnn`, and Metal) as a composition of candle tensor
//! ops, so that its memory is bounded and the very same composition runs on the CPU device,
//! where tests compare it with the CPU's own kernel ([`super::conv::FusedConv`]).
//!
//! candle's own `conv2d` on CUDA builds the whole im2col column buffer of a conv at once: about
//! 250 MB for one of the P2 3×3 convs at 800×1088 in f16, and ~1.9 GB of such buffers per frame.
//! Here:
//! - a 1×1 stride-1 conv is one GEMM on the NCHW tensor as it is (`[O, C] × [C, H·W]`), with no
//!   column buffer at all;
//! - every other conv runs im2col over tiles of output rows, each tile's working set (input
//!   window, columns, output tile) at most [`SCRATCH_BYTES`]. A tile's buffers are freed before
//!   the next tile's are taken, so the stream-ordered pool hands the same blocks back: the
//!   scratch is bounded and reused, not grown per conv.
//!
//! Column layout: PyTorch's weight `[O, C, k, k]` flattened to `[O, C·k·k]` multiplies columns
//! `[C, k·k, rows·ow]` (channel-major, then kernel row, kernel column), so the weight is used
//! as loaded.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Upper bound on one conv tile's working set: ≤ 64 MB keeps the largest conv of the full
/// model at 800×1333 (a P2 3×3, 256 channels) in a few tiles while staying well inside an 8 GB
/// Orin's budget.
pub const SCRATCH_BYTES: usize = 64 << 20;

/// A conv's shape parameters, and the tile arithmetic that follows from them alone (the
/// device-memory plan uses it without weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    /// One GEMM on the NCHW tensor, no column buffer.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Bytes of one tile of `rows` output rows over `n` images `ow` wide, `elem` bytes a
    /// value: the input window, its strided picks (stride > 1), the columns and the output tile
    /// with and without bias.
    fn tile_bytes(&self, n: usize, rows: usize, ow: usize, elem: usize) -> usize {
        let (c, o, k, s) = (
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
        );
        let win_w = s * ow + k - 1;
        let window = c * (s * rows + k - 1) * win_w;
        let picks = if s > 1 { c * s * rows * win_w } else { 0 };
        let columns = c * k * k * rows * ow;
        n * elem * (window + picks + columns + 2 * o * rows * ow)
    }

    /// Output rows per tile: as many as fit `budget` bytes, at least one.
    fn tile_rows(&self, n: usize, oh: usize, ow: usize, elem: usize, budget: usize) -> usize {
        let per_row = self.tile_bytes(n, 1, ow, elem).max(1);
        (budget / per_row).clamp(1, oh.max(1))
    }

    /// The largest working set one forward over `[n, C, h, w]` takes beside its input and
    /// output, in bytes of `dtype`, under the default [`SCRATCH_BYTES`] budget: what the
    /// device-memory plan counts as this conv's scratch.
    pub fn scratch_bytes(&self, n: usize, h: usize, w: usize, dtype: DType) -> usize {
        let (oh, ow) = self.output_size(h, w);
        let elem = dtype.size_in_bytes();
        if self.is_pointwise() {
            // The GEMM's output before the bias is added.
            return n * self.out_channels * oh * ow * elem;
        }
        let rows = self.tile_rows(n, oh, ow, elem, SCRATCH_BYTES);
        self.tile_bytes(n, rows, ow, elem)
    }
}

/// A conv with bias on any device, as candle ops.
#[derive(Debug, Clone)]
pub struct DeviceConv {
    /// `[O, C·k·k]`.
    weight: Tensor,
    /// `[1, O, 1, 1]`.
    bias: Tensor,
    pub geometry: ConvGeometry,
    scratch_bytes: usize,
}

impl DeviceConv {
    /// `weight` is `[O, C, k, k]`, `bias` `[O]`, both in the dtype the conv computes in.
    pub fn new(weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (o, c, k, k2) = weight.dims4()?;
        if k != k2 || stride == 0 {
            let msg = format!("conv: {k}×{k2} kernel, stride {stride}: square, stride ≥ 1");
            return Err(candle_core::Error::Msg(msg).into());
        }
        Ok(Self {
            weight: weight.reshape((o, c * k * k))?,
            bias: bias.reshape((1, o, 1, 1))?,
            geometry: ConvGeometry {
                in_channels: c,
                out_channels: o,
                kernel: k,
                stride,
                padding,
            },
            scratch_bytes: SCRATCH_BYTES,
        })
    }

    /// The same conv with another tile budget (tests force many small tiles with it).
    pub fn with_scratch_bytes(mut self, bytes: usize) -> Self {
        self.scratch_bytes = bytes;
        self
    }

    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// `conv(x) + bias`, `[N, C, H, W] -> [N, O, OH, OW]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.geometry;
        let (n, c, h, w) = x.dims4()?;
        if c != g.in_channels || h + 2 * g.padding < g.kernel || w + 2 * g.padding < g.kernel {
            let msg = format!("conv: input {:?} for {g:?}", x.dims());
            return Err(candle_core::Error::Msg(msg).into());
        }
        let (oh, ow) = g.output_size(h, w);
        let o = g.out_channels;
        if g.is_pointwise() {
            // [O, C] x [N, C, H*W] -> [N, O, H*W].
            let y = self.weight.broadcast_matmul(&x.reshape((n, c, h * w))?)?;
            return Ok(y.reshape((n, o, oh, ow))?.broadcast_add(&self.bias)?);
        }
        let elem = x.dtype().size_in_bytes();
        let rows = g.tile_rows(n, oh, ow, elem, self.scratch_bytes);
        if rows >= oh {
            return self.tile(x, 0, oh, ow);
        }
        // Tiles written into one output, so only one tile's output is alive beside it.
        let out = Tensor::zeros((n, o, oh, ow), x.dtype(), x.device())?;
        for r0 in (0..oh).step_by(rows) {
            let r = rows.min(oh - r0);
            out.slice_set(&self.tile(x, r0, r, ow)?, 2, r0)?;
        }
        Ok(out)
    }

    /// Output rows `r0..r0 + rows` with bias: `[N, O, rows, ow]`.
    fn tile(&self, x: &Tensor, r0: usize, rows: usize, ow: usize) -> Result<Tensor> {
        let (n, c, _, _) = x.dims4()?;
        let (k, s, p) = (
            self.geometry.kernel,
            self.geometry.stride,
            self.geometry.padding,
        );
        // The padded input this tile reads: rows from r0·s, columns from 0, in padded
        // coordinates, long enough that every tap's strided pick fits.
        let window = zero_padded(x, 2, (r0 * s) as isize - p as isize, s * rows + k - 1)?;
        let window = zero_padded(&window, 3, -(p as isize), s * ow + k - 1)?;
        let mut taps = Vec::with_capacity(k * k);
        for ky in 0..k {
            let band = every(&window, 2, ky, rows, s)?;
            for kx in 0..k {
                taps.push(every(&band, 3, kx, ow, s)?);
            }
        }
        // k·k × [N, C, rows, ow] -> [N, C, k·k, rows, ow] -> [N, C·k·k, rows·ow].
        let columns = Tensor::stack(&taps, 2)?.reshape((n, c * k * k, rows * ow))?;
        drop(taps);
        let y = self.weight.broadcast_matmul(&columns)?;
        Ok(y.reshape((n, self.geometry.out_channels, rows, ow))?
            .broadcast_add(&self.bias)?)
    }
}

/// `len` entries of `x` along `dim` from `start`, which may lie before 0 or run past the end:
/// the part outside `x` is zeros (the conv's padding).
fn zero_padded(x: &Tensor, dim: usize, start: isize, len: usize) -> Result<Tensor> {
    let size = x.dim(dim)? as isize;
    let lo = start.clamp(0, size);
    let hi = (start + len as isize).clamp(lo, size);
    let before = (lo - start).min(len as isize) as usize;
    let inside = (hi - lo) as usize;
    let after = len - before - inside;
    if inside == 0 {
        let mut dims = x.dims().to_vec();
        dims[dim] = len;
        return Ok(Tensor::zeros(dims, x.dtype(), x.device())?);
    }
    let part = x.narrow(dim, lo as usize, inside)?;
    Ok(if before == 0 && after == 0 {
        part
    } else {
        part.pad_with_zeros(dim, before, after)?
    })
}

/// Entries `start, start + step, …` (`count` of them) of `x` along `dim`; needs
/// `start + step·count ≤ x.dim(dim)`.
fn every(x: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> Result<Tensor> {
    let run = x.narrow(dim, start, step * count)?;
    if step == 1 {
        return Ok(run);
    }
    // [.., step·count, ..] -> [.., count, step, ..], keep offset 0 of each step.
    let mut split = run.dims().to_vec();
    split[dim] = count;
    split.insert(dim + 1, step);
    Ok(run
        .reshape(split)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)?)
}
