//! COCO's run-length encoding of binary masks, as `pycocotools.mask` writes it: what
//! postprocessing makes, what every output writes, and what evaluation decodes.

/// A binary mask as COCO's uncompressed RLE: alternating run lengths of 0s and 1s in
/// column-major (Fortran) order, starting with 0s.
#[derive(Debug, PartialEq, Eq)]
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

/// Written by hand so that `clone_from` reuses the target's run buffer: a sink that keeps a copy
/// of each frame's masks then allocates nothing once its buffers have grown.
impl Clone for Rle {
    fn clone(&self) -> Self {
        Self {
            height: self.height,
            width: self.width,
            counts: self.counts.clone(),
        }
    }

    fn clone_from(&mut self, source: &Self) {
        self.height = source.height;
        self.width = source.width;
        self.counts.clone_from(&source.counts);
    }
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
    pub fn area(&self) -> usize {
        (self.x1 - self.x0) * (self.y1 - self.y0)
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
