//! The two accuracy metrics, fed one image at a time so that no predicted mask outlives its
//! image.
//!
//! **iMaterialist 2019** ([`ImaterialistMetric`]). Kaggle's text defines, per image, the mean
//! over IoU thresholds 0.50, 0.55, …, 0.95 of TP / (TP + FP + FN), and the score as the mean
//! over images; masks are only compared within a ClassId. What is implemented, exactly: for each
//! (image, class) pair that has a ground-truth or a predicted mask (a pair with neither does not
//! exist), and for each threshold t, predictions are taken in descending score order and each
//! is matched to the still-unmatched ground truth of that class with the highest IoU
//! **strictly above** t (ties to the first); TP counts matches, FP the other predictions, FN the
//! other truths. The pair scores the mean over the ten thresholds; the final score is the
//! unweighted mean over all pairs (an image counts once per class it has or is predicted to
//! have), and a class's score is the mean over its pairs. Kaggle scored the submission, so the
//! predictions are the masks [`super::submit::non_overlapping`] keeps. Crowd regions (COCO
//! `iscrowd`) did not exist in the competition and are left out of this metric.
//!
//! **COCO mask AP** ([`CocoEvaluator`]) reproduces pycocotools' `COCOeval` with
//! `iouType="segm"`, area range "all" and `maxDets = 100`: per image and category the top 100
//! detections by score are matched at each of `np.linspace(.5, .95, 10)` to the best unmatched
//! ground truth with IoU ≥ t (crowd ground truth may match many detections, which are then
//! ignored, and uses IoU over the detection's area); `accumulate` sorts each category's
//! detections over all images (stable, by score), makes precision monotone and samples it at
//! the 101 recall points `np.linspace(0, 1, 101)`; AP is the mean over thresholds, recall points
//! and categories that have ground truth, AP50 and AP75 the same at one threshold.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::eval::masks;
use crate::eval::GtObject;
use crate::rle::Rle;

/// COCOeval's `maxDets[-1]`: detections kept per image and category.
pub const MAX_DETS: usize = 100;
const THRESHOLDS: usize = 10;
const RECALL_POINTS: usize = 101;
/// Index of 0.5 and 0.75 among the thresholds.
const AP50: usize = 0;
const AP75: usize = 5;

/// A scored mask as the metrics see it: a model instance or an entry of a result file.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    pub class_id: usize,
    pub score: f64,
    pub mask: &'a Rle,
}

/// `np.linspace(start, stop, N)` to the bit: `i * step + start`, the last value set to `stop`.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut out = [0.0; N];
    for (i, v) in out.iter_mut().enumerate() {
        *v = i as f64 * step + start;
    }
    out[N - 1] = stop;
    out
}

/// COCOeval's `iouThrs`.
pub fn coco_iou_thresholds() -> [f64; THRESHOLDS] {
    linspace(0.5, 0.95)
}

/// COCOeval's `recThrs`.
pub fn coco_recall_thresholds() -> [f64; RECALL_POINTS] {
    linspace(0.0, 1.0)
}

/// The competition's thresholds, `np.arange(0.5, 1.0, 0.05)`.
pub fn imaterialist_thresholds() -> [f64; THRESHOLDS] {
    std::array::from_fn(|i| 0.5 + i as f64 * 0.05)
}

/// Predictions of one class, best first (a stable sort, as numpy's mergesort).
fn of_class<'a>(predictions: &[Scored<'a>], class_id: usize) -> Vec<Scored<'a>> {
    let mut out: Vec<Scored> = predictions
        .iter()
        .filter(|p| p.class_id == class_id)
        .copied()
        .collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score));
    out
}

/// The score of one (image, class) pair.
#[derive(Debug, Clone, Copy)]
struct PairScore {
    class_id: usize,
    score: f64,
}

