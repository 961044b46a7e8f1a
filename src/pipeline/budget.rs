//! The latency budget: a cost model learnt online (seeded by `drape calibrate`) that caps the
//! masks per frame, and the ladder of input sizes it steps down and back up with hysteresis.

use serde::Serialize;

use super::ring::Ring;
use crate::model::transform::Transform;
use crate::model::{FrameSettings, Timings};

/// Input short sides as fractions of the model's own: 800 → 640 → 512 → 384 for torchvision's
/// default.
pub const LADDER_FRACTIONS: [f64; 4] = [1.0, 0.8, 0.64, 0.48];
/// Plan to use at most this share of the budget; the rest absorbs jitter.
const HEADROOM: f64 = 0.85;
/// Step down after this many consecutive frames whose fixed cost alone would miss.
const STEP_DOWN_AFTER: u32 = 2;
/// Step back up after this many consecutive frames on which the larger size would fit...
const STEP_UP_AFTER: u32 = 10;
/// ...within this share of the budget (the gap to `HEADROOM` is the hysteresis).
const STEP_UP_FRACTION: f64 = 0.6;
/// Frames whose worst fixed cost the plan allows for.
const RECENT_FRAMES: usize = 8;
/// Weight of the newest measurement in the cost model's moving averages.
const EWMA_WEIGHT: f64 = 0.3;

/// The (min_size, max_size) pairs the budget steps through, from `base` (the model's own) down:
/// what `drape run` may switch to, so what calibration measures and evaluation grades.
pub fn ladder(base: (usize, usize)) -> [(usize, usize); LADDER_FRACTIONS.len()] {
    LADDER_FRACTIONS.map(|f| {
        let scale = |s: usize| ((s as f64 * f).round() as usize).max(32);
        (scale(base.0), scale(base.1))
    })
}

/// The budget's cost model and ladder position.
///
/// Fixed cost (everything but the mask branch) is modelled per megapixel of model input, so a
/// measurement at one size predicts every other; the mask branch costs a constant per masked
/// detection. Both are moving averages, seeded from a calibration profile when one exists.
/// Plans use the worse of the average times the calibrated p99/median factor and the worst
/// of the last few frames, so a machine whose costs jump frame to frame plans for the jumps.
#[derive(Debug, Clone)]
pub struct BudgetController {
    budget_ms: f64,
    ladder: [(usize, usize); LADDER_FRACTIONS.len()],
    level: usize,
    max_masks: usize,
    fixed_ms_per_mpx: Option<f64>,
    mask_ms: Option<f64>,
    /// Multiplier from typical to p99 cost (>= 1), from calibration.
    safety: f64,
    /// Fixed cost per megapixel of the last frames.
    recent: Ring<f64>,
    over: u32,
    under: u32,
}

/// Costs learnt by `drape calibrate` (or by a running pipeline).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct CostModel {
    pub fixed_ms_per_mpx: f64,
    pub mask_ms: f64,
    pub safety: f64,
}

impl BudgetController {
    /// `base` is the model's own (min_size, max_size), the top of the ladder.
    pub fn new(budget_ms: f64, base: (usize, usize), max_masks: usize) -> Self {
        Self {
            budget_ms,
            ladder: ladder(base),
            level: 0,
            max_masks,
            fixed_ms_per_mpx: None,
            mask_ms: None,
            safety: 1.0,
            recent: Ring::with_capacity(RECENT_FRAMES),
            over: 0,
            under: 0,
        }
    }

    pub fn with_costs(mut self, costs: CostModel, level: usize) -> Self {
        self.fixed_ms_per_mpx = Some(costs.fixed_ms_per_mpx);
        self.mask_ms = Some(costs.mask_ms);
        self.safety = costs.safety.max(1.0);
        self.level = level.min(self.ladder.len() - 1);
        self
    }

    pub fn ladder(&self) -> &[(usize, usize)] {
        &self.ladder
    }

