//! Frame sources: V4L2 cameras and replayed recordings, delivered as RGB8 into a frame buffer the
//! caller owns and reuses, so the capture thread allocates nothing per frame once running.
//!
//! ```text
//! camera (/dev/videoN) ─ YUYV/MJPEG ─┐
//! image directory ─ RGB ─────────────┼─> RGB8 ─> Transforms (crop → rotate → flip) ─> Frame
//! .y4m recording ─ planar YCbCr ─────┘
//! ```
//!
//! Every source behaves like a camera: [`FrameSource::next_frame`] blocks until the next frame is
//! due, a consumer that falls behind misses frames rather than receiving stale ones, and the
//! misses show up in [`CaptureStats::driver_dropped`].
//!
//! ```no_run
//! # fn main() -> Result<(), drape::capture::CaptureError> {
//! use drape::capture::{Frame, SourceSpec};
//! let mut source = drape::capture::open(&SourceSpec::new("/dev/video0"))?;
//! let mut frame = Frame::with_capacity(640, 480);
//! source.next_frame(&mut frame)?;
//! println!("{} frame {} is {}x{}", source.describe(), frame.seq, frame.width, frame.height);
//! # Ok(()) }
//! ```

pub mod camera;
pub mod convert;
pub mod negotiate;
pub mod replay;
pub mod transform;
// V4L2 is Linux's camera API; elsewhere drape replays recordings only.
#[cfg(target_os = "linux")]
pub mod v4l;
pub mod y4m;

use std::fmt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use camera::{
    CameraSource, Device, RawBuffer, ReconnectPolicy, Sleep, StoppableSleep, StreamFormat,
};
pub use negotiate::{negotiate, Capability, FormatRequest, FourCc};
pub use replay::ReplaySource;
pub use transform::{Crop, Rotation, TransformedSource, Transforms};
#[cfg(target_os = "linux")]
pub use v4l::list_cameras;

/// One RGB frame in a buffer owned by the caller and reused frame after frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Source sequence number. For a camera it follows the driver's counter, so a gap is frames
    /// the driver dropped; it keeps increasing across reconnects.
    pub seq: u64,
    /// Wall-clock time of capture, milliseconds since the Unix epoch.
    pub captured_at_unix_ms: f64,
    /// Monotonic capture instant, for ages and latency.
    pub captured: Instant,
    pub width: usize,
    pub height: usize,
    /// Interleaved RGB8, `width * height * 3` bytes.
    pub rgb: Vec<u8>,
}

impl Frame {
    /// An empty frame whose buffer already holds a `width` x `height` image, so a source of that
    /// size never allocates into it.
    pub fn with_capacity(width: usize, height: usize) -> Self {
        Self {
            seq: 0,
            captured_at_unix_ms: 0.0,
            captured: Instant::now(),
            width: 0,
            height: 0,
            rgb: Vec::with_capacity(width * height * 3),
        }
    }

    /// Sets the frame size. The buffer only reallocates when the image outgrows its capacity,
    /// which happens on the first frame or a format change, never in the steady state.
    pub fn resize(&mut self, width: usize, height: usize) {
        self.width = width;
        self.height = height;
        self.rgb.resize(width * height * 3, 0);
    }
}

/// A camera-like producer of RGB frames, driven from a dedicated capture thread.
pub trait FrameSource: Send {
    /// Blocks until the next frame is available and writes it into `frame` (resizing it within
    /// its capacity; it grows only on the first frame or on a format change). Paces itself like a
    /// camera.
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError>;
    fn stats(&self) -> CaptureStats;
    /// One line for logs, e.g. `/dev/video0 YUYV 640x480 @30fps`.
    fn describe(&self) -> String;
    /// The nominal frame rate: a frame older than one period is stale.
    fn fps(&self) -> f64;
    /// Shares a [`CaptureControl`] with the source. A source that can block for longer than a
    /// frame period (a camera reconnecting) reports it there and returns
    /// [`CaptureError::Stopped`] once the consumer has stopped; the rest return within a period
    /// anyway and may ignore it.
    fn attach(&mut self, _control: Arc<CaptureControl>) {}
}

