//! `drape bench`: repeated runs of the whole model on one image, with per-stage median and
//! p99, model heap allocations per frame, peak RSS and backbone throughput.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::alloc::Account;
use crate::error::Result;
use crate::model::transform::Transform;
use crate::model::{MaskRcnn, Timings};
use crate::postprocess::{Detections, Detector};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StageStats {
    pub median_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub stages: BTreeMap<&'static str, StageStats>,
    /// Heap allocations the model makes during one `detect` (booked to
    /// [`crate::alloc::Account::Model`]: candle's tensors, gemm's buffers), averaged over the
    /// timed runs (0 when the binary does not count allocations).
    pub model_allocs_per_frame: f64,
    pub peak_rss_mb: Option<f64>,
    /// Where the model ran, e.g. `Cpu`, `Cuda { gpu_id: 0 }`.
    pub device: String,
    /// After the timed runs; `None` on the CPU and on Metal.
    pub device_memory: Option<crate::device::DeviceMemory>,
    pub load_ms: f64,
    /// Process start to the end of the first result.
    pub cold_start_ms: f64,
    pub backbone_gflops: f64,
    /// [w, h] of the resized image the model ran on.
    pub input_size: [usize; 2],
    pub instances: usize,
    pub iters: usize,
    pub threads: usize,
    /// Device→host reads per timed frame, averaged (see [`crate::device::RoundTrips`]).
    pub host_reads_per_frame: f64,
    /// Device synchronisations per timed frame, averaged: 0 unless stages are synchronised.
    pub syncs_per_frame: f64,
    /// Whether each stage boundary waited for the device (`--sync-stages`), which makes the
    /// per-stage times exact on a GPU.
    pub stages_synchronized: bool,
}

/// Nearest-rank percentile of sorted `v`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn stage_stats(samples: &[Timings]) -> BTreeMap<&'static str, StageStats> {
    let mut by_stage: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for t in samples {
        for (name, ms) in t.stages() {
            by_stage.entry(name).or_default().push(ms);
        }
    }
    by_stage
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_by(f64::total_cmp);
            let stats = StageStats {
                median_ms: percentile(&v, 50.0),
                p99_ms: percentile(&v, 99.0),
            };
            (name, stats)
        })
        .collect()
}

/// Times `iters` runs after `warmup` untimed ones; `progress` is called after every run.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &MaskRcnn,
    rgb: &[u8],
    size: (usize, usize),
    warmup: usize,
    iters: usize,
    load_ms: f64,
    process_start: std::time::Instant,
    mut progress: impl FnMut(),
) -> Result<BenchReport> {
    let settings = model.default_settings();
    let mut detector = Detector::default();
    let mut result = Detections::default();
    detector.run(model, rgb, size, settings, &mut result)?;
    let instances = result.instances.len();
    let cold_start_ms = process_start.elapsed().as_secs_f64() * 1e3;
    progress();
    for _ in 1..warmup {
        detector.run(model, rgb, size, settings, &mut result)?;
        progress();
    }
    let mut samples = Vec::with_capacity(iters);
    let mut allocs = 0;
    let trips_before = crate::device::round_trips();
    for _ in 0..iters {
        let before = crate::alloc::booked(Account::Model);
        detector.run(model, rgb, size, settings, &mut result)?;
        allocs += crate::alloc::booked(Account::Model) - before;
        samples.push(result.timings);
        progress();
    }
    let trips = trips_before.since(crate::device::round_trips());
    let stages = stage_stats(&samples);
    let (rw, rh) = result.input_size;
    let (ph, pw) = Transform::padded_size((rh, rw));
    let macs = model.backbone.macs(ph, pw);
    let backbone_ms = stages.get("backbone").map_or(f64::NAN, |s| s.median_ms);
    Ok(BenchReport {
        stages,
        model_allocs_per_frame: allocs as f64 / iters.max(1) as f64,
        peak_rss_mb: crate::alloc::peak_rss_mb(),
        device: format!("{:?}", model.device().location()),
        device_memory: crate::device::memory(model.device()),
        load_ms,
        cold_start_ms,
        backbone_gflops: 2.0 * macs as f64 / (backbone_ms * 1e-3) / 1e9,
        input_size: [rw, rh],
        instances,
        iters,
        threads: rayon::current_num_threads(),
        host_reads_per_frame: trips.reads as f64 / iters.max(1) as f64,
        syncs_per_frame: trips.syncs as f64 / iters.max(1) as f64,
        stages_synchronized: model.sync_stages(),
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }
}
