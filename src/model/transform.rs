//! torchvision's `GeneralizedRCNNTransform` at inference (`models/detection/transform.py`):
//! scale to [0, 1], normalise, bilinear resize (`align_corners=False`) by
//! `min(min_size / short, max_size / long)`, zero-pad to a multiple of 32.

use candle_core::{Device, Tensor};

use crate::config::{Config, SIZE_DIVISIBLE};
use crate::error::{Error, Result};
use crate::interp::{linear_taps, LinearTap};

/// Where a preprocessed image sits: the sizes needed to map results back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// (height, width) after resizing, before padding: boxes are clipped to it.
    pub image_size: (usize, usize),
    /// (height, width) of the batch tensor.
    pub padded: (usize, usize),
    /// (height, width) of the input image.
    pub original: (usize, usize),
}

/// A preprocessed image: the padded batch tensor and its geometry.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `[1, 3, padded.0, padded.1]`.
    pub tensor: Tensor,
    pub image_size: (usize, usize),
    pub padded: (usize, usize),
    pub original: (usize, usize),
}

/// Normalisation statistics; the resize target is given per call so a pipeline can step the
/// input size down under load.
#[derive(Debug, Clone)]
pub struct Transform {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Transform {
    pub fn new(cfg: &Config) -> Self {
        Self {
            mean: cfg.image_mean,
            std: cfg.image_std,
        }
    }

    /// The resized (height, width) torchvision produces for `min_size`/`max_size`: the scale is
    /// computed in double precision and `interpolate(recompute_scale_factor=True)` floors
    /// `size * scale`.
    pub fn resized_size(
        (h, w): (usize, usize),
        (min_size, max_size): (usize, usize),
    ) -> (usize, usize) {
        let short = h.min(w) as f64;
        let long = h.max(w) as f64;
        let scale = (min_size as f64 / short).min(max_size as f64 / long);
        let out = |s: usize| ((s as f64 * scale).floor() as usize).max(1);
        (out(h), out(w))
    }

    /// The batch tensor's (height, width) for a resized image: each side rounded up to a
    /// multiple of 32, as `batch_images` pads.
    pub fn padded_size((h, w): (usize, usize)) -> (usize, usize) {
        let pad = |s: usize| s.div_ceil(SIZE_DIVISIBLE) * SIZE_DIVISIBLE;
        (pad(h), pad(w))
    }

