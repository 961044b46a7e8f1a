//! RoIAlign (`torchvision.ops.roi_align`) as a candle `CustomOp2` over `(features, rois)`.
//!
//! The CPU kernel follows torchvision's `roi_align_kernel.cpp` step for step (bin grid, the
//! `-1 < y < height` validity rule, edge clamping, average over the sampling points) so results
//! agree to float rounding. The multi-scale pooler calls its per-RoI part ([`RoiAlign::pool`])
//! directly on the CPU, writing each box's row of one output. The GPU kernels run the same loop as torchvision's
//! `roi_align_forward_kernel`, one thread per output element, on f32 or f16 features
//! (accumulating in f32): `cuda_fwd` launches `kernels/roi_align.cu` (PTX built by build.rs),
//! `metal_fwd` `kernels/roi_align.metal` (compiled at run time, once per device).

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

thread_local! {
    /// One output bin's channel sums, per worker thread: grown once and reused, where a buffer
    /// per rayon split allocated a varying number each frame.
    static BIN_SUMS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, Copy)]
pub struct RoiAlign {
    pub output_size: (usize, usize),
    pub spatial_scale: f32,
    /// Sampling points per bin side; <= 0 means adaptive (`ceil(roi_size / output_size)`).
    pub sampling_ratio: i32,
    /// `aligned=True` shifts boxes by half a pixel; Mask R-CNN v1 uses `false`.
    pub aligned: bool,
}

impl RoiAlign {
    /// `features`: `[N, C, H, W]` (f32 on CPU; f32 or f16 on CUDA and Metal); `rois`: `[K, 5]`
    /// f32 rows of `(batch_index, x1, y1, x2, y2)` in input-image coordinates. Returns
    /// `[K, C, out_h, out_w]` in the features' dtype.
    pub fn apply(&self, features: &Tensor, rois: &Tensor) -> candle_core::Result<Tensor> {
        features.apply_op2_no_bwd(rois, self)
    }

    /// Sizes of one call, checked alike for every backend.
    fn dims(&self, features: &Layout, rois: &Layout) -> candle_core::Result<Dims> {
        let (batch, channels, height, width) = features.shape().dims4()?;
        let (num_rois, five) = rois.shape().dims2()?;
        if five != 5 {
            candle_core::bail!("roi_align: rois must be [K, 5], got {:?}", rois.shape());
        }
        Ok(Dims {
            batch,
            channels,
            height,
            width,
            num_rois,
        })
    }

    fn out_shape(&self, d: &Dims) -> Shape {
        Shape::from((
            d.num_rois,
            d.channels,
            self.output_size.0,
            self.output_size.1,
        ))
    }

    /// Scalar arguments of the GPU kernels and their output count, one thread each. The
    /// kernels index outputs and features with 32-bit integers (64-bit division costs several
    /// times as much on a GPU), so both counts must stay below [`MAX_KERNEL_ELEMENTS`]: then no
    /// index, nor an index plus the grid's stride, can wrap.
    #[cfg(any(test, feature = "cuda", feature = "metal"))]
    fn kernel_params(&self, d: &Dims) -> candle_core::Result<(KernelParams, u32)> {
        let total = self.out_shape(d).elem_count();
        let features = d.batch * d.channels * d.height * d.width;
        if total > MAX_KERNEL_ELEMENTS || features > MAX_KERNEL_ELEMENTS {
            candle_core::bail!(
                "roi_align: {total} outputs over {features} feature values exceed the kernels' \
                 32-bit indices (at most {MAX_KERNEL_ELEMENTS} each)"
            );
        }
        let total = total as u32;
        // Every size is at most a count checked above.
        let u = |v: usize| v as u32;
        let params = KernelParams {
            num_rois: u(d.num_rois),
            batch: u(d.batch),
            channels: u(d.channels),
            height: u(d.height),
            width: u(d.width),
            pooled_h: u(self.output_size.0),
            pooled_w: u(self.output_size.1),
            spatial_scale: self.spatial_scale,
            sampling_ratio: self.sampling_ratio,
            aligned: u32::from(self.aligned),
        };
        Ok((params, total))
    }
}

/// The most outputs or feature values one kernel launch indexes: 2^31 - 1, so that an index
/// plus the grid's stride (at most 2^31 threads) still fits 32 bits.
#[cfg(any(test, feature = "cuda", feature = "metal"))]
const MAX_KERNEL_ELEMENTS: usize = i32::MAX as usize;

