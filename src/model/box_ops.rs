//! Box arithmetic from torchvision's `ops/boxes.py` and `models/detection/_utils.py`
//! (`BoxCoder`), on host `[x1, y1, x2, y2]` boxes in f32 exactly as torch computes them.

pub type Box = [f32; 4];

/// `BoxCoder.decode_single`: applies `(dx, dy, dw, dh)` deltas, divided by `weights`, to a
/// reference box; `dw`/`dh` are clamped at `log(1000 / 16)` before `exp`.
#[derive(Debug, Clone, Copy)]
pub struct BoxCoder {
    pub weights: [f32; 4],
    pub clip: f32,
}

impl BoxCoder {
    pub fn new(weights: [f32; 4]) -> Self {
        Self {
            weights,
            clip: (1000.0f64 / 16.0).ln() as f32,
        }
    }

    pub fn decode(&self, reference: &Box, deltas: &[f32]) -> Box {
        let widths = reference[2] - reference[0];
        let heights = reference[3] - reference[1];
        let ctr_x = reference[0] + 0.5 * widths;
        let ctr_y = reference[1] + 0.5 * heights;
        let dx = deltas[0] / self.weights[0];
        let dy = deltas[1] / self.weights[1];
        let dw = (deltas[2] / self.weights[2]).min(self.clip);
        let dh = (deltas[3] / self.weights[3]).min(self.clip);
        let pred_ctr_x = dx * widths + ctr_x;
        let pred_ctr_y = dy * heights + ctr_y;
        let pred_w = dw.exp() * widths;
        let pred_h = dh.exp() * heights;
        let c_to_c_w = 0.5 * pred_w;
        let c_to_c_h = 0.5 * pred_h;
        [
            pred_ctr_x - c_to_c_w,
            pred_ctr_y - c_to_c_h,
            pred_ctr_x + c_to_c_w,
            pred_ctr_y + c_to_c_h,
        ]
    }
}

/// `clip_boxes_to_image` for an image of `(height, width)`.
pub fn clip_to_image(b: &Box, (height, width): (usize, usize)) -> Box {
    let (w, h) = (width as f32, height as f32);
    [
        b[0].clamp(0.0, w),
        b[1].clamp(0.0, h),
        b[2].clamp(0.0, w),
        b[3].clamp(0.0, h),
    ]
}

/// `remove_small_boxes`' keep condition.
pub fn is_large_enough(b: &Box, min_size: f32) -> bool {
    b[2] - b[0] >= min_size && b[3] - b[1] >= min_size
}

pub fn area(b: &Box) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Intersection over union of two boxes (0 when either is empty).
pub fn iou(a: &Box, b: &Box) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Boxes competing in a batched NMS, and the buffers it works in; owned by the caller and
/// reused, so per-frame postprocessing allocates nothing once they have grown.
#[derive(Debug, Default)]
pub struct Candidates {
    pub boxes: Vec<Box>,
    pub scores: Vec<f32>,
    pub groups: Vec<usize>,
    pub keep: Vec<usize>,
    nms: NmsScratch,
}

impl Candidates {
    pub fn clear(&mut self) {
        self.boxes.clear();
        self.scores.clear();
        self.groups.clear();
        self.keep.clear();
    }

    pub fn push(&mut self, b: Box, score: f32, group: usize) {
        self.boxes.push(b);
        self.scores.push(score);
        self.groups.push(group);
    }

    /// [`batched_nms_into`] over the candidates; the result is in `self.keep`.
    pub fn batched_nms(&mut self, iou_thresh: f32) {
        batched_nms_into(
            &self.boxes,
            &self.scores,
            &self.groups,
            iou_thresh,
            &mut self.nms,
            &mut self.keep,
        );
    }
}

/// Buffers NMS works in, kept by the caller so a stream of frames allocates nothing once they
/// have grown.
#[derive(Debug, Default)]
pub struct NmsScratch {
    order: Vec<usize>,
    sorted: Sorted,
    shifted: Vec<Box>,
    members: Vec<usize>,
    group_boxes: Vec<Box>,
    group_scores: Vec<f32>,
    group_keep: Vec<usize>,
}

