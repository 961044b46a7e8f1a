//! The live pipeline on replayed frames with the tiny fixture model: freshness, drop
//! accounting, the budget controller under an injected slow stage, and clean shutdown on
//! SIGTERM.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drape::capture::{self, CaptureError, CaptureStats, Frame, FrameSource};
use drape::pipeline::{self, BudgetController, Emitted, PipelineOptions, Sink};

fn frames_dir() -> String {
    common::fixtures().join("frames").display().to_string()
}

/// What a test sink saw of each frame.
#[derive(Debug, Clone)]
struct Seen {
    age_ms: f64,
    latency_ms: f64,
    budget_met: bool,
    input_w: usize,
    masked: usize,
}

/// Records every line and lets the test act after each frame.
struct Recorder<F: FnMut(usize)> {
    seen: Arc<Mutex<Vec<Seen>>>,
    after: F,
}

impl<F: FnMut(usize)> Sink for Recorder<F> {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        let v: serde_json::Value = serde_json::from_slice(out.line).expect("each line is JSON");
        let mut seen = self.seen.lock().unwrap();
        seen.push(Seen {
            age_ms: v["age_ms"].as_f64().unwrap(),
            latency_ms: v["latency_ms"].as_f64().unwrap(),
            budget_met: v["budget_met"].as_bool().unwrap(),
            input_w: v["input_size"][0].as_u64().unwrap() as usize,
            masked: v["masked"].as_u64().unwrap() as usize,
        });
        let n = seen.len();
        drop(seen);
        (self.after)(n);
        Ok(())
    }
}

#[test]
fn replay_at_30_fps_never_starts_on_a_stale_frame_and_counts_every_drop() {
    let m = common::tiny_model();
    let source = capture::open(&common::replay_frames(30.0)).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Recorder {
        seen: Arc::clone(&seen),
        after: |_| {},
    })];
    let controller = BudgetController::new(1000.0, (160, 224), 100);
    let options = PipelineOptions {
        budget_ms: 1000.0,
        duration: Some(Duration::from_secs(3)),
        slow_stage: None,
        rle: Default::default(),
        track: Default::default(),
    };
    let summary = pipeline::run(
        &m,
        source,
        controller,
        &mut sinks,
        &options,
        &AtomicBool::new(false),
    )
    .unwrap();
    let seen = seen.lock().unwrap();
    let c = summary.counters;
    assert!(c.processed >= 5, "{c:?}");
    assert_eq!(seen.len() as u64, c.processed);
    // The tiny model is slower than 33 ms a frame here, so the slot must have dropped frames.
    assert!(c.dropped_superseded > 0, "{c:?}");
    assert_eq!(
        c.captured,
        c.processed + c.dropped_stale + c.dropped_superseded,
        "{c:?}"
    );
    let period = 1000.0 / 30.0;
    for (i, s) in seen.iter().enumerate() {
        assert!(
            s.age_ms <= period,
            "frame {i} was {} ms old at start",
            s.age_ms
        );
        assert!(s.latency_ms >= s.age_ms);
    }
}

/// A camera stand-in: one image, delivered every `period`, with a sequence number.
struct Ticker {
    rgb: Vec<u8>,
    size: (usize, usize),
    period: Duration,
    next_due: Option<Instant>,
    seq: u64,
}

impl FrameSource for Ticker {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        let due = self.next_due.unwrap_or_else(Instant::now);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        self.next_due = Some(due.max(now) + self.period);
        frame.resize(self.size.1, self.size.0);
        frame.rgb.copy_from_slice(&self.rgb);
        frame.seq = self.seq;
        frame.captured = Instant::now();
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
        "ticker".into()
    }
    fn fps(&self) -> f64 {
        1.0 / self.period.as_secs_f64()
    }
}

#[test]
fn budget_controller_steps_down_under_a_slow_stage_and_back_up_without_it() {
    let m = common::tiny_model();
    let im = drape::image_io::load_rgb(common::fixtures().join("frames/frame_000.jpg")).unwrap();
    let source = Box::new(Ticker {
        rgb: im.as_raw().clone(),
        size: (im.height() as usize, im.width() as usize),
        period: Duration::from_millis(20),
        next_due: None,
        seq: 0,
    });
    let budget = 300.0;
    // 10 s per megapixel: ~360 ms extra at the top size (a miss), ~200 ms two steps down.
    let slow = Arc::new(AtomicU64::new(10_000));
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    const SLOW_FRAMES: usize = 14;
    // Climbing two steps takes the slow frames leaving the cost window (8), then two runs of
    // STEP_UP_AFTER (10) frames that fit.
    const TOTAL: usize = SLOW_FRAMES + 40;
    let (slow_hook, stop_hook) = (Arc::clone(&slow), Arc::clone(&stop));
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(Recorder {
        seen: Arc::clone(&seen),
        after: move |n| {
            if n == SLOW_FRAMES {
                slow_hook.store(0, Ordering::Relaxed);
            }
            if n == TOTAL {
                stop_hook.store(true, Ordering::Relaxed);
            }
        },
    })];
    let controller = BudgetController::new(budget, (160, 224), 100);
    let top = controller.ladder()[0];
    let options = PipelineOptions {
        budget_ms: budget,
        duration: Some(Duration::from_secs(60)),
        slow_stage: Some(slow),
        rle: Default::default(),
        track: Default::default(),
    };
    let summary = pipeline::run(&m, source, controller, &mut sinks, &options, &stop).unwrap();
    let seen = seen.lock().unwrap();
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
    // Without it, the ladder climbs back to the top and stays there.
    assert_eq!(seen.last().unwrap().input_w, full_width, "{widths:?}");
    assert!(
        seen[SLOW_FRAMES..].iter().all(|s| s.budget_met),
        "{:?}",
        &seen[SLOW_FRAMES..]
    );
    assert!(summary.counters.budget_misses >= 1);
    assert!(seen.iter().all(|s| s.masked <= 100));
}

#[test]
fn sigterm_finishes_the_frame_flushes_and_prints_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.jsonl");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_drape"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
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
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
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