    pub fn costs(&self) -> Option<CostModel> {
        Some(CostModel {
            fixed_ms_per_mpx: self.fixed_ms_per_mpx?,
            mask_ms: self.mask_ms.unwrap_or(0.0),
            safety: self.safety,
        })
    }

    /// Megapixels of the padded model input for a frame of `size` at ladder `level`.
    fn mpx(&self, size: (usize, usize), level: usize) -> f64 {
        let (h, w) = Transform::padded_size(Transform::resized_size(size, self.ladder[level]));
        (h * w) as f64 / 1e6
    }

    fn fixed_ms(&self, size: (usize, usize), level: usize) -> Option<f64> {
        let typical = self.fixed_ms_per_mpx? * self.safety;
        let worst_recent = self.recent.values().iter().copied().fold(0.0, f64::max);
        Some(typical.max(worst_recent) * self.mpx(size, level))
    }

    /// Settings for a frame of `size` that is `age_ms` old when inference starts.
    pub fn plan(&mut self, size: (usize, usize), age_ms: f64) -> FrameSettings {
        let target = self.budget_ms * HEADROOM - age_ms;
        if let Some(fixed) = self.fixed_ms(size, self.level) {
            self.over = if fixed > target { self.over + 1 } else { 0 };
            let few_masks = self.mask_ms.unwrap_or(0.0) * 3f64.min(self.max_masks as f64);
            let fits_above = self.level > 0
                && self.fixed_ms(size, self.level - 1).unwrap_or(f64::INFINITY) + few_masks
                    < self.budget_ms * STEP_UP_FRACTION - age_ms;
            self.under = if fits_above { self.under + 1 } else { 0 };
            if self.over >= STEP_DOWN_AFTER && self.level + 1 < self.ladder.len() {
                self.level += 1;
                (self.over, self.under) = (0, 0);
                tracing::info!(level = self.level, size = ?self.ladder[self.level], "input size stepped down");
            } else if self.under >= STEP_UP_AFTER {
                self.level -= 1;
                (self.over, self.under) = (0, 0);
                tracing::info!(level = self.level, size = ?self.ladder[self.level], "input size stepped up");
            }
        }
        let max_masks = match (self.fixed_ms(size, self.level), self.mask_ms) {
            (Some(fixed), Some(per_mask)) if per_mask > 0.0 => {
                let room = (target - fixed) / (per_mask * self.safety);
                (room.max(0.0) as usize).min(self.max_masks)
            }
            _ => self.max_masks,
        };
        let (min_size, max_size) = self.ladder[self.level];
        FrameSettings {
            min_size,
            max_size,
            max_masks,
        }
    }

    /// Learns from a finished frame that ran at `settings` on a frame of `size`.
    pub fn observe(
        &mut self,
        size: (usize, usize),
        settings: FrameSettings,
        t: &Timings,
        masked: usize,
    ) {
        let mask_cost = t.mask_head + t.paste + t.rle;
        let level = self
            .ladder
            .iter()
            .position(|&l| l == (settings.min_size, settings.max_size))
            .unwrap_or(self.level);
        let rate = (t.total - mask_cost).max(0.0) / self.mpx(size, level);
        let ewma =
            |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + EWMA_WEIGHT * (new - o)));
        self.fixed_ms_per_mpx = ewma(self.fixed_ms_per_mpx, rate);
        self.recent.push(rate);
        if masked > 0 {
            self.mask_ms = ewma(self.mask_ms, mask_cost / masked as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_cap_follows_the_room_left_in_the_budget() {
        let costs = CostModel {
            fixed_ms_per_mpx: 100.0,
            mask_ms: 2.0,
            safety: 1.0,
        };
        let mut c = BudgetController::new(100.0, (800, 1333), 100).with_costs(costs, 0);
        // 800x800 pads to 0.64 MPx: 64 ms fixed; 85 ms usable → 10 masks at 2 ms.
        let s = c.plan((512, 512), 0.0);
        assert_eq!((s.min_size, s.max_size, s.max_masks), (800, 1333, 10));
        // An older frame leaves less room.
        assert_eq!(c.plan((512, 512), 10.0).max_masks, 5);
    }
}
