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

use crate::clock::SystemClock;
use crate::health::{Health, RunStatus};
use crate::labels::Labels;
use crate::postprocess::Instance;
use metrics::Metrics;
pub use record::{write_record, Emitted, FrameRecord, Sink};

/// JPEG quality of the preview: good enough to read labels, small enough for Wi-Fi.
const JPEG_QUALITY: u8 = 80;
/// The preview draws only instances at least this confident, so a mirror shows garments, not
/// the long tail of low-score guesses (every instance still goes to the JSON outputs).
pub const PREVIEW_MIN_SCORE: f32 = 0.5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every line to every subscriber, through a bounded queue per subscriber.
#[derive(Default)]
pub struct LineFanout {
    subscribers: Mutex<Vec<SyncSender<Arc<[u8]>>>>,
    dropped: AtomicU64,
}

impl LineFanout {
    /// A new subscriber whose queue holds `capacity` lines.
    pub fn subscribe(&self, capacity: usize) -> Receiver<Arc<[u8]>> {
        let (tx, rx) = sync_channel(capacity);
        lock(&self.subscribers).push(tx);
        rx
    }

    pub fn send(&self, line: &[u8]) {
        let mut subs = lock(&self.subscribers);
        if subs.is_empty() {
            return;
        }
        let line: Arc<[u8]> = Arc::from(line);
        subs.retain(|tx| match tx.try_send(Arc::clone(&line)) {
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
        lock(&self.subscribers).len()
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
    instances: Vec<Instance>,
    /// The track of each of `instances`.
    track_ids: Vec<u64>,
    stop: bool,
}

/// The pipeline side of the hub: fans lines out, updates metrics and hands the newest frame
/// to the renderer thread (started on creation, stopped on drop).
pub struct HubSink {
    hub: Arc<Hub>,
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
        let (job, ready) = &*self.job;
        let mut j = lock(job);
        j.width = r.frame.width;
        j.height = r.frame.height;
        j.rgb.clear();
        j.rgb.extend_from_slice(&r.frame.rgb);
        j.instances.clear();
        j.track_ids.clear();
        let tracked = r.result.instances.iter().zip(&r.tracks.instances);
        for (i, t) in tracked.filter(|(i, _)| i.score >= PREVIEW_MIN_SCORE) {
            j.instances.push(i.clone());
            j.track_ids.push(t.track_id);
        }
        j.fresh = true;
        drop(j);
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
        crate::overlay::draw_tracked(&mut canvas, &local.instances, &local.track_ids, |c| {
            labels.get(c)
        });
        let mut jpeg = Vec::with_capacity(local.rgb.len() / 8);
        let encoded = JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY).encode_image(&canvas);
        match encoded {
            Ok(()) => hub.jpeg.publish(Arc::new(jpeg)),
            Err(e) => tracing::warn!("preview JPEG encoding failed: {e}"),
        }
    }
}
