//! The real loop allocates nothing of drape's own in the steady state: `pipeline::run` on the
//! bundled model over the fixture recording, emitting through the real sinks (a JSON Lines file
//! and the hub, with a Server-Sent Events and a socket subscriber and the preview renderer),
//! counted over many frames.
//!
//! The counting allocator books what the model's tensor work allocates (candle per op, the
//! stages' output buffers) to the model, and what the `image` crate's JPEG encoder allocates to
//! the encoder; both shares are printed (`drape bench` reports the model's as
//! `model_allocs_per_frame`). Every other allocation on any thread (hand-off, preprocessing,
//! postprocessing, tracking, serialising, the sinks, the preview's drawing) must be zero.
//!
//! A second test checks that the GEMMs the model calls allocate nothing once warm.
//!
//! Its own test binary, without libtest's harness (`harness = false`): libtest's main thread
//! prints a notice once a test has run for 60 s, and under emulation on a loaded machine that
//! moment fell inside the counted frames, booking the notice's allocations to drape. Here the
//! only threads are the run's own, so nothing else allocates while it counts. Nothing
//! depends on the machine's speed: the source hands out frame `k` only once the sinks have seen
//! `k` frames (so none is superseded and the frames come in order), frames are stamped on a
//! clock that moves only by the cost each frame is given (so none is stale), and those injected
//! costs replace the measured ones (so the budget's input size and mask cap are the same on any
//! machine).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::scripted::Scripted;
use drape::alloc::{booked, counts, own_allocations, Account, CountingAlloc};
use drape::clock::{Clock, ManualClock};
use drape::pipeline::{self, BudgetController, PipelineOptions};
use drape::stream::jsonl::{JsonlFile, RotatePolicy, SinkHealth};
use drape::stream::{Emitted, Hub, HubSink, Line, Sink};

#[global_allocator]
static GLOBAL: CountingAlloc<std::alloc::System> = CountingAlloc(std::alloc::System);

/// Frames before counting starts: every buffer grows to its largest and every track slot has
/// held a mask by then.
const WARMUP: usize = 40;
/// Frames counted: four and a half rounds of the recording natively, two under an emulator
/// ([`common::emulated`]), where fewer keep CI within its time; each round checks the same.
const COUNTED: usize = 60;
const COUNTED_EMULATED: usize = 2 * (FIXTURE_FRAMES + EMPTY_FRAMES);
const FPS: f64 = 2.0;
/// What each frame costs on the run's clock, besides its masks...
const FIXED_MS: f64 = 400.0;
/// ...and what each mask costs: at a 1000 ms budget planned to 85%, nine masks fit, so the
/// budget's mask cap leaves most instances without one, as on a slow machine.
const MASK_MS: f64 = 50.0;
/// Empty frames after each pass over the fixture frames: longer on the run's clock than the
/// tracker's default expiry (1 s), so tracks are born, confirmed and end every round.
const EMPTY_FRAMES: usize = 3;
const FIXTURE_FRAMES: usize = 10;

/// What the counters say at a point of the run.
#[derive(Debug, Clone, Copy)]
struct Mark {
    bytes: u64,
    own: u64,
    model: u64,
    encoder: u64,
}

fn mark() -> Mark {
    let (_, bytes) = counts();
    Mark {
        bytes,
        own: own_allocations(),
        model: booked(Account::Model),
        encoder: booked(Account::Encoder),
    }
}

/// The last sink: reads the subscribers' queues as their clients would, marks the counters
/// after the warm-up and after the counted frames, and opens the source's gate.
struct Window {
    counted: usize,
    seen: Arc<AtomicUsize>,
    marks: Arc<Mutex<[Option<Mark>; 2]>>,
    subscribers: [Receiver<Line>; 2],
    lines_read: Arc<AtomicUsize>,
}

