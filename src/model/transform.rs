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
        out.clear();
        out.resize(3 * ph * pw, 0.0);
        for c in 0..3 {
            for (p, px) in scratch.plane.iter_mut().zip(rgb.chunks_exact(3)) {
                *p = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
            resize_bilinear(
                &scratch.plane,
                (height, width),
                &mut out[c * ph * pw..(c + 1) * ph * pw],
                pw,
                (rh, rw),
                &mut scratch.cols,
            );
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
    cols: Vec<LinearTap>,
}

/// Bilinear resize of a row-major `src` plane into the top-left `dst_size` corner of `dst`,
/// whose rows are `dst_stride` apart, with torch's weights and evaluation order.
pub(crate) fn resize_bilinear(
    src: &[f32],
    (sh, sw): (usize, usize),
    dst: &mut [f32],
    dst_stride: usize,
    (dh, dw): (usize, usize),
    cols: &mut Vec<LinearTap>,
) {
    cols.clear();
    cols.extend(linear_taps(sw, dw));
    for (y, row_tap) in linear_taps(sh, dh).enumerate() {
        let r0 = &src[row_tap.i0 * sw..][..sw];
        let r1 = &src[row_tap.i1 * sw..][..sw];
        let (h1, h0) = (row_tap.l1, 1.0 - row_tap.l1);
        for (o, t) in dst[y * dst_stride..][..dw].iter_mut().zip(cols.iter()) {
            let (w1, w0) = (t.l1, 1.0 - t.l1);
            *o = h0 * (w0 * r0[t.i0] + w1 * r0[t.i1]) + h1 * (w0 * r1[t.i0] + w1 * r1[t.i1]);
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

    #[test]
    fn resize_is_identity_at_same_size_and_exact_on_ramps() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut dst = vec![0f32; 12];
        resize_bilinear(&src, (3, 4), &mut dst, 4, (3, 4), &mut Vec::new());
        assert_eq!(dst, src);
        // Upsampling a 1×2 row [0, 1] to 1×4: sources -0.25→0, 0.25, 0.75, 1.25→clamped.
        let mut up = vec![0f32; 4];
        resize_bilinear(&[0.0, 1.0], (1, 2), &mut up, 4, (1, 4), &mut Vec::new());
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