/// Threads per block of the CUDA kernel, as its `__launch_bounds__` declares: few enough that
/// the compiler keeps every thread's registers on chip at any occupancy.
#[cfg(any(test, feature = "cuda"))]
const THREADS: u32 = 256;

/// The scalar arguments of `roi_align_{f32,f16}`, in the order kernels/roi_align.cu takes them
/// and kernels/roi_align.metal's `RoiAlignParams` declares them.
#[cfg(any(test, feature = "cuda", feature = "metal"))]
#[repr(C)]
#[derive(Clone, Copy)]
struct KernelParams {
    num_rois: u32,
    batch: u32,
    channels: u32,
    height: u32,
    width: u32,
    pooled_h: u32,
    pooled_w: u32,
    spatial_scale: f32,
    sampling_ratio: i32,
    aligned: u32,
}

struct Dims {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
    num_rois: usize,
}

/// Start and end of a contiguous operand inside its storage.
fn contiguous(layout: &Layout) -> candle_core::Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(range) => Ok(range),
        None => candle_core::bail!("roi_align: features and rois must be contiguous"),
    }
}

/// Bilinear sampling position and its four corner weights, or `None` when the point lies
/// outside the feature map (torchvision's `y < -1 || y > height` rule).
fn bilinear_corners(y: f32, x: f32, height: usize, width: usize) -> Option<([usize; 4], [f32; 4])> {
    if y < -1.0 || y > height as f32 || x < -1.0 || x > width as f32 {
        return None;
    }
    let y = y.max(0.0);
    let x = x.max(0.0);
    let (mut y_low, mut x_low) = (y as usize, x as usize);
    let (y_high, x_high);
    let (mut y, mut x) = (y, x);
    if y_low >= height - 1 {
        y_low = height - 1;
        y_high = y_low;
        y = y_low as f32;
    } else {
        y_high = y_low + 1;
    }
    if x_low >= width - 1 {
        x_low = width - 1;
        x_high = x_low;
        x = x_low as f32;
    } else {
        x_high = x_low + 1;
    }
    let ly = y - y_low as f32;
    let lx = x - x_low as f32;
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    Some((
        [
            y_low * width + x_low,
            y_low * width + x_high,
            y_high * width + x_low,
            y_high * width + x_high,
        ],
        [hy * hx, hy * lx, ly * hx, ly * lx],
    ))
}

/// A feature map `[N, C, H, W]` copied channels last, `[N, H, W, C]`: every bilinear corner is
/// then one contiguous run of C values, and the sampling loop is a vectorised multiply-add over
/// channels instead of C scattered loads per corner. One transpose of a level costs less than a
/// tenth of the gathers it replaces for the box pooler's 1000 RoIs.
pub(super) struct ChannelsLast {
    values: Vec<f32>,
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl ChannelsLast {
    pub(super) fn new(
        features: &[f32],
        (batch, channels): (usize, usize),
        (height, width): (usize, usize),
    ) -> Self {
        let plane = height * width;
        let len = batch * plane * channels;
        // Uninitialised: every row's chunk below writes all its values.
        let mut values = Vec::<f32>::with_capacity(len);
        values.spare_capacity_mut()[..len]
            .par_chunks_mut((width * channels).max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, y) = (row / height.max(1), row % height.max(1));
                for c in 0..channels {
                    let src = &features[(b * channels + c) * plane + y * width..][..width];
                    for (x, v) in src.iter().enumerate() {
                        dst[x * channels + c].write(*v);
                    }
                }
            });
        // SAFETY: each row's chunk above wrote all its `width * channels` values, and the
        // chunks cover all `batch * height` rows.
        unsafe { values.set_len(len) };
        Self {
            values,
            batch,
            channels,
            height,
            width,
        }
    }
}

impl RoiAlign {
    /// Values of one pooled RoI: `channels × out_h × out_w`.
    pub(super) fn values_per_roi(&self, channels: usize) -> usize {
        channels * self.output_size.0 * self.output_size.1
    }