impl Sink for Window {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        for rx in &self.subscribers {
            while let Ok(line) = rx.try_recv() {
                assert_eq!(&line[..], out.line);
                self.lines_read.fetch_add(1, Ordering::SeqCst);
            }
        }
        let n = self.seen.load(Ordering::SeqCst) + 1;
        if n == WARMUP || n == WARMUP + self.counted {
            self.marks.lock().unwrap()[(n > WARMUP) as usize] = Some(mark());
        }
        self.seen.store(n, Ordering::SeqCst);
        Ok(())
    }
}

type Test = (&'static str, fn());

const TESTS: [Test; 2] = [
    (
        "gemm_allocates_nothing_once_warm",
        gemm_allocates_nothing_once_warm,
    ),
    (
        "the_real_loop_allocates_nothing_outside_the_model",
        the_real_loop_allocates_nothing_outside_the_model,
    ),
];

/// Runs the tests in order, alone in the process; a failed assertion panics, and the process
/// exits non-zero.
fn main() {
    if std::env::args().any(|a| a == "--list") {
        TESTS.iter().for_each(|(name, _)| println!("{name}: test"));
        return;
    }
    for (name, test) in TESTS {
        println!("running {name}");
        test();
        println!("test {name} ... ok");
    }
}

/// The GEMMs the convs and fully connected layers call, in both of the ways the model calls
/// them (one thread per tile; a fully connected layer split across the pool's threads),
/// allocate nothing once every thread has run one: the build's gemm-common reuses the buffers
/// it used to allocate per call and per task (Cargo.toml's `[patch]`). Run first, while the
/// process has no other threads. Every thread of the pool warms up (rayon's broadcast), since
/// which thread runs a parallel call's task is the scheduler's choice: warmed up by the calls
/// below alone, a thread that happened to run no task then could run its first while counted
/// (it did, 3 allocations in one CI run beside a CPU hog).
fn gemm_allocates_nothing_once_warm() {
    // A conv tile's shape ([out, in] x [in, pixels]) and a fully connected layer's
    // ([rois, in] x [in, out]), big enough that gemm splits the second across threads.
    let (m, n, k) = (256, 512, 576);
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let run = |c: &mut [f32], parallelism| {
        // SAFETY: a is m x k, b is k x n and c is m x n, all column-major and contiguous, as
        // the strides say; nothing else touches them during the call.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                m as isize,
                1,
                false,
                a.as_ptr(),
                m as isize,
                1,
                b.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    };
    let modes = [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)];
    let reps = if common::emulated() { 10 } else { 50 };
    // Warm-up: each thread's spare buffers, rayon's queues.
    pool.broadcast(|_| {
        let mut c = vec![0.0f32; m * n];
        modes.iter().for_each(|&mode| run(&mut c, mode));
    });
    let allocations = pool.install(|| {
        modes.iter().for_each(|&mode| run(&mut c, mode));
        let (before, _) = counts();
        for _ in 0..reps {
            modes.iter().for_each(|&mode| run(&mut c, mode));
        }
        counts().0 - before
    });
    assert_eq!(
        allocations,
        0,
        "allocations in {} warm gemm calls",
        2 * reps
    );
    // The calls did the work: every value is k · 0.5 · 0.25.
    assert!(c.iter().all(|&v| v == k as f32 * 0.125), "{}", c[0]);
}

