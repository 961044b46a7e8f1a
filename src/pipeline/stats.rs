//! What a run counts and measures: drop and miss counters, bounded latency samples and their
//! percentiles, and the summary `drape run` prints on exit.

use serde::Serialize;

use super::budget::CostModel;
use super::ring::Ring;
use crate::capture::CaptureStats;

/// Latency samples kept for the summary's percentiles (the most recent ones).
const SUMMARY_SAMPLES: usize = 8192;

/// A bounded record of recent samples for percentiles, allocated once.
#[derive(Debug, Clone)]
pub struct Samples(Ring<f64>);

impl Samples {
    pub fn new() -> Self {
        Self(Ring::with_capacity(SUMMARY_SAMPLES))
    }

    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn percentiles(&self) -> Percentiles {
        let mut v = self.0.values().to_vec();
        v.sort_by(f64::total_cmp);
        let p = |q| crate::bench::percentile(&v, q);
        Percentiles {
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

impl Default for Samples {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Counters of a run; `captured = processed + dropped_stale + dropped_superseded` once the
/// slot is drained, and the source's own losses are listed beside them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// Frames the source delivered to the capture thread.
    pub captured: u64,
    pub processed: u64,
    /// Taken from the slot but already older than a frame period.
    pub dropped_stale: u64,
    /// Replaced in the slot by a newer frame before inference could take it.
    pub dropped_superseded: u64,
    /// Damaged frames the source skipped (e.g. truncated MJPEG).
    pub corrupt: u64,
    /// Frames the driver (or a replay the consumer fell behind) never delivered.
    pub driver_dropped: u64,
    pub reconnects: u64,
    pub budget_misses: u64,
}

impl Counters {
    /// Takes the source's and the slot's counts.
    pub(super) fn absorb(&mut self, source: &CaptureStats, superseded: u64) {
        self.captured = source.frames;
        self.corrupt = source.corrupt;
        self.driver_dropped = source.driver_dropped;
        self.reconnects = source.reconnects;
        self.dropped_superseded = superseded;
    }
}

/// What `drape run` prints on exit.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub counters: Counters,
    pub latency_ms: Percentiles,
    pub age_ms: Percentiles,
    pub stages_ms: Vec<(&'static str, Percentiles)>,
    pub final_input_size: (usize, usize),
    pub costs: Option<CostModel>,
}
