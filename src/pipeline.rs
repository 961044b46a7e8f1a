//! The live pipeline: a capture thread hands the newest frame to the inference loop through a
//! latest-frame slot, the loop keeps every result inside a latency budget, and each result is
//! emitted as it is made.
//!
//! ```text
//! capture thread ── publish ──> [LatestFrame] ── take newest ──> budget plan ─> model ─> sinks
//!   (never blocks;                (one frame;                     (stale? mask cap?
//!    superseded = dropped)         no queue)                       input size?)
//! ```
//!
//! The budget is kept by, in order: never starting on a stale frame; capping how many detections
//! go to the mask head from a cost model learnt online (seeded by `drape calibrate`); stepping
//! the input size down a ladder, with hysteresis, when the fixed cost alone would break it; and
//! counting any miss that still happens.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use crate::capture::{CaptureControl, CaptureError, CaptureStats, Frame, FrameSource};
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::health::RunStatus;
use crate::model::transform::Transform;
use crate::model::{Detections, FrameSettings, MaskRcnn, Timings, Workspace};
use crate::output::RleFormat;
use crate::track::{FrameTracks, Tracker, TrackerConfig};

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
/// Size of the grey frame the model warms up on before capture starts (a VGA camera's).
const WARM_UP_FRAME: (usize, usize) = (480, 640);
/// Latency samples kept for the summary's percentiles (the most recent ones).
const SUMMARY_SAMPLES: usize = 8192;

/// How a frame left the latest-frame slot.
pub enum Take {
    Frame,
    /// Nothing new within the timeout.
    Timeout,
    /// The capture side has finished; `Some` carries its error.
    Closed(Option<String>),
}

struct SlotState {
    frame: Frame,
    fresh: bool,
    closed: Option<Option<String>>,
    superseded: u64,
}

/// A one-frame hand-off: the producer swaps its filled buffer in (never waiting for the
/// consumer), the consumer swaps the newest out. A frame replaced before it was taken is
/// superseded and counted. Swapping exchanges buffers, so nothing is copied or allocated.
pub struct LatestFrame {
    state: Mutex<SlotState>,
    ready: Condvar,
}

