//! `drape bench --plot`: per-stage medians as one stacked bar and the end-to-end latency of
//! every timed run as a histogram with p50, p90 and p99 marked, titled with the model, input
//! size, device and the CPU's SIMD flags. With `--beside`, another engine's per-stage medians
//! (torchvision's, from `calibration/compare_torchvision.py --plot`) stand as a second bar on
//! the same scale. Drawn with the eval sweep chart's primitives (the `image` crate and 8×8
//! glyphs), so no plotting stack is needed.

use std::collections::BTreeMap;

use image::{Rgb, RgbImage};
use serde::Deserialize;

use super::{percentile, BenchReport};
use crate::eval::plot::{nice_ceiling, rect, BACKGROUND, GRID, INK};
use crate::overlay::glyphs as text;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;
/// Plot area, top to bottom: three or four title lines, then both panels share these rows.
const TOP: i64 = 100;
const BOTTOM: i64 = 540;
/// The stacked bars' columns (drape's, then the reference's) and the legend beside them.
const BAR_LEFT: i64 = 80;
const BAR_WIDTH: i64 = 70;
const BAR_GAP: i64 = 15;
const LEGEND_LEFT: i64 = BAR_LEFT + 2 * BAR_WIDTH + BAR_GAP + 20;
/// The histogram's panel.
const HIST_LEFT: i64 = 500;
const HIST_RIGHT: i64 = 930;
const HIST_BINS: usize = 12;
const TICKS: usize = 5;
/// 8-pixel glyphs that fit between the 20-pixel margins.
const LINE_CHARS: usize = (WIDTH as usize - 40) / 8;
/// One colour per stage, in pipeline order: matplotlib's tab10, the overlay's first ten.
const STAGE_COLOURS: &[[u8; 3]] = crate::overlay::PALETTE.split_at(10).0;
const HIST_COLOUR: [u8; 3] = [120, 160, 200];
/// p50, p90, p99 markers.
const MARKERS: [(f64, [u8; 3]); 3] = [
    (50.0, [44, 160, 44]),
    (90.0, [255, 127, 14]),
    (99.0, [214, 39, 40]),
];

/// Another engine's per-stage medians on the same input, drawn beside drape's: the JSON
/// `{"name": "torchvision 0.29", "stages": {"backbone": 247.3, ...}}`, with stage names as
/// [`crate::model::Timings`] has them; `total` is optional.
#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    pub name: String,
    pub stages: BTreeMap<String, f64>,
}

/// `model` names the weights (e.g. "ResNet-50, 47 classes").
pub fn draw(report: &BenchReport, model: &str, beside: Option<&Reference>) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb(BACKGROUND));
    let [w, h] = report.input_size;
    let title = format!(
        "drape bench: {model}, input {w}x{h}, {}, {} threads, {} runs",
        report.device, report.threads, report.iters
    );
    text(&mut img, 20, 12, &title, INK);
    text(&mut img, 20, 26, &format!("CPU: {}", report.cpu.model), INK);
    let simd = format!(
        "SIMD: {} (Winograd GEMM: {})",
        report.cpu.simd.join(" "),
        report.cpu.gemm_kernel
    );
    // An AVX-512 machine lists a dozen flags, more than one line holds.
    for (i, line) in wrap(&simd, LINE_CHARS).iter().take(2).enumerate() {
        text(&mut img, 20, 40 + 14 * i as i64, line, INK);
    }
    stages(&mut img, report, beside);
    histogram(&mut img, &report.total_ms);
    img
}

