//! The stage after the model: from detections in resized-image coordinates to instances in the
//! original image. torchvision's `transform.postprocess` (`resize_boxes`,
//! `paste_masks_in_image`) followed by thresholding and COCO run-length encoding, as
//! `pycocotools.mask.encode` writes it.

use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::Result;
use crate::interp::{linear_taps, LinearTap};
use crate::model::box_ops::Box;
use crate::model::roi_heads::{Detection, MASK_SIZE};
use crate::model::{FrameSettings, MaskRcnn, ModelOutput, Timings, Workspace};
use crate::rle::{Rect, Rle};

/// `paste_masks_in_image(padding=1)`: masks get a one-pixel zero border and boxes grow to match.
const PASTE_PADDING: usize = 1;

/// A final detection in original-image pixels.
#[derive(Debug, Clone)]
pub struct Instance {
    pub class_id: usize,
    pub score: f32,
    pub bbox: Box,
    /// `None` when a latency budget capped the mask head before this detection.
    pub mask: Option<Rle>,
}

/// The result of one image.
#[derive(Debug, Clone, Default)]
pub struct Detections {
    pub width: usize,
    pub height: usize,
    pub instances: Vec<Instance>,
    pub timings: Timings,
    /// (width, height) of the resized image the model ran on.
    pub input_size: (usize, usize),
    /// How many instances got a mask (the rest were beyond the frame's mask cap).
    pub masked: usize,
}

impl MaskRcnn {
    /// Runs the whole model on one interleaved 8-bit RGB image of `(height, width)`, then
    /// postprocesses it: torchvision's `model(images)` for one image. Streams keep a
    /// [`Detector`] (or a [`Workspace`] and a [`Postprocessor`]) instead, so their buffers
    /// outlive the frame.
    pub fn detect(&self, rgb: &[u8], size: (usize, usize)) -> Result<Detections> {
        let mut out = Detections::default();
        Detector::default().run(self, rgb, size, self.default_settings(), &mut out)?;
        Ok(out)
    }
}

/// Both stages' buffers for a caller that runs them back to back on each image (bench,
/// calibration, evaluation), reused across images.
#[derive(Default)]
pub struct Detector {
    pub workspace: Workspace,
    pub model_output: ModelOutput,
    pub postprocessor: Postprocessor,
}

impl Detector {
    /// [`MaskRcnn::detect_into`] and then [`Postprocessor::run`] into `out`.
    pub fn run(
        &mut self,
        model: &MaskRcnn,
        rgb: &[u8],
        size: (usize, usize),
        settings: FrameSettings,
        out: &mut Detections,
    ) -> Result<()> {
        model.detect_into(
            rgb,
            size,
            settings,
            &mut self.workspace,
            &mut self.model_output,
        )?;
        self.postprocessor
            .run(&self.model_output, model.config().mask_thresh, out)
    }
}

/// Where one mask lands: `expand_boxes` then `paste_mask_in_image`'s integer box, which the
/// padded 30×30 mask is resized to, and its part inside the image, the only part evaluated.
#[derive(Debug, Clone, Copy)]
struct Region {
    /// Top-left corner of the resized mask; may lie outside the image.
    x0: i64,
    y0: i64,
    /// Size of the resized mask.
    w: usize,
    h: usize,
    inside: Rect,
    /// Start of this mask's pixels in [`Postprocessor`]'s buffer.
    offset: usize,
}

impl Region {
    fn new(bbox: &Box, (im_h, im_w): (usize, usize), offset: usize) -> Self {
        let scale = PADDED_SIDE as f32 / MASK_SIZE as f32;
        let w_half = (bbox[2] - bbox[0]) * 0.5 * scale;
        let h_half = (bbox[3] - bbox[1]) * 0.5 * scale;
        let x_c = (bbox[2] + bbox[0]) * 0.5;
        let y_c = (bbox[3] + bbox[1]) * 0.5;
        // `.to(torch.int64)` truncates toward zero.
        let [x0, y0, x1, y1] =
            [x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half].map(|v| v as i64);
        let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
        let (cx0, cy0) = (clip(x0, im_w), clip(y0, im_h));
        let inside = Rect {
            x0: cx0,
            y0: cy0,
            x1: clip(x1 + 1, im_w).max(cx0),
            y1: clip(y1 + 1, im_h).max(cy0),
        };
        Self {
            x0,
            y0,
            w: (x1 - x0 + 1).max(1) as usize,
            h: (y1 - y0 + 1).max(1) as usize,
            inside,
            offset,
        }
    }
}