fn the_real_loop_allocates_nothing_outside_the_model() {
    let model = common::tiny_model();
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("run.jsonl");
    let marks = Arc::new(Mutex::new([None; 2]));
    let counted = if common::emulated() {
        COUNTED_EMULATED
    } else {
        COUNTED
    };
    let total = WARMUP + counted;
    let clock = Arc::new(ManualClock::new());
    let mut images: Vec<image::RgbImage> = (0..FIXTURE_FRAMES)
        .map(|k| {
            let path = common::fixtures().join(format!("frames/frame_{k:03}.jpg"));
            drape::image_io::load_rgb(path).unwrap()
        })
        .collect();
    // The shop empties for a moment: every track ends, and the next round starts new ones.
    let (w, h) = images[0].dimensions();
    let empty = image::RgbImage::from_pixel(w, h, image::Rgb([128; 3]));
    images.extend(std::iter::repeat_n(empty, EMPTY_FRAMES));
    // The fixture recording, one frame at a time and in order, stamped on the run's clock.
    let source = Scripted::new(images, total)
        .lock_step()
        .clock(Arc::clone(&clock))
        .fps(FPS);
    let hub = Hub::new();
    let subscribers = [hub.events.subscribe(4), hub.socket.subscribe(4)];
    let lines_read = Arc::new(AtomicUsize::new(0));
    let rotation = RotatePolicy {
        max_bytes: None,
        keep: 0,
    };
    let file = JsonlFile::open(&jsonl, rotation, SinkHealth::new("jsonl")).unwrap();
    let mut sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(file),
        Box::new(HubSink::new(Arc::clone(&hub), model.labels().clone())),
        Box::new(Window {
            counted,
            seen: source.seen(),
            marks: Arc::clone(&marks),
            subscribers,
            lines_read: Arc::clone(&lines_read),
        }),
    ];
    let hook_clock = Arc::clone(&clock);
    let options = PipelineOptions {
        clock: clock as Arc<dyn Clock>,
        status: Some(Arc::clone(&hub.status)),
        // Injected costs, so the budget keeps the input size and caps the masks alike on any
        // machine.
        after_inference: Some(Arc::new(move |d: &mut drape::Detections| {
            d.timings = Default::default();
            d.timings.mask_head = MASK_MS * d.masked as f64;
            d.timings.total = FIXED_MS + d.timings.mask_head;
            hook_clock.advance(Duration::from_secs_f64(d.timings.total / 1e3));
        })),
        ..PipelineOptions::new(1000.0)
    };
    let base = (model.config().min_size, model.config().max_size);
    let controller = BudgetController::new(1000.0, base, model.config().detections_per_img);
    let summary = pipeline::run(
        &model,
        Box::new(source),
        controller,
        &mut sinks,
        &options,
        &AtomicBool::new(false),
    )
    .unwrap();
    drop(sinks);

    let c = summary.counters;
    assert_eq!(c.processed, total as u64, "{c:?}");
    assert_eq!(c.dropped_stale + c.dropped_superseded, 0, "{c:?}");
    let [Some(before), Some(after)] = *marks.lock().unwrap() else {
        panic!("the window was never closed: {c:?}");
    };
    let per_frame = |n: u64| n as f64 / counted as f64;
    let (own, model) = (after.own - before.own, after.model - before.model);
    let encoder = after.encoder - before.encoder;
    println!(
        "allocations per frame: {:.1} drape's own, {:.1} the model's, {:.1} \
         the preview's JPEG encoder's",
        per_frame(own),
        per_frame(model),
        per_frame(encoder)
    );
    // No check that the three accounts add up to all allocations: each allocation is booked to
    // exactly one by construction, and the counters are read one after another while the
    // renderer thread encodes, so such a sum differs by whatever it allocated in between.
    assert_eq!(
        own,
        0,
        "{own} allocations of drape's own over {counted} frames ({} bytes allocated in all)",
        after.bytes - before.bytes
    );
    // The work was real: the model ran, the preview was drawn, masks were pasted, every line
    // reached the file and both subscribers.
    assert!(model > 0 && encoder > 0);
    assert_eq!(lines_read.load(Ordering::SeqCst), 2 * total);
    let text = std::fs::read_to_string(&jsonl).unwrap();
    assert_eq!(text.lines().count(), total);
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let instances = last["instances"].as_array().unwrap();
    assert!(!instances.is_empty(), "{last}");
    assert!(instances.iter().any(|i| i["mask"]["counts"].is_string()));
    assert!(
        instances.iter().any(|i| i["mask"].is_null()),
        "the mask cap never bound"
    );
    // ...and so was the tracking: garments left the frames and came back as new tracks.
    for kind in ["started", "ended"] {
        let needle = format!("\"event\":\"{kind}\"");
        let lines = text.lines().skip(WARMUP).filter(|l| l.contains(&needle));
        assert!(lines.count() > 0, "no track {kind} while counting");
    }
}
