//! torchvision's `AnchorGenerator` (`models/detection/anchor_utils.py`) with the Mask R-CNN
//! defaults: one size per FPN level, three aspect ratios, anchors ordered location-major
//! (row, then column), then by ratio — the order the RPN head's outputs are flattened in.

use super::box_ops::Box;

/// `((32,), (64,), (128,), (256,), (512,))`, one per level P2..P6.
pub const ANCHOR_SIZES: [f32; 5] = [32.0, 64.0, 128.0, 256.0, 512.0];
/// `((0.5, 1.0, 2.0),) * 5`, as height / width.
pub const ASPECT_RATIOS: [f32; 3] = [0.5, 1.0, 2.0];

/// `AnchorGenerator.generate_anchors` for one size: zero-centred, rounded half-to-even.
fn cell_anchors(size: f32) -> [Box; 3] {
    ASPECT_RATIOS.map(|ratio| {
        let h_ratio = ratio.sqrt();
        let w_ratio = 1.0 / h_ratio;
        let ws = w_ratio * size;
        let hs = h_ratio * size;
        [-ws, -hs, ws, hs].map(|v| (v / 2.0).round_ties_even())
    })
}

/// The anchors of one FPN level, computed by index: the RPN needs only its top-n winners'
/// anchors, so building every anchor of every level per frame (about 3.5 MB at 800×1088) would
/// be work and memory thrown away.
#[derive(Debug, Clone, Copy)]
pub struct LevelAnchors {
    base: [Box; 3],
    grid_width: usize,
    stride: (usize, usize),
    len: usize,
}

impl LevelAnchors {
    /// Level `level`'s anchors for a padded batch of `padded` = (height, width) whose feature
    /// map is `grid` = (height, width). Like torchvision, the stride is `padded / grid` in
    /// integer division, which is not always a power of two on P6 (an odd P5 gives
    /// P6 = ceil(P5 / 2)).
    pub fn new(level: usize, grid: (usize, usize), padded: (usize, usize)) -> Self {
        let base = cell_anchors(ANCHOR_SIZES[level.min(ANCHOR_SIZES.len() - 1)]);
        Self {
            base,
            grid_width: grid.1,
            stride: (padded.0 / grid.0.max(1), padded.1 / grid.1.max(1)),
            len: grid.0 * grid.1 * base.len(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Anchor `i` in torchvision's order: location-major (row, then column), then ratio.
    pub fn get(&self, i: usize) -> Box {
        let (cell, ratio) = (i / self.base.len(), i % self.base.len());
        let (y, x) = (cell / self.grid_width, cell % self.grid_width);
        let (shift_x, shift_y) = ((x * self.stride.1) as f32, (y * self.stride.0) as f32);
        let a = self.base[ratio];
        [
            a[0] + shift_x,
            a[1] + shift_y,
            a[2] + shift_x,
            a[3] + shift_y,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_anchors_match_torchvision() {
        // AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0]
        assert_eq!(
            cell_anchors(32.0),
            [
                [-23.0, -11.0, 23.0, 11.0],
                [-16.0, -16.0, 16.0, 16.0],
                [-11.0, -23.0, 11.0, 23.0]
            ]
        );
    }

    #[test]
    fn strides_use_integer_division_of_padded_size() {
        // 800 / 32 = 25 on P5 → 13 on P6 → stride 800 // 13 = 61 (P2's 32-pixel cells here).
        let a = LevelAnchors::new(0, (13, 13), (800, 800));
        assert_eq!(a.get(3), [61.0 - 23.0, -11.0, 61.0 + 23.0, 11.0]);
        assert_eq!(a.len(), 13 * 13 * 3);
        // Second row starts after a full row of columns.
        assert_eq!(a.get(13 * 3 + 1), [-16.0, 61.0 - 16.0, 16.0, 61.0 + 16.0]);
    }

    #[test]
    fn anchors_by_index_follow_torchvision_order_on_every_level() {
        // AnchorGenerator.grid_anchors: shifts over (row, column), each cell's 3 ratios.
        let padded = (96, 160);
        for (level, grid) in [(3, 12), (5, 20), (2, 3), (1, 5), (1, 3)]
            .into_iter()
            .enumerate()
        {
            let a = LevelAnchors::new(level, grid, padded);
            let base = cell_anchors(ANCHOR_SIZES[level]);
            let mut i = 0;
            for y in 0..grid.0 {
                for x in 0..grid.1 {
                    for b in base {
                        let (sx, sy) = ((x * (160 / grid.1)) as f32, (y * (96 / grid.0)) as f32);
                        assert_eq!(a.get(i), [b[0] + sx, b[1] + sy, b[2] + sx, b[3] + sy]);
                        i += 1;
                    }
                }
            }
            assert_eq!(a.len(), i);
        }
    }
}
