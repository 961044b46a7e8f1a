//! A camera as a frame source: conversion of driver buffers into RGB, sequence bookkeeping, and
//! the reconnect state machine, written against the small [`Device`] trait so tests drive it with
//! a fake device that fails and unplugs on cue, and a fake clock for the backoff.
//!
//! ```text
//!             dequeue ok ──> convert ──> frame (corrupt: count, warn, next buffer)
//! Streaming ──┤
//!             dequeue error ──> close ──> Lost ──> sleep(backoff) ──> open ──┬─ ok ──> Streaming
//!                                          ^                                 │
//!                                          └── backoff doubles, capped ──────┘ error
//! ```
//!
//! `next_frame` blocks through the whole outage, so the pipeline simply sees no frames, unless
//! the source was given a stop flag ([`CameraSource::with_stop`]): once it is set, the outage
//! ends with [`CaptureError::EndOfStream`] within one [`STOP_CHECK`].

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::convert::{yuyv_to_rgb, MjpegDecoder};
use super::{
    CaptureControl, CaptureError, CaptureStats, FpsLabel, Frame, FrameSource, PixelFormat,
};

/// First wait before reopening a lost camera: long enough for udev to remove the dead node.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between reopen attempts, so a replugged camera is back within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a backoff wait looks at the stop flag: a SIGTERM during a reconnect ends the
/// process this long after it arrives, not a whole backoff later.
pub const STOP_CHECK: Duration = Duration::from_millis(50);

/// What the device streams in after a successful open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamFormat {
    pub pixel: PixelFormat,
    pub width: usize,
    pub height: usize,
    /// Bytes per row of a YUYV image (at least `2 * width`); unused for MJPEG.
    pub stride: usize,
    pub fps: f64,
}

impl fmt::Display for StreamFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}x{} @{}fps",
            self.pixel,
            self.width,
            self.height,
            FpsLabel(self.fps)
        )
    }
}

/// One filled driver buffer, borrowed until the next dequeue.
#[derive(Debug)]
pub struct RawBuffer<'a> {
    /// The bytes the driver filled (`bytesused`, not the whole mapping).
    pub data: &'a [u8],
    /// The driver's frame counter.
    pub sequence: u32,
    /// The driver flagged the buffer as damaged (`V4L2_BUF_FLAG_ERROR`).
    pub error: bool,
    pub captured: Instant,
    pub captured_at_unix_ms: f64,
}

/// The driver-facing half of a camera.
pub trait Device: Send {
    /// Names the device in logs and errors, e.g. `/dev/video0`.
    fn name(&self) -> &str;
    /// Opens the device, negotiates a format and starts streaming.
    fn open(&mut self) -> Result<StreamFormat, CaptureError>;
    /// Blocks until the driver hands back the next filled buffer. Any error means the stream is
    /// unusable and the device must be closed and reopened.
    fn dequeue(&mut self) -> io::Result<RawBuffer<'_>>;
    /// Stops streaming and releases the device.
    fn close(&mut self);
}

/// Something that waits: `std::thread::sleep` in production, a recorder in tests.
pub trait Sleep: Send {
    fn sleep(&mut self, duration: Duration);
}

impl<F: FnMut(Duration) + Send> Sleep for F {
    fn sleep(&mut self, duration: Duration) {
        self(duration)
    }
}

/// Real sleeps that end early once `stop` is set, looking at it every [`STOP_CHECK`].
pub struct StoppableSleep {
    pub stop: Option<Arc<AtomicBool>>,
}

impl Sleep for StoppableSleep {
    fn sleep(&mut self, duration: Duration) {
        let end = Instant::now() + duration;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() || stopped(&self.stop) {
                return;
            }
            std::thread::sleep(left.min(STOP_CHECK));
        }
    }
}

fn stopped(stop: &Option<Arc<AtomicBool>>) -> bool {
    stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
}

/// How a lost camera is reopened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReconnectPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Stop trying after this much accumulated waiting and return
    /// [`CaptureError::Disconnected`]; `None` waits for the camera forever.
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: INITIAL_BACKOFF,
            max_backoff: MAX_BACKOFF,
            give_up_after: None,
        }
    }
}

