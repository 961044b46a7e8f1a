//! V4L2 cameras through the `v4l` crate: capability enumeration, format negotiation
//! ([`super::negotiate`]), mmap streaming with four kernel buffers, and driver timestamps mapped
//! to the process's clocks.
//!
//! Run `drape cameras` to see what each `/dev/video*` node offers.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::v4l::buffer::{Flags as BufferFlags, Metadata, Type};
use ::v4l::frameinterval::FrameIntervalEnum;
use ::v4l::framesize::FrameSizeEnum;
use ::v4l::io::mmap::Stream;
use ::v4l::io::traits::CaptureStream;
use ::v4l::video::capture::Parameters;
use ::v4l::video::Capture;
use ::v4l::{Format, FourCC, Fraction};

use super::camera::{Device, RawBuffer, StreamFormat};
use super::negotiate::{
    negotiate, Capability, FormatRequest, FourCc, DEFAULT_HEIGHT, DEFAULT_WIDTH,
};
use super::CameraInfo;
use super::{CaptureError, PixelFormat};

/// Kernel buffers in flight: one being filled, one being converted, two of slack so a slow
/// conversion does not make the driver drop frames.
const BUFFER_COUNT: u32 = 4;
/// A camera that delivers nothing for this long is treated as lost and reopened. UVC cameras
/// that crash firmware-side stay enumerated but go silent.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Lists the `/dev/video*` nodes that capture video, sorted by path. Nodes that cannot be opened
/// or that offer no capture format (UVC metadata nodes) are left out.
pub fn list_cameras() -> Vec<CameraInfo> {
    let Ok(entries) = std::fs::read_dir("/dev") else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("video"))
        })
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let dev = ::v4l::Device::with_path(&path).ok()?;
            let caps = dev.query_caps().ok()?;
            let formats = capabilities(&dev, None).ok()?;
            (!formats.is_empty()).then_some(CameraInfo {
                path,
                name: caps.card,
                driver: caps.driver,
                bus: caps.bus,
                formats,
            })
        })
        .collect()
}

/// Everything `dev` advertises for capture. With a `request`, continuous ranges also list the
/// requested size and rate so negotiation can pick them exactly.
fn capabilities(
    dev: &::v4l::Device,
    request: Option<&FormatRequest>,
) -> io::Result<Vec<Capability>> {
    let mut caps = Vec::new();
    for desc in dev.enum_formats()? {
        // A format whose sizes cannot be enumerated is one we cannot negotiate; skip it.
        let Ok(sizes) = dev.enum_framesizes(desc.fourcc) else {
            continue;
        };
        for size in sizes {
            for (width, height) in sizes_of(size.size, request) {
                let rates = dev
                    .enum_frameintervals(desc.fourcc, width, height)
                    .map(|intervals| {
                        intervals
                            .into_iter()
                            .flat_map(|i| rates_of(i.interval, request))
                            .collect()
                    })
                    .unwrap_or_else(|_| vec![0.0]);
                for fps in rates {
                    caps.push(Capability {
                        fourcc: FourCc(desc.fourcc.repr),
                        width,
                        height,
                        fps,
                    });
                }
            }
        }
    }
    Ok(caps)
}

fn sizes_of(size: FrameSizeEnum, request: Option<&FormatRequest>) -> Vec<(u32, u32)> {
    match size {
        FrameSizeEnum::Discrete(d) => vec![(d.width, d.height)],
        FrameSizeEnum::Stepwise(s) => {
            let snap = |want: u32, min: u32, max: u32, step: u32| {
                let want = want.clamp(min, max);
                min + (want - min) / step.max(1) * step.max(1)
            };
            let mut sizes = vec![(s.min_width, s.min_height), (s.max_width, s.max_height)];
            if let Some(r) = request {
                sizes.push((
                    snap(
                        r.width.unwrap_or(DEFAULT_WIDTH),
                        s.min_width,
                        s.max_width,
                        s.step_width,
                    ),
                    snap(
                        r.height.unwrap_or(DEFAULT_HEIGHT),
                        s.min_height,
                        s.max_height,
                        s.step_height,
                    ),
                ));
            }
            sizes
        }
    }
}