#[derive(Debug, Default)]
pub struct ImaterialistMetric {
    pairs: Vec<PairScore>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImaterialistSummary {
    /// Mean over (image, class) pairs; `None` when there were none.
    pub score: Option<f64>,
    pub pairs: usize,
    /// Class id -> mean over that class's pairs.
    pub per_class: BTreeMap<usize, f64>,
}

impl ImaterialistMetric {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores one image: `predictions` should be what a submission would hold for it.
    pub fn add_image(&mut self, truth: &[GtObject], predictions: &[Scored]) {
        let mut classes: Vec<usize> = truth
            .iter()
            .filter(|g| !g.iscrowd)
            .map(|g| g.class_id)
            .chain(predictions.iter().map(|p| p.class_id))
            .collect();
        classes.sort_unstable();
        classes.dedup();
        for class_id in classes {
            let gt: Vec<&Rle> = truth
                .iter()
                .filter(|g| g.class_id == class_id && !g.iscrowd)
                .map(|g| &g.mask)
                .collect();
            let preds = of_class(predictions, class_id);
            let ious: Vec<Vec<f64>> = preds
                .iter()
                .map(|p| gt.iter().map(|g| masks::iou(p.mask, g, false)).collect())
                .collect();
            let thresholds = imaterialist_thresholds();
            let total: f64 = thresholds
                .iter()
                .map(|&t| {
                    let mut taken = vec![false; gt.len()];
                    let mut tp = 0;
                    for row in &ious {
                        let best = row
                            .iter()
                            .enumerate()
                            .filter(|&(g, &iou)| !taken[g] && iou > t)
                            .fold(None, |best: Option<(usize, f64)>, (g, &iou)| match best {
                                Some((_, b)) if b >= iou => best,
                                _ => Some((g, iou)),
                            });
                        if let Some((g, _)) = best {
                            taken[g] = true;
                            tp += 1;
                        }
                    }
                    // TP + FP + FN = TP + (predictions - TP) + (truths - TP); never 0 for a pair.
                    tp as f64 / (preds.len() + gt.len() - tp) as f64
                })
                .sum();
            self.pairs.push(PairScore {
                class_id,
                score: total / thresholds.len() as f64,
            });
        }
    }

    pub fn summary(&self) -> ImaterialistSummary {
        let mean = |scores: &[f64]| scores.iter().sum::<f64>() / scores.len() as f64;
        let mut by_class: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for p in &self.pairs {
            by_class.entry(p.class_id).or_default().push(p.score);
        }
        let all: Vec<f64> = self.pairs.iter().map(|p| p.score).collect();
        ImaterialistSummary {
            score: (!all.is_empty()).then(|| mean(&all)),
            pairs: all.len(),
            per_class: by_class.iter().map(|(&c, s)| (c, mean(s))).collect(),
        }
    }
}

/// One category's evaluated detections over all images so far (COCOeval's `evalImgs`
/// entries, concatenated in image order).
#[derive(Debug, Default)]
struct ClassRecords {
    scores: Vec<f64>,
    /// Bit t: matched at threshold t.
    matched: Vec<u16>,
    /// Bit t: matched to a crowd region at threshold t, so neither TP nor FP.
    ignored: Vec<u16>,
    /// Ground truths that are not crowd regions (`npig`).
    positives: usize,
}

/// Accumulates COCOeval over images given in ascending image-id order.
#[derive(Debug)]
pub struct CocoEvaluator {
    classes: BTreeMap<usize, ClassRecords>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ClassAp {
    pub class_id: usize,
    pub ap: f64,
    pub ap50: f64,
    pub ap75: f64,
}

/// COCOeval's first three stats; `None` where pycocotools prints -1 (no ground truth).
#[derive(Debug, Clone, Serialize)]
pub struct CocoSummary {
    pub ap: Option<f64>,
    pub ap50: Option<f64>,
    pub ap75: Option<f64>,
    /// Categories with ground truth, ascending.
    pub per_class: Vec<ClassAp>,
}

impl CocoEvaluator {
    /// `categories` are COCOeval's `catIds`: detections of other classes are not evaluated.
    pub fn new(categories: &[usize]) -> Self {
        Self {
            classes: categories
                .iter()
                .map(|&c| (c, ClassRecords::default()))
                .collect(),
        }
    }