/// A [`FrameSource`] over a [`Device`], reconnecting when the device goes away.
pub struct CameraSource<D, S> {
    device: D,
    policy: ReconnectPolicy,
    sleeper: S,
    /// `None` while the device is lost.
    format: Option<StreamFormat>,
    /// The format last streamed, for `describe` during an outage.
    last_format: StreamFormat,
    /// Why the stream was lost, for the log line when it comes back.
    lost_reason: Option<String>,
    mjpeg: MjpegDecoder,
    /// The driver's sequence number of the previous buffer in this stream.
    last_driver_seq: Option<u32>,
    /// The sequence number the next buffer gets if it follows the previous one without a gap.
    next_seq: u64,
    stats: CaptureStats,
    /// Shared with the pipeline: the reconnect loop reports itself there and gives up between
    /// attempts once the consumer has stopped.
    control: Option<Arc<CaptureControl>>,
    /// Set by the owner to end a reconnect wait.
    stop: Option<Arc<AtomicBool>>,
}

impl<D: Device, S: Sleep> CameraSource<D, S> {
    /// Opens `device`; a camera that cannot be opened now is an error, not a reconnect.
    pub fn new(mut device: D, policy: ReconnectPolicy, sleeper: S) -> Result<Self, CaptureError> {
        let format = device.open()?;
        tracing::info!(device = device.name(), %format, "camera streaming");
        Ok(Self {
            mjpeg: decoder_for(&format),
            device,
            policy,
            sleeper,
            format: Some(format),
            last_format: format,
            lost_reason: None,
            last_driver_seq: None,
            next_seq: 0,
            stats: CaptureStats::default(),
            control: None,
            stop: None,
        })
    }

    /// Ends a reconnect wait with [`CaptureError::EndOfStream`] once `stop` is set (a signal
    /// handler's flag), instead of waiting for the camera forever.
    pub fn with_stop(mut self, stop: Arc<AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Width and height of the frames now being delivered.
    pub fn size(&self) -> (usize, usize) {
        (self.last_format.width, self.last_format.height)
    }

    /// Reopens the device with exponential backoff until it streams again.
    fn reconnect(&mut self) -> Result<StreamFormat, CaptureError> {
        let mut delay = self.policy.initial_backoff;
        let mut waited = Duration::ZERO;
        let mut attempts = 0u32;
        loop {
            if self.consumer_stopped() {
                return Err(CaptureError::Stopped);
            }
            self.sleeper.sleep(delay);
            if self.consumer_stopped() {
                return Err(CaptureError::Stopped);
            }
            if stopped(&self.stop) {
                tracing::info!(device = self.device.name(), "stopped while reconnecting");
                return Err(CaptureError::EndOfStream);
            }
            waited += delay;
            attempts += 1;
            match self.device.open() {
                Ok(format) => {
                    self.stats.reconnects += 1;
                    let lost_because = self.lost_reason.take().unwrap_or_default();
                    tracing::info!(
                        device = self.device.name(),
                        %format,
                        attempts,
                        waited_ms = waited.as_millis() as u64,
                        lost_because,
                        "camera reconnected"
                    );
                    return Ok(format);
                }
                Err(e) => {
                    // The first failure says why (a different camera on the port, say); the
                    // rest only repeat it.
                    let device = self.device.name();
                    if attempts == 1 {
                        tracing::warn!(device, error = %e, "reopen failed; retrying");
                    } else {
                        tracing::debug!(device, attempts, error = %e, "reopen failed");
                    }
                    if self
                        .policy
                        .give_up_after
                        .is_some_and(|limit| waited >= limit)
                    {
                        return Err(CaptureError::Disconnected {
                            device: self.device.name().to_string(),
                            reason: format!(
                                "{}; still unavailable after {attempts} attempts over {:.1} s: {e}",
                                self.lost_reason.as_deref().unwrap_or("lost"),
                                waited.as_secs_f64()
                            ),
                        });
                    }
                }
            }
            delay = (delay * 2).min(self.policy.max_backoff);
        }
    }

    fn consumer_stopped(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.stopped())
    }

    fn set_reconnecting(&self, on: bool) {
        if let Some(c) = &self.control {
            c.set_reconnecting(on);
        }
    }