fn rates_of(interval: FrameIntervalEnum, request: Option<&FormatRequest>) -> Vec<f64> {
    let fps = |f: Fraction| {
        if f.numerator == 0 {
            0.0
        } else {
            f64::from(f.denominator) / f64::from(f.numerator)
        }
    };
    match interval {
        FrameIntervalEnum::Discrete(f) => vec![fps(f)],
        // The shortest interval is the fastest rate.
        FrameIntervalEnum::Stepwise(s) => {
            let (fastest, slowest) = (fps(s.min), fps(s.max));
            let mut rates = vec![fastest, slowest];
            if let Some(r) = request.filter(|r| (slowest..=fastest).contains(&r.fps)) {
                rates.push(r.fps);
            }
            rates
        }
    }
}

/// A V4L2 capture node; see [`Device`].
pub struct V4l2Device {
    path: PathBuf,
    name: String,
    request: FormatRequest,
    open: Option<Streaming>,
}

struct Streaming {
    // Field order matters: the stream (its buffers) goes before the device handle it maps.
    stream: Stream<'static>,
    _device: ::v4l::Device,
}

impl V4l2Device {
    /// A device that will stream from `path` in the format `request` negotiates to. Nothing is
    /// opened until [`Device::open`].
    pub fn new(path: &Path, request: FormatRequest) -> Self {
        Self {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            request,
            open: None,
        }
    }

    fn start(&self) -> Result<(Streaming, StreamFormat), CaptureError> {
        let open_err = |reason: String| CaptureError::Open {
            device: self.name.clone(),
            reason,
        };
        let dev = ::v4l::Device::with_path(&self.path).map_err(|e| open_err(e.to_string()))?;
        let caps = capabilities(&dev, Some(&self.request))
            .map_err(|e| open_err(format!("cannot list its formats: {e}")))?;
        let chosen =
            negotiate(&caps, &self.request).map_err(|reason| CaptureError::UnsupportedFormat {
                device: self.name.clone(),
                reason,
            })?;

        let wanted = Format::new(chosen.width, chosen.height, FourCC::new(&chosen.fourcc.0));
        let actual = dev
            .set_format(&wanted)
            .map_err(|e| open_err(format!("setting format {}: {e}", chosen.fourcc)))?;
        // The driver may adjust what it was asked for; what it reports is what it will send.
        let pixel = PixelFormat::from_fourcc(FourCc(actual.fourcc.repr)).ok_or_else(|| {
            CaptureError::UnsupportedFormat {
                device: self.name.clone(),
                reason: format!(
                    "asked for {}, the driver chose {}",
                    chosen.fourcc, actual.fourcc
                ),
            }
        })?;
        let fps = if chosen.fps > 0.0 {
            chosen.fps
        } else {
            self.request.fps
        };
        // Frame interval as a fraction of seconds; x1000 keeps 29.97 exact enough.
        let interval = Fraction::new(1000, (fps * 1000.0).round() as u32);
        // Some drivers have a fixed rate and reject VIDIOC_S_PARM; they still stream.
        let actual_fps = match dev.set_params(&Parameters::new(interval)) {
            Ok(params) if params.interval.numerator > 0 => {
                f64::from(params.interval.denominator) / f64::from(params.interval.numerator)
            }
            Ok(_) => fps,
            Err(e) => {
                tracing::warn!(device = %self.name, error = %e, fps, "cannot set the frame rate");
                fps
            }
        };

        let mut stream = Stream::with_buffers(&dev, Type::VideoCapture, BUFFER_COUNT)
            .map_err(|e| open_err(format!("mapping {BUFFER_COUNT} buffers: {e}")))?;
        stream.set_timeout(STALL_TIMEOUT);
        let format = StreamFormat {
            pixel,
            width: actual.width as usize,
            height: actual.height as usize,
            stride: actual.stride as usize,
            fps: actual_fps,
        };
        Ok((
            Streaming {
                stream,
                _device: dev,
            },
            format,
        ))
    }
}

impl Device for V4l2Device {
    fn name(&self) -> &str {
        &self.name
    }

    fn open(&mut self) -> Result<StreamFormat, CaptureError> {
        self.close();
        let (streaming, format) = self.start()?;
        self.open = Some(streaming);
        Ok(format)
    }

