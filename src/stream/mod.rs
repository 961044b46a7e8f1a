//! Emission: what every output receives about a frame ([`record`]), JSON Lines ([`jsonl`]),
//! MQTT, and the hub behind a Unix socket for the mirror's app and an HTTP server with a live
//! preview page, MJPEG, Server-Sent Events and Prometheus metrics.
//!
//! Nothing here can slow the pipeline. Lines go to each client through its own small bounded
//! queue (a full queue loses the line, counted); the overlay is drawn and JPEG-encoded once per
//! frame on a renderer thread that only ever holds the newest frame; streaming clients wait for
//! the newest JPEG and skip what they missed.

pub mod http;
pub mod jsonl;
pub mod metrics;
pub mod mqtt;
pub mod record;
pub mod unix;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;

use crate::alloc::{Account, Scope};
use crate::clock::SystemClock;
use crate::health::{Health, RunStatus};
use crate::labels::Labels;
use crate::postprocess::Instance;
use crate::rle::Rle;
use metrics::Metrics;
pub use record::{write_record, Emitted, FrameRecord, Sink};

/// JPEG quality of the preview: good enough to read labels, small enough for Wi-Fi.
const JPEG_QUALITY: u8 = 80;
/// Preview JPEG buffers the renderer keeps for reuse at most (the hub holds one; slow MJPEG
/// clients may hold a few more).
const JPEG_BUFFERS: usize = 8;
/// The preview draws only instances at least this confident, so a mirror shows garments, not
/// the long tail of low-score guesses (every instance still goes to the JSON outputs).
pub const PREVIEW_MIN_SCORE: f32 = 0.5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Buffers a [`LineFanout`] keeps for reuse at most; lines beyond them (many slow clients) get
/// a buffer of their own.
const FANOUT_BUFFERS: usize = 64;

/// A line as subscribers receive it: shared, and reused by the fan-out once all have let go.
pub type Line = Arc<Vec<u8>>;

/// Every line to every subscriber, through a bounded queue per subscriber.
#[derive(Default)]
pub struct LineFanout {
    state: Mutex<FanoutState>,
    dropped: AtomicU64,
}

#[derive(Default)]
struct FanoutState {
    subscribers: Vec<SyncSender<Line>>,
    /// Buffers lines went out in: one no subscriber holds any more is refilled rather than a
    /// new one allocated, so a steady stream of lines allocates nothing.
    buffers: Vec<Line>,
}

impl LineFanout {
    /// A new subscriber whose queue holds `capacity` lines.
    pub fn subscribe(&self, capacity: usize) -> Receiver<Line> {
        let (tx, rx) = sync_channel(capacity);
        lock(&self.state).subscribers.push(tx);
        rx
    }