/// Side of a mask with its `PASTE_PADDING` border.
const PADDED_SIDE: usize = MASK_SIZE + 2 * PASTE_PADDING;

/// Maps detections (and their 28×28 probability maps) from the resized image back to the
/// original: scaled boxes, masks pasted and thresholded at `mask_thresh` where the
/// probabilities are (a CUDA kernel on CUDA), so only the binary pixels inside each box come
/// to the host. Owns every buffer it needs, so a stream of frames allocates nothing on the
/// CPU path once the buffers have grown.
pub struct Postprocessor {
    /// The masks of the last call: each region's pixels inside the image, column-major,
    /// concatenated.
    pixels: Vec<u8>,
    regions: Vec<Region>,
    padded: Vec<f32>,
    /// Masks of instances from earlier frames, kept for their buffers.
    spare: Vec<Rle>,
    /// The most runs one mask has had. A buffer handed out holds at least this many, so each
    /// grows at most once after the largest mask has been seen, whichever masks it gets.
    most_runs: usize,
    rows: Vec<LinearTap>,
    /// Milliseconds spent pasting and encoding in the last call.
    paste_ms: f64,
    rle_ms: f64,
}

impl Default for Postprocessor {
    fn default() -> Self {
        Self::new()
    }
}

impl Postprocessor {
    pub fn new() -> Self {
        Self {
            pixels: Vec::new(),
            regions: Vec::new(),
            padded: vec![0.0; PADDED_SIDE * PADDED_SIDE],
            spare: Vec::new(),
            most_runs: 0,
            rows: Vec::new(),
            paste_ms: 0.0,
            rle_ms: 0.0,
        }
    }

    /// Makes `out` from what the model returned: instances in original-image pixels, masks
    /// thresholded at `mask_thresh`, and the model's timings with this stage's added.
    pub fn run(
        &mut self,
        model_output: &ModelOutput,
        mask_thresh: f32,
        out: &mut Detections,
    ) -> Result<()> {
        let m = model_output;
        let started = Instant::now();
        {
            let _span = tracing::debug_span!("paste").entered();
            self.paste_into(
                &m.detections,
                m.mask_probs.as_ref(),
                (m.image_size, m.original),
                mask_thresh,
                &mut out.instances,
            )?;
        }
        let mut t = m.timings;
        (t.paste, t.rle) = (self.paste_ms, self.rle_ms);
        t.total += started.elapsed().as_secs_f64() * 1e3;
        out.timings = t;
        (out.height, out.width) = m.original;
        out.input_size = (m.image_size.1, m.image_size.0);
        out.masked = m.masked;
        Ok(())
    }

