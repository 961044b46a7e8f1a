//! The live pipeline: a capture thread hands the newest frame to the inference loop through a
//! latest-frame slot, the loop keeps every result inside a latency budget, and each result is
//! emitted as it is made.
//!
//! ```text
//! capture thread ── publish ──> [LatestFrame] ── take newest ──> budget plan ─> model ─>
//!   (never blocks;                (one frame;                     (stale? mask cap?
//!    superseded = dropped)         no queue)                       input size?)
//!     ─> postprocess ─> tracker ─> sinks
//! ```
//!
//! [`slot`] is the hand-off, [`budget`] the plan, [`stats`] what a run counts; the sinks and
//! the record they receive live in [`crate::stream`].
//!
//! The budget is kept by, in order: never starting on a stale frame; capping how many detections
//! go to the mask head from a cost model learnt online (seeded by `drape calibrate`); stepping
//! the input size down a ladder, with hysteresis, when the fixed cost alone would break it; and
//! counting any miss that still happens.

pub mod budget;
mod ring;
pub mod slot;
pub mod stats;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::capture::{CaptureControl, CaptureError, CaptureStats, Frame, FrameSource};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::health::RunStatus;
use crate::model::{MaskRcnn, ModelOutput, Timings, Workspace};
use crate::output::RleFormat;
use crate::postprocess::{Detections, Postprocessor};
use crate::stream::{write_record, Emitted, FrameRecord, Sink};
use crate::track::{FrameTracks, Tracker, TrackerConfig};
pub use budget::{ladder, BudgetController, CostModel, LADDER_FRACTIONS};
pub use slot::{LatestFrame, Take};
pub use stats::{Counters, Percentiles, Samples, Summary};

/// Size of the grey frame the model warms up on before capture starts (a VGA camera's).
const WARM_UP_FRAME: (usize, usize) = (480, 640);

/// Called after each frame's model run, before the budget controller learns from it.
pub type AfterInference = Arc<dyn Fn(&mut Detections) + Send + Sync>;

#[derive(Clone)]
pub struct PipelineOptions {
    pub budget_ms: f64,
    /// Stop after this long (None: until the source ends or `stop` is set).
    pub duration: Option<Duration>,
    pub rle: RleFormat,
    pub track: TrackerConfig,
    /// What frame ages, latencies and the duration are measured on. Sources stamp frames on
    /// the same clock ([`SystemClock`] for cameras and replays).
    pub clock: Arc<dyn Clock>,
    /// Test hook: may rewrite each frame's measured timings (injected costs) and move an
    /// injected clock, so the budget controller's behaviour does not depend on the machine.
    pub after_inference: Option<AfterInference>,
    /// Told when the run starts taking frames, after each processed frame and when it ends,
    /// for `/healthz` and systemd's watchdog.
    pub status: Option<Arc<RunStatus>>,
}

impl PipelineOptions {
    /// Wall-clock options for a live run.
    pub fn new(budget_ms: f64) -> Self {
        Self {
            budget_ms,
            duration: None,
            rle: RleFormat::default(),
            clock: Arc::new(SystemClock),
            after_inference: None,
            status: None,
            track: TrackerConfig::default(),
        }
    }
}