    pub fn send(&self, line: &[u8]) {
        let mut state = lock(&self.state);
        let FanoutState {
            subscribers,
            buffers,
        } = &mut *state;
        if subscribers.is_empty() {
            return;
        }
        let free = buffers.iter_mut().position(|b| Arc::get_mut(b).is_some());
        let shared = match free {
            Some(i) => {
                let buf = Arc::get_mut(&mut buffers[i]).expect("no other holder");
                buf.clear();
                buf.extend_from_slice(line);
                Arc::clone(&buffers[i])
            }
            None => {
                let fresh = Arc::new(line.to_vec());
                if buffers.len() < FANOUT_BUFFERS {
                    buffers.push(Arc::clone(&fresh));
                }
                fresh
            }
        };
        subscribers.retain(|tx| match tx.try_send(Arc::clone(&shared)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// Lines lost because a subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn subscribers(&self) -> usize {
        lock(&self.state).subscribers.len()
    }
}

/// The newest overlaid JPEG, with a generation number so waiters know what they missed.
#[derive(Default)]
pub struct LatestJpeg {
    state: Mutex<(u64, Option<Arc<Vec<u8>>>)>,
    ready: Condvar,
}

impl LatestJpeg {
    pub fn publish(&self, jpeg: Arc<Vec<u8>>) {
        let mut s = lock(&self.state);
        s.0 += 1;
        s.1 = Some(jpeg);
        drop(s);
        self.ready.notify_all();
    }

    pub fn current(&self) -> Option<(u64, Arc<Vec<u8>>)> {
        let s = lock(&self.state);
        s.1.clone().map(|j| (s.0, j))
    }

    /// Waits up to `timeout` for a JPEG newer than generation `seen`.
    pub fn newer_than(&self, seen: u64, timeout: Duration) -> Option<(u64, Arc<Vec<u8>>)> {
        let s = lock(&self.state);
        let (s, _) = self
            .ready
            .wait_timeout_while(s, timeout, |s| s.0 <= seen)
            .unwrap_or_else(|e| e.into_inner());
        (s.0 > seen)
            .then(|| s.1.clone().map(|j| (s.0, j)))
            .flatten()
    }
}

/// What the HTTP server and the Unix socket serve, fed by [`HubSink`].
pub struct Hub {
    pub events: LineFanout,
    pub socket: LineFanout,
    pub jpeg: LatestJpeg,
    pub metrics: Metrics,
    /// Outputs that fail on their own (the JSON Lines file), for `/metrics` and `/healthz`.
    pub sinks: Mutex<Vec<Arc<jsonl::SinkHealth>>>,
    /// What the pipeline reports about itself; hand it to the run's `PipelineOptions::status`.
    pub status: Arc<RunStatus>,
}

impl Hub {
    /// Lists `health` in `/metrics` and `/healthz`.
    pub fn watch_sink(&self, health: Arc<jsonl::SinkHealth>) {
        lock(&self.sinks).push(health);
    }

    /// The pipeline's health, given the watched sinks.
    pub fn health(&self) -> Health {
        let states = self.sink_states();
        let failing: Vec<&str> = states
            .iter()
            .filter(|(_, _, failing)| *failing)
            .map(|(name, _, _)| *name)
            .collect();
        self.status.health(&failing)
    }

    /// (name, errors so far, failing now) of every watched sink.
    pub fn sink_states(&self) -> Vec<(&'static str, u64, bool)> {
        lock(&self.sinks)
            .iter()
            .map(|s| (s.name, s.errors(), s.failing()))
            .collect()
    }

    /// A hub on the wall clock, not reporting to systemd.
    pub fn new() -> Arc<Self> {
        Self::with_status(RunStatus::new(Arc::new(SystemClock), None))
    }

    pub fn with_status(status: Arc<RunStatus>) -> Arc<Self> {
        Arc::new(Self {
            events: LineFanout::default(),
            socket: LineFanout::default(),
            jpeg: LatestJpeg::default(),
            metrics: Metrics::default(),
            sinks: Mutex::default(),
            status,
        })
    }
}

/// A frame waiting for the renderer; its buffers are reused frame after frame.
#[derive(Default)]
struct RenderJob {
    fresh: bool,
    width: usize,
    height: usize,
    rgb: Vec<u8>,
    /// The first `shown` are this frame's; the rest keep their mask buffers for later frames.
    instances: Vec<Instance>,
    shown: usize,
    /// The track of each shown instance.
    track_ids: Vec<u64>,
    stop: bool,
}

/// The pipeline side of the hub: fans lines out, updates metrics and hands the newest frame
/// to the renderer thread (started on creation, stopped on drop).
pub struct HubSink {
    hub: Arc<Hub>,
    /// The most instances a frame has shown and the most runs one of their masks has had: the
    /// render jobs' buffers are made at least this large (see `Postprocessor`'s).
    most_shown: usize,
    most_runs: usize,
    job: Arc<(Mutex<RenderJob>, Condvar)>,
    renderer: Option<std::thread::JoinHandle<()>>,
}

impl HubSink {
    /// `labels` names the classes in the overlay's captions.
    pub fn new(hub: Arc<Hub>, labels: Labels) -> Self {
        let job: Arc<(Mutex<RenderJob>, Condvar)> = Arc::default();
        let renderer = {
            let (hub, job) = (Arc::clone(&hub), Arc::clone(&job));
            std::thread::spawn(move || render_loop(&hub, &job, &labels))
        };
        Self {
            hub,
            most_shown: 0,
            most_runs: 0,
            job,
            renderer: Some(renderer),
        }
    }
}

impl Sink for HubSink {
    fn frame(&mut self, out: &Emitted<'_>) -> std::io::Result<()> {
        self.hub.events.send(out.line);
        self.hub.socket.send(out.line);
        self.hub.metrics.record(out);
        let r = out.record;
        let previewed = |i: &&Instance| i.score >= PREVIEW_MIN_SCORE;
        let runs = |i: &Instance| i.mask.as_ref().map_or(0, |m| m.counts.len());
        let shown = r.result.instances.iter().filter(previewed);
        self.most_shown = self.most_shown.max(shown.clone().count());
        self.most_runs = shown.map(runs).fold(self.most_runs, usize::max);
        let (job, ready) = &*self.job;
        let mut guard = lock(job);
        let j = &mut *guard;
        j.width = r.frame.width;
        j.height = r.frame.height;
        j.rgb.clear();
        j.rgb.extend_from_slice(&r.frame.rgb);
        // Whichever job this is (the renderer swaps two), it is sized for the busiest frame
        // seen so far before anything is copied, so it grows at most once after that frame.
        j.track_ids.clear();
        j.track_ids.reserve(self.most_shown);
        j.instances
            .resize_with(self.most_shown.max(j.instances.len()), || Instance {
                class_id: 0,
                score: 0.0,
                bbox: [0.0; 4],
                mask: None,
            });
        for slot in &mut j.instances {
            let mask = slot.mask.get_or_insert_with(|| Rle {
                height: 0,
                width: 0,
                counts: Vec::new(),
            });
            mask.counts
                .reserve(self.most_runs.saturating_sub(mask.counts.len()));
        }
        j.shown = 0;
        let tracked = r.result.instances.iter().zip(&r.tracks.instances);
        for (i, t) in tracked.filter(|(i, _)| previewed(i)) {
            let slot = &mut j.instances[j.shown];
            (slot.class_id, slot.score, slot.bbox) = (i.class_id, i.score, i.bbox);
            let mask = slot.mask.as_mut().expect("every slot holds a mask buffer");
            match &i.mask {
                Some(m) => mask.clone_from(m),
                // Beyond the mask cap: no runs draw nothing, and the buffer stays.
                None => {
                    (mask.height, mask.width) = (0, 0);
                    mask.counts.clear();
                }
            }
            j.track_ids.push(t.track_id);
            j.shown += 1;
        }
        j.fresh = true;
        drop(guard);
        ready.notify_one();
        Ok(())
    }
}

impl Drop for HubSink {
    fn drop(&mut self) {
        lock(&self.job.0).stop = true;
        self.job.1.notify_one();
        if let Some(r) = self.renderer.take() {
            let _ = r.join();
        }
    }
}

fn render_loop(hub: &Hub, job: &(Mutex<RenderJob>, Condvar), labels: &Labels) {
    let mut local = RenderJob::default();
    let mut canvas = RgbImage::new(1, 1);
    // JPEGs published before: refilled once the hub and every client have let go of them.
    let mut buffers: Vec<Arc<Vec<u8>>> = Vec::new();
    loop {
        {
            let (m, ready) = job;
            let guard = lock(m);
            let mut guard = ready
                .wait_while(guard, |j| !j.fresh && !j.stop)
                .unwrap_or_else(|e| e.into_inner());
            if guard.stop {
                return;
            }
            std::mem::swap(&mut *guard, &mut local);
            guard.fresh = false;
            local.fresh = false;
        }
        if canvas.width() as usize != local.width || canvas.height() as usize != local.height {
            canvas = RgbImage::new(local.width as u32, local.height as u32);
        }
        canvas.copy_from_slice(&local.rgb);
        let shown = &local.instances[..local.shown];
        crate::overlay::draw_tracked(&mut canvas, shown, &local.track_ids, |c| labels.get(c));
        // A buffer no client is still sending, else a new one (kept if there is room).
        let free = buffers.iter_mut().position(|b| Arc::get_mut(b).is_some());
        let i = free.unwrap_or_else(|| {
            buffers.push(Arc::new(Vec::with_capacity(local.rgb.len() / 8)));
            buffers.len() - 1
        });
        let jpeg = Arc::get_mut(&mut buffers[i]).expect("no other holder");
        jpeg.clear();
        let encoded = {
            let _encoder = Scope::enter(Account::Encoder);
            JpegEncoder::new_with_quality(&mut *jpeg, JPEG_QUALITY).encode_image(&canvas)
        };
        let jpeg = if buffers.len() > JPEG_BUFFERS {
            buffers.swap_remove(i)
        } else {
            Arc::clone(&buffers[i])
        };
        match encoded {
            Ok(()) => hub.jpeg.publish(jpeg),
            Err(e) => tracing::warn!("preview JPEG encoding failed: {e}"),
        }
    }
}
