//! The CPU convolution every conv of the model runs through: im2col over tiles of output rows
//! into a per-thread scratch buffer, one GEMM per tile writing straight into the NCHW output,
//! with bias, an optional residual and ReLU fused around it.
//!
//! Why not candle's `conv2d`: it re-lays-out the kernel on every call, allocates its column
//! buffers per call, and leaves bias, residual and activation as separate full passes over the
//! output. Here the weights are used in PyTorch's `[O, C·k·k]` layout as loaded, the scratch is
//! allocated once per thread, and the epilogue touches each output tile while it is in cache.

use std::cell::RefCell;
use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage};
use rayon::prelude::*;

use super::winograd::{Epilogue, Tiles, Winograd};

/// Output pixels per GEMM tile of a 1×1 conv, which reads its input in place. `gemm`
/// allocates on every call, so fewer, wider tiles cost fewer allocations: 4096 rather than 768
/// took the full R50 at 512 from about 1,500 to about 1,200 model allocations a frame, no
/// slower.
const POINTWISE_PIXELS: usize = 4096;
/// Bytes of one im2col tile's column buffer (one per thread): the stem's 147 rows get about
/// 7,000 pixels a tile, a 512-channel 3×3 conv's 4,608 rows about 230, rather than both 768
/// (14 MB per thread for the latter).
const COLUMN_BYTES: usize = 4 << 20;

/// Input channels up to which a 3×3 stride-1 conv runs as Winograd. Its transformed weights
/// are 4× the conv's (36 matrices for 9 taps), and a 512-channel conv's 38 MB of them are read
/// for every map; the maps there (ResNet's last stage: 16×16 at 512, 25×25 at 800) are too small
/// for the saved multiplies to pay for that. As im2col those convs made the full R50's backbone
/// about 5% faster at 512 (and 2% at 800) and its peak RSS 60–100 MiB smaller.
const WINOGRAD_MAX_IN: usize = 256;