    /// Preprocesses an interleaved 8-bit RGB image of `(height, width)` into `out`
    /// (`[3, padded.0, padded.1]`). `out` and `scratch` only grow, so a stream of same-sized
    /// frames allocates nothing after the first.
    pub fn apply_into(
        &self,
        rgb: &[u8],
        (height, width): (usize, usize),
        sizes: (usize, usize),
        scratch: &mut ResizeScratch,
        out: &mut Vec<f32>,
    ) -> Result<Geometry> {
        if height == 0 || width == 0 || rgb.len() != height * width * 3 {
            return Err(Error::Config(format!(
                "image buffer of {} bytes does not hold a {width}x{height} RGB image",
                rgb.len()
            )));
        }
        let (rh, rw) = Self::resized_size((height, width), sizes);
        let (ph, pw) = Self::padded_size((rh, rw));
        scratch.plane.resize(height * width, 0.0);
        // Not cleared first: the resize writes every value but the padding, zeroed below.
        out.resize(3 * ph * pw, 0.0);
        for (c, dst) in out.chunks_exact_mut(ph * pw).enumerate() {
            for (p, px) in scratch.plane.iter_mut().zip(rgb.chunks_exact(3)) {
                *p = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
            resize_bilinear(
                &scratch.plane,
                (height, width),
                dst,
                pw,
                (rh, rw),
                &mut scratch.rows,
            );
            for row in dst[..rh * pw].chunks_exact_mut(pw) {
                row[rw..].fill(0.0);
            }
            dst[rh * pw..].fill(0.0);
        }
        Ok(Geometry {
            image_size: (rh, rw),
            padded: (ph, pw),
            original: (height, width),
        })
    }

    /// [`Self::apply_into`] with fresh buffers, as a batch tensor on `device`.
    pub fn apply(
        &self,
        rgb: &[u8],
        size: (usize, usize),
        sizes: (usize, usize),
        device: &Device,
    ) -> Result<ImageBatch> {
        let mut out = Vec::new();
        let g = self.apply_into(rgb, size, sizes, &mut ResizeScratch::default(), &mut out)?;
        Ok(ImageBatch {
            tensor: Tensor::from_vec(out, (1, 3, g.padded.0, g.padded.1), device)?,
            image_size: g.image_size,
            padded: g.padded,
            original: g.original,
        })
    }
}

/// Buffers the resize works in, kept by the caller.
#[derive(Debug, Default)]
pub struct ResizeScratch {
    plane: Vec<f32>,
    rows: RowCache,
}

/// Source rows already interpolated along x, the last two a resize used: upsampling reads each
/// source row for about two output rows, and an output row is a blend of two such rows.
#[derive(Debug, Default)]
pub(crate) struct RowCache {
    cols: Vec<LinearTap>,
    lines: [Vec<f32>; 2],
    /// The source row each line holds.
    held: [Option<usize>; 2],
}

impl RowCache {
    /// The line holding source row `y` of `src` (rows `sw` apart), interpolating it into the
    /// line that does not hold `keep` if no line holds it yet.
    fn line(&mut self, src: &[f32], sw: usize, y: usize, keep: usize) -> usize {
        if let Some(i) = self.held.iter().position(|&h| h == Some(y)) {
            return i;
        }
        let i = usize::from(self.held[0] == Some(keep));
        let row = &src[y * sw..][..sw];
        for (o, t) in self.lines[i].iter_mut().zip(&self.cols) {
            let (w1, w0) = (t.l1, 1.0 - t.l1);
            *o = w0 * row[t.i0] + w1 * row[t.i1];
        }
        self.held[i] = Some(y);
        i
    }
}

/// Bilinear resize of a row-major `src` plane into the top-left `dst_size` corner of `dst`,
/// whose rows are `dst_stride` apart, with torch's weights and evaluation order: each output is
/// `h0·(w0·a + w1·b) + h1·(w0·c + w1·d)`, the x-interpolated source rows computed once each.
pub(crate) fn resize_bilinear(
    src: &[f32],
    (sh, sw): (usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
    (dh, dw): (usize, usize),
    rows: &mut RowCache,
) {
    rows.cols.clear();
    rows.cols.extend(linear_taps(sw, dw));
    for line in &mut rows.lines {
        line.resize(dw, 0.0);
    }
    rows.held = [None; 2];
    for (y, t) in linear_taps(sh, dh).enumerate() {
        let i0 = rows.line(src, sw, t.i0, t.i1);
        let i1 = rows.line(src, sw, t.i1, t.i0);
        let (h1, h0) = (t.l1, 1.0 - t.l1);
        let (a, b) = (&rows.lines[i0][..dw], &rows.lines[i1][..dw]);
        for ((o, a), b) in dst[y * dst_stride..][..dw].iter_mut().zip(a).zip(b) {
            *o = h0 * a + h1 * b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_follows_torchvision_rule() {
        // The cases the issue states (w×h): 640×480 → 1066×800, 1280×720 → 1333×749.
        assert_eq!(
            Transform::resized_size((480, 640), (800, 1333)),
            (800, 1066)
        );
        assert_eq!(
            Transform::resized_size((720, 1280), (800, 1333)),
            (749, 1333)
        );
    }

    /// The resize is torch's formula, value for value, whether it shrinks, grows or keeps
    /// each axis.
    #[test]
    fn resize_matches_the_direct_formula_bit_for_bit() {
        let mut rng = crate::test_rng::TestRng::new(7);
        let mut rows = RowCache::default();
        for &((sh, sw), (dh, dw)) in &[
            ((5, 7), (13, 11)),
            ((13, 11), (5, 7)),
            ((9, 9), (9, 20)),
            ((1, 6), (4, 3)),
            ((6, 1), (2, 5)),
        ] {
            let src: Vec<f32> = (0..sh * sw).map(|_| rng.unit() * 4.0 - 2.0).collect();
            let stride = dw + 2;
            let mut got = vec![f32::NAN; dh * stride];
            resize_bilinear(&src, (sh, sw), &mut got, stride, (dh, dw), &mut rows);
            let cols: Vec<LinearTap> = linear_taps(sw, dw).collect();
            for (y, r) in linear_taps(sh, dh).enumerate() {
                let (r0, r1) = (&src[r.i0 * sw..][..sw], &src[r.i1 * sw..][..sw]);
                let (h1, h0) = (r.l1, 1.0 - r.l1);
                for (x, t) in cols.iter().enumerate() {
                    let (w1, w0) = (t.l1, 1.0 - t.l1);
                    let want =
                        h0 * (w0 * r0[t.i0] + w1 * r0[t.i1]) + h1 * (w0 * r1[t.i0] + w1 * r1[t.i1]);
                    let g = got[y * stride + x];
                    assert_eq!(
                        g.to_bits(),
                        want.to_bits(),
                        "{sh}x{sw}->{dh}x{dw} ({y}, {x})"
                    );
                }
                assert!(got[y * stride + dw..][..2].iter().all(|v| v.is_nan()));
            }
        }
    }

    /// A buffer that held a larger frame gives the same input as a fresh one: the padding is
    /// zeroed, not left over.
    #[test]
    fn a_reused_buffer_is_padded_with_zeros() {
        let t = Transform {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let mut rng = crate::test_rng::TestRng::new(3);
        let mut image = |h: usize, w: usize| -> Vec<u8> {
            (0..h * w * 3).map(|_| (rng.unit() * 255.0) as u8).collect()
        };
        let (big, small) = (image(64, 96), image(40, 50));
        let (mut scratch, mut out) = (ResizeScratch::default(), Vec::new());
        t.apply_into(&big, (64, 96), (64, 96), &mut scratch, &mut out)
            .unwrap();
        let g = t
            .apply_into(&small, (40, 50), (45, 70), &mut scratch, &mut out)
            .unwrap();
        let mut fresh = Vec::new();
        let want = t
            .apply_into(
                &small,
                (40, 50),
                (45, 70),
                &mut ResizeScratch::default(),
                &mut fresh,
            )
            .unwrap();
        assert_eq!(g, want);
        let len = 3 * g.padded.0 * g.padded.1;
        assert!(g.image_size != g.padded, "the case must have padding");
        assert_eq!(&out[..len], &fresh[..]);
    }

    #[test]
    fn resize_is_identity_at_same_size_and_exact_on_ramps() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut dst = vec![0f32; 12];
        resize_bilinear(&src, (3, 4), &mut dst, 4, (3, 4), &mut RowCache::default());
        assert_eq!(dst, src);
        // Upsampling a 1×2 row [0, 1] to 1×4: sources -0.25→0, 0.25, 0.75, 1.25→clamped.
        let mut up = vec![0f32; 4];
        resize_bilinear(
            &[0.0, 1.0],
            (1, 2),
            &mut up,
            4,
            (1, 4),
            &mut RowCache::default(),
        );
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