impl<S: FrameSource + ?Sized> FrameSource for Box<S> {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<(), CaptureError> {
        (**self).next_frame(frame)
    }
    fn stats(&self) -> CaptureStats {
        (**self).stats()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn fps(&self) -> f64 {
        (**self).fps()
    }
    fn attach(&mut self, control: Arc<CaptureControl>) {
        (**self).attach(control)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureStats {
    /// Frames delivered to the caller.
    pub frames: u64,
    /// Frames that arrived damaged (truncated or undecodable MJPEG, short YUYV) and were skipped.
    pub corrupt: u64,
    /// Frames the consumer never saw because the source moved past them: sequence gaps reported
    /// by the driver, or replay slots skipped because the consumer was late.
    pub driver_dropped: u64,
    /// Times a lost camera was reopened.
    pub reconnects: u64,
}

/// State shared between a source, blocked in `next_frame` on the capture thread, and the rest
/// of the pipeline, which must be able to stop it and to tell an outage from a stall.
#[derive(Debug, Default)]
pub struct CaptureControl {
    stop: AtomicBool,
    reconnecting: AtomicBool,
}

impl CaptureControl {
    /// Asks the source to return [`CaptureError::Stopped`] at its next chance.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Set by a camera source while a lost device is being reopened.
    pub fn set_reconnecting(&self, on: bool) {
        self.reconnecting.store(on, Ordering::Relaxed);
    }

    pub fn reconnecting(&self) -> bool {
        self.reconnecting.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot open camera {device}: {reason}")]
    Open { device: String, reason: String },
    #[error("camera {device}: no usable format: {reason}")]
    UnsupportedFormat { device: String, reason: String },
    #[error("camera {device} disconnected: {reason}")]
    Disconnected { device: String, reason: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    #[error(
        "image {path} is {found_width}x{found_height} but the first replay image is \
         {width}x{height}; all replay images must be the same size"
    )]
    SizeMismatch {
        path: PathBuf,
        width: usize,
        height: usize,
        found_width: usize,
        found_height: usize,
    },
    #[error("{path}: not a usable YUV4MPEG2 file: {reason}")]
    Y4m { path: PathBuf, reason: String },
    #[error("{path}: no frames to replay")]
    Empty { path: PathBuf },
    #[error("crop {crop} does not fit in the {width}x{height} frame")]
    Crop {
        crop: Crop,
        width: usize,
        height: usize,
    },
    #[error("invalid capture setting: {0}")]
    InvalidSpec(String),
    #[error("end of stream")]
    EndOfStream,
    #[error("capture stopped")]
    Stopped,
}

/// Camera pixel formats drape converts to RGB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PixelFormat {
    /// Packed 4:2:2 YCbCr, BT.601 limited range: cheap to convert, heavy on USB bandwidth.
    Yuyv,
    /// Motion JPEG: one JPEG per frame, light on USB bandwidth, costs a decode.
    Mjpeg,
}

impl PixelFormat {
    pub fn fourcc(self) -> FourCc {
        match self {
            Self::Yuyv => FourCc::YUYV,
            Self::Mjpeg => FourCc::MJPG,
        }
    }

    pub fn from_fourcc(fourcc: FourCc) -> Option<Self> {
        match fourcc {
            FourCc::YUYV => Some(Self::Yuyv),
            FourCc::MJPG => Some(Self::Mjpeg),
            _ => None,
        }
    }
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fourcc().fmt(f)
    }
}

impl FromStr for PixelFormat {
    type Err = CaptureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "yuyv" => Ok(Self::Yuyv),
            "mjpeg" | "mjpg" => Ok(Self::Mjpeg),
            _ => Err(CaptureError::InvalidSpec(format!(
                "pixel format `{s}`: expected yuyv or mjpeg"
            ))),
        }
    }
}

/// What to capture from and how.
#[derive(Debug, Clone, Default)]
pub struct SourceSpec {
    /// A camera (`/dev/videoN`), a directory of PNG/JPEG images, or a `.y4m` recording.
    pub source: String,
    /// Frames per second. `None` takes the source's own rate: the `.y4m` header's, otherwise
    /// [`DEFAULT_FPS`].
    pub fps: Option<f64>,
    /// Replay only: start over after the last frame instead of ending the stream.
    pub looping: bool,
    /// Camera only: preferred resolution and pixel format (replay keeps the recording's).
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub format: Option<PixelFormat>,
    pub transforms: Transforms,
    /// Camera only: once set (by a signal handler, say), a camera waiting to reconnect gives up
    /// and the stream ends instead of blocking shutdown until the camera returns.
    pub stop: Option<Arc<AtomicBool>>,
}

impl SourceSpec {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            ..Self::default()
        }
    }
}

/// A camera node and what it offers, for `drape cameras`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CameraInfo {
    pub path: PathBuf,
    /// The card name the driver reports, e.g. "HD Pro Webcam C920".
    pub name: String,
    pub driver: String,
    pub bus: String,
    /// Every (format, size, rate) the camera advertises. Continuous size or rate ranges are
    /// listed by their ends. A rate of 0 means the driver does not enumerate rates.
    pub formats: Vec<Capability>,
}