/// Runs until the source ends, `stop` is set, or `duration` passes. The capture thread is
/// joined before returning.
pub fn run(
    model: &MaskRcnn,
    mut source: Box<dyn FrameSource>,
    mut controller: BudgetController,
    sinks: &mut [Box<dyn Sink + '_>],
    options: &PipelineOptions,
    stop: &AtomicBool,
) -> Result<Summary> {
    let fps = source.fps();
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if !positive(options.budget_ms) || !positive(fps) {
        return Err(Error::Config(format!(
            "budget ({} ms) and the source's frame rate ({fps}) must be positive",
            options.budget_ms
        )));
    }
    // Warm up before the first frame is captured: the first inference pays for page faults,
    // thread pools and lazy set-up, which would otherwise land on a real frame's latency.
    // The two stages' buffers, grown here and reused for every frame.
    let mut ws = Workspace::default();
    let mut model_output = ModelOutput::default();
    let mut postprocessor = Postprocessor::new();
    let mask_thresh = model.config().mask_thresh;
    let mut result = Detections::default();
    let (warm_h, warm_w) = WARM_UP_FRAME;
    let grey = vec![128u8; warm_h * warm_w * 3];
    model.detect_into(
        &grey,
        (warm_h, warm_w),
        model.default_settings(),
        &mut ws,
        &mut model_output,
    )?;
    postprocessor.run(&model_output, mask_thresh, &mut result)?;

    let slot = LatestFrame::new(Frame::with_capacity(0, 0));
    let source_stats = Mutex::new(CaptureStats::default());
    let control = Arc::new(CaptureControl::default());
    source.attach(Arc::clone(&control));
    let period_ms = 1e3 / fps;
    let clock = &*options.clock;
    let started = clock.now();
    let deadline = options.duration.map(|d| started + d);

    let status = options.status.as_deref();
    if let Some(status) = status {
        status.running(Duration::from_secs_f64(1.0 / fps), Arc::clone(&control));
    }
    std::thread::scope(|scope| -> Result<Summary> {
        // However this closure ends (the loop's break, an early `?`, a panic), capture is told
        // to stop, so the scope's implicit join never waits on a source that runs forever.
        let _stop_capture = StopOnDrop(&control, status);
        let capture = scope.spawn(|| {
            let _span = tracing::info_span!("capture", source = %source.describe()).entered();
            // A panicking source still closes the slot, so the inference loop ends instead of
            // waiting for frames that will never come.
            let closer = CloseOnPanic(&slot);
            let mut back = Frame::with_capacity(0, 0);
            let outcome = loop {
                if stop.load(Ordering::Relaxed) || control.stopped() {
                    break None;
                }
                match source.next_frame(&mut back) {
                    Ok(()) => {
                        slot.publish(&mut back);
                        *source_stats.lock().unwrap_or_else(|e| e.into_inner()) = source.stats();
                    }
                    Err(CaptureError::EndOfStream | CaptureError::Stopped) => break None,
                    Err(e) => break Some(e.to_string()),
                }
            };
            *source_stats.lock().unwrap_or_else(|e| e.into_inner()) = source.stats();
            closer.0.close(outcome);
        });

        let mut counters = Counters::default();
        let mut latency = Samples::new();
        let mut ages = Samples::new();
        let mut stages: Vec<Samples> = (0..Timings::default().stages().len())
            .map(|_| Samples::new())
            .collect();
        let mut front = Frame::with_capacity(0, 0);
        let mut line = Vec::with_capacity(64 * 1024);
        let mut failure = None;
        let mut final_input = (0, 0);
        let mut tracker = Tracker::new(options.track)?;
        let mut tracks = FrameTracks::default();

        loop {
            if stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| clock.now() >= d) {
                break;
            }
            match slot.take(&mut front, Duration::from_millis(100)) {
                Take::Frame => {}
                Take::Timeout => continue,
                Take::Closed(error) => {
                    failure = error.map(Error::Capture);
                    break;
                }
            }
            let age_ms = ms_since(clock, front.captured);
            if age_ms > period_ms {
                counters.dropped_stale += 1;
                tracing::debug!(seq = front.seq, age_ms, "stale frame dropped");
                continue;
            }
            let _span = tracing::debug_span!("frame", seq = front.seq).entered();
            let size = (front.height, front.width);
            let settings = controller.plan(size, age_ms);
            model.detect_into(&front.rgb, size, settings, &mut ws, &mut model_output)?;
            postprocessor.run(&model_output, mask_thresh, &mut result)?;
            // Tracked before the hook, so injected costs replace the tracker's measured one too.
            let track_start = Instant::now();
            tracker.update(&result.instances, front.captured, &mut tracks);
            result.timings.track = track_start.elapsed().as_secs_f64() * 1e3;
            result.timings.total += result.timings.track;
            if let Some(hook) = &options.after_inference {
                hook(&mut result);
            }
            controller.observe(size, settings, &result.timings, result.masked);
            let latency_ms = ms_since(clock, front.captured);
            let met = latency_ms <= options.budget_ms;
            let record = FrameRecord {
                labels: model.labels(),
                frame: &front,
                result: &result,
                tracks: &tracks,
                age_ms,
                latency_ms,
                budget_met: met,
                masks: Some(options.rle),
            };
            write_record(&mut line, &record)?;
            counters.processed += 1;
            if let Some(status) = status {
                status.processed();
            }
            if !met {
                counters.budget_misses += 1;
                tracing::warn!(
                    seq = front.seq,
                    latency_ms,
                    budget_ms = options.budget_ms,
                    "budget missed"
                );
            }
            let stats = *source_stats.lock().unwrap_or_else(|e| e.into_inner());
            counters.absorb(&stats, slot.superseded());
            let emitted = Emitted {
                record: &record,
                line: &line,
                counters: &counters,
            };
            for sink in sinks.iter_mut() {
                if let Err(e) = sink.frame(&emitted) {
                    tracing::error!("output failed: {e}");
                    failure = Some(Error::Output(e.to_string()));
                }
            }
            if failure.is_some() {
                break;
            }
            latency.push(latency_ms);
            ages.push(age_ms);
            for (s, (_, ms)) in stages.iter_mut().zip(result.timings.stages()) {
                s.push(ms);
            }
            final_input = result.input_size;
        }
        control.stop();
        // The capture thread notices the flag after its current `next_frame`: at most a frame
        // period, or one reconnect backoff, later.
        capture.join().map_err(|payload| Error::Panicked {
            thread: "capture",
            message: panic_message(payload.as_ref()),
        })?;
        for sink in sinks.iter_mut() {
            sink.flush()
                .map_err(|e| Error::Output(format!("flushing: {e}")))?;
        }
        // A frame published after the loop's last take was neither processed nor superseded.
        let mut leftover = Frame::with_capacity(0, 0);
        let unclaimed = matches!(slot.take(&mut leftover, Duration::ZERO), Take::Frame) as u64;
        let stats = *source_stats.lock().unwrap_or_else(|e| e.into_inner());
        counters.absorb(&stats, slot.superseded() + unclaimed);
        if let Some(error) = failure {
            return Err(error);
        }
        let names = Timings::default().stages().map(|(n, _)| n);
        Ok(Summary {
            counters,
            latency_ms: latency.percentiles(),
            age_ms: ages.percentiles(),
            stages_ms: names
                .iter()
                .zip(&stages)
                .map(|(n, s)| (*n, s.percentiles()))
                .collect(),
            final_input_size: final_input,
            costs: controller.costs(),
        })
    })
}

/// Stops capture (and reports the run over) when dropped, whichever way the inference loop is
/// left.
struct StopOnDrop<'a>(&'a CaptureControl, Option<&'a RunStatus>);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
        if let Some(status) = self.1 {
            status.ended("the run has ended");
        }
    }
}

/// Closes the slot if the capture thread unwinds, so its consumer is not left waiting.
struct CloseOnPanic<'a>(&'a LatestFrame);

impl Drop for CloseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close(Some("capture thread panicked".into()));
        }
    }
}

/// The text a panic was raised with (`panic!("...")` payloads are `&str` or `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-text panic payload".into())
}

/// Milliseconds from `then` to `clock`'s now (0 for a stamp in the future).
fn ms_since(clock: &dyn Clock, then: Instant) -> f64 {
    clock.now().saturating_duration_since(then).as_secs_f64() * 1e3
}
