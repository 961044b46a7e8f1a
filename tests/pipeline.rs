//! The live pipeline on the tiny fixture model: freshness, drop accounting, the budget
//! controller under injected costs, and clean shutdown on SIGTERM.
//!
//! The first two tests run on a [`ManualClock`] with costs injected after each inference, and
//! their source hands out each frame only once the sinks have seen the frames before it: what
//! they assert follows from the script alone, however fast or loaded the machine is.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drape::capture::{CaptureError, CaptureStats, Frame, FrameSource};
use drape::clock::{Clock, ManualClock};
use drape::pipeline::{self, BudgetController, PipelineOptions};
use drape::stream::{Emitted, Sink};

/// Bounds a wait for the pipeline; only a hang gets anywhere near it.
const HANG_TIMEOUT: Duration = Duration::from_secs(120);

fn frames_dir() -> String {
    common::fixtures().join("frames").display().to_string()
}

/// What a test sink saw of each frame.
#[derive(Debug, Clone)]
struct Seen {
    seq: u64,
    age_ms: f64,
    latency_ms: f64,
    budget_met: bool,
    input_w: usize,
    masked: usize,
    instances: usize,
}

/// Records every line, counts them for the source's gate, and lets the test act after each.
struct Recorder<F: FnMut(usize)> {
    seen: Arc<Mutex<Vec<Seen>>>,
    count: Arc<AtomicUsize>,
    after: F,
}

impl<F: FnMut(usize)> Sink for Recorder<F> {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        let v: serde_json::Value = serde_json::from_slice(out.line).expect("each line is JSON");
        let mut seen = self.seen.lock().unwrap();
        seen.push(Seen {
            seq: v["seq"].as_u64().unwrap(),
            age_ms: v["age_ms"].as_f64().unwrap(),
            latency_ms: v["latency_ms"].as_f64().unwrap(),
            budget_met: v["budget_met"].as_bool().unwrap(),
            input_w: v["input_size"][0].as_u64().unwrap() as usize,
            masked: v["masked"].as_u64().unwrap() as usize,
            instances: v["instances"].as_array().unwrap().len(),
        });
        let n = seen.len();
        drop(seen);
        (self.after)(n);
        self.count.store(n, Ordering::SeqCst);
        Ok(())
    }
}

/// A camera stand-in that plays a script: frame `k` is one fixture image with sequence
/// number `k`, stamped on the test's clock as `ages_ms[k]` old, and handed out only once the
/// sinks have seen `gate(k)` frames, so which frames meet in the slot is fixed by the script.
struct Scripted {
    rgb: Vec<u8>,
    size: (usize, usize),
    clock: Arc<ManualClock>,
    ages_ms: Vec<f64>,
    gate: fn(u64) -> usize,
    emitted: Arc<AtomicUsize>,
    seq: u64,
}

impl Scripted {
    fn new(clock: &Arc<ManualClock>, ages_ms: Vec<f64>, gate: fn(u64) -> usize) -> Self {
        let im =
            drape::image_io::load_rgb(common::fixtures().join("frames/frame_000.jpg")).unwrap();
        Self {
            size: (im.height() as usize, im.width() as usize),
            rgb: im.into_raw(),
            clock: Arc::clone(clock),
            ages_ms,
            gate,
            emitted: Arc::default(),
            seq: 0,
        }
    }
}