/// No V4L2 outside Linux: no cameras to list.
#[cfg(not(target_os = "linux"))]
pub fn list_cameras() -> Vec<CameraInfo> {
    Vec::new()
}

/// The rate cameras are asked for, and image directories are replayed at, unless told otherwise.
pub const DEFAULT_FPS: f64 = 30.0;

/// Opens the source `spec` names, wrapped in its transforms.
pub fn open(spec: &SourceSpec) -> Result<Box<dyn FrameSource>, CaptureError> {
    if let Some(fps) = spec.fps {
        check_fps(fps)?;
    }
    let path = Path::new(&spec.source);
    let (source, width, height): (Box<dyn FrameSource>, usize, usize) = if is_camera(path) {
        let request = FormatRequest {
            format: spec.format,
            width: spec.width,
            height: spec.height,
            fps: spec.fps.unwrap_or(DEFAULT_FPS),
        };
        let source = open_camera(path, request, spec.stop.clone())?;
        let (width, height) = source.size();
        (Box::new(source), width, height)
    } else {
        if spec.width.is_some() || spec.height.is_some() || spec.format.is_some() {
            tracing::warn!(
                source = %spec.source,
                "width/height/format apply to cameras only; replay keeps the recording's"
            );
        }
        let source = ReplaySource::open(path, spec.fps, spec.looping)?;
        let (width, height) = source.size();
        (Box::new(source), width, height)
    };
    if spec.transforms.is_identity() {
        return Ok(source);
    }
    Ok(Box::new(TransformedSource::new(
        source,
        spec.transforms,
        width,
        height,
    )?))
}

/// A camera source as `open` builds it: real sleeps between reconnect attempts, cut short by the
/// spec's stop flag.
type Camera<D> = CameraSource<D, StoppableSleep>;

#[cfg(target_os = "linux")]
fn open_camera(
    path: &Path,
    request: FormatRequest,
    stop: Option<Arc<AtomicBool>>,
) -> Result<Camera<v4l::V4l2Device>, CaptureError> {
    let sleeper = StoppableSleep { stop: stop.clone() };
    let camera = CameraSource::new(
        v4l::V4l2Device::new(path, request),
        ReconnectPolicy::default(),
        sleeper,
    )?;
    Ok(match stop {
        Some(stop) => camera.with_stop(stop),
        None => camera,
    })
}

#[cfg(not(target_os = "linux"))]
fn open_camera(
    path: &Path,
    _: FormatRequest,
    _: Option<Arc<AtomicBool>>,
) -> Result<Camera<NoCamera>, CaptureError> {
    Err(CaptureError::Open {
        device: path.display().to_string(),
        reason: "V4L2 cameras need Linux; replay a directory of images or a .y4m file instead"
            .into(),
    })
}

/// Stands in for the camera device type where there is no V4L2.
#[cfg(not(target_os = "linux"))]
pub enum NoCamera {}

#[cfg(not(target_os = "linux"))]
impl Device for NoCamera {
    fn name(&self) -> &str {
        match *self {}
    }
    fn open(&mut self) -> Result<StreamFormat, CaptureError> {
        match *self {}
    }
    fn dequeue(&mut self) -> std::io::Result<RawBuffer<'_>> {
        match *self {}
    }
    fn close(&mut self) {
        match *self {}
    }
}

/// A path is a camera if it is a character device, or names one under /dev that may not exist
/// (yet), so a missing camera fails as a camera rather than as a missing recording.
fn is_camera(path: &Path) -> bool {
    match std::fs::metadata(path) {
        Ok(meta) => meta.file_type().is_char_device(),
        Err(_) => path.starts_with("/dev"),
    }
}

/// Slowest frame rate accepted (one frame every 100 s); slower ones overflow frame schedules.
pub const MIN_FPS: f64 = 0.01;
/// Fastest frame rate accepted; no camera or replay drape serves comes near it.
pub const MAX_FPS: f64 = 1000.0;

/// Checks a frame rate from a flag or a recording's header.
pub fn check_fps(fps: f64) -> Result<f64, CaptureError> {
    if (MIN_FPS..=MAX_FPS).contains(&fps) {
        Ok(fps)
    } else {
        Err(CaptureError::InvalidSpec(format!(
            "fps must lie in {MIN_FPS}..={MAX_FPS}, got {fps:?}"
        )))
    }
}

/// A frame rate for humans: `30`, `29.97`.
struct FpsLabel(f64);

impl fmt::Display for FpsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if (self.0 - self.0.round()).abs() < 0.005 {
            write!(f, "{}", self.0.round())
        } else {
            write!(f, "{:.2}", self.0)
        }
    }
}