    /// Replaces `out` with one instance per detection; the first `D` detections get masks from
    /// `mask_probs` (`[D, 28, 28]` f32 on any device; the rest were beyond the mask cap).
    pub fn paste_into(
        &mut self,
        detections: &[Detection],
        mask_probs: Option<&Tensor>,
        (resized, original): ((usize, usize), (usize, usize)),
        mask_thresh: f32,
        out: &mut Vec<Instance>,
    ) -> Result<()> {
        self.spare.extend(out.drain(..).filter_map(|i| i.mask));
        let (oh, ow) = original;
        // `resize_boxes`: ratios in f32, original / resized.
        let ratio_h = oh as f32 / resized.0 as f32;
        let ratio_w = ow as f32 / resized.1 as f32;
        out.extend(detections.iter().map(|det| {
            let b = det.bbox;
            Instance {
                class_id: det.label,
                score: det.score,
                bbox: [
                    b[0] * ratio_w,
                    b[1] * ratio_h,
                    b[2] * ratio_w,
                    b[3] * ratio_h,
                ],
                mask: None,
            }
        }));
        let masked = match mask_probs {
            Some(p) => p.dim(0)?,
            None => 0,
        };
        if masked > detections.len() {
            let msg = format!("{masked} masks for {} detections", detections.len());
            return Err(candle_core::Error::Msg(msg).into());
        }
        self.regions.clear();
        let mut offset = 0;
        for instance in &out[..masked] {
            let region = Region::new(&instance.bbox, original, offset);
            offset += region.inside.area();
            self.regions.push(region);
        }
        self.pixels.clear();
        self.pixels.resize(offset, 0);
        let started = Instant::now();
        if let Some(probs) = mask_probs.filter(|_| masked > 0) {
            self.paste(probs, mask_thresh)?;
        }
        let pasted = Instant::now();
        for (instance, region) in out.iter_mut().zip(&self.regions) {
            let mut rle = self.spare.pop().unwrap_or(Rle {
                height: 0,
                width: 0,
                counts: Vec::new(),
            });
            rle.counts.clear();
            rle.counts.reserve(self.most_runs);
            let pixels = &self.pixels[region.offset..][..region.inside.area()];
            rle.encode_region_into(pixels, region.inside, original);
            self.most_runs = self.most_runs.max(rle.counts.len());
            instance.mask = Some(rle);
        }
        self.paste_ms = (pasted - started).as_secs_f64() * 1e3;
        self.rle_ms = pasted.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Fills `pixels` from the probabilities, on their device.
    fn paste(&mut self, probs: &Tensor, thresh: f32) -> Result<()> {
        if self.pixels.is_empty() {
            return Ok(());
        }
        // The mask stage's one read: the pasted pixels (CUDA), the probabilities (Metal), or on
        // the CPU the probabilities used in place, counted alike so the CPU pins the GPU's count.
        crate::device::count_read();
        {
            let (storage, layout) = probs.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(p)), Some((start, end))) => {
                    self.paste_cpu(&p[start..end], thresh);
                    return Ok(());
                }
                #[cfg(feature = "cuda")]
                (Storage::Cuda(p), Some((start, end))) => {
                    cuda::paste(p, start..end, &self.regions, thresh, &mut self.pixels)?;
                    return Ok(());
                }
                _ => {}
            }
        }
        // Metal (no kernel: unified memory makes this copy cheap), or an unexpected layout.
        let cpu = probs
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?;
        self.paste(&cpu, thresh)
    }

    fn paste_cpu(&mut self, probs: &[f32], thresh: f32) {
        let side = PADDED_SIDE;
        for (region, probs) in self
            .regions
            .iter()
            .zip(probs.chunks_exact(MASK_SIZE * MASK_SIZE))
        {
            for (dst, src) in self.padded[PASTE_PADDING * side..]
                .chunks_exact_mut(side)
                .zip(probs.chunks_exact(MASK_SIZE))
            {
                dst[PASTE_PADDING..PASTE_PADDING + MASK_SIZE].copy_from_slice(src);
            }
            let dst = &mut self.pixels[region.offset..][..region.inside.area()];
            paste_one(&self.padded, region, dst, thresh, &mut self.rows);
        }
    }
}

/// `paste_mask_in_image` for one padded mask: the bilinear resize (torch's `interpolate`,
/// `align_corners=False`) of the part inside the image, thresholded into `dst` column by
/// column. `kernels/paste.cu` is the same loop per pixel.
fn paste_one(
    padded: &[f32],
    region: &Region,
    dst: &mut [u8],
    thresh: f32,
    rows: &mut Vec<LinearTap>,
) {
    let side = PADDED_SIDE;
    let inside = region.inside;
    if inside.area() == 0 {
        return;
    }
    rows.clear();
    rows.extend(
        linear_taps(side, region.h)
            .skip((inside.y0 as i64 - region.y0) as usize)
            .take(inside.y1 - inside.y0),
    );
    let cols = linear_taps(side, region.w)
        .skip((inside.x0 as i64 - region.x0) as usize)
        .take(inside.x1 - inside.x0);
    for (c, dst) in cols.zip(dst.chunks_exact_mut(rows.len())) {
        // The column interpolated across once, every padded row: the same products and sums
        // the per-pixel expression `h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d)` forms.
        let (w1, w0) = (c.l1, 1.0 - c.l1);
        let mut across = [0f32; PADDED_SIDE];
        for (v, row) in across.iter_mut().zip(padded.chunks_exact(side)) {
            *v = w0 * row[c.i0] + w1 * row[c.i1];
        }
        for (t, o) in rows.iter().zip(dst) {
            let (h1, h0) = (t.l1, 1.0 - t.l1);
            let p = h0 * across[t.i0] + h1 * across[t.i1];
            *o = (p > thresh) as u8;
        }
    }
}