impl FrameSource for Scripted {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        let Some(&age_ms) = self.ages_ms.get(self.seq as usize) else {
            return Err(CaptureError::EndOfStream);
        };
        let want = (self.gate)(self.seq);
        let waited = Instant::now();
        while self.emitted.load(Ordering::SeqCst) < want {
            if waited.elapsed() > HANG_TIMEOUT {
                return Err(CaptureError::Disconnected {
                    device: "scripted".into(),
                    reason: format!("frame {} waited for {want} emitted frames", self.seq),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        frame.resize(self.size.1, self.size.0);
        frame.rgb.copy_from_slice(&self.rgb);
        frame.seq = self.seq;
        frame.captured = self.clock.now() - Duration::from_secs_f64(age_ms / 1e3);
        frame.captured_at_unix_ms = 0.0;
        self.seq += 1;
        Ok(())
    }
    fn stats(&self) -> CaptureStats {
        CaptureStats {
            frames: self.seq,
            ..Default::default()
        }
    }
    fn describe(&self) -> String {
        "scripted".into()
    }
    fn fps(&self) -> f64 {
        FPS
    }
}

const FPS: f64 = 30.0;

/// A clock far enough from its origin that frames can be stamped in its past.
fn test_clock() -> Arc<ManualClock> {
    let clock = Arc::new(ManualClock::new());
    clock.advance(Duration::from_secs(10));
    clock
}

/// Runs the pipeline until the scripted source ends.
fn run_to_end(
    model: &drape::MaskRcnn,
    source: Scripted,
    controller: BudgetController,
    sinks: &mut [Box<dyn Sink>],
    options: &PipelineOptions,
) -> pipeline::Summary {
    pipeline::run(
        model,
        Box::new(source),
        controller,
        sinks,
        options,
        &AtomicBool::new(false),
    )
    .unwrap()
}

#[test]
fn never_starts_on_a_stale_frame_and_counts_every_drop() {
    const FRAMES: u64 = 12;
    const COST_MS: f64 = 40.0;
    let m = common::tiny_model();
    let clock = test_clock();
    let period = 1e3 / FPS;
    // Even frames are fresh; odd ones arrive two periods old, right behind a processed frame,
    // and are either superseded by the next fresh one or taken and dropped as stale.
    let ages = (0..FRAMES)
        .map(|k| if k % 2 == 0 { 0.0 } else { 2.0 * period })
        .collect();
    let source = Scripted::new(&clock, ages, |k| k.div_ceil(2) as usize);
    let emitted = Arc::clone(&source.emitted);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Recorder {
        seen: Arc::clone(&seen),
        count: emitted,
        after: |_| {},
    })];
    let hook_clock = Arc::clone(&clock);
    let options = PipelineOptions {
        clock: Arc::clone(&clock) as Arc<dyn Clock>,
        after_inference: Some(Arc::new(move |d: &mut drape::Detections| {
            d.timings = Default::default();
            d.timings.backbone = COST_MS;
            d.timings.total = COST_MS;
            hook_clock.advance(Duration::from_secs_f64(COST_MS / 1e3));
        })),
        ..PipelineOptions::new(1000.0)
    };
    let controller = BudgetController::new(1000.0, (160, 224), 100);
    let summary = run_to_end(&m, source, controller, &mut sinks, &options);
    let seen = seen.lock().unwrap();
    let c = summary.counters;
    let seqs: Vec<u64> = seen.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (0..FRAMES).step_by(2).collect::<Vec<_>>(), "{c:?}");
    assert_eq!(c.processed, FRAMES / 2, "{c:?}");
    assert_eq!(c.captured, FRAMES, "{c:?}");
    assert_eq!(c.dropped_stale + c.dropped_superseded, FRAMES / 2, "{c:?}");
    // The last stale frame has nothing behind it to supersede it.
    assert!(c.dropped_stale >= 1, "{c:?}");
    for s in seen.iter() {
        assert_eq!(s.age_ms, 0.0, "{s:?}");
        assert!((s.latency_ms - COST_MS).abs() < 1e-6, "{s:?}");
    }
}