    /// Pools one RoI `(batch_index, x1, y1, x2, y2)` from `map` into `out`, `[C, out_h, out_w]`,
    /// writing every value.
    pub(super) fn pool(
        &self,
        map: &ChannelsLast,
        roi: &[f32],
        out: &mut [MaybeUninit<f32>],
    ) -> candle_core::Result<()> {
        let (channels, height, width) = (map.channels, map.height, map.width);
        let plane = height * width;
        let (ph, pw) = self.output_size;
        let offset = if self.aligned { 0.5 } else { 0.0 };
        let b = roi[0] as usize;
        if roi[0] < 0.0 || b >= map.batch {
            candle_core::bail!("roi_align: batch index {} out of range", roi[0]);
        }
        let start_w = roi[1] * self.spatial_scale - offset;
        let start_h = roi[2] * self.spatial_scale - offset;
        let end_w = roi[3] * self.spatial_scale - offset;
        let end_h = roi[4] * self.spatial_scale - offset;
        let (mut roi_w, mut roi_h) = (end_w - start_w, end_h - start_h);
        if !self.aligned {
            // Malformed boxes are forced to 1×1.
            roi_w = roi_w.max(1.0);
            roi_h = roi_h.max(1.0);
        }
        let bin_h = roi_h / ph as f32;
        let bin_w = roi_w / pw as f32;
        let grid_h = if self.sampling_ratio > 0 {
            self.sampling_ratio as usize
        } else {
            (roi_h / ph as f32).ceil() as usize
        };
        let grid_w = if self.sampling_ratio > 0 {
            self.sampling_ratio as usize
        } else {
            (roi_w / pw as f32).ceil() as usize
        };
        let count = (grid_h * grid_w).max(1) as f32;
        let image = &map.values[b * plane * channels..][..plane * channels];
        let at = |i: usize| &image[i * channels..][..channels];
        BIN_SUMS.with_borrow_mut(|acc| {
            acc.resize(channels, 0.0);
            for py in 0..ph {
                for px in 0..pw {
                    acc.fill(0.0);
                    for iy in 0..grid_h {
                        let y =
                            start_h + py as f32 * bin_h + (iy as f32 + 0.5) * bin_h / grid_h as f32;
                        for ix in 0..grid_w {
                            let x = start_w
                                + px as f32 * bin_w
                                + (ix as f32 + 0.5) * bin_w / grid_w as f32;
                            let Some((idx, w)) = bilinear_corners(y, x, height, width) else {
                                continue;
                            };
                            let (p0, p1, p2, p3) = (at(idx[0]), at(idx[1]), at(idx[2]), at(idx[3]));
                            // The same sum, in the same order, as torchvision's
                            // per-channel loop, so results are bit-identical to it.
                            let corners = p0.iter().zip(p1).zip(p2).zip(p3);
                            for (a, (((v0, v1), v2), v3)) in acc.iter_mut().zip(corners) {
                                *a += w[0] * v0 + w[1] * v1 + w[2] * v2 + w[3] * v3;
                            }
                        }
                    }
                    let bin = py * pw + px;
                    for (c, v) in acc.iter().enumerate() {
                        out[c * ph * pw + bin].write(v / count);
                    }
                }
            }
        });
        Ok(())
    }
}

