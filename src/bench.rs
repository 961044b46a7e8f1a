//! `drape bench`: repeated runs of the whole model on one image, with per-stage median and
//! p99, model heap allocations per frame, peak RSS and backbone throughput; [`plot`] draws them.

pub mod plot;

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
    /// End-to-end latency of each timed run, in run order.
    pub total_ms: Vec<f64>,
    pub cpu: CpuInfo,
}

/// The CPU's model name and the SIMD extensions its kernels can use: what decides which of
/// gemm's microkernels run, so every benchmark row names them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuInfo {
    pub model: String,
    pub simd: Vec<String>,
    /// The instruction set drape's own GEMM kernel (the Winograd convs') runs on here:
    /// `avx512`, `avx2`, `neon` or `plain`.
    pub gemm_kernel: String,
}

/// The flags worth naming, in the order a reader compares them (x86, then aarch64).
const SIMD_FLAGS: [&str; 17] = [
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512dq",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "asimd",
    "asimdhp",
    "sve",
    "sve2",
];

impl CpuInfo {
    /// From /proc/cpuinfo (`model name` and `flags` on x86, `Features` on aarch64); the
    /// architecture's name alone where that file is missing.
    pub fn detect() -> Self {
        let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self::parse(&text)
    }

    fn parse(cpuinfo: &str) -> Self {
        let mut model = None;
        let mut flags = std::collections::BTreeSet::new();
        for line in cpuinfo.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "model name" | "Model" if model.is_none() && !value.trim().is_empty() => {
                    model = Some(value.trim().to_string());
                }
                "flags" | "Features" => flags.extend(value.split_whitespace()),
                _ => {}
            }
        }
        Self {
            gemm_kernel: crate::model::sgemm::kernel_name().to_string(),
            model: model.unwrap_or_else(|| std::env::consts::ARCH.to_string()),
            simd: SIMD_FLAGS
                .iter()
                .filter(|f| flags.contains(**f))
                .map(|f| f.to_string())
                .collect(),
        }
    }
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
    let total_ms = samples.iter().map(|t| t.total).collect();
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
        total_ms,
        cpu: CpuInfo::detect(),
        host_reads_per_frame: trips.reads as f64 / iters.max(1) as f64,
        syncs_per_frame: trips.syncs as f64 / iters.max(1) as f64,
        stages_synchronized: model.sync_stages(),
    })
}

#[cfg(test)]
mod tests {
    use super::{percentile, CpuInfo};

    #[test]
    fn cpu_flags_from_x86_and_aarch64_cpuinfo() {
        let x86 = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse4_2 avx avx2 fma \
                   avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: Some Xeon\n";
        let info = CpuInfo::parse(x86);
        assert_eq!(info.model, "Some Xeon");
        assert_eq!(
            info.simd,
            ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw"]
        );
        let arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm asimdhp cpuid\n";
        let info = CpuInfo::parse(arm);
        assert_eq!(info.model, std::env::consts::ARCH);
        assert_eq!(info.simd, ["asimd", "asimdhp"]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50.0), 2.0);
    }
}