    fn lose(&mut self, error: &io::Error) {
        tracing::warn!(device = self.device.name(), %error, "camera lost; reconnecting");
        self.device.close();
        self.format = None;
        self.last_driver_seq = None;
        self.lost_reason = Some(error.to_string());
    }
}

impl<D: Device, S: Sleep> FrameSource for CameraSource<D, S> {
    /// The rate negotiated with the driver (the last one, while reconnecting).
    fn fps(&self) -> f64 {
        self.last_format.fps
    }

    fn attach(&mut self, control: Arc<CaptureControl>) {
        self.control = Some(control);
    }

    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        loop {
            let format = match self.format {
                Some(format) => format,
                None => {
                    self.set_reconnecting(true);
                    let reconnected = self.reconnect();
                    self.set_reconnecting(false);
                    let format = reconnected?;
                    if format != self.last_format {
                        self.mjpeg = decoder_for(&format);
                    }
                    self.format = Some(format);
                    self.last_format = format;
                    format
                }
            };
            let buffer = match self.device.dequeue() {
                Ok(buffer) => buffer,
                Err(e) => {
                    self.lose(&e);
                    continue;
                }
            };

            // Sequence: gaps inside one stream are frames the driver dropped. Drivers that never
            // fill the counter (always 0) or restart it count as no gap.
            let seq = match self.last_driver_seq {
                Some(last) => {
                    let delta = buffer.sequence.wrapping_sub(last);
                    if delta > 1 && delta < u32::MAX / 2 {
                        self.stats.driver_dropped += u64::from(delta - 1);
                        self.next_seq + u64::from(delta - 1)
                    } else {
                        self.next_seq
                    }
                }
                None => self.next_seq,
            };
            self.last_driver_seq = Some(buffer.sequence);
            self.next_seq = seq + 1;

            let converted = if buffer.error {
                Err("the driver flagged the buffer as damaged".to_string())
            } else {
                convert(buffer.data, &format, &mut self.mjpeg, frame)
            };
            if let Err(reason) = converted {
                self.stats.corrupt += 1;
                tracing::warn!(device = self.device.name(), seq, %reason, "skipping corrupt frame");
                continue;
            }
            frame.seq = seq;
            frame.captured = buffer.captured;
            frame.captured_at_unix_ms = buffer.captured_at_unix_ms;
            self.stats.frames += 1;
            return Ok(());
        }
    }

    fn stats(&self) -> CaptureStats {
        self.stats
    }

    fn describe(&self) -> String {
        let state = if self.format.is_some() {
            ""
        } else {
            " (reconnecting)"
        };
        format!("{} {}{state}", self.device.name(), self.last_format)
    }
}

/// An MJPEG decoder whose scratch space fits any frame of `format` up front: a JPEG does not
/// outgrow the image's uncompressed 4:2:2 size.
fn decoder_for(format: &StreamFormat) -> MjpegDecoder {
    match format.pixel {
        PixelFormat::Mjpeg => MjpegDecoder::with_capacity(format.width * format.height * 2),
        PixelFormat::Yuyv => MjpegDecoder::default(),
    }
}

/// Converts one driver buffer into `frame`; the error says why the frame is unusable.
fn convert(
    data: &[u8],
    format: &StreamFormat,
    mjpeg: &mut MjpegDecoder,
    frame: &mut Frame,
) -> Result<(), String> {
    match format.pixel {
        PixelFormat::Yuyv => {
            let stride = format.stride.max(format.width * 2);
            // The last row need not be padded out to the stride.
            let needed = stride * format.height.saturating_sub(1) + format.width.div_ceil(2) * 4;
            if data.len() < needed {
                return Err(format!(
                    "truncated YUYV frame: {} of {needed} bytes",
                    data.len()
                ));
            }
            frame.resize(format.width, format.height);
            yuyv_to_rgb(data, format.width, format.height, stride, &mut frame.rgb);
            Ok(())
        }
        PixelFormat::Mjpeg => {
            let (width, height) = mjpeg
                .decode(data, &mut frame.rgb)
                .map_err(|e| e.to_string())?;
            frame.width = width;
            frame.height = height;
            Ok(())
        }
    }
}