/// `s` broken at spaces into lines of at most `max` characters (a longer word stands alone).
fn wrap(s: &str, max: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in s.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= max => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// Maps `v` in `[0, max]` onto the rows `BOTTOM..TOP`.
fn row(v: f64, max: f64) -> i64 {
    BOTTOM - (v / max * (BOTTOM - TOP) as f64).round() as i64
}

fn stages(img: &mut RgbImage, report: &BenchReport, beside: Option<&Reference>) {
    // Every stage `Timings` names except the sum, in pipeline order; those empty on both sides
    // left out.
    let theirs = |name: &str| beside.and_then(|r| r.stages.get(name)).copied();
    let parts: Vec<(&str, f64, Option<f64>)> = crate::model::Timings::default()
        .stages()
        .iter()
        .map(|(name, _)| *name)
        .filter(|&name| name != "total")
        .map(|name| {
            let ours = report.stages.get(name).map_or(0.0, |s| s.median_ms);
            (name, ours, theirs(name))
        })
        .filter(|&(_, ours, theirs)| ours > 0.0 || theirs.is_some_and(|t| t > 0.0))
        .collect();
    let sum: f64 = parts.iter().map(|p| p.1).sum();
    let their_sum: f64 = parts.iter().filter_map(|p| p.2).sum();
    let max = nice_ceiling(sum.max(their_sum) * 1.05);
    let right = BAR_LEFT + BAR_WIDTH + beside.map_or(0, |_| BAR_GAP + BAR_WIDTH);
    axis(img, BAR_LEFT - 10, right + 10, max, "ms");
    text(img, BAR_LEFT - 10, TOP - 28, "per-stage median", INK);
    // One stage's segment of a stacked bar whose left edge is `left`, on the `ms` below it.
    let segment = |img: &mut RgbImage, left: i64, below: &mut f64, ms: f64, colour| {
        let (y0, y1) = (row(*below, max), row(*below + ms, max));
        rect(img, (left, y0), (left + BAR_WIDTH, y1.min(y0)), colour);
        *below += ms;
    };
    let (mut below, mut their_below) = (0.0, 0.0);
    let their_left = BAR_LEFT + BAR_WIDTH + BAR_GAP;
    for (i, &(name, ms, their_ms)) in parts.iter().enumerate() {
        let colour = STAGE_COLOURS[i % STAGE_COLOURS.len()];
        segment(img, BAR_LEFT, &mut below, ms, colour);
        if let Some(t) = their_ms {
            segment(img, their_left, &mut their_below, t, colour);
        }
        // Legend top to bottom in the bar's order bottom to top, so the two read alike.
        let ly = BOTTOM - 20 * (i as i64 + 1);
        rect(img, (LEGEND_LEFT, ly), (LEGEND_LEFT + 10, ly + 10), colour);
        let label = match (beside, their_ms) {
            (None, _) => format!("{name} {ms:.1} ms"),
            (Some(_), Some(t)) => format!("{name} {ms:.1} / {t:.1}"),
            (Some(_), None) => format!("{name} {ms:.1} / -"),
        };
        text(img, LEGEND_LEFT + 16, ly + 1, &label, INK);
    }
    let total = report.stages.get("total").map_or(sum, |s| s.median_ms);
    let summary = match beside {
        None => format!("total {total:.1} ms"),
        Some(r) => {
            let t = r.stages.get("total").copied().unwrap_or(their_sum);
            format!("total {total:.1} / {t:.1} ms")
        }
    };
    let top = BOTTOM - 20 * (parts.len() as i64 + 1);
    text(img, LEGEND_LEFT, top, &summary, INK);
    if let Some(r) = beside {
        // Which number is whose, and each bar's name under it (the second a row lower, as the
        // names are wider than the bars).
        text(
            img,
            LEGEND_LEFT,
            top - 14,
            &format!("drape / {}", r.name),
            INK,
        );
        text(img, BAR_LEFT, BOTTOM + 8, "drape", INK);
        text(img, their_left, BOTTOM + 22, &r.name, INK);
    }
}

fn histogram(img: &mut RgbImage, totals: &[f64]) {
    text(img, HIST_LEFT, TOP - 28, "end-to-end latency per run", INK);
    let mut sorted = totals.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (Some(&lo), Some(&hi)) = (sorted.first(), sorted.last()) else {
        return;
    };
    // A little margin either side so the extreme runs are not on the frame.
    let span = (hi - lo).max(hi * 0.02).max(1e-3);
    let (x_min, x_max) = ((lo - 0.1 * span).max(0.0), hi + 0.1 * span);
    let bin_width = (x_max - x_min) / HIST_BINS as f64;
    let mut counts = [0usize; HIST_BINS];
    for v in &sorted {
        let bin = ((v - x_min) / bin_width) as usize;
        counts[bin.min(HIST_BINS - 1)] += 1;
    }
    // At least one run per tick, so the count axis is whole numbers.
    let y_max = nice_ceiling(counts.iter().copied().max().unwrap_or(0).max(TICKS) as f64);
    axis(img, HIST_LEFT, HIST_RIGHT, y_max, "runs");
    let col = |v: f64| {
        HIST_LEFT + ((v - x_min) / (x_max - x_min) * (HIST_RIGHT - HIST_LEFT) as f64) as i64
    };
    for (i, &n) in counts.iter().enumerate() {
        if n == 0 {
            continue;
        }
        let x0 = col(x_min + i as f64 * bin_width) + 1;
        let x1 = col(x_min + (i + 1) as f64 * bin_width) - 1;
        rect(
            img,
            (x0, row(n as f64, y_max)),
            (x1, BOTTOM - 1),
            HIST_COLOUR,
        );
    }
    for i in 0..=TICKS {
        let v = x_min + (x_max - x_min) * i as f64 / TICKS as f64;
        let label = format!("{v:.0}");
        text(
            img,
            col(v) - 4 * label.len() as i64,
            BOTTOM + 8,
            &label,
            INK,
        );
    }
    text(
        img,
        (HIST_LEFT + HIST_RIGHT) / 2 - 16,
        BOTTOM + 28,
        "ms",
        INK,
    );
    for (k, (p, colour)) in MARKERS.iter().enumerate() {
        let v = percentile(&sorted, *p);
        let x = col(v);
        rect(img, (x, TOP), (x, BOTTOM), *colour);
        rect(img, (x + 1, TOP), (x + 1, BOTTOM), *colour);
        let label = format!("p{p:.0} {v:.0} ms");
        // In a row above the panel, clear of the bars.
        text(
            img,
            HIST_LEFT + 40 + 130 * k as i64,
            TOP - 12,
            &label,
            *colour,
        );
    }
}

/// A vertical axis with grid lines from `left` to `right`, ticks `0..=max`.
fn axis(img: &mut RgbImage, left: i64, right: i64, max: f64, unit: &str) {
    for i in 0..=TICKS {
        let v = max * i as f64 / TICKS as f64;
        let y = row(v, max);
        rect(img, (left, y), (right, y), GRID);
        let label = if max >= 10.0 || v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        };
        text(img, left - 8 * label.len() as i64 - 6, y - 4, &label, INK);
    }
    rect(img, (left, BOTTOM), (right, BOTTOM), INK);
    rect(img, (left, TOP), (left, BOTTOM), INK);
    text(img, left - 8 * unit.len() as i64 - 6, TOP - 12, unit, INK);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{CpuInfo, StageStats};

    fn report(totals: Vec<f64>) -> BenchReport {
        let stage = |ms| StageStats {
            median_ms: ms,
            p99_ms: ms,
        };
        BenchReport {
            stages: [
                ("backbone", stage(300.0)),
                ("fpn", stage(100.0)),
                ("mask_head", stage(400.0)),
                ("total", stage(800.0)),
            ]
            .into_iter()
            .collect(),
            model_allocs_per_frame: 0.0,
            peak_rss_mb: None,
            device: "Cpu".into(),
            device_memory: None,
            load_ms: 0.0,
            cold_start_ms: 0.0,
            backbone_gflops: 0.0,
            input_size: [512, 512],
            instances: 0,
            iters: totals.len(),
            threads: 2,
            host_reads_per_frame: 0.0,
            syncs_per_frame: 0.0,
            stages_synchronized: false,
            total_ms: totals,
            cpu: CpuInfo {
                model: "Test CPU".into(),
                simd: vec!["avx2".into(), "fma".into()],
                gemm_kernel: "avx2".into(),
            },
        }
    }

    /// Pixels of `colour` left of the histogram panel (`left`) or in it.
    fn count(img: &RgbImage, colour: [u8; 3], left: bool) -> usize {
        img.enumerate_pixels()
            .filter(|(x, _, p)| p.0 == colour && ((*x as i64) < HIST_LEFT) == left)
            .count()
    }

    #[test]
    fn stages_are_stacked_in_proportion_and_percentiles_are_marked() {
        // 20 runs, so p50, p90 and p99 are three different runs.
        let totals = (0..20).map(|i| 780.0 + 5.0 * i as f64).collect();
        let img = draw(&report(totals), "test", None);
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        // Bar segments: backbone, fpn, mask_head in pipeline order (colours 0, 1, 2), each a
        // full-width block whose height is its share of the time (plus its legend square).
        let legend = 11 * 11;
        let bar_width = (BAR_WIDTH + 1) as usize;
        let height = |c: usize| (count(&img, STAGE_COLOURS[c], true) - legend) / bar_width;
        let (backbone, fpn, mask) = (height(0), height(1), height(2));
        assert!(fpn > 0, "fpn segment missing");
        assert!(
            (backbone as f64 / fpn as f64 - 3.0).abs() < 0.2,
            "{backbone} vs {fpn}"
        );
        assert!(
            (mask as f64 / fpn as f64 - 4.0).abs() < 0.25,
            "{mask} vs {fpn}"
        );
        // A histogram was drawn, and each percentile marker is a full-height double line.
        assert!(count(&img, HIST_COLOUR, false) > 1000);
        let full_height = 2 * (BOTTOM - TOP + 1) as usize;
        for (p, colour) in MARKERS {
            assert!(count(&img, colour, false) >= full_height, "p{p} marker");
        }
    }

    #[test]
    fn a_long_flag_list_wraps_inside_the_image() {
        let flags = "sse4_2 avx avx2 fma f16c avx512f avx512bw avx512dq avx512vl avx512_vnni \
                     avx512_bf16 avx512_fp16 amx_tile";
        let simd = format!("SIMD: {flags} (Winograd GEMM: avx512)");
        let lines = wrap(&simd, LINE_CHARS);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines.iter().all(|l| l.len() <= LINE_CHARS), "{lines:?}");
        assert_eq!(lines.join(" "), simd);
        // Drawn, nothing lands in the right margin.
        let mut r = report(vec![800.0]);
        r.cpu.simd = flags.split_whitespace().map(String::from).collect();
        r.cpu.gemm_kernel = "avx512".into();
        let img = draw(&r, "test", None);
        let margin = (WIDTH - 20..WIDTH).flat_map(|x| (0..TOP as u32).map(move |y| (x, y)));
        assert!(margin
            .into_iter()
            .all(|(x, y)| img.get_pixel(x, y).0 != INK));
    }

    #[test]
    fn a_single_run_still_draws() {
        let img = draw(&report(vec![800.0]), "test", None);
        assert!(count(&img, HIST_COLOUR, false) > 100);
    }

    #[test]
    fn a_reference_stands_beside_on_the_same_scale() {
        // torchvision twice as slow in the backbone, with an RPN that drape's report lacks.
        let beside = Reference {
            name: "torchvision".into(),
            stages: [("backbone", 600.0), ("fpn", 100.0), ("rpn", 50.0)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        let img = draw(&report(vec![800.0]), "test", Some(&beside));
        // Column height of `colour` at `x`.
        let column = |x: i64, colour: [u8; 3]| {
            (TOP..=BOTTOM)
                .filter(|&y| img.get_pixel(x as u32, y as u32).0 == colour)
                .count()
        };
        let (ours, theirs) = (BAR_LEFT + BAR_WIDTH / 2, BAR_LEFT + BAR_WIDTH + BAR_GAP + 5);
        // Stages in pipeline order: backbone, fpn, rpn, mask_head (colours 0..3).
        let backbone = (
            column(ours, STAGE_COLOURS[0]),
            column(theirs, STAGE_COLOURS[0]),
        );
        let fpn = (
            column(ours, STAGE_COLOURS[1]),
            column(theirs, STAGE_COLOURS[1]),
        );
        let rpn = (
            column(ours, STAGE_COLOURS[2]),
            column(theirs, STAGE_COLOURS[2]),
        );
        let mask = (
            column(ours, STAGE_COLOURS[3]),
            column(theirs, STAGE_COLOURS[3]),
        );
        assert!(fpn.0 > 0 && fpn.0.abs_diff(fpn.1) <= 1, "{fpn:?}");
        assert!(
            (backbone.1 as f64 / backbone.0 as f64 - 2.0).abs() < 0.05,
            "{backbone:?}"
        );
        assert!(
            rpn.0 == 0 && rpn.1.abs_diff(fpn.1 / 2) <= 2,
            "{rpn:?} {fpn:?}"
        );
        assert!(mask.0 > 0 && mask.1 == 0, "{mask:?}");
    }
}
