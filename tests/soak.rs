//! A long run, as an appliance's weeks are made of: the pipeline on the bundled model over
//! 2,000 frames into every output (rotating JSON Lines file, preview renderer, metrics), with
//! live heap bytes, threads and file descriptors flat between frame 500 and the end.
//!
//! Its own test binary, with a counting global allocator and a single test. Frames are small
//! (64 x 48) and the model input small (64), so it fits in about a minute on two cores; each
//! frame is delivered once the previous one was processed, so the count does not depend on
//! the machine's speed.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drape::alloc::{live_bytes, CountingAlloc};
use drape::capture::{CaptureError, CaptureStats, Frame, FrameSource};
use drape::pipeline::{self, BudgetController, PipelineOptions};
use drape::stream::jsonl::{JsonlFile, RotatePolicy, SinkHealth};
use drape::stream::{Emitted, Hub, HubSink, Sink};

#[global_allocator]
static GLOBAL: CountingAlloc<std::alloc::System> = CountingAlloc(std::alloc::System);

const FRAMES: usize = 2000;
const MEASURE_FROM: usize = 500;
/// Growth allowed between frame 500 and the end: under 100 bytes a frame. A per-frame leak of
/// anything the size of a frame, a line or a tensor is far above it.
const MAX_GROWTH_BYTES: i64 = 128 * 1024;
/// Only bounds a hang.
const HANG: Duration = Duration::from_secs(600);

/// One fixture image shrunk to 64 x 48, delivered in lock step with the pipeline.
struct LockStep {
    rgb: Vec<u8>,
    delivered: usize,
    processed: Arc<AtomicUsize>,
}

impl FrameSource for LockStep {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        if self.delivered == FRAMES {
            return Err(CaptureError::EndOfStream);
        }
        let waiting = Instant::now();
        while self.processed.load(Ordering::Acquire) < self.delivered {
            assert!(
                waiting.elapsed() < HANG,
                "frame {} never processed",
                self.delivered
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        frame.resize(64, 48);
        frame.rgb.copy_from_slice(&self.rgb);
        self.delivered += 1;
        frame.seq = self.delivered as u64;
        frame.captured = Instant::now();
        Ok(())
    }
    fn stats(&self) -> CaptureStats {
        CaptureStats {
            frames: self.delivered as u64,
            ..Default::default()
        }
    }
    fn describe(&self) -> String {
        "lock-step fixture".into()
    }
    fn fps(&self) -> f64 {
        // A period long enough that no frame is ever stale.
        0.01
    }
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    live: i64,
    threads: usize,
    fds: usize,
}

fn sample() -> Sample {
    Sample {
        live: live_bytes(),
        threads: count_entries("/proc/self/task"),
        fds: count_entries("/proc/self/fd"),
    }
}

/// Counts frames for the source's lock step and samples at frame 500 and at the last.
struct Probe {
    processed: Arc<AtomicUsize>,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl Sink for Probe {
    fn frame(&mut self, _: &Emitted<'_>) -> std::io::Result<()> {
        let n = self.processed.load(Ordering::Relaxed) + 1;
        if n == MEASURE_FROM || n == FRAMES {
            self.samples.lock().unwrap().push(sample());
        }
        self.processed.store(n, Ordering::Release);
        Ok(())
    }
}

#[test]
fn two_thousand_frames_leave_heap_threads_and_fds_flat() {
    let model = common::tiny_model();
    let image = image::imageops::resize(
        &common::fixture_image("landscape"),
        64,
        48,
        image::imageops::FilterType::Triangle,
    );
    let processed = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::new();
    let health = SinkHealth::new("jsonl");
    hub.watch_sink(Arc::clone(&health));
    let jsonl = JsonlFile::open(
        &dir.path().join("soak.jsonl"),
        RotatePolicy {
            max_bytes: Some(256 * 1024),
            keep: 2,
        },
        health,
    )
    .unwrap();
    let mut sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(jsonl),
        Box::new(HubSink::new(Arc::clone(&hub), model.labels().clone())),
        Box::new(Probe {
            processed: Arc::clone(&processed),
            samples: Arc::clone(&samples),
        }),
    ];
    let source = LockStep {
        rgb: image.into_raw(),
        delivered: 0,
        processed,
    };
    let options = PipelineOptions {
        status: Some(Arc::clone(&hub.status)),
        ..PipelineOptions::new(100_000.0)
    };
    let summary = pipeline::run(
        &model,
        Box::new(source),
        BudgetController::new(100_000.0, (64, 64), 100),
        &mut sinks,
        &options,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(summary.counters.processed, FRAMES as u64);
    let samples = samples.lock().unwrap();
    let [at_500, at_end] = samples[..] else {
        panic!("expected two samples, got {samples:?}")
    };
    let growth = at_end.live - at_500.live;
    assert!(
        growth < MAX_GROWTH_BYTES,
        "live heap grew {growth} bytes from frame {MEASURE_FROM} to {FRAMES}: {at_500:?} -> {at_end:?}"
    );
    // At the last frame the capture thread may already have seen the end of the source and
    // exited: fewer is fine, more is a leak.
    assert!(
        at_end.threads <= at_500.threads,
        "threads: {at_500:?} -> {at_end:?}"
    );
    assert!(
        at_end.fds <= at_500.fds,
        "file descriptors: {at_500:?} -> {at_end:?}"
    );
    eprintln!("soak: {at_500:?} -> {at_end:?} ({growth} bytes)");
}