/// One NMS's boxes in descending score order, a column per coordinate, so the IoUs of one
/// kept box with every later box are one loop over contiguous values.
#[derive(Debug, Default)]
struct Sorted {
    x1: Vec<f32>,
    y1: Vec<f32>,
    x2: Vec<f32>,
    y2: Vec<f32>,
    area: Vec<f32>,
    suppressed: Vec<bool>,
}

/// torchvision's CPU `nms` kernel: greedy over boxes in descending score order (ties keep input
/// order), suppressing any later box whose IoU with a kept one exceeds `iou_thresh`. Appends
/// kept indices to `keep` in descending score order.
fn nms_core(
    boxes: &[Box],
    scores: &[f32],
    iou_thresh: f32,
    (order, sorted): (&mut Vec<usize>, &mut Sorted),
    keep: &mut Vec<usize>,
) {
    order.clear();
    order.extend(0..boxes.len());
    // Unstable sort with the index as tie-break: the stable order without a merge buffer.
    order.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let Sorted {
        x1,
        y1,
        x2,
        y2,
        area: areas,
        suppressed,
    } = sorted;
    for (column, c) in [(&mut *x1, 0), (&mut *y1, 1), (&mut *x2, 2), (&mut *y2, 3)] {
        column.clear();
        column.extend(order.iter().map(|&i| boxes[i][c]));
    }
    areas.clear();
    areas.extend(order.iter().map(|&i| area(&boxes[i])));
    suppressed.clear();
    suppressed.resize(boxes.len(), false);
    for pos in 0..order.len() {
        if suppressed[pos] {
            continue;
        }
        keep.push(order[pos]);
        let (bx1, by1, bx2, by2, ba) = (x1[pos], y1[pos], x2[pos], y2[pos], areas[pos]);
        let later = pos + 1..order.len();
        // Every later box, suppressed or not, with no branch, so the loop vectorises:
        // suppressing a box twice changes nothing, and the IoU is torchvision's expression.
        for (((((&jx1, &jy1), &jx2), &jy2), &ja), s) in x1[later.clone()]
            .iter()
            .zip(&y1[later.clone()])
            .zip(&x2[later.clone()])
            .zip(&y2[later.clone()])
            .zip(&areas[later.clone()])
            .zip(&mut suppressed[later])
        {
            let w = (bx2.min(jx2) - bx1.max(jx1)).max(0.0);
            let h = (by2.min(jy2) - by1.max(jy1)).max(0.0);
            let inter = w * h;
            let iou = inter / (ba + ja - inter);
            *s |= iou > iou_thresh;
        }
    }
}

