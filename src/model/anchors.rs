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

/// Anchors of every level for a padded batch of `padded` = (height, width) whose feature maps
/// have sizes `grids`. Like torchvision, the stride is `padded / grid` in integer division,
/// which is not always a power of two on P6 (an odd P5 gives P6 = ceil(P5 / 2)).
pub fn grid_anchors(grids: &[(usize, usize)], padded: (usize, usize)) -> Vec<Vec<Box>> {
    grids
        .iter()
        .zip(ANCHOR_SIZES)
        .map(|(&(gh, gw), size)| {
            let (sy, sx) = (padded.0 / gh, padded.1 / gw);
            let base = cell_anchors(size);
            let mut anchors = Vec::with_capacity(gh * gw * base.len());
            for y in 0..gh {
                for x in 0..gw {
                    let (shift_x, shift_y) = ((x * sx) as f32, (y * sy) as f32);
                    anchors.extend(base.iter().map(|a| {
                        [
                            a[0] + shift_x,
                            a[1] + shift_y,
                            a[2] + shift_x,
                            a[3] + shift_y,
                        ]
                    }));
                }
            }
            anchors
        })
        .collect()
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
        // 800 / 32 = 25 on P5 → 13 on P6 → stride 800 // 13 = 61.
        let a = grid_anchors(&[(13, 13)], (800, 800));
        assert_eq!(a[0][3], [61.0 - 23.0, -11.0, 61.0 + 23.0, 11.0]);
        assert_eq!(a[0].len(), 13 * 13 * 3);
        // Second row starts after a full row of columns.
        assert_eq!(a[0][13 * 3 + 1], [-16.0, 61.0 - 16.0, 16.0, 61.0 + 16.0]);
    }
}