thread_local! {
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A 2-d convolution with bias, optionally followed by a residual add and ReLU.
#[derive(Debug, Clone)]
pub struct FusedConv {
    pub method: Method,
    pub bias: Arc<Vec<f32>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub relu: bool,
}

/// How a conv computes, each with the only copy of the weights it reads: a Winograd conv keeps
/// just its transformed weights, since holding PyTorch's layout beside them would cost the full
/// R50 about 54 MB that nothing reads.
#[derive(Debug, Clone)]
pub enum Method {
    /// im2col and one GEMM per tile on `[out, in * k * k]`, row-major: PyTorch's layout.
    Im2col(Arc<Vec<f32>>),
    /// Winograd on weights transformed at load, for 3×3 stride-1 pad-1 convs.
    Winograd(Arc<Winograd>),
}

/// Raw output pointer shared by parallel workers (conv tiles, Winograd jobs and its
/// load-time weight transform); each writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: every user hands each worker a disjoint part of the buffer (said at each use), and
// the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
// SAFETY: as for Send: no element is written by two workers or read during the loop.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, not a field access, so closures capture the `Sync` wrapper, not the pointer.
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

impl FusedConv {
    /// A conv of `weight` (`[out, in, k, k]`), using Winograd where the shape allows and it
    /// pays (see [`WINOGRAD_MAX_IN`]).
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        in_channels: usize,
        out_channels: usize,
        (kernel, stride, padding): (usize, usize, usize),
    ) -> Self {
        let method = if kernel == 3 && stride == 1 && padding == 1 && in_channels <= WINOGRAD_MAX_IN
        {
            Method::Winograd(Arc::new(Winograd::new(&weight, out_channels, in_channels)))
        } else {
            Method::Im2col(Arc::new(weight))
        };
        Self {
            method,
            bias: Arc::new(bias),
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            relu: false,
        }
    }

    pub fn output_size(&self, h: usize, w: usize) -> (usize, usize) {
        let k = self.kernel;
        (
            (h + 2 * self.padding - k) / self.stride + 1,
            (w + 2 * self.padding - k) / self.stride + 1,
        )
    }

    /// Multiply-accumulates of one forward over an `h × w` input, for throughput reports.
    pub fn macs(&self, h: usize, w: usize) -> u64 {
        let (oh, ow) = self.output_size(h, w);
        (self.out_channels * self.in_channels * self.kernel * self.kernel * oh * ow) as u64
    }

    /// A 1×1 stride-1 conv: a GEMM on the input as it lies, without im2col.
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padding == 0
    }

    /// Rows of the im2col matrix: `in · k · k`.
    fn k_dim(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }

    /// `input`: `[n, in, h, w]` contiguous; `residual`: `[n, out, oh, ow]` or none.
    fn run(
        &self,
        input: &[f32],
        (n, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
    ) -> (Vec<f32>, Shape) {
        let (out, (oh, ow)) = self.run_values(input, (n, h, w), residual);
        (out, Shape::from((n, self.out_channels, oh, ow)))
    }

    /// [`Self::run`]'s values and the output's (height, width), without a candle `Shape`
    /// (which allocates), for callers that chain convs on host buffers.
    pub(super) fn run_values(
        &self,
        input: &[f32],
        dims: (usize, usize, usize),
        residual: Option<&[f32]>,
    ) -> (Vec<f32>, (usize, usize)) {
        let mut out = Vec::new();
        let size = self.run_into(input, dims, residual, &mut out);
        (out, size)
    }

    /// [`Self::run_values`] into `out`, replacing what it held; its memory is reused when it is
    /// large enough. Returns the output's (height, width).
    pub(super) fn run_into(
        &self,
        input: &[f32],
        (n, h, w): (usize, usize, usize),
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) -> (usize, usize) {
        let (oh, ow) = self.output_size(h, w);
        let plane = oh * ow;
        let len = n * self.out_channels * plane;
        // Uninitialised: both methods write every value of every output plane, and zeroing the
        // buffer first took about 2% of a frame (mimalloc zeroes reused pages itself). A buffer
        // too small is replaced, not grown: growing would copy the values it is about to lose.
        out.clear();
        if out.capacity() < len {
            *out = Vec::with_capacity(len);
        }
        let ptr = OutPtr(out.as_mut_ptr());
        match &self.method {
            Method::Winograd(wino) => {
                // Jobs are runs of tile rows numbered across the whole batch, so a batch of small
                // images (the mask head's RoIs) fills GEMMs as wide as one large image.
                let tiles = Tiles::new(n, h, w);
                let rows = tiles.rows_per_job(rayon::current_num_threads());
                let epilogue = Epilogue {
                    bias: &self.bias,
                    residual,
                    relu: self.relu,
                };
                (0..tiles.rows().div_ceil(rows))
                    .into_par_iter()
                    .for_each(|job| {
                        let g0 = job * rows;
                        let g1 = (g0 + rows).min(tiles.rows());
                        // SAFETY: this job writes only the output rows of tile rows g0..g1, which
                        // no other job touches, and `out` outlives the parallel loop.
                        unsafe { wino.rows(input, tiles, (g0, g1), &epilogue, ptr.get()) };
                    });
            }
            Method::Im2col(weight) => {
                // About `tile_pixels` columns per GEMM; for a single image, a tile count that is
                // a multiple of the thread count, so a map is not split into one big tile and a
                // sliver, nor left to one thread.
                let tile_pixels = if self.is_pointwise() {
                    POINTWISE_PIXELS
                } else {
                    (COLUMN_BYTES / size_of::<f32>() / self.k_dim()).max(1)
                };
                let mut tiles_wanted = (oh * ow).div_ceil(tile_pixels);
                if n == 1 {
                    tiles_wanted =
                        tiles_wanted.next_multiple_of(rayon::current_num_threads().max(1));
                }
                let rows_per_tile = oh.div_ceil(tiles_wanted).clamp(1, oh);
                let tiles_per_image = oh.div_ceil(rows_per_tile);
                (0..n * tiles_per_image).into_par_iter().for_each(|job| {
                    let (img, tile) = (job / tiles_per_image, job % tiles_per_image);
                    let y0 = tile * rows_per_tile;
                    let y1 = (y0 + rows_per_tile).min(oh);
                    // SAFETY: this job writes only rows y0..y1 of image `img`'s output planes,
                    // which no other job touches, and `out` outlives the parallel loop.
                    unsafe { self.tile(weight, input, (img, h, w), (y0, y1), residual, ptr.get()) };
                });
            }
        }
        // SAFETY: the jobs above wrote all `len` values: Winograd's cover every tile row of
        // every image, the im2col tiles every output row, each for every channel.
        unsafe { out.set_len(len) };
        (oh, ow)
    }

    /// One tile: output rows `y0..y1` of image `img`, with `weight` in PyTorch's layout.
    ///
    /// # Safety
    /// `out` must be valid for writes of the whole `[n, out_channels, oh, ow]` output (it may be
    /// uninitialised: the tile's values are written before they are read), and
    /// no other thread may touch image `img`'s output rows `y0..y1` during the call.
    unsafe fn tile(
        &self,
        weight: &[f32],
        input: &[f32],
        (img, h, w): (usize, usize, usize),
        (y0, y1): (usize, usize),
        residual: Option<&[f32]>,
        out: *mut f32,
    ) {
        let (oh, ow) = self.output_size(h, w);
        let plane = oh * ow;
        let cols = (y1 - y0) * ow;
        let k_dim = self.k_dim();
        let image = &input[img * self.in_channels * h * w..][..self.in_channels * h * w];
        let dst = out.add(img * self.out_channels * plane + y0 * ow);

        // Epilogue, first half: dst = bias (+ residual), then GEMM accumulates into it. The
        // rows may be uninitialised until written here.
        for o in 0..self.out_channels {
            let row =
                std::slice::from_raw_parts_mut(dst.add(o * plane).cast::<MaybeUninit<f32>>(), cols);
            let b = self.bias[o];
            match residual {
                Some(r) => {
                    let r = &r[(img * self.out_channels + o) * plane + y0 * ow..][..cols];
                    row.iter_mut().zip(r).for_each(|(d, r)| {
                        d.write(b + r);
                    });
                }
                None => row.iter_mut().for_each(|d| {
                    d.write(b);
                }),
            }
        }

        COLUMNS.with_borrow_mut(|columns| {
            let (rhs, rhs_rs) = if self.is_pointwise() {
                // A 1×1 conv is a GEMM on the input as it lies: [C, H*W].
                (image.as_ptr().add(y0 * ow), (h * w) as isize)
            } else {
                let col = scratch(columns, k_dim * cols);
                self.im2col(image, (h, w), (y0, y1), col);
                (col.as_ptr(), cols as isize)
            };
            gemm::gemm(
                self.out_channels,
                cols,
                k_dim,
                dst,
                1,
                plane as isize,
                true,
                weight.as_ptr(),
                1,
                k_dim as isize,
                rhs,
                1,
                rhs_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        });

        if self.relu {
            for o in 0..self.out_channels {
                let row = std::slice::from_raw_parts_mut(dst.add(o * plane), cols);
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    }

    /// Column matrix `[C·k·k, cols]` for output rows `y0..y1`, zero outside the image.
    fn im2col(
        &self,
        image: &[f32],
        (h, w): (usize, usize),
        (y0, y1): (usize, usize),
        col: &mut [f32],
    ) {
        let (k, s, p) = (self.kernel, self.stride, self.padding as isize);
        let ow = self.output_size(h, w).1;
        let cols = (y1 - y0) * ow;
        for c in 0..self.in_channels {
            let src = &image[c * h * w..][..h * w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut col[((c * k + ky) * k + kx) * cols..][..cols];
                    for (r, oy) in (y0..y1).enumerate() {
                        let dst = &mut row[r * ow..][..ow];
                        let iy = (oy * s) as isize - p + ky as isize;
                        if iy < 0 || iy >= h as isize {
                            dst.fill(0.0);
                            continue;
                        }
                        let line = &src[iy as usize * w..][..w];
                        if s == 1 {
                            // ix = ox - p + kx: one contiguous run with zero margins.
                            let shift = kx as isize - p;
                            let lo = (-shift).clamp(0, ow as isize) as usize;
                            let hi = (w as isize - shift).clamp(lo as isize, ow as isize) as usize;
                            dst[..lo].fill(0.0);
                            dst[lo..hi].copy_from_slice(
                                &line[(lo as isize + shift) as usize
                                    ..(hi as isize + shift) as usize],
                            );
                            dst[hi..].fill(0.0);
                        } else {
                            // ix = ox·s - p + kx: in the image for ox in lo..hi, zero outside.
                            let shift = kx as isize - p;
                            let lo = ((-shift).max(0) as usize).div_ceil(s).min(ow);
                            let hi = ((w as isize - shift).max(0) as usize)
                                .div_ceil(s)
                                .clamp(lo, ow);
                            dst[..lo].fill(0.0);
                            if hi > lo {
                                let first = (lo * s) as isize + shift;
                                for (d, &v) in dst[lo..hi]
                                    .iter_mut()
                                    .zip(line[first as usize..].iter().step_by(s))
                                {
                                    *d = v;
                                }
                            }
                            dst[hi..].fill(0.0);
                        }
                    }
                }
            }
        }
    }

    fn check_input(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        if c != self.in_channels {
            candle_core::bail!("conv expects {} input channels, got {c}", self.in_channels);
        }
        if h + 2 * self.padding < self.kernel || w + 2 * self.padding < self.kernel {
            candle_core::bail!(
                "conv input {h}x{w} is smaller than its {0}x{0} kernel",
                self.kernel
            );
        }
        Ok((n, c, h, w))
    }
}

/// The first `len` values of a per-thread scratch buffer, grown to `len` the first time a
/// thread needs that many and reused after, so the steady state allocates nothing.
pub(super) fn scratch(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// A CPU op's input as an f32 slice; `op` names the op in the error.
pub(super) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: input must be contiguous"),
        _ => candle_core::bail!("{op}: the CPU computes in f32"),
    }
}

/// A tensor's values borrowed in place, from its `storage_and_layout()`: the tensor must be a
/// contiguous f32 one on the CPU. `what` names the caller in the error.
pub(super) fn host_f32<'a>(
    storage: &'a Storage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        Storage::Cpu(values) => contiguous_f32(values, layout, what),
        _ => candle_core::bail!("{what}: every input must be on the CPU"),
    }
}