/// torchvision's `batched_nms`: NMS independently per `groups` value, kept indices (replacing
/// `keep`'s contents) sorted by descending score. Like torchvision on CPU, above 1000 boxes it
/// runs one NMS per group; below, it offsets each group's boxes by
/// `group * (max_coordinate + 1)` and runs a single NMS, which can differ from the per-group
/// result in the last bit, so both paths are reproduced.
pub fn batched_nms_into(
    boxes: &[Box],
    scores: &[f32],
    groups: &[usize],
    iou_thresh: f32,
    s: &mut NmsScratch,
    keep: &mut Vec<usize>,
) {
    keep.clear();
    if boxes.is_empty() {
        return;
    }
    let bufs = (&mut s.order, &mut s.sorted);
    if boxes.len() * 4 > 4000 {
        let n_groups = groups.iter().max().map_or(0, |g| g + 1);
        for g in 0..n_groups {
            s.members.clear();
            s.members
                .extend((0..boxes.len()).filter(|&i| groups[i] == g));
            s.group_boxes.clear();
            s.group_boxes.extend(s.members.iter().map(|&i| boxes[i]));
            s.group_scores.clear();
            s.group_scores.extend(s.members.iter().map(|&i| scores[i]));
            s.group_keep.clear();
            nms_core(
                &s.group_boxes,
                &s.group_scores,
                iou_thresh,
                (&mut *bufs.0, &mut *bufs.1),
                &mut s.group_keep,
            );
            keep.extend(s.group_keep.iter().map(|&k| s.members[k]));
        }
        keep.sort_unstable_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    } else {
        let max_coordinate = boxes
            .iter()
            .flatten()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        s.shifted.clear();
        s.shifted.extend(boxes.iter().zip(groups).map(|(b, &g)| {
            let offset = g as f32 * (max_coordinate + 1.0);
            b.map(|v| v + offset)
        }));
        nms_core(&s.shifted, scores, iou_thresh, bufs, keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nms_suppresses_overlaps_above_threshold_only() {
        // IoU(a, b) = 50 / 150 = 1/3; IoU(a, c) = 0.
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [5.0, 0.0, 15.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
        ];
        let nms = |scores: &[f32], thresh| {
            let mut keep = Vec::new();
            let scratch = &mut NmsScratch::default();
            batched_nms_into(&boxes, scores, &[0; 3], thresh, scratch, &mut keep);
            keep
        };
        let scores = [0.9, 0.8, 0.7];
        assert_eq!(nms(&scores, 0.3), vec![0, 2]);
        assert_eq!(nms(&scores, 0.34), vec![0, 1, 2]);
        // Order follows the scores, not the input.
        assert_eq!(nms(&[0.1, 0.8, 0.7], 0.3), vec![1, 2]);
    }

    #[test]
    fn batched_nms_keeps_overlapping_boxes_of_different_groups() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 0.0, 11.0, 10.0],
            [0.0, 1.0, 10.0, 11.0],
        ];
        let scores = [0.9, 0.8, 0.95];
        let batched = |b: &[Box], s: &[f32], g: &[usize]| {
            let mut keep = Vec::new();
            batched_nms_into(b, s, g, 0.5, &mut NmsScratch::default(), &mut keep);
            keep
        };
        assert_eq!(batched(&boxes, &scores, &[0, 1, 0]), vec![2, 1]);
        // The same over 1000 boxes, where the per-group path runs.
        let mut many = boxes.to_vec();
        let mut many_scores = scores.to_vec();
        let mut many_groups = vec![0, 1, 0];
        for i in 0..1100 {
            let x = 100.0 + 20.0 * i as f32;
            many.push([x, 0.0, x + 10.0, 10.0]);
            many_scores.push(0.01);
            many_groups.push(2);
        }
        let keep = batched(&many, &many_scores, &many_groups);
        assert_eq!(&keep[..2], &[2, 1]);
        assert_eq!(keep.len(), 2 + 1100);
    }

    #[test]
    fn decode_matches_torchvision_box_coder() {
        // BoxCoder((10, 10, 5, 5)) on box (10, 20, 50, 80): w=40, h=60, centre (30, 50);
        // deltas (1, 2, 3, 4) scale to dx=0.1, dy=0.2, dw=0.6, dh=0.8.
        let coder = BoxCoder::new([10.0, 10.0, 5.0, 5.0]);
        let b = coder.decode(&[10.0, 20.0, 50.0, 80.0], &[1.0, 2.0, 3.0, 4.0]);
        let pw = 0.6f32.exp() * 40.0;
        let ph = 0.8f32.exp() * 60.0;
        let want = [
            34.0 - pw / 2.0,
            62.0 - ph / 2.0,
            34.0 + pw / 2.0,
            62.0 + ph / 2.0,
        ];
        for (a, b) in b.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // dw above log(1000/16) is clamped.
        let big = BoxCoder::new([1.0; 4]).decode(&[0.0, 0.0, 16.0, 16.0], &[0.0, 0.0, 100.0, 0.0]);
        assert!((big[2] - big[0] - 1000.0).abs() < 1e-2);
    }
}
