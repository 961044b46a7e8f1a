//! From detections in resized-image coordinates to instances in the original image:
//! torchvision's `transform.postprocess` (`resize_boxes`, `paste_masks_in_image`) followed by
//! thresholding and COCO run-length encoding, as `pycocotools.mask.encode` writes it.

use std::time::Instant;

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::Result;
use crate::model::box_ops::Box;
use crate::model::roi_heads::{Detection, MASK_SIZE};
use crate::model::transform::{linear_taps, LinearTap};

/// `paste_masks_in_image(padding=1)`: masks get a one-pixel zero border and boxes grow to match.
const PASTE_PADDING: usize = 1;

/// A binary mask as COCO's uncompressed RLE: alternating run lengths of 0s and 1s in
/// column-major (Fortran) order, starting with 0s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rle {
    pub height: usize,
    pub width: usize,
    pub counts: Vec<u32>,
}

impl Rle {
    /// Encodes a row-major `0/1` mask.
    pub fn encode(mask: &[u8], height: usize, width: usize) -> Self {
        let mut rle = Self {
            height,
            width,
            counts: Vec::new(),
        };
        let all = Rect {
            x0: 0,
            y0: 0,
            x1: width,
            y1: height,
        };
        let column_major: Vec<u8> = (0..width)
            .flat_map(|x| (0..height).map(move |y| mask[y * width + x]))
            .collect();
        rle.encode_region_into(&column_major, all, (height, width));
        rle
    }

    /// Encodes a `height`×`width` mask that is zero outside `rect`, given only `rect`'s
    /// pixels in column-major order (COCO's), reusing this value's buffer: no allocation once
    /// it has held a mask with as many runs, no pass over the zeros around the box, and runs
    /// found by scanning contiguous columns.
    pub fn encode_region_into(
        &mut self,
        pixels: &[u8],
        rect: Rect,
        (height, width): (usize, usize),
    ) {
        self.height = height;
        self.width = width;
        self.counts.clear();
        let mut current = 0u8;
        let mut run = 0u32;
        let mut push = |counts: &mut Vec<u32>, value: u8, n: usize| {
            if value != current && n > 0 {
                counts.push(run);
                run = 0;
                current = value;
            }
            run += n as u32;
        };
        let rect_h = rect.y1 - rect.y0;
        push(&mut self.counts, 0, rect.x0 * height);
        for x in 0..rect.x1 - rect.x0 {
            push(&mut self.counts, 0, rect.y0);
            let mut rest = &pixels[x * rect_h..][..rect_h];
            while let Some(&v) = rest.first() {
                let n = rest.iter().position(|&p| p != v).unwrap_or(rest.len());
                push(&mut self.counts, v, n);
                rest = &rest[n..];
            }
            push(&mut self.counts, 0, height - rect.y1);
        }
        push(&mut self.counts, 0, (width - rect.x1) * height);
        self.counts.push(run);
    }

    /// Calls `f(y, x)` for every foreground pixel.
    pub fn for_each_foreground(&self, mut f: impl FnMut(usize, usize)) {
        let mut pos = 0usize;
        for (i, &c) in self.counts.iter().enumerate() {
            if i % 2 == 1 {
                for p in pos..pos + c as usize {
                    f(p % self.height, p / self.height);
                }
            }
            pos += c as usize;
        }
    }

    pub fn area(&self) -> u64 {
        self.counts
            .iter()
            .skip(1)
            .step_by(2)
            .map(|&c| c as u64)
            .sum()
    }

    /// pycocotools' `rleToString`: each count (after the first two, as a difference to the
    /// count two back) in little-endian 5-bit groups with a continuation bit, offset by 48.
    pub fn write_coco_string(&self, out: &mut impl std::fmt::Write) -> std::fmt::Result {
        for (i, &c) in self.counts.iter().enumerate() {
            let mut x = c as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            loop {
                let mut ch = (x & 0x1f) as u8;
                x >>= 5;
                let more = if ch & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    ch |= 0x20;
                }
                out.write_char((ch + 48) as char)?;
                if !more {
                    break;
                }
            }
        }
        Ok(())
    }

    /// The iMaterialist/Kaggle form: `start length` pairs of foreground runs, starts
    /// 1-indexed in column-major order, space-separated.
    pub fn write_kaggle_string(&self, out: &mut impl std::fmt::Write) -> std::fmt::Result {
        let mut pos = 0u64;
        let mut first = true;
        for (i, &c) in self.counts.iter().enumerate() {
            if i % 2 == 1 && c > 0 {
                let sep = if first { "" } else { " " };
                write!(out, "{sep}{} {c}", pos + 1)?;
                first = false;
            }
            pos += c as u64;
        }
        Ok(())
    }

    pub fn to_coco_string(&self) -> String {
        let mut s = String::new();
        self.write_coco_string(&mut s).expect("writing to a String");
        s
    }
}

/// A final detection in original-image pixels.
#[derive(Debug, Clone)]
pub struct Instance {
    pub class_id: usize,
    pub score: f32,
    pub bbox: Box,
    /// `None` when a latency budget capped the mask head before this detection.
    pub mask: Option<Rle>,
}