impl CustomOp1 for FusedConv {
    fn name(&self) -> &'static str {
        "fused_conv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _, h, w) = self.check_input(l)?;
        let (out, shape) = self.run(
            contiguous_f32(s, l, CustomOp1::name(self))?,
            (n, h, w),
            None,
        );
        Ok((CpuStorage::F32(out), shape))
    }
}

/// The same conv with `residual` (second operand) added before the ReLU.
impl CustomOp2 for FusedConv {
    fn name(&self) -> &'static str {
        "fused_conv_residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, _, h, w) = self.check_input(l1)?;
        let (oh, ow) = self.output_size(h, w);
        if l2.shape().dims() != [n, self.out_channels, oh, ow] {
            candle_core::bail!(
                "residual shape {:?} does not match the conv output",
                l2.shape()
            );
        }
        let residual = contiguous_f32(s2, l2, CustomOp2::name(self))?;
        let (out, shape) = self.run(
            contiguous_f32(s1, l1, CustomOp2::name(self))?,
            (n, h, w),
            Some(residual),
        );
        Ok((CpuStorage::F32(out), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Uniform in [-1, 1).
    fn noise(n: usize, seed: u32) -> Vec<f32> {
        let mut rng = crate::test_rng::TestRng::new(seed);
        (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect()
    }

    /// im2col against the convolution's definition, summed in f64, for the strides, kernels and
    /// paddings the model has, on maps smaller than the kernel, odd and even.
    #[test]
    fn im2col_matches_the_direct_sum_at_every_stride() {
        for (case, &(k, stride, pad)) in [(7, 2, 3), (3, 2, 1), (1, 2, 0), (3, 1, 1), (1, 1, 0)]
            .iter()
            .enumerate()
        {
            for &(h, w) in &[(1, 1), (2, 3), (9, 7), (16, 11)] {
                let (cin, cout) = (3, 5);
                let seed = 100 * case as u32 + (h * w) as u32;
                let weight = noise(cout * cin * k * k, seed);
                let bias = noise(cout, seed + 1);
                let input = noise(cin * h * w, seed + 2);
                let conv = FusedConv {
                    method: Method::Im2col(Arc::new(weight.clone())),
                    ..FusedConv::new(weight.clone(), bias.clone(), cin, cout, (k, stride, pad))
                };
                let (got, (oh, ow)) = conv.run_values(&input, (1, h, w), None);
                for (o, oy, ox) in (0..cout)
                    .flat_map(|o| (0..oh).flat_map(move |oy| (0..ow).map(move |ox| (o, oy, ox))))
                {
                    let mut want = f64::from(bias[o]);
                    for (c, ky, kx) in (0..cin)
                        .flat_map(|c| (0..k).flat_map(move |ky| (0..k).map(move |kx| (c, ky, kx))))
                    {
                        let iy = (oy * stride + ky) as isize - pad as isize;
                        let ix = (ox * stride + kx) as isize - pad as isize;
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            let x = input[(c * h + iy as usize) * w + ix as usize];
                            want +=
                                f64::from(weight[((o * cin + c) * k + ky) * k + kx]) * f64::from(x);
                        }
                    }
                    let g = got[(o * oh + oy) * ow + ox];
                    assert!(
                        (f64::from(g) - want).abs() < 1e-5,
                        "k{k} s{stride} p{pad} {h}×{w} ({o}, {oy}, {ox}): {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_3x3_stride_1_convs_up_to_the_channel_limit_run_as_winograd() {
        let method = |cin: usize, (k, s, p)| {
            let conv = FusedConv::new(vec![0.5; 2 * cin * k * k], vec![0.0; 2], cin, 2, (k, s, p));
            matches!(conv.method, Method::Winograd(_))
        };
        assert!(method(WINOGRAD_MAX_IN, (3, 1, 1)));
        assert!(method(3, (3, 1, 1)));
        assert!(!method(WINOGRAD_MAX_IN + 1, (3, 1, 1)));
        assert!(!method(512, (3, 1, 1)));
        assert!(!method(64, (3, 2, 1)));
        assert!(!method(64, (1, 1, 0)));
    }

    /// Winograd against im2col (the direct sum) on shapes that exercise partial tiles on both
    /// edges, jobs spanning several images, and a 256-channel reduction like the model's.
    #[test]
    fn winograd_matches_im2col_on_odd_sizes_with_residual() {
        // (images, in, out, h, w)
        let cases = [
            (2, 5, 7, 9, 11),
            (5, 3, 4, 14, 14),
            (1, 2, 3, 1, 1),
            (3, 256, 16, 7, 10),
        ];
        let mut failures = Vec::new();
        for (case, &(n, cin, cout, h, w)) in cases.iter().enumerate() {
            let seed = 10 * case as u32;
            let weight = noise(cout * cin * 9, seed + 1);
            let conv = FusedConv::new(weight.clone(), noise(cout, seed + 2), cin, cout, (3, 1, 1));
            assert!(matches!(conv.method, Method::Winograd(_)));
            let plain = FusedConv {
                method: Method::Im2col(Arc::new(weight)),
                ..conv.clone()
            };
            let input = noise(n * cin * h * w, seed + 3);
            let residual = noise(n * cout * h * w, seed + 4);
            for relu in [false, true] {
                let (a, b) = (
                    FusedConv {
                        relu,
                        ..conv.clone()
                    },
                    FusedConv {
                        relu,
                        ..plain.clone()
                    },
                );
                let (wa, _) = a.run(&input, (n, h, w), Some(&residual));
                let (wb, _) = b.run(&input, (n, h, w), Some(&residual));
                // Relative to the output's scale, as the parity tests measure.
                let scale = wb.iter().fold(1f32, |m, v| m.max(v.abs()));
                let err = wa
                    .iter()
                    .zip(&wb)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                    / scale;
                if err >= 5e-6 {
                    failures.push(format!("{n}x{cin}->{cout} {h}x{w} relu {relu}: {err:e}"));
                }
            }
        }
        assert!(failures.is_empty(), "scaled error: {failures:?}");
    }
}