impl CustomOp2 for RoiAlign {
    fn name(&self) -> &'static str {
        "roi_align"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(features), CpuStorage::F32(rois)) = (s1, s2) else {
            candle_core::bail!("roi_align: features and rois must be f32 on CPU");
        };
        let ((f0, f1), (r0, r1)) = (contiguous(l1)?, contiguous(l2)?);
        let dims = self.dims(l1, l2)?;
        let rois = &rois[r0..r1];
        let map = ChannelsLast::new(
            &features[f0..f1],
            (dims.batch, dims.channels),
            (dims.height, dims.width),
        );
        let per_roi = self.values_per_roi(dims.channels);
        let k = dims.num_rois;
        // Uninitialised: every value is written below before anything reads it, and zeroing
        // the buffer first was a measurable share of the stage.
        let mut out = Vec::<f32>::with_capacity(k * per_roi);
        out.spare_capacity_mut()[..k * per_roi]
            .par_chunks_mut(per_roi.max(1))
            .zip(rois.par_chunks(5))
            .try_for_each(|(out, roi)| self.pool(&map, roi, out))?;
        // SAFETY: every RoI's pooling succeeded (an error returned above) and wrote all its
        // `channels × ph × pw` values, one per bin and channel.
        unsafe { out.set_len(k * per_roi) };
        Ok((CpuStorage::F32(out), self.out_shape(&dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{
            CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
        };
        use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
        use candle_core::CudaDevice;

        use super::ptx;

        let dims = self.dims(l1, l2)?;
        let (params, total) = self.kernel_params(&dims)?;
        let CudaStorageSlice::F32(rois) = &s2.slice else {
            candle_core::bail!("roi_align: rois must be f32, got {:?}", s2.dtype());
        };
        let (r0, r1) = contiguous(l2)?;
        let rois = rois.slice(r0..r1);
        let dev = &s1.device;

        fn run<T: DeviceRepr>(
            p: KernelParams,
            total: u32,
            name: &str,
            dev: &CudaDevice,
            features: &CudaView<'_, T>,
            rois: &CudaView<'_, f32>,
        ) -> candle_core::Result<CudaSlice<T>> {
            let func = dev.get_or_load_custom_func(name, "drape_roi_align", ptx::ROI_ALIGN)?;
            // SAFETY: every element is written by the kernel below before anyone reads it.
            let out = unsafe { dev.alloc::<T>(total as usize)? };
            if total == 0 {
                return Ok(out);
            }
            let mut b = func.builder();
            b.arg(features);
            b.arg(rois);
            b.arg(&out);
            candle_core::builder_arg!(
                b,
                p.num_rois,
                p.batch,
                p.channels,
                p.height,
                p.width,
                p.pooled_h,
                p.pooled_w,
                p.spatial_scale,
                p.sampling_ratio,
                p.aligned
            );
            let config = LaunchConfig {
                grid_dim: (total.div_ceil(THREADS), 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list matches `roi_align_{f32,f16}` in kernels/roi_align.cu,
            // and the buffers hold the sizes `p` describes.
            unsafe { b.launch(config) }.w()?;
            Ok(out)
        }

        let (f0, f1) = contiguous(l1)?;
        let slice = match &s1.slice {
            CudaStorageSlice::F32(f) => CudaStorageSlice::F32(run(
                params,
                total,
                "roi_align_f32",
                dev,
                &f.slice(f0..f1),
                &rois,
            )?),
            CudaStorageSlice::F16(f) => CudaStorageSlice::F16(run(
                params,
                total,
                "roi_align_f16",
                dev,
                &f.slice(f0..f1),
                &rois,
            )?),
            _ => candle_core::bail!(
                "roi_align: features must be f32 or f16, got {:?}",
                s1.dtype()
            ),
        };
        let storage = candle_core::CudaStorage {
            slice,
            device: dev.clone(),
        };
        Ok((storage, self.out_shape(&dims)))
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s1: &candle_core::MetalStorage,
        l1: &Layout,
        s2: &candle_core::MetalStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::{DType, MetalStorage};
        use objc2_metal::MTLSize;

        let dims = self.dims(l1, l2)?;
        let (params, total) = self.kernel_params(&dims)?;
        let dtype = s1.dtype();
        if s2.dtype() != DType::F32 {
            candle_core::bail!("roi_align: rois must be f32, got {:?}", s2.dtype());
        }
        let ((f0, _), (r0, _)) = (contiguous(l1)?, contiguous(l2)?);
        let device = s1.device();
        let pipeline = metal::pipeline(device, dtype)?;
        let total = total as usize;
        let out = device
            .new_buffer_builder()
            .with_size_for(total, dtype)
            .with_label("roi_align")
            .build()?;
        if total > 0 {
            let guard = device.command_encoder()?;
            let encoder = guard.as_ref();
            encoder.set_compute_pipeline_state(&pipeline);
            encoder.set_input_buffer(0, Some(s1.buffer()), f0 * dtype.size_in_bytes());
            encoder.set_input_buffer(1, Some(s2.buffer()), r0 * DType::F32.size_in_bytes());
            encoder.set_output_buffer(2, Some(&out), 0);
            encoder.set_bytes(3, &params);
            let width = pipeline.max_total_threads_per_threadgroup().min(total);
            let size = |width| MTLSize {
                width,
                height: 1,
                depth: 1,
            };
            encoder.dispatch_thread_groups(size(total.div_ceil(width)), size(width));
        }
        let storage = MetalStorage::new(out, device.clone(), total, dtype);
        Ok((storage, self.out_shape(&dims)))
    }
}

/// `kernels/roi_align.metal`, compiled at run time once per device.
#[cfg(feature = "metal")]
mod metal {
    use std::sync::Mutex;

    use candle_core::metal_backend::{DeviceId, MetalDevice};
    use candle_core::{DType, MetalError};
    use candle_metal_kernels::metal::ComputePipeline;
    use objc2_metal::MTLCompileOptions;

    const SOURCE: &str = include_str!("../../kernels/roi_align.metal");

    /// The shader's kernel for each feature dtype.
    const KERNELS: [(DType, &str); 2] =
        [(DType::F32, "roi_align_f32"), (DType::F16, "roi_align_f16")];

    /// The kernel for `dtype` on `device`. The first call per device compiles the shader, with
    /// the lock held so concurrent first calls compile it once.
    pub(super) fn pipeline(
        device: &MetalDevice,
        dtype: DType,
    ) -> candle_core::Result<ComputePipeline> {
        static CACHE: Mutex<Vec<(DeviceId, DType, ComputePipeline)>> = Mutex::new(Vec::new());
        let Some(&(_, name)) = KERNELS.iter().find(|(d, _)| *d == dtype) else {
            candle_core::bail!("roi_align: features must be f32 or f16, got {dtype:?}");
        };
        let mut cache = CACHE.lock().map_err(MetalError::from)?;
        let cached = |cache: &[(DeviceId, DType, ComputePipeline)]| {
            cache
                .iter()
                .find(|(id, d, _)| *id == device.id() && *d == dtype)
                .map(|(_, _, p)| p.clone())
        };
        if let Some(p) = cached(&cache) {
            return Ok(p);
        }
        // Fast math off: the kernel then rounds as the CPU reference does (candle compiles its
        // own kernels with it on). The shader's pragmas say the same for newer compilers.
        let options = MTLCompileOptions::new();
        #[allow(deprecated)]
        options.setFastMathEnabled(false);
        let mtl = device.metal_device();
        let library = mtl
            .new_library_with_source(SOURCE, Some(&options))
            .map_err(MetalError::from)?;
        for (d, name) in KERNELS {
            let function = library.get_function(name, None).map_err(MetalError::from)?;
            let pipeline = mtl
                .new_compute_pipeline_state_with_function(&function)
                .map_err(MetalError::from)?;
            cache.push((device.id(), d, pipeline));
        }
        cached(&cache).ok_or_else(|| MetalError::Message(format!("roi_align: no {name}")).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn launches_that_32_bit_indices_cannot_cover_are_refused() {
        let op = RoiAlign {
            output_size: (14, 14),
            spatial_scale: 0.25,
            sampling_ratio: 2,
            aligned: false,
        };
        let dims = |num_rois, channels, height, width| Dims {
            batch: 1,
            channels,
            height,
            width,
            num_rois,
        };
        // (rois, channels, feature h, w) -> accepted: a full frame's masks, then outputs and
        // features one past 2^31 - 1.
        let cases = [
            ((100, 256, 200, 336), true),
            ((MAX_KERNEL_ELEMENTS / 196, 1, 1, 1), true),
            ((MAX_KERNEL_ELEMENTS / 196 + 1, 1, 1, 1), false),
            ((1, 1, MAX_KERNEL_ELEMENTS, 1), true),
            ((1, 1, MAX_KERNEL_ELEMENTS + 1, 1), false),
        ];
        for ((r, c, h, w), ok) in cases {
            let got = op.kernel_params(&dims(r, c, h, w));
            assert_eq!(got.is_ok(), ok, "{r} rois, {c}×{h}×{w}: {:?}", got.err());
        }
    }

    #[test]
    fn averages_bilinear_samples_like_torchvision() {
        // A 4×4 ramp f(y, x) = 4y + x is linear, so every in-bounds bilinear sample is exact
        // and a bin's average is f at the bin centre.
        let data: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let features = Tensor::from_vec(data, (1, 1, 4, 4), &Device::Cpu).unwrap();
        let rois = Tensor::from_vec(vec![0f32, 0.0, 0.0, 2.0, 2.0], (1, 5), &Device::Cpu).unwrap();
        let op = RoiAlign {
            output_size: (2, 2),
            spatial_scale: 1.0,
            sampling_ratio: 2,
            aligned: false,
        };
        let out: Vec<f32> = op
            .apply(&features, &rois)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Bin centres (0.5, 0.5), (0.5, 1.5), (1.5, 0.5), (1.5, 1.5).
        assert_eq!(out, vec![2.5, 3.5, 6.5, 7.5]);
    }

    #[test]
    fn the_gpu_kernels_pool_what_the_cpu_does() {
        use crate::model::kernel_emu::{self, Values};
        use half::f16;

        let mut rng = crate::test_rng::TestRng::new(5);
        let mut unit = || rng.unit();
        let (n, c, h, w) = (2, 3, 13, 17);
        let features: Vec<f32> = (0..n * c * h * w).map(|_| unit() * 4.0 - 2.0).collect();
        let halves: Vec<f16> = features.iter().map(|&v| f16::from_f32(v)).collect();
        let widened: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
        // Boxes inside, across every edge, inverted, and on either image.
        let rois: Vec<f32> = (0..24)
            .flat_map(|i| {
                let (x, y) = (unit() * 90.0 - 15.0, unit() * 70.0 - 12.0);
                let (bw, bh) = (unit() * 60.0 - 5.0, unit() * 50.0 - 5.0);
                [(i % 2) as f32, x, y, x + bw, y + bh]
            })
            // With one sample per bin unaligned, these put samples exactly on y == height and
            // x == width, the edge of torchvision's validity rule.
            .chain([0.0, 0.0, 48.0, 40.0, 104.0, 1.0, 64.0, 48.0, 104.0, 104.0])
            .collect();
        let rois_t = Tensor::from_slice(&rois, (26, 5), &Device::Cpu).unwrap();
        for (seed, (sampling_ratio, aligned)) in [(2, false), (0, false), (0, true), (1, false)]
            .into_iter()
            .enumerate()
        {
            let op = RoiAlign {
                output_size: (7, 5),
                spatial_scale: 0.25,
                sampling_ratio,
                aligned,
            };
            let pooled = |f: &[f32]| {
                let t = Tensor::from_slice(f, (n, c, h, w), &Device::Cpu).unwrap();
                op.apply(&t, &rois_t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            let t = Tensor::from_slice(&features, (n, c, h, w), &Device::Cpu).unwrap();
            let dims = op.dims(t.layout(), rois_t.layout()).unwrap();
            let (params, total) = op.kernel_params(&dims).unwrap();
            // SAFETY: KernelParams is #[repr(C)], ten 4-byte fields.
            let words: [u32; 10] = unsafe { std::mem::transmute(params) };
            let seed = seed as u64;
            // CUDA's launch, and Metal's whole threadgroups (256 wide here), which run threads
            // past the last output.
            let launch = (total.div_ceil(THREADS), THREADS);
            let metal_threads = total.div_ceil(256) * 256;
            let kernels = |input: &Values, out: *mut std::ffi::c_void, which: usize| {
                if which == 0 {
                    kernel_emu::roi_align(input, &rois, out, &words, launch, seed);
                } else {
                    kernel_emu::metal_roi_align(input, &rois, out, &words, metal_threads, seed);
                }
            };
            let want32 = pooled(&features);
            let want16: Vec<f16> = pooled(&widened).iter().map(|&v| f16::from_f32(v)).collect();
            for (which, name) in ["cuda", "metal"].into_iter().enumerate() {
                // Room for every thread the launch runs; the ones past the end must not write.
                let mut out = vec![f32::NAN; metal_threads as usize];
                kernels(&Values::F32(&features), out.as_mut_ptr().cast(), which);
                let (out, past) = out.split_at(total as usize);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let case = format!("{name} {sampling_ratio} {aligned}");
                assert_eq!(bits(out), bits(&want32), "f32 {case}");
                assert!(past.iter().all(|v| v.is_nan()), "{case} wrote past the end");

                let mut out = vec![f16::NAN; metal_threads as usize];
                kernels(&Values::F16(&halves), out.as_mut_ptr().cast(), which);
                let (out, past) = out.split_at(total as usize);
                assert_eq!(out, &want16[..], "f16 {case}");
                assert!(past.iter().all(|v| v.is_nan()), "{case} wrote past the end");
            }
        }
    }

    #[test]
    fn samples_outside_the_map_count_as_zero() {
        let features = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        // Box far right of the map: every sample has x > width.
        let rois =
            Tensor::from_vec(vec![0f32, 10.0, 0.0, 12.0, 2.0], (1, 5), &Device::Cpu).unwrap();
        let op = RoiAlign {
            output_size: (1, 1),
            spatial_scale: 1.0,
            sampling_ratio: 2,
            aligned: false,
        };
        let out: Vec<f32> = op
            .apply(&features, &rois)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(out, vec![0.0]);
    }
}
