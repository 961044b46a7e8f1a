//! Mask geometry on COCO's uncompressed RLE ([`Rle`]): the operations of pycocotools'
//! `maskApi.c` that evaluation needs — IoU (`rleIou`), merging (`rleMerge`), compressed strings
//! (`rleFrString`) and polygon rasterisation (`rleFrPoly`), ported line by line so that masks
//! and IoUs come out bit-identical to pycocotools'.

use crate::rle::Rle;

/// `rleFrPoly` rasterises on a grid this many times finer than the pixel grid.
const POLY_UPSAMPLE: f64 = 5.0;

/// Walks a mask's runs as (value, remaining length), skipping zero-length runs.
struct Runs<'a> {
    counts: &'a [u32],
    index: usize,
    left: u64,
}

impl<'a> Runs<'a> {
    fn new(counts: &'a [u32]) -> Self {
        Self {
            counts,
            index: 0,
            left: counts.first().map_or(0, |&c| c as u64),
        }
    }

    /// Foreground runs sit at odd indices: counts start with background.
    fn value(&self) -> bool {
        self.index % 2 == 1
    }

    /// Moves past exhausted runs; false once the mask is done.
    fn settle(&mut self) -> bool {
        while self.left == 0 {
            self.index += 1;
            match self.counts.get(self.index) {
                Some(&c) => self.left = c as u64,
                None => return false,
            }
        }
        true
    }
}

/// Calls `f(in_a, in_b, len)` for each stretch of pixels, in column-major order, over which
/// neither mask changes. Both masks must cover the same pixels.
fn walk(a: &Rle, b: &Rle, mut f: impl FnMut(bool, bool, u64)) {
    debug_assert_eq!((a.height, a.width), (b.height, b.width));
    let (mut ra, mut rb) = (Runs::new(&a.counts), Runs::new(&b.counts));
    while ra.settle() && rb.settle() {
        let n = ra.left.min(rb.left);
        f(ra.value(), rb.value(), n);
        ra.left -= n;
        rb.left -= n;
    }
}

/// Builds canonical counts (background first, no empty runs inside) from stretches of pixels.
pub(crate) struct RleBuilder {
    counts: Vec<u32>,
    value: bool,
}

impl RleBuilder {
    pub(crate) fn new() -> Self {
        Self {
            counts: vec![0],
            value: false,
        }
    }

    pub(crate) fn push(&mut self, value: bool, len: u64) {
        if len == 0 {
            return;
        }
        // Callers bound every mask by Height×Width, which they check fits a u32 count.
        let len = len as u32;
        if value == self.value {
            if let Some(last) = self.counts.last_mut() {
                *last += len;
            }
        } else {
            self.counts.push(len);
            self.value = value;
        }
    }

    pub(crate) fn finish(self, height: usize, width: usize) -> Rle {
        Rle {
            height,
            width,
            counts: self.counts,
        }
    }
}

/// An all-background mask.
pub fn empty(height: usize, width: usize) -> Rle {
    Rle {
        height,
        width,
        counts: vec![(height * width) as u32],
    }
}

/// Pixelwise `op` of two masks of the same size (`rleMerge` is `op = or` / `and`).
pub fn merge(a: &Rle, b: &Rle, op: impl Fn(bool, bool) -> bool) -> Rle {
    let mut out = RleBuilder::new();
    walk(a, b, |x, y, n| out.push(op(x, y), n));
    out.finish(a.height, a.width)
}

/// (|a ∩ b|, |a ∪ b|) in pixels.
pub fn intersection_union(a: &Rle, b: &Rle) -> (u64, u64) {
    let (mut inter, mut union) = (0, 0);
    walk(a, b, |x, y, n| {
        if x && y {
            inter += n;
        }
        if x || y {
            union += n;
        }
    });
    (inter, union)
}

/// pycocotools' `rleIou` for one detection and one ground-truth mask: intersection over union,
/// or over the detection's own area when the ground truth is a crowd region; 0 when they do not
/// meet (its bounding-box pre-check only skips pairs whose intersection is 0 anyway).
pub fn iou(detection: &Rle, truth: &Rle, crowd: bool) -> f64 {
    let (inter, union) = intersection_union(detection, truth);
    if inter == 0 {
        0.0
    } else if crowd {
        inter as f64 / detection.area() as f64
    } else {
        inter as f64 / union as f64
    }
}

/// Wraps COCO uncompressed counts (`{"size": [h, w], "counts": [...]}`), checking that they
/// cover exactly `height × width` pixels.
pub fn from_counts(counts: Vec<u32>, height: usize, width: usize) -> Result<Rle, String> {
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    if total != (height * width) as u64 {
        return Err(format!(
            "RLE counts cover {total} pixels, not {height}×{width} = {}",
            height * width
        ));
    }
    Ok(Rle {
        height,
        width,
        counts,
    })
}