impl LatestFrame {
    pub fn new(frame: Frame) -> Self {
        Self {
            state: Mutex::new(SlotState {
                frame,
                fresh: false,
                closed: None,
                superseded: 0,
            }),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic elsewhere cannot leave a half-swapped frame: recover the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes `back` as the newest frame; `back` receives the buffer it replaced.
    pub fn publish(&self, back: &mut Frame) {
        let mut s = self.lock();
        std::mem::swap(&mut s.frame, back);
        if s.fresh {
            s.superseded += 1;
        }
        s.fresh = true;
        drop(s);
        self.ready.notify_one();
    }

    /// Swaps the newest frame into `front`, waiting up to `timeout` for one.
    pub fn take(&self, front: &mut Frame, timeout: Duration) -> Take {
        let s = self.lock();
        let (mut s, _) = self
            .ready
            .wait_timeout_while(s, timeout, |s| !s.fresh && s.closed.is_none())
            .unwrap_or_else(|e| e.into_inner());
        if s.fresh {
            std::mem::swap(&mut s.frame, front);
            s.fresh = false;
            Take::Frame
        } else if let Some(reason) = &s.closed {
            Take::Closed(reason.clone())
        } else {
            Take::Timeout
        }
    }

    pub fn close(&self, error: Option<String>) {
        self.lock().closed = Some(error);
        self.ready.notify_all();
    }

    pub fn superseded(&self) -> u64 {
        self.lock().superseded
    }
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
    ladder: Vec<(usize, usize)>,
    level: usize,
    max_masks: usize,
    fixed_ms_per_mpx: Option<f64>,
    mask_ms: Option<f64>,
    /// Multiplier from typical to p99 cost (>= 1), from calibration.
    safety: f64,
    /// Fixed cost per megapixel of the last frames, newest at `recent_next - 1`.
    recent: [f64; RECENT_FRAMES],
    recent_len: usize,
    recent_next: usize,
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
        let ladder = LADDER_FRACTIONS
            .iter()
            .map(|f| {
                let scale = |s: usize| ((s as f64 * f).round() as usize).max(32);
                (scale(base.0), scale(base.1))
            })
            .collect();
        Self {
            budget_ms,
            ladder,
            level: 0,
            max_masks,
            fixed_ms_per_mpx: None,
            mask_ms: None,
            safety: 1.0,
            recent: [0.0; RECENT_FRAMES],
            recent_len: 0,
            recent_next: 0,
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
        let worst_recent = self.recent[..self.recent_len]
            .iter()
            .copied()
            .fold(0.0, f64::max);
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
        self.recent[self.recent_next] = rate;
        self.recent_next = (self.recent_next + 1) % RECENT_FRAMES;
        self.recent_len = (self.recent_len + 1).min(RECENT_FRAMES);
        if masked > 0 {
            self.mask_ms = ewma(self.mask_ms, mask_cost / masked as f64);
        }
    }
}

/// A bounded record of recent samples for percentiles, allocated once.
#[derive(Debug, Clone)]
pub struct Samples {
    values: Vec<f64>,
    next: usize,
}

impl Samples {
    pub fn new() -> Self {
        Self {
            values: Vec::with_capacity(SUMMARY_SAMPLES),
            next: 0,
        }
    }

    pub fn push(&mut self, v: f64) {
        if self.values.len() < SUMMARY_SAMPLES {
            self.values.push(v);
        } else {
            self.values[self.next] = v;
            self.next = (self.next + 1) % SUMMARY_SAMPLES;
        }
    }

    pub fn percentiles(&self) -> Percentiles {
        let mut v = self.values.clone();
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
    fn absorb(&mut self, source: &CaptureStats, superseded: u64) {
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

/// Where results go. Every sink gets every processed frame; a sink must not block the loop.
pub trait Sink {
    /// `line` is the frame's JSON (no trailing newline); `counters` the run's so far,
    /// this frame included.
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything a sink gets about one processed frame.
pub struct Emitted<'a> {
    pub line: &'a [u8],
    /// What `line` was written from, for a sink that writes its own variant of it.
    pub record: &'a FrameRecord<'a>,
    pub tracks: &'a FrameTracks,
    pub frame: &'a Frame,
    pub result: &'a Detections,
    pub latency_ms: f64,
    pub counters: &'a Counters,
}

/// JSON Lines to any writer (stdout, a file), flushed per frame so a reader downstream sees
/// each result as it is made.
pub struct JsonLines<W: Write>(pub W);

impl<W: Write> Sink for JsonLines<W> {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        self.0.write_all(out.line)?;
        self.0.write_all(b"\n")?;
        self.0.flush()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

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
    let mut ws = Workspace::default();
    let mut result = Detections::default();
    let (warm_h, warm_w) = WARM_UP_FRAME;
    let grey = vec![128u8; warm_h * warm_w * 3];
    model.detect_into(
        &grey,
        (warm_h, warm_w),
        model.default_settings(),
        &mut ws,
        &mut result,
    )?;

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
            model.detect_into(&front.rgb, size, settings, &mut ws, &mut result)?;
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
                model,
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
                line: &line,
                record: &record,
                tracks: &tracks,
                frame: &front,
                result: &result,
                latency_ms,
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

/// Replaces `line` with the frame's JSON: the `drape detect` object plus the pipeline's fields.
/// Serialises straight into the reused buffer.
pub fn write_record(line: &mut Vec<u8>, record: &FrameRecord<'_>) -> Result<()> {
    line.clear();
    serde_json::to_writer(line, record)
        .map_err(|e| Error::Output(format!("serialising frame {}: {e}", record.frame.seq)))
}

/// One emitted line.
#[derive(Clone, Copy)]
pub struct FrameRecord<'a> {
    pub model: &'a MaskRcnn,
    pub frame: &'a Frame,
    pub result: &'a Detections,
    pub tracks: &'a FrameTracks,
    pub age_ms: f64,
    pub latency_ms: f64,
    pub budget_met: bool,
    /// Mask encoding; `None` leaves masks out.
    pub masks: Option<RleFormat>,
}

impl Serialize for FrameRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.result;
        let mut m = s.serialize_map(Some(13))?;
        m.serialize_entry("seq", &self.frame.seq)?;
        m.serialize_entry("captured_at", &self.frame.captured_at_unix_ms)?;
        m.serialize_entry("age_ms", &self.age_ms)?;
        m.serialize_entry("timings_ms", &r.timings)?;
        m.serialize_entry("latency_ms", &self.latency_ms)?;
        m.serialize_entry("budget_met", &self.budget_met)?;
        m.serialize_entry("input_size", &[r.input_size.0, r.input_size.1])?;
        m.serialize_entry("masked", &r.masked)?;
        m.serialize_entry("width", &r.width)?;
        m.serialize_entry("height", &r.height)?;
        let instances = crate::output::InstancesJson {
            model: self.model,
            instances: &r.instances,
            masks: self.masks,
            tracks: Some(&self.tracks.instances),
        };
        m.serialize_entry("instances", &instances)?;
        m.serialize_entry(
            "events",
            &crate::track::EventsJson(self.model, &self.tracks.events),
        )?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        let mut f = Frame::with_capacity(2, 2);
        f.resize(2, 2);
        f.seq = seq;
        f
    }

    #[test]
    fn latest_frame_hands_over_the_newest_and_counts_the_superseded() {
        let slot = LatestFrame::new(frame(0));
        let mut front = frame(0);
        assert!(matches!(
            slot.take(&mut front, Duration::ZERO),
            Take::Timeout
        ));
        for seq in 1..=3 {
            slot.publish(&mut frame(seq));
        }
        assert!(matches!(slot.take(&mut front, Duration::ZERO), Take::Frame));
        assert_eq!(front.seq, 3);
        assert_eq!(slot.superseded(), 2);
        slot.close(Some("unplugged".into()));
        assert!(
            matches!(slot.take(&mut front, Duration::ZERO), Take::Closed(Some(e)) if e == "unplugged")
        );
    }

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
