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
//! With the `cudnn` feature, f16 convs other than 1×1 stride-1 go to cuDNN instead (the `cudnn`
//! module): the algorithm is chosen once per (device, input shape, conv), one workspace per
//! device is grown as needed and reused, and the convolution is described with f32 compute over
//! f16 data (cuDNN's pseudo-half configuration), so it accumulates in f32.
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
        // Twice with a batch: padded, then transposed to channels first.
        let window = c * (s * rows + k - 1) * win_w * if n > 1 { 2 } else { 1 };
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
            // The GEMM's output before the bias is added, and with a batch the input transposed
            // to channels first.
            let transposed = if n > 1 {
                n * self.in_channels * h * w
            } else {
                0
            };
            return (n * self.out_channels * oh * ow + transposed) * elem;
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
        #[cfg(feature = "cudnn")]
        if x.device().is_cuda()
            && x.dtype() == DType::F16
            && self.dtype() == DType::F16
            && !g.is_pointwise()
        {
            // `weight` is `[O, C·k·k]`, the same memory as cuDNN's `[O, C, k, k]` filter.
            let y = x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &cudnn::Conv(g))?;
            return Ok(y.broadcast_add(&self.bias)?);
        }
        if g.is_pointwise() {
            // [O, C] x [C, N*H*W] -> [O, N, H, W] -> [N, O, H, W]. Batches go into the GEMM's
            // columns: a weight broadcast over N would be copied N times. With N = 1 both
            // transposes only relabel a unit dimension.
            let x = x.transpose(0, 1)?.contiguous()?.reshape((c, n * h * w))?;
            let y = self.weight.matmul(&x)?.reshape((o, n, oh, ow))?;
            return Ok(y.transpose(0, 1)?.broadcast_add(&self.bias)?);
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
        // [N, C, ..] -> [C, N, ..]: batches go into the GEMM's columns (see `forward`).
        let window = window.transpose(0, 1)?.contiguous()?;
        let mut taps = Vec::with_capacity(k * k);
        for ky in 0..k {
            let band = every(&window, 2, ky, rows, s)?;
            for kx in 0..k {
                taps.push(every(&band, 3, kx, ow, s)?);
            }
        }
        // k·k × [C, N, rows, ow] -> [C, k·k, N, rows, ow] -> [C·k·k, N·rows·ow].
        let columns = Tensor::stack(&taps, 1)?.reshape((c * k * k, n * rows * ow))?;
        drop(taps);
        let o = self.geometry.out_channels;
        // [O, N·rows·ow] -> [N, O, rows, ow], made contiguous by the bias add.
        let y = self.weight.matmul(&columns)?.reshape((o, n, rows, ow))?;
        Ok(y.transpose(0, 1)?.broadcast_add(&self.bias)?)
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

/// drape's own cuDNN convolution, through cudarc's cuDNN API as candle re-exports it. candle's
/// `conv2d` with `cudnn` asks cuDNN's heuristic for an algorithm and allocates a zeroed
/// workspace on every call (~80 convs a frame), and describes f16 convs with f16 compute.
#[cfg(feature = "cudnn")]
mod cudnn {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{sys, ConvForward, Cudnn};
    use candle_core::cuda_backend::cudarc::driver::CudaSlice;
    use candle_core::cuda_backend::{CudaStorageSlice, DeviceId};
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape};
    use half::f16;

    use super::ConvGeometry;

    /// What an algorithm choice depends on: the device, the input's `[N, C, H, W]` and the conv.
    type Key = (DeviceId, [usize; 4], ConvGeometry);

    thread_local! {
        // cudarc's cuDNN handle is bound to the thread that made it (it is neither Send nor
        // Sync), so handles, choices and workspaces are kept per thread, as candle keeps its
        // handles; a model runs its frames on one thread.
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
        static ALGORITHMS: RefCell<HashMap<Key, (sys::cudnnConvolutionFwdAlgo_t, usize)>> =
            RefCell::new(HashMap::new());
        static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> =
            RefCell::new(HashMap::new());
    }

    /// `conv(x, weight)` without bias; f16 in and out, f32 accumulation.
    pub(super) struct Conv(pub ConvGeometry);

    impl CustomOp2 for Conv {
        fn name(&self) -> &'static str {
            "drape_cudnn_conv"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the cuDNN conv runs on CUDA tensors only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            x_layout: &Layout,
            w: &CudaStorage,
            w_layout: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let g = self.0;
            let (n, c, h, wd) = x_layout.shape().dims4()?;
            let (oh, ow) = g.output_size(h, wd);
            let (Some((x0, x1)), Some((w0, w1))) =
                (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
            else {
                candle_core::bail!("cuDNN conv: input and weight must be contiguous");
            };
            let (CudaStorageSlice::F16(xs), CudaStorageSlice::F16(ws)) = (&x.slice, &w.slice)
            else {
                candle_core::bail!("cuDNN conv: f16 only, got {:?}", x.dtype());
            };
            let dev = &x.device;
            let id = dev.id();
            let cudnn = HANDLES.with(|h| -> candle_core::Result<Arc<Cudnn>> {
                if let Some(c) = h.borrow().get(&id) {
                    return Ok(c.clone());
                }
                let c = Cudnn::new(dev.cuda_stream())?;
                h.borrow_mut().insert(id, c.clone());
                Ok(c)
            })?;
            let i = |v: usize| v as i32;
            let (k, s, p) = (i(g.kernel), i(g.stride), i(g.padding));
            // f32 compute over f16 tensors: cuDNN's pseudo-half configuration.
            let mut conv = cudnn.create_conv2d::<f32>(
                [p, p],
                [s, s],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )?;
            // Tensor cores where the GPU has them, without down-converting f32 inputs.
            conv.set_math_type(sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)?;
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let x_desc = cudnn.create_4d_tensor::<f16>(nchw, [i(n), i(c), i(h), i(wd)])?;
            let w_desc = cudnn.create_4d_filter::<f16>(nchw, [i(g.out_channels), i(c), k, k])?;
            let y_desc =
                cudnn.create_4d_tensor::<f16>(nchw, [i(n), i(g.out_channels), i(oh), i(ow)])?;
            let forward = ConvForward {
                conv: &conv,
                x: &x_desc,
                w: &w_desc,
                y: &y_desc,
            };
            let key = (id, [n, c, h, wd], g);
            let (algorithm, workspace_bytes) = ALGORITHMS.with(|a| -> candle_core::Result<_> {
                if let Some(&chosen) = a.borrow().get(&key) {
                    return Ok(chosen);
                }
                let algorithm = forward.pick_algorithm()?;
                let chosen = (algorithm, forward.get_workspace_size(algorithm)?);
                a.borrow_mut().insert(key, chosen);
                Ok(chosen)
            })?;
            // SAFETY: cuDNN writes every output element (beta is 0).
            let mut y = unsafe { dev.alloc::<f16>(n * g.out_channels * oh * ow)? };
            let (xs, ws) = (xs.slice(x0..x1), ws.slice(w0..w1));
            WORKSPACES.with(|cell| -> candle_core::Result<()> {
                let mut workspaces = cell.borrow_mut();
                let workspace = match workspaces.get_mut(&id) {
                    Some(buf) if buf.len() >= workspace_bytes => buf,
                    _ => {
                        // Grown, never per call: the old buffer is freed in stream order.
                        // SAFETY: a workspace is scratch cuDNN writes before it reads.
                        let buf = unsafe { dev.alloc::<u8>(workspace_bytes.max(1))? };
                        workspaces.insert(id, buf);
                        workspaces.get_mut(&id).expect("just inserted")
                    }
                };
                // SAFETY: the descriptors above describe `xs`, `ws` and `y` (contiguous NCHW
                // f16 of these shapes), and the workspace holds the bytes cuDNN asked for.
                unsafe {
                    forward.launch(
                        algorithm,
                        Some(workspace),
                        (f16::ONE, f16::ZERO),
                        &xs,
                        &ws,
                        &mut y,
                    )
                }?;
                Ok(())
            })?;
            let out = CudaStorage {
                slice: CudaStorageSlice::F16(y),
                device: dev.clone(),
            };
            Ok((out, Shape::from((n, g.out_channels, oh, ow))))
        }
    }
}