#[test]
fn budget_controller_steps_down_under_a_slow_stage_and_back_up_without_it() {
    // Injected costs per megapixel of model input: ~375 ms at the top size while the slow
    // stage is on (a miss at a 300 ms budget), ~150 ms two steps down, ~35 ms without it.
    const FIXED_MS_PER_MPX: f64 = 1_000.0;
    const SLOW_MS_PER_MPX: f64 = 10_000.0;
    const MASK_MS: f64 = 20.0;
    const SLOW_FRAMES: usize = 14;
    // Climbing two steps takes the slow frames leaving the cost window (8), then two runs of
    // STEP_UP_AFTER (10) frames that fit.
    const TOTAL: usize = SLOW_FRAMES + 40;
    let budget = 300.0;
    let m = common::tiny_model();
    let clock = test_clock();
    let source = Scripted::new(&clock, vec![0.0; TOTAL], |k| k as usize);
    let emitted = Arc::clone(&source.emitted);
    let slow = Arc::new(AtomicBool::new(true));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let slow_off = Arc::clone(&slow);
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Recorder {
        seen: Arc::clone(&seen),
        count: emitted,
        after: move |n| {
            if n == SLOW_FRAMES {
                slow_off.store(false, Ordering::SeqCst);
            }
        },
    })];
    let (hook_clock, hook_slow) = (Arc::clone(&clock), Arc::clone(&slow));
    let options = PipelineOptions {
        clock: Arc::clone(&clock) as Arc<dyn Clock>,
        after_inference: Some(Arc::new(move |d: &mut drape::Detections| {
            let mpx = (d.input_size.0 * d.input_size.1) as f64 / 1e6;
            let per_mpx = FIXED_MS_PER_MPX
                + if hook_slow.load(Ordering::SeqCst) {
                    SLOW_MS_PER_MPX
                } else {
                    0.0
                };
            d.timings = Default::default();
            d.timings.backbone = per_mpx * mpx;
            d.timings.mask_head = MASK_MS * d.masked as f64;
            d.timings.total = d.timings.backbone + d.timings.mask_head;
            hook_clock.advance(Duration::from_secs_f64(d.timings.total / 1e3));
        })),
        ..PipelineOptions::new(budget)
    };
    let controller = BudgetController::new(budget, (160, 224), 100);
    let top = controller.ladder()[0];
    let summary = run_to_end(&m, source, controller, &mut sinks, &options);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), TOTAL);
    let widths: Vec<usize> = seen.iter().map(|s| s.input_w).collect();
    let full_width = drape::model::transform::Transform::resized_size((240, 320), top).1;
    assert_eq!(widths[0], full_width, "{widths:?}");
    // Under the slow stage the ladder stepped down and the misses stopped.
    let slowed = &seen[..SLOW_FRAMES];
    assert!(
        slowed.iter().any(|s| !s.budget_met),
        "the slow stage never caused a miss"
    );
    assert!(slowed.last().unwrap().input_w < full_width, "{widths:?}");
    assert!(
        slowed[SLOW_FRAMES - 4..].iter().all(|s| s.budget_met),
        "{slowed:?}"
    );
    // The mask cap leaves room in the budget: once the per-mask cost is known, no frame's
    // masks take more than what its fixed cost left of the planned share of the budget.
    let first_capped = slowed
        .iter()
        .skip(1)
        .find(|s| s.masked < s.instances)
        .unwrap_or_else(|| panic!("the mask cap never bound: {slowed:?}"));
    assert!(
        first_capped.masked as f64 * MASK_MS < budget,
        "{first_capped:?}"
    );
    for s in &seen[1..] {
        assert!(
            s.masked as f64 * MASK_MS <= budget * 0.85 + 1e-9,
            "masks alone overrun the planned share: {s:?}"
        );
    }
    // Without it, the ladder climbs back to the top and stays there.
    assert_eq!(seen.last().unwrap().input_w, full_width, "{widths:?}");
    assert!(
        seen[SLOW_FRAMES..].iter().all(|s| s.budget_met),
        "{:?}",
        &seen[SLOW_FRAMES..]
    );
    assert!(summary.counters.budget_misses >= 1);
}

#[test]
fn sigterm_finishes_the_frame_flushes_and_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.jsonl");
    let child = common::drape_command()
        .args([
            "run",
            "--source",
            &frames_dir(),
            "--loop",
            "--fps",
            "15",
            "--budget-ms",
            "1000",
            "--no-profile",
            "--jsonl",
        ])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for a few lines, then ask it to stop.
    let start = Instant::now();
    while std::fs::read_to_string(&out).map_or(0, |s| s.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(30), "no output");
        std::thread::sleep(Duration::from_millis(50));
    }
    common::terminate(&child);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("processed"), "{stderr}");
    assert!(stderr.contains("end-to-end"), "{stderr}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.ends_with('\n'));
    let processed: usize = stderr
        .split(" processed")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert_eq!(text.lines().count(), processed, "{stderr}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("complete JSON line");
        for key in [
            "seq",
            "captured_at",
            "age_ms",
            "timings_ms",
            "latency_ms",
            "budget_met",
            "input_size",
            "masked",
            "width",
            "height",
            "instances",
        ] {
            assert!(!v[key].is_null(), "{key} missing in {line}");
        }
    }
}