    fn dequeue(&mut self) -> io::Result<RawBuffer<'_>> {
        let streaming = self
            .open
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "not streaming"))?;
        // The first call queues all buffers and starts streaming; each later one requeues the
        // previous buffer before waiting for the next.
        let (data, meta) = CaptureStream::next(&mut streaming.stream)?;
        let used = (meta.bytesused as usize).min(data.len());
        let (captured, captured_at_unix_ms) = capture_time(meta);
        Ok(RawBuffer {
            data: &data[..used],
            sequence: meta.sequence,
            error: meta.flags.contains(BufferFlags::ERROR),
            captured,
            captured_at_unix_ms,
        })
    }

    fn close(&mut self) {
        if let Some(streaming) = self.open.take() {
            // v4l 0.14 panics in `Drop` when stopping the stream or freeing its buffers fails
            // with anything but ENODEV; a camera dying some other way must not take the capture
            // thread down with it.
            if catch_unwind(AssertUnwindSafe(|| drop(streaming))).is_err() {
                tracing::warn!(device = %self.name, "releasing the camera's buffers failed");
            }
        }
    }
}

impl Drop for V4l2Device {
    fn drop(&mut self) {
        self.close();
    }
}

/// When the driver captured the buffer, as an `Instant` and as Unix milliseconds. Drivers stamp
/// buffers on CLOCK_MONOTONIC (the flag says so); a buffer without such a stamp is taken as
/// captured now.
fn capture_time(meta: &Metadata) -> (Instant, f64) {
    let monotonic = (meta.flags & BufferFlags::TIMESTAMP_MASK) == BufferFlags::TIMESTAMP_MONOTONIC;
    let stamp = Duration::new(meta.timestamp.sec.max(0) as u64, 0)
        + Duration::from_micros(meta.timestamp.usec.max(0) as u64);
    let age = match monotonic_now() {
        Some(now) if monotonic && !stamp.is_zero() => now.saturating_sub(stamp),
        _ => Duration::ZERO,
    };
    backdate(age, Instant::now(), SystemTime::now())
}

/// Moves both clocks' "now" back by `age`.
fn backdate(age: Duration, now: Instant, wall_now: SystemTime) -> (Instant, f64) {
    let captured = now.checked_sub(age).unwrap_or(now);
    let wall = wall_now.checked_sub(age).unwrap_or(wall_now);
    let unix_ms = wall
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    (captured, unix_ms)
}

fn monotonic_now() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backdating_moves_both_clocks() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000);
        let (captured, unix_ms) = backdate(Duration::from_millis(40), now, wall);
        assert_eq!(now - captured, Duration::from_millis(40));
        assert!((unix_ms - 999_960.0).abs() < 1e-6, "{unix_ms}");
    }

    #[test]
    fn monotonic_clock_advances_with_instant() {
        // Readings bracketing an Instant interval span at least as long an interval.
        let before = monotonic_now().unwrap();
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let elapsed = start.elapsed();
        let after = monotonic_now().unwrap();
        assert!(
            after - before >= elapsed,
            "{:?} < {elapsed:?}",
            after - before
        );
    }

    #[test]
    fn stepwise_ranges_list_ends_and_request() {
        use ::v4l::framesize::Stepwise;
        let request = FormatRequest {
            format: None,
            width: Some(1000),
            height: Some(700),
            fps: 25.0,
        };
        let size = FrameSizeEnum::Stepwise(Stepwise {
            min_width: 160,
            max_width: 1920,
            step_width: 16,
            min_height: 120,
            max_height: 1080,
            step_height: 8,
        });
        assert_eq!(
            sizes_of(size, Some(&request)),
            vec![(160, 120), (1920, 1080), (992, 696)]
        );
        let rates = rates_of(
            FrameIntervalEnum::Stepwise(::v4l::frameinterval::Stepwise {
                min: Fraction::new(1, 60),
                max: Fraction::new(1, 5),
                step: Fraction::new(1, 1000),
            }),
            Some(&request),
        );
        assert_eq!(rates, vec![60.0, 5.0, 25.0]);
    }

    #[test]
    fn no_cameras_here_is_an_empty_list() {
        // The build machine has no camera; on a machine with one this lists it.
        let cameras = list_cameras();
        assert!(cameras.iter().all(|c| !c.formats.is_empty()));
    }
}