    /// COCOeval's `evaluateImg` for every category of one image.
    pub fn add_image(&mut self, truth: &[GtObject], detections: &[Scored]) {
        let thresholds = coco_iou_thresholds();
        for (&class_id, records) in &mut self.classes {
            // Crowd regions (ignored ground truth) sort last, stably.
            let mut gt: Vec<&GtObject> = truth.iter().filter(|g| g.class_id == class_id).collect();
            gt.sort_by_key(|g| g.iscrowd);
            let mut dt = of_class(detections, class_id);
            dt.truncate(MAX_DETS);
            records.positives += gt.iter().filter(|g| !g.iscrowd).count();
            let ious: Vec<Vec<f64>> = dt
                .iter()
                .map(|d| {
                    gt.iter()
                        .map(|g| masks::iou(d.mask, &g.mask, g.iscrowd))
                        .collect()
                })
                .collect();
            let (mut matched, mut ignored) = (vec![0u16; dt.len()], vec![0u16; dt.len()]);
            for (t, &threshold) in thresholds.iter().enumerate() {
                let mut gt_matched = vec![false; gt.len()];
                for (d, row) in ious.iter().enumerate() {
                    let mut best = threshold.min(1.0 - 1e-10);
                    let mut m: Option<usize> = None;
                    for (g, &iou) in row.iter().enumerate() {
                        if gt_matched[g] && !gt[g].iscrowd {
                            continue;
                        }
                        // Matched to a real object already; only crowd regions remain.
                        if m.is_some_and(|m| !gt[m].iscrowd) && gt[g].iscrowd {
                            break;
                        }
                        if iou < best {
                            continue;
                        }
                        best = iou;
                        m = Some(g);
                    }
                    if let Some(m) = m {
                        matched[d] |= 1 << t;
                        if gt[m].iscrowd {
                            ignored[d] |= 1 << t;
                        }
                        gt_matched[m] = true;
                    }
                }
            }
            records.scores.extend(dt.iter().map(|d| d.score));
            records.matched.extend(matched);
            records.ignored.extend(ignored);
        }
    }

    /// COCOeval's `accumulate` and the AP / AP50 / AP75 lines of `summarize`.
    pub fn summary(&self) -> CocoSummary {
        let mut per_class = Vec::new();
        // Every precision value pycocotools averages, per threshold.
        let mut sums = [0.0f64; THRESHOLDS];
        let mut n = 0usize;
        for (&class_id, records) in &self.classes {
            let Some(precision) = records.precision() else {
                continue;
            };
            let means = precision.map(|p| p.iter().sum::<f64>() / RECALL_POINTS as f64);
            per_class.push(ClassAp {
                class_id,
                ap: means.iter().sum::<f64>() / THRESHOLDS as f64,
                ap50: means[AP50],
                ap75: means[AP75],
            });
            for (s, p) in sums.iter_mut().zip(&precision) {
                *s += p.iter().sum::<f64>();
            }
            n += 1;
        }
        let points = (n * RECALL_POINTS) as f64;
        let some = |v: f64| (n > 0).then_some(v);
        CocoSummary {
            ap: some(sums.iter().sum::<f64>() / (points * THRESHOLDS as f64)),
            ap50: some(sums[AP50] / points),
            ap75: some(sums[AP75] / points),
            per_class,
        }
    }
}

impl ClassRecords {
    /// Interpolated precision at each threshold and recall point; `None` without ground truth.
    fn precision(&self) -> Option<[[f64; RECALL_POINTS]; THRESHOLDS]> {
        if self.positives == 0 {
            return None;
        }
        let recall_points = coco_recall_thresholds();
        let mut order: Vec<usize> = (0..self.scores.len()).collect();
        order.sort_by(|&a, &b| self.scores[b].total_cmp(&self.scores[a]));
        let mut out = [[0.0; RECALL_POINTS]; THRESHOLDS];
        for (t, q) in out.iter_mut().enumerate() {
            let (mut tp, mut fp) = (0.0f64, 0.0f64);
            let mut recall = Vec::with_capacity(order.len());
            let mut precision = Vec::with_capacity(order.len());
            for &i in &order {
                // Ignored detections keep their place in the ranking but count as neither.
                if self.ignored[i] >> t & 1 == 0 {
                    if self.matched[i] >> t & 1 == 1 {
                        tp += 1.0;
                    } else {
                        fp += 1.0;
                    }
                }
                recall.push(tp / self.positives as f64);
                precision.push(tp / (fp + tp + f64::EPSILON));
            }
            for i in (1..precision.len()).rev() {
                if precision[i] > precision[i - 1] {
                    precision[i - 1] = precision[i];
                }
            }
            for (slot, &r) in q.iter_mut().zip(&recall_points) {
                // `np.searchsorted(rc, recThrs, side='left')`; beyond the last recall reached
                // precision stays 0.
                match precision.get(recall.partition_point(|&x| x < r)) {
                    Some(&p) => *slot = p,
                    None => break,
                }
            }
        }
        Some(out)
    }
}