/// What `kernels/paste.cu` is launched with: a table of 9 words per region and the grid.
#[cfg(any(test, feature = "cuda"))]
struct PasteLaunch {
    table: Vec<u32>,
    /// Blocks per region (enough for the widest, at most 64) and one grid row per region.
    grid: (u32, u32),
}

#[cfg(any(test, feature = "cuda"))]
impl PasteLaunch {
    const THREADS: u32 = 256;

    fn new(regions: &[Region]) -> candle_core::Result<Self> {
        let word = |v: usize| -> candle_core::Result<u32> {
            u32::try_from(v)
                .map_err(|_| candle_core::Error::Msg(format!("paste_masks: {v} exceeds u32")))
        };
        // CUDA allows 65535 grid rows.
        if regions.len() > 65_535 {
            candle_core::bail!("paste_masks: {} masks in one launch", regions.len());
        }
        let mut table = Vec::with_capacity(regions.len() * 9);
        let mut widest = 0;
        for r in regions {
            let i = r.inside;
            // Corners outside the image are negative; the kernel reads them back as int32.
            let corner = |v: i64| v as i32 as u32;
            table.extend([
                corner(r.x0),
                corner(r.y0),
                word(r.w)?,
                word(r.h)?,
                word(i.x0)?,
                word(i.y0)?,
                word(i.x1)?,
                word(i.y1)?,
                word(r.offset)?,
            ]);
            widest = widest.max(i.area());
        }
        let blocks = word(widest)?.div_ceil(Self::THREADS).clamp(1, 64);
        Ok(Self {
            table,
            grid: (blocks, word(regions.len())?),
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::ops::Range;

    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::CudaStorage;

    use super::{PasteLaunch, Region};
    use crate::model::ptx;

    /// Runs `paste_masks` over `probs[range]` (`[D, 28, 28]` f32) and copies the thresholded
    /// pixels, the regions' parts inside the image, into `pixels`.
    pub(super) fn paste(
        probs: &CudaStorage,
        range: Range<usize>,
        regions: &[Region],
        thresh: f32,
        pixels: &mut Vec<u8>,
    ) -> candle_core::Result<()> {
        let CudaStorageSlice::F32(p) = &probs.slice else {
            candle_core::bail!("paste_masks: probabilities must be f32");
        };
        let dev = &probs.device;
        let launch = PasteLaunch::new(regions)?;
        let table = dev.clone_htod(&launch.table)?;
        // SAFETY: the kernel writes every pixel of every region, and the regions tile `pixels`.
        let out = unsafe { dev.alloc::<u8>(pixels.len())? };
        let config = LaunchConfig {
            grid_dim: (launch.grid.0, launch.grid.1, 1),
            block_dim: (PasteLaunch::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = dev.get_or_load_custom_func("paste_masks", "drape_paste", ptx::PASTE)?;
        let probs = p.slice(range);
        let mut b = func.builder();
        b.arg(&probs);
        b.arg(&table);
        b.arg(&thresh);
        b.arg(&out);
        // SAFETY: the arguments match `paste_masks` in kernels/paste.cu; `probs` holds 784
        // values per region and `table` 9 words per region.
        unsafe { b.launch(config) }.w()?;
        dev.memcpy_dtoh(&out, pixels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::TestRng;

    #[test]
    fn the_cuda_kernel_pastes_what_the_cpu_does() {
        let mut rng = TestRng::new(4);
        let mut unit = || rng.unit();
        for (seed, (resized, original)) in [
            ((40, 60), (40, 60)),
            ((480, 640), (720, 960)),
            ((333, 500), (150, 225)),
        ]
        .into_iter()
        .enumerate()
        {
            let (h, w) = (resized.0 as f32, resized.1 as f32);
            // Boxes inside, across every edge, tiny, and entirely outside.
            let dets: Vec<Detection> = (0..40)
                .map(|_| {
                    let (x, y) = (unit() * 1.4 * w - 0.2 * w, unit() * 1.4 * h - 0.2 * h);
                    let (bw, bh) = (unit().powi(3) * w, unit().powi(3) * h);
                    Detection {
                        bbox: [x, y, x + bw, y + bh],
                        score: 0.5,
                        label: 1,
                    }
                })
                .collect();
            // Multiples of 1/8 put some pixels exactly on the threshold.
            let probs: Vec<f32> = (0..40 * MASK_SIZE * MASK_SIZE)
                .map(|_| (unit() * 8.0).floor() / 8.0)
                .collect();
            let t = Tensor::from_slice(&probs, (40, MASK_SIZE, MASK_SIZE), &Device::Cpu).unwrap();
            let mut paster = Postprocessor::new();
            let sizes = (resized, original);
            paster
                .paste_into(&dets, Some(&t), sizes, 0.5, &mut Vec::new())
                .unwrap();
            let launch = PasteLaunch::new(&paster.regions).unwrap();
            // Pixels the kernel never writes would keep this value.
            let mut pixels = vec![7u8; paster.pixels.len()];
            let grid = (launch.grid.0, launch.grid.1, PasteLaunch::THREADS);
            crate::model::kernel_emu::paste_masks(
                &probs,
                &launch.table,
                0.5,
                &mut pixels,
                grid,
                seed as u64,
            );
            assert!(paster.pixels.contains(&1));
            assert!(pixels == paster.pixels, "{resized:?} -> {original:?}");
        }
    }

    #[test]
    fn any_layout_of_the_probabilities_pastes_alike() {
        let det = |x0: f32, y0: f32, x1: f32, y1: f32| Detection {
            bbox: [x0, y0, x1, y1],
            score: 0.9,
            label: 1,
        };
        // One box inside, one across the top-left corner, one past the bottom-right.
        let dets = [
            det(5.0, 6.0, 30.0, 20.0),
            det(-8.0, -3.0, 12.0, 9.0),
            det(35.0, 25.0, 60.0, 50.0),
        ];
        let probs: Vec<f32> = (0..3 * MASK_SIZE * MASK_SIZE)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let t = Tensor::from_vec(probs, (3, MASK_SIZE, MASK_SIZE), &Device::Cpu).unwrap();
        // The transpose of a transpose: the same values, not contiguous, so the copy path.
        let strided = t
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!strided.is_contiguous());
        let run = |probs: &Tensor| {
            let mut out = Vec::new();
            Postprocessor::new()
                .paste_into(&dets, Some(probs), ((40, 40), (40, 40)), 0.5, &mut out)
                .unwrap();
            out.into_iter().map(|i| i.mask.unwrap()).collect::<Vec<_>>()
        };
        let masks = run(&t);
        assert_eq!(masks, run(&strided));
        assert!(masks
            .iter()
            .all(|m| m.area() > 0 && (m.height, m.width) == (40, 40)));
        // Two masks, three detections: the last is beyond the cap.
        let mut out = Vec::new();
        let two = t.narrow(0, 0, 2).unwrap();
        Postprocessor::new()
            .paste_into(&dets, Some(&two), ((40, 40), (40, 40)), 0.5, &mut out)
            .unwrap();
        assert_eq!(
            out.iter().map(|i| i.mask.is_some()).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(Postprocessor::new()
            .paste_into(&dets[..1], Some(&two), ((40, 40), (40, 40)), 0.5, &mut out)
            .is_err());
    }
}
