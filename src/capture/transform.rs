//! Per-installation geometry fixes: crop, then rotate clockwise, then mirror, in one pass from the
//! source frame into the caller's frame.
//!
//! All three are integer affine maps, so each output pixel's source is `origin + x * step_x +
//! y * step_y` bytes into the input; the pass is one strided copy with no per-frame allocation.

use std::fmt;
use std::str::FromStr;

use super::{CaptureError, CaptureStats, Frame, FrameSource};

/// Clockwise rotation, for cameras mounted sideways or upside down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rotation {
    #[default]
    R0,
    R90,
    R180,
    R270,
}

impl FromStr for Rotation {
    type Err = CaptureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "0" => Ok(Self::R0),
            "90" => Ok(Self::R90),
            "180" => Ok(Self::R180),
            "270" => Ok(Self::R270),
            other => Err(CaptureError::InvalidSpec(format!(
                "rotation `{other}`: expected 0, 90, 180 or 270 (degrees clockwise)"
            ))),
        }
    }
}

impl fmt::Display for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let degrees = match self {
            Self::R0 => 0,
            Self::R90 => 90,
            Self::R180 => 180,
            Self::R270 => 270,
        };
        write!(f, "{degrees}")
    }
}

/// A rectangle of the source frame, in source pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

impl FromStr for Crop {
    type Err = CaptureError;

    /// Parses `x,y,w,h`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            CaptureError::InvalidSpec(format!(
                "crop `{s}`: expected x,y,w,h in pixels, e.g. 0,60,640,360"
            ))
        };
        let mut parts = s.split(',').map(|p| p.trim().parse::<usize>());
        let mut next = || parts.next().and_then(Result::ok).ok_or_else(bad);
        let crop = Crop {
            x: next()?,
            y: next()?,
            w: next()?,
            h: next()?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(crop)
    }
}

impl fmt::Display for Crop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{},{}", self.x, self.y, self.w, self.h)
    }
}

/// How one installation's camera image is straightened: crop → rotate → flip.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transforms {
    pub rotate: Rotation,
    pub flip_horizontal: bool,
    pub crop: Option<Crop>,
}

impl Transforms {
    pub fn is_identity(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the crop lies inside a `width` x `height` frame and is not empty.
    pub fn validate(&self, width: usize, height: usize) -> Result<(), CaptureError> {
        if let Some(crop) = self.crop {
            let fits = |start: usize, len: usize, limit: usize| {
                len > 0 && start.checked_add(len).is_some_and(|end| end <= limit)
            };
            if !(fits(crop.x, crop.w, width) && fits(crop.y, crop.h, height)) {
                return Err(CaptureError::Crop {
                    crop,
                    width,
                    height,
                });
            }
        }
        Ok(())
    }

    /// Output width and height for a `width` x `height` input.
    pub fn output_size(&self, width: usize, height: usize) -> (usize, usize) {
        let (w, h) = self.crop.map_or((width, height), |c| (c.w, c.h));
        match self.rotate {
            Rotation::R0 | Rotation::R180 => (w, h),
            Rotation::R90 | Rotation::R270 => (h, w),
        }
    }

    /// Writes the transformed RGB8 `src` (`width` x `height`) into `dst`, resizing it within its
    /// capacity, and returns the output size.
    pub fn apply(
        &self,
        src: &[u8],
        width: usize,
        height: usize,
        dst: &mut Vec<u8>,
    ) -> Result<(usize, usize), CaptureError> {
        self.validate(width, height)?;
        let crop = self.crop.unwrap_or(Crop {
            x: 0,
            y: 0,
            w: width,
            h: height,
        });
        let (out_w, out_h) = self.output_size(width, height);
        dst.resize(out_w * out_h * 3, 0);

        // Output (x, y) → crop (cx, cy): undo the flip, then the clockwise rotation.
        let to_crop = |x: isize, y: isize| {
            let x = if self.flip_horizontal {
                out_w as isize - 1 - x
            } else {
                x
            };
            let (cw, ch) = (crop.w as isize, crop.h as isize);
            match self.rotate {
                Rotation::R0 => (x, y),
                Rotation::R90 => (y, ch - 1 - x),
                Rotation::R180 => (cw - 1 - x, ch - 1 - y),
                Rotation::R270 => (cw - 1 - y, x),
            }
        };
        let byte = |x: isize, y: isize| {
            let (cx, cy) = to_crop(x, y);
            ((crop.y as isize + cy) * width as isize + crop.x as isize + cx) * 3
        };
        let origin = byte(0, 0);
        let step_x = byte(1, 0) - origin;
        let step_y = byte(0, 1) - origin;

        for (y, row) in dst.chunks_exact_mut(out_w * 3).enumerate() {
            let start = origin + y as isize * step_y;
            if step_x == 3 {
                // Unrotated and unmirrored: the row is contiguous in the source.
                let start = start as usize;
                row.copy_from_slice(&src[start..start + out_w * 3]);
            } else {
                for (x, px) in row.chunks_exact_mut(3).enumerate() {
                    let at = (start + x as isize * step_x) as usize;
                    px.copy_from_slice(&src[at..at + 3]);
                }
            }
        }
        Ok((out_w, out_h))
    }
}

impl fmt::Display for Transforms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(crop) = self.crop {
            parts.push(format!("crop {crop}"));
        }
        if self.rotate != Rotation::R0 {
            parts.push(format!("rotate {}", self.rotate));
        }
        if self.flip_horizontal {
            parts.push("flip".to_string());
        }
        write!(f, "{}", parts.join(", "))
    }
}

/// A source whose frames pass through [`Transforms`] on their way to the caller. The source's
/// own frame lives in a buffer owned here and reused.
pub struct TransformedSource<S> {
    inner: S,
    transforms: Transforms,
    raw: Frame,
}

impl<S: FrameSource> TransformedSource<S> {
    /// Wraps `inner`, whose frames are `width` x `height`; fails if the crop does not fit them.
    pub fn new(
        inner: S,
        transforms: Transforms,
        width: usize,
        height: usize,
    ) -> Result<Self, CaptureError> {
        transforms.validate(width, height)?;
        Ok(Self {
            inner,
            transforms,
            raw: Frame::with_capacity(width, height),
        })
    }
}

impl<S: FrameSource> FrameSource for TransformedSource<S> {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        self.inner.next_frame(&mut self.raw)?;
        let raw = &self.raw;
        let (width, height) =
            self.transforms
                .apply(&raw.rgb, raw.width, raw.height, &mut frame.rgb)?;
        frame.width = width;
        frame.height = height;
        frame.seq = raw.seq;
        frame.captured = raw.captured;
        frame.captured_at_unix_ms = raw.captured_at_unix_ms;
        Ok(())
    }

    fn fps(&self) -> f64 {
        self.inner.fps()
    }

    fn attach(&mut self, control: std::sync::Arc<super::CaptureControl>) {
        self.inner.attach(control)
    }

    fn stats(&self) -> CaptureStats {
        self.inner.stats()
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.inner.describe(), self.transforms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!("90".parse::<Rotation>().unwrap(), Rotation::R90);
        assert!("45".parse::<Rotation>().is_err());
        assert_eq!(
            "1, 2,3,4".parse::<Crop>().unwrap(),
            Crop {
                x: 1,
                y: 2,
                w: 3,
                h: 4
            }
        );
        for bad in ["1,2,3", "1,2,3,4,5", "a,2,3,4", "-1,2,3,4", ""] {
            assert!(bad.parse::<Crop>().is_err(), "{bad:?} parsed");
        }
    }
}