/// pycocotools' `rleFrString`: the inverse of [`Rle::to_coco_string`] (6-bit groups offset by
/// 48, each count after the second stored as a difference to the count two back), checked to
/// cover exactly `height × width` pixels.
pub fn from_coco_string(s: &str, height: usize, width: usize) -> Result<Rle, String> {
    let mut counts: Vec<u32> = Vec::new();
    let mut bytes = s.bytes();
    while let Some(first) = bytes.next() {
        let mut x: i64 = 0;
        let mut k = 0;
        let mut byte = first;
        loop {
            let c = match byte {
                48..=111 => (byte - 48) as i64,
                _ => {
                    return Err(format!(
                        "byte {byte:#04x} at count {} is outside the RLE alphabet",
                        counts.len()
                    ))
                }
            };
            if k >= 12 {
                return Err(format!("count {} does not fit 64 bits", counts.len()));
            }
            x |= (c & 0x1f) << (5 * k);
            k += 1;
            if c & 0x20 == 0 {
                if c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
                break;
            }
            byte = bytes
                .next()
                .ok_or_else(|| format!("string ends inside count {}", counts.len()))?;
        }
        if counts.len() > 2 {
            x += counts[counts.len() - 2] as i64;
        }
        let count = u32::try_from(x)
            .map_err(|_| format!("count {} decodes to {x}, not a run length", counts.len()))?;
        counts.push(count);
    }
    from_counts(counts, height, width)
}

/// pycocotools' `rleFrPoly`, ported operation for operation: the closed polygon `xy` (x0, y0,
/// x1, y1, …, in pixel coordinates whose integer values are pixel centres) is traced on a 5×
/// finer grid, the crossings with the vertical lines through pixel centres are kept, and every
/// pixel whose centre lies below a downward crossing and above the next upward one in its column
/// is set. Parts outside the image are clipped. A trailing odd coordinate is ignored, as
/// pycocotools does.
pub fn from_polygon(xy: &[f64], height: usize, width: usize) -> Rle {
    let k = xy.len() / 2;
    if k == 0 {
        return empty(height, width);
    }
    // C's `(int)(v + .5)` truncates toward zero; the last vertex closes the loop.
    let snap = |v: f64| (POLY_UPSAMPLE * v + 0.5) as i32 as i64;
    let x: Vec<i64> = (0..=k).map(|j| snap(xy[(j % k) * 2])).collect();
    let y: Vec<i64> = (0..=k).map(|j| snap(xy[(j % k) * 2 + 1])).collect();

    // Dense boundary points on the fine grid, one per step along each edge's major axis.
    let (mut u, mut v) = (Vec::new(), Vec::new());
    for j in 0..k {
        let (mut xs, mut xe, mut ys, mut ye) = (x[j], x[j + 1], y[j], y[j + 1]);
        let dx = (xe - xs).abs();
        let dy = (ys - ye).abs();
        let flip = (dx >= dy && xs > xe) || (dx < dy && ys > ye);
        if flip {
            std::mem::swap(&mut xs, &mut xe);
            std::mem::swap(&mut ys, &mut ye);
        }
        // A repeated vertex gives 0/0 = NaN here as in C; its one point is never used below,
        // because its x equals its neighbours'.
        let s = if dx >= dy {
            (ye - ys) as f64 / dx as f64
        } else {
            (xe - xs) as f64 / dy as f64
        };
        let round = |base: i64, t: i64| (base as f64 + s * t as f64 + 0.5) as i32 as i64;
        if dx >= dy {
            for d in 0..=dx {
                let t = if flip { dx - d } else { d };
                u.push(t + xs);
                v.push(round(ys, t));
            }
        } else {
            for d in 0..=dy {
                let t = if flip { dy - d } else { d };
                v.push(t + ys);
                u.push(round(xs, t));
            }
        }
    }

    // Where the boundary crosses a pixel-centre column, back on the pixel grid.
    let (h, w) = (height as i64, width as i64);
    let mut starts: Vec<u32> = Vec::new();
    for j in 1..u.len() {
        if u[j] == u[j - 1] {
            continue;
        }
        let xd = if u[j] < u[j - 1] { u[j] } else { u[j] - 1 } as f64;
        let xd = (xd + 0.5) / POLY_UPSAMPLE - 0.5;
        if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
            continue;
        }
        let yd = v[j].min(v[j - 1]) as f64;
        let yd = ((yd + 0.5) / POLY_UPSAMPLE - 0.5)
            .clamp(0.0, h as f64)
            .ceil();
        starts.push((xd as i64 * h + yd as i64) as u32);
    }

    // Sorted crossing positions toggle the mask; their differences are the run lengths, and a
    // zero difference (two toggles at one pixel) cancels by merging its neighbours.
    starts.push((h * w) as u32);
    starts.sort_unstable();
    let mut previous = 0;
    for a in &mut starts {
        let t = *a;
        *a -= previous;
        previous = t;
    }
    let mut counts = vec![starts[0]];
    let mut j = 1;
    while j < starts.len() {
        if starts[j] > 0 {
            counts.push(starts[j]);
            j += 1;
        } else {
            j += 1;
            if j < starts.len() {
                if let Some(last) = counts.last_mut() {
                    *last += starts[j];
                }
                j += 1;
            }
        }
    }
    Rle {
        height,
        width,
        counts,
    }
}
