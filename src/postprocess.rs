//! From detections in resized-image coordinates to instances in the original image:
//! torchvision's `transform.postprocess` (`resize_boxes`, `paste_masks_in_image`) followed by
//! thresholding and COCO run-length encoding, as `pycocotools.mask.encode` writes it.

use std::time::{Duration, Instant};

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
        rle.encode_into(mask, height, width);
        rle
    }

    /// [`Self::encode`] reusing this value's buffer: no allocation once it has held a mask
    /// with as many runs.
    pub fn encode_into(&mut self, mask: &[u8], height: usize, width: usize) {
        self.height = height;
        self.width = width;
        self.counts.clear();
        let mut current = 0u8;
        let mut run = 0u32;
        for x in 0..width {
            for y in 0..height {
                let v = mask[y * width + x];
                if v != current {
                    self.counts.push(run);
                    run = 0;
                    current = v;
                }
                run += 1;
            }
        }
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

/// Maps detections (and their 28×28 probability maps, concatenated) from the resized image
/// back to the original: scaled boxes, pasted masks thresholded at `mask_thresh`. Owns every
/// buffer it needs, so a stream of frames allocates nothing once the buffers have grown.
pub struct Paster {
    /// Full-image binary mask, reused across instances.
    canvas: Vec<u8>,
    padded: Vec<f32>,
    /// Masks of instances from earlier frames, kept for their buffers.
    spare: Vec<Rle>,
    cols: Vec<LinearTap>,
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
        let side = MASK_SIZE + 2 * PASTE_PADDING;
        Self {
            canvas: Vec::new(),
            padded: vec![0.0; side * side],
            spare: Vec::new(),
            cols: Vec::new(),
            paste_ms: 0.0,
            rle_ms: 0.0,
        }
    }

    /// (paste, RLE) milliseconds of the last [`Self::paste_into`].
    pub fn last_timings(&self) -> (f64, f64) {
        (self.paste_ms, self.rle_ms)
    }

    /// Replaces `out` with one instance per detection; the first `mask_probs.len() / 784`
    /// detections get masks (the rest were beyond the mask cap).
    pub fn paste_into(
        &mut self,
        detections: &[Detection],
        mask_probs: &[f32],
        (resized, original): ((usize, usize), (usize, usize)),
        mask_thresh: f32,
        out: &mut Vec<Instance>,
    ) {
        self.spare.extend(out.drain(..).filter_map(|i| i.mask));
        let (oh, ow) = original;
        // `resize_boxes`: ratios in f32, original / resized.
        let ratio_h = oh as f32 / resized.0 as f32;
        let ratio_w = ow as f32 / resized.1 as f32;
        let side = MASK_SIZE + 2 * PASTE_PADDING;
        let mut masks = mask_probs.chunks_exact(MASK_SIZE * MASK_SIZE);
        let (mut paste, mut rle) = (Duration::ZERO, Duration::ZERO);
        for det in detections {
            let b = det.bbox;
            let bbox = [
                b[0] * ratio_w,
                b[1] * ratio_h,
                b[2] * ratio_w,
                b[3] * ratio_h,
            ];
            let mask = masks.next().map(|probs| {
                let started = Instant::now();
                for (dst, src) in self.padded[PASTE_PADDING * side..]
                    .chunks_exact_mut(side)
                    .zip(probs.chunks_exact(MASK_SIZE))
                {
                    dst[PASTE_PADDING..PASTE_PADDING + MASK_SIZE].copy_from_slice(src);
                }
                self.canvas.clear();
                self.canvas.resize(oh * ow, 0);
                paste_one(
                    &self.padded,
                    side,
                    &bbox,
                    (&mut self.canvas, original),
                    mask_thresh,
                    &mut self.cols,
                );
                let pasted = Instant::now();
                let mut encoded = self.spare.pop().unwrap_or(Rle {
                    height: 0,
                    width: 0,
                    counts: Vec::new(),
                });
                encoded.encode_into(&self.canvas, oh, ow);
                paste += pasted - started;
                rle += pasted.elapsed();
                encoded
            });
            out.push(Instance {
                class_id: det.label,
                score: det.score,
                bbox,
                mask,
            });
        }
        self.paste_ms = paste.as_secs_f64() * 1e3;
        self.rle_ms = rle.as_secs_f64() * 1e3;
    }
}

/// `expand_boxes` + `paste_mask_in_image` for one mask, thresholded into `canvas`.
fn paste_one(
    padded: &[f32],
    side: usize,
    bbox: &Box,
    (canvas, (im_h, im_w)): (&mut [u8], (usize, usize)),
    thresh: f32,
    cols: &mut Vec<LinearTap>,
) {
    let scale = side as f32 / MASK_SIZE as f32;
    let w_half = (bbox[2] - bbox[0]) * 0.5 * scale;
    let h_half = (bbox[3] - bbox[1]) * 0.5 * scale;
    let x_c = (bbox[2] + bbox[0]) * 0.5;
    let y_c = (bbox[3] + bbox[1]) * 0.5;
    // `.to(torch.int64)` truncates toward zero.
    let [x0, y0, x1, y1] =
        [x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half].map(|v| v as i64);
    let w = (x1 - x0 + 1).max(1) as usize;
    let h = (y1 - y0 + 1).max(1) as usize;
    let cx0 = x0.max(0);
    let cx1 = (x1 + 1).min(im_w as i64);
    let cy0 = y0.max(0);
    let cy1 = (y1 + 1).min(im_h as i64);
    if cx0 >= cx1 || cy0 >= cy1 {
        return;
    }
    // Only the part of the resized mask that lands inside the image is evaluated.
    cols.clear();
    cols.extend(
        linear_taps(side, w)
            .skip((cx0 - x0) as usize)
            .take((cx1 - cx0) as usize),
    );
    for (row, t) in linear_taps(side, h)
        .enumerate()
        .skip((cy0 - y0) as usize)
        .take((cy1 - cy0) as usize)
    {
        let y = row as i64 + y0;
        let r0 = &padded[t.i0 * side..][..side];
        let r1 = &padded[t.i1 * side..][..side];
        let (h1, h0) = (t.l1, 1.0 - t.l1);
        let dst = &mut canvas[y as usize * im_w + cx0 as usize..][..cols.len()];
        for (o, c) in dst.iter_mut().zip(cols.iter()) {
            let (w1, w0) = (c.l1, 1.0 - c.l1);
            let p = h0 * (w0 * r0[c.i0] + w1 * r0[c.i1]) + h1 * (w0 * r1[c.i0] + w1 * r1[c.i1]);
            *o = (p > thresh) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