/// A pixel rectangle `[x0, x1) × [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x0: usize,
    pub y0: usize,
    pub x1: usize,
    pub y1: usize,
}

impl Rect {
    fn area(&self) -> usize {
        (self.x1 - self.x0) * (self.y1 - self.y0)
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
    /// Start of this mask's pixels in [`Paster`]'s buffer.
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
pub struct Paster {
    /// The masks of the last call: each region's pixels inside the image, column-major,
    /// concatenated.
    pixels: Vec<u8>,
    regions: Vec<Region>,
    padded: Vec<f32>,
    /// Masks of instances from earlier frames, kept for their buffers.
    spare: Vec<Rle>,
    rows: Vec<LinearTap>,
    /// Milliseconds spent pasting and encoding in the last call.
    paste_ms: f64,
    rle_ms: f64,
}

impl Default for Paster {
    fn default() -> Self {
        Self::new()
    }
}

impl Paster {
    pub fn new() -> Self {
        Self {
            pixels: Vec::new(),
            regions: Vec::new(),
            padded: vec![0.0; PADDED_SIDE * PADDED_SIDE],
            spare: Vec::new(),
            rows: Vec::new(),
            paste_ms: 0.0,
            rle_ms: 0.0,
        }
    }

    /// (paste, RLE) milliseconds of the last [`Self::paste_into`].
    pub fn last_timings(&self) -> (f64, f64) {
        (self.paste_ms, self.rle_ms)
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
            let pixels = &self.pixels[region.offset..][..region.inside.area()];
            rle.encode_region_into(pixels, region.inside, original);
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
    fn rle_is_column_major_and_starts_with_zeros() {
        // 2×3, row-major:
        // 1 0 1
        // 1 0 0
        let m = [1, 0, 1, 1, 0, 0];
        let r = Rle::encode(&m, 2, 3);
        // Column-major: 1 1 | 0 0 | 1 0
        assert_eq!(r.counts, vec![0, 2, 2, 1, 1]);
        assert_eq!(r.area(), 3);
    }

    #[test]
    fn region_encoding_matches_the_full_canvas() {
        let (h, w) = (7, 9);
        let mut rng = TestRng::new(3);
        let mut bit = || (rng.unit() < 0.5) as u8;
        let rects = [
            (0, 0, 9, 7),
            (2, 1, 5, 6),
            (0, 3, 1, 7),
            (8, 0, 9, 1),
            (4, 4, 4, 6),
        ];
        for (x0, y0, x1, y1) in rects {
            let rect = Rect { x0, y0, x1, y1 };
            let pixels: Vec<u8> = (0..rect.area()).map(|_| bit()).collect();
            let mut canvas = vec![0u8; h * w];
            for y in y0..y1 {
                for x in x0..x1 {
                    canvas[y * w + x] = pixels[(x - x0) * (y1 - y0) + (y - y0)];
                }
            }
            let mut rle = Rle::encode(&[], 0, 0);
            rle.encode_region_into(&pixels, rect, (h, w));
            assert_eq!(rle, Rle::encode(&canvas, h, w), "{rect:?}");
        }
    }

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
            let mut paster = Paster::new();
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
            Paster::new()
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
        Paster::new()
            .paste_into(&dets, Some(&two), ((40, 40), (40, 40)), 0.5, &mut out)
            .unwrap();
        assert_eq!(
            out.iter().map(|i| i.mask.is_some()).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(Paster::new()
            .paste_into(&dets[..1], Some(&two), ((40, 40), (40, 40)), 0.5, &mut out)
            .is_err());
    }

    #[test]
    fn kaggle_runs_are_one_indexed_and_column_major() {
        // 3×2 row-major: first pixel (0,0) set, last pixel (2,1) set, and (1,1).
        // Column-major order: (0,0) (1,0) (2,0) (0,1) (1,1) (2,1) → 1 0 0 0 1 1.
        let r = Rle::encode(&[1, 0, 0, 1, 0, 1], 3, 2);
        let mut s = String::new();
        r.write_kaggle_string(&mut s).unwrap();
        assert_eq!(s, "1 1 5 2");
        let empty = Rle::encode(&[0; 6], 3, 2);
        let mut s = String::new();
        empty.write_kaggle_string(&mut s).unwrap();
        assert_eq!(s, "");
    }

    #[test]
    fn coco_string_matches_pycocotools() {
        // pycocotools.mask.encode(np.asfortranarray(np.array([[1,0,1],[1,0,0]], np.uint8)))
        // -> {'size': [2, 3], 'counts': b'022OO'}; the last two counts are differences of -1.
        let r = Rle {
            height: 2,
            width: 3,
            counts: vec![0, 2, 2, 1, 1],
        };
        assert_eq!(r.to_coco_string(), "022OO");
        // A count over 15 spans several 5-bit groups; pycocotools gives b'T3' for a 10×10
        // all-zero mask.
        let big = Rle {
            height: 10,
            width: 10,
            counts: vec![100],
        };
        assert_eq!(big.to_coco_string(), "T3");
    }
}
